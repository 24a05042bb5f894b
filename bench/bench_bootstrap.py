"""Benchmark: study-level bootstrap of per-class AUROC + threshold statistics.

    python bench/bench_bootstrap.py                       # 156 classes x 50k studies x 10k replicates
    python bench/bench_bootstrap.py --n=5000 --n_boot=1000 --device=cuda

Reference: the usual loop, one sklearn.metrics.roc_auc_score per (replicate, class) on the
resampled cohort, timed on `ref_reps` replicates and extrapolated linearly to n_boot.
Prints seconds for ours and the reference, and their ratio.
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nvfm import metrics  # noqa: E402

n = 50000
K = 156
n_boot = 10000
device = "cpu"
ref_reps = 3
seed = 0
from nvfm.configurator import configure  # noqa: E402
configure(globals())

rng = np.random.default_rng(seed)
y = (rng.random((n, K)) < rng.uniform(0.005, 0.2, K)).astype(np.int64)
s = (y * rng.uniform(0.2, 2.0, K) + rng.normal(size=(n, K))).astype(np.float32).astype(np.float64)
thr = np.zeros(K)
print(f"bootstrap: n={n} studies, K={K} classes, {n_boot} replicates, device={device}, "
      f"threads={torch.get_num_threads()}")

if device == "cuda":
    torch.cuda.synchronize()
t0 = time.perf_counter()
ci = metrics.bootstrap(y, s, thr, n_boot=n_boot, seed=seed, device=device, progress=True)
if device == "cuda":
    torch.cuda.synchronize()
ours = time.perf_counter() - t0
print(f"ours: {ours:.1f} s  (AUROC + sens/spec/bacc, {n_boot * K / ours / 1e3:.1f}k class-replicates/s); "
      f"macro AUROC CI {ci['auroc']['macro_low']:.4f}..{ci['auroc']['macro_high']:.4f}")

from sklearn.metrics import roc_auc_score  # noqa: E402
t0 = time.perf_counter()
for r in range(ref_reps):
    idx = rng.integers(0, n, n)
    for k in range(K):
        roc_auc_score(y[idx, k], s[idx, k])
ref = (time.perf_counter() - t0) / ref_reps * n_boot
print(f"reference (sklearn loop, AUROC only, extrapolated from {ref_reps} replicates): {ref:.0f} s")
print(f"speedup: {ref / ours:.0f}x")
