"""One optimizer for the K heads of a ``MultiHeadEncoderDecoder``, each head with the optimizer
its solo run would have built.

``paramwise_cfg=dict(heads=[optimizer cfg of head 0, of head 1, ...])``: head k's parameter
groups are made by head k's own constructor (its ``constructor`` and ``paramwise_cfg`` included)
over a view of the model as its solo run sees it (``backbone``, ``neck``, ``decode_head`` = head
k), so names, learning rates and weight decays are what they would have been alone. The groups
are then put in one optimizer of the common type: Adam(W)/SGD update each parameter from its own
state and its group's hyperparameters only, so one optimizer over K heads' groups steps each head
exactly as K optimizers would. (Global-norm gradient clipping would couple them: grouping is not
offered when ``optimizer_config.grad_clip`` is set.)
"""
import copy

import torch.nn as nn
from mmcv.runner import OPTIMIZER_BUILDERS, build_optimizer_constructor


class _SoloView(nn.Module):
    """The segmentor as head k's solo run sees it (for parameter names)."""

    def __init__(self, model, head):
        super().__init__()
        self.backbone = model.backbone
        if getattr(model, 'neck', None) is not None:
            self.neck = model.neck
        self.decode_head = head


def solo_optimizer(model, k, cfg):
    """Head k's optimizer as its solo run builds it (its own constructor over the solo view):
    its parameter groups, names and hyperparameters, the frozen backbone's groups included.
    Also the layout of head k's optimizer state in its checkpoints (group_checkpoint.py)."""
    cfg = copy.deepcopy(dict(cfg))
    constructor = cfg.pop('constructor', 'DefaultOptimizerConstructor')
    paramwise = cfg.pop('paramwise_cfg', None)
    return build_optimizer_constructor(dict(type=constructor, optimizer_cfg=cfg,
                                            paramwise_cfg=paramwise))(
        _SoloView(model, model.heads[k]))


@OPTIMIZER_BUILDERS.register_module()
class MultiHeadOptimizerConstructor:

    def __init__(self, optimizer_cfg, paramwise_cfg=None):
        self.heads = paramwise_cfg['heads']

    def __call__(self, model):
        model = getattr(model, 'module', model)
        groups, types = [], set()
        for k, (head, cfg) in enumerate(zip(model.heads, self.heads)):
            solo = solo_optimizer(model, k, cfg)
            types.add(type(solo))
            mine = {id(p) for p in head.parameters()}
            for group in solo.param_groups:  # torch filled in every hyperparameter
                params = [p for p in group['params'] if id(p) in mine]
                if params:
                    groups.append(dict(group, params=params, head=k))
        assert len(types) == 1, f'grouped heads need one optimizer type, got {types}'
        return types.pop()(groups)
