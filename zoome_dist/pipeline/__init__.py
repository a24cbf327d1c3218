"""Input pipeline: ``make_loader(...) -> (iterator, steps_per_epoch)`` over fold-selected shards."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from zoome_dist.pipeline.augment import Augment, LoaderSpec
from zoome_dist.pipeline.selection import Selection, select_folds

DEVICES = ("auto", "gpu", "cpu")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


LOADERS = ("dali", "torch") if dali_available() else ("torch",)


def resolve_loader(loader: str) -> str:
    """``auto`` → ``dali`` where it imports, else ``torch``."""
    return LOADERS[0] if loader == "auto" else loader


def resolve_device(device: str) -> str:
    """``auto`` → ``gpu`` where CUDA is present, else ``cpu``."""
    import torch

    if device not in DEVICES:
        raise ValueError(f"Invalid data device {device!r}. Only {list(DEVICES)} are supported.")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device gpu requested, but no CUDA GPU is visible; use cpu or auto")
    return device


def make_loader(shards: str | Path, folds: list[int], *, train: bool, batch_size: int,
                image_size: int = 224, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                device: str = "auto", loader: str = LOADERS[0], aug: Augment = Augment(), seed: int = 0,
                num_threads: int = 2, epoch: int = 0) -> tuple[Iterable, int]:
    """Batches of ``(image, meta, label, sample_id)`` for this rank; returns ``(iterator, steps)``.

    Training order and augmentation are a function of ``(seed, epoch, rank)``, so a run resumed
    mid-epoch sees exactly the batches the interrupted one would have. A training loader yields
    ``epoch`` first, then the next epoch on each new iteration; ``loader.set_epoch(e, start=k)`` picks the
    next one, from batch ``k`` on (the torch loader keeps its workers; DALI builds a pipeline per epoch).
    """
    if loader not in LOADERS:
        raise ValueError(f"Invalid loader {loader!r}. Only {list(LOADERS)} are available here.")
    if batch_size < 1:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    aug.validate()
    sel = select_folds(shards, folds)
    spec = LoaderSpec(train=train, batch_size=batch_size, image_size=image_size, rank=rank, world_size=world_size,
                      device=resolve_device(device), device_id=local_rank, aug=aug, seed=seed,
                      num_threads=num_threads, epoch=epoch)
    if train and sel.samples // world_size < batch_size:
        raise ValueError(f"folds {folds} hold {sel.samples} samples: fewer than one batch of {batch_size} "
                         f"per rank over {world_size} rank(s)")
    if loader == "dali":
        from zoome_dist.pipeline.dali import dali_loader

        return dali_loader(sel, spec)
    from zoome_dist.pipeline.torch_loader import torch_loader

    return torch_loader(sel, spec)


__all__ = ["make_loader", "Augment", "LoaderSpec", "Selection", "select_folds", "LOADERS", "DEVICES", "resolve_device",
           "resolve_loader"]
