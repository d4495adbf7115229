"""The search-space file's format, declared once: keys, types, ranges and defaults (pydantic).

It validates a file's structure (unknown keys, types, ranges, required keys) and is the source of
``search_spaces/schema.json`` (``orchestrator schema``), which editors use to complete and check
space files. What needs the base mmseg config (a key exists there, a value has its type) or several
sections at once (grid vs Optuna) is checked in ``spec.py`` after this. Each constraint's
``description`` is the "allowed" part of the one-line error, so the words a user reads on an error
and on an editor's hover are the same.
"""
import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BeforeValidator, BaseModel, ConfigDict, Discriminator, Field, StrictBool,
                      StrictFloat, StrictInt, StrictStr, Tag, ValidationError, WithJsonSchema,
                      WrapValidator,
                      model_validator)
from pydantic_core import PydanticCustomError


def allowed(text, tp, check=None):
    """A value type whose every failure reads ``text`` (also its JSON-schema description)."""
    def validate(value, handler):
        try:
            value = handler(value)
        except ValidationError:
            raise PydanticCustomError('allowed', text) from None
        if check is not None and not check(value):
            raise PydanticCustomError('allowed', text)
        return value
    return Annotated[tp, WrapValidator(validate), Field(description=text)]


def shaped(text, tp, check):
    """A container whose own shape failing reads ``text``; its items report their own errors."""
    def validate(value):
        if not check(value):
            raise PydanticCustomError('allowed', text)
        return value
    return Annotated[tp, BeforeValidator(validate), Field(description=text)]


def number(**bounds):
    """An int or float (YAML writes both; bools are not numbers), within ``bounds`` (gt, ge, le)."""
    names = dict(gt='exclusiveMinimum', ge='minimum', le='maximum')
    return Annotated[Union[StrictInt, StrictFloat], Field(**bounds),
                     WithJsonSchema({'type': 'number', **{names[k]: v for k, v in bounds.items()}})]


Number = number()
# The value types of the format, each with the words its error (and an editor's hover) uses
PositiveInt = allowed('a positive integer', Annotated[StrictInt, Field(gt=0)])
IterationCount = allowed('a positive number of iterations', Annotated[StrictInt, Field(gt=0)])
Count = allowed('an integer >= 0', Annotated[StrictInt, Field(ge=0)])
Integer = allowed('an integer', StrictInt)
Flag = allowed('true or false', StrictBool)
Path = allowed('a path', StrictStr)
Name = allowed('a name', Annotated[StrictStr, Field(pattern=r'\S')])
Label = allowed('a name for the legend', Annotated[StrictStr, Field(pattern=r'\S')])
Ratio = allowed('a number in (0, 1]', number(gt=0, le=1))
Positive = allowed('a number > 0', number(gt=0))
Gigabytes = allowed('a number of GB > 0', number(gt=0))
Budget = allowed('a number of GB >= 0 (0: not used)', number(ge=0))
ReductionFactor = allowed('a number > 1', number(gt=1))
# A worker is one training process driving one device (mmseg's DDP: one rank per GPU); Ray shares
# a GPU between workers in fractions of one. More GPUs per trial: more workers.
GpuShare = allowed('a fraction in [0, 1]: a worker is one process training on one GPU (workers '
                   'share a GPU below 1); for more GPUs per trial, raise workers_per_trial',
                   number(ge=0, le=1))
Seeds = allowed('a non-empty list of distinct integers',
                Annotated[list[StrictInt], Field(min_length=1)], lambda v: len(set(v)) == len(v))
Algorithm = allowed('one of grid, random, optuna', Literal['grid', 'random', 'optuna'])
Mode = allowed('max or min', Literal['max', 'min'])
Metric = allowed('a metric name such as mIoU', StrictStr)
TrackingUri = allowed('a URI such as sqlite:////abs/mlflow.db or http://127.0.0.1:5000', StrictStr)
# A path, not a URI: workers on every node write their checkpoints and logs under it
OutputPath = allowed('a filesystem path (on a multi-node cluster, one every node mounts)',
                     StrictStr, lambda v: '://' not in v)
KeyValues = allowed('expected a mapping of dotted config keys to values', dict[str, Any])
Where = allowed('expected a mapping of searched keys to values', dict[str, Any])
Published = allowed('expected a mapping of data fractions in (0, 1] to published values',
                    Annotated[dict[Number, Number], Field(min_length=1)],
                    lambda v: all(0 < f <= 1 for f in v))


class Section(BaseModel):
    """A mapping with fixed keys; ``key: null`` means the key's default, as if left out."""
    model_config = ConfigDict(extra='forbid', frozen=True)

    @model_validator(mode='before')
    @classmethod
    def _null_is_default(cls, data):
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


def _section(cls):
    """A section that may be left out (or null): its defaults."""
    return Field(default_factory=cls, description=(cls.__doc__ or '').strip())


SWEEP_NAME = ('a non-empty name of one directory under the output root (no "/", not "." or '
              '"..")')


def is_sweep_name(name):
    """A sweep's name is one directory under the output root (and the MLflow parent run's name):
    a name of '..' or a path would put the sweep, and the files the driver clears, elsewhere."""
    return (isinstance(name, str) and bool(name.strip()) and name not in ('.', '..')
            and not any(c in name for c in '/\\\0'))


SweepName = allowed(SWEEP_NAME, StrictStr, is_sweep_name)


# --- parameters: one distribution per dotted config key ------------------------------------

def _bounds(kind):
    def check(v):
        low, high = v
        return low < high and (kind != 'loguniform' or low > 0)
    text = {'loguniform': 'expected [low, high] numbers with low < high; loguniform needs low > 0',
            'randint': 'expected [low, high) integers with low < high'}.get(
                kind, 'expected [low, high] numbers with low < high')
    value = tuple[StrictInt, StrictInt] if kind == 'randint' else tuple[Number, Number]
    return allowed(text, value, check)


Points = allowed('expected a non-empty list of values', Annotated[list, Field(min_length=1)])


class Grid(Section):
    """Every value, crossed with the other grids (Tune's grid_search)."""
    grid: Points


class Choice(Section):
    """One of the values, sampled num_samples times."""
    choice: Points


class Uniform(Section):
    uniform: _bounds('uniform')


class LogUniform(Section):
    loguniform: _bounds('loguniform')


class RandInt(Section):
    randint: _bounds('randint')


DISTRIBUTION_MODELS = {'grid': Grid, 'choice': Choice, 'uniform': Uniform,
                       'loguniform': LogUniform, 'randint': RandInt}
DISTRIBUTIONS = tuple(DISTRIBUTION_MODELS)


def _distribution_of(value):
    return next(iter(value)) if isinstance(value, dict) and len(value) == 1 else None


Distribution = Annotated[
    Union[tuple(Annotated[m, Tag(k)] for k, m in DISTRIBUTION_MODELS.items())],
    Discriminator(_distribution_of, custom_error_type='allowed',
                  custom_error_message=f'expected one of {{{", ".join(DISTRIBUTIONS)}: ...}}')]
Parameters = shaped('expected a non-empty mapping of dotted config keys to distributions',
                    dict[str, Distribution], lambda v: isinstance(v, dict) and len(v) > 0)


# --- sections -------------------------------------------------------------------------------

class Iterations(Section):
    """runner.max_iters = max(min, ceil(at_full_data * fraction))"""
    at_full_data: PositiveInt
    min: PositiveInt = 1


class Warmup(Section):
    """lr_config.warmup_iters = min(max, round(ratio * max_iters))"""
    ratio: Ratio
    max: Optional[PositiveInt] = None


class Derived(Section):
    """Values derived from the searched ones; declared, never evaluated."""
    channels_follow_in_channels: Flag = True
    iterations: Optional[Iterations] = None
    warmup: Optional[Warmup] = None
    evaluations: PositiveInt = 3


class Fewshot(Section):
    """The few-shot subsets: one seed, or a list (each configuration on each seed's subset)."""
    seed: Integer = 0
    seeds: Optional[Seeds] = None


class Search(Section):
    """How Ray Tune walks the space."""
    algorithm: Algorithm = 'grid'
    num_samples: PositiveInt = 1
    metric: Metric = 'mIoU'
    mode: Mode = 'max'
    seed: Integer = 0


class Asha(Section):
    """Tune's ASHA on the metric, one bracket per training schedule (trials compete only with
    trials of the same planned iterations); grace_period counts iterations of the full-data
    schedule and is scaled to each (orchestrator/asha.py)."""
    grace_period: IterationCount = 1
    reduction_factor: ReductionFactor = 2


class EarlyStopping(Section):
    """Stop poor trials early (optional)."""
    asha: Asha = _section(Asha)


class Resources(Section):
    """A trial's workers: one training process (one rank) each."""
    workers_per_trial: PositiveInt = 1
    cpus_per_worker: Positive = 1
    gpus_per_worker: GpuShare = 0
    max_concurrent_trials: Optional[PositiveInt] = None


class FaultTolerance(Section):
    """A trial whose worker dies restarts from its last checkpoint, this many times; a rank
    waits this long in a collective for the others (torch's NCCL default, 10 min, is less
    than rank 0 takes to write a 6B fine-tune's 35 GB checkpoint at 50 MB/s: README)."""
    worker_retries: Count = 2
    collective_timeout_s: Positive = 1800
    # trials waiting while no node can hold a crew (the nodes planned on are gone) stop the
    # sweep, resumable, after this long: an autoscaler's new node has time to arrive
    room_timeout_s: Positive = 600


class FineTuning(Section):
    """A trainable backbone in bfloat16: InternVL's protocol keeps no float32 master weights, so
    updates below half a bfloat16 step round away; true trains through float32 copies in the
    optimizer (more memory per rank: the dry run shows how much)."""
    float32_master_weights: Flag = False


class Grouping(Section):
    """Trial groups: heads sharing one frozen-backbone pass."""
    enabled: Flag = True
    # None: 90 % of the GPU's memory less the frozen model's (grouping.py)
    memory_gb: Optional[Gigabytes] = None


class ValFeatureCache(Section):
    """A frozen backbone's outputs for the validation inputs, computed once per sweep on each
    node and read back by every later evaluation there (the same scores: README): in memory (a
    tmpfs, /dev/shm) up to memory_gb, then on local disk (disk_dir, default the system's temp
    directory on each node) up to disk_gb; a filesystem is never filled past half. Removed at
    the sweep's end."""
    enabled: Flag = True
    memory_gb: Budget = 16
    disk_gb: Budget = 64
    disk_dir: Optional[Path] = None


class Tracking(Section):
    """Where MLflow records the sweep."""
    uri: Optional[TrackingUri] = None
    experiment: Optional[Name] = None


class GenerateData(Section):
    """Generate a synthetic dataset at data_root first (the demo); left out: the generator's
    defaults (mmseg_custom/datasets/synthetic.py)."""
    num_classes: Optional[PositiveInt] = None
    num_train: Optional[PositiveInt] = None
    num_val: Optional[PositiveInt] = None
    size: Optional[PositiveInt] = None
    seed: Optional[Count] = None


class References(Section):
    """Published numbers the report draws beside a head variant's curve."""
    label: Label = 'published'
    percent: Flag = False
    where: Where = {}
    points: Published


class SpaceFile(Section):
    """A sweep: the base mmseg config, the searched values, and how to run and record them.
    Paths are relative to this file."""
    model_config = ConfigDict(extra='forbid', frozen=True, title='Search space',
                              json_schema_extra={'$schema':
                                                 'https://json-schema.org/draft/2020-12/schema'})
    name: Optional[SweepName] = Field(
        None, description='sweep name: the output subdirectory and the MLflow parent run '
                          '(default: the file name)')
    base_config: Path = Field(description='an mmseg 0.x config (its _base_ chain included)')
    data_root: Optional[Path] = Field(None, description='sets data.{train,val,test}.data_root')
    generate_data: Optional[GenerateData] = None
    parameters: Parameters
    overrides: Optional[KeyValues] = None
    derived: Derived = _section(Derived)
    repeats: PositiveInt = 1
    fewshot: Fewshot = _section(Fewshot)
    search: Search = _section(Search)
    early_stopping: Optional[EarlyStopping] = None
    resources: Resources = _section(Resources)
    fault_tolerance: FaultTolerance = _section(FaultTolerance)
    fine_tuning: FineTuning = _section(FineTuning)
    grouping: Grouping = _section(Grouping)
    val_feature_cache: ValFeatureCache = _section(ValFeatureCache)
    tracking: Tracking = _section(Tracking)
    output: Optional[OutputPath] = None
    references: Optional[References] = None


def schema_text():
    """search_spaces/schema.json as ``orchestrator schema`` writes it."""
    return json.dumps(SpaceFile.model_json_schema(), indent=2, sort_keys=True) + '\n'
