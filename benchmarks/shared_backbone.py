"""Trial groups: K head variants on a frozen InternViT trained (a) as K separate trainings and
(b) as one group (one backbone pass per batch), on CPU, one process.

Measures the backbone's forward cost per batch (b) and the heads' forward+backward+step cost
per batch (h, mean over the K variants), the ideal speedup K(b+h)/(b+Kh), the achieved speedup
t(a)/t(b) and its share of the ideal. The issue's target: >= 85 % of the ideal at K = 8.
Printed as ratios measured in one run, never asserted.

    .venv/bin/python benchmarks/shared_backbone.py                   # tiny InternViT (width 64)
    .venv/bin/python benchmarks/shared_backbone.py --width 256 --depth 6 --iters 30
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = [dict(num_convs=0, with_norm=True), dict(num_convs=1), dict(num_convs=2),
         dict(num_convs=1, with_norm=True, concat_input=False), dict(num_convs=0, lr=1e-3),
         dict(num_convs=2, with_norm=True), dict(num_convs=1, kernel_size=1, lr=5e-3),
         dict(num_convs=2, concat_input=False, lr=1e-3)]


def config(root, args, head):
    """The tiny frozen config at ``args``' sizes (width, depth; optional size, patch, classes,
    channels, loader_workers: the GPU check's larger shapes) with one head variant."""
    from mmcv import Config
    cfg = Config.fromfile(str(ROOT / 'configs' / 'tiny_vit_frozen_fcn_synthetic.py'))
    size, classes = getattr(args, 'size', 64), getattr(args, 'classes', None)
    for split in ('train', 'val', 'test'):
        cfg.data[split].data_root = str(root)
        if classes:
            cfg.data[split].num_classes = classes
        if split != 'train':  # evaluate at the generated size (the base config's is 64 px)
            cfg.data[split].pipeline[1].img_scale = (size, size)
    if classes:
        cfg.model.decode_head.num_classes = classes
    loader_workers = getattr(args, 'loader_workers', 0)
    cfg.data.update(workers_per_gpu=loader_workers, persistent_workers=loader_workers > 0)
    patch = getattr(args, 'patch', 8)
    cfg.model.backbone.update(embed_dim=args.width, depth=args.depth, patch_size=patch,
                              img_size=size, pretrain_size=size,
                              num_heads=max(1, args.width // 32 if args.width < 1024 else 16),
                              out_indices=[args.depth - 1])
    cfg.model.decode_head.channels = getattr(args, 'channels', cfg.model.decode_head.channels)
    head = dict(head)
    lr = head.pop('lr', None)
    if lr:
        cfg.optimizer.lr = lr
    cfg.model.decode_head.update(in_channels=args.width, **head)
    if head.get('num_convs') == 0:
        cfg.model.decode_head.channels = args.width
    cfg.runner.max_iters = args.iters
    cfg.evaluation.interval = args.iters
    cfg.checkpoint_config.interval = args.iters
    cfg.log_config.interval = args.iters
    return cfg


def loop_s_per_iter(work_dir, key='time'):
    """mmseg's logged seconds per training iteration (data + forward/backward + step), averaged
    over the run (the log interval is the run's length): the loop without start-up or eval."""
    import glob
    import json
    logs = glob.glob(f'{work_dir}/*.log.json')
    entries = [json.loads(line) for line in open(logs[0]) if '"mode": "train"' in line]
    return entries[-1][key]


def unit_costs(cfgs, reps=10, size=64, device='cpu'):
    """(b, h): seconds per training batch of the backbone forward, and of one head's
    forward + backward + optimizer step (mean over the variants)."""
    import torch
    from mmcv.cnn.utils import revert_sync_batchnorm
    from mmcv.runner import build_optimizer
    from mmseg.models import build_head, build_segmentor

    def clock():
        if device != 'cpu':
            torch.cuda.synchronize()
        return time.perf_counter()
    batch = cfgs[0].data.samples_per_gpu
    img = torch.randn(batch, 3, size, size, device=device)
    gt = torch.randint(0, cfgs[0].model.decode_head.num_classes, (batch, 1, size, size),
                       device=device)
    metas = [dict(img_shape=(size, size, 3), ori_shape=(size, size, 3),
                  pad_shape=(size, size, 3), flip=False)] * batch
    # one backbone (as a group has), one head per variant: a 300M backbone built K times on
    # the CPU is what slowed the GPU check's trial-group check
    model = revert_sync_batchnorm(build_segmentor(cfgs[0].model)).to(device)
    model.init_weights()
    heads = []
    for cfg in cfgs:
        head = revert_sync_batchnorm(build_head(cfg.model.decode_head)).to(device)
        head.init_weights()
        head.train()
        heads.append((head, build_optimizer(head, copy.deepcopy(cfg.optimizer))))
    with torch.no_grad():
        feats = model.extract_feat(img)
        start = clock()
        for _ in range(reps):
            model.extract_feat(img)
        b = (clock() - start) / reps
    hs = []
    for m, opt in heads:
        for i in range(reps + 2):
            if i == 2:
                start = clock()
            opt.zero_grad()
            loss = m.forward_train(feats, metas, gt, None)
            sum(v for k, v in loss.items() if 'loss' in k).backward()
            opt.step()
        hs.append((clock() - start) / reps)
    return b, statistics.mean(hs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--ks', type=int, nargs='+', default=[1, 4, 8])
    p.add_argument('--iters', type=int, default=40)
    p.add_argument('--width', type=int, default=64)
    p.add_argument('--depth', type=int, default=2)
    args = p.parse_args()
    import torch
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    from orchestrator import worker
    import logging
    logging.getLogger('mmseg').setLevel(logging.WARNING)
    print(f'CPU cores {os.cpu_count()}, torch threads {torch.get_num_threads()}; InternViT width '
          f'{args.width}, depth {args.depth}, frozen; {args.iters} iterations + 1 evaluation per '
          'training; 64 px crops, batch 4')
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_ade_layout(Path(tmp) / 'data')
        for k in args.ks:
            cfgs = [config(root, args, HEADS[i % len(HEADS)]) for i in range(k)]
            b, h = unit_costs(cfgs)
            start = time.perf_counter()
            for i, cfg in enumerate(cfgs):
                worker.train(copy.deepcopy(cfg), f'{tmp}/k{k}/solo{i}')
            separate = time.perf_counter() - start
            start = time.perf_counter()
            worker.train_group([copy.deepcopy(c) for c in cfgs],
                               [f'{tmp}/k{k}/grouped{i}' for i in range(k)], f'{tmp}/k{k}/group')
            grouped = time.perf_counter() - start
            loop_solo = sum(loop_s_per_iter(f'{tmp}/k{k}/solo{i}') for i in range(k))
            loop_group = loop_s_per_iter(f'{tmp}/k{k}/group')
            rows.append((k, b, h, separate, grouped, loop_solo, loop_group))
    print('wall: whole trainings (start-up, data, 1 evaluation each); loop: mmseg\'s seconds per '
          'training iteration, summed over the K solo runs vs the group')
    print(f'{"K":>2} {"b ms":>6} {"h ms":>6} {"ideal x":>8} | {"K solo s":>8} {"group s":>8} '
          f'{"wall x":>7} {"of ideal":>8} | {"K solo ms":>9} {"group ms":>8} {"loop x":>7} '
          f'{"of ideal":>8}')
    for k, b, h, separate, grouped, loop_solo, loop_group in rows:
        ideal = k * (b + h) / (b + k * h)
        wall, loop = separate / grouped, loop_solo / loop_group
        print(f'{k:>2} {b * 1e3:6.1f} {h * 1e3:6.1f} {ideal:8.2f} | {separate:8.1f} '
              f'{grouped:8.1f} {wall:7.2f} {wall / ideal:8.0%} | {loop_solo * 1e3:9.1f} '
              f'{loop_group * 1e3:8.1f} {loop:7.2f} {loop / ideal:8.0%}')


if __name__ == '__main__':
    main()
