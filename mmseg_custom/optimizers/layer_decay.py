"""``CustomLayerDecayOptimizerConstructor`` (InternVL's name): layer-wise learning-rate decay with
InternVL's grouping and weight-decay rules, since results depend on both.

With ``paramwise_cfg=dict(num_layers=L, layer_decay_rate=r)``, a parameter of layer i gets
lr * r ** (L + 1 - i): the patch embedding, cls token and position embedding are layer 0, block j
(``blocks.j`` or ``layers.j``) is layer j + 1, everything else (the pyramid of ``with_fpn``, the
heads) is layer L + 1, the full lr.

Weight decay: none for 1-D parameters (norms, layer scales) and biases. InternVL also means to
exempt ``pos_embed`` and ``cls_token``, but compares their bare names with full parameter names
(``backbone.pos_embed``), which never match: in its runs both are decayed. We keep what its runs
did.
"""
from mmcv.runner import OPTIMIZER_BUILDERS, DefaultOptimizerConstructor

EMBEDDINGS = ('backbone.cls_token', 'backbone.mask_token', 'backbone.pos_embed',
              'backbone.patch_embed', 'backbone.visual_embed')


def layer_id(name, num_layers):
    if name.startswith(EMBEDDINGS):
        return 0
    if name.startswith(('backbone.blocks.', 'backbone.layers.')):
        return int(name.split('.')[2]) + 1
    return num_layers + 1


def decayed(name, param):
    """InternVL's rule, as its runs applied it (see the module docstring)."""
    return param.ndim > 1 and not name.endswith('.bias')


@OPTIMIZER_BUILDERS.register_module(force=True)
class CustomLayerDecayOptimizerConstructor(DefaultOptimizerConstructor):

    def add_params(self, params, module, **kwargs):
        num_layers = self.paramwise_cfg['num_layers']
        rate = self.paramwise_cfg['layer_decay_rate']
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            scale = rate ** (num_layers + 1 - layer_id(name, num_layers))
            params.append(dict(params=[param], lr=self.base_lr * scale, lr_scale=scale,
                               weight_decay=(self.base_wd or 0.0) if decayed(name, param) else 0.0,
                               name=name))
