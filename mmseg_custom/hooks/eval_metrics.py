"""One reporting path out of mmcv's runner: every evaluation's metrics, as a plain dict, on every rank.

mmseg's EvalHook writes its results into ``runner.log_buffer`` on rank 0 and the logger hooks clear
them; this hook (priority 80: after EvalHook at LOW=70, before the loggers at VERY_LOW=90) copies
each evaluation, adds the mean training loss and the lr since the previous one, broadcasts it to
all ranks (each rank gets the same dict back), appends it to ``work_dir/metrics.jsonl`` and
hands it to the run's metrics listener (run_context.py). It also evaluates after the last iteration when the interval did not land
on it, so a run always ends with metrics of its final weights, and, in a run resumed from a
checkpoint taken at an evaluation iteration whose evaluation never made it to the file (the
process died between mmcv's checkpoint and its evaluation), evaluates that iteration first.
Each dict carries ``eval_time`` (when it was computed): replaying an evaluation from the file
gives MLflow the identical record, which it stores once.

What the run cost so far rides along as ``cost.*`` (cost.py), and, where the backbone trains,
the fraction of its weights that changed since the previous evaluation (backbone_updates.py).
"""
import json
import os.path as osp
import time

from mmcv.runner import HOOKS, Hook
from mmcv.runner.dist_utils import get_dist_info

from ..ranks import from_rank0
from . import run_context
from .backbone_updates import BackboneUpdates
from .cost import RunCost, earlier

EVAL_KEYS = ('mIoU', 'mAcc', 'aAcc')


def metrics_record(scores, losses, lr, iteration, cost, max_iters):
    """One evaluation as the sweep reads it: the scores (overall and per class), the mean
    training loss since the previous one, the lr, the iteration and the run's planned
    iterations (``max_iters``: a run that ends before them was stopped early), the cost so far,
    and when."""
    metrics = {k: float(v) for k, v in scores.items()
               if k in EVAL_KEYS or k.startswith(('IoU.', 'Acc.'))}
    if losses:
        metrics['loss'] = sum(losses) / len(losses)
    metrics.update(lr=float(lr), iter=iteration, max_iters=int(max_iters), **cost,
                   eval_time=time.time())
    return metrics


def append_record(path, metrics):
    """One line, whole or not at all (a full disk leaves no half line for a resume to follow)."""
    from orchestrator.files import append_whole  # the same rule as the sweep's journal
    append_whole(path, json.dumps(metrics) + '\n')


def read_records(path):
    """The evaluation records in ``path`` (a line a killed attempt left half-written: none)."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                pass


@HOOKS.register_module()
class EvalMetricsHook(Hook):

    def __init__(self, out_file='metrics.jsonl', gpus_per_rank=None):
        self.out_file = out_file
        self._losses = []
        self._cost = RunCost(gpus_per_rank)
        self._updates = BackboneUpdates()

    @staticmethod
    def _eval_hook(runner):
        from mmseg.core import DistEvalHook, EvalHook
        hooks = [h for h in runner.hooks if isinstance(h, (EvalHook, DistEvalHook))]
        return hooks[0] if hooks else None

    def _publish(self, runner, iteration):
        metrics = None
        if get_dist_info()[0] == 0:
            lr = runner.current_lr()
            lr = next(iter(lr.values())) if isinstance(lr, dict) else lr
            self._cost.tick()
            metrics = metrics_record(runner.log_buffer.output, self._losses, lr[0], iteration,
                                     self._cost.snapshot(runner), runner.max_iters)
            # nothing trained since (a resume's first evaluation): nothing to count
            changed = (self._updates.changed_fraction(runner.model)
                       if self._cost.interval_iters else None)
            if changed is not None:  # a fine-tuned backbone (backbone_updates.py)
                metrics['backbone.changed_fraction'] = changed
                warning = self._updates.warning(changed, iteration, runner.model)
                if warning:
                    runner.logger.warning(warning)
            append_record(osp.join(runner.work_dir, self.out_file), metrics)
        self._losses = []
        self._cost.end_interval()
        metrics = from_rank0(metrics)
        listener = run_context.on_metrics()
        if listener is not None:
            listener(metrics)

    def before_run(self, runner):
        # A fresh run starts a fresh file; a resumed run (iter > 0) appends to its history.
        path = osp.join(runner.work_dir, self.out_file)
        history = []
        if runner.iter > 0 and get_dist_info()[0] == 0 and osp.isfile(path):
            history = list(read_records(path))
        self._updates.start(runner.model)  # after ToBFloat16Hook (49): the weights as trained
        # the earlier attempts' training time goes on counting
        self._cost.start(before={0: earlier(history)})
        hook = self._eval_hook(runner)
        if hook is not None:  # its evaluations are not training time (cost.img_per_s)
            evaluate = hook._do_evaluate

            def timed(runner):
                with self._cost.evaluating():
                    evaluate(runner)
            hook._do_evaluate = timed
        if runner.iter == 0:
            if get_dist_info()[0] == 0:
                open(path, 'w').close()
            return
        if hook is None or runner.iter % hook.interval != 0:
            return
        if not from_rank0(any(r.get('iter') == runner.iter for r in history)):
            self._evaluate_now(runner, hook)

    def after_train_iter(self, runner):
        self._cost.step()
        log_vars = (runner.outputs or {}).get('log_vars', {})
        if 'loss' in log_vars:
            self._losses.append(float(log_vars['loss']))
        hook = self._eval_hook(runner)
        # The same decision on every rank: EvalHook's own schedule, not rank 0's results.
        if hook is not None and hook._should_evaluate(runner):
            self._publish(runner, runner.iter + 1)

    def _evaluate_now(self, runner, hook):
        # _do_evaluate asks _should_evaluate, which only knows interval boundaries.
        hook._should_evaluate = lambda _runner: True
        try:
            hook._do_evaluate(runner)
        finally:
            del hook._should_evaluate
        self._publish(runner, runner.iter)

    def after_run(self, runner):
        hook = self._eval_hook(runner)
        if hook is not None and runner.iter % hook.interval != 0:
            self._evaluate_now(runner, hook)
