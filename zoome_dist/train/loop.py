"""``train_one_epoch`` and ``evaluate`` over a DeepSpeed engine, as plain functions."""
from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


def gather(*arrays: np.ndarray) -> list[np.ndarray]:
    """Concatenate each array over all ranks (rank order); every rank gets the result."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [np.asarray(a) for a in arrays])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(arrays))]


def _to_device(batch: tuple[torch.Tensor, ...], device: torch.device, channels_last: bool):
    image, meta, label, sid = (t.to(device, non_blocking=True) for t in batch)
    # either way, whatever the loader gave (the nvJPEG path gives channels_last, DALI and the workers NCHW)
    image = image.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return image, meta, label, sid


def _monitor_step(engine, loss: torch.Tensor, micro: int, every: int) -> None:
    """Every ``every`` optimizer steps, the step's training loss (its last micro-batch's) to DeepSpeed's
    monitors (TensorBoard, W&B, CSV: ``Train/Samples/train_loss``), beside the lr DeepSpeed writes itself.
    Only then is the loss copied to the host."""
    if not engine.monitor.enabled or dist.get_rank() != 0 or micro % engine.gradient_accumulation_steps():
        return
    if engine.global_steps % every == 0:
        engine.monitor.write_events([("Train/Samples/train_loss", float(loss.detach()), engine.global_samples)])


def _show_speed(bar: tqdm, engine, mean_loss: float, n_images: int, wait: float, elapsed: float) -> None:
    """The progress bar's loss, img/s over every rank, data-wait share and lr."""
    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{n_images * dist.get_world_size() / elapsed:.1f}",
                    wait=f"{100 * wait / elapsed:.1f}%", lr=f"{engine.get_lr()[0]:.2e}")


def check_finite(loss_sum: float, probs: np.ndarray, epoch: int, device) -> None:
    """A diverged epoch (a non-finite loss or prediction on any rank) raises on every rank together, so that
    none waits in a collective for a rank that already failed."""
    bad = torch.tensor([float(not (np.isfinite(loss_sum) and np.isfinite(probs).all()))], device=device)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    if bad.item():
        raise FloatingPointError(f"training diverged in epoch {epoch}: the loss or the predictions are not finite on at "
                                 f"least one rank (this rank's loss sum: {loss_sum}); lower optim.lr, raise "
                                 "optim.warmup_epochs or use train.precision fp32")


def train_one_epoch(engine, loader: Iterable, loss_fn: Callable, *, epoch: int, steps: int, skip: int = 0,
                    channels_last: bool = True, on_step: Callable[[int], None] | None = None,
                    progress: bool = True, log_every: int = 10,
                    before_step: Callable[[], None] | None = None) -> dict:
    """Run micro-steps ``skip..steps`` of one epoch; returns loss, speed, data wait and the
    training predictions of every rank (for the Youden threshold). A run resumed mid-epoch passes
    the micro-step it resumes at as ``skip`` and a loader set to start there (``set_epoch(epoch, skip)``).
    ``train_ids`` are the sample ids trained on (every rank's), for the leakage check.

    Nothing is copied to the host per step: the loss sum, predictions and labels stay on the
    device and are copied once at the end (and the loss at each progress update), so the host
    can queue work ahead of a GPU. ``data_wait`` is the host time spent waiting for batches.
    """
    if skip and getattr(loader, "start", None) != skip:  # it would serve batches 0.. for micro-steps skip..
        raise ValueError(f"skip={skip}: the loader must be set to start at that batch (set_epoch(epoch, {skip}))")
    engine.train()
    it = iter(loader)
    bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch}", unit="step", disable=not progress,
               dynamic_ncols=True)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    n_images, wait = 0, 0.0
    probs, labels, ids = [], [], []
    start = time.perf_counter()
    for i in range(skip, steps):
        t = time.perf_counter()
        image, meta, label, sid = _to_device(next(it), engine.device, channels_last)
        wait += time.perf_counter() - t
        logits = engine(image, meta)
        loss = loss_fn(logits, label)
        engine.backward(loss)
        if before_step is not None:
            before_step()
        engine.step()
        _monitor_step(engine, loss, i + 1, log_every)
        loss_sum += loss.detach() * len(label)
        n_images += len(label)
        probs.append(logits.detach().float().clone())  # a CUDA-graph output is overwritten by the next replay
        labels.append(label)
        ids.append(sid)
        if on_step is not None:
            on_step(i + 1)
        bar.update()
        if progress and ((i + 1) % log_every == 0 or i + 1 == steps):
            _show_speed(bar, engine, float(loss_sum) / n_images, n_images, wait, time.perf_counter() - start)
    bar.close()
    if hasattr(it, "close"):  # leftover batches (steps was cut to whole optimizer steps): closed, not drained (those
        it.close()            # already sent to workers are still decoded there); the next pass starts afresh either way
    p = torch.sigmoid(torch.cat(probs)).cpu().numpy() if probs else np.zeros(0, np.float32)
    y = torch.cat(labels).cpu().numpy() if labels else np.zeros(0, int)
    s = torch.cat(ids).cpu().numpy() if ids else np.zeros(0, np.int64)
    total_loss = float(loss_sum)  # the one device→host copy of the epoch (waits for the GPU)
    elapsed = time.perf_counter() - start
    check_finite(total_loss, p, epoch, loss_sum.device)
    p, y, s, losses, counts = gather(p, y, s, np.array([total_loss]), np.array([n_images]))
    images = int(counts.sum())
    return {"train_loss": float(losses.sum() / max(1, images)), "train_images": images,
            "train_seconds": elapsed, "train_img_s_per_rank": n_images / elapsed if elapsed else 0.0,
            "data_wait": wait / elapsed if elapsed else 0.0, "train_probs": p, "train_labels": y, "train_ids": s}


def average_over_ranks(tensors: Iterable[torch.Tensor]) -> None:
    """Floating-point tensors averaged over the ranks, in place; the others (integer counters, equal on every
    rank) from rank 0."""
    world = dist.get_world_size()
    for t in tensors:
        if t.is_floating_point():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world)
        else:
            dist.broadcast(t, src=0)


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running mean/var) over the ranks, in place; integer
    buffers (``num_batches_tracked``) come from rank 0. As timm's ``distribute_bn(reduce=True)``: every
    rank then evaluates and saves the same model."""
    average_over_ranks(buf.data for buf in module.buffers())


@torch.no_grad()
def evaluate(engine, loader: Iterable, *, expected: np.ndarray, channels_last: bool = True,
             progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sample_id, prob, label)`` of every validation sample, exactly once, on every rank, sorted by
    sample id; ``expected`` holds the fold's sample ids (a loader that repeats, drops or adds one is
    an error, never a metric).

    BatchNorm running statistics are per rank (no SyncBN); they are averaged over the ranks first
    (``average_buffers``), so every rank evaluates (and later saves) the same model.
    """
    average_buffers(engine.module)
    engine.eval()
    sids, probs, labels = [], [], []
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        image, meta, label, sid = _to_device(batch, engine.device, channels_last)
        probs.append(torch.sigmoid(engine(image, meta).float()))
        labels.append(label)
        sids.append(sid)
    s, p, y = gather(*(torch.cat(t).cpu().numpy() for t in (sids, probs, labels)))
    check_partition(s, np.asarray(expected))
    order = np.argsort(s, kind="stable")
    return s[order], p[order], y[order]


def check_partition(seen: np.ndarray, expected: np.ndarray) -> None:
    """Raise unless ``seen`` holds every id of ``expected`` exactly once and nothing else."""
    ids, counts = np.unique(seen, return_counts=True)
    want = np.unique(expected)
    if len(seen) == len(want) and np.array_equal(ids, want):
        return
    problems = [f"{name} {list(v[:5])}{' …' if len(v) > 5 else ''}" for name, v in (
        ("repeated", ids[counts > 1]), ("missing", np.setdiff1d(want, ids)), ("not in the fold", np.setdiff1d(ids, want)))
        if len(v)]
    raise RuntimeError(f"evaluation saw {len(seen)} predictions for {len(ids)} distinct samples; the fold has "
                       f"{len(want)} ({'; '.join(problems)}): the loader is not an exact partition")
