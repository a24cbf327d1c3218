"""Cross-validation wall time: the same (variant, fold) jobs one at a time vs concurrently on this node,
side by side in one run, and ISIC-2020 CV times per cluster shape projected from per-job figures.

Both contenders run ``zoome cv`` as a user does, on the same tiny synthetic shards, with the cores
split fairly: sequential jobs get every core (``--cpus-per-job C``), concurrent jobs one core each
(``--jobs C --cpus-per-job 1``). Each job's fixed cost (process start, imports, DeepSpeed set-up,
loaders, checkpoints) is measured as its share of the sequential wall time minus its epochs' time.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from zoome_dist.core.rundir import RunDir
from zoome_dist.data.synth import synthesize
from zoome_dist.data.writer import BuildOptions, build
from zoome_dist.launch.cv import project

TINY = {"model": {"name": "zoome", "backbone": "resnet18", "pool_size": 2},
        "data": {"image_size": 32, "num_threads": 1},
        "train": {"epochs": 1, "global_batch_size": 8, "micro_batch_size": 8, "precision": "fp32"}}


def _cv(cfg: Path, shards: Path, out: Path, folds: int, *extra: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zoome_dist.cli.cv", "--config", str(cfg), "--shards", str(shards),
                    "--folds", f"0-{folds - 1}", "--variants", "zoome,zoome_no_meta", "--out", str(out), *extra],
                   check=True, stdout=subprocess.DEVNULL, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return time.perf_counter() - t0


def bench_cv(folds: int = 3, n: int = 144, cores: int | None = None, **projection) -> dict:
    """Sequential vs concurrent ``zoome cv`` of 2 variants × ``folds`` folds, then the projection."""
    cores = cores or os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize(root / "src", n, seed=0, prevalence=0.25, size=64, progress=False)
        build(root / "src" / "train.csv", root / "src" / "jpeg" / "train", root / "shards",
              BuildOptions(folds=folds, max_side=0, samples_per_shard=24), progress=False)
        cfg = root / "tiny.yaml"
        cfg.write_text(yaml.safe_dump(TINY))
        seq = _cv(cfg, root / "shards", root / "seq", folds, "--cpus-per-job", str(cores))
        conc = _cv(cfg, root / "shards", root / "conc", folds, "--jobs", str(cores), "--cpus-per-job", "1")
        jobs = 2 * folds
        epoch_s = [m["epoch_seconds"] for d in (root / "seq").glob("*/fold-*")
                   for m in RunDir(d).read_metrics()]
        startup = seq / jobs - sum(epoch_s) / jobs
    return {"jobs": jobs, "cores": cores, "sequential_s": round(seq, 1), "concurrent_s": round(conc, 1),
            "concurrent_speedup": round(seq / conc, 2), "job_fixed_cost_s": round(startup, 1),
            "job_epochs_s": round(sum(epoch_s) / jobs, 1),
            "isic2020_projection": project(**projection)}
