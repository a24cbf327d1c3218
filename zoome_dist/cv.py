"""K-fold cross-validation: one DeepSpeed job per (variant, fold), then Table-I-style reports.

    zoome cv --config launchers/configs/zoome.yaml --shards data/shards --folds 0-9 \\
        --out runs/cv --variants zoome,zoome_no_zoomse,zoome_no_meta --num-gpus 8
CPU: --num-gpus 2 starts 2 CPU ranks per fold (DS_ACCELERATOR=cpu). Multi-node: --hostfile FILE
--master-addr NODE1. On a GPU node the ranks use CUDA_VISIBLE_DEVICES when it is set (DeepSpeed's
--include), and never more ranks than there are devices.

Writes OUT/<variant>/fold-XX/ (each a train.py run folder), OUT/table.md and OUT/table.csv
(mean ± std over folds), OUT/folds.csv (per-fold rows) and OUT/roc.png (pooled out-of-fold ROC).
Folds whose run finished (summary.json) are skipped, so re-running resumes a CV.
``--select last`` (default) reports each fold's final epoch; ``best`` reports its best-AUC epoch,
which is selected on the fold being scored and therefore optimistic.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd


def parse_folds(spec: str) -> list[int]:
    """``"0-9"`` or ``"0,3,5"`` → list of ints."""
    out: list[int] = []
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += list(range(int(lo), int(hi) + 1))
        elif part.strip():
            out.append(int(part))
    if not out:
        raise ValueError(f"--folds {spec!r} selects no fold")
    return out


def fold_command(a: argparse.Namespace, variant: str, fold: int, run_dir: Path) -> list[str]:
    from zoome_dist.launch import Launch, train_command

    args = ["--shards", a.shards, "--fold", str(fold), "--out", str(run_dir), "--set", f"model.name={variant}",
            "--no-progress"]
    if a.config:
        args += ["--config", a.config]
    for s in a.set:
        args += ["--set", s]
    if (run_dir / "checkpoints" / "latest").is_file():
        args.append("--resume")
    return train_command(args, Launch(ranks=a.num_gpus, hostfile=a.hostfile, master_addr=a.master_addr))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zoome cv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--shards", required=True)
    p.add_argument("--folds", default="0-9")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="", help="comma-separated model names (default: the config's)")
    p.add_argument("--num-gpus", type=int, default=1, help="ranks per fold on this node")
    p.add_argument("--hostfile", help="DeepSpeed hostfile for multi-node folds (with --master-addr)")
    p.add_argument("--master-addr", help="with --hostfile: the first node's address, as the others reach it")
    p.add_argument("--select", choices=["last", "best"], default="last")
    a = p.parse_args(argv)

    from zoome_dist.config import load_config, parse_set
    from zoome_dist.data.manifest import load_manifest
    from zoome_dist.models import MODELS
    from zoome_dist.report import fold_rows, plot_roc, pooled, table_markdown

    try:
        cfg = load_config(a.config, parse_set(a.set))
        folds = parse_folds(a.folds)
        valid = [f["fold"] for f in load_manifest(a.shards)["folds"]]
        bad = [k for k in folds if k not in valid]
        if bad:
            raise ValueError(f"fold(s) {bad} do not exist in {a.shards}; valid folds: {valid}")
        from zoome_dist.launch import Launch

        Launch(ranks=a.num_gpus, hostfile=a.hostfile, master_addr=a.master_addr).validate()
        variants = [v for v in a.variants.split(",") if v] or [cfg.model.name]
        unknown = [v for v in variants if v not in MODELS]
        if unknown:
            raise ValueError(f"Unknown variant(s) {unknown}. Valid models: {sorted(MODELS)}")
    except (ValueError, OSError) as e:
        print(f"zoome cv: error: {e}", file=sys.stderr)
        return 2

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    rows, preds = [], {}
    for variant in variants:
        preds[variant] = []
        for fold in folds:
            run_dir = out / variant / f"fold-{fold:02d}"
            if not (run_dir / "summary.json").is_file():
                print(f"== {variant} fold {fold} → {run_dir}", flush=True)
                try:
                    cmd = fold_command(a, variant, fold, run_dir)
                except ValueError as e:
                    print(f"zoome cv: error: {e}", file=sys.stderr)
                    return 2
                rc = subprocess.run(cmd, env=env).returncode
                if rc != 0:
                    print(f"zoome cv: {variant} fold {fold} failed (exit {rc}); rerun to resume", file=sys.stderr)
                    return rc
            summary = json.loads((run_dir / "summary.json").read_text())
            metrics = summary["best"]["metrics"] if a.select == "best" else {
                k[4:]: v for k, v in summary["last"].items() if k.startswith("val_")}
            rows.append(fold_rows(variant, fold, metrics))
            name = "predictions.csv" if a.select == "best" else "predictions_last.csv"
            preds[variant].append(pd.read_csv(run_dir / name))
    table = pd.DataFrame(rows)
    table.to_csv(out / "folds.csv", index=False)
    md = table_markdown(table)
    (out / "table.md").write_text(md)
    summary_rows = table.drop(columns=["fold"]).groupby("variant", sort=False).agg(["mean", "std"])
    summary_rows.columns = [f"{k}_{s}" for k, s in summary_rows.columns]
    summary_rows.to_csv(out / "table.csv")
    plot_roc({v: pooled(ps) for v, ps in preds.items()}, out / "roc.png")
    print(f"\n{len(folds)}-fold CV ({a.select} epoch), % mean ± std:\n{md}")
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'folds.csv'}, {out / 'roc.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
