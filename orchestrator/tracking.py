"""MLflow: one parent run per sweep, one nested child run per trial, written from the driver
through the sweep's journal (orchestrator/journal.py).

Ray's MLflowLoggerCallback does not nest runs, and its step is Tune's report counter; this Tune
callback creates children with ``mlflow.parentRunId`` (what the MLflow UI nests by), logs the same
param columns on every child, and steps metrics by the mmseg iteration.
"""
import hashlib
import os.path as osp
import subprocess
import sys
from importlib import metadata

from ray.tune import Callback

from orchestrator.errors import failure_reason
from orchestrator.records import Placement
from orchestrator.trial_config import SUBSET_RECORD
from orchestrator.keys import FRACTION_KEY, HEAD_VARIANT, NOISE_KEYS, REPEAT_KEY, SUBSET_SEED_KEY

METRIC_PREFIXES = ('mIoU', 'mAcc', 'aAcc', 'IoU.', 'Acc.', 'loss', 'lr', 'restarts', 'cost.',
                   'backbone.')
PACKAGES = ('torch', 'mmcv-full', 'mmsegmentation', 'ray', 'mlflow')


def _git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              cwd=osp.dirname(osp.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ''


def parent_tags(sweep_name):
    """The parent run's tags: sweep, git commit, Python and package versions."""
    tags = {'sweep': sweep_name, 'mlflow.runName': sweep_name, 'role': 'sweep',
            'python': sys.version.split()[0]}
    commit = _git_commit()
    if commit:
        tags['git_commit'] = commit
    for pkg in PACKAGES:
        try:
            tags[f'version.{pkg}'] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return tags


def metrics_of(result):
    """The numeric metrics of one Tune result that belong in MLflow."""
    return {k: float(v) for k, v in result.items()
            if k.startswith(METRIC_PREFIXES) and isinstance(v, (int, float))
            and not isinstance(v, bool)}


def placement_tags(placement):
    """MLflow tags saying where a trial's workers ran: per rank, and the distinct nodes (so the
    UI can filter, e.g. ``tags.num_nodes = '2'``); and its trial group, if it trained in one."""
    ranks, group = placement['ranks'], placement.get('group')
    tags = {}
    if group:
        tags.update(trial_group=group['id'], trial_group_size=str(group['size']))
    for rank, w in enumerate(ranks):
        tags[f'worker.{rank}.node_id'] = w['node_id']
        tags[f'worker.{rank}.node_ip'] = w['node_ip']
        tags[f'worker.{rank}.gpu_ids'] = ','.join(w['gpu_ids'])
    nodes = sorted({w['node_id'] for w in ranks})
    tags.update(node_ids=','.join(nodes), num_nodes=str(len(nodes)),
                gpu_ids=';'.join(','.join(w['gpu_ids']) for w in ranks))
    return tags


def _short(key, value):
    """One searched value as a run name reads it: ``nc0``, ``norm`` / ``nonorm``, ``f1/16``,
    ``s1`` (seed), ``sub1`` (subset seed), ``lr0.003``; other keys by their last part."""
    name = {'model.decode_head.num_convs': 'nc', 'model.decode_head.with_norm': 'norm',
            'model.decode_head.concat_input': 'cat', REPEAT_KEY: 's', SUBSET_SEED_KEY: 'sub',
            FRACTION_KEY: 'f'}.get(key, key.rsplit('.', 1)[-1])
    if isinstance(value, bool):
        return name if value else f'no{name}'
    if key == FRACTION_KEY and 0 < value < 1 and (1 / value).is_integer():
        return f'f1/{int(1 / value)}'
    if isinstance(value, float):
        return f'{name}{value:.3g}'
    return f'{name}{value}'


def run_name(values, keys):
    """A child run's name: its searched values in short (``nc0-norm-f1/16-s1``), so the MLflow
    UI's run list reads as the study: the head variant, other values, the fraction, then the
    noise keys (repeats, subset seeds)."""
    def place(key):
        if key in HEAD_VARIANT:
            return 0, HEAD_VARIANT.index(key)
        return (3 if key in NOISE_KEYS else 2 if key == FRACTION_KEY else 1), 0
    ordered = sorted(keys, key=place)  # stable: the file's order within each place
    return '-'.join(_short(k, values[k]) for k in ordered if k in values) or 'trial'


def schedule_tags(result, planned):
    """Whether a finished trial trained its whole schedule: ``iterations_trained``,
    ``iterations_planned`` and ``stopped_early`` ('true' when the scheduler ended it first), so
    the report never averages a partly trained trial with completed ones."""
    trained = int(result.get('iter', 0))
    planned = int(result.get('max_iters', planned))
    return {'iterations_trained': str(trained), 'iterations_planned': str(planned),
            'stopped_early': str(trained < planned).lower()}


class MLflowTrialCallback(Callback):
    """Child run per trial: params at start, metrics at every report, artifacts and status at
    the end. Every write goes through the sweep's TrackingJournal (nothing is lost while MLflow
    is unreachable; a resumed sweep continues its trials' runs instead of adding new ones)."""

    def __init__(self, journal, sweep_name, params_of, trial_dir_of, data_name='train',
                 searched=()):
        self.sweep_dir = journal.register().sweep_dir
        self.sweep_name = sweep_name
        self.params_of = params_of        # trial.config -> {param key: value}
        self.searched = list(searched)    # the searched keys: a child's name
        self.trial_dir_of = trial_dir_of  # trial_id -> directory with the trial's artifacts
        self.data_name = data_name        # the training data's name in dataset inputs
        self._placed = {}  # trial_id -> the placement last recorded (a restart may move it)
        self._datasets = set()  # trial ids whose few-shot subset is recorded

    @property
    def journal(self):
        """The journal this process writes (Tune restores this callback from its pickled state
        on --resume; the driver's live journal is the one writer, never a stale copy)."""
        from orchestrator.journal import TrackingJournal
        return TrackingJournal.live(self.sweep_dir)

    def _record_placement(self, trial_id):
        placed = Placement.read(self.trial_dir_of(trial_id))
        if placed is not None and self._placed.get(trial_id) != placed:
            self._placed[trial_id] = placed
            self.journal.record('tags', trial_id=trial_id, tags=placement_tags(placed.as_dict()))

    def on_trial_start(self, iteration, trials, trial, **info):
        values = self.params_of(trial.config)
        params = {k: str(v) for k, v in values.items()}
        self.journal.record('child', trial_id=trial.trial_id, params=params,
                            name=run_name(values, self.searched),
                            tags={'sweep': self.sweep_name, 'trial_id': trial.trial_id,
                                  'role': 'trial'})
        self.journal.record('status', trial_id=trial.trial_id, status='RUNNING')

    def _record_dataset(self, trial):
        """The trial's few-shot subset as the run's training dataset input (MLflow's Dataset
        column): name, digest of its file list, fraction, subset seed, image count. Runs that
        trained on one subset share its digest (search_runs: datasets.digest = '...')."""
        path = osp.join(self.trial_dir_of(trial.trial_id), SUBSET_RECORD)
        if trial.trial_id in self._datasets or not osp.isfile(path):
            return
        with open(path) as f:
            text = f.read()
        params = self.params_of(trial.config)
        fraction = float(params.get(FRACTION_KEY, 1.0))
        seed = int(params.get(SUBSET_SEED_KEY, 0))
        self._datasets.add(trial.trial_id)
        self.journal.record('dataset', trial_id=trial.trial_id,
                            name=f'{self.data_name} {fraction:g} seed {seed}',
                            digest=hashlib.sha256(text.encode()).hexdigest()[:10], source=path,
                            profile=dict(fraction=fraction, subset_seed=seed,
                                         images=len(text.split())))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._record_placement(trial.trial_id)
        self._record_dataset(trial)
        step = int(result.get('iter', result.get('training_iteration', 0)))
        self.journal.record('metrics', trial_id=trial.trial_id, step=step,
                            ts=int(result.get('eval_time', result.get('timestamp', 0)) * 1000),
                            metrics=metrics_of(result))

    def _finish(self, trial, status, reason=None):
        self._record_placement(trial.trial_id)
        self._record_dataset(trial)
        trial_dir = self.trial_dir_of(trial.trial_id)
        paths = [osp.join(trial_dir, name) for name in
                 ('resolved_config.py', SUBSET_RECORD, 'mmseg/metrics.jsonl')]
        self.journal.record('artifacts', trial_id=trial.trial_id,
                            paths=[p for p in paths if osp.isfile(p)])
        if reason:
            self.journal.record('tags', trial_id=trial.trial_id,
                                tags={'failure_reason': reason[:4000]})
        self.journal.record('status', trial_id=trial.trial_id, status=status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.last_result and 'iter' in trial.last_result:
            planned = self.params_of(trial.config).get('runner.max_iters', 0)
            self.journal.record('tags', trial_id=trial.trial_id,
                                tags=schedule_tags(trial.last_result, planned))
        self._finish(trial, 'FINISHED')

    def on_trial_error(self, iteration, trials, trial, **info):
        error = getattr(trial, 'error_file', None)
        reason = 'error'
        if error and osp.isfile(error):
            with open(error) as f:
                reason = failure_reason(f.read())
        self._finish(trial, 'FAILED', reason)
