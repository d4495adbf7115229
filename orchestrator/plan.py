"""SweepSpec -> one trial's resolved mmseg overrides and derived values (``resolve``), the
resource plan, the estimate and the dry-run table. The trials themselves are the SweepPlan's
(sweep_plan.py), which calls ``resolve`` for each. Pure functions: no Ray, no MLflow."""
import math
import os
import os.path as osp

from orchestrator.errors import ConfigError
from orchestrator import fine_tuning
from orchestrator.keys import (FRACTION_KEY, MASTER_WEIGHTS_KEY, REPEAT_KEY, SUBSET_SEED_KEY,
                               WARMUP_KEY)

HEAD = 'model.decode_head.'


def searched_keys(spec):
    keys = [p.key for p in spec.params]
    if spec.repeats > 1 and REPEAT_KEY not in keys:
        keys = keys + [REPEAT_KEY]
    if len(spec.fewshot_seeds) > 1:
        keys = keys + [SUBSET_SEED_KEY]
    return keys


def iterations_for(spec, fraction, base_iters):
    """InternVL's few-shot recipe: training length proportional to the data fraction."""
    iterations = spec.derived.iterations
    if iterations is None:
        return base_iters
    return max(iterations.min, int(math.ceil(iterations.at_full_data * fraction)))


def warmup_for(spec, iters):
    """InternVL's few-shot warmup: 2 % of the iterations (100 at 5k ... 800 at 40k), at most
    1500 (80k) -- ``derived.warmup: {ratio: 0.02, max: 1500}``. None: the base config's."""
    rule = spec.derived.warmup
    if rule is None:
        return None
    warmup = max(1, int(round(rule.ratio * iters)))
    return min(warmup, rule.max) if rule.max else warmup


def _image_names(img_dir, img_suffix):
    """The training images' names (recursive, as mmseg lists them): counted, for the fraction
    a base config's max_image_num keeps."""
    return [f for _, _, files in os.walk(img_dir) for f in files if f.endswith(img_suffix)]


def train_image_dir(spec, base):
    """The training images' directory, as the trial's data root makes it."""
    train = base['data']['train']
    root = (spec.data_root or (spec.overrides or {}).get('data.train.data_root')
            or train.get('data_root') or '')
    return train['img_dir'] if osp.isabs(train['img_dir']) else osp.join(root, train['img_dir'])


def settle_base_fraction(spec, base):
    """A base config that keeps ``data.train.max_image_num`` images (InternVL's few-shot
    configs) with no fraction searched trains that fraction of the training images: set it as
    ``spec.base_fraction`` (so the recorded fraction, the derived iterations and warmup and the
    dataset input are those of the subset trained). Returns a line for the user, or None; where
    the images are not here (a dry run elsewhere) it says the fraction is not known."""
    train = base['data'].get('train', {})
    kept = (spec.overrides or {}).get('data.train.max_image_num', train.get('max_image_num')
                                      if isinstance(train, dict) else None)
    if kept is None or any(p.key == FRACTION_KEY for p in spec.params):
        return None
    img_dir = train_image_dir(spec, base)
    names = _image_names(img_dir, train.get('img_suffix', '.jpg')) if osp.isdir(img_dir) else []
    if not names:
        return (f'fewshot.fraction: the base config keeps max_image_num={kept} training images; '
                f'{img_dir} is not here to count them, so the values above assume all of them')
    spec.base_fraction = min(1.0, kept / len(names))
    return (f'fewshot.fraction: {spec.base_fraction:.6g} (the base config\'s max_image_num='
            f'{min(kept, len(names))} of {len(names)} training images)')


def resolve(spec, base, params):
    """A trial's sampled values -> (mmseg overrides, derived values), all by dotted key.

    ``base`` is the base config as a plain dict (no mmcv needed: trials stay light).
    Derived values are declared in the space file, never evaluated from it:
    channels follow in_channels when num_convs == 0; iterations and warmup follow the few-shot
    fraction; evaluation and checkpoint intervals follow the iterations. The subset seed and
    the fraction are derived values too (params on every child run), not mmseg keys.
    """
    overrides = dict(spec.overrides or {})
    overrides.update({k: v for k, v in params.items()
                      if k not in (FRACTION_KEY, SUBSET_SEED_KEY)})
    head = base['model']['decode_head']
    derived = {}
    num_convs = overrides.get(HEAD + 'num_convs', head.get('num_convs', 2))
    if spec.derived.channels_follow_in_channels and num_convs == 0:
        derived[HEAD + 'channels'] = overrides.get(HEAD + 'in_channels', head['in_channels'])
    else:
        derived[HEAD + 'channels'] = overrides.get(HEAD + 'channels', head['channels'])
    fraction = params.get(FRACTION_KEY, spec.base_fraction or 1.0)
    base_iters = overrides.get('runner.max_iters', base['runner']['max_iters'])
    iters = iterations_for(spec, fraction, base_iters)
    derived['runner.max_iters'] = iters
    warmup = warmup_for(spec, iters)
    if warmup is not None:
        derived[WARMUP_KEY] = warmup
    derived['evaluation.interval'] = max(1, math.ceil(iters / spec.derived.evaluations))
    derived['checkpoint_config.interval'] = derived['evaluation.interval']
    derived[FRACTION_KEY] = fraction
    if spec.base_fraction is not None and not spec.fewshot_seed_given:
        # InternVL's max_image_num subset follows the run's seed (as `orchestrator train` does)
        subset_seed = overrides.get(REPEAT_KEY, base.get(REPEAT_KEY) or 0)
    else:
        subset_seed = spec.fewshot_seeds[0]
    derived[SUBSET_SEED_KEY] = params.get(SUBSET_SEED_KEY, subset_seed)
    if spec.data_root:
        for split in ('train', 'val', 'test'):
            if split in base['data']:
                derived[f'data.{split}.data_root'] = spec.data_root
    if spec.fine_tuning.float32_master_weights:
        overrides.update(fine_tuning.overrides(spec, base))
        derived[MASTER_WEIGHTS_KEY] = True
    train = base['data'].get('train', {})
    if isinstance(train, dict) and 'max_image_num' in train:
        # InternVL's own subset option: the sweep's fraction replaces it when searched
        derived['data.train.subset_seed'] = derived[SUBSET_SEED_KEY]
        if FRACTION_KEY in params or spec.base_fraction is not None:
            # the trial's FewShotSubset keeps the images (for max_image_num: the same ones)
            derived['data.train.max_image_num'] = None
    overrides.update({k: v for k, v in derived.items()
                      if k not in (FRACTION_KEY, SUBSET_SEED_KEY, MASTER_WEIGHTS_KEY)})
    return overrides, derived


def plain(cfg):
    """An mmcv Config as a plain dict (picklable without mmcv)."""
    return cfg._cfg_dict.to_dict()


def per_trial_resources(spec):
    w = spec.resources.workers_per_trial
    return dict(CPU=w * spec.resources.cpus_per_worker, GPU=w * spec.resources.gpus_per_worker)


def worker_bundle(spec):
    """One worker's Ray resources (a placement-group bundle)."""
    bundle = {'CPU': float(spec.resources.cpus_per_worker)}
    if spec.resources.gpus_per_worker:
        bundle['GPU'] = float(spec.resources.gpus_per_worker)
    return bundle


def _fmt(resources):
    return ', '.join(f'{resources.get(r, 0):g} {r}' for r in ('CPU', 'GPU'))


def resource_plan(spec, nodes):
    """How many trials run at once on ``nodes`` (dicts of name and Ray resources), computed from
    per-node resources.

    Every worker asks for the same bundle, so the most workers a node can hold is the floor of
    its resources over the bundle's, and any grouping of those workers into trials is feasible
    (a trial's placement group packs its workers on as few nodes as possible and spans nodes
    when it must). Returns (concurrent trials, text lines of the packing); ConfigError when no
    trial could ever be scheduled, so a sweep fails at once instead of waiting forever.
    """
    bundle = worker_bundle(spec)
    per_node = []
    for node in nodes:
        fits = [int(node['resources'].get(r, 0) / need + 1e-9) for r, need in bundle.items()
                if need > 0]
        per_node.append(min(fits) if fits else 0)
    workers = sum(per_node)
    w = spec.resources.workers_per_trial
    if workers < w:
        biggest = max(nodes, key=lambda n: (n['resources'].get('GPU', 0),
                                            n['resources'].get('CPU', 0)))
        total = {r: sum(n['resources'].get(r, 0) for n in nodes) for r in ('CPU', 'GPU')}
        why = (f'no node can hold one worker (largest: {_fmt(biggest["resources"])})'
               if workers == 0 else f'its nodes hold {workers} such worker(s) in all')
        raise ConfigError(
            f'{spec.source}: resources: one trial needs {w} workers x ({_fmt(bundle)}) = '
            f'{_fmt(per_trial_resources(spec))}; the cluster has {_fmt(total)} on '
            f'{len(nodes)} node(s) and {why}: it could never be scheduled')
    trials = workers // w
    cap = spec.resources.max_concurrent_trials
    if cap:
        trials = min(trials, cap)
    lines = [f'resource plan: {w} worker(s) per trial, each {_fmt(bundle)}']
    for node, n in zip(nodes, per_node):
        lines.append(f'  {node["name"]}: {_fmt(node["resources"])} -> {n} worker(s)')
    share = bundle.get('GPU', 0)
    lines.append(f'  => {trials} concurrent trial(s) ({trials * w} of {workers} worker slots)'
                 + (f'; {int(1 / share + 1e-9)} workers share each GPU' if 0 < share < 1 else '')
                 + (f'; capped by max_concurrent_trials={cap}'
                    if cap and trials == cap and workers // w > trials else ''))
    return trials, lines


def dry_run_table(sweep_plan):
    """Rows of (trial, its values...) of ``sweep_plan`` (sweep_plan.SweepPlan; a sampled value
    shown as its distribution) and the total budget line."""
    spec = sweep_plan.spec
    keys = sweep_plan.searched
    shown = keys + [k for k in ('model.decode_head.channels', 'runner.max_iters', WARMUP_KEY)
                    if k not in keys and (k != WARMUP_KEY or spec.derived.warmup)]
    need = per_trial_resources(spec)
    table = [[t.index] + [{**t.sampled, **t.values, **t.derived}.get(k, '') for k in shown]
             for t in sweep_plan.trials]
    total_iters = sum(sweep_plan.schedules)
    header = ['trial'] + shown
    budget = (f'{len(table)} trials, each {spec.resources.workers_per_trial} worker(s) x '
              f'({spec.resources.cpus_per_worker:g} CPU, {spec.resources.gpus_per_worker:g} GPU) = '
              f'{need["CPU"]:g} CPU, {need["GPU"]:g} GPU per trial; '
              f'{total_iters} iterations in all = {total_iters * spec.resources.workers_per_trial} '
              f'worker-iterations'
              + (f' = {total_iters * need["GPU"]:,.0f} GPU-iterations' if need['GPU'] else ''))
    return header, table, budget


def estimate_lines(spec, schedules, groups, seconds_per_iteration, backbone_seconds=None):
    """The sweep's cost, ungrouped and as its trial groups run: ``schedules`` is each grid
    trial's planned iterations, ``groups`` the trial groups (lists of trial indices),
    ``seconds_per_iteration`` one training iteration of one trial alone (measured or guessed),
    ``backbone_seconds`` the backbone's part of it. A group's iteration is one backbone pass
    and each member's head: backbone + k x (seconds_per_iteration - backbone)."""
    need = per_trial_resources(spec)
    unit, per_trial = (('GPU-hours', need['GPU']) if need['GPU'] else
                       ('worker-hours', spec.resources.workers_per_trial))
    s = seconds_per_iteration
    alone = sum(schedules) * s / 3600
    lines = [f'estimate at {s:g} s per iteration: {alone:,.1f} trial-hours = '
             f'{alone * per_trial:,.1f} {unit} (every trial alone)']
    if not groups:
        return lines
    if backbone_seconds is None:
        return lines + [f'  its {len(groups)} trial group(s) not counted: --backbone-seconds B '
                        '(the backbone pass\'s part of S) estimates them']
    if not 0 <= backbone_seconds <= s:
        raise ConfigError(f'--backbone-seconds {backbone_seconds:g}: must be within 0 and '
                          f'--seconds-per-iteration {s:g} (the backbone\'s part of it)')
    head = s - backbone_seconds
    grouped = set()
    seconds = 0.0
    for members in groups:
        grouped.update(members)
        seconds += schedules[members[0]] * (backbone_seconds + len(members) * head)
    seconds += sum(it for i, it in enumerate(schedules) if i not in grouped) * s
    hours = seconds / 3600
    return lines + [
        f'estimate with trial groups: {hours:,.1f} trial-hours = {hours * per_trial:,.1f} {unit} '
        f'({len(groups)} group(s) of {len(grouped)} trials: one backbone pass of '
        f'{backbone_seconds:g} s + {head:g} s per head per iteration; '
        f'{len(schedules) - len(grouped)} trial(s) alone); {alone / hours:.2f}x fewer']
