"""train_llava.py as a user runs it: findings that are not lists of strings, a study twice or a line that is not
JSON refused before training; a rerun from scratch into the same --out_dir starts a fresh log; --eval_only from
scratch never replaces a trained run's reports; unused studies and blank findings are noted; the val loss is the
answer-token mean whatever the batch size; replies cut at --max_new_tokens are marked; batched greedy decoding is
brute-force greedy decoding; non-ASCII findings survive the paper's reference decoding."""
import json
import os
import shutil

import pytest
import torch

from test_llava import ROOT, SDH, TINY, _overfit, _studies, _synthetic_cohort
from test_llava_audit import _base, _sh, _with_splits
from nvfm import llava
from nvfm.llm import load_llm, tiny_qwen3_cached

EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def lm_dir():
    return tiny_qwen3_cached(**TINY)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """The synthetic cohort: val k000 (left SDH), k001 (right SDH), k002 (none); k003 has a blank finding
    string besides its own; k004 has features but no record in findings.jsonl."""
    d = str(tmp_path_factory.mktemp("journey"))
    fnd, feat = _synthetic_cohort(d)
    fnd = _with_splits(fnd, os.path.join(d, "f_val.jsonl"), {"k000": "val", "k001": "val", "k002": "val"})
    rows = [json.loads(line) for line in open(fnd)]
    for r in rows:
        if r["study_key"] == "k003":
            r["findings"] = r["findings"] + ["   "]
    out = os.path.join(d, "findings.jsonl")
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["study_key"] != "k004")
    return out, feat, d


@pytest.fixture(scope="module")
def run(cohort, lm_dir):
    """The same scratch run twice into one --out_dir (batch 2, val loss every iteration, 4-token replies)."""
    fnd, feat, d = cohort
    out = os.path.join(d, "run")
    args = ["--max_iters=2", "--log_interval=1", "--eval_interval=1", "--eval_split=val,test", "--max_new_tokens=4"]
    for _ in range(2):
        r = _sh(_base(fnd, feat, lm_dir, out, *args) + ["--batch_size=2"])
        assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def test_findings_that_are_not_lists_of_strings_are_refused_before_training(cohort, lm_dir, tmp_path):
    """'findings' given as a string trained the whole run on its letters (target '["A", "c", ...]'), wrote
    ckpt.pt, then died in report_metrics with a traceback (exit 2); a study twice trained on its last record;
    a line that is not JSON was a traceback."""
    fnd, feat, _ = cohort
    rows = [json.loads(line) for line in open(fnd)]
    cases = {"string": ([dict(rows[0], findings="Acute left convexity subdural hematoma.")] + rows[1:],
                        ":1: study 'k000': 'findings' must be a list of strings, got a str"),
             "twice": (rows + [rows[4]], f":{len(rows) + 1}: study 'k005' appears twice in the ground truth (line 5 too)"),
             "json": (rows + ["{not json"], f":{len(rows) + 1}: not valid JSON")}
    for name, (rs, said) in cases.items():
        bad = tmp_path / f"{name}.jsonl"
        bad.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rs))
        out = tmp_path / name
        r = _sh(_base(str(bad), feat, lm_dir, str(out), "--max_iters=1", "--eval_split=test"))
        err = r.stderr.strip()
        assert r.returncode == 1 and len(err.splitlines()) == 1, (name, r.returncode, r.stderr[-2000:])
        assert err.startswith(f"train_llava.py: error: {bad}{said}"), (name, err)
        assert not os.path.exists(out / "ckpt.pt")


def test_a_scratch_rerun_starts_a_fresh_log(run):
    """A second scratch run into the same --out_dir appended to the first run's log.jsonl: iterations
    [0, 1, 0, 1] and four val losses."""
    out, _ = run
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["iter"] for r in rows if "loss" in r] == [0, 1]
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 1]


def test_eval_only_from_scratch_does_not_replace_a_trained_run(run, cohort, lm_dir):
    """--eval_only without --init_from=resume decoded an untrained model and overwrote the trained run's
    reports.jsonl and metrics.json (iter_num 0) without a word."""
    out, _ = run
    fnd, feat, _ = cohort
    before = {fn: open(os.path.join(out, fn), "rb").read() for fn in ("reports.jsonl", "metrics.json")}
    r = _sh(_base(fnd, feat, lm_dir, out, "--eval_only=True", "--eval_split=val,test", "--max_new_tokens=4", "--batch_size=2"))
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and "--init_from=resume" in err, r.stderr[-2000:]
    assert {fn: open(os.path.join(out, fn), "rb").read() for fn in before} == before


def test_unused_studies_and_blank_findings_are_noted(run):
    """k004's features (no record in findings.jsonl) went unused without a word, and k003's blank finding
    string was trained as '["...", "   "]', a reply parse_findings counts as malformed."""
    _, stdout = run
    assert "note: 1 studies of" in stdout and "have no record in" in stdout
    assert "note: 1 studies of" in stdout and "blank or whitespace-only finding strings" in stdout


@pytest.mark.parametrize("text,expect", [('["   "]', ([], "empty")), ('["", " "]', ([], "empty")),
                                         ('[" ", 3]', (["3"], "repaired")), ('[" a ", ""]', (["a"], "repaired"))])
def test_parse_findings_never_returns_blank_findings(text, expect):
    """A reply of whitespace-only strings came back as the finding '   ' (and scored as report text)."""
    assert llava.parse_findings(text) == expect


def test_val_loss_is_the_answer_token_mean_whatever_the_batch_size(run, cohort):
    """val_loss weighted each batch's token mean by its number of studies: with batch_size 2 the logged value
    depended on how the 3 val studies fell into batches. Recomputed here one study at a time from the
    saved connector and LM (the last val loss is taken before the final save), every answer token weighing
    the same; a study's answer tokens counted from the tokenizer."""
    from nvfm.features import FeatureCache
    out, _ = run
    fnd, feat, _ = cohort
    logged = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    logged = [r["val_loss"] for r in logged if "val_loss" in r][-1]
    lm, tok = load_llm(os.path.join(out, "llm"))
    gen = llava.ReportGenerator(lm, tok, 16, 64, 2, 4, 4).eval()
    gen.connector.load_state_dict(torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["connector"])
    cache, recs = FeatureCache(feat), llava.read_findings(fnd)
    tot, n = 0.0, 0
    for k in ("k000", "k001", "k002"):
        series = [dict(e, emb=torch.from_numpy(e["emb"].astype("float32"))) for e in cache.study(k)]
        with torch.no_grad():
            loss = gen([series], [recs[k]["indication"]], [recs[k]["findings"]]).item()
        m = len(tok.encode(json.dumps(recs[k]["findings"]), add_special_tokens=False)) + 1  # + the end token
        tot, n = tot + loss * m, n + m
    assert logged == pytest.approx(tot / n, rel=1e-5, abs=1e-5)


def test_replies_cut_at_max_new_tokens_are_marked(run):
    """A reply that reached --max_new_tokens was parsed ('repaired') as if complete, with no trace of the cut."""
    out, stdout = run
    rows = [json.loads(line) for line in open(os.path.join(out, "reports.jsonl"))]
    m = json.load(open(os.path.join(out, "metrics.json")))
    n_cut = sum(r["cut"] for r in rows)
    assert n_cut > 0 and m["n_cut_at_max_new_tokens"] == n_cut
    assert f"note: {n_cut} of {len(rows)} replies reached --max_new_tokens=4 without the end token" in stdout


NON_ASCII = "Extra-axial mass 3.5 × 3.1 cm, dural tail é."


@pytest.fixture(scope="module")
def fitted(lm_dir):
    """A generator overfit on three studies (images; images; none), one finding with non-ASCII text."""
    model, tok = load_llm(lm_dir)
    torch.manual_seed(2)
    gen = llava.ReportGenerator(model, tok, enc_dim=16, dim=32, depth=1, heads=4, n_latents=4)
    s = _studies()
    studies, inds = [s[0], s[1], []], ["a long clinical indication to make the prompts differ in length", "fall", "x"]
    fnds = [[NON_ASCII], [SDH, "Shift."], []]
    return _overfit(gen, studies, inds, fnds, 50), studies, inds, fnds


def _greedy(gen, study, ind, n):
    """Brute-force greedy decoding of one study: full forward without cache, argmax, stop at the end token."""
    tok, lm = gen.tok, gen.llm
    with torch.no_grad():
        visual, names = gen._visual([study])
        ex = gen.prompts.build(names[0], ind, None, 2)
        emb = lm.get_input_embeddings()
        x = emb(torch.tensor([ex["ids"]]))
        if visual is not None:
            x[0, torch.tensor(ex["vision"])] = visual
        eot, out = tok.convert_tokens_to_ids(EOT), []
        for _ in range(n):
            t = int(lm(inputs_embeds=x).logits[0, -1].argmax())
            out.append(t)
            if t == eot:
                return tok.decode(out, skip_special_tokens=True).strip(), True
            x = torch.cat([x, emb(torch.tensor([[t]]))], 1)
    return tok.decode(out, skip_special_tokens=True).strip(), False


def test_batched_greedy_generation_is_brute_force_greedy_decoding(fitted):
    """Left-padded batched decoding of studies with different prompt lengths (one without images) gives what
    one-at-a-time brute-force greedy decoding gives, stops at the end token, respects max_new_tokens, and
    says which replies were cut."""
    gen, studies, inds, fnds = fitted
    for n in (60, 6):
        texts, ended = gen.generate(studies, inds, max_new_tokens=n, return_ended=True)
        ref = [_greedy(gen, s, i, n) for s, i in zip(studies, inds)]
        assert list(zip(texts, ended)) == ref
    assert [llava.parse_findings(t) for t in gen.generate(studies, inds, max_new_tokens=60)] == [(f, "ok") for f in fnds]
    assert ended == [False, False, True]  # 6 tokens: "[]" ends, the others are cut


def test_non_ascii_findings_survive_the_reference_decoding(fitted):
    """The stage-2 target was json.dumps' ASCII form ('3.5 \\u00d7 3.1 cm'): with the paper's decoding
    (repetition penalty 1.2, no repeated 4-gram) the second escape's '\\u00' 4-gram was blocked, the reply
    read '\\u0e9', and the finding came back as the literal escape text ('repaired')."""
    gen, studies, inds, fnds = fitted
    out = gen.generate(studies, inds, max_new_tokens=60, repetition_penalty=1.2, no_repeat_ngram_size=4)
    assert llava.parse_findings(out[0]) == ([NON_ASCII], "ok")
    ex = gen.prompts.build([], "x", [NON_ASCII])
    ans = [i for i, lab in zip(ex["ids"], ex["labels"]) if lab != llava.IGNORE]
    assert gen.tok.decode(ans) == '["Extra-axial mass 3.5 × 3.1 cm, dural tail é."]' + EOT


def test_reused_reports_must_come_from_the_checkpoint_evaluated(cohort, lm_dir, tmp_path):
    """Reports decoded at iteration 2, training resumed to iteration 3 with --eval_split=none, then
    --reuse_reports re-scored the iteration-2 reports and metrics.json claimed iter_num 3 (and iter_num 0
    when re-scored with --init_from=scratch, as one does against another findings file)."""
    fnd, feat, _ = cohort
    out = str(tmp_path / "r")
    common = ["--eval_split=test", "--max_new_tokens=4"]
    for args in (["--max_iters=2", *common], ["--max_iters=3", "--eval_split=none", "--init_from=resume"]):
        r = _sh(_base(fnd, feat, lm_dir, out, *args))
        assert r.returncode == 0, r.stderr[-2000:]
    # the resume set the iteration-2 evaluation aside; put it back, as an older train_llava.py left the folder
    stale = os.path.join(out, "stale-iter2")
    assert {"metrics.json", "reports.jsonl"} <= set(os.listdir(stale))
    for f in os.listdir(stale):
        shutil.copy(os.path.join(stale, f), out)
    before = open(os.path.join(out, "metrics.json")).read()
    r = _sh(_base(fnd, feat, lm_dir, out, "--max_iters=3", "--init_from=resume", "--eval_only=True",
                  "--reuse_reports=True", *common))
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1, r.stderr[-2000:]
    assert "reports.jsonl was decoded at iteration 2 and" in err and "ckpt.pt is at iteration 3" in err
    assert open(os.path.join(out, "metrics.json")).read() == before
    r = _sh(_base(fnd, feat, lm_dir, out, "--max_iters=3", "--eval_only=True", "--reuse_reports=True", *common))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(os.path.join(out, "metrics.json")))["iter_num"] == 2
