"""The decode head's loss path at the study's shape: mmseg's ``BaseDecodeHead.losses`` against the
banded path (mmseg_custom/models/decode_heads/chunked_loss.py), forward and backward.

A linear head (InternVL's linear probe: 3200 channels in, 150 classes) on 36 x 36 features
(504 px / patch 14), labels at 504 x 504, 2 images. Each side runs in a fresh process, the two
alternating (fused, mmseg, mmseg, fused, ...), so neither gains from the other's warm-up; each
measures the median wall time of ``--iters`` forward+backward passes of head + loss after one
warm-up, and the peak memory of those passes (CUDA: torch's peak allocated; CPU: the process's
peak resident set, reset before them through /proc/self/clear_refs). Each side leads every other
round. Writes a markdown table.

    .venv/bin/python benchmarks/loss_path.py --out benchmarks/results/loss_path_cpu.md
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_bytes():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) * 1024


def measure(fused, device, iters, batch, classes, feature, label):
    """One side, in this process: (median seconds per pass, peak bytes during the passes)."""
    import torch

    import mmseg_custom  # noqa: F401  (registers our FCNHead)
    from mmseg_custom.models.decode_heads import FCNHead
    torch.manual_seed(0)
    head = FCNHead(in_channels=3200, channels=3200, num_classes=classes, num_convs=0,
                   concat_input=False, with_norm=True, fused_loss=fused,
                   loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False,
                                    loss_weight=1.0)).to(device).train()
    feats = [torch.randn(batch, 3200, feature, feature, device=device)]
    labels = torch.randint(0, classes, (batch, 1, label, label), device=device)
    labels[:, :, :label // 8] = 255  # some unlabelled pixels, as ADE20K's

    def one_pass():
        loss = head.losses(head(feats), labels)
        loss['loss_ce'].backward()
        head.zero_grad(set_to_none=True)
        if device == 'cuda':
            torch.cuda.synchronize()

    one_pass()  # warm-up
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # the peak resident set starts again from now
        base = _peak_rss_bytes()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == 'cuda' else _peak_rss_bytes()) - base
    return statistics.median(times), peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--iters', type=int, default=3)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--classes', type=int, default=150)
    parser.add_argument('--feature', type=int, default=36)
    parser.add_argument('--label', type=int, default=504)
    parser.add_argument('--out')
    parser.add_argument('--side', choices=['fused', 'mmseg'], help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.batch, args.classes, args.feature, args.label)
    if args.side:  # one side, in a process of its own
        print(json.dumps(measure(args.side == 'fused', args.device, args.iters, *shape)))
        return
    runs = {'fused': [], 'mmseg': []}
    for r in range(args.rounds):  # each side leads every other round
        for side in (('fused', 'mmseg') if r % 2 == 0 else ('mmseg', 'fused')):
            out = subprocess.run([sys.executable, __file__, '--side', side, *sys.argv[1:]],
                                 cwd=ROOT, capture_output=True, text=True, check=True).stdout
            runs[side].append(json.loads(out.strip().splitlines()[-1]))
    lines = [f'Loss path of a linear head (3200 -> {args.classes} classes, {args.feature}x'
             f'{args.feature} features, labels {args.label}x{args.label}, batch {args.batch}), '
             f'forward + backward, on {args.device} ({os.cpu_count()} cores): measured by '
             f'`benchmarks/loss_path.py`, {args.rounds} alternating rounds per side, median of '
             f'{args.iters} passes each.', '',
             '| path | s per pass (each round) | peak memory of the passes, MB (each round) |',
             '|---|---|---|']
    for side, label in (('mmseg', "mmseg's BaseDecodeHead.losses"),
                        ('fused', 'banded (chunked_loss.py)')):
        lines.append(f'| {label} | {", ".join(f"{t:.3f}" for t, _ in runs[side])} | '
                     f'{", ".join(f"{m / 2 ** 20:.0f}" for _, m in runs[side])} |')
    speed = statistics.median(t for t, _ in runs['mmseg']) / statistics.median(
        t for t, _ in runs['fused'])
    memory = statistics.median(m for _, m in runs['mmseg']) / max(1, statistics.median(
        m for _, m in runs['fused']))
    lines += ['', f'mmseg / banded: {speed:.2f}x the time, {memory:.1f}x the peak memory '
              '(medians of the rounds).']
    text = '\n'.join(lines) + '\n'
    print(text, end='')
    if args.out:
        Path(args.out).write_text(text)


if __name__ == '__main__':
    main()
