"""Where a build's samples come from: one or more (CSV, images) sources → one table, and the image
store of each source (a folder of ``<name>.jpg|.JPG|.jpeg|.png``, or an HDF5 file of JPEG bytes keyed
by image name, as ISIC 2024's ``train-image.hdf5``)."""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from zoome_dist.data.images import BadImage
from zoome_dist.data.isic import ISIC2019_META_NAME, LAYOUTS, detect_layout, read_isic
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.tables import CANONICAL_COLUMNS, ReadResult, Skipped

IMAGE_EXTS = (".jpg", ".JPG", ".jpeg", ".JPEG", ".png", ".PNG")
ARCHIVE_CSV = "metadata.csv"  # what `isic image download OUT/` writes beside the images
ISIC2024_HDF5, ISIC2024_FOLDER = "train-image.hdf5", "train-image/image"


@dataclass(frozen=True)
class FolderImages:
    """``root/<name><ext>`` for the first of ``IMAGE_EXTS`` that exists."""

    root: Path

    def find(self, name: str) -> Path | None:
        for ext in IMAGE_EXTS:
            if (p := self.root / f"{name}{ext}").is_file():
                return p
        return None

    def filename(self, name: str) -> str:
        path = self.find(name)
        return path.name if path else f"{name}.jpg"

    def read(self, name: str) -> bytes:
        path = self.find(name)
        if path is None:
            raise BadImage(f"missing image file {self.root / name}.jpg (nor {'/'.join(IMAGE_EXTS[1:])})")
        try:
            return path.read_bytes()
        except OSError as e:
            raise BadImage(f"unreadable image file {path}: {e}") from None

    def stamp(self, name: str) -> bytes:
        """The image's file name, size and first 4 KiB (hashed): what tells a changed image."""
        path = self.find(name)
        try:
            with open(path, "rb") as f:  # type: ignore[arg-type]
                head = f.read(4096)
            return f"{path.name}\0{path.stat().st_size}\0".encode() + hashlib.sha256(head).digest()
        except (OSError, TypeError):
            return b"missing\0"

    def fingerprint(self, names: list[str], stamps: Mapping[str, bytes] | None = None) -> str:
        """Per listed image its name and ``stamp``, hashed (what ``--resume`` compares); ``stamps``: the
        ones a build has read already (the duplicate search's cache keys them), not read again."""
        return _fingerprint(self, names, stamps)

    def __str__(self) -> str:
        return str(self.root.resolve())


MAX_IMAGE_BYTES = 256 << 20  # no dermoscopy image file comes near this
_H5: dict[tuple[int, str], object] = {}  # per process: h5py handles do not survive a fork


@dataclass(frozen=True)
class HDF5Images:
    """An HDF5 file with one dataset per image name holding the encoded image's bytes."""

    path: Path

    def _file(self):
        import h5py

        key = (os.getpid(), str(self.path))
        if key not in _H5:
            try:
                _H5[key] = h5py.File(self.path, "r")
            except OSError as e:
                raise ValueError(f"{self.path}: not a readable HDF5 file ({e})") from None
        return _H5[key]

    def filename(self, name: str) -> str:
        return name

    def read(self, name: str) -> bytes:
        import h5py
        import numpy as np

        f = self._file()
        if name not in f:
            raise BadImage(f"missing image {name} in {self.path}")
        node = f[name]
        if not isinstance(node, h5py.Dataset):
            raise BadImage(f"{name} in {self.path} is an HDF5 {type(node).__name__}, not a dataset of image bytes")
        declared = node.size * (node.dtype.itemsize if node.dtype != object else 1)
        limit = min(MAX_IMAGE_BYTES, 4 * self.path.stat().st_size + (1 << 20))  # image bytes do not compress 4×
        if declared > limit:
            raise BadImage(f"{name} in {self.path} declares {declared:,} bytes, more than an image (limit {limit:,}: "
                           "4× the file, at most 256 MiB); not read")
        try:
            value = node[()]
        except (OSError, ValueError) as e:
            raise BadImage(f"unreadable image {name} in {self.path}: {e}") from None
        if isinstance(value, np.ndarray) and value.dtype == object:  # variable-length: the bytes inside
            value = b"".join(v.tobytes() if hasattr(v, "tobytes") else bytes(v) for v in value.ravel())
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if hasattr(value, "tobytes"):  # np.void, np.bytes_ or a uint8 array
            return value.tobytes()
        raise BadImage(f"{name} in {self.path}: a {type(value).__name__}, not image bytes")

    def stamp(self, name: str) -> bytes:
        """The image's size and first 4 KiB (hashed): what tells a changed image."""
        try:
            raw = self.read(name)
        except BadImage:
            return b"missing\0"
        return f"{len(raw)}\0".encode() + hashlib.sha256(raw[:4096]).digest()

    def fingerprint(self, names: list[str], stamps: Mapping[str, bytes] | None = None) -> str:
        return _fingerprint(self, names, stamps)

    def __str__(self) -> str:
        return str(self.path.resolve())


ImageStore = FolderImages | HDF5Images


def _fingerprint(store: ImageStore, names: list[str], stamps: Mapping[str, bytes] | None) -> str:
    h = hashlib.sha256()
    for name in names:
        stamp = stamps.get(name) if stamps is not None else None
        h.update(f"{name}\0".encode() + (store.stamp(name) if stamp is None else stamp))
    return h.hexdigest()


def open_images(path: str | Path) -> ImageStore:
    """A folder, or an ``.h5``/``.hdf5`` file."""
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if path.is_file() and path.suffix.lower() in (".h5", ".hdf5"):
        return HDF5Images(path)
    if path.is_file():
        raise ValueError(f"--images {path}: a file that is not HDF5 (.h5/.hdf5); give the images folder")
    raise FileNotFoundError(f"images folder not found: {path}")


@dataclass(frozen=True)
class Source:
    """One input of a build: its layout, a name (the ``source`` of its samples) and its images."""

    name: str
    kind: str
    csv: Path
    images: ImageStore
    metadata_csv: Path | None = None

    def read(self, enc: MetadataEncoding) -> ReadResult:
        read = read_isic(self.csv, self.metadata_csv, enc)
        read.table["source"] = self.name
        return read


def _default_images(kind: str, csv: Path) -> ImageStore:
    if kind == "archive":
        return FolderImages(csv.parent)
    if kind == "isic2024":
        for cand in (csv.parent / ISIC2024_HDF5, csv.parent / ISIC2024_FOLDER):
            if cand.exists():
                return open_images(cand)
        raise FileNotFoundError(f"{csv}: ISIC 2024 images not found beside it ({ISIC2024_HDF5} or {ISIC2024_FOLDER}/); "
                                "give --images")
    raise ValueError(f"{csv}: a {kind} CSV needs --images (the folder with <image_name>.jpg)")


def resolve_sources(csvs: list[str | Path], images: list[str | Path] | None = None,
                    metadata_csv: str | Path | None = None) -> list[Source]:
    """``--csv`` (repeatable; an Archive download folder stands for its metadata.csv) paired in order with
    ``--images`` (one per --csv, or none where every layout says where its images are)."""
    images = list(images or [])
    if not csvs:
        raise ValueError("no --csv given")
    if images and len(images) != len(csvs):
        raise ValueError(f"{len(csvs)} --csv but {len(images)} --images: give one --images per --csv (in the "
                         "same order), or none where the layout has its images beside the CSV (ISIC Archive "
                         "folder, ISIC 2024)")
    sources, names = [], Counter()
    for i, csv in enumerate(map(Path, csvs)):
        if csv.is_dir():
            if not (csv / ARCHIVE_CSV).is_file():
                raise FileNotFoundError(f"--csv {csv} is a folder without {ARCHIVE_CSV} (an `isic image download` "
                                        "folder has one); give the CSV file")
            csv = csv / ARCHIVE_CSV
        if not csv.is_file():
            raise FileNotFoundError(f"CSV file not found: {csv}")
        kind = detect_layout(csv)
        store = open_images(images[i]) if images else _default_images(kind, csv)
        name = f"archive:{csv.resolve().parent.name}" if kind == "archive" else kind
        names[name] += 1
        if names[name] > 1:
            name = f"{name}-{names[name]}"
        meta = None
        if kind == "isic2019":
            meta = Path(metadata_csv) if metadata_csv else csv.parent / ISIC2019_META_NAME
        sources.append(Source(name, kind, csv, store, meta))
    if metadata_csv and not any(s.kind == "isic2019" for s in sources):
        raise ValueError("--metadata-csv is for an ISIC 2019 ground truth; the --csv given are "
                         + ", ".join(f"{s.csv} ({LAYOUTS[s.kind]})" for s in sources))
    return sources


@dataclass
class Combined:
    """Every source's rows in one table (sorted by image name), and what was left out."""

    table: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)
    unknown_sites: Counter = field(default_factory=Counter)
    same_name: list[dict] = field(default_factory=list)  # one image name in two sources: kept once
    no_metadata: list[str] = field(default_factory=list)  # rows kept without a metadata row


def read_sources(sources: list[Source], enc: MetadataEncoding) -> Combined:
    """Read and concatenate; an image name that appears in an earlier source is kept there only (ISIC ids
    are global, so the same id is the same image) and recorded in ``same_name``."""
    tables, out = [], Combined(pd.DataFrame())
    seen: dict[str, str] = {}
    for src in sources:
        read = src.read(enc)
        out.skipped += read.skipped
        out.unknown_sites.update(read.unknown_sites)
        out.no_metadata += read.no_metadata
        dup = read.table["image_name"].isin(seen)
        for name in read.table["image_name"][dup]:
            out.same_name.append({"kept": name, "kept_source": seen[name], "dropped": name,
                                  "dropped_source": src.name, "kind": "same_id"})
            out.skipped.append(Skipped(name, f"duplicate: the same image id is in source {seen[name]} "
                                             f"(kept there), dropped from {src.name}"))
        if (~dup).any():  # a source left without rows adds none (and no all-object columns to the concat)
            tables.append(read.table[~dup])
        seen.update(dict.fromkeys(read.table["image_name"][~dup], src.name))
    if not tables:
        out.table = pd.DataFrame(columns=CANONICAL_COLUMNS)
        return out
    table = pd.concat(tables, ignore_index=True).astype({"target": "int64", "age_approx": "float64"})
    out.table = table.sort_values("image_name", kind="stable").reset_index(drop=True)
    return out
