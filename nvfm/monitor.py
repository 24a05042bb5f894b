"""Is Vol-JEPA learning? Collapse monitors and frozen-feature probes for pretraining runs.

Two kinds of figures, both used by train_jepa.py and bench/bench_jepa_curve.py, and a reference
for the second (used by the benchmark):

1. Collapse monitors, computed on a batch's features at no extra forward cost:
   - `effective_rank(x)`: exp of the Shannon entropy of the normalised PCA spectrum (the
     eigenvalues of the token features' covariance, divided by their sum). A d-dim feature
     with equal variance in k orthogonal directions has rank k; a collapsed encoder whose
     tokens vary along one direction has rank ~1. A random-init tiny encoder (96-d) has ~30
     on demo tokens.
   - `mean_std(x)`: the mean over dimensions of each dimension's standard deviation across tokens.
   - `relative_distance(a, b)`: ||a - b|| / ||b|| over lists of parameters (how far the teacher
     has moved from its initialisation, and how far it is from the student).
   - `intensity_share(x, mean_intensity, window)`: the share of the features' variance that
     each token's mean intensity and window explain (least-squares R^2). It says what a
     collapse kept: on the demo cohort the student's features fall onto these two trivial
     statistics (on 16 studies of the 64-study demo cohort: 0.28 for random init, 0.57 for the
     tiny recipe's student at 300 steps).

2. Frozen-feature probes (`ProbeSet`), the learning curve of a run: a fixed set of studies is
   encoded whole (every foreground token, every window, as encode.py does) and scored with:
   - `rank`: effective rank of all their token features;
   - `lesion_auroc`: a logistic regression on single tokens (+ a one-hot of the window) labelled
     from the demo cohort's lesion masks (positive when >= half of the token's 4x16x16 voxel box
     is lesion, negative when none of it is, partial tokens left out, negatives subsampled
     1 in 10 with a seeded hash), fit on the train-split studies, token AUROC on val + test;
     only where the cohort's ground truth (cohort/gt) is given;
   - `lesion_auroc_pos`: the same probe told each token's grid position as well (the 30-d
     sinusoidal code of nvfm.model.position_code, layout "nvfm-v1", beside the features). It
     separates what an encoder learned about the tokens' content from whether its features
     kept where the tokens are: lesions have preferred places, a random-init encoder carries
     its input position embedding to its output, and a JEPA student, whose predictor is
     given every position, need not (BENCHMARKS.md, Vol-JEPA);
   - `lesion_auroc_dx`: the same probe per diagnosis, macro-averaged: for each lesion kind with
     >= 20 scored lesion tokens, its tokens against the lesion-free ones (other kinds' tokens
     left out), one logistic regression each (`lesion_kind_auroc`; the kinds' own figures in
     `lesion_auroc_by_dx`). The pooled probe must rank every kind with one direction, dark
     (CSF-filled ventricles) and bright (acute blood) alike; this one asks a direction per kind,
     as a probe per finding would;
   - `study_auroc`: per-window mean and std pooling of the tokens, one logistic regression per
     class (labels.csv's diagnosis columns, nvfm.probe.load_labels, those annotated 0 / 1 for
     every study; a partly annotated one is left out), 5-fold stratified CV over
     the set's studies (repeated with 3 shuffles, the AUROC of each repeat's out-of-fold scores
     averaged), macro AUROC over classes with >= 5 positives and >= 5 negatives; where labels.csv
     has a `subject` column, a subject's studies stay in one fold and the counts are of subjects
     (pretraining never sees labels, so using every study is the usual transductive
     self-supervised setting).
   Features are standardised with the fitting part's mean and std; C is fixed (token 1.0,
   study 0.1), never tuned on the scored studies.

3. An encoder-free reference for the token probes: `TokenStatistics` stands in for an encoder
   and gives each token its seven intensity statistics (mean, std, 5/25/50/75/95th
   percentiles); `ProbeSet(...)(TokenStatistics(), classifier="tree")` scores them with
   gradient-boosted trees (scikit-learn's HistGradientBoostingClassifier, default settings)
   instead of the linear probe. It says how much of a token label its own intensities give to
   a nonlinear classifier, so what a linear probe on an encoder's features leaves on the table.
"""
import json
import os
import zlib

import numpy as np
import torch

from nvfm.model import WINDOWS, position_code  # window names, in the normalisation order

NEG_KEEP = 0.1  # share of lesion-free tokens kept for the token probe
MIN_KIND_POSITIVES = 20  # scored lesion tokens a diagnosis needs for its own lesion-token figure


# ----------------------------------------------------------------------------- collapse monitors

@torch.no_grad()
def effective_rank(x, max_rows=4096):
    """exp(entropy of the normalised covariance spectrum) of features x (N, D); NaN for N < 2 or
    non-finite features; 1 for constant features (no variance: every token the same).
    At most `max_rows` rows are used (evenly spaced), so the cost is bounded on big batches.
    Scale-free: the singular values are divided by the largest before squaring (squared in
    float32 they overflowed above ~1e19 and underflowed below ~1e-19, and a spectrum summing to
    < 1e-30 was not normalised: features of scale 1e19 or 1e-17 read as rank ~1, a false collapse)."""
    x = torch.as_tensor(x).detach().float()
    if x.shape[0] > max_rows:  # float64 positions: float32 rounds past 2^24 rows, to an index out of range
        x = x[torch.linspace(0, x.shape[0] - 1, max_rows, dtype=torch.float64).long()]
    if x.shape[0] < 2 or not bool(torch.isfinite(x).all()):  # a diverged run's NaN features: no figure, no crash
        return float("nan")
    s = torch.linalg.svdvals(x - x.mean(0))
    if s.numel() == 0 or not bool(s.max() > 0):
        return 1.0
    p = (s / s.max()).pow(2)
    p = p / p.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def mean_std(x):
    """Mean over dimensions of the per-dimension standard deviation of x (N, D) across rows."""
    x = torch.as_tensor(x).detach().float()
    return float(x.std(0).mean()) if x.shape[0] > 1 else float("nan")


@torch.no_grad()
def relative_distance(a, b):
    """||a - b|| / ||b|| over two lists (or iterables, e.g. .parameters()) of tensors of the same
    shapes (all entries together). Lists of other lengths or tensors of other shapes are a ValueError
    (zip stopped at the shorter list and pairs broadcast: a figure of mismatched tensors, silently)."""
    a, b = list(a), list(b)   # b is read twice: a generator would be spent by the first sum
    if len(a) != len(b):
        raise ValueError(f"relative_distance: {len(a)} tensors against {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(f"relative_distance: tensor {i} has shape {tuple(x.shape)} against {tuple(y.shape)}")
    num = sum(float((x.float() - y.float()).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.float().pow(2).sum()) for y in b)
    return (num / max(den, 1e-30)) ** 0.5


@torch.no_grad()
def brightness_residual(x, mean_intensity, window):
    """x (N, D) minus its least-squares fit on each token's mean intensity, with an intercept and a
    slope per window: the part of x that how bright a token is, in which window, does not explain."""
    x = torch.as_tensor(x).detach().double()
    m = torch.as_tensor(mean_intensity).detach().double().reshape(-1).to(x.device)
    w = torch.as_tensor(window).detach().reshape(-1).to(x.device)
    cols = []
    for v in torch.unique(w):
        ind = (w == v).double()
        cols += [ind, ind * m]
    design = torch.stack(cols, 1)
    return x - design @ (torch.linalg.pinv(design) @ x)  # pinv: a window with one brightness is rank-deficient


def intensity_share(x, mean_intensity, window, max_rows=4096):
    """R^2 of features x (N, D) regressed on each token's mean intensity, with an intercept and a
    slope per window (least squares, all dimensions together: 1 - residual / total sum of squares
    about the mean). 1: the features say nothing beyond how bright a token is in which window;
    ~0: nothing of it. mean_intensity (N,), window (N,) int. NaN for N < 2 or constant features.
    At most `max_rows` rows are used (evenly spaced)."""
    x = torch.as_tensor(x).detach().double()
    m, w = torch.as_tensor(mean_intensity).reshape(-1), torch.as_tensor(window).reshape(-1)
    if x.shape[0] > max_rows:
        keep = torch.linspace(0, x.shape[0] - 1, max_rows, dtype=torch.float64, device=x.device).long()
        x, m, w = x[keep], m.to(x.device)[keep], w.to(x.device)[keep]
    x = x - x.mean(0)
    total = float(x.pow(2).sum())
    if x.shape[0] < 2 or total == 0.0:
        return float("nan")
    return 1.0 - float(brightness_residual(x, m, w).pow(2).sum()) / total


def content_loss(pred, target, mean_intensity, window):
    """The JEPA loss (smooth L1, mean over tokens and dimensions) on the part of the prediction
    error that the target tokens' brightness does not explain (`brightness_residual`). Beside the
    same figure for the position-only control it says whether the context predicts anything but
    how bright the masked tokens are."""
    err = brightness_residual(torch.as_tensor(pred).detach().double() - torch.as_tensor(target).detach().double(),
                              mean_intensity, window)
    return float(torch.nn.functional.smooth_l1_loss(err, torch.zeros_like(err), beta=1.0))


class CollapseWatch:
    """Warns (once per episode) when the student's effective rank falls below `threshold` x the
    rank it had on the first batch (`initial`: that rank, given when a run resumes). `update(rank,
    share=None)` returns the warning text or None;
    `share` (an `intensity_share`) is quoted in it when given. A NaN rank (non-finite features)
    is skipped: it neither sets the reference nor ends an episode."""

    def __init__(self, threshold=0.25, initial=None):
        self.threshold, self.initial, self.warned = threshold, initial, False

    def update(self, rank, share=None):
        if not np.isfinite(rank):  # a NaN reference would silence the watch for the whole run
            return None
        if self.initial is None or not np.isfinite(self.initial):
            self.initial = rank
            return None
        low = rank < self.threshold * self.initial
        msg = None
        if low and not self.warned:
            kept = f" {share:.0%} of their variance is the tokens' mean intensity and window." \
                if share is not None and np.isfinite(share) else ""
            msg = (f"WARNING: representation collapse: the student's effective rank fell to {rank:.1f}, "
                   f"{rank / self.initial:.2f}x its initial {self.initial:.1f} (threshold {self.threshold}x). "
                   f"Its features span few directions.{kept} A low rank alone does not mean nothing is learned; "
                   f"see README 'Is my pretraining learning?'")
        self.warned = low
        return msg


# ----------------------------------------------------------------------------- probes on frozen features

def standardize(fit, *others):
    mu, sd = fit.mean(0), fit.std(0) + 1e-6
    return [(x - mu) / sd for x in (fit,) + others]


def lesion_token_auroc(entries, labels, split_of, seed=0, n_boot=0, min_positives=50, with_position=False,
                       neg_keep=NEG_KEEP, classifier="linear"):
    """Token probe on frozen features.

    entries: {study_key: [dict(volume_id, window, emb (n, D)), ...]}; labels: {(study_key, volume_id):
    int8 (n,) 1 lesion / 0 clear / -1 partial}; split_of: {study_key: split}. Fit on the 'train'
    studies, score the others; a volume without labels is left out, labels of another length are
    a ValueError. Returns (AUROC, (lo, hi) study-bootstrap 95% CI or None when
    n_boot == 0, n scored tokens, n scored positives); AUROC NaN when a side lacks a class or fewer
    than `min_positives` lesion tokens are scored (the 24-study demo scores ~20: its figure swings
    between 0.1 and 0.9 with which few lesions land in val + test). with_position: the entries'
    token grid coords (n, 3) enter the probe as their position code, beside the features. neg_keep:
    the share of label-0 tokens kept (a random subset; lesion tokens are rare). classifier:
    "linear" (the probe: logistic regression, C = 1) or "tree" (gradient-boosted trees,
    HistGradientBoostingClassifier with its defaults; for the encoder-free reference)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    X, Y, S, fit_part = [], [], [], []
    for key, ents in entries.items():
        for e in ents:
            y = labels.get((key, e["volume_id"]))
            if y is None:  # a volume without token labels (no ground truth) is not scored
                continue
            if len(y) != len(e["emb"]):  # labels of another token grid would be silently misaligned
                raise ValueError(f"study {key}, volume {e['volume_id']} ({e['window']}): {len(y)} token labels for "
                                 f"{len(e['emb'])} tokens; labels must come from the same token grid")
            rng = np.random.default_rng(zlib.crc32(f"{key}/{e['volume_id']}/{e['window']}/{seed}".encode()))
            keep = (y == 1) | ((y == 0) & (rng.random(len(y)) < neg_keep))
            onehot = np.zeros((int(keep.sum()), len(WINDOWS)), np.float32)
            onehot[:, WINDOWS.index(e["window"])] = 1
            cols = [np.asarray(e["emb"])[keep].astype(np.float32), onehot]
            if with_position:
                cols.append(position_code(torch.as_tensor(np.asarray(e["coords"])[keep]).long(), 30, "nvfm-v1").numpy())
            X.append(np.concatenate(cols, 1))
            Y.append(y[keep])
            S.append(np.full(int(keep.sum()), zlib.crc32(key.encode())))
            fit_part.append(np.full(int(keep.sum()), split_of[key] == "train"))
    if not X:
        return float("nan"), None, 0, 0
    X, Y, S, fit_part = map(np.concatenate, (X, Y, S, fit_part))
    yfit, yev = Y[fit_part], Y[~fit_part]
    if len(np.unique(yfit)) < 2 or len(np.unique(yev)) < 2 or yev.sum() < min_positives:
        return float("nan"), None, len(yev), int(yev.sum())
    Xfit, Xev = standardize(X[fit_part], X[~fit_part])
    if classifier == "linear":
        score = LogisticRegression(C=1.0, max_iter=3000).fit(Xfit, yfit).decision_function(Xev)
    elif classifier == "tree":
        score = HistGradientBoostingClassifier(random_state=seed).fit(Xfit, yfit).predict_proba(Xev)[:, 1]
    else:
        raise ValueError(f"classifier {classifier!r}: choose 'linear' or 'tree'")
    auc = float(roc_auc_score(yev, score))
    ci = None
    if n_boot:
        sev = S[~fit_part]
        studies = np.unique(sev)
        idx = {s: np.nonzero(sev == s)[0] for s in studies}
        rng, boots = np.random.default_rng(seed), []
        for _ in range(n_boot):
            pick = np.concatenate([idx[s] for s in rng.choice(studies, len(studies))])
            if 0 < yev[pick].sum() < len(pick):
                boots.append(roc_auc_score(yev[pick], score[pick]))
        ci = tuple(float(v) for v in np.percentile(boots, [2.5, 97.5])) if boots else None
    return auc, ci, len(yev), int(yev.sum())


def lesion_kind_auroc(entries, labels, kinds, split_of, classifier="linear", min_positives=MIN_KIND_POSITIVES):
    """Lesion-token AUROC per diagnosis, macro-averaged.

    labels: as `lesion_token_auroc`'s; kinds: {(study_key, volume_id): (n,) str array, each token's
    lesion kind ('' where none)}. For every kind: positives are the label-1 tokens of that kind,
    negatives the label-0 tokens (the same subsample as `lesion_token_auroc`), other tokens left
    out; scored by `lesion_token_auroc`. Returns (the mean over the kinds with >= min_positives
    scored positives, NaN when none has; {kind: AUROC} of those kinds)."""
    names = sorted({str(d) for a in kinds.values() for d in a if d})
    per = {}
    for d in names:
        lab = {k: np.where((y == 1) & (kinds[k] == d), 1, np.where(y == 0, 0, -1)).astype(np.int8)
               for k, y in labels.items() if k in kinds}
        auc = lesion_token_auroc(entries, lab, split_of, min_positives=min_positives, classifier=classifier)[0]
        if not np.isnan(auc):
            per[d] = auc
    return (float(np.mean(list(per.values()))) if per else float("nan")), per


def pooled_study(ents, dim):
    """Per-window mean and std of a study's token features -> (2 * 4 * dim,) (zeros for absent windows)."""
    out = []
    for w in WINDOWS:
        es = [np.asarray(e["emb"], np.float32) for e in ents if e["window"] == w]
        a = np.concatenate(es) if es else np.zeros((1, dim), np.float32)
        out += [a.mean(0), a.std(0)]
    return np.concatenate(out)


def subject_groups(rows):
    """The `groups` of study_cv_auroc for label rows (nvfm.probe.load_labels): each study's subject
    (itself where it has none), or None when no row names a subject."""
    return [r["subject"] or r["study_key"] for r in rows] if any(r["subject"] for r in rows) else None


def study_cv_auroc(X, Y, folds=5, repeats=3, min_count=5, groups=None):
    """Macro AUROC of per-class logistic regressions, `folds`-fold stratified CV repeated `repeats`
    times, over classes with >= min_count positives and negatives. X (S, F), Y (S, C) 0/1.
    groups: (S,) subject of each study, or None (every study its own): a subject's studies stay in
    one fold (StratifiedGroupKFold), and a class needs >= min_count subjects with a positive study
    and >= min_count with a negative one. Returns (macro AUROC or NaN, n classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    g = np.arange(len(X)) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].reshape(-1)
    aucs = []
    for j in range(Y.shape[1]):
        y = Y[:, j]
        if len(np.unique(g[y == 1])) < min_count or len(np.unique(g[y == 0])) < min_count:
            continue
        reps = []
        for rep in range(repeats):
            s = np.zeros(len(y))
            # a subject's studies on both sides of a fold would score memory of the subject, not features
            split = (StratifiedKFold(folds, shuffle=True, random_state=rep).split(X, y) if groups is None
                     else StratifiedGroupKFold(folds, shuffle=True, random_state=rep).split(X, y, g))
            for tr, te in split:
                Xtr, Xte = standardize(X[tr], X[te])
                s[te] = LogisticRegression(C=0.1, max_iter=3000).fit(Xtr, y[tr]).decision_function(Xte)
            reps.append(roc_auc_score(y, s))
        aucs.append(np.mean(reps))
    return (float(np.mean(aucs)) if aucs else float("nan")), len(aucs)


class _Entries(dict):
    """{study_key: entries} with the FeatureCache interface that nvfm.grounding expects."""

    def study(self, key):
        return self[key]


class ProbeSet:
    """A fixed set of studies of a shard set, tokenised once, scored for any encoder.

        probes = ProbeSet(shards, cohort=None, max_studies=0)
        probes(encoder) -> {"rank", "lesion_auroc", "study_auroc", ...}

    shards: a preprocess.py output (labels.csv and findings.jsonl inside); cohort: the demo
    cohort folder (with gt/) for the lesion-token probe, or None; max_studies > 0 keeps an
    evenly spaced subset of the studies (sorted by key) to bound the cost; token_task: a binary
    labels.csv column that labels every token of its study (nvfm.loader.write_control_shards'
    'grating_y'), scored like the lesion tokens ("token_auroc")."""

    def __init__(self, shards, cohort=None, max_studies=0, min_fg_fraction=None, max_tokens=16384, token_task=None):
        from nvfm.data import ShardReader
        self.reader = ShardReader(shards)
        # the shards' own token rule (what training reads: --preset=neurovfm shards keep all-foreground tokens)
        self.max_tokens = max_tokens
        self.min_fg = min_fg_fraction if min_fg_fraction is not None else self.reader.manifest.get("min_fg_fraction")
        from nvfm.probe import load_labels  # diagnosis columns only: sex, subject, age ... are not classes
        labels_path = os.path.join(shards, "labels.csv")
        # the classes: the columns annotated for every study (0 or 1 in each row); a diagnosis annotated for
        # some studies only (blanks, "NA"; load_labels allows it) stopped the run (ValueError)
        rows, columns = load_labels(labels_path, use="annotated") if os.path.exists(labels_path) else ([], [])
        classes = [c for c in columns if all(c in r["y"] for r in rows)]
        if token_task in columns and token_task not in classes:
            load_labels(labels_path, use=[token_task])  # every study needs it: names the row and cell not 0/1
        keys = sorted({v["study_key"] for v in self.reader.volumes})
        if max_studies and len(keys) > max_studies:
            keys = [keys[i] for i in np.linspace(0, len(keys) - 1, max_studies).round().astype(int)]
        self.keys = keys
        self.by_study = {k: [i for i, v in enumerate(self.reader.volumes) if v["study_key"] == k] for k in keys}
        self.split_of = {v["study_key"]: v["split"] for v in self.reader.volumes}
        row_of = {r["study_key"]: r for r in rows}
        self.labelled = [k for k in keys if k in row_of]
        if token_task and token_task not in classes:
            raise ValueError(f"{labels_path}: no column {token_task!r}")
        self.token_task = {k: row_of[k]["y"][token_task] for k in self.labelled} if token_task else None
        self.Y = np.array([[row_of[k]["y"][c] for c in classes] for k in self.labelled], np.int64).reshape(
            len(self.labelled), len(classes))
        # the study CV keeps a subject's studies in one fold when labels.csv names subjects
        self.subjects = subject_groups([row_of[k] for k in self.labelled])
        self.token_labels, self.token_kinds, self.cohort, self.findings = None, None, None, []
        findings_path = os.path.join(shards, "findings.jsonl")
        if cohort and os.path.isdir(os.path.join(cohort, "gt")) and os.path.exists(findings_path):
            self.cohort = cohort
            self.findings = [json.loads(line) for line in open(findings_path) if line.strip()]
        self.scores_studies = len(self.labelled) >= 10 and self.Y.shape[1] > 0

    def figures(self):
        """The probe figures `score` returns on this set: a stored result lacking one of them is stale."""
        return (["rank"] + (["token_auroc"] if self.token_task is not None else [])
                + (["lesion_auroc", "lesion_auroc_pos", "lesion_auroc_dx"] if self.cohort else [])
                + (["study_auroc"] if self.scores_studies else []))

    def lesion_labels(self, entries):
        """Token labels from the cohort's lesion masks, computed once (token coords are the same for
        every encoder); also sets `token_kinds`, each token's lesion kind (the diagnosis whose
        lesions cover most of it, '' where none)."""
        if self.token_labels is None:
            from nvfm.grounding import lesion_token_cover
            cover = lesion_token_cover(self.cohort, self.reader, self.findings, entries)
            # frac > 0 wherever a lesion touches the box at all (grounding.token_union_share): never a negative
            self.token_labels = {k: np.where(f >= 0.5, 1, np.where(f == 0, 0, -1)).astype(np.int8)
                                 for k, (f, _) in cover.items()}
            # lesion_token_cover indexes the lesions that have a mask
            dx = {r["study_key"]: np.array([les["diagnosis"] for les in r.get("lesions", []) if les.get("mask")] + [""])
                  for r in self.findings}
            self.token_kinds = {k: dx[k[0]][w] for k, (_, w) in cover.items()}  # index -1 -> ''
        return self.token_labels

    @torch.no_grad()
    def embed(self, encoder):
        """{study_key: [dict(volume_id, window, coords, emb float32 numpy)]} for every study of the set."""
        from nvfm.model import encode_study
        out = _Entries()
        for k in self.keys:
            ents = encode_study(encoder, self.reader, self.by_study[k], min_fg_fraction=self.min_fg,
                                max_tokens=self.max_tokens)
            out[k] = [dict(e, coords=e["coords"].numpy(), emb=e["emb"].numpy()) for e in ents]
        return out

    def score(self, entries, n_boot=0, classifier="linear"):
        """The probe figures of embedded entries (from `embed`); classifier: that of the token
        probes (`lesion_token_auroc`), the study probe is always linear."""
        allx = np.concatenate([e["emb"] for ents in entries.values() for e in ents])
        res = dict(rank=effective_rank(torch.from_numpy(allx), max_rows=8192), feature_std=mean_std(allx),
                   n_studies=len(entries), n_tokens=len(allx))
        if self.token_task is not None:
            labels = {(k, e["volume_id"]): np.full(len(e["emb"]), self.token_task[k], np.int8)
                      for k, ents in entries.items() if k in self.token_task for e in ents}
            auc, ci, _, _ = lesion_token_auroc(entries, labels, self.split_of, n_boot=n_boot, neg_keep=1.0,
                                               classifier=classifier)
            res.update(token_auroc=auc, token_ci=ci)
        if self.cohort:
            labels = self.lesion_labels(entries)
            auc, ci, n, npos = lesion_token_auroc(entries, labels, self.split_of, n_boot=n_boot, classifier=classifier)
            res.update(lesion_auroc=auc, lesion_ci=ci, lesion_tokens=n, lesion_positives=npos)
            auc, ci, _, _ = lesion_token_auroc(entries, labels, self.split_of, n_boot=n_boot, with_position=True,
                                               classifier=classifier)
            res.update(lesion_auroc_pos=auc, lesion_pos_ci=ci)
            res["lesion_auroc_dx"], res["lesion_auroc_by_dx"] = lesion_kind_auroc(
                entries, labels, self.token_kinds, self.split_of, classifier=classifier)
        if self.scores_studies:
            X = np.stack([pooled_study(entries[k], allx.shape[1]) for k in self.labelled])
            res["study_auroc"], res["study_classes"] = study_cv_auroc(X, self.Y, groups=self.subjects)
        return res

    def __call__(self, encoder, n_boot=0, classifier="linear"):
        return self.score(self.embed(encoder), n_boot=n_boot, classifier=classifier)


@torch.no_grad()
def token_statistics(tokens, chunk=4096):
    """Tokens (N, P) -> float32 (N, 7): each token's mean, std (unbiased) and 5/25/50/75/95th
    percentiles (linear interpolation, as numpy's default), in chunks of `chunk` rows."""
    t = torch.as_tensor(tokens).float()
    if len(t) == 0:
        return torch.zeros(0, 7)
    q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95])
    return torch.cat([torch.cat([c.mean(1, keepdim=True), c.std(1, keepdim=True), torch.quantile(c, q, dim=1).T], 1)
                      for c in t.split(chunk)])


class TokenStatistics(torch.nn.Module):
    """An encoder stand-in without parameters: each token's `token_statistics` (of its
    normalised voxels; the probes add the window). With `classifier="tree"` it is the
    encoder-free reference of the token probes (module docstring, 3)."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"dim": 7})()

    def forward(self, x, coords, cu_seqlens, max_seqlen):
        return token_statistics(x)
