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


def _brute_force_replicates(y, s, thr, counts):
    """Per-replicate AUROC (sklearn) / sensitivity / specificity / balanced accuracy (numpy) on
    the explicitly resampled cohorts: dict metric -> (B, K) float64, NaN where undefined."""
    B, K = counts.shape[1], y.shape[1]
    out = {m: np.full((B, K), np.nan) for m in ("auroc", "sensitivity", "specificity", "balanced_accuracy")}
    for r in range(B):
        idx = np.repeat(np.arange(len(y)), counts[:, r])               # the resampled cohort
        for k in range(K):
            yy, ss = y[idx, k], s[idx, k]
            if 0 < yy.sum() < len(yy):
                pred = ss >= thr[k]
                out["auroc"][r, k] = roc_auc_score(yy, ss)
                out["sensitivity"][r, k] = (pred & (yy == 1)).sum() / (yy == 1).sum()
                out["specificity"][r, k] = (~pred & (yy == 0)).sum() / (yy == 0).sum()
                out["balanced_accuracy"][r, k] = 0.5 * (out["sensitivity"][r, k] + out["specificity"][r, k])
    return out


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_bootstrap_ci_equals_percentiles_of_resampled_cohorts(backend):
    """Every CI end, per class and macro, and every n_valid equal the percentiles of the statistics
    recomputed on the resampled cohorts themselves, in float64 (no 0.800000011920929). A macro
    replicate is the mean over every class of the macro point estimate, kept only where all of them
    are defined (it used to average whichever classes a replicate had: mean of 3 mixed with mean of 2)."""
    y, s = _data(n=80, K=4, seed=5)
    y[:, 2] = 0                                                  # undefined class
    thr = np.array([0.0, 0.5, 0.0, 1.0])
    B, seed = 200, 1
    ci = metrics.bootstrap(y, s, thr, n_boot=B, seed=seed, backend=backend)
    ref = _brute_force_replicates(y, s, thr, metrics.bootstrap_counts(len(y), B, seed=seed).long().numpy())
    ok = np.array([True, True, False, True])
    for m, r in ref.items():
        r[:, ~ok] = np.nan
        nvalid = np.isfinite(r).sum(0)
        np.testing.assert_array_equal(ci[m]["n_valid"], nvalid)
        for k in np.nonzero(ok)[0]:
            assert nvalid[k] >= 100
            lo, hi = np.percentile(r[np.isfinite(r[:, k]), k], [2.5, 97.5])
            assert ci[m]["low"][k] == pytest.approx(lo, abs=1e-12) and ci[m]["high"][k] == pytest.approx(hi, abs=1e-12)
        assert np.isnan(ci[m]["low"][2]) and ci[m]["n_valid"][2] == 0
        mac = np.array([row.mean() if np.isfinite(row).all() else np.nan for row in r[:, ok]])
        lo, hi = np.percentile(mac[np.isfinite(mac)], [2.5, 97.5])
        assert ci[m]["macro_low"] == pytest.approx(lo, abs=1e-12) and ci[m]["macro_high"] == pytest.approx(hi, abs=1e-12)
        assert ci[m]["macro_n_valid"] == np.isfinite(mac).sum()
    # sensitivity replicates are ratios of integers: the CI ends are those float64 ratios exactly
    sens = ref["sensitivity"][:, 0]
    assert ci["sensitivity"]["low"][0] == np.percentile(sens[np.isfinite(sens)], 2.5)
    # the JSON report records the replicates behind each interval
    rep = metrics.classification_report(y, s, thr, ["a", "b", "c", "d"], n_boot=B, seed=seed)
    for m in ref:
        assert rep["per_class"]["a"]["ci_n_valid"][m] == ci[m]["n_valid"][0]
        assert rep["per_class"]["c"]["ci_n_valid"][m] == 0 and rep["per_class"]["c"][m + "_ci"] == [None, None]
        assert rep["macro"][m]["ci_n_valid"] == ci[m]["macro_n_valid"]
        assert rep["per_class"]["b"][m + "_ci"] == [ci[m]["low"][1], ci[m]["high"][1]]



@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_threshold_stat_replicates_without_positives_or_negatives_are_undefined(backend):
    """A rare class (2 positives in 30 studies) has no positive in ~13% of replicates: there its
    AUROC and balanced accuracy are undefined, and so is its specificity (module docstring), but
    that specificity used to enter the percentiles (and the macro replicate), and likewise the
    sensitivity of a replicate without negatives: CIs unlike those of the resampled cohorts.
    The macro CI now keeps only the replicates where all three classes are defined (each the mean
    of the three); it used to average the classes each replicate had, which this test enforced,
    so its interval mixed the mean of 3 classes with the mean of 1 or 2."""
    rng = np.random.default_rng(3)
    n = 30
    y = np.zeros((n, 3), np.int64)
    y[:2, 0] = 1                                   # 2 positives
    y[:, 1] = 1
    y[:2, 1] = 0                                   # 2 negatives
    y[:, 2] = rng.random(n) < 0.4
    s = np.round(y * 0.8 + rng.normal(size=(n, 3)) * 0.7, 1)      # ties, some at the cuts
    thr = np.array([0.0, 0.5, 0.3])
    B, seed = 400, 2
    ci = metrics.bootstrap(y, s, thr, n_boot=B, seed=seed, backend=backend)
    ref = _brute_force_replicates(y, s, thr, metrics.bootstrap_counts(n, B, seed=seed).long().numpy())
    for m, r in ref.items():
        nvalid = np.isfinite(r).sum(0)
        np.testing.assert_array_equal(ci[m]["n_valid"], nvalid, err_msg=m)
        assert nvalid[0] < 0.95 * B and nvalid[1] < 0.95 * B       # the edge replicates are there
        for k in range(3):
            lo, hi = np.percentile(r[np.isfinite(r[:, k]), k], [2.5, 97.5])
            assert (ci[m]["low"][k], ci[m]["high"][k]) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12)), m
        full = np.isfinite(r).all(1)
        assert 100 <= full.sum() < np.isfinite(r).any(1).sum()      # replicates with 1 or 2 classes are left out
        lo, hi = np.percentile(r[full].mean(1), [2.5, 97.5])
        assert (ci[m]["macro_low"], ci[m]["macro_high"]) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
        assert ci[m]["macro_n_valid"] == full.sum()

def _rare_class_data():
    """4 classes, the last with 1 positive in 60 studies, scored lowest (AUROC 0): that class has no
    positive in ~37% of the bootstrap replicates."""
    rng = np.random.default_rng(1)
    n, K = 60, 4
    y = np.zeros((n, K), np.int64)
    y[:, :3] = rng.random((n, 3)) < 0.4
    y[0, 3] = 1
    s = y * 2.5 + rng.normal(size=(n, K))
    s[0, 3] = -3.0
    return y, s


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_macro_ci_averages_every_class_of_the_point_estimate(backend):
    """The macro AUROC (0.72: the mean of 4 classes, one at 0) had the CI [0.70, 0.98]: replicates
    without the rare class's positive averaged the other 3 (~0.96). Now the CI comes from the
    replicates where all 4 are defined, checked against sklearn on the resampled cohorts, and the
    count of those replicates is reported; too few of them give no CI."""
    y, s = _rare_class_data()
    n, K = y.shape
    B = 300
    counts = metrics.bootstrap_counts(n, B, seed=0).long().numpy()
    reps = np.full((B, K), np.nan)
    for r in range(B):
        idx = np.repeat(np.arange(n), counts[:, r])
        for k in range(K):
            if 0 < y[idx, k].sum() < n:
                reps[r, k] = roc_auc_score(y[idx, k], s[idx, k])
    full = np.isfinite(reps).all(1)
    assert 100 <= full.sum() < 0.8 * B                             # the rare class is missing from many replicates
    lo, hi = np.percentile(reps[full].mean(1), [2.5, 97.5])
    ci = metrics.bootstrap(y, s, np.zeros(K), n_boot=B, seed=0, backend=backend)["auroc"]
    assert ci["macro_low"] == pytest.approx(lo, abs=1e-12) and ci["macro_high"] == pytest.approx(hi, abs=1e-12)
    assert ci["macro_n_valid"] == full.sum()
    point = np.mean([roc_auc_score(y[:, k], s[:, k]) for k in range(K)])
    assert ci["macro_low"] <= point <= ci["macro_high"] and ci["macro_high"] < 0.8
    if backend == "cpp" or ops.backend("bootstrap_stats", "cpu") != "cpp":   # the report's default backend
        rep = metrics.classification_report(y, s, np.zeros(K), list("abcd"), n_boot=B, seed=0)
        assert rep["macro"]["auroc"]["mean"] == pytest.approx(point, abs=1e-12)
        assert rep["macro"]["auroc"]["ci"] == [pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12)]
        assert rep["macro"]["auroc"]["ci_n_valid"] == full.sum()
    # 120 replicates: fewer than MIN_BOOT (100) have all 4 classes -> no macro CI (per-class CIs stay)
    few = metrics.bootstrap(y, s, np.zeros(K), n_boot=120, seed=0, backend=backend)
    w = counts[:, :120]                                             # the same first 120 replicates
    n_all = int((((w.T @ y) > 0) & ((w.T @ (1 - y)) > 0)).all(1).sum())
    assert n_all < metrics.MIN_BOOT
    for m, c in few.items():
        assert c["macro_low"] is None and c["macro_high"] is None and c["macro_n_valid"] == n_all, m
        assert np.isfinite(c["low"][:3]).all()
    rep = metrics.classification_report(y, s, np.zeros(K), list("abcd"), n_boot=120, seed=0)
    assert rep["macro"]["auroc"]["ci"] == [None, None] and rep["macro"]["auroc"]["mean"] == pytest.approx(point)


def test_repeated_class_names_are_an_error():
    """A repeated name (a labels.csv header twice) kept one per_class row while the macro averaged
    every column, and add_calibrated_f1, pairing rows with columns by position, put column 0's F1
    on the row of column 2."""
    y, s = _data(n=100, K=3)
    with pytest.raises(ValueError, match=r"label names \['ich'\] are repeated"):
        metrics.classification_report(y, s, np.zeros(3), ["ich", "sdh", "ich"], n_boot=0)
    rep = metrics.classification_report(y[:, :2], s[:, :2], np.zeros(2), ["ich", "sdh"], n_boot=0)
    with pytest.raises(ValueError, match=r"2 per_class rows and 3 training counts for 3 columns"):
        metrics.add_calibrated_f1(rep, y, s >= 0, [10, 20, 30])


def test_bootstrap_ci_width_shrinks_with_cohort_size():
    y, s = _data(n=400, K=3)
    ci = metrics.bootstrap(y, s, None, n_boot=1000, seed=1)
    au = metrics.auroc(y, s)
    assert (ci["auroc"]["low"] < au).all() and (au < ci["auroc"]["high"]).all()
    # width shrinks roughly like 1/sqrt(n): a 4x larger cohort gives a clearly narrower CI
    y4, s4 = _data(n=1600, K=3, seed=0)
    ci4 = metrics.bootstrap(y4, s4, None, n_boot=1000, seed=1)
    assert set(ci4) == {"auroc"}
    assert ((ci4["auroc"]["high"] - ci4["auroc"]["low"]) < 0.75 * (ci["auroc"]["high"] - ci["auroc"]["low"])).all()


def test_macro_threshold_stats_skip_undefined_classes_and_lie_in_their_ci():
    """A class with negatives but no positives has a specificity, but it is undefined like its
    AUROC: the macro specificity averages the same classes as its CI (issue: mean 0.694 outside
    CI [0.490, 0.589])."""
    from sklearn.metrics import balanced_accuracy_score, recall_score
    y, s = _data(n=300, K=5, seed=4)
    y[:, 1] = 0                       # no positives; every study below the cut: specificity 1
    s[:, 1] = -5.0
    y[:, 3] = 1                       # no negatives; every study above the cut: sensitivity 1
    s[:, 3] = 5.0
    thr = np.zeros(5)
    rep = metrics.classification_report(y, s, thr, [f"c{k}" for k in range(5)], n_boot=400)
    pred = s >= thr
    ref = {"sensitivity": [recall_score(y[:, k], pred[:, k]) for k in (0, 2, 4)],
           "specificity": [recall_score(1 - y[:, k], ~pred[:, k]) for k in (0, 2, 4)],
           "balanced_accuracy": [balanced_accuracy_score(y[:, k], pred[:, k]) for k in (0, 2, 4)]}
    for m, v in ref.items():
        mac = rep["macro"][m]
        assert mac["n_classes"] == 3 and mac["mean"] == pytest.approx(np.mean(v), abs=1e-12)
        assert mac["ci"][0] <= mac["mean"] <= mac["ci"][1]
        assert rep["per_class"]["c1"][m] is None and rep["per_class"]["c3"][m] is None
    st = metrics.threshold_stats(y, s, thr)
    assert np.isnan(st["specificity"][1]) and np.isnan(st["sensitivity"][3])


def test_small_n_boot_is_an_error_not_undefined_intervals():
    y, s = _data(n=100, K=2)
    with pytest.raises(ValueError, match="n_boot=50.*at least 100"):
        metrics.bootstrap(y, s, n_boot=50)
    with pytest.raises(ValueError, match="n_boot=99"):
        metrics.classification_report(y, s, np.zeros(2), ["a", "b"], n_boot=99)
    assert metrics.classification_report(y, s, np.zeros(2), ["a", "b"], n_boot=0)["macro"]["auroc"]["n_classes"] == 2


def test_empty_and_non_binary_inputs_raise_like_sklearn():
    from sklearn.metrics import mean_absolute_error, mean_squared_error, roc_auc_score as sk_auroc
    e = np.zeros((0, 1))
    for ours, theirs in [(lambda: metrics.auroc(e, e), lambda: sk_auroc(e[:, 0], e[:, 0])),
                         (lambda: metrics.f1(e, e), lambda: f1_score(e[:, 0], e[:, 0])),
                         (lambda: metrics.mae([], []), lambda: mean_absolute_error([], [])),
                         (lambda: metrics.rmse([], []), lambda: mean_squared_error([], []))]:
        with pytest.raises(ValueError):
            theirs()
        with pytest.raises(ValueError, match="n = 0"):
            ours()
    with pytest.raises(ValueError, match="n = 0"):
        metrics.threshold_stats(e, e, [0.0])
    # labels {-1, 2} are not 0/1: sklearn refuses them (pos_label=1 absent), so do we
    y, p = np.array([-1, 2, 2, -1]), np.array([2, 2, -1, -1])
    with pytest.raises(ValueError):
        f1_score(y, p)
    with pytest.raises(ValueError, match="0/1"):
        metrics.f1(y, p)
    with pytest.raises(ValueError, match="0/1"):
        metrics.f1([0, 1, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="same shape"):
        metrics.mae([1.0, 2.0], [1.0])
    assert metrics.f1([0, 1, 1, 0], [True, True, False, False])[0] == pytest.approx(f1_score([0, 1, 1, 0], [1, 1, 0, 0]))


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


def _group_case(n, G, big, seed):
    """(n,) int64 group numbers 0..G-1 (none empty, n >= G), studies shuffled: groups 0..G/2-1 hold
    one study each, group G-1 gets `big` extra studies, the rest spread over the upper half."""
    rng = np.random.default_rng(seed)
    g = np.r_[np.arange(G), np.full(min(big, n - G), G - 1),
              rng.integers(G // 2, G, max(0, n - G - big))].astype(np.int64)
    return g[rng.permutation(n)]


@needs_cpp
@pytest.mark.parametrize("n,G,big,B,ties", [(5, 1, 0, 70, False), (2, 2, 0, 3, True), (40, 12, 10, 64, True),
                                            (700, 20, 400, 65, False), (700, 20, 400, 130, True),
                                            (600, 300, 0, 129, True), (1000, 700, 250, 200, False)])
def test_kernel_grouped_equals_reference_per_replicate(n, G, big, B, ties):
    """bootstrap_stats(groups=...) draws bootstrap_counts(G) and weighs each study by its group's count:
    its counts are the reference's expanded weights exactly, its replicate metrics (`_replicates_cpp`)
    bit-identical to the torch reference's (`_replicates_reference`). Includes one group holding all
    studies, singleton groups, a group of 400 studies (one draw weighs 400-1600 in all), G > 255, ties,
    classes without positives / negatives."""
    y, s, thr = _kernel_case(n, 5, seed=n + G + B, ties=ties)
    g = _group_case(n, G, big, seed=B)
    seed, r0 = n * G + B, 2
    st = torch.ops.nvfm.bootstrap_stats(torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(thr), r0, B, seed,
                                        torch.from_numpy(g), G)
    num, P, N, TP, TN = st.unbind(2)
    w = metrics.bootstrap_counts(G, B, seed=seed, r0=r0, backend="reference").double()[torch.from_numpy(g)]  # (n, B)
    yt, pred = torch.from_numpy(y).double(), torch.from_numpy((s >= thr).astype(np.float64))
    assert torch.equal(P, w.T @ yt) and torch.equal(N, w.T @ (1 - yt))
    assert torch.equal(TP, w.T @ (yt * pred)) and torch.equal(TN, w.T @ ((1 - yt) * (1 - pred)))
    assert ((2 * num) == (2 * num).round()).all()
    if G == 1:                                                   # the one group is always drawn once
        assert (w == 1).all()
    if big:
        assert (w.sum(0) != n).any()                             # cohort sizes vary with the groups drawn
    defined = metrics.defined_classes(y)
    a = metrics._replicates_cpp(y, s, thr, B, seed, defined, (G, g))
    b = metrics._replicates_reference(y, s, thr, B, seed, defined, "cpu", n * 64, False, (G, g))
    for m in a:
        np.testing.assert_array_equal(a[m], b[m], err_msg=m)       # bit-identical, NaN where NaN
    assert np.isnan(a["auroc"][:, :2]).all()                      # no positives / no negatives
    nt = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.nvfm.bootstrap_stats(torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(thr), r0, B,
                                             seed, torch.from_numpy(g), G)
    finally:
        torch.set_num_threads(nt)
    assert torch.equal(st, one)


@needs_cpp
@pytest.mark.parametrize("ties", [False, True])
def test_kernel_grouped_replicates_equal_sklearn_with_subject_weights(ties):
    """Independent check: draw the subjects with bootstrap_counts(G), give every study its subject's
    count as sample weight, and score AUROC with sklearn, counts with numpy."""
    n, G, K, B, seed = 260, 70, 5, 6, 3
    y, s, thr = _kernel_case(n, K, seed=11, ties=ties)
    g = _group_case(n, G, 60, seed=5)
    st = torch.ops.nvfm.bootstrap_stats(torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(thr), 0, B, seed,
                                        torch.from_numpy(g), G).numpy()
    c = metrics.bootstrap_counts(G, B, seed=seed).long().numpy()                 # (G, B) subject counts
    for r in range(B):
        w = c[g, r]
        keep = w > 0
        for k in range(K):
            num, P, N, TP, TN = st[r, k]
            yk, pred = y[:, k] == 1, s[:, k] >= thr[k]
            assert (P, N) == (w[yk].sum(), w[~yk].sum())
            assert (TP, TN) == (w[yk & pred].sum(), w[~yk & ~pred].sum())
            if P and N:
                ref = roc_auc_score(yk[keep], s[keep, k], sample_weight=w[keep])
                assert num / (P * N) == pytest.approx(ref, abs=1e-12)


@needs_cpp
@pytest.mark.parametrize("ties", [False, True])
def test_bootstrap_grouped_cpp_equals_reference(ties):
    """bootstrap(groups=...) on the kernel (the default on CPU) gives the reference's intervals exactly."""
    y, s = _data(n=240, K=4, seed=4, ties=ties)
    y[:, 2] = 0                                                   # undefined class
    thr = metrics.youden_thresholds(y, s)
    subj = [f"p{j}" for j in _group_case(240, 90, 40, seed=1)]
    a = metrics.bootstrap(y, s, thr, n_boot=300, seed=5, backend="cpp", groups=subj)
    b = metrics.bootstrap(y, s, thr, n_boot=300, seed=5, backend="reference", groups=subj)
    c = metrics.bootstrap(y, s, thr, n_boot=300, seed=5, groups=subj)
    for m in a:
        for f in ("low", "high", "n_valid"):
            np.testing.assert_array_equal(a[m][f], b[m][f], err_msg=f"{m} {f}")
            np.testing.assert_array_equal(a[m][f], c[m][f], err_msg=f"{m} {f}")
        assert (a[m]["macro_low"], a[m]["macro_high"], a[m]["macro_n_valid"]) == \
            (b[m]["macro_low"], b[m]["macro_high"], b[m]["macro_n_valid"])
    assert not np.array_equal(a["auroc"]["low"], metrics.bootstrap(y, s, thr, n_boot=300, seed=5)["auroc"]["low"],
                              equal_nan=True)                     # the groups do change the replicates


@needs_cpp
def test_kernel_bad_groups():
    y, s, thr = _kernel_case(10, 2, seed=0, ties=False)
    Y, S, T = torch.from_numpy(y), torch.from_numpy(s), torch.from_numpy(thr)
    g = torch.arange(10) // 2
    with pytest.raises(RuntimeError, match="groups must be contiguous \\(n,\\) int64"):
        torch.ops.nvfm.bootstrap_stats(Y, S, T, 0, 4, 0, g.int(), 5)
    with pytest.raises(RuntimeError, match="groups must be contiguous \\(n,\\) int64"):
        torch.ops.nvfm.bootstrap_stats(Y, S, T, 0, 4, 0, g[:9], 5)
    with pytest.raises(RuntimeError, match="study 8 has group 5, not in 0..4"):
        torch.ops.nvfm.bootstrap_stats(Y, S, T, 0, 4, 0, torch.where(g == 4, 5, g), 5)
    with pytest.raises(RuntimeError, match="study 0 has group -1"):
        torch.ops.nvfm.bootstrap_stats(Y, S, T, 0, 4, 0, g - 1, 5)
    with pytest.raises(RuntimeError, match="n_groups must be in 1"):
        torch.ops.nvfm.bootstrap_stats(Y, S, T, 0, 4, 0, g, 0)
    with pytest.raises(RuntimeError, match="n_groups given without groups"):
        torch.ops.nvfm.bootstrap_stats(Y, S, T, 0, 4, 0, None, 5)


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
        metrics.bootstrap(y, s, n_boot=100, backend="fast")


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


# ----------------------------------------------------------------------------- public benchmarks (issue 25)


@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_matches_sklearn(ties):
    from sklearn.metrics import average_precision_score
    y, s = _data(ties=ties)
    y[:, 2] = 0                                            # no positives: undefined
    ours = metrics.average_precision(y, s)
    assert np.isnan(ours[2])
    for k in (0, 1, 3, 4, 5):
        assert ours[k] == pytest.approx(average_precision_score(y[:, k], s[:, k]), abs=1e-12)


def test_pr_report_ci_equals_percentiles_of_resampled_sklearn_ap():
    from sklearn.metrics import average_precision_score
    y, s = _data(n=120, K=2, ties=True)
    rep = metrics.pr_report(y, s, n_boot=150, seed=4)
    w = metrics.bootstrap_counts(len(y), 150, seed=4).long().numpy()
    for k in range(2):
        aps, lifts = [], []
        for r in range(150):
            idx = np.repeat(np.arange(len(y)), w[:, r])
            if 0 < y[idx, k].sum() < len(idx):
                aps.append(average_precision_score(y[idx, k], s[idx, k]))
                lifts.append(aps[-1] / y[idx, k].mean())
        assert rep["n_valid"][k] == len(aps)
        np.testing.assert_allclose([rep["auprc_low"][k], rep["auprc_high"][k]], np.percentile(aps, [2.5, 97.5]),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose([rep["pr_lift_low"][k], rep["pr_lift_high"][k]], np.percentile(lifts, [2.5, 97.5]),
                                   rtol=0, atol=1e-12)
        assert rep["pr_lift"][k] == pytest.approx(average_precision_score(y[:, k], s[:, k]) / y[:, k].mean())


def test_pr_band_equals_percentiles_of_resampled_sklearn_curves():
    from sklearn.metrics import precision_recall_curve
    rng = np.random.default_rng(2)
    y = (rng.random(60) < 0.3).astype(int)
    s = np.round(y + rng.normal(size=60), 1)
    grid = np.linspace(0, 1, 11)
    g, lo, hi, nv = metrics.pr_band(y, s, n_boot=120, seed=5, recall_grid=grid, chunk=50)
    w = metrics.bootstrap_counts(60, 120, seed=5).long().numpy()
    curves = []
    for r in range(120):
        idx = np.repeat(np.arange(60), w[:, r])
        if y[idx].sum() > 0:
            p, rc, _ = precision_recall_curve(y[idx], s[idx])
            curves.append([p[rc >= x].max() for x in grid])     # interpolated precision at recall >= x
    assert nv == len(curves)
    np.testing.assert_allclose(lo, np.percentile(curves, 2.5, axis=0), atol=1e-12)
    np.testing.assert_allclose(hi, np.percentile(curves, 97.5, axis=0), atol=1e-12)


def test_regression_report_matches_numpy_scipy_and_resampled_cohorts():
    rng = np.random.default_rng(3)
    age = rng.uniform(20, 85, 90)
    pred = age + rng.normal(2, 5, 90)
    rep = metrics.regression_report(age, pred, n_boot=200, seed=7)
    e = pred - age
    assert rep["mae"] == pytest.approx(np.abs(e).mean()) and rep["rmse"] == pytest.approx(np.sqrt((e ** 2).mean()))
    assert rep["pearson_r"] == pytest.approx(scipy.stats.pearsonr(age, pred)[0], abs=1e-12)
    assert rep["bias"] == pytest.approx(e.mean())
    w = metrics.bootstrap_counts(90, 200, seed=7).long().numpy()
    ref = {"mae": [], "rmse": [], "pearson_r": [], "bias": []}
    for r in range(200):
        idx = np.repeat(np.arange(90), w[:, r])
        ee = pred[idx] - age[idx]
        ref["mae"].append(np.abs(ee).mean())
        ref["rmse"].append(np.sqrt((ee ** 2).mean()))
        ref["pearson_r"].append(scipy.stats.pearsonr(age[idx], pred[idx])[0])
        ref["bias"].append(ee.mean())
    for m, v in ref.items():
        np.testing.assert_allclose(rep[m + "_ci"], np.percentile(v, [2.5, 97.5]), rtol=0, atol=1e-9)
    assert rep["mae_ci"][0] < rep["mae"] < rep["mae_ci"][1]
    with pytest.raises(ValueError, match="same shape"):
        metrics.regression_report(age, pred[:-1], n_boot=0)


def test_laterality_given_detection_hand_worked():
    # study: 0 left detected right side (correct), 1 right detected (wrong side), 2 left missed,
    # 3 bilateral detected (left out), 4 negative, 5 left detected correct
    yd = [1, 1, 1, 1, 0, 1]
    sd = [2.0, 1.5, -1.0, 3.0, 5.0, 0.5]
    yl = [1, 0, 1, 1, 0, 1]
    yr = [0, 1, 0, 1, 0, 0]
    sl = [1.0, 0.9, 2.0, 1.0, 0.0, 0.3]
    sr = [-1.0, 0.1, 0.0, 1.0, 0.0, 0.2]
    rep = metrics.laterality_report(yd, sd, 0.0, yl, yr, sl, sr, n_boot=0)
    assert rep == {"n_positive": 5, "n_detected": 4, "n_bilateral": 1, "n": 3, "accuracy": pytest.approx(2 / 3)}
    rep = metrics.laterality_report(yd, sd, 0.0, yl, yr, sl, sr, n_boot=300, seed=1)
    w = metrics.bootstrap_counts(6, 300, seed=1).numpy()
    ok = np.array([1, 0, 0, 0, 0, 1], float)
    one = np.array([1, 1, 0, 0, 0, 1], float)
    reps = [(w[:, r] * ok).sum() / (w[:, r] * one).sum() for r in range(300) if (w[:, r] * one).sum() > 0]
    np.testing.assert_allclose(rep["accuracy_ci"], np.percentile(reps, [2.5, 97.5]), atol=1e-12)
    assert rep["ci_n_valid"] == len(reps)


# ----------------------------------------------------------------------------- subject-level (cluster) bootstrap


def _all_cis(y, s, thr, B, seed, **kw):
    """Every CI helper evaluate.py calls, on (y, s): a flat dict name -> array (NaN kept)."""
    out = {}
    ci = metrics.bootstrap(y, s, thr, n_boot=B, seed=seed, **kw)
    for m, e in ci.items():
        for f in ("low", "high", "n_valid", "macro_low", "macro_high", "macro_n_valid"):
            out[f"{m}.{f}"] = np.asarray(e[f], np.float64) if e[f] is not None else np.nan
    g = {k: v for k, v in kw.items() if k == "groups"}
    pr = metrics.pr_report(y, s, n_boot=B, seed=seed, **g)
    for f in ("auprc_low", "auprc_high", "pr_lift_low", "pr_lift_high", "n_valid"):
        out["pr." + f] = np.asarray(pr[f], np.float64)
    reg = metrics.regression_report(s[:, 0] * 10 + 50, s[:, 1] * 10 + 50, n_boot=B, seed=seed, **g)
    for f in ("mae_ci", "rmse_ci", "pearson_r_ci", "bias_ci", "ci_n_valid"):
        out["reg." + f] = np.asarray(reg[f], np.float64)
    lat = metrics.laterality_report(y[:, 0], s[:, 0], 0.0, y[:, 1], 1 - y[:, 1], s[:, 1], s[:, 2], n_boot=B,
                                    seed=seed, **g)
    out["lat"] = np.asarray(lat["accuracy_ci"] + [lat["ci_n_valid"]], np.float64)
    for name, band in (("roc", metrics.roc_band), ("prb", metrics.pr_band)):
        _, lo, hi, nv = band(y[:, 0], s[:, 0], n_boot=B, seed=seed, chunk=70, **g)
        out[name] = np.r_[lo, hi, nv]
    rep = metrics.classification_report(y, s, thr, [f"c{k}" for k in range(y.shape[1])], n_boot=B, seed=seed, **g)
    out["report"] = rep
    return out


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "report":
            assert a[k] == b[k]
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)   # bit-identical (NaN where NaN)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_distinct_or_missing_groups_are_the_study_level_bootstrap_bit_for_bit(backend):
    """groups=None, all-distinct ids (numbers or strings) and no subject recorded ("" / None: each study
    its own subject) draw today's study-level replicates: every CI of every helper is bit-identical."""
    y, s = _data(n=90, K=3, seed=11, ties=True)
    thr = np.array([0.0, 0.5, 0.2])
    B, seed = 150, 4
    base = _all_cis(y, s, thr, B, seed, backend=backend)
    for groups in (None, np.arange(90)[::-1], [f"s{i}" for i in range(90)], [""] * 90, [None] * 45 + [""] * 45):
        _assert_same(base, _all_cis(y, s, thr, B, seed, backend=backend, groups=groups))
    assert metrics.group_index([""] * 90) is None and metrics.group_index(None) is None
    assert torch.equal(metrics.bootstrap_weights(90, 20, seed=4, groups=np.arange(90)),
                       metrics.bootstrap_counts(90, 20, seed=4))
    with pytest.raises(ValueError, match="3 group ids for 90 studies"):
        metrics.bootstrap(y, s, thr, n_boot=B, groups=[1, 2, 3])


def _cluster_cohorts(groups, B, seed):
    """The resampled cohorts of a cluster bootstrap, built by hand: subjects numbered in order of
    first appearance, drawn with the counts bootstrap_counts(G, B, seed); a drawn subject brings all
    its studies (as often as it is drawn). Returns B index arrays into the studies."""
    ids = list(dict.fromkeys(groups))
    members = [np.nonzero(np.asarray(groups) == g)[0] for g in ids]
    c = metrics.bootstrap_counts(len(ids), B, seed=seed).long().numpy()        # (G, B)
    return [np.concatenate([np.tile(members[j], c[j, r]) for j in range(len(ids))]).astype(int) for r in range(B)]


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_cluster_bootstrap_equals_brute_force_resampling_of_subjects(backend):
    """Hand-built cluster bootstrap (numpy + sklearn on the explicitly resampled cohorts) against
    bootstrap(groups=...): per-class and macro AUROC, sensitivity / specificity, AUPRC / PR lift,
    MAE / RMSE / r, side accuracy and the ROC band are the percentiles of the same replicates."""
    from sklearn.metrics import average_precision_score, roc_curve
    rng = np.random.default_rng(7)
    n, K = 48, 3
    groups = [f"subj{j}" for j in rng.integers(0, 17, n)]                     # 1-7 studies a subject, shuffled
    y = (rng.random((n, K)) < [0.4, 0.3, 0.5]).astype(int)
    s = np.round(y * 1.2 + rng.normal(size=(n, K)), 1)                         # ties
    thr = np.array([0.3, 0.0, 0.6])
    B, seed = 200, 9
    cohorts = _cluster_cohorts(groups, B, seed)
    assert len({len(c) for c in cohorts}) > 1                                  # cohort sizes vary with the subjects drawn
    ci = metrics.bootstrap(y, s, thr, n_boot=B, seed=seed, backend=backend, groups=groups)
    au, sens = np.full((B, K), np.nan), np.full((B, K), np.nan)
    ap, lift = np.full((B, K), np.nan), np.full((B, K), np.nan)
    for r, idx in enumerate(cohorts):
        for k in range(K):
            yy, ss = y[idx, k], s[idx, k]
            if 0 < yy.sum() < len(yy):
                au[r, k] = roc_auc_score(yy, ss)
                sens[r, k] = (ss[yy == 1] >= thr[k]).mean()
                ap[r, k] = average_precision_score(yy, ss)
                lift[r, k] = ap[r, k] / yy.mean()
    for m, reps in (("auroc", au), ("sensitivity", sens)):
        nv = np.isfinite(reps).sum(0)
        np.testing.assert_array_equal(ci[m]["n_valid"], nv)
        for k in range(K):
            lo, hi = np.percentile(reps[np.isfinite(reps[:, k]), k], [2.5, 97.5])
            assert ci[m]["low"][k] == pytest.approx(lo, abs=1e-12) and ci[m]["high"][k] == pytest.approx(hi, abs=1e-12)
        full = np.isfinite(reps).all(1)
        lo, hi = np.percentile(reps[full].mean(1), [2.5, 97.5])
        assert ci[m]["macro_n_valid"] == full.sum()
        assert ci[m]["macro_low"] == pytest.approx(lo, abs=1e-12) and ci[m]["macro_high"] == pytest.approx(hi, abs=1e-12)
    pr = metrics.pr_report(y, s, n_boot=B, seed=seed, groups=groups)
    for k in range(K):
        ok = np.isfinite(ap[:, k])
        np.testing.assert_allclose([pr["auprc_low"][k], pr["auprc_high"][k]], np.percentile(ap[ok, k], [2.5, 97.5]),
                                   rtol=0, atol=1e-12)
        np.testing.assert_allclose([pr["pr_lift_low"][k], pr["pr_lift_high"][k]],
                                   np.percentile(lift[ok, k], [2.5, 97.5]), rtol=0, atol=1e-12)
    age, pred = 40 + 30 * rng.random(n), 40 + 30 * rng.random(n)
    reg = metrics.regression_report(age, pred, n_boot=B, seed=seed, groups=groups)
    e = [pred[i] - age[i] for i in cohorts]
    np.testing.assert_allclose(reg["mae_ci"], np.percentile([np.abs(x).mean() for x in e], [2.5, 97.5]), atol=1e-9)
    np.testing.assert_allclose(reg["rmse_ci"], np.percentile([np.sqrt((x ** 2).mean()) for x in e], [2.5, 97.5]),
                               atol=1e-9)
    np.testing.assert_allclose(reg["pearson_r_ci"], np.percentile([scipy.stats.pearsonr(age[i], pred[i])[0]
                                                                   for i in cohorts], [2.5, 97.5]), atol=1e-9)
    yl = y[:, 1]
    lat = metrics.laterality_report(y[:, 0], s[:, 0], 0.0, yl, 1 - yl, s[:, 1], s[:, 2], n_boot=B, seed=seed,
                                    groups=groups)
    one = (y[:, 0] == 1) & (s[:, 0] >= 0.0)
    right = np.where(yl == 1, s[:, 1] > s[:, 2], s[:, 2] > s[:, 1])
    accs = [right[i][one[i]].mean() for i in cohorts if one[i].any()]
    np.testing.assert_allclose(lat["accuracy_ci"], np.percentile(accs, [2.5, 97.5]), atol=1e-12)
    grid = np.linspace(0, 1, 11)
    _, lo, hi, nv = metrics.roc_band(y[:, 0], s[:, 0], n_boot=B, seed=seed, fpr_grid=grid, groups=groups)
    curves = []
    for idx in cohorts:
        if 0 < y[idx, 0].sum() < len(idx):
            fpr, tpr, _ = roc_curve(y[idx, 0], s[idx, 0], drop_intermediate=False)
            curves.append([tpr[fpr <= x].max() for x in grid])
    assert nv == len(curves)
    np.testing.assert_allclose(lo, np.percentile(curves, 2.5, axis=0), atol=1e-12)
    np.testing.assert_allclose(hi, np.percentile(curves, 97.5, axis=0), atol=1e-12)


def test_duplicated_studies_narrow_the_study_level_ci_but_not_the_subject_level_one():
    """Every study copied twice under its subject's id carries no new information: a study-level
    bootstrap treats the copies as independent and its CIs narrow (~1/sqrt 2); the subject-level
    bootstrap of the copies gives back the original data's (study-level) CIs."""
    y, s = _data(n=70, K=2, seed=3)
    thr = np.array([0.5, 0.5])
    B, seed = 300, 2
    y2, s2, subj = np.repeat(y, 2, 0), np.repeat(s, 2, 0), np.repeat([f"p{i}" for i in range(70)], 2)
    orig = metrics.bootstrap(y, s, thr, n_boot=B, seed=seed)
    naive = metrics.bootstrap(y2, s2, thr, n_boot=B, seed=seed)
    clus = metrics.bootstrap(y2, s2, thr, n_boot=B, seed=seed, groups=subj)
    for m in ("auroc", "sensitivity", "specificity", "balanced_accuracy"):
        for f in ("low", "high"):
            np.testing.assert_allclose(clus[m][f], orig[m][f], rtol=0, atol=1e-12)
        for f in ("macro_low", "macro_high"):
            assert clus[m][f] == pytest.approx(orig[m][f], abs=1e-12)
        width = lambda c: c[m]["high"] - c[m]["low"]   # noqa: E731
        assert (width(naive) < 0.85 * width(orig)).all(), m
    pr, pr2 = metrics.pr_report(y, s, n_boot=B, seed=seed), metrics.pr_report(y2, s2, n_boot=B, seed=seed, groups=subj)
    for f in ("auprc_low", "auprc_high", "pr_lift_low", "pr_lift_high"):
        np.testing.assert_allclose(pr2[f], pr[f], rtol=0, atol=1e-12)
    reg = metrics.regression_report(s[:, 0], s[:, 1], n_boot=B, seed=seed)
    reg2 = metrics.regression_report(s2[:, 0], s2[:, 1], n_boot=B, seed=seed, groups=subj)
    naive_reg = metrics.regression_report(s2[:, 0], s2[:, 1], n_boot=B, seed=seed)
    for f in ("mae_ci", "rmse_ci", "pearson_r_ci", "bias_ci"):
        np.testing.assert_allclose(reg2[f], reg[f], rtol=0, atol=1e-9)
        assert np.diff(naive_reg[f])[0] < 0.85 * np.diff(reg[f])[0]
    _, lo, hi, _ = metrics.roc_band(y[:, 0], s[:, 0], n_boot=B, seed=seed)
    _, lo2, hi2, _ = metrics.roc_band(y2[:, 0], s2[:, 0], n_boot=B, seed=seed, groups=subj)
    np.testing.assert_allclose(np.c_[lo2, hi2], np.c_[lo, hi], atol=1e-12)


def test_platt_slope_of_a_class_without_positives_or_negatives_is_exactly_zero():
    """Consumers read Platt a == 0 (with threshold 0) as 'no calibration fitted' (evaluate.py for probes
    without sel_labels, train_llava.py's youden rule), but Newton's method left a ~1e-26 for about half of
    such classes, which then counted as fitted. Hand-worked optimum: all smoothed targets equal t, so the
    constant p = t, i.e. a = 0 and b = logit(t) = log((N+ + 1) / (N- + 1)); a defined class still as sklearn's."""
    from sklearn.calibration import _sigmoid_calibration
    rng = np.random.default_rng(0)
    n, K = 37, 40
    s = (rng.normal(size=(n, K)) * rng.choice([0.1, 3, 50], K) + rng.choice([0, -7], K)).astype(np.float32)
    y = np.zeros((n, K))
    y[:, K // 2:] = 1                       # columns 0..19 without positives, 20..39 without negatives
    y[:5, 0] = 1                            # column 0 defined
    a, b = metrics.platt_fit(s.astype(np.float64), y)
    assert (a[1:] == 0).all()
    np.testing.assert_allclose(b[1:K // 2], -np.log(n + 1), rtol=1e-12)
    np.testing.assert_allclose(b[K // 2:], np.log(n + 1), rtol=1e-12)
    ra, rb = _sigmoid_calibration(s[:, 0].astype(np.float64), y[:, 0])
    assert a[0] == pytest.approx(-ra, rel=1e-3, abs=1e-4) and b[0] == pytest.approx(-rb, rel=1e-3, abs=1e-4)


def test_precision_thresholds_of_an_empty_selection_split_never_call():
    """A probe trained without a validation split stores a (0, K) selection split: every class is
    undefined there and gets +inf (never called), where _check raised 'no studies' (a traceback in
    train_llava.py's precision rule). Other metrics of an empty split still raise."""
    thr = metrics.precision_thresholds(np.zeros((0, 3), np.uint8), np.zeros((0, 3), np.float32), 0.5)
    assert thr.shape == (3,) and np.isposinf(thr).all()
    with pytest.raises(ValueError, match="same shape"):
        metrics.precision_thresholds(np.zeros((0, 3)), np.zeros((0, 2)), 0.5)
    with pytest.raises(ValueError, match="no studies"):
        metrics.youden_thresholds(np.zeros((0, 3)), np.zeros((0, 3)))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("clustered", [False, True])
def test_unfitted_classes_leave_the_threshold_macros_of_one_bootstrap(backend, clustered):
    """A class whose threshold was never fitted (no positives on the selection split) has no
    operating point: evaluate.py ran a second bootstrap over the fitted classes for the threshold
    macros. classification_report(fitted=) / bootstrap(fitted=) give every figure from one: against
    numpy on explicitly resampled cohorts (sklearn AUROC), the unfitted class's threshold figures
    null, its AUROC kept, and the macros over the fitted defined classes only (the rare unfitted
    class, undefined in many replicates, does not drop them)."""
    rng = np.random.default_rng(11)
    n, K, B, seed = 40, 4, 300, 5
    y = (rng.random((n, K)) < [0.4, 0.08, 0.5, 0.3]).astype(int)
    y[:, 1], y[:2, 1] = 0, 1                                                     # class 1: rare, 2 positives
    s = np.round(y * 1.1 + rng.normal(size=(n, K)), 1)
    thr = np.array([0.3, 0.0, 0.6, -0.2])
    fitted = np.array([True, False, True, True])
    groups = [f"subj{j}" for j in rng.integers(0, 15, n)] if clustered else None
    cohorts = (_cluster_cohorts(groups, B, seed) if clustered else
               [np.repeat(np.arange(n), c) for c in metrics.bootstrap_counts(n, B, seed=seed).long().numpy().T])
    reps = {m: np.full((B, K), np.nan) for m in ("auroc", "sensitivity", "specificity", "balanced_accuracy")}
    for r, idx in enumerate(cohorts):
        for k in range(K):
            yy, pred = y[idx, k], s[idx, k] >= thr[k]
            if 0 < yy.sum() < len(yy):
                reps["auroc"][r, k] = roc_auc_score(yy, s[idx, k])
                if fitted[k]:
                    se, sp = pred[yy == 1].mean(), (~pred[yy == 0]).mean()
                    reps["sensitivity"][r, k], reps["specificity"][r, k] = se, sp
                    reps["balanced_accuracy"][r, k] = (se + sp) / 2
    assert np.isnan(reps["auroc"][:, 1]).sum() > 5      # the unfitted class is undefined in some replicates
    ci = metrics.bootstrap(y, s, thr, n_boot=B, seed=seed, backend=backend, groups=groups, fitted=fitted)
    rep = metrics.classification_report(y, s, thr, [f"c{k}" for k in range(K)], n_boot=B, seed=seed,
                                        groups=groups, fitted=fitted)
    for m, r in reps.items():
        use = [0, 1, 2, 3] if m == "auroc" else [0, 2, 3]
        np.testing.assert_array_equal(ci[m]["n_valid"], np.isfinite(r).sum(0))
        full = np.isfinite(r[:, use]).all(1)
        lo, hi = np.percentile(r[full][:, use].mean(1), [2.5, 97.5])
        assert ci[m]["macro_n_valid"] == full.sum() == rep["macro"][m]["ci_n_valid"]
        assert [ci[m]["macro_low"], ci[m]["macro_high"]] == pytest.approx([lo, hi], abs=1e-12)
        assert rep["macro"][m]["ci"] == pytest.approx([lo, hi], abs=1e-12)
        for k in use:
            lo, hi = np.percentile(r[np.isfinite(r[:, k]), k], [2.5, 97.5])
            assert rep["per_class"][f"c{k}"][m + "_ci"] == pytest.approx([lo, hi], abs=1e-12)
    pred = s >= thr
    sens = [pred[y[:, k] == 1, k].mean() for k in range(K)]
    spec = [(~pred[y[:, k] == 0, k]).mean() for k in range(K)]
    u = rep["per_class"]["c1"]
    assert not u["threshold_fitted"] and rep["per_class"]["c0"]["threshold_fitted"]
    assert u["sensitivity"] is u["specificity"] is u["balanced_accuracy"] is None
    assert u["sensitivity_ci"] == [None, None] and u["ci_n_valid"]["sensitivity"] == 0
    assert u["auroc"] == pytest.approx(roc_auc_score(y[:, 1], s[:, 1]), abs=1e-12)
    assert rep["macro"]["sensitivity"] == {"mean": pytest.approx(np.mean([sens[k] for k in (0, 2, 3)])),
                                           "n_classes": 3, "ci": rep["macro"]["sensitivity"]["ci"],
                                           "ci_n_valid": rep["macro"]["sensitivity"]["ci_n_valid"]}
    assert rep["macro"]["specificity"]["mean"] == pytest.approx(np.mean([spec[k] for k in (0, 2, 3)]))
    assert rep["macro"]["auroc"]["n_classes"] == 4
    # calibrated F1 of an unfitted class (its Platt fit is the prior) is null too, and out of its macro
    prob = 1 / (1 + np.exp(-s))
    metrics.add_calibrated_f1(rep, y, prob, [5, 2, 9, 4], fitted=fitted)
    assert u["calibrated_f1"] is None
    assert rep["macro"]["calibrated_f1"] == {"mean": pytest.approx(np.mean([f1_score(y[:, k], prob[:, k] >= 0.5)
                                                                            for k in (0, 2, 3)])), "n_classes": 3}
    with pytest.raises(ValueError, match=r"fitted: a \(K,\) = \(4,\) bool mask"):
        metrics.bootstrap(y, s, thr, n_boot=B, fitted=[1, 0, 1, 1])
