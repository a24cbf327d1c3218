"""An exclusive lock on an output folder (a shard build, a training run) for one process's work."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from zoome_dist.core.logs import get_logger

# File systems without flock (Lustre mounted without -o flock, NFS without lockd, some FUSE mounts).
NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
_HELD: set[int] = set()  # this process's lock fds


def _close_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file: close it there, so the lock
    goes with the process that took it and not with its last worker."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class FolderLock:
    """``with FolderLock(path, "OUT is being built", advice):`` — ``flock`` on the file ``path``, released
    by the kernel when the process dies, so a killed run never leaves a stale lock. A second holder fails
    at once with ``FileExistsError`` naming ``busy``, the holder's pid and host, and the lock file. On a
    file system without locks it warns and goes on unlocked."""

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
            holder = os.pread(fd, 128, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FileExistsError(f"{self.busy} by another process (pid {holder}, lock {self.path}); "
                                  f"{self.advice}") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_LOCKS:
                raise
            get_logger(__name__).warning(f"{self.path}: this file system takes no locks ({e.strerror}); nothing "
                                         f"keeps a second process out of {self.path.parent}")
            return self
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {os.uname().nodename}".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        _HELD.add(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None
