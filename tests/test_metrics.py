"""nvfm.metrics against scikit-learn / scipy on the same inputs."""
import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import f1_score, roc_auc_score

from nvfm import metrics, ops

needs_cpp = pytest.mark.skipif(ops.backend("bootstrap_stats", "cpu") != "cpp",
                               reason="compiled nvfm._C bootstrap kernel not built")


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
    w = metrics.bootstrap_counts(len(y), 5, seed=3, backend="reference").double()
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
    w = metrics.bootstrap_counts(len(y), 7, seed=0, backend="reference")
    plans = {k: metrics._auroc_plan(y[:, k], s[:, k]) for k in range(5)}
    got = metrics._AurocBatch(plans, len(y), "cpu")(w, w.sum(0))
    for k in range(5):
        ref = metrics._weighted_auroc(w.double(), *metrics._plan_tensors(y, s, k))
        torch.testing.assert_close(got[k].double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_bootstrap_ci_covers_and_threshold_stats_match_resampling(backend):
    y, s = _data(n=400, K=3)
    thr = metrics.youden_thresholds(y, s)
    ci = metrics.bootstrap(y, s, thr, n_boot=1000, seed=1, backend=backend)
    au = metrics.auroc(y, s)
    st = metrics.threshold_stats(y, s, thr)
    assert (ci["auroc"]["low"] < au).all() and (au < ci["auroc"]["high"]).all()
    for m in ("sensitivity", "specificity", "balanced_accuracy"):
        assert (ci[m]["low"] <= st[m] + 1e-9).all() and (st[m] <= ci[m]["high"] + 1e-9).all()
    # width shrinks roughly like 1/sqrt(n): a 4x larger cohort gives a clearly narrower CI
    y4, s4 = _data(n=1600, K=3, seed=0)
    ci4 = metrics.bootstrap(y4, s4, None, n_boot=1000, seed=1, backend=backend)
    assert set(ci4) == {"auroc"}
    assert ((ci4["auroc"]["high"] - ci4["auroc"]["low"]) < 0.75 * (ci["auroc"]["high"] - ci["auroc"]["low"])).all()


# ----------------------------------------------------------------------------- C++ bootstrap kernel
# csrc/bootstrap.cpp against the torch reference on the same replicates (the generator is
# shared), and against sklearn on the resampled cohorts.


def test_counts_generator_columns_are_resamples():
    w = metrics.bootstrap_counts(57, 300, seed=5, backend="reference")
    assert w.shape == (57, 300) and (w.sum(0) == 57).all() and (w >= 0).all()
    assert (w == w.round()).all()
    # multinomial(n, 1/n): mean count 1, variance 1 - 1/n; every study drawn sometimes
    assert abs(w.mean().item() - 1) < 1e-6 and abs(w.var().item() - (1 - 1 / 57)) < 0.05
    assert (w.sum(1) > 0).all()
    assert not torch.equal(w[:, :150], w[:, 150:])
    # a replicate depends only on (seed, replicate index): slices agree, seeds differ
    torch.testing.assert_close(metrics.bootstrap_counts(57, 10, seed=5, r0=290, backend="reference"), w[:, 290:])
    assert not torch.equal(metrics.bootstrap_counts(57, 300, seed=6, backend="reference"), w)


@needs_cpp
@pytest.mark.parametrize("n,r0,b,seed", [(1, 0, 3, 0), (2, 7, 5, 1), (3, 0, 64, -5), (100, 1000, 65, 2**63 + 17),
                                         (257, 3, 130, 12345), (1000, 0, 7, 2**64 - 1)])
def test_counts_generator_cpp_equals_reference(n, r0, b, seed):
    ref = metrics.bootstrap_counts(n, b, seed=seed, r0=r0, backend="reference")
    got = metrics.bootstrap_counts(n, b, seed=seed, r0=r0, backend="cpp")
    assert got.dtype == torch.float32 and torch.equal(got, ref)
    assert (got.sum(0) == n).all()


def _kernel_case(n, K, seed, ties):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, K)) < rng.uniform(0.02, 0.9, K)).astype(np.uint8)
    s = y * rng.uniform(0, 2.0, K) + rng.normal(size=(n, K))
    if ties:
        s = np.round(s * rng.uniform(0.5, 3, K)) / 2            # few distinct scores: big mixed tie groups
    if K > 2:
        y[:, 0] = 0                                              # no positives
        y[:, 1] = 1                                              # no negatives
    thr = s[rng.integers(0, n, K), np.arange(K)]                 # thresholds on exact score values
    thr[-1] = s[:, -1].max() + 1                                 # nothing predicted positive
    return y, s, thr


@needs_cpp
@pytest.mark.parametrize("n,K,B,ties", [(1, 3, 5, False), (2, 4, 64, True), (5, 3, 1, False), (37, 5, 63, True),
                                        (128, 6, 65, False), (300, 4, 130, True), (300, 3, 200, False)])
def test_kernel_equals_reference_per_replicate(n, K, B, ties):
    y, s, thr = _kernel_case(n, K, seed=n * 7 + B, ties=ties)
    seed, r0 = n + B, 3
    st = torch.ops.nvfm.bootstrap_stats(torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(thr), r0, B, seed)
    assert st.shape == (B, K, 5) and st.dtype == torch.float64
    num, P, N, TP, TN = st.unbind(2)
    w = metrics.bootstrap_counts(n, B, seed=seed, r0=r0, backend="reference").double()   # (n, B)
    yt, pred = torch.from_numpy(y).double(), torch.from_numpy((s >= thr).astype(np.float64))
    assert torch.equal(P, w.T @ yt) and torch.equal(N, w.T @ (1 - yt))                  # exact integer counts
    assert torch.equal(TP, w.T @ (yt * pred)) and torch.equal(TN, w.T @ ((1 - yt) * (1 - pred)))
    au = torch.where(P * N > 0, num / (P * N), torch.full_like(num, float("nan")))
    for k in range(K):
        ref = metrics._weighted_auroc(w, *metrics._plan_tensors(y.astype(np.float64), s, k))
        torch.testing.assert_close(au[:, k], ref, rtol=0, atol=1e-12, equal_nan=True)
        assert ((2 * num[:, k]) == (2 * num[:, k]).round()).all()                       # half-integers: exact


@needs_cpp
def test_kernel_replicates_equal_sklearn_on_resampled_cohorts():
    y, s, thr = _kernel_case(150, 5, seed=1, ties=True)
    B, seed = 6, 9
    st = torch.ops.nvfm.bootstrap_stats(torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(thr), 0, B, seed)
    w = metrics.bootstrap_counts(150, B, seed=seed, backend="cpp").long().numpy()
    for r in range(B):
        idx = np.repeat(np.arange(150), w[:, r])                       # the resampled cohort
        for k in range(2, 5):
            num, P, N = st[r, k, :3].tolist()
            assert P == y[idx, k].sum() and N == len(idx) - P
            if P and N:
                assert num / (P * N) == pytest.approx(roc_auc_score(y[idx, k], s[idx, k]), abs=1e-12)


@needs_cpp
def test_kernel_deterministic_across_threads_and_slices():
    y, s, thr = _kernel_case(200, 4, seed=3, ties=False)
    args = (torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(thr))
    full = torch.ops.nvfm.bootstrap_stats(*args, 0, 150, 4)
    nt = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.nvfm.bootstrap_stats(*args, 0, 150, 4)
    finally:
        torch.set_num_threads(nt)
    assert torch.equal(full, one)
    parts = torch.cat([torch.ops.nvfm.bootstrap_stats(*args, 0, 70, 4), torch.ops.nvfm.bootstrap_stats(*args, 70, 80, 4)])
    assert torch.equal(full, parts)
    assert not torch.equal(full, torch.ops.nvfm.bootstrap_stats(*args, 0, 150, 5))


@needs_cpp
@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_cpp_equals_reference(ties):
    y, s = _data(n=250, K=5, seed=2, ties=ties)
    y[:, 3] = 0                                                  # undefined class
    thr = metrics.youden_thresholds(y, s)
    a = metrics.bootstrap(y, s, thr, n_boot=300, seed=7, backend="cpp")
    b = metrics.bootstrap(y, s, thr, n_boot=300, seed=7, backend="reference", chunk_elems=250 * 64)
    assert set(a) == set(b) == {"auroc", "sensitivity", "specificity", "balanced_accuracy"}
    for m in a:
        np.testing.assert_array_equal(a[m]["n_valid"], b[m]["n_valid"])
        np.testing.assert_allclose(a[m]["low"], b[m]["low"], rtol=0, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(a[m]["high"], b[m]["high"], rtol=0, atol=1e-6, equal_nan=True)
        assert a[m]["macro_low"] == pytest.approx(b[m]["macro_low"], abs=1e-6)
        assert a[m]["macro_high"] == pytest.approx(b[m]["macro_high"], abs=1e-6)
        assert np.isnan(a[m]["low"][3]) and a[m]["n_valid"][3] == 0
    # the default backend on CPU is the kernel
    c = metrics.bootstrap(y, s, thr, n_boot=300, seed=7)
    np.testing.assert_array_equal(c["auroc"]["low"], a["auroc"]["low"])


@needs_cpp
def test_kernel_bad_input():
    y, s, thr = _kernel_case(10, 2, seed=0, ties=False)
    Y, S, T = torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(thr)
    with pytest.raises(RuntimeError, match="NaN or inf"):
        torch.ops.nvfm.bootstrap_stats(Y, torch.full_like(S, float("nan")), T, 0, 4, 0)
    with pytest.raises(RuntimeError, match="float64"):
        torch.ops.nvfm.bootstrap_stats(Y, S.float(), T, 0, 4, 0)
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.nvfm.bootstrap_stats(Y.long(), S, T, 0, 4, 0)
    with pytest.raises(ValueError, match="backend"):
        metrics.bootstrap(y, s, n_boot=10, backend="fast")


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


@pytest.mark.parametrize("ties", [False, True])
def test_precision_thresholds_brute_force(ties):
    from sklearn.metrics import precision_score
    y, s = _data(n=120, K=6, seed=3, ties=ties)
    y[:, 5] = 0                                                  # undefined class: never called
    for target in (0.3, 0.6, 0.9):
        thr = metrics.precision_thresholds(y, s, target, min_tp=2)
        assert thr[5] == np.inf
        for k in range(5):
            # every distinct score is a candidate cut; keep those meeting the rule, take the lowest
            cuts = [c for c in np.unique(s[:, k])
                    if (y[s[:, k] >= c, k].sum() >= 2)
                    and precision_score(y[:, k], s[:, k] >= c, zero_division=0) >= target]
            assert thr[k] == (min(cuts) if cuts else np.inf)
    # a perfect score reaches precision 1 down to its lowest positive; a useless one never does
    yy = np.r_[np.ones(5), np.zeros(20)].astype(np.int64)
    ss = np.stack([np.r_[np.linspace(2, 1, 5), np.linspace(0, -1, 20)], -np.arange(25.0)], 1)
    thr = metrics.precision_thresholds(np.stack([yy, yy[::-1]], 1), ss, 0.99)
    assert thr[0] == 1.0 and thr[1] == np.inf
    with pytest.raises(ValueError, match="precision target"):
        metrics.precision_thresholds(y, s, 0.0)


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
