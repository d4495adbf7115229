"""The banded loss path (mmseg_custom/models/decode_heads/chunked_loss.py) against mmseg's own
``BaseDecodeHead.losses``: the same loss, accuracy and gradients of every head weight, for linear
and conv heads, with ignored pixels, both averages, both corner modes, class weights, and bands
that do not divide the label's height."""
import copy

import pytest
import torch
from mmseg.models.decode_heads.decode_head import BaseDecodeHead

from mmseg_custom.models.decode_heads import FCNHead, chunked_loss

IGNORE = 255


def _head(num_convs, fused, align_corners=False, **loss):
    torch.manual_seed(0)
    return FCNHead(in_channels=8, channels=8 if num_convs == 0 else 6, num_classes=5,
                   num_convs=num_convs, concat_input=num_convs > 0, with_norm=num_convs == 0,
                   align_corners=align_corners, fused_loss=fused,
                   loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.7,
                                    **loss))


def _batch(label_size=(37, 45)):
    torch.manual_seed(1)
    feats = [torch.randn(2, 8, 9, 11)]
    label = torch.randint(0, 5, (2, 1, *label_size))
    label[:, :, :6] = IGNORE  # a band of unlabelled pixels, and scattered ones
    label[torch.rand(label.shape) < 0.1] = IGNORE
    return feats, label


def _run(head, feats, label, losses):
    head.train()
    torch.manual_seed(3)  # the same dropout mask in both heads
    out = losses(head, head(feats), label)
    head.zero_grad()
    out['loss_ce'].backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    return out['loss_ce'].detach(), out['acc_seg'].detach(), grads


@pytest.mark.parametrize('num_convs', [0, 2])
@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize('loss', [dict(), dict(avg_non_ignore=True),
                                  dict(class_weight=[1.0, 2.0, 0.5, 1.5, 0.8])])
def test_the_banded_loss_path_is_mmsegs(num_convs, align_corners, loss, monkeypatch):
    monkeypatch.setattr(chunked_loss, 'BAND_BYTES', 4 * 2 * 5 * 45 * 4)  # 4 rows: 10 bands
    feats, label = _batch()
    fused = _head(num_convs, True, align_corners, **copy.deepcopy(loss))
    reference = _head(num_convs, False, align_corners, **copy.deepcopy(loss))
    assert chunked_loss.applies(fused, fused(feats))
    mine = _run(fused, feats, label, FCNHead.losses)
    theirs = _run(reference, feats, label, BaseDecodeHead.losses)  # mmseg's, undecorated path
    torch.testing.assert_close(mine[0], theirs[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mine[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert mine[2].keys() == theirs[2].keys() and mine[2]
    for name in theirs[2]:
        torch.testing.assert_close(mine[2][name], theirs[2][name], rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_logits_at_label_size_are_resized_as_torch_resizes_them():
    """Each band's rows are torch's bilinear resize's rows, upscaling and downscaling."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 9, 11)
    for size in ((37, 45), (5, 6), (9, 11)):
        for corners in (False, True):
            whole = torch.nn.functional.interpolate(x, size=size, mode='bilinear',
                                                    align_corners=corners)
            bands = torch.cat([chunked_loss._resized_rows(x, size, top, min(size[0], top + 4),
                                                          corners)
                               for top in range(0, size[0], 4)], dim=2)
            torch.testing.assert_close(bands, whole, rtol=1e-5, atol=1e-6)


def _fcn(**kwargs):
    torch.manual_seed(0)
    return FCNHead(in_channels=8, channels=8, num_classes=5, num_convs=0, concat_input=False,
                   **kwargs)


def _losses_of(head, feats, label, losses, to=None):
    head.train()
    torch.manual_seed(3)
    logits = head(feats)
    return losses(head, logits if to is None else logits.to(to), label)


@pytest.mark.parametrize('case', ['sampler', 'sigmoid', 'two losses', 'bfloat16 logits',
                                  'switched off'])
def test_what_the_banded_path_does_not_cover_takes_mmsegs(case, monkeypatch):
    """FCNHead.losses takes mmseg's own path (the banded one, made to fail here, is not called)
    where its result would not be mmseg's: the same values as BaseDecodeHead.losses."""
    ce = dict(type='CrossEntropyLoss', use_sigmoid=False)
    kwargs, to = {
        'sampler': (dict(sampler=dict(type='OHEMPixelSampler', thresh=0.7, min_kept=10)), None),
        'sigmoid': (dict(loss_decode=dict(ce, use_sigmoid=True)), None),
        'two losses': (dict(loss_decode=[ce, dict(ce, loss_name='loss_b')]), None),
        'bfloat16 logits': ({}, torch.bfloat16),
        'switched off': (dict(fused_loss=False), None)}[case]
    feats, label = _batch()

    def banded(*args):
        raise AssertionError('the banded path was taken')
    monkeypatch.setattr(chunked_loss, 'losses', banded)
    with pytest.raises(AssertionError, match='banded path was taken'):  # the check can see it
        _losses_of(_fcn(), feats, label, FCNHead.losses)
    mine = _losses_of(_fcn(**kwargs), feats, label, FCNHead.losses, to)
    theirs = _losses_of(_fcn(**kwargs), feats, label, BaseDecodeHead.losses, to)
    assert mine.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize('case', ['ignore_index 2', 'all ignored', 'all ignored, non-ignore mean',
                                  'loss name and weight', 'batch 3, downscaled, non-square'])
def test_the_banded_path_is_mmsegs_at_the_edges(case, monkeypatch):
    monkeypatch.setattr(chunked_loss, 'BAND_BYTES', 4 * 3 * 5 * 45 * 4)
    feats, label = _batch()
    kwargs, loss = {}, dict(type='CrossEntropyLoss', use_sigmoid=False)
    if case == 'ignore_index 2':  # the head's ignore_index, with class weights, labelled mean
        kwargs['ignore_index'] = 2
        loss.update(class_weight=[1.0, 2.0, 0.5, 1.5, 0.8], avg_non_ignore=True)
        label[label == IGNORE] = 2
    elif case.startswith('all ignored'):
        label[:] = IGNORE
        loss['avg_non_ignore'] = case.endswith('mean')
    elif case == 'loss name and weight':
        loss.update(loss_name='loss_probe', loss_weight=2.5)
    else:
        torch.manual_seed(4)
        feats = [torch.randn(3, 8, 13, 7)]
        label = torch.randint(0, 5, (3, 1, 6, 5))
        label[:, :, 0] = IGNORE
    if 'ignore_index' not in kwargs:
        kwargs['ignore_index'] = IGNORE
    mine = _losses_of(_fcn(loss_decode=copy.deepcopy(loss), **kwargs), feats, label,
                      FCNHead.losses)
    head = _fcn(loss_decode=copy.deepcopy(loss), fused_loss=False, **kwargs)
    theirs = _losses_of(head, feats, label, BaseDecodeHead.losses)
    assert mine.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    mine_head = _fcn(loss_decode=copy.deepcopy(loss), **kwargs)
    (name,) = [n for n in theirs if n.startswith('loss')]
    for h, losses in ((mine_head, FCNHead.losses), (head, BaseDecodeHead.losses)):
        h.zero_grad()
        _losses_of(h, feats, label, losses)[name].backward()
    for (n, p), (_, q) in zip(mine_head.named_parameters(), head.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=n)


class _TensorsMade(torch.utils._python_dispatch.TorchDispatchMode):
    """The tensors the operations produced (forward and backward): the most elements of any
    one, and the elements of all of them."""

    def __init__(self):
        super().__init__()
        self.most = self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
                self.total += t.numel()
        return out


def test_no_tensor_at_label_size_is_made(monkeypatch):
    """Forward and backward through the banded path make no tensor as large as the logits at
    label size (mmseg's path makes several), only bands of at most BAND_BYTES."""
    monkeypatch.setattr(chunked_loss, 'BAND_BYTES', 4 * 2 * 5 * 45 * 4)  # 4 rows
    feats, label = _batch()
    at_label_size = 2 * 5 * 37 * 45
    sizes = {}
    for fused, losses in ((True, FCNHead.losses), (False, BaseDecodeHead.losses)):
        head = _head(0, fused)
        with _TensorsMade() as seen:
            _run(head, feats, label, losses)
        sizes[fused] = seen.most
    assert sizes[False] >= at_label_size  # the check sees mmseg's resized logits
    assert sizes[True] <= max(2 * 5 * 4 * 45, label.numel()), sizes  # a band, or the labels


def test_the_banded_paths_work_grows_with_the_batch_not_its_square(monkeypatch):
    """4x the batch (bands 4x thinner at one BAND_BYTES) makes about 4x the elements, not 16x:
    each band differentiates only the logit rows it reads (it once took the gradient of all
    of them, band after band: 11.5x here). 8 is the geometric middle of 4 and 16."""
    monkeypatch.setattr(chunked_loss, 'BAND_BYTES', 4 * 2 * 5 * 64 * 4)  # 4 rows at batch 2
    made = {}
    for n in (2, 8):
        torch.manual_seed(n)
        feats = [torch.randn(n, 8, 32, 32)]
        label = torch.randint(0, 5, (n, 1, 64, 64))
        with _TensorsMade() as seen:
            _run(_head(0, True), feats, label, FCNHead.losses)
        made[n] = seen.total
    assert made[8] < 8 * made[2], made
