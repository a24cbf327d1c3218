"""Cross-validation reports: Table-I-style mean ± std, per-fold rows, pooled out-of-fold ROC."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = [("acc", "ACC"), ("sens", "SE"), ("spec", "SP"), ("auc", "AUC")]
EXTRA = [("acc_oof", "ACC@oof"), ("sens_oof", "SE@oof"), ("spec_oof", "SP@oof"),
         ("acc_t", "ACC@t"), ("sens_t", "SE@t"), ("spec_t", "SP@t"), ("sens_at_spec90", "SE@SP90"),
         ("pauc_sens80", "pAUC@SE80"), ("ece", "ECE")]


def table_markdown(folds: pd.DataFrame) -> str:
    """Mean ± std (%) over folds per variant; ``folds`` has one row per (variant, fold)."""
    cols = (COLUMNS + [c for c in EXTRA if c[0] in folds.columns]
            + [(c, f"AUC {c[4:]}") for c in folds.columns if c.startswith("auc:")])  # per source
    lines = ["| method | folds | " + " | ".join(h for _, h in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for variant, part in folds.groupby("variant", sort=False):
        cells = []
        for key, _ in cols:
            v = 100 * part[key].astype(float)
            cells.append(f"{v.mean():.2f}±{v.std(ddof=1) if len(v) > 1 else 0:.2f}")
        lines.append(f"| {variant} | {len(part)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_roc(predictions: dict[str, pd.DataFrame], path: str | Path) -> None:
    """One pooled out-of-fold ROC curve per variant (``target``, ``prob`` columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    for variant, df in predictions.items():
        fpr, tpr, _ = roc_curve(df["target"], df["prob"])
        ax.plot(fpr, tpr, label=f"{variant} (AUC {roc_auc_score(df['target'], df['prob']):.3f}, n={len(df)})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title="Pooled out-of-fold ROC",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(runs: dict[str, list[dict]], path: str | Path) -> None:
    """Training curves, one line per run (label → its metrics records): training loss, validation
    AUC and learning rate per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=110)
    for label, records in runs.items():
        epochs = [r["epoch"] for r in records]
        for ax, key in zip(axes, ("train_loss", "val_auc", "lr")):
            ax.plot(epochs, [r[key] for r in records], "-o", ms=3, label=label)
    for ax, title in zip(axes, ("training loss", "validation AUC", "learning rate (end of epoch)")):
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def pooled(predictions: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat(predictions, ignore_index=True)
    if df["image_name"].duplicated().any():
        raise ValueError("an image appears in two folds' predictions")
    return df


def fold_rows(variant: str, fold: int, metrics: dict) -> dict:
    return {"variant": variant, "fold": fold, **{k: v for k, v in metrics.items() if np.isscalar(v)}}
