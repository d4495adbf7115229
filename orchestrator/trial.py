"""One Tune trial: find its planned row (sweep_plan.py), lease a warm crew (crew.py), run the
training on its N workers and forward rank 0's evaluations to Tune (so ASHA can stop it).

The trial process only drives: it never imports mmcv or mmseg; the workers build the config
(trial_config.py).
"""
import os
import os.path as osp
import re
import time

import ray
from ray import tune

from orchestrator import val_cache
from orchestrator.checkpoints import readable_latest
from orchestrator.errors import DiskFull, GroupOutOfMemory, TrialFailed, disk_full
from orchestrator.files import read_jsonl
from orchestrator.grouping import group_key
from orchestrator.records import Placement, Restart, TrialRow
from orchestrator.train_worker import CALL_S, GRACE_S, TrialJob
from orchestrator.trial_config import work_dir

POLL_S = 1.0
HOLD_S = 600  # a trial waits this long for a stopping sweep to stop it (a full disk, a halt)


def trial_dir(output_dir, trial_id):
    return osp.join(output_dir, 'trials', trial_id)


class WorkersLost(TrialFailed):
    """A worker process of the trial died (killed, out of memory, node lost): worth a retry."""


def _failure(runs, pool):
    """The error that ended a crew's run. A rank whose process died (not one the pool killed
    afterwards, nor one that raised) makes it WorkersLost; then a worker's exception with a
    reason of ours (a config error, 'diverged: ...', out of memory), which a retry would only
    repeat; then a rank that still has not answered (WorkersLost); then another exception
    (gloo's 'Connection reset by peer' is a rank's consequence of another's failure). Ray's
    errors are told apart by type and actor id, not by their text."""
    ray.wait(runs, num_returns=len(runs), timeout=GRACE_S + 5)
    died, raised, full, silent = [], [], None, 0
    for ref in runs:
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayTaskError as e:
            raised.append(e)
            full = full or (e.cause if isinstance(e.cause, DiskFull) else None)
        except ray.exceptions.RayActorError as e:
            died.append(e)
        except ray.exceptions.GetTimeoutError:  # its node is gone, or not yet known to be
            silent += 1
    if full is not None:  # whatever else failed with it: the sweep stops, resumable
        return DiskFull(full.path)
    if died:
        try:
            ours = set(ray.get(pool.killed_here.remote([e.actor_id for e in died]),
                               timeout=CALL_S))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            ours = set()  # no pool to ask: the sweep is ending
        died = [e for e in died if e.actor_id not in ours]
    if died:
        return WorkersLost(f'a worker process died: {str(died[0]).splitlines()[0]}')
    reasoned = [e for e in raised if isinstance(e.cause, TrialFailed)]
    if reasoned:
        cause = reasoned[0].cause  # its reason, without the remote traceback
        return type(cause)(str(cause))
    if silent:
        return WorkersLost(f'{silent} worker(s) did not answer for {GRACE_S + 5:g} s after the '
                           'run failed')
    return raised[0].as_instanceof_cause() if raised else None


def _write_placement(out_dir, where, group=None):
    """Where each rank runs (node, GPUs) and the trial group it trains in, for the trial's MLflow
    tags (tracking.placement_tags)."""
    Placement(ranks=[{k: w[k] for k in ('node_id', 'node_ip', 'gpu_ids')} for w in where],
              group=group).write(out_dir)


def _poll(runs, workers, trial_id, forward, pool):
    """Until the runs end: forward this trial's reports from rank 0; raise the runs' failure
    (WorkersLost, the worker's exception) or this trial's own ('failed': a head that diverged
    in a trial group)."""
    n = len(runs)
    done = False
    while not done:
        ready = ray.wait(runs, num_returns=n, timeout=POLL_S)[0]
        done = len(ready) == n
        try:
            ray.get(ready)
            reports = ray.get(workers[0].drain.remote(trial_id), timeout=CALL_S)
        except ray.exceptions.GetTimeoutError:
            raise (_failure(runs, pool) or
                   WorkersLost(f'rank 0 did not answer for {CALL_S:g} s')) from None
        except ray.exceptions.RayActorError as e:  # rank 0 died, or its node is unreachable
            raise (_failure(runs, pool) or
                   WorkersLost(f'rank 0: {str(e).splitlines()[0]}')) from None
        except ray.exceptions.RayError as e:
            raise (_failure(runs, pool) or e) from None
        for metrics in reports:
            if 'failed' in metrics:
                raise TrialFailed(metrics['failed'])
            forward(metrics)


def _group_to_continue(out_dir, work_dir):
    """(group id, iteration) when the trial's last attempt trained in a trial group: the group
    it continues from its checkpoint at that iteration (0: none yet), or None."""
    placed = Placement.read(out_dir)
    group = placed and (placed.group or {}).get('id')
    if not group:
        return None
    path, _ = readable_latest(work_dir, set_aside=False)  # what the group's worker will take
    return group, _iteration(path)


def _train_in_trial_group(pool, job, forward, key=None, continuing=None, halve=False):
    """One attempt inside the trial's trial group (grouping.py), on the crew its last member
    leased: a new one (``key``) or the one it trained in (``continuing``: group id and the
    iteration of its checkpoint, group_checkpoint.py; ``halve``: in half of it, as it ran out
    of GPU memory). False when the pool has no trial group for it (it then trains alone)."""
    trial_id = job.trial_id
    holder = ray.get_runtime_context().current_actor
    joined = ray.get(pool.rejoin.remote(trial_id, *continuing, job, holder, halve) if continuing
                     else pool.join.remote(trial_id, key, job, holder))
    if joined is None:
        return False
    if joined[0] == 'full':  # its group's directory: the sweep stops (run_trial)
        raise DiskFull(joined[1])
    if joined[0] == 'lost':  # the crew could not start it: this trial goes alone
        raise WorkersLost(f'trial group could not start: {joined[1]}')
    workers, runs, group_dir = joined.workers, joined.runs, joined.group_dir
    try:
        where = ray.get([w.where.remote() for w in workers], timeout=CALL_S)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        where = []  # the run itself reports what happened to its workers
    if where:
        _write_placement(job.trial_dir, where, group=dict(id=osp.basename(group_dir),
                                                          size=joined.size))
    leaves, last = True, {}

    def forwarded(metrics):
        last.update(metrics)
        forward(metrics)
    try:
        _poll(runs, workers, trial_id, forwarded, pool)
        finished = bool(last) and last.get('iter') == last.get('max_iters')  # its schedule's
        # last evaluation (one at max_iters always comes); none yet in this attempt: not done
        if not finished and ray.get(pool.is_halted.remote()):
            leaves = False  # its head stopped with the group's as the sweep stops: not done
            _held_for_the_stop()
    except (WorkersLost, GroupOutOfMemory):
        leaves = False  # it comes back (run_trial): the group continues from its checkpoints
        raise
    finally:  # finished, failed, or stopped by Tune (ASHA): this head stops, the others go on
        for w in workers:
            w.request_stop.remote(trial_id)
        if leaves:
            pool.left.remote(osp.basename(group_dir), trial_id)
    return True


def _train_alone(pool, job, forward):
    """One attempt: lease a crew, run the job on it, forward rank 0's reports; raises the
    attempt's failure (WorkersLost or the worker's own exception)."""
    trial_id = job.trial_id
    cid, workers = ray.get(pool.acquire.remote(trial_id))
    n = len(workers)
    try:  # until the release is arranged, any failure must hand the crew back (rebuilt)
        where = ray.get([w.where.remote() for w in workers], timeout=CALL_S)
        address = ray.get(workers[0].rendezvous.remote(n), timeout=CALL_S)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
        ray.get(pool.release_broken.remote(cid, type(e).__name__))
        raise WorkersLost(f'a worker of the crew did not answer before the run: '
                          f'{type(e).__name__}: {str(e).splitlines()[0][:200]}') from None
    runs = [w.run.remote(job, rank, n, address) for rank, w in enumerate(workers)]
    pool.release_when_done.remote(cid, runs, ray.get_runtime_context().current_actor, trial_id)
    _write_placement(job.trial_dir, where)
    try:
        _poll(runs, workers, trial_id, forward, pool)
    finally:  # finished, failed, or stopped by Tune (ASHA): no worker keeps training it
        for w in workers:
            w.request_stop.remote(trial_id)


def _record_restart(output_dir, trial_id, work_dir, restart, retries, error):
    """A restart is visible: a record in the trial's ``restarts.jsonl``, which the live view and
    ``orchestrator status`` show as a line (status_view.restart_lines). The iteration lost is the last
    one in the training log; training resumes after the latest checkpoint (0: from the start)."""
    from orchestrator.status import log_dir, train_progress
    lost_at = train_progress(log_dir(output_dir, trial_id))[0]
    path, _ = readable_latest(work_dir, set_aside=False)  # what the worker will resume
    rec = Restart(at=round(time.time(), 3), restart=restart, of=retries, lost_at=lost_at,
                  resume_from=_iteration(path), reason=str(error))
    rec.append(trial_dir(output_dir, trial_id))
    return (f'worker lost at iteration {lost_at}; restart {restart} of {retries} from '
            f'iteration {rec.resume_from}')


def _iteration(checkpoint):
    """The iteration a checkpoint ``iter_N.pth`` continues after (None: 0, the start)."""
    if not checkpoint:
        return 0
    return int(re.fullmatch(r'iter_(\d+)\.pth', osp.basename(checkpoint)).group(1))


def _replay_history(work_dir):
    """Report the evaluations an earlier attempt of this trial computed (a killed driver may
    never have received them). Each is the identical record (same value, step and eval_time),
    so MLflow keeps one copy of what it already has and gains what it missed."""
    path = osp.join(work_dir, 'metrics.jsonl')
    if osp.isfile(path):  # a line the killed attempt left half-written is not replayed
        for metrics in read_jsonl(path):
            tune.report(metrics)


def _held_for_the_stop():
    """The sweep is stopping (crew.halt_groups) and this trial's run ended with it: it waits,
    still running for Tune, which stops it, so that --resume continues it (returning would
    record it finished)."""
    time.sleep(HOLD_S)
    raise TrialFailed(f'the sweep did not stop this trial within {HOLD_S} s of halting it')


def _stop_the_sweep(pool, error):
    """A full disk stops the whole sweep (driver.py asks the pool), not this trial: it waits,
    still running for Tune, so that ``--resume`` continues it from its latest checkpoint."""
    ray.get(pool.stop_sweep.remote(str(error)))
    time.sleep(HOLD_S)  # Tune stops this trial's process well before
    raise TrialFailed(str(error))


def _stop_if_full(pool, error, path):
    """An OSError of the trial's own files: a full disk stops the sweep (_stop_the_sweep),
    anything else is the trial's error."""
    full = disk_full(error, path)
    if full is None:
        raise error
    _stop_the_sweep(pool, full)


def _job(plan, planned, trial_id, output_dir, abandoned_after_s=None):
    """What the trial sends its workers (train_worker.TrialJob)."""
    spec = plan.spec
    return TrialJob(trial_id=trial_id, trial_dir=trial_dir(output_dir, trial_id), base=plan.base,
                    trial=planned, base_filename=plan.base_filename, source=spec.source,
                    collective_timeout_s=spec.fault_tolerance.collective_timeout_s,
                    val_feature_cache=val_cache.settings(spec, output_dir),
                    **({'abandoned_after_s': abandoned_after_s} if abandoned_after_s else {}))


def run_trial(config, plan, output_dir, pool_name, grouped=False, abandoned_after_s=None):
    """Tune function trainable (a plain function, as in Ray Tune's examples).

    Training resumes from the trial's latest mmseg checkpoint whenever there is one (mmseg's
    ``auto_resume``): after a lost worker (up to ``fault_tolerance.worker_retries`` times) and
    when a killed sweep is resumed. With ``grouped``, the first attempt trains in the trial's
    group when it has one; an attempt after one in a group continues that group from its
    members' checkpoints (or alone from its own, when the pool cannot regroup it).
    """
    trial_id = tune.get_context().get_trial_id()
    out_dir = trial_dir(output_dir, trial_id)
    spec, planned = plan.spec, plan.trial_for(config)
    pool = ray.get_actor(pool_name)
    try:  # the trial's first write, before any crew is leased: a full disk stops the sweep
        os.makedirs(out_dir, exist_ok=True)
        TrialRow(index=planned.index, values=planned.values,
                 iterations=planned.iterations).write(out_dir)
    except OSError as e:
        _stop_if_full(pool, e, out_dir)
    mmseg_dir = work_dir(out_dir)
    job = _job(plan, planned, trial_id, output_dir, abandoned_after_s)
    restarts, halve = 0, False

    def forward(metrics):
        tune.report(dict(metrics, restarts=restarts))

    while True:
        _replay_history(mmseg_dir)
        continuing = grouped and _group_to_continue(out_dir, mmseg_dir)
        halving, halve = halve, False
        try:
            if continuing and _train_in_trial_group(pool, job, forward, continuing=continuing,
                                                    halve=halving):
                return None
            if grouped and not continuing and restarts == 0 and \
                    readable_latest(mmseg_dir, set_aside=False)[0] is None and \
                    _train_in_trial_group(pool, job, forward, key=group_key(spec, planned.values)):
                return None
            return _train_alone(pool, job, forward)
        except OSError as e:  # the trial's own files (placement)
            _stop_if_full(pool, e, out_dir)
        except DiskFull as e:
            _stop_the_sweep(pool, e)
        except GroupOutOfMemory as e:  # bounded: a group of one trains alone
            halve = True
            print(f'trial {trial_id}: its trial group ran out of GPU memory ({e}); it continues '
                  'in a group of half the heads', flush=True)
        except WorkersLost as e:
            if restarts >= spec.fault_tolerance.worker_retries:
                if continuing:
                    pool.left.remote(continuing[0], trial_id)
                raise TrialFailed(
                    f'workers lost: {e}; gave up after {restarts} restart(s)') from None
            restarts += 1
            try:
                line = _record_restart(output_dir, trial_id, mmseg_dir, restarts,
                                       spec.fault_tolerance.worker_retries, e)
            except OSError as error:  # restarts.jsonl
                _stop_if_full(pool, error, out_dir)
            print(f'trial {trial_id}: {line} ({e})', flush=True)
