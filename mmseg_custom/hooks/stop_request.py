"""Stop a training run from outside, on every rank at the same iteration.

A sweep stops trials early (ASHA) or abandons them (their driver is gone). The run's
``should_stop`` (run_context.py) is asked on every rank after every iteration; the answers are combined with an all-reduce (MAX), so
one rank's request stops all ranks together instead of leaving the others waiting in a collective.
The run ends by raising ``TrainingStopped``, which the caller catches.
"""
import torch.distributed as dist
from mmcv.runner import HOOKS, Hook

from ..ranks import all_reduce_values
from . import run_context


class TrainingStopped(Exception):
    """Raised inside mmcv's runner when a stop was requested."""


@HOOKS.register_module()
class StopRequestHook(Hook):

    def after_train_iter(self, runner):
        (stop,) = all_reduce_values([1.0 if run_context.should_stop() else 0.0],
                                    dist.ReduceOp.MAX)
        if stop > 0:
            raise TrainingStopped(f'stopped at iteration {runner.iter + 1}')
