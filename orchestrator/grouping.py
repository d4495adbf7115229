"""Trial groups: trials that differ only in head-side values share one frozen-backbone pass.

In a probing sweep the backbone is frozen and is nearly all of the compute. Trials that agree on
everything that determines the backbone's inputs and outputs (the backbone and its weights, the
data subset, pipeline and random stream (seed), batch size, schedule) and differ only in the head
(``model.decode_head.*``) or its optimizer values (``optimizer.lr``, ``optimizer.weight_decay``)
train together: one backbone forward per batch, one head forward/backward and optimizer step per
trial (mmseg_custom MultiHeadEncoderDecoder). Each trial stays a Tune trial and an MLflow child.

Grouping is planned here, before the sweep starts, from the grid: a group's trials must all be
known, so the backbone-side values must be grid values (head-side ones may be sampled). The key
of a group is the JSON of its trial's backbone-side values, computed the same way by the driver
(planning) and by each trial (joining its group). Groups larger than the memory estimate allows
are split.
"""
import copy
import json
import math
from dataclasses import dataclass, field

HEAD_SIDE_PREFIXES = ('model.decode_head.',)
HEAD_SIDE_KEYS = ('optimizer.lr', 'optimizer.weight_decay')
# Tune creates grid trials in the order of its sorted key paths, the first path varying fastest
# (ray.tune.search.variant_generator). Nested under these names, head-side keys vary fastest and
# backbone-side keys slowest: a trial group's members are created one after another, so a
# bounded number of live Tune trials always completes the next group.
HEAD_NEST, SHARED_NEST = 'head', 'shared'
BYTES_PER_LOGIT = 4 * 3  # fp32 logits, their gradient, the softmax inside the loss
DEFAULT_HEADS_GB = 8.0  # memory for a group's heads when no GPU tells us more
GPU_USABLE = 0.9  # of a GPU's memory: CUDA's context, the allocator's slack, a batch in flight


def head_side(key):
    return key.startswith(HEAD_SIDE_PREFIXES) or key in HEAD_SIDE_KEYS


def group_key(spec, params):
    """The backbone-side values of a trial's sampled params, as a string (the group's name)."""
    backbone = {k: params[k] for k in sorted(params) if not head_side(k)}
    return json.dumps(backbone, sort_keys=True, default=str)


def _frozen(base, row):
    """The whole backbone is frozen: ``freeze_vit`` without InternVL's trainable parts (the
    ``with_fpn`` pyramid, ``unfreeze_pos_embed``)."""
    backbone = base['model'].get('backbone', {})

    def value(key):
        return bool(row.get(f'model.backbone.{key}', backbone.get(key, False)))
    return value('freeze_vit') and not value('with_fpn') and not value('unfreeze_pos_embed')


def _crop(base):
    crop = base.get('crop_size')
    for step in base.get('data', {}).get('train', {}).get('pipeline', []):
        if step.get('type') == 'RandomCrop':
            crop = step.get('crop_size', crop)
    return tuple(crop) if crop else (512, 512)


def head_memory_bytes(base):
    """Per head in a group: its logits at crop size x classes x batch, with gradient and softmax."""
    h, w = _crop(base)
    classes = base['model']['decode_head'].get('num_classes', 150)
    batch = base.get('data', {}).get('samples_per_gpu', 2)
    return h * w * classes * batch * BYTES_PER_LOGIT


def why_not(spec, base):
    """The reason this sweep cannot group at all, or None."""
    if not spec.grouping:
        return 'off (grouping.enabled: false or --no-grouping)'
    if spec.algorithm == 'optuna':
        return 'off: Optuna proposes trials one at a time, a group\'s trials must be known first'
    if base['model'].get('auxiliary_head'):
        return 'off: the base config has an auxiliary head (trained with the backbone side)'
    if (base.get('optimizer_config') or {}).get('grad_clip'):
        return 'off: optimizer_config.grad_clip couples the heads\' gradient norms'
    sampled = [p.key for p in spec.params if p.kind != 'grid' and not head_side(p.key)]
    if sampled:
        return (f'off: {", ".join(sampled)} {"is" if len(sampled) == 1 else "are"} sampled on '
                'the backbone side (grid values only there)')
    return None


def frozen_model_bytes(base):
    """What the shared part of a group (everything but its heads) holds on the GPU: its weights
    and buffers in their dtypes, from the model built on the meta device (no memory, no
    weights). Frozen, it has no gradients or optimizer state."""
    import torch
    import mmseg_custom  # noqa: F401  (our backbones and heads)
    from mmseg.models import build_segmentor
    model_cfg = copy.deepcopy(base['model'])
    model_cfg.get('backbone', {}).pop('pretrained', None)
    model_cfg.pop('pretrained', None)
    with torch.device('meta'):
        model = build_segmentor(model_cfg)
    return sum(t.numel() * t.element_size()
               for name, t in [*model.named_parameters(), *model.named_buffers()]
               if not name.startswith(('decode_head.', 'auxiliary_head.')))


def heads_per_group(spec, base, gpu_bytes=None):
    """(the most heads one group may hold, how that was decided): the memory for heads over
    one head's logits (head_memory_bytes). That memory is ``grouping.memory_gb`` when given,
    else the GPU's (``gpu_bytes``, as the cluster reported it) less the frozen model, else
    DEFAULT_HEADS_GB (a CPU sweep, or a GPU this machine cannot see)."""
    gib = 1024 ** 3
    if spec.grouping_memory_gb is not None:
        budget = spec.grouping_memory_gb * gib
        how = f'grouping.memory_gb={spec.grouping_memory_gb:g}'
    elif gpu_bytes:
        model = frozen_model_bytes(base)
        budget = GPU_USABLE * gpu_bytes - model
        how = (f'{GPU_USABLE:.0%} of the GPU\'s {gpu_bytes / gib:.1f} GiB less the frozen '
               f'model\'s {model / gib:.2f} GiB')
    else:
        budget = DEFAULT_HEADS_GB * gib
        how = (f'{DEFAULT_HEADS_GB:g} GiB: no GPU memory known here (set grouping.memory_gb, or '
               'plan on the cluster with --address)' if spec.gpus_per_worker else
               f'{DEFAULT_HEADS_GB:g} GiB (CPU workers; grouping.memory_gb sets it)')
    per_head = head_memory_bytes(base)
    how += f': {per_head / 1024 ** 2:.1f} MiB of logits per head'
    return max(1, int(budget // per_head)), how


@dataclass
class GroupPlan:
    """The sweep's trial groups: ``chunks`` {group key: sizes of its chunks} for the pool,
    ``shown`` (key, trial row indices) per chunk for the listing, the cap on heads per group and
    how it was decided; ``reason`` when the sweep cannot group at all."""
    chunks: dict = field(default_factory=dict)
    shown: list = field(default_factory=list)
    cap: int = 0
    how: str = ''
    reason: str = None


def plan(spec, base, rows, gpu_bytes=None):
    """The GroupPlan for the grid trials ``rows`` (plan.grid_trials): trials of one key, 2 or
    more, on a frozen backbone, split into chunks of at most ``heads_per_group``."""
    reason = why_not(spec, base)
    if reason:
        return GroupPlan(reason=reason)
    by_key = {}
    for i, row in enumerate(rows):
        by_key.setdefault(group_key(spec, row), []).append(i)
    cap, how = heads_per_group(spec, base, gpu_bytes)
    planned = GroupPlan(cap=cap, how=how)
    for key, members in by_key.items():
        if len(members) < 2 or not _frozen(base, rows[members[0]]):
            continue
        n = math.ceil(len(members) / cap)
        sizes = [len(members) // n + (1 if i < len(members) % n else 0) for i in range(n)]
        if max(sizes) < 2:  # room for one head only
            continue
        planned.chunks[key] = sizes
        start = 0
        for size in sizes:
            planned.shown.append((key, members[start:start + size]))
            start += size
    return planned


def plan_groups(spec, base, rows, gpu_bytes=None):
    """(chunks, shown) of ``plan``."""
    planned = plan(spec, base, rows, gpu_bytes)
    return planned.chunks, planned.shown


def dry_run_lines(spec, base, rows, gpu_bytes=None, planned=None):
    """The trial groups as the dry run (and the sweep) lists them; ``planned``: the plan
    already made for these rows."""
    planned = planned or plan(spec, base, rows, gpu_bytes)
    if planned.reason:
        return [f'trial groups: {planned.reason}']
    if not planned.shown:
        if not any(_frozen(base, row) for row in rows):
            return ['trial groups: none: the backbone is not frozen (model.backbone.freeze_vit; '
                    'InternVL\'s with_fpn pyramid and unfreeze_pos_embed train)']
        return ['trial groups: none (no two trials share a frozen backbone and its inputs)']
    grouped = sum(len(m) for _, m in planned.shown)
    lines = [f'trial groups: {grouped} of {len(rows)} trials in {len(planned.shown)} group(s), '
             f'one frozen backbone pass per batch per group (at most {planned.cap} heads per '
             f'group: {planned.how})']
    for i, (key, members) in enumerate(planned.shown):
        values = ', '.join(f'{k}={v}' for k, v in json.loads(key).items()) or 'all'
        lines.append(f'  group {i}: trials {",".join(map(str, members))} ({values})')
    return lines


def nest_for_groups(space):
    """Tune's param space with head-side keys under ``head`` and the rest under ``shared``."""
    nested = {HEAD_NEST: {k: v for k, v in space.items() if head_side(k)},
              SHARED_NEST: {k: v for k, v in space.items() if not head_side(k)}}
    return {k: v for k, v in nested.items() if v}


def flat_config(config):
    """A Tune trial's config as {searched key: value}, nested (grouped sweeps) or not."""
    flat = {}
    for key, value in config.items():
        if key in (HEAD_NEST, SHARED_NEST) and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def live_trial_bound(spec, space, chunks, slots):
    """How many Tune trials a grouped sweep keeps alive: enough for ``slots`` trial groups of
    the largest size to form and train at once, and never fewer than any group's span in the
    order Tune creates the trials (Tune's own generator, over the nested ``space``), so that no
    group waits for a member that cannot start. Returns (bound, the largest group)."""
    from ray.tune.search.variant_generator import generate_variants
    largest = max((max(sizes) for sizes in chunks.values()), default=1)
    order = [group_key(spec, flat_config(variant))
             for _ in range(spec.num_samples) for _, variant in generate_variants(space)]
    arrived, first, span = {}, {}, 0
    for position, key in enumerate(order):
        if key not in chunks:
            continue
        n = arrived[key] = arrived.get(key, 0) + 1
        sizes, chunk, end = chunks[key], 0, chunks[key][0]
        while n > end and chunk + 1 < len(sizes):
            chunk += 1
            end += sizes[chunk]
        first.setdefault((key, chunk), position)
        span = max(span, position - first[(key, chunk)] + 1)
    return min(len(order), max(slots * largest, span)), largest
