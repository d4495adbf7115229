"""Stop a run whose training loss is NaN or inf: nothing it does afterwards means anything.

mmseg averages the logged loss over all ranks before hooks see it, so every rank makes the same
decision at the same iteration (no rank is left waiting in a collective).
"""
import math

from mmcv.runner import HOOKS, Hook


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the message starts with 'diverged'."""


@HOOKS.register_module()
class DivergenceHook(Hook):

    def after_train_iter(self, runner):
        loss = (runner.outputs or {}).get('log_vars', {}).get('loss')
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(f'diverged: training loss is {float(loss)} at iteration '
                                   f'{runner.iter + 1}')
