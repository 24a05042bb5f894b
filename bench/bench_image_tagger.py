"""What the report generator's image tagger (nvfm.llava.ImageTagger) can see in a feature cache,
with and without the left-right asymmetry features of nvfm.llava.study_vector:

    python bench/bench_image_tagger.py --features=D/features --findings=D/shards/findings.jsonl

For each study class (diagnoses with training positives, "abnormal", lesion side) it prints the
tagger's out-of-fold AUROC on the training split (what decides whether a class is tagged) and the
full fit's AUROC on the held-out splits (val,test), for both study vectors, then the macro means
and the held-out tags' precision (sure and "possible" tags). The AUROCs are rank statistics of the
tagger's decision scores; nothing here trains the report generator.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nvfm import llava  # noqa: E402
from nvfm.features import FeatureCache  # noqa: E402


def held_out_auroc(y, s):
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) and np.isfinite(s).all() else float("nan")


def tag_precision(tagger, tags, Y):
    """Share of true tags among sure tags ("X") and among "possible X" tags, tags per study."""
    phrase = {llava.tag_phrase(n): j for j, n in enumerate(tagger.names)}
    hits = {True: [], False: []}
    for i, ts in enumerate(tags):
        for t in ts:
            maybe = t.startswith("possible ")
            hits[not maybe].append(Y[i, phrase[t[len("possible "):] if maybe else t]])
    prec = {k: (float(np.mean(v)) if v else float("nan"), len(v) / len(tags)) for k, v in hits.items()}
    return prec[True], prec[False]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--findings", required=True)
    ap.add_argument("--held_out", default="val,test")
    ap.add_argument("--C", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cache = FeatureCache(a.features)
    recs = llava.read_findings(a.findings)
    labels = llava.study_labels(recs, a.findings)
    keys = [k for k in sorted(recs) if k in cache]
    train = [k for k in keys if recs[k].get("split") == "train"]
    held = [k for k in keys if recs[k].get("split") in set(a.held_out.split(","))]
    names = llava.study_class_names(train, labels)
    Y_tr = llava.study_targets(train, names, recs, labels).numpy()
    Y_ho = llava.study_targets(held, names, recs, labels).numpy()
    lr_axes = llava.volume_lr_axes(os.path.dirname(a.findings))
    res = {}
    for asym in (False, True):
        def vec(k):
            return llava.study_vector([dict(e, lr_axis=lr_axes.get(e["volume_id"], 2)) for e in cache.study(k)],
                                      cache.dim, asymmetry=asym)
        X_tr, X_ho = np.stack([vec(k) for k in train]), np.stack([vec(k) for k in held])
        tg = llava.ImageTagger(names, C=a.C, seed=a.seed)
        tg.fit(X_tr, Y_tr)
        ho = {}
        for j, n in enumerate(names):  # held-out AUROC of a full fit for every class (tagged or not)
            if n in tg.oof_auroc:
                m = tg.models[n] if n in tg.models else tg._fit_one(X_tr, Y_tr[:, j].astype(int))
                ho[n] = held_out_auroc(Y_ho[:, j], m.decision_function(X_ho))
        res[asym] = (tg, ho, tag_precision(tg, tg.predict(X_ho), Y_ho), X_tr.shape[1])
    print(f"{a.features}: {len(train)} train / {len(held)} {a.held_out} studies, dim {cache.dim}, C {a.C}")
    print(f"{'class':28s} {'pos tr/ho':>9s} | {'pooled oof':>10s} {'held-out':>8s} | {'+asym oof':>9s} {'held-out':>8s}")
    for j, n in enumerate(names):
        if n not in res[False][0].oof_auroc:
            continue
        cells = [f"{res[s][0].oof_auroc[n]:.3f}{'*' if n in res[s][0].models else ' '}" for s in (False, True)]
        print(f"{n:28s} {int(Y_tr[:, j].sum()):>4d}/{int(Y_ho[:, j].sum()):<4d} | {cells[0]:>10s} "
              f"{res[False][1][n]:8.3f} | {cells[1]:>9s} {res[True][1][n]:8.3f}")
    for s in (False, True):
        tg, ho, ((p, n), (pp, npos)), f = res[s]
        oof = np.mean(list(tg.oof_auroc.values()))
        hm = np.nanmean(list(ho.values()))
        print(f"{'pooled + asymmetry' if s else 'pooled':20s} ({f} features): macro oof AUROC {oof:.3f}, held-out "
              f"{hm:.3f}; {len(tg.models)} classes taggable (* above); held-out tags: sure {n:.2f}/study at "
              f"precision {p:.3f}, possible {npos:.2f}/study at precision {pp:.3f}")


if __name__ == "__main__":
    main()
