"""``ValFeatureCacheHook``: a frozen backbone's outputs for the validation inputs, computed once
per sweep per node and read back by every later evaluation of every run on that node.

Every evaluation of every trial (group) of a probing sweep passes the same validation images
(each sliding-window crop, each flip) through the same frozen weights: InternVL evaluates every
1000 iterations, ~4,000 backbone passes at full ADE20K val, per group. While the segmentor
evaluates, the backbone's forward looks its input up by a digest of the backbone's identity and
the input's bytes: a hit is read back (the float32 maps exactly as computed: the scores are an
uncached evaluation's), a miss is computed and kept in the first tier with room: ``memory`` (a
tmpfs such as /dev/shm, shared by the node's processes), then ``disk`` (local disk), then none.
An entry is a file written under a temporary name and renamed, so readers need no lock; each
tier's budget is counted in a small file under an flock. A cache never fails a run: an entry
that cannot be read is computed again, a tier that cannot be written is left for the run.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import os.path as osp
import shutil

import torch
from mmcv.runner import HOOKS, Hook

USAGE = 'usage'  # a tier's bytes in entries, as the processes that wrote them counted
FILL_LIMIT = 0.9  # a tier's filesystem is never filled past this (a tmpfs is RAM, /tmp shared)


def identity(model_cfg, load_from, backbone):
    """What decides a frozen backbone's outputs besides its input: its config and where its
    weights come from (weight files by path, size and time; a seeded random init by its
    tensors' digest)."""
    sources = [model_cfg.get('backbone'), model_cfg.get('pretrained'), load_from]
    files = [p for p in (model_cfg.get('backbone', {}).get('pretrained'),
                         model_cfg.get('pretrained'), load_from)
             if isinstance(p, str) and osp.isfile(p)]
    if files:
        sources += [[osp.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]
    else:
        from .frozen_backbone import tensors_sha256
        sources.append(tensors_sha256(backbone))
    return json.dumps(sources, sort_keys=True, default=str)


class FeatureStore:
    """Entries by key in tiers of (directory, budget in bytes), first tier first."""

    def __init__(self, tiers):
        self.tiers = [(d, int(b)) for d, b in tiers if d and b > 0]
        self.full = set()  # tiers this process found full or unwritable
        self.reads = self.writes = self.misses = 0

    def get(self, key):
        for directory, _ in self.tiers:
            path = osp.join(directory, key)
            try:
                entry = torch.load(path, map_location='cpu', weights_only=True)
            except FileNotFoundError:
                continue
            except Exception:  # torn or foreign: computed again (and written again)
                with contextlib.suppress(OSError):
                    os.remove(path)
                continue
            self.reads += 1
            return entry
        self.misses += 1
        return None

    def put(self, key, entry):
        size = sum(t.numel() * t.element_size() for t in entry['tensors'])
        for directory, budget in self.tiers:
            if directory in self.full:
                continue
            tmp = osp.join(directory, f'.{key}.{os.getpid()}.tmp')
            try:
                os.makedirs(directory, exist_ok=True)
                disk = shutil.disk_usage(directory)
                if (disk.used + size > FILL_LIMIT * disk.total
                        or not self._reserve(directory, budget, size)):
                    self.full.add(directory)
                    continue
                torch.save(entry, tmp)
                os.replace(tmp, osp.join(directory, key))
                self.writes += 1
                return directory
            except OSError:  # a full or read-only disk: the run goes on without this tier
                self.full.add(directory)
                with contextlib.suppress(OSError):
                    os.remove(tmp)
        return None

    @staticmethod
    def _reserve(directory, budget, size):
        """Count ``size`` more bytes in the tier if its budget holds them (all processes)."""
        with open(osp.join(directory, USAGE), 'a+') as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            used = int(f.read() or 0)
            if used + size > budget:
                return False
            f.seek(0)
            f.truncate()
            f.write(str(used + size))
            f.flush()
            return True


def drop(roots):
    """Remove a sweep's cache directories (the driver, at the sweep's end, on each node)."""
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)


def _digest(prefix, img):
    h = hashlib.sha256(prefix)
    h.update(json.dumps([list(img.shape), str(img.dtype)]).encode())
    h.update(img.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@HOOKS.register_module()
class ValFeatureCacheHook(Hook):
    """``tiers``: [[directory, bytes], ...] (the sweep's: orchestrator/val_cache.py);
    ``model`` and ``load_from``: the run's, part of every key."""

    def __init__(self, tiers, model, load_from=None):
        self.store = FeatureStore(tiers)
        self.model_cfg, self.load_from = model, load_from
        self._said = (0, 0)

    def before_run(self, runner):
        segmentor = getattr(runner.model, 'module', runner.model)
        backbone = getattr(segmentor, 'backbone', None)
        if backbone is None or any(p.requires_grad for p in backbone.parameters()):
            return  # a backbone that trains changes its outputs at every step
        prefix = hashlib.sha256(
            identity(self.model_cfg, self.load_from, backbone).encode()).digest()
        forward, store = backbone.forward, self.store

        def cached_forward(img, *args, **kwargs):
            if segmentor.training or args or kwargs:
                return forward(img, *args, **kwargs)
            key = _digest(prefix, img)
            entry = store.get(key)
            if entry is None:
                out = forward(img)
                tensors = [out] if torch.is_tensor(out) else list(out)
                store.put(key, dict(kind=type(out).__name__,
                                    tensors=[t.detach().cpu() for t in tensors]))
                return out
            tensors = [t.to(img.device) for t in entry['tensors']]
            return tensors[0] if entry['kind'] == 'Tensor' else (
                tuple(tensors) if entry['kind'] == 'tuple' else tensors)
        backbone.forward = cached_forward
        runner.logger.info('validation features of the frozen backbone: cached in %s',
                           ', '.join(f'{d} (up to {b / 2 ** 30:.2f} GiB)'
                                     for d, b in self.store.tiers) or 'no tier')

    def after_train_iter(self, runner):  # the iteration after an evaluation: its line
        self._say(runner)

    def after_run(self, runner):
        self._say(runner)

    def _say(self, runner):
        """What the evaluation just done took from the cache, as a line of the run's log."""
        s = self.store
        if (s.reads, s.misses) != self._said:
            runner.logger.info('validation features: %d read from the cache, %d computed (%d '
                               'kept) in this run so far', s.reads, s.misses, s.writes)
            self._said = (s.reads, s.misses)
