"""The dotted config keys a sweep treats specially, named once (a leaf: imported by the spec, the
plan, the trial, the tracking callback and the workers' checks)."""
FRACTION_KEY = 'fewshot.fraction'  # not an mmseg key: selects the few-shot training subset
SUBSET_SEED_KEY = 'fewshot.seed'  # not an mmseg key: the permutation the subset is cut from
MASTER_WEIGHTS_KEY = 'fine_tuning.float32_master_weights'  # not an mmseg key: recorded opt-in
WARMUP_KEY = 'lr_config.warmup_iters'
WEIGHTS_KEY = 'model.backbone.pretrained'
REPEAT_KEY = 'seed'  # a sweep's repeats (search.repeats): the run's seed
# what varies between repeats of one configuration: noise to average over, never a factor
NOISE_KEYS = (REPEAT_KEY, SUBSET_SEED_KEY)
# the head variants a probing study compares (num_convs x with_norm x concat_input)
HEAD_VARIANT = ('model.decode_head.num_convs', 'model.decode_head.with_norm',
                'model.decode_head.concat_input')
