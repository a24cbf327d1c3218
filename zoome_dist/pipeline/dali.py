"""NVIDIA DALI pipelines over the shards: decode + augment on the GPU (``mixed``) or the CPU.

Processing functions are kept apart from the ``@pipeline_def``; ``dali_loader`` returns
``(iterator, steps_per_epoch)`` where the iterator yields ``(image, meta, label, sample_id)``.
Sharding: DALI splits the global sample index into contiguous per-rank ranges; with
``pad_last_batch`` and a PARTIAL last batch each eval sample is seen exactly once over all ranks,
and with DROP every rank runs the same number of training steps. A training epoch's shard order
and seeds derive from ``(seed, epoch)`` only, so a resumed run replays the same batches: the
loader builds one pipeline per epoch (``set_epoch``).
"""
from __future__ import annotations

from itertools import islice
from typing import Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from zoome_dist.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, Augment, LoaderSpec, loader_seed
from zoome_dist.pipeline.selection import Selection

OUTPUTS = ["image", "meta", "label", "sid"]
_MEAN = [255 * m for m in IMAGENET_MEAN]
_STD = [255 * s for s in IMAGENET_STD]


def normalize(images, mirror=0):
    """uint8 HWC → float CHW, ImageNet mean/std, optional horizontal flip."""
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                    mean=_MEAN, std=_STD)


def train_images(jpegs, image_size: int, aug: Augment, device: str):
    """Centred zoom crop fused into the decode, resize, rotate, flip, normalise."""
    lo, hi = aug.zoom
    z = fn.random.uniform(range=[lo, hi]) if hi > lo else fn.random.uniform(values=[lo])
    start = (1.0 - z) * 0.5
    images = fn.decoders.image_slice(jpegs, rel_start=fn.stack(start, start), rel_shape=fn.stack(z, z),
                                     device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    images = fn.resize(images, resize_x=image_size, resize_y=image_size)
    if aug.rotate > 0:
        images = fn.rotate(images, angle=fn.random.uniform(range=[-aug.rotate, aug.rotate]),
                           keep_size=True, fill_value=0)
    return normalize(images, mirror=fn.random.coin_flip(probability=aug.flip))


def eval_images(jpegs, image_size: int, device: str):
    """Whole image resized to ``image_size`` × ``image_size``, normalised; deterministic."""
    images = fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)
    return normalize(fn.resize(images, resize_x=image_size, resize_y=image_size))


@pipeline_def
def shard_pipeline(tars: list[str], indexes: list[str], shard_id: int, num_shards: int, train: bool,
                   image_size: int, aug: Augment, device: str):
    jpegs, meta, label, sid = fn.readers.webdataset(
        paths=tars, index_paths=indexes, ext=["jpg", "meta", "label", "sid"],
        dtypes=[types.UINT8, types.FLOAT, types.INT32, types.INT64],
        missing_component_behavior="error", shard_id=shard_id, num_shards=num_shards,
        pad_last_batch=True, name="Reader", random_shuffle=train, initial_fill=256)
    images = train_images(jpegs, image_size, aug, device) if train else eval_images(jpegs, image_size, device)
    if device == "gpu":
        meta, label, sid = meta.gpu(), label.gpu(), sid.gpu()
    return images, meta, label, sid


class DaliLoader:
    """Yields ``(image, meta, label, sample_id)`` torch tensors on the pipeline's device; a training
    loader yields epoch ``spec.epoch``, then the next (or the one ``set_epoch`` names), each from a
    pipeline of its own."""

    def __init__(self, sel: Selection, spec: LoaderSpec) -> None:
        self.sel, self.spec = sel, spec
        self.epoch, self.built, self.used, self.it, self.start = spec.epoch, None, False, None, 0
        self._build()

    def _build(self) -> None:
        s, sel = self.spec, self.sel.shuffled(self.spec.seed, self.epoch) if self.spec.train else self.sel
        self.it = None  # the previous epoch's pipeline goes first
        pipe = shard_pipeline(tars=sel.tars, indexes=sel.indexes, shard_id=s.rank, num_shards=s.world_size,
                              train=s.train, image_size=s.image_size, aug=s.aug, device=s.device,
                              batch_size=s.batch_size, num_threads=s.num_threads,
                              device_id=s.device_id if s.device == "gpu" else None,
                              seed=loader_seed(s.seed, self.epoch, s.rank, bits=31))
        pipe.build()
        self.it = DALIGenericIterator(pipe, OUTPUTS, reader_name="Reader", auto_reset=True,
                                      last_batch_policy=LastBatchPolicy.DROP if s.train else LastBatchPolicy.PARTIAL)
        self.built, self.used = self.epoch, False

    def __len__(self) -> int:
        return len(self.it)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields this epoch's batches, from batch ``start`` on (a run resumed
        mid-epoch). Unlike the torch loader's, the batches before ``start`` still run through the
        pipeline, read and decoded (its reader's shuffle and random operators have no way to skip)."""
        if start < 0 or (start and not self.spec.train):
            raise ValueError(f"start {start}: only a training loader starts mid-epoch, at a batch >= 0")
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        start = 0
        if self.spec.train:
            if self.built != self.epoch or self.used:  # a pipeline that ran has moved on: build afresh
                self._build()
            self.used = True
            self.epoch, start, self.start = self.epoch + 1, self.start, 0
        return self._pass(start)

    def _pass(self, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in islice(self.it, start, None):
            d = batch[0]
            yield d["image"], d["meta"], d["label"].view(-1).long(), d["sid"].view(-1)


def dali_loader(sel: Selection, spec: LoaderSpec) -> tuple[DaliLoader, int]:
    loader = DaliLoader(sel, spec)
    return loader, len(loader)
