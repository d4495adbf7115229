"""How many trials Tune keeps alive, raised while the sweep runs when a node joins the cluster.

Tune fixes ``max_concurrent_trials`` when its loop starts (and a restored Tuner keeps the value
it was pickled with). The sweep's searchers read the limit from here instead: the driver sets it
from the resource plan at the start and raises it when the cluster can hold more crews
(driver._grow), in the one driver process where Tune's loop runs.
"""
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

_limit = {'trials': None}  # None: each searcher's own (the value it was built with)


def set_limit(trials):
    _limit['trials'] = trials


class _LiveLimit:
    """``max_concurrent`` is the sweep's current limit; what Tune assigns is only the default."""

    @property
    def max_concurrent(self):
        return _limit['trials'] or self._built_with

    @max_concurrent.setter
    def max_concurrent(self, value):
        self._built_with = value


class GridSearch(_LiveLimit, BasicVariantGenerator):
    """Tune's BasicVariantGenerator (grids crossed, distributions sampled), limit read here."""


class Limited(_LiveLimit, ConcurrencyLimiter):
    """Tune's ConcurrencyLimiter around a Searcher (Optuna's), limit read here."""


def search_alg(searcher, trials):
    """The sweep's search algorithm for Tune: ``searcher`` (None: grid/random) limited to
    ``trials`` alive at once until set_limit raises it."""
    set_limit(trials)
    if searcher is None:
        return GridSearch(max_concurrent=trials)
    return Limited(searcher, max_concurrent=trials)
