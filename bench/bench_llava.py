"""Report-generator benchmarks, one sub-command per figure of BENCHMARKS.md, "Report generator".

    python bench/bench_llava.py compare [--split=S] [--findings=F [--lookup=True]] NAME=RUN_DIR ...
    python bench/bench_llava.py paired --findings=F --a=RUN_DIR,... --b=RUN_DIR,...
    python bench/bench_llava.py speed [--studies=4] [--new_tokens=64] [--series=4] [--tokens=800] [--threads=0]
    python bench/bench_llava.py read [--task=class|side] [--lr=3e-4,3e-3] [--image_dropout=0,0.5] [--hemispheres=0,1]
    python bench/bench_llava.py cross_check --reports=RUN_DIR/reports.jsonl --findings=F [--aurocs=0.8,0.9,0.99]
    python bench/bench_llava.py plant DEMO_OUT features [--amp=1.0]

RUN_DIR is a train_llava.py --out_dir, F a SHARDS/findings.jsonl (preprocess.py), DEMO_OUT a demo.sh
output folder (`make demo` writes demo_out/). `python bench/bench_llava.py SUB-COMMAND --help`
describes each one.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import zlib

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from timing import timeit  # noqa: E402

from nvfm import llava  # noqa: E402
from nvfm.configurator import read_config_file  # noqa: E402
from nvfm.llm import load_llm, resolve_llm, tiny_qwen3_cached  # noqa: E402
from nvfm.metrics import bootstrap_counts, precision_thresholds, youden_thresholds  # noqa: E402
from nvfm.ontology import DIAGNOSES  # noqa: E402
from nvfm.report_metrics import (EMPTY_REPORT, RougeTokenizer, _join, evaluate_report_lists, iter_jsonl,  # noqa: E402
                                 truth_diagnoses)

COMPARE_USAGE = """usage: bench_llava.py compare [--split=S] [--findings=F [--lookup=True]] NAME=RUN_DIR ...

Side-by-side report metrics of train_llava.py runs (image vs text-only, tiny Qwen3 vs SmolLM2).
Reads each RUN_DIR/metrics.json (written after decoding the eval split) and prints, per run and
per variant (reports = model output, +probe = with the probe cross-check), BLEU-2, ROUGE-L,
METEOR, triage accuracy, diagnosis F1 (per-study F1 of the named diagnosis sets), laterality
error, hallucination and urgent-omission rates, the number of studies and splits scored, the
training wall time of the last invocation and the generation time per study. Runs scored on
different splits are flagged: only compare rows on the same split.
--findings=F re-scores the saved reports*.jsonl with the current metrics (with --split=S: on the
studies of split S only). --lookup=True (needs --findings) adds a non-learned reference row,
"indication lookup": each scored study gets the findings of a training study with the same
indication and modality, one whose diagnosis set is the most common among those (ties and the
pick: the first study key in sorted order; a study whose indication is not in the training split
gets the most common set of its modality). A learned model that scores below it has not even
learned what the indication implies."""


# ----------------------------------------------------------------------------- compare
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
    recs = llava.read_findings(findings)
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
    keys = [json.loads(l)["study_key"] for l in open(os.path.join(run_dir, "reports.jsonl")) if l.strip()]
    hyp, recs = lookup_reports(keys, findings)
    keys = [k for k in keys if split is None or recs[k].get("split") == split]
    return evaluate_report_lists([hyp[k] for k in keys], [recs[k] for k in keys])


def compare(argv):
    """The `compare` sub-command (COMPARE_USAGE)."""
    if not argv:
        raise SystemExit(COMPARE_USAGE)
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


# ----------------------------------------------------------------------------- paired
def per_study_rouge(run_dir, recs, scorer):
    """{study_key: ROUGE-L F} of run_dir/reports.jsonl against the findings records recs. An empty report
    is the text EMPTY_REPORT, as text_metrics scores it; a study whose reports are both empty scores 1
    (the placeholder against itself), so in a paired difference an arm that reports a finding in a
    normal study loses (scored as the raw empty texts, both scored 0 and the difference was 0)."""
    rows = [r for _, r in iter_jsonl(os.path.join(run_dir, "reports.jsonl"), "reports")]
    return {r["study_key"]: scorer.score(_join(recs[r["study_key"]].get("findings") or []) or EMPTY_REPORT,
                                         _join(r["findings"]) or EMPTY_REPORT)["rougeL"].fmeasure for r in rows}


def paired_bootstrap(diffs, n_boot=10000, seed=0):
    """Mean of per-study differences, its 95% percentile interval and the share of resamples <= 0.
    Study resamples are nvfm.metrics.bootstrap_counts, the replicates of the probes' AUROC CIs."""
    d = torch.as_tensor(np.asarray(diffs, np.float64))
    w = bootstrap_counts(len(d), n_boot, seed).double()  # (n, n_boot) multinomial counts
    boot = (d @ w / len(d)).numpy()
    return float(d.mean()), np.percentile(boot, 2.5), np.percentile(boot, 97.5), float((boot <= 0).mean())


def paired(argv):
    """Paired comparison of two report-generator arms over the same studies, with a study bootstrap.
    --a and --b are run directories (train_llava.py --out_dir), one per seed, paired in order. Per
    study it takes ROUGE-L F (rouge-score with evaluate.py's tokenizer) of a's and b's report, averages a - b over
    the seed pairs and bootstraps the mean over studies (10,000 resamples, seed 0,
    nvfm.metrics.bootstrap_counts): the interval says how much the difference depends on which
    studies were drawn, not the seed-to-seed spread beyond the seeds given (compare shows the
    per-seed tables)."""
    from rouge_score import rouge_scorer
    ap = argparse.ArgumentParser(prog="bench_llava.py paired", description=paired.__doc__)
    ap.add_argument("--findings", required=True)
    ap.add_argument("--a", required=True, help="run dirs, comma-separated (one per seed)")
    ap.add_argument("--b", required=True, help="run dirs, same number, paired in order")
    args = ap.parse_args(argv)
    a, b = args.a.split(","), args.b.split(",")
    if len(a) != len(b):
        raise SystemExit(f"--a has {len(a)} runs, --b {len(b)}: pair them one to one")
    recs = llava.read_findings(args.findings)
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=RougeTokenizer())  # as evaluate.py
    sa = [per_study_rouge(d, recs, scorer) for d in a]
    sb = [per_study_rouge(d, recs, scorer) for d in b]
    keys = sorted(set.intersection(*(set(s) for s in sa + sb)))
    if not keys:
        raise SystemExit("the runs share no scored study")
    diffs = [np.mean([x[k] - y[k] for x, y in zip(sa, sb)]) for k in keys]
    m, lo, hi, p = paired_bootstrap(diffs)
    print(f"ROUGE-L a - b over {len(keys)} studies, {len(a)} seed pair(s): {m:+.4f}  "
          f"95% CI [{lo:+.4f}, {hi:+.4f}]  bootstrap share <= 0: {p:.4f}")


# ----------------------------------------------------------------------------- speed
def speed(argv):
    """Report generation cost per study on this machine: encode + connector + generate.
    A synthetic MR study of `series` volumes with `tokens` foreground tokens each (about a demo-cohort
    head at 4 x 16 x 16 mm patches) goes through the tiny random encoder, the demo connector and
    the tiny random Qwen3 (config/llava_tiny.py), generating exactly `new_tokens` tokens
    (min_new_tokens = max_new_tokens, so the count does not depend on the random weights).
    Reference measured in the same run: the same LM generating as many tokens from the text prompt
    alone (the text-only baseline); the ratio is the price of the images. Also times the paper-size
    connector (dim 768, 6 layers, 64 latents) on the same tokens."""
    from nvfm.model import Encoder, EncoderConfig
    ap = argparse.ArgumentParser(prog="bench_llava.py speed", description=speed.__doc__)
    ap.add_argument("--studies", type=int, default=4, help="timed repeats")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=800, help="tokens per series")
    ap.add_argument("--threads", type=int, default=0, help="0 = torch default")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.preset("tiny")).eval()
    lm, tok = load_llm(tiny_qwen3_cached())
    gen = llava.ReportGenerator(lm, tok, enc.config.dim, dim=64, depth=2, heads=4, n_latents=16).eval()
    big = llava.Connector(enc.config.dim, lm.config.hidden_size, 768, 6, 8, 64).eval()
    n = a.tokens
    x = torch.rand(a.series * n, enc.config.patch_dim) * 255
    grid = torch.meshgrid(torch.arange(10), torch.arange(10), torch.arange(8), indexing="ij")
    coords = torch.stack(grid, -1).reshape(-1, 3)[:n].repeat(a.series, 1).to(torch.int32)
    cu = torch.arange(a.series + 1, dtype=torch.int32) * n
    with torch.no_grad():
        emb = enc(x, coords, cu, n)
        t_enc = timeit(lambda: enc(x, coords, cu, n), a.studies)
        families = ["T1", "T2", "FLAIR", "DWI", "ADC", "SWI", "T1C", "OTHER"][:a.series]
        study = [{"family": f, "modality": "MR", "emb": emb[i * n:(i + 1) * n]} for i, f in enumerate(families)]
        types = torch.arange(a.series)
        t_conn = timeit(lambda: gen.connector(emb, cu, n, types), a.studies)
        t_big = timeit(lambda: big(emb, cu, n, types), max(1, a.studies // 2))
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens)
    t_gen = timeit(lambda: gen.generate([study], ["Headache."], **kw), a.studies)
    t_txt = timeit(lambda: gen.generate([[]], ["Headache."], **kw), a.studies)
    print(f"machine: {os.cpu_count()} CPU threads={torch.get_num_threads()}, torch {torch.__version__}")
    print(f"study: {a.series} series x {n} tokens; LM tiny Qwen3 "
          f"({sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M), {a.new_tokens} new tokens")
    print(f"encode (tiny encoder)           {t_enc * 1e3:8.1f} ms/study")
    print(f"connector (demo: 64d, 2 layers) {t_conn * 1e3:8.1f} ms/study")
    print(f"connector (the paper: 768d, 6 layers){t_big * 1e3:8.1f} ms/study")
    print(f"generate (incl. connector)      {t_gen * 1e3:8.1f} ms/study  ({a.new_tokens / t_gen:.0f} tokens/s)")
    print(f"text-only generate (reference)  {t_txt * 1e3:8.1f} ms/study")
    print(f"encode + generate               {(t_enc + t_gen) * 1e3:8.1f} ms/study; images cost "
          f"x{t_gen / t_txt:.2f} of text-only generation")


# ----------------------------------------------------------------------------- read
ANSWERS = {"class": [["Left subdural hematoma."], ["Generalized volume loss."], []],
           "side": [["Left subdural hematoma."], ["Right subdural hematoma."], []]}
GRID = 8  # side task: tokens on a GRID^3 grid


def planted(n, u, n_tok, g, task="class"):
    out = []
    for i in range(n):
        c = i % 3
        x = torch.randn(n_tok, u.shape[1], generator=g)
        e = {"family": "T1", "modality": "MR", "emb": x}
        if task == "class":
            x[torch.randperm(n_tok, generator=g)[:n_tok // 10]] += u.shape[1] ** 0.5 * u[c]
        else:
            cells = torch.randperm(GRID ** 3, generator=g)[:n_tok].sort().values
            coords = torch.stack([cells // GRID ** 2, cells // GRID % GRID, cells % GRID], 1)
            if c < 2:  # left: low W index (the W axis runs toward the right), right: high
                half = torch.nonzero((coords[:, 2] < GRID // 2) == (c == 0)).flatten()
                x[half[torch.randperm(len(half), generator=g)[:n_tok // 10]]] += u.shape[1] ** 0.5 * u[0]
            e.update(coords=coords.numpy(), orientation="IPR")
        out.append(([e], c))
    return out


def separability(gen, train, new):
    """Nearest-centroid accuracy on `new` and between/within variance ratio of the visual embeddings."""
    with torch.no_grad():
        f = lambda data: torch.stack([gen._visual([s])[0].flatten() for s, _ in data])
        a, b = f(train), f(new)
    ya, yb = torch.tensor([c for _, c in train]), torch.tensor([c for _, c in new])
    mu = a.mean(0)
    cent = torch.stack([(a - mu)[ya == c].mean(0) for c in range(3)])
    acc = (torch.cdist(b - mu, cent).argmin(1) == yb).float().mean().item()
    within = torch.cat([(a - mu)[ya == c] - cent[c] for c in range(3)]).pow(2).sum(-1).mean().item()
    return acc, cent.pow(2).sum(-1).mean().item() / within


def read_check(cfg, lr, dropout, iters, seed, n_tok, dim=32, n_new=60, task="class", hemispheres=None):
    """Train the config's recipe on planted studies -> (accuracy on n_new new studies, NC acc, B/W, seconds).
    hemispheres: None = the config's."""
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(3, dim, generator=g), dim=1)
    train, new = planted(200, u, n_tok, g, task), planted(n_new, u, n_tok, g, task)
    answers = ANSWERS[task]
    lm, tok = load_llm(resolve_llm(cfg.get("llm", "")))
    torch.manual_seed(seed)
    gen = llava.ReportGenerator(lm, tok, dim, cfg["perceiver_dim"], cfg["perceiver_depth"], cfg["perceiver_heads"],
                                cfg["n_latents"],
                                hemispheres=cfg.get("hemispheres", False) if hemispheres is None else hemispheres)
    opt = torch.optim.AdamW([{"params": gen.connector.parameters(), "lr": lr},
                             {"params": lm.parameters(), "lr": cfg["llm_lr"]}], weight_decay=0.01, betas=(0.9, 0.95))
    t0 = time.time()
    for _ in range(iters):
        batch = [train[j] for j in torch.randint(0, len(train), (cfg["batch_size"],), generator=g).tolist()]
        studies = [[] if torch.rand(1, generator=g).item() < dropout else s for s, _ in batch]
        loss = gen(studies, ["Headache."] * len(batch), [answers[c] for _, c in batch])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
    gen.eval()
    out = gen.generate([s for s, _ in new], ["Headache."] * len(new), max_new_tokens=32)
    acc = sum(llava.parse_findings(o)[0] == answers[c] for o, (_, c) in zip(out, new)) / len(new)
    return acc, *separability(gen, train, new), time.time() - t0


def read(argv):
    """Can the connector carry an image-only signal to the LM? A synthetic read-the-images check.
    Every study has the same indication ("Headache.") and one of three answers, planted only in the
    images: one T1 series of n_tok random tokens (enc dim 32), 10% of them shifted by sqrt(dim) along
    a fixed direction per answer. Chance is 1/3; reading the images gives 1. The model is a config's
    recipe (default config/llava_tiny.py: connector size, LM, LM rate, batch size), trained with
    AdamW as train_llava.py does (no warm-up), for each connector rate and image-dropout rate. Per
    run: exact-answer accuracy on 60 new studies, and how separable the three classes are in the
    connector's output (nearest-centroid accuracy, between/within-class variance ratio: a connector
    that keeps the signal but an LM that does not read it shows high separability at chance).
    --task=side: the answer is where the signal lies. Tokens sit on an 8 x 8 x 8 grid stored as "IPR"
    (grid axis 2 runs toward the right); a left or a right lesion is 10% of the tokens, all in that
    half, shifted along one direction shared by both sides; the third answer has no lesion. A
    connector that sees a bag of tokens reaches at most 2/3; --hemispheres=1 gives each side its own
    latents and can reach 1. tests/test_llava.py runs small versions through read_check()."""
    ap = argparse.ArgumentParser(prog="bench_llava.py read", description=read.__doc__)
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "config", "llava_tiny.py"))
    ap.add_argument("--lr", default="3e-4,3e-3", help="connector learning rates, comma-separated")
    ap.add_argument("--image_dropout", default="0", help="comma-separated")
    ap.add_argument("--iters", type=int, default=240)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--n_tok", type=int, default=200)
    ap.add_argument("--task", default="class", choices=["class", "side"])
    ap.add_argument("--hemispheres", default=None, help="comma-separated 0/1; default the config's")
    ap.add_argument("--llm", default=None, help="override the config's LM (e.g. smollm2)")
    ap.add_argument("--batch_size", type=int, default=None, help="override the config's batch size")
    ap.add_argument("--llm_lr", type=float, default=None, help="override the config's LM rate")
    a = ap.parse_args(argv)
    cfg = read_config_file(a.config)[1]
    for k in ("llm", "batch_size", "llm_lr"):
        if getattr(a, k) is not None:
            cfg[k] = getattr(a, k)
    print(f"LM {cfg.get('llm') or 'tiny random Qwen3'}, LM rate {cfg['llm_lr']}, batch {cfg['batch_size']}, "
          f"{a.iters} iterations, {a.n_tok} tokens per study")
    torch.set_num_threads(1)
    print(f"task {a.task}")
    print(f"{'conn lr':>8}{'dropout':>8}{'hemi':>5}{'seed':>5}{'accuracy':>9}{'NC acc':>7}{'B/W':>8}{'s':>6}")
    hemi = ([bool(cfg.get("hemispheres", False))] if a.hemispheres is None
            else [h == "1" for h in a.hemispheres.split(",")])
    for lr in map(float, a.lr.split(",")):
        for d in map(float, a.image_dropout.split(",")):
            for h in hemi:
                for s in map(int, a.seeds.split(",")):
                    acc, nc, bw, t = read_check(cfg, lr, d, a.iters, s, a.n_tok, task=a.task, hemispheres=h)
                    print(f"{lr:8.0e}{d:8.2f}{h:5d}{s:5d}{acc:9.3f}{nc:7.2f}{bw:8.2f}{t:6.0f}", flush=True)


# ----------------------------------------------------------------------------- cross_check
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
                                               {n: th.get(n, math.inf) for n in scores[i]},
                                               modality=recs[rows[i]["study_key"]].get("modality"))
            appended += len(missed)
    return out, appended


def cross_check(argv):
    """What the probe cross-check is worth as a function of the probe's quality, on saved reports.
    The probe is replaced by a simulated one of a chosen AUROC: for every urgent diagnosis with
    positives among the training studies of a modality (what a probe can learn), a study's score is
    d * y + N(0, 1), y its ground truth, d = sqrt(2) * Phi^-1(AUROC) (the binormal AUROC). The saved
    reports are then cross-checked under each operating point, thresholds fitted on the other folds
    of the same studies (5-fold cross-fitting, as train_llava.py --probe_rule=reports does), and
    scored with nvfm.report_metrics: off = the reports as generated; youden = per diagnosis, Youden's
    J on the fit folds; precision = the lowest cut with precision >= each --precision target on the
    fit folds; reports = the same among fit-fold reports that omit the diagnosis
    (llava.fit_cross_check_thresholds). Prints the means over seeds of ROUGE-L, triage, dx-F1,
    hallucination and urgent omission, and how many findings were appended per study."""
    ap = argparse.ArgumentParser(prog="bench_llava.py cross_check", description=cross_check.__doc__)
    ap.add_argument("--reports", required=True, help="train_llava.py OUT/reports.jsonl")
    ap.add_argument("--findings", required=True, help="SHARDS/findings.jsonl (ground truth)")
    ap.add_argument("--aurocs", default="0.7,0.8,0.9,0.95,0.99")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--precision", default="0.5,0.8", help="precision targets, comma-separated")
    ap.add_argument("--folds", type=int, default=5)
    args = ap.parse_args(argv)
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


# ----------------------------------------------------------------------------- plant
def direction(name, dim):
    u = np.random.default_rng(zlib.crc32(name.encode())).standard_normal(dim)
    return u / np.linalg.norm(u)


def token_sigma(cache, max_rows=200_000):
    """sqrt(sum over dims of the token variance), from an evenly strided sample of rows."""
    emb, _ = cache._maps()
    step = max(1, len(emb) // max_rows)
    return float(np.sqrt(np.asarray(emb[::step], np.float64).var(0).sum()))


def plant_features(d, src, amp, out):
    """Copy the feature cache src of demo output d to out with a lesion signal planted (see plant)."""
    from nvfm.data import ShardReader
    from nvfm.features import FeatureCache, FeatureWriter
    from nvfm.grounding import lesion_token_cover
    cache = FeatureCache(src)
    rows = [json.loads(line) for line in open(os.path.join(d, "shards", "findings.jsonl")) if line.strip()]
    lesions = {r["study_key"]: r.get("lesions", []) for r in rows}
    cover = lesion_token_cover(os.path.join(d, "cohort"), ShardReader(os.path.join(d, "shards")), rows, cache)
    sigma = token_sigma(cache)
    dirs = {}
    n_tok = 0
    from tqdm import tqdm
    with FeatureWriter(out, f"planted:{amp:g}:{cache.encoder_hash}", cache.dim, "planted lesion signal",
                       overwrite=True) as w:
        for key in tqdm(cache.study_keys(), desc="plant"):
            entries = []
            for e in cache.study(key):
                emb = e["emb"].astype(np.float32)
                frac, which = cover.get((key, e["volume_id"]), (np.zeros(len(emb)), np.full(len(emb), -1)))
                for t in np.nonzero(which >= 0)[0]:
                    name = lesions[key][which[t]]["diagnosis"]
                    u = dirs.setdefault(name, direction(name, cache.dim))
                    emb[t] += amp * frac[t] * sigma * u
                    n_tok += 1
                entries.append(dict(e, emb=emb))
            w.add(key, entries)
    print(f"{out}: amp {amp:g}, sigma {sigma:.3f}, {n_tok} lesion tokens changed, "
          f"{len(dirs)} diagnoses: {', '.join(sorted(dirs))}")


def plant(argv):
    """Positive control: can the connector + LM read findings out of the images at all, when the
    features carry them? Writes a copy of a feature cache with a planted lesion signal, for
    train_llava.py to be trained on beside the real features (same recipe, --features=the copy).
    DEMO_OUT is a demo.sh output folder (cohort/ with the lesion masks, shards/, the feature cache).
    Every token that lies (partly) inside a lesion of the ground truth gets
    emb += amp * frac * sigma * u[diagnosis]: frac = share of the token's 4x16x16 box inside the
    lesion (nvfm.grounding.lesion_token_cover), u[d] a fixed random unit direction per diagnosis
    (seeded by its name), sigma = the root of the cache's total per-dimension token variance (amp 1
    moves a lesion token by one typical token spread). Only the diagnosis is planted; side and size
    are left to the tokens' positions and the encoder. amp 0 copies the cache unchanged. If the
    image model trained on the planted cache beats the text-only baseline and the one on the real
    cache does not, the encoder's features are what is missing; if neither does, the connector or
    its training is at fault."""
    ap = argparse.ArgumentParser(prog="bench_llava.py plant", description=plant.__doc__)
    ap.add_argument("demo_out")
    ap.add_argument("features", help="feature cache folder inside demo_out (or an absolute path)")
    ap.add_argument("--amp", type=float, default=1.0)
    ap.add_argument("--out", default="", help="default: DEMO_OUT/features_planted_<amp>")
    a = ap.parse_args(argv)
    src = a.features if os.path.isabs(a.features) else os.path.join(a.demo_out, a.features)
    plant_features(a.demo_out, src, a.amp, a.out or os.path.join(a.demo_out, f"features_planted_{a.amp:g}"))


COMMANDS = {"compare": compare, "paired": paired, "speed": speed, "read": read, "cross_check": cross_check,
            "plant": plant}


def main(argv):
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 1)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
