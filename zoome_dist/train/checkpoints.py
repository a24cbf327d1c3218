"""Checkpoints are data, never code: DeepSpeed's checkpoint engine with ``torch.load(weights_only=True)``.

DeepSpeed's ``TorchCheckpointEngine`` unpickles every checkpoint file with ``weights_only=False``, so a
crafted ``mp_rank_00_model_states.pt`` planted in a run folder (shared storage, a Tune trial folder)
would run arbitrary code on ``--resume``. ``SafeCheckpointEngine`` loads with ``weights_only=True``
and an allow-list of the few plain-data DeepSpeed classes that ZeRO 1/2 optimizer states hold; anything
else is refused with ``UnsafeCheckpointError`` before a byte of it runs. The ``latest`` tag is checked
too: it must name a checkpoint folder inside the checkpoint directory. Each finished checkpoint folder
records the SHA-256 of its files (``sha256.json``); one whose bytes changed since is not loaded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from zoome_dist.core.files import sha256_file, write_text_atomic
from zoome_dist.core.rundir import RunDir
from zoome_dist.core.safe_load import DamagedCheckpointError, UnsafeCheckpointError, safe_load

# What DeepSpeed 0.19 writes besides tensors and builtins (ZeRO 1/2 optimizer state files):
SAFE_GLOBALS = [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]
TAG = re.compile(r"step\d{7}")
__all__ = ["SafeCheckpointEngine", "install", "latest_tag", "UnsafeCheckpointError", "DamagedCheckpointError"]


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``safe_load``."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location, SAFE_GLOBALS)


def install(engine) -> None:
    """Make ``engine.load_checkpoint`` (and its saves, unchanged) go through ``SafeCheckpointEngine``."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ValueError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                         "only the default torch engine is supported")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


def step_tag(global_step: int) -> str:
    """The checkpoint tag of optimizer step ``global_step`` (what ``TAG`` matches)."""
    return f"step{global_step:07d}"


def latest_tag(run: RunDir) -> str:
    """The tag ``run``'s ``latest`` names, checked to be one of ours (``stepNNNNNNN``) and present."""
    latest, ckpt_dir = run.latest, run.checkpoints
    tag = latest.read_text(errors="replace").strip()
    if not tag:
        raise FileNotFoundError(f"{latest} is empty")
    if not TAG.fullmatch(tag):
        raise ValueError(f"{latest}: names checkpoint {tag[:80]!r}, not one written by zoome_dist (stepNNNNNNN)")
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{latest} names checkpoint {tag}, but {ckpt_dir / tag} does not exist")
    return tag


CHECKSUMS = "sha256.json"  # in each checkpoint folder, written once every rank has written its files


def write_checksums(folder: Path) -> None:
    """Record the SHA-256 of every file of a finished checkpoint folder (atomically)."""
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    write_text_atomic(folder / CHECKSUMS, json.dumps(sums, indent=1))


def checksum_damage(folder: Path) -> str | None:
    """Why ``folder`` differs from what was written (a file changed, shortened or gone), or None; a
    checkpoint written before checksums were recorded is not checked."""
    record = folder / CHECKSUMS
    if not record.is_file():
        return None
    try:
        sums = json.loads(record.read_text())
    except (OSError, ValueError) as e:
        return f"{record} unreadable ({e})"
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digest:
            return f"{path} differs from what was written (SHA-256 mismatch: damaged or replaced)"
    return None
