"""Real training on synthetic data, read back from the run folders and checked independently:
the demo recipe learns, every fold trains on the other folds only, the learning rate follows the
documented schedule, the thresholds come from the data they should, and the metadata model beats
the one without metadata where only the metadata carries the label."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from zoome_dist.data.synth import synthesize
from zoome_dist.data.writer import BuildOptions, build

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "launchers" / "configs" / "demo-cpu.yaml"
pytestmark = pytest.mark.usefixtures("deepspeed_shm_op")


def zoome_cv(shards: Path, out: Path, *extra: str) -> None:
    """``zoome cv`` with the demo recipe at 32 px, one 1-core job per fold, two at a time."""
    cmd = [sys.executable, "-m", "zoome_dist.cli.cv", "--config", str(DEMO), "--shards", str(shards), "--out", str(out),
           "--set", "data.image_size=32", "--jobs", "2", "--cpus-per-job", "1", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def synthetic_shards(root: Path, n: int, seed: int, label_from: str = "image+metadata") -> Path:
    synthesize(root / "src", n, seed=seed, prevalence=0.3, size=32, progress=False, label_from=label_from)
    build(root / "src" / "train.csv", root / "src" / "jpeg" / "train", root / "shards",
          BuildOptions(folds=3, max_side=0, samples_per_shard=50), progress=False)
    return root / "shards"


@pytest.fixture(scope="module")
def demo_cv(tmp_path_factory) -> tuple[Path, Path]:
    """The demo recipe (``demo-cpu.yaml``: ZooME on resnet18, bf16, Adam 1e-3, warm-up + cosine) at
    32 px for 4 epochs, on all 3 folds of 300 synthetic images."""
    root = tmp_path_factory.mktemp("demo")
    shards = synthetic_shards(root, 300, seed=5)
    zoome_cv(shards, root / "cv", "--folds", "0-2", "--set", "train.epochs=4")
    return shards, root / "cv"


def youden(y: np.ndarray, p: np.ndarray) -> float:
    """Brute force: the cut (positive = p ≥ t) with the largest sensitivity + specificity − 1."""
    best_j, best_t = -np.inf, 0.5
    for t in sorted(set(p), reverse=True):
        j = (p[y == 1] >= t).mean() - (p[y == 0] >= t).mean()
        if j > best_j + 1e-12:
            best_j, best_t = j, t
    return float(best_t)


def test_demo_recipe_learns(demo_cv):
    _, cv = demo_cv
    folds = pd.read_csv(cv / "folds.csv")
    assert sorted(folds["fold"]) == [0, 1, 2]
    for k in range(3):  # the AUC the report shows is the AUC of the fold's own predictions
        pred = pd.read_csv(cv / "zoome" / f"fold-{k:02d}" / "predictions_last.csv")
        auc = roc_auc_score(pred["target"], pred["prob"])
        assert folds.loc[folds["fold"] == k, "auc"].item() == pytest.approx(auc)
        assert auc > 0.7, f"fold {k}: validation AUC {auc:.3f}, not clearly above chance (0.5)"
        row = folds.loc[folds["fold"] == k].iloc[0]
        y, p = pred["target"].to_numpy(), pred["prob"].to_numpy()
        assert ((p >= 0) & (p <= 1)).all(), "predictions are not probabilities"
        call = p > 0.5  # the report's 0.5 figures and ECE, recomputed from the fold's predictions
        assert (row["acc"], row["sens"], row["spec"]) == pytest.approx(
            ((call == (y == 1)).mean(), call[y == 1].mean(), 1 - call[y == 0].mean()))
        bins = np.minimum((p * 15).astype(int), 14)
        assert row["ece"] == pytest.approx(sum((bins == b).mean() * abs(p[bins == b].mean() - y[bins == b].mean())
                                               for b in np.unique(bins)))
        run = cv / "zoome" / f"fold-{k:02d}"  # the best epoch is the one of highest validation AUC
        aucs = [json.loads(line)["val_auc"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        best = json.loads((run / "best.json").read_text())
        assert best["epoch"] == int(np.argmax(aucs)) and best["metrics"]["auc"] == pytest.approx(max(aucs))
        best_pred = pd.read_csv(run / "predictions.csv")
        assert roc_auc_score(best_pred["target"], best_pred["prob"]) == pytest.approx(max(aucs))
        log = (cv / "zoome" / f"fold-{k:02d}" / "job.log").read_text()  # the run's closing line names the result
        assert f"fold {k} done in" in log and f"last epoch 3 (AUC {auc:.4f})" in log and "model_last.pt" in log
    assert folds["auc"].mean() > 0.75
    # the pooled out-of-fold AUC and its interval (uncertainty.md), from the three folds' own predictions
    pooled = pd.concat(pd.read_csv(cv / "zoome" / f"fold-{k:02d}" / "predictions_last.csv") for k in range(3))
    row = pd.read_csv(cv / "uncertainty.csv").set_index("variant").loc["zoome"]
    assert row["auc"] == pytest.approx(roc_auc_score(pooled["target"], pooled["prob"]))
    assert row["n"] == len(pooled) and row["ci_low"] < row["auc"] < row["ci_high"]
    assert f"{100 * row['auc']:.2f} [" in (cv / "uncertainty.md").read_text()


def test_every_fold_trains_on_the_other_folds_only(demo_cv):
    shards, cv = demo_cv
    table = pd.read_csv(shards / "folds.csv")
    for k in range(3):
        run = cv / "zoome" / f"fold-{k:02d}"
        others = table.loc[table["fold"] != k, "image_name"]
        assert json.loads((run / "run.json").read_text())["train_folds"] == [j for j in range(3) if j != k]
        trained = pd.read_csv(run / "predictions_train.csv")["image_name"]
        assert set(trained) <= set(others), f"fold {k} trained on its own images"
        assert len(set(others) - set(trained)) < 32, "an epoch leaves out more than its last partial batch"
        validated = pd.read_csv(run / "predictions_last.csv")["image_name"]
        assert sorted(validated) == sorted(table.loc[table["fold"] == k, "image_name"])


def test_learning_rate_of_each_epoch_follows_the_schedule(demo_cv):
    shards, cv = demo_cv
    run = cv / "zoome" / "fold-01"
    table = pd.read_csv(shards / "folds.csv")
    # demo-cpu.yaml on 1 rank: micro batch 16, global 32 (2 accumulation steps), lr 1e-3; whole micro batches only
    spe, base, epochs = (int((table["fold"] != 1).sum()) // 16) // 2, 0.001, 4
    info = json.loads((run / "run.json").read_text())
    assert (info["steps_per_epoch"], info["lr"]) == (spe, base)
    total, warmup = spe * epochs, round(0.5 * spe)  # demo-cpu.yaml: warmup_epochs 0.5, min_lr_ratio 0.01
    for rec in (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()):
        s = rec["global_step"]
        assert s == (rec["epoch"] + 1) * spe
        want = base * (s + 1) / warmup if s < warmup else \
            base * (0.01 + 0.99 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / (total - warmup)))) / 2)
        assert rec["lr"] == pytest.approx(want, rel=1e-6), rec["epoch"]


def test_thresholds_come_from_the_right_predictions(demo_cv):
    """``threshold`` (``@t``): Youden on the fold's own last-epoch *training* predictions;
    ``threshold_oof`` (``@oof``): Youden on the *other* folds' out-of-fold predictions pooled."""
    _, cv = demo_cv
    folds = pd.read_csv(cv / "folds.csv").set_index("fold")
    preds = {k: pd.read_csv(cv / "zoome" / f"fold-{k:02d}" / "predictions_last.csv") for k in range(3)}
    for k in range(3):
        train = pd.read_csv(cv / "zoome" / f"fold-{k:02d}" / "predictions_train.csv")
        assert folds.loc[k, "threshold"] == pytest.approx(youden(train["target"].to_numpy(), train["prob"].to_numpy()),
                                                          abs=1e-6)
        rest = pd.concat([preds[j] for j in range(3) if j != k])
        t = youden(rest["target"].to_numpy(), rest["prob"].to_numpy())
        assert folds.loc[k, "threshold_oof"] == pytest.approx(t, abs=1e-6), k
        y, call = preds[k]["target"].to_numpy(), preds[k]["prob"].to_numpy() >= t
        assert folds.loc[k, "sens_oof"] == pytest.approx(call[y == 1].mean())
        assert folds.loc[k, "spec_oof"] == pytest.approx(1 - call[y == 0].mean())


def test_metadata_model_beats_the_model_without_metadata_on_metadata_only_data(tmp_path):
    """Images without any label signal, labels from age, sex and site only (``--label-from metadata``):
    ZooME with its metadata branch (the paper's gate, at the metadata learning rate ×10 that
    BENCHMARKS.md "Metadata path" recommends; lr 2e-3 for 6 epochs) must learn (measured 0.84);
    ``zoome_no_meta`` cannot (0.53), and must not come out ahead."""
    shards = synthetic_shards(tmp_path, 450, seed=6, label_from="metadata")
    zoome_cv(shards, tmp_path / "cv", "--folds", "0", "--variants", "zoome,zoome_no_meta",
             "--set", "train.epochs=6", "--set", "optim.lr=0.002", "--set", "optim.meta_lr_mult=10")
    auc = pd.read_csv(tmp_path / "cv" / "folds.csv").set_index("variant")["auc"]
    assert auc["zoome"] > 0.75 and auc["zoome"] > auc["zoome_no_meta"] + 0.15, dict(auc)
    # the report's paired comparison on the same images: zoome_no_meta is worse, and the interval says so
    rows = pd.read_csv(tmp_path / "cv" / "uncertainty.csv")
    paired = rows[(rows["variant"] == "zoome_no_meta") & (rows["versus"] == "zoome")].iloc[0]
    assert paired["delta_auc"] == pytest.approx(auc["zoome_no_meta"] - auc["zoome"])  # one fold: pooled = fold
    assert paired["ci_high"] < 0 and paired["p_value"] < 0.05, dict(paired)


def test_rerun_reports_finished_folds_only_for_the_same_config(demo_cv):
    """The same command again trains nothing; a changed ``--set`` over finished folds is refused
    (exit 2, naming the job and the key), never answered with the old folds' table."""
    shards, cv = demo_cv
    base = [sys.executable, "-m", "zoome_dist.cli.cv", "--config", str(DEMO), "--shards", str(shards), "--out", str(cv),
            "--folds", "0-2", "--set", "data.image_size=32", "--dry-run"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    same = subprocess.run([*base, "--set", "train.epochs=4"], capture_output=True, text=True, timeout=120, env=env)
    assert same.returncode == 0 and same.stdout.count("(finished)") == 3, same.stdout + same.stderr
    assert "0 to train, 3 finished; expected run time on GPUs" in same.stdout  # the plan before hours of work
    changed = subprocess.run([*base, "--set", "train.epochs=5"], capture_output=True, text=True, timeout=120, env=env)
    assert changed.returncode == 2, changed.stdout + changed.stderr
    assert "zoome fold 1 (finished" in changed.stderr and "train.epochs: 4 -> 5" in changed.stderr
    assert "Traceback" not in changed.stderr


def test_finished_folds_keep_their_models_and_not_their_checkpoints(demo_cv):
    """``zoome cv``'s default ``--keep models``: a finished fold keeps what predict, export and the report
    read, and drops the DeepSpeed checkpoints, saying how much; such a fold is not retrained by mistake
    (``zoome train`` into it is refused, ``--resume`` says there is nothing to resume)."""
    shards, cv = demo_cv
    fold = cv / "zoome" / "fold-00"
    assert not (fold / "checkpoints").exists()
    for name in ("model_last.pt", "model_best.pt", "predictions_last.csv", "summary.json", "metrics.jsonl"):
        assert (fold / name).is_file(), name
    assert "DeepSpeed checkpoints removed" in (fold / "job.log").read_text()
    before = (fold / "summary.json").read_text()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "RANK": "0", "WORLD_SIZE": "1"}
    cmd = [sys.executable, "-m", "zoome_dist.train", "--config", str(fold / "config.yaml"), "--shards", str(shards),
           "--fold", "0", "--out", str(fold), "--no-progress"]
    fresh = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert fresh.returncode == 2 and "already holds a finished training run" in fresh.stderr, fresh.stderr[-2000:]
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=120, env=env)
    assert resumed.returncode == 0 and "nothing to resume" in resumed.stderr + resumed.stdout, resumed.stderr[-2000:]
    assert (fold / "summary.json").read_text() == before


def test_model_card_states_what_the_report_measured(demo_cv, tmp_path):
    """MODEL_CARD.md of a CV variant: the pooled AUC and interval of uncertainty.csv, the threshold of
    calibration.json, the counts and licences of the shards' manifest; an export of those models carries it."""
    from zoome_dist.cli.main import main as zoome_main

    shards, cv = demo_cv
    card = (cv / "zoome" / "MODEL_CARD.md").read_text()
    unc = pd.read_csv(cv / "uncertainty.csv").set_index("variant").loc["zoome"]
    pooled = (f"Pooled AUC {100 * unc['auc']:.2f} % (95 % bootstrap interval {100 * unc['ci_low']:.2f}–"
              f"{100 * unc['ci_high']:.2f}; n {int(unc['n'])}")
    assert pooled in card
    assert f"{json.loads((cv / 'zoome' / 'calibration.json').read_text())['threshold']:.4f}" in card
    totals = json.loads((shards / "manifest.json").read_text())["totals"]
    assert f"{totals['samples']} images ({totals['positives']} melanoma)" in card
    for section in ("## Intended use", "## Training data", "Licences of the training images", "## Where it does worse",
                    "## Known limitations"):
        assert section in card
    out = tmp_path / "zoome.pt"
    assert zoome_main(["export", "--checkpoint", str(cv / "zoome"), "--format", "torchscript", "--out", str(out)]) == 0
    exported = (tmp_path / "zoome.pt.card.md").read_text()
    assert "mean probability of 3 model(s)" in exported and pooled in exported


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        pytest.skip("no Chromium on this machine (.ci/run installs the Debian package chromium)")
    return found


def test_html_report_renders_in_a_browser(demo_cv, tmp_path):
    """OUT/report.html, opened by headless Chromium from the file alone (no network): the rendered page holds the
    tables (the pooled AUC of uncertainty.csv in a table cell) and the screenshot shows the ROC figure's lines."""
    from PIL import Image

    _, cv = demo_cv
    page = cv / "report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2400",
             f"--user-data-dir={tmp_path / 'profile'}"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, env=env)
    assert dom.returncode == 0 and "<table>" in dom.stdout, dom.stderr[-2000:]
    auc = pd.read_csv(cv / "uncertainty.csv").set_index("variant").loc["zoome", "auc"]
    assert re.search(rf"<td>{100 * auc:.2f} \[[0-9.]+–[0-9.]+\]", dom.stdout)
    assert dom.stdout.count("data:image/png;base64,") >= 3 and "Model card: zoome" in dom.stdout
    shot = tmp_path / "report.png"
    r = subprocess.run([_chromium(), *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    blue = np.abs(pixels - [31, 119, 180]).sum(axis=1) < 40  # matplotlib's first line colour: the ROC curve
    assert blue.sum() > 300, f"{blue.sum()} ROC-blue pixels: the figure did not render"
    assert len(np.unique(pixels[::50], axis=0)) > 50  # text, tables and figures, not a blank page
