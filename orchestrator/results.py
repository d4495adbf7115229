"""A finished (or running) sweep's results as MLflow holds them: its parent run, one child run per
trial, and one table row per trial with typed params and final metrics. The report and the
best-config export read this, so what they show is what the MLflow UI shows."""
import json
import os.path as osp

from orchestrator.errors import ConfigError
from orchestrator.keys import FRACTION_KEY, HEAD_VARIANT, NOISE_KEYS
from orchestrator.records import TrackingMeta

SCHEDULE = ('runner.max_iters', 'evaluation.interval', 'checkpoint_config.interval')


def sweep_dir_of(sweep, output='runs'):
    """A sweep given as its output directory or its name (under ``output``)."""
    for candidate in (sweep, osp.join(output, sweep)):
        if osp.isfile(osp.join(candidate, TrackingMeta.NAME)):
            return osp.abspath(candidate)
    raise ConfigError(f'{sweep}: not a sweep: neither it nor {osp.join(output, sweep)} is a sweep '
                      f'output directory (with {TrackingMeta.NAME}); give the directory or '
                      '--output ROOT')


def typed(value):
    """An MLflow param string back to the YAML value it was (MLflow stores params as text)."""
    if value in ('True', 'False'):
        return value == 'True'
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


class SweepResults:
    """The parent run, the children and the table of a sweep directory's MLflow runs."""

    def __init__(self, sweep_dir):
        from mlflow.tracking import MlflowClient
        from orchestrator.journal import TrackingJournal
        self.sweep_dir = sweep_dir
        meta = TrackingJournal.open(sweep_dir)  # the sweep's store, experiment and uid
        self.tracking_uri = meta.tracking_uri
        self.client = MlflowClient(self.tracking_uri)
        try:
            exp = self.client.get_experiment_by_name(meta.experiment)
        except Exception as e:  # unreachable server, locked or missing store
            raise ConfigError(f'{sweep_dir}: MLflow at {self.tracking_uri} cannot be read: '
                              f'{str(e).splitlines()[0]}') from None
        runs = self.client.search_runs(
            [exp.experiment_id], filter_string=f"tags.sweep_uid = '{meta.sweep_uid}'",
            max_results=10000) if exp else []
        parents = [r for r in runs if r.data.tags.get('role') == 'sweep']
        if not parents:
            raise ConfigError(f'{sweep_dir}: its parent run is not in MLflow at '
                              f'{self.tracking_uri} (`orchestrator sync {sweep_dir}` first?)')
        self.parent = parents[0]
        self.children = [r for r in runs if r.data.tags.get('role') == 'trial']
        tags = self.parent.data.tags
        self.metric = tags.get('metric', 'mIoU')
        self.references = json.loads(tags['references']) if 'references' in tags else None
        self.mode = tags.get('mode', 'max')
        if 'searched_params' in tags:
            self.searched = json.loads(tags['searched_params'])
        else:  # a sweep from before that tag: the params that vary, less the schedule's
            self.searched = sorted({k for c in self.children for k in c.data.params
                                    if k not in SCHEDULE and len({o.data.params.get(k)
                                                                  for o in self.children}) > 1})

    def _trained(self, child):
        """(iterations trained, planned): the tags the sweep writes when a trial finishes
        (tracking.schedule_tags); for a sweep from before them, the metric's last step."""
        tags = child.data.tags
        planned = int(tags.get('iterations_planned', child.data.params.get('runner.max_iters', 0)))
        if 'iterations_trained' in tags:
            return int(tags['iterations_trained']), planned
        history = self.client.get_metric_history(child.info.run_id, self.metric)
        return max((m.step for m in history), default=0), planned

    def rows(self):
        """One dict per trial: trial_id, run_id, name, status, searched params (typed), the
        metric and per-class IoU as MLflow holds them (latest values), failure reason; a
        finished trial also ``iters`` / ``planned`` and ``complete`` (it trained its whole
        schedule; False: the scheduler stopped it early)."""
        rows = []
        for c in self.children:
            row = dict(trial_id=c.data.tags.get('trial_id'), run_id=c.info.run_id,
                       name=c.data.tags.get('mlflow.runName', ''),
                       status=c.info.status, failure_reason=c.data.tags.get('failure_reason', ''))
            if c.info.status == 'FINISHED':
                row['iters'], row['planned'] = self._trained(c)
                row['complete'] = row['iters'] >= row['planned']
            row.update({k: typed(c.data.params[k]) for k in self.searched if k in c.data.params})
            for k in ('runner.max_iters', FRACTION_KEY):
                if k in c.data.params:
                    row[k] = typed(c.data.params[k])
            row.update({k: v for k, v in c.data.metrics.items()
                        if k == self.metric or k.startswith(('IoU.', 'cost.', 'backbone.'))})
            rows.append(row)
        return rows

    def ranked(self):
        """Finished trials with the metric, best first, those stopped early included (marked:
        ``complete`` False)."""
        done = [r for r in self.rows() if r['status'] == 'FINISHED' and self.metric in r]
        return sorted(done, key=lambda r: r[self.metric], reverse=self.mode == 'max')

    def completed(self):
        """The ranked trials that trained their whole schedule: the only ones averaged,
        compared or ranked against each other (a stopped trial's metric is of fewer
        iterations)."""
        return [r for r in self.ranked() if r['complete']]

    def stopped_early(self):
        return [r for r in self.ranked() if not r['complete']]

    def best(self):
        ranked = self.completed()
        if not ranked:
            raise ConfigError(f'{self.sweep_dir}: no trial has completed its schedule with '
                              f'metric {self.metric} yet')
        return ranked[0]

    def matches(self, row, where):
        """The row's searched values agree with ``where`` (a reference's setting)."""
        return all(k in row and row[k] == v for k, v in where.items())

    def variant_keys(self):
        """The head-variant keys (num_convs x with_norm x concat_input) the sweep searched."""
        return [k for k in HEAD_VARIANT if k in self.searched]

    def line_keys(self):
        """What tells one curve of the report from another: every searched value but the
        fraction (the x axis) and the noise keys (averaged over): head variants first."""
        rest = [k for k in self.searched
                if k not in HEAD_VARIANT and k != FRACTION_KEY and k not in NOISE_KEYS]
        return self.variant_keys() + rest

    def noise_keys(self):
        """The searched noise keys (repeats, subset seeds): averaged over."""
        return [k for k in self.searched if k in NOISE_KEYS]
