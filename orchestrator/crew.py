"""Crews: the warm Ray actors that train a sweep's trials, started once per sweep.

Words: a *crew* is one trial slot's N warm ``TrainWorker`` actors (in one Ray placement group);
a *trial group* is heads that share one frozen-backbone pass (grouping.py) and train on one crew;
torch's process group is what the crew's ranks join for one run.

Each concurrent trial slot owns one crew of N ``TrainWorker`` actors (train_worker.py) in a
placement group (all of the crew's CPUs/GPUs reserved together).

``WorkerPool`` (one named actor per sweep) leases crews to trials: ``acquire`` waits for a free
crew, ``release_when_done`` frees it when the trial's workers return, so a trial process that
dies never strands a crew. Trials of a trial group ``join`` instead (group_formation.py): the
last member to arrive leases one crew for all of them.
A crew whose run failed is rebuilt from fresh processes. The pool watches each trial's process
and stops its run (its head, in a trial group) when it dies.

The crews follow the cluster as it is: a crew is leased only once its placement group is placed,
so after a node is lost its rebuilt crew waits for room (the sweep runs fewer trials at once, on
the crews left) and is placed when a node joins. The pool and the trials' own processes run on
the head node (ON_HEAD): a lost worker node takes only crews with it.
"""
import asyncio
import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.group_formation import JOIN_WAIT_S, TrialGroupFormation
from orchestrator.train_worker import GRACE_S, TrainWorker, _first_line

WATCH_S = 2.0  # how often the pool checks that a trial's process is alive
HALT_S = 5.0  # how long a stopping sweep waits for its trial groups' workers to take the stop
ROOM_WAIT_S = 30.0  # a crew not placed after this long says that it waits for room
ROOM_TIMEOUT_S = 600.0  # fault_tolerance.room_timeout_s: no crew placed, trials waiting
# The head node's own resource: the pool and the trial processes (no CPU of their own) run there
ON_HEAD = {'node:__internal_head__': 0.001}


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
class WorkerPool(TrialGroupFormation):
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
        self.stop_reason = None  # set by stop_sweep: the driver polls it (driver._watch_pool)
        self.halted = False  # the sweep is stopping (halt_groups)
        self._init_trial_groups(trial_groups, group_runs, join_wait_s)

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
