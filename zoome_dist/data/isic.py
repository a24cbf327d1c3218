"""ISIC 2020 / 2019 CSVs → the canonical table of ``tables.py`` (the ISIC Archive and ISIC 2024 layouts:
``archive.py``), and which layout a CSV is."""
from __future__ import annotations

from pathlib import Path

from zoome_dist.core.logs import get_logger
from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.tables import (ReadResult, Skipped, bad_line_records, finish, make_row, optional_fields,
                                    parse_target, read_csv, read_csv_text)

log = get_logger(__name__)

ISIC2020_REQUIRED = ("image_name", "patient_id", "sex", "age_approx",
                     "anatom_site_general_challenge", "target")
ISIC2019_GT_REQUIRED = ("image", "MEL")
ISIC2019_META_REQUIRED = ("image", "age_approx", "anatom_site_general", "sex")
ISIC2019_META_NAME = "ISIC_2019_Training_Metadata.csv"



def read_isic2020(path: str | Path, enc: MetadataEncoding | None = None) -> ReadResult:
    """Kaggle SIIM-ISIC 2020 ``train.csv``."""
    path, enc = Path(path), enc or MetadataEncoding()
    bad: list[list[str]] = []
    df = read_csv(path, ISIC2020_REQUIRED, bad)
    skipped = bad_line_records(bad, path)
    rows = []
    has_diag = "diagnosis" in df.columns
    for rec in df.to_dict("records"):
        tgt = parse_target(rec["target"])
        if tgt is None:
            skipped.append(Skipped(rec["image_name"].strip(), f"invalid target {rec['target'].strip()!r} "
                                   "(expected 0 or 1)"))
            continue
        row = make_row(rec["image_name"], rec["patient_id"], rec["sex"], rec["age_approx"],
                   rec["anatom_site_general_challenge"], tgt,
                   rec["diagnosis"] if has_diag else "", "isic2020", skipped, optional_fields(rec))
        if row:
            rows.append(row)
    return finish(rows, skipped, path, enc, "isic2020")


def read_isic2019(gt_path: str | Path, meta_path: str | Path | None = None,
                  enc: MetadataEncoding | None = None) -> ReadResult:
    """ISIC 2019 ground truth (one-hot, MEL → target 1) + metadata; lesion_id stands in for patient."""
    gt_path, enc = Path(gt_path), enc or MetadataEncoding()
    meta_path = Path(meta_path) if meta_path else gt_path.parent / ISIC2019_META_NAME
    bad: list[list[str]] = []
    gt = read_csv(gt_path, ISIC2019_GT_REQUIRED, bad)
    skipped = bad_line_records(bad, gt_path)
    bad = []
    meta = read_csv(meta_path, ISIC2019_META_REQUIRED, bad)
    skipped += bad_line_records(bad, meta_path)
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
        row = make_row(name, "", m.get("sex", ""), m.get("age_approx", ""),
                   m.get("anatom_site_general", ""), int(onehot["MEL"] >= 0.5), diagnosis,
                   "isic2019", skipped, {"lesion_id": m.get("lesion_id", "")})
        if row:
            rows.append(row)
    result = finish(rows, skipped, gt_path, enc, "isic2019")
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
