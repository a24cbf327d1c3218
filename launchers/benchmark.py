"""Benchmarks, each measuring its alternatives side by side in one run.

    python launchers/benchmark.py shards   [--json]   # shard build 1 vs 2 workers vs decode ceiling
    python launchers/benchmark.py model    [--json]   # zoome vs plain resnext50, fp32 and bf16
    python launchers/benchmark.py pipeline [--shards DIR] [--json]  # DALI-CPU vs torch vs decode-only
    python launchers/benchmark.py train    [--json]   # training img/s per rank + data wait, fp32 vs bf16
    python launchers/benchmark.py predict  [--json]   # zoome predict img/s, TTA 1 vs 8
    python launchers/benchmark.py cv       [--json]   # CV jobs sequential vs concurrent + ISIC-2020 projection
    python launchers/benchmark.py ops      [--json]   # host operations per step, per zoom_se_impl (counted)
    python launchers/benchmark.py dp       [--json]   # 8-rank data parallel at global batch 64, projected
    python launchers/benchmark.py gpu --out DIR [--only PARTS] [--no-compile]  # the one-GPU check (gpu_check.sh)

Record the figures, with the machine line this prints, in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import sys

from benchmarks import machine
from benchmarks.gpu import PARTS as GPU_PARTS


def _print(result: dict, as_json: bool) -> None:
    result = {**result, "machine": machine()}
    if as_json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


def _throughput_parsers(sub) -> list:
    """Parsers of the throughput benchmarks: shards, model, pipeline, train, predict."""
    s = sub.add_parser("shards", help="shard build throughput and peak memory")
    s.add_argument("--n", type=int, default=1536, help="images per size (the memory check also builds 2N)")
    s.add_argument("--sizes", default="600,1024", help="source image sides, comma separated")
    s.add_argument("--max-side", type=int, default=512)
    s.add_argument("--workers", type=int, default=2)
    m = sub.add_parser("model", help="forward+backward img/s, zoome vs its backbone")
    m.add_argument("--image-size", type=int, default=224)
    m.add_argument("--batch-size", type=int, default=8)
    m.add_argument("--iters", type=int, default=2)
    m.add_argument("--rounds", type=int, default=7)
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--device", default="cuda" if _cuda() else "cpu", choices=["cpu", "cuda"])
    m.add_argument("--precisions", default="fp32,bf16")
    m.add_argument("--backbone", default="resnext50_32x4d")
    d = sub.add_parser("pipeline", help="input pipeline img/s: DALI vs torch fallback vs decode-only")
    d.add_argument("--shards", help="existing shard folder (default: synthesize 600 and 1024 px sources)")
    d.add_argument("--sizes", default="600,1024")
    d.add_argument("--n", type=int, default=384, help="images per synthesized source size")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--threads", type=int, default=2, help="DALI threads = torch DataLoader workers")
    d.add_argument("--rounds", type=int, default=2)
    t = sub.add_parser("train", help="training img/s per rank and data-wait fraction per precision")
    t.add_argument("--model", default="zoome")
    t.add_argument("--image-size", type=int, default=224)
    t.add_argument("--n", type=int, default=192, help="synthetic images (half train, half validation)")
    t.add_argument("--micro-batch", type=int, default=8)
    t.add_argument("--precisions", default="fp32,bf16")
    t.add_argument("--threads", type=int, default=2, help="DALI threads")
    pr = sub.add_parser("predict", help="zoome predict img/s with and without TTA")
    pr.add_argument("--model", default="zoome")
    pr.add_argument("--image-size", type=int, default=224)
    pr.add_argument("--n", type=int, default=64)
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--ttas", default="1,2,8")
    return [s, m, d, t, pr]


def _study_parsers(sub) -> list:
    """Parsers of the studies: cv (wall time and projection), meta (does metadata learn), gpu (the GPU check)."""
    c = sub.add_parser("cv", help="zoome cv wall time, jobs one at a time vs concurrent; ISIC-2020 projection")
    c.add_argument("--num-folds", type=int, default=3, help="folds of the tiny shard build (all are run)")
    c.add_argument("--n", type=int, default=144, help="synthetic images")
    c.add_argument("--img-s-micro64", type=float, default=700.0,
                   help="1-GPU job img/s at micro 64, end to end (BENCHMARKS.md: 637-749 on an H200)")
    c.add_argument("--img-s-micro8", type=float, default=179.0,
                   help="1-GPU img/s at micro 8 (BENCHMARKS.md: 179 on an H200, model only)")
    c.add_argument("--startup-s", type=float, default=30.0, help="fixed cost of one GPU job, seconds")
    me = sub.add_parser("meta", help="does the metadata path learn: metadata-only synthetic data, logistic oracle "
                                     "vs zoome fusions vs zoome_no_meta")
    me.add_argument("--n", type=int, default=800, help="synthetic images")
    me.add_argument("--size", type=int, default=64, help="image side (px), also the training size")
    me.add_argument("--epochs", type=int, default=8)
    me.add_argument("--ranks", type=int, default=2)
    o = sub.add_parser("ops", help="host operations (ATen calls + Triton launches) per training step: zoome_no_meta "
                                   "per zoom_se_impl vs resnext50 (on CPU: Triton under TRITON_INTERPRET=1)")
    o.add_argument("--impls", default="plain,fused,triton")
    dp = sub.add_parser("dp", help="8-rank data-parallel img/s at global batch 64, projected from a measured micro-8 "
                                   "step and a measured all-reduce of the gradients (gloo on CPU, NCCL on GPUs)")
    dp.add_argument("--step-ms", type=float, help="one rank's training step (default: measure ZooME's, eager bf16)")
    dp.add_argument("--image-size", type=int, default=224, help="image side of the measured step")
    dp.add_argument("--world", type=int, default=8, help="ranks of the projection")
    dp.add_argument("--ranks", type=int, help="local ranks of the measured all-reduce (default: GPUs here, or 2)")
    g = sub.add_parser("gpu", help="the one-GPU check: gpu tests + every GPU figure, JSON + markdown")
    g.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json and gpu_check.md")
    g.add_argument("--n", type=int, default=1536, help="synthetic 1024 px images")
    g.add_argument("--only", help="comma-separated parts to run (default: all): " + ",".join(GPU_PARTS))
    g.add_argument("--no-tests", action="store_true", help="skip the gpu-marked tests")
    g.add_argument("--no-compile", action="store_true", help="skip the torch.compile part (the last)")
    return [c, me, o, dp, g]


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    for q in _throughput_parsers(sub) + _study_parsers(sub):
        q.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    p = get_parser()
    a = p.parse_args(argv)
    if a.what == "gpu":
        parts = [x.strip() for x in a.only.split(",") if x.strip()] if a.only else list(GPU_PARTS)
        bad = [x for x in parts if x not in GPU_PARTS]
        if bad:
            p.error(f"--only: unknown part(s) {bad}; valid: {','.join(GPU_PARTS)}")
        if not _cuda():
            print("benchmark.py gpu: error: no CUDA GPU visible; the GPU check needs one", file=sys.stderr)
            return 2
        from benchmarks.gpu import bench_gpu

        skip = ({"tests"} if a.no_tests else set()) | ({"compiled"} if a.no_compile else set())
        r = bench_gpu(a.out, a.n, parts=tuple(x for x in parts if x not in skip))
    elif a.what == "ops":
        from benchmarks.ops import bench_ops

        r = bench_ops(tuple(a.impls.split(",")), "cuda" if _cuda() else "cpu")
    elif a.what == "dp":
        from benchmarks.dp import bench_dp, measure_step_s

        dev = "cuda" if _cuda() else "cpu"
        step = a.step_ms / 1e3 if a.step_ms else measure_step_s(8, a.image_size, dev, 20 if dev == "cuda" else 2)
        r = bench_dp(step, 8, a.world, dev, a.ranks)
    elif a.what == "meta":
        from benchmarks.meta import bench_meta

        r = bench_meta(a.n, a.size, a.epochs, ranks=a.ranks)
    elif a.what == "cv":
        from benchmarks.cv import bench_cv

        r = bench_cv(a.num_folds, a.n, img_s_micro64=a.img_s_micro64, img_s_micro8=a.img_s_micro8,
                     startup_s=a.startup_s)
    elif a.what == "shards":
        from benchmarks.shards import bench_shards

        r = bench_shards(a.n, tuple(int(x) for x in a.sizes.split(",")), a.max_side, a.workers)
    elif a.what == "predict":
        from benchmarks.predict import bench_predict

        r = bench_predict(a.model, a.image_size, a.n, batch_size=a.batch_size,
                          ttas=tuple(int(x) for x in a.ttas.split(",")))
    elif a.what == "train":
        from benchmarks.train import bench_train

        r = bench_train(a.model, a.image_size, a.n, micro_batch=a.micro_batch,
                        precisions=tuple(a.precisions.split(",")), threads=a.threads)
    elif a.what == "pipeline":
        from benchmarks.pipeline import bench_pipeline

        r = bench_pipeline(a.shards, tuple(int(x) for x in a.sizes.split(",")), a.n, a.batch_size,
                           a.image_size, a.threads, a.rounds)
    else:
        from benchmarks.model import bench_model

        r = bench_model(a.image_size, a.batch_size, a.iters, a.rounds, a.threads, a.device,
                        tuple(a.precisions.split(",")), a.backbone)
    _print(r, a.json)
    return 0


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
