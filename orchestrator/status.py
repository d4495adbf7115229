"""Where a sweep stands, while it runs and after: each trial's state, iteration, latest metric and
the ETA, read from files the sweep already writes (no MLflow, no Ray needed, so it also works while
the tracking server is down):

- ``plan.json``: how many trials the sweep will run and how many run at once (the driver;
  records.PlanSummary);
- ``mlflow_journal.jsonl``: every trial start, evaluation, failure reason and end, timestamped
  (orchestrator/journal.py);
- ``trials/<id>/mmseg/*.log.json``: mmseg's training log, for the iteration and seconds per
  iteration between evaluations.

``orchestrator status SWEEP`` prints it (status_view.py); ``live.LiveStatus`` shows the same
during ``orchestrator sweep``.
"""
import glob
import json
import os
import os.path as osp
import socket
import time

from orchestrator.checkpoints import SKIPPED
from orchestrator.files import read_jsonl
from orchestrator.journal import JOURNAL
from orchestrator.records import PlanSummary, Placement, Restart
STATES = ('pending', 'running', 'done', 'stopped', 'failed', 'interrupted')


def write_plan(sweep_dir, plan, concurrent):
    """What the status needs of the SweepPlan ``plan`` (records.PlanSummary): the trial count,
    concurrency, the metric and searched keys, who runs it (each trial's own row is its
    trials/<id>/trial.json: records.TrialRow)."""
    PlanSummary(total_trials=len(plan.trials), concurrent=concurrent,
                metric=plan.spec.search.metric, searched=plan.searched, driver_pid=os.getpid(),
                driver_host=socket.gethostname()).write(sweep_dir)


def _driver_gone(plan):
    """True when the sweep's driver ran on this host and its process is gone (killed)."""
    if plan.driver_host != socket.gethostname():
        return False  # cannot tell from here
    try:
        os.kill(plan.driver_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


class JournalTail:
    """The sweep's journal records, read incrementally: the live view asks every 2 s, and a
    long sweep's journal holds thousands of evaluations."""

    def __init__(self, sweep_dir):
        self.path = osp.join(sweep_dir, JOURNAL)
        self.records, self._offset = [], 0

    def read(self):
        if not osp.isfile(self.path):
            return self.records
        with open(self.path, 'rb') as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b'\n') + 1  # a line the driver is still writing waits for next time
        for line in chunk[:end].splitlines():
            if line.strip():
                self.records.append(json.loads(line))
        self._offset += end
        return self.records


def log_dir(sweep_dir, trial):
    """Where the trial's mmseg json log is: its own work dir, or its trial group's."""
    placed = Placement.read(osp.join(sweep_dir, 'trials', trial))
    group = placed and placed.group
    if group:
        return osp.join(sweep_dir, 'groups', group['id'])
    return osp.join(sweep_dir, 'trials', trial, 'mmseg')


def train_progress(log_dir):
    """(iteration, seconds per iteration) from the newest mmseg json log in ``log_dir``."""
    logs = sorted(glob.glob(osp.join(log_dir, '*.log.json')), key=osp.getmtime)
    it, times = 0, []
    for path in logs[-1:]:
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get('mode') == 'train':
                    it = rec['iter']
                    times.append(rec.get('time', 0.0))
    return it, (sum(times[-5:]) / len(times[-5:]) if times else None)


def _replay_journal(records, metric):
    """(trials by id, sweep state, started at, ended at) from the journal's records."""
    trials, sweep_state, started_at, ended_at = {}, 'RUNNING', None, None
    for rec in records:
        tid = rec.get('trial_id')
        if rec['op'] == 'parent':
            started_at = started_at or rec.get('at')
        elif rec['op'] == 'status' and tid is None:
            sweep_state = rec['status']
            ended_at = None if sweep_state == 'RUNNING' else rec.get('at')
        elif rec['op'] == 'child':
            t = trials.setdefault(tid, dict(trial=tid, state='running', iter=0, metric=None,
                                            reason='', started=rec.get('at'), ended=None))
            t['max_iters'] = int(rec['params'].get('runner.max_iters', 0)) or None
            t['params'] = rec['params']
        elif tid in trials:
            t = trials[tid]
            if rec['op'] == 'metrics':
                t['iter'] = max(t['iter'], rec['step'])
                if metric in rec['metrics']:
                    t['metric'] = rec['metrics'][metric]
            elif rec['op'] == 'tags' and 'failure_reason' in rec['tags']:
                t['reason'] = rec['tags']['failure_reason']
            elif rec['op'] == 'status':
                t['ended'] = None if rec['status'] == 'RUNNING' else rec.get('at')
                t['state'] = {'RUNNING': 'running', 'FINISHED': 'done',
                              'KILLED': 'interrupted'}.get(rec['status'], 'failed')
    return trials, sweep_state, started_at, ended_at


def _eta(trials, counts, waiting, remaining_s, concurrent):
    """Seconds until the sweep ends: the running trials' remaining iterations at their own pace,
    plus the queued ones at the mean finished trial's duration, over the concurrent slots. None
    until a trial has finished (when some are queued)."""
    durations = [t['ended'] - t['started'] for t in trials
                 if t['state'] == 'done' and t['ended'] and t['started']]
    queued = counts['pending'] + waiting
    per_trial = (sum(durations) / len(durations)) if durations else None
    if queued and per_trial is None:
        return None
    work = sum(remaining_s) + queued * (per_trial or 0)
    return work / max(1, min(concurrent, counts['running'] + counts['pending']))


def sweep_status(sweep_dir, journal=None):
    """(trials, summary): one dict per started trial and counts of every state plus ETA.
    ``journal``: a JournalTail to reuse between calls."""
    plan = PlanSummary.require(sweep_dir, 'not a sweep directory, or the sweep did not start '
                                          'its trials')
    metric = plan.metric
    trials, sweep_state, started_at, ended_at = _replay_journal(
        (journal or JournalTail(sweep_dir)).read(), metric)
    for t in trials.values():
        t['restarts'] = [vars(r) for r in Restart.read_all(osp.join(sweep_dir, 'trials',
                                                                     t['trial']))]
        path = osp.join(sweep_dir, 'trials', t['trial'], 'mmseg', SKIPPED)
        t['skipped_checkpoints'] = read_jsonl(path) if osp.isfile(path) else []
    if sweep_state == 'RUNNING' and _driver_gone(plan):
        sweep_state = 'INTERRUPTED'  # driver killed: `orchestrator sweep SPACE --resume`
    if sweep_state == 'KILLED':  # by a stop signal (or a crash): --resume finishes it
        sweep_state = 'INTERRUPTED'
    if sweep_state == 'INTERRUPTED':
        for t in trials.values():
            if t['state'] == 'running':
                t['state'] = 'interrupted'
    remaining_s, waiting = [], 0
    for t in trials.values():
        if t['state'] == 'running':
            it, s_per_it = train_progress(log_dir(sweep_dir, t['trial']))
            t['iter'] = max(t['iter'], it)
            if s_per_it and t['max_iters']:
                t['eta_s'] = max(0, t['max_iters'] - t['iter']) * s_per_it
                remaining_s.append(t['eta_s'])
            else:
                waiting += 1  # for its crew or its trial group: like a pending one
        elif t['state'] == 'done' and t['max_iters'] and t['iter'] < t['max_iters']:
            t['state'] = 'stopped'  # ended early by the scheduler (ASHA)
    counts = {s: sum(t['state'] == s for t in trials.values()) for s in STATES}
    counts['pending'] = max(0, plan.total_trials - len(trials))
    eta = (_eta(list(trials.values()), counts, waiting, remaining_s, plan.concurrent)
           if sweep_state == 'RUNNING' else None)
    summary = dict(counts, total=plan.total_trials, sweep=sweep_state, eta_s=eta,
                   elapsed_s=((ended_at or time.time()) - started_at) if started_at else None,
                   metric=metric, searched=plan.searched)
    return list(trials.values()), summary
