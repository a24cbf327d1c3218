"""The model card written with every CV report (``OUT/<variant>/MODEL_CARD.md``) and every export
(``FILE.card.md``): what the model is, what it learned from (sources, licences, attributions), how well
it does with what certainty, where it does worse, its operating point and calibration, and what it is not for.

ISIC images are published under Creative Commons licences that require attribution: the card counts the
licences and attributions of the training images (the shard manifest records both per image source)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

INTENDED_USE = ("Research on dermoscopic melanoma classification, and decision support evaluated by the user on "
                "their own population. Not a medical device, not validated for diagnosis, for clinical (non-"
                "dermoscopic) photographs, or for populations and devices unlike its training data.")
LIMITATIONS = ("- Evaluated by cross-validation on its training sources only: performance on other clinics, "
               "devices and populations is unknown until measured there.\n"
               "- ISIC collections are mostly light skin types; subgroups marked † have too few positives or "
               "negatives for their AUC to mean much.\n"
               "- The threshold and temperature were fitted on the same out-of-fold predictions the figures "
               "report; a new site should re-check its operating point.\n"
               "- Synthetic sources (`zoome-shards synth`) say nothing about melanoma: such a model is a test of "
               "the pipeline only.")


def _data_section(manifest: dict) -> list[str]:
    totals = manifest.get("totals", {})
    lines = ["## Training data", "",
             f"{totals.get('samples', '?')} images ({totals.get('positives', '?')} melanoma) of "
             f"{totals.get('patients', '?')} patients, patient-grouped into {len(manifest.get('folds', []))} folds.",
             "", "| source | kind | images | melanoma |", "|---|---|---|---|"]
    per_source = manifest.get("per_source", {})
    for src in manifest.get("sources", []):
        counts = per_source.get(src["name"], {})
        lines.append(f"| {src['name']} | {src.get('kind', '')} | {counts.get('samples', '?')} | "
                     f"{counts.get('positives', '?')} |")
    licences = {k or "not recorded": v for k, v in manifest.get("licenses", {}).items()}
    attributions = {k: v for k, v in manifest.get("attributions", {}).items() if k}
    lines += ["", "Licences of the training images: " + (", ".join(f"{k}: {v}" for k, v in licences.items()) or
                                                         "not recorded") + ".",
              f"Attributions: {len(attributions)} distinct ({sum(attributions.values())} images carry one); "
              "CC-BY images require them to be credited (the list: the shards' manifest.json, `attributions`).", ""]
    return lines


def _results_section(uncertainty: pd.DataFrame, variant: str, calibration: dict, fold_table: pd.DataFrame,
                     subgroups: pd.DataFrame) -> list[str]:
    from zoome_dist.eval.subgroups import subgroup_markdown

    own = uncertainty["variant"] == variant
    if "versus" in uncertainty:
        own &= uncertainty["versus"].isna()
    lines = ["## Results (cross-validation, out-of-fold)", ""]
    if own.any():
        r = uncertainty[own].iloc[0]
        lines.append(f"Pooled AUC {100 * r['auc']:.2f} % (95 % bootstrap interval {100 * r['ci_low']:.2f}–"
                     f"{100 * r['ci_high']:.2f}; n {int(r['n'])}, {int(r['positives'])} melanoma).")
    folds = fold_table[fold_table["variant"] == variant]
    for key, label in (("auc", "AUC"), ("sens_oof", "sensitivity at the out-of-fold threshold"),
                       ("spec_oof", "specificity at the out-of-fold threshold")):
        if key in folds and folds[key].notna().any():
            v = 100 * folds[key].astype(float)
            lines.append(f"- {label}: {v.mean():.2f} %" + (f" ± {v.std(ddof=1):.2f} over {len(v)} folds"
                                                             if len(v) > 1 else " (one fold)"))
    mine = subgroups[subgroups["variant"] == variant].drop(columns=["variant"])
    lines += ["", "## Operating point and calibration", "",
              f"- Decision threshold (Youden, on pooled out-of-fold predictions): "
              f"{calibration.get('threshold', float('nan')):.4f} (`zoome predict --threshold oof`)",
              f"- Temperature: {calibration.get('temperature', float('nan')):.3f}; expected calibration error "
              f"{100 * calibration.get('ece', float('nan')):.2f} % before, "
              f"{100 * calibration.get('ece_calibrated', float('nan')):.2f} % after (`--calibrate`)", "",
              "## Where it does worse (AUC % per subgroup, 95 % interval; † too few cases)", "",
              subgroup_markdown({variant: mine}).split("\n", 2)[-1].strip(), ""]
    return lines


def cv_model_card(out: Path, variant: str, manifest: dict, config: dict) -> str:
    """The card of ``variant`` from a finished CV report in ``out`` (its tables must be written)."""
    calibration = json.loads((out / variant / "calibration.json").read_text())
    model = config.get("model", {})
    lines = [f"# Model card: {variant}", "",
             f"ZooME family model `{variant}` (backbone {model.get('backbone', '?')}, Zoom-SE pool "
             f"{model.get('pool_size', '?')}, metadata {'used' if variant != 'zoome_no_meta' else 'not used'}), "
             f"{config.get('data', {}).get('image_size', '?')} px dermoscopy image + age, sex, anatomic site in; "
             "melanoma probability out. Trained with zoome_dist (`zoome cv`).", "",
             "## Intended use", "", INTENDED_USE, ""]
    lines += _data_section(manifest)
    lines += _results_section(pd.read_csv(out / "uncertainty.csv"), variant, calibration,
                              pd.read_csv(out / "folds.csv"), pd.read_csv(out / "subgroups.csv", keep_default_na=False,
                                                                          na_values=[""]))
    lines += ["## Known limitations", "", LIMITATIONS, ""]
    return "\n".join(lines)


def export_card(info: dict, members: list[Path]) -> str:
    """The card of an exported file: what was exported, then the card ``zoome cv`` wrote for those models
    (``MODEL_CARD.md`` of their variant folder), or what is missing without one."""
    cards = {p for m in members for p in (m.parent / "MODEL_CARD.md", m.parent.parent / "MODEL_CARD.md")
             if p.is_file()}
    threshold = info.get("threshold")
    lines = [f"# Model card: {info['file']}", "",
             f"Exported by `zoome export` as {info['format']} ({', '.join(info['files'])}): the mean probability of "
             f"{len(members)} model(s), {info['image_size']} px; temperature calibration "
             f"{'inside' if info.get('calibrated') else 'not applied'}; decision threshold "
             + (f"{threshold:.4f}" if threshold is not None else "none stored for this output") +
             f". Inputs and outputs: {info['file']}.json. Members:", ""]
    lines += [f"- {m}" for m in members] + [""]
    if len(cards) == 1:
        lines += ["The models' cross-validation card follows.", "", cards.pop().read_text().split("\n", 1)[-1]]
    else:
        lines += ["## Intended use", "", INTENDED_USE, "", "## Known limitations", "", LIMITATIONS, "",
                  "No single cross-validation card (`MODEL_CARD.md`, written by `zoome cv` per variant) was found "
                  "beside these models: their data, results with intervals, subgroups and calibration are not "
                  "documented here. Export the models of one `zoome cv` variant to include them.", ""]
    return "\n".join(lines)
