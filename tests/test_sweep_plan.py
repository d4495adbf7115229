"""The SweepPlan (sweep_plan.py) and the one config builder (trial_config.py): a Tune trial finds
its planned row, values Tune draws are resolved by the space file's rules, and the config a
worker trains keeps the trial's few-shot subset."""
from pathlib import Path

import pytest

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _plan(tmp_path, synthetic_root, **extra):
    from orchestrator.spec import load_spec
    from orchestrator.sweep_plan import make_plan
    space = dict(name='p', base_config=str(ROOT / 'configs' / 'tiny_fcn_synthetic.py'),
                 data_root=str(synthetic_root),
                 parameters={'model.decode_head.num_convs': {'grid': [0, 1]},
                             'fewshot.fraction': {'choice': [0.25, 0.5]}},
                 derived={'iterations': {'at_full_data': 40}}, search={'algorithm': 'random'},
                 **extra)
    (tmp_path / 'space.yaml').write_text(yaml.safe_dump(space))
    spec, base_cfg = load_spec(tmp_path / 'space.yaml')
    return make_plan(spec, base_cfg)


def test_a_trial_finds_its_row_and_what_tune_drew_is_resolved(tmp_path, synthetic_root):
    """Row 1 (num_convs 1) with fraction 0.25 drawn: 10 iterations (ceil(40 x 0.25)); the
    planned row itself counted the fraction as the base config's (all data: 40)."""
    plan = _plan(tmp_path, synthetic_root)
    assert [t.values for t in plan.trials] == [{'model.decode_head.num_convs': 0},
                                               {'model.decode_head.num_convs': 1}]
    assert plan.trials[1].iterations == 40
    trial = plan.trial_for({'plan': {'index': 1, 'model.decode_head.num_convs': 1},
                            'fewshot.fraction': 0.25})
    assert trial.index == 1 and trial.values == {'model.decode_head.num_convs': 1,
                                                 'fewshot.fraction': 0.25}
    assert trial.iterations == 10
    assert trial.overrides['model.decode_head.num_convs'] == 1
    assert trial.derived['fewshot.fraction'] == 0.25


def test_a_row_from_another_order_is_resolved_from_its_values(tmp_path, synthetic_root):
    """A resumed sweep whose plan lists the trials in another order: the row's values win."""
    plan = _plan(tmp_path, synthetic_root)
    trial = plan.trial_for({'plan': {'index': 0, 'model.decode_head.num_convs': 1},
                            'fewshot.fraction': 0.5})
    assert trial.index is None and trial.overrides['model.decode_head.num_convs'] == 1
    assert trial.iterations == 20


def test_a_config_with_keys_the_plan_does_not_search_is_refused(tmp_path, synthetic_root):
    """An earlier program's Tune state nested its values ({'head': ..., 'shared': ...}): taken
    as overrides they would silently train the base values."""
    from orchestrator.errors import ConfigError
    plan = _plan(tmp_path, synthetic_root)
    with pytest.raises(ConfigError, match=r"holds \['head', 'shared'\], not searched keys"):
        plan.trial_for({'head': {'model.decode_head.num_convs': 1},
                        'shared': {'fewshot.fraction': 0.5}})


def test_random_search_gets_the_rows_and_optuna_the_distributions_alone(tmp_path,
                                                                       synthetic_root):
    plan = _plan(tmp_path, synthetic_root)
    assert set(plan.param_space()) == {'plan', 'fewshot.fraction'} and plan.tune_samples == 1
    from orchestrator.spec import load_spec
    from orchestrator.sweep_plan import make_plan
    doc = yaml.safe_load((tmp_path / 'space.yaml').read_text())
    doc['parameters']['model.decode_head.num_convs'] = {'choice': [0, 1]}
    doc['search'] = {'algorithm': 'optuna', 'num_samples': 3}
    (tmp_path / 'space.yaml').write_text(yaml.safe_dump(doc))
    plan = make_plan(*load_spec(tmp_path / 'space.yaml'))
    assert set(plan.param_space()) == {'model.decode_head.num_convs', 'fewshot.fraction'}
    assert plan.tune_samples == 3 and len(plan.trials) == 3
    trial = plan.trial_for({'model.decode_head.num_convs': 1, 'fewshot.fraction': 0.5})
    assert trial.index is None and trial.iterations == 20


def test_the_config_a_worker_trains_keeps_the_trials_subset(tmp_path, synthetic_root):
    """trial_config: the trial's overrides, its work dir with auto_resume, and the training set
    of round(0.25 x 48) images that mmseg builds from it; the kept names recorded in the trial's
    directory; a trial group's config records them in every member's."""
    from mmseg.datasets import build_dataset

    from orchestrator.trial_config import group_config, trial_config
    plan = _plan(tmp_path, synthetic_root)
    trials = [plan.trial_for({'plan': {'index': i, 'model.decode_head.num_convs': i},
                              'fewshot.fraction': 0.25}) for i in (0, 1)]
    dirs = [tmp_path / 't0', tmp_path / 't1']
    cfgs = [trial_config(plan.base, plan.base_filename, t, str(d)) for t, d in zip(trials, dirs)]
    assert cfgs[1].model.decode_head.num_convs == 1 and cfgs[1].runner.max_iters == 10
    assert cfgs[1].work_dir == str(dirs[1] / 'mmseg') and cfgs[1].auto_resume is True
    for d in dirs:
        d.mkdir()
    dataset = build_dataset(cfgs[0].data.train)
    kept = [i['filename'][:-len('.jpg')] for i in dataset.dataset.img_infos]
    assert len(dataset) == round(0.25 * 48)
    assert (dirs[0] / 'fewshot_subset.txt').read_text().split() == kept
    (dirs[0] / 'fewshot_subset.txt').unlink()
    gcfg = group_config(cfgs, str(tmp_path / 'group'))
    assert [h.num_convs for h in gcfg.model.decode_heads] == [0, 1]
    build_dataset(gcfg.data.train)
    assert [(d / 'fewshot_subset.txt').read_text().split() for d in dirs] == [kept, kept]


def test_master_weights_with_a_sampled_freeze_are_not_refused(tmp_path, synthetic_root):
    """freeze_vit drawn per trial: some trials train the backbone, so float32 master weights
    are not a misread setting (a distribution counts as either value, not as the base's)."""
    from orchestrator.errors import ConfigError
    from orchestrator.spec import load_spec
    from orchestrator.sweep_plan import make_plan
    config = ROOT / 'configs' / 'tiny_vit_frozen_fcn_synthetic.py'
    space = dict(name='m', base_config=str(config), data_root=str(synthetic_root),
                 parameters={'model.backbone.freeze_vit': {'choice': [True, False]}},
                 search={'algorithm': 'random'}, fine_tuning={'float32_master_weights': True})
    (tmp_path / 'space.yaml').write_text(yaml.safe_dump(space))
    assert len(make_plan(*load_spec(tmp_path / 'space.yaml')).trials) == 1
    space['parameters'] = {'model.decode_head.num_convs': {'choice': [0, 1]}}
    (tmp_path / 'space.yaml').write_text(yaml.safe_dump(space))
    with pytest.raises(ConfigError, match='frozen in every trial'):
        make_plan(*load_spec(tmp_path / 'space.yaml'))
