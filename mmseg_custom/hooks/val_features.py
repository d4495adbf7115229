"""``ValFeatureCacheHook``: a frozen backbone's outputs for the validation inputs, computed once
per sweep per node and read back by every later evaluation of every run on that node.

Every evaluation of every trial (group) of a probing sweep passes the same validation images
(each sliding-window crop, each flip) through the same frozen weights: InternVL evaluates every
1000 iterations, each time the whole ADE20K val. While the segmentor evaluates, the backbone's
forward looks its input up by a digest of the backbone's identity and the input's bytes: a hit
is read back (the float32 maps exactly as computed: the scores are an uncached evaluation's), a
miss is computed and kept (feature_store.py: a tmpfs, then local disk, within budgets). A
backbone that trains, or whose norm layers still update their statistics, is not cached.
"""
import hashlib
import json
import os
import os.path as osp

import torch
from mmcv.runner import HOOKS, Hook
from torch.nn.modules.batchnorm import _BatchNorm

from ..feature_store import FeatureStore


def identity(model_cfg, load_from, backbone):
    """What decides a frozen backbone's outputs besides its input: its config and where its
    weights come from (weight files by path, size and time; a seeded random init by its
    tensors' digest)."""
    sources = [model_cfg.get('backbone'), model_cfg.get('pretrained'), load_from]
    files = [p for p in ((model_cfg.get('backbone') or {}).get('pretrained'),
                         model_cfg.get('pretrained'), load_from)
             if isinstance(p, str) and osp.isfile(p)]
    if files:
        sources += [[osp.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]
    else:
        from .frozen_backbone import tensors_sha256
        sources.append(tensors_sha256(backbone))
    return json.dumps(sources, sort_keys=True, default=str)


def _digest(prefix, img):
    h = hashlib.sha256(prefix)
    h.update(json.dumps([list(img.shape), str(img.dtype)]).encode())
    h.update(img.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _still(segmentor, backbone):
    """The backbone's outputs cannot change while the segmentor trains: nothing in it trains
    and no norm layer of it updates running statistics in training mode."""
    if any(p.requires_grad for p in backbone.parameters()):
        return False
    was = segmentor.training
    segmentor.train()
    try:
        return not any(isinstance(m, _BatchNorm) and m.training and m.track_running_stats
                       for m in backbone.modules())
    finally:
        segmentor.train(was)


@HOOKS.register_module()
class ValFeatureCacheHook(Hook):
    """``name`` and ``tiers``: where the sweep keeps it (orchestrator/val_cache.py);
    ``model`` and ``load_from``: the run's, part of every key."""

    def __init__(self, name, tiers, model, load_from=None):
        self.name, self.tier_list = name, tiers
        self.model_cfg, self.load_from = model, load_from
        self.store = None
        self._said = (0, 0)

    def before_run(self, runner):
        segmentor = getattr(runner.model, 'module', runner.model)
        backbone = getattr(segmentor, 'backbone', None)
        if backbone is None or not _still(segmentor, backbone):
            return
        self.store = store = FeatureStore(self.name, self.tier_list)
        prefix = hashlib.sha256(
            identity(self.model_cfg, self.load_from, backbone).encode()).digest()
        forward = backbone.forward

        def cached_forward(img, *args, **kwargs):
            if segmentor.training or args or kwargs:
                return forward(img, *args, **kwargs)
            key = _digest(prefix, img)
            entry = store.get(key)
            if entry is None:
                out = forward(img)
                if isinstance(out, (list, tuple)) and all(torch.is_tensor(t) for t in out):
                    store.put(key, dict(kind=type(out).__name__,  # mmseg's backbones' maps
                                        tensors=[t.detach().cpu() for t in out]))
                return out
            tensors = [t.to(img.device) for t in entry['tensors']]
            return tuple(tensors) if entry['kind'] == 'tuple' else tensors
        backbone.forward = cached_forward
        runner.logger.info('validation features of the frozen backbone: cached in %s',
                           ', '.join(f'{d} (up to {b / 2 ** 30:.2f} GiB)'
                                     for d, b in store.tiers) or 'no tier (none usable)')

    def after_train_iter(self, runner):  # the iteration after an evaluation: its line
        self._say(runner)

    def after_run(self, runner):
        self._say(runner)

    def _say(self, runner):
        """What the evaluations so far took from the cache, as a line of the run's log."""
        s = self.store
        if s is not None and (s.reads, s.misses) != self._said:
            runner.logger.info('validation features: %d read from the cache, %d computed (%d '
                               'kept) in this run so far', s.reads, s.misses, s.writes)
            self._said = (s.reads, s.misses)
