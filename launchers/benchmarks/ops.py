"""Host cost of Zoom-SE: operations per training step (forward, loss, backward), counted, not timed.

Each ATen operator call that is not a view, plus each Triton kernel launch, is one operation the host issues.
ZooME without metadata (``zoome_no_meta``: the backbone plus Zoom-SE blocks) against its plain backbone, per
``zoom_se_impl``; the difference divided by the number of blocks is Zoom-SE's extra host work per block. On a
CPU machine the Triton path runs under the interpreter (``TRITON_INTERPRET=1`` before Triton is imported),
which launches the same kernels. A cheap regression figure for the launch-bound small-batch step on GPUs.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _CountOps(TorchDispatchMode):
    """ATen non-view calls, and Triton launches (each one operation: what the interpreter does inside is not)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or self.paused):
            self.ops += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _counting_launches(mode: _CountOps) -> Iterator[None]:
    """Count each launch of the Triton kernels (interpreted or compiled) as one operation of ``mode``."""
    try:
        from zoome_dist.models import zoom_se_triton
    except ImportError:  # no triton: nothing to count
        yield
        return
    kind = type(zoom_se_triton.KERNELS[0])  # triton's JITFunction, or its InterpretedFunction
    run = kind.run

    def counted(self, *args, **kwargs):
        mode.ops, mode.paused = mode.ops + 1, True
        try:
            return run(self, *args, **kwargs)
        finally:
            mode.paused = False

    kind.run = counted
    try:
        yield
    finally:
        kind.run = run


def block_ops(impl: str, channels: int = 64, size: int = 7, pool: int = 4) -> int:
    """Operations of one Zoom-SE block's forward and backward (its extra work in a training step)."""
    from zoome_dist.models import ZoomSE

    block = ZoomSE(channels, pool, impl=impl)
    x = torch.randn(2, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn_like(x)
    block(x).backward(dy)  # warm-up
    block.zero_grad(set_to_none=True)
    x.grad = None  # a step's gradients start empty (set_to_none): no accumulation counted
    with _CountOps() as mode, _counting_launches(mode):
        block(x).backward(dy)
    return mode.ops


def step_ops(name: str, impl: str = "auto", size: int = 32, batch: int = 2, device: str = "cpu") -> int:
    """Operations of one training step of model ``name`` (ATen non-view calls plus Triton launches)."""
    from zoome_dist.models import create_model

    opts = {"zoom_se_impl": impl} if name != "resnext50" else {}
    model = create_model(name, **opts).to(device).train().to(memory_format=torch.channels_last)
    image = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    meta, target = torch.randn(batch, 12, device=device), torch.ones(batch, device=device)
    model(image, meta).sum().backward()  # warm-up: lazy initialisation out of the count
    model.zero_grad(set_to_none=True)
    with _CountOps() as mode, _counting_launches(mode):
        logits = model(image, meta).reshape(-1)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    return mode.ops


def bench_ops(impls: tuple[str, ...] = ("plain", "fused", "triton"), device: str = "cpu") -> dict:
    """Per ``zoom_se_impl``: operations per step of zoome_no_meta and resnext50, and the extra per Zoom-SE block."""
    from zoome_dist.models import ZoomSE, create_model

    blocks = sum(isinstance(m, ZoomSE) for m in create_model("zoome_no_meta").modules())
    base = step_ops("resnext50", device=device)
    out: dict = {"resnext50_ops": base, "zoom_se_blocks": blocks}
    for impl in impls:
        try:
            ops = step_ops("zoome_no_meta", impl, device=device)
        except Exception as e:  # noqa: BLE001 - e.g. triton on CPU without the interpreter: say so
            out[impl] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        out[impl] = {"zoome_no_meta_ops": ops, "extra_per_block": round((ops - base) / blocks, 1),
                     "one_block_ops": block_ops(impl)}
    return out
