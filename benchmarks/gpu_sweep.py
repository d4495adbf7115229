"""`make gpu-sweep`: the product itself on a GPU, through its front door, in one prepared run;
``--device cpu`` (``make gpu-sweep-cpu``, part of the test suite) runs the same steps at toy size.

Steps, each timed, in one JSON written after every step (a failure keeps what came before; its
path is the last line printed):
  1. weights: the space's backbone built at random on the device and saved where the space's
     ``model.backbone.pretrained`` points: every trial group loads it (memory-mapped);
  2. plan: ``orchestrator sweep --dry-run``: the trial groups planned for this GPU's memory;
  3. sweep: ``orchestrator sweep search_spaces/gpu_sweep.yaml`` (local Ray unless --address):
     trial groups of frozen-backbone heads, each on a crew of one worker (NCCL on a GPU) holding
     half the GPU, two groups at once, MLflow's sqlite store;
  4. report: ``orchestrator report``;
  5. results, read back from MLflow: every trial's state and mIoU, the groups' sizes and GPU
     share, when each group's runs started and ended (two at once: their times overlap), and the
     GPU memory mmseg logged for each group.

    make gpu-sweep                                       # GPU machine, then the GPU check
    .venv/bin/python benchmarks/gpu_sweep.py --device cpu --out /tmp/gpu_sweep
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / 'search_spaces' / 'gpu_sweep.yaml'
# The CPU mode's changes to the space (everything else as on the GPU: the heads, fractions,
# schedule rule and grouping): the tiny frozen InternViT on 64 px, 4 classes; CPU workers; the
# groups' budget given (no GPU to size them from).
CPU_CHANGES = dict(
    base_config='configs/tiny_vit_frozen_fcn_synthetic.py',
    generate_data=dict(num_classes=4, num_train=32, num_val=8, size=64, seed=0),
    overrides={'data.workers_per_gpu': 0},
    derived=dict(channels_follow_in_channels=True, iterations=dict(at_full_data=40, min=20),
                 evaluations=2),
    resources=dict(workers_per_trial=1, cpus_per_worker=1, gpus_per_worker=0),
    grouping=dict(enabled=True, memory_gb=1))


def space_for(device, out, work):
    """The space file this run sweeps, written to ``out`` with absolute paths (the shipped
    file's are relative to search_spaces/); its data, weights and runs go under ``work``."""
    space = yaml.safe_load(SPACE.read_text())
    if device == 'cpu':
        space.update(CPU_CHANGES)  # the GPU model's overrides do not apply to the tiny one
        space['base_config'] = str(ROOT / space['base_config'])
    else:
        space['base_config'] = str((SPACE.parent / space['base_config']).resolve())
    space['data_root'] = str(work / 'data')
    space['output'] = str(work / 'runs')
    space['overrides']['model.backbone.pretrained'] = str(work / 'backbone.pth')
    path = out / 'space.yaml'
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path, space


def write_weights(space, device):
    """The frozen backbone's weights, drawn at random on ``device`` (seconds on a GPU, where the
    CPU of a GPU machine takes minutes for a 1 B model) and saved in its dtype."""
    import torch
    import mmseg_custom  # noqa: F401  (registrations)
    from mmcv import Config
    from mmseg.models import build_backbone
    cfg = Config.fromfile(space['base_config'])
    backbone = dict(cfg.model.backbone)
    backbone.pop('pretrained', None)
    torch.manual_seed(0)
    with torch.device(device):
        model = build_backbone(backbone)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    path = Path(space['overrides']['model.backbone.pretrained'])
    # a new file renamed into place: workers that still map an older one keep their pages (a
    # mapped file rewritten in place ends its readers with SIGBUS)
    torch.save(state, path.with_suffix('.tmp'))
    path.with_suffix('.tmp').replace(path)
    return dict(params_b=sum(v.numel() for v in state.values()) / 1e9,
                file_gb=path.stat().st_size / 1e9)


def orchestrator(args, log, timeout):
    """``python -m orchestrator ARGS``, its output appended to ``log``; (exit code, seconds). Past
    ``timeout`` it gets SIGTERM, as a preempted or cancelled job would (a sweep then stops its
    trials at their latest checkpoint and exits 143, resumable: its report shows what finished),
    and SIGKILL 45 s later."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get('PYTHONPATH', '')) if p))
    start = time.perf_counter()
    with open(log, 'a') as f:
        f.write(f'$ orchestrator {" ".join(args)}\n')
        f.flush()
        proc = subprocess.Popen([sys.executable, '-m', 'orchestrator', *args], cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=max(1, timeout))
        except subprocess.TimeoutExpired:
            f.write(f'[gpu-sweep] {timeout:.0f} s passed: SIGTERM\n')
            f.flush()
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    return code, time.perf_counter() - start


def read_results(sweep_dir):
    """Trials and groups as MLflow and the sweep's files hold them."""
    from orchestrator.results import SweepResults
    results = SweepResults(str(sweep_dir))
    trials = []
    for child in results.children:
        tags, metrics = child.data.tags, child.data.metrics
        trials.append(dict(trial_id=tags.get('trial_id'), status=child.info.status,
                           group=tags.get('trial_group'),
                           start_ms=child.info.start_time, end_ms=child.info.end_time,
                           mIoU=metrics.get('mIoU'),
                           **{k: v for k, v in metrics.items() if k.startswith('cost.')},
                           **{k: child.data.params[k] for k in results.searched
                              if k in child.data.params}))
    return trials


def group_memory(sweep_dir):
    """The largest GPU memory (MB) mmseg's json log recorded in each group's directory."""
    peaks = {}
    for log in Path(sweep_dir).rglob('*.log.json'):
        values = [json.loads(line).get('memory') for line in log.read_text().splitlines()
                  if line.startswith('{') and '"memory"' in line]
        if values:
            peaks[str(log.parent.relative_to(sweep_dir))] = max(values)
    return peaks


def summary(trials, sweep_dir):
    """The trials, how many finished, the groups' sizes, how many groups ran at once (the most
    whose runs' start-end spans cover one group's start) and the GPU memory logged per group.
    A trial stopped before its group started (a SIGTERM at ``--until``) has no group: counted
    apart, not as one group of them all."""
    groups = {}
    for t in trials:
        if t['group'] is not None:
            groups.setdefault(t['group'], []).append(t)
    spans = [(min(t['start_ms'] for t in g), max(t['end_ms'] or 0 for t in g))
             for g in groups.values()]
    return dict(trials=trials, finished=sum(t['status'] == 'FINISHED' for t in trials),
                with_miou=sum(t['mIoU'] is not None for t in trials),
                without_group=sum(t['group'] is None for t in trials),
                group_sizes=sorted(len(g) for g in groups.values()),
                groups_running_at_once=max((sum(s <= at < e for s, e in spans)
                                            for at, _ in spans), default=0),
                gpu_memory_mb_logged=group_memory(sweep_dir))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', choices=['cuda', 'cpu'], default='cuda')
    p.add_argument('--out', default=None,
                   help='folder for the JSON, the report, the log and the space file '
                        '(default: work_dirs/gpu_sweep/<device>)')
    p.add_argument('--work', default=None, help='folder for the data, the weights and the '
                                                'sweep\'s runs (default: <out>-work)')
    p.add_argument('--address', help='an existing Ray cluster (default: a local one)')
    p.add_argument('--until', type=float, metavar='EPOCH',
                   help='wall-clock time (seconds since the epoch) by which the run should end: '
                        'the sweep gets SIGTERM 60 s before it (default: 420 s from now); a '
                        'sweep that must then be killed can make the run end up to a minute later')
    args = p.parse_args(argv)
    out = Path(args.out or ROOT / 'work_dirs' / 'gpu_sweep' / args.device).resolve()
    work = Path(args.work or f'{out}-work').resolve()
    for folder in (out, work):
        folder.mkdir(parents=True, exist_ok=True)
    log, result_file = out / 'sweep.log', out / 'gpu_sweep.json'
    log.write_text('')
    import torch
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('error: --device cuda: torch sees no GPU (use make gpu-sweep-cpu)', file=sys.stderr)
        return 2
    report = dict(device=args.device, python=sys.version.split()[0], torch=torch.__version__,
                  gpu=torch.cuda.get_device_name() if args.device == 'cuda' else None,
                  cpu_cores=os.cpu_count(), started=time.strftime('%Y-%m-%d %H:%M:%S'))

    def save():
        tmp = result_file.with_suffix('.tmp')
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(result_file)

    space_file, space = space_for(args.device, out, work)
    sweep_dir = work / 'runs' / space['name']
    address = ['--address', args.address] if args.address else []
    start = time.perf_counter()
    report['weights'] = write_weights(space, args.device)
    report['weights']['seconds'] = time.perf_counter() - start
    save()
    until = args.until or time.time() + 420
    code, seconds = orchestrator(['sweep', str(space_file), '--dry-run', *address], log,
                                 min(120, until - 60 - time.time()))
    lines = log.read_text().splitlines()
    report['plan'] = dict(exit=code, seconds=seconds,
                          groups=[ln.strip() for ln in lines if ln.lstrip().startswith(
                              ('trial groups:', 'group ', 'heads per group'))])
    save()
    if code != 0:
        print(f'error: the dry run failed (exit {code}): {log}', file=sys.stderr)
        return 1
    code, seconds = orchestrator(['sweep', str(space_file), *address], log,
                                 until - 60 - time.time())
    report['sweep'] = dict(exit=code, seconds=seconds)
    save()
    if not (sweep_dir / 'tracking.json').is_file():  # refused before it started: see the log
        print(f'error: the sweep did not start (exit {code}): {log}', file=sys.stderr)
        return 1
    code, seconds = orchestrator(['report', str(sweep_dir)], log, max(10, until - time.time()))
    written = sweep_dir / 'report' / 'report.md'
    if written.is_file():  # beside the JSON: what comes back from the GPU machine
        shutil.copyfile(written, out / 'report.md')
    report['report'] = dict(exit=code, seconds=seconds,
                            file=str(out / 'report.md') if written.is_file() else None)
    from orchestrator.errors import ConfigError
    try:
        trials = read_results(sweep_dir)
    except ConfigError as e:  # nothing recorded (a sweep killed before its parent run)
        report['results'] = dict(error=str(e))
        save()
        print(f'error: {e}', file=sys.stderr)
        return 1
    report['results'] = summary(trials, sweep_dir)
    report['seconds'] = time.perf_counter() - start
    save()
    print(result_file)
    ok = report['sweep']['exit'] == 0 and report['report']['exit'] == 0 and trials and \
        report['results']['finished'] == len(trials)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
