"""The paper's reported numbers (Xing et al., ISIC 2020, 10-fold, %), for ``zoome cv --paper``.

Table I gives ACC / SE / SP / AUC as mean ± std; Table II only ACC / SE / SP means. ``resnet50`` is
compared with Table I's "Maron et al. (ResNet50)" row (Table II's ResNet50 base row, 76.86 / 79.77 /
76.84, differs a little). The paper does not say at which threshold its ACC/SE/SP were taken; we set
them beside our out-of-fold-threshold columns (``@oof``), the ones fixed before scoring.
"""
from __future__ import annotations

import pandas as pd

from zoome_dist.eval.report import mean_std

# variant → (table, {metric: "mean±std" or "mean"})
PAPER = {
    "zoome": ("I", {"acc": "84.59±2.94", "sens": "85.95±2.81", "spec": "84.63±3.03", "auc": "92.23±1.69"}),
    "zoome_no_zoomse": ("I", {"acc": "80.34±4.16", "sens": "82.30±4.77", "spec": "80.32±3.22", "auc": "86.78±2.15"}),
    "zoome_no_meta": ("I", {"acc": "84.16±2.36", "sens": "85.62±3.70", "spec": "84.44±2.32", "auc": "91.66±1.27"}),
    "resnet50": ("I", {"acc": "77.77±5.04", "sens": "81.63±6.65", "spec": "76.97±4.58", "auc": "85.57±2.13"}),
    "alexnet": ("I", {"acc": "78.50±4.61", "sens": "78.28±6.98", "spec": "76.81±4.04", "auc": "85.02±1.54"}),
    "resnet50_zoomse": ("II", {"acc": "79.39", "sens": "81.03", "spec": "79.62"}),
    "alexnet_meta": ("II", {"acc": "80.93", "sens": "79.05", "spec": "79.54"}),
}
VARIANTS = list(PAPER)  # the rows ``zoome cv --paper`` trains, in the tables' order
CONFIG = "launchers/configs/zoome.yaml"  # the paper's recipe; each variant overrides model.name


def comparison_markdown(folds: pd.DataFrame) -> str:
    """Ours (mean ± std over folds; ACC/SE/SP at the out-of-fold threshold where the CV has ≥ 2 folds,
    else at each epoch's training threshold) beside the paper's, one row per variant."""
    suffix = "_oof" if "acc_oof" in folds.columns else "_t"
    at = "@" + suffix[1:]
    lines = [f"| method | table | folds | ACC{at} ours / paper | SE{at} ours / paper | SP{at} ours / paper | "
             "AUC ours / paper |", "|---|---|---|---|---|---|---|"]
    for variant, part in folds.groupby("variant", sort=False):
        table, paper = PAPER.get(variant, ("–", {}))
        cells = [f"{mean_std(part[key + (suffix if key != 'auc' else '')])} / {paper.get(key, '–')}"
                 for key in ("acc", "sens", "spec", "auc")]
        lines.append(f"| {variant} | {table} | {len(part)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
