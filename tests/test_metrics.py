"""Metrics and ``zoome score`` against hand-computed values; the CV report end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from zoome_dist.cli.main import main as zoome_main
from zoome_dist.eval.metrics import binary_metrics, partial_auc_above_sens, youden_threshold

ROOT = Path(__file__).resolve().parents[1]
Y = [1, 1, 0, 0, 0]
P = [0.9, 0.4, 0.6, 0.2, 0.1]


def test_hand_computed_metrics():
    m = binary_metrics(np.array(Y), np.array(P))
    # AUC: positive 0.9 beats all 3 negatives, 0.4 beats 2 of 3 → 5/6.
    assert m["auc"] == pytest.approx(5 / 6)
    # prob > 0.5 calls 0.9 (TP) and 0.6 (FP): TP 1, FN 1, TN 2, FP 1.
    assert (m["acc"], m["sens"], m["spec"]) == pytest.approx((3 / 5, 1 / 2, 2 / 3))
    # ROC (0,0) (0,.5) (1/3,.5) (1/3,1) (1,1): TPR reaches 0.8 at FPR 1/3; area from there = 2/3.
    assert m["pauc_sens80"] == pytest.approx(2 / 3)
    assert m["sens_at_spec90"] == pytest.approx(0.5) and m["sens_at_spec80"] == pytest.approx(0.5)
    # AP: precision 1 at recall 0.5, 2/3 at recall 1 → 0.5·1 + 0.5·2/3.
    assert m["ap"] == pytest.approx(5 / 6)
    assert youden_threshold(np.array(Y), np.array(P)) == pytest.approx(0.4)  # J = 1 − 1/3 there
    m_t = binary_metrics(np.array(Y), np.array(P), threshold=0.4)
    assert (m_t["acc_t"], m_t["sens_t"], m_t["spec_t"]) == pytest.approx((4 / 5, 1.0, 2 / 3))


def test_partial_auc_limits():
    perfect = partial_auc_above_sens(np.array([0, 0, 1.0]), np.array([0, 1.0, 1.0]))
    assert perfect == pytest.approx(1.0)
    diagonal = partial_auc_above_sens(np.linspace(0, 1, 101), np.linspace(0, 1, 101))
    assert diagonal == pytest.approx((1 - 0.8 ** 2) / 2)
    with pytest.raises(ValueError, match="both classes"):
        binary_metrics(np.array([1, 1]), np.array([0.2, 0.3]))


def test_score_cli(tmp_path, capsys):
    truth = tmp_path / "truth.csv"
    pd.DataFrame({"image_name": [f"I{i}" for i in range(5)], "target": Y}).to_csv(truth, index=False)
    pred = tmp_path / "pred.csv"  # shuffled rows: matched by image, not by position
    pd.DataFrame({"image_name": [f"I{i}" for i in (4, 2, 0, 1, 3)],
                  "target": [P[i] for i in (4, 2, 0, 1, 3)]}).to_csv(pred, index=False)
    assert zoome_main(["score", "--truth", str(truth), "--pred", str(pred), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["auc"] == pytest.approx(5 / 6) and m["pauc_sens80"] == pytest.approx(2 / 3)
    isic = tmp_path / "isic.csv"  # the ISIC-archive layout image,MEL is read as well
    pd.DataFrame({"image": [f"I{i}" for i in range(5)], "MEL": P}).to_csv(isic, index=False)
    assert zoome_main(["score", "--truth", str(truth), "--pred", str(isic), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auc"] == pytest.approx(5 / 6)
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"image_name": ["I0", "I1", "I2", "I3", "X9"], "target": P}).to_csv(bad, index=False)
    assert zoome_main(["score", "--truth", str(truth), "--pred", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "['I4']" in err and "['X9']" in err
    dup = tmp_path / "dup.csv"
    pd.DataFrame({"image_name": ["I0", "I0"], "target": [0.1, 0.2]}).to_csv(dup, index=False)
    assert zoome_main(["score", "--truth", str(truth), "--pred", str(dup)]) == 2
    assert "duplicate image(s) ['I0']" in capsys.readouterr().err


@pytest.mark.slow
def test_cv_report(shards_dir, tmp_path):
    """Two folds, one process each (two jobs at a time, one core each), then the Table-I report, per-fold
    CSV and ROC PNG."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "launchers" / "cv.py"), "--shards", str(shards_dir), "--folds", "0-1",
           "--out", str(tmp_path / "cv"), "--variants", "zoome,zoome_no_meta",
           "--set", "model.backbone=resnet18", "--set", "data.image_size=32", "--set", "data.num_threads=1",
           "--set", "train.epochs=1", "--set", "train.global_batch_size=16", "--set", "train.micro_batch_size=16",
           "--set", "train.precision=fp32", "--jobs", "2", "--cpus-per-job", "1"]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # concurrent jobs: one line per finished epoch from each job, and how much of the CV is left
    assert "zoome fold 0: epoch 0 done (val AUC" in r.stdout and "zoome_no_meta fold 1: epoch 0 done" in r.stdout
    assert "4 of 4 job(s) finished" in r.stdout and "min left" in r.stdout, r.stdout
    folds = pd.read_csv(tmp_path / "cv" / "folds.csv")
    assert sorted(zip(folds["variant"], folds["fold"])) == [("zoome", 0), ("zoome", 1), ("zoome_no_meta", 0),
                                                            ("zoome_no_meta", 1)]
    table = (tmp_path / "cv" / "table.md").read_text()
    mean = 100 * folds[folds["variant"] == "zoome"]["auc"].mean()
    std = 100 * folds[folds["variant"] == "zoome"]["auc"].std(ddof=1)
    assert "| zoome | 2 |" in table and f"{mean:.2f}±{std:.2f}" in table
    png = (tmp_path / "cv" / "roc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # a finished CV is not retrained when re-run
    r2 = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "4 finished before" in r2.stdout and "started" not in r2.stdout


@pytest.mark.parametrize("column, value, message", [
    ("truth", "0.5", "ground truth must be 0 or 1"),
    ("truth", "yes", "ground truth must be 0 or 1"),
    ("pred", "nan", "must be probabilities in [0, 1]"),
    ("pred", "inf", "must be probabilities in [0, 1]"),
    ("pred", "", "must be probabilities in [0, 1]"),
    ("pred", "1.5", "must be probabilities in [0, 1]"),
])
def test_score_rejects_bad_values(tmp_path, capsys, column, value, message):
    truth = pd.DataFrame({"image_name": [f"I{i}" for i in range(5)], "target": [str(y) for y in Y]})
    pred = pd.DataFrame({"image_name": [f"I{i}" for i in range(5)], "target": [str(p) for p in P]})
    (truth if column == "truth" else pred).loc[2, "target"] = value
    truth.to_csv(tmp_path / "t.csv", index=False)
    pred.to_csv(tmp_path / "p.csv", index=False)
    assert zoome_main(["score", "--truth", str(tmp_path / "t.csv"), "--pred", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert message in err and "I2=" in err and "Traceback" not in err


@pytest.mark.parametrize("content", [b"", b"image_name,target\n\xff\xfe,1\n"])
def test_score_empty_or_non_utf8_csv(tmp_path, capsys, content):
    (tmp_path / "t.csv").write_bytes(content)
    pd.DataFrame({"image_name": ["I0"], "target": [0.5]}).to_csv(tmp_path / "p.csv", index=False)
    assert zoome_main(["score", "--truth", str(tmp_path / "t.csv"), "--pred", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert ("empty CSV" in err or "not UTF-8" in err) and "Traceback" not in err


def test_score_at_a_threshold(tmp_path, capsys):
    """--threshold T: ACC/SE/SP at T (p >= T is melanoma), counted here from the five rows."""
    truth, pred = tmp_path / "truth.csv", tmp_path / "pred.csv"
    pd.DataFrame({"image_name": [f"I{i}" for i in range(5)], "target": Y}).to_csv(truth, index=False)
    pd.DataFrame({"image_name": [f"I{i}" for i in range(5)], "target": P}).to_csv(pred, index=False)
    t = sorted(P)[2]  # the third-lowest probability: the two lowest rows are called benign
    assert zoome_main(["score", "--truth", str(truth), "--pred", str(pred), "--threshold", str(t), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    called = np.asarray(P) >= t
    y = np.asarray(Y).astype(bool)
    assert m["threshold"] == pytest.approx(t)
    assert m["sens_t"] == pytest.approx((called & y).sum() / y.sum())
    assert m["spec_t"] == pytest.approx((~called & ~y).sum() / (~y).sum())
    assert m["acc_t"] == pytest.approx((called == y).mean())
    assert zoome_main(["score", "--truth", str(truth), "--pred", str(pred), "--threshold", "1.5"]) == 2
    assert "--threshold 1.5: a probability in [0, 1]" in capsys.readouterr().err
