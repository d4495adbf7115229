"""Search-space YAML -> a validated SweepSpec. Nothing in the file is executed (yaml.safe_load).

Every error is a ConfigError naming the file, the key path and the value, raised before Ray,
MLflow or any output directory is touched. The format is documented in search_spaces/README.md.
"""
import math
import os.path as osp
from dataclasses import dataclass

import yaml

from orchestrator.errors import ConfigError

DISTRIBUTIONS = ('grid', 'choice', 'uniform', 'loguniform', 'randint')
FRACTION_KEY = 'fewshot.fraction'  # not an mmseg key: selects the few-shot training subset
SUBSET_SEED_KEY = 'fewshot.seed'  # not an mmseg key: the permutation the subset is cut from
WARMUP_KEY = 'lr_config.warmup_iters'
WEIGHTS_KEY = 'model.backbone.pretrained'
ALGORITHMS = ('grid', 'random', 'optuna')

TOP_KEYS = {'name', 'base_config', 'data_root', 'generate_data', 'parameters', 'overrides',
            'derived', 'repeats', 'fewshot', 'search', 'early_stopping', 'resources',
            'fault_tolerance', 'grouping', 'tracking', 'output', 'references'}
SECTION_KEYS = {
    'derived': {'channels_follow_in_channels', 'iterations', 'warmup', 'evaluations'},
    'derived.iterations': {'at_full_data', 'min'},
    'derived.warmup': {'ratio', 'max'},
    'fewshot': {'seed', 'seeds'},
    'references': {'label', 'percent', 'where', 'points'},
    'search': {'algorithm', 'num_samples', 'metric', 'mode', 'seed'},
    'early_stopping': {'asha'},
    'early_stopping.asha': {'grace_period', 'reduction_factor'},
    'resources': {'workers_per_trial', 'cpus_per_worker', 'gpus_per_worker',
                  'max_concurrent_trials'},
    'fault_tolerance': {'worker_retries'},
    'grouping': {'enabled', 'memory_gb'},
    'tracking': {'uri', 'experiment'},
    'generate_data': {'num_classes', 'num_train', 'num_val', 'size', 'seed'},
}


@dataclass(frozen=True)
class Param:
    """One searched value: its key as written in the file, its distribution and arguments."""
    key: str
    kind: str
    values: tuple


@dataclass
class SweepSpec:
    source: str
    name: str
    base_config: str
    params: list
    data_root: str = None
    generate_data: dict = None
    channels_follow_in_channels: bool = True
    iterations_at_full_data: int = None
    iterations_min: int = 1
    warmup_ratio: float = None
    warmup_max: int = None
    evaluations: int = 3
    repeats: int = 1
    fewshot_seeds: tuple = (0,)
    overrides: dict = None
    references: dict = None
    algorithm: str = 'grid'
    num_samples: int = 1
    metric: str = 'mIoU'
    mode: str = 'max'
    search_seed: int = 0
    asha: dict = None
    workers_per_trial: int = 1
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    max_concurrent_trials: int = None
    worker_retries: int = 2
    grouping: bool = True
    grouping_memory_gb: float = None  # None: the GPU's memory less the model's (grouping.py)
    tracking_uri: str = None
    experiment: str = None
    output: str = 'runs'


def _err(source, key, value, allowed):
    return ConfigError(f'{source}: {key}: {value!r}: {allowed}')


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _check_keys(source, section, mapping, allowed):
    if not isinstance(mapping, dict):
        raise _err(source, section, mapping, 'expected a mapping')
    for k in mapping:
        if k not in allowed:
            raise _err(source, f'{section}.{k}' if section else k, mapping[k],
                       f'unknown key; allowed: {", ".join(sorted(allowed))}')


def _get(source, section, mapping, key, check, allowed, default=None):
    if key not in mapping or mapping[key] is None:
        return default
    value = mapping[key]
    if not check(value):
        raise _err(source, f'{section}.{key}' if section else key, value, allowed)
    return value


def _lookup(cfg_dict, dotted):
    """Value at a dotted mmseg config path (list items by index); KeyError when absent."""
    node = cfg_dict
    for part in dotted.split('.'):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def _type_ok(base, value):
    if base is None:
        return True
    if isinstance(base, bool):
        return isinstance(value, bool)
    if isinstance(base, int):
        return _int(value)
    if isinstance(base, float):
        return _num(value)
    if isinstance(base, str):
        return isinstance(value, str)
    if isinstance(base, (list, tuple)):
        return isinstance(value, (list, tuple))
    if isinstance(base, dict):
        return isinstance(value, dict)
    return True


def _parse_param(source, key, body, base_cfg):
    where = f'parameters.{key}'
    if not isinstance(body, dict) or len(body) != 1 or next(iter(body)) not in DISTRIBUTIONS:
        raise _err(source, where, body, f'expected one of {{{", ".join(DISTRIBUTIONS)}: ...}}')
    kind, values = next(iter(body.items()))
    where = f'{where}.{kind}'
    if kind in ('grid', 'choice'):
        if not isinstance(values, list) or not values:
            raise _err(source, where, values, 'expected a non-empty list of values')
    else:
        if not (isinstance(values, list) and len(values) == 2 and all(map(_num, values))
                and values[0] < values[1]):
            raise _err(source, where, values, 'expected [low, high] numbers with low < high')
        if kind == 'loguniform' and values[0] <= 0:
            raise _err(source, where, values, 'loguniform needs low > 0')
        if kind == 'randint' and not all(map(_int, values)):
            raise _err(source, where, values, 'randint needs integers [low, high)')
    if key == SUBSET_SEED_KEY:
        raise _err(source, f'parameters.{key}', body, 'subset seeds are listed, not searched: '
                   'fewshot: {seeds: [0, 1, 2]}')
    if key == FRACTION_KEY:
        for v in values:  # grid/choice points, or the [low, high] of a distribution
            if not _num(v) or not 0 < v <= 1:
                raise _err(source, where, v, 'few-shot fractions must be numbers in (0, 1]')
        if kind in ('randint', 'loguniform') and values[0] <= 0:
            raise _err(source, where, values, 'few-shot fractions must be in (0, 1]')
        return Param(key, kind, tuple(values))
    try:
        base = _lookup(base_cfg, key)
    except KeyError:
        raise _err(source, f'parameters.{key}', body,
                   'not a key of the base config (use its dotted path, e.g. '
                   'model.decode_head.num_convs)') from None
    points = values if kind in ('grid', 'choice') else []
    for v in points:
        if not _type_ok(base, v):
            raise _err(source, where, v, f'expected {type(base).__name__} like the base '
                       f'config value {base!r}')
    if kind in ('uniform', 'loguniform') and (isinstance(base, bool) or _int(base)
                                              or isinstance(base, str)):
        raise _err(source, where, values, f'{kind} gives floats, but the base config value is '
                   f'{base!r} ({type(base).__name__})')
    if kind == 'randint' and not _int(base) and base is not None:
        raise _err(source, where, values, f'randint gives integers, but the base config value '
                   f'is {base!r} ({type(base).__name__})')
    return Param(key, kind, tuple(values))


def load_base_config(path, source):
    """The base mmseg config (mmcv's own loader; its _base_ chain included).

    Only mmcv's Config is needed here, not mmseg: the driver stays light (mmseg adds ~5 s).
    """
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # mmcv 1.x's import-time "MMCV v2.0.0" notice
        from mmcv import Config
    if not osp.isfile(path):
        raise _err(source, 'base_config', path, 'file not found')
    try:
        return Config.fromfile(path)
    except Exception as e:
        raise _err(source, 'base_config', path, f'cannot load: {e}') from e


def load_spec(path):
    """Parse and validate a search-space file. Returns (SweepSpec, base mmcv Config)."""
    source = str(path)
    if not osp.isfile(source):
        raise ConfigError(f'{source}: file not found')
    try:
        with open(source) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f'line {mark.line + 1}, column {mark.column + 1}: ' if mark else ''
        problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
        raise ConfigError(f'{source}: {where}invalid YAML: {problem}') from None
    if not isinstance(raw, dict):
        raise _err(source, '(top level)', raw, 'expected a mapping of sweep settings')
    _check_keys(source, '', raw, TOP_KEYS)
    for req in ('base_config', 'parameters'):
        if req not in raw:
            raise _err(source, req, None, 'required')
    here = osp.dirname(osp.abspath(source))

    def rel(p):
        return p if osp.isabs(p) else osp.normpath(osp.join(here, p))

    name = check_sweep_name(source, 'name', raw.get('name') if raw.get('name') is not None
                            else osp.splitext(osp.basename(source))[0])
    base_path = _get(source, '', raw, 'base_config', lambda v: isinstance(v, str), 'a path')
    base_cfg = load_base_config(rel(base_path), source)
    base_dict = base_cfg._cfg_dict.to_dict()

    params_raw = raw['parameters']
    if not isinstance(params_raw, dict) or not params_raw:
        raise _err(source, 'parameters', params_raw, 'expected a non-empty mapping of '
                   'dotted config keys to distributions')
    params = [_parse_param(source, str(k), v, base_dict) for k, v in params_raw.items()]

    spec = SweepSpec(source=source, name=name, base_config=rel(base_path), params=params)
    data_root = _get(source, '', raw, 'data_root', lambda v: isinstance(v, str), 'a path')
    spec.data_root = rel(data_root) if data_root else None

    gen = raw.get('generate_data')
    if gen is not None:
        _check_keys(source, 'generate_data', gen, SECTION_KEYS['generate_data'])
        for k, v in gen.items():
            if not _int(v) or v < (0 if k == 'seed' else 1):
                raise _err(source, f'generate_data.{k}', v, 'expected a positive integer')
        spec.generate_data = dict(gen)

    derived = raw.get('derived') or {}
    _check_keys(source, 'derived', derived, SECTION_KEYS['derived'])
    spec.channels_follow_in_channels = _get(
        source, 'derived', derived, 'channels_follow_in_channels',
        lambda v: isinstance(v, bool), 'true or false', True)
    iters = derived.get('iterations')
    if iters is not None:
        _check_keys(source, 'derived.iterations', iters, SECTION_KEYS['derived.iterations'])
        spec.iterations_at_full_data = _get(source, 'derived.iterations', iters, 'at_full_data',
                                            lambda v: _int(v) and v > 0, 'a positive integer')
        spec.iterations_min = _get(source, 'derived.iterations', iters, 'min',
                                   lambda v: _int(v) and v > 0, 'a positive integer', 1)
        if spec.iterations_at_full_data is None:
            raise _err(source, 'derived.iterations.at_full_data', None, 'required')
    warmup = derived.get('warmup')
    if warmup is not None:
        _check_keys(source, 'derived.warmup', warmup, SECTION_KEYS['derived.warmup'])
        spec.warmup_ratio = _get(source, 'derived.warmup', warmup, 'ratio',
                                 lambda v: _num(v) and 0 < v <= 1, 'a number in (0, 1]')
        if spec.warmup_ratio is None:
            raise _err(source, 'derived.warmup.ratio', None, 'required')
        spec.warmup_max = _get(source, 'derived.warmup', warmup, 'max',
                               lambda v: _int(v) and v > 0, 'a positive integer')
    spec.evaluations = _get(source, 'derived', derived, 'evaluations',
                            lambda v: _int(v) and v > 0, 'a positive integer', 3)

    spec.repeats = _get(source, '', raw, 'repeats', lambda v: _int(v) and v > 0,
                        'a positive integer', 1)
    fewshot = raw.get('fewshot') or {}
    _check_keys(source, 'fewshot', fewshot, SECTION_KEYS['fewshot'])
    if 'seed' in fewshot and 'seeds' in fewshot:
        raise _err(source, 'fewshot.seeds', fewshot['seeds'], 'give seed or seeds, not both')
    seed = _get(source, 'fewshot', fewshot, 'seed', _int, 'an integer', 0)
    seeds = _get(source, 'fewshot', fewshot, 'seeds',
                 lambda v: isinstance(v, list) and v and all(map(_int, v)) and
                 len(set(v)) == len(v), 'a non-empty list of distinct integers', [seed])
    spec.fewshot_seeds = tuple(seeds)
    spec.overrides = _parse_overrides(source, raw.get('overrides'), base_dict)
    spec.references = _parse_references(source, raw.get('references'), params)

    search = raw.get('search') or {}
    _check_keys(source, 'search', search, SECTION_KEYS['search'])
    spec.algorithm = _get(source, 'search', search, 'algorithm', lambda v: v in ALGORITHMS,
                          f'one of {", ".join(ALGORITHMS)}', 'grid')
    spec.num_samples = _get(source, 'search', search, 'num_samples', lambda v: _int(v) and v > 0,
                            'a positive integer', 1)
    spec.metric = _get(source, 'search', search, 'metric', lambda v: isinstance(v, str),
                       'a metric name such as mIoU', 'mIoU')
    spec.mode = _get(source, 'search', search, 'mode', lambda v: v in ('max', 'min'),
                     'max or min', 'max')
    spec.search_seed = _get(source, 'search', search, 'seed', _int, 'an integer', 0)
    continuous = [p.key for p in params if p.kind not in ('grid', 'choice')]
    if spec.algorithm == 'grid' and continuous:
        raise _err(source, 'search.algorithm', 'grid', f'grid search cannot sample '
                   f'{", ".join(continuous)}; use algorithm: random or optuna')
    if spec.algorithm == 'optuna':
        grids = [p.key for p in params if p.kind == 'grid']
        if grids:
            raise _err(source, 'search.algorithm', 'optuna', f'Optuna samples, it does not '
                       f'enumerate grids: write choice instead of grid for {", ".join(grids)}')
        if len(spec.fewshot_seeds) > 1:
            raise _err(source, 'fewshot.seeds', list(spec.fewshot_seeds), 'Optuna samples, it '
                       'does not enumerate subset seeds: give one seed')

    stop = raw.get('early_stopping')
    if stop is not None:
        _check_keys(source, 'early_stopping', stop, SECTION_KEYS['early_stopping'])
        asha = stop.get('asha') or {}
        _check_keys(source, 'early_stopping.asha', asha, SECTION_KEYS['early_stopping.asha'])
        spec.asha = dict(
            grace_period=_get(source, 'early_stopping.asha', asha, 'grace_period',
                              lambda v: _int(v) and v > 0, 'a positive number of iterations', 1),
            reduction_factor=_get(source, 'early_stopping.asha', asha, 'reduction_factor',
                                  lambda v: _num(v) and v > 1, 'a number > 1', 2))

    res = raw.get('resources') or {}
    _check_keys(source, 'resources', res, SECTION_KEYS['resources'])
    spec.workers_per_trial = _get(source, 'resources', res, 'workers_per_trial',
                                  lambda v: _int(v) and v > 0, 'a positive integer', 1)
    spec.cpus_per_worker = _get(source, 'resources', res, 'cpus_per_worker',
                                lambda v: _num(v) and v > 0, 'a number > 0', 1)
    # A worker is one training process driving one device (mmseg's DDP: one rank per GPU); Ray
    # shares a GPU between workers in fractions of one. More GPUs per trial: more workers.
    spec.gpus_per_worker = _get(source, 'resources', res, 'gpus_per_worker',
                                lambda v: _num(v) and 0 <= v <= 1,
                                'a fraction in [0, 1]: a worker is one process training on one '
                                'GPU (workers share a GPU below 1); for more GPUs per trial, '
                                'raise workers_per_trial', 0)
    if 0 < spec.gpus_per_worker < 1 and spec.workers_per_trial > 1:
        raise _err(source, 'resources.gpus_per_worker', spec.gpus_per_worker,
                   'a fraction of a GPU needs workers_per_trial: 1 (NCCL cannot run two ranks '
                   'of one trial on one GPU)')
    spec.max_concurrent_trials = _get(source, 'resources', res, 'max_concurrent_trials',
                                      lambda v: _int(v) and v > 0, 'a positive integer')

    faults = raw.get('fault_tolerance') or {}
    _check_keys(source, 'fault_tolerance', faults, SECTION_KEYS['fault_tolerance'])
    spec.worker_retries = _get(source, 'fault_tolerance', faults, 'worker_retries',
                               lambda v: _int(v) and v >= 0, 'an integer >= 0', 2)

    grouping = raw.get('grouping') or {}
    _check_keys(source, 'grouping', grouping, SECTION_KEYS['grouping'])
    spec.grouping = _get(source, 'grouping', grouping, 'enabled', lambda v: isinstance(v, bool),
                         'true or false', True)
    spec.grouping_memory_gb = _get(source, 'grouping', grouping, 'memory_gb',
                                   lambda v: _num(v) and v > 0, 'a number of GB > 0', None)

    track = raw.get('tracking') or {}
    _check_keys(source, 'tracking', track, SECTION_KEYS['tracking'])
    spec.tracking_uri = _get(source, 'tracking', track, 'uri', lambda v: isinstance(v, str),
                             'a URI such as sqlite:////abs/mlflow.db or http://127.0.0.1:5000')
    spec.experiment = _get(source, 'tracking', track, 'experiment',
                           lambda v: isinstance(v, str) and v.strip(), 'a name', name)
    # A path, not a URI: workers on every node write their checkpoints and logs under it
    output = _get(source, '', raw, 'output', lambda v: isinstance(v, str) and '://' not in v,
                  'a filesystem path (on a multi-node cluster, one every node mounts)')
    spec.output = rel(output) if output else osp.abspath('runs')

    _check_head_combinations(spec, base_dict)
    return spec, base_cfg


def check_sweep_name(source, key, name):
    """A sweep's name is one directory under the output root (and the MLflow parent run's name):
    a name of '..' or a path would put the sweep, and the files the driver clears, elsewhere."""
    if not (isinstance(name, str) and name.strip() and name not in ('.', '..')
            and not any(c in name for c in '/\\\0')):
        raise _err(source, key, name, 'a non-empty name of one directory under the output root '
                   '(no "/", not "." or "..")')
    return name


def _parse_overrides(source, raw, base_dict):
    """Fixed values for every trial (a checkpoint path, a batch size), by dotted key. A relative
    ``model.backbone.pretrained`` means the directory the sweep is started from, as with mmseg's
    tools/train.py; it is made absolute here, since workers run elsewhere."""
    overrides = {}
    if raw is not None:
        if not isinstance(raw, dict):
            raise _err(source, 'overrides', raw, 'expected a mapping of dotted config keys to '
                       'values')
        for key, value in raw.items():
            try:
                base = _lookup(base_dict, str(key))
            except KeyError:
                if key == WEIGHTS_KEY and 'backbone' in base_dict.get('model', {}):
                    base = None  # a constructor default the base config leaves out
                else:
                    raise _err(source, f'overrides.{key}', value, 'not a key of the base config '
                               '(use its dotted path, e.g. model.backbone.pretrained)') from None
            if not _type_ok(base, value):
                raise _err(source, f'overrides.{key}', value, f'expected '
                           f'{type(base).__name__} like the base config value {base!r}')
            overrides[str(key)] = value
    try:
        weights = overrides.get(WEIGHTS_KEY, _lookup(base_dict, WEIGHTS_KEY))
    except KeyError:
        weights = None
    if isinstance(weights, str) and not osp.isabs(weights):
        overrides[WEIGHTS_KEY] = osp.abspath(weights)
    return overrides


def _parse_references(source, raw, params):
    """Published numbers the report draws beside a head variant's curve: ``points`` maps a data
    fraction to the published metric, ``where`` names the setting they belong to."""
    if raw is None:
        return None
    _check_keys(source, 'references', raw, SECTION_KEYS['references'])
    label = _get(source, 'references', raw, 'label', lambda v: isinstance(v, str) and v.strip(),
                 'a name for the legend', 'published')
    percent = _get(source, 'references', raw, 'percent', lambda v: isinstance(v, bool),
                   'true or false', False)
    where = raw.get('where') or {}
    searched = {p.key for p in params}
    if not isinstance(where, dict):
        raise _err(source, 'references.where', where, 'expected a mapping of searched keys to '
                   'values')
    for key, value in where.items():
        if key not in searched:
            raise _err(source, f'references.where.{key}', value, 'not a searched key '
                       f'(searched: {", ".join(sorted(searched))})')
    points = raw.get('points')
    if not (isinstance(points, dict) and points and all(
            _num(f) and 0 < f <= 1 and _num(v) for f, v in points.items())):
        raise _err(source, 'references.points', points, 'expected a mapping of data fractions '
                   'in (0, 1] to published values')
    scale = 0.01 if percent else 1.0
    return dict(label=label, where=dict(where),
                points={float(f): float(v) * scale for f, v in points.items()})


def check_weights_path(cfg, source='config'):
    """A backbone weight file that is not there fails now, not after the sweep has started."""
    weights = cfg.model.get('backbone', {}).get('pretrained')
    if isinstance(weights, str) and not osp.isfile(weights):
        raise ConfigError(f'{source}: {WEIGHTS_KEY}: file not found: {weights} (set it with '
                          f'overrides: {{{WEIGHTS_KEY}: /path/to/weights}})')


def _check_head_combinations(spec, base_dict):
    """FCNHead rejects num_convs=0 unless in_channels == channels; catch it before any work."""
    head = base_dict.get('model', {}).get('decode_head', {})
    grid = {p.key: p.values for p in spec.params if p.kind in ('grid', 'choice')}
    nc_key, ch_key, in_key = (f'model.decode_head.{k}' for k in
                              ('num_convs', 'channels', 'in_channels'))
    for num_convs in grid.get(nc_key, (head.get('num_convs', 2),)):
        if num_convs != 0 or spec.channels_follow_in_channels:
            continue
        for channels in grid.get(ch_key, (head.get('channels'),)):
            for in_channels in grid.get(in_key, (head.get('in_channels'),)):
                if channels != in_channels:
                    raise _err(spec.source, 'parameters.' + nc_key, 0,
                               f'FCNHead with num_convs=0 needs channels == in_channels, got '
                               f'channels={channels}, in_channels={in_channels} (set '
                               f'derived.channels_follow_in_channels: true)')
    for num_convs in grid.get(nc_key, ()):
        if not _int(num_convs) or num_convs < 0:
            raise _err(spec.source, 'parameters.' + nc_key, num_convs, 'FCNHead needs an integer '
                       'num_convs >= 0')


def check_data_paths(cfg, source='config'):
    """Fail before any work when a dataset directory is missing, naming the key and the path."""
    for split in ('train', 'val'):
        ds = cfg.data.get(split)
        if ds is None:
            continue
        for d in ds if isinstance(ds, (list, tuple)) else [ds]:
            root = d.get('data_root')
            for key in ('img_dir', 'ann_dir'):
                rel = d.get(key)
                if rel is None:
                    continue
                path = rel if (osp.isabs(rel) or root is None) else osp.join(root, rel)
                if not osp.isdir(path):
                    raise ConfigError(
                        f'{source}: data.{split}.{key}: directory not found: {osp.abspath(path)}')


def iterations_for(spec, fraction, base_iters):
    """InternVL's few-shot recipe: training length proportional to the data fraction."""
    if spec.iterations_at_full_data is None:
        return base_iters
    return max(spec.iterations_min, int(math.ceil(spec.iterations_at_full_data * fraction)))


def warmup_for(spec, iters):
    """InternVL's few-shot warmup: 2 % of the iterations (100 at 5k ... 800 at 40k), at most
    1500 (80k) -- ``derived.warmup: {ratio: 0.02, max: 1500}``. None: the base config's."""
    if spec.warmup_ratio is None:
        return None
    warmup = max(1, int(round(spec.warmup_ratio * iters)))
    return min(warmup, spec.warmup_max) if spec.warmup_max else warmup

