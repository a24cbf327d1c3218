"""``zoome score`` (and later ``predict``/``explain``): what a user runs after training."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from zoome_dist.metrics import binary_metrics


def _read(path: str, role: str) -> pd.DataFrame:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{role} CSV not found: {path}")
    df = pd.read_csv(path)
    key = "image_name" if "image_name" in df.columns else "image" if "image" in df.columns else None
    col = "target" if "target" in df.columns else "MEL" if "MEL" in df.columns else None
    if key is None or col is None:
        raise ValueError(f"{path}: {role} CSV needs image_name,target (or image,MEL); found {list(df.columns)}")
    dup = df[key][df[key].duplicated()].tolist()
    if dup:
        raise ValueError(f"{path}: duplicate image(s) {dup[:10]}")
    return df.rename(columns={key: "image_name", col: "value"})[["image_name", "value"]]


def score(truth_csv: str, pred_csv: str) -> dict:
    """Metrics of an ISIC-format prediction CSV against a ground-truth CSV (rows matched by image)."""
    truth, pred = _read(truth_csv, "truth"), _read(pred_csv, "prediction")
    missing = sorted(set(truth["image_name"]) - set(pred["image_name"]))
    extra = sorted(set(pred["image_name"]) - set(truth["image_name"]))
    if missing or extra:
        raise ValueError(f"rows do not match: {len(missing)} image(s) without a prediction {missing[:10]}, "
                         f"{len(extra)} prediction(s) for unknown images {extra[:10]}")
    merged = truth.merge(pred, on="image_name", suffixes=("_truth", "_pred"))
    p = merged["value_pred"].astype(float)
    if ((p < 0) | (p > 1)).any():
        raise ValueError(f"{pred_csv}: predictions must be probabilities in [0, 1]")
    m = binary_metrics(merged["value_truth"].astype(int).to_numpy(), p.to_numpy())
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zoome", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="score predictions against ground truth")
    s.add_argument("--truth", required=True, help="CSV with image_name,target (or image,MEL)")
    s.add_argument("--pred", required=True, help="CSV with image_name,target probabilities (or image,MEL)")
    s.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        m = score(a.truth, a.pred)
    except (ValueError, FileNotFoundError) as e:
        print(f"zoome {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(m))
    else:
        for k, v in m.items():
            print(f"{k:16s} {v:.4f}" if isinstance(v, float) else f"{k:16s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
