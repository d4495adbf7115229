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
import json
import math
from dataclasses import dataclass, field, fields

from orchestrator.fine_tuning import frozen_backbone, state_values

HEAD_SIDE_PREFIXES = ('model.decode_head.',)
HEAD_SIDE_KEYS = ('optimizer.lr', 'optimizer.weight_decay')
DEFAULT_HEADS_GB = 8.0  # memory for a group's heads when no GPU tells us more
GPU_USABLE = 0.9  # of a GPU's memory: CUDA's context, the allocator's slack, a batch in flight
# what the dry run also plans for, as nvidia-smi reports these GPUs' memory (MiB)
REFERENCE_GPUS = {'an 80 GB GPU (A100/H100)': 81559, 'a 141 GB H200': 143771}
FP32 = 4  # bytes: a head's weights, gradients, activations and logits (FCNHead runs in fp32)
LOSS_BACKWARD_LOGITS = 2  # while one head's loss runs backward: the gradients in and out of
# its log-softmax, two more label-size tensors (one head at a time: once per group)
# torch's multi-tensor Adam(W) step holds a temporary the size of its parameter group (one
# head's parameters: MultiHeadOptimizerConstructor gives each head its own groups)


def head_side(key):
    return key.startswith(HEAD_SIDE_PREFIXES) or key in HEAD_SIDE_KEYS


def group_key(spec, params):
    """The backbone-side values of a trial's sampled params, as a string (the group's name)."""
    backbone = {k: params[k] for k in sorted(params) if not head_side(k)}
    return json.dumps(backbone, sort_keys=True, default=str)


@dataclass(frozen=True)
class HeadMemory:
    """What one head of a trial group holds at the training step's peak, in bytes: its
    weights and optimizer state (``state``, all the time), and either what its backward keeps
    (``activations`` at feature size, and what its loss keeps, ``logits``: mmseg's loss its
    log-probabilities at label size, the banded loss the gradient of its logits at feature
    size) or, once its backward has run and released those, its ``gradients``. A group holds
    all its heads' at once (their losses are summed before one backward), plus the working
    set of one head's loss at a time: mmseg's, LOSS_BACKWARD_LOGITS label-size tensors, in the
    backward (``loss_backward``), the banded loss's, BAND_TENSORS bands, in the forward
    (``loss_forward``; ``group_bytes``). Measured against the CPU allocator's peak in
    tests/test_memory_plan.py."""
    params: int
    state: int
    gradients: int
    activations: int
    logits: int
    loss_forward: int = 0
    loss_backward: int = 0

    @property
    def total(self):
        return self.state + max(self.gradients, self.activations + self.logits)


@dataclass(frozen=True)
class FrozenSide:
    """The shared part of a group (everything but its heads), from the model built on the
    meta device (no memory, no weights): its bytes, and the shape and dtype of the features a
    head receives at the training crop size and batch."""
    model_bytes: int
    features: tuple
    feature_dtype: object


def _crop(base):
    crop = base.get('crop_size')
    for step in base.get('data', {}).get('train', {}).get('pipeline', []):
        if step.get('type') == 'RandomCrop':
            crop = step.get('crop_size', crop)
    return tuple(crop) if crop else (512, 512)


def _batch(base):
    return base.get('data', {}).get('samples_per_gpu', 2)


def frozen_side(base):
    """The FrozenSide of ``base``: weights and buffers in their dtypes (frozen: no gradients, no
    optimizer state), and the head's input from one meta-device backbone pass."""
    import torch
    from orchestrator import meta_model
    model = meta_model.segmentor(base['model'])
    with torch.device('meta'):
        features = model.extract_feat(torch.empty(_batch(base), 3, *_crop(base)))
    model_bytes = sum(t.numel() * t.element_size()
                      for name, t in [*model.named_parameters(), *model.named_buffers()]
                      if not name.startswith(('decode_head.', 'auxiliary_head.')))
    index = base['model']['decode_head'].get('in_index', -1)
    chosen = features[index if isinstance(index, int) else index[0]]
    return FrozenSide(model_bytes, tuple(chosen.shape), chosen.dtype)


def head_memory(base, head_cfg, side):
    """The HeadMemory of the decode head ``head_cfg`` (the base's with a trial's values) on
    the features of ``side``. Parameters are counted from the head built on the meta device;
    activations follow FCNHead's forward (mmseg's ConvModule: conv, then norm and an in-place
    ReLU): a float32 copy of bfloat16 features, two tensors per conv with a norm (its output
    and the norm's), one without; the concatenation for ``conv_cat``; ``with_norm``'s output;
    dropout's output and mask; the logits at feature size. Another head type: its parameters
    and logits only."""
    import torch

    from mmseg_custom.models.decode_heads import chunked_loss
    from orchestrator import meta_model
    head = meta_model.head(head_cfg)
    params = sum(p.numel() for p in head.parameters())
    optimizer = base.get('optimizer', {})
    values = state_values(optimizer)
    state = params * FP32 * (1 + values)  # weight, optimizer state
    batch, _, h, w = side.features
    label = batch * _crop(base)[0] * _crop(base)[1]
    at_feature = batch * h * w  # values per channel at feature size
    classes = head.num_classes
    activations = at_feature * classes * FP32  # logits before the resize to label size
    if type(head).__name__ == 'FCNHead':
        c_in, c = head.in_channels, head.channels
        per_conv = (2 if head.norm_cfg else 1) * at_feature * c * FP32
        activations += head.num_convs * per_conv
        if side.feature_dtype != torch.float32:
            activations += at_feature * c_in * FP32
        if head.concat_input:
            activations += at_feature * (c_in + c) * FP32 + per_conv
        if head.with_norm:
            activations += at_feature * c * FP32
        if head.dropout is not None:
            activations += at_feature * c * (FP32 + 1)  # output, and a bool mask
    if chunked_loss.covers(head):  # its loss a band of label rows at a time
        crop_h, crop_w = _crop(base)
        rows = min(crop_h, chunked_loss.band_rows(batch, classes, crop_w))
        band = batch * classes * rows * crop_w * FP32
        return HeadMemory(params, state, params * FP32, activations,
                          at_feature * classes * FP32,
                          loss_forward=chunked_loss.BAND_TENSORS * band)
    logits = label * classes * FP32
    return HeadMemory(params, state, params * FP32, activations, logits,
                      loss_backward=LOSS_BACKWARD_LOGITS * logits)


def head_memories(spec, base, trials):
    """(FrozenSide, each trial's head variant, {variant: HeadMemory}) for the planned
    ``trials`` (sweep_plan.PlannedTrial): a variant is named by its decode-head values (grid
    values and the channels they derive; a sampled head value counts as the base config's)."""
    from orchestrator.plan import HEAD
    side = frozen_side(base)
    names, found = [], {}
    for trial in trials:
        values = {k[len(HEAD):]: v for k, v in sorted(trial.overrides.items())
                  if k.startswith(HEAD)}
        name = ', '.join(f'{k}={v}' for k, v in values.items()) or 'the base head'
        if name not in found:
            found[name] = head_memory(base, {**base['model']['decode_head'], **values}, side)
        names.append(name)
    return side, names, found


def why_not(spec, base):
    """The reason this sweep cannot group at all, or None."""
    if not spec.grouping.enabled:
        return 'off (grouping.enabled: false or --no-grouping)'
    if spec.search.algorithm == 'optuna':
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


def group_budget(spec, side, gpu_bytes=None):
    """(bytes a group's heads may hold, how that was decided): ``grouping.memory_gb`` when
    given; else the worker's share of its GPU (``gpu_bytes`` as the cluster reported it, times
    ``gpus_per_worker``: half a GPU for 0.5) less the frozen model and its features; else
    DEFAULT_HEADS_GB (a CPU sweep, or a GPU this machine cannot see)."""
    gib = 1024 ** 3
    if spec.grouping.memory_gb is not None:
        return spec.grouping.memory_gb * gib, f'grouping.memory_gb={spec.grouping.memory_gb:g}'
    if gpu_bytes:
        share = min(1.0, spec.resources.gpus_per_worker or 1.0)
        features = math.prod(side.features) * side.feature_dtype.itemsize
        budget = GPU_USABLE * gpu_bytes * share - side.model_bytes - features
        return budget, (f'{GPU_USABLE:.0%} of {"the" if share == 1 else f"{share:g} x the"} '
                        f'GPU\'s {gpu_bytes / gib:.1f} GiB less the frozen model\'s '
                        f'{side.model_bytes / gib:.2f} GiB and its features\' '
                        f'{features / gib:.2f} GiB')
    if spec.resources.gpus_per_worker:
        return DEFAULT_HEADS_GB * gib, (f'{DEFAULT_HEADS_GB:g} GiB: no GPU memory known here '
                                        '(set grouping.memory_gb, or plan on the cluster with '
                                        '--address)')
    return DEFAULT_HEADS_GB * gib, (f'{DEFAULT_HEADS_GB:g} GiB (CPU workers; grouping.memory_gb '
                                    'sets it)')


def group_bytes(memories):
    """The peak of a group of heads (``memories``: their HeadMemory) in one training step, the
    largest of three phases: the forward's end, a banded loss at work while every head holds
    its activations and what its loss keeps (no gradient yet); the backward (every head's
    share, and one head's mmseg loss backward on top: the heads' backwards interleave, so
    gradients of others may exist by then); the optimizer step (every head's state and
    gradients, and the step's temporary of one head's parameters, the size of its
    gradients)."""
    state = sum(m.state for m in memories)
    forward = state + sum(m.activations + m.logits for m in memories) + max(
        m.loss_forward for m in memories)
    backward = sum(m.total for m in memories) + max(m.loss_backward for m in memories)
    step = state + sum(m.gradients for m in memories) + max(m.gradients for m in memories)
    return max(forward, backward, step)


def heads_per_group(budget, memories):
    """The most heads of ``memories`` (the HeadMemory of each member) one group may hold
    within ``budget``: groups are filled in the order trials arrive, so any members may meet:
    counted as copies of the member that is largest in every part."""
    worst = HeadMemory(*(max(getattr(m, f.name) for m in memories) for f in fields(HeadMemory)))
    k = 1
    while k < len(memories) and group_bytes([worst] * (k + 1)) <= budget:
        k += 1
    return k


@dataclass
class GroupPlan:
    """The sweep's trial groups: ``chunks`` {group key: sizes of its chunks} for the pool,
    ``shown`` (key, trial row indices) per chunk for the listing, the fewest heads per group a
    key allows (``cap``), how its budget was decided and each head variant's HeadMemory;
    ``reason`` when the sweep cannot group at all."""
    chunks: dict = field(default_factory=dict)
    shown: list = field(default_factory=list)
    cap: int = 0
    how: str = ''
    memories: dict = field(default_factory=dict)
    reason: str = None
    side: FrozenSide = None
    members: list = field(default_factory=list)  # per group key: its members' HeadMemory


def plan(spec, base, trials, gpu_bytes=None):
    """The GroupPlan for the planned ``trials`` (sweep_plan.PlannedTrial): trials of one key, 2
    or more, on a frozen backbone, split into chunks of at most ``heads_per_group``."""
    reason = why_not(spec, base)
    if reason:
        return GroupPlan(reason=reason)
    by_key = {}
    for trial in trials:
        if frozen_backbone(base, trial.values):
            by_key.setdefault(group_key(spec, trial.values), []).append(trial.index)
    by_key = {k: members for k, members in by_key.items() if len(members) >= 2}
    if not by_key:
        return GroupPlan()
    side, names, memories = head_memories(spec, base, trials)
    budget, how = group_budget(spec, side, gpu_bytes)
    planned = GroupPlan(how=how, memories=memories, side=side)
    caps = []
    for key, members in by_key.items():
        planned.members.append([memories[names[i]] for i in members])
        cap = heads_per_group(budget, planned.members[-1])
        caps.append(cap)
        sizes = even_chunks(len(members), cap)
        if max(sizes) < 2:  # room for one head only
            continue
        planned.chunks[key] = sizes
        start = 0
        for size in sizes:
            planned.shown.append((key, members[start:start + size]))
            start += size
    planned.cap = min(caps)
    return planned


def even_chunks(count, cap):
    """``count`` trials in the fewest chunks of at most ``cap``, their sizes as even as can be."""
    n = math.ceil(count / max(cap, 1))
    return [count // n + (1 if i < count % n else 0) for i in range(n)]


def capped(sizes, cap):
    """The chunks ``sizes`` re-cut to at most ``cap`` heads each (a group of that kind ran out
    of GPU memory with more); chunks of one are left out: their trials train alone."""
    return [s for s in even_chunks(sum(sizes), cap) if s >= 2] if sum(sizes) else []


def _gb(n):
    return f'{n / 1e9:.2f} GB' if n >= 1e9 else f'{n / 1e6:.3g} MB'


def memory_lines(planned):
    """Each head variant's planned bytes, as the dry run lists them."""
    return [f'  head {name}: {m.params / 1e6:.2f} M params; weights + optimizer state '
            f'{_gb(m.state)}, then activations {_gb(m.activations)} + what its loss keeps '
            f'{_gb(m.logits)} or gradients {_gb(m.gradients)}: {_gb(m.total)}'
            for name, m in planned.memories.items()]


def reference_lines(spec, planned):
    """Heads per group on the REFERENCE_GPUS, for a GPU sweep planned where no GPU is seen."""
    if (not planned.members or not spec.resources.gpus_per_worker
            or spec.grouping.memory_gb is not None):
        return []
    caps = []
    for name, mib in REFERENCE_GPUS.items():
        budget, _ = group_budget(spec, planned.side, mib * 1024 ** 2)
        caps.append(f'{min(heads_per_group(budget, m) for m in planned.members)} on {name}')
    return [f'  heads per group on other GPUs (at {spec.resources.gpus_per_worker:g} GPU per '
            'worker): ' + ', '.join(caps)]


def dry_run_lines(sweep_plan):
    """The trial groups of ``sweep_plan`` (sweep_plan.SweepPlan) as the dry run and the sweep
    list them."""
    spec, base, trials, planned = (sweep_plan.spec, sweep_plan.base, sweep_plan.trials,
                                   sweep_plan.groups)
    if planned.reason:
        return [f'trial groups: {planned.reason}']
    if not planned.shown:
        if not any(frozen_backbone(base, t.values) for t in trials):
            return ['trial groups: none: the backbone is not frozen (model.backbone.freeze_vit; '
                    'InternVL\'s with_fpn pyramid and unfreeze_pos_embed train)']
        if planned.memories:
            return [f'trial groups: none: one head at most fits the memory for heads '
                    f'({planned.how})', *memory_lines(planned),
                    *reference_lines(spec, planned)]
        return ['trial groups: none (no two trials share a frozen backbone and its inputs)']
    grouped = sum(len(m) for _, m in planned.shown)
    lines = [f'trial groups: {grouped} of {len(trials)} trials in {len(planned.shown)} group(s), '
             f'one frozen backbone pass per batch per group (at most {planned.cap} heads per '
             f'group: {planned.how}; per head, planned:)', *memory_lines(planned),
             *reference_lines(spec, planned)]
    for i, (key, members) in enumerate(planned.shown):
        values = ', '.join(f'{k}={v}' for k, v in json.loads(key).items()) or 'all'
        lines.append(f'  group {i}: trials {",".join(map(str, members))} ({values})')
    return lines


def live_trial_bound(spec, trials, chunks, slots):
    """How many Tune trials a grouped sweep keeps alive: enough for ``slots`` trial groups of
    the largest size to form and train at once, and never fewer than any group's span in the
    order Tune creates the trials (the plan's, ``trials``), so that no group waits for a
    member that cannot start. Returns (bound, the largest group)."""
    largest = max((max(sizes) for sizes in chunks.values()), default=1)
    order = [group_key(spec, t.values) for t in trials]
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
