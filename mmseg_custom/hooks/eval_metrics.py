"""One reporting path out of mmcv's runner: every evaluation's metrics, as a plain dict.

mmseg's EvalHook writes its results into ``runner.log_buffer`` and the logger hooks clear them;
this hook (priority 80: after EvalHook at LOW=70, before the loggers at VERY_LOW=90) copies each
evaluation into ``work_dir/metrics.jsonl`` and hands it to ``callback`` (the worker's reporter).
It also evaluates once more after the last iteration when the interval did not land on it, so a
run always ends with metrics of its final weights.
"""
import json
import os.path as osp

from mmcv.runner import HOOKS, Hook
from mmcv.runner.dist_utils import get_dist_info

EVAL_KEYS = ('mIoU', 'mAcc', 'aAcc')


@HOOKS.register_module()
class EvalMetricsHook(Hook):

    def __init__(self, callback=None, out_file='metrics.jsonl'):
        self.callback = callback
        self.out_file = out_file
        self.last_eval_iter = None

    def _eval_hook(self, runner):
        from mmseg.core import DistEvalHook, EvalHook
        hooks = [h for h in runner.hooks if isinstance(h, (EvalHook, DistEvalHook))]
        return hooks[0] if hooks else None

    def _collect(self, runner, iteration):
        output = runner.log_buffer.output
        if 'mIoU' not in output or self.last_eval_iter == iteration:
            return
        self.last_eval_iter = iteration
        metrics = {k: float(v) for k, v in output.items()
                   if k in EVAL_KEYS or k.startswith(('IoU.', 'Acc.'))}
        metrics['iter'] = iteration
        if get_dist_info()[0] == 0:
            with open(osp.join(runner.work_dir, self.out_file), 'a') as f:
                f.write(json.dumps(metrics) + '\n')
        if self.callback is not None:
            self.callback(metrics)

    def before_run(self, runner):
        # A fresh run starts a fresh file; a resumed run (iter > 0) appends to its history.
        if runner.iter == 0 and get_dist_info()[0] == 0:
            open(osp.join(runner.work_dir, self.out_file), 'w').close()

    def after_train_iter(self, runner):
        self._collect(runner, runner.iter + 1)

    def after_run(self, runner):
        hook = self._eval_hook(runner)
        # Same decision on every rank (no rank-0-only state): distributed evaluation is collective.
        if hook is not None and runner.iter % hook.interval != 0:
            # _do_evaluate asks _should_evaluate, which only knows interval boundaries.
            hook._should_evaluate = lambda _runner: True
            try:
                hook._do_evaluate(runner)
            finally:
                del hook._should_evaluate
            self._collect(runner, runner.iter)
