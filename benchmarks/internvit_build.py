"""What building an InternViT costs, without a weight file (random initialisation in float32,
then the cast: what every build did before) and with one (built on the meta device, then zeros
in bfloat16 until the file is loaded). Each build in a fresh process: wall time and peak RSS.

    .venv/bin/python benchmarks/internvit_build.py "dict(preset='300M')" "dict(preset='6B', depth=8)"

Printed as a Markdown table, never asserted (benchmarks/results/internvit_build.md). The full
6B without a file needs ~27 GB of host memory: more than a 23 GB machine has.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = '''
import json, resource, sys, time
import mmseg_custom  # noqa: F401
from mmseg_custom.models.backbones.intern_vit import InternViT
kwargs, pretrained = eval(sys.argv[1]), sys.argv[2] or None
start = time.perf_counter()
model = InternViT(pretrained=pretrained, **kwargs)
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                      params=sum(p.numel() for p in model.parameters()))))
'''


def build(kwargs, pretrained):
    out = subprocess.run([sys.executable, '-c', CHILD, kwargs, pretrained or ''], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(shapes):
    base = build('dict(preset="300M", depth=1)', None)['peak_gb']  # imports alone, roughly
    print(f'peak RSS includes ~{base:.1f} GB of imports (a 1-block 300M build)\n')
    print('| shape | params | random init, s | from a file, s | ratio | peak GB random | '
          'peak GB file |')
    print('|---|---|---|---|---|---|---|')
    for kwargs in shapes:
        before, after = build(kwargs, None), build(kwargs, '/weights/given/later.pth')
        print(f'| `{kwargs}` | {after["params"] / 1e9:.2f} B | {before["seconds"]:.2f} | '
              f'{after["seconds"]:.2f} | {before["seconds"] / after["seconds"]:.0f}x | '
              f'{before["peak_gb"]:.1f} | {after["peak_gb"]:.1f} |')


if __name__ == '__main__':
    main(sys.argv[1:] or ["dict(preset='300M')", "dict(preset='6B', depth=8)"])
