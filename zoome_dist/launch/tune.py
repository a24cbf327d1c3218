"""The ``zoome tune`` search on a Ray cluster: checks before Ray starts, the Tuner (new or resumed), the
results. Each trial is ``trial.py``'s ``trainable``."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoome_dist.cli.common import check_folds, parse_folds
from zoome_dist.launch.trial import (base_tree, check_pickles_are_ours, load_space, search_space, trainable,
                                     write_results)


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


def _ints(flag: str, spec: str | None) -> tuple[int, ...] | None:
    if not spec:
        return None
    try:
        return tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"{flag} {spec!r}: comma-separated whole numbers, e.g. 1,2,4,8") from None


@dataclass
class Search:
    """A checked ``zoome tune`` command line: the base config, folds, space and where Ray keeps the experiment."""
    cfg: Any
    folds: list[int]
    space: dict
    storage_fs: Any
    storage_path: str
    shared_folder: bool


def prepare(a: argparse.Namespace) -> Search:
    """Every check that needs no Ray: flags, config, folds, optional packages, a resumed experiment's pickles."""
    from zoome_dist.config import load_config, parse_set, validate
    from zoome_dist.core.storage import open_storage

    if a.tolerate_failed_trials < 0:
        raise ValueError(f"--tolerate-failed-trials must be zero or more, got {a.tolerate_failed_trials}")
    cfg = load_config(a.config, parse_set(a.set))
    validate(cfg)
    folds = parse_folds(a.folds)
    check_folds(folds, a.shards)
    space = search_space(load_space(a.space), _ints("--pool-sizes", a.pool_sizes), cfg.model.name,
                         _ints("--batch-sizes", a.batch_sizes))
    if a.search == "optuna":
        try:
            import optuna  # noqa: F401 - Ray's OptunaSearch imports without it, then asserts
        except ImportError as e:
            raise ValueError(f"--search optuna needs the optuna package (pip install -e '.[optuna]'): {e}") from None
    trial_resources(a.gpus_per_trial, a.workers_per_trial, 0)  # the flags' own errors, before Ray starts
    experiment = Path(a.out).resolve() / "ray" / a.name
    if a.scratch and not a.storage:
        raise ValueError("--scratch is for --storage runs (without --storage trials train in OUT/trials)")
    shared_folder = bool(a.storage) and "://" not in a.storage  # a folder every node mounts
    if shared_folder:
        experiment = Path(a.storage).expanduser().resolve() / a.name
    if (not a.storage or shared_folder) and experiment.is_dir():
        check_pickles_are_ours(experiment)  # Ray unpickles a resumed experiment's state
    storage_fs, storage_path = (open_storage(a.storage) if a.storage
                                else (None, str(Path(a.out).resolve() / "ray")))
    return Search(cfg, folds, space, storage_fs, storage_path, shared_folder)


def make_tuner(a: argparse.Namespace, s: Search, fn: Any):
    """The experiment's ``tune.Tuner``: resumed where ``--out``/``--name`` (or ``--storage``) holds one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    path = f"{s.storage_path.rstrip('/')}/{a.name}"
    if tune.Tuner.can_restore(path, storage_filesystem=s.storage_fs):
        print(f"resuming experiment {a.storage or path}", flush=True)
        return tune.Tuner.restore(path, trainable=fn, param_space=s.space, resume_unfinished=True,
                                  resume_errored=True, storage_filesystem=s.storage_fs)
    epochs = s.cfg.train.epochs
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=len(s.folds) * epochs,
                               grace_period=epochs, reduction_factor=2)
                 if a.scheduler == "asha" else FIFOScheduler())
    if a.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=a.seed)
        search = ConcurrencyLimiter(search, a.max_concurrent) if a.max_concurrent else search
    else:
        search = BasicVariantGenerator(random_state=a.seed)
    return tune.Tuner(
        fn, param_space=s.space,
        tune_config=tune.TuneConfig(metric="mean_auc", mode="max", num_samples=a.num_samples,
                                    scheduler=scheduler, search_alg=search,
                                    max_concurrent_trials=a.max_concurrent or None),
        run_config=tune.RunConfig(name=a.name, storage_path=s.storage_path, storage_filesystem=s.storage_fs,
                                  verbose=a.verbose, failure_config=tune.FailureConfig(max_failures=a.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))


def run(a: argparse.Namespace, s: Search) -> tuple[dict | None, list, Path]:
    """Start or join Ray, check every node's storage, run the trials; ``(summary, failed results, out)``
    (summary None when no trial finished every fold)."""
    import ray
    from ray import tune

    from zoome_dist.core.storage import check_ray_nodes

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ray.init(address=a.ray_address, include_dashboard=False) if a.ray_address else ray.init(include_dashboard=False)
    try:
        cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
        workers, gpus = trial_resources(a.gpus_per_trial, a.workers_per_trial, cluster_gpus)
        print(f"== each trial: {workers} rank(s), {gpus} GPU(s), {workers * a.cpus_per_worker} CPU(s); the cluster has "
              f"{cluster_gpus} GPU(s)" + (" (set by --gpus-per-trial)" if a.gpus_per_trial is not None else ""), flush=True)
        # every node: --out (or a --storage folder) and the shards; an object store was proven writable above
        check_ray_nodes(Path(s.storage_path) if s.shared_folder else out, a.shards,
                        need_out=not a.storage or s.shared_folder)
        fn = tune.with_parameters(trainable, base=base_tree(s.cfg), shards=str(Path(a.shards).resolve()),
                                  folds=s.folds, run_root=(a.scratch or "") if a.storage else str(out / "trials"),
                                  workers=workers, gpus=gpus, threads=a.cpus_per_worker, carry_runs=bool(a.storage))
        fn = tune.with_resources(fn, {"cpu": workers * a.cpus_per_worker, "gpu": gpus})
        results = make_tuner(a, s, fn).fit()
        failed = [r for r in results if r.error]
        try:
            summary = write_results(results, out, base_tree(s.cfg), s.folds)
        except RuntimeError as e:  # no trial finished every fold
            summary = None
            print(f"zoome tune: error: {e}", file=sys.stderr)
    finally:
        ray.shutdown()
    return summary, failed, out
