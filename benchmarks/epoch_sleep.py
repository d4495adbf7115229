"""mmcv's 2 s sleep at every epoch end, before and after: the same tiny training with one loader
worker, non-persistent (mmcv's IterLoader still sleeps there: the 'before' of every run) and
persistent (mmseg's default; no sleep since mmseg_custom/compat.py). Few-shot subsets make short
epochs, so the sleep is a large share of a probe. Printed as a ratio measured in one run.

    .venv/bin/python benchmarks/epoch_sleep.py            # 150 iterations, 24 per epoch
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(persistent, data, work, iters):
    cmd = [str(Path(sys.executable).with_name('orchestrator')), 'train',
           str(ROOT / 'configs' / 'tiny_fcn_synthetic.py'), '--work-dir', str(work),
           '--cfg-options', f'runner.max_iters={iters}', f'evaluation.interval={iters}',
           'data.workers_per_gpu=1', f'data.persistent_workers={persistent}',
           *[f'data.{s}.data_root={data}' for s in ('train', 'val', 'test')]]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main(iters=150):
    sys.path.insert(0, str(ROOT))
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_ade_layout(Path(tmp) / 'data', num_train=96, num_val=16)
        before = run(False, data, Path(tmp) / 'before', iters)
        after = run(True, data, Path(tmp) / 'after', iters)
    epochs = iters // (96 // 4)
    print(f'{iters} iterations, {epochs} epoch ends, 1 loader worker: sleeping {before:.1f} s, '
          f'persistent workers without the sleep {after:.1f} s ({before / after:.2f}x)')


if __name__ == '__main__':
    main()
