"""One Tune trial: resolve its mmseg config, pick its few-shot subset, run a Ray Train
TorchTrainer of N workers, forward their reports to Tune (TuneReportCallback)."""
import os
import os.path as osp

import ray.train
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from orchestrator.plan import resolved_config
from orchestrator.spec import FRACTION_KEY


def trial_dir(output_dir, trial_id):
    return osp.join(output_dir, 'trials', trial_id)


def train_loop_per_worker(loop_config):
    """Ray Train worker: the ordinary worker function, reporting each evaluation to Ray Train."""
    from mmcv import Config

    from orchestrator import worker
    worker.train(Config(loop_config['cfg']), loop_config['work_dir'], callback=ray.train.report,
                 source=loop_config['source'])


def prepare_trial_config(spec, base_cfg, params, out_dir):
    """Resolved mmcv Config for one trial; writes resolved_config.py and fewshot_subset.txt."""
    from mmseg_custom.datasets.fewshot import write_split_file
    cfg, derived = resolved_config(spec, base_cfg, params)
    os.makedirs(out_dir, exist_ok=True)
    train = cfg.data.train
    img_dir = train.img_dir if osp.isabs(train.img_dir) else osp.join(train.data_root or '',
                                                                      train.img_dir)
    split = osp.join(out_dir, 'fewshot_subset.txt')
    write_split_file(img_dir, derived[FRACTION_KEY], split, seed=spec.fewshot_seed,
                     img_suffix=train.get('img_suffix', '.jpg'))
    train.split = split
    cfg.work_dir = osp.join(out_dir, 'mmseg')
    cfg.dump(osp.join(out_dir, 'resolved_config.py'))
    return cfg


def run_trial(config, spec, base_cfg, output_dir):
    """Tune function trainable (a plain function, as in Ray Tune's examples)."""
    trial_id = tune.get_context().get_trial_id()
    out_dir = trial_dir(output_dir, trial_id)
    cfg = prepare_trial_config(spec, base_cfg, dict(config), out_dir)
    use_gpu = spec.gpus_per_worker > 0
    resources = {'CPU': spec.cpus_per_worker}
    if use_gpu:
        resources['GPU'] = spec.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dict(cfg=cfg._cfg_dict.to_dict(), work_dir=cfg.work_dir,
                               source=spec.source),
        torch_config=TorchConfig(backend='nccl' if use_gpu else 'gloo'),
        scaling_config=ray.train.ScalingConfig(num_workers=spec.workers_per_trial,
                                               use_gpu=use_gpu, resources_per_worker=resources),
        run_config=ray.train.RunConfig(name=f'train-{trial_id}',
                                       storage_path=osp.join(output_dir, 'ray_train'),
                                       callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
