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
