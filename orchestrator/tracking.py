"""MLflow: one parent run per sweep, one nested child run per trial, written from the driver.

Ray's MLflowLoggerCallback does not nest runs, and its step is Tune's report counter; this Tune
callback creates children with ``mlflow.parentRunId`` (what the MLflow UI nests by), logs the same
param columns on every child, and steps metrics by the mmseg iteration.
"""
import os.path as osp
import subprocess
import sys
from importlib import metadata

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from ray.tune import Callback

METRIC_PREFIXES = ('mIoU', 'mAcc', 'aAcc', 'IoU.', 'Acc.', 'loss', 'lr')
PACKAGES = ('torch', 'mmcv-full', 'mmsegmentation', 'ray', 'mlflow')


def default_tracking_uri(output_root):
    """An absolute sqlite URI: Ray changes each trial's working directory, so relative URIs
    break, and MLflow 3 refuses plain file stores by default."""
    return 'sqlite:///' + osp.join(osp.abspath(output_root), 'mlflow.db')


def get_or_create_experiment(client, name, artifact_root):
    """With a local store, artifacts go to an absolute folder beside it (MLflow's default is
    ./mlruns relative to the working directory); an http:// server chooses its own."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    local = not client.tracking_uri.startswith(('http://', 'https://'))
    location = 'file://' + osp.abspath(artifact_root) if local else None
    return client.create_experiment(name, artifact_location=location)


def _git_commit():
    try:
        return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              cwd=osp.dirname(osp.abspath(__file__)), timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ''


def start_parent_run(client, experiment_id, sweep_name, space_file):
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
    run = client.create_run(experiment_id, tags=tags, run_name=sweep_name)
    client.log_artifact(run.info.run_id, space_file)
    return run.info.run_id


def metrics_of(result):
    """The numeric metrics of one Tune result that belong in MLflow."""
    return {k: float(v) for k, v in result.items()
            if k.startswith(METRIC_PREFIXES) and isinstance(v, (int, float))
            and not isinstance(v, bool)}


class MLflowTrialCallback(Callback):
    """Child run per trial: params at start, metrics at every report, artifacts at the end."""

    def __init__(self, tracking_uri, experiment_id, parent_run_id, sweep_name, params_of,
                 trial_dir_of):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.params_of = params_of        # trial.config -> {param key: value}
        self.trial_dir_of = trial_dir_of  # trial_id -> directory with the trial's artifacts
        self.run_ids = {}
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.run_ids:
            return
        tags = {'mlflow.parentRunId': self.parent_run_id, 'sweep': self.sweep_name,
                'trial_id': trial.trial_id, 'role': 'trial'}
        run = self.client.create_run(self.experiment_id, tags=tags,
                                     run_name=f'{self.sweep_name}-{trial.trial_id}')
        self.run_ids[trial.trial_id] = run.info.run_id
        params = [Param(k, str(v)) for k, v in self.params_of(trial.config).items()]
        self.client.log_batch(run.info.run_id, params=params)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        step = int(result.get('iter', result.get('training_iteration', 0)))
        ts = int(result.get('timestamp', 0) * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, ts, step)
                                               for k, v in metrics_of(result).items()])

    def _finish(self, trial, status, reason=None):
        run_id = self.run_ids.get(trial.trial_id)
        if run_id is None:
            return
        trial_dir = self.trial_dir_of(trial.trial_id)
        for name in ('resolved_config.py', 'fewshot_subset.txt', 'mmseg/metrics.jsonl'):
            path = osp.join(trial_dir, name)
            if osp.isfile(path):
                self.client.log_artifact(run_id, path)
        if reason:
            self.client.log_batch(run_id, tags=[RunTag('failure_reason', reason[:4000])])
        self.client.set_terminated(run_id, status)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finish(trial, 'FINISHED')

    def on_trial_error(self, iteration, trials, trial, **info):
        error = getattr(trial, 'error_file', None)
        reason = 'error'
        if error and osp.isfile(error):
            with open(error) as f:
                lines = [line for line in f.read().strip().splitlines() if line.strip()]
            reason = lines[-1] if lines else reason
        self._finish(trial, 'FAILED', reason)

