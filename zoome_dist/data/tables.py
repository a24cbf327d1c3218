"""The canonical ISIC table every layout is read into, and the row-level rules they share.

Canonical columns: ``CANONICAL_COLUMNS`` (``site`` is the raw site mapped onto the ISIC 2020
vocabulary; ``patient_id`` falls back to the lesion, then to the image, when unknown). Rows that cannot
be used are returned as ``Skipped`` records with a reason, never dropped silently. Readers of each
layout: ``isic.py`` (Kaggle 2020, 2019), ``archive.py`` (the ISIC Archive, ISIC 2024).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from zoome_dist.data.metadata import MetadataEncoding

CANONICAL_COLUMNS = ["image_name", "patient_id", "lesion_id", "sex", "age_approx", "anatom_site", "site",
                     "target", "diagnosis", "fitzpatrick_skin_type", "source", "attribution", "copyright_license"]
# optional columns carried from any layout that has them (ISIC 2024, the Archive)
OPTIONAL_COLUMNS = ("lesion_id", "fitzpatrick_skin_type", "attribution", "copyright_license")
UNKNOWN_IDS = frozenset({"", "-1", "nan", "none", "null", "na", "n/a", "unknown"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_columns(df: pd.DataFrame, required: tuple[str, ...] | list[str], path: str | Path) -> None:
    """The one check of a CSV's header: every ``required`` column is there, or an error naming them."""
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing}; found {list(df.columns)}")


def short_rows(df: pd.DataFrame, columns: tuple[str, ...] | list[str] | None = None) -> pd.Series:
    """Rows with too few fields (pandas fills the missing ones with NaN), among ``columns`` (default all)."""
    return (df if columns is None else df[list(columns)]).isna().any(axis=1)


@dataclass
class Skipped:
    """A row or sample left out of the shards, and why."""

    image_name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"image_name": self.image_name, "reason": self.reason}

@dataclass
class ReadResult:
    table: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)
    unknown_sites: Counter = field(default_factory=Counter)
    source: str = ""
    no_metadata: list[str] = field(default_factory=list)  # kept rows that had no metadata row (ISIC 2019)


def read_csv(path: Path, required: tuple[str, ...], bad_lines: list[list[str]]) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")

    def on_bad(fields: list[str]) -> None:
        bad_lines.append(fields)
        return None

    df = read_csv_text(path, dtype=str, keep_default_na=False, on_bad_lines=on_bad, engine="python")
    check_columns(df, required, path)
    short = short_rows(df)
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


def finish(rows: list[dict], skipped: list[Skipped], path: Path, enc: MetadataEncoding,
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


def make_row(name: str, patient: str, sex: str, age_raw: str, site: str, target: int, diagnosis: str,
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


def bad_line_records(bad: list[list[str]], path: Path) -> list[Skipped]:
    return [Skipped(str(f[0]) if f else "", f"malformed CSV row in {path.name}: {len(f)} fields "
                    f"{','.join(map(str, f))[:120]!r}") for f in bad]
