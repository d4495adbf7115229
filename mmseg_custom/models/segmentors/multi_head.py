"""K decode heads on one frozen backbone: one backbone pass per batch, K head passes.

A sweep's trial group (orchestrator/plan.py: trials that differ only in head-side values) trains
its heads together with this segmentor: ``forward_train`` extracts features once and sums the
heads' losses (the backbone is frozen and the heads share no parameter, so each head's gradient
is exactly its solo gradient); each head keeps its own optimizer hyperparameters
(``MultiHeadOptimizerConstructor``). Heads can be switched off one by one (``active``): a head
stopped early (ASHA) or diverged no longer runs or updates while the others go on.

Evaluation with ``eval_all_heads`` returns ``{head index: result}`` for the active heads, each
computed by mmseg's own inference (whole or slide) with the backbone features of every input
(crop) computed once and reused by all heads.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
from mmseg.core import add_prefix
from mmseg.models import builder
from mmseg.models.builder import SEGMENTORS
from mmseg.models.segmentors import EncoderDecoder

from ...ranks import all_reduce_values


@SEGMENTORS.register_module()
class MultiHeadEncoderDecoder(EncoderDecoder):

    def __init__(self, backbone, decode_heads, neck=None, auxiliary_head=None, train_cfg=None,
                 test_cfg=None, pretrained=None, init_cfg=None):
        assert auxiliary_head is None, 'MultiHeadEncoderDecoder: auxiliary heads are not grouped'
        super().__init__(backbone, decode_heads[0], neck=neck, train_cfg=train_cfg,
                         test_cfg=test_cfg, pretrained=pretrained, init_cfg=init_cfg)
        first = self._modules.pop('decode_head')
        self.heads = nn.ModuleList([first] + [builder.build_head(c) for c in decode_heads[1:]])
        for head in self.heads:
            assert head.num_classes == self.num_classes and \
                head.align_corners == self.align_corners, 'grouped heads must agree on classes'
        self._use_head(0)
        self.active = [True] * len(self.heads)
        self.diverged = {}  # head index -> its loss when it became non-finite (read by a hook)
        self.eval_all_heads = False
        self._feat_cache = None

    def _use_head(self, k):
        """Make head k the one mmseg's EncoderDecoder methods call (a plain reference)."""
        self.__dict__['decode_head'] = self.heads[k]

    def extract_feat(self, img):
        if self._feat_cache is None:
            return super().extract_feat(img)
        key = (img.data_ptr(), tuple(img.shape), img.stride())
        if key not in self._feat_cache:
            self._feat_cache[key] = super().extract_feat(img)
        return self._feat_cache[key]

    def forward_train(self, img, img_metas, gt_semantic_seg):
        with torch.no_grad():  # frozen: no graph through the backbone
            x = self.extract_feat(img)
        losses, totals = {}, {}
        for k, head in enumerate(self.heads):
            if self.active[k]:
                loss = head.forward_train(x, img_metas, gt_semantic_seg, self.train_cfg)
                losses.update(add_prefix(loss, f'head{k}'))
                totals[k] = sum(v for n, v in loss.items() if 'loss' in n)
        self._drop_diverged(losses, totals)
        return losses

    def _drop_diverged(self, losses, totals):
        """A head whose loss is not finite (on any rank) leaves the group before the step."""
        ks = sorted(totals)
        finite = all_reduce_values([torch.isfinite(totals[k]).all() for k in ks],
                                   dist.ReduceOp.MIN)
        for k, ok in zip(ks, finite):
            if not ok:
                self.active[k] = False
                self.diverged[k] = float(totals[k].detach().float().mean())
                for name in [n for n in losses if n.startswith(f'head{k}.')]:
                    del losses[name]

    def simple_test(self, img, img_meta, rescale=True):
        if not self.eval_all_heads:
            return super().simple_test(img, img_meta, rescale)
        self._feat_cache = {}
        try:
            out = {}
            for k in range(len(self.heads)):
                if self.active[k]:
                    self._use_head(k)
                    out[k] = super().simple_test(img, img_meta, rescale)
            return out
        finally:
            self._feat_cache = None
            self._use_head(0)
