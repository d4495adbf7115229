"""Faults injected on purpose, for the tests of what a sweep does when a rank misbehaves (a
rank stalled past the process group's collective timeout, a GPU out of memory: raised as torch
raises it, so CPU tests take the path a GPU run takes). No shipped config uses it.
"""
import os
import time

import torch
from mmcv.runner import HOOKS, Hook


@HOOKS.register_module()
class FaultInjectionHook(Hook):
    """Before iteration ``at_iter`` (1-based) on rank ``rank`` (``RANK``, as torch.distributed
    sets it), once per process: sleep ``stall_s`` seconds, then, with ``out_of_memory``, raise
    ``torch.cuda.OutOfMemoryError``. With ``heads_above``, only in a trial group training more
    heads than that (memory grows with a group's heads: a smaller group fits)."""

    def __init__(self, at_iter, rank=0, stall_s=0.0, out_of_memory=False, heads_above=None):
        self.at_iter, self.rank, self.stall_s = at_iter, rank, stall_s
        self.out_of_memory, self.heads_above = out_of_memory, heads_above
        self._done = False

    def before_train_iter(self, runner):
        if self._done or runner.iter + 1 != self.at_iter or \
                int(os.environ.get('RANK', 0)) != self.rank:
            return
        model = getattr(runner.model, 'module', runner.model)
        heads = sum(getattr(model, 'active', [True]))
        if self.heads_above is not None and heads <= self.heads_above:
            return
        self._done = True
        runner.logger.info(f'fault injection: rank {self.rank} before iteration {self.at_iter} '
                           f'({heads} head(s)): stall {self.stall_s:g} s, out of memory: '
                           f'{self.out_of_memory}')
        time.sleep(self.stall_s)
        if self.out_of_memory:
            raise torch.cuda.OutOfMemoryError(
                'CUDA out of memory. Tried to allocate 2.00 GiB (injected at iteration '
                f'{self.at_iter} on rank {self.rank})')
