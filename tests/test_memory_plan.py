"""The trial-group memory plan (orchestrator/grouping.py) against what a head's training step
really allocates, counted by the CPU allocator itself (c10's running total of allocated bytes,
which torch's profiler records at every allocation and free): one head alone, and heads of
several variants in one group (their losses summed before one backward, as
MultiHeadEncoderDecoder trains them)."""
import copy

import pytest
import torch
from mmcv import Config
from mmcv.cnn.utils import revert_sync_batchnorm

from orchestrator import grouping, plan

TOLERANCE = 0.05  # planned within 5 % of the allocator's peak
CONFIG = 'configs/tiny_vit_frozen_fcn_synthetic.py'
VARIANTS = {
    'linear': dict(num_convs=0, channels=64, concat_input=False, with_norm=False),
    'linear + norm': dict(num_convs=0, channels=64, concat_input=False, with_norm=True),
    'two convs + concat + norm': dict(num_convs=2, channels=128, concat_input=True,
                                      with_norm=True),
    'one 1x1 conv': dict(num_convs=1, channels=96, concat_input=False, kernel_size=1),
    # 5.3 M parameters: weights, AdamW state and gradients outweigh the logits, as with
    # InternViT-6B's 3200-channel heads
    'wide convs': dict(num_convs=2, channels=512, concat_input=True, with_norm=True),
}


def _base():
    """The tiny frozen-ViT config with a real loss path: 150 classes at 64 x 64, batch 2."""
    base = plan.plain(Config.fromfile(CONFIG))
    base['model']['decode_head']['num_classes'] = 150
    base['data']['samples_per_gpu'] = 2
    return base


def _peak_allocated(step):
    """The most bytes the CPU allocator held during ``step`` above what it held before."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = []

    def walk(node):
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == 'cpu':
            events.append((node.start_time_ns, node.extra_fields.alloc_size,
                           node.extra_fields.total_allocated))
        for child in node.children:
            walk(child)
    for node in prof.profiler.kineto_results.experimental_event_tree():
        walk(node)
    events.sort()
    before = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - before


def _measured(base, side, head_cfgs):
    """Peak bytes of a training step of ``head_cfgs`` together, on bfloat16 features of
    ``side``'s shape, as every step after the first runs (AdamW's state exists; gradients are
    set to None before the step, as mmcv's OptimizerHook does): the allocator's peak during
    the second step, plus the weights and optimizer state it already held."""
    from mmseg.models import build_head
    import mmseg_custom  # noqa: F401
    torch.manual_seed(0)
    heads = [revert_sync_batchnorm(build_head(copy.deepcopy(c))).train() for c in head_cfgs]
    batch, _, h, w = side.features
    crop = base['crop_size']
    x = [torch.randn(side.features).to(side.feature_dtype)]
    label = torch.randint(0, 150, (batch, 1, *crop))
    metas = [dict(img_shape=(*crop, 3), ori_shape=(*crop, 3), pad_shape=(*crop, 3),
                  flip=False)] * batch
    params = [p for head in heads for p in head.parameters()]
    # a parameter group per head, as MultiHeadOptimizerConstructor builds them
    optimizer = torch.optim.AdamW([{'params': list(head.parameters())} for head in heads],
                                  lr=1e-3)

    def step():
        total = 0
        for head in heads:
            losses = head.forward_train(x, metas, label, {})
            total = total + sum(v for k, v in losses.items() if 'loss' in k)
        total.backward()
        optimizer.step()
    step()  # the first: AdamW creates its state
    optimizer.zero_grad(set_to_none=True)  # outside the window: the profiler counts the frees
    # of what it saw allocated only
    held = sum(t.numel() * t.element_size() for t in params) + sum(
        t.numel() * t.element_size() for state in optimizer.state.values()
        for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return _peak_allocated(step) + held


def _planned(base, side, head_cfgs):
    return grouping.group_bytes([grouping.head_memory(base, c, side) for c in head_cfgs])


@pytest.fixture(scope='module')
def setting():
    base = _base()
    side = grouping.frozen_side(base)
    assert side.features == (2, 64, 8, 8)  # the tiny ViT's patch 8 at 64 px
    side = grouping.FrozenSide(side.model_bytes, side.features, torch.bfloat16)  # as InternViT
    heads = {name: {**base['model']['decode_head'], **v, 'dropout_ratio': 0.1}
             for name, v in VARIANTS.items()}
    return base, side, heads


LOSS_PATHS = {'mmseg loss': False, 'banded loss': True}  # FCNHead's fused_loss


@pytest.mark.parametrize('loss_path', list(LOSS_PATHS))
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_a_heads_planned_bytes_are_what_its_training_step_allocates(setting, variant,
                                                                     loss_path):
    base, side, heads = setting
    cfg = dict(heads[variant], fused_loss=LOSS_PATHS[loss_path])
    measured = _measured(base, side, [cfg])
    assert _planned(base, side, [cfg]) == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.parametrize('variant', ['linear', 'two convs + concat + norm'])
def test_the_banded_loss_is_planned_right_in_several_bands(setting, variant, monkeypatch):
    """1 MiB bands: 13 of the 64 label rows each (2 x 150 x 64 float32 is 76,800 B a row), 5
    bands; the test above runs the whole label as one band."""
    from mmseg_custom.models.decode_heads import chunked_loss
    monkeypatch.setattr(chunked_loss, 'BAND_BYTES', 2 ** 20)
    base, side, heads = setting
    cfg = dict(heads[variant], fused_loss=True)
    measured = _measured(base, side, [cfg])
    assert _planned(base, side, [cfg]) == pytest.approx(measured, rel=TOLERANCE)


@pytest.mark.parametrize('loss_path', list(LOSS_PATHS))
def test_a_group_of_mixed_variants_holds_the_sum_of_its_heads(setting, loss_path):
    base, side, heads = setting
    cfgs = [dict(c, fused_loss=LOSS_PATHS[loss_path]) for c in heads.values()]
    measured = _measured(base, side, cfgs)
    assert _planned(base, side, cfgs) == pytest.approx(measured, rel=TOLERANCE)
    # the logits-only estimate this replaces was far below what a group of convs holds
    logits_only = len(cfgs) * 2 * 150 * 64 * 64 * 12
    assert logits_only < 0.8 * measured


def test_chunks_recut_after_a_group_ran_out_of_memory():
    """What is left of a kind's planned chunks, re-cut to at most the heads a half held: even
    sizes (8 trials at 3: 3, 3, 2), and a chunk of one is no group (its trial trains alone)."""
    assert grouping.capped([4, 4], 3) == [3, 3, 2]
    assert grouping.capped([3], 2) == [2]  # 2 + 1: the one alone
    assert grouping.capped([2, 2], 1) == []
    assert grouping.capped([], 2) == []
