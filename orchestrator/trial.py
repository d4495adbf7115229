"""One Tune trial: resolve its overrides, pick its few-shot subset, lease a warm worker group,
run the training on its N workers and forward rank 0's evaluations to Tune (so ASHA can stop it).

The trial process only drives: it never imports mmcv or mmseg; the workers merge the config.
"""
import os
import os.path as osp

import ray
from ray import tune

from orchestrator.fewshot import write_split_file
from orchestrator.plan import resolve
from orchestrator.spec import FRACTION_KEY

POLL_S = 1.0


def trial_dir(output_dir, trial_id):
    return osp.join(output_dir, 'trials', trial_id)


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


def _root_error(runs, error):
    """The error that ended a group's run: a worker's own exception, not the 'actor died' of
    the ranks the pool killed after it."""
    ready = ray.wait(runs, num_returns=len(runs), timeout=5.0)[0]
    for ref in ready:
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            return e
        except ray.exceptions.RayError:
            pass
    return error


def run_trial(config, spec, base, base_filename, output_dir, pool_name):
    """Tune function trainable (a plain function, as in Ray Tune's examples)."""
    trial_id = tune.get_context().get_trial_id()
    out_dir = trial_dir(output_dir, trial_id)
    overrides = trial_overrides(spec, base, dict(config), out_dir)
    job = dict(base=base, overrides=overrides, base_filename=base_filename, trial_dir=out_dir,
               source=spec.source, trial_id=trial_id)
    pool = ray.get_actor(pool_name)
    gid, workers = ray.get(pool.acquire.remote(trial_id))
    n = len(workers)
    init_method = ray.get(workers[0].rendezvous.remote())
    runs = [w.run.remote(job, rank, n, init_method) for rank, w in enumerate(workers)]
    pool.release_when_done.remote(gid, runs)
    try:
        done = False
        while not done:
            ready = ray.wait(runs, num_returns=n, timeout=POLL_S)[0]
            done = len(ready) == n
            try:
                ray.get(ready)  # a worker's error fails the trial, with the worker's message
                reports = ray.get(workers[0].drain.remote(trial_id))
            except ray.exceptions.RayError as e:
                raise _root_error(runs, e) from None
            for metrics in reports:
                tune.report(metrics)
    finally:  # finished, failed, or stopped by Tune (ASHA): no worker keeps training it
        for w in workers:
            w.request_stop.remote(trial_id)
