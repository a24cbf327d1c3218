"""Zoom-SE: squeeze-excitation whose squeeze is a P×P adaptive max pool followed by a mean.

Xing et al., Sec. III-A. ``pool_size`` P = 1 is a global-max-pool SE; when P is a whole multiple of
both feature-map sides every input cell weighs equally, i.e. a plain (average-pool) SE block.

The forward (``impl``, config ``model.zoom_se_impl``) is one of:
- ``fused`` (``auto`` today): one autograd function whose backward scatters the max-pool gradient straight
  into ``dy * gate`` instead of building a dense zero tensor and adding it, which saves several full passes
  over the feature map per block;
- ``triton``: the same function with Triton kernels for the pool, the gate MLP, the gate multiply and a one-pass
  backward (``zoom_se_triton.py``; CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` for tests). On other
  tensors (a model trained so, predicting on a CPU machine) the block runs ``fused``: the same numbers;
- ``plain``: plain autograd, the reference.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


IMPLS = ("auto", "triton", "fused", "plain")


def _gate_mlp(s: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor):
    """The gate from the squeezed channels ``s`` (B, C), in float32: ``(h, g)``, the hidden layer and the gate."""
    h = F.relu(F.linear(s, w1.float(), b1.float()))
    return h, torch.sigmoid(F.linear(h, w2.float(), b2.float()))


def _gate_mlp_backward(dq: torch.Tensor, s: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """From the gradient ``dq`` (B, C) of the gate's pre-activation (``dg · g · (1 − g)``): the gradient of the
    squeeze ``s`` (the sum over the pooled cells; divide by P² for one cell's share) and of the MLP's weights,
    as ``(ds, dw1, db1, dw2, db2)``, the weights' in their dtype."""
    dw2, db2 = dq.t() @ h, dq.sum(0)
    dpre = (dq @ w2.float()) * (h > 0)
    dw1, db1 = dpre.t() @ s, dpre.sum(0)
    return dpre @ w1.float(), dw1.to(w1.dtype), db1.to(w1.dtype), dw2.to(w2.dtype), db2.to(w2.dtype)


_KERNELS: dict = {}


def _triton_kernels():
    """The Triton module, imported once (it imports triton: only where the Triton path runs)."""
    if not _KERNELS:
        from zoome_dist.models import zoom_se_triton

        _KERNELS["module"] = zoom_se_triton
    return _KERNELS["module"]


def _triton_gate():
    """The Triton path: its autograd function eagerly; under ``torch.compile`` the ``zoome::zoom_gate`` op (the
    same kernels, opaque to dynamo and inductor)."""
    kernels = _triton_kernels()
    if torch.compiler.is_compiling():  # u made dense here, once: the op's autograd saves it as it comes
        return lambda u, *args: kernels.zoom_gate(kernels.dense(u), *args)[0]
    return kernels.TritonZoomGate.apply


class _ZoomGate(torch.autograd.Function):
    """y = u ⊙ sigmoid(W2 relu(W1 mean(maxpool_P(u)) + b1) + b2), with a hand-written backward."""

    @staticmethod
    def forward(ctx, u, pool_size: int, w1, b1, w2, b2):  # noqa: D401 - autograd signature
        """Called with autocast off (``ZoomSE.forward``): the gate MLP runs in float32."""
        h, w = u.shape[-2:]
        if h % pool_size == 0 and w % pool_size == 0:
            # the same windows, values and (tie-broken) indices as the adaptive pool (tested), through
            # max_pool2d's kernels, which have a native channels_last path (docs: BENCHMARKS.md, GPU)
            z, idx = F.max_pool2d(u, (h // pool_size, w // pool_size), return_indices=True)
        else:
            z, idx = F.adaptive_max_pool2d(u, pool_size, return_indices=True)
        s = z.float().mean((2, 3))
        h, g = _gate_mlp(s, w1, b1, w2, b2)
        ctx.save_for_backward(u, idx, s, h, g, w1, w2)
        ctx.cells = z.shape[2] * z.shape[3]
        return u * g.to(u.dtype)[:, :, None, None]

    @staticmethod
    def backward(ctx, dy):
        u, idx, s, h, g, w1, w2 = ctx.saved_tensors
        dg = (dy * u).sum((2, 3), dtype=torch.float32)
        ds, *dweights = _gate_mlp_backward(dg * g * (1 - g), s, h, w1, w2)
        ds = ds / ctx.cells
        dx = dy * g.to(dy.dtype)[:, :, None, None]
        b, c = ds.shape
        src = ds.to(dx.dtype)[:, :, None].expand(b, c, idx.shape[2] * idx.shape[3])
        if not (dx.is_contiguous() or dx.is_contiguous(memory_format=torch.channels_last)):
            dx = dx.contiguous()
        if dx.is_contiguous():
            dx.view(b, c, -1).scatter_add_(2, idx.reshape(b, c, -1), src)
        else:  # channels_last: scatter along H*W of the (B, H*W, C) view
            dx.permute(0, 2, 3, 1).view(b, -1, c).scatter_add_(
                1, idx.permute(0, 2, 3, 1).reshape(b, -1, c), src.transpose(1, 2))
        return dx, None, *dweights


class SlicedAdaptiveMaxPool2d(nn.Module):
    """``AdaptiveMaxPool2d(P)`` as P×P explicit window maxima (PyTorch's window bounds): the same numbers,
    built from slicing and ``amax`` only, which ONNX can express (it has no adaptive max pool). For
    export, where feature-map sizes are fixed."""

    def __init__(self, output_size: int) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, (h, w) = self.output_size, x.shape[-2:]
        rows = []
        for i in range(p):
            r0, r1 = (i * h) // p, -(-(i + 1) * h // p)
            rows.append(torch.stack([x[..., r0:r1, (j * w) // p:-(-(j + 1) * w // p)].amax((-2, -1))
                                     for j in range(p)], -1))
        return torch.stack(rows, -2)


class ZoomSE(nn.Module):
    """``gate_bias``: None keeps PyTorch's initialisation (gates ≈ 0.5 at start); a value zeroes the
    second layer's weights and sets its bias, so every gate starts at ``sigmoid(gate_bias)`` for every
    input (3 → 0.95; 20 → 1.0 in float32: the block starts as the identity)."""

    def __init__(self, channels: int, pool_size: int = 4, rd_ratio: float = 1 / 16,
                 rd_channels: int | None = None, act_layer: type[nn.Module] = nn.ReLU,
                 gate_layer: type[nn.Module] = nn.Sigmoid, impl: str = "auto",
                 gate_bias: float | None = None) -> None:
        super().__init__()
        if pool_size < 1:
            raise ValueError(f"pool_size must be a positive integer, got {pool_size}")
        if impl not in IMPLS:
            raise ValueError(f"Invalid Zoom-SE impl {impl!r}. Valid: {list(IMPLS)}")
        self.pool_size = pool_size
        rd_channels = rd_channels or max(1, int(channels * rd_ratio))
        self.pool = nn.AdaptiveMaxPool2d(pool_size)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=True)
        self.act = act_layer(inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=True)
        self.gate = gate_layer()
        if gate_bias is not None:
            nn.init.zeros_(self.fc2.weight)
            nn.init.constant_(self.fc2.bias, gate_bias)
        # auto: the fused path, until a GPU check shows the Triton one equal and faster (BENCHMARKS.md). The
        # fused and Triton paths hard-code ReLU and sigmoid; other layers use the reference path.
        impl = "fused" if impl == "auto" else impl
        self.impl = impl if act_layer is nn.ReLU and gate_layer is nn.Sigmoid else "plain"

    def squeeze(self, x: torch.Tensor) -> torch.Tensor:
        """Zoom-in and squeeze: (B, C, H, W) → (B, C, 1, 1)."""
        return self.pool(x).mean((2, 3), keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl != "plain":
            gate = _triton_gate() if self.impl == "triton" and (
                x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") else _ZoomGate.apply
            # autocast off around the function, not inside its forward: torch.compile (dynamo) does not
            # restore autocast after an autograd function's forward that turns it off, so every later
            # op of the model ran without it (bf16 activations met float32 weights: compile failed)
            with torch.autocast(x.device.type, enabled=False):
                return gate(x, self.pool_size, self.fc1.weight.flatten(1), self.fc1.bias,
                            self.fc2.weight.flatten(1), self.fc2.bias)
        q = self.fc2(self.act(self.fc1(self.squeeze(x))))
        return x * self.gate(q)


class AttnBlock(nn.Module):
    """A residual block followed by its attention module (keys: ``block.*``, ``attn.*``): the gate
    multiplies the block's *output*, after the residual add and ReLU (our reading of the paper,
    ``model.zoom_se_placement: output``)."""

    def __init__(self, block: nn.Module, attn: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.attn = attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.block(x))


class ResidualAttnBlock(AttnBlock):
    """The attention module on the residual *branch*, before the add (SE-Net's place,
    ``model.zoom_se_placement: residual``): ``relu(attn(branch(x)) + shortcut(x))``. Same keys as
    ``AttnBlock``; the block is a torchvision ``Bottleneck`` or ``BasicBlock``, whose forward this
    repeats with the gate inserted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        out = b.relu(b.bn1(b.conv1(x)))
        out = b.bn2(b.conv2(out))
        if hasattr(b, "conv3"):  # Bottleneck
            out = b.bn3(b.conv3(b.relu(out)))
        identity = x if b.downsample is None else b.downsample(x)
        return b.relu(self.attn(out) + identity)
