"""Trial groups: K heads trained on one frozen-backbone pass per batch end exactly as they end
when trained alone (same batches, augmentations, initial weights, dropout masks, optimizer
steps); a head that diverges or is stopped leaves the others untouched."""
import copy
import json
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
    # stopped head paid for its first half only
    last = [json.loads((tmp_path / f'h{k}' / 'metrics.jsonl').read_text().splitlines()[-1])
            for k in range(3)]
    assert sum(m['cost.worker_hours'] for m in last) == pytest.approx(
        max(m['cost.train_s'] for m in last) / 3600, rel=1e-9)
    assert last[1]['cost.worker_hours'] < last[0]['cost.worker_hours'] / 2


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
    full = 0
    for run in grouped:
        twin = twins[_config(run)]
        steps = [m.step for m in g_client.get_metric_history(run.info.run_id, 'mIoU')]
        twin_steps = [m.step for m in a_client.get_metric_history(twin.info.run_id, 'mIoU')]
        assert steps == twin_steps[:len(steps)] and steps  # the same evaluation iterations
        if len(steps) == len(twin_steps):  # not stopped by ASHA: the very same head
            full += 1
            assert run.data.metrics['mIoU'] == pytest.approx(twin.data.metrics['mIoU'],
                                                             abs=1e-6)
    assert full >= 1  # ASHA keeps its best trials to the end


# -- planning: which trials group, and how big a group may be --------------------------------

def _planned(path='search_spaces/demo_grouped.yaml', **changes):
    from orchestrator import grouping, plan
    from orchestrator.spec import load_spec
    spec, base_cfg = load_spec(path)
    for k, v in changes.items():
        setattr(spec, k, v)
    base = plan.plain(base_cfg)
    rows = plan.grid_trials(spec)
    return grouping.plan_groups(spec, base, rows), grouping.dry_run_lines(spec, base, rows), base


def test_groups_are_the_trials_sharing_backbone_side_values():
    (chunks, shown), lines, _ = _planned()
    assert sorted(chunks.values()) == [[6], [6]]  # one group per data fraction
    for _, members in shown:  # members differ in head-side values only
        assert len(members) == 6
    assert 'trial groups: 12 of 12 trials in 2 group(s)' in lines[0]


def test_a_group_too_big_for_the_memory_budget_is_split():
    from orchestrator.grouping import head_memory_bytes
    (_, _, base) = _planned()
    per_head = head_memory_bytes(base)  # 64 x 64 px x 4 classes x batch 4 x 12 bytes
    assert per_head == 64 * 64 * 4 * 4 * 12
    (chunks, shown), lines, _ = _planned(grouping_memory_gb=4.5 * per_head / 1024 ** 3)
    assert sorted(chunks.values()) == [[3, 3], [3, 3]]  # at most 4 heads: 6 -> 3 + 3
    assert len(shown) == 4 and 'at most 4 heads per group' in lines[0]


def test_unfrozen_backbones_and_switched_off_grouping_never_group():
    (chunks, _), lines, _ = _planned('search_spaces/demo.yaml')  # TinyCNN trains
    assert chunks == {} and 'not frozen' in lines[0]
    (chunks, _), lines, _ = _planned(grouping=False)
    assert chunks == {} and lines[0].startswith('trial groups: off')


def test_sampled_backbone_side_values_switch_grouping_off():
    from orchestrator.spec import Param
    params = [Param('model.decode_head.num_convs', 'grid', (0, 1)),
              Param('fewshot.fraction', 'choice', (0.5, 1.0))]
    (chunks, _), lines, _ = _planned(params=params, algorithm='random')
    assert chunks == {} and 'fewshot.fraction is sampled' in lines[0]


def test_a_group_whose_member_never_comes_starts_without_it(ray_address, synthetic_root,
                                                             tmp_path):
    """A planned member whose trial never starts must not hold the group: after the join wait
    the group trains with the members present; a member later than that trains alone."""
    import ray

    from orchestrator.crew import TrialJob, WorkerPool
    from orchestrator.plan import plain
    cfg = _cfg(synthetic_root, **copy.deepcopy(VARIANTS[0]))
    job = TrialJob(base=plain(cfg), overrides={'work_dir': str(tmp_path / 't0' / 'mmseg')},
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


# -- bounded grouped sweeps: live Tune trials <= worker slots x group size -----------------------

def test_tune_creates_a_groups_members_one_after_another():
    """Nested head-side/backbone-side, Tune's own generator creates each group's members in a
    row: 1 slot needs 6 live trials for groups of 6 (flat, the fractions interleave: 11)."""
    from orchestrator import grouping, plan
    from orchestrator.spec import load_spec
    spec, base_cfg = load_spec('search_spaces/demo_grouped.yaml')
    chunks, _ = grouping.plan_groups(spec, plan.plain(base_cfg), plan.grid_trials(spec))
    space = plan.tune_param_space(spec)
    nested = grouping.nest_for_groups(space)
    assert grouping.live_trial_bound(spec, nested, chunks, 1) == (6, 6)
    assert grouping.live_trial_bound(spec, nested, chunks, 2) == (12, 6)
    assert grouping.live_trial_bound(spec, space, chunks, 1) == (11, 6)
    spec, base_cfg = load_spec('search_spaces/linear_probe.yaml')  # 180 trials, 15 groups of 12
    spec.grouping_memory_gb = 16
    chunks, _ = grouping.plan_groups(spec, plan.plain(base_cfg), plan.grid_trials(spec))
    nested = grouping.nest_for_groups(plan.tune_param_space(spec))
    assert grouping.live_trial_bound(spec, nested, chunks, 2) == (24, 12)


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
    from orchestrator.crew import TrialJob, WorkerPool
    cfgs, jobs = [], []
    for k, variant in enumerate(VARIANTS[:2]):
        cfg = _cfg(synthetic_root, **copy.deepcopy(variant))
        (tmp_path / 'trials' / f't{k}').mkdir(parents=True)
        cfgs.append(cfg)
        trial = tmp_path / 'trials' / f't{k}'  # the group's directory: tmp_path / 'groups'
        jobs.append(TrialJob(base=plain(cfg), overrides={'work_dir': str(trial / 'mmseg')},
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


def test_heads_per_group_come_from_the_gpu_memory_left_beside_the_frozen_model():
    """InternViT-6B's linear probe, 12 heads per (fraction, subset): an H200's memory less the
    frozen backbone's holds all 12 (15 groups); without a GPU to ask, the 8 GiB default splits
    each into 6 + 6; an explicit grouping.memory_gb wins."""
    from orchestrator import grouping, plan
    from orchestrator.spec import load_spec
    spec, base_cfg = load_spec('search_spaces/linear_probe.yaml')
    base, rows = plan.plain(base_cfg), plan.grid_trials(spec)
    model = grouping.frozen_model_bytes(base)
    assert 11.5e9 < model < 12.0e9  # 5.9 B bf16 parameters, nothing of the head
    gpu = 143771 * 1024 ** 2  # what an H200 reports
    cap, how = grouping.heads_per_group(spec, base, gpu)
    assert cap == int((0.9 * gpu - model) // grouping.head_memory_bytes(base)) > 12
    chunks, _ = grouping.plan_groups(spec, base, rows, gpu)
    assert list(chunks.values()) == [[12]] * 15
    line = grouping.dry_run_lines(spec, base, rows, gpu)[0]
    assert 'in 15 group(s)' in line and "less the frozen model's 11." in line
    chunks, _ = grouping.plan_groups(spec, base, rows)
    assert list(chunks.values()) == [[6, 6]] * 15
    assert 'no GPU memory known here' in grouping.dry_run_lines(spec, base, rows)[0]
    spec.grouping_memory_gb = 4.0
    assert grouping.heads_per_group(spec, base, gpu)[0] == 4


def test_compare_puts_the_same_configurations_of_two_sweeps_side_by_side(sweeps, capsys):
    """The grouped sweep (A) against the same 8 configurations trained alone (B): 8 pairs, each
    side's mIoU as MLflow holds it for the run with that configuration."""
    from orchestrator import cli
    (_, g_client, grouped), (_, a_client, alone) = sweeps
    dirs = [Path(c.tracking_uri[len('sqlite:///'):]).parent / 'groups' for c in (g_client,
                                                                                a_client)]
    assert cli.main(['compare', *map(str, dirs)]) == 0
    out = capsys.readouterr().out
    assert '8 configuration(s) in both' in out and '0 in one only' in out
    runs = {('A', _config(r)): r for r in grouped} | {('B', _config(r)): r for r in alone}
    table = [[c.strip() for c in line.strip('|').split('|')] for line in out.splitlines()
             if line.startswith('|')]
    header, lines = table[0], table[1:]
    assert len(lines) == 8
    for cells in lines:  # the searched values as MLflow's params spell them
        config = tuple(cells[header.index(k)] for k in SEARCHED)
        a, b = runs[('A', config)], runs[('B', config)]
        assert float(cells[-5]) == pytest.approx(a.data.metrics['mIoU'], abs=1e-4)
        assert float(cells[-3]) == pytest.approx(b.data.metrics['mIoU'], abs=1e-4)
