"""Report generator: packed per-series perceiver, prompt splicing, answer-only loss, batched
deterministic decoding, JSON repair, probe cross-check, and train_llava.py end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nvfm import llava  # noqa: E402
from nvfm.llm import load_llm, tiny_qwen3_cached  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDH = "Acute hyperdense left convexity subdural hematoma measuring up to 9 mm in thickness."
MEN = "Hyperdense extra-axial mass along the right frontal convexity measuring 3.1 x 2.5 cm, likely meningioma."


TINY = dict(layers=1, hidden=32, heads=2, kv_heads=1, head_dim=16, intermediate=64)  # shared with test_llm


@pytest.fixture(scope="module")
def lm_dir():
    return tiny_qwen3_cached(**TINY)


@pytest.fixture(scope="module")
def lm(lm_dir):
    return load_llm(lm_dir)


def _gen(lm, seed=0, n_latents=8):
    model, tok = lm
    torch.manual_seed(seed)
    return llava.ReportGenerator(model, tok, enc_dim=16, dim=32, depth=2, heads=4, n_latents=n_latents,
                                 attn_impl="auto")


def _studies(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[{"family": "T1", "modality": "MR", "emb": torch.randn(37, 16, generator=g)},
             {"family": "FLAIR", "modality": "MR", "emb": torch.randn(5, 16, generator=g)}],
            [{"family": "CT", "modality": "CT", "window": w, "emb": torch.randn(n, 16, generator=g)}
             for w, n in (("brain", 23), ("blood", 23), ("bone", 11))]]


def test_perceiver_packed_equals_per_series():
    """Packing many series into one varlen call gives exactly each series' own result: no cross-talk."""
    torch.manual_seed(0)
    p = llava.PerceiverResampler(16, dim=32, depth=2, heads=4, n_latents=8).eval()
    lens = [37, 1, 64, 5]
    toks = torch.randn(sum(lens), 16)
    types = torch.tensor([0, 3, 8, 10])
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    packed = p(toks, cu, max(lens), types)
    assert packed.shape == (4 * 8, 32)
    for s in range(4):
        one = p(toks[cu[s]:cu[s + 1]], torch.tensor([0, lens[s]], dtype=torch.int32), lens[s], types[s:s + 1])
        torch.testing.assert_close(packed[s * 8:(s + 1) * 8], one, atol=1e-5, rtol=1e-5)
    p.attn_impl = "reference"
    torch.testing.assert_close(p(toks, cu, max(lens), types), packed, atol=1e-5, rtol=1e-5)
    # a series' latents depend on its own tokens only
    toks2 = toks.clone()
    toks2[cu[2]:cu[3]] += 1
    out2 = p(toks2, cu, max(lens), types)
    torch.testing.assert_close(out2[:16], packed[:16])
    assert not torch.allclose(out2[16:24], packed[16:24])


def test_pack_series_names_and_ct_windows():
    tokens, cu, max_len, types, names = llava.pack_series(_studies() + [[{"family": "T2", "emb": torch.zeros(0, 16)}]])
    assert names == [["T1", "FLAIR"], ["CT-brain", "CT-blood", "CT-bone"], []]  # empty sets dropped
    assert cu.tolist() == [0, 37, 42, 65, 88, 99] and max_len == 37 and tokens.shape == (99, 16)
    assert types.tolist() == [llava.SERIES_TYPES.index(n) for n in names[0] + names[1]]


def test_prompt_placeholders_and_answer_labels(lm):
    model, tok = lm
    pb = llava.PromptBuilder(tok, n_latents=8)
    ex = pb.build(["T1", "FLAIR"], "headache", [SDH, MEN], stage=2)
    assert sum(ex["vision"]) == 16
    text = tok.decode([i for i, v in zip(ex["ids"], ex["vision"]) if not v])
    assert text.startswith("<|im_start|>user\nT1: <|vision_start|><|vision_end|>\nFLAIR: <|vision_start|><|vision_end|>")
    assert "Indication: headache\n" + llava.REPORT_PROMPT in text
    ans = [i for i, l in zip(ex["ids"], ex["labels"]) if l != llava.IGNORE]
    assert [l for l in ex["labels"] if l != llava.IGNORE] == ans
    assert tok.decode(ans) == json.dumps([SDH, MEN]) + "<|im_end|>"
    assert ex["ids"][-len(ans) - 3:-len(ans)] == tok.encode("<|im_start|>assistant\n")  # answer right after the turn
    s1 = pb.build(["CT-brain"], "fall", [SDH, MEN], stage=1)
    assert tok.decode([i for i, l in zip(s1["ids"], s1["labels"]) if l != llava.IGNORE]) == f"{SDH} {MEN}<|im_end|>"
    assert "Indication" not in tok.decode(s1["ids"])


def test_loss_is_answer_only_cross_entropy(lm):
    gen = _gen(lm)
    studies, inds, fnds = _studies(), ["headache", "fall"], [[SDH], []]
    loss = gen(studies, inds, fnds)
    # reference: full logits of the LM on the same embeddings, CE on shifted answer labels only
    visual, names = gen._visual(studies)
    ex = [gen.prompts.build(n, i, f) for n, i, f in zip(names, inds, fnds)]
    x, att, lab = gen._embed(ex, visual, pad_left=False)
    logits = gen.llm(inputs_embeds=x, attention_mask=att).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-4)
    # visual latents are spliced in: changing an image changes the loss; gradients reach the connector
    loss.backward()
    assert gen.connector.perceiver.latents.grad.abs().sum() > 0
    studies2 = _studies()
    studies2[0][0]["emb"] = studies2[0][0]["emb"] * -1
    assert not torch.allclose(gen(studies2, inds, fnds), loss)


def test_generation_batched_equals_single_and_is_deterministic(lm):
    gen = _gen(lm, seed=1).eval()
    studies, inds = _studies(), ["a long clinical indication to make the prompts differ in length", "fall"]
    kw = dict(max_new_tokens=8, skip_special_tokens=False)  # a random LM may emit special tokens only
    batched = gen.generate(studies, inds, **kw)
    single = [gen.generate([s], [i], **kw)[0] for s, i in zip(studies, inds)]
    assert batched == single  # (often blank for an untrained LM; re-checked after training below)
    assert gen.generate(studies, inds, **kw) == batched
    beams = gen.generate(studies, inds, max_new_tokens=8, num_beams=2, repetition_penalty=1.2, no_repeat_ngram_size=4)
    assert len(beams) == 2 and all(isinstance(b, str) for b in beams)


def _overfit(gen, studies, inds, fnds, steps):
    """Train the whole generator on these studies until its loss is under 0.1; returns it in eval mode."""
    opt = torch.optim.AdamW(gen.parameters(), lr=2e-2)
    for _ in range(steps):
        loss = gen(studies, inds, fnds)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    return gen.eval()


def test_overfit_two_studies_reproduces_json(lm_dir):
    model, tok = load_llm(lm_dir)  # a fresh copy: this test trains the LM
    gen = _gen((model, tok), seed=2)
    studies, fnds = _studies(), [["Meningioma."], ["Left hematoma.", "Shift."]]
    inds = ["a long clinical indication to make the prompts differ in length", "fall"]
    _overfit(gen, studies, inds, fnds, 40)
    out = gen.generate(studies, inds, max_new_tokens=24)
    assert [llava.parse_findings(o) for o in out] == [(f, "ok") for f in fnds]
    # left-padded batch decoding == one study at a time
    assert out == [gen.generate([s], [i], max_new_tokens=24)[0] for s, i in zip(studies, inds)]


@pytest.mark.parametrize("text,expect", [
    ('["a", "b"]', (["a", "b"], "ok")),
    ('Sure: ["a", "b"] hope this helps', (["a", "b"], "repaired")),   # text around the list: not the format
    ('{"findings": ["a"]}', (["a"], "repaired")),
    ("[]", ([], "ok")),
    ('["a", "b', (["a", "b"], "repaired")),                 # cut off at max_new_tokens
    ('["a", 3, "c"]', (["a", "c"], "repaired")),
    ('["a\\"q", "b"', (['a"q', "b"], "repaired")),
    ("Left SDH. Midline shift.", (["Left SDH.", "Midline shift."], "repaired")),
    ("", ([], "empty")),
    ("[[[", ([], "empty")),
])
def test_parse_findings_never_raises(text, expect):
    assert llava.parse_findings(text) == expect


def test_cross_check_modes():
    report = [MEN]
    scores = {"acute_subdural_hematoma": 0.9, "meningioma": 0.95, "cerebral_atrophy": 0.99, "epidural_hematoma": 0.2}
    f, missed = llava.cross_check(report, scores, 0.5, mode="append")
    assert missed == ["acute_subdural_hematoma"]  # urgent, positive, omitted; routine/negative ones ignored
    assert f[0] == MEN and f[1].startswith("Acute subdural hematoma") and len(f) == 2
    f, missed = llava.cross_check(report, scores, {"acute_subdural_hematoma": 0.95}, mode="flag")
    assert f == report and missed == []
    f, missed = llava.cross_check(report + [SDH], scores, 0.5, mode="append")
    assert missed == [] and f == report + [SDH]  # already mentioned
    assert llava.cross_check(report, scores, 0.5, mode="off") == (report, [])
    with pytest.raises(ValueError):
        llava.cross_check(report, scores, 0.5, mode="bogus")


def _run(cmd, env, timeout):
    """subprocess.run in its own process group, killed whole on timeout (no orphaned ranks)."""
    import signal
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def _synthetic_cohort(d, n=12, dim=16):
    """Features that carry the finding (mean +1 for a left SDH, -1 for a right one, 0 none)."""
    from nvfm.features import FeatureWriter
    rng = np.random.default_rng(0)
    kinds = [("left", "urgent"), ("right", "urgent"), (None, "unremarkable")]
    with open(os.path.join(d, "findings.jsonl"), "w") as f, FeatureWriter(os.path.join(d, "feat"), "random:test", dim) as w:
        for i in range(n):
            side, tri = kinds[i % 3]
            fnd = [f"Acute {side} convexity subdural hematoma."] if side else []
            key = f"k{i:03d}"
            split = "test" if i >= n - 3 else "train"
            f.write(json.dumps({"study_key": key, "split": split, "indication": "fall", "findings": fnd,
                                "triage": tri, "lesions": []}) + "\n")
            mean = {"left": 1.0, "right": -1.0, None: 0.0}[side]
            w.add(key, [{"volume_id": i, "family": "T1", "window": "mr", "modality": "MR",
                         "coords": np.zeros((20, 3), np.int32), "emb": rng.normal(mean, 0.3, (20, dim))}])
    return os.path.join(d, "findings.jsonl"), os.path.join(d, "feat")


def test_train_llava_end_to_end_and_resume(tmp_path, lm_dir):
    fnd, feat = _synthetic_cohort(str(tmp_path))
    out = str(tmp_path / "run")
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"study_key": f"k{i:03d}", "scores": {"epidural_hematoma": 0.9}}) + "\n"
                             for i in range(12)))
    base = [sys.executable, os.path.join(ROOT, "train_llava.py"), "config/llava_tiny.py", f"--features={feat}",
            f"--findings={fnd}", f"--out_dir={out}", f"--llm={lm_dir}", "--batch_size=3", "--ckpt_interval=2",
            "--max_new_tokens=24", f"--probe_scores={probe}", "--log_interval=1", "--image_dropout=0.5"]
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1")
    r = subprocess.run(base + ["--max_iters=2", "--eval_split=none"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["iter_num"] == 2 and ck["encoder_hash"] == "random:test"
    assert [json.loads(l)["iter"] for l in open(os.path.join(out, "log.jsonl"))] == [0, 1]
    assert os.path.exists(os.path.join(out, "llm", "config.json"))  # stage 2 saves the fine-tuned LM
    r = subprocess.run(base + ["--max_iters=3", "--init_from=resume", "--probe_rule=youden"],
                       cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "iter 2:" in r.stdout + r.stderr and "iter 1:" not in r.stdout + r.stderr
    def strict(c):   # json.dump writes NaN, which is not JSON (other readers refuse it)
        raise ValueError(f"metrics.json holds {c}")
    m = json.load(open(os.path.join(out, "metrics.json")), parse_constant=strict)
    assert m["n_eval"] == 3 and 0 <= m["reports"]["bleu2"] <= 1
    probe_rows = [json.loads(l) for l in open(os.path.join(out, "reports_probe.jsonl"))]
    assert all("Epidural hematoma" in " ".join(r["findings"]) for r in probe_rows)  # urgent probe finding appended
    assert all(r["parse"] in ("ok", "repaired", "empty") for r in probe_rows)
    _check_probe_operating_points(tmp_path, [c for c in base if not c.startswith("--probe_scores")], env)


def test_train_llava_resume_pairs_ckpt_with_its_lm_or_refuses(tmp_path, lm_dir):
    """Stage 2 saves the LM into OUT/llm-<iter> before ckpt.pt, which names it (and its file sizes):
    a resume loads exactly that LM, removes what a killed save left, and refuses (one line, exit 1)
    when that LM is cut or missing, or when a setting that changes training differs."""
    from safetensors.torch import load_file
    fnd, feat = _synthetic_cohort(str(tmp_path))
    out = str(tmp_path / "run")
    base = [sys.executable, os.path.join(ROOT, "train_llava.py"), "config/llava_tiny.py", f"--features={feat}",
            f"--findings={fnd}", f"--out_dir={out}", f"--llm={lm_dir}", "--batch_size=3", "--eval_split=none",
            "--ckpt_interval=1000"]
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1")
    sh = lambda args: subprocess.run(base + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    def refused(args, *named):
        r = sh(args)
        err = r.stderr.strip()
        assert r.returncode == 1 and len(err.splitlines()) == 1, (args, r.returncode, r.stderr[-3000:])
        assert err.startswith("train_llava.py: error: ") and all(n in err for n in named), (named, err)

    r = sh(["--max_iters=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    ck_path = os.path.join(out, "ckpt.pt")
    ck = torch.load(ck_path, weights_only=True)
    saved = os.path.join(out, "llm-0000002")
    assert ck["llm_dir"] == "llm-0000002" and os.path.realpath(os.path.join(out, "llm")) == os.path.realpath(saved)
    assert ck["llm_files"]["model.safetensors"] == os.path.getsize(os.path.join(saved, "model.safetensors"))
    w0, w2 = load_file(os.path.join(lm_dir, "model.safetensors")), load_file(os.path.join(saved, "model.safetensors"))
    assert not all(torch.equal(w0[k], w2[k]) for k in w0)  # the fine-tuned LM, not the base
    ck_bytes = open(ck_path, "rb").read()
    refused(["--max_iters=3", "--init_from=resume", "--seed=9", "--lr=0.01", "--text_only=True"],
            "other settings", "lr 0.0003 -> 0.01", "seed 0 -> 9", "text_only False -> True", "--out_dir")
    # a kill inside a later save: a newer LM (here the base) that no ckpt.pt names, and a half-written one
    import shutil
    shutil.copytree(lm_dir, os.path.join(out, "llm-0000003"))
    shutil.copytree(lm_dir, os.path.join(out, ".llm-0000004.tmp"))
    weights = os.path.join(saved, "model.safetensors")
    size = os.path.getsize(weights)
    os.rename(weights, weights + ".keep")
    with open(weights, "wb") as f:   # the LM ckpt.pt names, cut short
        f.write(open(weights + ".keep", "rb").read()[:size // 2])
    refused(["--max_iters=3", "--init_from=resume"], f"{weights} is {size // 2} bytes", f"recorded {size} bytes")
    os.replace(weights + ".keep", weights)
    assert open(ck_path, "rb").read() == ck_bytes and os.path.isdir(os.path.join(out, "llm-0000003"))
    r = sh(["--max_iters=3", "--init_from=resume", "--log_interval=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"from {saved}:" in r.stdout and "resumed from" in r.stdout and "iter 2:" in r.stdout + r.stderr
    ck = torch.load(ck_path, weights_only=True)
    assert ck["iter_num"] == 3 and ck["llm_dir"] == "llm-0000003" and ck["llm"] == lm_dir
    assert sorted(os.listdir(out)) == ["ckpt.pt", "llm", "llm-0000003", "log.jsonl"]
    w3 = load_file(os.path.join(out, "llm", "model.safetensors"))
    assert not all(torch.equal(w0[k], w3[k]) for k in w0) and not all(torch.equal(w2[k], w3[k]) for k in w2)
    shutil.rmtree(os.path.join(out, "llm-0000003"))  # the LM ckpt.pt names is gone: never the base LM instead
    refused(["--max_iters=4", "--init_from=resume"], "llm-0000003, which is missing", "--out_dir")


def _check_probe_operating_points(tmp_path, base, env):
    """--probe=probe.pt re-scored on the saved reports (--reuse_reports): the precision rule fits its
    cuts on the probe's selection-split scores, the youden rule uses the probe's stored thresholds,
    the reports rule fits them on the evaluated reports, cross-fitted over folds."""
    from nvfm import probe as P
    from nvfm.report_metrics import extract_diagnoses
    names = ["acute_subdural_hematoma", "epidural_hematoma"]
    sd = P.make_probe("attentive_mil", 16, 2, 8, 0.0).state_dict()
    sd["instance.3.weight"].zero_()
    sd["instance.3.bias"].copy_(torch.tensor([1.0, 2.0]))  # every study: SDH logit 1, EDH logit 2
    ck = dict(probe_args=dict(kind="attentive_mil", dim=16, n_out=2, hidden=8, dropout=0.0), task="classify",
              label_names=names, modality="all", encoder_hash="random:test", windows=None,
              models=[sd], n_train_pos=[3.0, 3.0],
              thresholds=[100.0, -100.0], platt_a=[1.0, 1.0], platt_b=[0.0, 0.0],
              # SDH: both positives above both negatives -> precision 1 at cut -100 (every study flagged);
              # EDH: positives below all three negatives -> precision at most 0.4 (never flagged)
              sel_labels=torch.tensor([[1, 0], [1, 0], [0, 0], [0, 1], [0, 1]], dtype=torch.uint8),
              sel_logits=torch.tensor([[-99.0, 5], [-100, 4], [-200, 3], [-300, -1], [-300, -2]]))
    torch.save(ck, tmp_path / "probe.pt")
    common = base + ["--max_iters=3", "--init_from=resume", "--eval_only=True", "--reuse_reports=True",
                     f"--probe={tmp_path / 'probe.pt'}"]
    flagged = {}
    for rule in ("precision", "youden"):
        r = subprocess.run(common + [f"--probe_rule={rule}"], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(l) for l in open(tmp_path / "run" / "reports_probe.jsonl")]
        assert len(rows) == 3
        flagged[rule] = [{d for f in r["findings"] for d, _ in extract_diagnoses(f)} for r in rows]
        if rule == "precision":
            assert "1 classes reach precision 0.5" in r.stdout and "acute_subdural_hematoma" in r.stdout
            assert all("epidural_hematoma" not in x["probe_missed"] for x in rows)
    assert all("acute_subdural_hematoma" in f for f in flagged["precision"])
    assert all("epidural_hematoma" in f for f in flagged["youden"])
    r = subprocess.run(common + ["--probe_rule=best"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--probe_rule must be reports, precision or youden" in r.stderr
    # the reports rule fits on val studies only, never on test: with the three test studies alone it is refused
    r = subprocess.run(common + ["--probe_rule=reports"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "--probe_rule=reports" in r.stderr and "include none" in r.stderr
    # so the same three studies relabelled val (a findings copy; scored from the saved reports, not resumed).
    # On reports that name nothing: SDH is true in 2 of the 3 studies (k009, k010), so on
    # all three the cut at logit 1 is right 2/3 >= 0.5 of the time; cross-fitted, no study's other two
    # hold both a positive and a negative (k011's hold only positives), so nothing is appended
    path = tmp_path / "run" / "reports.jsonl"
    rows = [dict(json.loads(l), findings=[]) for l in open(path)]
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    fnd = next(c.split("=", 1)[1] for c in base if c.startswith("--findings="))
    as_val = tmp_path / "findings_val.jsonl"
    as_val.write_text("".join(json.dumps(dict(x, split="val" if x["split"] == "test" else x["split"])) + "\n"
                              for x in map(json.loads, open(fnd))))
    on_val = [c for c in common if not c.startswith(("--findings=", "--init_from="))] + [f"--findings={as_val}"]
    for target, fit in ((0.5, {"acute_subdural_hematoma": 1.0}), (0.7, {})):
        r = subprocess.run(on_val + ["--probe_rule=reports", f"--probe_precision={target}"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"probe cross-check: {len(fit)} urgent diagnoses reach precision {target}" in r.stdout
        assert json.load(open(tmp_path / "run" / "metrics.json"))["probe_cross_check_thresholds"] == pytest.approx(fit, rel=1e-4)
        assert all(x["probe_missed"] == [] for x in map(json.loads, open(tmp_path / "run" / "reports_probe.jsonl")))
    del ck["sel_logits"]
    torch.save(ck, tmp_path / "probe.pt")
    r = subprocess.run(common + ["--probe_rule=precision"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "holds no selection-split scores" in r.stderr


def test_train_llava_bad_findings_path(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_llava.py"), f"--findings={tmp_path}/nope.jsonl",
                        f"--out_dir={tmp_path}/out"],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "nope.jsonl" in r.stderr and not os.path.exists(tmp_path / "out")


@pytest.mark.skipif(os.environ.get("NVFM_SLOW_TESTS") != "1",
                    reason="two torchrun ranks take ~40 s of CPU; set NVFM_SLOW_TESTS=1 to run")
def test_train_llava_fsdp_two_ranks_on_cpu(tmp_path, lm_dir):
    """torchrun --nproc_per_node=2 with FSDP2 (fully_shard) over gloo: trains, saves an unsharded LM and
    connector that load back, and rank 0 decodes the eval split."""
    fnd, feat = _synthetic_cohort(str(tmp_path))
    out = str(tmp_path / "fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train_llava.py"), "config/llava_tiny.py", f"--features={feat}",
           f"--findings={fnd}", f"--out_dir={out}", f"--llm={lm_dir}", "--batch_size=2", "--max_iters=3",
           "--fsdp=True", "--max_new_tokens=8", "--log_interval=1"]
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    r = _run(cmd, env, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["iter_num"] == 3 and "optimizer" not in ck
    assert all(not hasattr(v, "placements") for v in ck["connector"].values())  # plain tensors, not DTensors
    model, tok = load_llm(os.path.join(out, "llm"))
    gen = llava.ReportGenerator(model, tok, 16, 64, 2, 4, ck["config"]["n_latents"])
    gen.connector.load_state_dict(ck["connector"])
    base, _ = load_llm(lm_dir)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert json.load(open(os.path.join(out, "metrics.json")))["n_eval"] == 3


def test_probe_diagnosis_scores_drops_untrained_classes():
    """Classes the probe never learned (no training positives, or only positives: left out of its loss)
    never reach the cross-check; probe.untrained_classes reads them from a probe.pt, old ones included."""
    from nvfm import probe as P
    names = ["acute_subdural_hematoma", "epidural_hematoma", "lesion_left", "meningioma"]
    ck = {"label_names": names, "n_train_pos": [4, 0, 3, 2]}                    # an older probe: positives only
    trained = list(~P.untrained_classes(ck))
    sc, th = llava.probe_diagnosis_scores(names, [2.0, 3.0, 9.0, -1.0], [0.1, 0.0, 0.0, 0.5], trained)
    assert sc == {"acute_subdural_hematoma": 2.0, "meningioma": -1.0}  # untrained + non-diagnosis dropped
    assert th == {"acute_subdural_hematoma": 0.1, "meningioma": 0.5}
    f, missed = llava.cross_check([], sc, th)
    assert missed == ["acute_subdural_hematoma"]  # the untrained epidural logit 3.0 >= 0 is not appended
    # meningioma positive in every training study: never learned either, though it has positives
    trained = list(~P.untrained_classes(dict(ck, trained_classes=[True, False, True, False])))
    sc, _ = llava.probe_diagnosis_scores(names, [2.0, 3.0, 9.0, -1.0], [0.1, 0.0, 0.0, 0.5], trained)
    assert sc == {"acute_subdural_hematoma": 2.0}
    sc, _ = llava.probe_diagnosis_scores(names, [2.0, 3.0, 9.0, -1.0], [0, 0, 0, 0])  # no flags: every class
    assert set(sc) == {"acute_subdural_hematoma", "epidural_hematoma", "meningioma"}
    sc, _ = llava.probe_diagnosis_scores(names, [2.0, 3.0, 9.0, -1.0], [0.1, 0, 0, 0.5], [True, False, True, True],
                                         fitted=[False, True, True, True])
    assert sc == {"meningioma": -1.0}  # threshold not fitted on the selection split: not used
    with pytest.raises(ValueError, match="3 logits"):
        llava.probe_diagnosis_scores(names, [1, 2, 3], [0] * 4)


def test_fit_cross_check_thresholds_is_precision_among_omitting_reports():
    """The cut is fitted on the studies whose report omits the diagnosis (what the cross-check can
    append), not on all of them: the reported true positives would make the probe look precise."""
    from nvfm import metrics
    EDH = "Biconvex extra-axial hematoma along the left temporal convexity, consistent with epidural hematoma."
    omit = [(0.9, 1), (0.8, 0), (0.7, 1), (0.6, 0), (0.5, 0), (0.4, 1)]  # (SDH score, SDH true) omitted
    reports = [[MEN]] * 6 + [[SDH, EDH]] * 3                           # 3 more that name SDH and EDH
    scores = [{"acute_subdural_hematoma": s, "meningioma": s, "epidural_hematoma": s} for s, _ in omit]
    scores += [{"acute_subdural_hematoma": 0.95, "meningioma": 0.1, "epidural_hematoma": 0.95}] * 3
    truths = [{"findings": [SDH] if y else []} for _, y in omit] + [{"findings": [SDH, EDH]}] * 3
    th = llava.fit_cross_check_thresholds(reports, scores, truths, target=0.6)
    assert set(th) == {"acute_subdural_hematoma", "epidural_hematoma"}  # urgent only
    assert th["acute_subdural_hematoma"] == 0.7                           # 2 of the 3 omitted calls >= 0.7 true
    assert th["epidural_hematoma"] == float("inf")                        # never omitted: nothing to fit
    # on all studies (the probe's own precision) the same target admits every study, down to 0.4
    y = np.array([[y] for _, y in omit] + [[1]] * 3)
    s = np.array([[sc["acute_subdural_hematoma"]] for sc in scores])
    assert metrics.precision_thresholds(y, s, 0.6)[0] == 0.4
    assert llava.fit_cross_check_thresholds(reports, scores, truths, target=0.5)["acute_subdural_hematoma"] == 0.4
    assert llava.fit_cross_check_thresholds(reports, scores, truths, target=0.9)["acute_subdural_hematoma"] == np.inf
    th = llava.fit_cross_check_thresholds(reports, scores, truths, target=0.6, urgent_only=False)
    assert th["meningioma"] == np.inf                                     # routine, kept; no study has it true
    f, missed = llava.cross_check([MEN], {"acute_subdural_hematoma": 0.75}, {"acute_subdural_hematoma": 0.7})
    assert missed == ["acute_subdural_hematoma"]
    with pytest.raises(ValueError, match="8 truths"):
        llava.fit_cross_check_thresholds(reports, scores, truths[:8])


@pytest.mark.parametrize("auroc", [0.6, 0.999])
def test_bench_cross_check_rules_on_a_simulated_probe(auroc):
    """`bench_llava.py cross_check` on reports that omit every SDH: a near-perfect simulated probe lets the
    reports rule restore the omitted SDHs, false ones within its precision target; with a weak one
    Youden's cut appends more than twice as many findings, more of them false."""
    from conftest import load_bench
    from nvfm.report_metrics import evaluate_report_lists
    bench = load_bench("bench_llava")
    recs = {}
    for i in range(160):
        fnd = ["Acute left convexity subdural hematoma."] if i % 2 else []
        recs[f"k{i:03d}"] = {"study_key": f"k{i:03d}", "split": "train" if i < 40 else "test", "modality": "CT",
                             "findings": fnd, "lesions": [], "triage": "urgent" if fnd else "unremarkable"}
    assert bench.probe_classes(recs) == {"CT": ["acute_subdural_hematoma"]}
    rows = [{"study_key": k, "findings": []} for k, r in recs.items() if r["split"] == "test"]
    truths = [recs[r["study_key"]] for r in rows]
    scores = bench.simulate_scores(rows, recs, bench.probe_classes(recs), auroc, seed=0)
    folds = [i % 5 for i in range(len(rows))]
    res = {}
    for rule in ("youden", "reports"):
        hyps, added = bench.cross_checked(rule, rows, recs, scores, folds, 0.8)
        res[rule] = evaluate_report_lists(hyps, truths), added
    off = evaluate_report_lists([r["findings"] for r in rows], truths)
    assert off["urgent_omission_rate"] == 1.0
    if auroc > 0.9:
        m, added = res["reports"]
        # every omitted SDH restored; the cut is the most sensitive one still right 0.8 of the time
        assert m["urgent_omission_rate"] < 0.05 and 0.1 < m["hallucination_rate"] <= 0.25 and 60 <= added <= 80
    else:
        (my, ay), (mr, ar) = res["youden"], res["reports"]
        assert ay > 2 * ar and my["hallucination_rate"] > mr["hallucination_rate"]


def test_train_llava_stage1_phase_then_stage2(tmp_path, lm_dir):
    """--stage1_iters: connector-only iterations with the LM frozen (saved LM == the base LM), then
    stage 2 trains the LM on resume; val-split losses go to log.jsonl; --eval_split takes a list."""
    from safetensors.torch import load_file
    fnd, feat = _synthetic_cohort(str(tmp_path))
    rows = [json.loads(l) for l in open(fnd)]
    for r in rows[:2]:
        r["split"] = "val"
    with open(fnd, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = str(tmp_path / "run")
    base = [sys.executable, os.path.join(ROOT, "train_llava.py"), "config/llava_tiny.py", f"--features={feat}",
            f"--findings={fnd}", f"--out_dir={out}", f"--llm={lm_dir}", "--batch_size=3", "--stage1_iters=2",
            "--eval_interval=2", "--max_new_tokens=8", "--log_interval=1", "--eval_split=val,test"]
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1")
    r = subprocess.run(base + ["--max_iters=0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "after 2 stage-1 iterations" in r.stdout
    w0 = load_file(os.path.join(lm_dir, "model.safetensors"))
    w1 = load_file(os.path.join(out, "llm", "model.safetensors"))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # frozen in the stage-1 phase
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["iter_num"] == 2 and ck["stage1_iters"] == 2
    assert json.load(open(os.path.join(out, "metrics.json")))["n_eval"] == 5  # 2 val + 3 test
    r = subprocess.run(base + ["--max_iters=2", "--init_from=resume"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [x["stage"] for x in log if "loss" in x] == [1, 1, 2, 2]
    vals = [x for x in log if "val_loss" in x]
    assert [x["iter"] for x in vals] == [1, 3] and all(np.isfinite(x["val_loss"]) for x in vals)
    w2 = load_file(os.path.join(out, "llm", "model.safetensors"))
    assert not all(torch.equal(w0[k], w2[k]) for k in w0)  # stage 2 trains the LM


def test_batch_mixing_studies_with_and_without_images(lm):
    """image_dropout (train_llava.py) trains batches where some studies have no images: the batch
    loss is the token-weighted mean of the per-study losses, so each study's images only reach
    its own answer, and a study without images scores like the text-only prompt."""
    model, tok = lm
    torch.manual_seed(5)
    gen = llava.ReportGenerator(model, tok, enc_dim=16, dim=32, depth=1, heads=4, n_latents=4).eval()
    s = _studies()
    inds, fnds = ["headache", "fall"], [[SDH], ["Mild generalized cerebral volume loss."]]
    with torch.no_grad():
        mixed = gen([s[0], []], inds, fnds)
        l0, l1 = gen([s[0]], inds[:1], fnds[:1]), gen([[]], inds[1:], fnds[1:])
        n = [sum(t != llava.IGNORE for t in gen.prompts.build([], i, f)["labels"]) for i, f in zip(inds, fnds)]
        torch.testing.assert_close(mixed, (l0 * n[0] + l1 * n[1]) / sum(n), rtol=1e-4, atol=1e-5)
        flipped = _studies()
        flipped[0][0]["emb"] = flipped[0][0]["emb"] * -1
        assert not torch.equal(gen([flipped[0], []], inds, fnds), mixed)  # the images are used


def test_demo_recipe_reads_a_planted_class_out_of_the_images():
    """Positive control of the connector with the demo recipe (config/llava_tiny.py: connector
    size, learning rates, batch size, the tiny LM), through `bench/bench_llava.py read`'s read_check():
    every study has the same indication and one of three answers, planted only in the images (10%
    of a series' 200 tokens shifted by sqrt(dim) along a class direction). After 120 iterations
    (no image dropout) the model must answer new studies correctly, which the indication alone
    cannot do (chance = 1/3). A connector learning rate of 3e-3 fails this at chance:
    the connector's output stays class-separable but drifts faster than the LM learns to read it
    (BENCHMARKS.md, Report generator, "Why the tiny recipe is what it is")."""
    from conftest import load_bench
    from nvfm.configurator import read_config_file
    cfg = read_config_file(os.path.join(ROOT, "config", "llava_tiny.py"))[1]
    bench = load_bench("bench_llava")
    acc, nc_acc, _, _ = bench.read_check(cfg, cfg["lr"], 0.0, iters=120, seed=0, n_tok=200, n_new=30)
    assert nc_acc >= 0.9  # the connector keeps the classes apart ...
    assert acc >= 0.8, acc  # ... and the LM reads them


def test_sampling_weights_inverse_prevalence_of_the_rarest_label():
    sets = [{"a"}, {"a"}, {"a", "b"}, {"b", "c"}, set(), set(), set(), set()]  # a 3, b 2, c 1, unremarkable 4
    w = llava.sampling_weights(sets)
    torch.testing.assert_close(w, torch.tensor([8 / 3, 8 / 3, 8 / 2, 8 / 1, 2, 2, 2, 2], dtype=torch.float64))
    assert w[4:].sum() == 8  # the unremarkable pseudo-label gets one label's share (n), not its half of the studies
    torch.testing.assert_close(llava.sampling_weights(sets, 0.5), w.sqrt())
    assert llava.sampling_weights(sets, 0.0).tolist() == [1.0] * 8


def test_keep_tokens_is_a_fresh_ordered_subset_with_its_coords():
    g = torch.Generator().manual_seed(0)
    n = 50
    e = dict(emb=torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4),
             coords=np.stack([np.arange(n)] * 3, 1), family="T1", window="mr")
    a, b = llava.keep_tokens(e, 0.3, g), llava.keep_tokens(e, 0.3, g)
    assert len(a["emb"]) == len(a["coords"]) == 15 and a["family"] == "T1"
    rows = a["emb"][:, 0].long().numpy()
    assert (np.diff(rows) > 0).all() and (a["coords"][:, 0] == rows).all()  # tokens keep their coords and order
    assert not torch.equal(a["emb"], b["emb"])  # a new subset each draw
    assert len(llava.keep_tokens(e, 0.001, g)["emb"]) == 1 and llava.keep_tokens(e, 1.0, g) is e


def test_anatomical_positions_agree_across_stored_orientations():
    """The same physical tokens stored axially ("IPR") and sagittally ("RIP") get the same
    (right, anterior, superior) positions; with no orientation the grid axes are used as stored."""
    rng = np.random.default_rng(0)
    ras = rng.integers(0, 9, (40, 3))  # physical (r, a, s) cells; bounding box forced to the full 0..8
    ras[0], ras[1] = 0, 8
    r, a, s = ras.T
    ipr = np.stack([8 - s, 8 - a, r], 1)  # axis 0 toward inferior, 1 posterior, 2 right
    rip = np.stack([r, 8 - s, 8 - a], 1)
    p1, p2 = llava.anatomical_positions(ipr, "IPR"), llava.anatomical_positions(rip, "RIP")
    np.testing.assert_allclose(p1, p2)
    np.testing.assert_allclose(p1, (ras - 4) / 4.0)  # [-1, 1], 0 at the middle of the box
    np.testing.assert_allclose(llava.anatomical_positions(ipr, None), (ipr - 4) / 4.0)
    np.testing.assert_allclose(llava.anatomical_positions(ipr, "RRP"), (ipr - 4) / 4.0)  # unreadable codes


def test_token_positions_let_the_perceiver_tell_left_from_right():
    """Without positions the perceiver is a function of the bag of tokens: mirroring the tokens'
    positions changes nothing. With hemisphere latents it changes the latents, and packing passes
    each series' own positions (packed == one series at a time)."""
    torch.manual_seed(0)
    tok = torch.randn(30, 16)
    coords = np.stack(np.meshgrid(np.arange(3), np.arange(2), np.arange(5), indexing="ij"), -1).reshape(-1, 3)
    mirrored = coords * [1, 1, -1] + [0, 0, 4]
    cu = torch.tensor([0, 30], dtype=torch.int32)
    st = torch.zeros(1, dtype=torch.long)
    pos = lambda c: torch.from_numpy(llava.anatomical_positions(c, "IPR"))
    plain = llava.PerceiverResampler(16, 32, 1, 4, n_latents=2)
    torch.testing.assert_close(plain(tok, cu, 30, st), plain(tok.flip(0), cu, 30, st))
    with_pos = llava.PerceiverResampler(16, 32, 1, 4, n_latents=2, hemispheres=True)
    a, b = with_pos(tok, cu, 30, st, pos(coords)), with_pos(tok, cu, 30, st, pos(mirrored))
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="pos"):
        with_pos(tok, cu, 30, st)
    studies = [[dict(family="T1", emb=tok, coords=coords, orientation="IPR")],
               [dict(family="T2", emb=tok[:12], coords=mirrored[:12], orientation="IPR")]]
    t, cu2, mx, ty, _, p = llava.pack_series(studies, with_pos=True)
    packed = with_pos(t, cu2, mx, ty, p)
    one = []
    for s in studies:
        t1, c1, m1, y1, _, p1 = llava.pack_series([s], with_pos=True)
        one.append(with_pos(t1, c1, m1, y1, p1))
    torch.testing.assert_close(packed, torch.cat(one), atol=1e-5, rtol=1e-4)


def test_hemisphere_latents_read_only_their_side():
    """hemispheres: the first half of a series' latents depends only on its left tokens (and
    midline ones), the second half only on its right ones; packed == one series at a time."""
    torch.manual_seed(0)
    p = llava.PerceiverResampler(8, 16, 2, 2, n_latents=4, hemispheres=True)
    tok = torch.randn(12, 8)
    right = torch.tensor([-1, -.5, 0, .5, 1, 1, -1, -1, .2, .3, -.3, .4])
    pos = torch.stack([right, torch.zeros(12), torch.zeros(12)], 1)
    cu, st = torch.tensor([0, 6, 12], dtype=torch.int32), torch.zeros(2, dtype=torch.long)
    base = p(tok, cu, 6, st, pos).view(2, 2, 2, -1)  # series, side, latent, dim
    bumped = tok.clone()
    bumped[0] += 5  # a left token of series 0
    out = p(bumped, cu, 6, st, pos).view(2, 2, 2, -1)
    assert (out[0, 0] - base[0, 0]).abs().max() > 1e-3
    torch.testing.assert_close(out[0, 1], base[0, 1])  # right latents and series 1 untouched
    torch.testing.assert_close(out[1], base[1])
    one = p(tok[6:], torch.tensor([0, 6], dtype=torch.int32), 6, st[:1], pos[6:]).view(2, 2, -1)
    torch.testing.assert_close(one, base[1], atol=1e-5, rtol=1e-4)
    midline = bumped.clone()
    midline[2] += 5  # right == 0: both sides see it
    out2 = p(midline, cu, 6, st, pos).view(2, 2, 2, -1)
    assert (out2[0, 0] - out[0, 0]).abs().max() > 1e-3 and (out2[0, 1] - out[0, 1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="even"):
        llava.PerceiverResampler(8, 16, 1, 2, n_latents=3, hemispheres=True)


def test_hemisphere_latents_read_which_side_a_planted_lesion_is_on():
    """bench_llava.py read --task=side, small: the answer (left lesion / right lesion / none) is where
    10% of the tokens are shifted. A bag-of-tokens perceiver can tell lesion from none but not the
    side (2/3 at best; 0.667 in the bench with and without additive position features); the
    hemisphere latents read the side (BENCHMARKS.md, Report generator, "Side": seeds 0 and 1 by 240 iterations,
    seed 2 by 480; this is seed 0)."""
    from conftest import load_bench
    from nvfm.configurator import read_config_file
    cfg = read_config_file(os.path.join(ROOT, "config", "llava_tiny.py"))[1]
    bench = load_bench("bench_llava")
    acc, nc_acc, _, _ = bench.read_check(cfg, cfg["lr"], 0.0, iters=240, seed=0, n_tok=200, n_new=60, task="side",
                                          hemispheres=True)
    assert nc_acc >= 0.9 and acc >= 0.8, (acc, nc_acc)
