"""Cross-validation reports: Table-I-style mean ± std, per-fold rows, pooled out-of-fold ROC."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from zoome_dist.core.rundir import RunDir, fold_dir
from zoome_dist.eval.html_report import write_html_report
from zoome_dist.eval.plots import figure

# The table leads with what a reader of Table I needs: discrimination, then the honest operating point
# (@oof: each fold at the Youden threshold of the other folds' out-of-fold predictions), calibration and
# per-source AUC; then the optimistic training-set threshold (@t); the 0.5 figures last.
LEAD = [("auc", "AUC"), ("pauc_sens80", "pAUC@SE80"), ("sens_oof", "SE@oof"), ("spec_oof", "SP@oof"),
        ("acc_oof", "ACC@oof"), ("sens_at_spec90", "SE@SP90"), ("ece", "ECE")]
OPTIMISTIC = [("sens_t", "SE@t"), ("spec_t", "SP@t"), ("acc_t", "ACC@t")]
AT_HALF = [("acc", "ACC@0.5"), ("sens", "SE@0.5"), ("spec", "SP@0.5")]
N_BOOT = 1000  # bootstrap resamples behind every interval of a CV report
LEGEND = ("AUC and pAUC@SE80 (ISIC partial AUC above 80 % sensitivity) need no threshold. @oof: at the "
          "Youden threshold of the other folds' out-of-fold predictions (the honest operating point); SE@SP90: "
          "sensitivity at 90 % specificity; ECE: expected calibration error of the fold; @t: at the epoch's "
          "training-set Youden threshold (optimistic); @0.5: at probability 0.5. % mean ± sample std over folds.")


def mean_std(values: pd.Series) -> str:
    """``mean±std`` in % of fractions: the sample std over folds (ddof 1); a single fold: its value alone."""
    v = 100 * values.astype(float)
    return f"{v.mean():.2f}±{v.std(ddof=1):.2f}" if len(v) > 1 else f"{v.mean():.2f}"


def table_markdown(folds: pd.DataFrame) -> str:
    """Mean ± std (%) over folds per variant; ``folds`` has one row per (variant, fold)."""
    per_source = [(c, f"AUC {c[4:]}") for c in folds.columns if c.startswith("auc:")]
    cols = [c for c in LEAD + per_source + OPTIMISTIC + AT_HALF if c[0] in folds.columns]
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


def plot_curves(runs: dict[str, list[dict]], path: str | Path,
                title: str = "Training curves, one line per fold") -> None:
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
        fig.suptitle(title, fontsize=10)


def pooled(predictions: list[pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat(predictions, ignore_index=True)
    if df["image_name"].duplicated().any():
        raise ValueError("an image appears in two folds' predictions")
    return df


def fold_rows(variant: str, fold: int, metrics: dict) -> dict:
    return {"variant": variant, "fold": fold, **{k: v for k, v in metrics.items() if np.isscalar(v)}}


def cv_report(out: Path, variants: list[str], folds: list[int], select: str) -> str:
    """The CV's tables, figures, intervals, model cards and HTML page from its finished run folders; returns the
    markdown it prints: the table, its legend and the intervals."""
    from zoome_dist.eval.calibration import cross_fit_thresholds, fit, plot_reliability, stamp_checkpoint
    from zoome_dist.eval.subgroups import auc_by_source

    rows, pooled_preds, curves = [], {}, {}
    for variant in variants:
        runs = {fold: RunDir(fold_dir(out, variant, fold)) for fold in folds}
        fold_preds = {fold: pd.read_csv(run.predictions(select), keep_default_na=False, na_values=[""])
                      for fold, run in runs.items()}
        honest = cross_fit_thresholds(fold_preds)
        for fold, run in runs.items():
            curves[f"{variant} fold {fold}"] = run.read_metrics()
            rows.append({**fold_rows(variant, fold, run.fold_metrics(select)), **honest.get(fold, {}),
                         **{f"auc:{src}": auc for src, auc in auc_by_source(fold_preds[fold]).items()}})
        pooled_preds[variant] = pooled(list(fold_preds.values()))
        calibration = {**fit(pooled_preds[variant]), "select": select, "folds": folds,
                       "fit_on": f"pooled out-of-fold predictions of {len(folds)} fold(s), {select} epoch"}
        (out / variant / "calibration.json").write_text(json.dumps(calibration, indent=1))
        for run in runs.values():
            model = run.model(select)
            if model.is_file():
                stamp_checkpoint(model, calibration)
    table = pd.DataFrame(rows)
    table.to_csv(out / "folds.csv", index=False)
    md = table_markdown(table) + "\n" + LEGEND + "\n"
    (out / "table.md").write_text(md)
    summary_rows = table.drop(columns=["fold"]).groupby("variant", sort=False).agg(["mean", "std"])
    summary_rows.columns = [f"{k}_{s}" for k, s in summary_rows.columns]
    summary_rows.to_csv(out / "table.csv")
    plot_roc(pooled_preds, out / "roc.png")
    plot_reliability(pooled_preds, out / "calibration.png")
    plot_curves(curves, out / "curves.png")
    _write_subgroups(pooled_preds, out)
    md += "\n" + write_uncertainty(pooled_preds, out)
    for variant in variants:
        write_model_card(out, variant, RunDir(fold_dir(out, variant, folds[0])))
    first = RunDir(fold_dir(out, variants[0], folds[0])).config
    write_html_report(out, variants, folds, first.read_text() if first.is_file() else "")
    return md


def write_model_card(out: Path, variant: str, run: RunDir) -> Path:
    """OUT/<variant>/MODEL_CARD.md, from the report's files, the variant's config and the shards' manifest
    (found through a fold's run.json; a data section without counts where the shards are gone)."""
    import yaml

    from zoome_dist.eval.model_card import cv_model_card

    shards = Path(json.loads(run.run_info.read_text()).get("shards", "")) if run.run_info.is_file() else None
    manifest_file = shards / "manifest.json" if shards else None
    manifest = json.loads(manifest_file.read_text()) if manifest_file and manifest_file.is_file() else {}
    config = yaml.safe_load(run.config.read_text()) if run.config.is_file() else {}
    path = out / variant / "MODEL_CARD.md"
    path.write_text(cv_model_card(out, variant, manifest, config))
    return path


def _write_subgroups(pooled_preds: dict[str, pd.DataFrame], out: Path) -> None:
    from zoome_dist.eval.subgroups import subgroup_markdown, subgroup_metrics

    groups = {v: subgroup_metrics(p, n_boot=N_BOOT) for v, p in pooled_preds.items()}
    pd.concat([g.assign(variant=v) for v, g in groups.items()]).to_csv(out / "subgroups.csv", index=False)
    (out / "subgroups.md").write_text(
        f"Pooled out-of-fold AUC per subgroup (%, [95 % bootstrap interval, {N_BOOT} stratified resamples]; – where "
        "a subgroup has one class; † fewer than 10 positives or negatives: too few to trust)\n\n"
        + subgroup_markdown(groups))


def write_uncertainty(pooled_preds: dict[str, pd.DataFrame], out: Path) -> str:
    """OUT/uncertainty.md and .csv: each variant's pooled out-of-fold AUC with its 95 % bootstrap interval,
    and every other variant against the first on the same images (paired bootstrap: ΔAUC, interval, p)."""
    from zoome_dist.eval.uncertainty import auc_interval, paired_auc_difference

    rows, lines = [], [f"Pooled out-of-fold AUC (%), 95 % stratified bootstrap interval ({N_BOOT} resamples)", "",
                       "| method | n | positives | AUC [95 % CI] |", "|---|---|---|---|"]
    for variant, p in pooled_preds.items():
        ci = auc_interval(p["target"], p["prob"], N_BOOT)
        rows.append({"variant": variant, **ci})
        lines.append(f"| {variant} | {ci['n']} | {ci['positives']} | {100 * ci['auc']:.2f} "
                     f"[{100 * ci['ci_low']:.2f}–{100 * ci['ci_high']:.2f}]{' †' if ci['few'] else ''} |")
    ref, *others = list(pooled_preds)
    if others:
        lines += ["", f"Paired against {ref} on the same images (paired bootstrap; p: two-sided, no difference)", "",
                  f"| method | ΔAUC vs {ref} [95 % CI] | p |", "|---|---|---|"]
    for variant in others:
        both = pooled_preds[ref].merge(pooled_preds[variant], on="image_name", suffixes=("_a", "_b"))
        d = paired_auc_difference(both["target_a"], both["prob_a"], both["prob_b"], N_BOOT)
        rows.append({"variant": variant, "versus": ref, **d})
        lines.append(f"| {variant} | {100 * d['delta_auc']:+.2f} [{100 * d['ci_low']:+.2f}–"
                     f"{100 * d['ci_high']:+.2f}] | {d['p_value']:.3f} |")
    pd.DataFrame(rows).to_csv(out / "uncertainty.csv", index=False)
    text = "\n".join(lines) + "\n"
    (out / "uncertainty.md").write_text(text)
    return text
