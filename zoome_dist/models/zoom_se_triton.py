"""Zoom-SE in Triton (``model.zoom_se_impl: triton``): the fused autograd function's contract, in four kernels.

- ``_pool_mean``: the P×P adaptive max pool with PyTorch's window bounds (``floor(i·H/P)`` to
  ``ceil((i+1)·H/P)``, any map size) and tie-breaking (the first maximum in row-major order wins; a NaN
  wins, the last one), read straight from either memory layout; it writes the argmax of each cell and the
  mean of the P² maxima per channel (the squeeze), never the pooled map.
- ``_gate``: ``y = u · g`` (g rounded to u's dtype first, as ``u * g.to(u.dtype)``).
- ``_backward``: one read of ``dy`` and ``u`` gives ``dx = dy · g`` and, per channel, the gradient of the
  gate's pre-activation ``Σ(dy·u) · g · (1 − g)`` (fp32).
- ``_scatter``: the pooled gradient (``ds / P²``) added at the argmax cells (one program per channel block
  walks its cells in order, so cells that share an argmax add up, as ``scatter_add_``).

The gate MLP between them is a handful of (B, C) matrix products in torch (``zoom_gate.gate_mlp``). A map is
read in its own layout (NCHW or channels_last; others are made NCHW-contiguous first): every kernel takes the
strides, and ``h·W + w`` addresses a cell in both (``stride(H) == W·stride(W)``).

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module
is imported): that is how the tests check them against ATen; speed is measured on a GPU (``launchers/gpu_check.sh``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from zoome_dist.models.zoom_gate import gate_mlp, gate_mlp_backward

BLOCK_C = 32      # channels per program (pool, backward, scatter)
BLOCK_HW = 32     # cells per step of the backward's walk over the map
BLOCK = 1024      # elements per program of the gate multiply


@triton.jit
def _pool_mean(u_ptr, s_ptr, idx_ptr, C, H, W, s_b, s_c, s_h, s_w, P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    base = u_ptr + b * s_b + cs * s_c
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(P):
        r0 = (i * H) // P
        r1 = ((i + 1) * H + P - 1) // P
        for j in range(P):
            c0 = (j * W) // P
            c1 = ((j + 1) * W + P - 1) // P
            best = tl.full([BLOCK_C], float("-inf"), tl.float32)
            arg = tl.zeros([BLOCK_C], dtype=tl.int32) + (r0 * W + c0)
            for r in range(r0, r1):
                for c in range(c0, c1):
                    v = tl.load(base + r * s_h + c * s_w, mask=cm, other=float("-inf")).to(tl.float32)
                    take = (v > best) | (v != v)
                    best = tl.where(take, v, best)
                    arg = tl.where(take, r * W + c, arg)
            acc += best
            tl.store(idx_ptr + (b * C + cs) * (P * P) + (i * P + j), arg, mask=cm)
    tl.store(s_ptr + b * C + cs, acc / (P * P), mask=cm)


@triton.jit
def _gate(u_ptr, g_ptr, y_ptr, N, C, HW, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    if CHANNELS_LAST:
        c = offs % C
        b = offs // (HW * C)
    else:
        c = (offs // HW) % C
        b = offs // (C * HW)
    u = tl.load(u_ptr + offs, mask=m, other=0.0)
    g = tl.load(g_ptr + b * C + c, mask=m, other=0.0).to(u.dtype).to(tl.float32)
    tl.store(y_ptr + offs, (u.to(tl.float32) * g).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _backward(dy_ptr, u_ptr, g_ptr, dx_ptr, dq_ptr, C, HW, s_b, s_c, s_hw, BLOCK_C: tl.constexpr,
              BLOCK_HW: tl.constexpr):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    g32 = tl.load(g_ptr + b * C + cs, mask=cm, other=0.0)
    g = g32.to(dx_ptr.dtype.element_ty).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, HW, BLOCK_HW):
        hw = start + tl.arange(0, BLOCK_HW)
        m = cm[:, None] & (hw < HW)[None, :]
        off = b * s_b + cs[:, None] * s_c + hw[None, :] * s_hw
        dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + off, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(dy * u, axis=1)
        tl.store(dx_ptr + off, (dy * g[:, None]).to(dx_ptr.dtype.element_ty), mask=m)
    tl.store(dq_ptr + b * C + cs, acc * g32 * (1.0 - g32), mask=cm)


@triton.jit
def _scatter(dx_ptr, idx_ptr, ds_ptr, C, s_b, s_c, s_hw, CELLS: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    ds = tl.load(ds_ptr + b * C + cs, mask=cm, other=0.0) / CELLS
    ds = ds.to(dx_ptr.dtype.element_ty).to(tl.float32)
    for k in range(CELLS):
        at = tl.load(idx_ptr + (b * C + cs) * CELLS + k, mask=cm, other=0)
        ptr = dx_ptr + b * s_b + cs * s_c + at * s_hw
        cur = tl.load(ptr, mask=cm, other=0.0).to(tl.float32)
        tl.store(ptr, (cur + ds).to(dx_ptr.dtype.element_ty), mask=cm)


KERNELS = (_pool_mean, _gate, _backward, _scatter)  # the launches of one block's step (counted by the benchmarks)


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` in a layout the kernels read (NCHW or channels_last, dense), and whether it is channels_last."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def pool_mean(u: torch.Tensor, pool_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, idx)``: the mean over the P×P adaptive max pool per channel (B, C; fp32) and each cell's argmax
    as ``h·W + w`` (B, C, P, P; int32), equal to ``F.adaptive_max_pool2d(u, P, return_indices=True)``'s."""
    u, _ = _dense(u)
    b, c, h, w = u.shape
    s = torch.empty(b, c, device=u.device, dtype=torch.float32)
    idx = torch.empty(b, c, pool_size, pool_size, device=u.device, dtype=torch.int32)
    _pool_mean[(b, triton.cdiv(c, BLOCK_C))](u, s, idx, c, h, w, *u.stride(), P=pool_size, BLOCK_C=BLOCK_C)
    return s, idx


class TritonZoomGate(torch.autograd.Function):
    """``_ZoomGate``'s contract (y = u ⊙ gate(mean(maxpool_P(u)))) with Triton kernels; called with autocast off."""

    @staticmethod
    def forward(ctx, u, pool_size: int, w1, b1, w2, b2):  # noqa: D401 - autograd signature
        u, channels_last = _dense(u)
        s, idx = pool_mean(u, pool_size)
        h, g = gate_mlp(s, w1, b1, w2, b2)
        y = torch.empty_like(u)
        _gate[(triton.cdiv(u.numel(), BLOCK),)](u, g, y, u.numel(), u.shape[1], u.shape[2] * u.shape[3],
                                                CHANNELS_LAST=channels_last, BLOCK=BLOCK)
        ctx.save_for_backward(u, idx, s, h, g, w1, w2)
        ctx.cells = pool_size * pool_size
        return y

    @staticmethod
    def backward(ctx, dy):
        u, idx, s, h, g, w1, w2 = ctx.saved_tensors
        b, c = u.shape[:2]
        dy = dy.contiguous(memory_format=torch.channels_last if _dense(u)[1] else torch.contiguous_format)
        dx, dq = torch.empty_like(u), torch.empty(b, c, device=u.device, dtype=torch.float32)
        grid = (b, triton.cdiv(c, BLOCK_C))
        s_b, s_c, _, s_w = u.stride()
        _backward[grid](dy, u, g, dx, dq, c, u.shape[2] * u.shape[3], s_b, s_c, s_w, BLOCK_C=BLOCK_C,
                        BLOCK_HW=BLOCK_HW)
        ds, *dweights = gate_mlp_backward(dq, s, h, w1, w2)
        _scatter[grid](dx, idx, ds.contiguous(), c, s_b, s_c, s_w, CELLS=ctx.cells, BLOCK_C=BLOCK_C)
        return dx, None, *dweights
