"""One Tune trial: resolve its overrides, pick its few-shot subset, run a Ray Train TorchTrainer
of N workers, forward their reports to Tune (TuneReportCallback).

The trial process only drives: it never imports mmcv or mmseg (they cost ~5 s per trial); the
workers merge the config with mmcv and train.
"""
import os
import os.path as osp

import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.fewshot import write_split_file
from orchestrator.plan import merged_config, resolve
from orchestrator.spec import FRACTION_KEY


def trial_dir(output_dir, trial_id):
    return osp.join(output_dir, 'trials', trial_id)


def train_loop_per_worker(job):
    """Ray Train worker: merge the config, train with the ordinary worker function, report each
    evaluation to Ray Train (every rank reports, as Train V2 expects)."""
    from orchestrator import worker  # mmseg_custom first: shims before mmcv loads
    cfg = merged_config(job['base'], job['overrides'], job['base_filename'])
    if ray.train.get_context().get_world_rank() == 0:
        cfg.dump(osp.join(job['trial_dir'], 'resolved_config.py'))
    worker.train(cfg, cfg.work_dir, callback=ray.train.report, source=job['source'])


def trial_overrides(spec, base, params, out_dir):
    """The trial's mmseg overrides, with its few-shot split file written to ``out_dir``."""
    overrides, derived = resolve(spec, base, params)
    os.makedirs(out_dir, exist_ok=True)
    train = base['data']['train']
    root = overrides.get('data.train.data_root', train.get('data_root')) or ''
    img_dir = train['img_dir'] if osp.isabs(train['img_dir']) else osp.join(root, train['img_dir'])
    split = osp.join(out_dir, 'fewshot_subset.txt')
    write_split_file(img_dir, derived[FRACTION_KEY], split, seed=spec.fewshot_seed,
                     img_suffix=train.get('img_suffix', '.jpg'))
    overrides['data.train.split'] = split
    overrides['work_dir'] = osp.join(out_dir, 'mmseg')
    return overrides


def run_trial(config, spec, base, base_filename, output_dir):
    """Tune function trainable (a plain function, as in Ray Tune's examples)."""
    trial_id = tune.get_context().get_trial_id()
    out_dir = trial_dir(output_dir, trial_id)
    overrides = trial_overrides(spec, base, dict(config), out_dir)
    use_gpu = spec.gpus_per_worker > 0
    resources = {'CPU': spec.cpus_per_worker}
    if use_gpu:
        resources['GPU'] = spec.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dict(base=base, overrides=overrides, base_filename=base_filename,
                               trial_dir=out_dir, source=spec.source),
        torch_config=TorchConfig(backend='nccl' if use_gpu else 'gloo'),
        scaling_config=ray.train.ScalingConfig(num_workers=spec.workers_per_trial,
                                               use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f'train-{trial_id}',
                                       storage_path=osp.join(output_dir, 'ray_train'),
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
