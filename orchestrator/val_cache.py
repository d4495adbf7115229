"""A sweep's validation feature cache (mmseg_custom/hooks/val_features.py): where each node keeps
it and within what budget (``val_feature_cache`` in the space file), what the dry run says of
it, and its removal at the sweep's end (every end the driver sees: finished, failed, stopped by
a first signal). The tiers' directories are resolved on each worker (the temp directory is a
node's, or a job's under Slurm): the settings travel, not paths."""
import hashlib
import os
import os.path as osp

MEMORY_DIR = '/dev/shm'  # a tmpfs on Linux: RAM the node's processes share by path


def settings(spec, sweep_dir):
    """``{'name', 'tiers'}`` as the workers take it (feature_store.py: a tier is [base or None
    (the worker's temp directory), bytes]), or None when the space file turns the cache off."""
    cache = spec.val_feature_cache
    if not cache.enabled:
        return None
    name = osp.join(f'orchestrator-val-features-{os.getuid()}',
                    hashlib.sha256(osp.abspath(sweep_dir).encode()).hexdigest()[:16])
    tiers = [[MEMORY_DIR, int(cache.memory_gb * 1e9)]] if osp.isdir(MEMORY_DIR) else []
    tiers.append([cache.disk_dir, int(cache.disk_gb * 1e9)])
    return dict(name=name, tiers=tiers)


def input_bytes(base):
    """Bytes of the frozen backbone's float32 outputs for one validation input (one crop of a
    sliding-window test; None where the test runs on whole images of unknown size), from one
    meta-device pass (meta_model.py: no weights, no arithmetic)."""
    import torch

    from orchestrator import meta_model
    test = base['model'].get('test_cfg') or {}
    if test.get('mode') != 'slide':
        return None
    try:
        model = meta_model.segmentor(base['model'])
        with torch.device('meta'):
            out = model.backbone(torch.empty(1, 3, *test['crop_size']))
    except Exception:  # a backbone the meta device cannot build: the line says less
        return None
    out = [out] if torch.is_tensor(out) else out
    return sum(t.numel() * 4 for t in out)  # kept in float32, as the heads read them


def dry_run_lines(spec, base, trials, sweep_dir):
    from mmseg_custom.feature_store import tier_dirs
    from orchestrator.fine_tuning import frozen_backbone
    cache = settings(spec, sweep_dir)
    if not cache:
        return ['validation features: not cached (val_feature_cache.enabled: false)']
    if not any(frozen_backbone(base, row) for row in trials):
        return ['validation features: not cached (the backbone trains)']
    tiers = tier_dirs(cache['name'], cache['tiers'])
    where = ', then '.join(f'{d} up to {b / 1e9:g} GB' for d, b in tiers)
    head = (f'validation features of a frozen backbone: computed once per node, kept in '
            f'{where} (as this machine resolves them)')
    per_input = input_bytes(base)
    if per_input is None:
        return [head]
    fits = ' and '.join(f'{b // per_input:,} in {d}' for d, b in tiers)
    return [f'{head}: {per_input / 1e6:.1f} MB per validation input (computed), so {fits}; '
            f'inputs beyond those are computed at every evaluation']
