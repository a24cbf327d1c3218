"""Ray Tune search over learning rate, weight decay, focal α/γ, batch size, Zoom-SE pool size and
metadata on/off; objective: mean validation AUC over ``--folds`` (every fold of a configuration
trained with the same hyperparameters). ASHA early stopping by default, Optuna as an option.

Local (starts a Ray instance on this machine):
    zoome tune --config launchers/configs/zoome.yaml --shards data/shards --folds 0,1,2 \\
        --num-samples 32 --out runs/tune --gpus-per-trial 1
On a running cluster (shards and --out on storage every node sees, checked before any trial):
    zoome tune ... --ray-address auto
On a cluster whose nodes share no folder (trials checkpoint their run folders to the object store):
    zoome tune ... --ray-address auto --storage s3://BUCKET/tune
    ray submit tuning/cluster.yaml tuning/tune.py -- --shards /shared/shards --out /shared/tune ...
Re-running with the same --out and --name (and --storage) resumes the experiment. Exit status 1 when a
trial ended in ERROR after its restarts (--tolerate-failed-trials N accepts up to N).
"""
from __future__ import annotations

import argparse
import sys

from zoome_dist.cli.common import USER_ERRORS, HelpFormatter, error


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoome tune", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", help="base YAML/JSON config (default: built-in paper recipe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="base config override")
    p.add_argument("--shards", required=True, help="zoome-shards build folder")
    p.add_argument("--folds", default="0,1,2", help="validation folds every configuration is trained on (0-2 or 0,1,2)")
    p.add_argument("--num-samples", type=int, default=16, help="configurations sampled")
    p.add_argument("--out", required=True, help="experiment folder: trials.csv/.md, best.yaml, trial run folders")
    p.add_argument("--name", default="zoome_tune", help="experiment name (re-run to resume)")
    p.add_argument("--ray-address", help="join this cluster (e.g. auto or HOST:6379); default: local Ray")
    p.add_argument("--storage", metavar="URI",
                   help="where Ray Tune keeps the experiment and each trial's checkpoints, run folders included, for "
                        "clusters whose nodes share no folder: s3://BUCKET/PREFIX (an S3-compatible server: "
                        "add ?endpoint_override=HOST:PORT&scheme=http), gs://BUCKET/PREFIX, or a folder every node "
                        "mounts. Trials then train in --scratch on their node. Default: OUT/ray, with the run folders "
                        "in OUT/trials (OUT shared by every node)")
    p.add_argument("--scratch",
                   help="with --storage: each node's folder for the run folders of the trials it trains (~ is the "
                        "node's home; default: zoome-trials in the node's temp folder)")
    p.add_argument("--gpus-per-trial", type=int, default=None,
                   help="GPUs per trial (default: 1 where the Ray cluster has GPUs, else 0, i.e. CPU trials)")
    p.add_argument("--workers-per-trial", type=int, default=0, help="ranks per trial (default: GPUs, or 1)")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPU cores (threads) per rank")
    p.add_argument("--space", metavar="YAML",
                   help="the search space: config key → {loguniform|uniform: [low, high]}, {choice: [...]}, "
                        "{randint: [low, high]} or a plain value (frozen); default: tuning/space.yaml's space")
    p.add_argument("--pool-sizes", help="Zoom-SE pool sizes to search, e.g. 1,2,4,8 (replaces the space's)")
    p.add_argument("--batch-sizes", help="global batch sizes to search, e.g. 32,64,128 (replaces the space's)")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha stops poor configurations after their first fold; fifo runs all")
    p.add_argument("--search", choices=["random", "optuna"], default="random",
                   help="how configurations are drawn (optuna needs the optuna extra)")
    p.add_argument("--max-failures", type=int, default=2, help="restarts of a failed trial (from its checkpoint)")
    p.add_argument("--tolerate-failed-trials", type=int, default=0, metavar="N",
                   help="exit 0 even when up to N trials ended in ERROR (after their restarts)")
    p.add_argument("--max-concurrent", type=int, default=0, help="0: as many as resources allow")
    p.add_argument("--seed", type=int, default=0, help="seed of the search algorithm's sampling")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2, 3], help="Ray Tune console output")
    return p


def main(argv: list[str] | None = None) -> int:
    a = get_parser().parse_args(argv)
    from zoome_dist.launch import tune
    from zoome_dist.launch.trial import error_line, trial_id

    try:
        search = tune.prepare(a)
        summary, failed, out = tune.run(a, search)
    except USER_ERRORS as e:
        return error("zoome tune", e)
    for r in failed:
        print(f"zoome tune: trial {trial_id(r)} ended in ERROR: {error_line(r.error, last=True)} "
              f"(see {r.path}/error.txt)", file=sys.stderr)
    if summary is None or len(failed) > a.tolerate_failed_trials:
        if failed:
            print(f"zoome tune: {len(failed)} trial(s) ended in ERROR (--tolerate-failed-trials "
                  f"{a.tolerate_failed_trials}); rerun the same command to resume them", file=sys.stderr)
        return 1
    print((out / "trials.md").read_text())
    print(f"best mean AUC {summary['best_mean_auc']:.4f} over folds {search.folds} ({summary['complete']} of "
          f"{summary['trials']} trials finished every fold): {summary['best']}")
    if summary.get("best_run_dir"):  # its fold-XX/model_last.pt: the best configuration's models, no retraining
        print(f"the best trial's run folders (a model per fold; zoome predict/export take the folder): "
              f"{summary['best_run_dir']}")
    print(f"wrote {out / 'trials.csv'}, {out / 'trials.md'}, {out / 'best.yaml'}, {out / 'auc_vs_pool_size.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
