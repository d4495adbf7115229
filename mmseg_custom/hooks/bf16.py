"""``ToBFloat16Hook`` (the name InternVL's configs use): the backbone runs in bfloat16.

InternViT-6B is nearly all of a probe's compute and memory; in bf16 it halves both. Only the
backbone is cast: the FCNHead casts its input and itself to float32 (see its docstring), so the
loss and the head's gradients stay fp32.
"""
import torch
from mmcv.runner import HOOKS, Hook


@HOOKS.register_module()
class ToBFloat16Hook(Hook):

    def before_run(self, runner):
        model = getattr(runner.model, 'module', runner.model)
        model.backbone.to(torch.bfloat16)
        runner.logger.info('ToBFloat16Hook: the backbone runs in bfloat16')
