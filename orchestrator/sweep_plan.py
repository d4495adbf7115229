"""The sweep's spine: one ``SweepPlan``, made once per start by ``make_plan`` from the spec and the
base config, and read by everything after it (the dry run, the driver, Tune, each trial, the
tracking callback, ``status``).

It holds the trials in the order Tune creates them (the members of a trial group one after
another), each with its fixed values and its resolved overrides and derived values
(plan.resolve), the trial groups (grouping.py) and the full-data schedule ASHA counts in. Tune
receives the trials as one ``grid_search`` over the plan's rows (``PLAN_ROW``), so its order is
the plan's and each trial knows its row; only sampled values are drawn by Tune (and Optuna's
trials, which Optuna proposes one at a time, are resolved when they start).
"""
from dataclasses import dataclass, field

from orchestrator.errors import ConfigError
from orchestrator.keys import FRACTION_KEY, REPEAT_KEY, SUBSET_SEED_KEY
from orchestrator.plan import plain, resolve, searched_keys

PLAN_ROW = 'plan'  # Tune's config: the trial's row of the plan (its index and fixed values)
INDEX = 'index'


@dataclass(frozen=True)
class PlannedTrial:
    """One trial as planned: ``values`` the searched values the plan fixes (grid points, the
    repeat's seed, the subset seed), ``sampled`` each value Tune draws when it starts (shown as
    its distribution), ``overrides`` and ``derived`` as plan.resolve makes them from ``values``
    (a sampled value counts as the base config's until drawn)."""
    index: int
    values: dict
    sampled: dict
    overrides: dict
    derived: dict

    @property
    def iterations(self):
        return self.derived['runner.max_iters']


@dataclass
class SweepPlan:
    """What a sweep will run (module docstring). ``groups`` is grouping.GroupPlan."""
    spec: object
    base: dict  # the base config as plain data (no mmcv needed to read it)
    base_filename: str  # mmcv resolves the base config's relative imports from it
    trials: list
    full_data_iterations: int  # a trial's on all the data (what ASHA's grace period counts in)
    searched: list = field(default_factory=list)
    groups: object = None  # set once by size_groups, when the GPU's memory is known

    def size_groups(self, gpu_bytes=None):
        """The trial groups, sized to ``gpu_bytes`` (one of the cluster's GPUs; None:
        grouping.group_budget's rule): known only once the cluster is, so set apart from
        make_plan (the trials and their order do not depend on it)."""
        from orchestrator import grouping
        self.groups = grouping.plan(self.spec, self.base, self.trials, gpu_bytes)
        return self

    @property
    def schedules(self):
        return [t.iterations for t in self.trials]

    @property
    def rows(self):
        """Each trial's searched values, a sampled one as its distribution's text."""
        return [{**t.sampled, **t.values} for t in self.trials]

    def param_space(self):
        """Tune's param space: the plan's rows, in order, as one grid (each row its index and
        fixed values), and the sampled values' distributions. Optuna gets the distributions
        alone: it proposes each trial itself."""
        from ray import tune
        make = {'choice': tune.choice, 'uniform': lambda v: tune.uniform(*v),
                'loguniform': lambda v: tune.loguniform(*v),
                'randint': lambda v: tune.randint(*v)}
        space = {p.key: make[p.kind](list(p.values)) for p in self.spec.params
                 if p.kind != 'grid'}
        if self.spec.search.algorithm == 'optuna':
            return space
        rows = [{INDEX: t.index, **t.values} for t in self.trials]
        return {PLAN_ROW: tune.grid_search(rows), **space}

    @property
    def tune_samples(self):
        """Tune's num_samples: the plan has enumerated the samples, except for Optuna."""
        return self.spec.search.num_samples if self.spec.search.algorithm == 'optuna' else 1

    def trial_for(self, config):
        """The PlannedTrial of a Tune trial's ``config``, its sampled values drawn: resolved
        again only where Tune drew something. A trial without its row in this plan (Optuna's,
        or one a resumed sweep planned in another order: --no-grouping given only once) is
        resolved from its values (index None)."""
        values = flat_config(config)
        unknown = sorted(set(values) - set(self.searched))
        if unknown:  # a config of another program's Tune state (--resume refuses those)
            raise ConfigError(f'{self.spec.source}: a trial\'s config holds {unknown}, not '
                              f'searched keys of this plan ({self.searched})')
        row = config.get(PLAN_ROW)
        index = row.get(INDEX) if isinstance(row, dict) else None
        planned = (self.trials[index] if isinstance(index, int) and index < len(self.trials)
                   else None)
        if planned is not None and any(values.get(k) != v for k, v in planned.values.items()):
            planned = None
        drawn = {k: values[k] for k in values if planned is None or k in planned.sampled}
        if planned is not None and not drawn:
            return planned
        fixed = planned.values if planned is not None else {}
        overrides, derived = resolve(self.spec, self.base, {**fixed, **drawn})
        return PlannedTrial(planned.index if planned else None, {**fixed, **drawn}, {},
                            overrides, derived)


def flat_config(config):
    """A Tune trial's config as {searched key: value}: the plan's row (less its index) and the
    values Tune drew."""
    flat = {}
    for key, value in config.items():
        if key == PLAN_ROW and isinstance(value, dict):
            flat.update({k: v for k, v in value.items() if k != INDEX})
        else:
            flat[key] = value
    return flat


def _enumerate_trials(spec):
    """The trials as rows of searched values: grid values crossed (the file's first key
    slowest), then the repeats, then the samples; a sampled value as its distribution's text."""
    import itertools
    grid = [(p.key, p.values) for p in spec.params if p.kind == 'grid']
    sampled = {p.key: f'{p.kind}{list(p.values)}' for p in spec.params if p.kind != 'grid'}
    seeds = (list(range(spec.repeats)) if spec.repeats > 1 and REPEAT_KEY not in dict(grid)
             else [None])
    if len(spec.fewshot_seeds) > 1:
        grid = grid + [(SUBSET_SEED_KEY, spec.fewshot_seeds)]
    rows = []
    for combo in itertools.product(*[v for _, v in grid]):
        for seed in seeds:
            for _ in range(spec.search.num_samples):
                row = dict(zip([k for k, _ in grid], combo))
                row.update(sampled)
                if seed is not None:
                    row[REPEAT_KEY] = seed
                rows.append(row)
    return rows


def _members_together(spec, base, rows):
    """The rows reordered so that trials which can share a backbone pass (one group key) follow
    one another, in the order their keys first appear: Tune starts a trial group's members one
    after another, and a bounded number of live trials always completes the next group."""
    from orchestrator import grouping
    from orchestrator.fine_tuning import frozen_backbone
    if grouping.why_not(spec, base):
        return rows
    order = {}
    for i, row in enumerate(rows):
        key = grouping.group_key(spec, row) if frozen_backbone(base, row) else i
        order.setdefault(key, []).append(row)
    return [row for members in order.values() for row in members]


def _check_master_weights(spec, base, trials):
    """Float32 master weights are for a trainable backbone; on a frozen one they would be
    nothing but a misread setting."""
    from orchestrator.fine_tuning import frozen_backbone
    if spec.fine_tuning.float32_master_weights and all(  # a sampled key: either way
            frozen_backbone(base, {**t.sampled, **t.values}) for t in trials):
        raise ConfigError(f'{spec.source}: fine_tuning.float32_master_weights: True: the '
                          'backbone is frozen in every trial (model.backbone.freeze_vit): '
                          'nothing to keep master weights of')


def make_plan(spec, base_cfg):
    """The SweepPlan of ``spec`` on ``base_cfg`` (an mmcv Config), its groups not yet sized; a
    ConfigError for what only the trials show (before any work)."""
    base = plain(base_cfg)
    sampled = {p.key for p in spec.params if p.kind != 'grid'}
    trials = []
    for i, row in enumerate(_members_together(spec, base, _enumerate_trials(spec))):
        values = {k: v for k, v in row.items() if k not in sampled}
        overrides, derived = resolve(spec, base, values)
        trials.append(PlannedTrial(i, values, {k: row[k] for k in row if k in sampled},
                                   overrides, derived))
    _check_master_weights(spec, base, trials)
    full = resolve(spec, base, {FRACTION_KEY: 1.0})[1]['runner.max_iters']
    return SweepPlan(spec, base, base_cfg.filename, trials, full, searched_keys(spec))
