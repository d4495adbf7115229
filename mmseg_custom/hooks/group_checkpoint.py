"""``TrialGroupCheckpointHook``: a trial group's heads checkpointed as their solo selves.

At every evaluation of a grouped run, before it (as mmcv's CheckpointHook comes before mmseg's
EvalHook in a solo run), rank 0 writes for each head still training ``iter_N.pth`` into that
head's own work dir, in the format its solo run writes: the head's weights as ``decode_head.*``
with the frozen backbone left out and named (as FrozenBackboneCheckpointHook does), its optimizer
state in the layout of its solo optimizer (``solo_optimizer``), mmcv's meta. One format for both
ways on: a head continues alone from it (mmseg's resume, after a retry that trains alone), and a
group continues from its members' files (``resume_from``), losing nothing but the iterations
since the last evaluation. The backbone, 11.8 GB for InternViT-6B, is never written.
"""
import os
import os.path as osp
import re

import torch
from mmcv.runner import HOOKS, Hook, save_checkpoint
from mmcv.runner.dist_utils import get_dist_info
from torch import nn

from ..optimizers.multi_head import solo_optimizer
from ..ranks import from_rank0
from .frozen_backbone import BackboneChanged, backbone_identity, check_backbone

HEAD_PREFIX = 'decode_head.'


class _SoloCheckpointView(nn.Module):
    """What a solo run's checkpoint holds of its segmentor once the backbone is left out."""

    def __init__(self, segmentor, head):
        super().__init__()
        if getattr(segmentor, 'neck', None) is not None:
            self.neck = segmentor.neck
        self.decode_head = head
        self.CLASSES = segmentor.CLASSES


def _scheduled_lr(runner, base_lr):
    """The lr mmcv's LrUpdaterHook set at this iteration for a group starting at ``base_lr``
    (its regular schedule, then its warmup), as it sets it for every group of a solo run."""
    hook = next((h for h in runner.hooks if hasattr(h, 'get_regular_lr')), None)
    if hook is None:
        return base_lr
    lr = hook.get_lr(runner, base_lr)
    if hook.warmup is not None and runner.iter < hook.warmup_iters and not hook.by_epoch:
        regular, hook.regular_lr = hook.regular_lr, [lr]
        try:
            lr = hook.get_warmup_lr(runner.iter)[0]
        finally:
            hook.regular_lr = regular
    return lr


def _iteration(path):
    return int(re.fullmatch(r'iter_(\d+)\.pth', osp.basename(path)).group(1))


@HOOKS.register_module()
class TrialGroupCheckpointHook(Hook):
    """``work_dirs``: each head's; ``optimizers``: each head's optimizer config (its solo run's);
    ``interval``: the group's evaluation interval; ``resume_from``: each head's checkpoint to
    continue from (all of one iteration), or None; ``max_keep_ckpts``: as mmcv's CheckpointHook
    (-1: all); ``meta``: more of mmcv's meta (CLASSES, PALETTE)."""

    def __init__(self, work_dirs, optimizers, interval, resume_from=None, max_keep_ckpts=-1,
                 meta=None):
        self.work_dirs, self.optimizers, self.interval = work_dirs, optimizers, interval
        self.resume_from = resume_from
        self.max_keep_ckpts, self.meta = max_keep_ckpts, dict(meta or {})
        self._solo, self._identity = [], None

    def before_run(self, runner):
        segmentor = getattr(runner.model, 'module', runner.model)
        self._solo = [solo_optimizer(segmentor, k, cfg) for k, cfg in enumerate(self.optimizers)]
        if get_dist_info()[0] == 0:  # rank 0 saves (and hashes a weight file once per process)
            self._identity = backbone_identity(segmentor.backbone)
        if self.resume_from:
            self._restore(runner, segmentor)

    def _pairs(self, runner, segmentor, k):
        """(solo group, live group) of head k's parameters: the same groups in the same order
        (MultiHeadOptimizerConstructor builds the live ones from the solo ones)."""
        mine = {id(p) for p in segmentor.heads[k].parameters()}
        solo = [g for g in self._solo[k].param_groups if any(id(p) in mine for p in g['params'])]
        live = [g for g in runner.optimizer.param_groups if g.get('head') == k]
        assert len(solo) == len(live), 'head optimizer layouts differ'
        return list(zip(solo, live))

    def _restore(self, runner, segmentor):
        iterations = {_iteration(p) for p in self.resume_from}
        assert len(iterations) == 1, f'group members saved at {sorted(iterations)}'
        checkpoints = [torch.load(p, map_location='cpu', weights_only=False)
                       for p in self.resume_from]
        refused = None
        if get_dist_info()[0] == 0:  # one backbone for all heads: checked (hashed) once
            try:
                for k, checkpoint in enumerate(checkpoints):
                    check_backbone(checkpoint['meta'].get('frozen_backbone'),
                                   segmentor.backbone, self.work_dirs[k])
            except BackboneChanged as e:
                refused = str(e)
        refused = from_rank0(refused)  # every rank refuses, none waits in a collective
        if refused:
            raise BackboneChanged(refused)
        for k, checkpoint in enumerate(checkpoints):
            head = {n[len(HEAD_PREFIX):]: v for n, v in checkpoint['state_dict'].items()
                    if n.startswith(HEAD_PREFIX)}
            segmentor.heads[k].load_state_dict(head, strict=True)
            self._solo[k].load_state_dict(checkpoint['optimizer'])  # on the heads' device
            for solo, live in self._pairs(runner, segmentor, k):
                live.update({n: v for n, v in solo.items() if n != 'params'})
                for p in live['params']:
                    if p in self._solo[k].state:
                        runner.optimizer.state[p] = self._solo[k].state[p]
            self._solo[k].state.clear()
        # as mmseg's resume with compat's shim: iter_N.pth continues with iteration N + 1
        runner._iter = runner._inner_iter = iterations.pop()
        runner._epoch = checkpoints[0]['meta']['epoch']
        runner.logger.info(f'trial group of {len(self.resume_from)} heads continuing after '
                           f'iteration {runner.iter} from their checkpoints')

    def after_train_iter(self, runner):
        last = runner.iter + 1 == runner.max_iters
        if not ((runner.iter + 1) % self.interval == 0 or last) or get_dist_info()[0] != 0:
            return
        segmentor = getattr(runner.model, 'module', runner.model)
        for k, head in enumerate(segmentor.heads):
            if segmentor.active[k]:
                self._save(runner, segmentor, k)

    def _save(self, runner, segmentor, k):
        solo = self._solo[k]
        for group in solo.param_groups:  # frozen groups too: what a solo run's schedule set
            group.setdefault('initial_lr', group['lr'])
            group['lr'] = _scheduled_lr(runner, group['initial_lr'])
        for s, live in self._pairs(runner, segmentor, k):
            s.update({n: v for n, v in live.items() if n not in ('params', 'head')})
            for p in live['params']:
                if p in runner.optimizer.state:
                    solo.state[p] = runner.optimizer.state[p]
        meta = dict(runner.meta or {}, **self.meta, frozen_backbone=self._identity,
                    trial_group=dict(heads=len(segmentor.heads)),
                    epoch=runner.epoch + 1, iter=runner.iter)  # mmcv's own meta values
        work_dir = self.work_dirs[k]
        os.makedirs(work_dir, exist_ok=True)
        try:
            save_checkpoint(_SoloCheckpointView(segmentor, segmentor.heads[k]),
                            osp.join(work_dir, f'iter_{runner.iter + 1}.pth'),
                            optimizer=solo, meta=meta)
        finally:
            solo.state.clear()  # the live optimizer's tensors: not held twice
        if self.max_keep_ckpts > 0:
            saved = sorted((_iteration(n), n) for n in os.listdir(work_dir)
                           if re.fullmatch(r'iter_\d+\.pth', n))
            for _, name in saved[:-self.max_keep_ckpts]:
                os.remove(osp.join(work_dir, name))
