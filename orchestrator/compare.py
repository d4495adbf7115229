"""Reading a sweep further: which searched value matters (parameter importance), and what changed
between two sweeps (same configurations side by side).

Importance is Optuna's fANOVA evaluator over the finished trials, told to an in-memory study
(whatever algorithm ran the sweep): the share of the metric's variance each searched value
explains, summing to 1. Where fractions are searched it is also computed per fraction, since
what matters with 1/16 of the data need not be what matters with all of it. Repeats and subset
seeds are noise, not factors: their part is the noise floor (``noise_share``).

Only trials that completed their schedule are read: a trial the scheduler stopped early has a
metric of fewer iterations.
"""
from orchestrator.keys import FRACTION_KEY as FRACTION
from orchestrator.keys import NOISE_KEYS
from orchestrator.results import SweepResults

MIN_TRIALS = 4  # fewer finished trials explain nothing


def _distribution(values):
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric and len(set(values)) > 3:  # a range that was sampled
        return FloatDistribution(min(values), max(values))
    return CategoricalDistribution(sorted(set(values), key=str))


def importances(rows, keys, metric):
    """{key: importance} over ``rows`` (dicts holding ``keys`` and ``metric``), highest first;
    {} when fewer than MIN_TRIALS rows or no key takes two values."""
    rows = [r for r in rows if all(k in r for k in keys)]
    keys = [k for k in keys if len({str(r[k]) for r in rows}) > 1]
    if len(rows) < MIN_TRIALS or not keys:
        return {}
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = {k: _distribution([r[k] for r in rows]) for k in keys}
    study = optuna.create_study()
    for r in rows:
        study.add_trial(optuna.trial.create_trial(
            params={k: r[k] for k in keys}, distributions=distributions, value=float(r[metric])))
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    return {k: float(v) for k, v in found.items()}


def noise_share(rows, keys, metric):
    """The part of the metric's variance that lies between trials of one configuration (the
    same ``keys``, other noise keys apart): the within-configuration sum of squares over the
    total. None when no configuration ran twice or the metric does not vary."""
    import numpy as np
    by_config = {}
    for r in rows:
        by_config.setdefault(tuple(str(r.get(k)) for k in keys), []).append(float(r[metric]))
    values = np.asarray([v for vs in by_config.values() for v in vs])
    total = float(((values - values.mean()) ** 2).sum()) if len(values) else 0.0
    if total == 0.0 or all(len(vs) < 2 for vs in by_config.values()):
        return None
    within = sum(float(((np.asarray(vs) - np.mean(vs)) ** 2).sum()) for vs in by_config.values())
    return within / total


def importance_rows(results):
    """[scope, key, importance] rows: scope 'all trials', then 'fraction F' per searched
    fraction (over the other keys); the noise keys are not factors."""
    ranked, metric = results.completed(), results.metric
    keys = [k for k in results.searched if k not in NOISE_KEYS]
    scopes = [('all trials', ranked, keys)]
    if FRACTION in keys:
        others = [k for k in keys if k != FRACTION]
        for fraction in sorted({r[FRACTION] for r in ranked if FRACTION in r}):
            scopes.append((f'fraction {fraction:g}', [r for r in ranked
                                                      if r.get(FRACTION) == fraction], others))
    return [[scope, key, value] for scope, rows, scope_keys in scopes
            for key, value in importances(rows, scope_keys, metric).items()]


def compare_rows(a, b):
    """(header, rows): the configurations both sweeps ran (their common searched keys, repeats
    and subset seeds averaged over), each side's mean metric and count of trials that
    completed their schedule, and the difference; then those only one ran."""
    keys = [k for k in a.searched if k in b.searched and k not in NOISE_KEYS]
    metric = a.metric

    def by_config(results):
        found = {}
        for r in results.completed():
            found.setdefault(tuple(r.get(k) for k in keys), []).append(r[metric])
        return found
    left, right = by_config(a), by_config(b)
    rows = []
    for config in sorted(set(left) | set(right), key=str):
        ma = sum(left[config]) / len(left[config]) if config in left else None
        mb = sum(right[config]) / len(right[config]) if config in right else None
        rows.append([*config, ma, len(left.get(config, [])), mb, len(right.get(config, [])),
                     mb - ma if ma is not None and mb is not None else None])
    both = [r for r in rows if r[-1] is not None]
    one = [r for r in rows if r[-1] is None]
    both.sort(key=lambda r: -abs(r[-1]))
    header = [*keys, f'{metric} A', 'n A', f'{metric} B', 'n B', 'B - A']
    return header, both + one


def compare(sweep_a, sweep_b):
    """The side-by-side table of two sweep directories, as text."""
    from orchestrator.tables import format_table
    a, b = SweepResults(sweep_a), SweepResults(sweep_b)
    header, rows = compare_rows(a, b)
    shared = sum(r[-1] is not None for r in rows)
    left_out = [len(s.stopped_early()) for s in (a, b)]
    lines = [f'A: {sweep_a}', f'B: {sweep_b}',
             f'trials stopped early by the scheduler, left out: {left_out[0]} in A, '
             f'{left_out[1]} in B',
             f'{shared} configuration(s) in both (largest difference first), '
             f'{len(rows) - shared} in one only; keys compared: {", ".join(header[:-5]) or "-"}',
             format_table(header, [['' if v is None else v for v in r] for r in rows])]
    return '\n'.join(lines)
