"""``orchestrator best SWEEP --out best.py``: the winning trial's fully resolved mmseg config, as a
file mmseg's own tools load unchanged (``mmcv.Config.fromfile``, ``tools/train.py``), so the winner
can be retrained or evaluated without this project's CLI.

It is the config the trial's workers trained (``trials/<id>/resolved_config.py``), with three
changes for a fresh run: ``custom_imports`` registers our FCNHead and friends on load (and the
``FewShotSubset`` training set, which keeps the trial's images from the same directory by the same
rule, pinned to their digest: a directory whose images changed is refused, not trained on another
subset); the subset's record file, the trial's ``work_dir`` and ``auto_resume`` are dropped (a
retraining starts clean in a directory of its own).
"""
import os
import os.path as osp
import shutil

from orchestrator.errors import ConfigError
from orchestrator.trial_config import SUBSET_RECORD

CUSTOM_IMPORTS = dict(imports=['mmseg_custom'], allow_failed_imports=False)


def _pin_subset(cfg, trial, out_path):
    """The training set of the export: the trial's FewShotSubset, less its record file (a
    retraining writes nothing into the sweep), pinned to the digest of the names it kept. A
    sweep run before FewShotSubset named its list as ``data.train.split``: copied beside the
    file, as then."""
    from mmseg_custom.datasets.fewshot_subset import digest
    train = cfg.data.train
    recorded = osp.join(trial, SUBSET_RECORD)
    if train.get('type') == 'FewShotSubset':
        train.pop('record', None)
        if osp.isfile(recorded):
            with open(recorded) as f:
                names = f.read().split()
            train['names_sha256'] = digest(names)
    elif train.get('split') and osp.isfile(recorded):
        kept = osp.splitext(out_path)[0] + '_fewshot_subset.txt'
        shutil.copyfile(recorded, kept)
        train['split'] = kept


def export_best(results, out_path):
    """Write the best finished trial's config to ``out_path``; returns (path, best row)."""
    from mmcv import Config
    best = results.best()
    trial = osp.join(results.sweep_dir, 'trials', best['trial_id'])
    source = osp.join(trial, 'resolved_config.py')
    if not osp.isfile(source):
        raise ConfigError(f'{source}: missing: the best trial\'s resolved config was not written')
    cfg = Config.fromfile(source)
    out_path = osp.abspath(out_path)
    os.makedirs(osp.dirname(out_path), exist_ok=True)
    _pin_subset(cfg, trial, out_path)
    cfg.custom_imports = CUSTOM_IMPORTS
    cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(out_path))[0])
    cfg.pop('auto_resume', None)
    header = (f'# Best trial of sweep {results.parent.data.tags.get("sweep")}: '
              f'{best["trial_id"]}, {results.metric} = {best[results.metric]:.4f}\n'
              f'# MLflow {results.tracking_uri} run {best["run_id"]}\n'
              f'# Written by `orchestrator best`; load with mmcv.Config.fromfile.\n')
    with open(out_path, 'w') as f:
        f.write(header + cfg.pretty_text)
    Config.fromfile(out_path)  # what a user will do first: fail here, not in their hands
    return out_path, best
