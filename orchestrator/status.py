"""Where a sweep stands, while it runs and after: each trial's state, iteration, latest metric and
ETA, read from files the sweep already writes (no MLflow, no Ray needed, so it also works while
the tracking server is down):

- ``plan.json``: how many trials the sweep will run and how many run at once (the driver);
- ``mlflow_journal.jsonl``: every trial start, evaluation, failure reason and end, timestamped
  (orchestrator/journal.py);
- ``trials/<id>/mmseg/*.log.json``: mmseg's training log, for the iteration and seconds per
  iteration between evaluations.

``orchestrator status SWEEP`` prints it; ``LiveStatus`` shows the same during ``orchestrator
sweep``: redrawn in place on a terminal, one line per change otherwise.
"""
import glob
import json
import os
import os.path as osp
import socket
import sys
import time

from ray.tune import Callback

from orchestrator.files import read_jsonl, write_json_atomic
from orchestrator.journal import JOURNAL
from orchestrator.report import format_table

PLAN = 'plan.json'
RESTARTS = 'restarts.jsonl'  # per trial, written by trial.py when its workers were lost
STATES = ('pending', 'running', 'done', 'stopped', 'failed', 'interrupted')


def write_plan(sweep_dir, total_trials, concurrent, metric, searched):
    """What the status needs from the driver: the trial count, concurrency, the searched keys
    (shown per trial), and who runs it."""
    write_json_atomic(osp.join(sweep_dir, PLAN), dict(
        total_trials=total_trials, concurrent=concurrent, metric=metric, searched=searched,
        driver_pid=os.getpid(), driver_host=socket.gethostname()))


def _driver_gone(plan):
    """True when the sweep's driver ran on this host and its process is gone (killed)."""
    if plan.get('driver_host') != socket.gethostname():
        return False  # cannot tell from here
    try:
        os.kill(plan['driver_pid'], 0)
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
    try:
        with open(osp.join(sweep_dir, 'trials', trial, 'placement.json')) as f:
            group = json.load(f).get('group')
    except (OSError, ValueError, AttributeError):
        group = None
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


def sweep_status(sweep_dir, journal=None):
    """(trials, summary): one dict per started trial and counts of every state plus ETA.
    ``journal``: a JournalTail to reuse between calls."""
    with open(osp.join(sweep_dir, PLAN)) as f:
        plan = json.load(f)
    metric = plan['metric']
    trials, sweep_state, started_at, ended_at = {}, 'RUNNING', None, None
    for rec in (journal or JournalTail(sweep_dir)).read():
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
                t['state'] = {'RUNNING': 'running', 'FINISHED': 'done'}.get(rec['status'],
                                                                            'failed')
    for t in trials.values():
        path = osp.join(sweep_dir, 'trials', t['trial'], RESTARTS)
        t['restarts'] = read_jsonl(path) if osp.isfile(path) else []
    if sweep_state == 'RUNNING' and _driver_gone(plan):
        sweep_state = 'INTERRUPTED'  # driver killed: `orchestrator sweep SPACE --resume`
    if sweep_state in ('INTERRUPTED', 'KILLED'):
        for t in trials.values():
            if t['state'] == 'running':
                t['state'] = 'interrupted'
    now = time.time()
    remaining_s, waiting = [], 0
    for t in trials.values():
        if t['state'] == 'running':
            it, s_per_it = train_progress(log_dir(sweep_dir, t['trial']))
            t['iter'] = max(t['iter'], it)
            if s_per_it and t['max_iters']:
                t['eta_s'] = max(0, t['max_iters'] - t['iter']) * s_per_it
                remaining_s.append(t['eta_s'])
            else:
                waiting += 1  # for its worker group or its trial group: like a pending one
        elif t['state'] == 'done' and t['max_iters'] and t['iter'] < t['max_iters']:
            t['state'] = 'stopped'  # ended early by the scheduler (ASHA)
    counts = {s: sum(t['state'] == s for t in trials.values()) for s in STATES}
    counts['pending'] = max(0, plan['total_trials'] - len(trials))
    durations = [t['ended'] - t['started'] for t in trials.values()
                 if t['state'] == 'done' and t['ended'] and t['started']]
    eta = None
    queued = counts['pending'] + waiting
    per_trial = (sum(durations) / len(durations)) if durations else None
    if sweep_state == 'RUNNING' and (queued == 0 or per_trial is not None):
        work = sum(remaining_s) + queued * (per_trial or 0)
        eta = work / max(1, min(plan['concurrent'], counts['running'] + counts['pending']))
    summary = dict(counts, total=plan['total_trials'], sweep=sweep_state, eta_s=eta,
                   elapsed_s=((ended_at or now) - started_at) if started_at else None,
                   metric=metric, searched=plan.get('searched', []))
    return list(trials.values()), summary


def _dur(seconds):
    if seconds is None:
        return '?'
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
        f'{seconds // 60}m{seconds % 60:02d}s'


def summary_line(summary):
    s = summary
    return (f'{s["sweep"].lower()}: {s["done"] + s["stopped"]}/{s["total"]} done'
            + (f' ({s["stopped"]} stopped early)' if s['stopped'] else '')
            + f', {s["running"]} running, {s["pending"]} pending, {s["failed"]} failed'
            + (f', {s["interrupted"]} interrupted' if s['interrupted'] else '')
            + (f'; elapsed {_dur(s["elapsed_s"])}' if s['elapsed_s'] is not None else '')
            + (f', ETA {_dur(s["eta_s"])}' if s['eta_s'] is not None else ''))


def format_status(trials, summary):
    metric, searched = summary['metric'], summary['searched']
    rows = []
    for t in sorted(trials, key=lambda t: t['trial']):
        progress = f'{t["iter"]}/{t["max_iters"] or "?"}'
        eta = _dur(t['eta_s']) if t.get('eta_s') is not None else ''
        rows.append([t['trial'], *[t['params'].get(k, '') for k in searched], t['state'],
                     progress, '' if t['metric'] is None else f'{t["metric"]:.4f}', eta,
                     t['reason'][:80]])
    header = ['trial', *[k.rsplit('.', 1)[-1] if k.startswith('model.') else k
                         for k in searched], 'state', 'iter', metric, 'ETA', 'reason']
    table = format_table(header, rows) if rows else ''
    restarts = ''.join(line + '\n' for line in restart_lines(trials))
    return (table + '\n' if table else '') + restarts + summary_line(summary)


def restart_lines(trials):
    """One line per restart of a trial whose worker was lost (trial.py records them)."""
    return [f'trial {t["trial"]}: worker lost at iteration {r["lost_at"]}; restart '
            f'{r["restart"]} of {r["of"]} from iteration {r["resume_from"]}'
            for t in sorted(trials, key=lambda t: t['trial']) for r in t.get('restarts', [])]


class LiveStatus(Callback):
    """The status during ``orchestrator sweep``: on a terminal the table is redrawn in place
    every ``interval_s``; elsewhere (CI logs, ``| tee``) one summary line when a count changes."""

    def __init__(self, sweep_dir, out=None, interval_s=2.0):
        self.sweep_dir, self.out, self.interval_s = sweep_dir, out or sys.stdout, interval_s
        self._last, self._last_line, self._drawn = 0.0, None, 0
        self._journal = JournalTail(sweep_dir)
        self._restarts_shown = set()

    def __getstate__(self):  # Tune pickles its callbacks with the experiment (for --resume)
        return dict(self.__dict__, out=None, _drawn=0, _journal=JournalTail(self.sweep_dir))

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.out = self.out or sys.stdout

    def _tty(self):
        return hasattr(self.out, 'isatty') and self.out.isatty() and \
            os.environ.get('TERM', 'dumb') != 'dumb'

    def show(self, force=False, final=False):
        if not force and time.time() - self._last < self.interval_s:
            return
        if final:  # printed below whatever Tune logged at its end, not over it
            self._drawn = 0
        self._last = time.time()
        try:
            trials, summary = sweep_status(self.sweep_dir, self._journal)
        except (OSError, ValueError, KeyError):
            return
        if self._tty():
            text = format_status(trials, summary)
            # move up over the previous drawing and clear it
            prefix = f'\x1b[{self._drawn}F\x1b[J' if self._drawn else ''
            self.out.write(prefix + text + '\n')
            self._drawn = text.count('\n') + 1
        else:
            for line in restart_lines(trials):
                if line not in self._restarts_shown:
                    self._restarts_shown.add(line)
                    self.out.write(f'[{time.strftime("%H:%M:%S")}] {line}\n')
            line = summary_line(dict(summary, eta_s=None, elapsed_s=None))
            if line != self._last_line:
                self._last_line = line
                self.out.write(f'[{time.strftime("%H:%M:%S")}] {summary_line(summary)}\n')
        self.out.flush()

    def on_step_end(self, iteration, trials, **info):
        self.show()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.show(force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.show(force=True)
