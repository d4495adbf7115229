"""``Float32MasterWeights``: bfloat16 weights trained through float32 copies.

InternVL's few-shot protocol fine-tunes the backbone in bfloat16 with AdamW and no float32 master
weights, so an update below half a bfloat16 step rounds away (``bf16(0.02) + 4e-5 == 0.02``;
``backbone.changed_fraction`` shows how much). This constructor wraps any other one and gives the
optimizer a float32 copy of every trainable bfloat16 parameter: the model still computes in
its own dtype; before each step its gradients are moved (as float32) onto the copies, the step
updates the copies, and the model's weights are set to them, rounded. The copies travel in the
optimizer's state dict (``float32_master``), so a resume continues from them, not from the
rounded weights. Opt-in (``fine_tuning.float32_master_weights`` in a space file): the default is
InternVL's behaviour, for parity.

    optimizer = dict(type='AdamW', lr=4e-5, constructor='Float32MasterWeights',
                     paramwise_cfg=dict(constructor='CustomLayerDecayOptimizerConstructor',
                                        num_layers=48, layer_decay_rate=0.95))

``paramwise_cfg.constructor`` is the wrapped one (mmcv's default when absent); the rest of
``paramwise_cfg`` is its own.
"""
import torch
from mmcv.runner import OPTIMIZER_BUILDERS
from mmseg.core.builder import build_optimizer_constructor  # mmseg's registry and mmcv's

NAME = 'Float32MasterWeights'  # orchestrator/fine_tuning.py wraps a config's constructor in it
STATE_KEY = 'float32_master'
# float16 would need loss scaling, which reads the optimizer's gradients (the masters') before
# they are moved there
LOW = (torch.bfloat16,)


def with_master_weights(optimizer):
    """Give ``optimizer`` float32 masters of its trainable bfloat16 parameters (in place)."""
    pairs = []  # (the model's parameter, its float32 master)
    for group in optimizer.param_groups:
        params = []
        for p in group['params']:
            if p.requires_grad and p.dtype in LOW:
                master = p.detach().float().requires_grad_()
                pairs.append((p, master))
                params.append(master)
            else:
                params.append(p)
        group['params'] = params
    if not pairs:
        return optimizer
    for p, _ in pairs:
        assert p not in optimizer.state, 'masters are made before the first step'

    def gradients_to_masters(opt, args, kwargs):
        if not opt.state:  # the first step, not a resumed run: the weights may have been
            with torch.no_grad():  # loaded since the masters were made (mmseg's load_from)
                for p, master in pairs:
                    master.copy_(p)
        for p, master in pairs:
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None  # the model's own are spent (mmcv zeroes the optimizer's, not these)

    @torch.no_grad()
    def masters_to_model(opt, args, kwargs):
        for p, master in pairs:
            p.copy_(master)

    def save(opt, state_dict):
        state_dict[STATE_KEY] = [master.detach() for _, master in pairs]  # no device copy
        return state_dict

    saved = []

    def take(opt, state_dict):
        state_dict = dict(state_dict)
        saved[:] = [state_dict.pop(STATE_KEY, None)]
        return state_dict

    @torch.no_grad()
    def restore(opt):
        masters = saved.pop() if saved else None
        if masters is not None and [m.shape for m in masters] != [m.shape for _, m in pairs]:
            raise ValueError(f'the checkpoint\'s {len(masters)} float32 master weights do not '
                             f'match this model\'s {len(pairs)} trainable bfloat16 parameters '
                             '(another model, or another freeze setting)')
        for i, (p, master) in enumerate(pairs):
            # a checkpoint without masters (trained without them): start from the loaded weights
            master.copy_(p if masters is None else masters[i])

    optimizer.register_step_pre_hook(gradients_to_masters)
    optimizer.register_step_post_hook(masters_to_model)
    optimizer.register_state_dict_post_hook(save)
    optimizer.register_load_state_dict_pre_hook(take)
    optimizer.register_load_state_dict_post_hook(restore)
    optimizer.master_pairs = pairs
    return optimizer


@OPTIMIZER_BUILDERS.register_module(name=NAME)
class Float32MasterWeightsConstructor:

    def __init__(self, optimizer_cfg, paramwise_cfg=None):
        inner = dict(paramwise_cfg or {})
        kind = inner.pop('constructor', 'DefaultOptimizerConstructor')
        self.inner = build_optimizer_constructor(dict(
            type=kind, optimizer_cfg=optimizer_cfg, paramwise_cfg=inner or None))

    def __call__(self, model):
        return with_master_weights(self.inner(model))
