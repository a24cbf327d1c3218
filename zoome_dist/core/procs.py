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


SHELLS = ("bash", "sh", "dash", "zsh", "ksh")


def end_with_launcher(poll_s: float = 1.0) -> bool:
    """A rank started by DeepSpeed's launcher (``deepspeed`` runner → ``launch.py`` → ranks) ends the whole job
    when the runner goes away. On one node the runner forwards no signal: a SIGTERM (``kill``, ``timeout``)
    or SIGHUP (a closed terminal or ssh session) ends the runner alone, and launch.py and the ranks would train
    on. A daemon thread checks every ``poll_s`` that launch.py and its parent are still there; when either is
    gone it sends SIGTERM to launch.py (which ends every rank of the node) and to this rank. Watched only where
    that parent is the ``deepspeed`` runner, or the remote shell of a multi-node (pdsh/ssh) launch, whose end
    means the runner's connection is gone; a launch.py started by a script that then exits is left alone.
    Returns whether it watches."""
    import signal
    import threading
    import time

    import psutil

    try:
        launcher = psutil.Process(os.getppid())
        runner = launcher.ppid()
        if runner <= 1 or not any("deepspeed.launcher.launch" in part for part in launcher.cmdline()):
            return False
        parent = psutil.Process(runner)
        is_runner = any(os.path.basename(part) == "deepspeed" or "deepspeed.launcher.runner" in part
                        for part in parent.cmdline()[:3])
        above = parent.parent()
        remote = parent.name().startswith("sshd") or (  # pdsh/ssh: launch.py under sshd, or under its shell
            parent.name() in SHELLS and above is not None and above.name().startswith("sshd"))
        if not (is_runner or remote):
            return False
    except psutil.Error:
        return False

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            try:
                if launcher.is_running() and launcher.ppid() == runner and psutil.pid_exists(runner):
                    continue
                launcher.terminate()
            except psutil.Error:
                pass
            os.kill(os.getpid(), signal.SIGTERM)
            return

    threading.Thread(target=watch, name="end-with-launcher", daemon=True).start()
    return True
