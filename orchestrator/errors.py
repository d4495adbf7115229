"""The one error type a user sees as a single line and exit code 2 (bad input, nothing started)."""


class ConfigError(ValueError):
    """Bad input: the message names the file, the key and the value."""

    exit_code = 2
