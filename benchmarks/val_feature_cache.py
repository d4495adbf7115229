"""What a hit of the validation feature cache costs (mmseg_custom/hooks/val_features.py), at
InternVL's linear-probe shape: the key (sha256 of a 3 x 504 x 504 float32 crop), then reading
the InternViT-6B output for it (3200 x 36 x 36 float32, 16.6 MB) back from each tier. Each entry
is written once, then read ``--reads`` times (the median is reported; the page cache holds a
recently written disk entry, as on a node that just computed it). Writes a markdown table.

    .venv/bin/python benchmarks/val_feature_cache.py --out benchmarks/results/val_feature_cache_cpu.md
"""
import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mmseg_custom.feature_store import FeatureStore
from mmseg_custom.hooks.val_features import _digest


def _median_s(fn, n):
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--reads', type=int, default=20)
    parser.add_argument('--out')
    args = parser.parse_args()
    torch.manual_seed(0)
    crop = torch.randn(1, 3, 504, 504)
    features = torch.randn(1, 3200, 36, 36)
    prefix = b'backbone'
    rows = [('key: sha256 of the crop', _median_s(lambda: _digest(prefix, crop), args.reads))]
    tiers = [('/dev/shm (memory tier)', '/dev/shm')] if os.path.isdir('/dev/shm') else []
    tiers.append((f'{tempfile.gettempdir()} (disk tier)', tempfile.gettempdir()))
    for name, base in tiers:
        with tempfile.TemporaryDirectory(dir=base) as d:
            store = FeatureStore('cache', [[d, 10 ** 9]])
            key = _digest(prefix, crop)
            store.put(key, dict(kind='list', tensors=[features]))
            rows.append((f'read one entry from {name}',
                         _median_s(lambda: store.get(key), args.reads)))
    lines = [f'A validation feature cache hit at InternVL\'s linear-probe shape, on this machine '
             f'({os.cpu_count()} cores): measured by `benchmarks/val_feature_cache.py`, median '
             f'of {args.reads}.', '', '| step | ms |', '|---|---|']
    lines += [f'| {name} | {s * 1e3:.1f} |' for name, s in rows]
    text = '\n'.join(lines) + '\n'
    print(text, end='')
    if args.out:
        Path(args.out).write_text(text)


if __name__ == '__main__':
    main()
