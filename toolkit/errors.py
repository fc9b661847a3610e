"""Errors the CLIs turn into one line on stderr and a non-zero exit (`run_cli`)."""

from typing import Callable, Optional, Tuple, TypeVar

T = TypeVar("T")


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


def run_cli(work: Callable[[], T]) -> Tuple[int, Optional[T]]:
    """Run a CLI's work the way every launcher-facing command here does -> (exit code, result).

    ToolkitError: its message as one `error:` line and its exit code. PreemptedError: a
    `preempted:` line from rank 0 and 4 (143 on SIGTERM): not a failure, the run saved itself.
    Ctrl-C: 130. Anything else is a bug or a dying peer: the traceback, then one line that names
    the rank (`RANK`, set by torchrun), and 1."""
    import os
    import sys
    import traceback

    rank = os.environ.get("RANK", "0")
    try:
        return 0, work()
    except PreemptedError as e:
        if rank == "0":
            print(f"preempted: {e}", file=sys.stderr, flush=True)
        return e.exit_code, None
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code, None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 130, None
    except Exception as e:
        traceback.print_exc()
        print(f"error: rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1, None
