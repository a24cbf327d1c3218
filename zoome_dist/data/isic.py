"""ISIC 2020 / 2019 CSVs → one canonical table (the ISIC Archive and ISIC 2024 layouts: ``archive.py``).

Canonical columns: ``CANONICAL_COLUMNS`` (``site`` is the raw site mapped onto the ISIC 2020
vocabulary; ``patient_id`` falls back to the lesion, then to the image, when unknown). Rows that cannot
be used are returned as ``Skipped`` records with a reason, never dropped silently.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from zoome_dist.core.logs import get_logger
from zoome_dist.data.metadata import MetadataEncoding

ISIC2020_REQUIRED = ("image_name", "patient_id", "sex", "age_approx",
                     "anatom_site_general_challenge", "target")
ISIC2019_GT_REQUIRED = ("image", "MEL")
ISIC2019_META_REQUIRED = ("image", "age_approx", "anatom_site_general", "sex")
ISIC2019_META_NAME = "ISIC_2019_Training_Metadata.csv"
CANONICAL_COLUMNS = ["image_name", "patient_id", "lesion_id", "sex", "age_approx", "anatom_site", "site",
                     "target", "diagnosis", "fitzpatrick_skin_type", "source", "attribution", "copyright_license"]
# optional columns carried from any layout that has them (ISIC 2024, the Archive)
OPTIONAL_COLUMNS = ("lesion_id", "fitzpatrick_skin_type", "attribution", "copyright_license")
UNKNOWN_IDS = frozenset({"", "-1", "nan", "none", "null", "na", "n/a", "unknown"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


@dataclass
class Skipped:
    """A row or sample left out of the shards, and why."""

    image_name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"image_name": self.image_name, "reason": self.reason}

log = get_logger(__name__)


@dataclass
class ReadResult:
    table: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)
    unknown_sites: Counter = field(default_factory=Counter)
    source: str = ""
    no_metadata: list[str] = field(default_factory=list)  # kept rows that had no metadata row (ISIC 2019)


def _read_csv(path: Path, required: tuple[str, ...], bad_lines: list[list[str]]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")

    def on_bad(fields: list[str]) -> None:
        bad_lines.append(fields)
        return None

    df = read_csv_text(path, dtype=str, keep_default_na=False, on_bad_lines=on_bad, engine="python")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; found {list(df.columns)}")
    short = df.isna().any(axis=1)  # a row with too few fields: pandas fills the rest with NaN
    for rec in df[short].to_dict("records"):
        fields = [v for v in rec.values() if isinstance(v, str)]
        bad_lines.append(fields)
    return df[~short].reset_index(drop=True)


def read_csv_text(path: Path, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` whose failures on an empty, non-UTF-8 or malformed file are one-line
    ``ValueError``s naming the file."""
    try:
        return pd.read_csv(path, encoding="utf-8", **kwargs)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty CSV file (no header row)") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                         "save the CSV as UTF-8") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{path}: malformed CSV ({str(e).strip().splitlines()[0]})") from None


def strip_image_ext(name: str) -> str:
    """An image key from a CSV cell that may carry the file's extension (``.jpg``, ``.jpeg``, ``.png``)."""
    return re.sub(r"\.(jpe?g|png)$", "", name.strip(), flags=re.IGNORECASE)


def check_image_name(name: str) -> str | None:
    """Reason why ``name`` cannot be an image key (path escapes, WebDataset separators), or None."""
    if not name:
        return "empty image name"
    if "/" in name or "\\" in name or ".." in name:
        return f"unsafe image name {name!r} (could escape the images folder)"
    if not _SAFE_NAME.match(name):
        return (f"image name {name!r} has characters other than letters, digits, '_' and '-' "
                "('.' would split the WebDataset key)")
    return None


def parse_target(raw: object) -> int | None:
    """A ground-truth label: exactly 0 or 1 (``"1"``, ``"1.0"``, ``1``); anything else is None."""
    try:
        value = float(str(raw).strip())
    except ValueError:
        return None
    return int(value) if value in (0.0, 1.0) else None


def parse_age(raw: str) -> float | None:
    """``age_approx``: NaN when blank (unknown), None when not a finite age in 0..120."""
    raw = raw.strip()
    if raw == "":
        return math.nan
    try:
        age = float(raw)
    except ValueError:
        return None
    if not (0 <= age <= 120):
        return None
    return age


def known_id(raw: object) -> str:
    """A patient or lesion id, or "" when the CSV marks it unknown (blank, ``-1``, ``NaN`` ...): unknown
    ids never pool rows into one giant "patient"."""
    value = "" if raw is None else str(raw).strip()
    return "" if value.lower() in UNKNOWN_IDS else value


def _finish(rows: list[dict], skipped: list[Skipped], path: Path, enc: MetadataEncoding,
            source: str) -> ReadResult:
    unknown = Counter()
    for r in rows:
        if r.get("site"):  # mapped by the reader (the Archive's hierarchical sites)
            continue
        site, ok = enc.canonical_site(r["anatom_site"])
        if not ok:
            unknown[str(r["anatom_site"])] += 1
        r["site"] = site
    table = pd.DataFrame(rows, columns=CANONICAL_COLUMNS)
    dup = table["image_name"][table["image_name"].duplicated()].unique().tolist()
    if dup:
        shown = ", ".join(dup[:10]) + (" ..." if len(dup) > 10 else "")
        raise ValueError(f"{path}: {len(dup)} duplicate image name(s): {shown}")
    table = table.sort_values("image_name", kind="stable").reset_index(drop=True)
    return ReadResult(table=table, skipped=skipped, unknown_sites=unknown, source=source)


def _row(name: str, patient: str, sex: str, age_raw: str, site: str, target: int, diagnosis: str,
         source: str, skipped: list[Skipped], extra: dict | None = None) -> dict | None:
    """One canonical row, or None (and a ``Skipped`` record). ``extra``: the optional columns
    (``OPTIONAL_COLUMNS``) and a pre-mapped ``site``."""
    name = strip_image_ext(name)
    why = check_image_name(name)
    if why:
        skipped.append(Skipped(name, why))
        return None
    age = parse_age(age_raw)
    if age is None:
        skipped.append(Skipped(name, f"malformed age_approx {age_raw!r}"))
        return None
    extra = {k: str(v).strip() for k, v in (extra or {}).items()}
    lesion = known_id(extra.pop("lesion_id", ""))
    return {"image_name": name, "patient_id": known_id(patient) or lesion or name, "lesion_id": lesion,
            "sex": sex.strip(), "age_approx": age, "anatom_site": site.strip(), "target": target,
            "diagnosis": diagnosis.strip(), "source": source, "site": "",
            **{c: "" for c in OPTIONAL_COLUMNS if c != "lesion_id"}, **extra}


def optional_fields(rec: dict) -> dict:
    """The ``OPTIONAL_COLUMNS`` a CSV row has."""
    return {c: rec[c] for c in OPTIONAL_COLUMNS if c in rec}


def _bad_line_records(bad: list[list[str]], path: Path) -> list[Skipped]:
    return [Skipped(str(f[0]) if f else "", f"malformed CSV row in {path.name}: {len(f)} fields "
                    f"{','.join(map(str, f))[:120]!r}") for f in bad]


def read_isic2020(path: str | Path, enc: MetadataEncoding | None = None) -> ReadResult:
    """Kaggle SIIM-ISIC 2020 ``train.csv``."""
    path, enc = Path(path), enc or MetadataEncoding()
    bad: list[list[str]] = []
    df = _read_csv(path, ISIC2020_REQUIRED, bad)
    skipped = _bad_line_records(bad, path)
    rows = []
    has_diag = "diagnosis" in df.columns
    for rec in df.to_dict("records"):
        tgt = parse_target(rec["target"])
        if tgt is None:
            skipped.append(Skipped(rec["image_name"].strip(), f"invalid target {rec['target'].strip()!r} "
                                   "(expected 0 or 1)"))
            continue
        row = _row(rec["image_name"], rec["patient_id"], rec["sex"], rec["age_approx"],
                   rec["anatom_site_general_challenge"], tgt,
                   rec["diagnosis"] if has_diag else "", "isic2020", skipped, optional_fields(rec))
        if row:
            rows.append(row)
    return _finish(rows, skipped, path, enc, "isic2020")


def read_isic2019(gt_path: str | Path, meta_path: str | Path | None = None,
                  enc: MetadataEncoding | None = None) -> ReadResult:
    """ISIC 2019 ground truth (one-hot, MEL → target 1) + metadata; lesion_id stands in for patient."""
    gt_path, enc = Path(gt_path), enc or MetadataEncoding()
    meta_path = Path(meta_path) if meta_path else gt_path.parent / ISIC2019_META_NAME
    bad: list[list[str]] = []
    gt = _read_csv(gt_path, ISIC2019_GT_REQUIRED, bad)
    skipped = _bad_line_records(bad, gt_path)
    bad = []
    meta = _read_csv(meta_path, ISIC2019_META_REQUIRED, bad)
    skipped += _bad_line_records(bad, meta_path)
    meta_by_image = {r["image"].strip(): r for r in meta.to_dict("records")}
    names = [str(n).strip() for n in gt["image"]]
    unmatched = [n for n in names if n not in meta_by_image]
    if names and len(unmatched) > 0.1 * len(names):  # ISIC's own files match every image
        raise ValueError(f"{meta_path}: {len(names) - len(unmatched)} of the {len(names)} images of {gt_path} are in "
                         f"this metadata file (e.g. missing: {unmatched[0]!r}; it lists e.g. "
                         f"{next(iter(meta_by_image), 'nothing')!r}); at least 90% must be: the wrong --metadata-csv? "
                         "Without their rows images lose age, sex, site and their lesion id")
    if unmatched:
        log.warning(f"{meta_path}: {len(unmatched)} of {len(names)} images have no metadata row (e.g. {unmatched[:3]}); "
                    "they get missing age, unknown sex and site, and no lesion id (listed in the manifest's no_metadata)")
    classes = [c for c in gt.columns if c != "image"]
    rows = []
    for rec in gt.to_dict("records"):
        name = rec["image"].strip()
        try:
            onehot = {c: float(rec[c]) for c in classes}
        except ValueError:
            skipped.append(Skipped(name, "malformed ground-truth values"))
            continue
        if not all(0.0 <= v <= 1.0 for v in onehot.values()):  # nan fails this too
            skipped.append(Skipped(name, f"ground-truth values outside [0, 1]: "
                                         f"{ {c: v for c, v in onehot.items() if not 0.0 <= v <= 1.0} }"))
            continue
        diagnosis = max(onehot, key=onehot.get)
        m = meta_by_image.get(name, {})
        row = _row(name, "", m.get("sex", ""), m.get("age_approx", ""),
                   m.get("anatom_site_general", ""), int(onehot["MEL"] >= 0.5), diagnosis,
                   "isic2019", skipped, {"lesion_id": m.get("lesion_id", "")})
        if row:
            rows.append(row)
    result = _finish(rows, skipped, gt_path, enc, "isic2019")
    result.no_metadata = sorted(set(unmatched) & set(result.table["image_name"]))
    return result


def read_isic(csv: str | Path, metadata_csv: str | Path | None = None,
              enc: MetadataEncoding | None = None) -> ReadResult:
    """Detect the layout from the header (``LAYOUTS``) and read it."""
    from zoome_dist.data import archive

    csv = Path(csv)
    if not csv.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv}")
    kind = detect_layout(csv)
    if kind == "isic2020":
        return read_isic2020(csv, enc)
    if kind == "isic2019":
        return read_isic2019(csv, metadata_csv, enc)
    if kind == "isic2024":
        return archive.read_isic2024(csv, enc)
    return archive.read_archive(csv, enc)


LAYOUTS = {"isic2020": "Kaggle ISIC 2020 train.csv (image_name, patient_id, sex, age_approx, "
                       "anatom_site_general_challenge, target)",
           "isic2019": "ISIC 2019 ground truth (image, MEL, ... one-hot) + ISIC_2019_Training_Metadata.csv",
           "isic2024": "ISIC 2024 train-metadata.csv (isic_id, patient_id, iddx_1..5, ...; melanoma from iddx)",
           "archive": "ISIC Archive metadata.csv from `isic image download` (isic_id, diagnosis_1..5, ...)"}


def detect_layout(csv: Path) -> str:
    """Which of ``LAYOUTS`` a CSV is, from its header."""
    header = set(read_csv_text(csv, nrows=0).columns)
    if "image_name" in header:
        return "isic2020"
    if {"image", "MEL"} <= header:
        return "isic2019"
    if {"isic_id", "target"} <= header:
        return "isic2024"
    if "isic_id" in header:
        return "archive"
    raise ValueError(f"{csv}: not a layout zoome-shards reads; found columns {sorted(header)}. Layouts: "
                     + "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items()))
