"""Quality check of frozen features (issue: Vol-JEPA quality check): a logistic-regression probe on
per-window mean and std pooled tokens, per class, trained on `train`, macro AUROC on val and test.

    python bench/bench_linear_probe.py DEMO_OUT features features_random [more caches ...]

DEMO_OUT is a demo.sh output folder (shards/labels.csv + feature caches written by encode.py).
Classes with no positives or no negatives in train or in the scored split are skipped.
"""
import sys, numpy as np, csv
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from nvfm.features import FeatureCache
d = sys.argv[1]
rows = list(csv.DictReader(open(f"{d}/shards/labels.csv")))
classes = [c for c in rows[0] if c not in ("study_key", "study", "modality", "split", "age")]
WIN = ["mr", "brain", "blood", "bone"]
def feats(cache, key):
    out = []
    ents = cache.study(key)
    for w in WIN:
        es = [e["emb"].astype(np.float32) for e in ents if e["window"] == w]
        out.append(np.concatenate(es).mean(0) if es else np.zeros(cache.dim, np.float32))
        out.append(np.concatenate(es).std(0) if es else np.zeros(cache.dim, np.float32))
    return np.concatenate(out)
for name in sys.argv[2:]:
    c = FeatureCache(f"{d}/{name}")
    X = {s: [] for s in ("train", "val", "test")}; Y = {s: [] for s in X}
    for r in rows:
        if r["study_key"] in c and r["split"] in X:
            X[r["split"]].append(feats(c, r["study_key"])); Y[r["split"]].append([int(r[k]) for k in classes])
    X = {k: np.array(v) for k, v in X.items()}; Y = {k: np.array(v) for k, v in Y.items()}
    mu, sd = X["train"].mean(0), X["train"].std(0) + 1e-6
    res = {}
    for ev in ("val", "test"):
        aucs = []
        for j, cl in enumerate(classes):
            ytr, yev = Y["train"][:, j], Y[ev][:, j]
            if ytr.min() == ytr.max() or yev.min() == yev.max():
                continue
            m = LogisticRegression(C=0.1, max_iter=2000).fit((X["train"] - mu) / sd, ytr)
            aucs.append(roc_auc_score(yev, m.decision_function((X[ev] - mu) / sd)))
        res[ev] = (np.mean(aucs), len(aucs))
    print(name, {k: (round(v[0], 3), v[1]) for k, v in res.items()}, "n", {k: len(v) for k, v in X.items()})
