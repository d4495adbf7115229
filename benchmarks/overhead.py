"""Orchestration overhead: the same training (a) directly under torchrun and (b) as an
`orchestrator sweep` of K identical trials (local Ray, warm crews, Tune, MLflow; K=1 by
default: a one-trial sweep). Prints the wall times, the time from the command's start to mmcv's
runner starting, how much slower the training itself runs inside the sweep, the gap between
consecutive trials, and the overhead per trial (b - K*a) / K and its ratio to a.

Targets (issue 3): overhead under 15 s per trial and under 10 % of a 2-minute trial.

    .venv/bin/python benchmarks/overhead.py [--iters 3000] [--workers 2] [--trials 1]
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


STAMP = re.compile(r'^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - mmseg - ')


def _stamp(line, pattern=STAMP):
    m = pattern.match(line)
    return dt.datetime.strptime(m.group(1), '%Y-%m-%d %H:%M:%S,%f').timestamp() if m else None


def runner_spans(work_dir):
    """(start, end) of every mmcv runner under work_dir, in start order, from the mmseg logs:
    from 'workflow:' (the first iteration follows) to the log's last timestamped line."""
    spans = []
    for log in Path(work_dir).rglob('*.log'):
        lines = log.read_text().splitlines()
        start = next((t for t in map(lambda l: _stamp(l, RUNNER_START), lines) if t), None)
        end = next((t for t in map(_stamp, reversed(lines)) if t), None)
        if start and end:
            spans.append((start, end))
    return sorted(spans)


def timed(cmd, env):
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return start, time.time() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--iters', type=int, default=3000, help='3000 ~ a 2-minute trial on 2 cores')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--trials', type=int, default=1, help='identical trials in the sweep')
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
        (a_run,) = runner_spans(tmp / 'direct')
        space = dict(name='overhead', base_config=str(CONFIG), data_root=str(data),
                     parameters={'model.decode_head.num_convs': {'grid': [1]}},
                     derived={'iterations': {'at_full_data': args.iters}, 'evaluations': evals},
                     search={'num_samples': args.trials},
                     # one trial at a time, like the direct runs it is compared with
                     resources={'workers_per_trial': args.workers, 'cpus_per_worker': 1,
                                'max_concurrent_trials': 1},
                     output=str(tmp / 'sweep'))
        (tmp / 'space.yaml').write_text(yaml.safe_dump(space))
        b_start, b = timed([bin_, 'sweep', str(tmp / 'space.yaml')], env)
        b_runs = runner_spans(tmp / 'sweep')
    assert len(b_runs) == args.trials, b_runs  # rank 0 writes the log
    k = args.trials
    a_train = a_run[1] - a_run[0]
    b_train = sum(e - s for s, e in b_runs) / k
    gaps = [b_runs[i + 1][0] - b_runs[i][1] for i in range(k - 1)]
    per_trial = (b - k * a) / k
    print(f'training: tiny config, {args.iters} iterations, {args.workers} CPU workers (gloo), '
          f'{os.cpu_count()} cores; sweep of {k} identical trial(s)')
    print(f'(a) direct torchrun      : {a:7.1f} s wall, runner starts after '
          f'{a_run[0] - a_start:5.1f} s, trains {a_train:6.1f} s')
    print(f'(b) sweep, {k} trial(s)    : {b:7.1f} s wall, first runner starts after '
          f'{b_runs[0][0] - b_start:5.1f} s, trains {b_train:6.1f} s per trial '
          f'({b_train / a_train - 1:+.1%} vs direct)')
    if gaps:
        print(f'between trials           : {sum(gaps) / len(gaps):7.1f} s from one runner\'s end '
              f'to the next one\'s start (mean of {len(gaps)})')
    print(f'overhead (b - K*a) / K   : {per_trial:7.1f} s per trial (target < 15 s)')
    print(f'ratio (b - K*a) / (K*a)  : {per_trial / a:7.1%} (target < 10 % of a 2-minute trial)')


if __name__ == '__main__':
    main()
