"""Data parallelism at the paper's global batch (64 over 8 GPUs, micro 8 each), projected from measured parts.

A ZeRO-0 DeepSpeed step is the rank's forward + backward + optimizer step on its micro-batch, then an all-reduce
of the gradients (fp32, outside the CUDA graph of ``train.cuda_graphs``; counted here as not overlapped with the
backward, the pessimistic case). So ``world · micro / (step + all-reduce)`` img/s, with:

- ``step``: a measured micro-8 training step on one device (``gpu_check``: the best of its eager, Triton and
  CUDA-graph figures);
- ``all-reduce``: ``torch.distributed.all_reduce`` of ZooME's gradient size, measured across the devices at hand
  (NCCL over up to 8 local GPUs; gloo over local CPU processes), turned into the bus bandwidth of nccl-tests
  (``busbw = bytes / t · 2(n − 1)/n``) and from that into the time on ``world`` ranks. With one GPU nothing
  can be measured: the figure then comes from an assumed bus bandwidth, and the result says so.
"""
from __future__ import annotations

import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# nccl-tests all_reduce bus bandwidth of large messages where none can be measured (GB/s): one 8-GPU NVLink node
# (H100 SXM, NVLink 4; NVIDIA publishes ~450) and 8 nodes of one GPU each over 400 Gb/s InfiniBand (~45).
ASSUMED_BUSBW_GBS = {"nvlink_node": 360.0, "infiniband_nodes": 40.0}


def grad_bytes(name: str = "zoome") -> int:
    """Bytes of the gradients a ZeRO-0 step all-reduces: one fp32 value per trainable parameter."""
    from zoome_dist.models import create_model

    return 4 * sum(p.numel() for p in create_model(name).parameters() if p.requires_grad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_rank(rank: int, world: int, port: int, numel: int, iters: int, backend: str, out,
                    timeout: float) -> None:
    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
    try:
        dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        if backend == "nccl":
            torch.cuda.set_device(dev)
        sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
        x = torch.ones(numel, device=dev)
        times = []
        for i in range(iters + 2):  # two warm-ups: connections, NCCL's channels
            dist.barrier()
            sync()
            t = time.perf_counter()
            dist.all_reduce(x)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t)
        if rank == 0:
            out.put(statistics.median(times))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def allreduce_s(nbytes: int, world: int, backend: str, iters: int = 10, timeout: float = 300) -> float:
    """Median seconds of an fp32 all-reduce of ``nbytes`` across ``world`` local processes (``nccl``: one GPU
    each; ``gloo``: CPU tensors)."""
    if world < 2:
        raise ValueError(f"an all-reduce needs at least 2 ranks, got world={world}")
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, world, port, nbytes // 4, iters, backend, out, timeout),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    # until all end, one fails (the others would wait for it in a collective), or the time is up
    while any(p.is_alive() for p in procs) and not any(p.exitcode for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    if any(c != 0 for c in codes) or out.empty():
        if any(codes):  # a rank's exit code (None: it was still running, stopped here)
            raise RuntimeError(f"the {backend} all-reduce over {world} local ranks failed (exit codes {codes}; "
                               "the failing rank's error is above)")
        raise RuntimeError(f"the {backend} all-reduce over {world} local ranks did not end in {timeout:.0f} s (port "
                           f"{port} may have been taken between its choice and rank 0's bind: run it again)")
    return out.get()


def busbw(nbytes: int, seconds: float, world: int) -> float:
    """nccl-tests' bus bandwidth (bytes/s) of an all-reduce: what each link carries, comparable across sizes."""
    return nbytes / seconds * 2 * (world - 1) / world


def project(step_s: float, micro: int, nbytes: int, bus_bytes_s: float, world: int = 8) -> dict[str, Any]:
    """img/s of ``world`` ranks at ``micro`` each: ``world · micro / (step + ring all-reduce time)``."""
    reduce_s = nbytes * 2 * (world - 1) / world / bus_bytes_s
    return {"world": world, "global_batch": world * micro, "allreduce_ms": round(reduce_s * 1e3, 3),
            "img_s": round(world * micro / (step_s + reduce_s), 1),
            "allreduce_share": round(reduce_s / (step_s + reduce_s), 3)}


def measure_step_s(micro: int = 8, size: int = 224, device: str = "cuda", iters: int = 20,
                   name: str = "zoome") -> float:
    """Seconds of one eager bf16 training step of ``name`` (``gpu_check``'s contenders) at ``micro``."""
    from benchmarks.gpu import contender, train_rate

    model = contender(name).to(device).train().to(memory_format=torch.channels_last)
    return micro / train_rate(model, micro, size, torch.bfloat16, iters, device)


def bench_dp(step_s: float, micro: int = 8, world: int = 8, device: str = "cuda", measure_ranks: int | None = None,
             model: str = "zoome") -> dict[str, Any]:
    """The projection for ``world`` ranks from a measured ``step_s`` (one rank's micro-batch step): the all-reduce
    measured across ``measure_ranks`` local ranks (default: every local GPU, up to ``world``; on CPU 2 gloo
    processes), else, with one GPU, the assumed bus bandwidths of ``ASSUMED_BUSBW_GBS``."""
    nbytes = grad_bytes(model)
    out: dict[str, Any] = {"model": model, "grad_mb": round(nbytes / 2**20, 1), "micro": micro,
                           "step_ms": round(step_s * 1e3, 2), "one_rank_img_s": round(micro / step_s, 1)}
    backend = "nccl" if device == "cuda" else "gloo"
    if measure_ranks is not None:
        ranks = measure_ranks
    else:
        ranks = min(world, torch.cuda.device_count()) if device == "cuda" else 2
    if ranks >= 2:
        t = allreduce_s(nbytes, ranks, backend)
        bw = busbw(nbytes, t, ranks)
        out["measured"] = {"backend": backend, "ranks": ranks, "allreduce_ms": round(t * 1e3, 3),
                           "busbw_gb_s": round(bw / 1e9, 2)}
        out["projection"] = project(step_s, micro, nbytes, bw, world)
    else:
        out["measured"] = f"nothing: {ranks} local {device} rank(s), too few for an all-reduce; its time is modelled"
        for name, gbs in ASSUMED_BUSBW_GBS.items():
            out[f"projection_{name}"] = {"assumed_busbw_gb_s": gbs, **project(step_s, micro, nbytes, gbs * 1e9, world)}
    return out
