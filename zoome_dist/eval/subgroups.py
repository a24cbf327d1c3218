"""Where a model fails: AUC per data source and per subgroup (sex, age band, anatomic site, Fitzpatrick
skin type where the data has it), with counts.

Input: prediction rows with ``target``, ``prob`` and the subgroup columns the shard build writes to
``folds.csv`` (and training copies into ``predictions*.csv``). A subgroup whose rows are all of one
class has no AUC (NaN) but keeps its counts.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

SUBGROUP_COLUMNS = ("source", "sex", "age_approx", "site", "fitzpatrick_skin_type")
AGE_BANDS = ((0, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, math.inf, "75+"))


def age_band(age: object) -> str:
    try:
        value = float(age)
    except (TypeError, ValueError):
        return "unknown"
    for lo, hi, name in AGE_BANDS:
        if lo <= value < hi:
            return name
    return "unknown"


def _auc(part: pd.DataFrame) -> float:
    y = part["target"].astype(int).to_numpy()
    return float(roc_auc_score(y, part["prob"])) if 0 < y.sum() < len(y) else math.nan


def _band_order(value: str) -> int:
    names = [name for _, _, name in AGE_BANDS]
    return names.index(value) if value in names else len(names)


def subgroup_metrics(preds: pd.DataFrame, n_boot: int = 0) -> pd.DataFrame:
    """One row per (subgroup, value): ``n``, ``positives``, ``auc``; with ``n_boot`` also its bootstrap 95 %
    interval (``ci_low``, ``ci_high``) and ``few`` (fewer than ``uncertainty.FEW`` of a class). Subgroups the
    predictions lack (an old build, a layout without Fitzpatrick types) are left out; age bands in age order."""
    from zoome_dist.eval.uncertainty import auc_interval

    rows = []
    for col in SUBGROUP_COLUMNS:
        if col not in preds.columns:
            continue
        if col == "age_approx":
            key, values = "age", preds[col].map(age_band)
        else:
            key, values = col, preds[col].fillna("").astype(str).replace("", "unknown")
        if col == "fitzpatrick_skin_type" and (values == "unknown").all():
            continue
        groups = preds.groupby(values.to_numpy(), sort=True)  # age bands in age order, the others by name
        for value, part in sorted(groups, key=lambda g: _band_order(g[0]) if key == "age" else 0):
            row = {"subgroup": key, "value": value, "n": int(len(part)), "positives": int(part["target"].sum()),
                   "auc": _auc(part)}
            if n_boot and not math.isnan(row["auc"]):
                ci = auc_interval(part["target"], part["prob"], n_boot)
                row.update(ci_low=ci["ci_low"], ci_high=ci["ci_high"], few=ci["few"])
            rows.append(row)
    columns = ["subgroup", "value", "n", "positives", "auc"] + (["ci_low", "ci_high", "few"] if n_boot else [])
    return pd.DataFrame(rows, columns=columns)


def auc_by_source(preds: pd.DataFrame) -> dict[str, float]:
    """AUC per source where predictions come from more than one (e.g. the ISIC-2020-only AUC the 2020
    challenge scores, in a 2019 + 2020 build); empty otherwise."""
    if "source" not in preds.columns or preds["source"].nunique() < 2:
        return {}
    return {str(s): _auc(part) for s, part in preds.groupby("source", sort=True)}


def subgroup_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """Per variant (label → ``subgroup_metrics``): one markdown table, AUC in % (with its 95 % interval where
    computed; † marks fewer than 10 positives or negatives, whose AUC says little)."""
    lines = []
    for label, t in tables.items():
        lines += [f"### {label}", "", "| subgroup | value | n | positives | AUC |", "|---|---|---|---|---|"]
        for r in t.itertuples():
            auc = "–" if np.isnan(r.auc) else f"{100 * r.auc:.2f}"
            if "ci_low" in t.columns and not np.isnan(r.auc):
                auc += f" [{100 * r.ci_low:.1f}–{100 * r.ci_high:.1f}]" + (" †" if r.few else "")
            lines.append(f"| {r.subgroup} | {r.value} | {r.n} | {r.positives} | {auc} |")
        lines.append("")
    return "\n".join(lines)
