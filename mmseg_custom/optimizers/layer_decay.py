"""``CustomLayerDecayOptimizerConstructor`` (InternVL's name): layer-wise learning-rate decay.

With ``paramwise_cfg=dict(num_layers=L, layer_decay_rate=r)``, a parameter of layer i gets
lr * r ** (L + 1 - i): the patch embedding, cls token and position embedding are layer 0, block j
is layer j + 1, everything outside the backbone (the head) is layer L + 1 (full lr). Biases, norm
weights and the embeddings' tokens get no weight decay.
"""
from mmcv.runner import OPTIMIZER_BUILDERS, DefaultOptimizerConstructor


def layer_id(name, num_layers):
    if name.startswith('backbone.'):
        if name.startswith(('backbone.cls_token', 'backbone.pos_embed', 'backbone.patch_embed')):
            return 0
        if name.startswith('backbone.blocks.'):
            return int(name.split('.')[2]) + 1
        return num_layers + 1
    return num_layers + 1


@OPTIMIZER_BUILDERS.register_module(force=True)
class CustomLayerDecayOptimizerConstructor(DefaultOptimizerConstructor):

    def add_params(self, params, module, **kwargs):
        num_layers = self.paramwise_cfg['num_layers']
        rate = self.paramwise_cfg['layer_decay_rate']
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            no_decay = param.ndim == 1 or name.endswith(('.bias', 'cls_token', 'pos_embed'))
            scale = rate ** (num_layers + 1 - layer_id(name, num_layers))
            params.append(dict(params=[param], lr=self.base_lr * scale, lr_scale=scale,
                               weight_decay=0.0 if no_decay else self.base_wd, name=name))
