"""The GPU path, proven in one prepared run: ``make gpu-check`` on a GPU machine, ``make
gpu-check-cpu`` (the same checks at toy size, part of the test suite) anywhere.

Checks, each in its own section of one JSON file (written after every check, so a failure
keeps what came before; its path is the last line printed):
  a. torchrun_train: one process under torchrun (nccl on GPU, gloo on CPU) trains the tiny
     config with SyncBatchNorm in head and backbone: kept as SyncBatchNorm on GPU, finite
     loss, an mIoU;
  b. backbone_forward: a frozen InternViT-6B-shaped backbone (random weights, bf16 on GPU) at
     504 px: ms per image, TFLOP/s, and % of the matmul peak measured in the same run;
  c. trial_group: K = 1, 4, 8, 12 heads trained as one trial group against K solo trainings
     of the same work, after one untimed warm-up training, the side that runs first
     alternating from K to K: the loop speedup (mmseg's seconds per iteration) against the
     ideal K(b+h)/(b+Kh), and the group's measured peak beside its planned bytes (grouping.py);
  d. finetune_step: steps of the unfrozen bf16 InternViT-6B-shaped few-shot model under DDP
     (torchrun): seconds per step, peak memory, finite loss, the backbone changed;
  e. checkpoint_size: the InternViT-6B linear probe's checkpoint with and without its frozen
     backbone (computed from the shapes on the meta device), and a real checkpoint of check
     c's frozen solo run on disk.

    make gpu-check                        # GPU machine: sets up from wheels, then --device cuda
    .venv/bin/python benchmarks/gpu_check.py --device cpu --out /tmp/gpu_check.json
"""
import argparse
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]

# Shapes per mode: full InternViT-6B width on GPU; toy widths on CPU (2 cores, seconds).
SIZES = dict(
    cuda=dict(vit=dict(preset='6B', depth=48, img=504, patch=14, batch=8, dtype='bfloat16'),
              finetune=dict(depth=48, img=504, batch=2, steps=3),
              group=dict(width=1024, depth=24, size=448, patch=14, classes=150, channels=512,
                         batch=8, iters=30, loader_workers=4),
              matmul=8192),
    cpu=dict(vit=dict(preset='6B', embed_dim=64, num_heads=4, depth=2, img=112, patch=14,
                      batch=2, dtype='float32'),
             finetune=dict(embed_dim=64, num_heads=4, depth=2, img=112, batch=2, steps=2),
             group=dict(width=64, depth=2, size=64, patch=8, classes=4, channels=32,
                        batch=4, iters=20, loader_workers=0),
             matmul=1024))


def vit_flops_per_image(dim, depth, mlp_ratio, img, patch):
    """Matmul FLOPs (2 per multiply-add) of one image through the ViT: patch embedding, then per
    block qkv, attention scores and values, projection and MLP."""
    grid = (img // patch) ** 2
    n = grid + 1
    hidden = dim * mlp_ratio
    per_block = 2 * n * (4 * dim * dim + 2 * dim * hidden) + 4 * n * n * dim
    return depth * per_block + 2 * grid * 3 * patch * patch * dim


def _timed(fn, reps, warmup, device):
    import torch
    for _ in range(warmup):
        fn()
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == 'cuda':
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def matmul_peak(device, n, dtype):
    """TFLOP/s of an n x n x n product in ``dtype``: the ceiling the backbone is measured
    against."""
    import torch
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = _timed(lambda: a @ b, reps=10, warmup=3, device=device)
    return 2 * n ** 3 / s / 1e12


def check_torchrun_train(args, tmp):
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    data = generate_ade_layout(Path(tmp) / 'data_a', num_classes=4, size=64)
    work = Path(tmp) / 'torchrun'
    iters = 40 if args.device == 'cuda' else 20
    options = [f'data.{s}.data_root={data}' for s in ('train', 'val', 'test')] + [
        'model.decode_head.with_norm=True', 'model.decode_head.norm_cfg.type=SyncBN',
        'model.backbone.norm_cfg.type=SyncBN', f'runner.max_iters={iters}',
        f'evaluation.interval={iters}', f'checkpoint_config.interval={iters}',
        f'log_config.interval={iters // 2}']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
           '-m', 'orchestrator.worker', 'configs/tiny_fcn_synthetic.py', '--work-dir', str(work),
           '--cfg-options', *options]
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]))
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f'torchrun exit {out.returncode}: {out.stderr[-3000:]}')
    metrics = json.loads(out.stdout.split('FINAL_METRICS ')[1].splitlines()[0])
    sync = json.loads((work / 'rank_sync.json').read_text())
    log = next(work.glob('*.log.json'))
    losses = [json.loads(line)['loss'] for line in log.read_text().splitlines()
              if '"mode": "train"' in line]
    return dict(wall_s=wall, iterations=iters, backend=sync['backend'], device=sync['device'],
                sync_batchnorm_layers=sync['sync_batchnorm'], losses=losses,
                loss_finite=all(math.isfinite(v) for v in losses), mIoU=metrics['mIoU'])


def check_backbone_forward(args, tmp):
    import torch
    from mmseg_custom.models.backbones.intern_vit import InternViT
    s = dict(SIZES[args.device]['vit'])
    img, batch, patch, dtype = s.pop('img'), s.pop('batch'), s.pop('patch'), s.pop('dtype')
    with torch.device(args.device):  # random weights made where they run: seconds, not minutes
        vit = InternViT(img_size=img, pretrain_size=img, patch_size=patch, freeze_vit=True,
                        out_indices=[s['depth'] - 1], dtype=dtype, **s)
    vit.eval()
    params = sum(p.numel() for p in vit.parameters())
    x = torch.randn(batch, 3, img, img, device=args.device)
    with torch.no_grad():
        sec = _timed(lambda: vit(x), reps=5, warmup=2, device=args.device)
    flops = vit_flops_per_image(vit.embed_dim, vit.depth, 4.0, img, patch)
    achieved = flops * batch / sec / 1e12
    peak = matmul_peak(args.device, SIZES[args.device]['matmul'], getattr(torch, dtype))
    result = dict(params_b=params / 1e9, width=vit.embed_dim, depth=vit.depth, img=img,
                  batch=batch, dtype=dtype, ms_per_image=sec / batch * 1e3,
                  tflop_per_image=flops / 1e12, tflops=achieved, matmul_peak_tflops=peak,
                  pct_of_peak=100 * achieved / peak)
    if args.device == 'cuda':
        result['peak_gpu_mem_gb'] = torch.cuda.max_memory_allocated() / 1e9
        del vit, x
        torch.cuda.empty_cache()
    return result


def planned_group_gb(cfgs):
    """What the sweep's plan says the group of ``cfgs`` holds (grouping.py): the frozen model,
    its features, and the heads' group_bytes."""
    from orchestrator import grouping, plan
    base = plan.plain(cfgs[0])
    side = grouping.frozen_side(base)
    heads = [grouping.head_memory(base, c.model.decode_head, side) for c in cfgs]
    features = math.prod(side.features) * side.feature_dtype.itemsize
    return (side.model_bytes + features + grouping.group_bytes(heads)) / 1e9


def check_trial_group(args, tmp, result):
    import copy
    import torch
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    from mmseg.models import build_backbone
    from orchestrator import worker
    from shared_backbone import HEADS, config, loop_s_per_iter, unit_costs
    g = SimpleNamespace(**SIZES[args.device]['group'])
    if args.iters:
        g.iters = args.iters
    root = generate_ade_layout(Path(tmp) / 'data_c', num_classes=g.classes, size=g.size,
                               num_train=4 * g.batch, num_val=4)

    # As in a sweep, every training loads its backbone from a file (built from one, InternViT
    # skips its random initialisation: without one, each of the K + 1 trainings drew the 300M
    # ViT at random on the CPU, which is what stalled this check on the H200's machine)
    weights = str(Path(tmp) / 'vit_c.pth')
    torch.save(build_backbone(config(root, g, HEADS[0]).model.backbone).state_dict(), weights)

    def cfg_for(head):
        cfg = config(root, g, head)
        cfg.data.samples_per_gpu = g.batch
        cfg.model.backbone.pretrained = weights
        return cfg
    rows = result['rows'] = []  # filled as each K finishes: a stopped check keeps them
    result['shape'] = vars(g)
    result['backbone_weights'] = 'one saved file, loaded by every training'
    worker.train(cfg_for(HEADS[0]), f'{tmp}/warmup')  # untimed: neither side gets the cold start
    result['warmup'] = 'one untimed solo training before the first K'

    def peak_reset():
        if args.device == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak():
        return torch.cuda.max_memory_allocated() / 1e9 if args.device == 'cuda' else None

    def run_solo(cfgs, k):
        peak_reset()
        start = time.perf_counter()
        for i, cfg in enumerate(cfgs):
            worker.train(copy.deepcopy(cfg), f'{tmp}/k{k}/solo{i}')
        return time.perf_counter() - start, peak()

    def run_group(cfgs, k):
        peak_reset()
        start = time.perf_counter()
        worker.train_group([copy.deepcopy(c) for c in cfgs],
                           [f'{tmp}/k{k}/grouped{i}' for i in range(k)], f'{tmp}/k{k}/group')
        return time.perf_counter() - start, peak()

    for n, k in enumerate(args.ks):
        gc.collect()
        cfgs = [cfg_for(HEADS[i % len(HEADS)]) for i in range(k)]
        b, h = unit_costs(cfgs, reps=5, size=g.size, device=args.device)
        solo_first = n % 2 == 0
        if solo_first:
            (separate, solo_peak), (grouped, group_peak) = run_solo(cfgs, k), run_group(cfgs, k)
        else:
            (grouped, group_peak), (separate, solo_peak) = run_group(cfgs, k), run_solo(cfgs, k)
        planned = planned_group_gb(cfgs)
        solo = [f'{tmp}/k{k}/solo{i}' for i in range(k)]
        loop_solo = sum(loop_s_per_iter(d) for d in solo)
        loop_group = loop_s_per_iter(f'{tmp}/k{k}/group')
        compute_solo = sum(loop_s_per_iter(d) - loop_s_per_iter(d, 'data_time') for d in solo)
        compute_group = (loop_group - loop_s_per_iter(f'{tmp}/k{k}/group', 'data_time'))
        ideal = k * (b + h) / (b + k * h)
        rows.append(dict(k=k, b_ms=b * 1e3, h_ms=h * 1e3, ideal=ideal,
                         wall_solo_s=separate, wall_group_s=grouped,
                         loop_solo_ms=loop_solo * 1e3, loop_group_ms=loop_group * 1e3,
                         loop_speedup=loop_solo / loop_group,
                         loop_of_ideal=loop_solo / loop_group / ideal,
                         compute_speedup=compute_solo / compute_group,
                         compute_of_ideal=compute_solo / compute_group / ideal,
                         peak_gpu_mem_gb_solo=solo_peak, peak_gpu_mem_gb_group=group_peak,
                         planned_gpu_mem_gb_group=planned,
                         first='solo' if solo_first else 'grouped'))
        result.setdefault('solo_work_dir', f'{tmp}/k{k}/solo0')
        print(f'[gpu-check] c. K={k}: loop x{rows[-1]["loop_speedup"]:.2f} of ideal '
              f'x{ideal:.2f}', flush=True)
    return result


def check_finetune_step(args, tmp):
    """Runs this file's ``--finetune-step`` under torchrun (one process: nccl on GPU)."""
    out_file = Path(tmp) / 'finetune.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1',
           str(Path(__file__)), '--device', args.device, '--finetune-step', str(out_file)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    if out.returncode != 0:
        raise RuntimeError(f'torchrun exit {out.returncode}: {out.stderr[-3000:]}')
    return json.loads(out_file.read_text())


def finetune_step(device, out_file):
    """One process of torchrun: the few-shot config's model (unfrozen bf16 InternViT, fp32
    FCN head, InternVL's layer-decay AdamW) under torch DDP, a few steps on random images."""
    import torch
    import torch.distributed as dist
    import mmseg_custom  # noqa: F401
    from mmcv import Config
    from mmcv.cnn.utils import revert_sync_batchnorm
    from mmcv.runner import build_optimizer
    from mmseg.models import build_segmentor
    from orchestrator.worker import init_distributed
    init_distributed()
    s = dict(SIZES[device]['finetune'])
    img, batch, steps = s.pop('img'), s.pop('batch'), s.pop('steps')
    cfg = Config.fromfile(str(ROOT / 'configs' / 'vit6b_fcn_fewshot_ade20k_504.py'))
    bb = cfg.model.backbone
    bb.update(pretrained=None, img_size=img, out_indices=[s['depth'] - 1], **s)
    if device == 'cpu':  # a check of the path: no random branch without a gradient
        bb.update(dtype='float32', drop_path_rate=0.0)
    cfg.model.decode_head.in_channels = cfg.model.decode_head.channels = s.get('embed_dim', 3200)
    cfg.optimizer.paramwise_cfg.num_layers = s['depth']
    with torch.device(device):
        model = build_segmentor(cfg.model)
    model.decode_head.init_weights()
    if device == 'cpu':
        model = revert_sync_batchnorm(model)
    trainable = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    optimizer = build_optimizer(model, cfg.optimizer)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[torch.cuda.current_device()] if device == 'cuda' else None)
    x = torch.randn(batch, 3, img, img, device=device)
    gt = torch.randint(0, 150, (batch, 1, img, img), device=device)
    metas = [dict(img_shape=(img, img, 3), ori_shape=(img, img, 3), pad_shape=(img, img, 3),
                  flip=False)] * batch
    probe = model.backbone.blocks[0].mlp.fc1.weight
    named = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    weights = [p for _, p in named]
    before = [p.detach().clone() for p in weights]  # in their own dtype: what a step must move
    got_grad = [False] * len(weights)  # drop path can leave a whole branch without one
    losses, times = [], []
    model.train()
    for _ in range(steps):
        if device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = sum(v for k, v in ddp(x, metas, gt_semantic_seg=gt).items() if 'loss' in k)
        loss.backward()
        optimizer.step()
        if device == 'cuda':
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        got_grad = [g or (p.grad is not None and bool(p.grad.any()))  # outside the timing
                    for g, p in zip(got_grad, weights)]
        losses.append(loss.item())
    result = dict(backend=dist.get_backend(), world_size=dist.get_world_size(),
                  backbone_dtype=str(probe.dtype), trainable_backbone_params_b=trainable / 1e9,
                  depth=s['depth'], img=img, batch=batch, losses=losses,
                  loss_finite=all(math.isfinite(v) for v in losses),
                  backbone_changed_fraction=sum(int((p.detach() != b).sum()) for p, b in
                                                zip(weights, before)) / trainable,
                  backbone_tensors=len(named), backbone_tensors_with_grad=sum(got_grad),
                  backbone_tensors_unmoved_with_grad=[
                      n for (n, p), b, g in zip(named, before, got_grad)
                      if g and torch.equal(p.detach(), b)],
                  step_s=times, step_s_after_first=min(times[1:] or times))
    if device == 'cuda':
        result['peak_gpu_mem_gb'] = torch.cuda.max_memory_allocated() / 1e9
    Path(out_file).write_text(json.dumps(result))
    dist.destroy_process_group()


def check_checkpoint_size(args, tmp, solo_work_dir=None):
    import torch
    from checkpoint_size import sizes
    with_backbone, without, params = sizes(str(ROOT / 'configs' /
                                               'vit6b_fcn_linear_probe_ade20k_504.py'))
    result = dict(how='computed from the model\'s shapes on the meta device (nothing of the 6B '
                  'written)', vit6b_linear_probe_gb_with_backbone=with_backbone / 1e9,
                  vit6b_linear_probe_mb_without=without / 1e6, vit6b_backbone_params_b=params / 1e9)
    ckpts = sorted(Path(solo_work_dir).glob('iter_*.pth')) if solo_work_dir else []
    if ckpts:
        state = torch.load(ckpts[-1], map_location='cpu', weights_only=False)
        result.update(trial_group_solo_checkpoint_bytes=ckpts[-1].stat().st_size,
                      backbone_tensors_in_it=sum(k.startswith('backbone.')
                                                 for k in state['state_dict']))
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    p.add_argument('--out', help='JSON file (default: work_dirs/gpu_check/<device>.json)')
    p.add_argument('--ks', type=int, nargs='+', default=[1, 4, 8, 12],
                   help='trial group sizes')
    p.add_argument('--iters', type=int, help='training iterations per run of check c')
    p.add_argument('--only', nargs='+', help='run these checks only (a b c d e)')
    p.add_argument('--until', type=float, metavar='EPOCH',
                   help='wall-clock time (seconds since the epoch) by which the run must end: '
                        'each check\'s limit is cut to what is left (a check cut short keeps '
                        'what it wrote; one with under 10 s left is not started)')
    p.add_argument('--finetune-step', metavar='OUT', help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.finetune_step:
        return finetune_step(args.device, args.finetune_step)
    import torch
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('error: --device cuda: torch sees no GPU (use make gpu-check-cpu)', file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / 'work_dirs' / 'gpu_check' / f'{args.device}.json').resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    import mmcv
    report = dict(device=args.device, torch=torch.__version__, mmcv=mmcv.__version__,
                  gpu=torch.cuda.get_device_name() if args.device == 'cuda' else None,
                  cpu_cores=os.cpu_count(), started=time.strftime('%Y-%m-%d %H:%M:%S'))
    # (letter, name, function, seconds allowed); c runs after d: the longest goes last but e
    checks = [('a', 'torchrun_train', check_torchrun_train, 300),
              ('b', 'backbone_forward', check_backbone_forward, 180),
              ('d', 'finetune_step', check_finetune_step, 400),
              ('c', 'trial_group', check_trial_group, 400),
              ('e', 'checkpoint_size', check_checkpoint_size, 120)]
    failed = []

    def too_long(signum, frame):
        raise TimeoutError('the check ran past its allowed time')
    signal.signal(signal.SIGALRM, too_long)
    with tempfile.TemporaryDirectory() as tmp:
        for letter, name, check, allowed_s in checks:
            if args.only and letter not in args.only:
                continue
            start = time.perf_counter()
            if args.until is not None:
                left = int(args.until - time.time())
                if left < 10:
                    report[name] = dict(error=f'not started: {left} s of --until left')
                    failed.append(name)
                    continue
                allowed_s = min(allowed_s, left)
            print(f'[gpu-check] {letter}. {name} ...', flush=True)
            signal.alarm(allowed_s)  # a check that hangs is stopped and reported, not waited on
            try:
                if name == 'checkpoint_size':
                    result = check(args, tmp, report.get('trial_group', {}).get('solo_work_dir'))
                elif name == 'trial_group':
                    result = {}
                    check(args, tmp, result)
                else:
                    result = check(args, tmp)
            except Exception as e:  # keep going: one broken check must not hide the others
                result = dict(result if name == 'trial_group' else {},
                              error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc())
                failed.append(name)
            finally:
                signal.alarm(0)
            result['check_s'] = time.perf_counter() - start
            report[name] = result
            print(f'[gpu-check] {letter}. {name}: '
                  f'{result.get("error") or "ok"} ({result["check_s"]:.1f} s)', flush=True)
            tmp_out = out.with_suffix('.tmp')
            tmp_out.write_text(json.dumps(report, indent=1, default=str))
            tmp_out.replace(out)
    report['failed'] = failed
    out.write_text(json.dumps(report, indent=1, default=str))
    print(out)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
