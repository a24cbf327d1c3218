"""Binary melanoma metrics (``sklearn.metrics`` underneath), as docs/paper.md defines them.

- AUC; accuracy / sensitivity / specificity at 0.5 with *positive = prob > 0.5* (as the official ISIC
  scorer) and at a threshold fit on training predictions (Youden's J, *positive = prob ≥ t*);
- sensitivity at 80/90/95% specificity (best TPR with FPR ≤ 1 − spec);
- ISIC partial AUC above 80% sensitivity: raw area under the ROC from the interpolated FPR where TPR
  reaches 0.8 up to FPR 1 (no McClish correction; a perfect ranking scores 1.0);
- average precision;
- expected calibration error (``ece``): 15 equal-width probability bins, Σ (bin share × |mean prob −
  positive rate|).
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, p = np.asarray(y).astype(int).ravel(), np.asarray(p, dtype=np.float64).ravel()
    if len(y) != len(p):
        raise ValueError(f"{len(y)} labels but {len(p)} predictions")
    if set(np.unique(y)) - {0, 1}:
        raise ValueError(f"labels must be 0/1, got {sorted(set(np.unique(y)))}")
    return y, p


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The probability threshold maximising sensitivity + specificity − 1."""
    y, p = _check(y, p)
    if y.min() == y.max():
        return 0.5
    fpr, tpr, thr = roc_curve(y, p)
    j = int(np.argmax(tpr[1:] - fpr[1:])) + 1  # skip the (0, 0) point at threshold +inf
    return float(min(thr[j], 1.0))


def at_threshold(y: np.ndarray, pos: np.ndarray) -> dict[str, float]:
    """Accuracy, sensitivity and specificity of boolean calls ``pos``."""
    tp, tn = int(np.sum(pos & (y == 1))), int(np.sum(~pos & (y == 0)))
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    return {"acc": (tp + tn) / len(y), "sens": tp / n_pos if n_pos else float("nan"),
            "spec": tn / n_neg if n_neg else float("nan")}


def sens_at_spec(fpr: np.ndarray, tpr: np.ndarray, spec: float) -> float:
    ok = fpr <= 1 - spec + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def partial_auc_above_sens(fpr: np.ndarray, tpr: np.ndarray, min_sens: float = 0.8) -> float:
    """ISIC ``auc_sens_80``: ∫ TPR dFPR from the FPR where TPR first reaches ``min_sens`` to 1."""
    i = int(np.argmax(tpr >= min_sens))
    if i == 0:
        f0 = fpr[0]
    else:
        f0 = fpr[i - 1] + (min_sens - tpr[i - 1]) * (fpr[i] - fpr[i - 1]) / (tpr[i] - tpr[i - 1])
    xs = np.concatenate([[f0], fpr[i:]])
    ys = np.concatenate([[min_sens], tpr[i:]])
    return float(np.trapezoid(ys, xs))


def calibration_bins(p: np.ndarray, bins: int = 15) -> np.ndarray:
    """Each probability's bin among ``bins`` equal-width bins of [0, 1] (1.0 in the last)."""
    return np.minimum((np.asarray(p) * bins).astype(int), bins - 1)


def ece(y: np.ndarray, p: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error over ``bins`` equal-width bins of ``p``."""
    y, p = _check(y, p)
    idx = calibration_bins(p, bins)
    total = 0.0
    for b in np.unique(idx):
        m = idx == b
        total += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(total)


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """Every metric we report; ``threshold`` (fit elsewhere on training data) adds ``*_t`` entries."""
    y, p = _check(y, p)
    if y.min() == y.max():
        raise ValueError("AUC needs both classes among the labels; got only "
                         f"{'positives' if y[0] else 'negatives'} ({len(y)} samples)")
    fpr, tpr, _ = roc_curve(y, p)
    out = {"n": int(len(y)), "positives": int(y.sum()), "auc": float(roc_auc_score(y, p)),
           "ap": float(average_precision_score(y, p)),
           "pauc_sens80": partial_auc_above_sens(fpr, tpr, 0.8), "ece": ece(y, p)}
    out.update(at_threshold(y, p > 0.5))
    for s in (80, 90, 95):
        out[f"sens_at_spec{s}"] = sens_at_spec(fpr, tpr, s / 100)
    if threshold is not None:
        out["threshold"] = float(threshold)
        out.update({f"{k}_t": v for k, v in at_threshold(y, p >= threshold).items()})
    return out
