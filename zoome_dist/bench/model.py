"""Forward+backward throughput of ``zoome`` against its plain backbone, alternating, same settings."""
from __future__ import annotations

import contextlib
import time

import torch

from zoome_dist.losses import make_loss
from zoome_dist.models import ZooME, create_model


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


def bench_model(image_size: int = 224, batch_size: int = 8, iters: int = 3, rounds: int = 3,
                threads: int | None = None, device: str = "cpu", precisions: tuple[str, ...] = ("fp32", "bf16"),
                backbone: str = "resnext50_32x4d") -> dict:
    """img/s of zoome vs the backbone alone (best of ``rounds`` alternating rounds), per precision."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    img = torch.randn(batch_size, 3, image_size, image_size, device=dev).to(memory_format=torch.channels_last)
    meta, target = torch.rand(batch_size, 12, device=dev), (torch.rand(batch_size, device=dev) > 0.5).long()
    models = {"zoome": create_model("zoome", backbone=backbone),
              "backbone": ZooME(backbone, zoom_se=False, meta=False)}
    for m in models.values():
        m.to(dev).train().to(memory_format=torch.channels_last)
    out: dict = {"image_size": image_size, "batch_size": batch_size, "threads": torch.get_num_threads(),
                 "device": device, "backbone": backbone}
    for prec in precisions:
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[prec]
        best = {k: float("inf") for k in models}
        for m in models.values():  # warm-up
            _step_time(m, img, meta, target, dtype, 1)
        for _ in range(rounds):
            for name, m in models.items():
                best[name] = min(best[name], _step_time(m, img, meta, target, dtype, iters))
        z, b = batch_size / best["zoome"], batch_size / best["backbone"]
        out[prec] = {"zoome_img_s": round(z, 2), "backbone_img_s": round(b, 2), "ratio": round(z / b, 3)}
    out.update(out[precisions[0]])
    return out
