"""train_llava.py audit: a killed run resumes to the uninterrupted weights, --init_connector refuses a
connector of another encoder or shape, features of another precision than a probe, a resumed checkpoint
or an --init_connector were trained on are refused, metrics.json claims only the splits it scored, a probe-scores
row's missing thresholds take --probe_threshold, and the reports rule never fits on the test split."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from test_llava import ROOT, TINY, _synthetic_cohort
from nvfm.llm import tiny_qwen3_cached

ENV = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1")
SDH = "acute_subdural_hematoma"
# runs train_llava.py and dies (os._exit, like SIGKILL) inside optimizer step number KILL_AT (0-based)
KILLER = """import os, runpy, sys, torch
n = [0]
step = torch.optim.AdamW.step
def dying_step(self, *a, **k):
    if n[0] == int(os.environ["KILL_AT"]):
        os._exit(9)
    n[0] += 1
    return step(self, *a, **k)
torch.optim.AdamW.step = dying_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def lm_dir():
    return tiny_qwen3_cached(**TINY)


def _base(fnd, feat, lm_dir, out, *args):
    return [os.path.join(ROOT, "train_llava.py"), "config/llava_tiny.py", f"--features={feat}", f"--findings={fnd}",
            f"--llm={lm_dir}", f"--out_dir={out}", "--batch_size=3", *args]


def _sh(cmd, env=ENV):
    return subprocess.run([sys.executable] + cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _refused(cmd, *named):
    r = _sh(cmd)
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1, (r.returncode, r.stderr[-3000:])
    assert err.startswith("train_llava.py: error: ") and all(n in err for n in named), (named, err)


def _with_splits(src, dst, splits, drop_findings_of=()):
    """A copy of findings.jsonl with the given {study_key: split} and the findings of some studies removed."""
    rows = [json.loads(line) for line in open(src)]
    for r in rows:
        r["split"] = splits.get(r["study_key"], r["split"])
        if r["study_key"] in drop_findings_of:
            r["findings"], r["triage"] = [], "unremarkable"
    with open(dst, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return dst


def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, lm_dir):
    """One generator seeded at the start of each invocation drew other batches after a resume than the
    uninterrupted run (connector max |diff| 5e-4, LM 1.2e-2 after 4 iterations, killed in iteration 3),
    and log.jsonl held iteration 2 twice."""
    from safetensors.torch import load_file
    fnd, feat = _synthetic_cohort(str(tmp_path))
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    args = ["--eval_split=none", "--max_iters=4", "--ckpt_interval=2", "--log_interval=1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = _sh(_base(fnd, feat, lm_dir, a, *args))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _sh([str(killer)] + _base(fnd, feat, lm_dir, b, *args), dict(ENV, KILL_AT="3"))
    assert r.returncode == 9 and torch.load(os.path.join(b, "ckpt.pt"), weights_only=True)["iter_num"] == 2
    r = _sh(_base(fnd, feat, lm_dir, b, *args, "--init_from=resume"))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-3000:]
    # the killed run had logged iteration 2 past its checkpoint: the log holds each iteration once
    logs = [[json.loads(line) for line in open(os.path.join(d, "log.jsonl"))] for d in (a, b)]
    assert [x["iter"] for x in logs[1]] == [x["iter"] for x in logs[0]] == [0, 1, 2, 3]
    assert [x["loss"] for x in logs[1]] == [x["loss"] for x in logs[0]]
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    assert ca["iter_num"] == cb["iter_num"] == 4 and ca["connector"].keys() == cb["connector"].keys()
    assert all(torch.equal(ca["connector"][k], cb["connector"][k]) for k in ca["connector"])
    la, lb = (load_file(os.path.join(d, "llm", "model.safetensors")) for d in (a, b))
    base = load_file(os.path.join(lm_dir, "model.safetensors"))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert not all(torch.equal(la[k], base[k]) for k in la)  # the LM did train


def test_init_connector_of_another_encoder_or_connector_is_refused(tmp_path, lm_dir):
    """A stage-1 connector trained on another encoder's features was loaded without a word (run exit 0);
    one of another width failed with a multi-line load_state_dict traceback; other heads load silently."""
    from nvfm.features import FeatureCache, FeatureWriter
    fnd, feat = _synthetic_cohort(str(tmp_path))
    cache = FeatureCache(feat)
    other = str(tmp_path / "feat_other")
    with FeatureWriter(other, "random:other", cache.dim) as w:  # the same tokens, said to be another encoder's
        for k in cache.study_keys():
            w.add(k, cache.study(k))
    s1 = str(tmp_path / "s1")
    r = _sh(_base(fnd, feat, lm_dir, s1, "--stage=1", "--max_iters=1", "--eval_split=none"))
    assert r.returncode == 0, r.stderr[-3000:]
    init = f"--init_connector={s1}/ckpt.pt"
    common = ["--max_iters=1", "--eval_split=none", init]
    _refused(_base(fnd, other, lm_dir, str(tmp_path / "x1"), *common), "encoder random:test -> random:other")
    _refused(_base(fnd, feat, lm_dir, str(tmp_path / "x2"), *common, "--perceiver_dim=32"), "perceiver_dim 64 -> 32")
    _refused(_base(fnd, feat, lm_dir, str(tmp_path / "x3"), *common, "--perceiver_heads=2"), "perceiver_heads 4 -> 2")
    r = _sh(_base(fnd, feat, lm_dir, str(tmp_path / "ok"), *common))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def val_cohort(tmp_path_factory, lm_dir):
    """The synthetic cohort with k000, k001 (true left / right SDH) and k002 (none) moved to val; test
    k009 (left SDH), k010 (right SDH), k011 (none)."""
    d = str(tmp_path_factory.mktemp("val_cohort"))
    fnd, feat = _synthetic_cohort(d)
    val = {"k000": "val", "k001": "val", "k002": "val"}
    return _with_splits(fnd, os.path.join(d, "findings_val.jsonl"), val), feat, d


def _eval_only(fnd, feat, lm_dir, out, *args):
    """Decode with a fresh (untrained) model: its 4-token replies name no diagnosis."""
    r = _sh(_base(fnd, feat, lm_dir, out, "--eval_only=True", "--max_new_tokens=4", *args))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(os.path.join(out, "reports_probe.jsonl"))]
    return json.load(open(os.path.join(out, "metrics.json"))), rows, r.stdout


@pytest.fixture(scope="module")
def val_only_run(val_cohort, lm_dir, tmp_path_factory):
    """--eval_split=val,test --max_eval=2 (only the two val studies), probe rows whose thresholds name EDH
    only, --probe_threshold=0.9."""
    fnd, feat, d = val_cohort
    probe = os.path.join(d, "probe_youden.jsonl")
    sdh = {"k000": 0.6, "k001": 0.95}
    with open(probe, "w") as f:
        for i in range(12):
            k = f"k{i:03d}"
            f.write(json.dumps({"study_key": k, "scores": {SDH: sdh.get(k, 0.1), "epidural_hematoma": 0.9},
                                "thresholds": {"epidural_hematoma": 0.95}}) + "\n")
    out = str(tmp_path_factory.mktemp("val_only") / "run")
    m, rows, stdout = _eval_only(fnd, feat, lm_dir, out, "--eval_split=val,test", "--max_eval=2",
                                 f"--probe_scores={probe}", "--probe_rule=youden", "--probe_threshold=0.9")
    return m, rows, stdout, sdh, out


def test_metrics_claim_only_the_splits_scored(val_only_run):
    """metrics.json said eval_splits [test, val] when --max_eval=2 left only the two val studies."""
    m, rows, stdout, _, out = val_only_run
    scored = [json.loads(line)["study_key"] for line in open(os.path.join(out, "reports.jsonl"))]
    assert scored == ["k000", "k001"] and m["n_eval"] == len(scored)
    assert m["eval_splits"] == ["val"] and m["n_eval_by_split"] == {"val": 2}
    assert "by_split" not in m["reports"] and "scored 2 studies of split(s) val only" in stdout


def test_a_missing_probe_threshold_is_probe_threshold(val_only_run):
    """A --probe_scores row with thresholds for other diagnoses only got cross_check's own 0.5 for SDH,
    not --probe_threshold=0.9: SDH at 0.6 was appended to k000."""
    _, rows, _, sdh, _ = val_only_run
    # by hand: a call is made where score >= the row's threshold, or --probe_threshold where it has none
    expect = {k: [SDH] if s >= 0.9 else [] for k, s in sdh.items()}  # EDH 0.9 < its 0.95 everywhere
    assert {r["study_key"]: r["probe_missed"] for r in rows} == expect == {"k000": [], "k001": [SDH]}


def test_reports_rule_is_fitted_on_val_never_on_test(val_cohort, lm_dir, tmp_path):
    """--probe_rule=reports cross-fitted its cuts over every evaluated study, test included: removing the
    test studies' ground truth moved the reported cut from 0.7 to none (inf)."""
    fnd, feat, d = val_cohort
    probe = tmp_path / "probe.jsonl"
    sdh = {"k000": 0.9, "k001": 0.8, "k002": 0.85, "k009": 0.95, "k010": 0.83, "k011": 0.7}
    probe.write_text("".join(json.dumps({"study_key": f"k{i:03d}", "scores": {SDH: sdh.get(f"k{i:03d}", 0.1)}})
                             + "\n" for i in range(12)))
    no_test_truth = _with_splits(fnd, str(tmp_path / "f2.jsonl"), {}, drop_findings_of=("k009", "k010", "k011"))
    runs = [_eval_only(f, feat, lm_dir, str(tmp_path / f"r{i}"), "--eval_split=val,test", f"--probe_scores={probe}")
            for i, f in enumerate((fnd, no_test_truth))]
    # by hand, on val only: calls at 0.9 (true), 0.85 (false), 0.8 (true): the lowest cut right >= 0.5 of
    # the time with >= 2 true calls is 0.8; a val study, fitted on the two other val studies, never has 2
    # true calls (no cut); test studies take 0.8: k009, k010 called, k011 (0.7) not. Fitted on val and
    # test together it was 0.7 (4 of 6 calls true)
    expect = {"k000": [], "k001": [], "k002": [], "k009": [SDH], "k010": [SDH], "k011": []}
    for m, rows, stdout in runs:
        assert m["probe_cross_check_thresholds"] == pytest.approx({SDH: 0.8})
        assert {r["study_key"]: r["probe_missed"] for r in rows} == expect
        assert "fitted on the 3 val studies" in stdout
    assert runs[0][1] == runs[1][1]  # the test studies' ground truth changes nothing
    _refused(_base(fnd, feat, lm_dir, str(tmp_path / "x"), "--eval_only=True", "--eval_split=test",
                   f"--probe_scores={probe}"), "--probe_rule=reports", "--eval_split=test studies include none")
    assert not os.path.exists(tmp_path / "x")


def test_cross_check_appends_what_report_metrics_reads_back():
    """Every ontology diagnosis a probe can call, appended by cross_check (urgent_only=False: all of them),
    is read back by report_metrics.extract_diagnoses as that diagnosis, and a report naming it is not
    appended to again; urgent_only keeps routine ones out."""
    from nvfm import llava
    from nvfm.ontology import DIAGNOSES, same_finding
    from nvfm.report_metrics import extract_diagnoses
    bad = []
    for name, dx in DIAGNOSES.items():
        found, missed = llava.cross_check([], {name: 1.0}, 0.5, urgent_only=False)
        back = [d for f in found for d, _ in extract_diagnoses(f)]
        again = llava.cross_check(found, {name: 1.0}, 0.5, urgent_only=False)
        urgent = llava.cross_check([], {name: 1.0}, 0.5)[1]
        if (missed != [name] or back != [same_finding(name)] or again != (found, [])
                or urgent != ([name] if dx.urgency == "urgent" else [])):
            bad.append((name, found, back))
    assert bad == [] and len(DIAGNOSES) > 100
    # below its threshold nothing is appended
    assert llava.cross_check([], {SDH: 0.49}, {SDH: 0.5}) == ([], [])


def test_features_of_another_precision_than_the_probe_or_connector_were_trained_on_are_refused(tmp_path, lm_dir):
    """A probe fitted on a CPU float32 cache cross-checked reports decoded from a CUDA bf16-autocast cache
    of the same encoder, a stage-1 run resumed on it, and a connector started from that run's ckpt.pt: all
    ran without a word (exit 0), though such features differ ~14x the float16 step (nvfm/features.py).
    A probe of another encoder was refused only after training (ckpt.pt written, the error at the end of
    14 lines of training output)."""
    from nvfm import probe as P
    from nvfm.features import FeatureCache, FeatureWriter
    fnd, feat = _synthetic_cohort(str(tmp_path))
    c = FeatureCache(feat)
    rng = np.random.default_rng(0)
    caches = {}
    for prec, noise in (("float32", 0.0), ("bfloat16-autocast", 1e-2)):   # the same encoder's tokens
        caches[prec] = str(tmp_path / prec)
        with FeatureWriter(caches[prec], "random:test", c.dim, precision=prec) as w:
            for k in c.study_keys():
                w.add(k, [dict(e, emb=e["emb"].astype(np.float32) + noise * rng.normal(size=e["emb"].shape))
                          for e in c.study(k)])
    f32, bf16 = caches["float32"], caches["bfloat16-autocast"]
    torch.manual_seed(0)
    probe = str(tmp_path / "probe.pt")   # fitted on f32: train_probe.py records the cache, not its precision
    torch.save(dict(models=[P.make_probe("mean_pool", c.dim, 1).state_dict()], task="classify",
                    probe_args=dict(kind="mean_pool", dim=c.dim, n_out=1, hidden=0, dropout=0.0), label_names=[SDH],
                    modality="all", eval_modality="all", encoder_hash="random:test", features=f32, windows="",
                    thresholds=[0.0], platt_a=[1.0], platt_b=[0.0], n_train_pos=[4.0]), probe)
    ev = ["--eval_only=True", "--max_new_tokens=4", f"--probe={probe}", "--probe_rule=youden"]
    other = str(tmp_path / "probe_other.pt")   # another encoder's probe: refused before training, not after it
    torch.save(dict(torch.load(probe, weights_only=True), encoder_hash="random:other"), other)
    _refused(_base(fnd, f32, lm_dir, str(tmp_path / "po"), "--max_iters=1", f"--probe={other}", "--probe_rule=youden"),
             f"--probe={other} was trained on features of encoder random:other")
    assert not os.path.exists(tmp_path / "po" / "ckpt.pt")
    _refused(_base(fnd, bf16, lm_dir, str(tmp_path / "p16"), *ev), f"--probe={probe} was trained on float32 "
             f"features ({f32})", f"{bf16} holds bfloat16-autocast features")
    assert not os.path.exists(tmp_path / "p16" / "metrics.json")
    r = _sh(_base(fnd, f32, lm_dir, str(tmp_path / "p32"), *ev))   # its own precision: scored
    assert r.returncode == 0 and os.path.exists(tmp_path / "p32" / "reports_probe.jsonl"), r.stderr[-3000:]
    s1 = str(tmp_path / "s1")
    stage1 = ["--stage=1", "--eval_split=none"]
    r = _sh(_base(fnd, f32, lm_dir, s1, *stage1, "--max_iters=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(os.path.join(s1, "ckpt.pt"), weights_only=True)
    assert ck["feature_precision"] == "float32" and ck["iter_num"] == 1
    _refused(_base(fnd, bf16, lm_dir, s1, *stage1, "--max_iters=2", "--init_from=resume"),
             "ckpt.pt was trained on float32 features", f"{bf16} holds bfloat16-autocast features")
    assert torch.load(os.path.join(s1, "ckpt.pt"), weights_only=True)["iter_num"] == 1   # nothing trained
    _refused(_base(fnd, bf16, lm_dir, str(tmp_path / "s2"), "--max_iters=1", "--eval_split=none",
                   f"--init_connector={s1}/ckpt.pt"), "feature precision float32 -> bfloat16-autocast")


def test_a_probe_does_not_cross_check_studies_without_tokens_in_its_windows(tmp_path, lm_dir):
    """A probe of the CT brain window on MR-only studies scored their empty bags at a constant logit (the
    head's bias, -0.23 >= its threshold): 'Acute subdural hematoma (detected by image probe)' was appended to
    every test study, the one without a finding too (hallucination 0.333). Given the window it was
    trained on, the same probe does call them."""
    from nvfm import probe as P
    fnd, feat = _synthetic_cohort(str(tmp_path))   # every study: one MR series, window "mr"
    torch.manual_seed(0)
    sd = P.make_probe("mean_pool", 16, 1).state_dict()
    missed = {}
    for win in ("brain", "mr"):
        pt = str(tmp_path / f"probe_{win}.pt")
        torch.save(dict(models=[sd], task="classify", probe_args=dict(kind="mean_pool", dim=16, n_out=1, hidden=0,
                                                                      dropout=0.0),
                        label_names=[SDH], modality="all", eval_modality="all", encoder_hash="random:test",
                        features=feat, windows=win, thresholds=[-100.0], platt_a=[1.0], platt_b=[0.0],
                        n_train_pos=[4.0]), pt)
        out = str(tmp_path / win)
        r = _sh(_base(fnd, feat, lm_dir, out, "--eval_only=True", "--max_new_tokens=4", f"--probe={pt}",
                      "--probe_rule=youden"))
        assert r.returncode == 0, r.stderr[-3000:]
        path = os.path.join(out, "reports_probe.jsonl")
        missed[win] = [json.loads(line)["probe_missed"] for line in open(path)] if os.path.exists(path) else []
        if win == "brain":
            assert "3 of its 3 studies have no tokens in its windows brain" in r.stdout
    assert missed == {"brain": [], "mr": [[SDH]] * 3}
