"""Early stopping at like fidelity (orchestrator/asha.py): a trial competes only with trials of
its own schedule, at the same fractions of its training; the dry run says which with which."""
from pathlib import Path

import yaml
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from orchestrator.asha import SchedulePerBracket


def test_a_long_schedule_is_not_stopped_by_a_short_one_met_at_the_same_iteration():
    """A 400-iteration trial at iteration 200 is half trained; a 1600-iteration trial there is
    at an eighth: one ASHA over both (rungs in absolute iterations) stopped the long one."""
    asha = SchedulePerBracket(full_iters=1600, grace_period=100, reduction_factor=2)
    assert asha.set_search_properties('mIoU', 'max')
    short, long_a, long_b = (Trial('__fake', stub=True) for _ in range(3))
    assert asha.on_trial_result(None, short, {'iter': 200, 'max_iters': 400, 'mIoU': 0.8}) \
        == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, long_a, {'iter': 200, 'max_iters': 1600, 'mIoU': 0.3}) \
        == TrialScheduler.CONTINUE  # its own schedule's first trial at this rung
    # within a schedule ASHA still stops: the second long trial is below the first
    assert asha.on_trial_result(None, long_b, {'iter': 200, 'max_iters': 1600, 'mIoU': 0.1}) \
        == TrialScheduler.STOP
    asha.on_trial_complete(None, short, {'iter': 400, 'max_iters': 400, 'mIoU': 0.8})
    asha.on_trial_remove(None, long_b)
    assert asha.schedule_of == {long_a.trial_id: 1600}


def test_the_dry_run_shows_which_trials_compete_at_which_iterations(tmp_path, capsys):
    from orchestrator import cli
    space = yaml.safe_load(open('search_spaces/demo.yaml'))
    space.pop('generate_data')
    space['data_root'] = 'unused'
    space['parameters']['fewshot.fraction'] = {'grid': [0.25, 1.0]}
    space['derived']['iterations'] = {'at_full_data': 1600, 'min': 10}
    space['early_stopping'] = {'asha': {'grace_period': 100, 'reduction_factor': 2}}
    path = tmp_path / 'search_spaces' / 'asha.yaml'
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(space))
    (tmp_path / 'configs').symlink_to(Path('configs').resolve())  # the base config's path
    assert cli.main(['sweep', str(path), '--dry-run']) == 0
    out = capsys.readouterr().out
    # the dumped file's keys are sorted: the fraction varies slowest, 0.25 in trials 0-3 (400
    # iterations), 1.0 in 4-7 (1600); a grace of 100 of 1600 is 25 of 400; the rung at a
    # schedule's end compares nothing (every trial stops there)
    assert '  400 iterations: trials 0-3 compete at iterations 25, 50, 100, 200\n' in out
    assert '  1600 iterations: trials 4-7 compete at iterations 100, 200, 400, 800\n' in out
