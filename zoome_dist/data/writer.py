"""Build fold-partitioned WebDataset shards with DALI index files and a manifest.

Layout: ``OUT/fold-XX/shard-NNNNNN.{tar,idx}``, ``OUT/folds.csv``, ``OUT/manifest.json``.
Every shard is planned up front (fold → seeded shuffle → chunks), written to a temp name and renamed,
then recorded in ``OUT/.build/``; ``resume`` skips shards that have a record. Same inputs → same bytes.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import webdataset as wds
from tqdm import tqdm

from zoome_dist.data.folds import assign_folds, fold_summary
from zoome_dist.data.images import BadImage, prepare_image
from zoome_dist.data.isic import Skipped, read_isic
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.procs import die_with_parent
from zoome_dist.data.wds_index import create_index

FORMAT_VERSION = 1
FIELDS = ("cls", "jpg", "json", "label", "meta", "sid")
FIELD_SPEC = {
    "jpg": "RGB JPEG bytes",
    "json": "UTF-8 JSON for people: raw CSV fields, encoded meta, target, patient_id, sample_id",
    "cls": "target as ASCII text",
    "meta": "little-endian float32 vector, see metadata_encoding",
    "label": "little-endian int32 target (1 = melanoma)",
    "sid": "little-endian int64 sample_id (row of folds.csv)",
}
TAR_MTIME = 0  # fixed, so the same inputs give byte-identical tars


class StrictError(RuntimeError):
    """``--strict`` met a sample it would otherwise have skipped or converted."""


@dataclass(frozen=True)
class BuildOptions:
    folds: int = 10
    seed: int = 0
    max_side: int = 1024
    samples_per_shard: int = 1000
    jpeg_quality: int = 95
    strict: bool = False

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be positive, got {self.samples_per_shard}")
        if self.max_side < 0:
            raise ValueError(f"--max-side must be 0 (keep originals) or positive, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must lie in 1..100, got {self.jpeg_quality}")


@dataclass(frozen=True)
class ShardPlan:
    fold: int
    index: int
    rows: tuple[dict, ...]

    @property
    def name(self) -> str:
        return f"fold-{self.fold:02d}/shard-{self.index:06d}"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def plan_shards(table: pd.DataFrame, folds: np.ndarray, opts: BuildOptions) -> list[ShardPlan]:
    """Seeded shuffle within each fold, then fixed-size chunks."""
    records = table.to_dict("records")
    plans = []
    for k in range(opts.folds):
        idx = np.flatnonzero(folds == k)
        idx = idx[np.random.default_rng([opts.seed, k]).permutation(len(idx))]
        for s, start in enumerate(range(0, len(idx), opts.samples_per_shard)):
            chunk = idx[start:start + opts.samples_per_shard]
            rows = tuple({**{c: _json_value(v) for c, v in records[i].items()}, "sample_id": int(i)}
                         for i in chunk)
            plans.append(ShardPlan(k, s, rows))
    return plans


def _sample(row: dict, jpg: bytes, enc: MetadataEncoding) -> dict:
    meta = enc.encode(row["age_approx"], row["sex"], row["site"]).astype("<f4")
    info = {**row, "meta": meta.tolist()}
    return {"__key__": row["image_name"], "jpg": jpg, "cls": str(row["target"]).encode(),
            "json": json.dumps(info, sort_keys=True).encode(), "meta": meta.tobytes(),
            "label": np.array(row["target"], "<i4").tobytes(),
            "sid": np.array(row["sample_id"], "<i8").tobytes()}


def write_shard(plan: ShardPlan, images: Path, out: Path, enc: MetadataEncoding,
                opts: BuildOptions) -> dict:
    """Write one shard atomically (tar, then idx, then its record); return the record."""
    tar_path, idx_path = out / f"{plan.name}.tar", out / f"{plan.name}.idx"
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_tar, tmp_idx = tar_path.with_suffix(".tar.tmp"), idx_path.with_suffix(".idx.tmp")
    skipped, converted, written, resized = [], [], [], 0
    with wds.TarWriter(str(tmp_tar), mtime=TAR_MTIME, user="zoome", group="zoome") as sink:
        sink.tarstream.format = tarfile.USTAR_FORMAT  # TarWriter computes but never applies it
        for row in plan.rows:
            name = row["image_name"]
            try:
                jpg, notes, was_resized = prepare_image(images / f"{name}.jpg", opts.max_side,
                                                        opts.jpeg_quality)
            except BadImage as e:
                if opts.strict:
                    raise StrictError(f"bad sample {name}: {e}") from None
                skipped.append(Skipped(name, str(e)).to_dict())
                continue
            if notes:
                if opts.strict:
                    raise StrictError(f"bad sample {name}: {'; '.join(notes)}")
                converted.append({"image_name": name, "reason": "; ".join(notes)})
            resized += was_resized
            sink.write(_sample(row, jpg, enc))
            written.append(name)
    record = {"name": plan.name, "fold": plan.fold, "samples": len(written), "written": written,
              "skipped": skipped, "converted": converted, "resized": resized}
    if written:
        create_index(tmp_tar, tmp_idx)
        os.replace(tmp_tar, tar_path)
        os.replace(tmp_idx, idx_path)
        record.update(path=f"{plan.name}.tar", index=f"{plan.name}.idx",
                      bytes=tar_path.stat().st_size, sha256=sha256_file(tar_path))
    else:  # every image of the shard was bad: no empty tar (DALI refuses those)
        tmp_tar.unlink()
    _write_json_atomic(out / ".build" / f"{plan.name.replace('/', '-')}.json", record)
    return record


def _write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def images_fingerprint(images: Path, names: list[str]) -> str:
    """Identity of the image source: per listed image its name, size and first 4 KiB, hashed."""
    h = hashlib.sha256()
    for name in names:
        path = images / f"{name}.jpg"
        try:
            with open(path, "rb") as f:
                head = f.read(4096)
            h.update(f"{name}\0{path.stat().st_size}\0".encode() + hashlib.sha256(head).digest())
        except OSError:
            h.update(f"{name}\0missing\0".encode())
    return h.hexdigest()


class BuildLock:
    """An exclusive lock on an output folder for the length of a build (``flock``: released by the
    kernel when the process dies, so a killed build never leaves a stale lock)."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".build" / "lock"

    def __enter__(self) -> "BuildLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise FileExistsError(f"{self.path.parent.parent} is being built by another process (pid {holder}, "
                                  f"lock {self.path}); wait for it, or build into another folder") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _run_plans(plans: list[ShardPlan], images: Path, out: Path, enc: MetadataEncoding,
               opts: BuildOptions, workers: int) -> Iterator[dict]:
    if workers <= 1:
        for p in plans:
            yield write_shard(p, images, out, enc, opts)
        return
    with ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(write_shard, p, images, out, enc, opts) for p in plans]
        try:
            for f in as_completed(futures):
                yield f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def build(csv: str | Path, images: str | Path, out: str | Path, opts: BuildOptions = BuildOptions(),
          metadata_csv: str | Path | None = None, workers: int = 1, resume: bool = False,
          progress: bool = True) -> dict:
    """Read the CSV, assign folds, write every shard and the manifest; returns the manifest."""
    opts.validate()
    csv, images, out = Path(csv), Path(images), Path(out)
    if not images.is_dir():
        raise FileNotFoundError(f"images folder not found: {images}")
    enc = MetadataEncoding()
    read = read_isic(csv, metadata_csv, enc)
    if opts.strict and read.skipped:
        raise StrictError(f"bad row {read.skipped[0].image_name!r}: {read.skipped[0].reason}")
    if read.table.empty:
        raise ValueError(f"{csv}: no usable rows ({len(read.skipped)} skipped)")
    table = read.table
    folds = assign_folds(table, opts.folds, opts.seed)
    plans = plan_shards(table, folds, opts)

    sources = {"kind": read.source, "csv": str(csv.resolve()), "csv_sha256": sha256_file(csv),
               "images": str(images.resolve()),
               "images_fingerprint": images_fingerprint(images, table["image_name"].tolist())}
    if metadata_csv or read.source == "isic2019":
        meta_path = Path(metadata_csv) if metadata_csv else csv.parent / "ISIC_2019_Training_Metadata.csv"
        sources.update(metadata_csv=str(meta_path.resolve()), metadata_csv_sha256=sha256_file(meta_path))
    plan_key = {"format_version": FORMAT_VERSION, "options": asdict(opts),
                "csv_sha256": sources["csv_sha256"], "metadata_csv_sha256": sources.get("metadata_csv_sha256"),
                "images": sources["images"], "images_fingerprint": sources["images_fingerprint"],
                "shards": [[p.name, [r["image_name"] for r in p.rows]] for p in plans]}
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    was_empty = not out.exists() or all(p == out / ".build" / "lock" for p in out.rglob("*") if p.is_file())
    with BuildLock(out):
        return _build(out, plan_key, plans, read, table, folds, images, enc, opts, sources, workers,
                      resume and not was_empty, was_empty, progress)


def _build(out: Path, plan_key: dict, plans: list[ShardPlan], read, table: pd.DataFrame, folds: np.ndarray,
           images: Path, enc: MetadataEncoding, opts: BuildOptions, sources: dict, workers: int, resume: bool,
           was_empty: bool, progress: bool) -> dict:
    plan_file = out / ".build" / "plan.json"
    if not was_empty:
        if not resume:
            raise FileExistsError(f"output folder {out} is not empty; pass --resume to finish an "
                                  "interrupted build there, or choose a new folder")
        old = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
        new = json.loads(json.dumps(plan_key))
        if old != new:
            what = [k for k in new if old.get(k) != new[k]] if old else ["not a zoome-shards build"]
            raise ValueError(f"--resume: {out} was started with other inputs or options (differs in: "
                             f"{', '.join(what)}); use a new folder")
    _write_json_atomic(plan_file, plan_key)

    records, todo = {}, []
    for p in plans:
        rec_path = out / ".build" / f"{p.name.replace('/', '-')}.json"
        if resume and rec_path.is_file():
            records[p.name] = json.loads(rec_path.read_text())
        else:
            todo.append(p)
    bar = tqdm(total=len(table), initial=sum(len(p.rows) for p in plans if p.name in records),
               desc="shards", unit="img", disable=not progress)
    for rec in _run_plans(todo, images, out, enc, opts, workers):
        records[rec["name"]] = rec
        bar.update(len(rec["written"]) + len(rec["skipped"]))
    bar.close()

    ordered = [records[p.name] for p in plans]
    written = {n: (r["fold"], r["path"]) for r in ordered for n in r["written"]}
    keep = table["image_name"].map(lambda n: n in written).to_numpy()
    fold_table = pd.DataFrame({
        "sample_id": np.flatnonzero(keep), "image_name": table["image_name"][keep],
        "patient_id": table["patient_id"][keep], "target": table["target"][keep],
        "fold": folds[keep], "shard": [written[n][1] for n in table["image_name"][keep]]})
    fold_table.to_csv(out / "folds.csv.tmp", index=False)
    os.replace(out / "folds.csv.tmp", out / "folds.csv")

    summary = fold_summary(fold_table, fold_table["fold"].to_numpy())
    for s in summary:
        s["shards"] = [{k: r[k] for k in ("path", "index", "samples", "bytes", "sha256")}
                       for r in ordered if r["fold"] == s["fold"] and r["samples"]]
    skipped = [s.to_dict() for s in read.skipped] + [s for r in ordered for s in r["skipped"]]
    manifest = {
        "format": "zoome-shards", "format_version": FORMAT_VERSION, "source": sources,
        "options": asdict(opts), "fields": FIELD_SPEC, "metadata_encoding": enc.to_dict(),
        "totals": {"samples": int(len(fold_table)), "positives": int(fold_table["target"].sum()),
                   "patients": int(fold_table["patient_id"].nunique()), "csv_rows_read": int(len(table)),
                   "skipped": len(skipped), "converted": sum(len(r["converted"]) for r in ordered),
                   "resized": sum(r["resized"] for r in ordered)},
        "folds": summary, "skipped": skipped,
        "converted": [c for r in ordered for c in r["converted"]],
        "unknown_sites": dict(sorted(read.unknown_sites.items())),
    }
    _write_json_atomic(out / "manifest.json", manifest)
    return manifest


def summary_lines(manifest: dict) -> list[str]:
    """Human summary of a build: per-fold counts and every reason something was left out."""
    t = manifest["totals"]
    lines = [f"{t['samples']} samples ({t['positives']} positive, {t['patients']} patients) in "
             f"{len(manifest['folds'])} folds; {t['skipped']} skipped, {t['converted']} converted, "
             f"{t['resized']} resized"]
    for f in manifest["folds"]:
        lines.append(f"  fold {f['fold']:2d}: {f['samples']:6d} samples {f['positives']:5d} positive "
                     f"{f['patients']:5d} patients {len(f['shards']):3d} shards")
    for what in ("skipped", "converted"):
        reasons = Counter(r["reason"].split(":")[0] for r in manifest[what])
        for reason, n in reasons.most_common():
            lines.append(f"  {what}: {n} × {reason}")
    for site, n in manifest["unknown_sites"].items():
        lines.append(f"  unknown site {site!r} → 'unknown': {n} rows")
    return lines
