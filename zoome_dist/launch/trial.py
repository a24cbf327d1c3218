"""Ray Tune search over the training config, cross-validated inside each trial.

Design (see docs/tuning.md):
- **Folds inside a trial**: one sampled configuration trains every chosen fold in turn, and reports
  after every epoch the running mean validation AUC (finished folds' final AUC and the current fold's
  latest). Every fold of a configuration therefore uses the same hyperparameters (a ``grid_search``
  over the fold would redraw them), and ASHA can stop a poor configuration after its first fold.
- **A process group per trial**: the trial spawns its ``workers`` ranks as ``python -m
  zoome_dist.train`` processes (``zoome_dist.launch.command.local_rank_commands``: RANK/WORLD_SIZE env and a
  rendezvous file in the fold's folder, so concurrent trials never race for a port), the path a user runs,
  instead of a Ray Train ``TorchTrainer``; the ranks get a parent-death signal so they die with the
  trial when ASHA stops it or it fails, and nothing (placement groups, actors) outlives a trial.
- **Checkpoints**: every epoch the ranks write DeepSpeed checkpoints into the trial's run folder
  (``OUT/trials/<trial_id>/fold-XX``, on storage all nodes share); the Tune checkpoint holds the
  small trial state (finished folds and their AUC), so a restarted trial skips finished folds and
  resumes the current one with ``--resume``. Without shared storage (``zoome tune --storage s3://...``)
  the run folders live in each node's scratch and every Tune checkpoint carries them (newest
  DeepSpeed checkpoint only) to the object store, from which a trial restarted elsewhere resumes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from zoome_dist.config import Config, apply_overrides, check_keys
from zoome_dist.core.procs import die_with_parent, exit_description, log_tail
from zoome_dist.core.rundir import RunDir
from zoome_dist.core.storage import snapshot_runs
from zoome_dist.eval.plots import figure
from zoome_dist.launch.command import job_env, local_rank_commands


# The default search space (tuning/space.yaml is this, as a file to copy and edit): config key → a
# distribution (one of SAMPLERS, with its arguments) or a plain value (frozen for every trial).
DEFAULT_SPACE: dict[str, Any] = {
    "optim.lr": {"loguniform": [1e-5, 1e-3]},
    "optim.weight_decay": {"choice": [0.0, 1e-5, 1e-4, 1e-3]},
    "loss.alpha": {"uniform": [0.1, 0.9]},
    "loss.gamma": {"uniform": [0.0, 3.0]},
    "train.global_batch_size": {"choice": [32, 64, 128]},
    "model.pool_size": {"choice": [1, 2, 4, 8]},
    "model.name": {"choice": ["zoome", "zoome_no_meta"]},  # metadata embedding on/off
}
SAMPLERS = ("loguniform", "uniform", "choice", "randint")


def load_space(path: str | Path | None) -> dict[str, Any]:
    """A search-space YAML file (``DEFAULT_SPACE`` without one), checked: known config keys, one known sampler
    per key, and every value it can draw accepted by the config's types."""
    spec = DEFAULT_SPACE if path is None else yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"{path}: a search space is a mapping of config keys to distributions or values")
    check_keys(list(spec))
    for key, value in spec.items():
        if isinstance(value, dict):
            if len(value) != 1 or next(iter(value)) not in SAMPLERS:
                raise ValueError(f"{path}: {key}: one of {list(SAMPLERS)} with its arguments, e.g. "
                                 f"{{choice: [1, 2]}} or {{loguniform: [1.0e-5, 1.0e-3]}}; got {value!r}")
            (kind, args), = value.items()
            if not isinstance(args, list) or (kind != "choice" and len(args) != 2) or not args:
                raise ValueError(f"{path}: {key}: {kind} takes a list " + ("of values" if kind == "choice" else
                                                                        "[low, high]") + f"; got {args!r}")
            for v in (args if kind == "choice" else args[:1]):
                apply_overrides(Config(), {key: v})  # the config's type and choices check each value
        else:
            apply_overrides(Config(), {key: value})
    return spec


def search_space(spec: dict[str, Any], pool_sizes: tuple[int, ...] | None = None, base_model: str = "zoome",
                 batch_sizes: tuple[int, ...] | None = None) -> dict[str, Any]:
    """Ray Tune's param_space from a checked ``spec`` (``load_space``); ``pool_sizes`` and ``batch_sizes``
    (``--pool-sizes``, ``--batch-sizes``) replace those keys' choices where given."""
    from ray import tune

    spec = dict(spec)
    for key, values in (("model.pool_size", pool_sizes), ("train.global_batch_size", batch_sizes)):
        if values:
            spec[key] = {"choice": list(values)}
    names = spec.get("model.name")
    if isinstance(names, dict) and base_model not in ("zoome", "zoome_no_meta"):
        raise ValueError(f"the search toggles metadata on the zoome family; model.name {base_model!r} "
                         "is not zoome or zoome_no_meta")
    def sampler(v: dict):
        (kind, args), = v.items()
        return tune.choice(list(args)) if kind == "choice" else getattr(tune, kind)(*args)

    return {k: sampler(v) if isinstance(v, dict) else v for k, v in spec.items()}


def trial_config(base: dict, overrides: dict[str, Any]) -> Config:
    """Base config (nested dict) + a trial's flat overrides, type-checked."""
    return apply_overrides(Config.from_tree(base), overrides)


def train_fold(cfg_path: Path, shards: str, fold: int, fold_dir: Path, workers: int, gpus: int,
               threads: int) -> Iterator[dict]:
    """Run one fold as ``workers`` ranks; yield each new epoch's metrics record as it appears."""
    run = RunDir(fold_dir)
    fold_dir.mkdir(parents=True, exist_ok=True)
    args = ["--config", str(cfg_path), "--shards", shards, "--fold", str(fold), "--out", str(fold_dir),
            "--no-progress", *run.resume_args()]
    env = {**os.environ, **job_env(gpus > 0, threads)}
    procs = []
    for rank, (cmd, rank_env) in enumerate(local_rank_commands(args, workers, run.rendezvous, env)):
        log = open(run.rank_log(rank), "a")
        procs.append(subprocess.Popen(cmd, env=rank_env, stdout=log, stderr=subprocess.STDOUT,
                                      preexec_fn=die_with_parent))
        log.close()
    seen = 0
    try:
        while True:
            # an epoch is reported once its checkpoint is written (the metrics line comes first): a Tune
            # checkpoint taken at the report then holds it, and a restart resumes after that epoch
            records = [r for r in run.read_metrics() if _checkpointed(run, r["global_step"])]
            yield from records[seen:]
            seen = len(records)
            codes = [p.poll() for p in procs]
            if any(c not in (None, 0) for c in codes):
                bad = next(i for i, c in enumerate(codes) if c not in (None, 0))
                raise RuntimeError(f"fold {fold}: rank {bad} {exit_description(codes[bad])}; the end of "
                                   f"{run.rank_log(bad)}:\n{log_tail(run.rank_log(bad))}")
            if all(c == 0 for c in codes):
                yield from run.read_metrics()[seen:]
                return
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _checkpointed(run: RunDir, global_step: int) -> bool:
    """The run's newest committed checkpoint is at or past optimizer step ``global_step``."""
    from zoome_dist.train.checkpoints import step_tag  # imports DeepSpeed: only where ranks run

    tag = run.committed_tag()
    return tag is not None and tag >= step_tag(global_step)


def _newer_here(local: Path, stored: Path) -> bool:
    """This node's copy of a trial (restarted where it ran) holds a committed checkpoint newer than the
    stored one in some fold, and none older: keep it."""
    folds = sorted(p.name for p in stored.glob("fold-*"))
    pairs = [(RunDir(local / f).committed_tag() or "", RunDir(stored / f).committed_tag() or "") for f in folds]
    return bool(pairs) and all(mine >= theirs for mine, theirs in pairs) and any(mine > theirs for mine, theirs in pairs)


def trainable(config: dict, *, base: dict, shards: str, folds: list[int], run_root: str, workers: int,
              gpus: int, threads: int, carry_runs: bool = False) -> None:
    """The Tune function: every fold with one configuration, a report (and checkpoint) per epoch. With
    ``carry_runs`` (``zoome tune --storage``) ``run_root`` is this node's scratch and every checkpoint
    carries the trial's run folders, so a trial restarted on another node resumes from storage."""
    import ray
    from ray import tune

    state = {"done": {}, "reported": {}}
    trial_id = tune.get_context().get_trial_id()
    root = os.path.expanduser(run_root) if run_root else os.path.join(tempfile.gettempdir(), "zoome-trials")
    trial_dir = Path(root) / trial_id  # run_root "": this node's temp folder
    ckpt, carried = tune.get_checkpoint(), False
    if ckpt:
        with ckpt.as_directory() as d:
            state = json.loads((Path(d) / "state.json").read_text())
            if carry_runs and (Path(d) / "runs").is_dir() and not _newer_here(trial_dir, Path(d) / "runs"):
                shutil.rmtree(trial_dir, ignore_errors=True)
                shutil.copytree(Path(d) / "runs", trial_dir)
                carried = True
    trial_dir.mkdir(parents=True, exist_ok=True)
    for stale in Path(root).glob(f".report-{trial_id}-*"):  # a report folder of an attempt killed on this node
        shutil.rmtree(stale, ignore_errors=True)
    node, node_ip = ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    with open(trial_dir / "trial.log", "a") as f:  # where each attempt ran, and what it started from
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} attempt on {node_ip}: "
                + (f"from checkpoint {ckpt.path} (folds done {sorted(state['done'])}"
                   + (", run folders restored from it)" if carried else ")") if ckpt else "from the start") + "\n")
    cfg = trial_config(base, config)
    cfg_path = trial_dir / "trial_config.yaml"
    cfg.dump(cfg_path)
    for fold in folds:
        if str(fold) in state["done"]:
            continue
        for rec in train_fold(cfg_path, shards, fold, trial_dir / f"fold-{fold:02d}", workers, gpus, threads):
            if rec["epoch"] <= state["reported"].get(str(fold), -1):
                continue  # reported before a restart
            state["reported"][str(fold)] = rec["epoch"]
            if rec["epoch"] == cfg.train.epochs - 1:
                state["done"][str(fold)] = rec["val_auc"]
            aucs = {**{k: v for k, v in state["done"].items()}, str(fold): rec["val_auc"]}
            metrics = {"mean_auc": sum(aucs.values()) / len(aucs), "fold": fold, "epoch": rec["epoch"],
                       "val_auc": rec["val_auc"], "folds_done": len(state["done"]), "node_id": node,
                       "node_ip": node_ip,
                       "run_dir": str(trial_dir), **{f"auc_fold_{k}": v for k, v in aucs.items()}}
            with tempfile.TemporaryDirectory(dir=root, prefix=f".report-{trial_id}-") as d:
                (Path(d) / "state.json").write_text(json.dumps(state))
                if carry_runs:
                    snapshot_runs(trial_dir, Path(d) / "runs")
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def error_line(error: BaseException | None, last: bool = False) -> str:
    """A failed trial's own message (not Ray's task header): its first line, for trials.csv; with ``last``
    also its last line (where a rank's log tail ends with the rank's own error)."""
    if error is None:
        return ""
    lines = [ln.strip() for ln in str(getattr(error, "cause", None) or error).strip().splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    return lines[0][:300] + (f" ... {lines[-1][:300]}" if last and len(lines) > 1 else "")


def trial_id(result) -> str:
    """The trial id of a Tune result (``60874_00000``), also for a trial that never reported."""
    m = re.search(r"_([0-9a-f]+_\d{5})(?:_|$)", Path(result.path or "").name)
    return (result.metrics or {}).get("trial_id") or (m.group(1) if m else Path(result.path or "").name)


def write_results(results, out: Path, base: dict, folds: list[int]) -> dict:
    """``trials.csv``, ``trials.md``, ``best.yaml`` (a full train.py config) and ``auc_vs_pool_size.png``."""
    import pandas as pd

    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": trial_id(r),
               **{k: v for k, v in (r.config or {}).items()},
               **{f"auc_fold_{k}": m.get(f"auc_fold_{k}") for k in folds},
               "folds_done": m.get("folds_done", 0), "mean_auc": m.get("mean_auc"),
               "complete": m.get("folds_done", 0) == len(folds), "node_id": m.get("node_id"),
               "node_ip": m.get("node_ip"), "run_dir": m.get("run_dir"),
               "error": error_line(r.error)}
        rows.append(row)
    df = pd.DataFrame(rows).sort_values("mean_auc", ascending=False, na_position="last")
    df.to_csv(out / "trials.csv", index=False)
    shown = df.drop(columns=["node_id"]).copy()
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    for _, r in shown.iterrows():
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    complete = df[df["complete"]]
    if complete.empty:
        raise RuntimeError(f"no trial finished all folds {folds}; see {out / 'trials.csv'}")
    best = complete.iloc[0]
    overrides = {k: (v.item() if hasattr(v, "item") else v) for k, v in best.items() if k in search_keys(df)}
    cfg = trial_config(base, overrides)
    cfg.dump(out / "best.yaml")

    with figure(out / "auc_vs_pool_size.png", figsize=(5, 3.5), dpi=120) as (fig, ax):
        done = complete.dropna(subset=["mean_auc"])
        ax.scatter(done["model.pool_size"], done["mean_auc"], alpha=0.7, label="trial (all folds)")
        means = done.groupby("model.pool_size")["mean_auc"].mean()
        ax.plot(means.index, means.values, "k-o", label="mean per pool size")
        ax.set(xscale="log", xticks=sorted(done["model.pool_size"].unique()), xlabel="Zoom-SE pool size P",
               ylabel=f"mean val AUC ({len(folds)} folds)", title="AUC vs Zoom-SE pool size")
        ax.set_xticklabels([str(int(p)) for p in sorted(done["model.pool_size"].unique())])
        ax.legend(fontsize=7)
    return {"best": overrides, "best_mean_auc": float(best["mean_auc"]), "trials": len(df),
            "complete": int(len(complete)), "best_run_dir": best.get("run_dir")}


def check_pickles_are_ours(experiment: Path) -> None:
    """Refuse to resume a Tune experiment whose state someone else could have written.

    Ray restores an experiment by unpickling its state (``tuner.pkl``, ``*.pkl``, and cloudpickled
    fields inside ``experiment_state-*.json``), and unpickling runs code: unlike our checkpoints this
    cannot be made data-only. So every file and folder of the experiment must belong to the current
    user and be writable by nobody else, and none may be a symbolic link (shared storage with
    group-writable folders is how a planted file would arrive)."""
    me = os.getuid()
    root = Path(experiment)
    for parent in root.absolute().parents:  # a folder above that others can write: they could swap the experiment
        st = parent.lstat()
        sticky = st.st_mode & 0o1000  # like /tmp: others may add entries but not rename or remove ours
        if parent.is_symlink() or st.st_uid not in (me, 0) or (st.st_mode & 0o022 and not sticky):
            why = ("a symbolic link" if parent.is_symlink() else f"owned by uid {st.st_uid}" if st.st_uid not in (me, 0)
                   else f"writable by others (mode {st.st_mode & 0o777:o})")
            raise ValueError(f"{parent} (above {root}): refusing to resume the experiment: that folder is {why}, so "
                             "another user could replace the experiment's files between this check and Ray's load "
                             "(which runs what they hold). Keep experiments under folders only you can write")
    for f in [root, *sorted(root.rglob("*"))]:
        st = f.lstat()
        if f.is_symlink() or st.st_uid != me or st.st_mode & 0o022:
            who = "a symbolic link" if f.is_symlink() else (
                f"owned by uid {st.st_uid}" if st.st_uid != me else f"writable by others (mode {st.st_mode & 0o777:o})")
            raise ValueError(f"{f}: refusing to resume the experiment: it is {who}, and Ray would unpickle "
                             "(run) what its state holds. Fix its owner/mode if it is yours, or start a new --name")


def search_keys(df) -> list[str]:
    return [c for c in df.columns if "." in c]


def base_tree(cfg: Config) -> dict:
    return yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
