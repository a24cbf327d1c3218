"""An exclusive lock on an output folder (a shard build, a training run) for one process's work."""
from __future__ import annotations

import os
from pathlib import Path


class FolderLock:
    """``with FolderLock(path, "OUT is being built"):`` — ``flock`` on the file ``path``, released by the
    kernel when the process dies, so a killed run never leaves a stale lock. A second holder fails at
    once with ``FileExistsError`` naming ``busy``, the holder's pid and the lock file."""

    def __init__(self, path: Path, busy: str, advice: str) -> None:
        self.path, self.busy, self.advice = Path(path), busy, advice
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(f"{self.busy} by another process (pid {holder}, lock {self.path}); "
                                  f"{self.advice}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {os.uname().nodename}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
