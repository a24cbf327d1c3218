"""The one-GPU check (``launchers/gpu_check.sh`` → ``benchmark.py gpu``): side by side in one run,

1. training img/s (fwd + bwd + Adam step, channels_last model and inputs): ZooME (fused and Triton Zoom-SE)
   vs its plain ResNeXt50 backbone, bf16 and fp16 autocast, micro-batches 8 and 64 (and, at bf16 micro 64,
   ZooME with the plain-autograd Zoom-SE reference), plus the Zoom-SE pooling kernel and one whole block (fused
   and Triton, forward and backward, micro 8 and 64) per stage map, the Triton path's values against the fused
   one's, and host operations per step; CUDA graphs at micro 8; 8-rank data
   parallelism at global batch 64 projected from the fastest micro-8 step and an all-reduce of the gradients
   (``benchmarks/dp.py``: measured where there are several GPUs); at the end, ``torch.compile`` (inductor)
   at bf16 micro 64: ZooME (fused, as ``model.compile`` runs it), ResNeXt50, ZooME with the Triton and with
   the plain-autograd Zoom-SE;
2. the input pipeline at 1024 px sources: the nvJPEG torch path (full training augmentation on the
   GPU) against nvJPEG decode alone, DALI ``mixed`` against its decode alone where DALI imports;
   and the data wait of a ZooME training loop fed by the nvJPEG loader, with the decode-ahead thread
   and without it;
3. a 3-epoch, 1-GPU DeepSpeed training through ``zoome train`` on synthetic 1024 px data:
   img/s and its data-wait share;
4. ``zoome predict`` img/s, TTA 1 vs 8.

Writes ``gpu_check.json`` and ``gpu_check.md`` into the output folder. Pure torch + DeepSpeed +
WebDataset: runs on a GPU host without DALI, Ray or network.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks import machine
from zoome_dist.core.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


def gpu_info() -> dict[str, Any]:
    info = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "python": sys.version.split()[0]}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        info["driver"], info["memory"] = [x.strip() for x in out.split(",")][:2]
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    return info


def _sync(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work: ``torch.cuda.synchronize`` on a GPU, nothing on a CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _train_step(model: torch.nn.Module, dtype: torch.dtype,
                device: torch.device) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    """One training step of ``model`` on a batch: fwd under autocast, bwd, Adam step (GradScaler for fp16); on
    CUDA torch's fused Adam, as training there uses (``build_optimizer``)."""
    from zoome_dist.train.losses import make_loss

    opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = make_loss("focal")

    def step(img: torch.Tensor, meta: torch.Tensor, target: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype):
            loss = loss_fn(model(img, meta), target)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    return step


def train_rate(model: torch.nn.Module, batch: int, size: int, dtype: torch.dtype, iters: int,
                device: str = "cuda") -> float:
    """img/s of ``_train_step`` on one synthetic batch, synchronised at the end only (``device``: cuda;
    cpu for a smoke run of the code)."""
    dev = torch.device(device)
    sync, step = _sync(dev), _train_step(model, dtype, dev)
    img = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    meta, target = torch.rand(batch, 12, device=dev), (torch.rand(batch, device=dev) > 0.5).long()
    for _ in range(3):  # cudnn.benchmark picks kernels; Adam state allocated
        step(img, meta, target)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        step(img, meta, target)
    sync()
    return batch * iters / (time.perf_counter() - t)


def _ms(fn, device: torch.device, n: int = 20) -> float:
    """Milliseconds per call of ``fn`` (3 warm-up calls, then the mean of ``n``)."""
    for _ in range(3):
        fn()
    sync = _sync(device)
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return round((time.perf_counter() - t) / n * 1e3, 4)


def bench_zoom_se_kernels(device: str = "cuda", batch: int = 64, dtype: torch.dtype = torch.bfloat16,
                          shapes: tuple[tuple[int, int], ...] = ((256, 56), (512, 28), (1024, 14), (2048, 7)),
                          pool: int = 4) -> dict:
    """Where Zoom-SE's time goes, per ResNeXt50 stage map (C, H=W): the adaptive max pool (with
    indices, as the fused block uses it) in channels_last and NCHW, against one elementwise pass over
    the same map (the memory-bound floor). Milliseconds per call."""
    import torch.nn.functional as F

    dev = torch.device(device)
    out: dict = {"batch": batch, "dtype": str(dtype).replace("torch.", ""), "pool": pool}
    for c, h in shapes:
        x = torch.randn(batch, c, h, h, device=dev, dtype=dtype)
        cl = x.contiguous(memory_format=torch.channels_last)
        out[f"{c}x{h}x{h}"] = row = {
            "maxpool_cl_ms": _ms(lambda: F.adaptive_max_pool2d(cl, pool, return_indices=True), dev),
            "maxpool_nchw_ms": _ms(lambda: F.adaptive_max_pool2d(x, pool, return_indices=True), dev),
            "elementwise_ms": _ms(lambda: cl * 2, dev)}
        if h % pool == 0:  # what the fused Zoom-SE runs on such maps: max_pool2d, same windows and indices
            row["max_pool2d_cl_ms"] = _ms(lambda: F.max_pool2d(cl, h // pool, return_indices=True), dev)
    return out


def bench_zoom_se_blocks(device: str = "cuda", batches: tuple[int, ...] = (8, 64), dtype: torch.dtype = torch.bfloat16,
                         shapes: tuple[tuple[int, int], ...] = ((256, 56), (512, 28), (1024, 14), (2048, 7)),
                         pool: int = 4, n: int = 20) -> dict:
    """One Zoom-SE block alone per ResNeXt50 stage map (C, H=W), channels_last, ``dtype``: forward and
    forward + backward milliseconds of the fused and the Triton path, beside one elementwise pass over the map
    (the memory-bound unit: a fused block needs ~6 such passes). Which stage (pool, gate MLP, backward) makes
    a path slow shows here. (``device="cpu"`` under ``TRITON_INTERPRET=1``: a smoke run of this function.)"""
    from zoome_dist.models import ZoomSE

    dev = torch.device(device)
    out: dict = {"dtype": str(dtype).replace("torch.", ""), "pool": pool}
    for batch in batches:
        for c, h in shapes:
            x = torch.randn(batch, c, h, h, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
            dy = torch.randn_like(x)
            row: dict = {"elementwise_ms": _ms(lambda: x * 2, dev, n)}
            for impl in ("fused", "triton"):
                block = ZoomSE(c, pool, impl=impl).to(dev)
                u = x.detach().requires_grad_()
                with torch.no_grad():
                    row[f"{impl}_fwd_ms"] = _ms(lambda: block(x), dev, n)
                row[f"{impl}_fwd_bwd_ms"] = _ms(lambda: block(u).backward(dy), dev, n)
            out[f"b{batch}_{c}x{h}x{h}"] = row
    return out


def contender(name: str) -> torch.nn.Module:
    """``zoome`` (fused Zoom-SE), ``zoome_triton`` (the Triton kernels), ``zoome_plain_autograd`` (Zoom-SE
    through plain autograd instead of the fused function) or ``resnext50`` (the plain backbone)."""
    from benchmarks.model import zoom_se_impl
    from zoome_dist.models import ZooME, create_model

    if name == "resnext50":
        return ZooME("resnext50_32x4d", zoom_se=False, meta=False)
    impl = {"zoome": "fused", "zoome_triton": "triton", "zoome_plain_autograd": "plain"}[name]
    return zoom_se_impl(create_model("zoome"), impl)


def check_triton(size: int = 224, batch: int = 8) -> dict:
    """The evidence ``zoom_se_impl: auto`` waits for, part one: ZooME with the Triton kernels against the fused
    path on this GPU, same weights and batch, bf16 autocast, channels_last: the largest differences of the
    logits and of the gradients (relative to each tensor's largest magnitude). Speed: ``models``."""
    torch.manual_seed(0)
    fused = contender("zoome").cuda().train().to(memory_format=torch.channels_last)
    tri = contender("zoome_triton").cuda().train().to(memory_format=torch.channels_last)
    tri.load_state_dict(fused.state_dict())
    image = torch.randn(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    meta = torch.randn(batch, 12, device="cuda")
    got = []
    for m in (fused, tri):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = m(image, meta).float()
        out.sum().backward()
        got.append((out.detach(), {n: p.grad.float() for n, p in m.named_parameters()}))
    (lf, gf), (lt, gt) = got
    rel = {n: float((gt[n] - g).abs().max() / g.abs().max().clamp(min=1e-12)) for n, g in gf.items()}
    worst = max(rel, key=rel.get)
    return {"logits_max_abs_diff": float((lt - lf).abs().max()), "logits_max_abs": float(lf.abs().max()),
            "grad_max_rel_diff": round(rel[worst], 5), "grad_worst_param": worst,
            "equal": bool(float((lt - lf).abs().max()) <= 0.02 * float(lf.abs().max()) and rel[worst] <= 0.05)}


def bench_models(size: int = 224, micros: tuple[int, ...] = (8, 64), iters: int = 30, rounds: int = 2) -> dict:
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    reference = contender("zoome_plain_autograd")
    models = {"zoome": contender("zoome"), "resnext50": contender("resnext50"), "zoome_reference": reference,
              "zoome_triton": contender("zoome_triton")}
    for m in models.values():
        m.cuda().train().to(memory_format=torch.channels_last)
    out: dict = {}
    for prec, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for micro in micros:
            names = list(models) if (prec, micro) == ("bf16", max(micros)) else ["zoome", "resnext50", "zoome_triton"]
            best = {k: 0.0 for k in names}
            for _ in range(rounds):  # alternate the contenders; keep each one's best
                for name in names:
                    best[name] = max(best[name], train_rate(models[name], micro, size, dtype, iters))
            out[f"{prec}_micro{micro}"] = {"zoome_img_s": round(best["zoome"], 1),
                                           "resnext50_img_s": round(best["resnext50"], 1),
                                           "ratio": round(best["zoome"] / best["resnext50"], 3)}
            out[f"{prec}_micro{micro}"].update(zoome_triton_img_s=round(best["zoome_triton"], 1),
                                               triton_ratio=round(best["zoome_triton"] / best["resnext50"], 3))
            if "zoome_reference" in best:
                out[f"{prec}_micro{micro}"]["zoome_reference_img_s"] = round(best["zoome_reference"], 1)
    return out


def bench_compiled(size: int = 224, micro: int = 64, iters: int = 30, rounds: int = 2, budget_s: float = 300,
                   out: dict | None = None, save: Callable[[], None] = lambda: None, device: str = "cuda",
                   backend: str = "inductor", mode: str | None = None,
                   names: tuple[str, ...] = ("zoome_fused", "resnext50", "zoome_triton",
                                             "zoome_plain_autograd")) -> dict:
    """``torch.compile`` (inductor, as ``model.compile`` through DeepSpeed) at bf16, ``micro``: ZooME as
    ``model.compile`` runs it (fused Zoom-SE: dynamo traces its autograd function, so inductor compiles
    its forward and backward too, its max pools as ATen fallbacks), ResNeXt50, ZooME with the Triton Zoom-SE
    (the ``zoome::zoom_gate`` ops: inductor keeps the kernels), then with the plain-autograd Zoom-SE; each one's
    compile time and img/s, measured right after its compile and ``save``d, so a run cut short keeps
    what it measured. A model whose turn comes after ``budget_s`` is skipped (compiles take minutes on
    a cold cache). The eager figures are in ``models``. (``device="cpu", backend="eager"``: a smoke run.)
    ``mode="reduce-overhead"``: CUDA graphs, as ``train.cuda_graphs`` (part ``graphs``: micro 8, launch-bound)."""
    torch.backends.cudnn.benchmark = True
    out = {} if out is None else out
    out.update(precision="bf16", micro=micro, mode=mode or "default")
    start = time.perf_counter()
    try:  # seconds, not minutes: a host without a working inductor (triton) says so at once
        torch.compile(lambda a: (a * 2).relu(), backend=backend)(torch.ones(8, device=device))
    except Exception as e:  # noqa: BLE001
        out["error"] = f"torch.compile({backend}) does not work here: {type(e).__name__}: {str(e)[:300]}"
        return out
    for name in names:
        if time.perf_counter() - start > budget_s:
            out[name] = {"skipped": f"time budget of {budget_s:.0f} s spent"}
            continue
        torch.manual_seed(0)
        m = contender("zoome" if name == "zoome_fused" else name)
        m.to(device).train().to(memory_format=torch.channels_last)
        t = time.perf_counter()
        try:
            c = torch.compile(m, backend=backend, mode=mode)
            train_rate(c, micro, size, torch.bfloat16, 1, device)  # the compile happens here
            compile_s = time.perf_counter() - t
            rate = max(train_rate(c, micro, size, torch.bfloat16, iters, device) for _ in range(rounds))
        except Exception as e:  # noqa: BLE001 - e.g. no triton on this host: say so, measure the rest
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        else:
            out[name] = {"compile_s": round(compile_s, 1), "img_s": round(rate, 1)}
        del m
        if device == "cuda":
            torch.cuda.empty_cache()
        rates = {k: v.get("img_s") for k, v in out.items() if isinstance(v, dict)}
        if rates.get("resnext50"):
            for k in ("zoome_fused", "zoome_plain_autograd", "zoome_triton"):
                if rates.get(k):
                    out[f"{k}_vs_resnext50"] = round(rates[k] / rates["resnext50"], 3)
        save()
    return out


def _loader_rate(it, limit: int) -> float:
    n, t = 0, None
    batches = iter(it)
    for i, batch in enumerate(batches):
        if i == 1:  # the first batch pays for worker start and cuDNN/nvJPEG set-up
            torch.cuda.synchronize()
            n, t = 0, time.perf_counter()
        n += batch[0].shape[0]
        if i + 1 >= limit:
            break
    torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t)
    if hasattr(batches, "close"):
        batches.close()  # the pass ends here (its decode thread too), not during the next measurement
    return rate


def _decode_rate(shards: Path, folds: list[int], batch: int, limit: int, threads: int) -> float:
    """nvJPEG decode alone: the same byte-reading workers and decode thread, no resize/augment."""
    from zoome_dist.pipeline.augment import Augment, LoaderSpec
    from zoome_dist.pipeline.batch_augment import BatchAugment
    from zoome_dist.pipeline.selection import select_folds
    from zoome_dist.pipeline.torch_loader import torch_loader

    class DecodeOnly(BatchAugment):  # keeps set_epoch and the decoder's side-stream guard
        def _augment(self, raws: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([x[:, :8, :8] for x in self.decode(raws)])

    it, _ = torch_loader(select_folds(shards, folds), LoaderSpec(train=True, batch_size=batch, image_size=224,
                                                                 device="gpu", num_threads=threads))
    it.decode = DecodeOnly(True, 224, Augment(), torch.device("cuda", torch.cuda.current_device()))
    return _loader_rate(it, limit)


def bench_pipeline_gpu(shards: Path, batch: int = 64, limit: int = 30, threads: int = 8) -> dict:
    from zoome_dist.pipeline import LOADERS, make_loader

    folds = [0, 1]
    out: dict = {"batch": batch, "threads": threads}
    it, _ = make_loader(shards, folds, train=True, batch_size=batch, device="gpu", loader="torch",
                        num_threads=threads)
    out["torch_nvjpeg_img_s"] = round(_loader_rate(it, limit), 1)
    out["nvjpeg_decode_only_img_s"] = round(_decode_rate(shards, folds, batch, limit, threads), 1)
    out["torch_nvjpeg_vs_decode"] = round(out["torch_nvjpeg_img_s"] / out["nvjpeg_decode_only_img_s"], 3)
    it, _ = make_loader(shards, folds, train=True, batch_size=batch, device="cpu", loader="torch",
                        num_threads=threads)
    out["torch_cpu_workers_img_s"] = round(_loader_rate(it, limit), 1)
    if "dali" in LOADERS:
        it, _ = make_loader(shards, folds, train=True, batch_size=batch, device="gpu", loader="dali",
                            num_threads=threads)
        out["dali_mixed_img_s"] = round(_loader_rate(it, limit), 1)
    else:
        out["dali_mixed_img_s"] = "DALI not installed on this host"
    return out


def bench_data_wait(shards: Path, batch: int = 64, steps: int = 40, threads: int = 8, rounds: int = 2,
                    device: str = "cuda", image_size: int = 224) -> dict:
    """A ZooME bf16 training loop (fwd + bwd + Adam) fed by the nvJPEG torch loader at 1024 px sources:
    img/s and the share of time spent waiting for batches, with the loader's decode-ahead thread and
    without it (decode in the training thread), alternating, best of ``rounds``. (``device="cpu"``:
    the same code with the CPU twin of the batch decode, a smoke run of this function.)"""
    from zoome_dist.models import create_model
    from zoome_dist.pipeline.augment import LoaderSpec
    from zoome_dist.pipeline.selection import select_folds
    from zoome_dist.pipeline.torch_loader import torch_loader

    dev = torch.device(device)
    torch.backends.cudnn.benchmark = True
    model = create_model("zoome").to(dev).train().to(memory_format=torch.channels_last)
    sync, step = _sync(dev), _train_step(model, torch.bfloat16, dev)
    spec = LoaderSpec(train=True, batch_size=batch, image_size=image_size, device="gpu" if dev.type == "cuda" else "cpu",
                      num_threads=threads)
    loaders = {}
    for name, ahead in (("decode_thread", True), ("decode_inline", False)):
        loaders[name], _ = torch_loader(select_folds(shards, [0, 1]), spec, batch_decode=True)
        loaders[name].prefetch = ahead

    def run(it) -> tuple[float, float]:
        """Time ``steps`` training steps after 3 warm-up ones, crossing epochs as needed; the pass is
        closed untimed (its batch in flight, if any, finishes first)."""
        n, wait, warm, t0, elapsed = 0, 0.0, 3, 0.0, 0.0
        batches = iter(it)
        while n < steps + warm:
            if n == warm:
                sync()
                wait, t0 = 0.0, time.perf_counter()
            t = time.perf_counter()
            b = next(batches, None)
            if b is None:  # the epoch ended: the next one (the loader keeps its workers)
                batches = iter(it)
                b = next(batches)
            wait += time.perf_counter() - t
            step(b[0], b[1], b[2])
            n += 1
        sync()
        elapsed = time.perf_counter() - t0
        batches.close()
        return steps * batch / elapsed, wait / elapsed

    best: dict = {k: (0.0, 1.0) for k in loaders}
    for _ in range(rounds):
        for name, it in loaders.items():
            best[name] = max(best[name], run(it))
    out: dict = {"batch": batch, "steps": steps, "threads": threads}
    for name, (rate, wait) in best.items():
        out[name] = {"img_s": round(rate, 1), "data_wait": round(wait, 4)}
    return out


def bench_train_gpu(shards: Path, work: Path, micro: int = 64, epochs: int = 3, threads: int = 8,
                    timeout: float = 300) -> dict:
    """``launchers/train.py`` as a user runs it (1 GPU, DeepSpeed, bf16, nvJPEG torch loader)."""
    out: dict = {"micro": micro, "epochs": epochs, "loader": "torch+nvjpeg", "precision": "bf16"}
    from zoome_dist.launch.command import train_command

    cmd = train_command(["--shards", str(shards), "--fold", "0", "--out", str(work / "train"), "--no-progress",
           "--set", "data.loader=torch", "--set", "data.device=gpu", "--set", f"data.num_threads={threads}",
           "--set", f"train.epochs={epochs}", "--set", f"train.micro_batch_size={micro}",
           "--set", f"train.global_batch_size={micro}", "--set", "train.precision=bf16"])
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_ACCELERATOR": "cuda"},
                           timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        out["error"] = f"stopped after {timeout:.0f} s: " + ((e.stdout or b"") + (e.stderr or b"")).decode(
            errors="replace")[-2000:]
        return out
    out["wall_s"] = round(time.perf_counter() - t, 1)
    if r.returncode:
        out["error"] = (r.stdout + r.stderr)[-2000:]
        return out
    for m in RunDir(work / "train").read_metrics():
        out[f"epoch{m['epoch']}"] = {"img_s": round(m["train_img_s_per_rank"], 1),
                                     "data_wait": round(m["data_wait"], 4),
                                     "val_auc": round(m["val_auc"], 4)}
    return out


def _pytest_gpu(timeout: float = 420) -> dict:
    """The ``gpu``-marked tests, all in tests/test_gpu_path.py: only that file is collected, so the
    other test modules' imports (h5py, imagehash: not on a GPU host's torch stack) cannot stop it."""
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                            str(ROOT / "tests" / "test_gpu_path.py")], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "DS_ACCELERATOR": "cuda"}, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace")[-3000:]
        return {"rc": "timeout", "summary": f"stopped after {timeout:.0f} s", "tail": tail}
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    return {"rc": r.returncode, "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - t, 1),
            "tail": (r.stdout + r.stderr)[-3000:] if r.returncode else ""}


def _markdown(res: dict) -> str:
    g = res["gpu_info"]
    rows = ["| what | figure |", "|---|---|",
            f"| GPU | {g.get('gpu')} (driver {g.get('driver')}, CUDA {g.get('cuda')}, torch {g.get('torch')}) |"]
    for section in (*PARTS, "verdict"):
        for k, v in res.get(section, {}).items():
            if section == "models" and isinstance(v, dict):
                ref = f"; plain-autograd Zoom-SE {v['zoome_reference_img_s']}" if "zoome_reference_img_s" in v else ""
                tri = (f"; triton Zoom-SE {v['zoome_triton_img_s']} (ratio {v['triton_ratio']})"
                       if "triton_ratio" in v else "")
                v = (f"zoome {v['zoome_img_s']} / resnext50 {v['resnext50_img_s']} img/s (ratio {v['ratio']})"
                     f"{tri}{ref}")
            if k != "tail":
                rows.append(f"| {section} {k} | {str(v).replace('|', '/').replace(chr(10), ' ')[:300]} |")
    return "\n".join(rows) + "\n"


PARTS = ("tests", "triton", "models", "zoom_se_kernels", "zoom_se_blocks", "ops", "pipeline", "data_wait", "train",
         "predict", "graphs", "dp", "compiled")


def triton_verdict(res: dict) -> dict:
    """Whether this run is the evidence ``model.zoom_se_impl: auto`` waits for (issue 28): the Triton path equal to
    the fused one on this GPU (part ``triton``) and faster at every measured bf16 micro-batch (part ``models``).
    A default changes by hand, in ``ZoomSE``, after reading it; never on a run that lacks either part."""
    run_of = res.get("measured_in", {})
    if run_of.get("triton") != run_of.get("models"):
        return {"triton_for_auto": None, "why": f"the triton and models parts come from different runs ({run_of})"}
    equal = res.get("triton", {}).get("equal")
    speed = {k: (v.get("zoome_triton_img_s"), v.get("zoome_img_s")) for k, v in res.get("models", {}).items()
             if k.startswith("bf16_") and isinstance(v, dict)}
    faster = {k: round(t / f, 3) for k, (t, f) in speed.items() if t and f}
    if equal is None or not faster:
        return {"triton_for_auto": None, "why": "the triton and models parts did not both run"}
    ok = bool(equal) and all(r > 1.0 for r in faster.values())
    why = ("equal to the fused path and faster at " + ", ".join(faster) if ok else
           "not equal to the fused path" if not equal else
           "slower at " + ", ".join(k for k, r in faster.items() if r <= 1.0))
    return {"triton_for_auto": ok, "triton_over_fused": faster, "why": why}


def bench_dp_gpu(res: dict, micro: int = 8, measure_ranks: int | None = None) -> dict:
    """8-rank data parallelism at global batch 64 (``benchmarks/dp.py``), from this run's fastest ZooME micro-8
    step (bf16: eager fused or Triton, or CUDA graphs), or, where those parts did not run, a step measured here."""
    from benchmarks.dp import bench_dp, measure_step_s

    eager = res.get("models", {}).get(f"bf16_micro{micro}", {})
    graphs = res.get("graphs", {}) if res.get("graphs", {}).get("micro") == micro else {}
    rates = {f"eager {k}": eager.get(f"{k}_img_s") for k in ("zoome", "zoome_triton")}
    rates.update({f"graphs {k}": (graphs.get(k) or {}).get("img_s") for k in ("zoome_fused", "zoome_triton")})
    rates = {k: v for k, v in rates.items() if isinstance(v, (int, float)) and v > 0}
    if rates:
        best = max(rates, key=rates.get)
        out = bench_dp(micro / rates[best], micro, measure_ranks=measure_ranks)
    else:
        best = "eager zoome, measured for this part"
        out = bench_dp(measure_step_s(micro), micro, measure_ranks=measure_ranks)
    return {"step_from": best, **out}


def _earlier(path: Path) -> dict:
    """An earlier run's results (kept where this run does not redo them), or {}."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _data_parts(step: Callable[[str, Callable[[], dict]], None], n: int, source_size: int) -> None:
    """The parts that read shards (pipeline, data_wait, train), on ``n`` synthetic images built here."""
    from benchmarks.shards import reused_dataset
    from zoome_dist.data.writer import BuildOptions, build

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        imgs = reused_dataset(root / "src", n, source_size, os.cpu_count() or 2)
        build(root / "src" / "train.csv", imgs, root / "shards", BuildOptions(
            folds=3, max_side=0, samples_per_shard=128, dedup=False), workers=min(8, os.cpu_count() or 2),
            progress=False)
        step("pipeline", lambda: bench_pipeline_gpu(root / "shards"))
        step("data_wait", lambda: bench_data_wait(root / "shards"))
        step("train", lambda: bench_train_gpu(root / "shards", root))


def bench_gpu(out_dir: str | Path, n: int = 1536, source_size: int = 1024, parts: tuple[str, ...] = PARTS) -> dict:
    """The ``parts`` above, in that order; returns the result and writes ``gpu_check.{json,md}`` into
    ``out_dir`` after every part. Sections of an earlier run in ``out_dir`` that this one does not redo
    are kept (``runs`` says which run measured what), so a short device session can run the check in
    two calls (e.g. everything but ``compiled``, then ``compiled``)."""
    bad = [x for x in parts if x not in PARTS]
    if bad:
        raise ValueError(f"unknown gpu_check part(s) {bad}; valid: {list(PARTS)}")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA GPU visible (torch.cuda.is_available() is False): the GPU check needs one")
    from benchmarks.ops import bench_ops
    from benchmarks.predict import bench_predict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = _earlier(out_dir / "gpu_check.json")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    res.update(machine=machine(), gpu_info=gpu_info(), started=started)
    res["runs"] = res.get("runs", []) + [{"started": started, "parts": list(parts)}]
    t0 = time.perf_counter()

    def save() -> None:
        res["verdict"] = triton_verdict(res)  # current after every part: a run cut short still says it
        (out_dir / "gpu_check.json").write_text(json.dumps(res, indent=1))
        (out_dir / "gpu_check.md").write_text(_markdown(res))  # a run cut short keeps both files

    def step(name: str, fn) -> None:
        if name not in parts:
            return
        t = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed part must not lose the others' figures
            res[name] = {"error": f"{type(e).__name__}: {e}"}
        res.setdefault("measured_in", {})[name] = started  # which run each part comes from
        print(f"[gpu_check] {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        save()

    step("tests", _pytest_gpu)
    step("triton", check_triton)
    step("models", bench_models)
    step("zoom_se_kernels", bench_zoom_se_kernels)
    step("zoom_se_blocks", bench_zoom_se_blocks)
    step("ops", lambda: bench_ops(device="cuda"))
    if {"pipeline", "data_wait", "train"} & set(parts):
        _data_parts(step, n, source_size)
    step("predict", lambda: bench_predict("zoome", 224, 256, batch_size=64, ttas=(1, 8), loader="torch"))
    # last: its compile time (minutes on a cold cache) risks no other figure; saved as each model is measured
    graphs: dict = {}
    step("graphs", lambda: bench_compiled(micro=8, mode="reduce-overhead", budget_s=150, out=graphs,
                                          names=("zoome_fused", "resnext50", "zoome_triton"),
                                          save=lambda: (res.__setitem__("graphs", graphs), save())))
    step("dp", lambda: bench_dp_gpu(res))
    partial: dict = {}
    step("compiled", lambda: bench_compiled(out=partial, save=lambda: (res.__setitem__("compiled", partial), save())))
    res["seconds"] = round(time.perf_counter() - t0, 1)
    save()
    return res
