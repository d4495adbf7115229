"""Search-space YAML -> a validated SweepSpec. Nothing in the file is executed (yaml.safe_load).

The file's format (keys, types, ranges, defaults) is declared in spec_format.py; this module adds
what needs the base mmseg config or several sections at once, and resolves paths. Every error is
a ConfigError naming the file, the key path and the value, raised before Ray, MLflow or any output
directory is touched. The format is documented in search_spaces/README.md.
"""
import dataclasses
import os.path as osp
import typing
from dataclasses import dataclass

import pydantic
import yaml

from orchestrator.errors import ConfigError
from orchestrator.keys import FRACTION_KEY, SUBSET_SEED_KEY, WEIGHTS_KEY
from orchestrator.spec_format import SWEEP_NAME, SpaceFile, is_sweep_name



@dataclass(frozen=True)
class Param:
    """One searched value: its key as written in the file, its distribution and arguments."""
    key: str
    kind: str
    values: tuple


# the file's keys read through what is resolved from them (their raw text stays in spec.file)
RESOLVED = {'parameters': 'params', 'fewshot': 'fewshot_seeds (or file.fewshot)'}


@dataclass(kw_only=True)
class SweepSpec:
    """The sweep as the program reads it. ``file`` is the space file's validated model
    (spec_format.SpaceFile: every key's type, range and default, the one schema), its paths made
    absolute; its sections read as attributes of the same names (``spec.resources.
    workers_per_trial``, as the file says ``resources: {workers_per_trial: ...}``). Resolved
    here: the name, the searched values checked against the base config (``params``), the fixed
    overrides, the subset seeds, the references' points, the output root, the experiment (these
    shadow the file's raw keys of the same names, which stay in ``spec.file``)."""
    file: SpaceFile
    source: str
    name: str
    output: str
    params: list
    overrides: dict
    references: typing.Optional[dict]
    fewshot_seeds: tuple
    fewshot_seed_given: bool  # the file names the subset seed(s); else a max_image_num base
    # config's subset follows the run's seed, as InternVL's (plan.resolve)
    experiment: str  # tracking.experiment, else the file's name (not --name's)
    base_fraction: typing.Optional[float] = None  # the fraction a base config's max_image_num
    # keeps, with no fraction searched (plan.settle_base_fraction; None: none, or not known yet)

    def __getattr__(self, name):  # the file's sections and keys, by their names in the file
        file = self.__dict__.get('file')
        if file is None or name.startswith('_') or name in RESOLVED:
            raise AttributeError(f'SweepSpec.{name}' + (f': read {RESOLVED[name]}'
                                                        if name in RESOLVED else ''))
        return getattr(file, name)

    def replaced(self, section, **values):
        """A copy with ``values`` in one section of the file (``--no-grouping``; a test's
        variant of a shipped space file)."""
        changed = getattr(self.file, section).model_copy(update=values)
        return dataclasses.replace(self, file=self.file.model_copy(update={section: changed}))


def _err(source, key, value, allowed):
    return ConfigError(f'{source}: {key}: {value!r}: {allowed}')


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _int(x):
    return isinstance(x, int) and not isinstance(x, bool)


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


def _parse_param(source, key, distribution, base_cfg):
    """One searched value, checked against the base config (its format is spec_format's)."""
    kind, values = next(iter(distribution.model_dump().items()))
    body = {kind: list(values)}
    values = list(values)
    where = f'parameters.{key}.{kind}'
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


def _read_yaml(source):
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
    return raw


def _model_at(parts):
    """The section model at a key path of the file (to list its keys)."""
    model = SpaceFile
    for part in parts:
        annotation = model.model_fields[part].annotation
        model = next(a for a in (annotation, *typing.get_args(annotation))
                     if isinstance(a, type) and issubclass(a, pydantic.BaseModel))
    return model


def _format_error(source, raw, error):
    """pydantic's first complaint as our one line: file, key path, the value as written, and
    what is allowed (the constraint's description)."""
    parts = []
    for part in error['loc']:
        if not isinstance(part, str):
            break  # an item of a [low, high] pair or a list: name the whole value
        if not parts or parts[-1] != part:  # a distribution's tag and its field share a name
            parts.append(part)
    value = raw
    for part in parts:
        value = value.get(part) if isinstance(value, dict) else None
    kind = error['type']
    if kind == 'missing':
        allowed = 'required'
    elif kind == 'extra_forbidden':
        allowed = f'unknown key; allowed: {", ".join(sorted(_model_at(parts[:-1]).model_fields))}'
    elif kind in ('model_type', 'dict_type'):
        allowed = 'expected a mapping'
    else:
        allowed = error['msg']
    return _err(source, '.'.join(parts), value, allowed)


def _read_file(source):
    raw = _read_yaml(source)
    try:
        return SpaceFile.model_validate(raw)
    except pydantic.ValidationError as e:
        raise _format_error(source, raw, e.errors()[0]) from None


def load_spec(path):
    """Parse and validate a search-space file. Returns (SweepSpec, base mmcv Config)."""
    source = str(path)
    file = _read_file(source)
    here = osp.dirname(osp.abspath(source))

    def rel(p):
        return p if osp.isabs(p) else osp.normpath(osp.join(here, p))

    name = file.name or check_sweep_name(source, 'name', osp.splitext(osp.basename(source))[0])
    base_cfg = load_base_config(rel(file.base_config), source)
    base_dict = base_cfg._cfg_dict.to_dict()
    params = [_parse_param(source, k, v, base_dict) for k, v in file.parameters.items()]
    cache = file.val_feature_cache
    absolute = file.model_copy(update=dict(
        base_config=rel(file.base_config), data_root=file.data_root and rel(file.data_root),
        val_feature_cache=cache.model_copy(update=dict(
            disk_dir=cache.disk_dir and rel(cache.disk_dir)))))
    spec = SweepSpec(
        file=absolute, source=source, name=name,
        output=rel(file.output) if file.output else osp.abspath('runs'), params=params,
        overrides=_parse_overrides(source, file.overrides, base_dict),
        references=_parse_references(source, file.references, params),
        fewshot_seeds=tuple(file.fewshot.seeds or [file.fewshot.seed]),
        fewshot_seed_given=bool({'seed', 'seeds'} & file.fewshot.model_fields_set),
        experiment=file.tracking.experiment or name)
    _check_rules(spec, file)
    _check_head_combinations(spec, base_dict)
    return spec, base_cfg


def _check_rules(spec, file):
    """What one section cannot say alone."""
    source = spec.source
    if 'seed' in file.fewshot.model_fields_set and file.fewshot.seeds is not None:
        raise _err(source, 'fewshot.seeds', file.fewshot.seeds, 'give seed or seeds, not both')
    continuous = [p.key for p in spec.params if p.kind not in ('grid', 'choice')]
    if spec.search.algorithm == 'grid' and continuous:
        raise _err(source, 'search.algorithm', 'grid', f'grid search cannot sample '
                   f'{", ".join(continuous)}; use algorithm: random or optuna')
    if spec.search.algorithm == 'optuna':
        grids = [p.key for p in spec.params if p.kind == 'grid']
        if grids:
            raise _err(source, 'search.algorithm', 'optuna', f'Optuna samples, it does not '
                       f'enumerate grids: write choice instead of grid for {", ".join(grids)}')
        if len(spec.fewshot_seeds) > 1:
            raise _err(source, 'fewshot.seeds', list(spec.fewshot_seeds), 'Optuna samples, it '
                       'does not enumerate subset seeds: give one seed')
        if spec.repeats > 1:
            raise _err(source, 'repeats', spec.repeats, 'Optuna samples, it does not repeat a '
                       'configuration: leave repeats at 1 (num_samples sets the trials)')
    if 0 < spec.resources.gpus_per_worker < 1 and spec.resources.workers_per_trial > 1:
        raise _err(source, 'resources.gpus_per_worker', spec.resources.gpus_per_worker,
                   'a fraction of a GPU needs workers_per_trial: 1 (NCCL cannot run two ranks '
                   'of one trial on one GPU)')


def check_sweep_name(source, key, name):
    """The name from the file name or ``--name`` (spec_format.is_sweep_name says why)."""
    if not is_sweep_name(name):
        raise _err(source, key, name, SWEEP_NAME)
    return name


def _parse_overrides(source, raw, base_dict):
    """Fixed values for every trial (a checkpoint path, a batch size), by dotted key. A relative
    ``model.backbone.pretrained`` means the directory the sweep is started from, as with mmseg's
    tools/train.py; it is made absolute here, since workers run elsewhere."""
    overrides = {}
    if raw is not None:
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


def _parse_references(source, refs, params):
    """Published numbers the report draws beside a head variant's curve: ``points`` maps a data
    fraction to the published metric, ``where`` names the setting they belong to."""
    if refs is None:
        return None
    searched = {p.key for p in params}
    for key, value in refs.where.items():
        if key not in searched:
            raise _err(source, f'references.where.{key}', value, 'not a searched key '
                       f'(searched: {", ".join(sorted(searched))})')
    scale = 0.01 if refs.percent else 1.0
    return dict(label=refs.label, where=dict(refs.where),
                points={float(f): float(v) * scale for f, v in refs.points.items()})


def _check_head_combinations(spec, base_dict):
    """FCNHead rejects num_convs=0 unless in_channels == channels; catch it before any work."""
    head = base_dict.get('model', {}).get('decode_head', {})
    grid = {p.key: p.values for p in spec.params if p.kind in ('grid', 'choice')}
    nc_key, ch_key, in_key = (f'model.decode_head.{k}' for k in
                              ('num_convs', 'channels', 'in_channels'))
    for num_convs in grid.get(nc_key, (head.get('num_convs', 2),)):
        if num_convs != 0 or spec.derived.channels_follow_in_channels:
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
