"""A trainable backbone in bfloat16: what it holds per rank, and float32 master weights.

InternVL's few-shot protocol (and its configs) fine-tunes the backbone in bfloat16 with AdamW
and no float32 master weights, so updates below half a bfloat16 step round away; that stays the
default, for parity. ``fine_tuning.float32_master_weights: true`` wraps the base config's
optimizer constructor in mmseg_custom's ``Float32MasterWeights`` (bfloat16 compute, float32 copies
in the optimizer). The dry run shows what each choice holds per rank (``memory_lines``).
"""
import copy

CONSTRUCTOR = 'Float32MasterWeights'  # mmseg_custom/optimizers/master_weights.py
FP32 = 4
# optimizer state per parameter, in values the size of the parameter (torch makes its state
# like the parameter: bfloat16 moments for a bfloat16 weight): Adam's two moments, SGD's
# momentum buffer
STATE_VALUES = {'Adam': 2, 'AdamW': 2, 'SGD': 1}


def wrapped(optimizer_cfg):
    """``optimizer_cfg`` (a plain dict) with Float32MasterWeights around its own constructor."""
    cfg = copy.deepcopy(dict(optimizer_cfg))
    if cfg.get('constructor') == CONSTRUCTOR:
        return cfg
    inner = dict(cfg.pop('paramwise_cfg', None) or {})
    inner['constructor'] = cfg.pop('constructor', 'DefaultOptimizerConstructor')
    return dict(cfg, constructor=CONSTRUCTOR, paramwise_cfg=inner)


def overrides(spec, base):
    """The trial's dotted overrides for the opt-in (none without it)."""
    if not spec.fine_tuning.float32_master_weights:
        return {}
    cfg = wrapped(base['optimizer'])
    return {'optimizer.constructor': cfg['constructor'],
            'optimizer.paramwise_cfg.constructor': cfg['paramwise_cfg']['constructor']}


def frozen_backbone(base, row):
    """The whole backbone is frozen: ``freeze_vit`` without InternVL's trainable parts (the
    ``with_fpn`` pyramid, ``unfreeze_pos_embed``)."""
    backbone = base['model'].get('backbone', {})

    def value(key):
        v = row.get(f'model.backbone.{key}', backbone.get(key, False))
        return 'sampled' if isinstance(v, str) else bool(v)  # a distribution: either way
    if 'sampled' in (value('freeze_vit'), value('with_fpn'), value('unfreeze_pos_embed')):
        return False
    return value('freeze_vit') and not value('with_fpn') and not value('unfreeze_pos_embed')


def state_values(optimizer):
    """Values of optimizer state per parameter."""
    if optimizer.get('type') == 'SGD' and not optimizer.get('momentum'):
        return 0
    return STATE_VALUES.get(optimizer.get('type'), 2)


def trainable(model_cfg):
    """{dtype itemsize: trainable parameters of that size} of the model ``model_cfg`` built on
    the meta device (no memory, no weights)."""
    from orchestrator import meta_model
    sizes = {}
    for p in meta_model.segmentor(model_cfg).parameters():
        if p.requires_grad:
            sizes[p.element_size()] = sizes.get(p.element_size(), 0) + p.numel()
    return sizes


def rank_bytes(sizes, optimizer, masters):
    """Bytes one rank holds for its trainable parameters ``sizes`` after an optimizer step:
    weights, gradients and optimizer state, each the parameter's size; with ``masters``, a
    low-precision parameter also has a float32 copy whose state and gradient are float32 (the
    model's own gradient is freed once moved onto it)."""
    values = state_values(optimizer)
    total = 0
    for itemsize, n in sizes.items():
        if masters and itemsize < FP32:
            total += n * (itemsize + FP32 * (1 + values + 1))
        else:
            total += n * itemsize * (1 + values + 1)
    return total


def sizes_low_gb(sizes):
    """One more copy of the low-precision gradients (DDP's buckets), in GB."""
    return sum(n * size for size, n in sizes.items() if size < FP32) / 1e9


def memory_lines(spec, base, rows):
    """The dry run's line for a sweep that trains a low-precision backbone: the bytes of each
    choice per rank, for the first trial of ``rows`` (SweepPlan.rows) that trains it."""
    first = next((i for i, row in enumerate(rows) if not frozen_backbone(base, row)), None)
    if first is None:
        return []
    prefix = 'model.backbone.'
    model_cfg = copy.deepcopy(base['model'])
    model_cfg['backbone'].update({k[len(prefix):]: v for k, v in rows[first].items()
                                  if k.startswith(prefix) and not isinstance(v, str)})
    sizes = trainable(model_cfg)
    low = sum(n for size, n in sizes.items() if size < FP32)
    if not low:
        return []
    optimizer = base.get('optimizer', {})
    plain, masters = (rank_bytes(sizes, optimizer, m) for m in (False, True))
    chosen = ('float32 master weights (fine_tuning.float32_master_weights)'
              if spec.fine_tuning.float32_master_weights else
              'no float32 master weights (InternVL\'s protocol; updates below half a bfloat16 '
              'step round away)')
    return [f'fine-tuning (trial {first}): {low / 1e6:,.2f} M trainable low-precision '
            f'parameters, {sum(sizes.values()) / 1e6:,.2f} M in all; {chosen}. Per rank, '
            f'weights, gradients and {optimizer.get("type", "optimizer")} state (not counted: '
            f'activations, DDP\'s gradient buckets, another {sizes_low_gb(sizes):.2f} GB):',
            f'  {plain / 1e9:,.2f} GB without float32 master weights, {masters / 1e9:,.2f} GB '
            f'with them (computed from the parameter counts)']
