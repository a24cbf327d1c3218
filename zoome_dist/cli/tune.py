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
from pathlib import Path

from zoome_dist.cli.common import USER_ERRORS, HelpFormatter, check_folds, error, parse_folds


def trial_resources(gpus: int | None, workers: int, cluster_gpus: int) -> tuple[int, int]:
    """``(ranks, GPUs)`` per trial: ``--gpus-per-trial`` (None: 1 on a cluster with GPUs, else 0) and
    ``--workers-per-trial`` (0: one rank per GPU, or 1)."""
    if gpus is not None and gpus < 0:
        raise ValueError(f"--gpus-per-trial must be zero or more, got {gpus}")
    if workers < 0:
        raise ValueError(f"--workers-per-trial must be zero or more, got {workers}")
    gpus = (1 if cluster_gpus else 0) if gpus is None else gpus
    if gpus and workers > gpus:
        raise ValueError(f"--workers-per-trial {workers} > --gpus-per-trial {gpus}: a GPU trial runs one rank per GPU")
    return workers or max(1, gpus), gpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zoome tune", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="base config override")
    p.add_argument("--shards", required=True)
    p.add_argument("--folds", default="0,1,2", help="validation folds every configuration is trained on (0-2 or 0,1,2)")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--out", required=True)
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
    p.add_argument("--cpus-per-worker", type=int, default=1)
    p.add_argument("--pool-sizes", default="1,2,4,8", help="Zoom-SE pool sizes to search")
    p.add_argument("--batch-sizes", default="32,64,128", help="global batch sizes to search")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    p.add_argument("--search", choices=["random", "optuna"], default="random")
    p.add_argument("--max-failures", type=int, default=2, help="restarts of a failed trial (from its checkpoint)")
    p.add_argument("--tolerate-failed-trials", type=int, default=0, metavar="N",
                   help="exit 0 even when up to N trials ended in ERROR (after their restarts)")
    p.add_argument("--max-concurrent", type=int, default=0, help="0: as many as resources allow")
    p.add_argument("--seed", type=int, default=0, help="seed of the search algorithm's sampling")
    p.add_argument("--verbose", type=int, default=1, choices=[0, 1, 2, 3], help="Ray Tune console output")
    a = p.parse_args(argv)

    from zoome_dist.config import load_config, parse_set
    from zoome_dist.core.storage import check_ray_nodes, open_storage
    from zoome_dist.train.engine import validate
    from zoome_dist.launch.tune import base_tree, check_pickles_are_ours, error_line, search_space, trainable, trial_id, write_results

    try:
        if a.tolerate_failed_trials < 0:
            raise ValueError(f"--tolerate-failed-trials must be zero or more, got {a.tolerate_failed_trials}")
        cfg = load_config(a.config, parse_set(a.set))
        validate(cfg)
        folds = parse_folds(a.folds)
        check_folds(folds, a.shards)
        space = search_space(tuple(int(x) for x in a.pool_sizes.split(",")), cfg.model.name,
                             tuple(int(x) for x in a.batch_sizes.split(",")))
        if a.search == "optuna":
            try:
                import optuna  # noqa: F401 - Ray's OptunaSearch imports without it, then asserts
                from ray.tune.search.optuna import OptunaSearch
            except ImportError as e:
                raise ValueError("--search optuna needs the optuna package "
                                 f"(pip install -e '.[optuna]'): {e}") from None
        trial_resources(a.gpus_per_trial, a.workers_per_trial, 0)  # the flags' own errors, before Ray starts
        experiment = Path(a.out).resolve() / "ray" / a.name
        if a.scratch and not a.storage:
            raise ValueError("--scratch is for --storage runs (without --storage trials train in OUT/trials)")
        shared_folder = a.storage and "://" not in a.storage  # a folder every node mounts
        if shared_folder:
            experiment = Path(a.storage).expanduser().resolve() / a.name
        if (not a.storage or shared_folder) and experiment.is_dir():
            check_pickles_are_ours(experiment)  # Ray unpickles a resumed experiment's state
        storage_fs, storage_path = (open_storage(a.storage) if a.storage
                                    else (None, str(Path(a.out).resolve() / "ray")))
    except USER_ERRORS as e:
        return error("zoome tune", e)

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray.init(address=a.ray_address, include_dashboard=False) if a.ray_address else ray.init(
        include_dashboard=False)
    try:
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        workers, gpus = trial_resources(a.gpus_per_trial, a.workers_per_trial, cluster_gpus)
        print(f"== each trial: {workers} rank(s), {gpus} GPU(s), {workers * a.cpus_per_worker} CPU(s); the cluster has "
              f"{cluster_gpus} GPU(s)" + (" (set by --gpus-per-trial)" if a.gpus_per_trial is not None else ""), flush=True)
        try:
            # every node: --out (or a --storage folder) and the shards; an object store was proven writable above
            check_ray_nodes(Path(storage_path) if shared_folder else out, a.shards,
                            need_out=not a.storage or bool(shared_folder))
        except ValueError as e:
            return error("zoome tune", e)
        fn = tune.with_parameters(trainable, base=base_tree(cfg), shards=str(Path(a.shards).resolve()),
                                  folds=folds, run_root=(a.scratch or "") if a.storage else str(out / "trials"),
                                  workers=workers, gpus=gpus, threads=a.cpus_per_worker,
                                  carry_runs=bool(a.storage))
        fn = tune.with_resources(fn, {"cpu": workers * a.cpus_per_worker, "gpu": gpus})
        epochs = cfg.train.epochs
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(folds) * epochs,
                                   grace_period=epochs, reduction_factor=2)
                     if a.scheduler == "asha" else FIFOScheduler())
        search = (OptunaSearch(seed=a.seed) if a.search == "optuna"
                  else BasicVariantGenerator(random_state=a.seed))
        if a.search == "optuna" and a.max_concurrent:
            search = ConcurrencyLimiter(search, a.max_concurrent)
        path = f"{storage_path.rstrip('/')}/{a.name}"
        if tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
            print(f"resuming experiment {a.storage or path}", flush=True)
            tuner = tune.Tuner.restore(path, trainable=fn, param_space=space, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=storage_fs)
        else:
            tuner = tune.Tuner(
                fn, param_space=space,
                tune_config=tune.TuneConfig(metric="mean_auc", mode="max", num_samples=a.num_samples,
                                            scheduler=scheduler, search_alg=search,
                                            max_concurrent_trials=a.max_concurrent or None),
                run_config=tune.RunConfig(name=a.name, storage_path=storage_path, storage_filesystem=storage_fs,
                                          verbose=a.verbose,
                                          failure_config=tune.FailureConfig(max_failures=a.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))
        results = tuner.fit()
        failed = [r for r in results if r.error]
        try:
            summary = write_results(results, out, base_tree(cfg), folds)
        except RuntimeError as e:  # no trial finished every fold
            summary = None
            print(f"zoome tune: error: {e}", file=sys.stderr)
    finally:
        ray.shutdown()
    for r in failed:
        print(f"zoome tune: trial {trial_id(r)} ended in ERROR: {error_line(r.error, last=True)} "
              f"(see {r.path}/error.txt)", file=sys.stderr)
    if summary is None or len(failed) > a.tolerate_failed_trials:
        if failed:
            print(f"zoome tune: {len(failed)} trial(s) ended in ERROR (--tolerate-failed-trials "
                  f"{a.tolerate_failed_trials}); rerun the same command to resume them", file=sys.stderr)
        return 1
    print((out / "trials.md").read_text())
    print(f"best mean AUC {summary['best_mean_auc']:.4f} over folds {folds} ({summary['complete']} of "
          f"{summary['trials']} trials finished every fold): {summary['best']}")
    print(f"wrote {out / 'trials.csv'}, {out / 'trials.md'}, {out / 'best.yaml'}, {out / 'auc_vs_pool_size.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
