"""What a run's hooks need that is not configuration: the caller's functions, attached in code
around one run, so that ``custom_hooks`` hold plain values only and a resolved config dumps and
reloads as it ran (mmcv builds the hooks from it; a run built from the file alone still writes
its metrics files and runs to its end).

    with attached(on_metrics=[report], should_stop=[stop]):  # one entry per head
        train_segmentor(model, datasets, cfg, ...)

A process trains one run at a time (a sweep's worker runs its trials one after another), so one
process-wide slot is enough; it is emptied when the run ends, however it ends.
"""
import contextlib

_attached = {}


@contextlib.contextmanager
def attached(on_metrics=(), should_stop=()):
    """``on_metrics[k](metrics)``: head k's evaluations (and ``{'failed': reason}``), on every
    rank; ``should_stop[k]()``: asked after every iteration, head k (a solo run: the run) stops
    when any rank says so. Entries may be None."""
    if _attached:
        raise RuntimeError('a run is already attached in this process')
    _attached.update(on_metrics=list(on_metrics), should_stop=list(should_stop))
    try:
        yield
    finally:
        _attached.clear()


def on_metrics(head=0):
    """Head ``head``'s metrics listener, or None."""
    listeners = _attached.get('on_metrics', [])
    return listeners[head] if head < len(listeners) else None


def should_stop(head=0):
    """True when head ``head``'s caller asks it to stop (never, with nobody attached)."""
    asks = _attached.get('should_stop', [])
    ask = asks[head] if head < len(asks) else None
    return bool(ask is not None and ask())
