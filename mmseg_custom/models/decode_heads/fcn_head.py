"""InternVL's FCNHead for mmseg 0.30, force-registered over mmseg's own.

Differences from mmseg's FCNHead (everything else is mmseg's behaviour, checks included):
- ``with_norm``: ``nn.SyncBatchNorm(channels)`` after the features, before ``cls_seg``
  (``nn.Identity`` otherwise). Linear probing on frozen features needs it.
- ``forward`` runs in float32: the head's parameters *and* the incoming features are cast,
  and autocast is off inside, so bf16 backbone features give fp32 logits.
- ``num_convs=0`` (linear probing) keeps mmseg's ``in_channels == channels`` assertion, with a
  message naming both values.
- ``losses`` computes mmseg's loss and accuracy a band of label rows at a time
  (``chunked_loss.py``: no logits at label size), where that is exact; ``fused_loss=False``
  keeps mmseg's own.
"""
import torch
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmseg.models.builder import HEADS
from mmseg.models.decode_heads.decode_head import BaseDecodeHead

from . import chunked_loss


@HEADS.register_module(force=True)
class FCNHead(BaseDecodeHead):
    """Fully convolutional head (FCN) with optional norm and an fp32 forward.

    Args:
        num_convs (int): Convs before classification; 0 makes them an identity. Default: 2.
        kernel_size (int): Kernel size of the convs. Default: 3.
        concat_input (bool): Concatenate input and conv output before ``conv_cat``. Default: True.
        dilation (int): Dilation of the convs. Default: 1.
        with_norm (bool): SyncBatchNorm on the features before ``cls_seg``. Default: False.
        fused_loss (bool): The banded loss path (chunked_loss.py) where it is exact; False:
            mmseg's. Default: True.
    """

    def __init__(self, num_convs=2, kernel_size=3, concat_input=True, dilation=1,
                 with_norm=False, **kwargs):
        assert num_convs >= 0 and dilation > 0 and isinstance(dilation, int), (
            f'FCNHead needs num_convs >= 0 and an integer dilation > 0, '
            f'got num_convs={num_convs!r}, dilation={dilation!r}')
        self.num_convs = num_convs
        self.concat_input = concat_input
        self.kernel_size = kernel_size
        self.with_norm = with_norm
        self.fused_loss = kwargs.pop('fused_loss', True)  # the spec's signature, unchanged
        super().__init__(**kwargs)
        if num_convs == 0:
            assert self.in_channels == self.channels, (
                f'FCNHead with num_convs=0 (linear probing) needs in_channels == channels, '
                f'got in_channels={self.in_channels}, channels={self.channels}')

        padding = (kernel_size // 2) * dilation
        convs = [
            ConvModule(self.in_channels if i == 0 else self.channels, self.channels,
                       kernel_size=kernel_size, padding=padding, dilation=dilation,
                       conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        if self.concat_input:
            self.conv_cat = ConvModule(
                self.in_channels + self.channels, self.channels,
                kernel_size=kernel_size, padding=kernel_size // 2,
                conv_cfg=self.conv_cfg, norm_cfg=self.norm_cfg, act_cfg=self.act_cfg)
        self.norm = nn.SyncBatchNorm(self.channels) if with_norm else nn.Identity()

    def _forward_feature(self, inputs):
        """Features before ``cls_seg``: (B, channels, H, W)."""
        x = self._transform_inputs(inputs)
        feats = self.convs(x)
        if self.concat_input:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return feats

    def forward(self, inputs):
        """Segmentation logits (B, num_classes, H, W), always float32."""
        self.to(torch.float32)
        inputs = [t.float() if torch.is_floating_point(t) else t for t in inputs]
        device_type = inputs[0].device.type if inputs else 'cpu'
        with torch.autocast(device_type=device_type, enabled=False):
            feats = self.norm(self._forward_feature(inputs))
            return self.cls_seg(feats)

    def losses(self, seg_logit, seg_label):
        """mmseg's loss dict (``loss_ce``, ``acc_seg``), banded where exact."""
        if chunked_loss.applies(self, seg_logit):
            return chunked_loss.losses(self, seg_logit, seg_label)
        return super().losses(seg_logit, seg_label)
