"""The ISIC Archive download layout (``isic image download OUT/``) and ISIC 2024 (SLICE-3D) → the
canonical table of ``tables.py``.

The vocabulary below is the official one of the ``isic-metadata`` package (6.1.0: ``DiagnosisEnum``,
``AnatomSiteEnum``, ``AnatomSiteSpecialEnum``), as ``isic-cli`` (12.7) writes it to ``metadata.csv``:
``isic_id, attribution, copyright_license`` then the sorted clinical/acquisition fields, diagnoses and
sites split over ``diagnosis_1..5`` and ``anatom_site_1..5`` (levels of one colon-separated path).
We do not depend on either package (they need Python ≥ 3.12); this module is the one place that reads
their vocabulary.
"""
from __future__ import annotations

import re
from pathlib import Path

from zoome_dist.data.metadata import MetadataEncoding
from zoome_dist.data.tables import (ReadResult, Skipped, bad_line_records, finish, known_id, make_row, optional_fields,
                                    read_csv)

ARCHIVE_REQUIRED = ("isic_id",)
ISIC2024_REQUIRED = ("isic_id", "patient_id", "age_approx", "sex", "anatom_site_general")

# The target: melanoma = diagnosis_1 "Malignant" and diagnosis_2 this class (every melanoma subtype, in
# situ, invasive, metastasis and NOS, sits below it). Skipped (the label is unknown): "Indeterminate",
# "Malignant" without its level-2 class, no diagnosis. ISIC 2024's iddx_1..5 are the same hierarchy.
MALIGNANT = "Malignant"
MELANOMA = "Malignant melanocytic proliferations (Melanoma)"
INDETERMINATE = "Indeterminate"
DIAGNOSIS_LEVELS = tuple(f"diagnosis_{i}" for i in range(1, 6))
LEVEL1 = ("Benign", MALIGNANT, INDETERMINATE)  # diagnosis_1's whole vocabulary
# Older downloads: a flat ``diagnosis`` column (with ``benign_malignant``), the Archive's vocabulary
# before the hierarchy. Melanoma: the melanoma family; 0: every other diagnosis it used; None: undecided.
LEGACY_MELANOMA = re.compile(r"\bmelanoma\b")  # melanoma, melanoma metastasis, melanoma in situ, ...
LEGACY_NOT_MELANOMA = frozenset({
    "nevus", "nevus spilus", "seborrheic keratosis", "pigmented benign keratosis", "lichenoid keratosis",
    "solar lentigo", "lentigo nos", "lentigo simplex", "cafe-au-lait macule", "actinic keratosis",
    "basal cell carcinoma", "squamous cell carcinoma", "dermatofibroma", "vascular lesion", "angioma",
    "angiokeratoma", "angiofibroma or fibrous papule", "pyogenic granuloma", "clear cell acanthoma",
    "acrochordon", "neurofibroma", "verruca", "scar", "mucosal melanosis"})
LEGACY_UNCERTAIN = frozenset({"atypical melanocytic proliferation", "aimp", "atypical spitz tumor"})
LEGACY_OPEN = frozenset({"unknown", "other", ""})  # decided by benign_malignant alone: benign → 0

# Sites: the hierarchical path (anatom_site_1:anatom_site_2:...) onto the ISIC 2020 vocabulary of
# ``metadata.SITE_VOCAB``; the longest matching prefix wins. ``anatom_site_special`` overrides it.
SITE_LEVELS = tuple(f"anatom_site_{i}" for i in range(1, 6))
ARCHIVE_SITES = {
    "Head and neck": "head/neck",
    "Head and neck:Head:Face:Mouth": "oral/genital",
    "Trunk": "torso",
    "Upper extremity": "upper extremity",
    "Upper extremity:Hand:Palm of hand": "palms/soles",
    "Lower extremity": "lower extremity",
    "Lower extremity:Foot:Sole of foot": "palms/soles",
    "Anogenital region": "oral/genital",
}
SPECIAL_SITES = {"acral palms or soles": "palms/soles", "oral or genital": "oral/genital"}


def hierarchy_target(levels: list[str]) -> tuple[int | None, str, str]:
    """``(target, diagnosis path, reason)`` from the diagnosis levels 1..5; target None (with the reason)
    when they cannot decide melanoma or not."""
    levels = [str(v).strip() for v in levels]
    path = ":".join(v for v in levels if v)
    if not levels[0]:
        return None, "", "no diagnosis"
    if levels[0] not in LEVEL1:
        return None, path, f"diagnosis_1 {levels[0]!r} is not in ISIC's vocabulary {list(LEVEL1)}"
    if levels[0] == INDETERMINATE:
        return None, path, f"indeterminate diagnosis (neither melanoma nor benign): {path}"
    if levels[0] == MALIGNANT and not levels[1]:
        return None, path, "malignant without its class (diagnosis level 2 empty): melanoma or not is unknown"
    return int(levels[0] == MALIGNANT and levels[1] == MELANOMA), path, ""


def archive_target(rec: dict) -> tuple[int | None, str, str]:
    """``(target, diagnosis path, reason)`` of an Archive row: the hierarchy (``diagnosis_1..5``), else
    the flat ``diagnosis`` of older downloads (with ``benign_malignant``)."""
    if str(rec.get(DIAGNOSIS_LEVELS[0], "")).strip():
        return hierarchy_target([rec.get(c, "") for c in DIAGNOSIS_LEVELS])
    legacy = str(rec.get("diagnosis", "")).strip()
    key = legacy.lower()
    bm = str(rec.get("benign_malignant", "")).strip().lower()
    if not legacy and not bm:
        return None, "", "no diagnosis (diagnosis_1 and diagnosis are empty)"
    if LEGACY_MELANOMA.search(key):
        if bm == "benign":
            return None, legacy, f"diagnosis {legacy!r} but benign_malignant 'benign': contradictory"
        return 1, legacy, ""
    if key in LEGACY_UNCERTAIN:
        return None, legacy, f"diagnosis {legacy!r}: melanoma or not is undecided"
    if key in LEGACY_OPEN:
        if bm == "benign":
            return 0, legacy, ""
        return None, legacy, f"diagnosis {legacy or '(empty)'} with benign_malignant {bm or '(empty)'}: melanoma or not is unknown"
    if key in LEGACY_NOT_MELANOMA:
        if key == "nevus" and bm == "malignant":
            return None, legacy, "diagnosis 'nevus' but benign_malignant 'malignant': contradictory"
        return 0, legacy, ""
    return None, legacy, f"diagnosis {legacy!r} is not in the ISIC vocabulary: melanoma or not is unknown"


def archive_site(rec: dict, enc: MetadataEncoding) -> tuple[str, str, bool]:
    """``(site path as given, site in our vocabulary, recognised)`` of an Archive row."""
    path = ":".join(v for v in (str(rec.get(c, "")).strip() for c in SITE_LEVELS) if v)
    special = str(rec.get("anatom_site_special", "")).strip()
    if special in SPECIAL_SITES:
        return path or special, SPECIAL_SITES[special], True
    if path:
        parts = path.split(":")
        for n in range(len(parts), 0, -1):
            site = ARCHIVE_SITES.get(":".join(parts[:n]))
            if site:
                return path, site, True
        return path, "unknown", False
    general = str(rec.get("anatom_site_general", "")).strip()  # older downloads
    site, ok = enc.canonical_site(general)
    return general, site, ok


def read_archive(path: str | Path, enc: MetadataEncoding | None = None) -> ReadResult:
    """An ISIC Archive ``metadata.csv``; patient = ``patient_id``, else ``lesion_id``, else the image."""
    path, enc = Path(path), enc or MetadataEncoding()
    bad: list[list[str]] = []
    df = read_csv(path, ARCHIVE_REQUIRED, bad)
    if not ({*DIAGNOSIS_LEVELS, "diagnosis"} & set(df.columns)):
        raise ValueError(f"{path}: an ISIC Archive metadata.csv without diagnoses (no diagnosis_1..5 nor "
                         f"diagnosis column): the melanoma target cannot be derived; found {list(df.columns)}")
    skipped = bad_line_records(bad, path)
    rows = []
    for rec in df.to_dict("records"):
        name = rec["isic_id"].strip()
        target, diagnosis, why = archive_target(rec)
        if target is None:
            skipped.append(Skipped(name, why))
            continue
        raw_site, site, ok = archive_site(rec, enc)
        # an unrecognised site is left to _finish, which maps it to "unknown" and counts it like any layout's
        row = make_row(name, rec.get("patient_id", ""), rec.get("sex", ""), rec.get("age_approx", ""), raw_site,
                   target, diagnosis, "archive", skipped, {**optional_fields(rec), "site": site if ok else ""})
        if row:
            rows.append(row)
    return finish(rows, skipped, path, enc, "archive")


ISIC2024_LEVELS = tuple(f"iddx_{i}" for i in range(1, 6))


def read_isic2024(path: str | Path, enc: MetadataEncoding | None = None) -> ReadResult:
    """ISIC 2024 (SLICE-3D) ``train-metadata.csv``. Its ``target`` means *malignant* (mostly basal and
    squamous cell carcinomas), so the melanoma target comes from the diagnosis hierarchy ``iddx_1..5``
    (the Archive's vocabulary and rule, ``hierarchy_target``); a CSV without ``iddx_1`` is refused.
    Sites are in the 2020 vocabulary already."""
    path, enc = Path(path), enc or MetadataEncoding()
    bad: list[list[str]] = []
    df = read_csv(path, ISIC2024_REQUIRED, bad)
    skipped = bad_line_records(bad, path)
    rows = []
    if ISIC2024_LEVELS[0] not in df.columns:
        raise ValueError(f"{path}: no iddx_1..5 columns. ISIC 2024's `target` means malignant, not melanoma; the "
                         "melanoma label comes from the diagnosis hierarchy iddx_1..5 of the official "
                         "train-metadata.csv")
    for rec in df.to_dict("records"):
        name = rec["isic_id"].strip()
        target, diagnosis, why = hierarchy_target([rec.get(c, "") for c in ISIC2024_LEVELS])
        if target is None:
            skipped.append(Skipped(name, why))
            continue
        row = make_row(name, known_id(rec["patient_id"]), rec["sex"], rec["age_approx"], rec["anatom_site_general"],
                   target, diagnosis, "isic2024", skipped, optional_fields(rec))
        if row:
            rows.append(row)
    return finish(rows, skipped, path, enc, "isic2024")
