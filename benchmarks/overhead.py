"""Orchestration overhead: the same training (a) directly under torchrun and (b) as a one-trial
`orchestrator sweep` (local Ray, warm worker group, Tune, MLflow). Prints both wall times, the time
from the command's start to mmcv's runner starting, and the ratio (b - a) / a.

Targets (issue 3): overhead under 15 s per trial and under 10 % of a 2-minute trial.

    .venv/bin/python benchmarks/overhead.py [--iters 3000] [--workers 2]
"""
import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / 'configs' / 'tiny_fcn_synthetic.py'
RUNNER_START = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - mmseg - INFO - workflow:')


def runner_start(work_dir):
    """Wall-clock time at which mmcv's runner began iterating (from the mmseg log)."""
    for log in Path(work_dir).rglob('*.log'):
        for line in log.read_text().splitlines():
            m = RUNNER_START.match(line)
            if m:
                return dt.datetime.strptime(m.group(1), '%Y-%m-%d %H:%M:%S,%f').timestamp()
    return float('nan')


def timed(cmd, env):
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return start, time.time() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--iters', type=int, default=3000, help='3000 ~ a 2-minute trial on 2 cores')
    p.add_argument('--workers', type=int, default=2)
    args = p.parse_args()
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    env = dict(os.environ, OMP_NUM_THREADS='1')
    bin_ = str(Path(sys.executable).with_name('orchestrator'))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate_ade_layout(tmp / 'data')
        evals = 3
        interval = -(-args.iters // evals)
        opts = [f'data.{s}.data_root={data}' for s in ('train', 'val', 'test')] + [
            f'runner.max_iters={args.iters}', f'evaluation.interval={interval}',
            f'checkpoint_config.interval={interval}']
        a_start, a = timed([bin_, 'train', str(CONFIG), '--work-dir', str(tmp / 'direct'),
                            '--workers', str(args.workers), '--cfg-options', *opts], env)
        a_first = runner_start(tmp / 'direct') - a_start

        space = dict(name='overhead', base_config=str(CONFIG), data_root=str(data),
                     parameters={'model.decode_head.num_convs': {'grid': [1]}},
                     derived={'iterations': {'at_full_data': args.iters}, 'evaluations': evals},
                     resources={'workers_per_trial': args.workers, 'cpus_per_worker': 1},
                     output=str(tmp / 'sweep'))
        (tmp / 'space.yaml').write_text(yaml.safe_dump(space))
        b_start, b = timed([bin_, 'sweep', str(tmp / 'space.yaml')], env)
        b_first = runner_start(tmp / 'sweep') - b_start

    print(f'training: tiny config, {args.iters} iterations, {args.workers} CPU workers (gloo), '
          f'{os.cpu_count()} cores')
    print(f'(a) direct torchrun      : {a:7.1f} s wall, runner starts after {a_first:5.1f} s')
    print(f'(b) one-trial sweep      : {b:7.1f} s wall, runner starts after {b_first:5.1f} s')
    print(f'overhead b - a           : {b - a:7.1f} s per trial (target < 15 s)')
    print(f'ratio (b - a) / a        : {(b - a) / a:7.1%} (target < 10 % of a 2-minute trial)')


if __name__ == '__main__':
    main()
