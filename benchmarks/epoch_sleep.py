"""mmcv's 2 s sleep at every epoch end, with and without: the same tiny training, persistent
loader workers on both sides (mmseg's default), the one difference being mmcv's own
``IterLoader.__next__`` (which sleeps at every epoch end) put back in place of ours
(mmseg_custom/compat.py, which skips the sleep where no loader worker starts). Runs alternate
(with, without, with, without) so that no side gets the warm caches; each is a fresh process.

    .venv/bin/python benchmarks/epoch_sleep.py            # 150 iterations, 24 per epoch, x2
"""
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# mmcv's own __next__ is kept before mmseg_custom's shims replace it, and put back for 'sleep'
CHILD = '''
import sys
from mmcv.runner.iter_based_runner import IterLoader
mmcvs_own = IterLoader.__next__
import mmseg_custom  # noqa: F401  (the shims)
if sys.argv[1] == 'sleep':
    IterLoader.__next__ = mmcvs_own
from orchestrator.cli import main
sys.exit(main(sys.argv[2:]))
'''


def run(sleep, data, work, iters):
    args = ['train', str(ROOT / 'configs' / 'tiny_fcn_synthetic.py'), '--work-dir', str(work),
            '--cfg-options', f'runner.max_iters={iters}', f'evaluation.interval={iters}',
            'data.workers_per_gpu=1', 'data.persistent_workers=True',
            *[f'data.{s}.data_root={data}' for s in ('train', 'val', 'test')]]
    start = time.perf_counter()
    subprocess.run([sys.executable, '-c', CHILD, 'sleep' if sleep else 'none', *args],
                   check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main(iters=150, rounds=2):
    sys.path.insert(0, str(ROOT))
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    times = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        data = generate_ade_layout(Path(tmp) / 'data', num_train=96, num_val=16)
        for r in range(rounds):
            for sleep in (True, False):
                times[sleep].append(run(sleep, data, Path(tmp) / f'{sleep}{r}', iters))
    epochs = iters // (96 // 4)
    with_sleep, without = (sum(times[k]) / rounds for k in (True, False))
    print(f'{iters} iterations, {epochs} epoch ends, 1 persistent loader worker, mean of '
          f'{rounds} alternating runs each: with mmcv\'s sleep {with_sleep:.1f} s '
          f'({", ".join(f"{t:.1f}" for t in times[True])}), without {without:.1f} s '
          f'({", ".join(f"{t:.1f}" for t in times[False])}): {with_sleep - without:.1f} s '
          f'apart, {(with_sleep - without) / epochs:.2f} s per epoch end')


if __name__ == '__main__':
    main()
