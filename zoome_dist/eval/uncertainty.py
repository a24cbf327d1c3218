"""How sure a reported AUC is: a stratified bootstrap confidence interval, and a paired bootstrap comparison of
two models scored on the same images (what a reviewer of a Table I asks before believing a 0.5-point gain).

Stratified: each resample draws the positives and the negatives apart, with replacement and in their own
numbers, so every resample has both classes and the class balance of the data. Percentile intervals."""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score

# below this many positives (or negatives) an AUC is reported with a warning: its interval is wide
FEW = 10


def _resamples(y: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` × len(y) indices, positives and negatives resampled apart."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    return np.concatenate([rng.choice(pos, (n_boot, len(pos))), rng.choice(neg, (n_boot, len(neg)))], axis=1)


def _resampled_aucs(y: np.ndarray, p: np.ndarray, idx: np.ndarray, chunk: int = 256) -> np.ndarray:
    """The AUC of every resample (a row of ``idx``, positives first), as the Mann-Whitney statistic of
    tie-averaged ranks: the value ``roc_auc_score`` gives, for all rows at once."""
    n_pos = int(y.sum())
    n_neg = idx.shape[1] - n_pos
    out = []
    for start in range(0, len(idx), chunk):
        ranks = rankdata(p[idx[start:start + chunk]], axis=1, method="average")
        out.append((ranks[:, :n_pos].sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return np.concatenate(out)


def _both_classes(y: np.ndarray) -> None:
    if not 0 < y.sum() < len(y):
        raise ValueError(f"an AUC needs both classes; got {int(y.sum())} positive(s) of {len(y)}")


def auc_interval(y, p, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """AUC with its bootstrap interval: ``auc``, ``ci_low``, ``ci_high``, ``n``, ``positives``, ``few``
    (fewer than ``FEW`` positives or negatives)."""
    y, p = np.asarray(y).astype(int), np.asarray(p, dtype=float)
    _both_classes(y)
    boots = _resampled_aucs(y, p, _resamples(y, n_boot, seed))
    tail = 100 * (1 - level) / 2
    positives = int(y.sum())
    return {"auc": float(roc_auc_score(y, p)), "ci_low": float(np.percentile(boots, tail)),
            "ci_high": float(np.percentile(boots, 100 - tail)), "n": int(len(y)), "positives": positives,
            "few": min(positives, len(y) - positives) < FEW}


def paired_auc_difference(y, p_a, p_b, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """AUC(b) − AUC(a) on the same images, with a paired bootstrap interval (the same resample for both
    models) and a two-sided p-value for "no difference" (twice the share of resampled differences on the
    other side of 0, at most 1)."""
    y = np.asarray(y).astype(int)
    p_a, p_b = np.asarray(p_a, dtype=float), np.asarray(p_b, dtype=float)
    if not len(y) == len(p_a) == len(p_b):
        raise ValueError(f"paired comparison needs one prediction per image from each model; got {len(y)} labels, "
                         f"{len(p_a)} and {len(p_b)} predictions")
    _both_classes(y)
    idx = _resamples(y, n_boot, seed)
    deltas = _resampled_aucs(y, p_b, idx) - _resampled_aucs(y, p_a, idx)
    delta = float(roc_auc_score(y, p_b) - roc_auc_score(y, p_a))
    tail = 100 * (1 - level) / 2
    if np.all(deltas == 0):
        p_value = 1.0
    else:
        p_value = float(min(1.0, 2 * min(np.mean(deltas <= 0), np.mean(deltas >= 0))))
    return {"delta_auc": delta, "ci_low": float(np.percentile(deltas, tail)),
            "ci_high": float(np.percentile(deltas, 100 - tail)), "p_value": p_value, "n": int(len(y))}
