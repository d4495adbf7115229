"""Errors with a meaning for the user: bad input (one line, exit code 2, nothing started) and a
trial that failed for a stated reason."""


class ConfigError(ValueError):
    """Bad input: the message names the file, the key and the value."""

    exit_code = 2


class TrialFailed(RuntimeError):
    """A trial ended for a reason worth its own words in MLflow (``diverged: ...``, lost workers)
    rather than a traceback; the message is the reason."""
