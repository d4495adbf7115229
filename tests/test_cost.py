"""What a run is charged (mmseg_custom/hooks/cost.py), on a clock the test moves: the expected
hours and throughputs are worked out by hand in each test, not by the code's formula."""
from types import SimpleNamespace

import numpy as np
import pytest

from mmseg_custom.hooks.cost import RunCost


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


RUNNER = SimpleNamespace(data_loader=SimpleNamespace(_dataloader=SimpleNamespace(batch_size=2)))


def test_a_solo_run_at_half_a_gpu_is_charged_half_its_gpu_time_and_not_its_evaluation():
    clock = Clock()
    cost = RunCost(gpus_per_rank=0.5, clock=clock)
    cost.start()
    for _ in range(10):  # 10 iterations of batch 2 in 30 s
        clock.t += 3
        cost.step()
    with cost.evaluating():  # then a 20 s evaluation
        clock.t += 20
    cost.tick()
    got = cost.snapshot(RUNNER)
    assert got['cost.train_s'] == pytest.approx(50)
    assert got['cost.worker_hours'] == pytest.approx(50 / 3600)
    assert got['cost.gpu_hours'] == pytest.approx(25 / 3600)  # 0.5 GPU for 50 s
    assert got['cost.img_per_s'] == pytest.approx(20 / 30)  # 20 images in 30 s of training
    cost.end_interval()
    cost.tick()  # nothing trained since: no throughput to report
    assert 'cost.img_per_s' not in cost.snapshot(RUNNER)


def test_a_groups_members_split_each_interval_and_add_up_to_the_group():
    clock = Clock()
    cost = RunCost(gpus_per_rank=1.0, clock=clock)
    cost.start(heads=3)
    for _ in range(10):  # 10 s with all three heads training
        clock.t += 1
        cost.tick([0, 1, 2])
    for _ in range(20):  # ASHA stopped heads 1 and 2: 20 s of head 0 alone
        clock.t += 1
        cost.tick([0])
    hours = [cost.snapshot(RUNNER, head=k)['cost.worker_hours'] * 3600 for k in range(3)]
    assert hours == pytest.approx([10 / 3 + 20, 10 / 3, 10 / 3])
    assert sum(hours) == pytest.approx(30)  # what the group ran, not more


def test_the_peaks_are_those_of_this_run_not_of_the_processs_earlier_ones():
    """A warm worker trains trial after trial: a big earlier trial's peak is not the next's."""
    import resource
    spike = np.ones(400 * 1024 ** 2 // 8)  # 400 MB, touched
    del spike
    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kernel's own
    cost = RunCost(clock=Clock())
    cost.start()
    after_reset = cost.snapshot(RUNNER)['cost.peak_rss_gb'] * 1e9
    assert after_reset < lifetime_peak - 300e6
    again = np.ones(200 * 1024 ** 2 // 8)  # a spike within this run is seen
    assert cost.snapshot(RUNNER)['cost.peak_rss_gb'] * 1e9 >= after_reset + 190e6
    del again
