"""Real mmseg training of the tiny config on generated data: one process and 2 gloo workers."""
import json
import subprocess
import sys
import time

import pytest
import torch

from orchestrator import worker

TWO_WORKER_BUDGET_S = 600  # a hang guard, not a timing target (see benchmarks/)


def _evaluate(cfg, checkpoint):
    """mIoU of ``checkpoint`` on the validation set, computed here by mmseg's own test loop in
    one process: an independent check of what the training reported."""
    from mmcv.cnn.utils import revert_sync_batchnorm
    from mmcv.parallel import MMDataParallel
    from mmcv.runner import load_checkpoint
    from mmseg.apis import single_gpu_test
    from mmseg.datasets import build_dataloader, build_dataset
    dataset = build_dataset(cfg.data.val, dict(test_mode=True))
    loader = build_dataloader(dataset, samples_per_gpu=1, workers_per_gpu=0, dist=False,
                              shuffle=False, persistent_workers=False)
    model = revert_sync_batchnorm(worker.build_model(cfg, init_weights=False))
    load_checkpoint(model, str(checkpoint), map_location='cpu')
    results = single_gpu_test(MMDataParallel(model.eval()), loader, pre_eval=True)
    return dataset.evaluate(results, metric='mIoU')['mIoU']


def test_single_process_training_reports_every_evaluation(tiny_cfg, tmp_path):
    tiny_cfg.runner.max_iters = 50
    tiny_cfg.evaluation.interval = 20
    seen, rss = [], []

    def record(m):  # the kernel's resident size right after the evaluation's snapshot
        seen.append(m)
        rss.append(int(next(line for line in open('/proc/self/status')
                            if line.startswith('VmRSS:')).split()[1]) * 1024)
    metrics = worker.train(tiny_cfg, str(tmp_path / 'wd'), callback=record)
    # Evaluations at 20 and 40 from mmseg's EvalHook, one more at 50 for the final weights.
    assert [m['iter'] for m in seen] == [20, 40, 50]
    assert metrics['mIoU'] == pytest.approx(_evaluate(tiny_cfg, tmp_path / 'wd' / 'iter_50.pth'),
                                            abs=1e-6)
    for key in ('mIoU', 'mAcc', 'aAcc', 'IoU.class1', 'IoU.class4', 'Acc.class2'):
        assert 0.0 <= metrics[key] <= 1.0, key
    # what it cost: growing wall time, no GPU-hours on CPU, a throughput, and a peak that is
    # at least the resident size at that moment and at most the process's lifetime peak
    import resource
    walls = [m['cost.train_s'] for m in seen]
    assert walls == sorted(walls) and walls[0] < walls[-1]
    assert metrics['cost.gpu_hours'] == 0.0 and 'cost.img_per_s' in metrics
    for m, resident in zip(seen, rss):
        assert m['cost.peak_rss_gb'] * 1e9 >= 0.95 * resident
    # (the kernel's two counters differ by its per-thread batching of RSS updates: 1 %)
    assert metrics['cost.peak_rss_gb'] * 1e9 <= \
        1.01 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    lines = (tmp_path / 'wd' / 'metrics.jsonl').read_text().splitlines()
    assert [json.loads(line)['iter'] for line in lines] == [20, 40, 50]
    assert (tmp_path / 'wd' / 'config.py').exists()


def test_the_config_as_it_ran_reloads_and_trains_the_same(tiny_cfg, tmp_path):
    """work_dir/config.py is the config as it ran, hooks included, in plain values (the sweep's
    listener and stop request are attached in code): mmcv loads it, and a run from the file
    alone ends with the same scores."""
    from mmcv import Config
    tiny_cfg.runner.max_iters = 20
    tiny_cfg.evaluation.interval = 10
    seen = []
    first = worker.train(tiny_cfg, str(tmp_path / 'a'), callback=seen.append,
                         should_stop=lambda: False)
    ran = Config.fromfile(str(tmp_path / 'a' / 'config.py'))
    assert [h['type'] for h in ran.custom_hooks].count('EvalMetricsHook') == 1
    assert 'StopRequestHook' in [h['type'] for h in ran.custom_hooks]
    again = worker.train(ran, str(tmp_path / 'b'))

    def scores(m):
        return {k: v for k, v in m.items() if k != 'eval_time' and not k.startswith('cost.')}
    assert [m['iter'] for m in seen] == [10, 20] and scores(again) == scores(first)
    reran = Config.fromfile(str(tmp_path / 'b' / 'config.py'))  # not a second set of hooks
    assert [h['type'] for h in reran.custom_hooks] == [h['type'] for h in ran.custom_hooks]


def test_two_workers_over_gloo_learn_and_stay_in_sync(synthetic_root, tmp_path, cli_env):
    """2 torchrun workers, gloo, distributed evaluation during training, with_norm=True on CPU."""
    wd = tmp_path / 'wd'
    cmd = [sys.executable, '-m', 'orchestrator.cli', 'train', 'configs/tiny_fcn_synthetic.py',
           '--work-dir', str(wd), '--workers', '2', '--cfg-options',
           *[f'data.{s}.data_root={synthetic_root}' for s in ('train', 'val', 'test')],
           'model.decode_head.with_norm=True']
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cli_env,
                          timeout=TWO_WORKER_BUDGET_S)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads(proc.stdout.split('FINAL_METRICS ')[1].splitlines()[0])
    print(f'2-worker gloo training: {elapsed:.1f} s, mIoU {final["mIoU"]:.3f}')
    assert final['mIoU'] >= 0.5

    evals = [json.loads(line) for line in (wd / 'metrics.jsonl').read_text().splitlines()]
    assert [e['iter'] for e in evals] == [100, 200, 300]  # distributed eval during training
    from mmcv import Config
    cfg = Config.fromfile('configs/tiny_fcn_synthetic.py')
    cfg.merge_from_dict({'model.decode_head.with_norm': True,
                         **{f'data.{s}.data_root': str(synthetic_root)
                            for s in ('train', 'val', 'test')}})
    # the 2 ranks' distributed evaluation equals one process evaluating rank 0's checkpoint
    assert final['mIoU'] == pytest.approx(_evaluate(cfg, wd / 'iter_300.pth'), abs=1e-6)

    sync = json.loads((wd / 'rank_sync.json').read_text())
    assert sync['world_size'] == 2
    rank0, rank1 = sync['decode_head_sha256']
    assert rank0 == rank1
    ckpt = torch.load(wd / 'latest.pth', map_location='cpu', weights_only=False)
    head = {k[len('decode_head.'):]: v for k, v in ckpt['state_dict'].items()
            if k.startswith('decode_head.')}
    assert 'norm.weight' in head  # with_norm=True made it into the trained model
    assert worker.state_digest(head) == rank0

    log = next(wd.glob('*.log')).read_text()
    assert 'backend gloo' in log
    assert 'SyncBatchNorm layer(s)' in log and 'per-worker statistics' in log


def test_missing_data_directory_is_one_clear_line(tiny_cfg, tmp_path, capsys):
    code = worker.main(['configs/tiny_fcn_synthetic.py', '--work-dir', str(tmp_path / 'wd'),
                        '--cfg-options', 'data.train.data_root=/nonexistent/ade'])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count('\n') == 0
    assert 'data.train.img_dir' in err and '/nonexistent/ade/images/training' in err
    assert not (tmp_path / 'wd').exists()  # nothing started


def test_linear_probe_channel_mismatch_names_both_values(synthetic_root, tmp_path, capsys):
    code = worker.main([
        'configs/tiny_fcn_synthetic.py', '--work-dir', str(tmp_path / 'wd'), '--cfg-options',
        *[f'data.{s}.data_root={synthetic_root}' for s in ('train', 'val')],
        'model.decode_head.num_convs=0', 'model.decode_head.channels=16'])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count('\n') == 0
    assert 'in_channels=32' in err and 'channels=16' in err
    assert not (tmp_path / 'wd').exists()  # rejected before anything was written


@pytest.mark.parametrize('path', ['configs/does_not_exist.py'])
def test_missing_config_file(path, tmp_path, capsys):
    assert worker.main([path, '--work-dir', str(tmp_path)]) == 2
    assert path in capsys.readouterr().err


@pytest.mark.parametrize('persistent,sleeps', [(True, 0), (False, 2)])
def test_epoch_ends_sleep_only_where_loader_workers_restart(persistent, sleeps, monkeypatch):
    """mmcv sleeps 2 s per epoch against a deadlock of starting loader workers; persistent
    workers never restart, so their epochs end without it (a 1/16 subset: every 79 steps)."""
    from mmcv.runner.iter_based_runner import IterLoader
    from torch.utils.data import DataLoader

    import mmseg_custom.compat as compat
    slept = []
    monkeypatch.setattr(compat.time, 'sleep', slept.append)
    loader = IterLoader(DataLoader(list(range(4)), batch_size=2, num_workers=1,
                                   persistent_workers=persistent))
    assert [int(next(loader).sum()) for _ in range(6)] == [1, 5, 1, 5, 1, 5]
    assert slept == [2] * sleeps  # two epoch ends


def test_save_best_is_a_link_to_the_checkpoint_not_a_second_copy(tiny_cfg, tmp_path):
    """InternVL's configs set ``evaluation.save_best='mIoU'``: mmcv wrote the whole model again
    for each new best (35 GB for a 6B fine-tune). Now the best is the iteration's checkpoint
    under a second name (one inode, which outlives ``max_keep_ckpts`` removing the other)."""
    import os
    tiny_cfg.runner.max_iters = 60
    tiny_cfg.evaluation.update(interval=20, save_best='mIoU')
    tiny_cfg.checkpoint_config.interval = 20
    seen = []
    worker.train(tiny_cfg, str(tmp_path / 'wd'), callback=seen.append)
    (best,) = (tmp_path / 'wd').glob('best_mIoU_iter_*.pth')
    best_iter = int(best.stem.rsplit('_', 1)[1])
    score = {m['iter']: m['mIoU'] for m in seen}
    assert sorted(score) == [20, 40, 60] and score[best_iter] == max(score.values())
    twin = tmp_path / 'wd' / f'iter_{best_iter}.pth'
    assert os.stat(best).st_ino == os.stat(twin).st_ino and os.stat(best).st_nlink == 2
    assert abs(_evaluate(tiny_cfg, best) - score[best_iter]) < 1e-6
