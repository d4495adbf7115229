"""``FrozenBackboneCheckpointHook``: checkpoints of a probe leave the frozen backbone out.

A frozen backbone never changes, and InternViT-6B is 5.9 B parameters (11.8 GB in bf16): saved
at every evaluation of every trial, it is terabytes of identical copies per study. With this hook
a checkpoint holds what trains (heads, optimizer, iteration) plus, in its ``meta``, where the
backbone comes from: the weight file's path and sha256, or (no file: a seeded random init) the
digest of the backbone's tensors. Resuming (mmcv loads checkpoints with ``strict=False``) keeps
the backbone the model was built with, and this hook checks it is the one the checkpoint was
trained with, refusing a changed weight file instead of mixing two backbones.
"""
import hashlib
import os

import torch
from mmcv.runner import HOOKS, Hook
from mmcv.runner.dist_utils import get_dist_info

_FILE_DIGESTS = {}  # (path, size, mtime) -> sha256: a warm worker hashes a 12 GB file once


def file_sha256(path):
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, 'rb') as f:
            for block in iter(lambda: f.read(1 << 24), b''):
                h.update(block)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def tensors_sha256(module_or_state):
    """sha256 over a module's (or state dict's) tensors in key order: equal digests, equal
    weights."""
    state = (module_or_state.state_dict() if hasattr(module_or_state, 'state_dict')
             else module_or_state)
    h = hashlib.sha256()
    for key, t in sorted(state.items()):
        h.update(key.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class BackboneChanged(RuntimeError):
    """A checkpoint without its frozen backbone met another backbone than it was trained on."""


def backbone_identity(backbone):
    """Where a frozen backbone's weights come from, as its checkpoints' ``meta`` names it."""
    weights = getattr(backbone, 'pretrained', None)
    if isinstance(weights, str) and os.path.isfile(weights):
        return dict(weights=os.path.abspath(weights), weights_sha256=file_sha256(weights))
    return dict(weights=None, state_sha256=tensors_sha256(backbone))


def check_backbone(saved, backbone, where):
    """Refuse a checkpoint trained on another frozen backbone than ``backbone``."""
    identity = backbone_identity(backbone)
    if saved is not None and saved != identity:
        raise BackboneChanged(
            f'the checkpoint resumed in {where} was trained on the frozen backbone '
            f'{saved}, this model has {identity}: its weight file changed since')
    return identity


@HOOKS.register_module()
class FrozenBackboneCheckpointHook(Hook):

    @staticmethod
    def _resumed_from(runner):
        """The frozen-backbone identity in the checkpoint this run resumed (mmcv's resume does
        not keep a checkpoint's meta): iter_<N>.pth in the work dir after resuming at N."""
        path = os.path.join(runner.work_dir, f'iter_{runner.iter}.pth')
        if runner.iter == 0 or not os.path.isfile(path):
            return None
        checkpoint = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
        return (checkpoint.get('meta') or {}).get('frozen_backbone')

    def before_run(self, runner):
        model = getattr(runner.model, 'module', runner.model)
        backbone = getattr(model, 'backbone', None)
        if backbone is None or any(p.requires_grad for p in backbone.parameters()):
            return  # a backbone that trains is saved like everything else
        if get_dist_info()[0] != 0:
            return  # rank 0 saves (and hashes a 12 GB file once per process), not every rank
        identity = check_backbone(self._resumed_from(runner), backbone, runner.work_dir)
        save = runner.save_checkpoint

        def save_without_backbone(out_dir, *args, meta=None, **kwargs):
            def drop(module, state, prefix, local_metadata):
                for key in [k for k in state if k.startswith(prefix)]:
                    del state[key]
            handle = backbone._register_state_dict_hook(drop)
            try:
                return save(out_dir, *args, meta=dict(meta or {}, frozen_backbone=identity),
                            **kwargs)
            finally:
                handle.remove()
        runner.save_checkpoint = save_without_backbone
        runner.logger.info(f'checkpoints leave out the frozen backbone ({identity})')
