"""Wall time of the tiny config on generated data: one process vs 2 gloo workers (torchrun).

Prints the numbers and their ratio to the foundation's target (2 workers reach mIoU >= 0.5 in
under 180 s on 2 cores). Measured in one run, printed, never asserted.

    .venv/bin/python benchmarks/train_two_workers.py
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 180.0


def run(workers, data_root, work_dir):
    cmd = [sys.executable, '-m', 'orchestrator.cli', 'train', 'configs/tiny_fcn_synthetic.py',
           '--work-dir', work_dir, '--workers', str(workers), '--cfg-options',
           *[f'data.{s}.data_root={data_root}' for s in ('train', 'val', 'test')]]
    start = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    wall = time.monotonic() - start
    metrics = json.loads(out.split('FINAL_METRICS ')[1].splitlines()[0])
    return wall, metrics['mIoU']


def main():
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_ade_layout(Path(tmp) / 'data')
        one_s, one_miou = run(1, data, f'{tmp}/one')
        two_s, two_miou = run(2, data, f'{tmp}/two')
    print(f'cores: {os.cpu_count()}')
    print(f'1 process : {one_s:6.1f} s wall (imports + 300 iters + 3 evals), mIoU {one_miou:.3f}')
    print(f'2 workers : {two_s:6.1f} s wall (torchrun, gloo),                  mIoU {two_miou:.3f}')
    print(f'2 workers / target {TARGET_S:.0f} s = {two_s / TARGET_S:.2f}; '
          f'2 workers / 1 process = {two_s / one_s:.2f}')


if __name__ == '__main__':
    main()
