"""The reported numbers, computed independently: by hand, by brute force written here, or by the
official ISIC scorer (``isic-challenge-scoring``), never from the code under test."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring.classification import ClassificationScore

from zoome_dist.eval.calibration import cross_fit_thresholds
from zoome_dist.eval.metrics import binary_metrics, ece, youden_threshold

# 5 melanomas, 4 benign. Ranked: P .9, P .8, P .7, N .6, then a tie at .5 of P, P, N, then N .3, N .1.
# ROC: (0,0) (0,.2) (0,.4) (0,.6) (.25,.6) -tie-> (.5,1) (.75,1) (1,1). The tie is a diagonal segment,
# and TPR 0.8 is crossed in its middle, at FPR .25 + (.2/.4)·.25 = .375 (no grid point there).
Y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0])
P = np.array([.9, .8, .7, .5, .5, .6, .5, .3, .1])


def test_roc_crossing_the_sensitivity_floor_mid_segment():
    m = binary_metrics(Y, P)
    # pAUC above 80 % sensitivity: FPR .375→.5 under TPR .8→1 (trapezoid .125·.9) + FPR .5→1 at TPR 1 (.5).
    # Without the interpolation it would be .5 (start at (.5, 1)) or .7 (start at (.25, .6)).
    assert m["pauc_sens80"] == pytest.approx(0.125 * 0.9 + 0.5)
    # AUC: .9/.8/.7 beat all 4 negatives (12); each tied .5 positive loses to .6, ties .5, beats .3, .1 (2.5 each).
    assert m["auc"] == pytest.approx((12 + 2 * 2.5) / 20)
    # AP: precision 1 at recall .2, .4, .6; then recall 1.0 at precision 5/7 (the tie enters at once).
    assert m["ap"] == pytest.approx(0.6 + 0.4 * 5 / 7)
    # positive = prob > 0.5 (the tied .5s are negative calls): TP 3 (.9 .8 .7), FP 1 (.6), FN 2, TN 3.
    assert (m["acc"], m["sens"], m["spec"]) == pytest.approx((6 / 9, 3 / 5, 3 / 4))
    # best TPR with FPR ≤ 0.2 / 0.1 / 0.05: only FPR 0 qualifies, TPR .6 there.
    assert [m[f"sens_at_spec{s}"] for s in (80, 90, 95)] == pytest.approx([0.6, 0.6, 0.6])


def test_youden_threshold_and_calls_at_it():
    # J = TPR − FPR over the ROC points: .6 at (0, .6) (threshold .7), .35 at (.25,.6), .5 at (.5, 1).
    assert youden_threshold(Y, P) == pytest.approx(0.7)
    m = binary_metrics(Y, P, threshold=0.7)  # positive = prob ≥ t: TP 3, FP 0, FN 2, TN 4
    assert (m["acc_t"], m["sens_t"], m["spec_t"]) == pytest.approx((7 / 9, 3 / 5, 1.0))
    # a maximum reached at two points: the higher threshold (fewer positive calls) is the one chosen
    y2, p2 = np.array([1, 0, 1, 0]), np.array([.8, .6, .4, .2])  # J = .5 at t .8 and at t .4
    assert youden_threshold(y2, p2) == pytest.approx(0.8)


def test_expected_calibration_error_by_hand():
    # 15 bins of width 1/15: .9→13, .8→12, .7→10, .6→9, the three .5s→7 (rate 2/3), .3→4, .1→1.
    # ECE = 1/9·(|.9−1| + |.8−1| + |.7−1| + |.6−0| + |.3−0| + |.1−0|) + 3/9·|.5 − 2/3| = 2.1/9.
    assert ece(Y, P) == pytest.approx(2.1 / 9)
    assert ece(np.array([0, 1]), np.array([0.0, 1.0])) == pytest.approx(0.0)
    assert ece(np.array([1, 1, 0, 0]), np.array([1.0, 1.0, 1.0, 1.0])) == pytest.approx(0.5)  # p = 1 is in bin 14


@pytest.mark.parametrize("seed", range(8))
def test_against_the_official_isic_scorer(seed):
    """AUC, partial AUC above 80 % sensitivity, AP, and ACC/SE/SP at 0.5 as ``isic-challenge-scoring``
    computes them (its ``auc_sens_80`` uses the unreduced ROC and interpolates at the floor), on
    predictions with many ties and values exactly 0.5."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 200))
    y = (rng.random(n) < rng.uniform(0.1, 0.5)).astype(int)
    y[:2] = [0, 1]
    p = np.round(np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.25, n), 0, 1), 1)  # 11 distinct values
    ours = binary_metrics(y, p)
    ref = ClassificationScore._category_score(pd.Series(y.astype(float)), pd.Series(p), pd.Series(np.ones(n)), "MEL")
    for mine, theirs in [("auc", "auc"), ("pauc_sens80", "auc_sens_80"), ("ap", "ap"), ("acc", "accuracy"),
                         ("sens", "sensitivity"), ("spec", "specificity")]:
        assert ours[mine] == pytest.approx(ref[theirs], abs=1e-12), (mine, seed)


def _youden_brute_force(y: np.ndarray, p: np.ndarray) -> float:
    """Every candidate cut (positive = p ≥ t), the largest J, the highest t among equals."""
    best_j, best_t = -np.inf, None
    for t in sorted(set(p), reverse=True):
        call = p >= t
        j = call[y == 1].mean() - call[y == 0].mean()
        if j > best_j + 1e-12:
            best_j, best_t = j, t
    return float(best_t)


@pytest.mark.parametrize("n_folds, seed", [(3, 12), (5, 2)])  # seeds whose data tell the choices apart (checked below)
def test_out_of_fold_threshold_uses_exactly_the_other_folds(n_folds, seed):
    """Fold k is scored at the Youden threshold of all *other* folds pooled (computed here by brute
    force), and the data are built so that its own fold, one other fold, or all folds give another
    threshold, i.e. each of those mistakes would fail this test."""
    rng = np.random.default_rng(seed)
    folds = {}
    for k in range(n_folds):  # each fold's scores shifted differently: the pooled Youden cut moves per fold
        y = (rng.random(40) < 0.3).astype(int)
        y[:2] = [0, 1]
        p = np.round(np.clip(0.15 + 0.12 * k + 0.35 * y + rng.normal(0, 0.12, 40), 0, 1), 3)
        folds[k] = pd.DataFrame({"target": y, "prob": p})
    got = cross_fit_thresholds(folds)
    assert sorted(got) == list(range(n_folds))
    for k, df in folds.items():
        rest = pd.concat([d for j, d in folds.items() if j != k])
        t = _youden_brute_force(rest["target"].to_numpy(), rest["prob"].to_numpy())
        assert got[k]["threshold_oof"] == pytest.approx(t), k
        y, call = df["target"].to_numpy(), df["prob"].to_numpy() >= t
        assert got[k]["sens_oof"] == pytest.approx(call[y == 1].mean())
        assert got[k]["spec_oof"] == pytest.approx(1 - call[y == 0].mean())
        assert got[k]["acc_oof"] == pytest.approx((call == (y == 1)).mean())
        pooled = pd.concat(folds.values())
        wrong = {_youden_brute_force(df["target"].to_numpy(), df["prob"].to_numpy()),
                 _youden_brute_force(pooled["target"].to_numpy(), pooled["prob"].to_numpy()),
                 _youden_brute_force(folds[(k + 1) % n_folds]["target"].to_numpy(),
                                     folds[(k + 1) % n_folds]["prob"].to_numpy())}
        assert t not in wrong, "the test data cannot tell the right folds from a wrong choice"


def test_sensitivity_at_fixed_specificity_on_the_boundary():
    # 5 melanomas, 10 benign ranked P P P N P N P N N N N N N N N: ROC (0,.6) (.1,.6) (.1,.8) (.2,.8) (.2,1).
    # Specificity 90 % allows FPR ≤ .1 exactly (TPR .8), 80 % FPR ≤ .2 (TPR 1), 95 % FPR ≤ .05 (TPR .6).
    y = np.array([1, 1, 1, 0, 1, 0, 1] + [0] * 8)
    p = np.array([.95, .9, .85, .8, .75, .7, .65, .6, .5, .4, .3, .2, .1, .05, .01])
    m = binary_metrics(y, p)
    assert (m["sens_at_spec80"], m["sens_at_spec90"], m["sens_at_spec95"]) == pytest.approx((1.0, 0.8, 0.6))
    assert youden_threshold(y, p) == pytest.approx(0.65)  # J = 1 − .2 = .8 there, the largest


def test_ece_bins_are_closed_on_the_left():
    # bins [k/15, (k+1)/15): 0.2 = 3/15 opens bin 3, 0.19 sits in bin 2. Closed on the right, both would
    # share bin 2: |(.19+.2)/2 − 1/2| = .305 instead of 1/2·|.19 − 1| + 1/2·|.2 − 0| = .505.
    assert ece(np.array([1, 0]), np.array([0.19, 0.2])) == pytest.approx(0.5 * 0.81 + 0.5 * 0.2)


def test_final_threshold_is_fit_on_the_raw_pooled_predictions():
    """``zoome cv`` stores one threshold for ``zoome predict --threshold oof``, which compares it with
    *uncalibrated* probabilities: it must be the Youden cut of the raw pooled predictions, even when the
    temperature it stores beside it is far from 1."""
    from zoome_dist.eval.calibration import fit

    rng = np.random.default_rng(3)
    y = (rng.random(200) < 0.3).astype(int)
    p = (1 / (1 + np.exp(-4 * (1.5 * (y - 0.5) + rng.normal(0, 1, 200))))).clip(1e-4, 1 - 1e-4).round(4)
    got = fit(pd.DataFrame({"target": y, "prob": p}))
    assert abs(got["temperature"] - 1) > 0.5  # overconfident on purpose: calibration moves the values
    assert got["threshold"] == pytest.approx(_youden_brute_force(y, p))


def test_cv_table_is_mean_and_sample_std_in_percent():
    from zoome_dist.eval.report import table_markdown

    folds = pd.DataFrame({"variant": ["a", "a", "b"], "fold": [0, 1, 0], "auc": [0.8, 0.9, 0.7],
                          "acc": [0.5, 0.7, 0.6], "sens": [1.0, 0.5, 0.4], "spec": [0.25, 0.75, 0.3]})
    table = table_markdown(folds)
    # a: AUC 85 ± 7.07 (sample std: sqrt(((80−85)² + (90−85)²) / 1)), ACC 60 ± 14.14, SE 75 ± 35.36, SP 50 ± 35.36
    assert "| method | folds | AUC | ACC@0.5 | SE@0.5 | SP@0.5 |" in table  # AUC leads, the 0.5 figures last
    assert "| a | 2 | 85.00±7.07 | 60.00±14.14 | 75.00±35.36 | 50.00±35.36 |" in table
    assert "| b | 1 | 70.00 | 60.00 | 40.00 | 30.00 |" in table  # one fold: no "±0.00" that looks like a spread


def test_bootstrap_interval_covers_the_true_auc_about_95_percent_of_the_time():
    """Binormal scores (negatives N(0,1), positives N(d,1)) have AUC Φ(d/√2): the interval drawn from each of
    80 independent samples should hold it in about 95 % of them."""
    from scipy.stats import norm

    from zoome_dist.eval.uncertainty import auc_interval

    d, truth, rng, hits = 1.0, norm.cdf(1.0 / np.sqrt(2)), np.random.default_rng(7), 0
    for k in range(80):
        y = np.r_[np.ones(60, int), np.zeros(140, int)]
        p = np.r_[rng.normal(d, 1, 60), rng.normal(0, 1, 140)]
        ci = auc_interval(y, p, n_boot=400, seed=k)
        assert ci["ci_low"] <= ci["auc"] <= ci["ci_high"]
        hits += ci["ci_low"] <= truth <= ci["ci_high"]
    assert 0.85 <= hits / 80 <= 1.0, hits


def test_bootstrap_interval_agrees_with_sklearn_and_flags_few_positives():
    from sklearn.metrics import roc_auc_score

    from zoome_dist.eval.uncertainty import auc_interval

    y, p = np.array([1, 1, 1, 0, 0, 0, 0, 0]), np.array([0.9, 0.6, 0.35, 0.6, 0.4, 0.3, 0.2, 0.1])
    ci = auc_interval(y, p, n_boot=500)
    assert ci["auc"] == pytest.approx(roc_auc_score(y, p))  # ties included
    assert ci["few"] and ci["n"] == 8 and ci["positives"] == 3
    assert ci["ci_high"] - ci["ci_low"] > 0.1  # 3 positives: a wide interval, not a point
    with pytest.raises(ValueError, match="both classes"):
        auc_interval(np.ones(4), np.linspace(0, 1, 4))


def test_paired_comparison_finds_a_real_difference_and_none_where_there_is_none():
    from zoome_dist.eval.uncertainty import paired_auc_difference

    rng = np.random.default_rng(3)
    y = np.r_[np.ones(80, int), np.zeros(220, int)]
    weak = np.r_[rng.normal(0.3, 1, 80), rng.normal(0, 1, 220)]
    strong = weak + np.r_[np.full(80, 1.5), np.zeros(220)]  # the same images, positives pushed up
    same = paired_auc_difference(y, weak, weak.copy(), n_boot=300)
    assert same["delta_auc"] == 0 and same["p_value"] == 1.0 and same["ci_low"] == same["ci_high"] == 0
    gain = paired_auc_difference(y, weak, strong, n_boot=300)
    assert gain["delta_auc"] > 0.2 and gain["ci_low"] > 0 and gain["p_value"] < 0.01
    with pytest.raises(ValueError, match="one prediction per image"):
        paired_auc_difference(y, weak, strong[:-1])


def test_age_bands_come_in_age_order_with_intervals():
    from zoome_dist.eval.subgroups import subgroup_metrics

    ages = [80, 20, 50, 35, 65] * 20
    target = (np.arange(100) % 3 == 0).astype(int)  # both classes in every band
    preds = pd.DataFrame({"target": target, "prob": np.linspace(0, 1, 100), "age_approx": ages})
    t = subgroup_metrics(preds, n_boot=100)
    assert list(t["value"]) == ["<30", "30-44", "45-59", "60-74", "75+"]
    assert t["auc"].notna().all() and (t["ci_low"] <= t["auc"]).all() and (t["auc"] <= t["ci_high"]).all()
    assert t["few"].all()  # 20 images a band, 6-7 positives: flagged
