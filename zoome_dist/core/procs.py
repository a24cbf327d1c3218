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
    """``killed by SIGKILL`` for a ``Popen.returncode`` of -9; ``exit 247 (...)`` where a launcher turned a
    rank's signal into its own exit status (DeepSpeed's exits with the rank's -9: 247; a shell 128 + 9)."""
    import signal

    def name(sig: int) -> str | None:
        try:
            return signal.Signals(sig).name
        except ValueError:
            return None

    if code < 0:
        return f"killed by {name(-code) or f'signal {-code}'}"
    guesses = [f"a rank killed by {n}" for n in (name(256 - code) if 224 < code < 255 else None,
                                                  name(code - 128) if 128 < code < 160 else None) if n]
    return f"exit {code}" + (f" ({guesses[0]}?)" if guesses else "")


def log_tail(path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file, indented, for an error message ('' when unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
            tail = f.read().decode(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in tail)
