"""Errors the CLIs turn into one line on stderr and a non-zero exit (`run_cli`), and how they exit (`leave`)."""

import atexit
import errno
import os
import sys
import threading
from pathlib import Path
from typing import Callable, NoReturn, Optional, Tuple, TypeVar, Union

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
    """The run was asked to stop (SIGUSR1, a RUN/.preempt file, SIGTERM or Ctrl-C) and saved a
    checkpoint first; `train.resume=auto` on the same run directory continues it exactly."""

    exit_code = 4  # SIGTERM: 143 and Ctrl-C: 130, as a process ended by that signal reports

    def __init__(self, message: str, exit_code: int = 4, label: str = "preempted"):
        super().__init__(message)
        self.exit_code, self.label = exit_code, label


class DiskFullError(ToolkitError):
    """A write failed for lack of space (or quota). Whatever was half-written has been removed;
    earlier checkpoints are untouched, so `train.resume=auto` continues once space is freed."""

    exit_code = 1

    def __init__(self, path: Union[str, Path, None], reason: str = "no space left on device", hint: str = ""):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}{hint}" if path else f"{reason}{hint}")


# How much free space still counts as full after a failed write: a write that fails for space
# has just used up what was left, give or take a few blocks and what the filesystem holds back.
NEARLY_FULL_BYTES = 16 << 20
_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def free_bytes(path: Union[str, Path]) -> Optional[int]:
    """Bytes this process may still write on `path`'s filesystem (root may use the blocks the
    filesystem reserves for it), or None when the nearest existing parent cannot be asked."""
    path = Path(path).absolute()
    for p in (path, *path.parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return None


def disk_full(exc: BaseException, path: Union[str, Path, None]) -> Optional[DiskFullError]:
    """The DiskFullError that `exc`, raised while writing `path` (the name the user knows, not
    a temp file's), really is; None if it is not. Without a path, the exception's own filename.

    OSError carries errno (ENOSPC, EDQUOT); one without errno is not judged by its words.
    safetensors writes through Rust and says "No space left on device (os error 28)". torch.save writes through C++ and says only
    "unexpected pos 576 vs 534" or "file write failed" (torch 2.14), with no errno: for those,
    a nearly full filesystem after the failure is the evidence."""
    if isinstance(exc, DiskFullError):  # already judged by a write further down
        return exc
    reason = _NO_SPACE.get(getattr(exc, "errno", None))
    text = str(exc)
    if reason is None and "os error 28)" in text:  # Rust's io::Error: "No space left on device (os error 28)"
        reason = _NO_SPACE[errno.ENOSPC]
    if reason is None and "os error 122)" in text:  # ... "Disk quota exceeded (os error 122)"
        reason = _NO_SPACE[errno.EDQUOT]
    if (reason is None and path is not None and isinstance(exc, RuntimeError)
            and ("inline_container" in text or "write failed" in text)):
        free = free_bytes(path)
        if free is not None and free < NEARLY_FULL_BYTES:
            reason = _NO_SPACE[errno.ENOSPC]
    if reason is None:
        return None
    return DiskFullError(path if path is not None else getattr(exc, "filename", None), reason)


def tell_launcher(line: str) -> None:
    """Give torchrun (what `accelerate launch` runs for several processes, nodes or SLURM) this
    process's one-line error. torchrun ends a failed launch with a report whose "Root Cause"
    shows the first failed rank's error file, written where TORCHELASTIC_ERROR_FILE says (the
    file `torch.distributed.elastic`'s own @record writes). Without it the report says "To enable
    traceback see ..." and the toolkit's line stays above the launcher's traceback; with it the
    report's last line is the toolkit's. A string `message` is shown as it is."""
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": line, "timestamp": str(int(time.time()))}, f)
    except OSError:
        pass  # the launcher's report falls back to its own text; the line was printed already


def run_cli(work: Callable[[], T]) -> Tuple[int, Optional[T]]:
    """Run a CLI's work the way every launcher-facing command here does -> (exit code, result).

    ToolkitError: its message as one `error:` line and its exit code. PreemptedError: a
    `preempted:` line from rank 0 and 4 (143 on SIGTERM; `interrupted:` and 130 on a first
    Ctrl-C): not a failure, the run saved itself. A KeyboardInterrupt (a second Ctrl-C, or one
    outside training): `error: interrupted` and 130. Anything else is a bug or a dying peer: the traceback, then one line that names
    the rank (`RANK`, set by torchrun), and 1."""
    import os
    import sys
    import traceback

    rank = os.environ.get("RANK", "0")
    try:
        return 0, work()
    except PreemptedError as e:
        if rank == "0":
            print(f"{e.label}: {e}", file=sys.stderr, flush=True)
        tell_launcher(f"{e.label}: {e}")
        return e.exit_code, None
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        tell_launcher(f"error: {e}")
        return e.exit_code, None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        tell_launcher("error: interrupted")
        return 130, None
    except Exception as e:
        full = disk_full(e, None)  # a write not made through toolkit.rundir: still one line, no traceback
        if full is not None:
            print(f"error: rank {rank}: {full}", file=sys.stderr, flush=True)
            tell_launcher(f"error: rank {rank}: {full}")
            return full.exit_code, None
        traceback.print_exc()
        print(f"error: rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        tell_launcher(f"error: rank {rank}: {type(e).__name__}: {e}")
        return 1, None


def leave(code: int) -> NoReturn:
    """End the process with exit status CODE the way Python's own exit does, minus its last part.

    By the time a command returns, every file it makes is written, closed and renamed into place.
    Python's exit then joins the non-daemon threads and runs the atexit handlers (Ray's shutdown,
    trackers' and logging's flushes, temporary folders, DataLoader workers, coverage), and only
    after that frees every module and object one by one: with torch, Accelerate and matplotlib
    loaded that last part costs ~0.5 s of every command (benchmarks/startup.py) and saves
    nothing. `leave` does the first two, as multiprocessing's forked children do, then os._exit.
    An interpreter without those two hooks exits normally."""
    join_threads = getattr(threading, "_shutdown", None)
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if join_threads is None or run_exit_handlers is None:
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    join_threads()
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
