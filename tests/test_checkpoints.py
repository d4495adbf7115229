"""Checkpoints of a probe leave the frozen backbone out (its weight file or seeded init stands
for it), resume from them, and refuse a backbone that changed; a trainable backbone is saved."""
from pathlib import Path

import pytest
import torch
from mmcv import Config

from orchestrator import worker

ROOT = Path(__file__).resolve().parents[1]


def _cfg(synthetic_root, name='tiny_vit_frozen_fcn_synthetic.py', **options):
    cfg = Config.fromfile(str(ROOT / 'configs' / name))
    for split in ('train', 'val', 'test'):
        cfg.data[split].data_root = str(synthetic_root)
    cfg.merge_from_dict({'runner.max_iters': 40, 'evaluation.interval': 20,
                         'checkpoint_config.interval': 20, **options})
    return cfg


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def test_frozen_backbone_is_left_out_and_named_in_meta(synthetic_root, tmp_path):
    worker.train(_cfg(synthetic_root), str(tmp_path / 'w'))
    for name in ('iter_20.pth', 'iter_40.pth'):
        ckpt = _state(tmp_path / 'w' / name)
        assert not [k for k in ckpt['state_dict'] if k.startswith('backbone.')]
        assert [k for k in ckpt['state_dict'] if k.startswith('decode_head.')]
        assert ckpt['meta']['frozen_backbone']['state_sha256']  # seeded init: its digest
        assert ckpt['optimizer']['state']  # the head's AdamW moments are there


def test_a_trainable_backbone_is_saved_whole(synthetic_root, tmp_path):
    worker.train(_cfg(synthetic_root, 'tiny_fcn_synthetic.py'), str(tmp_path / 'w'))
    ckpt = _state(tmp_path / 'w' / 'iter_40.pth')
    assert [k for k in ckpt['state_dict'] if k.startswith('backbone.')]
    assert 'frozen_backbone' not in ckpt['meta']


def test_resume_from_a_checkpoint_without_the_backbone(synthetic_root, tmp_path):
    first = tmp_path / 'first'
    worker.train(_cfg(synthetic_root, **{'runner.max_iters': 20}), str(first))
    again = _cfg(synthetic_root, resume_from=str(first / 'iter_20.pth'))
    metrics = worker.train(again, str(first))
    assert metrics['iter'] == 40
    log = '\n'.join(p.read_text() for p in first.glob('*.log'))
    assert 'continuing after iteration 20' in log and 'Iter [40/40]' in log
    assert not [k for k in _state(first / 'iter_40.pth')['state_dict'] if k.startswith('backbone.')]


def test_resume_refuses_a_backbone_that_changed(synthetic_root, tmp_path):
    from mmseg_custom.hooks import BackboneChanged
    first = tmp_path / 'first'
    worker.train(_cfg(synthetic_root, **{'runner.max_iters': 20}), str(first))
    other_init = _cfg(synthetic_root, resume_from=str(first / 'iter_20.pth'), seed=1)
    with pytest.raises(BackboneChanged, match='frozen backbone'):
        worker.train(other_init, str(first))


def test_a_changed_weight_file_is_refused_on_resume(synthetic_root, tmp_path):
    from mmseg.models import build_backbone

    from mmseg_custom.hooks import BackboneChanged
    cfg = _cfg(synthetic_root, **{'runner.max_iters': 20})
    vit = build_backbone(cfg.model.backbone)
    weights = tmp_path / 'vit.pth'
    torch.save(vit.state_dict(), weights)
    first = tmp_path / 'first'
    cfg.model.backbone.pretrained = str(weights)
    worker.train(cfg, str(first))
    saved = _state(first / 'iter_20.pth')['meta']['frozen_backbone']
    assert saved['weights'] == str(weights) and len(saved['weights_sha256']) == 64
    state = vit.state_dict()
    state['pos_embed'] = state['pos_embed'] + 1
    torch.save(state, weights)  # the file changes between the run and its resume
    again = _cfg(synthetic_root, resume_from=str(first / 'iter_20.pth'))
    again.model.backbone.pretrained = str(weights)
    with pytest.raises(BackboneChanged, match='weight file changed'):
        worker.train(again, str(first))


@pytest.mark.parametrize('name', ['tiny_vit_frozen_fcn_synthetic.py', 'tiny_fcn_synthetic.py'])
def test_a_resume_whose_last_evaluation_was_lost_evaluates_it_first(synthetic_root, tmp_path,
                                                                    name):
    """A worker killed between mmcv's checkpoint and its evaluation: the resumed run evaluates
    that iteration before training on (found by CI: the cost metrics read the training loader
    before it existed); a frozen backbone and one that trains (TinyCNN)."""
    import json
    first = tmp_path / 'first'
    worker.train(_cfg(synthetic_root, name, **{'runner.max_iters': 20}), str(first))
    (first / 'metrics.jsonl').write_text('')  # the evaluation at 20 never reached the file
    seen = []
    worker.train(_cfg(synthetic_root, name, resume_from=str(first / 'iter_20.pth')), str(first),
                 callback=seen.append)
    assert [m['iter'] for m in seen] == [20, 40]
    # nothing trained between the resume and that evaluation: no throughput to report
    assert 'cost.img_per_s' not in seen[0] and 'cost.img_per_s' in seen[1]
    # nor, for a backbone that trains, one that 'did not change': nothing to count yet
    assert 'backbone.changed_fraction' not in seen[0]
    assert ('backbone.changed_fraction' in seen[1]) == (name == 'tiny_fcn_synthetic.py')
    lines = [json.loads(line) for line in (first / 'metrics.jsonl').read_text().splitlines()]
    assert [m['iter'] for m in lines] == [20, 40]

