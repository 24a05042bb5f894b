"""Benchmark: study-level (or subject-level cluster) bootstrap of per-class AUROC + threshold statistics.

    python bench/bench_bootstrap.py                       # 156 classes x 50k studies x 10k replicates
    python bench/bench_bootstrap.py --n=5000 --n_boot=1000 --ref_boot=1000
    python bench/bench_bootstrap.py --subjects=25000      # cluster bootstrap: 50k studies of 25k subjects
    python bench/bench_bootstrap.py --device=cuda         # the torch reference on a GPU (no C++ kernel there)

subjects > 0: every subject gets one study and the remaining n - subjects studies go to random
subjects (as RSNA's labels.csv `subject` column), and every run below passes groups= (replicates
resample subjects: `nvfm.metrics.bootstrap_weights`).

Ours: nvfm.metrics.bootstrap with the backend it picks (the C++ kernel csrc/bootstrap.cpp on
CPU when built), all n_boot replicates, wall and CPU seconds (CPU = this process, all threads).
References, same run, same data, timed on fewer replicates and extrapolated linearly to n_boot:
  - the plain-PyTorch path (backend="reference"), ref_boot replicates; its intervals at
    ref_boot replicates are also compared with ours at the same replicates (same seed = same
    resamples, so they must agree up to the summation order, ~1e-15, if at all);
  - the usual loop, one sklearn.metrics.roc_auc_score per (replicate, class), sk_reps replicates
    (AUROC only).
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nvfm import metrics, ops  # noqa: E402

n = 50000
K = 156
n_boot = 10000
device = "cpu"
ref_boot = 300          # replicates for the torch reference (0 skips it)
sk_reps = 3             # replicates for the sklearn loop (0 skips it)
subjects = 0            # > 0: cluster bootstrap over this many subjects (<= n); 0: study-level
seed = 0
from nvfm.configurator import configure  # noqa: E402
configure(globals())

rng = np.random.default_rng(seed)
y = (rng.random((n, K)) < rng.uniform(0.005, 0.2, K)).astype(np.int64)
s = (y * rng.uniform(0.2, 2.0, K) + rng.normal(size=(n, K))).astype(np.float32).astype(np.float64)
thr = np.zeros(K)
groups = None
if subjects:
    assert 0 < subjects <= n, f"subjects={subjects} must be in 1..n={n}"
    groups = np.r_[np.arange(subjects), rng.integers(0, subjects, n - subjects)][rng.permutation(n)]
backend = ops.backend("bootstrap_stats", device)
print(f"bootstrap: n={n} studies, K={K} classes, {n_boot} replicates, device={device}, "
      f"threads={torch.get_num_threads()}, backend={backend}, mean prevalence {y.mean():.3f}, "
      + (f"cluster bootstrap over {subjects} subjects (up to {np.bincount(groups).max()} studies each)"
         if subjects else "study-level"))


def timed(fn):
    if device == "cuda":
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - w, time.process_time() - c


ci, ours, ours_cpu = timed(lambda: metrics.bootstrap(y, s, thr, n_boot=n_boot, seed=seed, device=device, progress=True,
                                                     groups=groups))
print(f"ours ({backend}): {ours:.2f} s wall, {ours_cpu:.2f} s CPU (AUROC + sens/spec/bacc, "
      f"{n_boot * K / ours / 1e6:.2f}M class-replicates/s); "
      + (f"macro AUROC CI {ci['auroc']['macro_low']:.4f}..{ci['auroc']['macro_high']:.4f}"
         if ci["auroc"]["macro_low"] is not None else
         f"no macro AUROC CI ({ci['auroc']['macro_n_valid']} replicates with every class defined)"))

if ref_boot and backend != "reference":
    a, t_small, _ = timed(lambda: metrics.bootstrap(y, s, thr, n_boot=ref_boot, seed=seed, device=device,
                                                    groups=groups))
    b, t_ref, t_ref_cpu = timed(lambda: metrics.bootstrap(y, s, thr, n_boot=ref_boot, seed=seed, device=device,
                                                          backend="reference", groups=groups))
    diff = max(np.nanmax(np.abs(a[m][e] - b[m][e])) for m in a for e in ("low", "high"))
    same_valid = all(np.array_equal(a[m]["n_valid"], b[m]["n_valid"]) for m in a)
    ref, ref_cpu = t_ref / ref_boot * n_boot, t_ref_cpu / ref_boot * n_boot
    print(f"reference (torch, {ref_boot} replicates took {t_ref:.1f} s wall, {t_ref_cpu:.1f} s CPU; extrapolated "
          f"linearly to {n_boot}): {ref:.0f} s wall, {ref_cpu:.0f} s CPU -> ours is {ref / ours:.0f}x faster "
          f"(wall), {ref_cpu / ours_cpu:.0f}x (CPU)")
    print(f"  same {ref_boot} replicates: ours {t_small:.2f} s; CI bounds differ by at most {diff:.1e}; "
          f"n_valid identical: {same_valid}")

if sk_reps:
    from sklearn.metrics import roc_auc_score  # noqa: E402
    w = metrics.bootstrap_weights(n, sk_reps, seed=seed, groups=groups).long().numpy()
    t0 = time.perf_counter()
    for r in range(sk_reps):
        idx = np.repeat(np.arange(n), w[:, r])
        for k in range(K):
            roc_auc_score(y[idx, k], s[idx, k])
    sk = (time.perf_counter() - t0) / sk_reps * n_boot
    print(f"reference (sklearn loop, AUROC only, extrapolated from {sk_reps} replicates): {sk:.0f} s "
          f"-> ours is {sk / ours:.0f}x faster (wall)")
