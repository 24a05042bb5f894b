"""What the probe cross-check is worth as a function of the probe's quality, on saved reports.

    python bench/bench_cross_check.py --reports=D/runs/image_s0/reports.jsonl \\
        --findings=D/shards/findings.jsonl --aurocs=0.7,0.8,0.9,0.95,0.99 --seeds=5

The demo's probes are too weak (val macro AUROC 0.64-0.70 on CPU-trained features) to show
what the cross-check does for a probe worth trusting. This bench replaces the probe by a
simulated one of a chosen AUROC: for every urgent diagnosis with positives among the training
studies of a modality (what a probe can learn), a study's score is d * y + N(0, 1), y its
ground truth, d = sqrt(2) * Phi^-1(AUROC) (the binormal AUROC). It then cross-checks the saved
reports under each operating point, thresholds fitted on the other folds of the same studies
(5-fold cross-fitting, as train_llava.py --probe_rule=reports does), and scores the result with
nvfm.report_metrics:

  off        the reports as generated
  youden     per diagnosis, Youden's J on the fit folds (the probes' own thresholds)
  precision  the lowest cut with precision >= each --precision target on the fit folds
             (metrics.precision_thresholds)
  reports    the same among fit-fold reports that omit the diagnosis (llava.fit_cross_check_thresholds)

Prints the mean over seeds of ROUGE-L, triage, dx-F1, hallucination and urgent omission, and how
many findings were appended per study.
"""
import argparse
import math
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nvfm import llava  # noqa: E402
from nvfm.metrics import precision_thresholds, youden_thresholds  # noqa: E402
from nvfm.ontology import DIAGNOSES  # noqa: E402
from nvfm.report_metrics import evaluate_report_lists, iter_jsonl, truth_diagnoses  # noqa: E402

RULES = ("off", "youden", "precision", "reports")  # off: the reports as generated


def probe_classes(recs):
    """{modality: sorted urgent diagnoses with >= 1 positive among that modality's training studies}."""
    out = {}
    for r in recs.values():
        if r.get("split") == "train":
            dx = {n for n in truth_diagnoses(r) if DIAGNOSES[n].urgency == "urgent"}
            out.setdefault(r.get("modality"), set()).update(dx)
    return {m: sorted(v) for m, v in out.items()}


def simulate_scores(rows, recs, classes, auroc, seed):
    """One {diagnosis: score} per report row: binormal scores of the given AUROC."""
    from statistics import NormalDist
    d = math.sqrt(2) * NormalDist().inv_cdf(auroc)
    rng = np.random.default_rng(seed)
    out = []
    for r in rows:
        rec = recs[r["study_key"]]
        true = set(truth_diagnoses(rec))
        out.append({n: float(d * (n in true) + rng.normal()) for n in classes.get(rec.get("modality"), [])})
    return out


def fold_thresholds(rule, rows, recs, scores, fit, target):
    """{diagnosis: threshold} for one rule from the studies `fit`."""
    if rule == "reports":
        return llava.fit_cross_check_thresholds([rows[i]["findings"] for i in fit], [scores[i] for i in fit],
                                                [recs[rows[i]["study_key"]] for i in fit], target)
    out = {}
    for n in sorted({n for i in fit for n in scores[i]}):
        idx = [i for i in fit if n in scores[i]]
        y = np.array([[n in truth_diagnoses(recs[rows[i]["study_key"]])] for i in idx], np.int64)
        s = np.array([[scores[i][n]] for i in idx], np.float64)
        t = youden_thresholds(y, s) if rule == "youden" else precision_thresholds(y, s, target)
        out[n] = float(t[0]) if (rule != "youden" or 0 < y.sum() < len(y)) else math.inf
    return out


def cross_checked(rule, rows, recs, scores, folds, target):
    """The rows' findings after the cross-check under `rule`, cross-fitted over the folds."""
    out, appended = [None] * len(rows), 0
    for f in sorted(set(folds)):
        th = fold_thresholds(rule, rows, recs, scores, [i for i, g in enumerate(folds) if g != f], target)
        for i in [i for i, g in enumerate(folds) if g == f]:
            out[i], missed = llava.cross_check(rows[i]["findings"], scores[i],
                                               {n: th.get(n, math.inf) for n in scores[i]})
            appended += len(missed)
    return out, appended


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reports", required=True, help="train_llava.py OUT/reports.jsonl")
    ap.add_argument("--findings", required=True, help="SHARDS/findings.jsonl (ground truth)")
    ap.add_argument("--aurocs", default="0.7,0.8,0.9,0.95,0.99")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--precision", default="0.5,0.8", help="precision targets, comma-separated")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args()
    recs = llava.read_findings(args.findings)
    rows = sorted((r for _, r in iter_jsonl(args.reports, "reports")), key=lambda r: r["study_key"])
    missing = [r["study_key"] for r in rows if r["study_key"] not in recs]
    if missing:
        raise SystemExit(f"{args.reports}: {len(missing)} studies not in {args.findings}, e.g. {missing[0]}")
    classes = probe_classes(recs)
    folds = [i % args.folds for i in range(len(rows))]
    truths = [recs[r["study_key"]] for r in rows]
    print(f"{len(rows)} studies; simulated probe classes (urgent, trained): "
          + ", ".join(f"{m} {len(c)}" for m, c in sorted(classes.items(), key=lambda kv: str(kv[0]))))
    cols = ("rougeL", "triage_accuracy", "diagnosis_f1", "hallucination_rate", "urgent_omission_rate")
    print(f"{'AUROC':>6} {'rule':<14} {'ROUGE-L':>7} {'triage':>6} {'dx-F1':>6} {'halluc':>6} {'urg-om':>6} "
          f"{'added/study':>11}")
    def show(a, rule, ms, added):
        mean = [statistics.fmean(m[c] for m in ms) for c in cols]
        print(f"{a:>6} {rule:<14} " + " ".join(f"{v:{w}.3f}" for v, w in zip(mean, (7, 6, 6, 6, 6)))
              + f" {added:11.2f}")

    show("-", "off", [evaluate_report_lists([r["findings"] for r in rows], truths)], 0.0)
    targets = [float(x) for x in args.precision.split(",")]
    for a in [float(x) for x in args.aurocs.split(",")]:
        for rule, target in [("youden", None)] + [(r, t) for t in targets for r in RULES[2:]]:
            ms, added = [], []
            for seed in range(args.seeds):
                scores = simulate_scores(rows, recs, classes, a, seed)
                hyps, n_add = cross_checked(rule, rows, recs, scores, folds, target)
                ms.append(evaluate_report_lists(hyps, truths))
                added.append(n_add / len(rows))
            show(f"{a:.2f}", rule + (f" {target:g}" if target else ""), ms, statistics.fmean(added))


if __name__ == "__main__":
    main()
