"""What a run has cost so far, as the ``cost.*`` metrics every evaluation carries (solo runs:
EvalMetricsHook; trial groups: MultiHeadEvalHook, where each head carries its own part).

``cost.train_s``: wall time since the run started, plus earlier attempts' (a resumed run);
``cost.worker_hours``: the seconds charged to the head x ranks; ``cost.gpu_hours``: that x each
rank's share of a GPU (0.5 for two workers per GPU; 0 on CPU). A solo run is charged all its
time; in a trial group every interval between two ticks is split among the heads that trained
(or were evaluated) in it, so the members' hours add up to what the group cost, and a head that
ASHA kept pays only for its share of the past while others shared it.
``cost.img_per_s``: training images per second since the previous evaluation, all ranks,
evaluation time excluded (absent when no iteration trained since). ``cost.peak_rss_gb`` and, on
GPU, ``cost.peak_gpu_mem_gb``: rank 0's peaks since this run started (a warm worker's earlier
trials do not count: the peaks are reset at the start).
"""
import contextlib
import resource
import time

import torch
import torch.distributed as dist


def reset_peak_memory():
    """Start the peaks of this process anew: Linux's resident high-water mark (writing 5 to
    /proc/self/clear_refs sets VmHWM to the current RSS) and CUDA's allocator peak."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
    except OSError:  # not Linux (or no permission): the process-lifetime peak stays
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_bytes():
    """This process's resident high-water mark since the last reset (VmHWM), else since it
    started (getrusage, kilobytes on Linux)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def earlier(history):
    """(train_s, seconds charged to the head) of a run's earlier attempts, from its last
    evaluation record: a head that trained in a trial group was charged its share only."""
    last = next((r for r in reversed(history) if 'cost.train_s' in r), None)
    if last is None:
        return 0.0, 0.0
    charged = last.get('cost.worker_hours', 0.0) * 3600 / _world()
    return last['cost.train_s'], charged


class RunCost:
    """``gpus_per_rank``: each rank's share of a GPU (None: one whole GPU where CUDA is, none
    elsewhere); ``clock``: seconds (time.time; a test passes its own)."""

    def __init__(self, gpus_per_rank=None, clock=time.time):
        if gpus_per_rank is None:
            gpus_per_rank = 1.0 if torch.cuda.is_available() else 0.0
        self.gpus_per_rank, self.clock = float(gpus_per_rank), clock
        self.spent_s = {}  # head -> train_s of earlier attempts (a resumed run)
        self.started = self.last_tick = None
        self.charged = {}  # head -> seconds charged to it (solo: head 0, all the time)
        self.interval_iters, self.interval_s, self.eval_s = 0, 0.0, 0.0

    def start(self, heads=1, before=None):
        """``before``: {head: (train_s, charged seconds)} of its earlier attempts (a resumed
        run goes on counting them: ``earlier``)."""
        reset_peak_memory()
        before = before or {}
        self.spent_s = {k: before.get(k, (0.0, 0.0))[0] for k in range(heads)}
        self.started = self.last_tick = self.clock()
        self.charged = {k: before.get(k, (0.0, 0.0))[1] for k in range(heads)}
        self.interval_iters, self.interval_s, self.eval_s = 0, 0.0, 0.0

    def tick(self, heads=(0,)):
        """Charge the time since the previous tick to ``heads`` (the heads that trained or were
        evaluated in it), in equal parts."""
        now = self.clock()
        heads = list(heads)
        for k in heads:
            self.charged[k] = self.charged.get(k, 0.0) + (now - self.last_tick) / len(heads)
        self.interval_s += now - self.last_tick
        self.last_tick = now

    def step(self):
        self.interval_iters += 1

    @contextlib.contextmanager
    def evaluating(self):
        """Time spent here is not training time (img_per_s leaves it out)."""
        begun = self.clock()
        try:
            yield
        finally:
            self.eval_s += self.clock() - begun

    def snapshot(self, runner, head=0):
        """The cost metrics of ``head`` now (call ``tick`` first: time after the last tick is
        not charged yet); ends the img_per_s interval."""
        world = _world()
        loader = getattr(runner, 'data_loader', None)  # not there yet in before_run (a resume)
        batch = getattr(getattr(loader, '_dataloader', None), 'batch_size', None) or 1
        worker_hours = self.charged.get(head, 0.0) * world / 3600
        cost = {'cost.train_s': self.spent_s.get(head, 0.0) + (self.last_tick - self.started),
                'cost.worker_hours': worker_hours,
                'cost.gpu_hours': worker_hours * self.gpus_per_rank,
                'cost.peak_rss_gb': peak_rss_bytes() / 1e9}
        training_s = self.interval_s - self.eval_s
        if self.interval_iters and training_s > 0:
            cost['cost.img_per_s'] = self.interval_iters * batch * world / training_s
        if torch.cuda.is_available():
            cost['cost.peak_gpu_mem_gb'] = torch.cuda.max_memory_allocated() / 1e9
        return cost

    def end_interval(self):
        """The next img_per_s counts from here."""
        self.interval_iters, self.interval_s, self.eval_s = 0, 0.0, 0.0
