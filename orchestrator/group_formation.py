"""Trial-group formation, the worker pool's half that concerns trial groups (grouping.py): the
members of a planned group ``join`` until its chunk is complete and the last one leases one crew
for all (``TrainWorker.run_trial_group``); after a lost worker, on --resume, or in halves after
the group ran out of GPU memory, members ``rejoin`` the group they trained in and continue from
their checkpoints. A mixin of crew.WorkerPool: it leases crews through the pool's own
``acquire`` / ``release_when_done`` and keeps its state in the pool (``_init_trial_groups``).
"""
import asyncio
import contextlib
import os
from typing import NamedTuple

from orchestrator.errors import disk_full
from orchestrator.records import GroupRecord
from orchestrator.train_worker import CALL_S

JOIN_WAIT_S = 300.0  # a trial group's members start one after another; one later is lost


class GroupRun(NamedTuple):
    """A trial group's run, as every member learns it from ``WorkerPool.join``."""
    cid: int  # the crew it runs on
    workers: list
    runs: list  # one object ref per rank
    group_dir: str
    size: int


def _group_file(record):
    """A trial group's ``group.json`` (records.GroupRecord; what a --resume reads:
    driver._groups_to_continue): its record less what only this run knows (who left)."""
    return GroupRecord(**{k: v for k, v in record.items() if k != 'left'})


class TrialGroupFormation:
    """join / rejoin / left for crew.WorkerPool (module docstring)."""

    def _init_trial_groups(self, trial_groups, group_runs, join_wait_s):
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
        self.group_heads = {}  # crew id -> the trial ids of the trial group it trains

    async def join(self, trial_id, key, job, holder):
        """Join trial group ``key``: wait until its chunk is complete, then (the last member to
        arrive) lease a crew and start the trial group's run. Returns its GroupRun to every
        member, ``('lost', reason)`` when the crew could not start it, ``('full', path)`` when
        the output disk is full, None when ``key`` has no group (the trial then runs alone)."""
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
        except OSError as e:  # a full disk stops the sweep (each member raises it)
            full = disk_full(e, group_dir)
            return ('full', full.path) if full else ('lost', f'{group_dir}: {e}')
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
