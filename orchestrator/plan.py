"""SweepSpec -> what will run: Tune's param space, each trial's resolved mmseg overrides (derived
values included), the resource plan, and the dry-run table. Pure functions: no Ray, no MLflow."""
import copy
import itertools
import math

from orchestrator.errors import ConfigError
from orchestrator.spec import FRACTION_KEY, iterations_for

HEAD = 'model.decode_head.'


def tune_param_space(spec):
    """Ray Tune's param_space: one entry per searched key, named exactly as in the file."""
    from ray import tune
    make = {'grid': tune.grid_search, 'choice': tune.choice,
            'uniform': lambda v: tune.uniform(*v), 'loguniform': lambda v: tune.loguniform(*v),
            'randint': lambda v: tune.randint(*v)}
    space = {p.key: make[p.kind](list(p.values)) for p in spec.params}
    if spec.repeats > 1 and 'seed' not in space:
        space['seed'] = tune.grid_search(list(range(spec.repeats)))
    return space


def searched_keys(spec):
    keys = [p.key for p in spec.params]
    if spec.repeats > 1 and 'seed' not in keys:
        keys = keys + ['seed']
    return keys


def resolve(spec, base, params):
    """A trial's sampled values -> (mmseg overrides, derived values), all by dotted key.

    ``base`` is the base config as a plain dict (no mmcv needed: trials stay light).
    Derived values are declared in the space file, never evaluated from it:
    channels follow in_channels when num_convs == 0; iterations follow the few-shot fraction;
    evaluation and checkpoint intervals follow the iterations.
    """
    overrides = {k: v for k, v in params.items() if k != FRACTION_KEY}
    head = base['model']['decode_head']
    derived = {}
    num_convs = overrides.get(HEAD + 'num_convs', head.get('num_convs', 2))
    if spec.channels_follow_in_channels and num_convs == 0:
        derived[HEAD + 'channels'] = overrides.get(HEAD + 'in_channels', head['in_channels'])
    else:
        derived[HEAD + 'channels'] = overrides.get(HEAD + 'channels', head['channels'])
    fraction = params.get(FRACTION_KEY, 1.0)
    base_iters = overrides.get('runner.max_iters', base['runner']['max_iters'])
    iters = iterations_for(spec, fraction, base_iters)
    derived['runner.max_iters'] = iters
    derived['evaluation.interval'] = max(1, math.ceil(iters / spec.evaluations))
    derived['checkpoint_config.interval'] = derived['evaluation.interval']
    derived[FRACTION_KEY] = fraction
    if spec.data_root:
        for split in ('train', 'val', 'test'):
            if split in base['data']:
                derived[f'data.{split}.data_root'] = spec.data_root
    overrides.update({k: v for k, v in derived.items() if k != FRACTION_KEY})
    return overrides, derived


def merged_config(base, overrides, filename=None):
    """mmcv Config of base (a plain dict) with dotted overrides, via mmcv's own merge."""
    from mmcv import Config
    cfg = Config(copy.deepcopy(base), filename=filename)
    cfg.merge_from_dict(overrides)
    return cfg


def resolved_config(spec, base_cfg, params):
    """The trial's full mmcv Config (a copy of the base with its overrides) and derived values."""
    overrides, derived = resolve(spec, plain(base_cfg), params)
    return merged_config(plain(base_cfg), overrides, base_cfg.filename), derived


def plain(cfg):
    """An mmcv Config as a plain dict (picklable without mmcv)."""
    return cfg._cfg_dict.to_dict()


def grid_trials(spec):
    """The trials Tune will create, for the dry-run: grid values crossed, sampled ones shown as
    their distribution (one row per sample)."""
    grid = [(p.key, p.values) for p in spec.params if p.kind == 'grid']
    sampled = {p.key: f'{p.kind}{list(p.values)}' for p in spec.params if p.kind != 'grid'}
    seeds = list(range(spec.repeats)) if spec.repeats > 1 and 'seed' not in dict(grid) else [None]
    rows = []
    for combo in itertools.product(*[v for _, v in grid]):
        for seed in seeds:
            for _ in range(spec.num_samples):
                row = dict(zip([k for k, _ in grid], combo))
                row.update(sampled)
                if seed is not None:
                    row['seed'] = seed
                rows.append(row)
    return rows


def per_trial_resources(spec):
    w = spec.workers_per_trial
    return dict(CPU=w * spec.cpus_per_worker, GPU=w * spec.gpus_per_worker)


def worker_bundle(spec):
    """One worker's Ray resources (a placement-group bundle)."""
    bundle = {'CPU': float(spec.cpus_per_worker)}
    if spec.gpus_per_worker:
        bundle['GPU'] = float(spec.gpus_per_worker)
    return bundle


def concurrency(spec, cluster):
    """How many trials can run at once on `cluster` (Ray's resource dict); ConfigError if none.

    Tune does not count a trial's workers (they belong to the worker pool), so the cap is
    computed here; the pool holds exactly that many worker groups.
    """
    need = per_trial_resources(spec)
    fits = []
    for res in ('CPU', 'GPU'):
        if need[res] > 0:
            have = cluster.get(res, 0)
            if have < need[res]:
                raise ConfigError(
                    f'{spec.source}: resources: one trial needs {need[res]:g} {res} '
                    f'({spec.workers_per_trial} workers x '
                    f'{spec.cpus_per_worker if res == "CPU" else spec.gpus_per_worker:g}), '
                    f'the cluster has {have:g}: it could never be scheduled')
            fits.append(int(have // need[res] + 1e-9))
    n = min(fits) if fits else 1
    if spec.max_concurrent_trials:
        n = min(n, spec.max_concurrent_trials)
    return max(1, n)


def dry_run_table(spec, base_cfg):
    """Rows of (trial, resolved values...) and the total budget line."""
    rows = grid_trials(spec)
    keys = searched_keys(spec)
    shown = keys + [k for k in ('model.decode_head.channels', 'runner.max_iters')
                    if k not in keys]
    need = per_trial_resources(spec)
    base = plain(base_cfg)
    sampled = {p.key for p in spec.params if p.kind != 'grid'}  # shown as distributions
    table, total_iters = [], 0
    for i, row in enumerate(rows):
        _, derived = resolve(spec, base, {k: v for k, v in row.items() if k not in sampled})
        values = {**row, **derived}
        total_iters += derived['runner.max_iters']
        table.append([i] + [values.get(k, '') for k in shown])
    header = ['trial'] + shown
    budget = (f'{len(rows)} trials, each {spec.workers_per_trial} worker(s) x '
              f'({spec.cpus_per_worker:g} CPU, {spec.gpus_per_worker:g} GPU) = '
              f'{need["CPU"]:g} CPU, {need["GPU"]:g} GPU per trial; '
              f'{total_iters} iterations in all = {total_iters * spec.workers_per_trial} '
              f'worker-iterations'
              + (f' = {total_iters * need["GPU"]:,.0f} GPU-iterations' if need['GPU'] else ''))
    return header, table, budget
