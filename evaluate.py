"""Evaluate trained probes on held-out test studies: every number in a JSON, a readable
table, and PNG plots (the NeuroVFM paper, Methods: evaluation).

    python evaluate.py --probes=out/probe_ct/probe.pt --labels=out/shards/labels.csv --out=out/eval
    python evaluate.py --probes=out/p_jepa/probe.pt,out/p_random/probe.pt,out/p_mean/probe.pt \
        --names=pretrained,random_init,mean_pool --labels=... --shards=out/shards --cohort=out/demo

--labels: only the columns the probes score (their label names; the side classes lesion_left /
lesion_right come from findings.jsonl) must hold 0 or 1 (else a one-line error naming the line
and column); the other columns may hold anything (blanks, "NA") and are not read.

Per probe: per-class AUROC, sensitivity, specificity, balanced accuracy at the thresholds
chosen on validation (a class without positives or negatives on the probe's selection split has
no chosen threshold or calibration, only train_probe.py's placeholders: its sensitivity,
specificity, balanced accuracy and calibrated F1 are null, `threshold_fitted` false, left out of
their macro averages, with a warning; a class the probe never learned, without training positives
or negatives (probe.pt's trained_classes), is undefined in every figure, with a warning), 95% CIs
from a bootstrap (`n_boot` replicates) of the evaluated studies:
study-level, or subject-level (a cluster bootstrap: each drawn subject brings all its evaluated
studies, the same resample for every figure of a probe) when labels.csv's `subject` column gives
some subject two or more of the evaluated studies, as in RSNA (metrics.json and table.txt record
the unit as `ci_unit`, paper_table.md's first line says which), macro
averages over defined classes (classes with no test positives or no test negatives are listed
as undefined, every figure of theirs null; a
macro CI comes from the replicates in which every one of those classes is defined, counted in
its ci_n_valid, and is null below 100 of them),
Platt-calibrated F1 and the label-efficiency OLS fit (F1 vs log10 training positives), AUPRC
and PR lift (AUPRC / prevalence) with CIs; for age probes MAE, RMSE, Pearson r and mean bias
with CIs. A probe with the classes `ich`, `bleed_left`, `bleed_right` (CQ500) also gets the side
accuracy given correct detection (`laterality`). A study without tokens in the probe's windows
(an empty bag: a constant logit) is left out with a warning, as train_probe.py leaves it out, and
counted (`n_no_tokens` in metrics.json). A study missing from the feature cache is an error,
unless the probe was trained with --allow_missing=True (studies preprocess.py could not read):
then it is left out with a warning and counted (`n_missing`).
A probe is scored only on features of the precision it was fitted on (probe.pt's
`feature_precision`, else the one its training cache records; CPU float32 and CUDA
bfloat16-autocast features differ ~14x the float16 storage step, nvfm/features.py): a
--features cache of another precision is refused, as one of another encoder or token rules is,
and where either precision is not recorded a warning says the check could not be made
(metrics.json records the evaluated cache's as `feature_precision`). The flip test re-encodes on
--device: on a cache of another precision it is not run (its note says why).
Public benchmarks (nvfm/benchmarks.py, `train_probe.py --protocol=paper`): `external=True`
scores a probe unchanged on every study of another dataset's --labels (external transfer; a
study or subject the probe saw, as probe.pt's seen_keys / seen_subjects / test_keys record it,
marks the run in-sample; so does, in any run, an evaluated study that is, or shares a subject
with, one that fitted or tuned the probe: labels.csv splits that are not subject-disjoint);
paper_table.md has one row per task and figure and one column per probe name (in-sample
figures, as table.txt flags them, on rows marked "(in-sample: ...)");
`merge=a/metrics.json,b/metrics.json` joins runs (datasets) into one table (a row and column
held by two runs is an error: give each dataset's run its own task_name).
The first probe may also be grounded (`cohort`: pointing game against the demo lesion masks,
or a grounding set's masks from nvfm/benchmarks.py; NIfTI attention overlays) and flip-tested (`flip_test`:
re-encodes the test volumes mirrored left-right with the probe's encoder, `shards` needed).
`reports`: a generated-reports JSONL scored by nvfm.report_metrics.evaluate_reports: the reports
of the `split` studies of findings.jsonl (comma-separated, e.g. val,test), every one of which
needs a report.

Outputs in `out`: metrics.json, table.txt, paper_table.md, roc_<probe>.png, pr_<probe>.png,
label_efficiency_<probe>.png, age_<probe>.png (brain-age scatter), grounding/*.nii.gz. When
--cohort (pointing game), --flip_test, --anatomy or --reports fails after the probes are scored (another
shard set or encoder than the cache's, a lesion mask missing), the probes' outputs are still written,
the failed part is one error line and {"error": reason} in metrics.json, and the exit status is 1.
A rerun into the same `out` leaves only its own figures and tables: nothing is written until every
probe (and grounding, flip test, anatomy, reports) is scored, so a run refused midway changes
nothing; then the figures, paper_table.md, table.txt and, last, metrics.json (the record of a
complete run) are each written atomically (a killed write leaves the previous file whole); then
the previous run's figures (those of the probe names in the metrics.json it replaced) that this run
did not draw (other names, another task, --plots=False), its grounding/ overlays this run did
not write (another first probe, no --cohort) and its paper_table.md when this run has no paper
rows (--reports only) are removed, listed in one line on stderr. Other files in `out` are never
touched. --merge writes paper_table.md alone and removes nothing.
"""
import json
import os
import sys

import numpy as np
import torch

# -----------------------------------------------------------------------------
probes = ""            # comma-separated probe.pt paths (train_probe.py --out)
names = ""             # comma-separated display names ("" = parent folder names)
labels = ""            # SHARDS/labels.csv
findings = ""          # SHARDS/findings.jsonl ("" -> beside labels): lesion sides of side classes, report truth
features = ""          # override the feature cache recorded in the probe ("" = recorded)
split = "test"         # evaluated split (ignored for CV probes: their held-out test keys); --reports: comma-separated
                       # splits of findings.jsonl whose reports are scored, e.g. "val,test"
out = "out/eval"
n_boot = 10000
seed = 0
shards = ""            # SHARDS directory: needed for grounding overlays and the flip test
cohort = ""            # demo cohort root (lesion masks gt/...): pointing game
flip_test = False      # re-encode flipped test volumes (needs shards and the encoder)
flip_split = ""        # splits for the flip test, e.g. "val,test" ("" = the evaluated studies)
anatomy = False        # patch matching + k-means brain IoU of the first probe's features (needs shards, cohort)
encoder = ""           # encoder for the flip test ("" = the one recorded in the feature cache)
overlays = 3           # write NIfTI attention overlays for this many positive test studies
reports = ""           # generated reports JSONL -> nvfm.report_metrics.evaluate_reports
plots = True
external = False       # score every --labels study of the probe's eval modality (a probe trained on another dataset)
laterality = "ich:bleed_left:bleed_right"  # detect:left:right classes for side accuracy given detection ("" = off)
task_name = ""         # row label of this run in paper_table.md ("" = the --labels file name)
merge = ""             # comma-separated metrics.json of earlier runs: write one paper_table.md of all, nothing else
device = "cuda" if torch.cuda.is_available() else "cpu"
threads = 0            # CPU threads (0 = PyTorch default; 1-2 is fastest for small probes)
# -----------------------------------------------------------------------------
from nvfm.configurator import configure, fail, require_path  # noqa: E402
configure(globals(), argv=None if __name__ == "__main__" else [])   # importable by the tests
if threads > 0:
    torch.set_num_threads(threads)

from nvfm import metrics  # noqa: E402
from nvfm import probe as P  # noqa: E402
from nvfm.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from nvfm.data import atomic_path, write_atomic  # noqa: E402
from nvfm.features import FeatureCache, StaleCacheError, trained_precision  # noqa: E402


def load_probe(path):
    """-> (checkpoint dict, list of probe modules in eval mode)."""
    try:
        ck = load_checkpoint(path)
    except CheckpointError as e:  # truncated, empty, not a torch file, a pickled object: its own reason
        fail(f"--probes: {path} is not a readable probe.pt: {str(e).removeprefix(f'{path}: ')}")
    if not isinstance(ck, dict) or "models" not in ck:
        fail(f"--probes: {path} is not a probe.pt written by train_probe.py")
    return ck, P.load_models(ck, path, device)


def evaluate_probe(path, probe, display, rows_by_key, sides, fpath):
    """probe: load_probe(path); sides: lesion sides per study from findings.jsonl at fpath (None: not found)."""
    ck, models = probe
    try:
        cache = FeatureCache(features or ck["features"], expect_hash=ck["encoder_hash"])
    except StaleCacheError as e:   # another encoder's features, a cache cut short
        fail(str(e))
    fit = trained_precision(ck, ck["features"], cache)
    if fit and cache.precision and fit != cache.precision:   # ~14x the float16 step apart: not the probe's figures
        fail(f"--probes: {path} was fitted on {fit} features ({ck['features']}), but {cache.path} holds "
             f"{cache.precision} features (encode.py on another kind of device): its figures would not be the "
             f"probe's; score it on a {fit} cache or retrain it on this one")
    if not (fit and cache.precision) and os.path.realpath(cache.path) != os.path.realpath(ck["features"]):
        print(f"evaluate.py: warning: {display}: cannot check that {cache.path} ({cache.precision or 'not recorded'}) "
              f"holds features of the precision the probe was fitted on ({fit or 'not recorded'})", file=sys.stderr)
    wins = set(ck["windows"].split(",")) if ck["windows"] else None
    lab = ck["label_names"]
    mod = ck["eval_modality"]
    if external:   # another dataset: every labelled study counts, its splits mean nothing to this probe
        keys = [k for k, r in rows_by_key.items() if mod == "all" or r["modality"] == mod]
    elif "test_keys" in ck:
        keys = list(ck["test_keys"])
        absent = [k for k in keys if k not in rows_by_key]
        if absent:
            raise SystemExit(f"evaluate.py: {len(absent)} of the probe's {len(keys)} held-out test studies are not in "
                             f"{labels}: wrong --labels, or --external=True to score the probe on another dataset")
        other = [k for k in keys if mod != "all" and rows_by_key[k]["modality"] != mod]
        if other:   # e.g. a CV probe of --transfer_to: its held-out studies are of the training modality
            raise SystemExit(f"evaluate.py: {len(other)} of the probe's {len(keys)} held-out test studies are not "
                             f"{mod} studies in {labels} (first: {other[0]!r}, {rows_by_key[other[0]]['modality']}), "
                             f"but the probe is scored as {ck['modality']} -> {mod}: its figures would not be "
                             f"{mod} figures")
    else:
        keys = [k for k, r in rows_by_key.items() if r["split"] == split and (mod == "all" or r["modality"] == mod)]
    if ck["task"] == "age":
        keys = [k for k in keys if rows_by_key[k]["age"] is not None]
        bad = [k for k in keys if not np.isfinite(rows_by_key[k]["age"])]
        if bad:
            raise SystemExit(f"evaluate.py: {labels}: study {bad[0]!r} has age {rows_by_key[bad[0]]['age']} "
                             f"({len(bad)} such studies): leave the cell empty for an unknown age")
    missing = [k for k in keys if k not in cache]
    if missing:   # e.g. studies preprocess.py could not read: left out only as the probe's own training left them out
        msg = f"{len(missing)} {split} studies are not in the feature cache {cache.path} (first: {missing[:3]})"
        if not ck.get("config", {}).get("allow_missing"):
            raise SystemExit(f"evaluate.py: {msg}; run encode.py on the {split} split (a probe trained with "
                             f"--allow_missing=True is scored without them)")
        print(f"evaluate.py: warning: {display}: {msg}; left out (the probe was trained with --allow_missing=True)",
              file=sys.stderr)
        keys = [k for k in keys if k in cache]
    empty = [k for k in keys if cache.n_tokens(k, wins) == 0]
    if empty:   # an empty bag gets a constant logit whatever the study: left out, as train_probe.py does
        print(f"evaluate.py: warning: {display}: {len(empty)} of the {len(keys)} evaluated studies have no tokens"
              f"{' in the windows ' + ck['windows'] if wins else ''} in {cache.path} (first: {empty[:3]}); left out",
              file=sys.stderr)
        gone = set(empty)
        keys = [k for k in keys if k not in gone]
    if not keys:   # before the column check below, which reads a row of labels.csv
        raise SystemExit(f"evaluate.py: no {'' if mod == 'all' else mod + ' '}studies in split {split!r} of {labels}"
                         + (f" with tokens in the windows {ck['windows']}" if empty else ""))
    side = [n for n in lab if n in P.SIDE_CLASSES]
    if side and sides is None and not external:   # without the lesions' sides every study would be a negative
        raise SystemExit(f"evaluate.py: the probe's side classes {side} need the lesions' sides of findings.jsonl: "
                         f"{fpath} not found (--findings=PATH)")
    if side and sides is not None:
        lost = [k for k in keys if k not in sides]
        if lost:
            raise SystemExit(f"evaluate.py: {len(lost)} of the {len(keys)} evaluated studies are not in {fpath} "
                             f"(first: {lost[:3]}): their lesion sides (the probe's {side}) are unknown")
    unknown = [n for n in lab if n != "age" and (n in P.SIDE_CLASSES and sides is None or n not in P.SIDE_CLASSES
                                                 and n not in next(iter(rows_by_key.values()))["y"])]
    full_ck, cols = ck, None
    if unknown and external and len(unknown) < len(lab):
        # another dataset labels a subset of the probe's classes (RSNA's six in CQ500's fourteen, one
        # lesion class of a grounding set): score those, keep the probe's other outputs unseen
        cols = [i for i, n in enumerate(lab) if n not in unknown]
        ck = dict(ck, label_names=[lab[i] for i in cols],
                  **{f: [ck[f][i] for i in cols] for f in ("thresholds", "platt_a", "platt_b", "n_train_pos", "trained_classes")
                     if f in ck})
        print(f"evaluate.py: {display}: {len(unknown)} probe classes are not columns of {labels} (not scored): "
              f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        lab = ck["label_names"]
    elif unknown:
        raise SystemExit(f"evaluate.py: probe label names {unknown[:5]} are not columns of {labels}"
                         + (" (--external=True scores the columns it has)" if not external else ""))

    def get_bag(key):
        return torch.from_numpy(np.asarray(cache.study_tokens(key, wins)[0], dtype=np.float32))

    # subject ids of the evaluated studies, in the order of y / logits: a subject with several of
    # them makes every CI a subject-level (cluster) bootstrap, its studies being correlated
    groups = [rows_by_key[k].get("subject", "") or "" for k in keys]
    all_logits = logits = P.predict(models, get_bag, keys, device)
    if cols is not None:
        logits = logits[:, cols]
    bad = ~np.isfinite(logits)
    if bad.any():   # a NaN or inf output has no rank or error: every figure of it would be a guess
        fail(f"--probes: {path}: its output {lab[int(np.nonzero(bad.any(0))[0][0])]!r} is NaN or inf on "
             f"{int(bad.any(1).sum())} of the {len(keys)} evaluated studies: non-finite weights (a diverged "
             "training?); retrain the probe")
    res = {"probe": path, "kind": ck["probe_args"]["kind"], "task": ck["task"], "protocol": ck["protocol"],
           "modality": ck["modality"], "eval_modality": mod, "n_models": len(models), "n_studies": len(keys),
           "encoder_hash": ck["encoder_hash"], "feature_precision": cache.precision, "n_no_tokens": len(empty),
           "n_missing": len(missing)}
    res["external"] = bool(external)
    if n_boot:
        res["ci_unit"] = ci_unit(groups)
    if not external and "test_keys" not in ck and split in ("train", "val"):
        # train fitted the probe; val chose its checkpoint, thresholds and Platt calibration
        res["in_sample"] = split
        print(f"evaluate.py: warning: {display}: split {split!r} is where the probe's checkpoint, thresholds and "
              "calibration were chosen (train: where it was fitted): in-sample, optimistic figures", file=sys.stderr)
    # the probe's own dataset: studies (or subjects) that fitted or tuned it, or a CV probe's held-out
    # test keys (the rest of that dataset trained it); probes from before seen_keys: test keys only
    own = P.own_studies(keys, groups, *P.seen_studies(ck)) if external else ()
    if own:
        res["in_sample"] = "external"
        print(f"evaluate.py: warning: {display}: --external=True, but {len(own)} of its {len(keys)} studies share a "
              f"study or subject with the probe's own dataset (its training, tuning or held-out test studies): "
              f"{labels} is not external to it (in-sample, optimistic figures)"
              + ("; --external=False scores its held-out test set" if "test_keys" in ck else ""), file=sys.stderr)
    shared = P.own_studies(keys, groups, *P.seen_studies(ck, held_out=False))
    if shared and not external and "in_sample" not in res:   # labels.csv's splits are not subject-disjoint
        res["in_sample"], res["n_shared"] = "shared", len(shared)
        print(f"evaluate.py: warning: {display}: {len(shared)} of the {len(keys)} evaluated studies are, or share a "
              f"subject with, studies that fitted or tuned the probe (seen_keys / seen_subjects; first: "
              f"{shared[:3]}): in-sample, optimistic figures", file=sys.stderr)
    if ck["task"] == "age":
        pred = logits[:, 0] * ck["age_sd"] + ck["age_mu"]
        age = np.array([rows_by_key[k]["age"] for k in keys])
        res.update(metrics.regression_report(age, pred, n_boot=n_boot, seed=seed, groups=groups))
        return res, dict(task="age", keys=keys, age=age, pred=pred, ck=ck, display=display, groups=groups)
    y = np.array([[(int(n.split("_")[1] in sides[k]) if n in P.SIDE_CLASSES else rows_by_key[k]["y"][n])
                   for n in lab] for k in keys], dtype=np.float64)
    thr = np.array(ck["thresholds"])
    unfit = P.unfitted_classes(full_ck)
    unfit = unfit[cols] if cols is not None else unfit
    if unfit.any():   # their threshold (0) and Platt (the prior) are placeholders: no operating point to score
        print(f"evaluate.py: warning: {display}: {int(unfit.sum())} classes have no threshold or calibration fitted "
              f"on the probe's selection split (no positives or no negatives there): their sensitivity, specificity "
              f"and calibrated F1 (a detection class's side accuracy too) are left undefined: {[n for n, u in zip(lab, unfit) if u][:5]}", file=sys.stderr)
    untrained = P.untrained_classes(ck)   # the scored classes' (ck carries trained_classes of its columns)
    if untrained.any():   # left out of the probe's loss: their logits are noise, not figures of the probe
        print(f"evaluate.py: warning: {display}: {int(untrained.sum())} classes had no training positives or no "
              f"training negatives (never learned): every figure of theirs is undefined: "
              f"{[n for n, u in zip(lab, untrained) if u][:5]}", file=sys.stderr)
    rep = metrics.classification_report(y, logits, thr, lab, n_boot=n_boot, seed=seed, device=device,
                                        progress=n_boot >= 1000, groups=groups, fitted=~unfit, scored=~untrained)
    prob = metrics.platt_apply(logits, np.array(ck["platt_a"]), np.array(ck["platt_b"]))
    # undefined classes (no test positives or no test negatives): null
    metrics.add_calibrated_f1(rep, y, prob, ck["n_train_pos"], fitted=~unfit & ~untrained)
    pr = metrics.pr_report(y, logits, n_boot=n_boot, seed=seed, groups=groups)
    for k, name in enumerate(lab):
        row = rep["per_class"][name]
        for m in ("auprc", "pr_lift"):
            row[m] = None if untrained[k] else metrics.jsonable(pr[m][k])
            if n_boot:
                row[m + "_ci"] = [None, None] if untrained[k] else metrics.jsonable(
                    [pr[m + "_low"][k], pr[m + "_high"][k]])
    rep["macro"]["auprc"] = dict(zip(("mean", "n_classes"), metrics.macro(np.where(
        metrics.defined_classes(y) & ~untrained, pr["auprc"], np.nan))))
    lat = laterality.split(":") if laterality else []
    if len(lat) == 3 and all(n in lab for n in lat) and not unfit[lab.index(lat[0])] \
            and not untrained[[lab.index(n) for n in lat]].any():   # detection at a real threshold, sides learned
        d, le, ri = (lab.index(n) for n in lat)
        rep["laterality"] = metrics.laterality_report(y[:, d], logits[:, d], thr[d], y[:, le], y[:, ri],
                                                      logits[:, le], logits[:, ri], n_boot=n_boot, seed=seed,
                                                      groups=groups)
    res.update(rep)
    view = None
    if cols is not None:   # grounding reads attention maps by the models' own class order
        yf = np.zeros((len(keys), len(full_ck["label_names"])))
        yf[:, cols] = y
        view = dict(task="classify", keys=keys, y=yf, logits=all_logits, ck=full_ck, models=models, cache=cache,
                    wins=wins, display=display, groups=groups)
    return res, dict(task="classify", grounding_view=view, keys=keys, y=y, logits=logits, ck=ck, models=models,
                     cache=cache, wins=wins, display=display, groups=groups)


def ci_unit(groups):
    """The bootstrap unit of the CIs for the evaluated studies' subject ids (in metrics.json and
    table.txt): "subject (S subjects of N studies)" when some subject has two or more of them
    (a cluster bootstrap, `metrics.group_index`; a study without a subject id is its own
    subject), else "study" (the study-level bootstrap)."""
    g = metrics.group_index(groups)
    return "study" if g is None else f"subject ({g[0]} subjects of {len(groups)} studies)"


def fmt(v, nd=3):
    """'0.831'; 'undefined' for None (JSON null) or NaN (the report metrics' undefined rates)."""
    return "undefined" if v is None or v != v else f"{v:.{nd}f}"


def fmt_ci(v, ci, nd):
    """'0.83 [0.70, 0.91]'; the value alone when its CI is undefined; 'undefined' when it is."""
    if v is None:
        return "undefined"
    if not ci or ci[0] is None or ci[1] is None:
        return f"{v:.{nd}f}"
    return f"{v:.{nd}f} [{ci[0]:.{nd}f}, {ci[1]:.{nd}f}]"


def display_names(paths, names_arg):
    """Display name per probe path: --names, or the parent folder names made unique (name, name-2,
    ...). Two probes under one explicit name would overwrite each other's results: an error."""
    if names_arg:
        disp = names_arg.split(",")
        if len(disp) != len(paths):
            raise SystemExit(f"evaluate.py: {len(disp)} names for {len(paths)} probes")
        dup = sorted({d for d in disp if disp.count(d) > 1 or d == "reports"})   # "reports": the reports' key
        if dup:
            raise SystemExit(f"evaluate.py: --names repeats {dup} (or uses 'reports'): each probe needs its own name")
        sep = [d for d in disp if "/" in d or os.sep in d]
        if sep:   # roc_<name>.png would name a folder: the run died at its first plot, nothing written
            raise SystemExit(f"evaluate.py: --names: {sep[0]!r} holds a path separator; the plots are named "
                             f"after each probe (roc_<name>.png): use e.g. {sep[0].replace('/', '_')!r}")
        return disp
    disp = []
    for p in paths:
        base = os.path.basename(os.path.dirname(os.path.abspath(p)))
        d, i = base, 1
        while d in disp or d == "reports":
            i += 1
            d = f"{base}-{i}"
        disp.append(d)
    return disp


# table.txt's mark of an in-sample run, by res["in_sample"] (else a split name: --split=train/val)
IN_SAMPLE = {"external": "  [in-sample: --labels is the probe's own dataset]",
             "shared": "  [in-sample: {n_shared} studies fitted or tuned the probe, or share a subject with those]"}


def table(res):
    lines = [f"== {res['display']}  ({res['kind']}, {res['protocol']}, {res['modality']} -> {res['eval_modality']}, "
             f"{res['n_studies']} studies, {res['n_models']} model(s)"
             + (f", {res['n_no_tokens']} without tokens left out" if res.get("n_no_tokens") else "")
             + (f", {res['n_missing']} not in the feature cache left out" if res.get("n_missing") else "")
             + (f"; CI bootstrap unit: {res['ci_unit']}" if res.get("ci_unit") else "") + ")"
             + ("" if not res.get("in_sample") else IN_SAMPLE.get(res["in_sample"], "  [in-sample: the probe was "
                                                                    f"fitted or tuned on split {res['in_sample']!r}]")
                .format(**res))]
    if res["task"] == "age":
        lines.append(f"   age: MAE {fmt_ci(res['mae'], res.get('mae_ci'), 2)} years, RMSE "
                     f"{fmt_ci(res['rmse'], res.get('rmse_ci'), 2)} years, Pearson r "
                     f"{fmt_ci(res['pearson_r'], res.get('pearson_r_ci'), 3)}, "
                     f"bias {fmt_ci(res['bias'], res.get('bias_ci'), 2)}")
        return "\n".join(lines)
    # fixed widths that fit "undefined" and "0.831 [0.702, 0.915]": columns stay aligned
    lines.append(f"   {'class':<38} {'pos':>5} {'AUROC [95% CI]':>22} {'sens [95% CI]':>19} {'spec [95% CI]':>19} "
                 f"{'bacc':>9} {'F1cal':>9}")
    for n, r in res["per_class"].items():
        if r["n_pos"] == 0 and r["n_train_pos"] == 0:
            continue  # absent everywhere: listed in the JSON only
        cells = [fmt_ci(r[m], r.get(m + "_ci"), nd) for m, nd in (("auroc", 3), ("sensitivity", 2), ("specificity", 2))]
        lines.append(f"   {n[:38]:<38} {r['n_pos']:>5} {cells[0]:>22} {cells[1]:>19} {cells[2]:>19} "
                     f"{fmt(r['balanced_accuracy'], 2):>9} {fmt(r['calibrated_f1'], 2):>9}")
    m = res["macro"]
    lines.append(f"   macro AUROC {fmt_ci(m['auroc']['mean'], m['auroc'].get('ci'), 3)} over {m['auroc']['n_classes']} "
                 f"defined classes; sensitivity {fmt_ci(m['sensitivity']['mean'], m['sensitivity'].get('ci'), 2)}; "
                 f"specificity {fmt_ci(m['specificity']['mean'], m['specificity'].get('ci'), 2)}; balanced accuracy "
                 f"{fmt(m['balanced_accuracy']['mean'])}; calibrated F1 {fmt(m['calibrated_f1']['mean'])} over "
                 f"{m['calibrated_f1']['n_classes']} defined classes; "
                 f"{len(res['undefined_classes'])} undefined classes")
    pr_line = ("   AUPRC / PR lift (AUPRC / prevalence): " + "; ".join(
        f"{n} {fmt_ci(r['auprc'], r.get('auprc_ci'), 3)} / {fmt_ci(r['pr_lift'], r.get('pr_lift_ci'), 2)}"
        for n, r in res["per_class"].items() if r["auroc"] is not None)) if any(
        "auprc" in r and r["auroc"] is not None for r in res["per_class"].values()) else None
    if pr_line:
        lines.append(pr_line)
    if "laterality" in res:
        la = res["laterality"]
        lines.append(f"   side accuracy given detection: {fmt_ci(la['accuracy'], la.get('accuracy_ci'), 3)} over {la['n']} "
                     f"detected one-sided studies ({la['n_detected']} of {la['n_positive']} positives detected)")
    le = res["label_efficiency"]
    if le["slope"] is not None:
        lines.append(f"   label efficiency: F1 = {le['intercept']:.3f} + {le['slope']:.3f} log10(train positives), "
                     f"R^2 {fmt(le['r2'])}, {le['n']} classes")
    return "\n".join(lines)


def report_table(m):
    """The generated-reports metrics (nvfm.report_metrics.evaluate_reports) as text."""
    lines = [f"== reports  ({'split ' + m['split'] + ', ' if m.get('split') else ''}{m['n_studies']} studies, "
             f"judge {m['judge']}"
             + (f"; {m['n_other_split']} reports of other splits not scored" if m.get("n_other_split") else "") + ")",
             f"   BLEU-2 {fmt(m['bleu2'])}  ROUGE-L {fmt(m['rougeL'])}  METEOR {fmt(m['meteor'])}  "
             f"({m['n_text_pairs']} studies; {m['n_both_empty']} with both reports empty left out)"]
    if m.get("meteor_note"):
        lines.append(f"   {m['meteor_note']}")
    lines.append(f"   hallucination {fmt(m['hallucination_rate'])}  omission {fmt(m['omission_rate'])}  "
                 f"urgent omission {fmt(m['urgent_omission_rate'])}  laterality error {fmt(m['laterality_error_rate'])}")
    lines.append(f"   diagnosis set accuracy {fmt(m['diagnosis_set_accuracy'])}  diagnosis F1 {fmt(m['diagnosis_f1'])}  "
                 f"triage accuracy {fmt(m['triage_accuracy'])}")
    return "\n".join(lines)


def _curve_figure(res, data):
    """(pyplot, figure, axes, class indices) for a per-class curve plot: the 12 most frequent
    classes with a defined AUROC."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    y, lab = data["y"], data["ck"]["label_names"]
    fig, ax = plt.subplots(figsize=(6, 6))
    order = sorted([k for k in range(len(lab)) if res["per_class"][lab[k]]["auroc"] is not None],
                   key=lambda k: -y[:, k].sum())[:12]
    return plt, fig, ax, order


# the per-probe PNGs, out/<kind>_<probe name>.png (save_figure)
FIGURES = ("roc", "pr", "label_efficiency", "age")


def save_figure(plt, fig, kind, tag):
    """Save fig as out/<kind>_<tag>.png (kind: one of FIGURES) atomically and close it; -> the path."""
    path = os.path.join(out, f"{kind}_{tag}.png")
    with atomic_path(path) as tmp:   # a cut write keeps the previous PNG; the temp name has no .png suffix
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def overlay_files(results):
    """The grounding overlays a run's results list, as file names under `out` (grounding/<name>)."""
    return [os.path.join("grounding", os.path.basename(p)) for r in results.values() if isinstance(r, dict)
            for p in (r.get("grounding") or {}).get("overlays") or []]


def previous_outputs():
    """File names in `out` of the run whose metrics.json is there: its probes' figures (FIGURES of
    the names in its results), its grounding overlays and paper_table.md when it had paper rows;
    [] without a readable one."""
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            m = json.load(f)
        names = [n for n in m["results"] if n != "reports" and "/" not in n and os.sep not in n]
        rows, overlays = m.get("paper_rows"), overlay_files(m["results"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):   # no earlier run, or not evaluate.py's
        return []
    return [f"{k}_{n}.png" for n in names for k in FIGURES] + overlays + (["paper_table.md"] if rows else [])


def remove_stale(previous, kept):
    """Remove the files of `previous` (previous_outputs) in `out` that this run did not write
    (`kept`, file names), naming them in one line on stderr."""
    stale = [f for f in previous if f not in kept and os.path.isfile(os.path.join(out, f))]
    for f in stale:
        os.remove(os.path.join(out, f))
    if stale:
        print(f"evaluate.py: removed {len(stale)} outputs of the previous run in {out} that this run does not "
              f"make: {', '.join(stale)}", file=sys.stderr)


def plot(res, data):
    """ROC curves (12 most frequent defined classes) with bootstrap 95% bands and the operating
    point of each class's threshold, and the label-efficiency scatter. Returns the PNG paths."""
    from sklearn.metrics import roc_curve
    plt, fig, ax, order = _curve_figure(res, data)
    tag = res["display"]
    y, lg, lab = data["y"], data["logits"], data["ck"]["label_names"]
    for k in order:
        r = res["per_class"][lab[k]]
        fpr, tpr, _ = roc_curve(y[:, k], lg[:, k])
        line, = ax.plot(fpr, tpr, lw=1.2, label=f"{lab[k][:28]} ({r['auroc']:.2f})")
        if n_boot:
            grid, lo, hi, _ = metrics.roc_band(y[:, k], lg[:, k], n_boot=min(n_boot, 1000), seed=seed,
                                               groups=data.get("groups"))
            ax.fill_between(grid, lo, hi, step="post", color=line.get_color(), alpha=0.15, lw=0)
        if r["sensitivity"] is not None:
            ax.plot(1 - r["specificity"], r["sensitivity"], "o", color=line.get_color(), ms=5, mec="k", mew=0.5)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity",
           title=f"{tag}: ROC (macro AUROC {fmt(res['macro']['auroc']['mean'])})")
    ax.legend(fontsize=7, loc="lower right",
              title="bands: bootstrap 95% CI; dots: operating points" if n_boot else "dots: operating points",
              title_fontsize=7)
    fig.tight_layout()
    paths = [save_figure(plt, fig, "roc", tag)]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    npos = np.array(data["ck"]["n_train_pos"])
    f1s = np.array([np.nan if res["per_class"][n]["calibrated_f1"] is None else res["per_class"][n]["calibrated_f1"]
                    for n in lab])
    ok = (npos > 0) & np.isfinite(f1s)
    ax.scatter(np.log10(npos[ok]), f1s[ok], s=14)
    le = res["label_efficiency"]
    if le["slope"] is not None:
        xs = np.linspace(np.log10(npos[ok]).min(), np.log10(npos[ok]).max(), 10)
        ax.plot(xs, le["intercept"] + le["slope"] * xs, "r-", label=f"OLS slope {le['slope']:.3f}")
        ax.legend()
    ax.set(xlabel="log10(training positives)", ylabel="Platt-calibrated F1", title=f"{tag}: label efficiency")
    fig.tight_layout()
    paths.append(save_figure(plt, fig, "label_efficiency", tag))
    return paths


def paper_rows(results, task):
    """The paper-style table's rows for one run: [(row label, {probe name: cell})], cells
    '0.831 [0.702, 0.915]'. Classification: AUROC per defined class (and the macro mean over
    several), PR lift and calibrated F1 per class, side accuracy; age: MAE, RMSE (years), Pearson r.
    Figures of an in-sample run (`in_sample`: --split=train/val, --external on the probe's own
    dataset, or evaluated studies sharing subjects with its training ones) are marked in their row
    labels, e.g. "macro AUROC (in-sample: val)"."""
    rows = {}

    def put(label, col, value, ci, nd):
        rows.setdefault(f"{task}: {label}", {})[col] = fmt_ci(value, ci, nd)
    for col, r in results.items():
        if col == "reports":
            continue
        ext = " (external)" if r.get("external") else ""
        if r.get("in_sample") == "external":   # the probe's own dataset: what trained and tuned it
            ext = " (external; in-sample: the probe's own dataset)"
        elif r.get("in_sample") == "shared":   # test studies (subjects) that fitted or tuned it too
            ext += " (in-sample: subjects shared with training)"
        elif r.get("in_sample"):               # --split=train/val of a split-protocol probe
            ext += f" (in-sample: {r['in_sample']})"
        if r["task"] == "age":
            put(f"age MAE, years{ext}", col, r["mae"], r.get("mae_ci"), 2)
            put(f"age RMSE, years{ext}", col, r["rmse"], r.get("rmse_ci"), 2)
            put(f"age Pearson r{ext}", col, r["pearson_r"], r.get("pearson_r_ci"), 3)
            continue
        defined = [n for n, c in r["per_class"].items() if c["auroc"] is not None]
        if len(defined) > 1:
            put(f"macro AUROC{ext}", col, r["macro"]["auroc"]["mean"], r["macro"]["auroc"].get("ci"), 3)
        for n in defined:
            put(f"{n} AUROC{ext}", col, r["per_class"][n]["auroc"], r["per_class"][n].get("auroc_ci"), 3)
        for n in defined:
            put(f"{n} PR lift{ext}", col, r["per_class"][n]["pr_lift"], r["per_class"][n].get("pr_lift_ci"), 2)
        for n in defined:   # Platt-calibrated on the selection set (no CI: one operating point)
            put(f"{n} F1 (calibrated){ext}", col, r["per_class"][n].get("calibrated_f1"), None, 3)
        if "laterality" in r:
            la = r["laterality"]
            put(f"side accuracy given detection{ext}", col, la["accuracy"], la.get("accuracy_ci"), 3)
        if r.get("grounding", {}).get("accuracy") is not None:
            g = r["grounding"]
            put(f"pointing game ({g['n']} study-class targets, chance {g['chance']:.3f})", col, g["accuracy"], None, 3)
    return [(k, v) for k, v in rows.items()]


def ci_kinds(results):
    """The bootstrap units ("study", "subject") of a run's probes' CIs, sorted (none without CIs)."""
    return sorted({r["ci_unit"].split()[0] for k, r in results.items() if k != "reports" and r.get("ci_unit")})


def bootstrap_level(ci_units):
    """paper_table.md's name of its CIs' bootstrap for {task: units of its probes (`ci_kinds`)}."""
    subj = [t for t, u in (ci_units or {}).items() if "subject" in u]
    if not subj:
        return "study-level bootstrap"
    cluster = "each resampled subject bringing all its evaluated studies"
    if all(list(u) == ["subject"] for u in ci_units.values() if u):
        return f"subject-level (cluster) bootstrap, {cluster},"
    return (f"subject-level (cluster) bootstrap in {', '.join(subj)} (where subjects have several evaluated studies), "
            f"{cluster}, and study-level bootstrap elsewhere,")


def write_paper_table(rows, path, note="", ci_units=None):
    """Markdown table: one row per task and figure, one column per probe name (encoder); note: a
    line above it; ci_units: {task: its probes' bootstrap units, `ci_kinds`} (None or "study"
    alone: the study-level bootstrap), named in the first line."""
    cols = []
    for _, cells in rows:
        cols += [c for c in cells if c not in cols]
    lines = ["| task | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += ["| " + label + " | " + " | ".join(cells.get(c, "") for c in cols) + " |" for label, cells in rows]
    level = bootstrap_level(ci_units)
    head = f"95% CIs: {level} of the held-out test set (or the whole external dataset)."
    if any("(in-sample" in label for label, _ in rows):   # a mark in the row labels, so --merge keeps it
        head = (f"95% CIs: {level} of the evaluated studies: the held-out test set (or the whole external "
                "dataset), except in rows marked in-sample: the split (or dataset) where the probe was fitted or its "
                "checkpoint, thresholds and calibration were chosen (optimistic figures).")
    write_atomic(path, head + "\n\n" + (note + "\n\n" if note else "") + "\n".join(lines) + "\n")
    return "\n".join(lines)


def merge_tables():
    """--merge: one paper_table.md from the paper_rows of earlier runs' metrics.json."""
    rows, source, units = [], {}, {}   # source: (row, column) -> the metrics.json its cell came from
    for p in [p for p in merge.split(",") if p]:
        require_path(p, "--merge", hint="a metrics.json written by evaluate.py")
        try:
            with open(p) as f:
                m = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:   # cut short (a run killed while writing it)
            fail(f"--merge: {p} is not readable JSON ({e}): rerun evaluate.py for it")
        if not isinstance(m, dict) or "paper_rows" not in m:
            fail(f"--merge: {p} has no paper_rows (written by an older evaluate.py: rerun it)")
        for task, u in (m.get("paper_ci_units") or {}).items():   # older runs: study-level bootstrap
            units[task] = sorted(set(units.get(task, [])) | set(u))
        got = dict(rows)
        for label, cells in m["paper_rows"]:
            for col in cells:   # one cell from two runs: the later would silently replace the earlier
                if (label, col) in source:
                    fail(f"--merge: {p} and {source[label, col]} both hold the cell {label!r} / {col!r}: give "
                         "each dataset's run its own --task_name (and each encoder its own --names)")
                source[label, col] = p
            if label in got:   # the same task under another encoder: one row, more columns
                got[label].update(cells)
            else:
                rows.append((label, dict(cells)))
                got[label] = rows[-1][1]
    os.makedirs(out, exist_ok=True)
    print(write_paper_table(rows, os.path.join(out, "paper_table.md"), ci_units=units))
    print(f"wrote {out}/paper_table.md ({len(rows)} rows)")


def plot_pr(res, data):
    """PR curves (12 most frequent defined classes) with bootstrap 95% bands, prevalence lines."""
    from sklearn.metrics import precision_recall_curve
    plt, fig, ax, order = _curve_figure(res, data)
    tag = res["display"]
    y, lg, lab = data["y"], data["logits"], data["ck"]["label_names"]
    for k in order:
        r = res["per_class"][lab[k]]
        prec, rec, _ = precision_recall_curve(y[:, k], lg[:, k])
        line, = ax.step(rec, prec, where="post", lw=1.2,
                        label=f"{lab[k][:24]} (AP {r['auprc']:.2f}, lift {r['pr_lift']:.1f})")
        if n_boot:
            grid, lo, hi, _ = metrics.pr_band(y[:, k], lg[:, k], n_boot=min(n_boot, 1000), seed=seed,
                                              groups=data.get("groups"))
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        ax.axhline(y[:, k].mean(), color=line.get_color(), ls=":", lw=0.8)
    ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"{tag}: precision-recall")
    ax.legend(fontsize=7, loc="upper right", title_fontsize=7,
              title="dotted: prevalence" + ("; bands: bootstrap 95% CI" if n_boot else ""))
    fig.tight_layout()
    return [save_figure(plt, fig, "pr", tag)]


def plot_age(res, data):
    """Brain-age scatter: predicted vs chronological age, identity line, MAE and r in the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tag = res["display"]
    a, p = data["age"], data["pred"]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(a, p, s=10, alpha=0.6)
    lo, hi = float(min(a.min(), p.min())), float(max(a.max(), p.max()))
    ax.plot([lo, hi], [lo, hi], "k:", lw=0.8)
    ax.set(xlabel="chronological age (years)", ylabel="predicted age (years)",
           title=f"{tag}: MAE {fmt_ci(res['mae'], res.get('mae_ci'), 2)} y, r {fmt(res['pearson_r'], 2)}")
    fig.tight_layout()
    return [save_figure(plt, fig, "age", tag)]


def main():
    if merge:
        return merge_tables()
    if not (probes and labels) and not reports:
        raise SystemExit("evaluate.py: --probes and --labels are required (or --reports with --findings)")
    if reports and not (findings or labels):
        raise SystemExit("evaluate.py: --reports needs --findings (SHARDS/findings.jsonl)")
    if n_boot and n_boot < metrics.MIN_BOOT:
        raise SystemExit(f"evaluate.py: --n_boot={n_boot}: the CIs need at least {metrics.MIN_BOOT} replicates "
                         "(10,000 recommended), or --n_boot=0 for none")
    paths = [p for p in probes.split(",") if p]
    for p in paths:
        require_path(p, "--probes", hint="a probe.pt written by train_probe.py")
    if paths:
        require_path(labels, "--labels", hint="SHARDS/labels.csv written by preprocess.py")
        if "," in split:
            fail(f"--split={split}: a probe is scored on one split (test, val or train); several splits are for "
                 "--reports in a run without --probes")
        if (cohort or flip_test or anatomy) and not shards:
            fail("grounding (--cohort), --flip_test and --anatomy need --shards=SHARDS")
    for key, path in (("--reports", reports), ("--findings", findings), ("--features", features),
                      ("--shards", shards), ("--cohort", cohort)):
        if path:
            require_path(path, key, kind="dir" if key in ("--features", "--shards", "--cohort") else "file")
    rows, probes_read = [], {}
    if paths:
        try:   # the file's own faults first (no study_key column), then only the columns the probes score
            P.load_labels(labels, use=())
            probes_read = {p: load_probe(p) for p in paths}
            rows, _ = P.load_labels(labels, use={n for ck, _ in probes_read.values() for n in ck["label_names"]})
        except ValueError as e:  # no study_key column, a value not 0/1 in a scored column
            fail(str(e))
    rows_by_key = {}
    for r in rows:   # a key on two rows: one row's labels (and split) would silently win
        if r["study_key"] in rows_by_key:
            fail(f"--labels: {labels}: study_key {r['study_key']!r} is on "
                 f"{sum(q['study_key'] == r['study_key'] for q in rows)} rows: one row per study")
        rows_by_key[r["study_key"]] = r
    os.makedirs(out, exist_ok=True)
    disp = display_names(paths, names)
    fpath = findings or os.path.join(os.path.dirname(labels), "findings.jsonl")
    try:
        sides = P.load_sides(fpath) if os.path.exists(fpath) else None   # None: side classes cannot be scored
    except ValueError as e:   # a study key twice, a line that is not JSON
        fail(str(e))
    results, first, written, studies, scored = {}, None, [], {}, []
    for p, d in zip(paths, disp):
        res, data = evaluate_probe(p, probes_read[p], d, rows_by_key, sides, fpath)
        res["display"] = d
        results[d] = res
        studies[d] = (data["task"], frozenset(data["keys"]))
        if data is not None and data["task"] == "classify" and first is None:
            first = data.get("grounding_view") or data
        scored.append((res, data))   # drawn once every part is scored: a run failing before writes nothing
        print(table(res), flush=True)
    summary = {"macro_auroc": {d: r.get("macro", {}).get("auroc", {}).get("mean") for d, r in results.items()}}
    failed = []   # a requested part that failed once probe figures exist: named, recorded, exit 1 after writing

    def part_failed(part, e):
        if not results:   # nothing scored yet: nothing to keep
            fail(f"{part}: {e}")
        print(f"evaluate.py: error: {part}: {e} (the other figures are written)", file=sys.stderr)
        failed.append(part)
        return {"error": str(e)}
    differ = []
    for task in ("classify", "age"):   # side-by-side figures of one task should come from the same studies
        sets = {d: ks for d, (t, ks) in studies.items() if t == task}
        if len(set(sets.values())) > 1:
            differ.append(f"the {'classification' if task == 'classify' else 'age'} probes are scored on different studies ("
                      + ", ".join(f"{d} {len(ks)}" for d, ks in sets.items())
                      + f"; {len(frozenset.intersection(*sets.values()))} in all): not a paired comparison")
            summary.setdefault("studies_differ", {}).update({d: len(ks) for d, ks in sets.items()})
            print(f"evaluate.py: warning: {differ[-1]}", file=sys.stderr)
    if first is not None and (cohort or flip_test or anatomy):
        from nvfm import grounding
        if not shards:
            raise SystemExit("evaluate.py: grounding and the flip test need --shards")
        from nvfm.data import ShardReader
        reader = ShardReader(shards)
        if cohort:
            try:   # the cache encoded from other shards, a lesion mask missing or unreadable: one line
                g = grounding.pointing_game_eval(first, reader, cohort, findings_path=fpath, device=device,
                                                 overlay_dir=os.path.join(out, "grounding"), n_overlays=overlays)
            except ValueError as e:
                g = part_failed("--cohort (pointing game)", e)
            summary["pointing_game"] = g.get("accuracy")
            results[first["display"]]["grounding"] = g
            if "error" not in g:
                print(f"pointing game ({first['display']}): {fmt(g['accuracy'])} over {g['n']} study-class targets "
                      f"(chance {fmt(g['chance'])}); overlays in {os.path.join(out, 'grounding')}")
        if flip_test:
            fk = None
            if flip_split:
                mod = first["ck"]["eval_modality"]
                fk = [k for k, r in rows_by_key.items() if r["split"] in flip_split.split(",")
                      and (mod == "all" or r["modality"] == mod)]
            try:   # another encoder than the cache's (hash, config, weights), studies not encoded, other shards
                f = grounding.flip_test_eval(first, reader, sides or {}, keys=fk, encoder_spec=encoder, device=device)
            except (ValueError, RuntimeError, FileNotFoundError) as e:
                f = part_failed("--flip_test", e)
            summary["flip_test_auroc"] = f.get("auroc")
            results[first["display"]]["flip_test"] = f
            if "note" in f:
                print(f"flip test ({first['display']}): not run: {f['note']}")
            elif "error" not in f:
                print(f"flip test ({first['display']}): AUROC {fmt(f['auroc'])} over {f['n']} unilateral studies "
                      f"({f['n_left']} left; dL AUROC {fmt(f['auroc_dL'])}, dR AUROC {fmt(f['auroc_dR'])})"
                      + (f"; {f['n_no_tokens']} one-sided studies without tokens in the probe's windows left out"
                         if f.get("n_no_tokens") else ""))
        if anatomy:
            from nvfm import anatomy as A
            nm = {k: r.get("study") or "" for k, r in rows_by_key.items()}
            try:
                a = A.anatomy_eval(first["cache"], reader, cohort, first["keys"], nm, seed=seed)
            except ValueError as e:  # features encoded from other shards than --shards; no pair nor brain map
                a = part_failed("--anatomy", e)
            summary["anatomy"] = a
            results[first["display"]]["anatomy"] = a
            if "error" not in a:
                pm, km = a["patch_matching"], a["kmeans_brain"]
                print(f"anatomy ({first['display']}): patch matching error {fmt(pm['median_mm'], 1)} mm "
                      f"(chance {fmt(pm['chance_median_mm'], 1)}; each pair's median, mean over {pm['n_pairs']} volume "
                      f"pairs); k-means(3) brain IoU {fmt(km['iou'])} (chance {fmt(km['chance_iou'])}) over "
                      f"{km['n_volumes']} volumes")
    if reports:
        from nvfm import report_metrics  # the report generator's metrics; imported only when asked
        try:   # only the reports of the --split studies; a study of them without a report is an error
            summary["reports"] = report_metrics.evaluate_reports(reports, fpath,
                                                                 splits=[s for s in split.split(",") if s])
            results["reports"] = summary["reports"]
        except ValueError as e:
            summary["reports"] = part_failed("--reports", e)
    print("summary: " + json.dumps(metrics.jsonable(summary)))
    previous = previous_outputs()   # read before this run replaces its metrics.json
    for res, data in scored if plots else ():
        written += plot(res, data) + plot_pr(res, data) if data["task"] == "classify" else plot_age(res, data)
    run_task = task_name or os.path.splitext(os.path.basename(labels))[0]
    prows = paper_rows(results, run_task) if paths else []
    units = {run_task: ci_kinds(results)} if paths else {}   # the bootstrap unit(s) behind the table's CIs
    if prows:
        write_paper_table(prows, os.path.join(out, "paper_table.md"), note=f"Note: {'; '.join(differ)}." if differ else "",
                          ci_units=units)
    if "reports" in results:
        print(report_table(results["reports"]))
    write_atomic(os.path.join(out, "table.txt"),
                 "\n\n".join(report_table(r) if k == "reports" else table(r) for k, r in results.items()) + "\n")
    # last, atomic: the record of a complete run (--merge reads it; the next run removes what it lists)
    write_atomic(os.path.join(out, "metrics.json"), json.dumps(metrics.jsonable(
        {"summary": summary, "results": results, "paper_rows": prows, "paper_ci_units": units}), indent=1))
    remove_stale(previous, {os.path.basename(p) for p in written} | set(overlay_files(results))
                 | ({"paper_table.md"} if prows else set()))
    print(f"wrote {out}/metrics.json, table.txt" + (", paper_table.md" if prows else "")
          + (f", {len(written)} PNG plots" if written else ""))
    if failed:
        raise SystemExit(f"evaluate.py: {', '.join(failed)} failed (errors above; its figures are missing)")
    scored = [r.get("task") != "classify" or (r.get("macro", {}).get("auroc", {}).get("n_classes") or 0) > 0
              for k, r in results.items() if k != "reports"]
    # every class undefined and nothing else asked for (a pointing game needs no negatives): nothing to quote
    if scored and not any(scored) and not (cohort or flip_test or anatomy or reports):
        raise SystemExit(f"evaluate.py: no probe has a class with positives and negatives among the evaluated "
                         f"{split} studies (every figure undefined; {out}/metrics.json says which)")


if __name__ == "__main__":
    main()
