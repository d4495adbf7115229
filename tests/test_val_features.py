"""The validation feature cache (mmseg_custom/hooks/val_features.py): evaluations that read a
frozen backbone's outputs from it score exactly as evaluations that compute them, sliding
windows and flips included; a later evaluation, and a later run of another head on the same
backbone, compute none; the memory tier's budget spills the rest to the disk tier."""
import json
import re

from mmcv import Config

from orchestrator import worker

CONFIG = 'configs/tiny_vit_frozen_fcn_synthetic.py'
VAL_IMAGES = 16  # conftest's synthetic_root
WINDOWS = 3 * 3 * 2  # a 64 px image in 32 px crops at stride 24, then its flip
ENTRY = 64 * 4 * 4 * 4  # the tiny InternViT's float32 output for one 32 px crop


def _cfg(root, tiers=None, **head):
    cfg = Config.fromfile(CONFIG)
    for split in ('train', 'val', 'test'):
        cfg.data[split].data_root = str(root)
    aug = cfg.data.val.pipeline[1]
    aug.flip = True
    aug.transforms.insert(1, dict(type='RandomFlip'))  # flips what MultiScaleFlipAug says
    cfg.model.test_cfg = Config(dict(mode='slide', crop_size=(32, 32), stride=(24, 24)))._cfg_dict
    cfg.runner.max_iters = 8
    cfg.evaluation.interval = 4
    cfg.checkpoint_config.interval = 4
    cfg.model.decode_head.update(head)
    if tiers:
        cfg.val_feature_cache = tiers
    return cfg


def _scores(path):
    return [{k: v for k, v in json.loads(line).items()
             if k in ('iter', 'mIoU', 'mAcc', 'aAcc') or k.startswith(('IoU.', 'Acc.'))}
            for line in (path / 'metrics.jsonl').read_text().splitlines()]


def _cache_lines(path):
    """(read, computed) of each 'validation features' line of the run's log."""
    text = ''.join(p.read_text() for p in sorted(path.glob('*.log')))
    return [tuple(map(int, m)) for m in
            re.findall(r'validation features: (\d+) read from the cache, (\d+) computed', text)]


def test_cached_evaluations_score_as_uncached_ones_and_later_ones_compute_nothing(
        synthetic_root, tmp_path):
    memory, disk = tmp_path / 'memory', tmp_path / 'disk'
    tiers = [[str(memory), 5 * ENTRY], [str(disk), 10 ** 9]]
    n = VAL_IMAGES * WINDOWS
    for head in (dict(num_convs=1), dict(num_convs=0, with_norm=True, channels=64)):
        worker.train(_cfg(synthetic_root, **head), str(tmp_path / 'plain'))
        worker.train(_cfg(synthetic_root, tiers, **head), str(tmp_path / 'cached'))
        assert _scores(tmp_path / 'cached') == _scores(tmp_path / 'plain')
        assert len(_scores(tmp_path / 'plain')) == 2
        if head['num_convs'] == 1:  # the first run computes each input once, then reads it
            assert _cache_lines(tmp_path / 'cached') == [(0, n), (n, n)]
        else:  # a later run of another head on the same backbone computes none
            assert _cache_lines(tmp_path / 'cached') == [(n, 0), (2 * n, 0)]
        for d in ('plain', 'cached'):
            for f in (tmp_path / d).iterdir():
                f.unlink() if f.is_file() else None
    entries = [len([f for f in d.iterdir() if f.name != 'usage']) for d in (memory, disk)]
    assert entries == [5, n - 5]  # the memory tier holds its budget, the disk the rest
