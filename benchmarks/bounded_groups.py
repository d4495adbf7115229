"""Peak memory, live trial processes and start-up of a grouped sweep of the tiny frozen config
(groups of 8 heads, 1 CPU per worker, local Ray), for the sweep sizes given.

    .venv/bin/python benchmarks/bounded_groups.py --trials 48 192
    .venv/bin/python benchmarks/bounded_groups.py --trials 48 --repo /tmp/before   # another checkout

Peak memory: the largest sum of resident memory over the sweep's process tree (the driver, its
local Ray and every Ray worker), sampled every 0.5 s. Live trials: Ray processes running a Tune
trial (`ray::ImplicitFunc`). Start-up: from the command's start to the first trial group's
training log. A sweep whose tree passes --stop-gb is stopped and reported as such. Printed,
never asserted.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def space(n_trials, root, out):
    """n_trials = 8 heads x (fractions x subset seeds): 48 -> 2 x 3, 192 -> 4 x 6."""
    keys = n_trials // 8
    fractions = [0.25, 0.5, 0.75, 1.0][:4 if keys % 4 == 0 else 2]
    seeds = list(range(keys // len(fractions)))
    return dict(
        name=f'bounded-{n_trials}', base_config=str(ROOT / 'configs' /
                                                    'tiny_vit_frozen_fcn_synthetic.py'),
        data_root=str(root),
        parameters={'model.decode_head.num_convs': {'grid': [0, 1]},
                    'model.decode_head.with_norm': {'grid': [False, True]},
                    'optimizer.lr': {'grid': [3e-3, 1e-3]},
                    'fewshot.fraction': {'grid': fractions}},
        fewshot={'seeds': seeds},
        derived={'iterations': {'at_full_data': 8}, 'evaluations': 1},
        resources={'workers_per_trial': 1, 'cpus_per_worker': 1},
        grouping={'enabled': True, 'memory_gb': 1},
        tracking={'experiment': f'bounded-{n_trials}'}, output=str(out))


def tree(pid):
    """pid and all its descendants (from /proc)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f'/proc/{p}/task'):
                with open(f'/proc/{p}/task/{task}/children') as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def rss_and_trials(pid):
    rss, trials = 0, 0
    for p in tree(pid):
        try:
            with open(f'/proc/{p}/status') as f:
                rss += next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) * 1024
            with open(f'/proc/{p}/cmdline', 'rb') as f:
                trials += f.read().startswith(b'ray::ImplicitFunc')
        except (OSError, StopIteration):
            pass
    return rss, trials


def measure(n_trials, repo, tmp, stop_gb):
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    root = generate_ade_layout(Path(tmp) / 'data')
    out = Path(tmp) / f'out{n_trials}'
    path = Path(tmp) / f'space{n_trials}.yaml'
    path.write_text(yaml.safe_dump(space(n_trials, root, out)))
    env = dict(os.environ, PYTHONPATH=str(repo))
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, '-m', 'orchestrator.cli', 'sweep', str(path)],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    peak, peak_trials, first_training, stopped = 0, 0, None, False
    while proc.poll() is None:
        rss, trials = rss_and_trials(proc.pid)
        peak, peak_trials = max(peak, rss), max(peak_trials, trials)
        if first_training is None and list((out / f'bounded-{n_trials}').glob('groups/*/*.log')):
            first_training = time.monotonic() - start
        if rss > stop_gb * 1e9:
            stopped = True
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
            break
        time.sleep(0.5)
    return dict(trials=n_trials, exit=proc.returncode, wall_s=time.monotonic() - start,
                startup_s=first_training, peak_gb=peak / 1e9, peak_live_trials=peak_trials,
                stopped_at_gb=stop_gb if stopped else None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--trials', type=int, nargs='+', default=[48, 192])
    p.add_argument('--repo', default=str(ROOT), help='checkout whose orchestrator runs')
    p.add_argument('--stop-gb', type=float, default=14.0)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    print(f'orchestrator from {args.repo}; {os.cpu_count()} CPU cores; groups of 8 heads')
    print(f'{"trials":>6} {"exit":>4} {"wall s":>7} {"start-up s":>10} {"peak GB":>8} '
          f'{"live trials":>11}')
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.trials:
            r = measure(n, args.repo, tmp, args.stop_gb)
            note = f'  (stopped above {r["stopped_at_gb"]:g} GB)' if r['stopped_at_gb'] else ''
            startup = f'{r["startup_s"]:.1f}' if r['startup_s'] is not None else '-'
            print(f'{n:>6} {r["exit"]:>4} {r["wall_s"]:7.1f} {startup:>10} '
                  f'{r["peak_gb"]:8.2f} {r["peak_live_trials"]:>11}{note}', flush=True)


if __name__ == '__main__':
    main()
