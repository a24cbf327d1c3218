"""Read a shard manifest and verify the shards against it."""
from __future__ import annotations

import io
import json
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from zoome_dist.core.files import sha256_file
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.wds_index import create_index
from zoome_dist.data.writer import FIELDS, FORMAT_VERSION


def load_manifest(shards: str | Path) -> dict:
    """``shards/manifest.json``, with a clear error when the folder is not a shard build."""
    path = Path(shards) / "manifest.json"
    if not Path(shards).is_dir():
        raise FileNotFoundError(f"shard folder not found: {shards}")
    if not path.is_file():
        raise FileNotFoundError(f"{shards} has no manifest.json: not a finished zoome-shards build "
                                "(run `zoome-shards build`, or `--resume` an interrupted one)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON manifest ({str(e).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "zoome-shards" \
            or manifest.get("format_version") != FORMAT_VERSION:
        got = manifest if not isinstance(manifest, dict) else manifest.get("format")
        raise ValueError(f"{path}: format {str(got)[:60]!r} v{manifest.get('format_version') if isinstance(manifest, dict) else None!r}; "
                         f"this zoome_dist reads zoome-shards v{FORMAT_VERSION}")
    for fold in manifest.get("folds", []):
        for s in fold.get("shards", []):
            for key in ("path", "index"):
                inside(Path(shards), s.get(key), f"{path}: shard {key}")
    return manifest


def inside(root: Path, rel: object, what: str) -> Path:
    """``root / rel``, refusing a path that is absolute, climbs out of ``root`` or resolves (through
    links) outside it: manifests are data from elsewhere, and must not point at ``/etc/passwd``."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ValueError(f"{what} {str(rel)[:120]!r} is not a relative path inside the shard folder")
    full = root / rel
    if not full.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{what} {rel!r} resolves outside the shard folder ({full.resolve()})")
    return full


def _check_tar(tar_path: Path, expected: int, meta_dim: int) -> list[str]:
    problems = []
    sizes: dict[str, dict[str, int]] = defaultdict(dict)  # key → ext → bytes (from the tar headers)
    first: dict[str, bytes] = {}  # jpg and label bytes of the first sample: decoded below
    file_size = tar_path.stat().st_size
    try:
        with tarfile.open(tar_path) as tf:
            for m in tf:
                key, _, ext = m.name.partition(".")
                if not m.isreg():
                    problems.append(f"{tar_path}: member {m.name!r} is not a regular file (a link or device)")
                    continue
                if m.offset_data + m.size > file_size:
                    problems.append(f"{tar_path}: member {m.name!r} declares {m.size} bytes, past the end of "
                                    f"the {file_size}-byte file")
                    continue
                sizes[key][ext] = m.size
                if len(sizes) == 1 and ext in ("jpg", "label"):
                    first[ext] = tf.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, MemoryError, ValueError) as e:
        return problems + [f"{tar_path}: unreadable tar ({type(e).__name__}: {e})"]
    if problems:
        return problems
    if len(sizes) != expected:
        problems.append(f"{tar_path}: {len(sizes)} samples, manifest says {expected}")
    for key, fields in sizes.items():
        missing = sorted(set(FIELDS) - set(fields))
        if missing:
            problems.append(f"{tar_path}: sample {key} lacks field(s) {missing}")
            return problems
        if fields["meta"] != 4 * meta_dim or fields["label"] != 4:
            problems.append(f"{tar_path}: sample {key} has a meta/label field of the wrong size")
            return problems
    if sizes:
        key = next(iter(sizes))
        try:
            Image.open(io.BytesIO(first["jpg"])).convert("RGB").load()
        except Exception as e:  # noqa: BLE001 - any decoder failure is a finding, not a crash
            problems.append(f"{tar_path}: sample {key} does not decode ({e})")
        if int(np.frombuffer(first["label"], "<i4")[0]) not in (0, 1):
            problems.append(f"{tar_path}: sample {key} has a label outside {{0, 1}}")
    return problems


def _check_index(tar_path: Path, idx_path: Path) -> list[str]:
    if not idx_path.is_file():
        return [f"{idx_path}: index file missing (rebuild with wds2idx)"]
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "fresh.idx"
        try:
            create_index(tar_path, fresh)
        except Exception as e:  # noqa: BLE001 - a tar we cannot index is a finding, not a crash
            return [f"{tar_path}: cannot index ({type(e).__name__}: {e})"]
        if fresh.read_bytes() != idx_path.read_bytes():
            return [f"{idx_path}: does not match its tar (stale or altered index)"]
    return []


def verify(shards: str | Path, progress: bool = True) -> list[str]:
    """Re-hash every shard, count samples, check the index files, decode a sample per shard.

    Returns the problems found, each naming its file; an empty list means the build is intact.
    """
    shards = Path(shards)
    manifest = load_manifest(shards)
    meta_dim = MetadataEncoding.from_dict(manifest["metadata_encoding"]).dim
    entries = [s for f in manifest["folds"] for s in f["shards"]]
    problems: list[str] = []
    for s in tqdm(entries, desc="verify", unit="shard", disable=not progress):
        tar_path = shards / s["path"]  # load_manifest checked it stays inside the folder
        if not tar_path.is_file():
            problems.append(f"{tar_path}: missing")
            continue
        size = tar_path.stat().st_size
        if size != s["bytes"]:
            problems.append(f"{tar_path}: {size} bytes, manifest says {s['bytes']} (truncated or altered)")
        elif sha256_file(tar_path) != s["sha256"]:
            problems.append(f"{tar_path}: sha256 differs from the manifest (altered)")
        problems += _check_tar(tar_path, s["samples"], meta_dim)
        problems += _check_index(tar_path, shards / s["index"])
    for fold in manifest["folds"]:
        counted = sum(s["samples"] for s in fold["shards"])
        if counted != fold["samples"]:
            problems.append(f"fold {fold['fold']}: shards hold {counted} samples, manifest says {fold['samples']}")
    return problems
