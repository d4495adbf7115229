"""Crews: the warm Ray actors that train a sweep's trials, started once per sweep.

Words: a *crew* is one trial slot's N warm ``TrainWorker`` actors (in one Ray placement group);
a *trial group* is heads that share one frozen-backbone pass (grouping.py) and train on one crew;
torch's process group is what the crew's ranks join for one run.

Why not a Ray Train ``TorchTrainer`` per trial: on 2 cores Ray Train V2 spent ~20 s of every trial
starting its ~9 controller/worker actor processes, plus ~6 s importing torch/mmcv/mmseg in fresh
workers (issue 3's notes). Here each concurrent trial slot owns one crew of N ``TrainWorker``
actors in a placement group (all of the crew's CPUs/GPUs reserved together); a worker imports
mmseg once and trains one trial after another, joining a fresh ``torch.distributed`` process
group (gloo on CPU, nccl on GPU) per trial.

``WorkerPool`` (one named actor per sweep) leases crews to trials: ``acquire`` waits for a free
crew, ``release_when_done`` frees it when the trial's workers return, so a trial process that
dies never strands a crew. Trials of a trial group (orchestrator/grouping.py) ``join`` instead:
the last member to arrive leases one crew for all of them (``TrainWorker.run_trial_group``).
A crew whose run failed is rebuilt from fresh processes. The pool watches each trial's process
and stops its run (its head, in a trial group) when it dies; as a fallback, a rank 0 that nobody
has polled for ABANDONED_AFTER_S stops training by itself.

The crews follow the cluster as it is: a crew is leased only once its placement group is placed,
so after a node is lost its rebuilt crew waits for room (the sweep runs fewer trials at once, on
the crews left) and is placed when a node joins. The pool and the trials' own processes run on
the head node (ON_HEAD): a lost worker node takes only crews with it.
"""
import asyncio
import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.records import GroupRecord

GRACE_S = 10.0  # after one rank fails, how long the others get to fail on their own
WATCH_S = 2.0  # how often the pool checks that a trial's process is alive
# A rank 0 that nobody has polled or vouched for this long stops by itself. The trial polls every
# second and the pool vouches for it every WATCH_S while its process lives, so only a sweep whose
# driver, trial and pool are all gone reaches it. ORCHESTRATOR_ABANDONED_AFTER_S overrides it.
ABANDONED_AFTER_S = 120.0
RENDEZVOUS_S = 300.0  # how long ranks wait for each other when a run starts
HALT_S = 5.0  # how long a stopping sweep waits for its trial groups' workers to take the stop
CALL_S = 120.0  # a worker's or the pool's answer to a short call (where, rendezvous, drain)
JOIN_WAIT_S = 300.0  # a trial group's members start one after another; one later is lost
ROOM_WAIT_S = 30.0  # a crew not placed after this long says that it waits for room
ROOM_TIMEOUT_S = 600.0  # fault_tolerance.room_timeout_s: no crew placed, trials waiting
# The head node's own resource: the pool and the trial processes (no CPU of their own) run there
ON_HEAD = {'node:__internal_head__': 0.001}


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


class GroupRun(NamedTuple):
    """A trial group's run, as every member learns it from ``WorkerPool.join``."""
    cid: int  # the crew it runs on
    workers: list
    runs: list  # one object ref per rank
    group_dir: str
    size: int


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


def _group_file(record):
    """A trial group's ``group.json`` (records.GroupRecord; what a --resume reads:
    driver._groups_to_continue): its record less what only this run knows (who left)."""
    return GroupRecord(**{k: v for k, v in record.items() if k != 'left'})


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _out_of_memory(error):
    return 'CUDA out of memory: ' + _first_line(error).removeprefix('CUDA out of memory. ')


async def _answering(workers, within_s=2.0):
    """The workers whose process answers (a call served beside a run) within ``within_s``."""
    async def answers(w):
        try:
            await asyncio.wait_for(_ready(w), within_s)
            return True
        except Exception:
            return False
    return [w for w, ok in zip(workers, await asyncio.gather(*map(answers, workers))) if ok]


async def _ready(actor):
    await actor.__ray_ready__.remote()


async def _settled(ref):
    try:
        await ref
    except Exception:
        pass


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


# Ray would show each GPU actor only its own GPU (CUDA_VISIBLE_DEVICES per process): ranks of one
# trial on one node could then not reach each other's devices (no NVLink for NCCL). Set before
# the process starts, this keeps the node's devices visible; each worker picks its own.
_SEE_NODE_GPUS = {'env_vars': {'RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES': '1'}}


def _start_crew(n_workers, bundle, strategy):
    pg = placement_group([dict(bundle) for _ in range(n_workers)], strategy=strategy)
    gpu = bundle.get('GPU', 0)
    workers = [TrainWorker.options(
        num_cpus=bundle.get('CPU', 0), num_gpus=gpu,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
        **({'runtime_env': _SEE_NODE_GPUS} if gpu else {}),
    ).remote(float(gpu)) for i in range(n_workers)]
    return pg, workers


@ray.remote(num_cpus=0)
class WorkerPool:
    """Leases crews to trials (an async actor: waiting trials do not block it)."""

    def __init__(self, n_crews, n_workers, bundle, strategy='PACK', trial_groups=None,
                 join_wait_s=JOIN_WAIT_S, room_wait_s=None, group_runs=None,
                 room_timeout_s=ROOM_TIMEOUT_S):
        self.n_workers, self.bundle, self.strategy = n_workers, dict(bundle), strategy
        self.room_wait_s = room_wait_s or ROOM_WAIT_S
        self.room_timeout_s, self.waiting, self._room_watch = room_timeout_s, 0, None
        self._room_seen = None  # last time a crew was placed or nobody waited
        self.notices = []  # lines for the sweep's terminal (the driver polls them: notices_from)
        self.crews = [_start_crew(n_workers, self.bundle, strategy) for _ in range(n_crews)]
        self.free = []  # placed and not leased
        self.placed = set()
        self._unwatched = list(range(n_crews))  # crews whose placement nobody awaits yet
        self.killed = set()  # actor ids this pool killed while they ran (not lost: _failure)
        self.holder = {}
        self.rebuilt = 0
        self._changed = None
        # trial groups (orchestrator/grouping.py): key -> sizes of its chunks, filled in arrival
        # order; each forming chunk: its members' (trial id, job, actor) and the launch result
        self.trial_groups = {k: list(v) for k, v in (trial_groups or {}).items()}
        self.forming = {}
        # trial groups that ran: id -> their key, members and the members that left (a group
        # continues from its members' checkpoints with the others: rejoin); from the driver on
        # --resume (driver._groups_to_continue)
        self.group_runs = {g: dict(r, left=set(r.get('left', ()))) for g, r in
                           (group_runs or {}).items()}
        self.continuing = {}  # group id -> its forming continuation
        self._caps = {}  # key -> most heads a chunk of it holds (a group of it ran out: _cap)
        for record in self.group_runs.values():  # what the memory plan learnt before --resume
            if record.get('out_of_memory'):
                self._cap(record['key'], (record['out_of_memory'] + 1) // 2)
        self.launched = 0
        self.join_wait_s = join_wait_s
        self.stop_reason = None  # set by stop_sweep: the driver polls it (driver._watch_pool)
        self.halted = False  # the sweep is stopping (halt_groups)
        self.group_heads = {}  # crew id -> the trial ids of the trial group it trains

    def _cond(self):
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    def _await_placements(self):
        """Lease a crew only once its placement group is placed (a rebuilt one may wait for a
        node); called from the event loop (an actor's __init__ is not)."""
        while self._unwatched:
            cid = self._unwatched.pop()
            asyncio.ensure_future(self._when_placed(cid, self.crews[cid][0]))
        if self._room_watch is None:
            self._room_seen = time.time()
            self._room_watch = asyncio.ensure_future(self._watch_room())

    async def _watch_room(self):
        """Trials waiting while no crew is placed (the nodes that could hold one are gone) for
        ``room_timeout_s``: the sweep stops, resumable, rather than wait forever."""
        from orchestrator.errors import NO_ROOM_EXIT, SweepStop
        while True:
            await asyncio.sleep(min(1.0, self.room_timeout_s / 4))
            now = time.time()
            if self.placed or not self.waiting:
                self._room_seen = now
            elif now - self._room_seen >= self.room_timeout_s and self.stop_reason is None:
                self.stop_reason = SweepStop(
                    f'no node of the cluster could hold a crew ({self.n_workers} x '
                    f'{self.bundle}) for {self.room_timeout_s:g} s while trials waited (the '
                    'nodes that could are gone, or busy with other work)',
                    remedy='add a node that can hold one', exit_code=NO_ROOM_EXIT)

    async def _when_placed(self, cid, pg):
        ready = asyncio.ensure_future(_settled(pg.ready()))
        done, _ = await asyncio.wait([ready], timeout=self.room_wait_s)
        if not done:
            self.notices.append(f'crew {cid}: waiting for room on the cluster '
                                f'({self.n_workers} x {self.bundle}); trials run on the other '
                                'crews meanwhile')
            await ready
            self.notices.append(f'crew {cid}: placed; it trains trials again')
        async with self._cond():
            if self.crews[cid][0] is not pg:  # rebuilt meanwhile: its own wait goes on
                return
            self.placed.add(cid)
            if cid not in self.holder:
                self.free.append(cid)
            self._cond().notify_all()

    async def acquire(self, trial_id):
        self._await_placements()
        async with self._cond():
            self.waiting += 1
            try:
                # a stopping sweep starts no run (Tune stops the trials that wait)
                await self._cond().wait_for(lambda: self.free and not self.halted)
            finally:
                self.waiting -= 1
            cid = self.free.pop(0)
            self.holder[cid] = trial_id
        return cid, self.crews[cid][1]

    async def join(self, trial_id, key, job, holder):
        """Join trial group ``key``: wait until its chunk is complete, then (the last member to
        arrive) lease a crew and start the trial group's run. Returns its GroupRun to every
        member, ``('lost', reason)`` when the crew could not start it, None when ``key`` has no group (the trial then runs
        alone)."""
        if key not in self.trial_groups:
            return None
        self._await_placements()
        async with self._cond():
            forming = self.forming.setdefault(key, [])
            if not forming or forming[-1]['launching']:
                sizes = self.trial_groups[key]
                if len(forming) >= len(sizes):
                    return None  # more trials than planned (a late one): alone
                forming.append(dict(size=sizes[len(forming)], members=[], launching=False,
                                    result=None, ready=asyncio.Event()))
                asyncio.ensure_future(self._deadline(key, forming[-1]))
            chunk = forming[-1]
            chunk['members'].append((trial_id, job, holder))
            launch = len(chunk['members']) == chunk['size']
            chunk['launching'] = launch
        if launch:
            await self._launch(chunk, key)
        await chunk['ready'].wait()
        return chunk['result']

    async def rejoin(self, trial_id, group, iteration, job, holder, halve=False):
        """Continue trial group ``group`` from its members' checkpoints at ``iteration``
        (group_checkpoint.py): after a lost worker, on --resume, or in halves after the group ran
        out of GPU memory (``halve``). It starts when every member that has not left has come
        back; those whose checkpoints are of another iteration than most, or a member left
        alone, get None (they continue alone, from their own files)."""
        record = self.group_runs.get(group)
        if record is not None and trial_id in record.get('split', {}):
            # split after it ran out of memory (its trial's placement may still name it): the
            # member continues in the half it was given, or alone (None)
            group, halve = record['split'][trial_id], False
            record = self.group_runs.get(group)
        if record is None or trial_id in record['left'] or trial_id not in record['members']:
            return None  # not in the group's latest run: it goes on alone
        if halve:  # the heads it trained when it ran out
            record.setdefault('out_of_memory', len(record['members']) - len(record['left']))
        self._await_placements()
        async with self._cond():
            chunk = self.continuing.get(group)
            if chunk is None or chunk['launching']:
                chunk = self.continuing[group] = dict(
                    group=group, size=len(record['members']), members=[], iterations={},
                    launching=False, result={}, ready={})
                asyncio.ensure_future(self._deadline(group, chunk))
            chunk['members'].append((trial_id, job, holder))
            chunk['iterations'][trial_id] = iteration
            chunk['ready'][trial_id] = asyncio.Event()
            launch = chunk['launching'] = self._all_back(chunk)
        if launch:
            await self._continue(chunk)
        await chunk['ready'][trial_id].wait()
        return chunk['result'].get(trial_id)

    def _all_back(self, chunk):
        record = self.group_runs[chunk['group']]
        return set(record['members']) - record['left'] <= set(chunk['iterations'])

    async def left(self, group, trial_id):
        """A member of ``group`` ended for good (finished, stopped, failed, gave up): a
        continuation does not wait for it."""
        record = self.group_runs.get(group)
        if record is None:
            return
        record['left'].add(trial_id)
        chunk = self.continuing.get(group)
        async with self._cond():
            launch = (chunk is not None and not chunk['launching'] and chunk['members']
                      and self._all_back(chunk))
            if launch:
                chunk['launching'] = True
        if launch:
            await self._continue(chunk)

    async def _continue(self, chunk):
        """Start the continuation with the members of the most common iteration (2 or more);
        after the group ran out of GPU memory, as two groups of half its heads each."""
        counts = {}
        for it in chunk['iterations'].values():
            counts[it] = counts.get(it, 0) + 1
        iteration = max(counts, key=lambda it: (counts[it], it))
        members = [m for m in chunk['members'] if chunk['iterations'][m[0]] == iteration]
        group, record = chunk['group'], self.group_runs[chunk['group']]
        parts = [(group, members)]
        if record.get('out_of_memory') and not record.get('split'):
            parts = self._halves(group, record, members, iteration)
        try:
            for _, part in parts:  # alone at once, not after a group waited for a crew
                if len(part) < 2:
                    self._answer(chunk, part, None)
            for name, part in parts:
                if len(part) >= 2:
                    result = await self._start(
                        part, record['key'], name,
                        parent=record.get('parent') if name == group else group)
                    self._answer(chunk, part, result)
        finally:  # whatever happened, nobody waits forever
            self._answer(chunk, chunk['members'], None, unanswered_only=True)

    @staticmethod
    def _answer(chunk, members, result, unanswered_only=False):
        for trial_id, _, _ in members:
            if unanswered_only and chunk['ready'][trial_id].is_set():
                continue
            chunk['result'][trial_id] = result
            chunk['ready'][trial_id].set()

    def _halves(self, group, record, members, iteration):
        """The members of a group that ran out of GPU memory in two groups (the first the
        larger); later groups of its kind hold at most as many heads as the first."""
        half = (len(members) + 1) // 2
        parts = [(f'{group}.1', members[:half]), (f'{group}.2', members[half:])]
        cap = self._cap(record['key'], (record['out_of_memory'] + 1) // 2)
        self.notices.append(
            f'trial group {group}: out of GPU memory with {record["out_of_memory"]} heads; '
            f'they continue from iteration {iteration} as ' +
            ' and '.join(f'{len(p)} alone' if len(p) == 1 else f'group {name} ({len(p)} heads)'
                         for name, p in parts if p) +
            f'; later groups of its kind hold at most {cap} heads')
        # Each member's half, kept (and in group.json, for a --resume) before any half starts:
        # a half that cannot start, or an interruption before it does, continues the same half
        record['split'] = {m[0]: (name if len(p) >= 2 else None) for name, p in parts for m in p}
        groups = os.path.dirname(self._group_dir(members[0][1], group))
        for name, part in parts:
            if len(part) >= 2:
                self.group_runs[name] = dict(key=record['key'], members=[m[0] for m in part],
                                             left=set(), parent=group)
        with contextlib.suppress(OSError):  # without them a --resume splits it again
            for name in (group, *(n for n, p in parts if len(p) >= 2)):
                os.makedirs(os.path.join(groups, name), exist_ok=True)
                _group_file(self.group_runs[name]).write(os.path.join(groups, name))
        return parts

    def _cap(self, key, heads):
        """Chunks of ``key`` not yet forming hold at most ``heads``, or the smallest cap of
        ``key`` so far (one already forming keeps its size: it splits in turn if it runs out).
        Returns the cap."""
        from orchestrator.grouping import capped
        heads = self._caps[key] = min(heads, self._caps.get(key, heads))
        sizes = self.trial_groups.get(key)
        if sizes is not None:
            begun = len(self.forming.get(key, []))
            self.trial_groups[key] = sizes[:begun] + capped(sizes[begun:], heads)
        return heads

    @staticmethod
    def _group_dir(job, group):
        return os.path.join(os.path.dirname(os.path.dirname(job.trial_dir)), 'groups', group)

    async def _deadline(self, key, chunk):
        """A member that never comes (its trial failed to start) must not hold the others
        forever: after ``join_wait_s`` the group starts with those present."""
        await asyncio.sleep(self.join_wait_s)
        async with self._cond():
            if chunk['launching']:
                return
            chunk['launching'] = True
        print(f'trial group {key}: {len(chunk["members"])} of {chunk["size"]} trials '
              f'{"came back" if "group" in chunk else "joined"} in {self.join_wait_s:g} s; '
              'starting without the others (they train alone)', flush=True)
        if 'group' in chunk:
            await self._continue(chunk)
        else:
            await self._launch(chunk, key)

    async def _launch(self, chunk, key):
        try:
            chunk['result'] = ('lost', 'the trial group could not start')
            chunk['result'] = await self._start(chunk['members'], key)
        finally:  # whatever happened, nobody waits forever
            chunk['ready'].set()

    async def _start(self, members, key, group=None, parent=None):
        """Lease a crew and start a trial group's run on it (``group``: the id of the group it
        continues, or of a half of ``parent``; a new one is named after its first member).
        Returns its GroupRun, or ``('lost', reason)`` when the crew cannot start it (a worker
        died while idle): the crew is rebuilt, nobody waits forever."""
        jobs, ids = [m[1] for m in members], [m[0] for m in members]
        group = group or os.path.basename(jobs[0].trial_dir)
        group_dir = self._group_dir(jobs[0], group)
        record = dict(key=key, members=ids, left=set(), **({'parent': parent} if parent else {}))
        try:  # what a --resume continues (driver.py)
            os.makedirs(group_dir, exist_ok=True)
            _group_file(record).write(group_dir)
        except OSError as e:  # a full disk: the members' own attempts say it
            return ('lost', f'{group_dir}: {e}')
        cid, workers = await self.acquire('+'.join(ids))
        try:
            init = await asyncio.wait_for(workers[0].rendezvous.remote(len(workers)), CALL_S)
        except Exception as e:  # a dead or unresponsive worker
            await self.release_broken(cid, type(e).__name__)
            return ('lost', f'{type(e).__name__}: {str(e).splitlines()[0][:200]}')
        self.group_runs[group] = record
        runs = [w.run_trial_group.remote(jobs, rank, len(workers), init, group_dir)
                for rank, w in enumerate(workers)]
        self.group_heads[cid] = ids
        if self.halted:  # started as the sweep stops: it stops at once, as one
            for w in workers:
                w.request_stop.remote(*ids)
        holders = {m[0]: m[2] for m in members}
        asyncio.ensure_future(self.release_when_done(cid, runs, holders=holders, group=group))
        self.launched += 1
        return GroupRun(cid, workers, runs, group_dir, len(jobs))

    async def _watch(self, holder, workers, trial_id, group=None):
        """Stop the crew's run as soon as the trial process driving it dies (Tune killed it
        after an early stop, or its node went away); an idle or busy one answers or queues.
        In a trial group, the member has left it (a continuation does not wait for it)."""
        while True:
            try:
                await holder.__ray_ready__.remote()
            except ray.exceptions.RayActorError:
                for w in workers:
                    w.request_stop.remote(trial_id)
                if group is not None:
                    await self.left(group, trial_id)
                return
            workers[0].heartbeat.remote(trial_id)  # alive, even if blocked in tune.report
            await asyncio.sleep(WATCH_S)

    def _rebuild(self, cid, why, running=()):
        """Fresh processes in a fresh placement group (leased once placed); ``running``: the
        workers still in their run, whose deaths are this pool's doing (``killed_here``)."""
        print(f'crew {cid}: {why}; rebuilding it', flush=True)
        pg, workers = self.crews[cid]
        self.killed.update(w._actor_id.hex() for w in running)
        for w in workers:
            ray.kill(w)
        remove_placement_group(pg)
        self.crews[cid] = _start_crew(self.n_workers, self.bundle, self.strategy)
        self.placed.discard(cid)
        self._unwatched.append(cid)
        self._await_placements()
        self.rebuilt += 1

    async def grow_to(self, n):
        """``n`` crews in all, for nodes that joined the cluster (driver._grow): the new ones
        leased once placed, as every crew."""
        for _ in range(n - len(self.crews)):
            self.crews.append(_start_crew(self.n_workers, self.bundle, self.strategy))
            self._unwatched.append(len(self.crews) - 1)
        self._await_placements()

    def killed_here(self, actor_ids):
        """Which of these actors (ids in hex) the pool killed in a run: not lost processes."""
        return [a for a in actor_ids if a in self.killed]

    async def _free(self, cid):
        async with self._cond():
            self.holder.pop(cid, None)
            self.group_heads.pop(cid, None)
            if cid in self.placed:
                self.free.append(cid)
            self._cond().notify_all()

    async def release_broken(self, cid, why=''):
        """The crew could not start a run (a worker died while idle, or did not answer): it is
        rebuilt from fresh processes and freed, never left leased."""
        self._rebuild(cid, f'could not start a run ({why})')
        await self._free(cid)

    async def release_when_done(self, cid, refs, holder=None, trial_id=None, holders=None,
                                group=None):
        """Free crew ``cid`` once the runs ``refs`` have returned; rebuild it if any failed.
        ``holder``: the trial's actor (``holders``: trial id -> actor, for a trial group),
        watched so that a dead trial does not keep training (its head alone, in a group)."""
        holders = dict(holders or {})
        if holder is not None:
            holders[trial_id] = holder
        watches = [asyncio.ensure_future(self._watch(h, self.crews[cid][1], tid, group))
                   for tid, h in holders.items() if h is not None]
        try:
            await asyncio.gather(*refs)
        except Exception as e:  # the trial reports the error itself; here only the crew matters
            # The other ranks get a moment to fail on their own (so the trial can tell a dead
            # process from an exception), then go: they may be blocked in a collective.
            settled = [asyncio.ensure_future(_settled(r)) for r in refs]
            await asyncio.wait(settled, timeout=GRACE_S)
            running = [w for w, s in zip(self.crews[cid][1], settled) if not s.done()]
            try:  # a rank on a lost node is not running: it does not answer
                self._rebuild(cid, f'run failed ({type(e).__name__}: {_first_line(e)})',
                              await _answering(running))
            finally:
                for watch in watches:
                    watch.cancel()
                await self._free(cid)
            return
        for watch in watches:
            watch.cancel()
        await self._free(cid)

    async def halt_groups(self):
        """The sweep stops (a signal, or its own stop): each running trial group's heads stop
        at one iteration, before Tune stops their trials one by one (each death would stop its
        head alone, a few iterations apart, and a checkpoint could then be saved for some heads
        and not others: a --resume continues a group only from one iteration). Their trials
        then wait for Tune (trial._held_for_the_stop)."""
        self.halted = True
        calls = [w.request_stop.remote(*ids) for cid, ids in self.group_heads.items()
                 for w in self.crews[cid][1]]
        await asyncio.wait([asyncio.ensure_future(_settled(c)) for c in calls] or
                           [asyncio.ensure_future(asyncio.sleep(0))], timeout=HALT_S)

    async def drop_val_features(self, cache):
        """The sweep ends: each node's validation feature cache goes (val_cache.py); every
        worker removes it where it runs (a crew may span nodes; a node gone took its own)."""
        calls = [w.drop_val_features.remote(cache) for _, workers in self.crews for w in workers]
        await asyncio.wait([asyncio.ensure_future(_settled(c)) for c in calls] or
                           [asyncio.ensure_future(asyncio.sleep(0))], timeout=HALT_S)

    def is_halted(self):
        return self.halted

    def stop_sweep(self, reason):
        """A trial asks the driver to stop the sweep (a full disk); the first reason is kept."""
        self.stop_reason = self.stop_reason or reason

    def stop_requested(self):
        return self.stop_reason

    def notices_from(self, n):
        """The notices after the first ``n``."""
        return self.notices[n:]

    def stats(self):
        return dict(crews=len(self.crews), free=len(self.free), placed=len(self.placed),
                    rebuilt=self.rebuilt,
                    holders=dict(self.holder), trial_groups_launched=self.launched)
