"""``zoome cv``: K-fold cross-validation: one training job per (variant, fold), then Table-I-style reports.

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
import signal
import sys
import threading

from zoome_dist.cli.common import USER_ERRORS, HelpFormatter, error
from zoome_dist.core.rundir import SELECT

_TERMINATED: list[int] = [0]


def _terminate(signum: int, _frame) -> None:
    """SIGTERM (``kill``, ``scancel``) or SIGHUP (a closed terminal) ends the CV as Ctrl-C does: every job's
    process group, launcher and ranks, is stopped before ``zoome cv`` exits (they would otherwise train on)."""
    _TERMINATED[0] = signum
    raise KeyboardInterrupt


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoome cv", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", help="default: the config file's defaults (with --paper: launchers/configs/zoome.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), as zoome train --set")
    p.add_argument("--shards", required=True, help="zoome-shards build folder")
    p.add_argument("--folds", default="0-9", help="validation folds to run, one job per (variant, fold): 0-9 or 0,3,5")
    p.add_argument("--out", required=True, help="CV folder: one run folder per (variant, fold), then the reports")
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
    p.add_argument("--keep", choices=("models", "all"), default="models",
                   help="what a finished fold keeps: its model files, predictions and logs (models), or its DeepSpeed "
                        "checkpoints too (all: ~3 checkpoints of the model and optimizer per fold, to continue it "
                        "later); unfinished folds always keep their checkpoints, to resume")
    p.add_argument("--select", choices=SELECT, default="last",
                   help="the epoch each fold reports (and whose model the calibration is stored in)")
    return p


def check_flags(a: argparse.Namespace) -> None:
    """The flags alone, before seconds of torch and DeepSpeed imports."""
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


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _terminate)
    a = get_parser().parse_args(argv)
    try:
        check_flags(a)
        from zoome_dist.launch import cv

        plan = cv.plan(a)
        if a.dry_run:
            for i, j in enumerate(plan.jobs):
                print(f"job {i}: {j.name} -> {j.run.path} ({'finished' if j.done else 'to train'})")
            done = sum(j.done for j in plan.jobs)
            print(f"{len(plan.jobs) - done} to train, {done} finished; "
                  + cv.expected_time(a.shards, plan.folds, plan.variants, plan.cfg.train.epochs))
            return 0
        return cv.run(a, plan)
    except KeyboardInterrupt:
        print("zoome cv: interrupted; every running job was stopped. Rerun the same command to resume",
              file=sys.stderr)
        return 128 + (_TERMINATED[0] or signal.SIGINT)
    except (*USER_ERRORS, KeyError) as e:  # KeyError: a run folder's summary without what it should hold
        return error("zoome cv", e)


if __name__ == "__main__":
    sys.exit(main())
