"""``ToBFloat16Hook`` (the name InternVL's configs use): the backbone runs in bfloat16, the heads
in float32.

InternViT casts itself to bfloat16 when it is built (before DDP wraps the model), so with it
this hook only checks and says so. A backbone still in another dtype is cast here when it is
frozen; a trainable one cannot be (DDP has registered its float32 parameters and gradient
buckets), so that is an error naming the fix instead of a failure deep inside DDP.
"""
import torch
from mmcv.runner import HOOKS, Hook


@HOOKS.register_module()
class ToBFloat16Hook(Hook):

    def before_run(self, runner):
        model = getattr(runner.model, 'module', runner.model)
        backbone = model.backbone
        dtypes = {p.dtype for p in backbone.parameters()}
        if dtypes != {torch.bfloat16}:
            trainable = [n for n, p in backbone.named_parameters() if p.requires_grad]
            if trainable and runner.model is not model:
                raise RuntimeError(
                    f'ToBFloat16Hook: the backbone ({type(backbone).__name__}) is trainable and '
                    f'in {sorted(map(str, dtypes))} after DDP wrapped it (first trainable: '
                    f'{trainable[0]}); build it in bfloat16 (InternViT does by default)')
            backbone.to(torch.bfloat16)
        for name in ('decode_head', 'heads', 'auxiliary_head', 'neck'):
            part = getattr(model, name, None)
            if isinstance(part, torch.nn.Module):
                part.to(torch.float32)
        runner.logger.info('ToBFloat16Hook: the backbone runs in bfloat16, the heads in float32')
