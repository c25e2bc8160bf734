"""Errors every layer may raise for bad input; the `rlhf-fast` command turns each into one line and exit code 2."""


class ConfigError(ValueError):
    """An option out of range or inconsistent, or a model / checkpoint folder that cannot be used as asked."""
