"""The whole job on the embedded default: synthetic ISIC data → shards → verify → a 2-rank DeepSpeed
training of ``launchers/configs/demo-cpu.yaml`` on fold 0 (CPU ranks over gloo, or the GPUs where
present) → evaluation → the metrics table and a pooled ROC PNG.

    bash launchers/env.sh python launchers/demo.py [--out runs/demo]

Steps whose output already exists are reused, so a second run is quick.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zoome_dist.cli.common import HelpFormatter
from zoome_dist.cli.shards import main as shards_main

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for data, shards and runs")
    p.add_argument("--n", type=int, default=600, help="synthetic images")
    p.add_argument("--size", type=int, default=192, help="synthetic image side (px)")
    p.add_argument("--num-folds", type=int, default=5, help="folds of the shard build")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--folds", default="0", help="folds to cross-validate (zoome cv --folds)")
    p.add_argument("--ranks", type=int, default=None,
                   help="DeepSpeed ranks (GPUs, or CPU processes); default 2, or the GPUs visible when fewer")
    a = p.parse_args(argv)
    out = Path(a.out)
    data, shards = out / "data", out / "shards"
    if not (data / "train.csv").is_file():
        print(f"== 1. synthetic ISIC-2020-layout data → {data}")
        if shards_main(["synth", "--out", str(data), "--n", str(a.n), "--seed", "0", "--size", str(a.size),
                        "--prevalence", "0.2", "--workers", str(a.workers)]):
            return 1
    if not (shards / "manifest.json").is_file():
        print(f"== 2. patient-grouped, stratified {a.num_folds}-fold WebDataset shards → {shards}")
        if shards_main(["build", "--csv", str(data / "train.csv"), "--images", str(data / "jpeg" / "train"),
                        "--out", str(shards), "--num-folds", str(a.num_folds), "--samples-per-shard", "64",
                        "--workers", str(a.workers), "--resume"]):
            return 1
    print(f"== 3. verify {shards}")
    if shards_main(["verify", str(shards), "--quiet"]):
        return 1
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if a.ranks is None:  # a 1-GPU host trains on its one GPU
        a.ranks = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2
    print(f"== 4. DeepSpeed training, {a.ranks} ranks, fold(s) {a.folds} → {out / 'cv'}", flush=True)
    from zoome_dist.cli.cv import main as cv_main

    return cv_main(["--config", str(ROOT / "launchers" / "configs" / "demo-cpu.yaml"), "--shards", str(shards),
                    "--folds", a.folds, "--out", str(out / "cv"), "--gpus-per-job", str(a.ranks)])


if __name__ == "__main__":
    sys.exit(main())
