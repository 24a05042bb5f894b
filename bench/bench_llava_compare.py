"""Side-by-side report metrics of train_llava.py runs (image vs text-only, tiny Qwen3 vs SmolLM2).

    python bench/bench_llava_compare.py image=out/llava text-only=out/llava_text smollm2=out/llava_smol
    python bench/bench_llava_compare.py --split=test --findings=out/shards/findings.jsonl image=out/llava ...

Reads each RUN_DIR/metrics.json (written after decoding the eval split) and prints, per run and
per variant (reports = model output, reports_probe = with the probe cross-check), BLEU-2, ROUGE-L,
METEOR, triage accuracy, diagnosis F1 (per-study F1 of the named diagnosis sets), laterality
error, hallucination and urgent-omission rates, the number
of studies and splits scored, the training wall time of the last invocation and the generation
time per study. Runs scored on different splits are flagged: only compare rows on the same split.
With --findings=F the saved reports*.jsonl are re-scored with the current metrics (with --split=S
too: on the studies of split S only). --lookup=True (needs --findings) adds a non-learned reference
row, "indication lookup": each scored study gets the findings of a training study with the same
indication and modality, one whose diagnosis set is the most common among those (ties and the
pick: the first study key in sorted order; a study whose indication is not in the training split
gets the most common set of its modality). A learned model that scores below it has not even
learned what the indication implies.
"""
import json
import os
import sys


def rescore(m, run_dir, split, findings):
    """Replace m's report metrics by those of the reports*.jsonl rows of one split (None: all rows)."""
    import tempfile
    from nvfm.report_metrics import evaluate_reports
    truth = {}
    with open(findings) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                truth[r["study_key"]] = r.get("split")
    for key in [k for k, v in m.items() if isinstance(v, dict) and "bleu2" in v]:
        rows_ = [json.loads(l) for l in open(os.path.join(run_dir, key + ".jsonl")) if l.strip()]
        rows_ = [r for r in rows_ if split is None or truth.get(r["study_key"]) == split]
        if not rows_:
            del m[key]
            continue
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
            f.writelines(json.dumps(r) + "\n" for r in rows_)
        m[key] = evaluate_reports(f.name, findings)
        os.remove(f.name)
    if split is not None:
        m["eval_splits"] = [split]
    return m


def rows(name, run_dir, split=None, findings=None):
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file (train_llava.py writes it after decoding the eval split)")
    m = json.load(open(path))
    if findings:
        m = rescore(m, run_dir, split, findings)
    splits = ",".join(sorted(m.get("eval_splits") or m.get("config", {}).get("eval_split", "?").split(",")))
    for key, r in m.items():
        if isinstance(r, dict) and "bleu2" in r:
            yield (f"{name} {key.replace('reports_probe', '+probe').replace('reports', '')}".strip(), r, m, splits)


def lookup_reports(keys, findings):
    """The indication-lookup reference: study key -> findings list (see the module docstring)."""
    from collections import Counter, defaultdict
    from nvfm.llava import read_findings
    from nvfm.report_metrics import truth_diagnoses
    recs = read_findings(findings)
    train = [recs[k] for k in sorted(recs) if recs[k].get("split") == "train"]
    dx = lambda r: tuple(sorted(truth_diagnoses(r)))
    groups = defaultdict(list)
    for r in train:
        groups[(r.get("indication"), r.get("modality"))].append(r)
        groups[(None, r.get("modality"))].append(r)

    def pick(rs):
        sets = [dx(r) for r in rs]
        top = Counter(sets).most_common(1)[0][0]
        return rs[sets.index(top)].get("findings") or []

    chosen = {g: pick(rs) for g, rs in groups.items()}  # once per group, not per scored study
    out = {}
    for k in keys:
        g = (recs[k].get("indication"), recs[k].get("modality"))
        g = g if g in chosen else (None, g[1])
        out[k] = chosen[g] if g in chosen else pick(train)
    return out, recs


def lookup_row(run_dir, findings, split):
    """Metrics of the indication lookup on the studies run_dir scored (optionally one split)."""
    from nvfm.report_metrics import evaluate_report_lists
    keys = [json.loads(l)["study_key"] for l in open(os.path.join(run_dir, "reports.jsonl")) if l.strip()]
    hyp, recs = lookup_reports(keys, findings)
    keys = [k for k in keys if split is None or recs[k].get("split") == split]
    return evaluate_report_lists([hyp[k] for k in keys], [recs[k] for k in keys])


def main(argv):
    if not argv:
        print(__doc__)
        raise SystemExit(2)
    f = lambda x: "   n/a" if x is None or x != x else f"{x:6.3f}"
    print(f"{'run':<24}{'BLEU-2':>7}{'ROUGE-L':>8}{'METEOR':>7}{'triage':>7}{'dx-F1':>7}{'lat-err':>8}{'halluc':>7}"
          f"{'urg-om':>7}{'n':>4}  {'splits':<9}{'train s':>8}{'gen s/st':>9}")
    opts = {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--")}
    if "split" in opts and "findings" not in opts:
        raise SystemExit("--split needs --findings=SHARDS/findings.jsonl")
    seen = set()
    for a in [a for a in argv if not a.startswith("--")]:
        name, _, d = a.partition("=")
        for label, r, m, splits in rows(name, d or name, opts.get("split"), opts.get("findings")):
            seen.add(splits)
            ts = m.get("train_s")
            print(f"{label:<24}{f(r['bleu2']):>7}{f(r['rougeL']):>8}{f(r['meteor']):>7}{f(r['triage_accuracy']):>7}"
                  f"{f(r.get('diagnosis_f1')):>7}{f(r.get('laterality_error_rate')):>8}{f(r.get('hallucination_rate')):>7}"
                  f"{f(r.get('urgent_omission_rate')):>7}{r['n_studies']:>4}  {splits:<9}"
                  f"{'-' if ts is None else f'{ts:.0f}':>8}{m.get('sec_per_study_generate', float('nan')):>9.2f}")
    if opts.get("lookup", "False").lower() in ("1", "true"):
        if "findings" not in opts:
            raise SystemExit("--lookup needs --findings=SHARDS/findings.jsonl")
        first = [a for a in argv if not a.startswith("--")][0]
        r = lookup_row(first.partition("=")[2] or first, opts["findings"], opts.get("split"))
        print(f"{'indication lookup':<24}{f(r['bleu2']):>7}{f(r['rougeL']):>8}{f(r['meteor']):>7}"
              f"{f(r['triage_accuracy']):>7}{f(r['diagnosis_f1']):>7}{f(r['laterality_error_rate']):>8}"
              f"{f(r['hallucination_rate']):>7}{f(r['urgent_omission_rate']):>7}{r['n_studies']:>4}")
    if len(seen) > 1:
        print(f"warning: runs were scored on different splits ({sorted(seen)}): not comparable")


if __name__ == "__main__":
    main(sys.argv[1:])
