"""Early stopping that compares like with like: one ASHA bracket per training schedule.

With iterations derived from the data fraction (``derived.iterations``) a 1/16 trial trains 5k
iterations and a 1/1 trial 80k. One ASHA over both would meet them at the same absolute
iterations (a 1/16 trial at the end of its training against a 1/1 trial at 6 % of its own) and
stop trials for having less data, which is what a few-shot study measures. So trials compete
only with trials of the same schedule (their planned iterations, which every evaluation
reports as ``max_iters``): each schedule gets its own Tune ``AsyncHyperBandScheduler``, its grace
period scaled to its length, so every trial meets its rungs at the same fractions of its own
training. ``grace_period`` in the space file counts iterations of the full-data schedule.
"""
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

TIME_ATTR = 'iter'  # the mmseg iteration every evaluation reports
SCHEDULE_ATTR = 'max_iters'  # the trial's planned iterations, in every evaluation


def grace_for(grace_period, iters, full_iters):
    """The grace period of a schedule of ``iters`` iterations: the same fraction of it as
    ``grace_period`` is of the full-data schedule (at least 1, at most the schedule)."""
    return max(1, min(iters, round(grace_period * iters / max(1, full_iters))))


def bracket(iters, full_iters, grace_period, reduction_factor, metric=None, mode=None):
    """Tune's ASHA for the trials of one schedule."""
    return AsyncHyperBandScheduler(
        time_attr=TIME_ATTR, metric=metric, mode=mode, max_t=iters,
        grace_period=grace_for(grace_period, iters, full_iters),
        reduction_factor=reduction_factor)


def rungs(iters, full_iters, grace_period, reduction_factor):
    """The iterations at which a schedule's trials are compared, as Tune's ASHA places them
    (read from the scheduler itself, so the dry run shows what the sweep will do; a rung at
    the schedule's end compares nothing: every trial stops there)."""
    asha = bracket(iters, full_iters, grace_period, reduction_factor, 'm', 'max')
    return sorted(int(milestone) for milestone, _ in asha._brackets[0]._rungs
                  if milestone < iters)


class SchedulePerBracket(FIFOScheduler):
    """Tune scheduler: routes each trial's results to the ASHA of its schedule (created when
    the schedule's first result arrives); trials are started in Tune's order (FIFO)."""

    def __init__(self, full_iters, grace_period=1, reduction_factor=2):
        super().__init__()
        self.full_iters, self.grace, self.rf = full_iters, grace_period, reduction_factor
        self._metric = self._mode = None  # FIFOScheduler's: Tune sets them (TuneConfig)
        self.brackets = {}  # planned iterations -> that schedule's ASHA
        self.schedule_of = {}  # trial id -> its planned iterations

    def set_search_properties(self, metric, mode, **spec):
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def _bracket_of(self, controller, trial, result):
        if trial.trial_id not in self.schedule_of:
            if SCHEDULE_ATTR not in result:
                return None
            iters = int(result[SCHEDULE_ATTR])
            if iters not in self.brackets:
                self.brackets[iters] = bracket(iters, self.full_iters, self.grace, self.rf,
                                               self._metric, self._mode)
            self.brackets[iters].on_trial_add(controller, trial)
            self.schedule_of[trial.trial_id] = iters
        return self.brackets[self.schedule_of[trial.trial_id]]

    def on_trial_result(self, tune_controller, trial, result):
        asha = self._bracket_of(tune_controller, trial, result)
        if asha is None:  # a result without its schedule (an old history replayed)
            return TrialScheduler.CONTINUE
        return asha.on_trial_result(tune_controller, trial, result)

    def _leave(self, trial):
        iters = self.schedule_of.pop(trial.trial_id, None)
        return None if iters is None else self.brackets[iters]

    def on_trial_complete(self, tune_controller, trial, result):
        asha = self._leave(trial)
        if asha is not None:
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial):
        asha = self._leave(trial)
        if asha is not None:
            asha.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial):
        self.on_trial_remove(tune_controller, trial)

    def debug_string(self):
        return 'ASHA per schedule: ' + '; '.join(
            f'{iters} iterations: {asha.debug_string()}'
            for iters, asha in sorted(self.brackets.items()))


def _spans(indices):
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    spans, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            spans.append(f'{start}-{n}' if n > start else f'{n}')
            start = None
    return ', '.join(spans)


def dry_run_lines(spec, schedules, full_iters):
    """Which trials compete with which: per schedule (``schedules``: each grid trial's planned
    iterations, in the dry run's order), its trials and the iterations of its rungs."""
    if not spec.early_stopping:
        return []
    asha = spec.early_stopping.asha
    grace, rf = asha.grace_period, asha.reduction_factor
    by_schedule = {}
    for i, iters in enumerate(schedules):
        by_schedule.setdefault(iters, []).append(i)
    lines = [f'early stopping: ASHA per schedule, trials compete only with trials of the same '
             f'schedule (grace_period {grace} of the full-data {full_iters} iterations, scaled '
             f'to each schedule; reduction_factor {rf}):']
    for iters, trials in sorted(by_schedule.items()):
        at = rungs(iters, full_iters, grace, rf)
        lines.append(f'  {iters} iterations: trials {_spans(trials)} compete at iterations '
                     f'{", ".join(map(str, at)) or "(none: too short to stop early)"}')
    return lines
