"""Forward+backward throughput of ``zoome`` against its plain backbone, alternating, same settings;
and of ``zoome`` with the plain-autograd Zoom-SE (the fused function's reference).

Ratios are medians of per-round ratios: each round times every contender back to back, so a round's
ratio sees the same machine load on both sides (on a shared machine the load drifts between rounds).
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

from zoome_dist.models import ZooME, ZoomSE, create_model
from zoome_dist.train.losses import make_loss


def _step_time(model: torch.nn.Module, img: torch.Tensor, meta: torch.Tensor, target: torch.Tensor,
               dtype: torch.dtype | None, iters: int) -> float:
    loss_fn = make_loss("focal")
    device = img.device.type
    ctx = torch.autocast(device, dtype=dtype) if dtype else contextlib.nullcontext()
    t = time.perf_counter()
    for _ in range(iters):
        with ctx:
            loss = loss_fn(model(img, meta), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def zoom_se_impl(model: torch.nn.Module, impl: str) -> torch.nn.Module:
    """``model`` with every Zoom-SE block through ``impl`` (``plain``: plain autograd; ``fused``; ``triton``)."""
    for m in model.modules():
        if isinstance(m, ZoomSE):
            m.impl = impl
    return model


def bench_model(image_size: int = 224, batch_size: int = 8, iters: int = 2, rounds: int = 7,
                threads: int | None = None, device: str = "cpu", precisions: tuple[str, ...] = ("fp32", "bf16"),
                backbone: str = "resnext50_32x4d") -> dict:
    """img/s of zoome, of zoome with the plain-autograd Zoom-SE and of the backbone alone (median of
    ``rounds`` alternating rounds of ``iters`` steps), and the median per-round ratios, per precision."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    img = torch.randn(batch_size, 3, image_size, image_size, device=dev).to(memory_format=torch.channels_last)
    meta, target = torch.rand(batch_size, 12, device=dev), (torch.rand(batch_size, device=dev) > 0.5).long()
    models = {"zoome": create_model("zoome", backbone=backbone),
              "zoome_plain": zoom_se_impl(create_model("zoome", backbone=backbone), "plain"),
              "backbone": ZooME(backbone, zoom_se=False, meta=False)}
    for m in models.values():
        m.to(dev).train().to(memory_format=torch.channels_last)
    out: dict = {"image_size": image_size, "batch_size": batch_size, "threads": torch.get_num_threads(),
                 "device": device, "backbone": backbone, "rounds": rounds}
    for prec in precisions:
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        times: dict[str, list[float]] = {k: [] for k in models}
        for m in models.values():  # warm-up
            _step_time(m, img, meta, target, dtype, 1)
        for _ in range(rounds):
            for name, m in models.items():
                times[name].append(_step_time(m, img, meta, target, dtype, iters))

        def ratio(a: str, b: str) -> float:  # img/s of a over img/s of b, round by round
            return round(statistics.median(tb / ta for ta, tb in zip(times[a], times[b])), 3)

        out[prec] = {**{f"{k}_img_s": round(batch_size / statistics.median(v), 2) for k, v in times.items()},
                     "ratio": ratio("zoome", "backbone"), "plain_ratio": ratio("zoome_plain", "backbone"),
                     "fused_vs_plain": ratio("zoome", "zoome_plain")}
    out.update(out[precisions[0]])
    return out
