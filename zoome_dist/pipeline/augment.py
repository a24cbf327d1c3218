"""Augmentation settings shared by the DALI pipeline and the torch fallback (paper, Sec. IV)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zoome_dist.config import DataConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def loader_seed(seed: int, epoch: int, rank: int, bits: int = 63) -> int:
    """The random seed of one rank's loader for one epoch: a function of ``(seed, epoch, rank)`` only,
    which is what makes a resumed run replay the same augmented batches (DALI takes 31 bits)."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % 2**bits


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The random seed of one sample's augmentation in one epoch (torch loader, per-sample transforms):
    independent of rank, worker and the loader's history, so persistent workers and a resumed run draw
    the same values. Hashed (``SeedSequence``): distinct for every (seed, epoch, index)."""
    entropy = [seed % 2**64, epoch, index]  # SeedSequence takes no negative numbers; train.seed may be one
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)

_DEFAULTS = DataConfig()


@dataclass(frozen=True)
class Augment:
    """Centred crop of ``zoom`` × side (uniform), rotation in ±``rotate`` degrees, flip with ``flip``.

    Order: crop → resize to ``image_size`` → rotate (zero fill, size kept) → flip → normalise.
    Resizing before rotating keeps the rotation cheap (docs/stack.md). Eval uses no augmentation:
    the whole image resized to ``image_size`` × ``image_size``.
    """

    zoom: tuple[float, float] = tuple(_DEFAULTS.zoom)  # the config's defaults (data.zoom/rotate/flip)
    rotate: float = _DEFAULTS.rotate
    flip: float = _DEFAULTS.flip

    def validate(self) -> None:
        lo, hi = self.zoom
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment zoom range must satisfy 0 < lo <= hi <= 1, got {self.zoom}")
        if not 0 <= self.rotate <= 180:
            raise ValueError(f"augment rotate must lie in [0, 180] degrees, got {self.rotate}")
        if not 0 <= self.flip <= 1:
            raise ValueError(f"augment flip probability must lie in [0, 1], got {self.flip}")


@dataclass(frozen=True)
class LoaderSpec:
    """What one rank's loader delivers, for either backend: ``device`` is resolved (gpu | cpu) and
    ``device_id`` the rank's GPU."""

    train: bool
    batch_size: int
    image_size: int = 224
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    device_id: int | None = 0
    aug: Augment = Augment()
    seed: int = 0
    num_threads: int = 2
    epoch: int = 0
