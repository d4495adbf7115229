"""A real sweep: local Ray cluster, warm crews over gloo, a real sqlite MLflow store."""
import json
import os
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator import cli

SECRET_VAR, SECRET = 'ORCHESTRATOR_TEST_TOKEN', 'tok-5f1c0e9a7b'
SEARCHED = ['model.decode_head.num_convs', 'optimizer.lr', 'fewshot.fraction']


@pytest.fixture(scope='module')
def sweep(tmp_path_factory, synthetic_root, ray_address):
    """Run one small sweep (2 trials x 2 workers, random search) and return what it left."""
    tmp = tmp_path_factory.mktemp('sweep')
    space = dict(
        name='e2e', base_config=str(Path('configs/tiny_fcn_synthetic.py').resolve()),
        data_root=str(synthetic_root),
        parameters={'model.decode_head.num_convs': {'grid': [0, 1]},
                    'optimizer.lr': {'loguniform': [2e-3, 4e-3]},
                    'fewshot.fraction': {'choice': [0.5, 1.0]}},
        derived={'iterations': {'at_full_data': 150, 'min': 60}, 'evaluations': 2},
        search={'algorithm': 'random', 'num_samples': 1, 'seed': 0},
        resources={'workers_per_trial': 2, 'cpus_per_worker': 1},
        tracking={'experiment': 'e2e'}, output=str(tmp / 'out'))
    path = tmp / 'space.yaml'
    path.write_text(yaml.safe_dump(space))
    os.environ[SECRET_VAR] = SECRET  # a credential in the environment must not reach MLflow
    try:
        code = cli.main(['sweep', str(path), '--address', ray_address])
    finally:
        del os.environ[SECRET_VAR]
    uri = 'sqlite:///' + str(tmp / 'out' / 'mlflow.db')
    return dict(code=code, client=MlflowClient(uri), out=tmp / 'out' / 'e2e')


def _runs(sweep):
    client = sweep['client']
    exp = client.get_experiment_by_name('e2e')
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if 'mlflow.parentRunId' not in r.data.tags]
    children = [r for r in runs if 'mlflow.parentRunId' in r.data.tags]
    return parents, children


def test_sweep_exits_zero(sweep):
    assert sweep['code'] == 0


def test_one_parent_one_child_per_trial(sweep):
    parents, children = _runs(sweep)
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert all(c.data.tags['mlflow.parentRunId'] == parent.info.run_id for c in children)
    assert parent.data.tags['sweep'] == 'e2e' and parent.data.tags['version.mmsegmentation']
    assert parent.info.status == 'FINISHED'
    parent_files = [a.path for a in sweep['client'].list_artifacts(parent.info.run_id)]
    assert 'space.yaml' in parent_files


def test_children_have_the_same_params_searched_and_derived(sweep):
    _, children = _runs(sweep)
    keysets = [set(c.data.params) for c in children]
    assert keysets[0] == keysets[1]
    for key in SEARCHED + ['model.decode_head.channels', 'runner.max_iters']:
        assert key in keysets[0], key
    assert {c.data.params['model.decode_head.num_convs'] for c in children} == {'0', '1'}
    for c in children:
        lr = float(c.data.params['optimizer.lr'])
        assert 2e-3 <= lr <= 4e-3
        fraction = float(c.data.params['fewshot.fraction'])
        assert int(c.data.params['runner.max_iters']) == max(60, round(150 * fraction))


def test_every_child_has_miou_history_and_artifacts(sweep):
    _, children = _runs(sweep)
    client = sweep['client']
    for c in children:
        assert c.info.status == 'FINISHED'
        assert 0.0 <= c.data.metrics['mIoU'] <= 1.0
        assert 'IoU.class1' in c.data.metrics and 'loss' in c.data.metrics
        # what the trial cost, as ordinary metrics: worker-hours = the ranks that ran (as
        # the placement tags list them) x the training's wall time, which the MLflow run spans
        ranks = [k for k in c.data.tags if k.startswith('worker.') and k.endswith('.node_id')]
        assert len(ranks) == 2
        train_s = c.data.metrics['cost.train_s']
        assert train_s <= (c.info.end_time - c.info.start_time) / 1000
        assert c.data.metrics['cost.worker_hours'] == pytest.approx(len(ranks) * train_s / 3600)
        assert c.data.metrics['cost.img_per_s'] > 0 and c.data.metrics['cost.gpu_hours'] == 0
        history = client.get_metric_history(c.info.run_id, 'mIoU')
        steps = sorted(m.step for m in history)
        max_iters = int(c.data.params['runner.max_iters'])
        assert len(steps) == 2 and steps[-1] == max_iters  # step = mmseg iteration
        files = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {'resolved_config.py', 'fewshot_subset.txt'} <= files
        subset = Path(client.download_artifacts(c.info.run_id, 'fewshot_subset.txt')).read_text()
        assert len(subset.split()) == round(float(c.data.params['fewshot.fraction']) * 48)


def test_best_configuration_beats_chance(sweep):
    _, children = _runs(sweep)
    best = max(c.data.metrics['mIoU'] for c in children)
    # Chance for 4 classes: a constant prediction scores at most 1/4 mIoU.
    assert best > 0.4


def test_workers_trained_in_sync(sweep):
    for sync in sweep['out'].glob('trials/*/mmseg/rank_sync.json'):
        digests = json.loads(sync.read_text())['decode_head_sha256']
        assert len(digests) == 2 and digests[0] == digests[1]
    assert len(list(sweep['out'].glob('trials/*/mmseg/rank_sync.json'))) == 2


def test_no_environment_secret_in_mlflow_or_outputs(sweep):
    out = sweep['out'].parent
    files = [p for p in out.rglob('*') if p.is_file()]
    assert any(p.name == 'mlflow.db' for p in files) and any('mlartifacts' in p.parts for p in files)
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_each_child_has_its_few_shot_subset_as_a_dataset_input(sweep):
    """MLflow's Dataset column: the subset's name, a digest of its file list, its fraction and
    seed; runs on one subset are found by the digest."""
    import hashlib
    _, children = _runs(sweep)
    client, exp = sweep['client'], sweep['client'].get_experiment_by_name('e2e')
    for c in children:
        run = client.get_run(c.info.run_id)
        (given,) = run.inputs.dataset_inputs
        subset = Path(client.download_artifacts(c.info.run_id, 'fewshot_subset.txt')).read_text()
        fraction = float(c.data.params['fewshot.fraction'])
        assert given.dataset.digest == hashlib.sha256(subset.encode()).hexdigest()[:10]
        assert given.dataset.name == f'synthetic_ade {fraction:g} seed 0'
        assert json.loads(given.dataset.profile) == dict(fraction=fraction, subset_seed=0,
                                                         images=len(subset.split()))
        assert {t.key: t.value for t in given.tags} == {'mlflow.data.context': 'train'}
        found = client.search_runs([exp.experiment_id],
                                   f"dataset.digest = '{given.dataset.digest}'")
        assert c.info.run_id in {r.info.run_id for r in found}


def test_the_sweeps_output_is_ours(tmp_path, synthetic_root, ray_address, cli_env):
    """Our plan, progress lines and final table on the terminal; Tune's experiment box and
    TensorBoard hint and Ray's INFO lines in the sweep's ray.log."""
    import subprocess
    import sys
    space = dict(
        name='quiet', base_config=str(Path('configs/tiny_fcn_synthetic.py').resolve()),
        data_root=str(synthetic_root), parameters={'model.decode_head.num_convs': {'grid': [0]}},
        derived={'iterations': {'at_full_data': 10}, 'evaluations': 1},
        resources={'workers_per_trial': 1, 'cpus_per_worker': 1},
        tracking={'experiment': 'quiet'}, output=str(tmp_path / 'out'))
    (tmp_path / 'space.yaml').write_text(yaml.safe_dump(space))
    run = subprocess.run([str(Path(sys.executable).with_name('orchestrator')), 'sweep',
                          str(tmp_path / 'space.yaml'), '--address', ray_address],
                         env=cli_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    shown = run.stdout + run.stderr
    assert 'resource plan:' in shown and 'finished: 1/1 done' in shown and '| mIoU' in shown
    assert 'Configuration for experiment' not in shown and 'tensorboard' not in shown.lower()
    assert 'INFO' not in shown
    assert 'Wrote the latest version' in (tmp_path / 'out' / 'quiet' / 'ray.log').read_text()
