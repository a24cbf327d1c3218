"""Logging, configured once per process: time, rank and level on every line of ``zoome_dist``'s loggers
(on stdout, with the progress they describe), and the stack's own chatter quieted unless asked for.

    from zoome_dist.core.logs import get_logger, setup_logging
    setup_logging("info")          # zoome train --log-level; ranks > 0 log warnings and errors only
    log = get_logger(__name__)
"""
from __future__ import annotations

import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")
# Loggers of the stack that print at INFO/WARNING on every start (DeepSpeed's accelerator and config
# dumps, torch's "No CUDA runtime is found"): shown from this level on, or all of them at debug.
NOISY = {"DeepSpeed": logging.WARNING, "torch.utils.cpp_extension": logging.ERROR, "torch.distributed": logging.WARNING}


def setup_logging(level: str = "info", rank: int | None = None) -> None:
    """Configure the ``zoome_dist`` loggers for this process (idempotent)."""
    if level not in LEVELS:
        raise ValueError(f"Invalid log level {level!r}. Valid choices: {list(LEVELS)}")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" [rank {rank}]" if world > 1 else ""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s{where} %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("zoome_dist")
    root.handlers[:] = [handler]
    root.propagate = False
    # rank 0 tells the story; the other ranks only what goes wrong on them
    root.setLevel(getattr(logging, level.upper()) if rank == 0 else max(logging.WARNING, getattr(logging, level.upper())))
    for name, quiet in NOISY.items():
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else quiet)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
