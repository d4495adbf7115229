"""Trial groups: K heads trained on one frozen-backbone pass per batch end exactly as they end
when trained alone (same batches, augmentations, initial weights, dropout masks, optimizer
steps); a head that diverges or is stopped leaves the others untouched."""
import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from mmcv import Config

from orchestrator import worker

CONFIG = 'configs/tiny_vit_frozen_fcn_synthetic.py'
# head-side values only: depth, norm, concat, width, kernel, learning rate
VARIANTS = [
    dict(num_convs=0, channels=64, with_norm=True, lr=1e-3),
    dict(num_convs=1, lr=3e-3),
    dict(num_convs=2, concat_input=False, kernel_size=1, channels=16, lr=5e-3),
]
ALL_IMAGES = {'fewshot.fraction': 1.0, 'fewshot.seed': 0}  # a job's derived subset values


def _cfg(root, iters=12, lr=None, **head):
    cfg = Config.fromfile(CONFIG)
    for split in ('train', 'val', 'test'):
        cfg.data[split].data_root = str(root)
    cfg.runner.max_iters = iters
    cfg.evaluation.interval = iters // 2
    cfg.checkpoint_config.interval = iters // 2
    cfg.deterministic = True
    if lr is not None:
        cfg.optimizer.lr = lr
    cfg.model.decode_head.update(head)
    return cfg


def _head(path):
    return torch.load(path / worker.HEAD_FILE)


def _history(path):
    return [{k: v for k, v in json.loads(line).items()  # all but wall-clock measurements
             if k != 'eval_time' and not k.startswith('cost.')}
            for line in (path / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def solo(synthetic_root, tmp_path_factory):
    """Each variant trained alone, as an ungrouped sweep trial would be."""
    out = tmp_path_factory.mktemp('solo')
    for k, v in enumerate(VARIANTS):
        worker.train(_cfg(synthetic_root, **copy.deepcopy(v)), str(out / f'h{k}'))
    return out


def _assert_same_head(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), rtol=0, atol=1e-6), name


def test_grouped_heads_are_their_solo_selves(synthetic_root, solo, tmp_path):
    cfgs = [_cfg(synthetic_root, **copy.deepcopy(v)) for v in VARIANTS]
    dirs = [str(tmp_path / f'h{k}') for k in range(len(VARIANTS))]
    final = worker.train_group(cfgs, dirs, str(tmp_path / 'group'))
    for k in range(len(VARIANTS)):
        _assert_same_head(_head(tmp_path / f'h{k}'), _head(solo / f'h{k}'))
        assert _history(tmp_path / f'h{k}') == _history(solo / f'h{k}')  # mIoU, loss, lr, iter
        assert final[k]['iter'] == 12 and final[k]['mIoU'] == _history(solo / f'h{k}')[-1]['mIoU']
    # the heads really differ from each other (the test would pass trivially otherwise)
    assert len({json.dumps(_history(tmp_path / f'h{k}')[-1]) for k in range(3)}) == 3
    # the group's config as it ran reloads, and mmcv builds its hooks from it (plain values)
    from mmcv.runner import HOOKS
    from mmcv.utils import build_from_cfg
    ran = Config.fromfile(str(tmp_path / 'group' / 'config.py'))
    hooks = [build_from_cfg({k: v for k, v in h.items() if k != 'priority'}, HOOKS)
             for h in ran.custom_hooks]
    assert {type(h).__name__ for h in hooks} >= {'MultiHeadEvalHook', 'HeadControlHook'}
    assert next(h for h in hooks if type(h).__name__ == 'MultiHeadEvalHook').work_dirs == dirs


def test_a_diverging_head_leaves_and_the_others_are_unchanged(synthetic_root, solo, tmp_path):
    wild = dict(num_convs=1, lr=1e30)  # AdamW steps of 1e30: the logits overflow within steps
    cfgs = [_cfg(synthetic_root, **copy.deepcopy(v)) for v in (VARIANTS[0], wild, VARIANTS[2])]
    dirs = [str(tmp_path / f'h{k}') for k in range(3)]
    failures = []
    callbacks = [None, lambda m: failures.append(m) if 'failed' in m else None, None]
    final = worker.train_group(cfgs, dirs, str(tmp_path / 'group'), callbacks=callbacks)
    assert len(failures) == 1 and failures[0]['failed'].startswith('diverged: training loss is')
    assert final[0]['iter'] == final[2]['iter'] == 12
    _assert_same_head(_head(tmp_path / 'h0'), _head(solo / 'h0'))
    _assert_same_head(_head(tmp_path / 'h2'), _head(solo / 'h2'))


def test_stopping_one_head_stops_only_that_head(synthetic_root, solo, tmp_path):
    cfgs = [_cfg(synthetic_root, **copy.deepcopy(v)) for v in VARIANTS]
    dirs = [str(tmp_path / f'h{k}') for k in range(3)]
    asked = {'n': 0}

    def stop_head_1():  # asked once per iteration: stop after the first evaluation (iter 6)
        asked['n'] += 1
        return asked['n'] >= 6
    final = worker.train_group(cfgs, dirs, str(tmp_path / 'group'),
                               should_stops=[None, stop_head_1, None])
    assert [m['iter'] for m in _history(tmp_path / 'h1')] == [6]
    assert final[0]['iter'] == final[2]['iter'] == 12
    _assert_same_head(_head(tmp_path / 'h0'), _head(solo / 'h0'))
    _assert_same_head(_head(tmp_path / 'h2'), _head(solo / 'h2'))
    # the members' worker-hours add up to the group's wall time (one process), no more: the
    # stopped head shared every interval it trained in three ways
    last = [json.loads((tmp_path / f'h{k}' / 'metrics.jsonl').read_text().splitlines()[-1])
            for k in range(3)]
    assert sum(m['cost.worker_hours'] for m in last) == pytest.approx(
        max(m['cost.train_s'] for m in last) / 3600, rel=1e-9)
    assert last[1]['cost.worker_hours'] == pytest.approx(last[1]['cost.train_s'] / 3600 / 3,
                                                         rel=1e-9)


def _checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=False)


def _assert_same_checkpoint(a, b):
    """Weights, optimizer state (every tensor, every hyperparameter of every group) and the
    iteration mmcv resumes from."""
    _assert_same_head(a['state_dict'], b['state_dict'])
    oa, ob = a['optimizer'], b['optimizer']
    assert oa['param_groups'] == ob['param_groups']
    assert oa['state'].keys() == ob['state'].keys() and oa['state']
    for i in oa['state']:
        _assert_same_head(oa['state'][i], ob['state'][i])
    for key in ('iter', 'epoch', 'frozen_backbone', 'CLASSES'):
        assert a['meta'][key] == b['meta'][key], key


def test_a_groups_checkpoints_are_its_heads_solo_checkpoints_and_it_continues_from_them(
        synthetic_root, solo, tmp_path):
    """At its evaluations a grouped run writes each head the checkpoint its solo run writes;
    from them the group continues (a retry or --resume), and continues exactly as each head
    resumed alone from the same file."""
    cfgs = [_cfg(synthetic_root, **copy.deepcopy(v)) for v in VARIANTS]
    dirs = [tmp_path / f'h{k}' for k in range(3)]
    worker.train_group(cfgs, [str(d) for d in dirs], str(tmp_path / 'group'))
    for k, d in enumerate(dirs):
        for it in (6, 12):  # the solo runs checkpoint every 6 iterations too
            _assert_same_checkpoint(_checkpoint(d / f'iter_{it}.pth'),
                                    _checkpoint(solo / f'h{k}' / f'iter_{it}.pth'))
        assert not any(n.startswith('backbone.') for n in _checkpoint(d / 'iter_6.pth')['state_dict'])

    def at_6(name):  # each head's files as an interruption after iteration 6 left them
        out = []
        for k, d in enumerate(dirs):
            (tmp_path / name / f'h{k}').mkdir(parents=True)
            shutil.copy(d / 'iter_6.pth', tmp_path / name / f'h{k}')
            (tmp_path / name / f'h{k}' / 'metrics.jsonl').write_text(
                (d / 'metrics.jsonl').read_text().splitlines()[0] + '\n')
            out.append(tmp_path / name / f'h{k}')
        return out
    grouped, alone = at_6('grouped'), at_6('alone')
    resumed = [_cfg(synthetic_root, **copy.deepcopy(v)) for v in VARIANTS]
    for c in resumed:
        c.auto_resume = True
    final = worker.train_group(resumed, [str(d) for d in grouped], str(tmp_path / 'group2'))
    log = '\n'.join(p.read_text() for p in (tmp_path / 'group2').glob('*.log'))
    assert 'trial group of 3 heads continuing after iteration 6' in log
    for k, c in enumerate(resumed):
        worker.train(copy.deepcopy(c), str(alone[k]))
        _assert_same_head(_head(grouped[k]), _head(alone[k]))
        assert _history(grouped[k]) == _history(alone[k])
        assert [m['iter'] for m in _history(grouped[k])] == [6, 12]
        assert final[k]['mIoU'] == _history(alone[k])[-1]['mIoU']


def test_a_groups_checkpoint_in_warmup_with_per_parameter_groups_is_the_solo_checkpoint(
        synthetic_root, tmp_path):
    """With a paramwise_cfg (one optimizer group per parameter: the frozen backbone's groups
    hold no head parameter) and a linear warmup running at the checkpoint, every group's
    hyperparameters (the frozen ones' scheduled lr too) are what the solo run saves."""
    def cfg(v):
        c = _cfg(synthetic_root, **copy.deepcopy(v))
        c.optimizer.paramwise_cfg = dict(custom_keys={'backbone': dict(lr_mult=0.1)})
        c.lr_config.update(warmup='linear', warmup_iters=8, warmup_ratio=0.1)
        return c
    variants = VARIANTS[:2]
    for k, v in enumerate(variants):
        worker.train(cfg(v), str(tmp_path / f'solo{k}'))
    worker.train_group([cfg(v) for v in variants], [str(tmp_path / f'h{k}') for k in range(2)],
                       str(tmp_path / 'group'))
    for k in range(2):
        for it in (6, 12):  # 6: in the warmup
            grouped = _checkpoint(tmp_path / f'h{k}' / f'iter_{it}.pth')
            _assert_same_checkpoint(grouped, _checkpoint(tmp_path / f'solo{k}' / f'iter_{it}.pth'))
            groups, state = grouped['optimizer']['param_groups'], grouped['optimizer']['state']
            assert len(groups) > len(state)  # one group per parameter: frozen ones without state
            assert all(g['lr'] < g['initial_lr'] for g in groups)  # all scheduled (poly, warmup)


# -- the same through `orchestrator sweep`: grouped and not, on the session's Ray cluster ------

SEARCHED = ['model.decode_head.num_convs', 'model.decode_head.with_norm', 'optimizer.lr']


def _sweep(tmp, synthetic_root, address, *flags, asha=False):
    import yaml
    from mlflow.tracking import MlflowClient
    from orchestrator import cli
    space = dict(
        name='groups', base_config=str(Path(CONFIG).resolve()), data_root=str(synthetic_root),
        parameters={'model.decode_head.num_convs': {'grid': [0, 1]},
                    'model.decode_head.with_norm': {'grid': [False, True]},
                    'optimizer.lr': {'grid': [3e-3, 1e-6]},
                    'fewshot.fraction': {'grid': [0.5]}},
        derived={'iterations': {'at_full_data': 80}, 'evaluations': 4},
        resources={'workers_per_trial': 2, 'cpus_per_worker': 1},
        tracking={'experiment': 'groups'}, output=str(tmp / 'out'))
    if asha:
        space['early_stopping'] = {'asha': {'grace_period': 10, 'reduction_factor': 2}}
    (tmp / 'space.yaml').write_text(yaml.safe_dump(space))
    code = cli.main(['sweep', str(tmp / 'space.yaml'), '--address', address, *flags])
    client = MlflowClient('sqlite:///' + str(tmp / 'out' / 'mlflow.db'))
    exp = client.get_experiment_by_name('groups')
    children = [r for r in client.search_runs([exp.experiment_id])
                if 'mlflow.parentRunId' in r.data.tags]
    return code, client, children


def _config(run):
    return tuple(run.data.params[k] for k in SEARCHED)


@pytest.fixture(scope='module')
def sweeps(synthetic_root, ray_address, tmp_path_factory):
    """8 trials (2 depths x 2 norms x 2 learning rates, one data fraction) trained as one group
    of 8 with ASHA, and alone without it."""
    grouped = _sweep(tmp_path_factory.mktemp('grouped'), synthetic_root, ray_address, asha=True)
    alone = _sweep(tmp_path_factory.mktemp('alone'), synthetic_root, ray_address,
                   '--no-grouping')
    return grouped, alone


def test_grouped_sweep_has_the_mlflow_structure_of_an_ungrouped_one(sweeps):
    (g_code, _, grouped), (a_code, _, alone) = sweeps
    assert g_code == 0 and a_code == 0
    assert len(grouped) == len(alone) == 8
    assert sorted(_config(r) for r in grouped) == sorted(_config(r) for r in alone)
    assert {frozenset(r.data.params) for r in grouped} == {frozenset(r.data.params) for r in alone}
    assert all(r.data.tags['trial_group_size'] == '8' for r in grouped)
    assert len({r.data.tags['trial_group'] for r in grouped}) == 1
    assert not any('trial_group' in r.data.tags for r in alone)
    assert all(r.info.status == 'FINISHED' for r in grouped + alone)


def test_grouped_heads_score_as_their_solo_twins_unless_asha_stopped_them(sweeps):
    (_, g_client, grouped), (_, a_client, alone) = sweeps
    twins = {_config(r): r for r in alone}
    for run in grouped:
        twin = twins[_config(run)]
        steps = [m.step for m in g_client.get_metric_history(run.info.run_id, 'mIoU')]
        twin_steps = [m.step for m in a_client.get_metric_history(twin.info.run_id, 'mIoU')]
        assert steps == twin_steps[:len(steps)] and steps  # the same evaluation iterations
        # the run says what ASHA did, as its metric history shows it
        full = len(steps) == len(twin_steps)
        assert run.data.tags['stopped_early'] == str(not full).lower()
        assert run.data.tags['iterations_trained'] == str(steps[-1])
        if full:  # not stopped by ASHA: the very same head
            assert run.data.metrics['mIoU'] == pytest.approx(twin.data.metrics['mIoU'],
                                                             abs=1e-6)


def _stopped_by_history(client, run):
    """Stopped early, as the run's own mIoU history shows it: its last step is short of the
    planned iterations."""
    steps = [m.step for m in client.get_metric_history(run.info.run_id, 'mIoU')]
    return max(steps) < int(run.data.params['runner.max_iters'])


def test_a_finished_child_says_whether_it_trained_its_whole_schedule(sweeps):
    (_, g_client, grouped), (_, _, alone) = sweeps
    stopped = [r for r in grouped if _stopped_by_history(g_client, r)]
    assert 1 <= len(stopped) < len(grouped)  # ASHA stopped some, not all: the test can fail
    for run in grouped + alone:
        tags = run.data.tags
        assert tags['iterations_planned'] == run.data.params['runner.max_iters'] == '40'
        assert tags['stopped_early'] == ('true' if run in stopped else 'false')
        if run not in stopped:
            assert tags['iterations_trained'] == '40'


def test_child_runs_are_named_by_their_searched_values(sweeps):
    (_, _, grouped), _ = sweeps
    names = {r.data.tags['mlflow.runName'] for r in grouped}
    assert names == {f'nc{nc}-{norm}-lr{lr}-f1/2' for nc in (0, 1) for norm in ('nonorm', 'norm')
                     for lr in ('0.003', '1e-06')}


def test_the_report_averages_only_trials_that_completed_their_schedule(sweeps):
    """The ASHA sweep's report: each curve point's n counts the completed trials, its
    'stopped' count the others, and every stopped trial is listed with its iteration."""
    import csv

    from orchestrator import cli
    (_, g_client, grouped), _ = sweeps
    sweep_dir = Path(g_client.tracking_uri[len('sqlite:///'):]).parent / 'groups'
    assert cli.main(['report', str(sweep_dir)]) == 0
    with open(sweep_dir / 'report' / 'miou_vs_fraction.csv') as f:
        curve = list(csv.DictReader(f))
    assert len(curve) == 8  # one line per head variant and lr, one fraction
    for point in curve:
        run = next(r for r in grouped if point['variant'] == ', '.join(
            f'{k.rsplit(".", 1)[-1] if k.startswith("model.") else k}={r.data.params[k]}'
            for k in SEARCHED))
        stopped = _stopped_by_history(g_client, run)
        assert (int(point['n']), int(point['stopped'])) == ((0, 1) if stopped else (1, 0))
        if not stopped:
            assert float(point['mean']) == pytest.approx(run.data.metrics['mIoU'], abs=1e-9)
        else:
            assert point['mean'] == ''
    text = (sweep_dir / 'report' / 'report.md').read_text()
    section = text.split('## Stopped early (not averaged into the curve)')[1]
    for run in grouped:
        if _stopped_by_history(g_client, run):
            steps = [m.step for m in g_client.get_metric_history(run.info.run_id, 'mIoU')]
            assert f'stopped early at iteration {max(steps)} of 40' in section


def test_a_sweep_computes_each_validation_input_once_and_removes_the_cache_at_its_end(sweeps):
    """The grouped sweep's one group reads its validation images' features from the cache at
    every evaluation after the first (val_features.py; the scores are an uncached evaluation's:
    test_val_features.py); the cache's directories are gone once the sweep ended."""
    import re

    from mmseg_custom.feature_store import tier_dirs
    from orchestrator import val_cache
    from orchestrator.spec import load_spec
    (_, g_client, _), _ = sweeps
    sweep_dir = Path(g_client.tracking_uri[len('sqlite:///'):]).parent / 'groups'
    (log,) = sweep_dir.glob('groups/*/*.log')
    lines = [tuple(map(int, m)) for m in re.findall(
        r'validation features: (\d+) read from the cache, (\d+) computed', log.read_text())]
    # rank 0's log: its share of the 16 images on 2 ranks
    assert len(lines) >= 2 and lines == [(8 * k, 8) for k in range(len(lines))]
    spec, _ = load_spec(str(sweep_dir / 'space.yaml'))
    cache = val_cache.settings(spec, str(sweep_dir))
    tiers = tier_dirs(cache['name'], cache['tiers'])  # resolved here as on the one node
    assert f'cached in {tiers[0][0]} (up to' in log.read_text()
    assert tiers and not any(Path(d).exists() for d, _ in tiers)


# -- planning: which trials group, and how big a group may be --------------------------------

def _planned(path='search_spaces/demo_grouped.yaml', params=None, **sections):
    """The plan of a shipped space file, with other ``params`` or section values
    (``grouping={'memory_gb': 1}``)."""
    import dataclasses

    from orchestrator import grouping
    from orchestrator.spec import load_spec
    from orchestrator.sweep_plan import make_plan
    spec, base_cfg = load_spec(path)
    for section, values in sections.items():
        spec = spec.replaced(section, **values)
    if params is not None:
        spec = dataclasses.replace(spec, params=params)
    plan = make_plan(spec, base_cfg).size_groups()
    return (plan.groups.chunks, plan.groups.shown), grouping.dry_run_lines(plan), plan.base


def test_groups_are_the_trials_sharing_backbone_side_values():
    (chunks, shown), lines, _ = _planned()
    assert sorted(chunks.values()) == [[6], [6]]  # one group per data fraction
    for _, members in shown:  # members differ in head-side values only
        assert len(members) == 6
    assert 'trial groups: 12 of 12 trials in 2 group(s)' in lines[0]


def test_a_group_too_big_for_the_memory_budget_is_split():
    from orchestrator import grouping
    from orchestrator.spec import load_spec
    from orchestrator.sweep_plan import make_plan
    spec, base_cfg = load_spec('search_spaces/demo_grouped.yaml')
    plan = make_plan(spec, base_cfg)
    _, _, memories = grouping.head_memories(spec, plan.base, plan.trials)
    worst = grouping.HeadMemory(*(max(getattr(m, f.name) for m in memories.values())
                                  for f in dataclasses.fields(grouping.HeadMemory)))
    four = grouping.group_bytes([worst] * 4)  # room for 4 of its largest heads, not 5
    (chunks, shown), lines, _ = _planned(grouping={'memory_gb': (four + 1) / 1024 ** 3})
    assert sorted(chunks.values()) == [[3, 3], [3, 3]]  # at most 4 heads: 6 -> 3 + 3
    assert len(shown) == 4 and 'at most 4 heads per group' in lines[0]


def test_unfrozen_backbones_and_switched_off_grouping_never_group():
    (chunks, _), lines, _ = _planned('search_spaces/demo.yaml')  # TinyCNN trains
    assert chunks == {} and 'not frozen' in lines[0]
    (chunks, _), lines, _ = _planned(grouping={'enabled': False})
    assert chunks == {} and lines[0].startswith('trial groups: off')


def test_sampled_backbone_side_values_switch_grouping_off():
    from orchestrator.spec import Param
    params = [Param('model.decode_head.num_convs', 'grid', (0, 1)),
              Param('fewshot.fraction', 'choice', (0.5, 1.0))]
    (chunks, _), lines, _ = _planned(params=params, search={'algorithm': 'random'})
    assert chunks == {} and 'fewshot.fraction is sampled' in lines[0]


def test_a_group_whose_member_never_comes_starts_without_it(ray_address, synthetic_root,
                                                             tmp_path):
    """A planned member whose trial never starts must not hold the group: after the join wait
    the group trains with the members present; a member later than that trains alone."""
    import ray

    from orchestrator.sweep_plan import PlannedTrial
    from orchestrator.crew import WorkerPool
    from orchestrator.train_worker import TrialJob
    from orchestrator.plan import plain
    cfg = _cfg(synthetic_root, **copy.deepcopy(VARIANTS[0]))
    job = TrialJob(base=plain(cfg), trial=PlannedTrial(0, {}, {}, {}, ALL_IMAGES),
                   base_filename=cfg.filename, trial_dir=str(tmp_path / 't0'), source='test',
                   trial_id='t0')
    (tmp_path / 't0').mkdir()
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    try:
        pool = WorkerPool.remote(1, 1, {'CPU': 1.0}, trial_groups={'k': [2]}, join_wait_s=3)
        cid, workers, runs, group_dir, size = ray.get(pool.join.remote('t0', 'k', job, None),
                                                      timeout=120)
        assert size == 1
        final = ray.get(runs, timeout=300)[0]
        assert final[0]['iter'] == 12 and 0 <= final[0]['mIoU'] <= 1
        assert [r['iter'] for r in ray.get(workers[0].drain.remote('t0'))] == [6, 12]
        assert ray.get(pool.join.remote('t1', 'k', job, None)) is None  # late: alone
        assert ray.get(pool.stats.remote())['trial_groups_launched'] == 1
        ray.kill(pool)
    finally:
        ray.shutdown()


def test_members_of_a_split_group_continue_in_the_half_they_were_given(
        ray_address, synthetic_root, tmp_path):
    """A group of 4 ran out of GPU memory and was split: a, b into g.1 (which could not start),
    c, d into g.2 (running). a and b come back naming g (their placements were written before
    the split): they continue as g.1, together, a half of g still (group.json keeps its
    parent: a --resume counts no new chunk). Before: they waited for c and d, then were halved
    again, each alone."""
    import ray

    from orchestrator.sweep_plan import PlannedTrial
    from orchestrator.crew import WorkerPool
    from orchestrator.train_worker import TrialJob
    from orchestrator.plan import plain
    jobs = {}
    for k, tid in enumerate('ab'):
        cfg = _cfg(synthetic_root, **copy.deepcopy(VARIANTS[k]))
        jobs[tid] = TrialJob(base=plain(cfg), trial=PlannedTrial(0, {}, {}, {}, ALL_IMAGES),
                             base_filename=cfg.filename, trial_dir=str(tmp_path / 'trials' / tid),
                             source='test', trial_id=tid)
        (tmp_path / 'trials' / tid).mkdir(parents=True)
    split = dict(a='g.1', b='g.1', c='g.2', d='g.2')
    runs = {'g': dict(key='k', members=list('abcd'), out_of_memory=4, split=split),
            'g.1': dict(key='k', members=['a', 'b'], parent='g'),
            'g.2': dict(key='k', members=['c', 'd'], parent='g')}
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    try:
        pool = WorkerPool.remote(1, 1, {'CPU': 1.0}, group_runs=runs, join_wait_s=3)
        back = ray.get([pool.rejoin.remote(t, 'g', 0, jobs[t], None) for t in 'ab'], timeout=120)
        assert [(r.group_dir.rsplit('/', 1)[1], r.size) for r in back] == [('g.1', 2)] * 2
        ray.get(back[0].runs, timeout=300)
        assert not (tmp_path / 'groups' / 'g.2').exists()  # nothing of g.2 rewritten
        written = json.loads((tmp_path / 'groups' / 'g.1' / 'group.json').read_text())
        assert dict(written, members=sorted(written['members'])) == dict(
            key='k', members=['a', 'b'], parent='g', version=1)  # members in arrival order
        ray.kill(pool)
    finally:
        ray.shutdown()


# -- bounded grouped sweeps: live Tune trials <= worker slots x group size -----------------------

def test_tune_creates_a_groups_members_one_after_another():
    """The plan puts each group's members in a row, and Tune's own generator creates the
    trials in the plan's order: 1 slot needs 6 live trials for groups of 6 (with the two
    fractions' trials interleaved, as the file's key order would give them: 11)."""
    from ray.tune.search.variant_generator import generate_variants

    from orchestrator import grouping
    from orchestrator.spec import load_spec
    from orchestrator.sweep_plan import flat_config, make_plan
    spec, base_cfg = load_spec('search_spaces/demo_grouped.yaml')
    plan = make_plan(spec, base_cfg).size_groups()
    chunks = plan.groups.chunks
    created = [flat_config(v) for _, v in generate_variants(plan.param_space())]
    assert created == [t.values for t in plan.trials]  # Tune's order is the plan's
    fraction = [c['fewshot.fraction'] for c in created]
    assert fraction == sorted(fraction) or fraction == sorted(fraction, reverse=True)
    assert grouping.live_trial_bound(spec, plan.trials, chunks, 1) == (6, 6)
    assert grouping.live_trial_bound(spec, plan.trials, chunks, 2) == (12, 6)
    halves = plan.trials[:6], plan.trials[6:]
    interleaved = [t for pair in zip(*halves) for t in pair]
    assert grouping.live_trial_bound(spec, interleaved, chunks, 1) == (11, 6)
    spec, base_cfg = load_spec('search_spaces/linear_probe.yaml')  # 180 trials, 15 groups of 12
    spec = spec.replaced('grouping', memory_gb=80)  # 12 of its largest heads need 67.4 GiB
    plan = make_plan(spec, base_cfg).size_groups()
    assert grouping.live_trial_bound(spec, plan.trials, plan.groups.chunks, 2) == (24, 12)


def test_a_grouped_sweep_keeps_at_most_slots_x_group_size_trials_alive(synthetic_root,
                                                                      ray_address, tmp_path):
    """4 trials in 2 groups of 2, one worker slot: at most 2 trials alive at any time (each
    trial's start and end as the sweep's journal recorded them), all finished."""
    import yaml
    from orchestrator import cli
    space = dict(
        name='bounded', base_config=str(Path(CONFIG).resolve()), data_root=str(synthetic_root),
        parameters={'model.decode_head.num_convs': {'grid': [0, 1]},
                    'fewshot.fraction': {'grid': [0.5, 1.0]}},
        derived={'iterations': {'at_full_data': 16}, 'evaluations': 1},
        resources={'workers_per_trial': 1, 'cpus_per_worker': 1, 'max_concurrent_trials': 1},
        tracking={'experiment': 'bounded'}, output=str(tmp_path / 'out'))
    (tmp_path / 'space.yaml').write_text(yaml.safe_dump(space))
    assert cli.main(['sweep', str(tmp_path / 'space.yaml'), '--address', ray_address]) == 0
    events = [json.loads(line) for line in
              (tmp_path / 'out' / 'bounded' / 'mlflow_journal.jsonl').read_text().splitlines()]
    starts = {e['trial_id']: e['at'] for e in events if e['op'] == 'child'}
    ends = {e['trial_id']: e['at'] for e in events
            if e['op'] == 'status' and e.get('trial_id') and e['status'] != 'RUNNING'}
    assert len(starts) == 4 and {e['status'] for e in events if e['op'] == 'status'
                                 and e.get('trial_id') in ends and e['status'] != 'RUNNING'} \
        == {'FINISHED'}
    alive = max(sum(starts[t] <= at < ends[t] for t in starts) for at in starts.values())
    assert alive == 2  # one group at a time (before: all 4 at once)


def test_a_groups_evaluation_is_shared_by_its_ranks(ray_address, synthetic_root, tmp_path):
    """2 gloo workers: each evaluates half of the 16 validation images, rank 0 scores the
    gathered results; each head's reported mIoU is the one its final weights score on all 16
    images in one process."""
    import ray
    from mmcv.cnn.utils import revert_sync_batchnorm
    from mmcv.parallel import MMDataParallel
    from mmcv.runner import load_state_dict
    from mmseg.apis import set_random_seed, single_gpu_test
    from mmseg.datasets import build_dataloader, build_dataset
    from mmseg.models import build_segmentor

    from orchestrator.plan import plain
    from orchestrator.sweep_plan import PlannedTrial
    from orchestrator.crew import WorkerPool
    from orchestrator.train_worker import TrialJob
    cfgs, jobs = [], []
    for k, variant in enumerate(VARIANTS[:2]):
        cfg = _cfg(synthetic_root, **copy.deepcopy(variant))
        (tmp_path / 'trials' / f't{k}').mkdir(parents=True)
        cfgs.append(cfg)
        trial = tmp_path / 'trials' / f't{k}'  # the group's directory: tmp_path / 'groups'
        jobs.append(TrialJob(base=plain(cfg), trial=PlannedTrial(0, {}, {}, {}, ALL_IMAGES),
                             base_filename=cfg.filename, trial_dir=str(trial), source='test',
                             trial_id=f't{k}'))
    ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    try:
        pool = WorkerPool.remote(1, 2, {'CPU': 1.0}, trial_groups={'k': [2]})
        joined = [pool.join.remote(j.trial_id, 'k', j, None) for j in jobs]
        cid, workers, runs, group_dir, size = ray.get(joined[0], timeout=120)
        assert size == 2
        ray.get(runs, timeout=300)
        ray.kill(pool)
    finally:
        ray.shutdown()
    log = next(Path(group_dir).glob('*.log')).read_text()
    assert 'grouped evaluation at iteration 12: 16 images on 2 rank(s) (8, 8)' in log
    for k, cfg in enumerate(cfgs):
        reported = json.loads((tmp_path / 'trials' / f't{k}' / 'mmseg' / 'metrics.jsonl')
                              .read_text().splitlines()[-1])
        set_random_seed(cfg.seed)  # the seeded, frozen backbone every run builds
        model = revert_sync_batchnorm(build_segmentor(cfg.model))
        load_state_dict(model.decode_head, _head(tmp_path / 'trials' / f't{k}' / 'mmseg'),
                        strict=True)
        dataset = build_dataset(cfg.data.val, dict(test_mode=True))
        loader = build_dataloader(dataset, 1, 0, dist=False, shuffle=False,
                                  persistent_workers=False)
        results = single_gpu_test(MMDataParallel(model.eval()), loader, pre_eval=True)
        assert dataset.evaluate(results, metric='mIoU', logger='silent')['mIoU'] == \
            pytest.approx(reported['mIoU'], abs=1e-6)


def test_heads_per_group_come_from_what_each_head_holds_and_the_gpu_left_beside_the_model():
    """InternViT-6B's linear probe, 12 heads per (fraction, subset). Its largest head (two
    3x3 convs 3200 -> 3200 and conv_cat 6400 -> 3200, with norms) has 369 M parameters: with
    AdamW in fp32 that is 16 bytes each, 5.9 GB, before its logits. An H200 holds the 12 in
    one group (15 groups); 80 GB GPUs 10 (so 6 + 6); half an H200 9 (6 + 6); 8 GiB none."""
    from orchestrator import grouping
    from orchestrator.spec import load_spec
    from orchestrator.sweep_plan import make_plan
    spec, base_cfg = load_spec('search_spaces/linear_probe.yaml')
    plan = make_plan(spec, base_cfg)
    side, names, memories = grouping.head_memories(spec, plan.base, plan.trials)

    def planned(gpu=None):
        return plan.size_groups(gpu).groups.chunks, grouping.dry_run_lines(plan)
    assert 11.5e9 < side.model_bytes < 12.0e9  # 5.9 B bf16 parameters, nothing of the head
    largest = memories['channels=3200, concat_input=True, num_convs=2, with_norm=True']
    conv, norm = 3200 * 3200 * 9, 2 * 3200  # a ConvModule's weight (no bias) and its BN
    assert largest.params == 2 * (conv + norm) + (2 * conv + norm) + 3200 * 150 + 150 + norm
    assert largest.state + largest.gradients == 16 * largest.params  # fp32 w, grad, 2 moments
    # its loss in bands (chunked_loss.py): it keeps the gradient of its logits at feature size
    # (batch 2, 150 classes, 36 x 36, fp32), and 4 bands of 13 label rows (8 MiB / 604,800 B a
    # row of 2 x 150 x 504 fp32) work at once: 1.2 % of mmseg's 3 x 304.8 MB at label size
    assert largest.logits == 2 * 150 * 36 * 36 * 4
    assert largest.loss_forward == 4 * 2 * 150 * 13 * 504 * 4 and largest.loss_backward == 0
    h200, h100 = 143771 * 1024 ** 2, 81559 * 1024 ** 2  # what nvidia-smi reports
    chunks, lines = planned(h200)
    assert list(chunks.values()) == [[12]] * 15
    assert 'in 15 group(s)' in lines[0] and "less the frozen model's 11." in lines[0]
    chunks, lines = planned(h100)
    assert list(chunks.values()) == [[6, 6]] * 15
    assert 'at most 10 heads per group' in lines[0]
    plan.spec = spec.replaced('resources', gpus_per_worker=0.5)  # two workers share each GPU:
    # each plans with half of it
    assert 'at most 9 heads per group' in planned(h200)[1][0]
    plan.spec = spec
    chunks, lines = planned()
    assert chunks == {}  # 8 GiB: two heads do not fit
    assert 'no GPU memory known here' in lines[0]
    assert lines[-1].endswith('10 on an 80 GB GPU (A100/H100), 12 on a 141 GB H200')


def test_compare_puts_the_same_configurations_of_two_sweeps_side_by_side(sweeps, capsys):
    """The grouped sweep (A) against the same 8 configurations trained alone (B): 8 pairs, each
    side's mIoU as MLflow holds it for the run with that configuration."""
    from orchestrator import cli
    (_, g_client, grouped), (_, a_client, alone) = sweeps
    dirs = [Path(c.tracking_uri[len('sqlite:///'):]).parent / 'groups' for c in (g_client,
                                                                                a_client)]
    assert cli.main(['compare', *map(str, dirs)]) == 0
    out = capsys.readouterr().out
    # A's trials that ASHA stopped are left out: their configurations are B's only
    stopped = {_config(r) for r in grouped if _stopped_by_history(g_client, r)}
    assert 0 < len(stopped) < 8
    assert (f'{8 - len(stopped)} configuration(s) in both' in out
            and f'{len(stopped)} in one only' in out)
    assert f'left out: {len(stopped)} in A, 0 in B' in out
    runs = {('A', _config(r)): r for r in grouped} | {('B', _config(r)): r for r in alone}
    table = [[c.strip() for c in line.strip('|').split('|')] for line in out.splitlines()
             if line.startswith('|')]
    header, lines = table[0], table[1:]
    assert len(lines) == 8
    for cells in lines:  # the searched values as MLflow's params spell them
        config = tuple(cells[header.index(k)] for k in SEARCHED)
        a, b = runs[('A', config)], runs[('B', config)]
        if config in stopped:
            assert cells[-5] == '' and cells[-4] == '0'
        else:
            assert float(cells[-5]) == pytest.approx(a.data.metrics['mIoU'], abs=1e-4)
        assert float(cells[-3]) == pytest.approx(b.data.metrics['mIoU'], abs=1e-4)


def test_a_resume_after_a_group_ran_out_of_memory_counts_its_halves_as_no_chunk(tmp_path):
    """--resume reads groups/*/group.json: a group that ran out (out_of_memory) and its half
    (parent) are one planned chunk, not two, so the next planned chunk still forms; the split
    group itself is not counted among the groups that continue (its half is)."""
    import io
    import json
    import types

    from orchestrator.driver import _groups_to_continue
    records = {'g': dict(key='k', members=['a', 'b', 'c'], out_of_memory=3),
               'g.1': dict(key='k', members=['a', 'b'], parent='g')}
    for name, record in records.items():
        (tmp_path / 'groups' / name).mkdir(parents=True)
        (tmp_path / 'groups' / name / 'group.json').write_text(json.dumps(record))
    out = io.StringIO()
    sweep = types.SimpleNamespace(sweep_dir=str(tmp_path), out=out, journal=types.SimpleNamespace(
        last_statuses=lambda: {'a': 'KILLED', 'b': 'KILLED', 'c': 'KILLED'}))
    chunks, group_runs = _groups_to_continue(sweep, {'k': [3, 3]})
    assert chunks == {'k': [3]}  # the second planned chunk (the pool caps it: out_of_memory)
    assert set(group_runs) == {'g', 'g.1'} and group_runs['g']['out_of_memory'] == 3
    assert out.getvalue() == 'trial groups: 1 continue from their checkpoints\n'


def test_a_group_that_cannot_write_its_record_on_a_full_disk_says_so(small_tmpfs):
    """A trial group's first write, its group.json, on a full output disk: the pool answers
    'full' with the path (its members then stop the sweep, resumable: trial.py), not 'lost'
    (which would send them to the restart path, writing on the full disk again), and leases no
    crew."""
    import asyncio

    from orchestrator.group_formation import TrialGroupFormation
    from orchestrator.sweep_plan import PlannedTrial
    from orchestrator.train_worker import TrialJob
    disk = small_tmpfs('out', '64k')
    trial = disk / 'sweep' / 'trials' / 't0'
    trial.mkdir(parents=True)
    with open(disk / 'filler', 'wb', buffering=0) as f:  # the file system full, to its last block
        try:
            while True:
                f.write(b'\0' * 4096)
        except OSError:
            pass
    job = TrialJob(trial_id='t0', trial_dir=str(trial), base={}, base_filename='x.py',
                   trial=PlannedTrial(0, {}, {}, {}, ALL_IMAGES), source='test')

    class Pool(TrialGroupFormation):
        async def acquire(self, trial_id):
            raise AssertionError('no crew is leased for a group that cannot start')

    pool = Pool()
    pool._init_trial_groups({}, {}, 1.0)
    answer = asyncio.run(pool._start([('t0', job, None), ('t1', job, None)], 'k'))
    assert answer[0] == 'full' and answer[1].startswith(str(disk / 'sweep' / 'groups'))
