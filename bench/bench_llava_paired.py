"""Paired comparison of two report-generator arms over the same studies, with a study bootstrap.

    python bench/bench_llava_paired.py --findings=D/shards/findings.jsonl \\
        --a=D/runs/image_s0,D/runs/image_s1 --b=D/runs/text_s0,D/runs/text_s1

--a and --b are run directories (train_llava.py --out_dir), one per seed, paired in order. Per study
it takes ROUGE-L F (rouge-score, as evaluate.py) of a's and b's report, averages a - b over the seed
pairs, and bootstraps the mean over studies (10,000 resamples, seed 0, nvfm.metrics.bootstrap_counts): the printed interval says
how much the difference depends on which studies were drawn. It does not cover seed-to-seed spread
beyond the seeds given; run bench_llava_compare.py for the per-seed tables.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nvfm.llava import read_findings  # noqa: E402
from nvfm.metrics import bootstrap_counts  # noqa: E402
from nvfm.report_metrics import _join, iter_jsonl  # noqa: E402


def per_study_rouge(run_dir, recs, scorer):
    rows = [r for _, r in iter_jsonl(os.path.join(run_dir, "reports.jsonl"), "reports")]
    return {r["study_key"]: scorer.score(_join(recs[r["study_key"]].get("findings") or []),
                                         _join(r["findings"]))["rougeL"].fmeasure for r in rows}


def paired_bootstrap(diffs, n_boot=10000, seed=0):
    """Mean of per-study differences, its 95% percentile interval and the share of resamples <= 0.
    Study resamples are nvfm.metrics.bootstrap_counts, the replicates of the probes' AUROC CIs."""
    d = torch.as_tensor(np.asarray(diffs, np.float64))
    w = bootstrap_counts(len(d), n_boot, seed).double()  # (n, n_boot) multinomial counts
    boot = (d @ w / len(d)).numpy()
    return float(d.mean()), np.percentile(boot, 2.5), np.percentile(boot, 97.5), float((boot <= 0).mean())


def main():
    from rouge_score import rouge_scorer
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--findings", required=True)
    ap.add_argument("--a", required=True, help="run dirs, comma-separated (one per seed)")
    ap.add_argument("--b", required=True, help="run dirs, same number, paired in order")
    args = ap.parse_args()
    a, b = args.a.split(","), args.b.split(",")
    if len(a) != len(b):
        raise SystemExit(f"--a has {len(a)} runs, --b {len(b)}: pair them one to one")
    recs = read_findings(args.findings)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    sa = [per_study_rouge(d, recs, scorer) for d in a]
    sb = [per_study_rouge(d, recs, scorer) for d in b]
    keys = sorted(set.intersection(*(set(s) for s in sa + sb)))
    if not keys:
        raise SystemExit("the runs share no scored study")
    diffs = [np.mean([x[k] - y[k] for x, y in zip(sa, sb)]) for k in keys]
    m, lo, hi, p = paired_bootstrap(diffs)
    print(f"ROUGE-L a - b over {len(keys)} studies, {len(a)} seed pair(s): {m:+.4f}  "
          f"95% CI [{lo:+.4f}, {hi:+.4f}]  bootstrap share <= 0: {p:.4f}")


if __name__ == "__main__":
    main()
