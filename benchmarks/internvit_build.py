"""What loading InternViT from a weight file costs in host memory and time: the file read whole
and copied into the model (what every load did before issue 25 point 4), against the file
memory-mapped and its tensors taken as the parameters (``read_state`` + ``init_weights`` now).
Each load in a fresh process, the two alternating per shape; peak RSS is read after the load and
again after every weight has been read once (what a forward or the copy to the GPU does: mapped
pages count only once touched). The file holds the shape's bfloat16 tensors as a build for a
file leaves them (never initialised: the values do not change what memory holds).

    .venv/bin/python benchmarks/internvit_build.py "dict(preset='300M')" "dict(preset='6B', depth=8)"
    .venv/bin/python benchmarks/internvit_build.py --mmap-only "dict(preset='6B')"

Printed as a Markdown table, never asserted (benchmarks/results/internvit_build.md). The full 6B
read whole needs its 11.8 GB twice: more than a 23 GB machine has (``--mmap-only``).
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = '''
import json, resource, sys, time
import torch
import mmseg_custom  # noqa: F401
from mmseg_custom.models.backbones.intern_vit import InternViT
from mmseg_custom.models.backbones.internvit_weights import backbone_state
kwargs, path, mode = eval(sys.argv[1]), sys.argv[2], sys.argv[3]
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
if mode == 'write':  # the shape's bfloat16 tensors, never initialised
    model = InternViT(pretrained=path, **kwargs)
    state = model.state_dict()
    if path.endswith('.safetensors'):
        from safetensors.torch import save_file
        save_file(state, path)
    else:
        torch.save(state, path)
    sys.exit(0)
start = time.perf_counter()
model = InternViT(pretrained=path, **kwargs)
if mode == 'copy':  # the load before: the whole file in memory, copied into the parameters
    if path.endswith('.safetensors'):
        from safetensors.torch import load_file
        whole = load_file(path)
    else:
        whole = torch.load(path, map_location='cpu', weights_only=True)
    model.load_state_dict(backbone_state(whole)[0], strict=False)
    del whole
else:
    model.init_weights()
loaded_s, loaded_gb = time.perf_counter() - start, peak()
checksum = sum(float(p.float().sum()) for p in model.parameters())  # every weight read once
print(json.dumps(dict(load_s=loaded_s, load_gb=loaded_gb, read_s=time.perf_counter() - start,
                      read_gb=peak(), checksum=checksum,
                      params=sum(p.numel() for p in model.parameters()))))
'''


def child(kwargs, path, mode):
    out = subprocess.run([sys.executable, '-c', CHILD, kwargs, path, mode], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1]) if mode != 'write' else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('shapes', nargs='*', default=["dict(preset='300M')",
                                                      "dict(preset='6B', depth=8)"])
    parser.add_argument('--suffix', default='.pth', choices=['.pth', '.safetensors'])
    parser.add_argument('--mmap-only', action='store_true', help='skip the whole-file load')
    parser.add_argument('--dir', default=None, help='where the weight file is written')
    args = parser.parse_args()
    modes = ['mmap'] if args.mmap_only else ['copy', 'mmap']
    print('| shape | file | params | file GB | load | load s | peak GB after load | '
          's, every weight read | peak GB, every weight read |')
    print('|---|---|---|---|---|---|---|---|---|')
    for i, kwargs in enumerate(args.shapes):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            path = str(Path(tmp) / f'weights{args.suffix}')
            child(kwargs, path, 'write')
            size = Path(path).stat().st_size / 1e9
            order = modes if i % 2 == 0 else modes[::-1]  # each side first in turn
            for mode in order:
                r = child(kwargs, path, mode)
                print(f'| `{kwargs}` | {args.suffix} | {r["params"] / 1e9:.2f} B | {size:.2f} | '
                      f'{"read whole + copied" if mode == "copy" else "memory-mapped"} | '
                      f'{r["load_s"]:.2f} | {r["load_gb"]:.1f} | {r["read_s"]:.2f} | '
                      f'{r["read_gb"]:.1f} |', flush=True)


if __name__ == '__main__':
    main()
