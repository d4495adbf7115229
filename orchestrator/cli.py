"""`orchestrator` command line: parse flags, hand over to the module that does the work."""
import argparse
import os
import signal
import subprocess
import sys

SCHEMA_FILE = 'search_spaces/schema.json'  # written by `orchestrator schema`, from the repo root
DATA_FLAGS = ('num_classes', 'num_train', 'num_val', 'size', 'seed')  # make-data's, as
# mmseg_custom.datasets.synthetic.generate_ade_layout names them


def _sweep_parser(sub):
    s = sub.add_parser('sweep', help='run a Ray Tune sweep from a search-space YAML')
    s.add_argument('space', help='search-space file, e.g. search_spaces/demo.yaml')
    s.add_argument('--dry-run', action='store_true', help='print the trial plan, start nothing')
    s.add_argument('--seconds-per-iteration', type=float, metavar='S',
                   help='with --dry-run: estimate the GPU-hours from S seconds per training '
                        'iteration of one trial alone (a finished trial\'s cost.train_s / its '
                        'iterations)')
    s.add_argument('--backbone-seconds', type=float, metavar='B',
                   help='with --seconds-per-iteration: the backbone pass\'s part of S (a trial '
                        'group pays it once per iteration, and S - B per head)')
    s.add_argument('--gpu-memory-gib', type=float, metavar='G',
                   help='with --dry-run: plan the trial groups for GPUs of G GiB (as nvidia-smi '
                        'reports them: 79.6 for 80 GB, 140.4 for an H200)')
    s.add_argument('--name', help='sweep name (default: the file\'s name key)')
    s.add_argument('--output', help='output root (default: the file\'s output key, or runs/)')
    s.add_argument('--tracking-uri', help='MLflow URI (default: sqlite under the output root)')
    s.add_argument('--address', help='existing Ray cluster (default: RAY_ADDRESS, else local)')
    s.add_argument('--no-grouping', action='store_true',
                   help='train every trial alone, even where trials share a frozen backbone '
                        '(trial groups: see --dry-run)')
    s.add_argument('--resume', action='store_true',
                   help='finish an interrupted sweep: finished trials are kept, running ones '
                        'continue from their last checkpoint, in the same MLflow runs')


def _parser():
    p = argparse.ArgumentParser(prog='orchestrator', description=(
        'Ray Tune sweeps of MMSegmentation FCN-head probing, tracked in MLflow; single trainings '
        'of one config on one or more workers; generated demo data.'))
    sub = p.add_subparsers(dest='command', required=True)

    t = sub.add_parser('train', help='train and evaluate one mmseg config')
    t.add_argument('config')
    t.add_argument('--work-dir', required=True)
    t.add_argument('--workers', type=int, default=1, help='data-parallel workers (torchrun)')
    t.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                   help='override config keys, e.g. model.decode_head.num_convs=0')

    d = sub.add_parser('make-data', help='generate ADE20K-layout data with a learnable signal')
    d.add_argument('root')
    for flag in DATA_FLAGS:  # defaults: the generator's own
        d.add_argument('--' + flag.replace('_', '-'), type=int, dest=flag)

    _sweep_parser(sub)

    y = sub.add_parser('sync', help='deliver a sweep\'s MLflow writes that waited in its journal')
    y.add_argument('sweep_dir', help='the sweep\'s output directory, e.g. runs/demo')

    sweep_arg = dict(help='a sweep: its output directory (runs/demo) or its name (demo)')
    output_arg = dict(default='runs', help='output root holding sweeps by name (default: runs)')
    r = sub.add_parser('report', help='ranked table and plots of a sweep (Markdown + PNG), '
                                      'also attached to its parent MLflow run')
    r.add_argument('sweep', **sweep_arg)
    r.add_argument('--output', **output_arg)
    st = sub.add_parser('status', help='each trial\'s state, iteration, latest metric and ETA')
    st.add_argument('sweep', **sweep_arg)
    st.add_argument('--output', **output_arg)
    c = sub.add_parser('compare', help='two sweeps\' same configurations side by side')
    c.add_argument('sweep_a', **sweep_arg)
    c.add_argument('sweep_b', **sweep_arg)
    c.add_argument('--output', **output_arg)
    b = sub.add_parser('best', help='the best trial\'s resolved mmseg config, loadable by mmseg')
    b.add_argument('sweep', **sweep_arg)
    b.add_argument('--out', required=True, help='file to write, e.g. best.py')
    b.add_argument('--output', **output_arg)

    j = sub.add_parser('schema', help='write the JSON Schema of search-space files (editors use '
                                      'it to complete and check them)')
    j.add_argument('--out', default=SCHEMA_FILE, help=f'file to write (default: {SCHEMA_FILE})')
    j.add_argument('--check', action='store_true',
                   help='write nothing; exit 1 if the file differs from the format in the code')

    return p


def schema_command(out, check=False):
    """search_spaces/schema.json, generated from the format (spec_format.py), never hand-edited."""
    from orchestrator.spec_format import schema_text
    text = schema_text()
    if check:
        current = open(out).read() if os.path.isfile(out) else None
        if current != text:
            print(f'{out}: out of date; regenerate with: orchestrator schema --out {out}',
                  file=sys.stderr)
            return 1
        return 0
    with open(out, 'w') as f:
        f.write(text)
    print(out)
    return 0


def run_training(config, work_dir, workers=1, cfg_options=()):
    """One process runs the worker in-process; several run it under torchrun (gloo/nccl)."""
    worker_args = [config, '--work-dir', work_dir]
    if cfg_options:
        worker_args += ['--cfg-options', *cfg_options]
    if workers < 1:
        print(f'error: --workers: must be >= 1, got {workers}', file=sys.stderr)
        return 2
    if workers == 1:
        from orchestrator import worker
        return worker.main(worker_args)
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', str(max(1, (os.cpu_count() or 1) // workers)))
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
           f'--nproc_per_node={workers}', '-m', 'orchestrator.worker', *worker_args]
    return subprocess.call(cmd, env=env)


def _results_command(args):
    """report / status / best: a finished or running sweep, read back."""
    from orchestrator.results import sweep_dir_of
    if args.command == 'compare':
        from orchestrator.compare import compare
        print(compare(sweep_dir_of(args.sweep_a, args.output),
                      sweep_dir_of(args.sweep_b, args.output)))
        return 0
    sweep_dir = sweep_dir_of(args.sweep, args.output)
    if args.command == 'status':
        from orchestrator.status import sweep_status
        from orchestrator.status_view import format_status
        print(format_status(*sweep_status(sweep_dir)))
        return 0
    from orchestrator.results import SweepResults
    results = SweepResults(sweep_dir)
    if args.command == 'report':
        from orchestrator.report import write_report
        path = write_report(results)
        print(f'{path} (and its PNGs), attached to MLflow run {results.parent.info.run_id} '
              'under report/')
        return 0
    from orchestrator.best_config import export_best
    path, best = export_best(results, args.out)
    print(f'{path}: trial {best["trial_id"]}, {results.metric} = {best[results.metric]:.4f}')
    return 0


def main(argv=None):
    import logging
    # Not for our users: torch's warning on every CPU-only machine that it found no CUDA runtime
    # (when mmcv imports its extension builder), MLflow's INFO lines as it creates its tables
    logging.getLogger('torch.utils.cpp_extension').setLevel(logging.ERROR)
    for name in ('mlflow.store.db.utils', 'alembic'):
        logging.getLogger(name).setLevel(logging.WARNING)
    # ... and the store's errors with their tracebacks (a full disk, a locked database): they are
    # raised to the journal too, which says them in one line and keeps the write for later
    logging.getLogger('mlflow.store.db.utils').setLevel(logging.CRITICAL)
    args = _parser().parse_args(argv)
    if args.command in ('sweep', 'sync', 'report', 'status', 'best', 'compare'):
        from orchestrator.errors import ConfigError
        try:
            if args.command == 'sweep' and not args.dry_run:
                given = [f for f, v in (('--seconds-per-iteration', args.seconds_per_iteration),
                                        ('--backbone-seconds', args.backbone_seconds),
                                        ('--gpu-memory-gib', args.gpu_memory_gib)) if v]
                if given:
                    raise ConfigError(f'{args.space}: {", ".join(given)}: only with --dry-run')
            if args.command == 'sweep':
                from orchestrator.driver import run_sweep
                return run_sweep(args.space, name=args.name, output=args.output,
                                 tracking_uri=args.tracking_uri, address=args.address,
                                 dry_run=args.dry_run, resume=args.resume,
                                 no_grouping=args.no_grouping,
                                 **({} if not args.dry_run else dict(
                                     seconds_per_iteration=args.seconds_per_iteration,
                                     backbone_seconds=args.backbone_seconds,
                                     gpu_memory_gib=args.gpu_memory_gib)))
            if args.command == 'sync':
                from orchestrator.driver import sync
                return sync(args.sweep_dir)
            return _results_command(args)
        except ConfigError as e:
            print(f'error: {e}', file=sys.stderr)
            return e.exit_code
        except KeyboardInterrupt as e:  # Ctrl-C before a sweep's own handlers (interrupts.py)
            signum = getattr(e, 'signum', None) or 2
            print(f'interrupted ({signal.Signals(signum).name}): {args.command} stopped',
                  file=sys.stderr)
            return 128 + signum
    if args.command == 'schema':
        return schema_command(args.out, args.check)
    if args.command == 'train':
        return run_training(args.config, args.work_dir, args.workers, args.cfg_options)
    from mmseg_custom.datasets.synthetic import generate_ade_layout
    if args.command == 'make-data':
        given = {k: getattr(args, k) for k in DATA_FLAGS if getattr(args, k) is not None}
        print(generate_ade_layout(args.root, **given))
        return 0
    return 2


if __name__ == '__main__':
    sys.exit(main())
