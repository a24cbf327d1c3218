"""Zoom-SE: squeeze-excitation whose squeeze is a P×P adaptive max pool followed by a mean.

Xing et al., Sec. III-A. ``pool_size`` P = 1 is a global-max-pool SE; when P is a whole multiple of
both feature-map sides every input cell weighs equally, i.e. a plain (average-pool) SE block.
"""
from __future__ import annotations

import torch
from torch import nn


class ZoomSE(nn.Module):
    def __init__(self, channels: int, pool_size: int = 4, rd_ratio: float = 1 / 16,
                 rd_channels: int | None = None, act_layer: type[nn.Module] = nn.ReLU,
                 gate_layer: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        if pool_size < 1:
            raise ValueError(f"pool_size must be a positive integer, got {pool_size}")
        self.pool_size = pool_size
        rd_channels = rd_channels or max(1, int(channels * rd_ratio))
        self.pool = nn.AdaptiveMaxPool2d(pool_size)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = gate_layer()

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        """Zoom-in and squeeze: (B, C, H, W) → (B, C, 1, 1)."""
        return self.pool(x).mean((2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.fc2(self.act(self.fc1(self.squeeze(x))))
        return x * self.gate(q)


class AttnBlock(nn.Module):
    """A residual block followed by its attention module (keys: ``block.*``, ``attn.*``)."""

    def __init__(self, block: nn.Module, attn: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.block(x))
