"""The train actor: one ``TrainWorker`` per rank of a crew (crew.py), a warm process that imports
mmseg once and trains one trial after another (worker.train / train_group), joining a fresh
``torch.distributed`` process group (gloo on CPU, nccl on GPU) per run; and ``TrialJob``, what a
trial sends every rank (its config is built on the worker: trial_config.py).

Why not a Ray Train ``TorchTrainer`` per trial: on 2 cores Ray Train V2 spent ~20 s of every trial
starting its ~9 controller/worker actor processes, plus ~6 s importing torch/mmcv/mmseg in fresh
workers (issue 3's notes). As a fallback for a sweep whose driver, trial and pool are all gone, a
rank 0 that nobody has polled for ABANDONED_AFTER_S stops training by itself.
"""
import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass

import ray

GRACE_S = 10.0  # after one rank fails, how long the others get to fail on their own
# A rank 0 that nobody has polled or vouched for this long stops by itself. The trial polls every
# second and the pool vouches for it every WATCH_S while its process lives, so only a sweep whose
# driver, trial and pool are all gone reaches it. ORCHESTRATOR_ABANDONED_AFTER_S overrides it.
ABANDONED_AFTER_S = 120.0
RENDEZVOUS_S = 300.0  # how long ranks wait for each other when a run starts
CALL_S = 120.0  # a worker's or the pool's answer to a short call (where, rendezvous, drain)


@dataclass(frozen=True)
class TrialJob:
    """One trial as a crew trains it (sent to every rank): the base config and the planned
    trial (its config built on the worker, which has mmcv: trial_config.py), where its files
    go, how it is named."""
    trial_id: str
    trial_dir: str
    base: dict  # the base config as plain data
    trial: object  # sweep_plan.PlannedTrial, its sampled values drawn
    base_filename: str  # the base config's file (mmcv resolves its relative imports from it)
    source: str  # the space file, for error messages
    abandoned_after_s: float = ABANDONED_AFTER_S
    collective_timeout_s: float = 1800.0  # fault_tolerance.collective_timeout_s
    val_feature_cache: dict = None  # where the workers keep it (val_cache.py); None: not


@ray.remote(max_concurrency=4)  # `run` in one thread; `drain`/`request_stop` answered alongside
class TrainWorker:

    def __init__(self, gpu_share=0.0):
        from orchestrator import worker  # noqa: F401  (the ~6 s of imports, paid once per process)
        self.gpu_share = gpu_share  # of one GPU, as Ray reserved it: what cost.gpu_hours counts
        self._store = None  # the rendezvous of the next run, when this worker is its rank 0
        self._lock = threading.Lock()
        self._runs = {}  # trial id -> its reports, stop request and last poll: calls from a
        # finished trial's process can arrive after the next trial started on this worker

    def where(self):
        """Where this worker runs (node, Ray's GPU ids, the CUDA device index it trains on, what
        it sees, pid): the trial's placement tags in MLflow."""
        ctx = ray.get_runtime_context()
        return dict(node_id=ctx.get_node_id(), node_ip=ray.util.get_node_ip_address(),
                    gpu_ids=[str(g) for g in ray.get_gpu_ids()], device=local_device(),
                    visible=os.environ.get('CUDA_VISIBLE_DEVICES'), pid=os.getpid())

    def rendezvous(self, world_size):
        """Open the trial's rendezvous here (rank 0): torch's TCP store on a socket listening on
        this node's Ray IP only (the store alone would listen on every interface), on a port the
        kernel picks, held until the run. Returns its address for the other ranks. (Finding a
        free port by bind-and-close and listening later lets another process take it between.)"""
        from datetime import timedelta

        from torch.distributed import TCPStore
        ip = ray.util.get_node_ip_address()
        sock = socket.socket(socket.AF_INET6 if ':' in ip else socket.AF_INET)
        sock.bind((ip, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        self._store = TCPStore(ip, port, world_size, is_master=True, wait_for_workers=False,
                               master_listen_fd=sock.detach(),  # the store owns it now
                               timeout=timedelta(seconds=RENDEZVOUS_S))
        return f'[{ip}]:{port}' if ':' in ip else f'{ip}:{port}'

    def _state(self, trial_id):
        return self._runs.setdefault(trial_id, dict(reports=[], stop=False, polled=time.time()))

    def drain(self, trial_id):
        """The trial's reports since the last call (only rank 0 has any); also its heartbeat."""
        with self._lock:
            state = self._state(trial_id)
            reports, state['reports'], state['polled'] = state['reports'], [], time.time()
        return reports

    def heartbeat(self, trial_id):
        """The trial's process is alive (the pool checked), even while it waits on Ray Tune."""
        with self._lock:
            self._state(trial_id)['polled'] = time.time()

    def request_stop(self, *trial_ids):
        """Stop these trials' runs (heads, in a trial group) at their next iteration; several
        in one call stop at the same one (under the lock that _read_together reads them in)."""
        with self._lock:
            for trial_id in trial_ids:
                self._state(trial_id)['stop'] = True

    def _prepare(self, job, rank):
        """The trial's mmcv config (rank 0 keeps a copy in the trial's directory) and its
        report / should_stop functions, bound to the trial's own state."""
        from orchestrator.trial_config import trial_config
        with self._lock:
            state = self._state(job.trial_id)

        def report(metrics):
            with self._lock:
                state['reports'].append(metrics)

        window = job.abandoned_after_s

        def should_stop():  # rank 0's answer reaches every rank (the stop hooks all-reduce)
            abandoned = rank == 0 and time.time() - state['polled'] > window
            return state['stop'] or abandoned

        cfg = trial_config(job.base, job.base_filename, job.trial, job.trial_dir,
                           job.val_feature_cache)
        if rank == 0:
            cfg.dump(os.path.join(job.trial_dir, 'resolved_config.py'))
        return cfg, (report if rank == 0 else None), should_stop

    @contextlib.contextmanager
    def _process_group(self, rank, world_size, address, timeout_s):
        """A fresh torch.distributed process group for one run (gloo on CPU, nccl on GPU) over the
        rendezvous rank 0 opened at ``address``, its collectives waiting at most ``timeout_s``,
        torn down after it whatever happens."""
        from datetime import timedelta

        import torch
        import torch.distributed as dist
        # mmseg's train_segmentor reads LOCAL_RANK for DDP's device ids: the node-local index
        # of this worker's GPU (every GPU of the node is visible: see _start_crew)
        device = local_device()
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size),
                          LOCAL_RANK=str(device or 0))
        if torch.cuda.is_available() and device is not None:
            torch.cuda.set_device(device)
        if world_size > 1:
            cuda = torch.cuda.is_available()
            store, self._store = (self._store if rank == 0 else None), None
            if store is None:
                host, port = address.rsplit(':', 1)
                host = host.strip('[]')
                store = dist.TCPStore(host, int(port), world_size, is_master=False,
                                      timeout=timedelta(seconds=RENDEZVOUS_S))
            dist.init_process_group('nccl' if cuda else 'gloo', store=store, rank=rank,
                                    world_size=world_size, timeout=timedelta(seconds=timeout_s))
        try:
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def run(self, job, rank, world_size, init_method):
        """Train one trial as ``rank`` of ``world_size``; returns the final metrics."""
        import torch

        from mmseg_custom.hooks import BackboneChanged, TrainingDiverged
        from orchestrator import worker
        from orchestrator.errors import ConfigError, TrialFailed, disk_full
        cfg, report, should_stop = self._prepare(job, rank)
        with self._process_group(rank, world_size, init_method, job.collective_timeout_s):
            try:
                return worker.train(cfg, cfg.work_dir, callback=report, source=job.source,
                                    should_stop=should_stop, gpus_per_rank=self.gpu_share)
            except (TrainingDiverged, ConfigError, BackboneChanged) as e:  # the reason itself
                raise TrialFailed(str(e)) from None
            except torch.cuda.OutOfMemoryError as e:  # the trial's size, not a lost worker
                raise TrialFailed(_out_of_memory(e)) from None
            except Exception as e:
                if disk_full(e, cfg.work_dir) is None:
                    raise
                raise disk_full(e, cfg.work_dir) from None

    def drop_val_features(self, cache):
        from mmseg_custom.feature_store import drop
        drop(cache['name'], cache['tiers'])

    def _read_together(self, stops):
        """The heads' stop questions answered from one reading of all of them, taken under the
        lock when head 0 is asked: heads that request_stop stopped in one call stop at one
        iteration. This relies on HeadControlHook asking heads 0, 1, ... in order at every
        iteration (its docstring says so)."""
        seen = [False] * len(stops)

        def ask(k):
            def should_stop():
                if k == 0:
                    with self._lock:
                        seen[:] = [stop() for stop in stops]
                return seen[k]
            return should_stop
        return [ask(k) for k in range(len(stops))]

    def run_trial_group(self, jobs, rank, world_size, init_method, group_dir):
        """Train a trial group (``jobs``: its trials, head-side values apart) as ``rank``: one
        frozen-backbone pass per batch; each trial's reports and stop requests are its own."""
        import torch

        from mmseg_custom.hooks import BackboneChanged
        from orchestrator import worker
        from orchestrator.errors import GroupOutOfMemory, TrialFailed, disk_full
        cfgs, reports, stops = zip(*[self._prepare(job, rank) for job in jobs])
        stops = self._read_together(stops)
        with self._process_group(rank, world_size, init_method,
                                 jobs[0].collective_timeout_s):
            try:
                return worker.train_group(list(cfgs), [c.work_dir for c in cfgs], group_dir,
                                          callbacks=list(reports), should_stops=list(stops),
                                          source=jobs[0].source, gpus_per_rank=self.gpu_share)
            except torch.cuda.OutOfMemoryError as e:  # the members continue in halves
                raise GroupOutOfMemory(_out_of_memory(e)) from None
            except BackboneChanged as e:  # the reason itself
                raise TrialFailed(str(e)) from None
            except Exception as e:
                if disk_full(e, group_dir) is None:
                    raise
                raise disk_full(e, group_dir) from None


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _out_of_memory(error):
    return 'CUDA out of memory: ' + _first_line(error).removeprefix('CUDA out of memory. ')


def local_device():
    """The CUDA index of this worker's (first) Ray GPU among the devices the process sees, or
    None without a GPU. Workers see every GPU of their node (_start_crew), as Ray Train's
    workers see their node's share of the trial, so NCCL can use NVLink between the ranks."""
    ids = [str(g) for g in ray.get_gpu_ids()]
    if not ids:
        return None
    visible = os.environ.get('CUDA_VISIBLE_DEVICES')
    if visible:  # the node itself was started with a subset: Ray's ids are among them
        order = visible.split(',')
        return order.index(ids[0]) if ids[0] in order else 0
    return int(float(ids[0]))

