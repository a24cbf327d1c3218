"""K-fold cross-validation: one training job per (variant, fold), then Table-I-style reports.

    zoome cv --config launchers/configs/zoome.yaml --shards data/shards --folds 0-9 \\
        --out runs/cv --variants zoome,zoome_no_zoomse,zoome_no_meta --jobs 8     # 8 one-GPU jobs at once
    zoome cv ... --ray-address auto --gpus-per-job 1    # on a Ray cluster: jobs wherever GPUs are free
    zoome cv ... --gpus-per-job 8                       # one 8-GPU data-parallel job at a time
    zoome cv ... --dry-run; zoome cv ... --only-job 3   # list the jobs; train one (a SLURM array task)

Each job is the training command of ``zoome train`` (``--gpus-per-job`` ranks on one node, or a
``--hostfile`` job over several nodes), writing OUT/<variant>/fold-XX/ (a run folder; its output in
job.log when jobs run concurrently). Jobs run ``--jobs`` at a time on this node, each with its own GPUs
(of CUDA_VISIBLE_DEVICES where set), or as Ray tasks across a cluster (``--ray-address``). A failed job
is retried (``--max-retries``) from its checkpoint; a job whose run finished (summary.json) is never
run again, so re-running the same command resumes a CV. CPU: ranks are CPU processes
(DS_ACCELERATOR=cpu) and ``--cpus-per-job`` sets their threads.

Then OUT/table.md and OUT/table.csv (mean ± std over folds; AUC per source where the shards hold several),
OUT/folds.csv (per-fold rows), OUT/subgroups.md/.csv (pooled out-of-fold AUC per source, sex, age band,
site, Fitzpatrick type, with counts), OUT/roc.png (pooled out-of-fold ROC), OUT/curves.png (every job's
training curves), OUT/calibration.png (reliability diagram, ECE). Metrics are reported at 0.5, at each
epoch's training-set Youden threshold (optimistic) and at an out-of-fold threshold (``@oof``: fold k
at the Youden threshold of the other folds' out-of-fold predictions). OUT/<variant>/calibration.json
holds the threshold and temperature fitted on all pooled out-of-fold predictions; they are also
stored in each fold's model file (model_last.pt, or model_best.pt with --select best) for ``zoome
predict --threshold oof --calibrate``. ``--select last`` (default) reports each fold's final epoch;
``best`` reports its best-AUC epoch, which is selected on the fold being scored and therefore optimistic.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pandas as pd

from zoome_dist.cli.common import USER_ERRORS, HelpFormatter, check_folds, error, parse_folds
from zoome_dist.core.rundir import SELECT, RunDir


def fold_dir(out: Path, variant: str, fold: int) -> Path:
    """Where the CV's job (variant, fold) trains: its run folder."""
    return out / variant / f"fold-{fold:02d}"


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
            "--set", f"model.name={variant}", "--no-progress"]
    if a.config:
        args += ["--config", str(Path(a.config).resolve())]
    for s in a.set:
        args += ["--set", s]
    return tuple(args)


_TERMINATED: list[int] = [0]


def _terminate(signum: int, _frame) -> None:
    """SIGTERM (``kill``, ``scancel``) or SIGHUP (a closed terminal) ends the CV as Ctrl-C does: every job's process group, launcher and
    ranks, is stopped before ``zoome cv`` exits (they would otherwise train on without it)."""
    _TERMINATED[0] = signum
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _terminate)
    p = argparse.ArgumentParser(prog="zoome cv", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", help="default: the config file's defaults (with --paper: launchers/configs/zoome.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--shards", required=True)
    p.add_argument("--folds", default="0-9")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="", help="comma-separated model names (default: the config's)")
    p.add_argument("--gpus-per-job", "--num-gpus", dest="ranks", type=int, default=1, metavar="N",
                   help="data-parallel ranks of each (variant, fold) job, one GPU each (CPU ranks where there "
                        "is no GPU)")
    p.add_argument("--cpus-per-job", type=int, default=0,
                   help="cores per job, shared by its ranks' threads (default: not limited here; one per rank "
                        "on Ray)")
    p.add_argument("--jobs", type=int, default=1,
                   help="jobs at once on this node (each with its own GPUs)")
    p.add_argument("--ray-address", help="run the jobs as Ray tasks on this cluster (e.g. auto), as many at once "
                                         "as its free resources allow; run folders on shared storage")
    p.add_argument("--storage", metavar="URI",
                   help="with --ray-address, for nodes that share no folder: keep every job's run folder in "
                        "s3://BUCKET/PREFIX (an S3-compatible server: add ?endpoint_override=HOST:PORT&scheme=http), "
                        "gs://..., or a shared folder; jobs train on their node's disk at --out's path, a retried "
                        "job resumes from the stored copy, and the report reads them back into --out")
    p.add_argument("--max-retries", type=int, default=2,
                   help="retries of a failed job, each resuming from its checkpoint")
    p.add_argument("--hostfile", help="one multi-node data-parallel job at a time: DeepSpeed hostfile "
                                      "(with --master-addr)")
    p.add_argument("--master-addr", help="with --hostfile: the first node's address, as the others reach it")
    p.add_argument("--paper", action="store_true",
                   help="reproduce the paper: Table I and II variants (unless --variants), the paper's recipe (unless "
                        "--config), the expected run time first and OUT/paper.md (ours beside the paper's) last")
    p.add_argument("--dry-run", action="store_true",
                   help="list the (variant, fold) jobs, numbered from 0, with their run folders and state; run nothing")
    p.add_argument("--only-job", type=int, metavar="I",
                   help="train only job I of the --dry-run list (resuming it), and write no report: one task of "
                        "a SLURM job array (launchers/slurm/cv.sh); a later plain run writes the report")
    p.add_argument("--select", choices=SELECT, default="last",
                   help="the epoch each fold reports (and whose model the calibration is stored in)")
    a = p.parse_args(argv)
    try:  # the flags alone first: their errors come before seconds of torch and DeepSpeed imports
        if a.jobs < 1:
            raise ValueError(f"--jobs must be positive, got {a.jobs}")
        for flag, value in (("--max-retries", a.max_retries), ("--cpus-per-job", a.cpus_per_job)):
            if value < 0:
                raise ValueError(f"{flag} must be zero or more, got {value}")
        if a.hostfile and (a.jobs > 1 or a.ray_address):
            raise ValueError("--hostfile runs one multi-node job at a time; it cannot be combined with --jobs "
                             "or --ray-address (use one or the other)")
        if a.storage and not a.ray_address:
            raise ValueError("--storage is for jobs on a Ray cluster (--ray-address); here every job writes --out")
        if a.only_job is not None and (a.ray_address or a.hostfile or a.only_job < 0):
            raise ValueError(f"--only-job {a.only_job}: a job number ≥ 0 (see --dry-run), on this node (not with "
                             "--ray-address or --hostfile)")
        if a.ray_address and a.jobs > 1:
            raise ValueError("--jobs is for this node; with --ray-address the cluster's free resources decide "
                             "how many jobs run at once")
    except ValueError as e:
        return error("zoome cv", e)

    from zoome_dist.config import apply_overrides, load_config, parse_set
    from zoome_dist.launch.jobs import Job, Resources, run_local, run_ray
    from zoome_dist.launch.command import Launch
    from zoome_dist.models import MODELS
    from zoome_dist.train.engine import accelerator, validate

    from zoome_dist.eval import paper

    if a.paper:
        a.config = a.config or str(Path(__file__).resolve().parents[1] / paper.CONFIG)
        a.variants = a.variants or ",".join(paper.VARIANTS)
    try:
        cfg = load_config(a.config, parse_set(a.set))
        folds = parse_folds(a.folds)
        check_folds(folds, a.shards)
        Launch(ranks=a.ranks, hostfile=a.hostfile, master_addr=a.master_addr).validate()
        variants = list(dict.fromkeys(v for v in a.variants.split(",") if v)) or [cfg.model.name]
        unknown = [v for v in variants if v not in MODELS]
        if unknown:
            raise ValueError(f"Unknown variant(s) {unknown}. Valid models: {sorted(MODELS)}")
        for variant in variants:  # a bad value fails here, not in every job
            validate(apply_overrides(copy.deepcopy(cfg), {"model.name": variant}))
    except USER_ERRORS as e:
        return error("zoome cv", e)

    out = Path(a.out).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        if a.hostfile:
            a.hostfile = str(Path(a.hostfile).resolve())
        jobs = [Job(f"{variant} fold {fold}", RunDir(fold_dir(out, variant, fold)),
                    fold_args(a, variant, fold, fold_dir(out, variant, fold)))
                for variant in variants for fold in folds]
        check_reuse([(j, apply_overrides(copy.deepcopy(cfg), {"model.name": v})) for j, v in
                     zip(jobs, [v for v in variants for _ in folds])], Path(a.shards).resolve())
        res = Resources(ranks=a.ranks, cpus=a.cpus_per_job, hostfile=a.hostfile, master_addr=a.master_addr)
        if a.dry_run:
            for i, j in enumerate(jobs):
                print(f"job {i}: {j.name} -> {j.run.path} ({'finished' if j.done else 'to train'})")
            return 0
        if a.only_job is not None:
            if a.only_job >= len(jobs):
                raise ValueError(f"--only-job {a.only_job}: there are {len(jobs)} jobs (0-{len(jobs) - 1}; see --dry-run)")
            jobs = [jobs[a.only_job]]
        print(f"== {len(jobs)} job(s), {sum(j.done for j in jobs)} finished before", flush=True)
        if a.paper:
            print(expected_time(a.shards, folds, variants, cfg.train.epochs), flush=True)
        failed = (run_ray(jobs, res, a.ray_address, a.max_retries, out, a.shards, a.storage) if a.ray_address
                  else run_local(jobs, res, a.jobs, a.max_retries, gpu=accelerator() == "cuda"))
        if failed:
            for name, why in failed.items():
                print(f"zoome cv: {name} failed: {why}", file=sys.stderr)
            print(f"zoome cv: {len(failed)} of {len(jobs)} job(s) failed; rerun the same command to resume them "
                  "(finished jobs are not retrained)", file=sys.stderr)
            return 1
        if a.only_job is not None:
            print(f"== {jobs[0].name}: done ({jobs[0].run.path}); the report: the same command without --only-job")
            return 0
        md = report(out, variants, folds, a.select)
    except KeyboardInterrupt:
        print("zoome cv: interrupted; every running job was stopped. Rerun the same command to resume",
              file=sys.stderr)
        return 128 + (_TERMINATED[0] or signal.SIGINT)
    except (*USER_ERRORS, KeyError) as e:  # KeyError: a run folder's summary without what it should hold
        return error("zoome cv", e)
    print(f"\n{len(folds)}-fold CV ({a.select} epoch), % mean ± std:\n{md}")
    if a.paper:
        cmp = paper.comparison_markdown(pd.read_csv(out / "folds.csv"))
        (out / "paper.md").write_text(cmp)
        print(f"ours beside the paper's (%):\n{cmp}")
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'folds.csv'}, {out / 'subgroups.md'}, "
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


def report(out: Path, variants: list[str], folds: list[int], select: str) -> str:
    """The CV's tables, ROC and curves from its finished run folders; returns the markdown table."""
    from zoome_dist.eval.calibration import cross_fit_thresholds, fit, plot_reliability, stamp_checkpoint
    from zoome_dist.eval.report import fold_rows, plot_curves, plot_roc, pooled, table_markdown
    from zoome_dist.eval.subgroups import auc_by_source, subgroup_markdown, subgroup_metrics

    rows, preds, curves = [], {v: [] for v in variants}, {}
    for variant in variants:
        runs = {fold: RunDir(fold_dir(out, variant, fold)) for fold in folds}
        fold_preds = {fold: pd.read_csv(run.predictions(select), keep_default_na=False, na_values=[""])
                      for fold, run in runs.items()}
        honest = cross_fit_thresholds(fold_preds)
        for fold, run in runs.items():
            curves[f"{variant} fold {fold}"] = run.read_metrics()
            rows.append({**fold_rows(variant, fold, run.fold_metrics(select)), **honest.get(fold, {}),
                         **{f"auc:{src}": auc for src, auc in auc_by_source(fold_preds[fold]).items()}})
        preds[variant] = list(fold_preds.values())
        calibration = {**fit(pooled(preds[variant])), "select": select, "folds": folds,
                       "fit_on": f"pooled out-of-fold predictions of {len(folds)} fold(s), {select} epoch"}
        (out / variant / "calibration.json").write_text(json.dumps(calibration, indent=1))
        for run in runs.values():
            model = run.model(select)
            if model.is_file():
                stamp_checkpoint(model, calibration)
    table = pd.DataFrame(rows)
    table.to_csv(out / "folds.csv", index=False)
    md = table_markdown(table)
    (out / "table.md").write_text(md)
    summary_rows = table.drop(columns=["fold"]).groupby("variant", sort=False).agg(["mean", "std"])
    summary_rows.columns = [f"{k}_{s}" for k, s in summary_rows.columns]
    summary_rows.to_csv(out / "table.csv")
    pooled_preds = {v: pooled(ps) for v, ps in preds.items()}
    plot_roc(pooled_preds, out / "roc.png")
    plot_reliability(pooled_preds, out / "calibration.png")
    plot_curves(curves, out / "curves.png")
    groups = {v: subgroup_metrics(p) for v, p in pooled_preds.items()}
    pd.concat([g.assign(variant=v) for v, g in groups.items()]).to_csv(out / "subgroups.csv", index=False)
    (out / "subgroups.md").write_text("Pooled out-of-fold AUC per subgroup (% ; – where a subgroup has one class)\n\n"
                                      + subgroup_markdown(groups))
    return md

if __name__ == "__main__":
    sys.exit(main())
