"""The dotted config keys a sweep treats specially, named once (a leaf: imported by the spec, the
plan, the trial, the tracking callback and the workers' checks)."""
FRACTION_KEY = 'fewshot.fraction'  # not an mmseg key: selects the few-shot training subset
SUBSET_SEED_KEY = 'fewshot.seed'  # not an mmseg key: the permutation the subset is cut from
WARMUP_KEY = 'lr_config.warmup_iters'
WEIGHTS_KEY = 'model.backbone.pretrained'
