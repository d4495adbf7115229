"""One training worker: an mmcv Config -> mmseg segmentor with our FCNHead -> train, evaluate -> metrics.

An ordinary function. It runs in one process, under torchrun, or in a sweep's warm Ray worker, and
is distributed whenever ``torch.distributed`` is initialised (or torchrun's WORLD_SIZE > 1):
gloo on CPU, nccl on GPU. Training itself is mmseg's own ``train_segmentor``; what this module
adds is the device decision, the CPU handling of SyncBatchNorm, clear errors for missing data,
and one metrics dict out (the same on every rank).

    python -m orchestrator.worker configs/tiny_fcn_synthetic.py --work-dir work_dirs/tiny
    torchrun --nproc_per_node 2 -m orchestrator.worker configs/tiny_fcn_synthetic.py --work-dir ...
"""
import copy
import json
import logging
import os
import os.path as osp
import sys
import time
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

import mmseg_custom  # noqa: F401  (torch-2 shims + our registrations; before mmcv is imported)
import mmcv
from mmcv import Config, DictAction
from mmcv.cnn.utils import revert_sync_batchnorm
from mmcv.runner import get_dist_info
from mmseg.apis import set_random_seed, train_segmentor
from mmseg.datasets import build_dataset
from mmseg.models import build_segmentor
from mmseg.utils import get_root_logger

from mmseg_custom.hooks import TrainingDiverged, TrainingStopped
from mmseg_custom.hooks.run_context import attached
from mmseg_custom.hooks.frozen_backbone import tensors_sha256
from mmseg_custom.models.backbones.internvit_weights import BackboneWeightsError
from mmseg_custom.models.head_rng import isolate_head_rng, reinit_head

from orchestrator.checkpoints import readable_latest, remove_partial_writes
from orchestrator.errors import ConfigError, TrialFailed
from orchestrator.preflight import check_data_paths, dataset_configs
from orchestrator.trial_config import group_config


HEAD_FILE = 'head_final.pth'  # the trained head's weights, solo or grouped


state_digest = tensors_sha256  # rank_sync.json: data-parallel ranks must end identical


def build_model(cfg, source='config', init_weights=True):
    """mmseg segmentor from cfg; a config the model rejects is a ConfigError naming the source."""
    try:
        model = build_segmentor(cfg.model, train_cfg=cfg.get('train_cfg'),
                                test_cfg=cfg.get('test_cfg'))
    except (AssertionError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f'{source}: model: {e}') from e
    if init_weights:
        load_weights(model, source)
    return model


def load_weights(model, source='config'):
    """The model's initial and pretrained weights; a backbone file that would leave parameters
    random (wrong layout, wrong model) is a ConfigError naming the file and the first keys."""
    try:
        model.init_weights()
    except (BackboneWeightsError, FileNotFoundError) as e:
        raise ConfigError(f'{source}: model.backbone.pretrained: {e}') from None


def init_distributed():
    """Join torchrun's process group when launched by it, also with one process (as mmseg's
    ``--launcher pytorch``: DDP and SyncBatchNorm on one GPU); True when running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get('WORLD_SIZE', '1')) > 1 or 'TORCHELASTIC_RUN_ID' in os.environ:
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
        dist.init_process_group(backend=backend)
        return True
    return False


def _revert_sync_bn_on_cpu(model, distributed, logger):
    """SyncBatchNorm needs CUDA tensors (and torch DDP refuses it in CPU modules): on CPU every
    SyncBatchNorm becomes a BatchNorm2d with per-worker batch statistics; weights still train in
    sync (DDP all-reduces their gradients) and BN buffers are broadcast from rank 0 before each
    evaluation."""
    n_sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    if n_sync == 0:
        return model
    logger.warning(
        f'CPU run ({"distributed, gloo" if distributed else "single process"}): {n_sync} '
        'SyncBatchNorm layer(s) (e.g. FCNHead with_norm=True) run as BatchNorm2d with '
        'per-worker statistics; they synchronise only on GPU.')
    return revert_sync_batchnorm(model)


def _fresh_root_logger(log_file, log_level):
    """mmseg's root logger writing to this run's file. mmcv caches loggers per process, so a
    process that trains several runs (a warm sweep worker) would keep logging to the first file."""
    from mmcv.utils import logging as mmcv_logging
    logger = logging.getLogger('mmseg')
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    mmcv_logging.logger_initialized.pop('mmseg', None)
    return get_root_logger(log_file=log_file, log_level=log_level)


def _drop_deepspeed_keys(cfg, source):
    """InternVL's configs carry DeepSpeed switches for their own patched mmcv; here training is
    mmseg's DDP, so the keys are ignored (with a warning, not silently)."""
    found = [k for k in ('deepspeed', 'deepspeed_config') if k in cfg]
    for key in found:
        cfg.pop(key)
    if isinstance(cfg.get('checkpoint_config'), dict) and 'deepspeed' in cfg.checkpoint_config:
        cfg.checkpoint_config.pop('deepspeed')
        found.append('checkpoint_config.deepspeed')
    if found:
        warnings.warn(f'{source}: ignoring DeepSpeed keys {found}: training uses mmseg\'s DDP')


def _start_run(cfg):
    """Join the process group if any, pick the device, seed every RNG from ``cfg.seed``."""
    distributed = init_distributed()
    rank, world_size = get_dist_info()
    cuda = torch.cuda.is_available()
    cfg.device = 'cuda' if cuda else 'cpu'
    cfg.gpu_ids = [int(os.environ.get('LOCAL_RANK', 0))] if cuda else [0]
    cfg.seed = cfg.get('seed', 0)
    for train in dataset_configs(cfg.data.get('train')):
        if train.get('max_image_num') is not None:
            train.setdefault('subset_seed', cfg.seed)  # as InternVL: each seed, another subset
    set_random_seed(cfg.seed, deterministic=cfg.get('deterministic', False))
    return distributed, rank, world_size, cuda, cfg.seed


def _open_work_dir(cfg):
    """Create ``cfg.work_dir`` and this run's log file there; (timestamp, logger)."""
    mmcv.mkdir_or_exist(cfg.work_dir)
    if cfg.data.get('workers_per_gpu', 2) == 0:
        cfg.data.persistent_workers = False  # torch refuses persistent workers without workers
    timestamp = time.strftime('%Y%m%d_%H%M%S', time.localtime())
    logger = _fresh_root_logger(osp.join(cfg.work_dir, f'{timestamp}.log'),
                                cfg.get('log_level', 'INFO'))
    return timestamp, logger


def _with_hooks(cfg, ours):
    """The config's custom hooks and ours; one of ours the config already has (it is the config
    of an earlier run, reloaded) is not added twice."""
    hooks = list(cfg.get('custom_hooks', []))
    present = {h['type'] for h in hooks}
    return hooks + [h for h in ours if h['type'] not in present]


def _val_feature_cache(cfg):
    """The hook that keeps a frozen backbone's validation outputs (val_features.py), where the
    sweep gave the run its cache (orchestrator/val_cache.py)."""
    if not cfg.get('val_feature_cache'):
        return []
    model = cfg.model
    return [dict(type='ValFeatureCacheHook', **cfg.val_feature_cache,
                 model=dict(backbone=model.backbone, pretrained=model.get('pretrained')),
                 load_from=cfg.get('load_from'),
                 priority=60)]  # before the evaluation hooks (80) start their first


def _own_head_rng(heads, seed, cfg):
    """Each head's initial weights and dropout masks from streams of its own, then the data
    stream restarted at ``seed``: a head trains the same alone or in a group (head_rng.py)."""
    for head in heads:
        reinit_head(head, seed)
        isolate_head_rng(head, seed)
    set_random_seed(seed, deterministic=cfg.get('deterministic', False))


def _save_head(head, work_dir):
    """The final head weights (rank 0), the same file for solo and grouped runs."""
    if get_dist_info()[0] == 0:
        torch.save({k: v.detach().cpu() for k, v in head.state_dict().items()},
                   osp.join(work_dir, HEAD_FILE))


@dataclass
class _Run:
    """A run set up to train: the built model with its weights, the training set, its log."""
    model: object
    datasets: list
    timestamp: str
    logger: object
    distributed: bool
    rank: int
    world_size: int
    seed: int


def _pick_resume(cfg, rank, logger):
    """With ``auto_resume``, resume from the newest checkpoint that can be read, rather than
    mmseg's newest (which fails on a truncated one); rank 0 sets the unreadable ones aside."""
    if not cfg.get('auto_resume') or cfg.get('resume_from'):
        return
    decided = [None, []]
    if rank == 0:  # one decision for every rank (a rank that saw another file would desync DDP)
        remove_partial_writes(cfg.work_dir)
        decided = list(readable_latest(cfg.work_dir))
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(decided, src=0)
    path, skipped = decided
    for name, why in skipped:
        logger.warning(f'checkpoint {name} cannot be read ({why}); kept as {name}.unreadable, '
                       + (f'resuming from {osp.basename(path)}' if path else
                          'starting from iteration 0'))
    cfg.resume_from = path
    cfg.auto_resume = False  # decided here: mmseg's own search would find the skipped ones


def _pick_group_resume(cfgs, work_dirs, rank, logger):
    """Each member's checkpoint to continue from (``_pick_resume`` per member's work dir), or
    None for a group that starts at iteration 0. The pool groups members whose checkpoints
    are of one iteration (crew.WorkerPool.rejoin); members of two iterations are refused."""
    if not all(c.get('auto_resume') for c in cfgs):
        return None
    paths = []
    for c, work_dir in zip(cfgs, work_dirs):
        c = copy.deepcopy(c)
        c.work_dir = work_dir
        _pick_resume(c, rank, logger)
        paths.append(c.resume_from)
    if not any(paths):
        return None
    if None in paths or len({osp.basename(p) for p in paths}) > 1:
        raise TrialFailed('trial group members saved at different iterations: '
                          + ', '.join(osp.basename(p or 'none') for p in paths))
    return paths


def _setup_run(cfg, source, heads_of, check_model=None):
    """What a solo and a grouped run do alike before training: join the process group, build the
    model (before anything is written: a config the model rejects fails here, in one line), open
    the work dir and its log, load the weights, fit SyncBN to the device, give each head its own
    random streams (``heads_of(model)``), build the training set."""
    distributed, rank, world_size, cuda, seed = _start_run(cfg)
    model = build_model(cfg, source, init_weights=False)
    if check_model is not None:
        check_model(model)
    timestamp, logger = _open_work_dir(cfg)
    load_weights(model, source)
    if not cuda:
        model = _revert_sync_bn_on_cpu(model, distributed, logger)
    _own_head_rng(heads_of(model), seed, cfg)
    datasets = [build_dataset(cfg.data.train)]
    model.CLASSES, model.PALETTE = datasets[0].CLASSES, datasets[0].PALETTE
    return _Run(model, datasets, timestamp, logger, distributed, rank, world_size, seed)


def train(cfg, work_dir=None, callback=None, source='config', should_stop=None,
          gpus_per_rank=None):
    """Train and evaluate ``cfg`` (an mmcv Config); return the final evaluation's metrics.

    The dict holds mIoU, mAcc, aAcc, per-class ``IoU.<class>``/``Acc.<class>`` and ``iter``.
    ``callback(metrics)`` is called on every rank after every evaluation, with rank 0's metrics
    (the sweep's reporting path). ``should_stop()``, asked after every iteration on every rank,
    ends the run early when any rank says so; the last evaluation's metrics are returned then.
    ``gpus_per_rank``: each rank's share of a GPU, what its GPU-hours count (None: a whole GPU
    each where CUDA is).
    """
    cfg = copy.deepcopy(cfg)
    check_data_paths(cfg, source)
    _drop_deepspeed_keys(cfg, source)
    cfg.work_dir = osp.abspath(work_dir or cfg.get('work_dir') or 'work_dirs/run')
    run = _setup_run(cfg, source, lambda model: [model.decode_head])
    model, logger = run.model, run.logger
    logger.info(f'rank {run.rank}/{run.world_size}, device {cfg.device}, '
                f'backend {dist.get_backend() if run.distributed else "none"}')
    _pick_resume(cfg, run.rank, logger)
    history = []

    def on_eval(metrics):
        history.append(metrics)
        if callback is not None:
            callback(metrics)

    cfg.custom_hooks = _with_hooks(cfg, [
        dict(type='EvalMetricsHook', gpus_per_rank=gpus_per_rank, priority=80),
        dict(type='DivergenceHook', priority='VERY_HIGH'),  # before any step or save
        dict(type='FrozenBackboneCheckpointHook'),  # probes: no copies of a frozen backbone
        dict(type='BestCheckpointLinkHook')])  # save_best: a link, not a second copy
    cfg.custom_hooks = _with_hooks(cfg, _val_feature_cache(cfg))
    if should_stop is not None:  # an all-reduce per iteration: only where someone may ask
        cfg.custom_hooks = _with_hooks(cfg, [dict(type='StopRequestHook', priority='LOWEST')])
    palette = None if model.PALETTE is None else [[int(c) for c in color]
                                                  for color in model.PALETTE]  # plain: dumps
    cfg.checkpoint_config = dict(cfg.get('checkpoint_config') or {},
                                 meta=dict(CLASSES=model.CLASSES, PALETTE=palette))
    if run.rank == 0:  # the config as it runs (plain values: it reloads; run_context.py)
        cfg.dump(osp.join(cfg.work_dir, 'config.py'))
    try:
        with attached(on_metrics=[on_eval], should_stop=[should_stop]):
            train_segmentor(model, run.datasets, cfg, distributed=run.distributed,
                            validate=True, timestamp=run.timestamp, meta=dict(seed=run.seed))
    except TrainingStopped as e:
        logger.info(f'training ended early on request: {e}')
        return history[-1] if history else None

    _record_rank_sync(model, cfg.work_dir, run.distributed, logger)
    _save_head(model.decode_head, cfg.work_dir)
    return history[-1] if history else None


def _group_hooks(gcfg, cfgs, work_dirs, run, gpus_per_rank):
    """A trial group's own hooks: each head's checkpoints in its trial's directory (as its
    solo run's), each head's evaluation, each head's stop; the validation feature cache."""
    model = run.model
    interval = gcfg.get('evaluation', {}).get('interval', gcfg.runner.max_iters)
    palette = None if model.PALETTE is None else [[int(c) for c in color]
                                                  for color in model.PALETTE]
    return [
        dict(type='TrialGroupCheckpointHook', work_dirs=list(work_dirs),
             optimizers=[c.optimizer for c in cfgs], interval=interval,
             resume_from=_pick_group_resume(cfgs, work_dirs, run.rank, run.logger),
             max_keep_ckpts=(cfgs[0].get('checkpoint_config') or {}).get('max_keep_ckpts', -1),
             meta=dict(CLASSES=model.CLASSES, PALETTE=palette),
             priority=75),  # at an evaluation, before it (as mmcv's CheckpointHook)
        dict(type='MultiHeadEvalHook', val=gcfg.data.val, interval=interval,
             work_dirs=list(work_dirs), seed=run.seed,
             workers_per_gpu=gcfg.data.get('workers_per_gpu', 2), gpus_per_rank=gpus_per_rank,
             priority=80),
        dict(type='HeadControlHook', priority='LOWEST')] + _val_feature_cache(gcfg)


def train_group(cfgs, work_dirs, group_dir, callbacks=None, should_stops=None, source='config',
                gpus_per_rank=None):
    """Train the heads of ``cfgs`` on one frozen backbone pass per batch; head k's evaluations go
    to ``work_dirs[k]/metrics.jsonl`` and ``callbacks[k]``, ``should_stops[k]()`` stops head k
    alone. Returns the heads' last metrics. Each head ends as it would have in its solo run
    (tests/test_trial_groups.py checks the weights)."""
    cfgs = [copy.deepcopy(c) for c in cfgs]
    for c in cfgs:
        check_data_paths(c, source)
        _drop_deepspeed_keys(c, source)
    gcfg = group_config(cfgs, osp.abspath(group_dir))
    n = len(cfgs)
    callbacks = callbacks or [None] * n

    def backbone_frozen(model):
        trained = [name for name, p in model.backbone.named_parameters() if p.requires_grad]
        if trained:
            raise ConfigError(f'{source}: grouped heads need a frozen backbone; '
                              f'{trained[0]} (and {len(trained) - 1} more) would train')

    run = _setup_run(gcfg, source, lambda model: model.heads, backbone_frozen)
    model, logger = run.model, run.logger
    logger.info(f'trial group of {n} heads: rank {run.rank}/{run.world_size}, '
                f'device {gcfg.device}')
    history = [[] for _ in range(n)]

    def on_eval(k):
        def record(metrics):
            if 'failed' not in metrics:  # a head that diverged: said, not an evaluation
                history[k].append(metrics)
            if callbacks[k] is not None:
                callbacks[k](metrics)
        return record

    gcfg.custom_hooks = _with_hooks(gcfg, _group_hooks(gcfg, cfgs, work_dirs, run,
                                                        gpus_per_rank))
    if run.rank == 0:  # the config as it runs (plain values: it reloads; run_context.py)
        gcfg.dump(osp.join(gcfg.work_dir, 'config.py'))
    try:
        with attached(on_metrics=[on_eval(k) for k in range(n)],
                      should_stop=list(should_stops or [None] * n)):
            train_segmentor(model, run.datasets, gcfg, distributed=run.distributed,
                            validate=False, timestamp=run.timestamp, meta=dict(seed=run.seed))
    except TrainingStopped as e:
        logger.info(f'grouped training ended early: {e}')
    for k, head in enumerate(model.heads):
        if model.active[k] or history[k]:
            _save_head(head, work_dirs[k])
    return [h[-1] if h else None for h in history]


def _record_rank_sync(model, work_dir, distributed, logger):
    """Every rank's digest of the decode head, and of the backbone when it trains, into
    work_dir/rank_sync.json: data-parallel workers must end identical, and a silent desync would
    make every reported mIoU meaningless."""
    model = getattr(model, 'module', model)
    parts = dict(decode_head=model.decode_head)
    if any(p.requires_grad for p in model.backbone.parameters()):
        parts['backbone'] = model.backbone
    digests = {name: [state_digest(part)] for name, part in parts.items()}
    if distributed:
        for name, own in digests.items():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, own[0])
            digests[name] = gathered
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    for name, values in digests.items():
        in_sync = len(set(values)) == 1
        (logger.info if in_sync else logger.error)(
            f'{name.replace("_", " ")} identical on all {len(values)} rank(s): {in_sync}')
    with open(osp.join(work_dir, 'rank_sync.json'), 'w') as f:
        json.dump(dict(world_size=len(digests['decode_head']),
                       backend=dist.get_backend() if distributed else None,
                       device=str(next(model.decode_head.parameters()).device),
                       sync_batchnorm=sum(isinstance(m, torch.nn.SyncBatchNorm)
                                          for m in model.modules()),
                       **{f'{name}_sha256': values for name, values in digests.items()}), f)


def main(argv=None):
    import argparse


    parser = argparse.ArgumentParser(description='Train one mmseg config (one process or torchrun).')
    parser.add_argument('config')
    parser.add_argument('--work-dir', required=True)
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                        help='override config keys, e.g. model.decode_head.num_convs=0')
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.cfg_options)
        metrics = train(cfg, args.work_dir, source=args.config)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return e.exit_code
    except TrainingDiverged as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    if int(os.environ.get('RANK', 0)) == 0:
        print('FINAL_METRICS ' + json.dumps(metrics))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def load_config(path, options=None):
    """mmcv Config from a file plus dotted overrides; a missing or broken file is a ConfigError."""
    if not osp.isfile(path):
        raise ConfigError(f'{path}: config file not found')
    try:
        cfg = Config.fromfile(path)
    except Exception as e:  # syntax errors, bad _base_ paths: report the file, not mmcv's stack
        raise ConfigError(f'{path}: cannot load config: {e}') from e
    cfg.merge_from_dict(options or {})
    return cfg


if __name__ == '__main__':
    sys.exit(main())
