"""The head's contract: InternVL's FCNHead semantics, mmseg's behaviour everywhere else."""
import pytest
import torch
import torch.nn as nn

import mmseg_custom
from mmseg.models import HEADS, build_segmentor
from mmseg.models.decode_heads.fcn_head import FCNHead as MMSegFCNHead
from mmseg_custom.models.decode_heads import FCNHead

BASE = dict(in_channels=8, channels=8, num_classes=5)


def make(**kw):
    return FCNHead(**{**BASE, **kw})


def feats(b=2, c=8, h=6, w=7, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.randn(b, c, h, w, dtype=dtype)]


def test_importing_mmseg_custom_replaces_mmseg_fcnhead_in_registry():
    assert mmseg_custom is not None
    assert HEADS.get('FCNHead') is FCNHead
    assert FCNHead is not MMSegFCNHead


def test_segmentor_built_from_config_gets_our_head(tiny_cfg):
    model = build_segmentor(tiny_cfg.model)
    assert type(model.decode_head) is FCNHead


@pytest.mark.parametrize('num_convs', [0, 1, 2, 3])
@pytest.mark.parametrize('concat_input', [True, False])
def test_output_shape(num_convs, concat_input):
    out = make(num_convs=num_convs, concat_input=concat_input).eval()(feats())
    assert out.shape == (2, 5, 6, 7)


def test_num_convs_zero_is_identity_linear_probe():
    head = make(num_convs=0, concat_input=False)
    assert isinstance(head.convs, nn.Identity)
    # Only the classifier has parameters: a linear probe.
    assert {n.split('.')[0] for n, _ in head.named_parameters()} == {'conv_seg'}


def test_num_convs_zero_requires_in_channels_equal_channels_and_names_both():
    with pytest.raises(AssertionError, match=r'in_channels=8, channels=4'):
        make(num_convs=0, channels=4)
    with pytest.raises(AssertionError):  # mmseg's own head rejects the same
        MMSegFCNHead(**{**BASE, 'channels': 4}, num_convs=0)


@pytest.mark.parametrize('kw', [dict(num_convs=-1), dict(dilation=0), dict(dilation=1.5)])
def test_invalid_arguments_rejected_like_mmseg(kw):
    with pytest.raises(AssertionError):
        MMSegFCNHead(**BASE, **kw)
    with pytest.raises(AssertionError):
        make(**kw)


def test_with_norm_adds_syncbatchnorm_else_identity():
    assert isinstance(make(with_norm=True).norm, nn.SyncBatchNorm)
    assert make(with_norm=True).norm.num_features == 8
    assert isinstance(make(with_norm=False).norm, nn.Identity)


def test_with_norm_normalises_features_before_classifier():
    head = make(num_convs=1, with_norm=True).eval()
    head.norm.running_mean.fill_(0.5)
    head.norm.running_var.fill_(4.0)
    x = feats()
    f = head._forward_feature(x)
    expected = head.cls_seg((f - 0.5) / torch.sqrt(torch.tensor(4.0 + head.norm.eps)))
    torch.testing.assert_close(head(x), expected)


def test_concat_input_switches_conv_cat():
    on, off = make(concat_input=True), make(concat_input=False)
    assert hasattr(on, 'conv_cat') and on.conv_cat.conv.in_channels == 16
    assert not hasattr(off, 'conv_cat')
    off.load_state_dict({k: v for k, v in on.state_dict().items() if 'conv_cat' not in k})
    on.eval(), off.eval()
    assert not torch.equal(on(feats()), off(feats()))


def test_bf16_features_give_fp32_logits():
    head = make(num_convs=2, with_norm=True).to(torch.bfloat16).eval()
    out = head(feats(dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in head.parameters())


def test_fp32_logits_under_bf16_autocast():
    head = make(num_convs=1).eval()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = head(feats(dtype=torch.bfloat16))
    assert out.dtype == torch.float32


@pytest.mark.parametrize('kw', [
    dict(num_convs=0),
    dict(num_convs=0, concat_input=False),
    dict(num_convs=1, kernel_size=1),
    dict(num_convs=2, dilation=2),
    dict(num_convs=2, channels=4, norm_cfg=dict(type='BN')),
    dict(num_convs=1, channels=6, concat_input=False, dropout_ratio=0.0),
])
def test_without_norm_computes_exactly_what_mmseg_fcnhead_computes(kw):
    torch.manual_seed(1)
    ours = make(with_norm=False, **kw)
    theirs = MMSegFCNHead(**{**BASE, **kw})
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same parameter names
    ours.eval(), theirs.eval()
    x = feats()
    assert torch.equal(ours(x), theirs(x))
