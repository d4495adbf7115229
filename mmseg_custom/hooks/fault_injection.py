"""Faults injected on purpose, for the tests of what a sweep does when a rank misbehaves (a
rank stalled past the process group's collective timeout). No shipped config uses it.
"""
import os
import time

from mmcv.runner import HOOKS, Hook


@HOOKS.register_module()
class FaultInjectionHook(Hook):
    """Before iteration ``at_iter`` (1-based) on rank ``rank`` (``RANK``, as torch.distributed
    sets it): sleep ``stall_s`` seconds, once per process."""

    def __init__(self, at_iter, rank=0, stall_s=0.0):
        self.at_iter, self.rank, self.stall_s = at_iter, rank, stall_s
        self._done = False

    def before_train_iter(self, runner):
        if self._done or runner.iter + 1 != self.at_iter or \
                int(os.environ.get('RANK', 0)) != self.rank:
            return
        self._done = True
        runner.logger.info(f'fault injection: rank {self.rank} stalls {self.stall_s:g} s before '
                           f'iteration {self.at_iter}')
        time.sleep(self.stall_s)
