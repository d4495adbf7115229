"""What a researcher looks at, on a real sweep tracked by a real `mlflow server` on 127.0.0.1:
`orchestrator status` during and after the run, `orchestrator report` (PNGs + the table behind
the curve, compared with what MLflow holds), `orchestrator best` (a config mmseg loads and
builds), and the MLflow REST API the UI uses (filter children by a searched param, order by
mIoU)."""
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator import cli
from orchestrator.status import sweep_status

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_CONVS, FRACTION = 'model.decode_head.num_convs', 'fewshot.fraction'
TRIALS = 8  # num_convs {0, 1} x fraction {0.5, 1} x 2 few-shot subsets (seeds 0, 1)
SUBSET_SEED = 'fewshot.seed'
REFERENCE = {0.5: 40.0, 1.0: 55.0}  # made-up 'published' numbers, in percent


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rest(uri, endpoint, body=None):
    """MLflow's REST API, as its UI calls it."""
    req = urllib.request.Request(f'{uri}/api/2.0/mlflow/{endpoint}',
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _children(uri, experiment_id, parent_id, filter_extra='', order_by=()):
    flt = f"tags.mlflow.parentRunId = '{parent_id}'" + (f' and {filter_extra}' if filter_extra
                                                        else '')
    runs = _rest(uri, 'runs/search', dict(experiment_ids=[experiment_id], filter=flt,
                                           order_by=list(order_by), max_results=1000))
    return runs.get('runs', [])


def _params(run):
    return {p['key']: p['value'] for p in run['data'].get('params', [])}


def _metrics(run):
    return {m['key']: m['value'] for m in run['data'].get('metrics', [])}


# no job runner: its store is a directory in /dev/shm that a stopped server leaves behind
MLFLOW_SERVER_ENV = {'MLFLOW_SERVER_ENABLE_JOB_EXECUTION': 'false'}


@pytest.fixture(scope='module')
def study(tmp_path_factory, synthetic_root, ray_address):
    """A real mlflow server, and a sweep against it whose status is sampled while it runs."""
    cli_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    tmp = tmp_path_factory.mktemp('report')
    port = _free_port()
    uri = f'http://127.0.0.1:{port}'
    log = open(tmp / 'mlflow_server.log', 'a')
    server = subprocess.Popen(
        [str(BIN / 'mlflow'), 'server', '--host', '127.0.0.1', '--port', str(port),
         '--workers', '1', '--backend-store-uri', 'sqlite:///' + str(tmp / 'server.db'),
         '--artifacts-destination', str(tmp / 'server_artifacts')],
        env={**cli_env, **MLFLOW_SERVER_ENV}, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f'{uri}/health', timeout=2)
                break
            except OSError:
                assert time.time() < deadline, (tmp / 'mlflow_server.log').read_text()[-3000:]
                time.sleep(0.5)
        space = dict(
            name='study', base_config=str(ROOT / 'configs' / 'tiny_fcn_synthetic.py'),
            data_root=str(synthetic_root),
            parameters={NUM_CONVS: {'grid': [0, 1]}, FRACTION: {'grid': [0.5, 1.0]}},
            fewshot={'seeds': [0, 1]},
            derived={'iterations': {'at_full_data': 60, 'min': 30}, 'evaluations': 1},
            references={'label': 'paper', 'percent': True, 'where': {NUM_CONVS: 0},
                        'points': REFERENCE},
            resources={'workers_per_trial': 1, 'cpus_per_worker': 1},
            tracking={'experiment': 'study', 'uri': uri}, output=str(tmp / 'out'))
        path = tmp / 'study.yaml'
        path.write_text(yaml.safe_dump(space))
        sweep_dir = tmp / 'out' / 'study'
        driver = subprocess.Popen([str(BIN / 'orchestrator'), 'sweep', str(path),
                                   '--address', ray_address], env=cli_env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        samples = []  # (MLflow FINISHED children before, status summary, ... after)
        exp_id = parent_id = None
        while driver.poll() is None:
            time.sleep(1.0)
            if not (sweep_dir / 'plan.json').is_file() or not (sweep_dir / 'mlflow_journal.jsonl').is_file():
                continue
            if parent_id is None:
                exp = _rest(uri, 'experiments/get-by-name?experiment_name=study')['experiment']
                exp_id = exp['experiment_id']
                parents = _rest(uri, 'runs/search', dict(
                    experiment_ids=[exp_id], filter="tags.role = 'sweep'")).get('runs', [])
                if not parents:
                    continue
                parent_id = parents[0]['info']['run_id']

            def finished():
                return sum(r['info']['status'] == 'FINISHED'
                           for r in _children(uri, exp_id, parent_id))
            before = finished()
            trials, summary = sweep_status(str(sweep_dir))
            # the journal is delivered to MLflow in the background, moments after it is
            # written: wait (bounded) until MLflow holds at least what the status showed
            after, deadline = finished(), time.time() + 30
            while after < summary['done'] and time.time() < deadline:
                time.sleep(0.2)
                after = finished()
            samples.append((before, summary, after, trials))
        output = driver.stdout.read()
        yield dict(code=driver.returncode, output=output, samples=samples, uri=uri,
                   sweep_dir=sweep_dir, exp_id=exp_id, tmp=tmp)
    finally:
        if 'driver' in locals() and driver.poll() is None:  # the fixture failed mid-sweep
            driver.kill()
            driver.wait(timeout=60)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture(scope='module')
def parent_id(study):
    parents = _rest(study['uri'], 'runs/search', dict(
        experiment_ids=[study['exp_id']], filter="tags.role = 'sweep'"))['runs']
    assert len(parents) == 1
    return parents[0]['info']['run_id']


def test_sweep_ran_and_showed_progress_lines(study):
    assert study['code'] == 0, study['output'][-3000:]
    progress = re.findall(r'^\[\d\d:\d\d:\d\d\] (\w+): (\d+)/8 done, (\d+) running, (\d+) pending',
                          study['output'], re.M)
    assert progress, study['output'][-3000:]
    done = [int(p[1]) for p in progress]
    assert done == sorted(done) and len(set(done)) > 2  # it advanced, one line per change
    assert any(int(p[2]) > 0 for p in progress)  # trials seen running, not only finished
    assert progress[-1][:2] == ('finished', '8')


def test_status_counts_are_right_while_the_sweep_runs(study):
    mid_run = [s for s in study['samples'] if s[1]['sweep'] == 'RUNNING'
               and 0 < s[1]['done'] < TRIALS]
    assert len(mid_run) >= 2, [s[1] for s in study['samples']]
    for before, summary, after, trials in study['samples']:
        counts = [summary[k] for k in ('pending', 'running', 'done', 'stopped', 'failed')]
        assert sum(counts) == TRIALS and summary['total'] == TRIALS, summary
        assert summary['running'] <= 2  # 2 cores, 1-CPU workers: 2 trials at once
        # the status agrees with MLflow read just before and just after it
        assert before <= summary['done'] <= after, (before, summary, after)
        for t in trials:
            assert 0 <= t['iter'] <= t['max_iters']
            if t['state'] == 'done':
                assert t['iter'] == t['max_iters'] and 0 <= t['metric'] <= 1
    assert any(t['state'] == 'running' and t['iter'] > 0 for s in mid_run for t in s[3])


def test_status_command_after_the_sweep(study, capsys):
    assert cli.main(['status', str(study['sweep_dir'])]) == 0
    out = capsys.readouterr().out
    assert out.count('| done ') == TRIALS and 'finished: 8/8 done, 0 running, 0 pending' in out


def test_report_plots_exist_decode_and_show_something(study, parent_id, capsys):
    from PIL import Image
    assert cli.main(['report', 'study', '--output', str(study['tmp'] / 'out')]) == 0
    report = study['sweep_dir'] / 'report'
    # what each plot draws, read from its pixels: a series per head variant (num_convs 0, 1)
    # in matplotlib's first two cycle colours and no third; the per-class bars; the viridis
    # colour bar's low end (its top is antialiased into its frame)
    cycle = ['#1f77b4', '#ff7f0e', '#2ca02c']
    drawn = {'miou_vs_fraction.png': (cycle[:2], cycle[2:]),
             'miou_vs_cost.png': (cycle[:2], cycle[2:]),
             'per_class_iou_best.png': (['#1f77b4'], cycle[1:]),
             'parallel_coordinates.png': (['#440154'], [])}
    for name, (present, absent) in drawn.items():
        img = np.asarray(Image.open(report / name).convert('RGB'))
        colours = {'#%02x%02x%02x' % tuple(c) for c in np.unique(img.reshape(-1, 3), axis=0)}
        assert [c for c in present if c not in colours] == [], name
        assert [c for c in absent if c in colours] == [], name
    text = (report / 'report.md').read_text()
    assert '![curve](miou_vs_fraction.png)' in text and text.count('\n| ') >= TRIALS
    assert '![cost](miou_vs_cost.png)' in text and 'against worker-hours per completed trial' in text
    # the published points, beside the variant they belong to (num_convs=0), in [0, 1] units
    section = text.split('Published reference (paper)')[1].split('## ')[0]
    rows = re.findall(r'^\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)\s*\|.*\|\s*num_convs=(\d)\s*\|$',
                      section, re.M)
    assert sorted((float(f), float(p), c) for f, p, _, c in rows) == [(0.5, 0.4, '0'),
                                                                     (1.0, 0.55, '0')]
    attached = _rest(study['uri'], f'artifacts/list?run_id={parent_id}&path=report')['files']
    assert {Path(f['path']).name for f in attached} >= {
        'report.md', 'miou_vs_fraction.png', 'miou_vs_fraction.csv', 'parallel_coordinates.png',
        'per_class_iou_best.png'}


def test_the_curve_is_what_mlflow_holds(study, parent_id):
    if not (study['sweep_dir'] / 'report' / 'miou_vs_fraction.csv').is_file():
        assert cli.main(['report', str(study['sweep_dir'])]) == 0
    with open(study['sweep_dir'] / 'report' / 'miou_vs_fraction.csv') as f:
        table = {(r['variant'], float(r['fraction'])): r for r in csv.DictReader(f)}
    expected = {}
    for run in _children(study['uri'], study['exp_id'], parent_id):
        p = _params(run)
        key = (f'num_convs={p[NUM_CONVS]}', float(p[FRACTION]))
        expected.setdefault(key, []).append(_metrics(run)['mIoU'])
    assert set(table) == set(expected) and len(table) == 4
    for key, values in expected.items():  # mean and spread over the two subsets
        assert int(table[key]['n']) == len(values) == 2
        assert float(table[key]['mean']) == pytest.approx(np.mean(values), abs=1e-9)
        assert float(table[key]['std']) == pytest.approx(np.std(values), abs=1e-9)


def test_best_config_loads_in_mmcv_and_builds_our_head(study, parent_id, tmp_path):
    from mmcv import Config
    from mmseg.datasets import build_dataset
    from mmseg.models import build_segmentor
    out = tmp_path / 'best.py'
    assert cli.main(['best', str(study['sweep_dir']), '--out', str(out)]) == 0
    ranked = _children(study['uri'], study['exp_id'], parent_id, order_by=['metrics.mIoU DESC'])
    best = ranked[0]
    cfg = Config.fromfile(str(out))  # custom_imports registers mmseg_custom on load
    model = build_segmentor(cfg.model)
    assert type(model.decode_head).__module__ == 'mmseg_custom.models.decode_heads.fcn_head'
    assert cfg.model.decode_head.num_convs == int(_params(best)[NUM_CONVS])
    assert cfg.runner.max_iters == int(_params(best)['runner.max_iters'])
    trial = best['data']['tags']
    trial_id = next(t['value'] for t in trial if t['key'] == 'trial_id')
    # mmseg's tools/train.py builds the training set the file names: the trial's images, from
    # the same directory by the same rule (FewShotSubset), in the same order
    dataset = build_dataset(cfg.data.train)
    kept = [info['filename'][:-len('.jpg')] for info in dataset.img_infos]
    record = study['sweep_dir'] / 'trials' / trial_id / 'fewshot_subset.txt'
    assert kept == record.read_text().split()
    assert len(kept) == round(float(_params(best)[FRACTION]) * 48)
    assert 'record' not in cfg.data.train  # the retraining writes nothing into the sweep
    # pinned to those names: a training directory whose images changed is refused
    changed = tmp_path / 'changed'
    shutil.copytree(cfg.data.train.dataset.data_root, changed)
    next((changed / 'images' / 'training').glob('*.jpg')).unlink()
    cfg.data.train.dataset.data_root = str(changed)
    with pytest.raises(ValueError, match='not the ones recorded'):
        build_dataset(cfg.data.train)
    assert 'auto_resume' not in cfg and str(study['sweep_dir']) not in cfg.work_dir


def test_mlflow_rest_filters_by_a_searched_param_and_orders_by_miou(study, parent_id):
    everyone = _children(study['uri'], study['exp_id'], parent_id)
    assert len(everyone) == TRIALS
    columns = {frozenset(_params(r)) for r in everyone}
    assert len(columns) == 1  # every child has the same param columns
    assert {NUM_CONVS, FRACTION, SUBSET_SEED, 'runner.max_iters'} <= set(next(iter(columns)))
    ones = _children(study['uri'], study['exp_id'], parent_id,
                     filter_extra=f"params.`{NUM_CONVS}` = '1'", order_by=['metrics.mIoU DESC'])
    assert len(ones) == TRIALS // 2
    assert all(_params(r)[NUM_CONVS] == '1' for r in ones)
    scores = [_metrics(r)['mIoU'] for r in ones]
    assert scores == sorted(scores, reverse=True)


def test_each_subset_seed_trains_on_its_own_nested_subsets(study, parent_id):
    """The subset seed is a param of every child; at one fraction the two seeds' subsets differ,
    and for one seed the smaller fraction's subset is inside the larger one's."""
    kept = {}
    for run in _children(study['uri'], study['exp_id'], parent_id):
        p = _params(run)
        trial_id = next(t['value'] for t in run['data']['tags'] if t['key'] == 'trial_id')
        names = (study['sweep_dir'] / 'trials' / trial_id / 'fewshot_subset.txt').read_text()
        kept.setdefault((int(p[SUBSET_SEED]), float(p[FRACTION])), set()).add(
            frozenset(names.split()))
    assert sorted(kept) == [(0, 0.5), (0, 1.0), (1, 0.5), (1, 1.0)]
    assert all(len(v) == 1 for v in kept.values())  # num_convs does not change the subset
    half = {seed: next(iter(kept[(seed, 0.5)])) for seed in (0, 1)}
    assert half[0] != half[1] and len(half[0]) == len(half[1]) == 24
    for seed in (0, 1):
        assert half[seed] < next(iter(kept[(seed, 1.0)]))


def test_the_live_view_reads_the_journal_incrementally(tmp_path):
    """A line the driver is still writing is left for the next read, never parsed half."""
    from orchestrator.status import JournalTail
    path = tmp_path / 'mlflow_journal.jsonl'
    path.write_text('{"op": "parent"}\n{"op": "child", "trial_id": "a"}\n{"op": "met')
    tail = JournalTail(str(tmp_path))
    assert [r['op'] for r in tail.read()] == ['parent', 'child']
    with open(path, 'a') as f:
        f.write('rics", "trial_id": "a"}\n')
    assert [r['op'] for r in tail.read()] == ['parent', 'child', 'metrics']
    assert [r['op'] for r in tail.read()] == ['parent', 'child', 'metrics']  # nothing new


def test_the_report_says_which_searched_value_matters(study, parent_id, capsys):
    """Parameter importance (Optuna's fANOVA over the finished trials): per scope, the searched
    values that vary, the subset seed not among them (its part is the noise floor); per
    fraction, the fraction itself is not a factor."""
    text = (study['sweep_dir'] / 'report' / 'report.md').read_text()
    section = text.split('## Which searched value matters')[1].split('\n## ')[0]
    rows = re.findall(r'^\|\s*([\w .]+?)\s*\|\s*([\w.]+)\s*\|\s*([\d.]+)\s*\|$', section, re.M)
    scopes = {}
    for scope, key, value in rows:
        scopes.setdefault(scope, {})[key] = float(value)
    assert set(scopes) == {'all trials', 'fraction 0.5', 'fraction 1'}
    # the subset seed is noise, not a factor: its part is the noise floor, computed here from
    # MLflow's values (the spread between the two subsets of each configuration)
    assert set(scopes['all trials']) == {NUM_CONVS, FRACTION}
    for scope, shares in scopes.items():
        assert SUBSET_SEED not in shares and (scope == 'all trials' or FRACTION not in shares)
    values = {}
    for run in _children(study['uri'], study['exp_id'], parent_id):
        p = _params(run)
        values.setdefault((p[NUM_CONVS], p[FRACTION]), []).append(_metrics(run)['mIoU'])
    everything = [v for vs in values.values() for v in vs]
    within = sum((v - np.mean(vs)) ** 2 for vs in values.values() for v in vs)
    floor = float(re.search(r'Noise floor: ([\d.]+) of the mIoU variance', section).group(1))
    assert floor == pytest.approx(within / (len(everything) * np.var(everything)), abs=1e-3)


def test_importance_finds_the_value_the_metric_depends_on():
    from orchestrator.compare import importances
    rng = np.random.default_rng(0)
    rows = [dict(a=int(a), b=bool(b), lr=float(lr), m=0.3 * a + 0.001 * lr)
            for a, b, lr in zip(rng.integers(0, 3, 24), rng.integers(0, 2, 24),
                                rng.uniform(0, 1, 24))]
    found = importances(rows, ['a', 'b', 'lr'], 'm')
    assert list(found)[0] == 'a' and found['a'] > 0.9
    assert importances(rows[:3], ['a', 'b', 'lr'], 'm') == {}  # too few trials to say
