"""Study-level probes on frozen token embeddings (the NeuroVFM paper, Methods: diagnostic probes).

A study is one bag: every token of every volume (and, for CT, every window) of the study.
Bags are packed like the encoder's batches: x (N, D) instance embeddings back to back and
int32 cu_seqlens (B + 1,) with bag b = x[cu_seqlens[b]:cu_seqlens[b + 1]]. Every per-bag
reduction is a scatter/index op over a bag id vector (N,): no Python loop over bags.

Probes (all start with a LayerNorm of the frozen features; out = K classes, or 1 for
regression):
  AttentiveMIL   classify-then-aggregate (the paper's probe): instance logits
                 psi_p(x_i) (N, K) from an MLP, class-specific attention scores psi_m(x_i)
                 (N, K) from a second MLP, softmax over the instances of each bag per class
                 (alpha, sums to 1 per bag and class), bag logit_k = sum_i alpha_ik psi_p(x_i)_k.
                 alpha is the per-class attention map; alpha * psi_p is the signed
                 contribution of each token (they sum to the bag logit): the grounding maps.
  ABMIL          aggregate-then-classify gated attention MIL (Ilse et al. 2018): one
                 attention per token shared by all classes, pooled embedding -> linear.
  MeanPool       mean of the bag's embeddings -> linear (the simplest baseline).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def bag_ids(cu_seqlens, n=None):
    """int32/int64 cu_seqlens (B+1,) -> (N,) int64 bag index of every instance."""
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(len(lens), device=cu.device), lens,
                                   output_size=int(cu[-1]) if n is None else n)


def segment_softmax(scores, seg, n_bags):
    """Softmax over the instances of each bag, separately per column.

    scores (N, K) float, seg (N,) int64 bag ids in [0, n_bags). Returns (N, K); for every bag
    with instances and every column, the entries of that bag sum to 1. Max-subtracted per
    bag and column for stability.
    """
    K = scores.shape[1]
    mx = torch.full((n_bags, K), float("-inf"), dtype=scores.dtype, device=scores.device)
    mx = mx.scatter_reduce(0, seg[:, None].expand(-1, K), scores.detach(), "amax")
    e = torch.exp(scores - mx[seg])
    den = torch.zeros(n_bags, K, dtype=scores.dtype, device=scores.device).index_add(0, seg, e)
    return e / den[seg]


def segment_sum(x, seg, n_bags):
    return torch.zeros(n_bags, *x.shape[1:], dtype=x.dtype, device=x.device).index_add(0, seg, x)


def segment_mean(x, seg, n_bags):
    cnt = torch.zeros(n_bags, dtype=x.dtype, device=x.device).index_add(0, seg, torch.ones_like(x[:, 0]))
    return segment_sum(x, seg, n_bags) / cnt.clamp_min(1)[:, None]


def mlp(d_in, hidden, d_out, dropout):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out))


class AttentiveMIL(nn.Module):
    """Classify-then-aggregate attentive MIL. forward(x (N, D), cu_seqlens) -> (B, K) logits;
    with return_maps=True also alpha (N, K) and instance logits (N, K)."""

    def __init__(self, dim, n_out, hidden=256, dropout=0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.instance = mlp(dim, hidden, n_out, dropout)   # psi_p
        self.attention = mlp(dim, hidden, n_out, dropout)  # psi_m

    def forward(self, x, cu_seqlens, return_maps=False):
        B = len(cu_seqlens) - 1
        seg = bag_ids(cu_seqlens, x.shape[0])
        h = self.norm(x)
        inst = self.instance(h)                              # (N, K)
        alpha = segment_softmax(self.attention(h), seg, B)   # (N, K)
        logits = segment_sum(alpha * inst, seg, B)
        if return_maps:
            return logits, alpha, inst
        return logits


class ABMIL(nn.Module):
    """Aggregate-then-classify gated attention MIL; one attention map shared by all classes."""

    def __init__(self, dim, n_out, hidden=256, dropout=0.1):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.v = nn.Linear(dim, hidden)
        self.u = nn.Linear(dim, hidden)
        self.w = nn.Linear(hidden, 1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, n_out)

    def forward(self, x, cu_seqlens, return_maps=False):
        B = len(cu_seqlens) - 1
        seg = bag_ids(cu_seqlens, x.shape[0])
        h = self.norm(x)
        a = self.w(self.drop(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))))  # (N, 1)
        alpha = segment_softmax(a, seg, B)
        logits = self.head(segment_sum(alpha * h, seg, B))
        if return_maps:
            inst = self.head(h)                              # what each token alone would say
            return logits, alpha.expand(-1, logits.shape[1]), inst
        return logits


class MeanPool(nn.Module):
    """Mean of the bag's instance embeddings -> linear."""

    def __init__(self, dim, n_out, hidden=0, dropout=0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def forward(self, x, cu_seqlens, return_maps=False):
        B = len(cu_seqlens) - 1
        seg = bag_ids(cu_seqlens, x.shape[0])
        h = self.norm(x)
        logits = self.head(segment_mean(h, seg, B))
        if return_maps:
            cnt = torch.bincount(seg, minlength=B).clamp_min(1).to(x.dtype)
            alpha = (1.0 / cnt)[seg][:, None].expand(-1, logits.shape[1])
            return logits, alpha, self.head(h)
        return logits


PROBES = {"attentive_mil": AttentiveMIL, "abmil": ABMIL, "mean_pool": MeanPool}


def make_probe(kind, dim, n_out, hidden=256, dropout=0.1, trained_mask=False):
    """A probe of `kind` with n_out outputs. trained_mask (train_probe.py sets it in probe_args): the
    module also holds a (n_out,) bool buffer `trained`, saved in its state dict, of the outputs its
    training fitted (a class without training positives or negatives is left out of the loss), which
    `predict` reads to average each class over the ensemble members that learned it. Probes from
    before it have no such buffer (and their state dicts no such key): every output counts."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {sorted(PROBES)}")
    m = PROBES[kind](dim, n_out, hidden, dropout)
    if trained_mask:
        m.register_buffer("trained", torch.ones(n_out, dtype=torch.bool))
    return m


def load_models(ck, path, device="cpu"):
    """The probe modules of a train_probe.py checkpoint dict `ck` (read from `path`), strictly loaded, in
    eval mode on device. A CV ensemble saved before the `trained` buffers averages every fold's output for
    every class, a fold that never saw a class's positives included: said once here, with the remedy."""
    from nvfm.checkpoint import load_state_strict
    models = [load_state_strict(make_probe(**ck["probe_args"]), st, f"{path} model {i}").to(device).eval()
              for i, st in enumerate(ck["models"])]
    if len(models) > 1 and not ck["probe_args"].get("trained_mask"):
        print(f"warning: {path} is a {len(models)}-model ensemble saved before per-class fold ensembles: every "
              f"class averages all {len(models)} models, folds that lacked its positives included; retrain it "
              f"with train_probe.py for figures that leave those folds out")
    return models


def class_weights(y, max_weight=100.0):
    """Positive-class weights n_neg / n_pos per class from training labels y (n, K), clipped
    to max_weight, and a (K,) mask of classes that have positives and negatives (others are
    left out of the loss: nothing to learn)."""
    y = torch.as_tensor(y, dtype=torch.float32)
    npos = y.sum(0)
    nneg = y.shape[0] - npos
    usable = (npos > 0) & (nneg > 0)
    pw = torch.where(usable, nneg / npos.clamp_min(1), torch.ones_like(npos)).clamp(max=max_weight)
    return pw, usable


def bce_loss(logits, y, pos_weight, class_mask):
    """Class-weighted multi-label BCE, mean over bags and usable classes. logits, y (B, K)."""
    per = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none")
    m = class_mask.to(per.dtype)
    return (per * m).sum() / (m.sum() * logits.shape[0]).clamp_min(1)


def pack_bags(bags, device="cpu", dtype=torch.float32):
    """List of (n_b, D) arrays/tensors -> x (N, D), cu_seqlens int32 (B + 1,)."""
    xs = [torch.as_tensor(b) for b in bags]
    lens = torch.tensor([0] + [len(b) for b in xs], dtype=torch.int64)
    x = torch.cat(xs).to(device=device, dtype=dtype)
    return x, lens.cumsum(0).to(torch.int32).to(device)


# ----------------------------------------------------------------------------- data plumbing

# subject: a salted, non-identifying group id (nvfm/benchmarks.py) that keeps a subject's studies
# on one side of every split
META_COLUMNS = ("study_key", "study_uid", "study", "modality", "split", "age", "sex", "subject")
SIDE_CLASSES = ("lesion_left", "lesion_right")


def load_labels(path, use=None):
    """SHARDS/labels.csv -> (rows: list of dict with study_key, modality, split, age (float or
    None), subject (group id, "" when the file has none), y: dict name -> 0/1 of the used label
    columns), every label column name in file order). use: the label columns the run reads (None:
    all; "annotated": those holding 0 or 1 in every row). Only those must hold 0 or 1 (else a ValueError naming the file, line and column) and are
    kept in y; the others may hold anything (a diagnosis annotated for some studies only: blanks,
    "NA"). Names in `use` that are not label columns are left to the caller (side classes come from
    findings.jsonl). A column header that appears twice is a ValueError naming the file and
    the column (csv.DictReader would keep only the last of its cells under the one name); so is a
    row with more cells than the header has names (naming the line: csv.DictReader dropped the
    extra cells, so a missing header name put later cells under the wrong labels), and a file
    that is not UTF-8 (a byte-order mark is fine) or not CSV."""
    import csv
    import os
    if not os.path.exists(path):
        raise FileNotFoundError(f"labels file not found: {path}")
    try:
        return _read_labels(path, use)
    except UnicodeDecodeError as e:   # a spreadsheet's latin-1 export: the bare message named no file
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8 CSV") from None
    except csv.Error as e:   # a field over csv's size limit, an unterminated quote at the end of the file
        raise ValueError(f"{path}: not a readable CSV file ({e})") from None


def _read_labels(path, use):
    """`load_labels` without the file-naming of decoding errors."""
    import csv
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which made the first header name
    # "\ufeffstudy_key" and the file "no study_key column"
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        dup = [c for i, c in enumerate(cols) if c in cols[:i]]
        if dup:
            raise ValueError(f"{path}: column {dup[0]!r} appears {cols.count(dup[0])} times in the header: "
                             "one column per name")
        if "study_key" not in cols:
            raise ValueError(f"{path}: no study_key column (use the re-keyed copy written by preprocess.py)")
        names = [c for c in cols if c not in META_COLUMNS]
        cells = []
        for r in reader:
            ln = reader.line_num   # the line the row ends on (a quoted cell may span lines)
            if None in r:   # more cells than header names: csv.DictReader dropped the extra ones, and a
                # header missing one name shifts every later column onto the wrong label
                raise ValueError(f"{path}:{ln}: {len(cols) + len(r[None])} cells for the {len(cols)} columns of "
                                 "the header: a header name missing, or an unquoted comma in a cell")
            cells.append((ln, r))
    if use == "annotated":
        used = [n for n in names if all((r[n] or "").strip() in ("0", "1") for _, r in cells)]
    else:
        used = names if use is None else [c for c in names if c in use]
    rows = []
    for ln, r in cells:
        y = {}
        for n in used:
            v = (r[n] or "").strip()
            if v not in ("0", "1"):
                raise ValueError(f"{path}:{ln}: column {n!r} must be 0 or 1, got {v!r}")
            y[n] = int(v)
        age = r.get("age", "")
        try:
            age = float(age) if age not in ("", None) else None
        except ValueError:
            raise ValueError(f"{path}:{ln}: column 'age' must be a number, got {age!r}") from None
        rows.append(dict(study_key=r["study_key"], study=r.get("study", ""), modality=r.get("modality", ""),
                         split=r.get("split", ""), subject=r.get("subject", "") or "", age=age, y=y))
    return rows, names


def load_sides(findings_path):
    """findings.jsonl (re-keyed) -> {study_key: set of sides in {"left", "right"}} of its focal
    lesions. Bilateral, midline and diffuse lesions have no side and are ignored, so a left
    haematoma next to diffuse atrophy is a left-sided study. No lateral lesion: empty set.
    A study key on two records is a ValueError naming the file, the lines and the key (the
    later record would silently replace the earlier one's lesions)."""
    from nvfm.report_metrics import iter_jsonl
    out, lines = {}, {}
    for ln, r in iter_jsonl(findings_path, "findings"):
        s = set()
        for les in r.get("lesions", []):
            side = les.get("side")
            if side in ("left", "right"):
                s.add(side)
        k = r.get("study_key", r.get("study_uid"))
        if k in out:
            raise ValueError(f"{findings_path}:{ln}: study {k!r} appears twice in the ground truth (line {lines[k]} "
                             "too): one record per study")
        out[k], lines[k] = s, ln
    return out


def iterative_stratification(y, proportions, seed=0):
    """Multi-label iterative stratification (Sechidis et al. 2011).

    y (n, K) 0/1; proportions: list of fractions summing to 1. Returns (n,) int fold index.
    Rarest labels are distributed first, each positive study going to the fold that most
    lacks that label (ties: the fold that most lacks studies, then random); studies without
    any positive fill the folds' remaining quotas.
    """
    import numpy as np
    rng = np.random.default_rng(seed)
    y = np.asarray(y, dtype=bool)
    n, K = y.shape
    r = np.asarray(proportions, dtype=np.float64)
    r = r / r.sum()
    need = n * r                                   # studies each fold still wants
    need_l = y.sum(0)[None, :] * r[:, None]        # (F, K) positives each fold still wants
    fold = np.full(n, -1)
    left = y.copy()
    remaining = np.ones(n, dtype=bool)
    while remaining.any():
        counts = left[remaining].sum(0)
        if counts.max() == 0:
            break
        counts = np.where(counts > 0, counts, np.iinfo(np.int64).max)
        lab = int(np.argmin(counts))
        idx = np.nonzero(remaining & y[:, lab])[0]
        for i in rng.permutation(idx):
            d = need_l[:, lab]
            cand = np.nonzero(d == d.max())[0]
            if len(cand) > 1:
                cand = cand[need[cand] == need[cand].max()]
            f = int(rng.choice(cand))
            fold[i] = f
            remaining[i] = False
            need[f] -= 1
            need_l[f] -= y[i]
    for i in rng.permutation(np.nonzero(remaining)[0]):
        f = int(np.argmax(need + rng.random(len(need)) * 1e-9))
        fold[i] = f
        need[f] -= 1
    return fold


def _no_subject(g):
    """A group id that records no subject: "", None, or NaN (a blank cell read by pandas; np.nan is one
    object, so as a dict key it made every study without a subject one subject)."""
    return g is None or (isinstance(g, str) and g == "") or (isinstance(g, float) and g != g)


def grouped_stratification(y, groups, proportions, seed=0):
    """Iterative stratification of subjects rather than studies: a subject's studies all land
    in one fold, so no subject is both trained and tested on.

    y (n, K) 0/1 study labels; groups (n,) hashable subject ids ("" or None: the study is its
    own subject; NaN too). Each subject carries the union of its studies' labels (a subject with any
    positive study is positive) and is placed by `iterative_stratification`. Own code, no
    dependency: scikit-multilearn's IterativeStratification has no groups and is barely
    maintained; sklearn's StratifiedGroupKFold is single-label. Returns (n,) int fold index.
    """
    import numpy as np
    y = np.asarray(y, dtype=bool)
    ids = [("\0study", i) if _no_subject(g) else g for i, g in enumerate(groups)]
    uniq = {}
    inv = np.array([uniq.setdefault(g, len(uniq)) for g in ids])
    yg = np.zeros((len(uniq), y.shape[1]), dtype=bool)
    np.logical_or.at(yg, inv, y)
    return iterative_stratification(yg, proportions, seed)[inv]


def quantile_bins(v, n_bins=5):
    """(n,) continuous target -> (n, n_bins) one-hot of its quantile bin: what regression
    targets (age) are stratified on, so every fold spans the age range."""
    import numpy as np
    v = np.asarray(v, np.float64)
    edges = np.quantile(v, np.linspace(0, 1, n_bins + 1)[1:-1]) if len(v) else []
    b = np.searchsorted(edges, v, side="right")
    return np.eye(n_bins, dtype=np.int64)[b]


@torch.no_grad()
def predict(models, get_bag, keys, device="cpu", batch=16, return_maps=False):
    """Logits of a probe (or the mean logits of an ensemble: a list of models) on studies.

    Each class is averaged over the models that learned it (their `trained` buffer, make_probe's
    trained_mask): a CV fold whose training lacked a class's positives or negatives left that output
    unfitted, and its noise stays out of the class's mean. A class no model learned (untrained: its
    figures are undefined), and every class of models without the buffer (older probes): the plain
    mean over all models. get_bag(key) -> (n, D) float tensor. Returns (len(keys), K) float32 numpy;
    with return_maps, also per study a list of (alpha (n, K), contributions (n, K)) numpy arrays
    averaged the same way over the ensemble.
    """
    import numpy as np
    models = models if isinstance(models, (list, tuple)) else [models]
    for m in models:
        m.eval()
    masks = [getattr(m, "trained", None) for m in models]
    w, n = [1.0] * len(models), len(models)
    if models and all(t is not None for t in masks):
        w = torch.stack([t.to(device) for t in masks]).float()   # (M, K) 0/1
        w[:, w.sum(0) == 0] = 1.0                                 # learned by none: the plain mean
        n = w.sum(0)
    out, maps = [], []
    for i in range(0, len(keys), batch):
        bags = [get_bag(k) for k in keys[i:i + batch]]
        x, cu = pack_bags(bags, device)
        acc, acc_a, acc_c = 0, 0, 0
        for m, wm in zip(models, w):
            if return_maps:
                lg, a, inst = m(x, cu, return_maps=True)
                acc_a = acc_a + a * wm
                acc_c = acc_c + a * inst * wm
            else:
                lg = m(x, cu)
            acc = acc + lg * wm
        out.append((acc / n).float().cpu().numpy())
        if return_maps:
            a, c = (acc_a / n).cpu().numpy(), (acc_c / n).cpu().numpy()
            cuc = cu.cpu().numpy()
            maps += [(a[cuc[b]:cuc[b + 1]], c[cuc[b]:cuc[b + 1]]) for b in range(len(bags))]
    res = np.concatenate(out) if out else np.zeros((0, 0), np.float32)
    return (res, maps) if return_maps else res


def fit_selection(y, s, ok):
    """Operating points of a probe from its selection split (validation, or CV's out-of-fold logits).

    y, s (n, K) 0/1 labels and logits; ok (n, K) bool: the entries scored by a model that learned that
    class (CV: the fold model that held the study out trained on the class; entries of a fold that did
    not are noise and are left out of that class's fit). Returns (thresholds (Youden), platt_a,
    platt_b, auroc), each (K,) float64, every class fitted on its ok entries only; a class whose ok
    entries lack a positive or a negative gets the unfitted placeholders (threshold 0, Platt a = 0 and
    b = the prior of its ok entries, AUROC NaN)."""
    import numpy as np
    from nvfm import metrics
    y, s, ok = np.asarray(y, np.float64), np.asarray(s, np.float64), np.asarray(ok, bool)
    thr, (a, b), au = metrics.youden_thresholds(y, s), metrics.platt_fit(s, y), metrics.auroc(y, s)
    for k in np.nonzero(~ok.all(0))[0]:   # classes some of whose entries came from a model that never learned them
        r = ok[:, k]
        if not r.any():
            thr[k], a[k], b[k], au[k] = 0.0, 0.0, 0.0, np.nan
            continue
        yk, sk = y[r, k:k + 1], s[r, k:k + 1]
        (ak,), (bk,) = metrics.platt_fit(sk, yk)
        thr[k], a[k], b[k], au[k] = metrics.youden_thresholds(yk, sk)[0], ak, bk, metrics.auroc(yk, sk)[0]
    return thr, a, b, au


def precision_cuts(ck, target):
    """(K,) float64 precision-first thresholds (metrics.precision_thresholds) of a probe.pt's classes,
    fitted on its selection split's scores (sel_labels, sel_logits), each class on the entries of a
    model that learned it (sel_mask, as fit_selection; older probes: all entries); +inf: no cut."""
    import numpy as np
    from nvfm.metrics import precision_thresholds
    y, s = ck["sel_labels"].numpy(), ck["sel_logits"].numpy().astype(np.float64)
    thr = precision_thresholds(y, s, target)
    ok = ck["sel_mask"].numpy().astype(bool) if "sel_mask" in ck else np.ones(y.shape, bool)
    for k in np.nonzero(~ok.all(0))[0]:   # a fold's out-of-fold logits of a class it never learned: noise, left out
        r = ok[:, k]
        thr[k] = precision_thresholds(y[r, k:k + 1], s[r, k:k + 1], target)[0]
    return thr


def unfitted_classes(ck):
    """(K,) bool over a probe.pt's classes: no threshold or Platt calibration was fitted on its
    selection split, the class having no positives or no negatives there (train_probe.py then
    leaves threshold 0 (logit) and Platt a = 0: the prior). From the stored selection labels
    (sel_labels, (0, K) without a validation split) where sel_mask (n, K) marks the entries scored
    by a model that learned the class (`fit_selection`); older probes without sel_mask: all of
    sel_labels; older probes without sel_labels: from those
    placeholder values (their Platt fits left |a| ~ 1e-26, not exactly 0)."""
    import numpy as np
    from nvfm.metrics import defined_classes
    if "sel_mask" in ck:   # only the entries scored by a model that learned the class were fitted on
        y, ok = np.asarray(ck["sel_labels"]) > 0, np.asarray(ck["sel_mask"], dtype=bool)
        return ~(((y & ok).sum(0) > 0) & ((~y & ok).sum(0) > 0))
    if "sel_labels" in ck:
        return ~defined_classes(np.asarray(ck["sel_labels"]))
    thr = np.asarray(ck["thresholds"], np.float64)
    return (thr == 0) & (np.abs(np.asarray(ck.get("platt_a", np.ones_like(thr)), np.float64)) < 1e-12)


def untrained_classes(ck):
    """(K,) bool over a probe.pt's classes: outputs the probe never learned, the class having no
    positives or no negatives among its training studies (left out of the loss: its logit is
    noise, so its figures are undefined). From trained_classes; older probes without it: the
    classes without training positives (n_train_pos 0)."""
    import numpy as np
    if "trained_classes" in ck:
        return ~np.asarray(ck["trained_classes"], dtype=bool)
    if "n_train_pos" in ck:
        return np.asarray(ck["n_train_pos"], np.float64) == 0
    return np.zeros(len(ck["label_names"]), dtype=bool)   # a probe that records neither: all taken as learned


def seen_studies(ck, held_out=True):
    """(study keys, subjects) that a probe.pt records as its own dataset: the studies that fitted or
    tuned it (seen_keys, their subjects seen_subjects) and, with held_out, a CV probe's held-out
    test_keys (the rest of that dataset trained it); empty sets for what an older probe does not record."""
    keys = set(ck.get("seen_keys") or ()) | (set(ck.get("test_keys") or ()) if held_out else set())
    return keys, set(ck.get("seen_subjects") or ()) - {""}


def own_studies(keys, subjects, seen_keys, seen_subjects):
    """The keys (beside their subjects; "" or None: unknown) that are among seen_keys or whose subject
    is among seen_subjects (seen_studies): the probe's own, not held out from it."""
    return [k for k, g in zip(keys, subjects) if k in seen_keys or (g and g in seen_subjects)]
