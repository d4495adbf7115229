"""The validation feature cache (mmseg_custom/hooks/val_features.py, feature_store.py):
evaluations that read a frozen backbone's outputs from it score exactly as evaluations that
compute them, sliding windows and flips included; a later evaluation, and a later run of another
head on the same backbone, compute none, a run on another backbone computes all; the memory
tier's budget spills the rest to the disk tier. The store never fails its caller and never uses
what is not its user's alone."""
import json
import os
import re
import subprocess

import pytest
import torch

from mmcv import Config

from orchestrator import worker

CONFIG = 'configs/tiny_vit_frozen_fcn_synthetic.py'
VAL_IMAGES = 16  # conftest's synthetic_root
WINDOWS = 3 * 3 * 2  # a 64 px image in 32 px crops at stride 24, then its flip
ENTRY = 64 * 4 * 4 * 4  # the tiny InternViT's float32 output for one 32 px crop


def _cfg(root, tiers=None, backbone=None, **head):
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
    cfg.model.backbone.update(backbone or {})
    if tiers:
        cfg.val_feature_cache = dict(name='cache', tiers=tiers)
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


def _clear(path):
    for f in path.iterdir():
        if f.is_file():
            f.unlink()


def test_cached_evaluations_score_as_uncached_ones_and_later_ones_compute_nothing(
        synthetic_root, tmp_path):
    memory, disk = tmp_path / 'memory', tmp_path / 'disk'
    tiers = [[str(memory), 5 * ENTRY], [str(disk), 10 ** 9]]
    n = VAL_IMAGES * WINDOWS
    runs = [(dict(num_convs=1), None, [(0, n), (n, n)]),  # computes each input once, reads it
            # another head on the same backbone: reads everything the first run kept
            (dict(num_convs=0, with_norm=True, channels=64), None, [(n, 0), (2 * n, 0)]),
            # another backbone (block 0's output, not block 1's): nothing of it is kept
            (dict(num_convs=1), dict(out_indices=[0]), [(0, n), (n, n)])]
    for head, backbone, lines in runs:
        worker.train(_cfg(synthetic_root, backbone=backbone, **head), str(tmp_path / 'plain'))
        worker.train(_cfg(synthetic_root, tiers, backbone=backbone, **head),
                     str(tmp_path / 'cached'))
        assert _scores(tmp_path / 'cached') == _scores(tmp_path / 'plain')
        assert len(_scores(tmp_path / 'plain')) == 2
        assert _cache_lines(tmp_path / 'cached') == lines
        _clear(tmp_path / 'plain')
        _clear(tmp_path / 'cached')
    entries = [len([f for f in (d / 'cache').iterdir() if f.name != 'usage'])
               for d in (memory, disk)]
    assert entries == [5, 2 * n - 5]  # the memory tier holds its budget, the disk the rest
    assert {oct((d / 'cache').stat().st_mode & 0o777) for d in (memory, disk)} == {'0o700'}


# -- the store alone ----------------------------------------------------------------------------

def _entry(values=256):
    return dict(kind='list', tensors=[torch.arange(values, dtype=torch.float32)])


def _usage(directory):
    return int((directory / 'usage').read_text())


def test_a_key_kept_by_two_writers_is_counted_once_and_a_torn_entry_is_a_miss(tmp_path):
    from mmseg_custom.feature_store import FeatureStore
    a, b = (FeatureStore('c', [[str(tmp_path), 10 ** 6]]) for _ in range(2))
    assert a.put('k', _entry()) == b.put('k', _entry()) == str(tmp_path / 'c')
    assert _usage(tmp_path / 'c') == 256 * 4
    assert torch.equal(b.get('k')['tensors'][0], torch.arange(256, dtype=torch.float32))
    (tmp_path / 'c' / 'k').write_bytes(b'torn')
    assert a.get('k') is None and not (tmp_path / 'c' / 'k').exists()


def test_the_store_leaves_what_is_not_its_users_alone(tmp_path):
    """A base others may write in without the sticky bit (they could swap our directory), a
    directory another user made (as root: owned by nobody), a link: not used, not removed.
    One of this user's own made with a wider mode is narrowed to 0700 and used."""
    from mmseg_custom.feature_store import FeatureStore, drop
    open_base = tmp_path / 'open'
    (open_base / 'c').mkdir(parents=True)
    open_base.chmod(0o777)
    (tmp_path / 'elsewhere').mkdir()
    (tmp_path / 'linked').mkdir()
    (tmp_path / 'linked' / 'c').symlink_to(tmp_path / 'elsewhere')
    refused = ['open', 'linked']
    if os.getuid() == 0:
        (tmp_path / 'theirs' / 'c').mkdir(parents=True)
        os.chown(tmp_path / 'theirs' / 'c', 65534, 65534)
        refused.append('theirs')
    for base in refused:
        store = FeatureStore('c', [[str(tmp_path / base), 10 ** 6]])
        assert store.tiers == [] and store.put('k', _entry()) is None, base
        drop('c', [[str(tmp_path / base), 10 ** 6]])
        assert (tmp_path / base / 'c').exists(), base
    assert list((tmp_path / 'elsewhere').iterdir()) == []
    (tmp_path / 'mine' / 'c').mkdir(parents=True)
    (tmp_path / 'mine' / 'c').chmod(0o755)
    store = FeatureStore('c', [[str(tmp_path / 'mine'), 10 ** 6]])
    assert store.put('k', _entry()) == str(tmp_path / 'mine' / 'c')
    assert oct((tmp_path / 'mine' / 'c').stat().st_mode & 0o777) == '0o700'


def test_a_usage_file_that_is_a_link_is_not_followed(tmp_path):
    from mmseg_custom.feature_store import FeatureStore
    victim = tmp_path / 'victim'
    victim.write_text('keep me')
    store = FeatureStore('c', [[str(tmp_path / 't'), 10 ** 6]])
    (tmp_path / 't' / 'c' / 'usage').symlink_to(victim)
    assert store.put('k', _entry()) is None
    assert victim.read_text() == 'keep me'


@pytest.mark.skipif(os.getuid() != 0, reason='mounts a small tmpfs (root)')
def test_a_full_tier_is_left_for_the_next_and_the_caller_never_fails(tmp_path):
    """A tmpfs of 1 MiB: a 2 MB entry does not fit (torch.save fails as the disk fills); the
    next tier takes it, nothing is left behind, the first tier's count is unchanged."""
    from mmseg_custom.feature_store import FeatureStore
    small = tmp_path / 'small'
    small.mkdir()
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', str(small)], check=True)
    try:
        store = FeatureStore('c', [[str(small), 10 ** 9], [str(tmp_path / 'disk'), 10 ** 9]])
        big = _entry(500_000)
        assert store.put('k', big) == str(tmp_path / 'disk' / 'c')
        assert sorted(p.name for p in (small / 'c').iterdir()) == ['usage']
        assert (small / 'c' / 'usage').read_text() in ('', '0')
        assert torch.equal(store.get('k')['tensors'][0], big['tensors'][0])
    finally:
        subprocess.run(['umount', str(small)], check=True)
