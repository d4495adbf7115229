"""A small random-init conv backbone: lets CPU tests and the demo sweep train in seconds."""
import torch.nn as nn
from mmcv.cnn import ConvModule
from mmcv.runner import BaseModule
from mmseg.models.builder import BACKBONES


@BACKBONES.register_module()
class TinyCNN(BaseModule):
    """Stages of two 3x3 convs; each stage after the first halves the resolution.

    Args:
        in_channels (int): Image channels. Default: 3.
        stage_channels (tuple[int]): Output channels of each stage. Default: (16, 32, 64).
        stem_stride (int): Stride of the first conv (1, 2 or 4). Default: 2.
        out_indices (tuple[int]): Stages whose outputs are returned. Default: (2,).
        norm_cfg (dict): Norm of every conv. Default: BN.
    """

    def __init__(self, in_channels=3, stage_channels=(16, 32, 64), stem_stride=2,
                 out_indices=(2,), norm_cfg=dict(type='BN', requires_grad=True),
                 act_cfg=dict(type='ReLU'), init_cfg=None):
        super().__init__(init_cfg)
        for i in out_indices:
            if not 0 <= i < len(stage_channels):
                raise ValueError(f'TinyCNN out_indices {tuple(out_indices)} must index '
                                 f'stage_channels of length {len(stage_channels)}')
        self.out_indices = tuple(out_indices)
        self.stages = nn.ModuleList()
        prev = in_channels
        for i, ch in enumerate(stage_channels):
            stride = stem_stride if i == 0 else 2
            self.stages.append(nn.Sequential(
                ConvModule(prev, ch, 3, stride=stride, padding=1, norm_cfg=norm_cfg, act_cfg=act_cfg),
                ConvModule(ch, ch, 3, padding=1, norm_cfg=norm_cfg, act_cfg=act_cfg)))
            prev = ch

    def forward(self, x):
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)
