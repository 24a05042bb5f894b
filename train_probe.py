"""Train a study-level diagnostic probe on frozen features (the NeuroVFM paper, Methods: diagnostic probes).

    python train_probe.py --features=out/features --labels=out/shards/labels.csv --modality=CT --out=out/probe_ct
    python train_probe.py ... --probe=mean_pool                    # baseline
    python train_probe.py ... --modality=CT --transfer_to=MR       # cross-modal transfer
    python train_probe.py ... --cv_folds=8                         # external-benchmark protocol
    python train_probe.py ... --task=age                           # brain age regression (MAE)
    python train_probe.py --protocol=paper --features=F --labels=BENCH/labels_dementia.csv --modality=MR --out=P
                                                                   # a public benchmark (nvfm/benchmarks.py)

Split protocol (default): train on split == "train", choose the checkpoint (best validation
macro AUROC, or MAE for age) and the per-class thresholds (Youden's J) and the Platt
calibration on split == "val" only; the test split is never seen here (evaluate.py).
With cv_folds = k > 0: the paper's external-benchmark protocol on all studies of the
modality: a `test_fraction` iterative-stratified held-out test set, k-fold iterative
stratified CV on the rest (each fold's model selected on its held-out fold), thresholds and
calibration from the out-of-fold logits; evaluate.py averages the k models' logits on the
held-out test set. A fold whose training part lacks a class's positives (or negatives), e.g. a
class with one or two positives, leaves that class out of its loss: its output there is noise.
So each class's ensemble logit is the mean over the folds that learned it only (nvfm.probe.predict,
from each model's `trained` mask), and that fold's out-of-fold logits of the class are left out
of the class's threshold, Platt fit, out-of-fold AUROC and grid score (sel_mask False there).
Such a fold held all of the class's positives (or negatives), so the entries left have none: the
class is unfitted (threshold 0, Platt a = 0, out-of-fold AUROC undefined), as no cut can be
chosen out of fold for it; its ensemble logit is still scored (AUROC on the test set). A class
that no fold learned is untrained (trained_classes False).
Studies with the same `subject` (a salted group id column, written by nvfm/benchmarks.py) always
fall on one side of every split (`probe.grouped_stratification`); age is stratified on its quintiles.
protocol = "paper": the paper's public-benchmark protocol in one flag: cv_folds 8 (unless set),
test_fraction 0.2, subject-grouped, every label column of the benchmark's labels file as a
class (unless label_names), no side classes. cv_grid = "lr=1e-3,3e-4;hidden=128,256": every
combination is cross-validated and the one with the best out-of-fold score (macro AUROC, or
MAE) is kept, its k fold models being the ensemble (the paper picks hyperparameters by CV).
`evaluate.py --external=True` applies such a probe unchanged to another dataset's labels
(external transfer, e.g. ADNI -> OASIS-1).

Labels: SHARDS/labels.csv (re-keyed); classes are the ontology names of the modality (or
`label_names`; every column with protocol = paper). Only the class columns must hold 0 or 1
(else a one-line error naming the line and column); the other columns may hold anything
(blanks, "NA": a diagnosis annotated for some studies only) and are not read. With
side_classes, two more classes lesion_left / lesion_right come from the lesions' sides in
findings.jsonl (for the flip test; every study needs its record there). Classes with no positives
(or no negatives) in training are kept in the outputs, left out of the loss and of checkpoint
selection, and reported undefined (by evaluate.py too). A study_key on two rows is an error; a
study without tokens (in `windows`) is left out with a warning that counts it (an empty bag has a
constant logit); studies of a split other than train/val/test are counted in a warning.

Output: out/probe.pt (atomic): models (one state dict per fold, each with its (K,) bool `trained`
buffer: probe_args' trained_mask), probe_args, task, label names, thresholds, Platt (a, b), training
positives per class, fold_trained (k x K bools, one row per model: the classes with positives and
negatives in that model's training part), trained_classes (K bools: learned by at least one model,
the others' outputs unfitted), encoder hash, test keys (CV), the study keys and subjects that
fitted or tuned it (seen_keys, seen_subjects: salted hashes),
the selection split's labels and logits (sel_labels, sel_logits: no keys, so a consumer such
as train_llava.py's probe cross-check can fit its own operating point; (0, K) when there is no
validation split, whose thresholds 0 and Platt a = 0 are then placeholders), sel_mask ((n, K) bool:
the selection entries scored by a model that learned the class, the only ones fitted on; False for
a class's out-of-fold entries of a fold that did not learn it, and for every entry of an untrained
class), config; out/log.txt (each run under a header line with its time and settings). Probes
written before fold_trained / sel_mask / the `trained` buffers load and score as they did: every
model counts for every class.
"""
import os
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
features = ""            # feature cache (encode.py --out)
labels = ""              # SHARDS/labels.csv
findings = ""            # SHARDS/findings.jsonl ("" -> beside labels); for side classes
out = "out/probe"
probe = "attentive_mil"  # attentive_mil | abmil | mean_pool
task = "classify"        # classify | age
modality = "CT"          # CT | MR | all
transfer_to = ""         # "" or the other modality: train on `modality`, evaluate on this one (split protocol only)
label_names = ""         # comma-separated subset of labels.csv columns ("" = the modality's ontology)
side_classes = True      # add lesion_left / lesion_right (from findings.jsonl) for the flip test
windows = ""             # comma-separated windows to use ("" = all: mr, brain, blood, bone)
hidden = 256
dropout = 0.1
lr = 1e-3
weight_decay = 1e-2
steps = 300
warmup = 20
batch_studies = 16
eval_interval = 20
max_pos_weight = 100.0
cv_folds = 0
test_fraction = 0.2
protocol = ""            # "" (splits, or CV when cv_folds > 0) | paper (8-fold CV, 20% test, all label columns)
age_bins = 5             # CV with task=age: stratify on this many age quantiles
cv_grid = ""             # CV: hyperparameters chosen by the out-of-fold score, e.g. "lr=1e-3,3e-4;hidden=128,256"
allow_missing = False    # studies missing from the cache: error (False) or skip with a warning
seed = 0
device = "cuda" if torch.cuda.is_available() else "cpu"
threads = 0            # CPU threads (0 = PyTorch default; 1-2 is fastest for small probes)
# -----------------------------------------------------------------------------
from nvfm.configurator import config_dict, configure, fail, require_path  # noqa: E402
configure(globals())
if threads > 0:
    torch.set_num_threads(threads)
if protocol == "paper":
    cv_folds = cv_folds or 8
    side_classes = False   # benchmark labels carry their own side columns (CQ500 bleed_left/right)
config = config_dict(globals())

from nvfm import metrics, ontology  # noqa: E402
from nvfm import probe as P  # noqa: E402
from nvfm.checkpoint import save_atomic  # noqa: E402
from nvfm.features import FeatureCache, StaleCacheError  # noqa: E402
from nvfm.model import WINDOWS  # noqa: E402


def log(msg):
    print(msg, flush=True)
    with open(os.path.join(out, "log.txt"), "a") as f:
        f.write(msg + "\n")


def choose_labels(columns):
    """The class names: explicit list (validated), or the modality's ontology names present."""
    if label_names:
        names = [n.strip() for n in label_names.split(",") if n.strip()]
        unknown = [n for n in names if n not in columns and n not in P.SIDE_CLASSES]
        if unknown:
            raise SystemExit(f"train_probe.py: unknown label names {unknown} (not columns of {labels}); "
                             f"available: {', '.join(columns[:10])}{' ...' if len(columns) > 10 else ''}")
        twice = sorted({n for i, n in enumerate(names) if n in names[:i]})
        if twice:   # two outputs of one class: it counted twice in the checkpoint choice, and evaluate.py refused the probe
            fail(f"--label_names: {twice[0]!r} is named {names.count(twice[0])} times: name each class once")
        return names
    if protocol == "paper":   # a benchmark labels file holds exactly its task's classes
        return list(columns)
    mods = [m for m in (modality, transfer_to) if m and m != "all"]
    names = [c for c in columns if c in ontology.DIAGNOSES and all(
        m in ontology.DIAGNOSES[c].modalities for m in mods)] if mods else [c for c in columns if c in ontology.DIAGNOSES]
    extra = [c for c in columns if c not in ontology.DIAGNOSES]
    if extra:
        print(f"train_probe.py: ignoring label columns not in the ontology: {extra[:8]}")
    if side_classes:
        names += list(P.SIDE_CLASSES)
    return names


def check_inputs():
    """One-line errors (exit 1) for the usual mistakes, before anything is written to `out`."""
    for key, value, choices in (("task", task, ("classify", "age")), ("probe", probe, P.PROBES),
                                ("modality", modality, ("CT", "MR", "all")), ("transfer_to", transfer_to, ("", "CT", "MR")),
                                ("protocol", protocol, ("", "paper"))):
        if value not in choices:
            fail(f"--{key}={value}: choose one of {', '.join(repr(c) for c in choices)}")
    if transfer_to and modality in (transfer_to, "all"):   # it trained and chose its checkpoint on transfer_to studies
        fail(f"--transfer_to={transfer_to} with --modality={modality}: the probe would train on {transfer_to} studies too; "
             f"name the other modality (--modality={'CT' if transfer_to == 'MR' else 'MR'})")
    if transfer_to and cv_folds > 0:   # CV keeps the rows of --modality only: its held-out test keys are of that one
        fail(f"--transfer_to={transfer_to} needs the split protocol: the CV protocol (--cv_folds, --protocol=paper) "
             f"holds out {modality} studies, so its test figures would not be {transfer_to} figures")
    for key in SETTING_RULES:   # each grid value is checked the same way by parse_grid
        check_setting(key, globals()[key], f"--{key}={globals()[key]}")
    if cv_grid.strip() and cv_folds <= 0:   # the split protocol would train with the plain settings instead
        fail("--cv_grid needs the CV protocol (--protocol=paper or --cv_folds=k)")
    parse_grid(cv_grid)
    unknown = [w for w in windows.split(",") if w and w not in WINDOWS]
    if unknown:   # no study has tokens of such a window: every bag would be empty
        fail(f"--windows: unknown window {unknown[0]!r}; choose from {', '.join(WINDOWS)}")
    require_path(features, "--features", kind="dir", hint="a feature cache written by encode.py")
    if not os.path.exists(os.path.join(features, "index.json")):
        fail(f"--features: {features} is not a feature cache (no index.json; run encode.py first)")
    require_path(labels, "--labels", hint="SHARDS/labels.csv written by preprocess.py")
    try:
        _, columns = P.load_labels(labels, use=())   # which label columns the file has
        names = choose_labels(columns) if task == "classify" else ["age"]
        rows, _ = P.load_labels(labels, use=names)   # only the columns learned must hold 0 or 1
    except ValueError as e:  # no study_key column, a value not 0/1
        fail(str(e))
    dup = [(k, n) for k, n in Counter(r["study_key"] for r in rows).items() if n > 1]
    if dup:   # one study on a train row and a val row would be trained on and then select the checkpoint
        fail(f"--labels: {labels}: study_key {dup[0][0]!r} is on {dup[0][1]} rows: one row per study")
    return rows, columns, names


def warn_sparse_labels(names, columns):
    """Labels that cover few of the ontology's classes usually mean the wrong file or modality."""
    if task != "classify" or label_names or protocol == "paper":
        return
    mods = [m for m in (modality, transfer_to) if m and m != "all"]
    expected = [c for c, d in ontology.DIAGNOSES.items() if all(m in d.modalities for m in mods)]
    found = [n for n in names if n in ontology.DIAGNOSES]
    if len(found) < max(2, len(expected) // 4):
        bar = "!" * 72
        log(f"{bar}\nwarning: {labels} has only {len(found)} of the {len(expected)} "
            f"{'/'.join(mods) or 'all'} ontology classes as columns ({', '.join(found[:6]) or 'none'}); "
            f"the probe learns only those.\nIs this the re-keyed labels.csv of the right shard set and "
            f"--modality? (--label_names=a,b silences this)\n{bar}")


GRID_KEYS = {"lr": float, "weight_decay": float, "steps": int, "hidden": int, "dropout": float}
# outside these a run crashed mid-way with a traceback (eval_interval 0, steps -1, cv_folds 1, test_fraction 1.5)
# or trained silently on nothing (max_pos_weight 0 zeroes every positive's loss, hidden 0 a constant probe,
# cv_folds -1 ran the split protocol)
SETTING_RULES = {
    "steps": (lambda v: v >= 0, "at least 0"),
    "eval_interval": (lambda v: v >= 1, "at least 1"),
    "batch_studies": (lambda v: v >= 1, "at least 1"),
    "hidden": (lambda v: v >= 1 or probe == "mean_pool", "at least 1"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lr": (lambda v: v >= 0, "at least 0"),
    "weight_decay": (lambda v: v >= 0, "at least 0"),
    "max_pos_weight": (lambda v: v > 0, "above 0"),
    "cv_folds": (lambda v: v == 0 or v >= 2, "0 (the split protocol) or at least 2"),
    "test_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "age_bins": (lambda v: v >= 1, "at least 1"),
}


def check_setting(key, value, where):
    """fail() with one line naming `where` (the flag or grid entry) unless value is within SETTING_RULES[key]."""
    ok, rule = SETTING_RULES[key]
    if not ok(value):   # NaN fails every rule
        fail(f"{where}: {key} must be {rule}")


def parse_grid(text):
    """"lr=1e-3,3e-4;hidden=128,256" -> the list of every combination as dicts ([{}] for "")."""
    import itertools
    axes = []
    for part in [p for p in text.split(";") if p.strip()]:
        key, _, vals = part.partition("=")
        key = key.strip()
        if key not in GRID_KEYS or not vals.strip():
            fail(f"--cv_grid: {part.strip()!r}: use key=v1,v2 with key in {', '.join(GRID_KEYS)}")
        try:
            axes.append([(key, GRID_KEYS[key](v)) for v in vals.split(",")])
        except ValueError:
            fail(f"--cv_grid: {part.strip()!r}: values of {key} must be {GRID_KEYS[key].__name__}s")
        for _, v in axes[-1]:
            check_setting(key, v, f"--cv_grid: {part.strip()!r}")
    return [dict(c) for c in itertools.product(*axes)]


def main():
    rows, columns, names = check_inputs()
    try:
        cache = FeatureCache(features)
    except StaleCacheError as e:   # a cache cut short: one line, before anything is written
        fail(str(e))
    wins = set(windows.split(",")) if windows else None
    target_rows = [r for r in rows if transfer_to and r["modality"] == transfer_to and r["study_key"] in cache]
    if target_rows and all(cache.n_tokens(r["study_key"], wins) == 0 for r in target_rows):
        fail(f"--transfer_to={transfer_to}: none of its {len(target_rows)} studies has tokens in the windows "
             f"{windows} of {features}: the probe could never be scored on them (choose --windows)")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "log.txt"), "a") as f:   # a rerun appends: its lines follow its own header
        f.write(f"== train_probe.py run {time.strftime('%Y-%m-%d %H:%M:%S')}: {config}\n")
    torch.manual_seed(seed)
    warn_sparse_labels(names, columns)
    sides, fpath = {}, ""
    if task == "classify" and any(n in P.SIDE_CLASSES for n in names):
        fpath = findings or os.path.join(os.path.dirname(labels), "findings.jsonl")
        if not os.path.exists(fpath):
            raise SystemExit(f"train_probe.py: side classes need {fpath} (or --side_classes=False)")
        try:
            sides = P.load_sides(fpath)
        except ValueError as e:   # a study key twice, a line that is not JSON
            fail(str(e))

    def target(r):
        if task == "age":
            return [r["age"]]
        return [(int(n.split("_")[1] in sides.get(r["study_key"], ())) if n in P.SIDE_CLASSES else r["y"][n])
                for n in names]

    present = sorted({r["modality"] for r in rows})
    rows = [r for r in rows if modality == "all" or r["modality"] == modality]
    if not rows and present:   # an MR benchmark run with the default --modality=CT
        given = [m for m in present if m]   # a file without a modality column gives "" for every study
        fail(f"no {modality} studies in {labels} (" + (f"its studies are {'/'.join(given)}: --modality={given[0]})"
             if given else "no study has a modality (no modality column): --modality=all)"))
    if task == "age":
        if rows and all(r["age"] is None for r in rows):   # was "no CT studies with labels and features"
            fail(f"--task=age: none of the {len(rows)} {modality} studies in {labels} has an age "
                 "(its age column is missing or empty)")
        rows = [r for r in rows if r["age"] is not None]
        bad = [r for r in rows if not np.isfinite(r["age"])]
        if bad:   # a NaN age makes every validation MAE NaN: the untrained step-0 model would be kept
            fail(f"--labels: {labels}: study {bad[0]['study_key']!r} has age {bad[0]['age']} ({len(bad)} such "
                 f"studies): leave the cell empty for an unknown age")
    missing = [r["study_key"] for r in rows if r["study_key"] not in cache]
    if missing:
        msg = (f"{len(missing)} of {len(rows)} {modality} studies in {labels} are not in the feature cache "
               f"{features} (first: {missing[:3]})")
        if not allow_missing:
            raise SystemExit(f"train_probe.py: {msg}; run encode.py on them or pass --allow_missing=True")
        log(f"warning: {msg}; skipped")
        rows = [r for r in rows if r["study_key"] in cache]
    empty = [r["study_key"] for r in rows if cache.n_tokens(r["study_key"], wins) == 0]
    if empty:   # an empty bag gets a constant logit: it would be trained on and select thresholds unseen
        log(f"warning: {len(empty)} of {len(rows)} {modality} studies have no tokens"
            f"{' in the windows ' + windows if windows else ''} in {features} (first: {empty[:3]}); left out")
        empty = set(empty)
        rows = [r for r in rows if r["study_key"] not in empty]
    if not rows:
        raise SystemExit(f"train_probe.py: no {modality} studies with labels and features")
    lost = [r["study_key"] for r in rows if r["study_key"] not in sides] if fpath else []
    if lost:   # no record would read as no lesion: both side labels 0 (evaluate.py refuses the same)
        raise SystemExit(f"train_probe.py: {len(lost)} of the {len(rows)} {modality} studies are not in {fpath} "
                         f"(first: {lost[:3]}): side classes need every study's record (or --side_classes=False)")
    Y = {r["study_key"]: np.asarray(target(r), np.float32) for r in rows}

    def get_bag(key):
        return torch.from_numpy(np.asarray(cache.study_tokens(key, wins)[0], dtype=np.float32))

    # trained_mask: each model's state holds the classes its training fitted, so any reader of probe.pt
    # averages a class over the fold models that learned it (P.predict)
    probe_args = dict(kind=probe, dim=cache.dim, n_out=len(names), hidden=hidden, dropout=dropout, trained_mask=True)

    def train_one(train_keys, val_keys, tag, norm=(0.0, 1.0), hp=None):
        hp = {**dict(lr=lr, weight_decay=weight_decay, steps=steps, hidden=hidden, dropout=dropout), **(hp or {})}
        n_steps = int(hp["steps"])
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)   # init and dropout: a fold or grid combination trains alike wherever it runs
        mu, sd = norm   # age: the probe predicts standardised age; the L1 loss is in years / sd
        m = P.make_probe(**dict(probe_args, hidden=int(hp["hidden"]), dropout=float(hp["dropout"]))).to(device)
        ytr = torch.from_numpy(np.stack([Y[k] for k in train_keys]))
        pw, usable = P.class_weights(ytr, max_pos_weight)
        pw, usable = pw.to(device), usable.to(device)
        if task == "classify":   # the outputs this model learns (age: its one output always)
            m.trained.copy_(usable)
        opt = torch.optim.AdamW(m.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        yval = np.stack([Y[k] for k in val_keys]) if val_keys else None
        best, best_state, t0 = None, None, time.time()
        for step in range(n_steps + 1):
            if step % eval_interval == 0 or step == n_steps:
                if val_keys:
                    lv = P.predict(m, get_bag, val_keys, device)
                    if not np.isfinite(lv).all():   # diverged (a --cv_grid typo lr=1e3): never this checkpoint
                        # (a traceback from the AUROC threw away every fold and grid combination before it)
                        score, desc = -np.inf, "validation outputs NaN or inf (diverged: lower the lr)"
                    elif task == "age":
                        score = -metrics.mae(yval[:, 0], lv[:, 0] * sd + mu)
                        desc = f"val MAE {-score:.2f}"
                    else:   # a class left out of the loss has an unlearned logit: no say in the choice
                        au, nd = metrics.macro(np.where(usable.cpu().numpy(), metrics.auroc(yval, lv), np.nan))
                        vl = float(F.binary_cross_entropy_with_logits(torch.from_numpy(lv), torch.from_numpy(yval)))
                        score = (au if au is not None else 0.0) - 1e-3 * vl  # AUROC, loss breaks ties
                        desc = f"val macro AUROC {au if au is None else round(au, 4)} ({nd} classes), loss {vl:.4f}"
                else:
                    score, desc = step, "no validation set: keeping the last step"
                if best is None or score > best:
                    best, best_state = score, {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                    desc += " *"
                log(f"[{tag}] step {step}: {desc} ({time.time() - t0:.1f} s)")
            if step == n_steps:
                break
            m.train()
            idx = torch.randint(len(train_keys), (min(batch_studies, len(train_keys)),), generator=g)
            x, cu = P.pack_bags([get_bag(train_keys[i]) for i in idx], device)
            yb = ytr[idx].to(device)
            for grp in opt.param_groups:   # linear warmup, cosine decay
                grp["lr"] = hp["lr"] * min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + np.cos(np.pi * step / n_steps))
            logits = m(x, cu)
            if task == "age":
                loss = F.l1_loss(logits[:, 0], (yb[:, 0] - mu) / sd)
            else:
                loss = P.bce_loss(logits, yb, pw, usable)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        m.load_state_dict(best_state)
        return m, best_state

    def age_norm(keys):
        a = np.array([Y[k][0] for k in keys], np.float64)
        return (float(a.mean()), float(max(a.std(), 1.0))) if task == "age" else (0.0, 1.0)

    eval_mod = transfer_to or modality
    grid = parse_grid(cv_grid)
    ckpt = dict(probe_args=probe_args, task=task, label_names=names, modality=modality, eval_modality=eval_mod,
                encoder_hash=cache.encoder_hash, feature_precision=cache.precision,
                features=os.path.abspath(features), windows=windows,
                side_classes=bool(side_classes), config=config)
    if cv_folds > 0:
        keys = [r["study_key"] for r in rows]
        subj = [r["subject"] for r in rows]
        # classes, or age quintiles: what every fold and the test set should hold in proportion
        ys = np.stack([Y[k] for k in keys]) if task == "classify" else P.quantile_bins([Y[k][0] for k in keys], age_bins)
        part = P.grouped_stratification(ys, subj, [test_fraction, 1 - test_fraction], seed)
        test_keys = [k for k, p in zip(keys, part) if p == 0]
        ri = np.nonzero(part == 1)[0]
        rest = [keys[i] for i in ri]
        folds = P.grouped_stratification(ys[ri], [subj[i] for i in ri], [1] * cv_folds, seed + 1)
        n_subj = len({s or k for s, k in zip(subj, keys)})
        log(f"cv: {len(test_keys)} held-out test studies, {cv_folds} folds over {len(rest)} studies "
            f"({n_subj} subjects, grouped)")
        if len(set(folds.tolist())) < cv_folds or not test_keys:
            raise SystemExit(f"train_probe.py: {len(rows)} studies ({n_subj} subjects) are too few for a held-out "
                             f"test set and {cv_folds} folds")
        norm = age_norm(rest)
        yrest = np.stack([Y[k] for k in rest])
        best = None
        for hp in grid:   # the paper: CV picks the probe's hyperparameters, its 8 fold models are the ensemble
            states, oof = [], np.zeros((len(rest), len(names)), np.float32)
            for f in range(cv_folds):
                tr = [k for k, ff in zip(rest, folds) if ff != f]
                va = [k for k, ff in zip(rest, folds) if ff == f]
                m, st = train_one(tr, va, f"fold {f}" + (f" {hp}" if hp else ""), norm, hp)
                states.append(st)
                oof[folds == f] = P.predict(m, get_bag, va, device)
            fold_trained = np.stack([st["trained"].numpy() for st in states])   # (k, K)
            if task == "age":
                score = -metrics.mae(yrest[:, 0], oof[:, 0] * norm[1] + norm[0])
            else:   # a class's out-of-fold logits from a fold that never learned it are noise: left out
                score = metrics.macro(P.fit_selection(yrest, oof, fold_trained[folds])[3])[0]
                score = -np.inf if score is None else score
            if len(grid) > 1:
                log(f"cv grid {hp}: out-of-fold {'MAE' if task == 'age' else 'macro AUROC'} "
                    f"{abs(score) if task == 'age' else score:.4f}")
            if best is None or score > best[0]:
                best = (score, hp, states, oof, fold_trained)
        _, hp, states, oof, fold_trained = best
        if len(grid) > 1:
            log(f"cv grid: chose {hp}")
        if hp:   # the saved models were built with these: evaluate.py rebuilds them from probe_args
            probe_args.update({k: type(probe_args[k])(v) for k, v in hp.items() if k in ("hidden", "dropout")})
            ckpt.update(cv_grid_choice=hp)
        sel_keys, sel_logits, sel_ok = rest, oof, fold_trained[folds]
        ckpt.update(test_keys=test_keys, protocol=("paper: " if protocol == "paper" else "") + f"{cv_folds}-fold CV")
        seen = rest
        train_pos = yrest.sum(0)
    else:
        tr = [r["study_key"] for r in rows if r["split"] == "train"]
        va = [r["study_key"] for r in rows if r["split"] == "val"]
        if not tr:
            raise SystemExit(f"train_probe.py: no {modality} studies with split == 'train' in {labels}")
        other = Counter(r["split"] for r in rows if r["split"] not in ("train", "val", "test"))
        if other:   # e.g. "validation": those studies would be dropped with nothing but "no validation studies"
            log(f"warning: {sum(other.values())} {modality} studies are in splits this protocol does not read "
                f"({', '.join(f'{s!r}: {n}' for s, n in sorted(other.items()))}): not used (the splits are "
                f"'train', 'val', 'test')")
        if not va:
            log("warning: no validation studies: last step kept, no thresholds or calibration fitted")
        tr_subj = {r["subject"] for r in rows if r["split"] == "train"} - {""}
        shared = [r["study_key"] for r in rows if r["split"] == "val" and r["subject"] in tr_subj]
        if shared:   # their subjects were trained on: checkpoint, thresholds and Platt chosen in-sample
            log(f"warning: {len(shared)} of the {len(va)} validation studies share a subject with training studies "
                f"(first: {shared[:3]}): checkpoint, thresholds and calibration are chosen on subjects the probe was "
                f"fitted on (optimistic); keep each subject's studies in one split")
        norm = age_norm(tr)
        m, st = train_one(tr, va, "probe", norm)
        states = [st]
        fold_trained = st["trained"].numpy()[None]
        sel_keys, sel_logits = va, (P.predict(m, get_bag, va, device) if va else None)
        sel_ok = np.broadcast_to(fold_trained, (len(va), len(names)))
        ckpt.update(protocol="train/val/test splits")
        seen = tr + va
        train_pos = np.stack([Y[k] for k in tr]).sum(0)
    trained = fold_trained.any(0)   # learned by at least one (fold) model
    # what fitted or tuned the probe (salted hashes): evaluate.py --external=True flags a dataset sharing any
    subject_of = {r["study_key"]: r["subject"] for r in rows}
    ckpt.update(seen_keys=list(seen), seen_subjects=sorted({subject_of[k] for k in seen} - {""}))
    ckpt.update(models=states, n_train_pos=[float(v) for v in train_pos], age_mu=norm[0], age_sd=norm[1])
    if task == "classify":
        if sel_keys:
            ysel = np.stack([Y[k] for k in sel_keys])
            thr, a, b, au = P.fit_selection(ysel, sel_logits, sel_ok)
            au, nd = metrics.macro(au)
            log(f"selection set ({len(sel_keys)} studies): macro AUROC {au} over {nd} defined classes")
        else:   # placeholders of an unfitted class (threshold 0, Platt a = 0); the empty selection split says so
            thr, a, b = np.zeros(len(names)), np.zeros(len(names)), np.zeros(len(names))
            ysel, sel_logits = np.zeros((0, len(names))), np.zeros((0, len(names)))
            sel_ok = np.zeros((0, len(names)), bool)
        ckpt.update(thresholds=[float(t) for t in thr], platt_a=[float(v) for v in a], platt_b=[float(v) for v in b])
        # the selection split's scores ((0, K) without one), so a consumer can pick its own operating point
        ckpt.update(sel_labels=torch.from_numpy(ysel.astype(np.uint8)),
                    sel_logits=torch.from_numpy(np.asarray(sel_logits, np.float32)),
                    sel_mask=torch.from_numpy(np.ascontiguousarray(sel_ok, dtype=bool)))
        # evaluate.py reports these undefined: their logits were never fitted (metrics.json would score noise)
        ckpt.update(trained_classes=[bool(t) for t in trained],
                    fold_trained=[[bool(t) for t in row] for row in fold_trained])
        partial = [n for n, t, u in zip(names, trained, fold_trained.all(0)) if t and not u]
        if partial:
            log(f"{len(partial)} classes were learned by some folds only (averaged over those, their out-of-fold "
                f"logits from the others left out): {partial[:6]}{' ...' if len(partial) > 6 else ''}")
        undefined = [n for n, t in zip(names, trained) if not t]
        if undefined:
            log(f"{len(undefined)} classes have no training positives or no training negatives (left out of the "
                f"loss, reported undefined): {undefined[:6]}{' ...' if len(undefined) > 6 else ''}")
    path = os.path.join(out, "probe.pt")
    save_atomic(ckpt, path)
    log(f"saved {path}: {probe} probe, {len(names)} classes, {len(states)} model(s), encoder {cache.encoder_hash[:23]}")


if __name__ == "__main__":
    main()
