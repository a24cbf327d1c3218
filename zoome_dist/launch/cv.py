"""Cross-validation jobs: one training job per (variant, fold) of ``zoome cv`` (``cli/cv.py``), and its
expected run time. Reports: ``eval/report.py``."""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from zoome_dist.cli.common import check_folds, parse_folds
from zoome_dist.core.rundir import RunDir, fold_dir


def check_reuse(jobs: list[tuple[Any, Any]], shards: Path) -> None:
    """A fold already trained (or begun) in ``--out`` is reused only if it is the same job: the same
    resolved config and shards. Otherwise the CV would report (or resume) a run of something else."""
    from zoome_dist.config import changes

    problems = []
    for job, cfg in jobs:
        if not job.run.config.is_file():
            continue
        changed = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes(job.run.config, cfg).items()]
        info = json.loads(job.run.run_info.read_text()) if job.run.run_info.is_file() else {}
        if info.get("shards", str(shards)) != str(shards):
            changed.append(f"shards: {info['shards']} -> {shards}")
        if changed:
            problems.append(f"{job.name} ({'finished' if job.done else 'unfinished'}, {job.run.path}): {'; '.join(changed)}")
    if problems:
        raise ValueError("--out holds folds trained with another config or shards; reusing them would report "
                         "results of another setup:\n  " + "\n  ".join(problems) + "\nUse a new --out, or the "
                         "--config/--set/--shards those folds were trained with")


def fold_args(a: argparse.Namespace, variant: str, fold: int, run_dir: Path) -> tuple[str, ...]:
    """A job's ``zoome train`` arguments, with absolute paths (a Ray task runs in another folder)."""
    args = ["--shards", str(Path(a.shards).resolve()), "--fold", str(fold), "--out", str(run_dir),
            "--set", f"model.name={variant}", "--no-progress", "--keep", a.keep]
    if a.config:
        args += ["--config", str(Path(a.config).resolve())]
    for s in a.set:
        args += ["--set", s]
    return tuple(args)


@dataclass
class Plan:
    """What a ``zoome cv`` command line resolves to: the config, folds, variants and one job per (variant, fold)."""
    cfg: Any
    folds: list[int]
    variants: list[str]
    jobs: list[Any]
    resources: Any
    out: Path


def plan(a: argparse.Namespace) -> Plan:
    """Check the config, folds, variants and launch before any job; name each job's run folder."""
    from zoome_dist.config import apply_overrides, load_config, parse_set, validate
    from zoome_dist.eval import paper
    from zoome_dist.launch.command import Launch
    from zoome_dist.launch.jobs import Job, Resources
    from zoome_dist.models import MODELS

    if a.paper:
        a.config = a.config or str(Path(__file__).resolve().parents[2] / paper.CONFIG)
        a.variants = a.variants or ",".join(paper.VARIANTS)
    cfg = load_config(a.config, parse_set(a.set))
    folds = parse_folds(a.folds)
    check_folds(folds, a.shards)
    Launch(ranks=a.ranks, hostfile=a.hostfile, master_addr=a.master_addr).validate()
    variants = list(dict.fromkeys(v for v in a.variants.split(",") if v)) or [cfg.model.name]
    unknown = [v for v in variants if v not in MODELS]
    if unknown:
        raise ValueError(f"Unknown variant(s) {unknown}. Valid models: {sorted(MODELS)}")
    configs = {v: apply_overrides(copy.deepcopy(cfg), {"model.name": v}) for v in variants}
    for variant_cfg in configs.values():  # a bad value fails here, not in every job
        validate(variant_cfg)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.hostfile:
        a.hostfile = str(Path(a.hostfile).resolve())
    jobs = [Job(f"{variant} fold {fold}", RunDir(fold_dir(out, variant, fold)),
                fold_args(a, variant, fold, fold_dir(out, variant, fold)))
            for variant in variants for fold in folds]
    check_reuse([(j, configs[v]) for j, v in zip(jobs, [v for v in variants for _ in folds])],
                Path(a.shards).resolve())
    res = Resources(ranks=a.ranks, cpus=a.cpus_per_job, hostfile=a.hostfile, master_addr=a.master_addr)
    return Plan(cfg, folds, variants, jobs, res, out)


def run(a: argparse.Namespace, p: Plan) -> int:
    """Train the plan's unfinished jobs (or only ``--only-job``), then write and print the reports."""
    from zoome_dist.eval import paper
    from zoome_dist.eval.report import cv_report
    from zoome_dist.launch.jobs import run_local, run_ray
    from zoome_dist.train.engine import accelerator

    jobs, out = p.jobs, p.out
    if a.only_job is not None:
        if a.only_job >= len(jobs):
            raise ValueError(f"--only-job {a.only_job}: there are {len(jobs)} jobs (0-{len(jobs) - 1}; see --dry-run)")
        jobs = [jobs[a.only_job]]
    print(f"== {len(jobs)} job(s), {sum(j.done for j in jobs)} finished before", flush=True)
    if a.paper:
        print(expected_time(a.shards, p.folds, p.variants, p.cfg.train.epochs), flush=True)
    failed = (run_ray(jobs, p.resources, a.ray_address, a.max_retries, out, a.shards, a.storage) if a.ray_address
              else run_local(jobs, p.resources, a.jobs, a.max_retries, gpu=accelerator() == "cuda"))
    if failed:
        for name, why in failed.items():
            print(f"zoome cv: {name} failed: {why}", file=sys.stderr)
        print(f"zoome cv: {len(failed)} of {len(jobs)} job(s) failed; rerun the same command to resume them "
              "(finished jobs are not retrained)", file=sys.stderr)
        return 1
    if a.only_job is not None:
        print(f"== {jobs[0].name}: done ({jobs[0].run.path}); the report: the same command without --only-job")
        return 0
    md = cv_report(out, p.variants, p.folds, a.select)
    print(f"\n{len(p.folds)}-fold CV ({a.select} epoch), % mean ± std:\n{md}")
    if a.paper:
        cmp = paper.comparison_markdown(pd.read_csv(out / "folds.csv"))
        (out / "paper.md").write_text(cmp)
        print(f"ours beside the paper's (%):\n{cmp}")
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'folds.csv'}, {out / 'subgroups.md'}, "
          f"{out / 'uncertainty.md'}, {out / 'report.html'} (all in one page), "
          f"{out / 'roc.png'}, {out / 'calibration.png'}, {out / 'curves.png'}")
    return 0


def project(images: int = 33126, folds: int = 10, variants: int = 7, epochs: int = 20,
            img_s_micro64: float = 700.0, img_s_micro8: float = 179.0, startup_s: float = 30.0,
            gpus_per_node: int = 8) -> list[dict]:
    """Hours for a ``folds``-fold CV of ``variants`` on ``images`` (ISIC 2020: 33,126), per cluster shape.

    One job trains on (folds−1)/folds of the images and validates on the rest, every epoch. A 1-GPU job
    runs at ``img_s_micro64`` (global batch 64 on one GPU, end to end); an 8-GPU data-parallel job at
    the paper's global batch 64 has micro batch 8 per GPU, at best 8 × ``img_s_micro8`` (perfect
    scaling: an upper bound on its speed). Jobs run in waves of as many as there are slots."""
    jobs = folds * variants
    per_epoch = images * (folds - 1) / folds + images / folds

    def job_s(img_s: float) -> float:
        return startup_s + epochs * per_epoch / img_s

    shapes = [("1 node × 8 GPUs, one 8-GPU data-parallel job at a time (micro 8)", 1, job_s(8 * img_s_micro8)),
              ("1 node, 8 concurrent 1-GPU jobs (micro 64)", gpus_per_node, job_s(img_s_micro64)),
              ("4 nodes, 32 concurrent 1-GPU jobs (micro 64)", 4 * gpus_per_node, job_s(img_s_micro64))]
    return [{"shape": name, "slots": slots, "job_min": round(t / 60, 1),
             "hours": round(math.ceil(jobs / slots) * t / 3600, 2)} for name, slots, t in shapes]


def expected_time(shards: str, folds: list[int], variants: list[str], epochs: int) -> str:
    """The run time of this CV per cluster shape, projected from the H200 figures (BENCHMARKS.md)."""
    images = json.loads((Path(shards) / "manifest.json").read_text())["totals"]["samples"]
    rows = project(images=images, folds=len(folds), variants=len(variants), epochs=epochs)
    return "expected run time on GPUs (projection, BENCHMARKS.md):\n" + "\n".join(
        f"  {r['shape']}: {r['hours']} h ({r['job_min']} min per job)" for r in rows)
