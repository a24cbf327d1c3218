"""Zoom-SE in Triton (``model.zoom_se_impl: triton``): the fused autograd function's contract in six kernels,
with nothing but allocations between them on the host.

Forward:
- ``_pool_max``: the P×P adaptive max pool with PyTorch's window bounds (``floor(i·H/P)`` to
  ``ceil((i+1)·H/P)``, any map size) and tie-breaking (the first maximum in row-major order wins; a NaN
  wins, the last one), read straight from either memory layout, one program per (sample, channel block,
  window), a window row per load; it writes each window's maximum and argmax cell into the workspace.
- ``_mlp_forward``: per block of 16 samples and 64 gates, the squeeze ``s`` (the mean of the P² maxima), then
  the gate MLP, ``h = relu(W1 s + b1)``, ``g = sigmoid(W2 h + b2)`` (fp32 matrix products, ``tl.dot``).
- ``_gate``: ``y = u · g`` (g rounded to u's dtype first, as ``u * g.to(u.dtype)``).

Backward:
- ``_backward``: one read of ``dy`` and ``u`` gives ``dx = dy · g`` and, per channel, the gradient of the
  gate's pre-activation ``dq = Σ(dy·u) · g · (1 − g)`` (fp32).
- ``_mlp_backward_rows``: per block of samples and channels, ``dpre = (W2ᵀ dq) ⊙ (h > 0)`` and ``ds = W1ᵀ dpre``,
  whose share
  ``ds / P²`` it adds to ``dx`` at each channel's argmax cells, in cell order (cells that share an argmax add
  up, as ``scatter_add_``).
- ``_mlp_backward_weights``: the weight and bias gradients, each tile summed over the batch in order
  (deterministic: no atomics).

A map is read in its own layout (NCHW or channels_last; others are made NCHW-contiguous first): every kernel
takes the strides, and ``h·W + w`` addresses a cell in both (``stride(H) == W·stride(W)``).

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before Triton is
imported): that is how the tests check them against ATen and plain autograd; speed is measured on a GPU
(``launchers/gpu_check.sh``).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

BLOCK_C = 32      # channels per program or step
BLOCK_HW = 32     # cells per step of the backward's walk over the map
BLOCK_R = 32      # hidden units per tile of the weight gradients
BLOCK_B = 16      # samples per program of the gate MLP (a matrix product's smallest side)
BLOCK_G = 64      # gates (channels) per program of the gate MLP
MAX_HIDDEN = 256  # the gate MLP's hidden layer is one tile of the next power of two ≥ R
BLOCK = 1024      # elements per program of the gate multiply


@triton.jit
def _pool_max(u_ptr, z_ptr, idx_ptr, H, W, C, ld, s_b, s_c, s_h, s_w, P: tl.constexpr, BLOCK_C: tl.constexpr,
              BLOCK_W: tl.constexpr):
    # One P×P window (program axis 2) of a block of channels: its maximum and argmax, a row of the window at a time
    # (a [channels × columns] tile per row: each load reads along the layout's contiguous axis, channels in
    # channels_last, columns in NCHW).
    b = tl.program_id(0).to(tl.int64)  # offsets past 2³¹ elements
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cell = tl.program_id(2)
    i, j = cell // P, cell % P
    r0, r1 = (i * H) // P, ((i + 1) * H + P - 1) // P
    c0, c1 = (j * W) // P, ((j + 1) * W + P - 1) // P
    cols = c0 + tl.arange(0, BLOCK_W)
    cm, wm = cs < C, cols < c1
    base = u_ptr + b * s_b + cs[:, None] * s_c + cols[None, :] * s_w
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_C], dtype=tl.int32) + (r0 * W + c0)
    for r in range(r0, r1):
        v = tl.load(base + r * s_h, mask=cm[:, None] & wm[None, :], other=float("-inf")).to(tl.float32)
        nan = v != v
        top = tl.max(tl.where(nan, float("-inf"), v), axis=1)
        first = tl.min(tl.where(v == top[:, None], cols[None, :], W), axis=1)  # ties: the first column
        last_nan = tl.max(tl.where(nan, cols[None, :], -1), axis=1)  # NaN wins; of NaNs, the last one
        take_nan = last_nan >= 0
        take = take_nan | (top > best)  # strict: on a tie the earlier row keeps it
        best = tl.where(take_nan, float("nan"), tl.where(take, top, best))
        arg = tl.where(take, r * W + tl.where(take_nan, last_nan, first), arg)
    at = b * ld + cell * C + cs  # cell-major rows: the stores, and the MLP kernels' loads, are contiguous
    tl.store(z_ptr + at, best, mask=cm)
    tl.store(idx_ptr + at, arg.to(tl.float32, bitcast=True), mask=cm)


@triton.jit
def _gate(u_ptr, g_ptr, y_ptr, N, C, HW, ld, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    if CHANNELS_LAST:
        c = offs % C
        b = offs // (HW * C)
    else:
        c = (offs // HW) % C
        b = offs // (C * HW)
    u = tl.load(u_ptr + offs, mask=m, other=0.0)
    g = tl.load(g_ptr + b * ld + c, mask=m, other=0.0).to(u.dtype).to(tl.float32)
    tl.store(y_ptr + offs, (u.to(tl.float32) * g).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _backward(dy_ptr, u_ptr, g_ptr, dx_ptr, dq_ptr, C, HW, ld, s_b, s_c, s_hw, BLOCK_C: tl.constexpr,
              BLOCK_HW: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # offsets past 2³¹ elements
    cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cs < C
    g32 = tl.load(g_ptr + b * ld + cs, mask=cm, other=0.0)
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
    tl.store(dq_ptr + b * ld + cs, acc * g32 * (1.0 - g32), mask=cm)


@triton.jit
def _tile(ptr, rows, cols, row_stride, col_stride, mask_rows, mask_cols):
    # an fp32 [rows × cols] tile of a strided matrix (zeros outside the masks)
    return tl.load(ptr + rows.to(tl.int64)[:, None] * row_stride + cols[None, :] * col_stride,
                   mask=mask_rows[:, None] & mask_cols[None, :], other=0.0).to(tl.float32)


@triton.jit
def _sample_block(B, ld, BLOCK_B: tl.constexpr):
    # the gate MLP kernels' samples (program axis 0): their indices, which exist, and their workspace row offsets
    bs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    return bs, bs < B, bs.to(tl.int64) * ld  # offsets past 2³¹ elements


@triton.jit
def _mlp_forward(z_ptr, s_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, h_ptr, g_ptr, B, C, R, ld, w1_r, w1_c, w2_c, w2_r,
                 P: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
                 RR: tl.constexpr):
    # Program (sample block, gate block): the squeeze s of its samples (the mean of the P² window maxima z, in
    # window order), h = relu(s W1ᵀ + b1) (all RR ≥ R hidden units in one tile), then its BLOCK_G gates,
    # g = sigmoid(h W2ᵀ + b2); fp32 matrix products. Every gate block recomputes s and h (C·R per sample: cheap)
    # rather than waiting for another program; the first one stores them for the backward.
    bs, bm, rows = _sample_block(B, ld, BLOCK_B)
    first = tl.program_id(1) == 0
    rs = tl.arange(0, RR)
    rm = rs < R
    acc = tl.zeros([BLOCK_B, RR], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < C
        m = bm[:, None] & cm[None, :]
        sq = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for k in tl.static_range(P * P):
            sq += tl.load(z_ptr + rows[:, None] + k * C + cs[None, :], mask=m, other=0.0)
        sq = sq / (P * P)
        if first:
            tl.store(s_ptr + rows[:, None] + cs[None, :], sq, mask=m)
        acc += tl.dot(sq, _tile(w1_ptr, cs, rs, w1_c, w1_r, cm, rm), input_precision="ieee")
    bias = tl.load(b1_ptr + rs, mask=rm, other=0.0).to(tl.float32)
    hid = tl.maximum(acc + bias[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
    if first:
        tl.store(h_ptr + rows[:, None] + rs[None, :], hid, mask=bm[:, None] & rm[None, :])
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    gm = gs < C
    q = tl.dot(hid, _tile(w2_ptr, rs, gs, w2_r, w2_c, rm, gm), input_precision="ieee")
    bias = tl.load(b2_ptr + gs, mask=gm, other=0.0).to(tl.float32)
    tl.store(g_ptr + rows[:, None] + gs[None, :], tl.sigmoid(q + bias[None, :]), mask=bm[:, None] & gm[None, :])


@triton.jit
def _mlp_backward_rows(dq_ptr, h_ptr, w1_ptr, w2_ptr, dpre_ptr, dx_ptr, idx_ptr, B, C, R, ld, w1_r, w1_c,
                       w2_c, w2_r, s_b, s_c, s_hw, CELLS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_G: tl.constexpr, RR: tl.constexpr):
    # Program (sample block, channel block): dpre = (dq W2) ⊙ (h > 0) (recomputed by every channel block; the first
    # stores it), then ds = dpre W1 for its BLOCK_G channels, added (÷ P²) to dx at each channel's argmax cells in
    # cell order (so cells sharing an argmax add up, as ``scatter_add_``). Each (sample, channel) is one program's.
    bs, bm, rows = _sample_block(B, ld, BLOCK_B)
    rs = tl.arange(0, RR)
    rm = rs < R
    acc = tl.zeros([BLOCK_B, RR], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        cm = cs < C
        acc += tl.dot(_tile(dq_ptr, bs, cs, ld, 1, bm, cm), _tile(w2_ptr, cs, rs, w2_c, w2_r, cm, rm),
                      input_precision="ieee")
    m = bm[:, None] & rm[None, :]
    dpre = tl.where(tl.load(h_ptr + rows[:, None] + rs[None, :], mask=m, other=0.0) > 0, acc, 0.0)
    if tl.program_id(1) == 0:
        tl.store(dpre_ptr + rows[:, None] + rs[None, :], dpre, mask=m)
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    gm = gs < C
    ds = tl.dot(dpre, _tile(w1_ptr, rs, gs, w1_r, w1_c, rm, gm), input_precision="ieee")
    ds = (ds / CELLS).to(dx_ptr.dtype.element_ty).to(tl.float32)
    m = bm[:, None] & gm[None, :]
    base = dx_ptr + bs.to(tl.int64)[:, None] * s_b + gs[None, :] * s_c
    for k in range(CELLS):
        at = tl.load(idx_ptr + rows[:, None] + k * C + gs[None, :], mask=m, other=0.0).to(tl.int32, bitcast=True)
        cur = tl.load(base + at * s_hw, mask=m, other=0.0).to(tl.float32)
        tl.store(base + at * s_hw, (cur + ds).to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _mlp_backward_weights(dq_ptr, dpre_ptr, s_ptr, h_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr, B, C, R, ld,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    # One (channel block, hidden block) tile of the weight gradients, summed over the batch in order:
    # dW2 = Σ dq ⊗ h, dW1 = Σ dpre ⊗ s; the biases by the tiles of the first column / row.
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rs = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cm, rm = cs < C, rs < R
    dw2 = tl.zeros([BLOCK_C, BLOCK_R], dtype=tl.float32)
    dw1 = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    db2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    db1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    for b in range(B):
        row = tl.cast(b, tl.int64) * ld
        dq = tl.load(dq_ptr + row + cs, mask=cm, other=0.0)
        dpre = tl.load(dpre_ptr + row + rs, mask=rm, other=0.0)
        hid = tl.load(h_ptr + row + rs, mask=rm, other=0.0)
        x = tl.load(s_ptr + row + cs, mask=cm, other=0.0)
        dw2 += dq[:, None] * hid[None, :]
        dw1 += dpre[:, None] * x[None, :]
        db2 += dq
        db1 += dpre
    tl.store(dw2_ptr + cs[:, None] * R + rs[None, :], dw2.to(dw2_ptr.dtype.element_ty), mask=cm[:, None] & rm[None, :])
    tl.store(dw1_ptr + rs[:, None] * C + cs[None, :], dw1.to(dw1_ptr.dtype.element_ty), mask=rm[:, None] & cm[None, :])
    if tl.program_id(1) == 0:
        tl.store(db2_ptr + cs, db2.to(db2_ptr.dtype.element_ty), mask=cm)
    if tl.program_id(0) == 0:
        tl.store(db1_ptr + rs, db1.to(db1_ptr.dtype.element_ty), mask=rm)


# the launches of one block's step (counted by the benchmarks)
KERNELS = (_pool_max, _mlp_forward, _gate, _backward, _mlp_backward_rows, _mlp_backward_weights)


def _device_of(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``x`` in a layout the kernels read (NCHW or channels_last, dense), and whether it is channels_last."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a layout the kernels read (``_dense``)."""
    return _dense(x)[0]


def _sizes(c: int, r: int, pool_size: int, grads: bool = True) -> dict[str, int]:
    grad = {"dq": c, "dpre": r} if grads else {}
    return {"s": c, "g": c, "h": r, **grad, "z": c * pool_size ** 2, "idx": c * pool_size ** 2}


def _workspace_regions(ws: torch.Tensor, c: int, r: int, pool_size: int, grads: bool = True) -> dict[str, torch.Tensor]:
    """The regions (views) of a workspace row: ``s | g | h | dq | dpre | z | idx`` (the squeeze, the gate, the
    hidden layer, their gradients, each window's maximum, and its argmax cell as int32 bits; the last two
    cell-major: window k of channel c at ``k·C + c``); without ``grads``, no ``dq | dpre``."""
    regions, at = {}, 0
    for name, size in _sizes(c, r, pool_size, grads).items():
        regions[name], at = ws[:, at:at + size], at + size
    return regions


def _workspace(u: torch.Tensor, pool_size: int, r: int,
               grads: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One fp32 workspace row per sample, and its regions (``_workspace_regions``)."""
    b, c = u.shape[:2]
    ws = torch.empty(b, sum(_sizes(c, r, pool_size, grads).values()), device=u.device, dtype=torch.float32)
    return ws, _workspace_regions(ws, c, r, pool_size, grads)


def _pool(u: torch.Tensor, pool_size: int, ws: torch.Tensor, regions: dict[str, torch.Tensor]) -> None:
    """Launch the pool: each window's maximum and argmax cell into their regions of the workspace ``ws``."""
    b, c, h, w = u.shape
    s_b, s_c, s_h, s_w = u.stride()
    widest = max(-(-(j + 1) * w // pool_size) - (j * w) // pool_size for j in range(pool_size))
    _pool_max[(b, triton.cdiv(c, BLOCK_C), pool_size ** 2)](
        u, regions["z"], regions["idx"], h, w, c, ws.shape[1], s_b, s_c, s_h, s_w, P=pool_size, BLOCK_C=BLOCK_C,
        BLOCK_W=triton.next_power_of_2(widest))


def pool_mean(u: torch.Tensor, pool_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, idx)``: the mean over the P×P adaptive max pool per channel (B, C; fp32) and each cell's argmax as
    ``h·W + w`` (B, C, P, P; int32), equal to ``F.adaptive_max_pool2d(u, P, return_indices=True)``'s."""
    u, _ = _dense(u)
    ws, regions = _workspace(u, pool_size, 0)
    _pool(u, pool_size, ws, regions)
    b, c = u.shape[:2]
    s = regions["z"].view(b, pool_size ** 2, c).mean(1)
    return s, regions["idx"].view(torch.int32).view(b, pool_size, pool_size, c).permute(0, 3, 1, 2)


def _hidden_tile(r: int) -> int:
    """The gate MLP's hidden-layer tile: the next power of two ≥ ``r`` (at least 16, a matrix product's side)."""
    if r > MAX_HIDDEN:
        raise ValueError(f"model.zoom_se_impl triton holds the gate MLP's hidden layer in one tile of at most "
                         f"{MAX_HIDDEN} units; this block has {r}: use zoom_se_impl fused")
    return max(16, triton.next_power_of_2(r))


def launch_forward(u: torch.Tensor, pool_size: int, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                   b2: torch.Tensor, grads: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's kernels on a dense ``u`` (``_dense``): ``(y, ws)``, the output and the fp32 workspace the
    backward reads (squeeze, gate, hidden layer, argmax cells; with ``grads``, room for the backward's
    per-sample gradients too, unwritten here)."""
    channels_last = not u.is_contiguous()
    b, c, h, w = u.shape
    r = w1.shape[0]
    ws, at = _workspace(u, pool_size, r, grads)
    ld = ws.shape[1]
    with _device_of(u):  # Triton launches on the current CUDA device: the input's
        _pool(u, pool_size, ws, at)
        _mlp_forward[(triton.cdiv(b, BLOCK_B), triton.cdiv(c, BLOCK_G))](
            at["z"], at["s"], w1, b1, w2, b2, at["h"], at["g"], b, c, r, ld, *w1.stride(), *w2.stride(), P=pool_size,
            BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_G=BLOCK_G, RR=_hidden_tile(r))
        y = torch.empty_like(u)
        _gate[(triton.cdiv(u.numel(), BLOCK),)](u, at["g"], y, u.numel(), c, h * w, ld,
                                                CHANNELS_LAST=channels_last, BLOCK=BLOCK)
    return y, ws


def launch_backward(dy: torch.Tensor, u: torch.Tensor, ws: torch.Tensor, pool_size: int, w1: torch.Tensor,
                    w2: torch.Tensor, grads: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's kernels: ``(dx, grads)``, the input gradient and the MLP's weight gradients as one flat
    buffer (``split_grads``). ``dy`` is in ``u``'s layout (``like``); the per-sample gradients (``dq``,
    ``dpre``) go into ``ws``'s regions for them (``grads``), else into a buffer of ``ws``'s width made here."""
    b, c = u.shape[:2]
    r, ld = w1.shape[0], ws.shape[1]
    at = _workspace_regions(ws, c, r, pool_size, grads)
    if grads:
        grad_at = at
    else:  # the kernels address every region with ws's row length
        extra = torch.empty_like(ws)
        grad_at = {"dq": extra[:, :c], "dpre": extra[:, c:c + r]}
    dx = torch.empty_like(u)
    s_b, s_c, _, s_w = u.stride()
    flat = torch.empty(2 * r * c + r + c, device=u.device, dtype=w1.dtype)
    dw1, db1, dw2, db2 = split_grads(flat, r, c)
    with _device_of(u):
        _backward[(b, triton.cdiv(c, BLOCK_C))](dy, u, at["g"], dx, grad_at["dq"], c, u.shape[2] * u.shape[3], ld,
                                                s_b, s_c, s_w, BLOCK_C=BLOCK_C, BLOCK_HW=BLOCK_HW)
        _mlp_backward_rows[(triton.cdiv(b, BLOCK_B), triton.cdiv(c, BLOCK_G))](
            grad_at["dq"], at["h"], w1, w2, grad_at["dpre"], dx, at["idx"], b, c, r, ld, *w1.stride(), *w2.stride(),
            s_b, s_c, s_w, CELLS=pool_size ** 2, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, BLOCK_G=BLOCK_G, RR=_hidden_tile(r))
        _mlp_backward_weights[(triton.cdiv(c, BLOCK_C), triton.cdiv(r, BLOCK_R))](
            grad_at["dq"], grad_at["dpre"], at["s"], at["h"], dw1, db1, dw2, db2, b, c, r, ld, BLOCK_C=BLOCK_C,
            BLOCK_R=BLOCK_R)
    return dx, flat


def split_grads(grads: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, ...]:
    """``(dw1, db1, dw2, db2)``: views of the flat weight-gradient buffer of ``launch_backward``."""
    return (grads[:r * c].view(r, c), grads[2 * r * c:2 * r * c + r], grads[r * c:2 * r * c].view(c, r),
            grads[2 * r * c + r:])


def like(dy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``dy`` dense in ``u``'s layout (the backward kernels read both with ``u``'s strides)."""
    return dy.contiguous(memory_format=torch.contiguous_format if u.is_contiguous() else torch.channels_last)


class TritonZoomGate(torch.autograd.Function):
    """``_ZoomGate``'s contract (y = u ⊙ gate(mean(maxpool_P(u)))) in six kernels; called with autocast off.

    Host work per block: 2 allocations and 3 launches forward, 2 and 3 backward. The fp32 workspace
    (``_workspace``) made in the forward also holds the backward's per-sample gradients; the four weight
    gradients are views of one buffer. (Compiled models run the same kernels as the ``zoome::zoom_gate`` ops.)"""

    @staticmethod
    def forward(ctx, u, pool_size: int, w1, b1, w2, b2):  # noqa: D401 - autograd signature
        u = _dense(u)[0]
        y, ws = launch_forward(u, pool_size, w1, b1, w2, b2)
        ctx.save_for_backward(u, ws, w1, w2)
        ctx.pool_size = pool_size
        return y

    @staticmethod
    def backward(ctx, dy):
        u, ws, w1, w2 = ctx.saved_tensors
        dx, grads = launch_backward(like(dy, u), u, ws, ctx.pool_size, w1, w2)
        return dx, None, *split_grads(grads, *w1.shape)


# The same kernels as opaque operators for torch.compile: dynamo and inductor see one op per pass (no graph break,
# no trace into the launches), and inductor keeps them rather than falling back to ATen's adaptive max pool.
# needs_exact_strides: inductor hands the ops their inputs with the strides of the trace (a padded or restrided u
# would change the real output's layout, which the fake one decides from the trace's u).
@torch.library.custom_op("zoome::zoom_gate", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def zoom_gate(u: torch.Tensor, pool_size: int, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
              b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, ws)`` of ``launch_forward`` on a dense ``u`` (``_dense``; the model makes it so before the call);
    the workspace without the backward's regions: every value of an op's outputs is written."""
    return launch_forward(_dense(u)[0], pool_size, w1, b1, w2, b2, grads=False)


@zoom_gate.register_fake
def _zoom_gate_fake(u, pool_size, w1, b1, w2, b2):
    u = _dense(u)[0]
    width = sum(_sizes(u.shape[1], w1.shape[0], pool_size, grads=False).values())
    return torch.empty_like(u), u.new_empty(u.shape[0], width, dtype=torch.float32)


@torch.library.custom_op("zoome::zoom_gate_backward", mutates_args=(), tags=(torch.Tag.needs_exact_strides,))
def zoom_gate_backward(dy: torch.Tensor, u: torch.Tensor, ws: torch.Tensor, pool_size: int, w1: torch.Tensor,
                       w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, grads)`` of ``launch_backward`` (its per-sample gradients in a buffer of its own: an op does not
    write its inputs)."""
    return launch_backward(like(dy, u), u, ws, pool_size, w1, w2, grads=False)


@zoom_gate_backward.register_fake
def _zoom_gate_backward_fake(dy, u, ws, pool_size, w1, w2):
    r, c = w1.shape
    return torch.empty_like(u), w1.new_empty(2 * r * c + r + c)


def _setup_context(ctx, inputs, output) -> None:
    u, pool_size, w1, _, w2, _ = inputs
    ctx.save_for_backward(_dense(u)[0], output[1], w1, w2)
    ctx.pool_size = pool_size
    ctx.mark_non_differentiable(output[1])


def _zoom_gate_grad(ctx, dy, _):
    u, ws, w1, w2 = ctx.saved_tensors
    dx, grads = zoom_gate_backward(dy, u, ws, ctx.pool_size, w1, w2)
    return dx, None, *split_grads(grads, *w1.shape)


zoom_gate.register_autograd(_zoom_gate_grad, setup_context=_setup_context)
