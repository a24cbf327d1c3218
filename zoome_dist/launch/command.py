"""The one way to start the training of a fold: every caller (CV driver, Ray trials, benchmarks,
tests) builds its command lines here, and every one runs the module ``zoome_dist.train`` (so a
non-editable install works; no file path into the checkout).

- ``train_command``: one command for a whole job: ``python -m zoome_dist.train`` for a single local
  rank, else ``deepspeed [--hostfile H --master_addr A | --include localhost:DEVICES | --num_gpus N]
  --module zoome_dist.train``.
- ``local_rank_commands``: a job's ranks as separate processes on this node (what a Ray trial runs,
  so that each rank dies with the trial), joined through a rendezvous *file* in the run folder: no
  TCP port is chosen, so concurrent trials cannot race for one.
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

MODULE = "zoome_dist.train"
RENDEZVOUS_ENV = "ZOOME_RENDEZVOUS_FILE"


@dataclass(frozen=True)
class Launch:
    """Where a job's ranks run: ``ranks`` on this node, or the nodes of a DeepSpeed ``hostfile``."""

    ranks: int = 1
    hostfile: str | None = None
    master_addr: str | None = None
    master_port: int | None = None

    def validate(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"ranks per node must be positive, got {self.ranks}")
        if self.hostfile and not Path(self.hostfile).is_file():
            raise FileNotFoundError(f"hostfile not found: {self.hostfile}")
        if self.hostfile and not self.master_addr:
            raise ValueError("a hostfile job needs --master-addr: the address of the first node that the "
                             "other nodes reach (not localhost)")


def job_env(gpu: bool, threads: int = 0) -> dict[str, str]:
    """Environment for a job's ranks: without GPUs they never touch CUDA, whatever the node has;
    ``threads`` (0: not set) is each rank's OpenMP threads."""
    env = {} if gpu else {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def visible_devices(env: dict[str, str] | None = None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` (of ``env``, default this process's) as a list, or None when unset (all devices)."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [d for d in value.split(",") if d.strip()]


def train_command(train_args: list[str], launch: Launch = Launch(), env: dict[str, str] | None = None) -> list[str]:
    """The command line that trains one fold with ``train_args`` (``--config ... --fold ...``), to run
    with ``env`` (default: this process's environment; its ``CUDA_VISIBLE_DEVICES`` picks the GPUs)."""
    launch.validate()
    if launch.ranks == 1 and not launch.hostfile:
        return [sys.executable, "-m", MODULE, *train_args]
    from zoome_dist.train.engine import accelerator, free_port

    deepspeed = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    # the launcher's own INFO lines (its command, each rank spawned) only with the ranks' --log-level debug
    debug = any(a == "--log-level=debug" or (a == "--log-level" and b == "debug")
                for a, b in zip(train_args, [*train_args[1:], ""]))
    cmd = [deepspeed, "--log_level", "info" if debug else "warning", "--master_port",
           str(launch.master_port or free_port())]
    if launch.hostfile:
        cmd += ["--hostfile", launch.hostfile, "--master_addr", launch.master_addr]
    else:
        devices = visible_devices(env) if accelerator() == "cuda" else None
        if devices is not None:  # DeepSpeed ignores CUDA_VISIBLE_DEVICES; --include is its way
            if launch.ranks > len(devices):
                raise ValueError(f"{launch.ranks} ranks asked for, but CUDA_VISIBLE_DEVICES={','.join(devices)} "
                                 f"shows {len(devices)} GPU(s)")
            cmd += ["--include", "localhost:" + ",".join(devices[:launch.ranks])]
        else:
            if accelerator() == "cuda":
                import torch

                if launch.ranks > torch.cuda.device_count():
                    raise ValueError(f"{launch.ranks} ranks asked for, but this node has "
                                     f"{torch.cuda.device_count()} GPU(s)")
            cmd += ["--num_gpus", str(launch.ranks)]
    return cmd + ["--module", MODULE, *train_args]


def local_rank_commands(train_args: list[str], ranks: int, rendezvous: Path,
                        env: dict[str, str] | None = None) -> list[tuple[list[str], dict[str, str]]]:
    """``(command, env)`` per rank of a job whose ranks the caller starts itself on this node."""
    rendezvous.parent.mkdir(parents=True, exist_ok=True)
    if rendezvous.exists():  # a stale file from a killed attempt would hang the new rendezvous
        rendezvous.unlink()
    base = dict(env if env is not None else os.environ)
    return [([sys.executable, "-m", MODULE, *train_args],
             {**base, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
              RENDEZVOUS_ENV: str(rendezvous)}) for r in range(ranks)]
