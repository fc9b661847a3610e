"""Errors the CLIs turn into one line on stderr and a non-zero exit."""


class ToolkitError(Exception):
    """A user-facing error: the message is the whole story, no traceback needed."""

    exit_code = 1


class ConfigError(ToolkitError):
    """Bad config key, type, value or path. Raised before any work starts."""

    exit_code = 2


class NonFiniteLossError(ToolkitError):
    """Too many consecutive non-finite losses; the run stops with its last good checkpoint."""

    exit_code = 3
