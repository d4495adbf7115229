"""What the linear-probe study (search_spaces/linear_probe.yaml: 180 trials, 12 head variants)
costs in device-hours, from unit costs measured in this run, before and after issue 24's
changes; and one trial group of K heads against K solo runs of the same work, measured.

Unit costs, measured here on one frozen InternViT of ``--width``/``--depth`` (toy size by
default: at toy size the heads outweigh the backbone, so the hours at these costs say nothing
of the real study; an H200 table computed from that GPU's measured costs is printed beside
them): B, the backbone's forward per image; for each of the study's 12 head variants, H
(forward + loss + backward + step per image) with mmseg's loss path and with the banded one
(chunked_loss.py), and F (forward per validation input); R, a validation feature cache hit
per input (key, read and copy at the linear probe's shape: val_features.py). The study's
cost then follows the plan the dry run makes (plan.py, grouping.py on a ``--gpu-gib`` GPU):

  solo, before:   per trial  iters x images x (B + H) + evaluations x V x (B + F)
  groups, before: per group  iters x images x (B + sum H) + evaluations x V x (B + sum F)
  groups, after:  per group  iters x images x (B' + sum H') + evaluations x V x (R + sum F),
                  and V x B' once per node (``--nodes``)

with B' = B x ``--blocks-ratio`` (the linear probe's pass stops after block 45 of 48: computed,
not measured) and H' the banded loss path's. V (``--val-inputs``, 4,000: ADE20K val's 2,000
images in 2 crops each, computed) and the images per iteration (16) are the study's.

Then the measured check: K solo trainings and one trial group of the same K heads, each side
first in every other round, mmseg's seconds per training iteration (the loop: data, forward,
backward, step; start-up and evaluation aside) summed over the solo runs against the group's.

    .venv/bin/python benchmarks/study_cost.py --out benchmarks/results/study_cost_cpu.md
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
sys.path.insert(0, str(ROOT / 'benchmarks'))

from shared_backbone import config, loop_s_per_iter  # noqa: E402

SPACE = ROOT / 'search_spaces' / 'linear_probe.yaml'


def _clock(device):
    import torch
    if device != 'cpu':
        torch.cuda.synchronize()
    return time.perf_counter()


def unit_costs(cfg, variants, device, reps, size):
    """(B, {variant: (H mmseg, H banded, F)}, R) in seconds per image, measured here."""
    import torch
    from mmcv.cnn.utils import revert_sync_batchnorm
    from mmcv.runner import build_optimizer
    from mmseg.models import build_head, build_segmentor
    batch = cfg.data.samples_per_gpu
    img = torch.randn(batch, 3, size, size, device=device)
    classes = cfg.model.decode_head.num_classes
    gt = torch.randint(0, classes, (batch, 1, size, size), device=device)
    metas = [dict(img_shape=(size, size, 3), ori_shape=(size, size, 3),
                  pad_shape=(size, size, 3), flip=False)] * batch
    model = revert_sync_batchnorm(build_segmentor(cfg.model)).to(device).eval()
    model.init_weights()
    with torch.no_grad():
        feats = model.extract_feat(img)  # also the warm-up
        start = _clock(device)
        for _ in range(reps):
            model.extract_feat(img)
        backbone = (_clock(device) - start) / reps / batch
    heads = {}
    for name, values in variants.items():
        per = []
        for fused in (False, True):
            head_cfg = copy.deepcopy(cfg.model.decode_head)
            head_cfg.update(values, fused_loss=fused)
            if values.get('num_convs') == 0:
                head_cfg.channels = head_cfg.in_channels
            head = revert_sync_batchnorm(build_head(head_cfg)).to(device).train()
            head.init_weights()
            opt = build_optimizer(head, copy.deepcopy(cfg.optimizer))
            for i in range(reps + 2):
                if i == 2:
                    start = _clock(device)
                opt.zero_grad()
                loss = head.forward_train(feats, metas, gt, None)
                sum(v for k, v in loss.items() if 'loss' in k).backward()
                opt.step()
            per.append((_clock(device) - start) / reps / batch)
        head.eval()
        with torch.no_grad():
            head(feats)  # warm-up
            start = _clock(device)
            for _ in range(reps):
                head(feats)
            per.append((_clock(device) - start) / reps / batch)
        heads[name] = tuple(per)
    return backbone, heads, cache_hit(device, reps)


def cache_hit(device, reps):
    """R in seconds at the linear probe's shape, whatever the toy's: the key of a 504 px crop,
    the read of its 3200 x 36 x 36 float32 features from a tier in the system's temp
    directory, and their copy to ``device``."""
    import torch

    from mmseg_custom.feature_store import FeatureStore
    from mmseg_custom.hooks.val_features import _digest
    crop = torch.randn(1, 3, 504, 504, device=device)
    with tempfile.TemporaryDirectory() as d:
        store = FeatureStore('cache', [[d, 10 ** 10]])
        key = _digest(b'backbone', crop)
        store.put(key, dict(kind='list', tensors=[torch.randn(1, 3200, 36, 36)]))
        store.get(key)  # warm-up
        start = _clock(device)
        for _ in range(reps):
            entry = store.get(_digest(b'backbone', crop))
            [t.to(device) for t in entry['tensors']]
        return (_clock(device) - start) / reps


def study(gpu_gib):
    """The study's trials (their head variant, iterations) and its trial groups as planned on
    a GPU of ``gpu_gib``."""
    from orchestrator.spec import load_spec
    from orchestrator.sweep_plan import make_plan
    spec, base_cfg = load_spec(str(SPACE))
    plan = make_plan(spec, base_cfg).size_groups(gpu_gib * 2 ** 30)
    keys = ('model.decode_head.num_convs', 'model.decode_head.with_norm',
            'model.decode_head.concat_input')
    variants = [tuple(t.values[k] for k in keys) for t in plan.trials]
    iters = plan.schedules
    groups = [members for _, members in plan.groups.shown]
    images = plan.base['data']['samples_per_gpu'] * spec.resources.workers_per_trial
    return spec, variants, iters, groups, images


def study_hours(args, backbone, heads, hit):
    spec, variants, iters, groups, images = study(args.gpu_gib)
    evaluations, v = spec.derived.evaluations, args.val_inputs
    h = {k: heads[k] for k in set(variants)}
    solo = sum(it * images * (backbone + h[var][0]) + evaluations * v * (backbone + h[var][2])
               for var, it in zip(variants, iters))
    before = after = 0.0
    cut = backbone * args.blocks_ratio
    for members in groups:
        it = iters[members[0]]
        mine = [h[variants[i]] for i in members]
        before += (it * images * (backbone + sum(x[0] for x in mine))
                   + evaluations * v * (backbone + sum(x[2] for x in mine)))
        after += (it * images * (cut + sum(x[1] for x in mine))
                  + evaluations * v * (hit + sum(x[2] for x in mine)))
    after += args.nodes * v * cut
    grouped = {i for members in groups for i in members}
    assert len(grouped) == len(variants), 'every trial of the study is in a group'
    return dict(trials=len(variants), groups=len(groups), solo=solo / 3600,
                before=before / 3600, after=after / 3600)


# Unit costs measured on an H200 in earlier runs, in ms per image: the backbone (README's GPU
# table, row b: InternViT-6B, 48 blocks, bf16, 504 px) and two heads' training step with mmseg's
# loss path (issue 24's text: a linear head, and an FCN head with two 3200-channel convs).
H200_BACKBONE_MS = 38.1
H200_HEAD_MS = {0: 5.9, 2: 10.9}


def h200_costs(hit):
    """(B, heads, R) in seconds from the H200 figures: a head with one conv is taken midway
    between none and two (not measured), norm and concatenation as free (not measured), the
    heads' evaluation forward as free (not measured), the banded loss as mmseg's (not measured
    on a GPU); R as measured in this run at the real shape (on a CPU run: the key and the
    read, no copy to a GPU)."""
    ms = {**H200_HEAD_MS, 1: (H200_HEAD_MS[0] + H200_HEAD_MS[2]) / 2}
    heads = {k: (ms[k[0]] / 1e3, ms[k[0]] / 1e3, 0.0) for k in _variants()}
    return H200_BACKBONE_MS / 1e3, heads, hit


def _hours_table(hours):
    return ['| plan | device-hours | vs solo |', '|---|---|---|',
            f'| every trial alone, before | {hours["solo"]:,.2f} | 1.00x |',
            f'| trial groups, before | {hours["before"]:,.2f} | '
            f'{hours["solo"] / hours["before"]:.2f}x |',
            f'| trial groups, after (block cut, banded loss, validation cache) | '
            f'{hours["after"]:,.2f} | {hours["solo"] / hours["after"]:.2f}x |']


def measured_group(args, root, k):
    """(sum of the K solo loops' s per iteration, the group's), per round."""
    from orchestrator import worker
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            cfgs = [config(root, args, head) for head in _head_list(k)]
            sides = {}

            def solo():
                for i, cfg in enumerate(cfgs):
                    worker.train(copy.deepcopy(cfg), f'{tmp}/{r}/solo{i}')
                sides['solo'] = sum(loop_s_per_iter(f'{tmp}/{r}/solo{i}') for i in range(k))

            def group():
                worker.train_group([copy.deepcopy(c) for c in cfgs],
                                   [f'{tmp}/{r}/grouped{i}' for i in range(k)], f'{tmp}/{r}/g')
                sides['group'] = loop_s_per_iter(f'{tmp}/{r}/g')
            for side in ((solo, group) if r % 2 == 0 else (group, solo)):
                side()
            rounds.append((sides['solo'], sides['group']))
    return rounds


def _variants():
    return {(nc, norm, cat): dict(num_convs=nc, with_norm=norm, concat_input=cat)
            for nc in (0, 1, 2) for norm in (False, True) for cat in (False, True)}


def _head_list(k):
    heads = list(_variants().values())
    return [heads[i % len(heads)] for i in range(k)]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--width', type=int, default=64)
    p.add_argument('--depth', type=int, default=2)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--classes', type=int, default=150)
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--k', type=int, default=12)
    p.add_argument('--rounds', type=int, default=2)
    p.add_argument('--gpu-gib', type=float, default=140.4)
    p.add_argument('--nodes', type=int, default=2)
    p.add_argument('--val-inputs', type=int, default=4000)
    p.add_argument('--blocks-ratio', type=float, default=45 / 48)
    p.add_argument('--out')
    args = p.parse_args()
    import logging

    import torch

    from mmseg_custom.datasets.synthetic import generate_ade_layout
    logging.getLogger('mmseg').setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_ade_layout(Path(tmp) / 'data', num_classes=args.classes,
                                   size=args.size)
        cfg = config(root, args, {})
        cfg.data.samples_per_gpu = 2  # the study's images per GPU
        b, heads, hit = unit_costs(cfg, _variants(), args.device, args.reps, args.size)
        hours = study_hours(args, b, heads, hit)
        rounds = measured_group(args, root, args.k)
    ms = 1e3
    lines = [
        f'Linear-probe study cost from unit costs measured by `benchmarks/study_cost.py` on '
        f'{args.device} ({os.cpu_count()} cores, torch {torch.__version__}), frozen InternViT '
        f'width {args.width}, depth {args.depth}, {args.size} px, {args.classes} classes: '
        'device-hours at these unit costs. At toy size the backbone is cheap next to the heads, '
        'so neither these hours nor their ratios carry over to the real study: the H200 table '
        'below is its estimate.', '',
        f'Unit costs per image: backbone B {b * ms:.2f} ms; validation cache hit R '
        f'{hit * ms:.2f} ms; heads (H mmseg loss / H banded loss / F forward), ms:', '',
        '| num_convs, with_norm, concat_input | H mmseg | H banded | F |', '|---|---|---|---|']
    lines += [f'| {k} | {v[0] * ms:.2f} | {v[1] * ms:.2f} | {v[2] * ms:.2f} |'
              for k, v in heads.items()]
    lines += ['', f'The study ({hours["trials"]} trials; {hours["groups"]} trial groups as '
              f'planned on a {args.gpu_gib:g} GiB GPU; {args.val_inputs} validation inputs, '
              f'backbone x {args.blocks_ratio:.4f} after, computed; cache filled once on each of '
              f'{args.nodes} nodes, every later evaluation a hit: 16 + 64 GB hold 4,819 inputs '
              'of 16.6 MB where the filesystems have twice that; the groups as today\'s memory '
              'plan makes them before and after: 12 heads each on this GPU either way), '
              'device-hours at these unit costs (computed):', '',
              *_hours_table(hours), '',
              'The same study at H200 unit costs (GPU-hours, computed): backbone 38.1 ms per '
              'image (measured, README GPU table row b), heads 5.9 ms (linear) and 10.9 ms (two '
              'convs) per image with mmseg\'s loss (measured on an H200, issue 24); one conv '
              'taken midway, norm, concatenation and the heads\' evaluation as free, the banded '
              'loss as mmseg\'s (none of these measured on a GPU); R as measured here at the real '
              'shape:', '',
              *_hours_table(study_hours(args, *h200_costs(hit))), '',
              f'Measured: {args.k} solo trainings against one trial group of the same '
              f'{args.k} heads, {args.iters} iterations each, mmseg\'s s per training iteration '
              '(solo: summed over the runs), each side first in every other round:', '',
              '| round (first) | K solo, ms | group, ms | solo / group |', '|---|---|---|---|']
    lines += [f'| {r + 1} ({"solo" if r % 2 == 0 else "group"}) | {s * ms:.1f} | {g * ms:.1f} | '
              f'{s / g:.2f}x |' for r, (s, g) in enumerate(rounds)]
    lines += ['', f'Median solo / group: {statistics.median(s / g for s, g in rounds):.2f}x.']
    text = '\n'.join(lines) + '\n'
    print(text, end='')
    if args.out:
        Path(args.out).write_text(text)


if __name__ == '__main__':
    main()
