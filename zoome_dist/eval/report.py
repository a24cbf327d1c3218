"""Cross-validation reports: Table-I-style mean ± std, per-fold rows, pooled out-of-fold ROC."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from zoome_dist.core.rundir import RunDir, fold_dir
from zoome_dist.eval.plots import figure

COLUMNS = [("acc", "ACC"), ("sens", "SE"), ("spec", "SP"), ("auc", "AUC")]
EXTRA = [("acc_oof", "ACC@oof"), ("sens_oof", "SE@oof"), ("spec_oof", "SP@oof"),
         ("acc_t", "ACC@t"), ("sens_t", "SE@t"), ("spec_t", "SP@t"), ("sens_at_spec90", "SE@SP90"),
         ("pauc_sens80", "pAUC@SE80"), ("ece", "ECE")]


def mean_std(values: pd.Series) -> str:
    """``mean±std`` in % of fractions: the sample std over folds (ddof 1), 0 for a single fold."""
    v = 100 * values.astype(float)
    return f"{v.mean():.2f}±{v.std(ddof=1) if len(v) > 1 else 0:.2f}"


def table_markdown(folds: pd.DataFrame) -> str:
    """Mean ± std (%) over folds per variant; ``folds`` has one row per (variant, fold)."""
    cols = (COLUMNS + [c for c in EXTRA if c[0] in folds.columns]
            + [(c, f"AUC {c[4:]}") for c in folds.columns if c.startswith("auc:")])  # per source
    lines = ["| method | folds | " + " | ".join(h for _, h in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for variant, part in folds.groupby("variant", sort=False):
        cells = [mean_std(part[key]) for key, _ in cols]
        lines.append(f"| {variant} | {len(part)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_roc(predictions: dict[str, pd.DataFrame], path: str | Path) -> None:
    """One pooled out-of-fold ROC curve per variant (``target``, ``prob`` columns)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    with figure(path, figsize=(5, 5), dpi=120) as (fig, ax):
        for variant, df in predictions.items():
            fpr, tpr, _ = roc_curve(df["target"], df["prob"])
            ax.plot(fpr, tpr, label=f"{variant} (AUC {roc_auc_score(df['target'], df['prob']):.3f}, n={len(df)})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="Pooled out-of-fold ROC",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=7)


def plot_curves(runs: dict[str, list[dict]], path: str | Path) -> None:
    """Training curves, one line per run (label → its metrics records): training loss, validation
    AUC and learning rate per epoch."""
    from matplotlib.ticker import MaxNLocator

    with figure(path, 1, 3, figsize=(12, 3.6), dpi=110) as (fig, axes):
        for label, records in runs.items():
            epochs = [r["epoch"] for r in records]
            for ax, key in zip(axes, ("train_loss", "val_auc", "lr")):
                ax.plot(epochs, [r[key] for r in records], "-o", ms=3, label=label)
        for ax, title in zip(axes, ("training loss", "validation AUC", "learning rate (end of epoch)")):
            ax.set(xlabel="epoch", title=title)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)


def pooled(predictions: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat(predictions, ignore_index=True)
    if df["image_name"].duplicated().any():
        raise ValueError("an image appears in two folds' predictions")
    return df


def fold_rows(variant: str, fold: int, metrics: dict) -> dict:
    return {"variant": variant, "fold": fold, **{k: v for k, v in metrics.items() if np.isscalar(v)}}


def cv_report(out: Path, variants: list[str], folds: list[int], select: str) -> str:
    """The CV's tables, ROC and curves from its finished run folders; returns the markdown table."""
    from zoome_dist.eval.calibration import cross_fit_thresholds, fit, plot_reliability, stamp_checkpoint
    from zoome_dist.eval.subgroups import auc_by_source, subgroup_markdown, subgroup_metrics

    rows, preds, curves = [], {v: [] for v in variants}, {}
    for variant in variants:
        runs = {fold: RunDir(fold_dir(out, variant, fold)) for fold in folds}
        fold_preds = {fold: pd.read_csv(run.predictions(select), keep_default_na=False, na_values=[""])
                      for fold, run in runs.items()}
        honest = cross_fit_thresholds(fold_preds)
        for fold, run in runs.items():
            curves[f"{variant} fold {fold}"] = run.read_metrics()
            rows.append({**fold_rows(variant, fold, run.fold_metrics(select)), **honest.get(fold, {}),
                         **{f"auc:{src}": auc for src, auc in auc_by_source(fold_preds[fold]).items()}})
        preds[variant] = list(fold_preds.values())
        calibration = {**fit(pooled(preds[variant])), "select": select, "folds": folds,
                       "fit_on": f"pooled out-of-fold predictions of {len(folds)} fold(s), {select} epoch"}
        (out / variant / "calibration.json").write_text(json.dumps(calibration, indent=1))
        for run in runs.values():
            model = run.model(select)
            if model.is_file():
                stamp_checkpoint(model, calibration)
    table = pd.DataFrame(rows)
    table.to_csv(out / "folds.csv", index=False)
    md = table_markdown(table)
    (out / "table.md").write_text(md)
    summary_rows = table.drop(columns=["fold"]).groupby("variant", sort=False).agg(["mean", "std"])
    summary_rows.columns = [f"{k}_{s}" for k, s in summary_rows.columns]
    summary_rows.to_csv(out / "table.csv")
    pooled_preds = {v: pooled(ps) for v, ps in preds.items()}
    plot_roc(pooled_preds, out / "roc.png")
    plot_reliability(pooled_preds, out / "calibration.png")
    plot_curves(curves, out / "curves.png")
    groups = {v: subgroup_metrics(p) for v, p in pooled_preds.items()}
    pd.concat([g.assign(variant=v) for v, g in groups.items()]).to_csv(out / "subgroups.csv", index=False)
    (out / "subgroups.md").write_text("Pooled out-of-fold AUC per subgroup (% ; – where a subgroup has one class)\n\n"
                                      + subgroup_markdown(groups))
    return md
