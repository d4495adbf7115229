"""What a run has cost so far, as the ``cost.*`` metrics every evaluation carries (solo runs:
EvalMetricsHook; trial groups: MultiHeadEvalHook, where each head carries its share).

``cost.train_s``: wall time since the run started, plus earlier attempts' (a resumed run);
``cost.worker_hours`` / ``cost.gpu_hours``: that time x ranks (x ranks on GPUs), times ``share``
(a head's part of its trial group); ``cost.img_per_s``: training images per second since the
previous evaluation, all ranks; ``cost.peak_rss_gb`` and, on GPU, ``cost.peak_gpu_mem_gb``: rank
0's peaks.
"""
import resource
import time

import torch
import torch.distributed as dist


class RunCost:

    def __init__(self):
        self.spent_s = 0.0  # earlier attempts of a resumed run
        self.started = self.interval_start = None
        self.interval_iters = 0

    def start(self, spent_s=0.0):
        self.spent_s = spent_s
        self.started = self.interval_start = time.time()
        self.interval_iters = 0

    def step(self):
        self.interval_iters += 1

    def snapshot(self, runner, share=1.0):
        now = time.time()
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        train_s = self.spent_s + (now - self.started)
        loader = getattr(runner, 'data_loader', None)  # not there yet in before_run (a resume)
        batch = getattr(getattr(loader, '_dataloader', None), 'batch_size', None) or 1
        hours = train_s * world / 3600 * share
        cost = {'cost.train_s': train_s, 'cost.worker_hours': hours,
                'cost.gpu_hours': hours if torch.cuda.is_available() else 0.0,
                'cost.img_per_s': self.interval_iters * batch * world
                / max(now - self.interval_start, 1e-9),
                'cost.peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}
        if torch.cuda.is_available():
            cost['cost.peak_gpu_mem_gb'] = torch.cuda.max_memory_allocated() / 1e9
        self.interval_start, self.interval_iters = time.time(), 0
        return cost
