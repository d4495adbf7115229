"""Bad search spaces: one line naming file, key and value; exit code 2; nothing started."""
import pytest
import yaml

from orchestrator import cli

ROOT_CONFIG = 'configs/tiny_fcn_synthetic.py'
ROOT = __import__('pathlib').Path(__file__).resolve().parents[1]


@pytest.fixture
def space(tmp_path, synthetic_root):
    """Write a search space (a dict, or raw text) next to a fresh output dir; return its path."""
    from pathlib import Path
    good = dict(
        name='t', base_config=str(Path(ROOT_CONFIG).resolve()), data_root=str(synthetic_root),
        parameters={'model.decode_head.num_convs': {'grid': [0, 1]},
                    'fewshot.fraction': {'grid': [0.5, 1.0]}},
        resources={'workers_per_trial': 1}, output=str(tmp_path / 'out'))

    def write(mutate=None, text=None):
        path = tmp_path / 'space.yaml'
        if text is None:
            doc = yaml.safe_load(yaml.safe_dump(good))
            if mutate:
                mutate(doc)
            text = yaml.safe_dump(doc)
        path.write_text(text)
        return path
    return write


def run(path, capsys, *extra):
    code = cli.main(['sweep', str(path), *extra])
    err = capsys.readouterr().err.strip()
    return code, err


def _set(path, value):
    def mutate(doc):
        node = doc
        keys = path.split('/')
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return mutate


def _delete(path):
    def mutate(doc):
        node = doc
        keys = path.split('/')
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return mutate


CASES = [
    # (id, mutate, raw text, substrings the message must name)
    ('unknown top key', _set('paramters', {}), None, ['paramters', 'unknown key']),
    ('unknown resources key', _set('resources/gpus', 1), None, ['resources.gpus']),
    ('workers not int', _set('resources/workers_per_trial', 'two'), None,
     ['resources.workers_per_trial', "'two'"]),
    ('negative cpus', _set('resources/cpus_per_worker', -1), None, ['resources.cpus_per_worker', '-1']),
    ('empty grid', _set('parameters/model.decode_head.num_convs', {'grid': []}), None,
     ['parameters.model.decode_head.num_convs.grid', '[]']),
    ('two distributions', _set('parameters/model.decode_head.num_convs',
                               {'grid': [1], 'choice': [2]}), None, ['model.decode_head.num_convs']),
    ('unknown distribution', _set('parameters/model.decode_head.num_convs', {'normal': [0, 1]}),
     None, ['model.decode_head.num_convs', 'normal']),
    ('fraction zero', _set('parameters/fewshot.fraction', {'grid': [0, 0.5]}), None,
     ['fewshot.fraction', '0', '(0, 1]']),
    ('fraction above one', _set('parameters/fewshot.fraction', {'grid': [1.5]}), None,
     ['fewshot.fraction', '1.5']),
    ('fraction negative', _set('parameters/fewshot.fraction', {'choice': [-0.25]}), None,
     ['fewshot.fraction', '-0.25']),
    ('missing base config', _set('base_config', '/nonexistent/cfg.py'), None,
     ['base_config', '/nonexistent/cfg.py', 'not found']),
    ('path not in base config', _set('parameters/model.decode_head.num_conv', {'grid': [1]}),
     None, ['parameters.model.decode_head.num_conv', 'not a key of the base config']),
    ('wrong value type', _set('parameters/model.decode_head.with_norm', {'grid': ['yes']}), None,
     ['model.decode_head.with_norm', "'yes'", 'bool']),
    ('float for int key', _set('parameters/model.decode_head.num_convs', {'grid': [1.5]}), None,
     ['model.decode_head.num_convs', '1.5', 'int']),
    ('uniform on int key', _set('parameters/model.decode_head.num_convs', {'uniform': [0, 2]}),
     None, ['model.decode_head.num_convs', 'uniform']),
    ('loguniform low zero', _set('parameters/optimizer.lr', {'loguniform': [0, 0.1]}), None,
     ['optimizer.lr', 'low > 0']),
    ('bounds reversed', _set('parameters/optimizer.lr', {'uniform': [0.1, 0.01]}), None,
     ['optimizer.lr', 'low < high']),
    ('grid cannot sample', _set('parameters/optimizer.lr', {'uniform': [0.001, 0.01]}), None,
     ['search.algorithm', 'optimizer.lr', 'random']),
    ('unknown algorithm', _set('search', {'algorithm': 'bayes'}), None, ['search.algorithm', 'bayes']),
    ('linear probe channels', lambda d: (d['parameters'].update(
        {'model.decode_head.channels': {'grid': [8]}}),
        d.setdefault('derived', {}).update(channels_follow_in_channels=False)), None,
     ['num_convs', 'channels=8', 'in_channels=32']),
    ('negative num_convs', _set('parameters/model.decode_head.num_convs', {'grid': [-1]}), None,
     ['model.decode_head.num_convs', '-1']),
    ('missing parameters', _delete('parameters'), None, ['parameters', 'required']),
    ('bad repeats', _set('repeats', 0), None, ['repeats', '0']),
    ('bad asha', _set('early_stopping', {'asha': {'reduction_factor': 1}}), None,
     ['early_stopping.asha.reduction_factor', '1']),
    ('gpus above one not whole', _set('resources/gpus_per_worker', 1.5), None,
     ['resources.gpus_per_worker', '1.5', 'fraction']),
    ('two gpus per worker', _set('resources/gpus_per_worker', 2), None,
     ['resources.gpus_per_worker', '2', 'raise workers_per_trial']),
    ('shared GPU, two ranks', lambda d: d['resources'].update(workers_per_trial=2,
                                                              gpus_per_worker=0.5), None,
     ['resources.gpus_per_worker', '0.5', 'workers_per_trial: 1']),
    ('output is a URI', _set('output', 's3://bucket/runs'), None, ['output', 's3://bucket/runs']),
    ('bad grouping memory', _set('grouping', {'memory_gb': 0}), None,
     ['grouping.memory_gb', '0']),
    ('grouping not bool', _set('grouping', {'enabled': 'yes'}), None, ['grouping.enabled', "'yes'"]),
    ('bad worker retries', _set('fault_tolerance', {'worker_retries': -1}), None,
     ['fault_tolerance.worker_retries', '-1']),
    ('yaml syntax', None, 'name: t\nparameters: {a: [1, 2}\n', ['space.yaml', 'invalid YAML', 'line']),
    ('not a mapping', None, '- just\n- a list\n', ['space.yaml', 'mapping']),
    ('unsafe python tag', None, "name: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
     ['space.yaml', 'invalid YAML']),
    ('bad warmup ratio', _set('derived', {'warmup': {'ratio': 2}}), None,
     ['derived.warmup.ratio', '2']),
    ('warmup without ratio', _set('derived', {'warmup': {'max': 100}}), None,
     ['derived.warmup.ratio', 'required']),
    ('subset seeds not distinct', _set('fewshot', {'seeds': [0, 0]}), None,
     ['fewshot.seeds', '[0, 0]']),
    ('optuna repeats', lambda d: d.update(
        parameters={'model.decode_head.num_convs': {'choice': [0, 1]}}, repeats=2,
        search={'algorithm': 'optuna'}), None, ['repeats', '2', 'Optuna']),
    ('subset seed and seeds', _set('fewshot', {'seed': 1, 'seeds': [0, 1]}), None,
     ['fewshot.seeds', 'not both']),
    ('subset seeds with optuna', lambda d: d.update(
        fewshot={'seeds': [0, 1]}, search={'algorithm': 'optuna'},
        parameters={'model.decode_head.num_convs': {'choice': [0, 1]}}), None,
     ['fewshot.seeds', '[0, 1]', 'Optuna']),
    ('override of an unknown key', _set('overrides', {'model.backbone.pretrainde': 'x.pth'}), None,
     ['overrides.model.backbone.pretrainde', "'x.pth'", 'not a key']),
    ('override of the wrong type', _set('overrides', {'model.decode_head.num_convs': 'two'}), None,
     ['overrides.model.decode_head.num_convs', "'two'", 'int']),
    ('reference on an unsearched key', _set('references', {
        'where': {'model.decode_head.with_norm': True}, 'points': {1.0: 50}}), None,
     ['references.where.model.decode_head.with_norm', 'not a searched key']),
    ('reference fraction out of range', _set('references', {'points': {2: 50}}), None,
     ['references.points', '{2: 50}']),
    ('master weights on a frozen backbone', lambda d: d.update(
        base_config=str(ROOT / 'configs' / 'tiny_vit_frozen_fcn_synthetic.py'),
        fine_tuning={'float32_master_weights': True}), None,
     ['fine_tuning.float32_master_weights', 'True', 'frozen in every trial']),
    ('missing backbone weights', lambda d: d.update(
        base_config=str(ROOT / 'configs' / 'tiny_vit_frozen_fcn_synthetic.py'),
        overrides={'model.backbone.pretrained': '/nonexistent/intern_vit_6b_224px.pth'}), None,
     ['model.backbone.pretrained', 'file not found', '/nonexistent/intern_vit_6b_224px.pth']),
]


@pytest.mark.parametrize('case_id,mutate,text,needles', CASES, ids=[c[0] for c in CASES])
def test_bad_space_is_one_clear_line_exit_2_nothing_started(case_id, mutate, text, needles, space,
                                                           tmp_path, capsys):
    import ray
    path = space(mutate, text)
    code, err = run(path, capsys)
    assert code == 2, err
    assert err.count('\n') == 0, err
    assert err.startswith('error: ') and str(path) in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / 'out').exists()  # no output dir, so no MLflow store either
    assert not ray.is_initialized()


def test_missing_data_root_fails_before_any_work(space, tmp_path, capsys):
    code, err = run(space(_set('data_root', str(tmp_path / 'nodata'))), capsys)
    assert code == 2 and 'data.train.img_dir' in err and str(tmp_path / 'nodata') in err
    assert not (tmp_path / 'out').exists()


def test_more_workers_than_the_machine_has_fails_fast(space, tmp_path, capsys):
    import os
    too_many = (os.cpu_count() or 1) + 1
    code, err = run(space(_set('resources/workers_per_trial', too_many)), capsys)
    assert code == 2 and 'could never be scheduled' in err and f'{too_many} workers' in err
    assert not (tmp_path / 'out').exists()


def test_resume_without_a_sweep_to_resume_fails_fast(space, tmp_path, capsys):
    code, err = run(space(), capsys, '--resume')
    assert code == 2 and err.count('\n') == 0 and '--resume: no sweep to resume' in err
    assert not (tmp_path / 'out').exists()


def test_resume_with_a_changed_space_file_fails_fast(space, tmp_path, capsys):
    path = space()
    sweep = tmp_path / 'out' / 't'
    (sweep / 'tune' / 't').mkdir(parents=True)
    (sweep / 'tune' / 't' / 'tuner.pkl').write_bytes(b'state of an earlier run')
    (sweep / 'space.yaml').write_text(path.read_text().replace('0.5', '0.25'))
    code, err = run(path, capsys, '--resume')
    assert code == 2 and 'differs from the one the sweep started with' in err
    assert sorted(p.name for p in sweep.iterdir()) == ['space.yaml', 'tune']  # nothing added


def test_resume_of_a_sweep_an_earlier_program_started_fails_fast(space, tmp_path, capsys):
    """Its Tune state pickles functions this program no longer has (its plan.json has no
    version): one line, before anything starts, rather than a crash in Tune's restore."""
    path = space()
    sweep = tmp_path / 'out' / 't'
    (sweep / 'tune' / 't').mkdir(parents=True)
    (sweep / 'tune' / 't' / 'tuner.pkl').write_bytes(b'state of an earlier run')
    (sweep / 'space.yaml').write_text(path.read_text())
    (sweep / 'plan.json').write_text('{"total_trials": 4, "concurrent": 1, "metric": "mIoU"}')
    code, err = run(path, capsys, '--resume')
    assert code == 2 and err.count('\n') == 0, err
    assert 'started by an orchestrator before the SweepPlan' in err and str(sweep) in err
    assert sorted(p.name for p in sweep.iterdir()) == ['plan.json', 'space.yaml', 'tune']


def test_good_space_dry_run_prints_plan(space, capsys):
    code = cli.main(['sweep', str(space()), '--dry-run'])
    out = capsys.readouterr().out
    assert code == 0
    assert '4 trials' in out and 'runner.max_iters' in out


def _plan_rows(out, header_key):
    lines = [line for line in out.splitlines() if line.startswith('| ')]
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert header_key in header, header
    return [dict(zip(header, (c.strip() for c in line.strip('|').split('|'))))
            for line in lines[1:]]


def test_fewshot_space_dry_run_prints_internvls_protocol(capsys):
    """The shipped InternVL few-shot study plans everywhere, data or checkpoint or not: InternVL's
    five configs' iterations and warmup, derived from the fraction, on a fine-tuned backbone."""
    code = cli.main(['sweep', 'search_spaces/fewshot.yaml', '--dry-run'])
    out = capsys.readouterr().out
    assert code == 0
    assert '60 trials' in out and '8 GPU per trial' in out
    assert 'trial groups: none: the backbone is not frozen' in out  # fine-tuned
    assert 'validation features: not cached (the backbone trains)' in out
    assert 'no float32 master weights (InternVL\'s protocol' in out
    rows = _plan_rows(out, 'lr_config.warmup_iters')
    assert len(rows) == 60
    schedule = {(r['fewshot.fraction'], r['runner.max_iters'], r['lr_config.warmup_iters'])
                for r in rows}
    assert schedule == {('0.0625', '5000', '100'), ('0.125', '10000', '200'),
                        ('0.25', '20000', '400'), ('0.5', '40000', '800'),
                        ('1', '80000', '1500')}
    assert {r['model.decode_head.channels'] for r in rows if r['model.decode_head.num_convs'] ==
            '0'} == {'3200'}


def test_dry_run_estimates_gpu_hours_from_seconds_per_iteration(capsys):
    code = cli.main(['sweep', 'search_spaces/fewshot.yaml', '--dry-run',
                     '--seconds-per-iteration', '0.5'])
    out = capsys.readouterr().out
    # 5k + 10k + 20k + 40k + 80k iterations x 12 heads = 1.86 M iterations of 8-GPU trials
    assert code == 0 and 'estimate at 0.5 s per iteration: 258.3 trial-hours' in out
    assert '= 2,066.7 GPU-hours (every trial alone)' in out
    assert 'estimate with trial groups' not in out  # fine-tuned: no groups


def test_the_dry_run_estimate_counts_trial_groups(capsys):
    """linear_probe.yaml planned for H200s: 15 groups of 12 heads. Each subset seed trains
    5k + 10k + 20k + 40k + 80k = 155k iterations per head, 465k over the 3 seeds: alone, the
    12 heads' 5.58 M iterations x 0.5 s = 775 trial-hours, x 8 GPUs = 6,200 GPU-hours; as
    groups, 465k group iterations x (0.4 s + 12 x 0.1 s) = 206.7 trial-hours = 1,653.3."""
    code = cli.main(['sweep', 'search_spaces/linear_probe.yaml', '--dry-run',
                     '--seconds-per-iteration', '0.5', '--backbone-seconds', '0.4',
                     '--gpu-memory-gib', '140.4'])
    out = capsys.readouterr().out
    assert code == 0 and 'in 15 group(s)' in out
    assert 'estimate at 0.5 s per iteration: 775.0 trial-hours = 6,200.0 GPU-hours' in out
    assert 'estimate with trial groups: 206.7 trial-hours = 1,653.3 GPU-hours' in out
    code = cli.main(['sweep', 'search_spaces/linear_probe.yaml', '--dry-run',
                     '--seconds-per-iteration', '0.5', '--backbone-seconds', '0.7',
                     '--gpu-memory-gib', '140.4'])
    err = capsys.readouterr().err
    assert code == 2 and '--backbone-seconds 0.7: must be within 0 and' in err


def test_linear_probe_space_dry_run_plans_subsets_and_trial_groups(capsys):
    code = cli.main(['sweep', 'search_spaces/linear_probe.yaml', '--dry-run'])
    out = capsys.readouterr().out
    assert code == 0 and '180 trials' in out
    rows = _plan_rows(out, 'fewshot.seed')
    assert {r['fewshot.seed'] for r in rows} == {'0', '1', '2'}
    assert {(r['fewshot.fraction'], r['lr_config.warmup_iters']) for r in rows} >= {
        ('0.0625', '100'), ('1', '1500')}
    # no GPU here to ask: 8 GiB for heads cannot hold two of its largest heads (369 M params,
    # fp32 AdamW: 5.9 GB each); the dry run says what 80 GB and 141 GB GPUs hold
    # (tests/test_trial_groups.py works the numbers)
    assert 'trial groups: none: one head at most fits the memory for heads' in out
    assert 'no GPU memory known here' in out
    assert '10 on an 80 GB GPU (A100/H100), 12 on a 141 GB H200' in out
    # InternViT-6B's block 44 for one 504 px crop: 3200 channels x 36 x 36 patches in float32
    # is 16,588,800 bytes; 16 GB (memory_gb's default) hold 964 of them
    line = next(x for x in out.splitlines() if x.startswith('validation features'))
    assert '16.6 MB per validation input' in line and 'so 964 in /dev/shm/' in line


def test_study_configs_have_internvls_settings():
    from mmcv import Config
    probe = Config.fromfile(str(ROOT / 'configs' / 'vit6b_fcn_linear_probe_ade20k_504.py'))
    fewshot = Config.fromfile(str(ROOT / 'configs' / 'vit6b_fcn_fewshot_ade20k_504.py'))
    assert probe.model.backbone.freeze_vit and probe.model.backbone.out_indices == [44]
    assert probe.optimizer.weight_decay == 0.0
    assert probe.optimizer.paramwise_cfg.layer_decay_rate == 1.0
    backbone = fewshot.model.backbone
    assert not backbone.freeze_vit and backbone.out_indices == [47]
    assert backbone.drop_path_rate == 0.4 and fewshot.optimizer.weight_decay == 0.05
    assert fewshot.optimizer.paramwise_cfg.layer_decay_rate == 0.95
