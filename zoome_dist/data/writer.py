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

from zoome_dist.core.files import sha256_file, write_csv_atomic, write_json_atomic
from zoome_dist.core.folder_lock import FolderLock
from zoome_dist.core.procs import die_with_parent
from zoome_dist.data import dedup
from zoome_dist.data.folds import assign_folds, fold_summary
from zoome_dist.data.images import BadImage, prepare_image
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.sources import Combined, ImageStore, Source, read_sources, resolve_sources
from zoome_dist.data.tables import Skipped, read_csv_text, strip_image_ext
from zoome_dist.data.wds_index import create_index

FORMAT_VERSION = 1
FIELDS = ("cls", "jpg", "json", "label", "meta", "sid")
FIELD_SPEC = {
    "jpg": "RGB JPEG bytes",
    "json": "UTF-8 JSON for people: the canonical row (source, raw site, diagnosis, licence, attribution ...), "
            "encoded meta, target, patient_id, group, sample_id",
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
    dup_distance: int = dedup.DEFAULT_MAX_DISTANCE  # phash bits; -1: exact duplicates only
    dedup: bool = True  # False: no duplicate search (every row kept; folds by patient and lesion only)

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be positive, got {self.samples_per_shard}")
        if self.max_side < 0:
            raise ValueError(f"--max-side must be 0 (keep originals) or positive, got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must lie in 1..100, got {self.jpeg_quality}")
        if not -1 <= self.dup_distance <= 64:
            raise ValueError(f"--dup-distance must lie in -1..64 (bits of the 256-bit phash; -1: exact duplicates "
                             f"only), got {self.dup_distance}")


@dataclass(frozen=True)
class ShardPlan:
    fold: int
    index: int
    rows: tuple[dict, ...]

    @property
    def name(self) -> str:
        return f"fold-{self.fold:02d}/shard-{self.index:06d}"


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


def write_shard(plan: ShardPlan, stores: dict[str, ImageStore], out: Path, enc: MetadataEncoding,
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
            store = stores[row["source"]]
            try:
                jpg, notes, was_resized = prepare_image(store.read(name), store.filename(name),
                                                        opts.max_side, opts.jpeg_quality)
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
    write_json_atomic(out / ".build" / f"{plan.name.replace('/', '-')}.json", record)
    return record


def build_lock(out: Path) -> FolderLock:
    """The lock of a shard build into ``out`` (``out/.build/lock``)."""
    return FolderLock(out / ".build" / "lock", f"{out} is being built", "wait for it, or build into another folder")


def _run_plans(plans: list[ShardPlan], stores: dict[str, ImageStore], out: Path, enc: MetadataEncoding,
               opts: BuildOptions, workers: int) -> Iterator[dict]:
    if workers <= 1:
        for p in plans:
            yield write_shard(p, stores, out, enc, opts)
        return
    with ProcessPoolExecutor(workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(write_shard, p, stores, out, enc, opts) for p in plans]
        try:
            for f in as_completed(futures):
                yield f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


def read_exclude(path: str | Path) -> set[str]:
    """Image names to leave out: a text file with one name per line (``#`` comments), a CSV with an
    ``image_name`` or ``isic_id`` column, or ISIC's published duplicate list (``image_name_1,
    image_name_2``: the second of each pair goes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--exclude file not found: {path}")
    first = path.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
    if "," in first:
        df = read_csv_text(path, dtype=str, keep_default_na=False)
        col = next((c for c in ("image_name_2", "image_name", "isic_id", "image") if c in df.columns), None)
        if col is None:
            raise ValueError(f"--exclude {path}: a CSV needs an image_name_2 (ISIC duplicate list), image_name, "
                             f"isic_id or image column; found {list(df.columns)}")
        names = df[col].tolist()
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"--exclude {path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                             "save it as UTF-8, one image name per line") from None
        names = [ln.split("#", 1)[0] for ln in text.splitlines()]
    return {strip_image_ext(n) for n in names if n.strip()}


def _sources_record(sources: list[Source], table: pd.DataFrame, stamps: dict[str, dict[str, bytes]]) -> list[dict]:
    out = []
    for src in sources:
        names = table["image_name"][table["source"] == src.name].tolist()
        rec = {"name": src.name, "kind": src.kind, "csv": str(src.csv.resolve()), "csv_sha256": sha256_file(src.csv),
               "images": str(src.images), "images_fingerprint": src.images.fingerprint(names, stamps.get(src.name))}
        if src.metadata_csv is not None:  # read (and found) by read_sources already
            rec.update(metadata_csv=str(src.metadata_csv.resolve()), metadata_csv_sha256=sha256_file(src.metadata_csv))
        out.append(rec)
    return out


def _usable_rows(sources: list[Source], enc: MetadataEncoding, opts: BuildOptions, exclude: str | Path | None,
                 csvs: list) -> tuple[Combined, pd.DataFrame, set[str]]:
    """The sources read, less ``--exclude``d images; an error for no usable row or a source none of whose
    images is where it says (a wrong --images: an error now, not a build of nothing)."""
    read = read_sources(sources, enc)
    if opts.strict and read.skipped:
        raise StrictError(f"bad row {read.skipped[0].image_name!r}: {read.skipped[0].reason}")
    excluded = read_exclude(exclude) if exclude else set()
    gone = read.table["image_name"].isin(excluded)
    read.skipped += [Skipped(n, f"excluded: listed in {Path(exclude).name}") for n in read.table["image_name"][gone]]
    table = read.table[~gone].reset_index(drop=True)
    if table.empty:
        raise ValueError(f"{', '.join(map(str, csvs))}: no usable rows ({len(read.skipped)} skipped)")
    for src in sources:  # a wrong --images: an error now, not a build of nothing
        names = table.loc[table["source"] == src.name, "image_name"]
        if len(names) and not any(src.images.stamp(n) != b"missing\0" for n in names):
            raise ValueError(f"none of the {len(names)} images {src.name} lists is in {src.images} (e.g. "
                             f"{src.images.filename(names.iloc[0])}): is that the right image folder/file?")
    return read, table, excluded


def build(csv: str | Path | list, images: str | Path | list | None, out: str | Path,
          opts: BuildOptions = BuildOptions(), metadata_csv: str | Path | None = None, workers: int = 1,
          resume: bool = False, progress: bool = True, exclude: str | Path | None = None) -> dict:
    """Read the sources, drop excluded images and duplicates, assign folds by group, write every shard
    and the manifest; returns the manifest. ``csv``/``images``: one or a list (``sources.resolve_sources``)."""
    opts.validate()
    out = Path(out)
    csvs = list(csv) if isinstance(csv, (list, tuple)) else [csv]
    imgs = list(images) if isinstance(images, (list, tuple)) else ([] if images is None else [images])
    sources = resolve_sources(csvs, imgs, metadata_csv)
    enc = MetadataEncoding()
    read, table, excluded = _usable_rows(sources, enc, opts, exclude, csvs)

    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    scratch = {out / ".build" / n for n in ("lock", "digests.json", "digests.json.tmp")}  # killed before planning
    was_empty = not out.exists() or all(p in scratch for p in out.rglob("*") if p.is_file())
    if not was_empty and not resume:  # before any hashing, so a wrong --out fails at once
        raise FileExistsError(f"output folder {out} is not empty; pass --resume to finish an "
                              "interrupted build there, or choose a new folder")
    with build_lock(out):
        stores = {s.name: s.images for s in sources}
        pairs = []
        stamps: dict[str, dict[str, bytes]] = {}  # read once: the digest cache's keys and the manifest's fingerprint
        if opts.dedup:
            for src, name in zip(table["source"], table["image_name"]):
                stamps.setdefault(src, {})[name] = stores[src].stamp(name)
            hashes = _digests(out, table, stores, stamps, workers, progress)
            pairs = dedup.duplicate_pairs([h[0] for h in hashes], [h[1] for h in hashes], opts.dup_distance)
        table["group"] = dedup.groups(table, pairs)
        keep, pair_records, dropped, largest = dedup.resolve(table, dedup.without_damaged(pairs, table, stores),
                                                             {s.name: i for i, s in enumerate(sources)})
        for d in dropped:
            read.skipped.append(Skipped(d["dropped"], f"duplicate: of {d['kept']} ({d['kept_source']}), kept there"
                                        + (" (their targets differ)" if d["label_conflict"] else "")))
        table = table[keep].reset_index(drop=True)
        folds = assign_folds(table, opts.folds, opts.seed)
        plans = plan_shards(table, folds, opts)

        records = _sources_record(sources, table, stamps)
        plan_key = {"format_version": FORMAT_VERSION, "options": asdict(opts),
                    "csv_sha256": [r["csv_sha256"] for r in records],
                    "metadata_csv_sha256": [r.get("metadata_csv_sha256") for r in records],
                    "images": [r["images"] for r in records],
                    "images_fingerprint": [r["images_fingerprint"] for r in records],
                    "exclude": sorted(excluded),
                    "shards": [[p.name, [r["image_name"] for r in p.rows]] for p in plans]}
        duplicates = {"searched": opts.dedup, "max_distance": opts.dup_distance, "pairs": pair_records,
                      "dropped": dropped, "largest_cluster": largest, "same_id": read.same_name}
        return _build(out, plan_key, plans, read, table, folds, stores, enc, opts, records, duplicates, workers,
                      resume and not was_empty, progress)


SAVE_DIGESTS_S = 30.0  # how much hashing a killed build can lose


def _digests(out: Path, table: pd.DataFrame, stores: dict[str, ImageStore], stamps: dict[str, dict[str, bytes]],
             workers: int, progress: bool) -> list[tuple[str | None, str | None]]:
    """Every row's (sha256, phash), cached in ``.build/digests.json`` with each image's ``stamp`` (name,
    size, first 4 KiB), saved every ``SAVE_DIGESTS_S``, at the end and when interrupted: any re-run of a
    build (plain after a stop while hashing, or ``--resume``) hashes only the images it has no digest
    of, or whose stamp changed."""
    import contextlib
    import time

    cache_file = out / ".build" / "digests.json"
    try:
        old = json.loads(cache_file.read_text()).get("digests", {}) if cache_file.is_file() else {}
    except (OSError, ValueError, AttributeError):  # unreadable, or an older format: hash again
        old = {}
    keys = [f"{src}/{name}" for src, name in zip(table["source"], table["image_name"])]
    stamped = [hashlib.sha256(stamps[src][name]).hexdigest()[:32]
               for src, name in zip(table["source"], table["image_name"])]
    cache = {k: v for k, st in zip(keys, stamped) if isinstance(v := old.get(k), list) and len(v) == 3 and v[2] == st}
    todo = [i for i, k in enumerate(keys) if k not in cache]

    def save() -> None:
        write_json_atomic(cache_file, {"digests": cache})

    saved = time.monotonic()
    found = dedup.digests([(stores[table["source"].iloc[i]], table["image_name"].iloc[i]) for i in todo],
                          workers, progress)
    try:
        with contextlib.closing(found):  # an interrupted pass stops its workers now
            for i, h in zip(todo, found):
                cache[keys[i]] = [*h, stamped[i]]
                if time.monotonic() - saved > SAVE_DIGESTS_S:
                    save()
                    saved = time.monotonic()
    finally:
        save()  # what was hashed, also when interrupted
    return [tuple(cache[k][:2]) for k in keys]


def _manifest(read: Combined, ordered: list[dict], fold_table: pd.DataFrame, kept: pd.DataFrame, opts: BuildOptions,
              enc: MetadataEncoding, sources: list[dict], duplicates: dict, folds: list[dict]) -> dict:
    """The build's manifest.json: counts, sources, vocabulary, per-fold summary, skipped rows, licences."""
    skipped = [s.to_dict() for s in read.skipped] + [s for r in ordered for s in r["skipped"]]
    per_source = {src["name"]: {"samples": int((fold_table["source"] == src["name"]).sum()),
                                "positives": int(fold_table["target"][fold_table["source"] == src["name"]].sum())}
                  for src in sources}
    return {
        "format": "zoome-shards", "format_version": FORMAT_VERSION, "source": sources[0], "sources": sources,
        "options": asdict(opts), "fields": FIELD_SPEC, "metadata_encoding": enc.to_dict(),
        "totals": {"samples": int(len(fold_table)), "positives": int(fold_table["target"].sum()),
                   "patients": int(fold_table["patient_id"].nunique()), "groups": int(fold_table["group"].nunique()),
                   "csv_rows_read": int(len(read.table)), "skipped": len(skipped),
                   "converted": sum(len(r["converted"]) for r in ordered),
                   "resized": sum(r["resized"] for r in ordered),
                   "duplicates_dropped": len(duplicates["dropped"]) + len(duplicates["same_id"])},
        "per_source": per_source, "folds": folds, "skipped": skipped,
        "converted": [c for r in ordered for c in r["converted"]],
        "unknown_sites": dict(sorted(read.unknown_sites.items())),
        "no_metadata": sorted(set(read.no_metadata) & set(kept["image_name"])),
        "duplicates": duplicates,
        "licenses": dict(sorted(Counter(kept["copyright_license"]).items())),
        "attributions": dict(sorted(Counter(kept["attribution"]).items())),
    }


def _build(out: Path, plan_key: dict, plans: list[ShardPlan], read: Combined, table: pd.DataFrame, folds: np.ndarray,
           stores: dict[str, ImageStore], enc: MetadataEncoding, opts: BuildOptions, sources: list[dict],
           duplicates: dict, workers: int, resume: bool, progress: bool) -> dict:
    plan_file = out / ".build" / "plan.json"
    if resume:
        old = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
        new = json.loads(json.dumps(plan_key))
        if old != new:
            what = [k for k in new if old.get(k) != new[k]] if old else ["not a zoome-shards build"]
            raise ValueError(f"--resume: {out} was started with other inputs or options (differs in: "
                             f"{', '.join(what)}); use a new folder")
    write_json_atomic(plan_file, plan_key)

    records, todo = {}, []
    for p in plans:
        rec_path = out / ".build" / f"{p.name.replace('/', '-')}.json"
        if resume and rec_path.is_file():
            records[p.name] = json.loads(rec_path.read_text())
        else:
            todo.append(p)
    bar = tqdm(total=len(table), initial=sum(len(p.rows) for p in plans if p.name in records),
               desc="shards", unit="img", disable=not progress)
    for rec in _run_plans(todo, stores, out, enc, opts, workers):
        records[rec["name"]] = rec
        bar.update(len(rec["written"]) + len(rec["skipped"]))
    bar.close()

    ordered = [records[p.name] for p in plans]
    written = {n: (r["fold"], r["path"]) for r in ordered for n in r["written"]}
    keep = table["image_name"].map(lambda n: n in written).to_numpy()
    kept = table[keep]
    fold_table = pd.DataFrame({
        "sample_id": np.flatnonzero(keep), "image_name": kept["image_name"], "patient_id": kept["patient_id"],
        "group": kept["group"], "target": kept["target"], "fold": folds[keep],
        "shard": [written[n][1] for n in kept["image_name"]], "source": kept["source"], "sex": kept["sex"],
        "age_approx": kept["age_approx"], "site": kept["site"],
        "fitzpatrick_skin_type": kept["fitzpatrick_skin_type"]})
    write_csv_atomic(fold_table, out / "folds.csv")

    summary = fold_summary(fold_table, fold_table["fold"].to_numpy())
    for s in summary:
        s["shards"] = [{k: r[k] for k in ("path", "index", "samples", "bytes", "sha256")}
                       for r in ordered if r["fold"] == s["fold"] and r["samples"]]
    manifest = _manifest(read, ordered, fold_table, kept, opts, enc, sources, duplicates, summary)
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def summary_lines(manifest: dict) -> list[str]:
    """Human summary of a build: per-fold counts and every reason something was left out."""
    t = manifest["totals"]
    lines = [f"{t['samples']} samples ({t['positives']} positive, {t['patients']} patients) in "
             f"{len(manifest['folds'])} folds; {t['skipped']} skipped, {t['converted']} converted, "
             f"{t['resized']} resized"]
    if len(manifest.get("per_source", {})) > 1:
        lines += [f"  source {name}: {v['samples']} samples, {v['positives']} positive"
                  for name, v in manifest["per_source"].items()]
    dups = manifest.get("duplicates", {})
    if dups.get("pairs") or dups.get("same_id"):
        conflicts = sum(d["label_conflict"] for d in dups["dropped"])
        lines.append(f"  duplicates: {len(dups['pairs'])} pair(s) found ("
                     f"{sum(p['kind'] == 'exact' for p in dups['pairs'])} exact), {len(dups['dropped'])} copies dropped, "
                     f"largest cluster {dups.get('largest_cluster', '?')} images"
                     + (f", {len(dups['same_id'])} image id(s) in two sources" if dups["same_id"] else "")
                     + (f"; {conflicts} with conflicting targets" if conflicts else ""))
    for f in manifest["folds"]:
        lines.append(f"  fold {f['fold']:2d}: {f['samples']:6d} samples {f['positives']:5d} positive "
                     f"{f['patients']:5d} patients {len(f['shards']):3d} shards")
    for what in ("skipped", "converted"):
        reasons = Counter(r["reason"].split(":")[0] for r in manifest[what])
        for reason, n in reasons.most_common():
            lines.append(f"  {what}: {n} × {reason}")
    for site, n in manifest["unknown_sites"].items():
        lines.append(f"  unknown site {site!r} → 'unknown': {n} rows")
    if manifest.get("no_metadata"):
        lines.append(f"  no metadata row: {len(manifest['no_metadata'])} images (age, sex, site unknown; manifest "
                     "no_metadata)")
    return lines
