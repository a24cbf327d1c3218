"""Training throughput per rank and data-wait fraction through the real launcher, per precision.

Each precision is its own ``zoome train`` process (DeepSpeed keeps process-group state for
the life of a process, so one process trains one run).
"""
from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from benchmarks.shards import reused_dataset
from zoome_dist.config import load_config
from zoome_dist.core.rundir import RunDir
from zoome_dist.data.writer import BuildOptions, build
from zoome_dist.launch.command import train_command


def bench_train(model: str = "zoome", image_size: int = 224, n: int = 192, source_size: int = 512,
                micro_batch: int = 8, precisions: tuple[str, ...] = ("fp32", "bf16"), threads: int = 2,
                loader: str = "auto") -> dict:
    """One epoch per precision on ``n`` synthetic images (half train, half validation), one rank."""
    out: dict = {"model": model, "image_size": image_size, "micro_batch": micro_batch, "source_size": source_size}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        imgs = reused_dataset(root / "src", n, source_size, 2)
        build(root / "src" / "train.csv", imgs, root / "shards", BuildOptions(folds=2, max_side=0,
              samples_per_shard=64, dedup=False), workers=2, progress=False)
        for prec in precisions:
            overrides = {"model.name": model, "data.image_size": image_size, "data.num_threads": threads,
                         "data.loader": loader, "train.epochs": 1, "train.micro_batch_size": micro_batch,
                         "train.global_batch_size": micro_batch, "train.precision": prec,
                         "optim.warmup_epochs": 0.0}
            load_config(overrides=overrides)  # fail fast on a bad key
            args = ["--shards", str(root / "shards"), "--fold", "0", "--out", str(root / f"run-{prec}"), "--no-progress"]
            for k, v in overrides.items():
                args += ["--set", f"{k}={v}"]
            subprocess.run(train_command(args), check=True)
            m = RunDir(root / f"run-{prec}").read_metrics()[-1]
            out[prec] = {"train_img_s_per_rank": round(m["train_img_s_per_rank"], 2),
                         "data_wait": round(m["data_wait"], 4)}
    out["bf16_vs_fp32"] = round(out["bf16"]["train_img_s_per_rank"] / out["fp32"]["train_img_s_per_rank"], 3) \
        if {"bf16", "fp32"} <= set(out) else None
    return out
