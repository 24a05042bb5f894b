"""Quality check of frozen features (Vol-JEPA issue): is a pretrained encoder better than the same
encoder at random initialization? Three linear probes, each on every feature cache given:

    python bench/bench_linear_probe.py DEMO_OUT features features_random [more caches ...]

DEMO_OUT is a demo.sh output folder (cohort/, shards/ and the feature caches written by
encode.py; a cache may also be given as an absolute path).

1. lesion tokens (the most statistical power on a small cohort): every token of every series
   is labelled from the demo cohort's lesion masks (cohort/gt/<study>/lesion_<i>.nii.gz):
   positive if >= half of the token's 4x16x16 voxel box lies inside a lesion, negative if none
   of it does (tokens in between are left out; negatives subsampled 1 in 10, seeded), on each
   cache's own token grid (caches of other token rules have other tokens). A
   logistic regression on the token embedding (+ a one-hot of the window) is fit on the
   train-split studies and scored on the val + test studies: token AUROC, with a 95%
   study-level bootstrap interval (studies resampled, 1000 replicates).
2. study level, split: per-window mean and std of the tokens, one logistic regression per class,
   fit on train, macro AUROC on val and on test (classes with positives and negatives in both).
3. study level, cross-validated: the same features, 5-fold stratified CV over all studies,
   repeated with 3 shuffles, classes with >= 5 positives and >= 5 negatives: macro AUROC (a
   `subject` column in labels.csv keeps a subject's studies in one fold). Fold splits are the
   same for every cache. (Pretraining never sees labels, so using every study
   here is the usual transductive self-supervised setting.)
Splits are the shards' own (manifest.json; labels.csv has none when preprocess.py drew them).
Features are standardized with the training part's mean/std. C (inverse L2 strength) is fixed
(token probe 1.0, study probes 0.1), never tuned on the scored studies.
"""
import json
import os
import sys

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nvfm.data import ShardReader  # noqa: E402
from nvfm.features import FeatureCache  # noqa: E402
from nvfm.grounding import lesion_token_cover  # noqa: E402
from nvfm.monitor import lesion_token_auroc, pooled_study, standardize, study_cv_auroc, subject_groups  # noqa: E402
from nvfm.probe import load_labels  # noqa: E402


def lesion_token_labels(d, reader, rows, cache):
    """{(study_key, volume_id): int8 labels per token of the cache's entry (1 lesion, 0 clear,
    -1 partial)} from the lesion masks; the token grid positions are the cache's coords."""
    cover = lesion_token_cover(os.path.join(d, "cohort"), reader, rows, cache)
    return {k: np.where(f >= 0.5, 1, np.where(f == 0, 0, -1)).astype(np.int8) for k, (f, _) in cover.items()}


def study_probes(cache, rows, classes, split_of):
    """split_of: {study_key: split} -> ({split: (macro AUROC, n classes)}, (cv macro AUROC, n classes))."""
    keep = [r for r in rows if r["study_key"] in cache]
    X = np.array([pooled_study(cache.study(r["study_key"]), cache.dim) for r in keep])
    Y = np.array([[r["y"][c] for c in classes] for r in keep]).reshape(len(keep), len(classes))
    # a subject's studies stay in one CV fold when labels.csv names subjects
    groups = subject_groups(keep)
    sp = np.array([split_of.get(r["study_key"], "") for r in keep])
    res = {}
    for ev in ("val", "test"):
        aucs = []
        Xtr, Xev = standardize(X[sp == "train"], X[sp == ev])
        for j in range(len(classes)):
            ytr, yev = Y[sp == "train", j], Y[sp == ev, j]
            if len(np.unique(ytr)) < 2 or len(np.unique(yev)) < 2:  # also a split without studies (a small cohort)
                continue
            m = LogisticRegression(C=0.1, max_iter=3000).fit(Xtr, ytr)
            aucs.append(roc_auc_score(yev, m.decision_function(Xev)))
        res[ev] = (float(np.mean(aucs)) if aucs else float("nan"), len(aucs))
    return res, study_cv_auroc(X, Y, groups=groups)


class _Study:
    """A FeatureCache seen as {study_key: entries} (what nvfm.monitor.lesion_token_auroc reads)."""

    def __init__(self, cache):
        self.cache = cache

    def items(self):
        return ((k, self.cache.study(k)) for k in self.cache.study_keys())


def main(d, names):
    rows, classes = load_labels(f"{d}/shards/labels.csv")  # diagnosis columns only (not sex, subject, ...)
    findings = [json.loads(line) for line in open(f"{d}/shards/findings.jsonl") if line.strip()]
    reader = ShardReader(f"{d}/shards")
    # the shards' own splits: labels.csv has no split column when preprocess.py drew them from the study key
    split_of = {v["study_key"]: v["split"] for v in reader.volumes}
    caches = [FeatureCache(n if os.path.isabs(n) else f"{d}/{n}") for n in names]
    # each cache labelled on its own token grid (caches of another token rule or crop have other tokens)
    per_cache = [lesion_token_labels(d, reader, findings, c) if os.path.isdir(f"{d}/cohort/gt") else {} for c in caches]
    print(f"{len(split_of)} studies ({sum(v == 'train' for v in split_of.values())} train), "
          f"{sum(int((y == 1).sum()) for y in per_cache[0].values())} lesion tokens ({names[0]})")
    for name, cache, labels in zip(names, caches, per_cache):
        line = f"{name}:"
        if labels:
            auc, ci, n, npos = lesion_token_auroc(_Study(cache), labels, split_of, n_boot=1000)
            lo, hi = ci or (float("nan"), float("nan"))
            line += f" lesion-token AUROC {auc:.3f} [{lo:.3f}, {hi:.3f}] ({n} val+test tokens, {npos} lesion) |"
        split, (cv, ncv) = study_probes(cache, rows, classes, split_of)
        line += (f" study macro AUROC val {split['val'][0]:.3f} ({split['val'][1]}) test {split['test'][0]:.3f} "
                 f"({split['test'][1]}) | 5-fold CV {cv:.3f} ({ncv} classes)")
        print(line, flush=True)


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(f"usage: python bench/bench_linear_probe.py DEMO_OUT CACHE [CACHE ...]\n\n{__doc__}")
        sys.exit(0)
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
