"""Input pipeline throughput: DALI-CPU (full training graph) vs the torch fallback vs decode-only.

Same shards, same batch size and the same number of CPU threads/workers for every contender;
repeated alternately, best epoch kept. With a GPU, DALI ``mixed`` (decode + augment on the GPU) too.
And what an epoch's start costs (time to its first batch): a training loader built per epoch against
one torch loader whose workers serve every epoch (``set_epoch``, what training does). And what a
mid-epoch resume costs: a fresh loader's time to the first batch after the checkpoint, started there
(``set_epoch(epoch, start)``) or reading and dropping the batches before it.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from benchmarks.shards import reused_dataset
from zoome_dist.data.manifest import load_manifest
from zoome_dist.data.writer import BuildOptions, build
from zoome_dist.pipeline import make_loader, resolve_device
from zoome_dist.pipeline.dali import DaliLoader
from zoome_dist.pipeline.selection import select_folds


@pipeline_def
def _decode_only(tars, indexes, device):
    jpegs = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg"], name="Reader",
                                  missing_component_behavior="error")
    return fn.decoders.image(jpegs, device="mixed" if device == "gpu" else "cpu", output_type=types.RGB)


def _epoch_rate(it) -> float:
    if isinstance(it, DaliLoader):  # its built pipeline's next epoch (the per-epoch build is timed apart)
        it = it.it
    n, t = 0, time.perf_counter()
    for batch in it:
        n += batch[0].shape[0] if isinstance(batch, tuple) else next(iter(batch[0].values())).shape[0]
    return n / (time.perf_counter() - t)


def _rates(shards: Path, batch_size: int, image_size: int, threads: int, rounds: int) -> dict:
    folds = [f["fold"] for f in load_manifest(shards)["folds"]]
    sel = select_folds(shards, folds)
    contenders = {}
    for loader in ("dali", "torch"):
        it, _ = make_loader(shards, folds, train=True, batch_size=batch_size, image_size=image_size,
                            device="cpu", loader=loader, num_threads=threads)
        contenders[f"{loader}_cpu_img_s"] = it
    pipe = _decode_only(tars=sel.tars, indexes=sel.indexes, device="cpu", batch_size=batch_size,
                        num_threads=threads, device_id=None)
    pipe.build()
    contenders["decode_img_s"] = DALIGenericIterator(pipe, ["data"], reader_name="Reader", auto_reset=True,
                                                     last_batch_policy=LastBatchPolicy.PARTIAL)
    if resolve_device("auto") == "gpu":
        it, _ = make_loader(shards, folds, train=True, batch_size=batch_size, image_size=image_size,
                            device="gpu", loader="dali", num_threads=threads)
        contenders["dali_gpu_img_s"] = it
        gpipe = _decode_only(tars=sel.tars, indexes=sel.indexes, device="gpu", batch_size=batch_size,
                             num_threads=threads, device_id=0)
        gpipe.build()
        contenders["decode_gpu_img_s"] = DALIGenericIterator(gpipe, ["data"], reader_name="Reader",
                                                             auto_reset=True,
                                                             last_batch_policy=LastBatchPolicy.PARTIAL)
    for it in contenders.values():  # warm-up epoch (worker start, page cache)
        _epoch_rate(it)
    best = {k: 0.0 for k in contenders}
    for _ in range(rounds):
        for k, it in contenders.items():
            best[k] = max(best[k], _epoch_rate(it))
    out = {k: round(v, 1) for k, v in best.items()}
    out["dali_vs_torch"] = round(best["dali_cpu_img_s"] / best["torch_cpu_img_s"], 3)
    if "dali_gpu_img_s" in best:
        out["dali_gpu_vs_decode"] = round(best["dali_gpu_img_s"] / best["decode_gpu_img_s"], 3)
    out["samples"] = sel.samples
    out.update(_epoch_start(shards, folds, batch_size, image_size, threads, rounds))
    out.update(_resume_start(shards, folds, batch_size, image_size, threads, rounds))
    return out


def _first_batch_s(it) -> float:
    """Seconds to an epoch's first batch; the rest of the epoch is drained (untimed)."""
    t = time.perf_counter()
    batches = iter(it)
    next(batches)
    dt = time.perf_counter() - t
    for _ in batches:
        pass
    return dt


def _epoch_start(shards: Path, folds: list[int], batch_size: int, image_size: int, threads: int,
                 epochs: int) -> dict:
    """Mean time to the first batch of epochs 1..``epochs``: a torch loader built per epoch (fresh workers),
    the one torch loader of training (``set_epoch``, workers kept), and DALI (a pipeline per epoch)."""
    kw = dict(train=True, batch_size=batch_size, image_size=image_size, device="cpu", num_threads=threads)
    fresh, kept, dali = [], [], []
    kept_it, _ = make_loader(shards, folds, loader="torch", **kw)
    dali_it, _ = make_loader(shards, folds, loader="dali", **kw)
    _first_batch_s(kept_it), _first_batch_s(dali_it)  # epoch 0: both pay their first start
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        it, _ = make_loader(shards, folds, loader="torch", epoch=epoch, **kw)
        fresh.append(time.perf_counter() - t + _first_batch_s(it))
        del it
        kept_it.set_epoch(epoch)
        kept.append(_first_batch_s(kept_it))
        dali_it.set_epoch(epoch)
        dali.append(_first_batch_s(dali_it))
    mean = {k: sum(v) / len(v) for k, v in (("fresh", fresh), ("kept", kept), ("dali", dali))}
    return {"torch_epoch_start_fresh_s": round(mean["fresh"], 3),
            "torch_epoch_start_kept_s": round(mean["kept"], 3),
            "torch_epoch_start_fresh_vs_kept": round(mean["fresh"] / mean["kept"], 2),
            "dali_epoch_start_s": round(mean["dali"], 3)}


def _resume_start(shards: Path, folds: list[int], batch_size: int, image_size: int, threads: int,
                  rounds: int) -> dict:
    """Seconds from building a fresh loader (what ``--resume`` does) to the first batch after a checkpoint
    half-way through epoch 1: the torch loader started there, the same loader reading and dropping the
    batches before it (what training did before), and DALI (which has to run them); best of ``rounds``."""
    kw = dict(train=True, batch_size=batch_size, image_size=image_size, device="cpu", num_threads=threads, epoch=1)
    best = {"started": float("inf"), "dropped": float("inf"), "dali": float("inf")}
    for _ in range(rounds):
        for name in best:
            t = time.perf_counter()
            it, steps = make_loader(shards, folds, loader="dali" if name == "dali" else "torch", **kw)
            start = steps // 2
            if name != "dropped":
                it.set_epoch(1, start)
            batches = iter(it)
            for _ in range(start if name == "dropped" else 0):
                next(batches)
            next(batches)
            best[name] = min(best[name], time.perf_counter() - t)
            batches.close()
            del batches, it
    return {"resume_batches_skipped": start, **{f"resume_{k}_s": round(v, 3) for k, v in best.items()},
            "resume_dropped_vs_started": round(best["dropped"] / best["started"], 2)}


def bench_pipeline(shards: str | None = None, sizes: tuple[int, ...] = (600, 1024), n: int = 384,
                   batch_size: int = 32, image_size: int = 224, threads: int = 2, rounds: int = 2) -> dict:
    """Per source size (or for ``shards`` as given): img/s of each contender and the ratios."""
    results: dict = {"batch_size": batch_size, "image_size": image_size, "threads": threads, "sizes": {}}
    if shards:
        results["sizes"]["given"] = _rates(Path(shards), batch_size, image_size, threads, rounds)
        results.update(results["sizes"]["given"])
        return results
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            root = Path(tmp) / f"src{size}"
            imgs = reused_dataset(root, n, size, threads)
            build(root / "train.csv", imgs, root / "shards", BuildOptions(folds=2, max_side=0,
                  samples_per_shard=128, dedup=False), workers=threads, progress=False)
            results["sizes"][str(size)] = _rates(root / "shards", batch_size, image_size, threads, rounds)
            shutil.rmtree(root)
    results.update(results["sizes"][str(max(sizes))])
    return results
