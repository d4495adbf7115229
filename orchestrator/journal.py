"""Every MLflow write of a sweep is first a line in the sweep's journal, then an MLflow call.

A sweep runs for days; its tracking server may be restarted, and two sweeps may share one sqlite
store (which is then briefly locked). A write that fails stays in the journal,
``<sweep>/mlflow_journal.jsonl``, and the journal is replayed in order: at the next write, at the
end of the sweep, at the sweep's next start (``--resume``) and by ``orchestrator sync SWEEP``.

During a sweep, delivery runs in a thread of its own (``start_delivery``): Ray Tune's loop only
appends to the file, so a slow or hung server never holds up the trials (measured before: 10 s
per write with a hung server, which starved the trials of their result polls). One process
writes a sweep's journal at a time: the driver holds ``mlflow_journal.lock`` while it runs, and
``orchestrator sync`` refuses to deliver beside it.

Replaying is idempotent, so a record applied twice (a crash between the MLflow call and the
journal's applied-count update) still counts once: runs are looked up by tags (``sweep_uid``,
``trial_id``) before one is created, MLflow keeps one copy of a metric logged twice with the same
key, value, step and timestamp, params are rewritten with the same values, statuses set again.
"""
import contextlib
import fcntl
import json
import os
import os.path as osp
import sys
import threading
import time

from orchestrator.errors import DiskFull, disk_full
from orchestrator.files import append_whole
from orchestrator.records import TrackingMeta
from orchestrator.mlflow_store import (ExperimentRefused, get_or_create_experiment,
                                        without_credentials)

JOURNAL = 'mlflow_journal.jsonl'
LOCK = 'mlflow_journal.lock'
DELIVERY_S = 2.0  # how often the delivery thread retries while records are pending
# Fail fast when a server is down (MLflow's default is minutes of retries per call): the journal
# is the retry.
_HTTP_ENV = {'MLFLOW_HTTP_REQUEST_MAX_RETRIES': '0', 'MLFLOW_HTTP_REQUEST_TIMEOUT': '10'}


@contextlib.contextmanager
def _sqlite_init_lock(uri):
    """Two sweeps starting at once on a new sqlite store would both create and migrate its
    tables; measured: one of them fails ('duplicate column name: step', then an alembic
    version mismatch). A file lock beside the database lets one process at a time do it."""
    if not uri.startswith('sqlite:///'):
        yield
        return
    with open(uri[len('sqlite:///'):] + '.init.lock', 'a') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class JournalBusy(Exception):
    """Another process (a running sweep's driver) writes this journal."""


class WriterLock:
    """One process writes a sweep's journal at a time: the sweep's driver, or ``sync``. An
    exclusive flock on ``<sweep>/mlflow_journal.lock`` (released when the holder closes it or
    ends; a killed driver leaves nothing to clean up)."""

    def __init__(self):
        self._file = None

    def acquire(self, sweep_dir):
        """Hold the lock of ``sweep_dir`` (once; later calls keep it). JournalBusy when another
        process holds it."""
        if self._file is not None:
            return self
        f = open(osp.join(sweep_dir, LOCK), 'a+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or '?'
            f.close()
            raise JournalBusy(f'{sweep_dir}: its MLflow journal is being written by another '
                              f'process (pid {holder}: a running sweep delivers its own '
                              'writes)') from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def release(self):
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class TrackingJournal:
    _live = {}  # sweep dir -> the journal this process writes (Tune's restored callbacks too)

    def __init__(self, sweep_dir, tracking_uri, experiment, sweep_uid):
        self.sweep_dir = sweep_dir
        self.tracking_uri = tracking_uri  # credentials go to the environment, never to files
        self.experiment = experiment
        self.sweep_uid = sweep_uid
        self.path = osp.join(sweep_dir, JOURNAL)
        self.applied_path = self.path + '.applied'
        self._client = None
        self._experiment_id = None
        self._ids = {}
        self.last_error = None
        self._applied_here = 0  # records delivered, as this process counts them
        self._file_lock = threading.Lock()  # appending vs reading lines (short)
        self._deliver_lock = threading.Lock()  # one delivery at a time (may wait on MLflow)
        self._wake = self._stop = self._thread = None

    def register(self):
        """This object is the sweep's journal in this process: a callback that Ray Tune restores
        from its pickled state (``--resume``) writes through it, not through a stale copy."""
        TrackingJournal._live[self.sweep_dir] = self
        return self

    @classmethod
    def live(cls, sweep_dir):
        return cls._live.get(sweep_dir) or cls.open(sweep_dir).register()

    def start_delivery(self):
        """Deliver in a thread from now on: ``record`` only appends (and wakes the thread)."""
        self._wake, self._stop = threading.Event(), threading.Event()

        def deliver():
            while not self._stop.is_set():
                self._wake.wait(DELIVERY_S)
                self._wake.clear()
                self.flush()
            self.flush()  # what was recorded while the last delivery ran
        self._thread = threading.Thread(target=deliver, name='mlflow-journal', daemon=True)
        self._thread.start()

    def stop_delivery(self):
        """Stop the delivery thread after its last delivery attempt (a write in progress
        finishes first); what is still pending stays in the journal for the caller."""
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None

    @classmethod
    def open(cls, sweep_dir):
        """The journal of an existing sweep directory (for ``orchestrator sync``)."""
        meta = TrackingMeta.require(sweep_dir, 'not a sweep directory')
        return cls(sweep_dir, meta.tracking_uri, meta.experiment, meta.sweep_uid)

    def save_meta(self):
        TrackingMeta(self.tracking_uri, self.experiment, self.sweep_uid).write(self.sweep_dir)

    @property
    def tracking_uri(self):
        return self.__dict__.get('_tracking_uri') or self.__dict__.get('tracking_uri')

    @tracking_uri.setter
    def tracking_uri(self, uri):
        self._tracking_uri = without_credentials(uri)

    def __getstate__(self):  # no live client, thread, lock or open file in a pickle
        return dict(self.__dict__, _client=None, _file_lock=None, _deliver_lock=None,
                    _wake=None, _stop=None, _thread=None, _applied_here=0)

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._file_lock, self._deliver_lock = threading.Lock(), threading.Lock()

    @property
    def client(self):
        if self._client is None:
            if self.tracking_uri.startswith(('http://', 'https://')):
                for k, v in _HTTP_ENV.items():
                    os.environ.setdefault(k, v)
            from mlflow.tracking import MlflowClient
            with _sqlite_init_lock(self.tracking_uri):
                client = MlflowClient(self.tracking_uri)
                client.search_experiments(max_results=1)  # creates/migrates the tables now
            self._client = client
        return self._client

    # -- writing ---------------------------------------------------------------------------

    def record(self, op, **fields):
        """Append one write to the journal (on disk before anything else), then deliver the
        pending writes: here, returning how many are still pending, or, while the delivery
        thread runs, there (returning None at once)."""
        with self._file_lock:
            self._append([(op, fields)])
        if self._thread is not None:
            self._wake.set()
            return None
        return self.flush()

    def _append(self, records):
        # `at`: when it happened (for `orchestrator status`; MLflow does not see it)
        text = ''.join(json.dumps(dict(op=op, at=round(time.time(), 3), **fields), default=str)
                       + '\n' for op, fields in records)
        try:
            append_whole(self.path, text, sync=True)
        except OSError as e:
            if disk_full(e, self.path) is None:
                raise
            raise disk_full(e, self.path) from None

    def mark_killed(self, said, wait_s):
        """An interrupted sweep's close: the runs of the trials training here and the parent end
        KILLED with tag ``interrupted``, appended in one write and delivered like any record
        (after a second stop signal the process ends first: ``--resume`` delivers them then).
        Waits at most ``wait_s`` for the file (in a signal handler the interrupted code may hold
        it; -1: as long as it takes). Returns the trial ids, or None when nothing was written."""
        if not self._file_lock.acquire(timeout=wait_s):
            return None
        try:
            running = self._running(self._lines())
            records = [rec for tid in running + [None] for rec in (
                ('tags', dict(trial_id=tid, tags={'interrupted': said})),
                ('status', dict(trial_id=tid, status='KILLED')))]
            self._append([(op, {k: v for k, v in f.items() if v is not None})
                          for op, f in records])
            return running
        except (OSError, DiskFull, ValueError):  # unwritable, or a line torn by a crash
            return None
        finally:
            self._file_lock.release()

    def _lines(self):
        if not osp.isfile(self.path):
            return []
        with open(self.path) as f:
            return [line for line in f if line.strip()]

    def _pending_records(self, done):
        """Records after the first ``done`` (only those are parsed: this runs at every write)."""
        with self._file_lock:
            lines = self._lines()
        return [json.loads(line) for line in lines[done:]]

    def _applied(self):
        try:
            with open(self.applied_path) as f:
                saved = int(f.read().strip() or 0)
        except FileNotFoundError:
            saved = 0
        return max(saved, self._applied_here)

    def _set_applied(self, n):
        self._applied_here = n  # on a full disk the count lives here until it can be saved
        tmp = self.applied_path + '.tmp'
        try:
            with open(tmp, 'w') as f:
                f.write(str(n))
            os.replace(tmp, self.applied_path)
        except OSError as e:  # re-delivering a record later is harmless: each is idempotent
            if disk_full(e, self.applied_path) is None:
                raise

    def pending(self):
        return len(self._pending_records(self._applied()))

    def flush(self, attempts=1, wait_s=2.0):
        """Deliver pending records in order; stop at the first failure (kept for later).
        Returns how many are still pending."""
        with self._deliver_lock:
            return self._flush(attempts, wait_s)

    def _flush(self, attempts, wait_s):
        for attempt in range(attempts):
            done = self._applied()
            pending = self._pending_records(done)
            for i, rec in enumerate(pending):
                try:
                    self._apply(rec)
                except Exception as e:  # unreachable server, locked sqlite, ...: retried later
                    if self.last_error is None:
                        print(f'MLflow unavailable ({type(e).__name__}: '
                              f'{str(e).splitlines()[0][:200]}); results are kept in '
                              f'{self.path} and will be delivered later', file=sys.stderr)
                    self.last_error = e
                    self._client = None  # a fresh connection next time
                    break
                self._set_applied(done + i + 1)
            else:
                if self.last_error is not None:
                    print(f'MLflow reachable again: journal {self.path} delivered',
                          file=sys.stderr)
                self.last_error = None
                return 0
            if attempt + 1 < attempts:
                time.sleep(wait_s)
        return self.pending()

    # -- applying ----------------------------------------------------------------------------

    def warm(self):
        """Import MLflow and create the store and experiment now, so the first write is quick;
        an unreachable server is no error here (records wait in the journal), a store that
        refuses the sweep's experiment is (ExperimentRefused: no journal replay can fix it)."""
        try:
            self.experiment_id()
        except ExperimentRefused:
            raise
        except Exception:
            self._client = None

    def experiment_id(self):
        if self._experiment_id is None:
            self._experiment_id = get_or_create_experiment(
                self.client, self.experiment, osp.join(osp.dirname(self.sweep_dir), 'mlartifacts'))
        return self._experiment_id

    def _find(self, filter_string):
        runs = self.client.search_runs([self.experiment_id()], filter_string=filter_string,
                                       max_results=1)
        return runs[0].info.run_id if runs else None

    def unfinished_trials(self):
        """Trial ids of this sweep's children that MLflow shows RUNNING or KILLED (interrupted)."""
        runs = self.client.search_runs(
            [self.experiment_id()], max_results=10000,
            filter_string=f"tags.sweep_uid = '{self.sweep_uid}' and tags.role = 'trial' and "
                          "attributes.status IN ('RUNNING', 'KILLED')")
        return [r.data.tags['trial_id'] for r in runs]

    def running_here(self):
        """Trial ids whose last status in this journal is RUNNING: known without MLflow."""
        with self._file_lock:
            return self._running(self._lines())

    def last_statuses(self):
        """{trial id: the last status this journal gave its MLflow run}: known without MLflow."""
        with self._file_lock:
            return self._last_statuses(self._lines())

    @staticmethod
    def _last_statuses(lines):
        last = {}
        for rec in map(json.loads, lines):
            if rec['op'] == 'status' and rec.get('trial_id'):
                last[rec['trial_id']] = rec['status']
        return last

    @classmethod
    def _running(cls, lines):
        return [tid for tid, status in cls._last_statuses(lines).items() if status == 'RUNNING']

    def parent_id(self):
        if 'parent' not in self._ids:
            found = self._find(f"tags.sweep_uid = '{self.sweep_uid}' and tags.role = 'sweep'")
            if found is None:
                return None
            self._ids['parent'] = found
        return self._ids['parent']

    def child_id(self, trial_id):
        if trial_id not in self._ids:
            found = self._find(f"tags.sweep_uid = '{self.sweep_uid}' and "
                               f"tags.trial_id = '{trial_id}'")
            if found is None:
                return None
            self._ids[trial_id] = found
        return self._ids[trial_id]

    def _apply(self, rec):
        from mlflow.entities import Metric, Param, RunTag
        client, op = self.client, rec['op']
        if op == 'parent':
            run_id = self.parent_id()
            if run_id is None:
                run = client.create_run(self.experiment_id(), run_name=rec['name'],
                                        tags=dict(rec['tags'], sweep_uid=self.sweep_uid))
                self._ids['parent'] = run_id = run.info.run_id
            if rec.get('artifact') and osp.isfile(rec['artifact']):
                client.log_artifact(run_id, rec['artifact'])
        elif op == 'child':
            run_id = self.child_id(rec['trial_id'])
            if run_id is None:
                tags = dict(rec['tags'], sweep_uid=self.sweep_uid,
                            **{'mlflow.parentRunId': self.parent_id()})
                run = client.create_run(self.experiment_id(), run_name=rec['name'], tags=tags)
                self._ids[rec['trial_id']] = run_id = run.info.run_id
            client.log_batch(run_id, params=[Param(k, v) for k, v in rec['params'].items()])
        elif op == 'metrics':
            client.log_batch(self.child_id(rec['trial_id']), metrics=[
                Metric(k, v, rec['ts'], rec['step']) for k, v in rec['metrics'].items()])
        elif op == 'tags':
            run_id = self.child_id(rec['trial_id']) if rec.get('trial_id') else self.parent_id()
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec['tags'].items()])
        elif op == 'artifacts':
            run_id = self.child_id(rec['trial_id'])
            for path in rec['paths']:
                if osp.isfile(path):
                    client.log_artifact(run_id, path)
        elif op == 'dataset':
            from mlflow.entities import Dataset, DatasetInput, InputTag
            dataset = Dataset(name=rec['name'], digest=rec['digest'], source_type='local',
                              source=json.dumps({'uri': rec['source']}),
                              profile=json.dumps(rec['profile']))
            client.log_inputs(self.child_id(rec['trial_id']), datasets=[DatasetInput(
                dataset, tags=[InputTag('mlflow.data.context', 'train')])])
        elif op == 'status':
            run_id = self.child_id(rec['trial_id']) if rec.get('trial_id') else self.parent_id()
            if rec['status'] == 'RUNNING':
                client.update_run(run_id, 'RUNNING')
            else:
                client.set_terminated(run_id, rec['status'])
        else:
            raise ValueError(f'{self.path}: unknown journal record {rec!r}')
