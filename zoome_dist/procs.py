"""Child processes that die with their parent (Linux ``PR_SET_PDEATHSIG``)."""
from __future__ import annotations

import os


def die_with_parent(parent: int | None = None) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a killed build or Tune trial leaves no
    workers or ranks behind). Use as a pool initializer or ``preexec_fn``; with ``parent`` it also
    exits at once if that parent died before the request took effect."""
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent is not None and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def exit_description(code: int) -> str:
    """``exit 3`` or ``killed by SIGKILL`` for a ``Popen.returncode``."""
    import signal

    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


def log_tail(path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file, indented, for an error message ('' when unreadable)."""
    try:
        tail = open(path, errors="replace").read().splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in tail)
