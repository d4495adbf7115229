"""A checkpoint is whole or absent: mmcv's writes go through a temporary name (a full disk
leaves the previous file as it was), and a resume skips a checkpoint cut short by anything else
for the newest one it can read, saying so."""
import json
import os
from pathlib import Path

import pytest
import torch
from mmcv import Config

from orchestrator import worker
from orchestrator.checkpoints import SKIPPED

ROOT = Path(__file__).resolve().parents[1]


def _cfg(synthetic_root, **options):
    cfg = Config.fromfile(str(ROOT / 'configs' / 'tiny_vit_frozen_fcn_synthetic.py'))
    for split in ('train', 'val', 'test'):
        cfg.data[split].data_root = str(synthetic_root)
    cfg.merge_from_dict({'runner.max_iters': 40, 'evaluation.interval': 20,
                         'checkpoint_config.interval': 20, **options})
    return cfg


def test_a_resume_skips_a_truncated_checkpoint_for_the_one_before(synthetic_root, tmp_path):
    work = tmp_path / 'w'
    worker.train(_cfg(synthetic_root), str(work))
    newest = work / 'iter_40.pth'
    whole = newest.read_bytes()
    newest.write_bytes(whole[:len(whole) // 2])  # what a crash in mid-copy leaves
    metrics = worker.train(_cfg(synthetic_root, **{'runner.max_iters': 60, 'auto_resume': True}),
                           str(work))
    assert metrics['iter'] == 60
    log = '\n'.join(p.read_text() for p in sorted(work.glob('*.log')))
    assert 'iter_40.pth cannot be read' in log and 'resuming from iter_20.pth' in log
    assert 'continuing after iteration 20' in log  # what mmcv's resume itself says
    assert (work / 'iter_40.pth.unreadable').read_bytes() == whole[:len(whole) // 2]  # kept
    (record,) = [json.loads(line) for line in (work / SKIPPED).read_text().splitlines()]
    assert record['file'] == 'iter_40.pth'
    assert 'state_dict' in torch.load(work / 'iter_40.pth', weights_only=False)  # trained again


def test_no_readable_checkpoint_starts_over(synthetic_root, tmp_path):
    work = tmp_path / 'w'
    worker.train(_cfg(synthetic_root, **{'runner.max_iters': 20}), str(work))
    (work / 'iter_20.pth').write_bytes(b'PK\x03\x04 torn')
    metrics = worker.train(_cfg(synthetic_root, **{'runner.max_iters': 20, 'auto_resume': True}),
                           str(work))
    assert metrics['iter'] == 20
    log = '\n'.join(p.read_text() for p in sorted(work.glob('*.log')))
    assert 'iter_20.pth cannot be read' in log and 'starting from iteration 0' in log


@pytest.fixture
def small_disk(small_tmpfs):
    return small_tmpfs('disk', '1m')


def test_a_checkpoint_that_fills_the_disk_leaves_the_previous_one_whole(small_disk):
    import errno

    import mmseg_custom  # noqa: F401  (mmcv's disk backend, replaced)
    from mmcv.runner import save_checkpoint
    path = small_disk / 'iter_20.pth'
    save_checkpoint(torch.nn.Linear(8, 8), str(path))
    before = path.read_bytes()
    with pytest.raises(OSError) as raised:
        save_checkpoint(torch.nn.Linear(1024, 1024), str(path))  # 4 MiB of weights
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert os.listdir(small_disk) == ['iter_20.pth']  # no temporary file left behind


def test_tunes_torn_experiment_state_is_put_back_from_its_last_whole_copy(tmp_path):
    """Tune writes experiment_state-*.json in place; a copy taken after each of its saves
    replaces a torn one before --resume (a file that reads whole is left as it is)."""
    from orchestrator.tune_state import KeepTuneState, restore_torn
    state = tmp_path / 'experiment_state-2026-12-02_10-00-00.json'
    searcher = tmp_path / 'searcher-state-2026-12-02_10-00-00.pkl'
    first = json.dumps({'trial_data': [['{"config": {"a": 1}}', '{}']]}).encode()
    state.write_bytes(first)
    import pickle
    searcher.write_bytes(pickle.dumps({'seen': [1, 2]}))
    keeper = KeepTuneState(str(tmp_path))
    assert keeper.get_state() is None  # nothing of its own in Tune's callback state
    state.write_bytes(first[:len(first) // 2])  # the next save torn by a full disk
    keeper.get_state()  # a torn file is not copied over the whole one
    never_copied = tmp_path / 'basic-variant-state-2026-12-02_10-00-00.json'
    never_copied.write_bytes(b'\x80\x04\x95')  # torn before its first copy: left as it is
    assert restore_torn(str(tmp_path)) == [state.name]
    assert state.read_bytes() == first
    assert never_copied.read_bytes() == b'\x80\x04\x95'
    assert pickle.loads(searcher.read_bytes()) == {'seen': [1, 2]}  # whole: untouched
