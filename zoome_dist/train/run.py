"""``run(cfg, shards, fold, out)``: train on every fold but ``fold``, evaluate on ``fold`` each epoch.

Writes the run folder ``out`` (``zoome_dist.core.rundir.RunDir`` names its files): the resolved config and
DeepSpeed config, one metrics line per epoch, TensorBoard events, DeepSpeed checkpoints (every epoch and
every ``train.checkpoint_every_steps`` optimizer steps), the best epoch's (by AUC) out-of-fold
predictions and weights, the last epoch's predictions, and the summary at the end.

Phases: ``_setup`` (loaders, model, engine, resume) → ``_epoch`` per epoch (train, evaluate, record,
checkpoint) → ``_finish`` (ranks agree, summary).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from zoome_dist.config import Config, validate
from zoome_dist.core.files import atomic_path, write_csv_atomic, write_text_atomic
from zoome_dist.core.folder_lock import FolderLock
from zoome_dist.core.logs import get_logger
from zoome_dist.core.rundir import RunDir
from zoome_dist.core.storage import check_ranks, manifest_digest
from zoome_dist.data.manifest import load_manifest
from zoome_dist.eval.calibration import plot_reliability
from zoome_dist.eval.metrics import binary_metrics, youden_threshold
from zoome_dist.eval.report import plot_curves
from zoome_dist.eval.subgroups import SUBGROUP_COLUMNS, auc_by_source, subgroup_metrics
from zoome_dist.pipeline import Augment, make_loader, resolve_loader
from zoome_dist.train.amp import OverflowFlag, grad_scaler, restore_scaler, scaler_state
from zoome_dist.train.checkpoints import (TAG, UnsafeCheckpointError, checksum_damage, install, latest_tag, step_tag,
                                          write_checksums)
from zoome_dist.train.ema import WeightEMA
from zoome_dist.train.engine import (BatchPlan, DistInfo, accelerator, batch_plan, build_model, build_optimizer,
                                     build_scheduler, deepspeed_config, setup_distributed)
from zoome_dist.train.loop import average_buffers, evaluate, train_one_epoch
from zoome_dist.train.losses import make_loss

log = get_logger(__name__)  # INFO on rank 0 only (zoome_dist.core.logs)


def warn0(msg: str) -> None:
    """A warning every rank would give alike: logged once, by rank 0."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.warning(msg)


def _params_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.state_dict().values():
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


KEEP = ("all", "models")  # what a finished run keeps: everything, or the model files, predictions and logs

# Keys a resumed run may change with ``allow_changes`` (they do not alter what the run computes).
RESUMABLE_KEYS = ("train.epochs", "train.patience", "train.log_every", "train.keep_checkpoints",
                  "train.checkpoint_every_steps", "train.eval_batch_size", "data.num_threads", "monitor.csv",
                  "monitor.wandb_project", "monitor.comet_project", "monitor.flops_profile_step",
                  "model.zoom_se_impl", "train.cuda_graphs")


def _check_run_folder(run: RunDir, resume: bool) -> bool:
    """True when there is a checkpoint to resume from: an unfinished run is resumed without asking (its config
    is checked), a finished one only with ``resume``."""
    if run.path.exists() and not run.path.is_dir():
        raise FileExistsError(f"--out {run.path} is a file, not a run folder")
    if run.summary.is_file() and not resume:
        raise FileExistsError(f"{run.path} already holds a finished training run; pass --resume (with "
                              "--allow-config-change and a higher train.epochs) to train it longer, or choose another --out")
    return run.resumable


def _folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20 if path.is_dir() else 0.0


def prune_checkpoints(run: RunDir) -> float:
    """``--keep models``: a finished run keeps its model files, predictions and logs, and drops its DeepSpeed
    checkpoints (what resuming needs, most of the folder); returns the MB freed."""
    freed = _folder_mb(run.checkpoints)
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    return freed


def check_resume_config(out: Path, cfg: Config, world_size: int, allow_changes: bool,
                        job: dict[str, Any] | None = None) -> list[str]:
    """Refuse a resume whose config, world size or job (``fold``, ``shards``, ``loader``) differs from
    the run's, naming the keys; with ``allow_changes`` the keys of ``RESUMABLE_KEYS`` may differ.
    Returns the changed keys."""
    from zoome_dist.config import changes

    run = RunDir(out)
    diff = changes(run.config, cfg)
    changed = list(diff)
    run_json = json.loads(run.run_info.read_text()) if run.run_info.is_file() else {}
    if run_json.get("world_size", world_size) != world_size:
        raise ValueError(f"{out} was trained with {run_json['world_size']} rank(s); resuming with {world_size} "
                         "would change every batch. Resume with the same number of ranks")
    for key, value in (job or {}).items():  # never changeable: another fold, dataset or batch order
        if key == "manifest_sha256" and key in run_json and run_json[key] != value:
            raise ValueError(f"{out} was trained on other shards than those now at {run_json.get('shards')} (their "
                             "manifest.json changed: rebuilt or replaced since); continuing it would mix two datasets. "
                             "Train into a new --out")
        if key in run_json and run_json[key] != value:
            raise ValueError(f"{out} is a run of {key} {run_json[key]!r}; resuming it with {key} {value!r} would "
                             "train something else. Use the same --fold/--shards/data.loader, or a new --out")
    refused = [k for k in changed if not (allow_changes and k in RESUMABLE_KEYS)]
    if refused:
        detail = ", ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in refused)
        hint = (f"; --allow-config-change accepts changes of {list(RESUMABLE_KEYS)} only" if allow_changes else
                f"; pass --allow-config-change to change any of {list(RESUMABLE_KEYS)}")
        raise ValueError(f"{out} holds a run of a different config ({detail}): to continue it, use its own config "
                         f"({run.config}); to start afresh, a new --out{hint}")
    return changed


def _prune(ckpt_dir: Path, keep: int, protect: set[str]) -> None:
    """Delete all but the newest ``keep`` (≥ 1) checkpoints; never those in ``protect``."""
    tags = sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and TAG.fullmatch(p.name)), key=lambda p: p.name)
    for p in tags[:-max(1, keep)]:
        if p.name not in protect:
            shutil.rmtree(p, ignore_errors=True)


def save(engine, run: RunDir, state: dict, keep: int, ema: WeightEMA | None = None) -> str:
    """DeepSpeed checkpoint ``step{N}`` with our state (and the fp16 GradScaler's) as client state.

    DeepSpeed saves rank 0's module, BatchNorm buffers included, and every rank resumes from it: the
    buffers are averaged over the ranks first, so an uninterrupted run and a resumed one hold the same
    buffers on every rank from here on (exact resume). The EMA of the weights (``train.ema_decay``) travels along."""
    average_buffers(engine.module)
    if ema is not None:
        ema.average_over_ranks()
    tag = step_tag(engine.global_steps)
    engine.save_checkpoint(str(run.checkpoints), tag=tag, client_state={"zoome": {
        **state, "grad_scaler": scaler_state(engine), "ema": ema.state_dict() if ema is not None else None}})
    dist.barrier()
    if dist.get_rank() == 0:  # every rank's files are written: mark the tag complete (DeepSpeed's `latest` comes earlier)
        write_checksums(run.checkpoints / tag)
        write_text_atomic(run.committed, tag)
        _prune(run.checkpoints, keep, {tag, (state.get("best") or {}).get("tag")})
    return tag


def restore(engine, run: RunDir) -> dict:
    """Load the newest intact checkpoint into ``engine`` (all ranks agree on which); returns our state.

    Loading is safe (``safe_checkpoint``): a file holding pickled code is refused on every rank. A
    newest checkpoint that cannot be read (truncated, missing files) is reported and the previous one
    is tried; with none left, the error names what failed."""
    ckpt_dir = run.checkpoints
    on_disk = sorted((p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG.fullmatch(p.name)), reverse=True)
    try:
        newest = latest_tag(run)
    except FileNotFoundError as e:  # `latest` empty or naming a folder that is gone (a crash while writing it)
        if not on_disk:
            raise
        newest = on_disk[0]
        warn0(f"{e}; starting from the newest checkpoint folder, {newest}")
    tags = [newest] + [t for t in on_disk if t < newest]
    failures = []
    for tag in tags:
        status, why, client = 0, "", None
        try:
            damage = checksum_damage(ckpt_dir / tag)
            if damage:
                status, why = 1, damage
            else:
                _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
            if client is None and not status:
                status, why = 1, "files missing"
        except UnsafeCheckpointError as e:
            status, why = 2, str(e)
        except Exception as e:  # noqa: BLE001 - any read failure: try the previous checkpoint
            status, why = 1, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        worst = torch.tensor([status], device=engine.device)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if worst.item() == 0:
            if failures:
                warn0(f"resumed from the older checkpoint {tag}: newer ones could not be read ({'; '.join(failures)})")
            state = dict(client["zoome"])
            restore_scaler(engine, state.pop("grad_scaler", None))
            return state
        if worst.item() == 2:
            raise UnsafeCheckpointError(why or f"checkpoint {ckpt_dir / tag} was refused on another rank "
                                        "(it holds more than tensors and plain data)")
        failures.append(f"{tag}: {why or 'unreadable on another rank'}")
        warn0(f"checkpoint {ckpt_dir / tag} cannot be loaded ({failures[-1]}); trying the previous one")
    raise ValueError(f"no intact checkpoint in {ckpt_dir}: {'; '.join(failures)}. Delete {run.path} or train into "
                     "a new --out to start afresh")


def fold_sample_ids(shards: Path, manifest: dict, fold: int) -> np.ndarray:
    """The sample ids of ``fold`` (``folds.csv``); every fold must hold as many as the manifest counts."""
    table = pd.read_csv(shards / "folds.csv", usecols=["sample_id", "fold"])
    listed = table["fold"].value_counts()
    for f in manifest["folds"]:
        if int(listed.get(f["fold"], 0)) != f["samples"]:
            raise ValueError(f"{shards}: the manifest counts {f['samples']} samples in fold {f['fold']} but folds.csv "
                             f"lists {int(listed.get(f['fold'], 0))}; the build is damaged: check it with "
                             f"`zoome-shards verify {shards}` and rebuild")
    return table.loc[table["fold"] == fold, "sample_id"].to_numpy()


def _predictions(folds: pd.DataFrame, sids: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """``image_name, patient_id, target, prob`` and the subgroup columns the build recorded
    (``subgroups.SUBGROUP_COLUMNS``): one row per validation image."""
    rows = folds.set_index("sample_id").loc[sids]
    df = pd.DataFrame({"image_name": rows["image_name"].to_numpy(), "patient_id": rows["patient_id"].to_numpy(),
                       "target": rows["target"].to_numpy(), "prob": probs})
    for col in SUBGROUP_COLUMNS:
        if col in rows.columns:
            df[col] = rows[col].to_numpy()
    return df


def save_model(path: Path, cfg: Config, model: torch.nn.Module, metadata_encoding: dict, epoch: int,
               metrics: dict) -> None:
    """``model_best.pt`` / ``model_last.pt``: weights, the config that builds them and the metadata
    encoding (what ``zoome predict`` needs); plain tensors and dicts, loadable with ``weights_only=True``."""
    with atomic_path(path) as tmp:
        torch.save({"config": cfg.to_dict(), "metadata_encoding": metadata_encoding,
                    "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "epoch": epoch, "metrics": metrics}, tmp)


def _write_best(run: RunDir, cfg: Config, engine, manifest: dict, folds: pd.DataFrame, best: dict,
                sids: np.ndarray, probs: np.ndarray) -> None:
    write_csv_atomic(_predictions(folds, sids, probs), run.predictions("best"))
    save_model(run.model_best, cfg, engine.module, manifest["metadata_encoding"], best["epoch"], best["metrics"])
    run.best.write_text(json.dumps(best, indent=1))


def to_channels_last(engine, cfg: Config) -> None:
    """The model's weights in channels_last (NHWC), as its inputs: without it cuDNN re-lays out every
    conv weight every step. Done after ``deepspeed.initialize``, whose parameter broadcast needs
    default-contiguous tensors; at ZeRO ≥ 1 the parameters are views into DeepSpeed's flat buffers
    and stay as they are (the inputs are still channels_last)."""
    if cfg.model.channels_last and cfg.train.zero_stage == 0:
        engine.module.to(memory_format=torch.channels_last)


def run(cfg: Config, shards: str | Path, fold: int, out: str | Path, resume: bool = False,
        progress: bool = True, allow_changes: bool = False, keep: str = "all") -> dict[str, Any]:
    """Train one fold; returns the summary (best and last metrics, optimizer steps) on every rank. ``keep``:
    what a finished run keeps, ``all`` or ``models`` (no DeepSpeed checkpoints: it cannot be continued)."""
    if keep not in KEEP:
        raise ValueError(f"keep {keep!r}; valid: {list(KEEP)}")
    started = time.perf_counter()
    validate(cfg)
    shards, out = Path(shards), Path(out)
    manifest = load_manifest(shards)
    fold_ids = [f["fold"] for f in manifest["folds"]]
    if fold not in fold_ids:
        raise ValueError(f"fold {fold} does not exist in {shards}; valid folds: {fold_ids}")
    val_ids = fold_sample_ids(shards, manifest, fold)  # a damaged build fails here, before any work
    resuming = _check_run_folder(RunDir(out), resume)
    if resume and not resuming and RunDir(out).summary.is_file():  # finished, and kept its model files only
        log.info(f"{out} finished training and keeps only its model files (its checkpoints were removed, --keep "
                 "models): nothing to resume; train into a new --out to train longer")
        return json.loads(RunDir(out).summary.read_text())
    out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails here, before any work
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: not writable")
    info = setup_distributed(cfg.dist)
    ok = False
    try:
        check_ranks(out, shards)  # every rank sees rank 0's --out and the same shards, or all stop now
    except BaseException:
        dist.destroy_process_group()
        raise
    lock = FolderLock(RunDir(out).lock, f"{out} is being trained",
                      "wait for that run to end, or train into another --out")
    try:
        _hold_on_rank0(lock)
        resuming = _check_run_folder(RunDir(out), resume)  # again: a run that held the folder may have ended
        if resuming:
            job = {"fold": fold, "shards": str(shards.resolve()), "loader": resolve_loader(cfg.data.loader),
                   "manifest_sha256": manifest_digest(shards)}
            changed = check_resume_config(out, cfg, info.world_size, allow_changes, job)
            if changed:
                log.info(f"resuming with changed {changed} (--allow-config-change)")
            if not resume:
                log.info(f"{out} holds an unfinished run of this config: resuming it (train into a new --out to "
                         "start afresh)")
        t = _setup(cfg, shards, fold, RunDir(out), manifest, [k for k in fold_ids if k != fold], info, resuming,
                   progress, val_ids)
        summary = _finish(t, _train_epochs(t))
        freed = prune_checkpoints(t.run) if keep == "models" and t.rank0 else 0.0
        log.info(summary_line(summary, RunDir(out), time.perf_counter() - started, freed))
        ok = True
        return summary
    finally:
        if dist.is_initialized():
            if ok:  # gloo can abort at exit without this (docs/stack.md); never wait for a failed peer
                dist.barrier()
            dist.destroy_process_group()
        lock.__exit__()


def _train_epochs(t: _Training) -> dict[str, Any]:
    """The epochs left (none for a run resumed after its last epoch's checkpoint), early stopping on the way;
    returns the last epoch's metrics record."""
    cfg = t.cfg
    done = t.run.read_metrics()
    last: dict[str, Any] = done[-1] if done else {}
    if t.state["epoch"] >= cfg.train.epochs:
        log.info(f"{t.run.path} already trained all {cfg.train.epochs} epochs: nothing to train (raise train.epochs "
                 "with --allow-config-change to continue it)")
    for epoch in range(t.state["epoch"], cfg.train.epochs):
        if stalled(t.state["best"], epoch, cfg.train.patience):
            log.info(f"early stop before epoch {epoch}: no better validation AUC for {cfg.train.patience} "
                     f"epoch(s) since epoch {t.state['best']['epoch']} (train.patience)")
            break
        last = _epoch(t, epoch)
    return last


def stalled(best: dict | None, epoch: int, patience: int) -> bool:
    """Early stopping: before ``epoch``, the last ``patience`` epochs brought no better validation AUC than
    the best epoch's (the state a checkpoint holds, so a resumed run decides alike)."""
    return bool(patience) and best is not None and epoch - 1 - best["epoch"] >= patience


def summary_line(summary: dict[str, Any], run: RunDir, seconds: float, freed_mb: float = 0.0) -> str:
    """The run's one closing line: best and last epoch with their AUC, the model files, the wall time, the
    size of the run folder (and what ``--keep models`` removed)."""
    best, last = summary.get("best") or {}, summary.get("last") or {}
    parts = [f"fold {summary['fold']} done in {seconds / 60:.1f} min"]
    if best:
        parts.append(f"best epoch {best['epoch']} (AUC {best['metrics']['auc']:.4f})")
    if last:
        parts.append(f"last epoch {last['epoch']} (AUC {last['val_auc']:.4f})")
    size = f"run folder {_folder_mb(run.path):.0f} MB" + (
        f" (DeepSpeed checkpoints removed, {freed_mb:.0f} MB: --keep models)" if freed_mb else
        f", of which checkpoints {_folder_mb(run.checkpoints):.0f} MB (--keep models drops them)")
    return "; ".join(parts) + f"; models: {run.model('last')} (and {run.model_best.name}); {size}"


def _hold_on_rank0(lock: FolderLock) -> None:
    """Rank 0 takes the run folder's lock for the whole run: a second training into the same --out (a
    relaunch, a retried job whose first attempt still runs) stops on every rank at once, before it
    writes anything. Any failure to take it is raised on every rank alike (none waits in a collective)."""
    error: list[Exception | None] = [None]
    if dist.get_rank() == 0:
        try:
            lock.__enter__()
        except Exception as e:  # noqa: BLE001 - busy, or the lock file cannot be made: every rank stops
            error = [e]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]


@dataclass
class _Training:
    """One fold's training between its phases."""

    cfg: Config
    info: DistInfo
    run: RunDir
    fold: int
    manifest: dict
    plan: BatchPlan
    engine: Any
    train_it: Any                  # one loader for every epoch (set_epoch)
    val_it: Any
    steps: int                     # micro-steps per epoch
    val_ids: np.ndarray            # the validation fold's sample ids (folds.csv)
    loss_fn: Callable
    overflow: OverflowFlag | None
    ema: WeightEMA | None          # train.ema_decay: validation and model files use the averaged weights
    state: dict[str, Any]          # epoch, micro_step, best: what a checkpoint carries
    folds_table: pd.DataFrame | None
    progress: bool

    @property
    def rank0(self) -> bool:
        return self.info.rank == 0


def _describe_run(run: RunDir, cfg: Config, ds_cfg: dict, info: dict, first_epoch: int) -> None:
    """Rank 0: the run's config, DeepSpeed config and run.json; metrics of epochs a resumed run redoes dropped
    (and a line cut by a crash)."""
    run.path.mkdir(parents=True, exist_ok=True)
    cfg.dump(run.config)
    run.deepspeed.write_text(json.dumps(ds_cfg, indent=1))
    run.run_info.write_text(json.dumps(info, indent=1))
    if run.metrics.exists():
        kept = [r for r in run.read_metrics() if r["epoch"] < first_epoch]
        run.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _setup(cfg: Config, shards: Path, fold: int, run: RunDir, manifest: dict, train_folds: list[int],
           info: DistInfo, resuming: bool, progress: bool, val_ids: np.ndarray) -> _Training:
    """Loaders, model, DeepSpeed engine, restored state, and the run's description files."""
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    plan = batch_plan(cfg, info.world_size)
    ds_cfg = deepspeed_config(cfg, info.world_size, run, plan)
    gas, micro = plan.accumulation, plan.micro
    loader = resolve_loader(cfg.data.loader)
    data_device = cfg.data.device if cfg.data.device != "auto" else ("gpu" if accelerator() == "cuda" else "cpu")
    common = dict(image_size=cfg.data.image_size, rank=info.rank, world_size=info.world_size,
                  local_rank=info.local_rank, device=data_device, loader=loader,
                  num_threads=cfg.data.num_threads)
    aug = Augment(tuple(cfg.data.zoom), cfg.data.rotate, cfg.data.flip)

    # an epoch's batches depend on (seed, epoch, rank) only; the torch loader's workers serve every epoch
    train_it, micro_steps = make_loader(shards, train_folds, train=True, batch_size=micro, seed=cfg.train.seed,
                                        aug=aug, **common)
    val_it, _ = make_loader(shards, [fold], train=False,
                            batch_size=cfg.train.eval_batch_size or cfg.train.micro_batch_size, **common)
    steps_per_epoch = micro_steps // gas
    if steps_per_epoch == 0:
        raise ValueError(f"training folds {train_folds} give {micro_steps} micro-batches per rank, fewer than "
                         f"one global batch ({gas} accumulation steps); lower train.global_batch_size")

    engine, overflow = _build_engine(cfg, info, plan, ds_cfg, steps_per_epoch)
    state: dict[str, Any] = {"epoch": 0, "micro_step": 0, "best": None}
    if resuming:
        state.update(restore(engine, run))
        log.info(f"resumed from {run.checkpoints} at epoch {state['epoch']}, micro-step {state['micro_step']} "
             f"(optimizer step {engine.global_steps})")
    folds_table = None
    if info.rank == 0:
        _describe_run(run, cfg, ds_cfg, {"shards": str(shards.resolve()), "manifest_sha256": manifest_digest(shards),
                                         "fold": fold, "train_folds": train_folds,
                                         "world_size": info.world_size, "loader": loader,
                                         "steps_per_epoch": steps_per_epoch, "global_batch": plan.global_batch,
                                         "lr": plan.lr}, state["epoch"])
        folds_table = pd.read_csv(shards / "folds.csv")
    ema = _make_ema(cfg, engine.module, state.pop("ema", None), run, resuming)
    log.info(f"fold {fold}: train folds {train_folds}, {info.world_size} rank(s), {steps_per_epoch} optimizer "
         f"steps/epoch (global batch {plan.global_batch} = {micro} × {gas} accumulation × {info.world_size}, "
         f"lr {plan.lr:.3g}), model {cfg.model.name}, {cfg.train.precision}, loader {loader}")
    return _Training(cfg, info, run, fold, manifest, plan, engine, train_it, val_it,
                     steps_per_epoch * gas, val_ids,
                     make_loss(cfg.loss.name, cfg.loss.alpha, cfg.loss.gamma), overflow, ema, state, folds_table,
                     progress)


def _make_ema(cfg: Config, model: torch.nn.Module, saved: dict | None, run: RunDir, resuming: bool) -> WeightEMA | None:
    """``train.ema_decay``'s EMA of the weights: the checkpoint's when resuming; else (or where a checkpoint holds
    none) started from the model's current weights."""
    if not cfg.train.ema_decay:
        return None
    ema = WeightEMA(model, cfg.train.ema_decay)
    if saved is not None:
        ema.load_state_dict(saved)
    elif resuming:
        warn0(f"the checkpoint in {run.checkpoints} holds no EMA of the weights: the EMA starts from the resumed "
              "weights")
    return ema


def _build_engine(cfg: Config, info: DistInfo, plan: BatchPlan, ds_cfg: dict, steps_per_epoch: int):
    """The model, optimizer and schedule in a DeepSpeed engine (safe checkpoint loads, channels_last); returns the
    engine and the fp16 overflow flag (or None)."""
    import deepspeed

    model = build_model(cfg)
    if cfg.model.sync_bn and info.world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model, plan.lr, fused=accelerator() == "cuda")
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_cfg)
    install(engine)  # checkpoints load with weights_only=True
    to_channels_last(engine, cfg)
    if engine.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed training shapes: pick the fastest kernels once
    overflow = OverflowFlag(optimizer) if grad_scaler(engine) is not None else None
    if cfg.train.cuda_graphs:  # inductor with CUDA graphs; the gradient all-reduce stays outside, in engine.step
        engine.compile(compile_kwargs={"mode": "reduce-overhead"})
    elif cfg.model.compile:
        engine.compile()
    return engine, overflow


def _epoch(t: _Training, epoch: int) -> dict[str, Any]:
    """Train one epoch (from a mid-epoch checkpoint's micro-step when resuming), evaluate, record,
    checkpoint; returns the epoch's metrics record."""
    cfg, engine, state = t.cfg, t.engine, t.state
    skip = state["micro_step"] if epoch == state["epoch"] else 0
    t.train_it.set_epoch(epoch, skip)  # resumed mid-epoch: the batches before the checkpoint are not served again
    every = cfg.train.checkpoint_every_steps

    def on_step(micro: int) -> None:
        if micro % t.plan.accumulation:
            return  # not an optimizer step
        if t.ema is not None:
            t.ema.update(engine.module)
        if every and micro < t.steps and engine.global_steps % every == 0:
            save(engine, t.run, {"epoch": epoch, "micro_step": micro, "best": state["best"]},
                 cfg.train.keep_checkpoints, t.ema)

    t0 = time.perf_counter()
    good = t.run.committed_tag() if skip == 0 else None  # the end of the last epoch: finite metrics
    try:
        tr = train_one_epoch(engine, t.train_it, t.loss_fn, epoch=epoch, steps=t.steps, skip=skip,
                             channels_last=cfg.model.channels_last, on_step=on_step,
                             progress=t.progress and t.rank0, log_every=cfg.train.log_every,
                             before_step=t.overflow.arm if t.overflow else None)
    except FloatingPointError as e:
        raise FloatingPointError(
            f"{e}; then --resume from {good}, the last checkpoint known good (the end of epoch {epoch - 1}): "
            f"first delete the newer folders in {t.run.checkpoints} (written during this epoch)" if good else
            f"{e}; then train again into a new --out (no checkpoint before this epoch is known good)") from None
    leaked = np.intersect1d(tr["train_ids"], t.val_ids)
    if len(leaked):
        raise RuntimeError(f"fold {t.fold}: epoch {epoch} trained on {len(leaked)} sample(s) of the validation fold "
                           f"(sample ids {list(leaked[:5])}): the training loader does not exclude fold {t.fold}")
    with t.ema.applied(engine.module) if t.ema is not None else nullcontext():  # the weights validated and saved
        record = _validate(t, epoch, tr, time.perf_counter() - t0)
    save(engine, t.run, dict(state), cfg.train.keep_checkpoints, t.ema)
    return record


def _validate(t: _Training, epoch: int, tr: dict, seconds: float) -> dict[str, Any]:
    """Evaluate the fold, update the best epoch, and (rank 0) write the epoch's files; returns its record."""
    cfg, engine, state = t.cfg, t.engine, t.state
    sids, probs, labels = evaluate(engine, t.val_it, expected=t.val_ids,
                                   channels_last=cfg.model.channels_last, progress=t.progress and t.rank0)
    threshold = youden_threshold(tr["train_labels"], tr["train_probs"]) if len(tr["train_labels"]) else 0.5
    val = binary_metrics(labels, probs, threshold)
    record = {"epoch": epoch, "global_step": engine.global_steps, "lr": engine.get_lr()[0],
              **{k: v for k, v in tr.items() if k not in ("train_probs", "train_labels", "train_ids")},
              "epoch_seconds": seconds,
              **{f"val_{k}": v for k, v in val.items()}}
    is_best = state["best"] is None or val["auc"] > state["best"]["metrics"]["auc"]
    if is_best:
        state["best"] = {"epoch": epoch, "tag": step_tag(engine.global_steps), "metrics": val}
    state.update(epoch=epoch + 1, micro_step=0)
    if t.rank0:  # the epoch's files first, then the checkpoint that marks the epoch done
        _write_epoch(t, epoch, record, tr, val, (sids, probs), is_best)
        log.info(f"epoch {epoch}: loss {tr['train_loss']:.4f} | val AUC{' (EMA)' if t.ema else ''} {val['auc']:.4f} "
                 f"acc/sens/spec@0.5 {val['acc']:.3f}/{val['sens']:.3f}/{val['spec']:.3f} "
                 f"@t={threshold:.3f} {val['acc_t']:.3f}/{val['sens_t']:.3f}/{val['spec_t']:.3f} | "
                 f"{tr['train_img_s_per_rank']:.1f} img/s/rank, data wait {100 * tr['data_wait']:.1f}%"
                 + (" *best*" if is_best else ""))
    return record


def _write_epoch(t: _Training, epoch: int, record: dict, tr: dict, val: dict, val_preds: tuple,
                 is_best: bool) -> None:
    """Rank 0's files of a finished epoch: metrics line, curves, monitors, predictions, subgroups,
    calibration plot, model_last.pt (and the best epoch's files)."""
    engine, (sids, probs) = t.engine, val_preds
    preds = _predictions(t.folds_table, sids, probs)
    if by_source := auc_by_source(preds):
        record["val_auc_by_source"] = by_source
    with open(t.run.metrics, "a") as f:
        f.write(json.dumps(record) + "\n")
    plot_curves({f"fold {t.fold}": t.run.read_metrics()}, t.run.curves, "Training curves of this fold")
    if engine.monitor.enabled:
        engine.monitor.write_events([(f"Val/{k}", float(v), engine.global_samples)
                                     for k, v in val.items() if isinstance(v, float)])
    write_csv_atomic(preds, t.run.predictions("last"))
    write_csv_atomic(_predictions(t.folds_table, tr["train_ids"], tr["train_probs"]), t.run.train_predictions)
    write_csv_atomic(subgroup_metrics(preds), t.run.subgroups)
    plot_reliability({f"fold {t.fold}, epoch {epoch}": preds}, t.run.calibration_plot, scope="this fold")
    save_model(t.run.model("last"), t.cfg, engine.module, t.manifest["metadata_encoding"], epoch, val)
    if is_best:
        _write_best(t.run, t.cfg, engine, t.manifest, t.folds_table, t.state["best"], sids, probs)


def _finish(t: _Training, last: dict[str, Any]) -> dict[str, Any]:
    """Check that every rank ends with the same parameters; write the summary (the run's last file)."""
    gathered: list = [None] * t.info.world_size
    dist.all_gather_object(gathered, (_params_digest(t.engine.module), socket.gethostname()))
    digests = [d for d, _ in gathered]
    summary = {"fold": t.fold, "epochs": t.cfg.train.epochs, "global_steps": int(t.engine.global_steps),
               "world_size": t.info.world_size, "hosts": [h for _, h in gathered], "best": t.state["best"],
               "last": last, "ranks_identical": len(set(digests)) == 1,
               "stopped_early": bool(last) and last.get("epoch", -1) < t.cfg.train.epochs - 1,  # train.patience
               "skipped_steps": int(t.engine.skipped_steps)}  # fp16 steps skipped on inf/NaN gradients
    if t.rank0:
        t.run.summary.write_text(json.dumps(summary, indent=1))
    if not summary["ranks_identical"]:
        raise RuntimeError(f"parameters differ between ranks after training: {digests}")
    return summary
