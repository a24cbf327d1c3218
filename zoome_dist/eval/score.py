"""``zoome score``: an ISIC-format prediction CSV against a ground-truth CSV (rows matched by image)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from zoome_dist.eval.metrics import binary_metrics


def _read(path: str, role: str) -> pd.DataFrame:
    from zoome_dist.data.tables import read_csv_text

    if not Path(path).is_file():
        raise FileNotFoundError(f"{role} CSV not found: {path}")
    df = read_csv_text(Path(path), dtype=str, keep_default_na=False)
    key = "image_name" if "image_name" in df.columns else "image" if "image" in df.columns else None
    col = "target" if "target" in df.columns else "MEL" if "MEL" in df.columns else None
    if key is None or col is None:
        raise ValueError(f"{path}: {role} CSV needs image_name,target (or image,MEL); found {list(df.columns)}")
    dup = df[key][df[key].duplicated()].tolist()
    if dup:
        raise ValueError(f"{path}: duplicate image(s) {dup[:10]}")
    return df.rename(columns={key: "image_name", col: "value"})[["image_name", "value"]]


def score(truth_csv: str, pred_csv: str, threshold: float | None = None) -> dict:
    """Metrics of an ISIC-format prediction CSV against a ground-truth CSV (rows matched by image); with
    ``threshold`` also ACC/SE/SP at it (``*_t``: the operating point, e.g. the stored out-of-fold one)."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"--threshold {threshold}: a probability in [0, 1]")
    truth, pred = _read(truth_csv, "truth"), _read(pred_csv, "prediction")
    missing = sorted(set(truth["image_name"]) - set(pred["image_name"]))
    extra = sorted(set(pred["image_name"]) - set(truth["image_name"]))
    if missing or extra:
        raise ValueError(f"rows do not match: {len(missing)} image(s) without a prediction {missing[:10]}, "
                         f"{len(extra)} prediction(s) for unknown images {extra[:10]}")
    from zoome_dist.data.tables import parse_target

    merged = truth.merge(pred, on="image_name", suffixes=("_truth", "_pred"))
    y = merged["value_truth"].map(parse_target)
    bad = merged["image_name"][y.isna()].tolist()
    if bad:
        shown = [f"{n}={v!r}" for n, v in zip(bad[:10], merged["value_truth"][y.isna()][:10])]
        raise ValueError(f"{truth_csv}: ground truth must be 0 or 1; {len(bad)} row(s) are not: {shown}")
    p = pd.to_numeric(merged["value_pred"], errors="coerce")
    bad_p = ~(p.between(0, 1))  # NaN, inf, text and out-of-range alike
    if bad_p.any():
        shown = [f"{n}={v!r}" for n, v in zip(merged["image_name"][bad_p][:10], merged["value_pred"][bad_p][:10])]
        raise ValueError(f"{pred_csv}: predictions must be probabilities in [0, 1]; {int(bad_p.sum())} row(s) "
                         f"are not: {shown}")
    return binary_metrics(y.astype(int).to_numpy(), p.to_numpy(), threshold)
