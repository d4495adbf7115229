"""The config a worker trains, built in one place: ``trial_config`` from the base config and a
planned trial (sweep_plan.PlannedTrial: its overrides and derived values), ``group_config`` for a
trial group from its members' configs. mmcv is imported only when a config is built (on the
workers): the trial processes, which only name directories, stay light.

What a trial adds to its base config: the overrides (searched and derived values), its training
set wrapped in mmseg_custom's ``FewShotSubset`` (the fraction and subset seed the plan derived;
the kept names recorded in the trial's directory), its work directory with ``auto_resume`` (a
restarted or resumed trial continues from its latest checkpoint), and where the workers keep the
sweep's validation feature cache (val_cache.py).
"""
import copy
import os.path as osp

from orchestrator.keys import FRACTION_KEY, SUBSET_SEED_KEY

SUBSET_RECORD = 'fewshot_subset.txt'  # in the trial's directory: the names its subset keeps


def work_dir(trial_dir):
    """The trial's mmseg work directory (checkpoints, logs, metrics.jsonl)."""
    return osp.join(trial_dir, 'mmseg')


def fewshot_train(train, fraction, seed, record=None):
    """``train`` (a dataset config) wrapped in FewShotSubset."""
    return dict(type='FewShotSubset', dataset=train, fraction=fraction, seed=seed,
                record=record)


def trial_config(base, base_filename, trial, trial_dir=None, val_feature_cache=None):
    """The mmcv Config that trains ``trial`` (module docstring); ``trial_dir`` None: the config
    only, for a check of its paths before the sweep starts (nothing recorded, no work dir)."""
    from mmcv import Config
    cfg = Config(copy.deepcopy(base), filename=base_filename)
    cfg.merge_from_dict(trial.overrides)
    record = osp.join(trial_dir, SUBSET_RECORD) if trial_dir else None
    cfg.data.train = fewshot_train(cfg.data.train, trial.derived[FRACTION_KEY],
                                   trial.derived[SUBSET_SEED_KEY], record)
    if trial_dir:
        cfg.work_dir = work_dir(trial_dir)
        cfg.auto_resume = True
    if val_feature_cache:  # worker.py adds the hook that reads it
        cfg.val_feature_cache = val_feature_cache
    return cfg


def group_config(cfgs, group_dir):
    """The mmcv Config that trains ``cfgs`` (trial configs differing only in head-side values)
    as one MultiHeadEncoderDecoder: their heads, each head's optimizer, the shared rest."""
    gcfg = copy.deepcopy(cfgs[0])
    model = gcfg.model
    model.type = 'MultiHeadEncoderDecoder'
    model.decode_heads = [copy.deepcopy(c.model.decode_head) for c in cfgs]
    model.pop('decode_head')
    gcfg.optimizer = dict(type=cfgs[0].optimizer.type, constructor='MultiHeadOptimizerConstructor',
                          paramwise_cfg=dict(heads=[copy.deepcopy(c.optimizer) for c in cfgs]))
    gcfg.find_unused_parameters = True  # a stopped head's parameters get no gradient under DDP
    # the heads' evaluations are MultiHeadEvalHook's, their checkpoints TrialGroupCheckpointHook's
    gcfg.checkpoint_config = dict(by_epoch=False, interval=10 ** 9, save_last=False)
    gcfg.pop('auto_resume', None)
    gcfg.work_dir = group_dir
    if gcfg.data.train.get('type') == 'FewShotSubset':  # the one subset, in every member's dir
        gcfg.data.train['record'] = [c.data.train.get('record') for c in cfgs]
    return gcfg
