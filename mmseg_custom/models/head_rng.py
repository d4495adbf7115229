"""A decode head's random numbers, made independent of everything else in the model.

Probing compares heads on the same frozen features, and a sweep may train several heads in one
process (orchestrator trial groups). For a head to train the same alone or beside others, two
things must not depend on which other modules exist:

- its initial weights: ``reinit_head`` draws them again from a seed of its own (the global RNG
  is restored afterwards), where mmseg draws them from one stream after the backbone's;
- its dropout masks: ``isolate_head_rng`` gives it its own torch RNG stream, swapped in around
  each forward, so dropout neither consumes nor sees the stream the data loader shuffles with.

Used the same way for solo and grouped runs (orchestrator/worker.py), so both see identical
batches, augmentations, initial weights and dropout masks.
"""
import torch

HEAD_SEED_OFFSET = 7919  # the head's streams are not the data's stream (which starts at `seed`)


def _reset_init_flags(module):
    for m in module.modules():
        if hasattr(m, '_is_init'):
            m._is_init = False  # mmcv's BaseModule initialises once unless told otherwise


def reinit_head(head, seed):
    """Draw every parameter of ``head`` again from ``seed``: torch's default init of each layer,
    then mmcv's (every ConvModule, including those inside an nn.Sequential, which mmcv's
    recursive ``init_weights`` does not reach, then the head's own ``init_cfg``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + HEAD_SEED_OFFSET)
        for m in head.modules():
            if hasattr(m, 'reset_parameters'):
                m.reset_parameters()
        for m in head.modules():
            if m is not head and hasattr(m, 'init_weights'):
                m.init_weights()
        _reset_init_flags(head)
        head.init_weights()


def isolate_head_rng(head, seed):
    """Run ``head``'s forward passes on a torch RNG stream of its own, seeded from ``seed``."""
    gen = torch.Generator().manual_seed(seed + 2 * HEAD_SEED_OFFSET)
    state = {'cpu': gen.get_state(), 'cuda': None}
    outer = {}

    def swap_in(module, args):
        if not module.training:
            return
        outer['cpu'] = torch.get_rng_state()
        torch.set_rng_state(state['cpu'])
        if torch.cuda.is_available():
            outer['cuda'] = torch.cuda.get_rng_state()
            if state['cuda'] is None:  # first use: a CUDA stream from the same seed
                torch.cuda.manual_seed(seed + 2 * HEAD_SEED_OFFSET)
            else:
                torch.cuda.set_rng_state(state['cuda'])

    def swap_out(module, args, output):
        if not module.training or 'cpu' not in outer:
            return
        state['cpu'] = torch.get_rng_state()
        torch.set_rng_state(outer.pop('cpu'))
        if torch.cuda.is_available():
            state['cuda'] = torch.cuda.get_rng_state()
            torch.cuda.set_rng_state(outer.pop('cuda'))

    head.register_forward_pre_hook(swap_in)
    head.register_forward_hook(swap_out)
    return head
