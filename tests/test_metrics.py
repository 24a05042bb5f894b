"""nvfm.metrics against scikit-learn / scipy on the same inputs."""
import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import f1_score, roc_auc_score

from nvfm import metrics


def _data(n=300, K=6, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, K)) < rng.uniform(0.05, 0.5, K)).astype(np.int64)
    s = y * rng.uniform(0.2, 2.0, K) + rng.normal(size=(n, K))
    if ties:
        s = np.round(s * 2) / 2  # many ties
    return y, s


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_matches_sklearn(ties):
    y, s = _data(ties=ties)
    ours = metrics.auroc(y, s)
    ref = [roc_auc_score(y[:, k], s[:, k]) for k in range(y.shape[1])]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_undefined_class_is_nan_and_skipped_by_macro():
    y, s = _data()
    y[:, 2] = 0          # no positives
    y[:, 4] = 1          # no negatives
    au = metrics.auroc(y, s)
    assert np.isnan(au[2]) and np.isnan(au[4]) and np.isfinite(au[[0, 1, 3, 5]]).all()
    mean, n = metrics.macro(au)
    assert n == 4 and mean == pytest.approx(np.mean(au[[0, 1, 3, 5]]))
    rep = metrics.classification_report(y, s, np.zeros(6), [f"c{k}" for k in range(6)], n_boot=200)
    assert rep["undefined_classes"] == ["c2", "c4"]
    assert rep["per_class"]["c2"]["auroc"] is None
    assert rep["macro"]["auroc"]["n_classes"] == 4
    assert rep["macro"]["auroc"]["mean"] == pytest.approx(mean)
    lo, hi = rep["macro"]["auroc"]["ci"]
    assert lo < mean < hi


def test_bootstrap_replicate_equals_sklearn_on_resampled_data():
    y, s = _data(n=200, ties=True)
    gen = torch.Generator().manual_seed(3)
    w = metrics.bootstrap_counts(len(y), 5, gen).double()
    for k in range(y.shape[1]):
        ours = metrics._weighted_auroc(w, *metrics._plan_tensors(y, s, k))
        for r in range(5):
            idx = np.repeat(np.arange(len(y)), w[:, r].long().numpy())   # the resampled cohort
            assert len(idx) == len(y)
            ref = roc_auc_score(y[idx, k], s[idx, k])
            assert ours[r].item() == pytest.approx(ref, abs=1e-12)


def test_batched_sparse_auroc_equals_per_class():
    y, s = _data(n=150, K=5, ties=True)
    s[:, 1] = np.round(s[:, 1])                     # heavy ties in one class, none after rounding elsewhere
    w = metrics.bootstrap_counts(len(y), 7, torch.Generator().manual_seed(0))
    plans = {k: metrics._auroc_plan(y[:, k], s[:, k]) for k in range(5)}
    got = metrics._AurocBatch(plans, len(y), "cpu")(w, w.sum(0))
    for k in range(5):
        ref = metrics._weighted_auroc(w.double(), *metrics._plan_tensors(y, s, k))
        torch.testing.assert_close(got[k].double(), ref, rtol=1e-5, atol=1e-6)


def test_bootstrap_ci_covers_and_threshold_stats_match_resampling():
    y, s = _data(n=400, K=3)
    thr = metrics.youden_thresholds(y, s)
    ci = metrics.bootstrap(y, s, thr, n_boot=1000, seed=1)
    au = metrics.auroc(y, s)
    st = metrics.threshold_stats(y, s, thr)
    assert (ci["auroc"]["low"] < au).all() and (au < ci["auroc"]["high"]).all()
    for m in ("sensitivity", "specificity", "balanced_accuracy"):
        assert (ci[m]["low"] <= st[m] + 1e-9).all() and (st[m] <= ci[m]["high"] + 1e-9).all()
    # width shrinks roughly like 1/sqrt(n): a 4x larger cohort gives a clearly narrower CI
    y4, s4 = _data(n=1600, K=3, seed=0)
    ci4 = metrics.bootstrap(y4, s4, None, n_boot=1000, seed=1)
    assert ((ci4["auroc"]["high"] - ci4["auroc"]["low"]) < 0.75 * (ci["auroc"]["high"] - ci["auroc"]["low"])).all()


def test_threshold_stats_and_youden_vs_sklearn():
    from sklearn.metrics import balanced_accuracy_score, recall_score, roc_curve
    y, s = _data()
    thr = metrics.youden_thresholds(y, s)
    st = metrics.threshold_stats(y, s, thr)
    for k in range(y.shape[1]):
        pred = s[:, k] >= thr[k]
        assert st["sensitivity"][k] == pytest.approx(recall_score(y[:, k], pred))
        assert st["specificity"][k] == pytest.approx(recall_score(1 - y[:, k], ~pred))
        assert st["balanced_accuracy"][k] == pytest.approx(balanced_accuracy_score(y[:, k], pred))
        fpr, tpr, _ = roc_curve(y[:, k], s[:, k])
        assert (st["sensitivity"][k] - (1 - st["specificity"][k])) == pytest.approx(np.max(tpr - fpr))


def test_f1_platt_and_calibrated_f1():
    from sklearn.calibration import _sigmoid_calibration
    y, s = _data(n=500)
    a, b = metrics.platt_fit(s, y)
    for k in range(y.shape[1]):
        ra, rb = _sigmoid_calibration(s[:, k], y[:, k])   # sklearn: p = 1 / (1 + exp(ra f + rb))
        assert a[k] == pytest.approx(-ra, rel=1e-3, abs=1e-4)
        assert b[k] == pytest.approx(-rb, rel=1e-3, abs=1e-4)
    p = metrics.platt_apply(s, a, b)
    assert ((p > 0) & (p < 1)).all()
    cf1 = metrics.calibrated_f1(s, y, s, y)
    ref = [f1_score(y[:, k], p[:, k] >= 0.5, zero_division=np.nan) for k in range(y.shape[1])]
    np.testing.assert_allclose(cf1, ref, equal_nan=True)
    # separable data stays finite thanks to Platt's smoothed targets
    a2, b2 = metrics.platt_fit(np.r_[-np.ones(10), np.ones(10)], np.r_[np.zeros(10), np.ones(10)])
    assert np.isfinite(a2).all() and np.isfinite(b2).all()


def test_label_efficiency_fit_matches_linregress_and_regression_errors():
    rng = np.random.default_rng(0)
    npos = rng.integers(1, 5000, 40)
    f = 0.1 + 0.15 * np.log10(npos) + rng.normal(0, 0.05, 40)
    f[3] = np.nan                                   # undefined F1 is skipped
    fit = metrics.label_efficiency_fit(npos, f)
    ok = np.isfinite(f)
    ref = scipy.stats.linregress(np.log10(npos[ok]), f[ok])
    assert fit["n"] == 39
    assert fit["slope"] == pytest.approx(ref.slope) and fit["intercept"] == pytest.approx(ref.intercept)
    assert fit["r2"] == pytest.approx(ref.rvalue ** 2)
    from sklearn.metrics import mean_absolute_error, mean_squared_error
    a, b = rng.normal(size=50), rng.normal(size=50)
    assert metrics.mae(a, b) == pytest.approx(mean_absolute_error(a, b))
    assert metrics.rmse(a, b) == pytest.approx(np.sqrt(mean_squared_error(a, b)))


def test_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        metrics.auroc(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="0/1"):
        metrics.auroc(np.full((5, 1), 2), np.zeros((5, 1)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.auroc(np.zeros((5, 1)), np.full((5, 1), np.nan))
