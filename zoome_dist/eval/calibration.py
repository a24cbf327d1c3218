"""Operating point and calibration fitted on out-of-fold predictions, never on the fold being scored.

- **Per-fold threshold** (``cross_fit_thresholds``): fold k is scored at the Youden threshold of the
  pooled out-of-fold predictions of the *other* folds. Those predictions come from models that saw
  fold k in training, but no label of fold k chooses fold k's threshold.
- **Final threshold and temperature** (``fit``): Youden threshold and temperature scaling (one T
  minimising the log loss of ``sigmoid(logit(p) / T)``) on all pooled out-of-fold predictions; ``zoome
  cv`` stores them in each fold's checkpoint (``calibration``) for ``zoome predict --threshold oof`` /
  ``--calibrate``. Applied to an ensemble average they assume the average is distributed like one
  fold model's output (the usual practice; an ensemble is a little sharper).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar

from zoome_dist.core.files import atomic_path
from zoome_dist.core.safe_load import safe_load
from zoome_dist.eval.metrics import at_threshold, calibration_bins, ece, youden_threshold
from zoome_dist.eval.plots import figure

EPS = 1e-7


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def apply_temperature(p: np.ndarray, temperature: float) -> np.ndarray:
    return 1 / (1 + np.exp(-logit(p) / temperature))


def fit_temperature(y: np.ndarray, p: np.ndarray) -> float:
    """The T > 0 minimising the log loss of ``sigmoid(logit(p) / T)`` (searched over log T)."""
    z, y = logit(p), np.asarray(y, dtype=np.float64)

    def nll(log_t: float) -> float:
        q = np.clip(1 / (1 + np.exp(-z / math.exp(log_t))), EPS, 1 - EPS)
        return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

    return float(math.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))


def cross_fit_thresholds(fold_preds: dict[int, pd.DataFrame]) -> dict[int, dict[str, float]]:
    """Per fold: the threshold fit on the other folds' predictions and its metrics on this fold
    (``threshold_oof, acc_oof, sens_oof, spec_oof``); empty with fewer than 2 folds."""
    if len(fold_preds) < 2:
        return {}
    out = {}
    for k, df in fold_preds.items():
        rest = pd.concat([d for j, d in fold_preds.items() if j != k])
        t = youden_threshold(rest["target"].to_numpy(), rest["prob"].to_numpy())
        m = at_threshold(df["target"].to_numpy().astype(int), df["prob"].to_numpy() >= t)
        out[k] = {"threshold_oof": t, **{f"{key}_oof": v for key, v in m.items()}}
    return out


def fit(preds: pd.DataFrame) -> dict:
    """Threshold and temperature on pooled out-of-fold predictions, with the ECE before and after."""
    y, p = preds["target"].to_numpy().astype(int), preds["prob"].to_numpy()
    t = fit_temperature(y, p)
    return {"threshold": youden_threshold(y, p), "temperature": t, "ece": ece(y, p),
            "ece_calibrated": ece(y, apply_temperature(p, t)), "n": int(len(y))}


def stamp_checkpoint(path: Path, calibration: dict) -> None:
    """Add ``calibration`` to a model file (atomically; the weights are untouched)."""
    state = safe_load(path, map_location="cpu")
    state["calibration"] = calibration
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def plot_reliability(predictions: dict[str, pd.DataFrame], path: str | Path, bins: int = 15,
                     scope: str = "pooled out-of-fold") -> None:
    """Reliability diagram per variant (mean predicted probability vs observed melanoma rate per bin),
    with its ECE and a histogram of the predictions; ``scope`` says what the predictions are (the title
    and the ECE label: pooled over folds, or one fold's)."""

    with figure(path, 2, 1, figsize=(5, 6.5), dpi=110, height_ratios=(3, 1), sharex=True) as (fig, (ax, hist)):
        edges = np.linspace(0, 1, bins + 1)
        for label, df in predictions.items():
            y, p = df["target"].to_numpy().astype(int), df["prob"].to_numpy()
            idx = calibration_bins(p, bins)
            xs = [p[idx == b].mean() for b in range(bins) if (idx == b).any()]
            ys = [y[idx == b].mean() for b in range(bins) if (idx == b).any()]
            ax.plot(xs, ys, "-o", ms=3, label=f"{label} (ECE {ece(y, p):.3f}, {scope})")
            hist.hist(p, bins=edges, histtype="step", label=label)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(ylabel="observed melanoma rate", title=f"Reliability ({scope})", xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7)
        hist.set(xlabel="predicted probability", ylabel="images")
        hist.set_yscale("log")
