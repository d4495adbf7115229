"""Run a sweep, as ``run_sweep`` (last in this file) reads: prepare the sweep directory, open
its MLflow journal, start the crews, open the parent run, build the Tuner (search algorithm,
ASHA, concurrency cap; or restore it), fit, print the outcome. Also ``sync`` for journaled
writes."""
import contextlib
import functools
import glob
import json
import logging
import os
import os.path as osp
import shlex
import shutil
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from orchestrator import cluster, concurrency, fine_tuning, grouping, val_cache
from orchestrator import plan as planning
from orchestrator.errors import ConfigError, DiskFull, disk_full, remedy
from orchestrator.files import append_whole
from orchestrator.interrupts import StopSignals, SweepInterrupted
from orchestrator.preflight import check_data_paths, check_weights_path
from orchestrator.records import GroupRecord, PlanSummary, TrackingMeta
from orchestrator.spec import check_sweep_name, load_spec
from orchestrator.sweep_plan import make_plan
from orchestrator.tables import format_table, ranked_results

EXIT_TRACKING_PENDING = 3  # every trial ran, but some MLflow writes wait in the journal


NODES_CHECK_S = 10.0  # how often the driver looks for nodes that joined (_grow)
HALT_DELAY_ENV = 'ORCHESTRATOR_TEST_HALT_DELAY_S'  # tests only: Tune stops the trials this
# many seconds after the groups halted (a driver slow to stop them, as on a loaded head node)


def _search_alg(spec):
    if spec.search.algorithm == 'optuna':
        from ray.tune.search.optuna import OptunaSearch
        return OptunaSearch(seed=spec.search.seed)
    return None  # Tune's BasicVariantGenerator: grids crossed, distributions sampled


def _scheduler(spec, full_iters):
    """ASHA per training schedule (asha.py): trials compete with trials of their own schedule."""
    if not spec.early_stopping:
        return None
    from orchestrator.asha import SchedulePerBracket
    return SchedulePerBracket(full_iters, **spec.early_stopping.asha.model_dump())


def _check_data(plan):
    """Missing data or backbone weights fail now, with the path, before Ray or MLflow start (a
    trial's config: the data root and weight file are the same in every trial)."""
    from orchestrator.trial_config import trial_config
    spec = plan.spec
    cfg = trial_config(plan.base, plan.base_filename, plan.trials[0])
    check_data_paths(cfg, spec.source)
    check_weights_path(cfg, spec.source)


def _interrupt(signum, frame):
    """SIGTERM before the sweep's own handlers (StopSignals, installed once Ray is up): an
    interruption, as Ctrl-C is then, not Python's default end without a word."""
    raise SweepInterrupted(signum)


class _NotStarted(Exception):
    """A stop signal before the sweep started anything (while it checked, or Ray connected)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class _SweepLog(logging.Handler):
    """Lines for <sweep>/ray.log, held until the sweep's directory exists (an impossible plan on
    a cluster is refused before anything is written); also a stream for redirect_stderr."""

    def __init__(self, path):
        super().__init__()
        self.path, self.held = path, []
        self.on_full = lambda reason: None  # StopSignals.request, once the sweep has them
        self.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))

    def emit(self, record):  # never raises: Ray logs from inside its own calls
        try:
            self.write(self.format(record) + '\n')
        except Exception:  # the line stays held for the next write
            pass

    def write(self, text):
        self.held.append(text)
        self.flush()

    def fileno(self):  # ray.init enables faulthandler on it: a crash shows on the terminal
        return sys.__stderr__.fileno()

    def flush(self):
        if self.held and osp.isdir(osp.dirname(self.path)):
            try:
                append_whole(self.path, ''.join(self.held))
            except OSError as e:  # a full disk: the lines wait here, the sweep stops
                if disk_full(e, self.path) is None:
                    raise
                self.on_full(str(disk_full(e, self.path)))
                return
            self.held = []


def _init_ray(sweep_dir, **kwargs):
    """ray.init with Ray's and Tune's own messages (Tune's experiment box and TensorBoard hint,
    Ray's token and worker warnings, its INFO lines) in <sweep>/ray.log, not on the terminal:
    our progress lines and final table stay there. Returns the log's handler."""
    import ray
    os.environ['RAY_AIR_NEW_OUTPUT'] = '0'  # the legacy reporter is silent at verbose=0; the
    # new one prints its box and hint whatever the verbosity
    sweep_log = _SweepLog(osp.join(sweep_dir, 'ray.log'))
    try:
        with contextlib.redirect_stderr(sweep_log):  # ray.init drops the handlers set before it
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **kwargs)
        signal.signal(signal.SIGTERM, _interrupt)  # not Ray's sys.exit, until StopSignals
    except SystemExit as e:  # SIGTERM while Ray connects: its handler calls sys.exit(15)
        if e.code != signal.SIGTERM:
            raise
        raise SweepInterrupted(signal.SIGTERM) from None
    logger = logging.getLogger('ray')
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(sweep_log)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return sweep_log


def _close_lost_trials(journal, trial_ids):
    """A trial that started after Tune's last experiment checkpoint is unknown to the resumed
    Tune, which runs its configuration again as a new trial (Optuna, restored, proposes it
    again): its child run, still RUNNING (or KILLED by the interruption), is marked KILLED and
    says why."""
    journal.flush(attempts=3)
    try:
        running = journal.unfinished_trials()
    except Exception:  # MLflow unreachable: the runs stay as they are
        return
    for trial_id in running:
        if trial_id not in trial_ids:
            journal.record('tags', trial_id=trial_id, tags={'lost_on_resume': (
                'started after the interrupted sweep\'s last Tune checkpoint; the resumed '
                'sweep ran its configuration again as another trial')})
            journal.record('status', trial_id=trial_id, status='KILLED')


def _dry_run_plan(spec, address):
    """The packing on the cluster at ``address``, or on this machine (where a plan that does not
    fit is only reported: a dry run plans for a bigger cluster anywhere)."""
    if not address:
        try:
            return planning.resource_plan(spec, cluster.local_nodes())[1]
        except ConfigError as e:
            return [f'on this machine: {str(e).split(": resources: ", 1)[-1]}']
    import ray
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        return planning.resource_plan(spec, cluster.cluster_nodes())[1]
    finally:
        ray.shutdown()


def _check_resumable(spec, sweep_dir, experiment_path):
    """--resume needs the sweep's Tune state and the same search space it started with."""
    if not osp.isfile(osp.join(experiment_path, 'tuner.pkl')):
        raise ConfigError(f'{spec.source}: --resume: no sweep to resume in {sweep_dir} '
                          '(run it once without --resume)')
    with open(spec.source, 'rb') as now, open(osp.join(sweep_dir, 'space.yaml'), 'rb') as then:
        if now.read() != then.read():
            raise ConfigError(f'{spec.source}: --resume: the file differs from the one the sweep '
                              f'started with ({osp.join(sweep_dir, "space.yaml")})')
    if 'version' not in PlanSummary.raw(sweep_dir):
        # Tune's state of an earlier program pickles functions this one no longer has
        raise ConfigError(f'{spec.source}: --resume: {sweep_dir} was started by an orchestrator '
                          f'before the SweepPlan ({PlanSummary.NAME} without a version): finish '
                          'it with that version, or start it again under another --name')


def _clear_delivered_journal(spec, sweep_dir):
    """A new run of a sweep name starts a new journal, but never over undelivered results."""
    from orchestrator.journal import JOURNAL, TrackingJournal
    if not osp.isfile(osp.join(sweep_dir, TrackingMeta.NAME)):
        return
    old = TrackingJournal.open(sweep_dir)
    if old.pending():
        raise ConfigError(f'{spec.source}: {old.path} holds {old.pending()} MLflow write(s) of an '
                          f'earlier run not yet delivered: `orchestrator sync {sweep_dir}` first '
                          '(or --resume that run)')
    for name in (JOURNAL, JOURNAL + '.applied', TrackingMeta.NAME):
        if osp.exists(osp.join(sweep_dir, name)):
            os.remove(osp.join(sweep_dir, name))


def sync(sweep_dir, out=None):
    """Deliver a sweep's journaled MLflow writes (``orchestrator sync``)."""
    from orchestrator.journal import JournalBusy, TrackingJournal, WriterLock
    out = out or sys.stdout
    if not osp.isfile(osp.join(sweep_dir, TrackingMeta.NAME)):
        raise ConfigError(f'{sweep_dir}: not a sweep directory (no {TrackingMeta.NAME})')
    journal = TrackingJournal.open(sweep_dir)
    with WriterLock() as writer:
        try:
            writer.acquire(sweep_dir)
        except JournalBusy as e:
            raise ConfigError(str(e)) from None
        journal.warm()  # a store that refuses the experiment is an answer, not an outage
        before = journal.pending()
        left = journal.flush(attempts=3)
    print(f'{journal.path}: {before - left} write(s) delivered to {journal.tracking_uri}, '
          f'{left} pending', file=out)
    return 0 if left == 0 else EXIT_TRACKING_PENDING


@dataclass
class _Sweep:
    """One run of ``orchestrator sweep``, filled in by its steps in order."""
    spec: object
    base_cfg: object  # the mmcv Config (its file name travels to the workers)
    address: str  # an existing Ray cluster, or None: a local one
    resume: bool
    out: object
    sweep_dir: str
    experiment_path: str  # Tune's experiment folder
    plan: object  # sweep_plan.SweepPlan: what every later step reads
    journal: object = None
    max_concurrent: int = None  # crews: how many trials (or trial groups) train at once
    plan_lines: list = None
    pool_name: str = None
    pool: object = None  # the WorkerPool's handle: the actor lives as long as it is held
    nodes_seen: set = field(default_factory=set)  # node IDs planned on or refused (_grow)
    nodes_usable: set = field(default_factory=set)  # those planned on
    started: bool = False  # the parent run is RUNNING: an interruption marks it KILLED
    marked: bool = True  # after an interruption: its runs' KILLED status is in the journal
    closed: tuple = None  # after the first stop's close: (trials marked, marked) for a second
    log: object = None  # the _SweepLog of <sweep>/ray.log


def _print_dry_run(spec, base_cfg, address, out, seconds_per_iteration=None,
                   backbone_seconds=None, gpu_memory_gib=None, said=None):
    """The trials, their derived values (``said``: where the fraction came from), early
    stopping, the trial groups (for this machine's GPU, or one of ``gpu_memory_gib``), the
    estimate and the packing; nothing started."""
    gpu = (gpu_memory_gib * 1024 ** 3 if gpu_memory_gib else
           cluster.local_gpu_memory() if spec.resources.gpus_per_worker else None)
    plan = make_plan(spec, base_cfg).size_groups(gpu)
    header, rows, budget = planning.dry_run_table(plan)
    print(format_table(header, rows), file=out)
    if said:
        print(said, file=out)
    print(budget, file=out)
    if spec.early_stopping:
        from orchestrator import asha
        print('\n'.join(asha.dry_run_lines(spec, plan.schedules, plan.full_data_iterations)),
              file=out)
    print('\n'.join(grouping.dry_run_lines(plan)), file=out)
    for line in fine_tuning.memory_lines(spec, plan.base, plan.rows):
        print(line, file=out)
    print('\n'.join(val_cache.dry_run_lines(spec, plan.base, plan.rows,
                                            osp.join(spec.output, spec.name))), file=out)
    if seconds_per_iteration:
        print('\n'.join(planning.estimate_lines(
            spec, plan.schedules, [members for _, members in plan.groups.shown],
            seconds_per_iteration, backbone_seconds)), file=out)
    print('\n'.join(_dry_run_plan(spec, address)), file=out)
    return 0


def _seconds_from_env(name):
    """A crew duration a test shortens (ORCHESTRATOR_ABANDONED_AFTER_S for
    train_worker.ABANDONED_AFTER_S, ORCHESTRATOR_ROOM_WAIT_S for crew.ROOM_WAIT_S); None: theirs."""
    value = os.environ.get(name)
    return float(value) if value else None


def _lock_journal(spec, writer, sweep_dir):
    """This driver is the sweep directory's one journal writer (not beside a running sweep of
    the same directory, nor beside `orchestrator sync`)."""
    from orchestrator.journal import JournalBusy
    try:
        writer.acquire(sweep_dir)
    except JournalBusy as e:
        raise ConfigError(f'{spec.source}: {e}') from None


def _prepare_sweep_dir(spec, base_cfg, address, resume, out, writer):
    """Everything that can refuse the sweep, before Ray starts: data, the packing on this
    machine, --resume's state, the journal lock; then the sweep's directory with its space file.
    On an existing cluster Ray is attached here (the plan and the storage check need it)."""
    if spec.generate_data:
        from mmseg_custom.datasets.synthetic import generate_ade_layout
        generate_ade_layout(spec.data_root, **spec.generate_data.model_dump(exclude_none=True))
    said = planning.settle_base_fraction(spec, planning.plain(base_cfg))
    if said:
        print(said, file=out)
    plan = make_plan(spec, base_cfg)
    _check_data(plan)
    if not address:  # fail fast before starting Ray
        planning.resource_plan(spec, cluster.local_nodes())
    sweep_dir = osp.join(osp.abspath(spec.output), spec.name)
    sweep = _Sweep(spec, base_cfg, address, resume, out, sweep_dir,
                   experiment_path=osp.join(sweep_dir, 'tune', spec.name), plan=plan)
    if resume:
        _check_resumable(spec, sweep_dir, sweep.experiment_path)
    if osp.isdir(sweep_dir):  # before anything in it changes: not beside a running sweep
        _lock_journal(spec, writer, sweep_dir)
    if resume:
        from orchestrator.tune_state import restore_torn
        for name in restore_torn(sweep.experiment_path):
            print(f'{osp.join(sweep.experiment_path, name)}: torn (a full disk or a kill while '
                  'Tune wrote it); restored from its last whole copy', file=out)
    if not resume:
        _clear_delivered_journal(spec, sweep_dir)
    # Inherited by a local cluster's processes; sent as the job's runtime_env to an existing one
    # (a runtime_env on a local cluster would make every actor start a fresh worker process).
    env_vars = {'OMP_NUM_THREADS': str(max(1, int(spec.resources.cpus_per_worker)))}
    os.environ.update(env_vars)
    # Tune saves its experiment (trials and searcher state) every TUNE_GLOBAL_CHECKPOINT_S;
    # its 'auto' period can leave the trials of the last tens of seconds out, and a --resume then
    # runs them again (Optuna re-proposes them). Every second instead: a few KB per save.
    os.environ.setdefault('TUNE_GLOBAL_CHECKPOINT_S', '1')
    if address:
        sweep.log = sweep_log = _attach_cluster(sweep, env_vars)
    if not resume:
        os.makedirs(sweep_dir, exist_ok=True)
        shutil.copy(spec.source, osp.join(sweep_dir, 'space.yaml'))
    if address:
        sweep_log.flush()  # what ray.init said, now that the directory exists
    return sweep


class _Held:
    def __init__(self, file):
        self.file = file

    def text(self):
        self.file.seek(0)
        return self.file.read().decode(errors='replace')


@contextlib.contextmanager
def _native_stderr_held():
    """File descriptor 2 into a temporary file while attaching to a cluster (no process of ours
    is started then to inherit it): what Ray's C++ client prints there goes to ray.log."""
    import tempfile
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield _Held(f)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _attach_cluster(sweep, env_vars):
    """An existing cluster: plan on its nodes and check its storage before any work."""
    import ray
    cluster.check_reachable(sweep.address)
    with _native_stderr_held() as held:  # Ray's C++ retries, one warning a second, on fd 2
        try:
            sweep_log = _init_ray(sweep.sweep_dir, address=sweep.address,
                                  runtime_env={'env_vars': env_vars})
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:  # no token
            # (Ray's AuthenticationError), another Ray version (RuntimeError)
            ray.shutdown()
            raise cluster.refused(sweep.address, e) from None
        sweep_log.write(held.text())
    try:
        nodes = cluster.cluster_nodes()
        sweep.nodes_seen.update(n['node_id'] for n in nodes)
        planning.resource_plan(sweep.spec, nodes)  # an impossible plan: refused before any file
        nodes = cluster.check_shared_storage(osp.dirname(sweep.sweep_dir), nodes,
                                             sweep.spec.source)  # less nodes that just left
        sweep.nodes_usable.update(n['node_id'] for n in nodes)
        sweep.max_concurrent, sweep.plan_lines = planning.resource_plan(sweep.spec, nodes)
    except BaseException:
        ray.shutdown()
        raise
    return sweep_log


def _open_journal(sweep, tracking_uri, writer):
    """The sweep's MLflow journal: the same parent and child runs on --resume (and the same store
    unless told otherwise), a new one otherwise."""
    from orchestrator.journal import TrackingJournal
    from orchestrator.mlflow_store import default_tracking_uri
    spec = sweep.spec
    if sweep.resume:
        journal = TrackingJournal.open(sweep.sweep_dir)
        journal.tracking_uri = tracking_uri or journal.tracking_uri
    else:
        journal = TrackingJournal(
            sweep.sweep_dir, tracking_uri or spec.tracking.uri or
            default_tracking_uri(osp.dirname(sweep.sweep_dir)), spec.experiment, uuid.uuid4().hex)
    _lock_journal(spec, writer, sweep.sweep_dir)
    journal.register().save_meta()
    sweep.journal = journal


def _start_crews(sweep, signals):
    """Ray (local), the packing, the trial groups, and the WorkerPool with its crews, started at
    once: their workers import mmseg (the start-up's longest step) while MLflow and Tune get
    ready. The stop signals are ours from here (ray.init installs its own)."""
    from orchestrator.crew import ON_HEAD, WorkerPool
    spec = sweep.spec
    if not sweep.address:  # 'local': a new cluster, never the one ray_current_cluster names
        sweep.log = _init_ray(sweep.sweep_dir, address='local')  # (a user's, or a dead one)
        nodes = cluster.cluster_nodes()
        sweep.nodes_seen.update(n['node_id'] for n in nodes)
        sweep.nodes_usable.update(n['node_id'] for n in nodes)
        sweep.max_concurrent, sweep.plan_lines = planning.resource_plan(spec, nodes)
    signals.install()
    sweep.log.on_full = signals.request
    print('\n'.join(sweep.plan_lines), file=sweep.out, flush=True)
    # a trial group's heads share the GPU's memory left beside the frozen model
    gpu = (cluster.gpu_memory() if spec.resources.gpus_per_worker and spec.grouping.enabled
           and spec.grouping.memory_gb is None else None)
    chunks, group_runs = sweep.plan.size_groups(gpu).groups.chunks, {}
    if sweep.resume and chunks:
        chunks, group_runs = _groups_to_continue(sweep, chunks)
    sweep.pool_name = f'orchestrator-pool-{spec.name}-{os.getpid()}'
    sweep.pool = WorkerPool.options(name=sweep.pool_name, resources=ON_HEAD).remote(
        sweep.max_concurrent, spec.resources.workers_per_trial, planning.worker_bundle(spec),
        trial_groups=chunks, group_runs=group_runs,
        room_wait_s=_seconds_from_env('ORCHESTRATOR_ROOM_WAIT_S'),
        room_timeout_s=spec.fault_tolerance.room_timeout_s)


def _groups_to_continue(sweep, chunks):
    """On --resume: the trial groups that ran (their ``group.json``), each continued from its
    members' checkpoints by the members the journal does not show ended (crew.rejoin; in halves
    if it ran out of GPU memory), and the chunks not yet started, which the trials that never
    ran form as planned (the pool caps them where a group of their kind ran out)."""
    statuses = sweep.journal.last_statuses()
    group_runs, started = {}, {}
    for path in glob.glob(osp.join(sweep.sweep_dir, 'groups', '*', GroupRecord.NAME)):
        group = GroupRecord.read(osp.dirname(path))
        if group is None:  # unreadable: its members continue alone
            continue
        ended = [t for t in group.members if statuses.get(t) not in ('RUNNING', 'KILLED')]
        record = group.as_dict()
        group_runs[osp.basename(osp.dirname(path))] = dict(record, left=ended)
        if 'parent' not in record:  # a half of a group that ran out of memory: no chunk of its own
            started[record['key']] = started.get(record['key'], 0) + 1
    chunks = {key: sizes[started.get(key, 0):] for key, sizes in chunks.items()}
    going_on = sum(len(r['members']) > len(r['left']) and not r.get('out_of_memory')
                   for r in group_runs.values())
    print(f'trial groups: {going_on} continue from their checkpoints', file=sweep.out)
    return {key: sizes for key, sizes in chunks.items() if sizes}, group_runs


def _open_parent_run(sweep, warming):
    """The parent MLflow run, with what ``report`` and ``best`` need to read the children back;
    from here on Tune's loop only appends to the journal, which a thread delivers."""
    from orchestrator.tracking import parent_tags
    spec, journal = sweep.spec, sweep.journal
    try:  # the journal is used by one thread at a time
        warming.result()
    except ConfigError as e:  # the store refuses the experiment: before any training
        raise ConfigError(f'{spec.source}: {e}') from None
    tags = dict(parent_tags(spec.name), searched_params=json.dumps(sweep.plan.searched),
                metric=spec.search.metric, mode=spec.search.mode)
    if spec.references:  # published numbers the report draws (search_spaces/README.md)
        tags['references'] = json.dumps(spec.references)
    journal.record('parent', name=spec.name, tags=tags,
                   artifact=osp.join(sweep.sweep_dir, 'space.yaml'))
    journal.record('status', status='RUNNING')
    journal.start_delivery()
    sweep.started = True


def _tracking_callback(sweep):
    """The Tune callback that writes each trial's MLflow child: its params are the searched
    values and what they derive (iterations, warmup, channels)."""
    from orchestrator.tracking import MLflowTrialCallback
    from orchestrator.trial import trial_dir
    # Tune pickles its callbacks with the experiment: the function captures the plan (plain
    # data; a resumed sweep's restored callback reads its own copy, the same rows)
    spec, plan, keys = sweep.spec, sweep.plan, sweep.plan.searched
    sweep_dir = sweep.sweep_dir

    def params_of(config):
        trial = plan.trial_for(config)
        return {**{k: trial.values[k] for k in keys}, **trial.derived}

    return MLflowTrialCallback(
        sweep.journal, spec.name, params_of, lambda tid: trial_dir(sweep_dir, tid),
        data_name=osp.basename(osp.normpath(spec.data_root or 'train')), searched=keys)


def _live_trials(sweep, crews):
    """How many trials Tune keeps alive for ``crews`` crews: a trial group starts when all its
    members have joined, and they wait, idle, for their crew (grouping.live_trial_bound).
    Also the largest group."""
    plan = sweep.plan
    if not plan.groups.chunks:
        return crews, 1
    return grouping.live_trial_bound(sweep.spec, plan.trials, plan.groups.chunks, crews)


def _show_groups(sweep):
    """The trial groups as planned, and how many trials Tune keeps alive for them."""
    live_trials, largest = _live_trials(sweep, sweep.max_concurrent)
    if sweep.plan.groups.chunks:
        print('\n'.join(grouping.dry_run_lines(sweep.plan)), file=sweep.out)
        print(f'trial groups: at most {live_trials} trials alive at once '
              f'({sweep.max_concurrent} crew(s) x up to {largest} heads per group)',
              file=sweep.out)
    return live_trials


def _grow(sweep, going=lambda: True):
    """Crews for nodes that joined since the plan (Tune's limit raised with them): the lines to
    show, or None. A node ID not listed before is checked (storage_check: one that does not see
    the output is not counted, one listed but gone neither), then the sweep is planned on the
    nodes counted so far that are still listed. A node lost meanwhile changes nothing here: its
    crew waits for room (a node that joins later places it, and adds no crew of its own).
    Nothing grows once ``going()`` is false (the sweep ends or stops)."""
    import ray
    nodes = cluster.cluster_nodes()
    joined = [n for n in nodes if n['node_id'] not in sweep.nodes_seen]
    if not joined:
        return None
    output = osp.dirname(sweep.sweep_dir)
    present, blind = cluster.storage_check(output, joined)
    usable = {n['node_id'] for n in present} | sweep.nodes_usable
    try:
        crews, _ = planning.resource_plan(sweep.spec, [n for n in nodes
                                                       if n['node_id'] in usable])
    except ConfigError:  # no node can hold a worker just now: the pool waits for room
        crews = 0
    lines = [f'node {n["name"]} joined the cluster but does not see {output} as this driver '
             'does: not counted in the plan (mount the shared output there, then start it '
             'again)' for n in blind]
    if not going():
        return None
    if crews > sweep.max_concurrent:  # raised (an error: all of it again at the next check)
        ray.get(sweep.pool.grow_to.remote(crews), timeout=30)
        lines.append(f'node {", ".join(n["name"] for n in present)} joined the cluster: '
                     f'{crews} crews, {crews} trials (or trial groups) train at once, '
                     f'{sweep.max_concurrent} before')
        sweep.max_concurrent = crews
        concurrency.set_limit(_live_trials(sweep, crews)[0])
    sweep.nodes_seen.update(n['node_id'] for n in joined)
    sweep.nodes_usable = usable
    return '\n'.join(lines) or None


def _halt_groups(sweep):
    """A first stop: the trial groups' heads stop together, before Tune stops their trials one
    by one (crew.halt_groups says why)."""
    import ray
    with contextlib.suppress(Exception):  # a pool gone or busy: the trials stop as they die
        ray.get(sweep.pool.halt_groups.remote(), timeout=8)
    with contextlib.suppress(ValueError):  # a test's setting, never a user's
        time.sleep(float(os.environ.get(HALT_DELAY_ENV, 0)))


def _drop_val_features(sweep):
    """The sweep's validation feature cache leaves every node with a crew (val_cache.py): a
    tmpfs holds RAM."""
    import ray
    cache = val_cache.settings(sweep.spec, sweep.sweep_dir)
    if cache and sweep.pool is not None:
        with contextlib.suppress(Exception):  # a pool gone: its workers' nodes with it
            ray.get(sweep.pool.drop_val_features.remote(cache), timeout=10)


def _build_tuner(sweep):
    """The Tuner (restored on --resume: finished trials stay finished, running ones continue
    from their checkpoints) and the live status it reports to. Tune's own result files are
    its CSV and JSON loggers, named here; its automatic TensorBoard logger is left out (MLflow
    is the record): its writer's exit handler starts a thread, which Python 3.12 refuses at
    shutdown, a traceback after every interrupted sweep."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
    os.environ['TUNE_DISABLE_AUTO_CALLBACK_LOGGERS'] = '1'

    from orchestrator.crew import ON_HEAD
    from orchestrator.live import LiveStatus
    from orchestrator.status import write_plan
    from orchestrator.trial import run_trial
    from orchestrator.tune_state import KeepTuneState
    spec, plan = sweep.spec, sweep.plan
    callback = _tracking_callback(sweep)
    write_plan(sweep.sweep_dir, plan, sweep.max_concurrent)
    live_trials = _show_groups(sweep)
    live = LiveStatus(sweep.sweep_dir, sweep.out)  # after the MLflow callback: reads its journal
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, plan=plan, output_dir=sweep.sweep_dir,
                             pool_name=sweep.pool_name, grouped=bool(plan.groups.chunks),
                             abandoned_after_s=_seconds_from_env('ORCHESTRATOR_ABANDONED_AFTER_S')),
        # The trial only drives its workers (which hold the CPUs/GPUs): no CPU of its own, on
        # the head node (a lost worker node takes its crews, not the trials driving them)
        {'cpu': 0, 'memory': 256 * 1024 ** 2, **ON_HEAD})
    if sweep.resume:  # its searcher's limit is this start's (concurrency.py)
        concurrency.set_limit(live_trials)
        return tune.Tuner.restore(sweep.experiment_path, trainable,
                                  resume_unfinished=True), live
    return tune.Tuner(
        trainable, param_space=plan.param_space(),
        tune_config=tune.TuneConfig(
            metric=spec.search.metric, mode=spec.search.mode, num_samples=plan.tune_samples,
            search_alg=concurrency.search_alg(_search_alg(spec), live_trials),
            scheduler=_scheduler(spec, plan.full_data_iterations),
            reuse_actors=True),
        run_config=tune.RunConfig(name=spec.name,
                                  storage_path=osp.dirname(sweep.experiment_path),
                                  callbacks=[callback, live,
                                             KeepTuneState(sweep.experiment_path),
                                             CSVLoggerCallback(), JsonLoggerCallback()],
                                  verbose=0)), live


@contextlib.contextmanager
def _watch_pool(sweep, signals, every_s=2.0):
    """While Tune fits: a trial's request to stop the sweep (a full disk, sent to the pool)
    becomes a stop of Tune's loop, as a first signal is (StopSignals.request); the pool's
    notices (a crew waiting for room) are printed (its own prints reach only Ray's logs). In a
    thread of its own (a storage check may take a while), every NODES_CHECK_S, nodes that
    joined get crews (_grow)."""
    import ray
    done = threading.Event()
    pool = sweep.pool

    def say(line):
        if line and signals.say is not None:
            signals.say(line)

    def watch():
        shown = 0
        while not done.wait(every_s):
            try:
                reason, notices = ray.get([pool.stop_requested.remote(),
                                           pool.notices_from.remote(shown)], timeout=30)
            except ray.exceptions.GetTimeoutError:  # a busy pool: ask again
                continue
            except ray.exceptions.RayError:  # the pool is gone: the sweep is ending anyway
                return
            shown += len(notices)
            for line in notices:
                say(line)
            if reason:
                signals.request(reason)
                return

    def going():  # neither ended nor stopping (a signal, the sweep's own stop)
        return not (done.is_set() or signals.signum or signals.reason)

    def grow():
        while not done.wait(NODES_CHECK_S):
            try:
                lines = _grow(sweep, going)
            except Exception:  # a busy or ending cluster: the nodes are looked at again next time
                continue
            if going():
                say(lines)
    threads = [threading.Thread(target=watch, name='watch-pool', daemon=True),
               threading.Thread(target=grow, name='grow-pool', daemon=True)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        done.set()
        threads[0].join(timeout=35)
        threads[1].join(timeout=5)  # the grower may still be in a storage check: it adds
        # nothing after this (going() is false), and as a daemon it does not hold the exit


def _fit(sweep, tuner, live, signals):
    """Run the trials; the parent run ends FINISHED, or FAILED when a trial failed (None: a
    stop signal ended Tune's loop)."""
    spec = sweep.spec
    signals.fitting = True
    try:
        with _watch_pool(sweep, signals):
            results = tuner.fit()
    finally:
        signals.fitting = False
    if signals.signum or signals.reason:
        return None
    if sweep.resume:
        _close_lost_trials(sweep.journal, {r.metrics.get('trial_id') for r in results})
    header, rows, failed = ranked_results(results, sweep.plan.searched, spec.search.metric,
                                          spec.search.mode)
    sweep.journal.record('status', status='FAILED' if failed else 'FINISHED')
    live.show(force=True, final=True)
    return header, rows, failed


def _print_outcome(sweep, header, rows, failed):
    """The ranked table, where the results are, and the exit code: 0, 1 (a trial failed) or 3
    (MLflow writes wait in the journal)."""
    spec, journal, out = sweep.spec, sweep.journal, sweep.out
    tracking_uri = journal.tracking_uri
    pending = journal.flush(attempts=5)  # a locked store or a restarting server: a moment more
    try:
        parent = journal.parent_id()
    except Exception:  # MLflow unreachable
        parent = None
    print(format_table(header, rows), file=out)
    print(f'results: {sweep.sweep_dir}', file=out)
    print(f'MLflow: experiment "{spec.experiment}", parent run {parent}', file=out)
    if tracking_uri.startswith(('http://', 'https://')):
        print(f'  open {tracking_uri} (the MLflow server\'s UI)', file=out)
    else:
        print(f'  mlflow ui --backend-store-uri {tracking_uri}', file=out)
    if failed:
        print(f'{len(failed)} of {len(failed) + len(rows)} trials failed:', file=out)
        print(format_table(['trial', *sweep.plan.searched, 'reason'], failed), file=out)
    if pending:
        print(f'{pending} MLflow write(s) could not be delivered ({tracking_uri} unreachable); '
              f'they are kept in {journal.path}: `orchestrator sync {sweep.sweep_dir}` (or the '
              'next --resume) delivers them', file=out)
        return EXIT_TRACKING_PENDING
    return 1 if failed else 0


def _close_interrupted(sweep, signals, resume_command):
    """After a stop: the runs of the trials that were training, and the parent, end KILLED and
    say why (the signal, or the sweep's own reason; from the journal's own records: MLflow may
    be unreachable). On a full disk the journal may take nothing more: the runs then stay
    RUNNING until the resume."""
    said = (f'{signals.name or signals.reason} at {time.strftime("%Y-%m-%d %H:%M:%S")}: '
            f'stopped at the latest checkpoint; `{resume_command}` continues it')
    running = sweep.journal.mark_killed(said, wait_s=-1)  # delivered as the delivery stops
    sweep.marked = running is not None
    if running is None:
        running = sweep.journal.running_here()
    sweep.closed = (running, sweep.marked)  # what a second signal then says
    return running


def _resume_command(space_file, name, output, address):
    """The command that finishes this sweep, with the flags it was started with."""
    words = ['orchestrator', 'sweep', space_file, '--resume']
    for flag, value in (('--name', name), ('--output', output), ('--address', address)):
        if value:
            words += [flag, value]
    return shlex.join(words)


def _what_stopped(sweep, running, resume_command):
    """What an interruption stopped, and how to go on (resume once Tune has saved a state)."""
    what = ('its trials stopped where they were' if running is None else
            f'{len(running)} trial(s) stopped at their latest checkpoint '
            f'({", ".join(sorted(running))})' if running else 'no trial was training')
    resumable = osp.isfile(osp.join(sweep.experiment_path, 'tuner.pkl'))
    then = (f'resume with: {resume_command}' if resumable else
            'no trial had started: run the same command again')
    return what, then


def _print_interrupted(sweep, signals, running, resume_command):
    """One line: what stopped the sweep, what it interrupted and how to continue; exit 128 +
    the signal's number, or the sweep's own stop's (errors.remedy)."""
    what, then = _what_stopped(sweep, running, resume_command)
    opened = 'reopened' if sweep.resume else 'opened'
    marked = (f'no MLflow run was {opened}' if not sweep.started else
              'MLflow runs marked KILLED' if sweep.marked else
              'MLflow runs stay RUNNING until then')
    if signals.signum:
        print(f'interrupted by {signals.name}: {what}; {marked}; {then}', file=sweep.out,
              flush=True)
        return signals.exit_code
    todo, code = remedy(signals.reason)
    print(f'error: {signals.reason}; the sweep stopped: {what}; {marked}; {todo}, then {then}',
          file=sweep.out, flush=True)
    return code


def _end_at_once(sweep, resume_command, first, signum, reason):
    """A second stop signal (called in its handler; ``first``: the first one's number, None
    for the sweep's own stop, for ``reason``): KILLED in the journal (waiting at most a second
    for the write it may have interrupted), one line, and the process ends here whatever
    fails; Ray's processes share its fate (interrupts.py says why not by an exception)."""
    for stop in (signal.SIGINT, signal.SIGTERM):  # a third one changes nothing now
        signal.signal(stop, signal.SIG_IGN)
    try:
        name = signal.Signals(signum).name
        how = (f'{name} twice' if first == signum else
               f'{signal.Signals(first).name}, then {name}' if first else
               f'{name} while the sweep stopped ({reason})')
        running, marked = sweep.closed or (None, False)
        if sweep.started and sweep.closed is None:  # not yet closed by the first one
            running = sweep.journal.mark_killed(
                f'{how} at {time.strftime("%Y-%m-%d %H:%M:%S")}: ended at once; '
                f'`{resume_command}` continues it', wait_s=1.0)
            marked = running is not None
        what, then = _what_stopped(sweep, running if sweep.started else [], resume_command)
        opened = 'reopened' if sweep.resume else 'opened'
        marked = (f'no MLflow run was {opened}' if not sweep.started else
                  'the journal marks their MLflow runs KILLED (the resume delivers it)' if marked
                  else 'MLflow runs stay RUNNING until then')
        _say_now(sweep.out, f'interrupted by {how}: ended at once; {what}; {marked}; {then}')
    finally:
        os._exit(128 + (first or signum))


def _say_now(out, line, live=None):
    """A line from a signal handler: past Python's buffered writer, which the interrupted code
    may be in the middle of (a print there raises 'reentrant call'); below ``live``'s view."""
    with contextlib.suppress(Exception):  # what is already buffered comes first, if it can
        out.flush()
    try:
        fd = out.fileno()
    except (OSError, ValueError, AttributeError):  # not a file (a test's StringIO)
        out.write(line + '\n')
    else:
        with contextlib.suppress(OSError):  # a closed pipe: nobody reads it
            os.write(fd, (line + '\n').encode())
    if live is not None:
        live.printed_below()


def _run(spec, base_cfg, address, resume, out, tracking_uri, signals, resume_command):
    """The sweep's steps, in this order; a stop signal ends them at the first or second step
    its handler reaches (interrupts.py)."""
    from orchestrator.journal import WriterLock
    outcome, interrupted = None, None
    with WriterLock() as writer:  # released however the sweep ends
        try:
            sweep = _prepare_sweep_dir(spec, base_cfg, address, resume, out, writer)
            _open_journal(sweep, tracking_uri, writer)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM while Ray connects to --address
            raise _NotStarted(getattr(e, 'signum', None) or signal.SIGINT) from None
        signals.end_at_once = functools.partial(_end_at_once, sweep, resume_command)
        with ThreadPoolExecutor(1) as background:
            # MLflow's import and store set-up (~5 s) overlap ray.init and the crews' start
            warming = background.submit(sweep.journal.warm)
            try:
                _start_crews(sweep, signals)
                signals.before_stop = functools.partial(_halt_groups, sweep)
                _open_parent_run(sweep, warming)
                tuner, live = _build_tuner(sweep)
                signals.say = functools.partial(_say_now, out, live=live)
                outcome = _fit(sweep, tuner, live, signals)
                if outcome is None:  # Tune stopped at the signal, its state saved
                    interrupted = _close_interrupted(sweep, signals, resume_command)
                    live.show(force=True, final=True)
            except SweepInterrupted as e:  # before Tune's loop
                signals.signum = signals.signum or e.signum
                interrupted = (_close_interrupted(sweep, signals, resume_command)
                               if sweep.started else [])
            except (DiskFull, OSError) as e:  # the driver's own writes: the journal, plan.json
                if disk_full(e, sweep.sweep_dir) is None:
                    if sweep.started:  # crashed: the parent must not stay RUNNING
                        sweep.journal.record('status', status='KILLED')
                    raise
                signals.reason = signals.reason or str(disk_full(e, sweep.sweep_dir))
                interrupted = (_close_interrupted(sweep, signals, resume_command)
                               if sweep.started else [])
            except BaseException:
                if sweep.started:  # crashed: the parent must not stay RUNNING
                    sweep.journal.record('status', status='KILLED')
                raise
            finally:
                import ray
                try:
                    sweep.journal.stop_delivery()
                finally:  # also after a second signal in the delivery's last attempt
                    _drop_val_features(sweep)
                    ray.shutdown()
    return sweep, outcome, interrupted


def run_sweep(space_file, name=None, output=None, tracking_uri=None, address=None,
              dry_run=False, resume=False, out=None, no_grouping=False, **dry_run_options):
    """``orchestrator sweep``: load and check, then the dry run or the sweep's steps (_run);
    ``dry_run_options``: the dry run's estimate and GPU (_print_dry_run)."""
    out = out or sys.stdout
    resume_command = _resume_command(space_file, name, output, address)
    spec, base_cfg = load_spec(space_file)
    if no_grouping:
        spec = spec.replaced('grouping', enabled=False)
    spec.name = check_sweep_name(spec.source, '--name', name) if name else spec.name
    spec.output = output or spec.output
    address = address or os.environ.get('RAY_ADDRESS')
    address = None if address == 'local' else address  # Ray's word for a cluster of our own
    if dry_run:
        said = planning.settle_base_fraction(spec, planning.plain(base_cfg))
        return _print_dry_run(spec, base_cfg, address, out, said=said, **dry_run_options)
    signals = StopSignals()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            sweep, outcome, interrupted = _run(spec, base_cfg, address, resume, out,
                                               tracking_uri, signals, resume_command)
            if interrupted is not None:
                return _print_interrupted(sweep, signals, interrupted, resume_command)
            return _print_outcome(sweep, *outcome)
        except (DiskFull, OSError) as e:  # before any trial (the sweep's directory, journal)
            if disk_full(e, spec.output) is None:
                raise
            print(f'error: {disk_full(e, spec.output)}; nothing was started: free space there, '
                  'then run the same command again', file=sys.stderr, flush=True)
            return DiskFull.exit_code
        except _NotStarted as e:
            print(f'interrupted by {signal.Signals(e.signum).name} before the sweep started: '
                  'nothing was started; run the same command again', file=out, flush=True)
            return 128 + e.signum
        finally:
            signals.restore()
    except KeyboardInterrupt as e:  # a second signal while the first one's stop was under way
        # (also one Python handles after the handlers were restored)
        signum = getattr(e, 'signum', None) or signals.signum
        if signum is None and signals.reason:  # the sweep's own stop (a full disk, no room)
            todo, code = remedy(signals.reason)
            print(f'error: {signals.reason}; the sweep stopped: {todo}, then resume with: '
                  f'{resume_command}', file=out, flush=True)
            return code
        signum = signum or signal.SIGINT
        print(f'interrupted by {signal.Signals(signum).name}: ended at once (MLflow writes not '
              f'yet delivered wait in the journal); resume with: {resume_command}', file=out,
              flush=True)
        return 128 + signum
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
