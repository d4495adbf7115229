"""Hooks of a grouped run (``MultiHeadEncoderDecoder``): one evaluation pass for all heads, and
per-head stop and divergence, so one head can leave the group while the others train on.

``MultiHeadEvalHook`` does for every head what mmseg's DistEvalHook + ``EvalMetricsHook`` do for a
solo run: at every ``interval`` and at the last iteration it evaluates, every rank its share of
the validation set (the dataloader's distributed sampler) with rank 0's BN buffers, rank 0
scoring the gathered per-image results, as mmseg's distributed evaluation does (no rank waits
in a collective while another evaluates everything), adds the head's mean training loss, its
learning rate and its part of what the group cost (cost.py: each interval split among the heads
active in it), appends the dict to that head's
``metrics.jsonl`` and hands it to that head's metrics listener (run_context.py), on every rank.
The backbone runs once per validation input for all heads (the segmentor caches its features).
Its validation loader is built from the config's ``val`` dataset, as mmseg builds its own.

``HeadControlHook`` asks each head's ``should_stop`` after every iteration, heads 0, 1, ... in
that order (a crew reads all answers when head 0 is asked: crew._read_together), all-reduces the
answers (every rank switches the same heads off at the same iteration), reports a head that diverged
(``{'failed': 'diverged: ...'}`` to its listener) and ends the run when no head is left.
"""
import os
import os.path as osp

import torch
import torch.distributed as dist
from mmcv.runner import HOOKS, Hook
from mmcv.runner.dist_utils import get_dist_info
from torch.nn.modules.batchnorm import _BatchNorm

from ..ranks import all_reduce_values, distributed, from_rank0
from . import run_context
from .cost import RunCost, earlier
from .eval_metrics import append_record, metrics_record, read_records
from .stop_request import TrainingStopped


@HOOKS.register_module()
class MultiHeadEvalHook(Hook):
    """``val``: the validation dataset's config; ``seed`` and ``workers_per_gpu`` as the run's
    (without the seed the distributed sampler draws from numpy's global stream, and the training
    augmentations would differ from a solo run's)."""

    def __init__(self, val, interval, work_dirs, seed=0, workers_per_gpu=0,
                 out_file='metrics.jsonl', gpus_per_rank=None):
        self.val, self.seed, self.workers_per_gpu = val, seed, workers_per_gpu
        self.interval = interval
        self.work_dirs = work_dirs
        self.out_file = out_file
        self._losses = [[] for _ in work_dirs]
        self._cost = RunCost(gpus_per_rank)
        self.dataloader = None

    def before_run(self, runner):
        from mmseg.datasets import build_dataloader, build_dataset
        # each rank evaluates its share of the validation set
        self.dataloader = build_dataloader(
            build_dataset(self.val, dict(test_mode=True)), samples_per_gpu=1,
            workers_per_gpu=self.workers_per_gpu, dist=distributed(), shuffle=False,
            seed=self.seed, persistent_workers=self.workers_per_gpu > 0)
        histories = [[] for _ in self.work_dirs]
        if get_dist_info()[0] == 0:
            for k, d in enumerate(self.work_dirs):
                os.makedirs(d, exist_ok=True)
                path = osp.join(d, self.out_file)
                if runner.iter == 0:  # a fresh run starts a fresh file
                    open(path, 'w').close()
                elif osp.isfile(path):  # a continued group (group_checkpoint.py) appends
                    histories[k] = list(read_records(path))
        # each head goes on counting what its earlier attempts cost
        self._cost.start(heads=len(self.work_dirs),
                         before={k: earlier(h) for k, h in enumerate(histories)})
        # the checkpoint at N comes before the evaluation at N: one a kill came between is done
        missing = from_rank0([k for k, h in enumerate(histories)
                              if not any(r.get('iter') == runner.iter for r in h)])
        if runner.iter > 0 and missing:
            self._evaluate(runner, runner.iter, only=set(missing))

    def after_train_iter(self, runner):
        segmentor = getattr(runner.model, 'module', runner.model)
        self._cost.tick(k for k, on in enumerate(segmentor.active) if on)  # they trained in it
        self._cost.step()
        log_vars = (runner.outputs or {}).get('log_vars', {})
        for k in range(len(self.work_dirs)):
            loss = sum(v for n, v in log_vars.items() if n.startswith(f'head{k}.') and 'loss' in n)
            if any(n.startswith(f'head{k}.') for n in log_vars):
                self._losses[k].append(float(loss))
        last = runner.iter + 1 == runner.max_iters
        if (runner.iter + 1) % self.interval == 0 or last:
            self._evaluate(runner, runner.iter + 1)

    def _evaluate(self, runner, iteration, only=None):
        """Evaluate the active heads; record and report those in ``only`` (None: all)."""
        model = runner.model
        segmentor = getattr(model, 'module', model)
        if distributed():
            for m in segmentor.heads.modules():
                if isinstance(m, _BatchNorm) and m.track_running_stats:
                    dist.broadcast(m.running_var, 0)
                    dist.broadcast(m.running_mean, 0)
        with self._cost.evaluating():
            per_image = self._pre_eval(model, segmentor)
        metrics = None
        if distributed():
            shares = [None] * dist.get_world_size()
            dist.all_gather_object(shares, per_image)
        else:
            shares = [per_image]
        if get_dist_info()[0] == 0:
            metrics = self._metrics(runner, shares, iteration, only)
        metrics = from_rank0(metrics)
        self._cost.end_interval()
        for k, m in metrics.items():
            self._losses[k] = []
            listener = run_context.on_metrics(k)
            if listener is not None:
                listener(m)

    def _pre_eval(self, model, segmentor):
        """This rank's share of the validation set: {image index: {head: pre_eval result}}."""
        dataset = self.dataloader.dataset
        per_image = {}
        model.eval()
        segmentor.eval_all_heads = True
        try:
            for indices, data in zip(self.dataloader.batch_sampler, self.dataloader):
                with torch.no_grad():
                    out = model(return_loss=False, rescale=True, **data)
                for k, result in out.items():
                    for i, r in zip(indices, dataset.pre_eval(result, indices=indices)):
                        per_image.setdefault(i, {})[k] = r
        finally:
            segmentor.eval_all_heads = False
            model.train()
        return per_image

    def _metrics(self, runner, shares, iteration, only=None):
        """Rank 0: every head's scores over the whole validation set, from all ranks' shares
        (a sampler pads the last share with repeated images: each image counts once)."""
        dataset = self.dataloader.dataset
        per_image = {}
        for share in shares:
            per_image.update(share)
        heads = sorted({k for r in per_image.values() for k in r
                        if only is None or k in only})
        results = {k: [per_image[i][k] for i in sorted(per_image)] for k in heads}
        lrs = {g['head']: g['lr'] for g in runner.optimizer.param_groups}
        with self._cost.evaluating():
            scores = {k: dataset.evaluate(res, metric='mIoU', logger='silent')
                      for k, res in results.items()}
        self._cost.tick(heads)  # the evaluation served the (active) heads it evaluated
        metrics = {}
        for k in heads:
            metrics[k] = metrics_record(scores[k], self._losses[k], lrs[k], iteration,
                                        self._cost.snapshot(runner, head=k), runner.max_iters)
            append_record(osp.join(self.work_dirs[k], self.out_file), metrics[k])
        runner.logger.info('grouped evaluation at iteration %d: %d images on %d rank(s) %s: %s',
                           iteration, len(per_image), len(shares),
                           tuple(len(share) for share in shares),
                           ', '.join(f'head{k} mIoU {m["mIoU"]:.4f}' for k, m in metrics.items()))
        return metrics


@HOOKS.register_module()
class HeadControlHook(Hook):

    def after_train_iter(self, runner):
        segmentor = getattr(runner.model, 'module', runner.model)
        for k, loss in sorted(segmentor.diverged.items()):
            reason = f'diverged: training loss is {loss} at iteration {runner.iter + 1}'
            runner.logger.warning(f'head {k}: {reason}; the other heads go on')
            listener = run_context.on_metrics(k)
            if listener is not None:
                listener({'failed': reason})
        segmentor.diverged.clear()
        n = len(segmentor.heads)
        asked = [1.0 if run_context.should_stop(k) else 0.0 for k in range(n)]
        for k, stop in enumerate(all_reduce_values(asked, dist.ReduceOp.MAX)):
            if stop and segmentor.active[k]:
                segmentor.active[k] = False
                runner.logger.info(f'head {k}: stopped at iteration {runner.iter + 1}')
        if not any(segmentor.active):
            raise TrainingStopped(f'no head left at iteration {runner.iter + 1}')
