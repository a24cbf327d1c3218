"""Patient-grouped, target-stratified K-fold assignment."""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold


def assign_folds(table: pd.DataFrame, n_folds: int = 10, seed: int = 0) -> np.ndarray:
    """Fold index per row: no group (``group`` column where there is one: patients joined by shared lesions
    and duplicates, ``dedup.groups``; else ``patient_id``) in two folds, positives spread as evenly as
    the groups allow."""
    if n_folds < 2:
        raise ValueError(f"--num-folds must be at least 2, got {n_folds}")
    key = "group" if "group" in table.columns else "patient_id"
    n_patients = table[key].nunique()
    if n_patients < n_folds:
        raise ValueError(f"{n_folds} folds need at least {n_folds} patients; the table has {n_patients}"
                         + (" (after joining patients that share lesions or duplicate images)" if key == "group" else ""))
    folds = np.full(len(table), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for k, (_, idx) in enumerate(splitter.split(np.zeros(len(table)), table["target"].to_numpy(),
                                                table[key].to_numpy())):
        folds[idx] = k
    return folds


def fold_summary(table: pd.DataFrame, folds: np.ndarray) -> list[dict]:
    """Samples, positives and patients per fold."""
    out = []
    for k in range(int(folds.max()) + 1):
        part = table[folds == k]
        out.append({"fold": k, "samples": int(len(part)), "positives": int(part["target"].sum()),
                    "patients": int(part["patient_id"].nunique())})
    return out
