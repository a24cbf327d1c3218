"""PyTorch fallback loader: same shards, batch format, sharding and augmentations as the DALI one.

Random access through the DALI index files (byte offsets of every field), decoding with
``torchvision.io.decode_jpeg`` and augmenting with ``torchvision.transforms.v2``. Eval ranks take the
same contiguous ranges of the global sample index as DALI (each sample exactly once); training
uses ``DistributedSampler(drop_last=True)``, so every rank runs the same number of steps.

One training loader serves every epoch (``set_epoch``): its workers persist, and each sample's
random augmentation is drawn from a seed of ``(seed, epoch, sample index)``, not from the workers'
RNG streams, so an epoch's batches are the same whether its workers are fresh (a resumed run) or
have served earlier epochs, and whatever the number of workers.

On a GPU (``data.loader=torch``, ``data.device=gpu``) the workers only read bytes and the batch is
decoded with nvJPEG and augmented on the GPU (``batch_augment.BatchAugment``): same samplers, so
the same batches and sharding as the CPU path.
"""
from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from zoome_dist.data.wds_index import read_index
from zoome_dist.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, Augment, LoaderSpec, sample_seed
from zoome_dist.pipeline.batch_augment import BatchAugment
from zoome_dist.pipeline.selection import Selection

FIELDS = ("jpg", "meta", "label", "sid")


class CenterZoom(torch.nn.Module):
    """Centred crop of a uniformly drawn fraction ``z`` of each side."""

    def __init__(self, zoom: tuple[float, float]) -> None:
        super().__init__()
        self.lo, self.hi = zoom

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        z = float(torch.empty(()).uniform_(self.lo, self.hi))
        h, w = img.shape[-2:]
        return TF.center_crop(img, [max(1, round(z * h)), max(1, round(z * w))])


def make_transform(train: bool, image_size: int, aug: Augment) -> v2.Compose:
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not train:
        return v2.Compose([v2.Resize((image_size, image_size), antialias=True)] + tail)
    return v2.Compose([CenterZoom(aug.zoom), v2.Resize((image_size, image_size), antialias=True),
                       v2.RandomRotation(aug.rotate, interpolation=v2.InterpolationMode.BILINEAR, fill=0),
                       v2.RandomHorizontalFlip(aug.flip)] + tail)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` whose indices carry their epoch, ``(epoch, index)``: the dataset seeds the
    sample's augmentation from them (the sampler runs in the main process, so ``set_epoch`` reaches
    persistent workers). ``start`` leaves out the head of the rank's permutation (a resumed epoch's
    consumed samples): the rest are the same keys, hence the same augmented samples."""

    start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch  # the epoch of this pass's permutation, whatever set_epoch does meanwhile
        return ((epoch, i) for i in islice(super().__iter__(), self.start, None))


class ShardDataset(Dataset):
    """Map-style view of the selected shards, in DALI's global sample order.

    Indexed by ``i`` (deterministic transform) or ``(epoch, i)``: the transform's random draws then
    come from ``sample_seed(seed, epoch, i)``: the CPU generator is reseeded inside ``fork_rng``, so the
    process's own CPU (and CUDA) random state is untouched, even with ``num_workers=0``."""

    def __init__(self, sel: Selection, transform: v2.Compose | None, seed: int = 0) -> None:
        """``transform=None``: samples carry the raw JPEG bytes (decoded later, a batch at a time)."""
        self.items = [(tar, rec) for tar, idx in zip(sel.tars, sel.indexes) for rec in read_index(idx)]
        for tar, rec in self.items:
            missing = [f for f in FIELDS if f not in rec]
            if missing:
                raise ValueError(f"{tar}: a sample lacks field(s) {missing}")
        self.transform, self.seed = transform, seed
        self._fds: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, tar: str, span: tuple[int, int]) -> bytes:
        fd = self._fds.get(tar)
        if fd is None:
            fd = self._fds[tar] = os.open(tar, os.O_RDONLY)
        return os.pread(fd, span[1], span[0])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        epoch, i = key if isinstance(key, tuple) else (None, key)
        tar, rec = self.items[i]
        raw = torch.frombuffer(bytearray(self._read(tar, rec["jpg"])), dtype=torch.uint8)
        image = raw
        if self.transform is not None:
            image = decode_jpeg(raw, mode=ImageReadMode.RGB)
            if epoch is None:
                image = self.transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
                    image = self.transform(image)
        meta = torch.from_numpy(np.frombuffer(self._read(tar, rec["meta"]), "<f4").copy())
        label = int(np.frombuffer(self._read(tar, rec["label"]), "<i4")[0])
        sid = int(np.frombuffer(self._read(tar, rec["sid"]), "<i8")[0])
        return image, meta, torch.tensor(label), torch.tensor(sid)


def collate_raw(batch: list[tuple[torch.Tensor, ...]]) -> tuple:
    """Raw JPEGs stay a list (their lengths differ); the fixed-size fields are stacked."""
    raws, meta, label, sid = zip(*batch)
    return list(raws), torch.stack(meta), torch.stack(label), torch.stack(sid)


class TorchLoader:
    """Yields ``(image, meta, label, sample_id)``; a training loader yields epoch ``epoch`` (then the
    next one, unless ``set_epoch`` says otherwise), reshuffled per epoch by ``DistributedSampler``.

    With ``decode`` set, batches arrive as raw JPEGs and ``decode`` turns them into images on
    ``device`` (nvJPEG on a GPU). With ``prefetch`` (``torch_loader``'s default on a GPU), one thread
    decodes the next batch while the caller trains on this one, so the decode's host work (nvJPEG's
    Huffman phase, its kernel launches) overlaps the training step's instead of adding to it. Batches
    are decoded in order: the same batches and random draws as without the thread (tested)."""

    def __init__(self, loader: DataLoader, device: torch.device, epoch: int = 0,
                 decode: BatchAugment | None = None, prefetch: bool = False) -> None:
        self.loader, self.device, self.epoch, self.decode = loader, device, epoch, decode
        self.prefetch, self._handoff, self._active, self.start = prefetch, None, None, 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields this epoch's batches (the workers stay), from batch ``start`` on: a
        run resumed mid-epoch gets the rest of the epoch without reading or decoding the batches before
        it (the decoder's random draws for them are skipped over); later iterations are whole epochs."""
        if start < 0 or (start and not isinstance(self.loader.sampler, EpochSampler)):
            raise ValueError(f"start {start}: only a training loader starts mid-epoch, at a batch >= 0")
        self.epoch, self.start = epoch, start

    def _convert(self, batch: tuple) -> tuple[torch.Tensor, ...]:
        if self.decode is None:
            return tuple(t.to(self.device, non_blocking=True) for t in batch)
        raws, *rest = batch
        return (self.decode(raws), *(t.to(self.device, non_blocking=True) for t in rest))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """One pass at a time: a pass left unfinished is closed first (its decode thread waits for its
        batch in flight), so two passes never share the decoder's draws or the workers."""
        active = self._active() if self._active is not None else None
        if active is not None:
            active.close()
        current = self._pass(self.epoch, self.start)
        # a weak reference: the pass refers to the loader, and a cycle would leave the loader (and its workers) to
        # the cyclic collector, which may close the worker queues before the DataLoader's shutdown writes to them
        # (each worker then waited out its 5 s join timeout)
        self._active = weakref.ref(current)
        self.epoch, self.start = self.epoch + 1, 0  # taken by this pass, even one closed before its first batch
        return current

    def _pass(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        sampler = self.loader.sampler
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch)
            sampler.start = start * self.loader.batch_size
        if self.decode is not None:
            self.decode.set_epoch(epoch)
            self.decode.skip(start, self.loader.batch_size)
        if self.decode is None or not self.prefetch:
            for batch in self.loader:
                yield self._convert(batch)
            return
        # left early, the with-exit waits for the batch in flight: the next epoch's reseeding cannot race it
        with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
            pending = None
            for batch in self.loader:
                ahead = pool.submit(self._decode_ahead, batch)
                if pending is not None:
                    yield self._ready(pending.result())
                pending = ahead
            if pending is not None:
                yield self._ready(pending.result())

    def _decode_ahead(self, batch: tuple) -> tuple[tuple[torch.Tensor, ...], torch.cuda.Event | None]:
        """In the decode thread: the batch, and (on a GPU) an event its consumer's stream waits for.
        The thread's work is queued on streams of its own (a hand-off stream that only waits for the
        decoder's), never on the training stream, whose queued step it would otherwise stall."""
        if self.device.type != "cuda":
            return self._convert(batch), None
        if self._handoff is None:
            self._handoff = torch.cuda.Stream(self.device)
        with torch.cuda.device(self.device), torch.cuda.stream(self._handoff):  # a new thread starts on cuda:0
            out = self._convert(batch)
            done = torch.cuda.Event()
            done.record(self._handoff)
        return out, done

    def _ready(self, item: tuple) -> tuple[torch.Tensor, ...]:
        """In the caller's thread: its stream waits for the decode; the tensors are not recycled for
        the decode thread's stream while the caller's kernels may still read them."""
        out, done = item
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            for t in out:
                t.record_stream(stream)
        return out


def torch_loader(sel: Selection, spec: LoaderSpec, batch_decode: bool | None = None) -> tuple[TorchLoader, int]:
    """``batch_decode`` (default: on a GPU) decodes and augments whole batches in the main process
    on the target device instead of per sample in the workers."""
    train, batch_size, image_size, rank, world_size = (spec.train, spec.batch_size, spec.image_size, spec.rank,
                                                        spec.world_size)
    device, device_id, aug, seed, num_threads, epoch = (spec.device, spec.device_id, spec.aug, spec.seed,
                                                        spec.num_threads, spec.epoch)
    target = torch.device("cuda", device_id or 0) if device == "gpu" else torch.device("cpu")
    batch_decode = device == "gpu" if batch_decode is None else batch_decode
    decode = BatchAugment(train, image_size, aug, target, seed, epoch, rank) if batch_decode else None
    ds = ShardDataset(sel, None if batch_decode else make_transform(train, image_size, aug), seed)
    collate = collate_raw if batch_decode else None
    pin = torch.cuda.is_available()  # batches go to a GPU (the model's) even when decoded on the CPU
    if train:
        # every random crop/rotation/flip derives from (seed, epoch, sample) (or, decoding by batch, from
        # (seed, epoch, rank)), never from the process's RNG: a resumed run replays the same batches, as with DALI
        sampler = EpochSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        loader = DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=num_threads, persistent_workers=num_threads > 0,
                            pin_memory=pin, collate_fn=collate,
                            generator=torch.Generator().manual_seed(seed))  # leaves the process's RNG alone
    else:
        n = len(ds)
        part = Subset(ds, range(n * rank // world_size, n * (rank + 1) // world_size))
        loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_threads,
                            persistent_workers=num_threads > 0, pin_memory=pin,
                            collate_fn=collate)
    # the decode thread only on a GPU: on CPU cores it competes with the training step for them
    wrapped = TorchLoader(loader, target, epoch, decode, prefetch=target.type == "cuda")
    return wrapped, len(wrapped)
