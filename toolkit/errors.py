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


class PreemptedError(ToolkitError):
    """The run was asked to stop (SIGUSR1, a RUN/.preempt file, or SIGTERM) and saved a
    checkpoint first; `train.resume=auto` on the same run directory continues it exactly."""

    exit_code = 4  # SIGTERM: 143, as a process ended by SIGTERM reports

    def __init__(self, message: str, exit_code: int = 4):
        super().__init__(message)
        self.exit_code = exit_code
