"""Checkpoints are data, never code: DeepSpeed's checkpoint engine with ``torch.load(weights_only=True)``.

DeepSpeed's ``TorchCheckpointEngine`` unpickles every checkpoint file with ``weights_only=False``, so a
crafted ``mp_rank_00_model_states.pt`` planted in a run folder (shared storage, a Tune trial folder)
would run arbitrary code on ``--resume``. ``SafeCheckpointEngine`` loads with ``weights_only=True``
and an allow-list of the few plain-data DeepSpeed classes that ZeRO 1/2 optimizer states hold; anything
else is refused with ``UnsafeCheckpointError`` before a byte of it runs. The ``latest`` tag is checked
too: it must name a checkpoint folder inside the checkpoint directory.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# What DeepSpeed 0.19 writes besides tensors and builtins (ZeRO 1/2 optimizer state files):
SAFE_GLOBALS = [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]
TAG = re.compile(r"step\d{7}")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks to load code (a global outside the allow-list): tampering, never retried."""


class DamagedCheckpointError(ValueError):
    """A checkpoint file is not a readable torch checkpoint (truncated, garbage): an older one may do."""


def safe_load(path: str | Path, map_location=None):
    """``torch.load`` that refuses pickled code, naming the file and what it tried to load."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"unsupported GLOBAL (\S+)", str(e))
        if found:
            raise UnsafeCheckpointError(f"{path}: refused to load: it asks for {found.group(1)}, not tensors and plain "
                                        "data; it was not written by zoome_dist, or was tampered with") from None
        raise DamagedCheckpointError(f"{path}: not a readable checkpoint (refused by the safe loader)") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with ``safe_load``."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)


def install(engine) -> None:
    """Make ``engine.load_checkpoint`` (and its saves, unchanged) go through ``SafeCheckpointEngine``."""
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise ValueError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                         "only the default torch engine is supported")
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


def latest_tag(ckpt_dir: Path) -> str:
    """The tag ``latest`` names, checked to be one of ours (``stepNNNNNNN``) and present."""
    latest = ckpt_dir / "latest"
    tag = latest.read_text(errors="replace").strip()
    if not TAG.fullmatch(tag):
        raise ValueError(f"{latest}: names checkpoint {tag[:80]!r}, not one written by zoome_dist (stepNNNNNNN)")
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{latest} names checkpoint {tag}, but {ckpt_dir / tag} does not exist")
    return tag
