"""Errors with a meaning for the user: bad input (one line, exit code 2, nothing started) and a
trial that failed for a stated reason."""
import re


class ConfigError(ValueError):
    """Bad input: the message names the file, the key and the value."""

    exit_code = 2


class TrialFailed(RuntimeError):
    """A trial ended for a reason worth its own words in MLflow (``diverged: ...``, lost workers)
    rather than a traceback; the message is the reason."""


class GroupOutOfMemory(TrialFailed):
    """A trial group's run ran out of GPU memory: its members continue in halves
    (group_formation.py), and later groups of the kind hold fewer heads; the message is torch's
    reason."""


def failure_reason(error_text):
    """A failed trial's reason as MLflow's tag and the end-of-sweep table say it: the error's
    last line, a TrialFailed's without its class (its message is the reason itself)."""
    lines = [line for line in str(error_text).strip().splitlines() if line.strip()]
    if not lines:
        return 'error'
    return re.sub(r'^(?:[\w.]+\.)?TrialFailed: ', '', lines[-1].strip())


class DiskFull(TrialFailed):
    """A write found its file system full: the sweep stops, resumable once space is freed
    (never a failed trial: the same trial trains on after ``--resume``)."""

    exit_code = 4

    def __init__(self, path):
        super().__init__(f'{path}: no space left on device')
        self.path = path

    def __reduce__(self):  # Ray pickles it from the worker to the trial: the path, not the text
        return DiskFull, (self.path,)


class SweepStop(str):
    """Why the sweep stopped itself, resumable (its text), what the user does before resuming,
    and the exit code; a plain string reason is a full disk."""

    def __new__(cls, text, remedy='free space there', exit_code=DiskFull.exit_code):
        stop = super().__new__(cls, text)
        stop.remedy, stop.exit_code = remedy, exit_code
        return stop


NO_ROOM_EXIT = 5  # no node of the cluster can hold a crew (crew.WorkerPool._watch_room)


def remedy(reason):
    """(what to do before resuming, exit code) for the sweep's own stop ``reason``."""
    return (getattr(reason, 'remedy', 'free space there'),
            getattr(reason, 'exit_code', DiskFull.exit_code))


def disk_full(error, path):
    """``DiskFull(path)`` when ``error`` (or what it was raised from: torch and mmcv wrap the
    OSError) says the device is full, else None."""
    import errno
    while error is not None:
        if isinstance(error, DiskFull):
            return error
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return DiskFull(error.filename or path)
        error = error.__cause__ or error.__context__
    return None
