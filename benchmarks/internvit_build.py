"""What building an InternViT costs, without a weight file (random initialisation in float32,
then the cast: what every build did before) and with one (built on the meta device, then zeros
in bfloat16 until ``init_weights`` loads the file, which this times too: a real file of the
shape's weights, written first). Each build in a fresh process: wall time and peak RSS, the
load included.

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
built = time.perf_counter()
if pretrained:
    model.init_weights()  # the file's tensors into the model
done = dict(seconds=time.perf_counter() - start, build_s=built - start,
            peak_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            params=sum(p.numel() for p in model.parameters()))
if sys.argv[3:]:  # the parent asked for the weights of this shape (after the measurement)
    import torch
    torch.save(model.state_dict(), sys.argv[3])
print(json.dumps(done))
'''


def build(kwargs, pretrained, save_to=None):
    out = subprocess.run([sys.executable, '-c', CHILD, kwargs, pretrained or '',
                          *([save_to] if save_to else [])], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(shapes):
    import tempfile
    base = build('dict(preset="300M", depth=1)', None)['peak_gb']  # imports alone, roughly
    print(f'peak RSS includes ~{base:.1f} GB of imports (a 1-block 300M build)\n')
    print('| shape | params | random init, s | from a file: build s + load s = s | ratio | '
          'peak GB random | peak GB file (load included) | file GB |')
    print('|---|---|---|---|---|---|---|---|')
    for kwargs in shapes:
        with tempfile.TemporaryDirectory() as tmp:
            weights = str(Path(tmp) / 'weights.pth')
            before = build(kwargs, None, save_to=weights)  # the random build writes the file
            after = build(kwargs, weights)
            size = Path(weights).stat().st_size / 1e9
        print(f'| `{kwargs}` | {after["params"] / 1e9:.2f} B | {before["build_s"]:.2f} | '
              f'{after["build_s"]:.2f} + {after["seconds"] - after["build_s"]:.2f} = '
              f'{after["seconds"]:.2f} | {before["build_s"] / after["seconds"]:.1f}x | '
              f'{before["peak_gb"]:.1f} | {after["peak_gb"]:.1f} | {size:.2f} |')


if __name__ == '__main__':
    main(sys.argv[1:] or ["dict(preset='300M')", "dict(preset='6B', depth=8)"])
