"""Diagnostic metrics with study-level (or subject-level cluster) bootstrap confidence intervals.

Conventions
- y (n, K) 0/1 labels, scores (n, K) real-valued (logits or probabilities; only their
  order matters for AUROC), one row per study, one column per class.
- A class is *undefined* in a split when it has no positives or no negatives there: its
  AUROC / sensitivity / specificity are NaN in per-class arrays, reported as null (JSON)
  or "undefined" (tables), and skipped by every macro average (`macro`), which also
  returns how many classes it averaged. A NaN never enters an average.
- Bootstrap: resample studies (or subjects, below) with replacement, the same resample for every class (so
  macro-average CIs are honest). A replicate where a class has no positives or no negatives
  is undefined for that class and left out of that class's percentiles, and out of the macro
  percentiles: a macro replicate averages every class of the macro point estimate, or is left
  out (`bootstrap`, macro_n_valid).
- Cluster bootstrap (`groups=`, every CI entry point): when studies carry group (subject) ids
  and some group holds two or more studies, the replicates resample GROUPS with replacement
  and each drawn group brings all its studies: replicate r's study weights are the group
  counts `bootstrap_counts(G, ...)` over the G groups expanded to their studies,
  w_study = counts[group_index] (`bootstrap_weights`, `group_index`). A subject's studies are
  correlated, so resampling them one by one gives intervals that are too narrow. groups=None,
  or ids all distinct, is the study-level bootstrap exactly (the same replicates and numbers).

Speed: one bootstrap replicate is a vector of multinomial counts w (n,) over studies (or group
counts expanded to studies), and every statistic is a weighted statistic of the original
data under w. AUROC under weights
w is sum_{i pos} w_i * (negative weight ranked below i, ties counting half) / (W+ W-).
Two implementations (`bootstrap(..., backend=)`), same numbers for the same seed:
- "cpp" (CPU, default when nvfm._C is built): csrc/bootstrap.cpp walks each class's studies
  in score order once per chunk of 64 replicates, keeping all 64 running negative weights;
  exact integer arithmetic; threshold counts from the same walk (score >= t is a suffix).
- "reference" (plain PyTorch, any device; NVFM_OPS=reference or no build): each negative's
  weight is binned by how many positives it beats (all classes at once: one sparse
  (bins, n) @ dense (n, B) product), a cumsum over the positive bins gives all B replicates
  at once; threshold statistics are one (B, n) @ (n, 4K) matmul (float64: counts stay exact).
A cluster bootstrap (grouped studies) runs on either: the kernel takes each study's group and
draws the G group counts itself (its walk reads a study's weight from its group's count); the
reference expands `bootstrap_counts(G, ...)` to the studies.
Bootstrap counts come from a counter-based generator (`bootstrap_counts`; SplitMix64 hash
of (seed, replicate, draw), spelled out in csrc/bootstrap.cpp), so a seed gives the same
replicates on either backend and whatever the thread count or chunking. (Before the C++
kernel, the counts came from torch.randint: the same seed now gives different, equally
valid, intervals than those older runs.)
"""
import math
import warnings

import numpy as np
import torch

from nvfm import ops

ops.register("bootstrap_stats")

# ----------------------------------------------------------------------------- point metrics


def _as2d(a, dtype=np.float64):
    a = np.asarray(a, dtype=dtype)
    return a[:, None] if a.ndim == 1 else a


def _check(y, scores):
    y, s = _as2d(y), _as2d(scores)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must have the same shape (n, K)")
    if y.shape[0] == 0:
        raise ValueError("no studies (n = 0): the metrics are undefined")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1 (use a mask to drop unknown labels first)")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return y, s


def defined_classes(y):
    """(K,) bool: classes with at least one positive and one negative."""
    y = _as2d(y)
    npos = y.sum(0)
    return (npos > 0) & (npos < y.shape[0])


def _auroc_plan(y, s):
    """Per class: where each study's weight goes in the weighted Mann-Whitney sum.

    Positives are sorted ascending (index i). A negative j is strictly below positive i iff
    i >= a_j (a_j = positives scoring <= s_j) and below-or-tied iff i >= c_j (c_j = positives
    scoring < s_j), in 0..npos. Positives go to the extra bin npos + 1. Returns pos (npos,) study indices in
    ascending score order, a (n,), c (n,) bins, or c = None when no negative ties a positive.
    """
    y = y > 0
    pos = np.nonzero(y)[0]
    pos = pos[np.argsort(s[pos], kind="stable")]
    spos = s[pos]
    a = np.searchsorted(spos, s, side="right")
    c = np.searchsorted(spos, s, side="left")
    a[y] = c[y] = len(pos) + 1
    return pos, a, (None if np.array_equal(a, c) else c)


def _weighted_auroc(w, pos, a, c, total=None):
    """AUROC of one class under B weight vectors at once.

    w (n, B) float study weights (bootstrap counts; ones for the point estimate); plan from
    `_auroc_plan` as tensors; total (B,) = w.sum(0) if known. One index_add pass over w
    bins the negatives' weights by how many positives they beat; a small cumsum over the
    npos bins then gives, for every positive, the negative weight ranked below it (ties
    count half). Returns (B,), NaN where a replicate has W+ = 0 or W- = 0.
    """
    npos, B = len(pos), w.shape[1]
    H = torch.zeros(npos + 2, B, dtype=w.dtype, device=w.device).index_add_(0, a, w)
    below = torch.cumsum(H[:npos], 0)
    if c is not None:
        Hc = torch.zeros(npos + 2, B, dtype=w.dtype, device=w.device).index_add_(0, c, w)
        below = 0.5 * (below + torch.cumsum(Hc[:npos], 0))
    wp = w[pos]                                                      # (npos, B)
    num = (wp * below).sum(0)
    Wp = H[npos + 1]                                                   # positives' weight
    Wn = (w.sum(0) if total is None else total) - Wp
    den = Wp * Wn
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))


class _AurocBatch:
    """All classes' weighted AUROCs from one sparse matmul per bootstrap chunk.

    Stacks every class's binning (`_auroc_plan`) as rows of one CSR matrix S (bins, n), so
    H = S @ w bins all classes at once (one pass of a CSR x dense product instead of K
    index_add passes: ~5x faster on CPU; cuSPARSE on GPU). plans: {k: (pos, a, c)} numpy.
    """

    def __init__(self, plans, n, device):
        rows, self.meta, off = [], [], 0
        for k, (pos, a, c) in plans.items():
            nb = len(pos) + 2
            rows.append(a + off)
            co = None
            if c is not None:
                rows.append(c + off + nb)
                co = off + nb
            self.meta.append((k, torch.from_numpy(pos).to(device), off, co))
            off += nb * (2 if c is not None else 1)
        r = torch.from_numpy(np.concatenate(rows)) if rows else torch.zeros(0, dtype=torch.int64)
        cols = torch.arange(n).repeat(len(rows))
        order = torch.argsort(r * n + cols)
        crow = torch.zeros(off + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(r, minlength=off), 0)
        with warnings.catch_warnings():   # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            self.S = torch.sparse_csr_tensor(crow, cols[order], torch.ones(len(r), dtype=torch.float64),
                                             size=(off, n)).to(device)

    def __call__(self, w, total):
        """w (n, B) float64 -> dict k -> (B,) AUROC (NaN where undefined in a replicate)."""
        w = w.to(torch.float64)
        total = total.to(torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            H_all = torch.sparse.mm(self.S, w) if self.S.shape[0] else None
        out = {}
        for k, pos, off, co in self.meta:
            npos = len(pos)
            H = H_all[off:off + npos + 2]
            below = torch.cumsum(H[:npos], 0)
            if co is not None:
                below = 0.5 * (below + torch.cumsum(H_all[co:co + npos], 0))
            num = (w[pos] * below).sum(0)
            Wp = H[npos + 1]
            den = Wp * (total - Wp)
            out[k] = torch.where(den > 0, num / den.clamp_min(1e-30), torch.full_like(num, float("nan")))
        return out


def _plan_tensors(y, s, k, device="cpu"):
    return [None if a is None else torch.from_numpy(a).to(device) for a in _auroc_plan(y[:, k], s[:, k])]


def auroc(y, scores):
    """Per-class AUROC (K,) float64 (NaN = undefined: no positives or no negatives).
    Ties count one half (same as sklearn.metrics.roc_auc_score)."""
    y, s = _check(y, scores)
    out = np.full(y.shape[1], np.nan)
    w = torch.ones(y.shape[0], 1, dtype=torch.float64)
    for k in np.nonzero(defined_classes(y))[0]:
        out[k] = _weighted_auroc(w, *_plan_tensors(y, s, k))[0].item()
    return out


def threshold_stats(y, scores, thresholds):
    """Sensitivity, specificity, balanced accuracy at per-class thresholds (predict positive
    when score >= threshold). Returns dict of (K,) float64, NaN for undefined classes (all three,
    even the specificity of a class with negatives but no positives)."""
    y, s = _check(y, scores)
    thr = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (s.shape[1],))
    pred = s >= thr
    pos, neg = y > 0, y == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (pred & pos).sum(0) / pos.sum(0)
        spec = (~pred & neg).sum(0) / neg.sum(0)
    # an undefined class (no positives or no negatives) is NaN in all three, as in `bootstrap`,
    # so a macro average and its CI cover the same classes
    ok = defined_classes(y)
    sens = np.where(ok, sens, np.nan)
    spec = np.where(ok, spec, np.nan)
    bacc = np.where(ok, 0.5 * (sens + spec), np.nan)
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": bacc}


def youden_thresholds(y, scores):
    """Per-class threshold maximising balanced accuracy (Youden's J) on the given split
    (use validation only). Undefined classes get threshold 0.0 for logits.
    Returns (K,) float64; predict positive when score >= threshold."""
    y, s = _check(y, scores)
    K = y.shape[1]
    out = np.zeros(K)
    for k in np.nonzero(defined_classes(y))[0]:
        order = np.argsort(-s[:, k], kind="stable")
        ss, yy = s[order, k], y[order, k]
        tp = np.cumsum(yy)
        fp = np.cumsum(1 - yy)
        last = np.r_[ss[1:] != ss[:-1], True]                         # cut only between distinct scores
        j = tp[last] / tp[-1] - fp[last] / fp[-1]
        out[k] = ss[last][int(np.argmax(j))]
    return out


def precision_thresholds(y, scores, target=0.5, min_tp=2):
    """Per-class threshold for a precision-first operating point, fitted on the given split
    (use validation only): the lowest cut whose precision (positive predictive value) on that
    split is at least `target` with at least `min_tp` true positives above it, so the most
    sensitive cut that is still right `target` of the time. A class with no such cut (or
    undefined: no positives or no negatives, as every class of an empty split, n = 0) gets +inf:
    never called positive.

    Youden's J (youden_thresholds) weighs a missed positive and a false alarm alike, which for a
    rare class puts the cut low and calls many false positives; appending such calls to a
    report is a hallucination, so the probe cross-check uses this rule instead.
    Returns (K,) float64; predict positive when score >= threshold."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"precision target must be in (0, 1], got {target}")
    if np.shape(y)[0] == 0 and np.shape(y) == np.shape(scores):   # no selection split (train_probe.py): nothing fitted
        return np.full(_as2d(y).shape[1], np.inf)
    y, s = _check(y, scores)
    out = np.full(y.shape[1], np.inf)
    for k in np.nonzero(defined_classes(y))[0]:
        order = np.argsort(-s[:, k], kind="stable")
        ss, yy = s[order, k], y[order, k]
        tp = np.cumsum(yy)
        n = np.arange(1, len(yy) + 1)
        last = np.r_[ss[1:] != ss[:-1], True]                         # cut only between distinct scores
        ok = last & (tp >= min_tp) & (tp >= target * n - 1e-12)
        if ok.any():
            out[k] = ss[np.nonzero(ok)[0][-1]]
    return out


def _check01(a, what):
    a = _as2d(a)
    if a.shape[0] == 0:
        raise ValueError(f"no studies (n = 0): {what} undefined")
    if not np.isin(a, (0, 1)).all():
        raise ValueError(f"{what}: labels and predictions must be 0/1 (got values {np.unique(a)[:5].tolist()})")
    return a > 0


def f1(y, pred):
    """Per-class F1 (K,) of 0/1 predictions (as sklearn's f1_score with zero_division=nan); NaN
    when there are no positives and no predicted positives (F1 undefined)."""
    y, p = _check01(y, "F1"), _check01(pred, "F1")
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predictions {p.shape} must have the same shape (n, K)")
    tp = (y & p).sum(0)
    denom = 2 * tp + (p & ~y).sum(0) + (y & ~p).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def f1_defined(y, pred):
    """Per-class F1 (K,), NaN for classes with no positives or no negatives in y (`defined_classes`):
    without positives F1 is 0 after a single false positive and 1 or undefined otherwise, without
    negatives calling every study positive scores 1; neither says anything about the classifier, so
    such classes stay out of macro averages (like the undefined classes of AUROC)."""
    out = f1(y, pred)
    return np.where(defined_classes(y), out, np.nan)


def macro(values):
    """Mean over defined (finite) entries and how many there were: (mean or None, n_defined)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    return (float(v[ok].mean()) if ok.any() else None), int(ok.sum())


def _residuals(y, pred):
    y, p = np.asarray(y, np.float64), np.asarray(pred, np.float64)
    if y.shape != p.shape:
        raise ValueError(f"targets {y.shape} and predictions {p.shape} must have the same shape")
    if y.size == 0:
        raise ValueError("no studies (n = 0): the error is undefined")
    return y - p


def mae(y, pred):
    return float(np.mean(np.abs(_residuals(y, pred))))


def rmse(y, pred):
    return float(np.sqrt(np.mean(_residuals(y, pred) ** 2)))


# ----------------------------------------------------------------------------- calibration


def platt_fit(scores, y, iters=100):
    """Platt scaling per class, with Platt's smoothed targets (N+ + 1)/(N+ + 2) and
    1/(N- + 2) so separable classes stay finite. Newton's method, all classes at once.

    scores, y (n, K). Returns a, b (K,) with p = sigmoid(a * score + b). Classes with no
    positives or no negatives get exactly a = 0 and b = the logit of their smoothed target (the
    prior, the fit's optimum): consumers read a == 0 as "no calibration fitted".
    """
    s, y = _as2d(scores), _as2d(y)
    npos, nneg = y.sum(0), (1 - y).sum(0)
    undefined = ~defined_classes(y)
    t = np.where(y > 0, (npos + 1) / (npos + 2), 1 / (nneg + 2))      # (n, K)
    scale = np.maximum(np.abs(s).max(0), 1.0)                         # conditioning only
    x = s / scale
    a = np.zeros(s.shape[1])
    b = np.log((npos + 1) / (nneg + 1))
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(a * x + b)))
        g = p - t
        w = np.maximum(p * (1 - p), 1e-12)
        ga, gb = (g * x).sum(0), g.sum(0)
        haa, hab, hbb = (w * x * x).sum(0) + 1e-12, (w * x).sum(0), w.sum(0) + 1e-12
        det = haa * hbb - hab * hab
        da = (hbb * ga - hab * gb) / det
        db = (haa * gb - hab * ga) / det
        a, b = a - da, b - db
        if np.max(np.abs(da)) + np.max(np.abs(db)) < 1e-10:
            break
    # Newton leaves a ~1e-26 instead of 0 there, which read as a fitted slope
    return np.where(undefined, 0.0, a / scale), np.where(undefined, np.log((npos + 1) / (nneg + 1)), b)


def platt_apply(scores, a, b):
    return 1 / (1 + np.exp(-(_as2d(scores) * a + b)))


def calibrated_f1(val_scores, val_y, test_scores, test_y):
    """Platt-calibrate on validation, predict positive on test when p >= 0.5, F1 per class
    (NaN for classes with no test positives or no test negatives, `f1_defined`)."""
    a, b = platt_fit(val_scores, val_y)
    return f1_defined(test_y, platt_apply(test_scores, a, b) >= 0.5)


def add_calibrated_f1(report, y, prob, n_train_pos, fitted=None):
    """Add Platt-calibrated F1 (predict positive when prob >= 0.5) to a `classification_report`:
    per class (null without test positives or without test negatives: an undefined class), its
    macro mean over the defined classes, and the label-efficiency fit over those classes. y, prob
    (n, K); n_train_pos (K,); fitted (K,) bool: the classes with a fitted calibration (None: all),
    the others null (their Platt fit is the prior, a placeholder). Returns report (modified in place, JSON-ready).
    per_class rows are matched to the columns of y by position: their number must be K."""
    cf1 = f1_defined(y, _as2d(prob) >= 0.5)
    cf1 = np.where(_class_mask(fitted, len(cf1)), cf1, np.nan)
    if len(report["per_class"]) != len(cf1) or len(n_train_pos) != len(cf1):
        raise ValueError(f"{len(report['per_class'])} per_class rows and {len(n_train_pos)} training counts for "
                         f"{len(cf1)} columns: one of each per class")
    for k, name in enumerate(report["per_class"]):
        report["per_class"][name]["calibrated_f1"] = jsonable(cf1[k])
        report["per_class"][name]["n_train_pos"] = int(n_train_pos[k])
    report["macro"]["calibrated_f1"] = dict(zip(("mean", "n_classes"), macro(cf1)))
    report["label_efficiency"] = jsonable(label_efficiency_fit(n_train_pos, cf1))
    return report


def label_efficiency_fit(n_pos, f1_values):
    """OLS of F1 on log10(number of training positives), over classes with n_pos > 0 and a
    finite F1. Returns dict(slope, intercept, r2, n) (None values when fewer than 3 points)."""
    x = np.asarray(n_pos, np.float64)
    yv = np.asarray(f1_values, np.float64)
    ok = (x > 0) & np.isfinite(yv)
    x, yv = np.log10(x[ok]), yv[ok]
    if len(x) < 3 or np.ptp(x) == 0:
        return {"slope": None, "intercept": None, "r2": None, "n": int(len(x))}
    xm, ym = x.mean(), yv.mean()
    slope = ((x - xm) * (yv - ym)).sum() / ((x - xm) ** 2).sum()
    intercept = ym - slope * xm
    ss_res = ((yv - (intercept + slope * x)) ** 2).sum()
    ss_tot = ((yv - ym) ** 2).sum()
    r2 = 1 - ss_res / ss_tot if ss_tot > 0 else None
    return {"slope": float(slope), "intercept": float(intercept),
            "r2": None if r2 is None else float(r2), "n": int(len(x))}


# ----------------------------------------------------------------------------- bootstrap


# Counter-based generator of csrc/bootstrap.cpp, in torch int64 (wrap-around multiplication,
# logical right shifts by masking): replicate r's key is mix64(seed + (r + 1) * G_REP); its
# draws 2p, 2p + 1 are the high and low 32 bits u of mix64(key + (p + 1) * G_DRAW), mapped to
# study (u * n) >> 32.
def _s64(x):
    """Python int -> the int64 with the same low 64 bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


_MIX1, _MIX2 = _s64(0xBF58476D1CE4E5B9), _s64(0x94D049BB133111EB)
_G_REP, _G_DRAW = _s64(0x9E3779B97F4A7C15), _s64(0xD1B54A32D192ED03)


def _mix64(z):
    """SplitMix64 finalizer on int64 tensors read as uint64."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def _bootstrap_counts_reference(n, r0, b, seed, device="cpu"):
    """(n, b) float32 counts of replicates r0 .. r0 + b - 1 (plain torch, any device)."""
    r = torch.arange(r0, r0 + b, dtype=torch.int64, device=device)
    key = _mix64((r + 1) * _G_REP + _s64(seed))                                  # (b,)
    p = torch.arange((n + 1) // 2, dtype=torch.int64, device=device)
    u = _mix64(key[None, :] + ((p + 1) * _G_DRAW)[:, None])                      # (ceil(n/2), b)
    u = torch.stack([(u >> 32) & 0xFFFFFFFF, u & 0xFFFFFFFF], 1).reshape(-1, b)[:n]  # draw 2p, 2p + 1
    idx = (u * n) >> 32
    return torch.zeros(n, b, dtype=torch.float32, device=device).scatter_add_(
        0, idx, torch.ones(n, b, dtype=torch.float32, device=device))


def _resolve_backend(backend, device):
    if backend is None:
        return ops.backend("bootstrap_stats", device)
    if backend not in ("cpp", "reference"):
        raise ValueError(f"bootstrap backend must be 'cpp', 'reference' or None, got {backend!r}")
    if backend == "cpp" and ops.backend("bootstrap_stats", device) != "cpp":
        raise ValueError(f"bootstrap backend 'cpp' needs the compiled nvfm._C and device cpu (got {device})")
    return backend


def bootstrap_counts(n, n_boot, seed=0, r0=0, device="cpu", backend=None):
    """(n, n_boot) float32 multinomial counts of replicates r0 .. r0 + n_boot - 1: each column
    resamples n studies with replacement (counts per study; columns sum to n). The replicates
    `bootstrap` uses for this seed, whichever backend computes them."""
    if _resolve_backend(backend, device) == "cpp":
        return torch.ops.nvfm.bootstrap_counts(n, r0, n_boot, _s64(seed)).float()
    return _bootstrap_counts_reference(n, r0, n_boot, seed, device)


def group_index(groups, n=None):
    """Groups (subjects) of a cluster bootstrap: (G, index) with index (n,) int64 the group number
    (0 .. G-1, in order of first appearance) of each study, or None when there is nothing to
    cluster: groups None, or every study its own group (the study-level bootstrap).

    groups: (n,) hashable group ids, one per study; an id of None, "" or NaN (no subject recorded)
    makes that study its own group (as nvfm.probe's subject-grouped folds do). n: the number of
    studies, checked against len(groups) when given."""
    if groups is None:
        return None
    g = list(np.asarray(groups, dtype=object).ravel()) if not isinstance(groups, (list, tuple)) else list(groups)
    if n is not None and len(g) != n:
        raise ValueError(f"groups: {len(g)} group ids for {n} studies: one per study")
    codes, idx = {}, np.empty(len(g), dtype=np.int64)
    for i, v in enumerate(g):
        if isinstance(v, np.generic):
            v = v.item()
        # NaN (a blank cell read by pandas) is no subject too: NaN objects that happen to be one object
        # (np.nan) were one key, so every study without a subject became one big subject
        missing = v is None or (isinstance(v, str) and v == "") or (isinstance(v, float) and math.isnan(v))
        key = ("", i) if missing else (1, v)
        idx[i] = codes.setdefault(key, len(codes))
    if len(codes) == len(g):
        return None
    return len(codes), idx


def bootstrap_weights(n, n_boot, seed=0, r0=0, groups=None, device="cpu", backend=None):
    """(n, n_boot) float32 study weights of replicates r0 .. r0 + n_boot - 1, those of every CI here.

    Study-level (groups None, or all ids distinct): `bootstrap_counts(n, ...)`, the same tensor.
    Cluster bootstrap (some group holds several studies; groups (n,) ids as in `group_index`):
    the G groups are resampled with replacement and a drawn group brings all its
    studies, w_study = bootstrap_counts(G, ...)[index]; a column sums to the resampled cohort's size,
    which varies with the groups drawn."""
    return _weights(n, n_boot, seed, r0, group_index(groups, n), device, backend)


def _weights(n, n_boot, seed, r0, grp, device="cpu", backend=None):
    """`bootstrap_weights` given grp = group_index(groups, n) (None: study counts)."""
    if grp is None:
        return bootstrap_counts(n, n_boot, seed=seed, r0=r0, device=device, backend=backend)
    G, idx = grp
    c = bootstrap_counts(G, n_boot, seed=seed, r0=r0, device=device, backend=backend)
    return c[torch.from_numpy(idx).to(c.device)]


def _replicates_cpp(y, s, thr, n_boot, seed, defined, grp=None):
    """Per-replicate metrics from the C++ kernel: dict metric -> (n_boot, K) float64.
    grp: `group_index` (G, index) of a cluster bootstrap (the kernel draws the G group counts and
    weighs each study by its group's); None: study counts."""
    n, K = y.shape
    cols = np.nonzero(defined)[0]
    out = {m: np.full((n_boot, K), np.nan)
           for m in ("auroc", "sensitivity", "specificity", "balanced_accuracy")}
    if len(cols) == 0:
        return out
    st = torch.ops.nvfm.bootstrap_stats(
        torch.from_numpy(np.ascontiguousarray(y[:, cols], dtype=np.uint8)),
        torch.from_numpy(np.ascontiguousarray(s[:, cols], dtype=np.float64)),
        torch.from_numpy(np.ascontiguousarray(thr[cols], dtype=np.float64)), 0, n_boot, _s64(seed),
        *(() if grp is None else (torch.from_numpy(np.ascontiguousarray(grp[1], dtype=np.int64)), grp[0]))).numpy()
    num, P, N, TP, TN = np.moveaxis(st, 2, 0)                            # (n_boot, len(cols)) each
    ok = P * N > 0   # a replicate without positives or negatives: all four undefined, as in the point estimates
    with np.errstate(invalid="ignore", divide="ignore"):
        au = np.where(ok, num / (P * N), np.nan)
        sens = np.where(ok, TP / P, np.nan)
        spec = np.where(ok, TN / N, np.nan)
    for m, v in [("auroc", au), ("sensitivity", sens), ("specificity", spec), ("balanced_accuracy", 0.5 * (sens + spec))]:
        out[m][:, cols] = v
    return out


def _replicates_reference(y, s, thr, n_boot, seed, defined, device, chunk_elems, progress, grp=None):
    """Per-replicate metrics in plain torch (any device): dict metric -> (n_boot, K) float64
    (float64 throughout: integer counts stay exact, so a CI end is a plain ratio, not 0.8000000119).
    grp: `group_index` (G, index) of a cluster bootstrap, whose group counts `bootstrap_counts(G)`
    are expanded to the studies; None: study counts."""
    n, K = y.shape
    dev = torch.device(device)
    batch = _AurocBatch({k: _auroc_plan(y[:, k], s[:, k]) for k in np.nonzero(defined)[0]}, n, dev)
    pred, pos = s >= thr, y > 0
    # columns: TP, positives, TN, negatives -> one matmul per chunk for all classes
    M = torch.from_numpy(np.concatenate([pred & pos, pos, ~pred & ~pos, ~pos], 1).astype(np.float64)).to(dev)
    reps = {m: np.full((n_boot, K), np.nan)
            for m in ("auroc", "sensitivity", "specificity", "balanced_accuracy")}
    b = max(1, min(n_boot, chunk_elems // max(n, 1)))
    starts = range(0, n_boot, b)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="bootstrap", unit="chunk")
    for r0 in starts:
        bb = min(b, n_boot - r0)
        w = (_bootstrap_counts_reference(n, r0, bb, seed, dev) if grp is None
             else _weights(n, bb, seed, r0, grp, dev, "reference")).double()
        for k, v in batch(w, w.sum(0)).items():
            reps["auroc"][r0:r0 + bb, k] = v.cpu().numpy()
        c = w.T @ M
        tp, p, tn, ng = c[:, :K], c[:, K:2 * K], c[:, 2 * K:3 * K], c[:, 3 * K:]
        nan = torch.tensor(float("nan"), dtype=c.dtype, device=dev)
        ok = (p > 0) & (ng > 0)   # no positives or no negatives: undefined, as AUROC (and the point estimates)
        sens = torch.where(ok, tp / p.clamp_min(1), nan)
        spec = torch.where(ok, tn / ng.clamp_min(1), nan)
        reps["sensitivity"][r0:r0 + bb] = sens.cpu().numpy()
        reps["specificity"][r0:r0 + bb] = spec.cpu().numpy()
        reps["balanced_accuracy"][r0:r0 + bb] = (0.5 * (sens + spec)).cpu().numpy()
    return reps


MIN_BOOT = 100   # fewest defined replicates for a percentile interval


def _class_mask(mask, K, what="fitted"):
    """(K,) bool per-class mask named `what` (fitted thresholds, scored classes); None: all of them."""
    if mask is None:
        return np.ones(K, dtype=bool)
    f = np.asarray(mask)
    if f.shape != (K,) or f.dtype != bool:
        raise ValueError(f"{what}: a (K,) = ({K},) bool mask over the classes, got {f.dtype} {f.shape}")
    return f


def bootstrap(y, scores, thresholds=None, n_boot=10000, seed=0, alpha=0.05, device="cpu",
              chunk_elems=1 << 24, progress=False, backend=None, groups=None, fitted=None, scored=None):
    """Study-level (or, with groups, subject-level cluster) bootstrap CIs of per-class and macro
    AUROC (and, given thresholds, sensitivity, specificity, balanced accuracy).

    y, scores (n, K); thresholds (K,) or None. Returns dict metric -> dict(
      low (K,), high (K,), macro_low, macro_high, macro_n_valid, n_valid (K,) replicates where defined).
    Per-class intervals are percentile intervals; NaN where a class is undefined in the data
    or defined in fewer than 100 replicates (n_boot must be 0 < 100 <= n_boot: fewer replicates
    would make every interval undefined). The macro interval is the percentile interval of
    the replicates in which every class defined in the full data (every class of the macro
    point estimate) is defined, each averaging all of them; a replicate where one of them is
    undefined (a rare class without a resampled positive) is left out, not averaged over fewer
    classes. macro_n_valid counts those replicates; below 100 macro_low / macro_high are None.
    backend: None picks `ops.backend("bootstrap_stats", device)` (the C++ kernel on CPU when
    built, else the torch reference); "cpp" or "reference" forces one. Both draw the same
    replicates for a seed (`bootstrap_counts`), so their intervals agree (up to the
    reference's summation order, ~1e-15). chunk_elems and progress (a tqdm bar) concern the
    reference only; the C++ kernel takes seconds.
    groups: (n,) subject ids or None (`group_index`). When some subject has several studies, each
    replicate resamples subjects (`bootstrap_weights`: one resample shared by all classes, as the
    study-level one), on either backend (the same replicates and numbers). groups None or all
    distinct: the study-level bootstrap, unchanged.
    fitted: (K,) bool, the classes whose thresholds were fitted (None: all). The threshold figures
    (sensitivity, specificity, balanced accuracy) of the others are undefined in every replicate
    (n_valid 0) and left out of those figures' macro averages, as in `classification_report`;
    their AUROC is kept.
    scored: (K,) bool, the classes whose scores mean something (None: all); the others (a probe output
    never trained) are undefined in every figure and every macro, as a class without positives.
    """
    y, s = _check(y, scores)
    n, K = y.shape
    be = _resolve_backend(backend, device)
    fit = _class_mask(fitted, K)
    if int(n_boot) < MIN_BOOT:
        raise ValueError(f"n_boot={n_boot}: a bootstrap CI needs at least {MIN_BOOT} replicates "
                         "(10,000 recommended; n_boot=0 in evaluate.py skips the CIs)")
    defined = defined_classes(y) & _class_mask(scored, K, "scored")
    thr = np.zeros(K) if thresholds is None else np.broadcast_to(np.asarray(thresholds, np.float64), (K,))
    grp = group_index(groups, n)
    if be == "cpp":
        reps = _replicates_cpp(y, s, thr, n_boot, seed, defined, grp)
    else:
        reps = _replicates_reference(y, s, thr, n_boot, seed, defined, device, chunk_elems, progress, grp)
    if thresholds is None:
        reps = {"auroc": reps["auroc"]}
    out = {}
    q = [100 * alpha / 2, 100 * (1 - alpha / 2)]
    for m, r in reps.items():
        use = defined if m == "auroc" else defined & fit   # the classes of this figure's macro point estimate
        r[:, ~use] = np.nan
        nvalid = np.isfinite(r).sum(0)
        low = np.full(K, np.nan)
        high = np.full(K, np.nan)
        ok = nvalid >= MIN_BOOT
        if ok.any():
            low[ok], high[ok] = np.nanpercentile(r[:, ok], q, axis=0)
        entry = {"low": low, "high": high, "n_valid": nvalid, "macro_low": None, "macro_high": None, "macro_n_valid": 0}
        if use.any():
            # the point estimate's mean over the classes defined in the data: a replicate where one of
            # them has no positives (or no negatives) would average fewer classes, another statistic
            full = np.isfinite(r[:, use]).all(1)
            entry["macro_n_valid"] = int(full.sum())
            if full.sum() >= MIN_BOOT:
                lo, hi = np.percentile(r[full][:, use].mean(1), q)
                entry["macro_low"], entry["macro_high"] = float(lo), float(hi)
        out[m] = entry
    return out


def roc_band(y, scores, n_boot=1000, seed=0, alpha=0.05, fpr_grid=None, chunk=100, groups=None):
    """Bootstrap band of one class's ROC curve, for plots. At each false-positive rate x of
    fpr_grid (default 0, 0.01, ..., 1), the percentile interval over replicates of the highest
    sensitivity of any cut with FPR <= x on the resampled cohort (the ROC step curve). The
    replicates are `bootstrap_weights(n, n_boot, seed, groups=groups)`, those of the CIs (study
    counts; with groups sharing studies, subject counts expanded to their studies); a replicate
    without positives or negatives is left out. y, scores (n,). Returns (grid, low, high, n_valid),
    low/high NaN when fewer than MIN_BOOT replicates are defined."""
    y, s = _check(y, scores)
    y, s = y[:, 0], s[:, 0]
    grp = group_index(groups, len(y))
    grid = np.linspace(0, 1, 101) if fpr_grid is None else np.asarray(fpr_grid, np.float64)
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    last = np.r_[ss[1:] != ss[:-1], True]                          # a cut after each group of tied scores
    curves = []
    for r0 in range(0, n_boot, chunk):
        w = _weights(len(y), min(chunk, n_boot - r0), seed, r0, grp).double().numpy()[order]
        tp = np.cumsum(w * ys[:, None], 0)[last]
        fp = np.cumsum(w * (1 - ys)[:, None], 0)[last]
        P, N = tp[-1], fp[-1]
        for b in np.nonzero((P > 0) & (N > 0))[0]:
            tpr, fpr = np.r_[0.0, tp[:, b] / P[b]], np.r_[0.0, fp[:, b] / N[b]]
            curves.append(tpr[np.searchsorted(fpr, grid, side="right") - 1])
    if len(curves) < MIN_BOOT:
        return grid, np.full(len(grid), np.nan), np.full(len(grid), np.nan), len(curves)
    low, high = np.percentile(np.array(curves), [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return grid, low, high, len(curves)


# ----------------------------------------------------------------------------- external benchmarks
# (precision-recall, regression and laterality figures of the paper's public benchmarks; every CI
# resamples studies with `bootstrap_counts`, or subjects given groups (`bootstrap_weights`), the
# replicates of `bootstrap`, so one seed gives one set of resampled cohorts for all of a probe's figures)


def _percentile_ci(reps, alpha=0.05):
    """(B,) or (B, K) replicate values -> (low, high, n_valid); NaN ends below MIN_BOOT defined."""
    r = np.asarray(reps, np.float64)
    r2 = r[:, None] if r.ndim == 1 else r
    nv = np.isfinite(r2).sum(0)
    low, high = np.full(r2.shape[1], np.nan), np.full(r2.shape[1], np.nan)
    ok = nv >= MIN_BOOT
    if ok.any():
        low[ok], high[ok] = np.nanpercentile(r2[:, ok], [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    if r.ndim == 1:
        return float(low[0]), float(high[0]), int(nv[0])
    return low, high, nv


def _weighted_ap(w, yy, last):
    """Average precision of one class under B study weightings at once.

    w (n, B) weights in descending score order, yy (n,) 0/1 labels in that order, last (n,)
    bool: the final study of each group of tied scores (a cut falls only there). AP =
    sum over cuts of (TP_j - TP_{j-1}) / P * precision_j (sklearn's average_precision_score
    on the resampled cohort). Returns (B,), NaN where a replicate has no positive or no negative
    weight (undefined, as AUROC: with positives alone AP is 1 whatever the scores).
    """
    tp = np.cumsum(w * yy[:, None], 0)[last]
    fp = np.cumsum(w * (1 - yy)[:, None], 0)[last]
    P = tp[-1]
    dtp = np.diff(tp, axis=0, prepend=0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
        ap = (dtp * prec).sum(0) / P
    return np.where((P > 0) & (fp[-1] > 0), ap, np.nan)


def average_precision(y, scores):
    """Per-class average precision = area under the precision-recall step curve (K,) float64,
    equal to sklearn.metrics.average_precision_score; NaN for undefined classes (no positives, or
    no negatives: sklearn's 1.0 whatever the scores). Tied scores form one cut. The chance level of
    a class is its prevalence (`pr_lift`)."""
    y, s = _check(y, scores)
    out = np.full(y.shape[1], np.nan)
    for k in np.nonzero(defined_classes(y))[0]:
        order = np.argsort(-s[:, k], kind="stable")
        ss = s[order, k]
        out[k] = _weighted_ap(np.ones((len(ss), 1)), y[order, k], np.r_[ss[1:] != ss[:-1], True])[0]
    return out


def pr_report(y, scores, n_boot=10000, seed=0, alpha=0.05, chunk_elems=1 << 22, groups=None):
    """AUPRC (average precision) and PR lift = AUPRC / prevalence per class, with study-level
    bootstrap CIs (replicates of `bootstrap_weights`: subject-level cluster bootstrap given groups
    that share studies; a replicate without positives or without negatives is undefined for that
    class, as in `bootstrap`; a replicate's prevalence is that of its resampled cohort). y, scores
    (n, K). Returns dict of (K,) float64 arrays: auprc, prevalence, pr_lift (NaN for undefined
    classes), and with n_boot > 0 also auprc_low/high, pr_lift_low/high, n_valid. A lift of 1 is
    chance; the paper reports it for rare RSNA subtypes, where AUROC hides false positives."""
    y, s = _check(y, scores)
    n, K = y.shape
    ap = average_precision(y, s)
    prev = y.mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {"auprc": ap, "prevalence": prev, "pr_lift": np.where(prev > 0, ap / np.maximum(prev, 1e-300), np.nan)}
    if not n_boot:
        return out
    if int(n_boot) < MIN_BOOT:
        raise ValueError(f"n_boot={n_boot}: a bootstrap CI needs at least {MIN_BOOT} replicates")
    reps_ap, reps_lift = np.full((n_boot, K), np.nan), np.full((n_boot, K), np.nan)
    grp = group_index(groups, n)
    b = max(1, min(n_boot, chunk_elems // max(n, 1)))
    plans = {}
    for k in np.nonzero(defined_classes(y))[0]:
        order = np.argsort(-s[:, k], kind="stable")
        ss = s[order, k]
        plans[k] = (order, y[order, k], np.r_[ss[1:] != ss[:-1], True])
    for r0 in range(0, n_boot, b):
        bb = min(b, n_boot - r0)
        w = _weights(n, bb, seed, r0, grp).double().numpy()
        size = w.sum(0)   # the resampled cohort's size: n, or the drawn subjects' studies (exact in float64)
        for k, (order, yy, last) in plans.items():
            a = _weighted_ap(w[order], yy, last)
            reps_ap[r0:r0 + bb, k] = a
            reps_lift[r0:r0 + bb, k] = a * size / (w[order] * yy[:, None]).sum(0)   # / resampled prevalence
    out["auprc_low"], out["auprc_high"], out["n_valid"] = _percentile_ci(reps_ap, alpha)
    out["pr_lift_low"], out["pr_lift_high"], _ = _percentile_ci(reps_lift, alpha)
    return out


def pr_band(y, scores, n_boot=1000, seed=0, alpha=0.05, recall_grid=None, chunk=100, groups=None):
    """Bootstrap band of one class's precision-recall curve, for plots: at each recall x of
    recall_grid (default 0, 0.01, ..., 1) the percentile interval over replicates of the
    interpolated precision max{precision of a cut with recall >= x} (the envelope of the step
    curve, with sklearn's end point recall 0 / precision 1). Replicates as `roc_band` (groups: the
    subject-level cluster bootstrap); those without positives or without negatives are left out
    (undefined, as in `pr_report`). y, scores (n,).
    Returns (grid, low, high, n_valid), low/high NaN below MIN_BOOT defined replicates."""
    y, s = _check(y, scores)
    y, s = y[:, 0], s[:, 0]
    grp = group_index(groups, len(y))
    grid = np.linspace(0, 1, 101) if recall_grid is None else np.asarray(recall_grid, np.float64)
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    last = np.r_[ss[1:] != ss[:-1], True]
    curves = []
    for r0 in range(0, n_boot, chunk):
        w = _weights(len(y), min(chunk, n_boot - r0), seed, r0, grp).double().numpy()[order]
        tp = np.cumsum(w * ys[:, None], 0)[last]
        fp = np.cumsum(w * (1 - ys)[:, None], 0)[last]
        for b in np.nonzero((tp[-1] > 0) & (fp[-1] > 0))[0]:
            keep = tp[:, b] + fp[:, b] > 0
            # with sklearn's end point (recall 0, precision 1), so the band starts where the curve does
            rec = np.r_[0.0, tp[keep, b] / tp[-1, b]]
            prec = np.r_[1.0, tp[keep, b] / (tp[keep, b] + fp[keep, b])]
            env = np.maximum.accumulate(prec[::-1])[::-1]          # best precision at recall >= rec[j]
            j = np.searchsorted(rec, grid, side="left")             # first cut reaching recall x
            curves.append(np.where(j < len(rec), env[np.minimum(j, len(rec) - 1)], np.nan))
    if len(curves) < MIN_BOOT:
        return grid, np.full(len(grid), np.nan), np.full(len(grid), np.nan), len(curves)
    low, high = np.nanpercentile(np.array(curves), [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return grid, low, high, len(curves)


def pearson_r(y, pred):
    """Pearson correlation of targets and predictions (NaN when either is constant, as scipy's pearsonr).

    Constancy is tested on the values themselves: the mean of n equal floats is often not that float
    (70.3 * 10 / 10), so the centred values of a constant prediction are a tiny constant and the
    ratio below came out 0.0, a number, for what has no correlation."""
    e = _residuals(y, pred)  # shape checks
    del e
    a, b = np.asarray(y, np.float64).ravel(), np.asarray(pred, np.float64).ravel()
    if (a == a[0]).all() or (b == b[0]).all():
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")


def regression_report(y, pred, n_boot=10000, seed=0, alpha=0.05, chunk=1000, groups=None):
    """Brain-age style regression figures with study-level bootstrap CIs (subject-level cluster
    bootstrap given groups that share studies: `bootstrap_weights`).

    y, pred (n,) in the target's unit (years). Returns a JSON-ready dict (None = undefined, e.g.
    r of a constant prediction): n, mae, rmse, pearson_r, bias (mean pred - y), and with
    n_boot > 0 mae_ci, rmse_ci, pearson_r_ci, bias_ci ([low, high]) and ci_n_valid. Replicate b weights study i by its count w_ib (`bootstrap_counts`): MAE_b =
    sum_i w_ib |e_i| / sum_i w_ib (= n for study counts), so each replicate equals the figure on
    the resampled cohort.
    """
    yv, pv = np.asarray(y, np.float64).ravel(), np.asarray(pred, np.float64).ravel()
    e = _residuals(yv, pv)
    if not (np.isfinite(yv).all() and np.isfinite(pv).all()):
        raise ValueError("targets or predictions contain NaN or inf")
    n = len(yv)
    out = {"n": n, "mae": mae(yv, pv), "rmse": rmse(yv, pv), "pearson_r": pearson_r(yv, pv), "bias": float(-e.mean())}
    if not n_boot:
        return jsonable(out)
    if int(n_boot) < MIN_BOOT:
        raise ValueError(f"n_boot={n_boot}: a bootstrap CI needs at least {MIN_BOOT} replicates")
    a, b = yv - yv.mean(), pv - pv.mean()        # centred: the weighted moments stay well conditioned
    M = np.stack([np.abs(e), e * e, -e, a, b, a * a, b * b, a * b], 1)     # (n, 8)
    reps = np.empty((n_boot, 4))
    grp = group_index(groups, n)
    for r0 in range(0, n_boot, chunk):
        bb = min(chunk, n_boot - r0)
        w = _weights(n, bb, seed, r0, grp).double().numpy()
        S = w.T @ M / w.sum(0)[:, None]   # (bb, 8) weighted means (column sums: n, or the drawn subjects' studies)
        va, vb = S[:, 5] - S[:, 3] ** 2, S[:, 6] - S[:, 4] ** 2
        cov = S[:, 7] - S[:, 3] * S[:, 4]
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where((va > 1e-12 * max(1.0, float(np.var(a)))) & (vb > 1e-12 * max(1.0, float(np.var(b)))),
                         cov / np.sqrt(np.maximum(va * vb, 1e-300)), np.nan)
        reps[r0:r0 + bb] = np.stack([S[:, 0], np.sqrt(S[:, 1]), r, S[:, 2]], 1)
    low, high, nv = _percentile_ci(reps, alpha)
    for j, m in enumerate(("mae", "rmse", "pearson_r", "bias")):
        out[m + "_ci"] = [low[j], high[j]]
    out["ci_n_valid"] = int(nv[2])
    return jsonable(out)


def laterality_report(y_detect, s_detect, thr_detect, y_left, y_right, s_left, s_right, n_boot=10000, seed=0,
                      alpha=0.05, groups=None, chunk=1000):
    """Side accuracy given correct detection (CQ500's Bleed-Left / Bleed-Right reads).

    Over studies whose truth is positive for the detection class, whose score reaches its
    (validation-chosen) threshold thr_detect, and whose truth is one-sided (left xor right):
    the fraction where the side with the larger score (s_left vs s_right, logits) is the true
    side; ties count as wrong. All inputs (n,). Returns dict(accuracy, n (studies counted),
    n_detected, n_positive, and with n_boot > 0 accuracy_ci, ci_n_valid); accuracy None when
    no study qualifies. Bilateral studies have no single side and are left out (counted in
    n_bilateral). The CI resamples studies, or subjects given groups (`bootstrap_weights`), chunk
    replicates at a time (all 10,000 at once held (n, 10000) float32 and float64 weights and their
    products: gigabytes for a test set of some thousand studies)."""
    yd, sd = np.asarray(y_detect) > 0, np.asarray(s_detect, np.float64)
    yl, yr = np.asarray(y_left) > 0, np.asarray(y_right) > 0
    sl, sr = np.asarray(s_left, np.float64), np.asarray(s_right, np.float64)
    det = yd & (sd >= thr_detect)
    one = det & (yl != yr)
    correct = np.where(yl, sl > sr, sr > sl)
    out = {"n_positive": int(yd.sum()), "n_detected": int(det.sum()), "n_bilateral": int((det & yl & yr).sum()),
           "n": int(one.sum()), "accuracy": float(correct[one].mean()) if one.any() else None}
    if not n_boot or not one.any():
        return out
    if int(n_boot) < MIN_BOOT:
        raise ValueError(f"n_boot={n_boot}: a bootstrap CI needs at least {MIN_BOOT} replicates")
    grp = group_index(groups, len(yd))
    num, den = np.empty(n_boot), np.empty(n_boot)
    for r0 in range(0, n_boot, chunk):
        w = _weights(len(yd), min(chunk, n_boot - r0), seed, r0, grp).double().numpy()       # (n, chunk)
        num[r0:r0 + w.shape[1]] = (one & correct).astype(np.float64) @ w
        den[r0:r0 + w.shape[1]] = one.astype(np.float64) @ w
    with np.errstate(invalid="ignore", divide="ignore"):
        reps = np.where(den > 0, num / np.maximum(den, 1e-300), np.nan)
    lo, hi, nv = _percentile_ci(reps, alpha)
    out.update(accuracy_ci=[lo, hi], ci_n_valid=nv)
    return jsonable(out)


# ----------------------------------------------------------------------------- report


def jsonable(x):
    """Nested numpy/float structure -> JSON-safe (NaN/inf -> None = undefined)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    return x


def classification_report(y, scores, thresholds, names, n_boot=10000, seed=0, device="cpu", progress=False,
                          groups=None, fitted=None, scored=None):
    """All per-class and macro numbers for one split: dict ready for json (via `jsonable`).

    y, scores (n, K), thresholds (K,) (chosen on validation), names K distinct label names (a
    repeated name is a ValueError: per_class is keyed by name, so one of its columns would vanish
    from the rows while still counting in the macro averages). groups: (n,) subject ids for a
    subject-level cluster bootstrap (`bootstrap`), or None. fitted: (K,) bool, the classes whose
    threshold was fitted (None: all); the others' thresholds are placeholders, so their
    sensitivity, specificity and balanced accuracy are null (CI too) and left out of those macro
    averages, from the same single bootstrap (`bootstrap(fitted=)`); each row records it as
    `threshold_fitted`. scored: (K,) bool, the classes whose scores mean something (None: all): the
    others (outputs the probe never learned: no training positives or negatives) are undefined in
    every figure, as a class without test positives, and listed in undefined_classes.
    """
    y, s = _check(y, scores)
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} label names for {y.shape[1]} columns")
    dup = sorted({n for i, n in enumerate(names) if n in list(names)[:i]})
    if dup:
        raise ValueError(f"label names {dup} are repeated: one name per column (a repeated labels.csv header?)")
    sc = _class_mask(scored, y.shape[1], "scored")
    fit = _class_mask(fitted, y.shape[1]) & sc
    au = np.where(sc, auroc(y, s), np.nan)
    st = {m: np.where(fit, v, np.nan) for m, v in threshold_stats(y, s, thresholds).items()}
    ci = bootstrap(y, s, thresholds, n_boot=n_boot, seed=seed, device=device, progress=progress,
                   groups=groups, fitted=fit, scored=sc) if n_boot else None
    per = {}
    for k, name in enumerate(names):
        row = {"n_pos": int(y[:, k].sum()), "n": int(y.shape[0]), "threshold": float(thresholds[k]),
               "threshold_fitted": bool(fit[k]), "defined": bool(np.isfinite(au[k]))}
        for m, v in [("auroc", au), *st.items()]:
            row[m] = v[k]
            if ci is not None:
                row[m + "_ci"] = [ci[m]["low"][k], ci[m]["high"][k]]
        if ci is not None:   # replicates where the class was defined (the CI is null below MIN_BOOT)
            row["ci_n_valid"] = {m: int(ci[m]["n_valid"][k]) for m in ci}
        per[name] = row
    mac = {}
    for m, v in [("auroc", au), *st.items()]:
        mean, nd = macro(v)
        mac[m] = {"mean": mean, "n_classes": nd}
        if ci is not None:
            mac[m]["ci"] = [ci[m]["macro_low"], ci[m]["macro_high"]]
            mac[m]["ci_n_valid"] = ci[m]["macro_n_valid"]
    undefined = [nm for nm, r in per.items() if not r["defined"]]
    return jsonable({"per_class": per, "macro": mac, "undefined_classes": undefined,
                     "n_studies": int(y.shape[0]), "n_boot": int(n_boot)})
