"""Metrics audit 3: classes and bootstrap replicates without negatives are undefined in the PR
figures and calibrated F1 (DESIGN.md, Metrics: all figures of an undefined class are null and
never enter an average; a replicate without positives or negatives is left out), checked against
sklearn / scipy on explicitly resampled cohorts; a probe with non-finite outputs is a one-line error."""
import csv
import json
import os
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve

from nvfm import metrics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_evaluate_audit as T  # noqa: E402  (its cohort / probe / settings helpers)

import evaluate  # noqa: E402  (on sys.path through test_evaluate_audit)


def _high_prevalence(n=20, seed=1):
    """(y, s) (n,): 18 of 20 studies positive, tied scores; about 1 replicate in 8 draws no negative."""
    rng = np.random.default_rng(seed)
    y = np.ones(n)
    y[[3, 11]] = 0
    return y, np.round(y + rng.normal(size=n), 1)


def test_pr_figures_leave_out_replicates_and_classes_without_negatives():
    """A replicate with positives only has AP 1 and prevalence 1 (lift 1, chance) whatever the scores:
    it was kept, so a 90%-prevalence class's PR lift CI was [1.000, 1.290] (n_valid 2000) where the
    replicates with both classes give [1.037, 1.302] (1753, AUROC's n_valid); a class with positives
    only had AUPRC 1.0 and PR lift 1.0 instead of undefined."""
    y, s = _high_prevalence()
    B, seed = 2000, 0
    w = metrics.bootstrap_counts(len(y), B, seed=seed).long().numpy()
    aps, lifts, only_pos = [], [], 0
    for r in range(B):
        idx = np.repeat(np.arange(len(y)), w[:, r])
        only_pos += y[idx].sum() == len(idx)
        if 0 < y[idx].sum() < len(idx):
            aps.append(average_precision_score(y[idx], s[idx]))
            lifts.append(aps[-1] / y[idx].mean())
    assert only_pos > 100                                   # the case: many replicates without a negative
    Y, S = np.c_[y, np.ones_like(y)], np.c_[s, s]           # column 1: every study positive
    rep = metrics.pr_report(Y, S, n_boot=B, seed=seed)
    assert rep["n_valid"][0] == len(aps) == metrics.bootstrap(Y, S, n_boot=B, seed=seed)["auroc"]["n_valid"][0]
    np.testing.assert_allclose([rep["auprc_low"][0], rep["auprc_high"][0]], np.percentile(aps, [2.5, 97.5]), atol=1e-12)
    np.testing.assert_allclose([rep["pr_lift_low"][0], rep["pr_lift_high"][0]], np.percentile(lifts, [2.5, 97.5]),
                               atol=1e-12)
    assert rep["auprc"][0] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    for f in ("auprc", "pr_lift", "auprc_low", "pr_lift_high"):    # sklearn's 1.0 there says nothing
        assert np.isnan(rep[f][1]), f
    assert rep["n_valid"][1] == 0 and np.isnan(metrics.average_precision(Y, S)[1])
    # the plot's band: the same replicates left out
    grid = np.linspace(0, 1, 11)
    _, lo, hi, nv = metrics.pr_band(y, s, n_boot=B, seed=seed, recall_grid=grid, chunk=300)
    curves = []
    for r in range(B):
        idx = np.repeat(np.arange(len(y)), w[:, r])
        if 0 < y[idx].sum() < len(idx):
            p, rc, _ = precision_recall_curve(y[idx], s[idx])
            curves.append([p[rc >= x].max() for x in grid])
    assert nv == len(curves)
    np.testing.assert_allclose(lo, np.percentile(curves, 2.5, axis=0), atol=1e-12)
    np.testing.assert_allclose(hi, np.percentile(curves, 97.5, axis=0), atol=1e-12)


def test_calibrated_f1_of_a_class_without_negatives_is_undefined_and_out_of_the_macro_and_fit():
    """Calling every study positive scores F1 1 on a class without negatives: it entered the macro
    calibrated F1 and the label-efficiency fit as a real figure. A class without positives (F1 0 after
    one false positive) stays out too."""
    rng = np.random.default_rng(5)
    n, K = 80, 5
    y = (rng.random((n, K)) < 0.35).astype(np.int64)
    y[:, 1] = 1                                             # no test negatives
    y[:, 3] = 0                                             # no test positives
    prob = np.clip(0.4 * y + 0.7 * rng.random((n, K)), 0, 1)
    assert (prob[:, 1] >= 0.5).any() and (prob[:, 3] >= 0.5).any()   # F1 would be 1 and 0
    n_train = np.array([12, 400, 60, 30, 2500])
    rep = metrics.classification_report(y, prob, np.full(K, 0.5), [f"c{k}" for k in range(K)], n_boot=0)
    metrics.add_calibrated_f1(rep, y, prob, n_train)
    keep = [0, 2, 4]
    ref = np.array([f1_score(y[:, k], prob[:, k] >= 0.5) for k in keep])
    assert rep["per_class"]["c1"]["calibrated_f1"] is None and rep["per_class"]["c3"]["calibrated_f1"] is None
    assert [rep["per_class"][f"c{k}"]["calibrated_f1"] for k in keep] == pytest.approx(ref, abs=1e-12)
    assert rep["macro"]["calibrated_f1"] == {"mean": pytest.approx(ref.mean(), abs=1e-12), "n_classes": 3}
    fit = scipy.stats.linregress(np.log10(n_train[keep]), ref)
    le = rep["label_efficiency"]
    assert le["n"] == 3 and le["slope"] == pytest.approx(fit.slope) and le["r2"] == pytest.approx(fit.rvalue ** 2)
    cf1 = metrics.calibrated_f1(prob, y, prob, y)
    assert np.isnan(cf1[[1, 3]]).all() and np.isfinite(cf1[keep]).all()


def test_evaluate_reports_a_class_positive_in_every_test_study_as_undefined(tmp_path, monkeypatch):
    """metrics.json had AUPRC 1.0, PR lift 1.0 and calibrated F1 1.0 for such a class (its AUROC
    null), and its F1 in the macro calibrated F1."""
    emb, rows = T._cohort(tmp_path)
    lines = list(csv.reader(open(tmp_path / "labels.csv")))
    for r in lines[1:]:
        if r[2] == "test":
            r[4] = "1"                                      # intraparenchymal_hemorrhage: every test study
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(lines)
    pt, (st,) = T._probe(tmp_path, "probe.pt")
    T._settings(monkeypatch, tmp_path, probes=pt, n_boot=200)
    evaluate.main()
    res = T._results(tmp_path)["p"]
    u = res["per_class"]["intraparenchymal_hemorrhage"]
    assert u["auroc"] is None and res["undefined_classes"] == ["intraparenchymal_hemorrhage"]
    for m in ("auprc", "pr_lift", "calibrated_f1"):
        assert u[m] is None, m
    assert u["auprc_ci"] == [None, None] and u["pr_lift_ci"] == [None, None]
    keys = sorted(k for k, r in rows.items() if r["split"] == "test" and r["modality"] == "CT")
    lg = np.array([T._numpy_logits(st, emb[k])[1] for k in keys])
    yk = np.array([rows[k]["y"][1] for k in keys])
    f1 = f1_score(yk, 1 / (1 + np.exp(-(0.6 * lg + 0.8))) >= 0.5)   # the stored Platt (a, b) of the other class
    assert res["per_class"]["cerebral_atrophy"]["calibrated_f1"] == pytest.approx(f1, abs=1e-9)
    assert res["macro"]["calibrated_f1"] == {"mean": pytest.approx(f1, abs=1e-9), "n_classes": 1}
    assert res["per_class"]["cerebral_atrophy"]["auprc"] == pytest.approx(average_precision_score(yk, lg), abs=1e-9)


@pytest.mark.parametrize("task", ["classify", "age"])
def test_a_probe_with_non_finite_outputs_is_a_one_line_error(tmp_path, monkeypatch, task):
    """A NaN weight made every logit of a class NaN: a ValueError traceback ('scores contain NaN or
    inf', no file named) from the metrics."""
    T._cohort(tmp_path)
    pt, _ = T._probe(tmp_path, "probe.pt", K=2 if task == "classify" else 1, task=task)
    ck = torch.load(pt, weights_only=False)
    ck["models"][0]["head.bias"][-1] = float("nan")
    torch.save(ck, pt)
    T._settings(monkeypatch, tmp_path, probes=pt)
    with pytest.raises(SystemExit) as e:
        evaluate.main()
    msg = str(e.value)
    assert "\n" not in msg and pt in msg and "NaN or inf on 12 of the 12 evaluated studies" in msg
    assert (repr("cerebral_atrophy") if task == "classify" else "'age'") in msg
    assert not os.path.exists(tmp_path / "ev" / "metrics.json")
