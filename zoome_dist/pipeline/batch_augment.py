"""Whole-batch JPEG decode and augmentation on one device: nvJPEG on a GPU, the same code on a CPU.

The torch loader's GPU path for hosts without DALI (another CUDA major, DALI not installed): the
DataLoader workers only read bytes; the main process decodes the batch with
``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG) and augments it on the GPU. The same
function on the CPU is its tested twin. Random draws come from a CPU generator seeded by
``(seed, epoch, rank)``; a run resumed mid-epoch draws (``skip``) but does not decode the batches
it had consumed, so its next batch gets the same values as in the uninterrupted run.
Order as in ``Augment``: centred zoom crop → resize → rotate (zero fill) → flip → normalise.

On a GPU the work runs on a side stream of its own. ``decode_jpeg(device="cuda")`` lets nvJPEG write
its outputs before work already queued on the allocating stream has run (pytorch/vision#9606), so a
block freed by queued kernels can be overwritten under them: seen here as NaN predictions once the
training loop stopped synchronising every step. The side stream is synchronised before each decode
(only the previous batch's augmentation can be queued there, never the training step), and the
training stream waits for it: the host still runs ahead of the model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from zoome_dist.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, Augment, loader_seed


class BatchAugment:
    """``raw JPEG byte tensors → (B, 3, S, S)`` float, normalised, on ``device``."""

    def __init__(self, train: bool, image_size: int, aug: Augment, device: torch.device,
                 seed: int = 0, epoch: int = 0, rank: int = 0) -> None:
        self.train, self.size, self.aug, self.device = train, image_size, aug, torch.device(device)
        self.seed, self.rank = seed, rank
        self.gen = torch.Generator()
        self.set_epoch(epoch)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        if self.stream is not None:  # mean/std above were written on the current stream; the side stream reads them
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def set_epoch(self, epoch: int) -> None:
        """Restart the random draws at this epoch's seed: the epoch's batches then get the same values
        however many batches (and epochs) this object served before."""
        self.gen.manual_seed(loader_seed(self.seed, epoch, self.rank))

    def skip(self, batches: int, batch_size: int) -> None:
        """Draw what ``batches`` batches of ``batch_size`` would have drawn, without decoding them (a
        resumed epoch's consumed batches): the next batch then gets the draws it gets in a whole epoch."""
        if self.train:
            for _ in range(batches):
                self._draw(batch_size)

    def _draw(self, b: int) -> tuple[list[float], list[float], list[bool]]:
        """Per image: zoom fraction, rotation angle (degrees), horizontal flip."""
        lo, hi = self.aug.zoom
        zoom = (lo + (hi - lo) * torch.rand(b, generator=self.gen)).tolist()
        angle = ((2 * torch.rand(b, generator=self.gen) - 1) * self.aug.rotate).tolist()
        flip = (torch.rand(b, generator=self.gen) < self.aug.flip).tolist()
        return zoom, angle, flip

    def decode(self, raws: list[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 (3, H, W) per image; one batched nvJPEG call on a GPU."""
        if self.device.type == "cuda":
            return decode_jpeg(raws, mode=ImageReadMode.RGB, device=self.device)
        return [decode_jpeg(r, mode=ImageReadMode.RGB) for r in raws]

    def __call__(self, raws: list[torch.Tensor]) -> torch.Tensor:
        if self.stream is None:
            return self._augment(raws)
        main = torch.cuda.current_stream(self.device)
        self.stream.synchronize()  # nothing queued on the decoder's stream may still read freed blocks
        with torch.cuda.stream(self.stream):
            x = self._augment(raws)
        main.wait_stream(self.stream)
        x.record_stream(main)  # not recycled for the side stream while the model still reads it
        return x

    def _augment(self, raws: list[torch.Tensor]) -> torch.Tensor:
        images = self.decode(raws)
        b = len(images)
        zoom, angle, flip = self._draw(b) if self.train else ([1.0] * b, [0.0] * b, [False] * b)
        x = torch.cat([self._crop_resize(img, z) for img, z in zip(images, zoom)])
        if any(angle):
            x = rotate(x, torch.tensor(angle, device=self.device))
        if any(flip):
            x = torch.where(torch.tensor(flip, device=self.device).view(-1, 1, 1, 1), x.flip(-1), x)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def _crop_resize(self, img: torch.Tensor, z: float) -> torch.Tensor:
        h, w = img.shape[-2:]
        ch, cw = max(1, round(z * h)), max(1, round(z * w))
        top, left = (h - ch) // 2, (w - cw) // 2
        crop = img[None, :, top:top + ch, left:left + cw].float()
        return F.interpolate(crop, size=(self.size, self.size), mode="bilinear", antialias=True,
                             align_corners=False)


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each (square) image of ``x`` about its centre, bilinear, zero fill, size kept."""
    a = degrees.to(x.dtype) * (math.pi / 180)
    cos, sin, zero = a.cos(), a.sin(), torch.zeros_like(a)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
