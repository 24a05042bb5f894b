"""The Vol-JEPA step as train_jepa.py wires it, on a real loader batch, against a brute force that runs
every volume alone: each target's prediction and teacher target, the loss (smooth L1 over target
tokens only), its gradients, and that no target token reaches the student or the predictor."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nvfm import masks as M
from nvfm.loader import JepaBatches, synthetic_reader
from nvfm.model import Encoder, EncoderConfig, Predictor, PredictorConfig, normalize_tokens


@pytest.fixture(scope="module")
def setup():
    reader = synthetic_reader(n=6, seed=1, shape=(30, 150, 140))  # partial patches on every axis
    b = JepaBatches(reader, range(6), global_batch=4, seed=3, mask_config=M.MaskConfig(max_patches=5))[2]
    torch.manual_seed(0)
    cfg = EncoderConfig.preset("tiny")
    student, teacher = Encoder(cfg), Encoder(cfg)
    teacher.load_state_dict(student.state_dict())
    predictor = Predictor(PredictorConfig(enc_dim=cfg.dim, dim=64, depth=2, heads=2, pos_dim=cfg.pos_dim))
    return b, student, predictor, teacher


def packed_step(b, x, student, predictor, teacher):
    """train_jepa.py's forward: teacher on all tokens, parameter-free LayerNorm, targets at
    tgt_index; student on ctx_index; predictor on collate's layout; smooth L1 mean over targets."""
    ctx, tgt, coords = b["ctx_index"], b["tgt_index"], b["coords"]
    with torch.no_grad():
        h = teacher(x, coords, b["cu_seqlens"], b["max_seqlen"])
        target = F.layer_norm(h, (h.shape[-1],))[tgt]
    z = student(x[ctx], coords[ctx], b["cu_ctx"], b["max_ctx"])
    pred = predictor(z, coords[ctx], coords[tgt], (b["pred_ctx_pos"], b["pred_tgt_pos"], b["pred_cu"], b["pred_max"]))
    loss = F.smooth_l1_loss(pred, target, reduction="sum", beta=1.0) / target.shape[-1] / tgt.numel()
    return pred, target, z, loss


def one_volume(k, b, x, student, predictor, teacher):
    """Volume k alone: (prediction, target) rows of its target tokens, in tgt_index order."""
    s, e = int(b["cu_seqlens"][k]), int(b["cu_seqlens"][k + 1])
    ci = b["ctx_index"][b["cu_ctx"][k]:b["cu_ctx"][k + 1]] - s
    ti = b["tgt_index"][b["cu_tgt"][k]:b["cu_tgt"][k + 1]] - s
    xs, cs = x[s:e], b["coords"][s:e]
    with torch.no_grad():
        h = teacher(xs, cs, torch.tensor([0, e - s], dtype=torch.int32), e - s)
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    z = student(xs[ci], cs[ci], torch.tensor([0, len(ci)], dtype=torch.int32), len(ci))
    nc, nt = len(ci), len(ti)  # the predictor's sequence: [context, mask tokens]
    layout = (torch.arange(nc), torch.arange(nc, nc + nt), torch.tensor([0, nc + nt], dtype=torch.int32), nc + nt)
    return predictor(z, cs[ci], cs[ti], layout), h[ti]


def test_every_target_is_predicted_and_scored_against_its_own_token(setup):
    b, student, predictor, teacher = setup
    x = normalize_tokens(b["tokens"], b["window"])
    pred, target, _, loss = packed_step(b, x, student, predictor, teacher)
    B = len(b["cu_seqlens"]) - 1
    per_token = []
    for k in range(B):
        p, t = one_volume(k, b, x, student, predictor, teacher)
        rows = slice(int(b["cu_tgt"][k]), int(b["cu_tgt"][k + 1]))
        torch.testing.assert_close(pred[rows], p, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(target[rows], t, atol=1e-5, rtol=1e-4)
        d = (p - t).abs()
        per_token.append(torch.where(d < 1, 0.5 * d * d, d - 0.5).mean(-1))  # smooth L1, beta 1, by hand
    per_token = torch.cat(per_token)
    assert len(per_token) == len(b["tgt_index"])  # every target scored once, nothing else
    torch.testing.assert_close(loss, per_token.mean(), atol=1e-6, rtol=1e-5)
    # the gradients of the packed loss are those of the mean over all volumes' target tokens
    params = list(student.parameters()) + list(predictor.parameters())
    g_packed = torch.autograd.grad(loss, params)
    brute = sum(F.smooth_l1_loss(*one_volume(k, b, x, student, predictor, teacher), reduction="sum") for k in range(B))
    g_brute = torch.autograd.grad(brute / target.numel(), params)
    for a, c in zip(g_packed, g_brute):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-4)


def test_no_target_token_reaches_the_student_or_the_predictor(setup):
    b, student, predictor, teacher = setup
    x = normalize_tokens(b["tokens"], b["window"])
    with torch.no_grad():
        pred, target, z, _ = packed_step(b, x, student, predictor, teacher)
        noisy = x.clone()
        noisy[b["tgt_index"]] = 5 * torch.randn_like(noisy[b["tgt_index"]])
        pred2, target2, z2, _ = packed_step(b, noisy, student, predictor, teacher)
        assert torch.equal(z2, z) and torch.equal(pred2, pred)
        assert not torch.allclose(target2, target)  # the teacher does see them
        # the context does reach the predictor (the check above can fail)
        moved = x.clone()
        moved[b["ctx_index"]] += 1.0
        assert not torch.allclose(packed_step(b, moved, student, predictor, teacher)[0], pred)
        # nothing crosses volumes: rewriting volume 0 leaves every other volume's rows as they were
        s1 = int(b["cu_seqlens"][1])
        other = x.clone()
        other[:s1] = torch.randn_like(other[:s1])
        pred3, target3, _, _ = packed_step(b, other, student, predictor, teacher)
        t1 = int(b["cu_tgt"][1])
        assert torch.equal(pred3[t1:], pred[t1:]) and torch.equal(target3[t1:], target[t1:])
        assert not torch.allclose(pred3[:t1], pred[:t1])


# ---------------------------------------------------------------------------------------
# train_jepa.py stopped (SIGTERM: checkpoint at once; SIGKILL: the last periodic checkpoint) and
# resumed, against the uninterrupted run. The signal is sent by the run itself while the loader
# makes a chosen step's batch (num_workers=0: in the training process), so the step is exact.

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train_jepa.py")
JOB = ["config/jepa_tiny.py", "--global_batch=2", "--max_steps=10", "--num_workers=0", "--log_interval=3",
       "--ckpt_interval=4", "--predictor_depth=1", "--collapse_warn=100"]  # warn at the first log after step 1
SIGNAL_AT = """import os, runpy, signal, sys
import nvfm.loader as L
at, sig, get = int(sys.argv[1]), getattr(signal, sys.argv[2]), L.JepaBatches.__getitem__
def getitem(self, s):
    if s == at:  # batch `at` is made after step `at` is done, before step at + 1
        os.kill(os.getpid(), sig)
    return get(self, s)
L.JepaBatches.__getitem__ = getitem
sys.argv = sys.argv[3:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def train(out, shards, *extra, signal_at=None):
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    pre = ["-c", SIGNAL_AT, *map(str, signal_at)] if signal_at else []
    cmd = [sys.executable, *pre, TRAIN, *JOB, f"--shards={shards}", f"--out_dir={out}", *extra]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if signal_at and signal_at[1] == "SIGKILL":
        assert p.returncode == -9, p.stderr[-2000:]
    else:
        assert p.returncode == 0, f"{' '.join(cmd)}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
    return p.stdout


def log_of(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "loss" in r]


def ckpt_of(out):
    from nvfm.checkpoint import load_checkpoint
    return load_checkpoint(os.path.join(out, "ckpt.pt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """full: uninterrupted; kill: SIGKILL after step 6 (checkpoint 4), resumed; term: SIGTERM
    during step 5 (stops after it), then resumed with --stop_at_step=5 (already there), then to the end."""
    from nvfm.loader import write_synthetic_shards
    tmp = tmp_path_factory.mktemp("resume")
    shards = write_synthetic_shards(str(tmp / "shards"), n=4, seed=1, shape=(16, 64, 64))
    r = {k: str(tmp / k) for k in ("full", "kill", "term")}
    r["full_stdout"] = train(r["full"], shards)
    train(r["kill"], shards, signal_at=(6, "SIGKILL"))
    r["kill_ckpt_step"], r["kill_log_at_kill"] = ckpt_of(r["kill"])["step"], log_of(r["kill"])
    with open(os.path.join(r["kill"], "log.jsonl"), "a") as f:   # a kill in the middle of writing a record
        f.write('{"step": 7, "loss": 0.3')
    train(r["kill"], shards, "--init_from=resume")
    out = train(r["term"], shards, signal_at=(4, "SIGTERM"))
    r["term_ckpt_step"], r["term_log_at_stop"] = ckpt_of(r["term"])["step"], log_of(r["term"])
    out += train(r["term"], shards, "--init_from=resume", "--stop_at_step=5")
    r["term_step_after_noop"] = ckpt_of(r["term"])["step"]
    r["term_stdout"] = out + train(r["term"], shards, "--init_from=resume")
    return r


def test_killed_and_stopped_runs_resume_to_the_uninterrupted_weights(runs):
    """SIGKILL after step 6 resumes from checkpoint 4, SIGTERM stops after step 5 with a checkpoint:
    both end with the uninterrupted run's student, predictor, teacher, optimizer and torch RNG state to the bit,
    and the exported encoder.safetensors / student.safetensors load strictly as that teacher / student."""
    from nvfm.model import load_encoder
    assert runs["kill_ckpt_step"] == 4 and runs["term_ckpt_step"] == 5
    a = ckpt_of(runs["full"])
    for name in ("kill", "term"):
        b = ckpt_of(runs[name])
        assert b["step"] == a["step"] == 10
        for part in ("student", "predictor", "teacher", "pos_predictor"):
            assert a[part].keys() == b[part].keys()
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (name, part, k)
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]), name  # the loader drew a seed from it on resume
        for i, st in a["optimizer"]["state"].items():
            for k, v in st.items():
                assert torch.equal(v, b["optimizer"]["state"][i][k]), (name, i, k)
        for file, part in (("encoder", "teacher"), ("student", "student")):
            enc = load_encoder(os.path.join(runs[name], f"{file}.safetensors"))
            state = enc.state_dict()
            assert state.keys() == a[part].keys()
            assert all(torch.equal(state[k], a[part][k]) for k in state), (name, file)


def test_a_hard_killed_run_resumes_to_the_uninterrupted_log(runs):
    """After SIGKILL at step 6 with checkpoint 4, the resumed log.jsonl has each step's record once,
    with the uninterrupted run's losses: before the fix it held step 6 twice, and its step-6 record
    averaged steps 5-6 where the uninterrupted one averages 4-6 (steps 2-3 ... lost). A record the
    kill cut in half is dropped, not a crash of the resume."""
    assert runs["kill_log_at_kill"][-1][0] == 6 > runs["kill_ckpt_step"]  # the kill left records past the checkpoint
    assert log_of(runs["kill"]) == log_of(runs["full"])


def test_a_signal_stop_logs_its_last_step(runs):
    """SIGTERM during step 5 (log interval 3): the stop's checkpoint is step 5, and steps 4-5 must
    be in a record (the README: every step counted in a log) - the last record is step 5."""
    assert runs["term_ckpt_step"] == 5
    assert runs["term_log_at_stop"][-1][0] == 5, runs["term_log_at_stop"]


def test_resume_at_its_stop_at_step_trains_nothing(runs):
    """A job-slot script that reruns the same --stop_at_step=5 on a run already at step 5 must not
    train step 6 (before the fix: checkpoint at 6)."""
    assert runs["term_step_after_noop"] == 5


def test_the_collapse_warning_is_not_repeated_by_a_resume(runs):
    """--collapse_warn=100: every rank after step 1 is 'low', so the uninterrupted run warns once (at
    step 3, its first log after step 1); the stopped and resumed run must warn once too."""
    warn = "WARNING: representation collapse"
    assert runs["full_stdout"].count(warn) == 1
    assert runs["term_stdout"].count(warn) == 1


def test_a_stop_signal_seen_by_one_ddp_rank_stops_every_rank_at_one_step(tmp_path):
    """torchrun, 2 gloo ranks; SIGTERM reaches rank 1 only, while it makes batch 4. Before the fix
    rank 1 stopped after step 5 alone and rank 0 met it in mismatched collectives (a crash or a hang,
    no checkpoint of step 5). Now both stop after step 5: exit 0, the checkpoint and the last log
    record are step 5."""
    import signal

    from nvfm.loader import write_synthetic_shards
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=4, seed=1, shape=(16, 64, 64))
    wrapper = tmp_path / "signal_rank1.py"
    wrapper.write_text(SIGNAL_AT.replace("if s == at:", "if s == at and os.environ['RANK'] == '1':"))
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper), "4",
           "SIGTERM", TRAIN, *JOB, f"--shards={shards}", f"--out_dir={out}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=180)
    except subprocess.TimeoutExpired:   # a hang (the bug): the ranks go with torchrun, none left behind
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
    assert p.returncode == 0, f"{stdout[-2000:]}\n{stderr[-3000:]}"
    assert "stop requested: checkpoint at step 5" in stdout
    assert ckpt_of(out)["step"] == 5 and log_of(out)[-1][0] == 5


# ---------------------------------------------------------------------------------------
# start-up: volumes no training crop can serve

def sparse_volume(volume_id, shape=(16, 64, 64)):
    """An MR volume whose foreground tokens sit at even grid coords only (8 tokens on a 4x4x4 grid):
    every 2-token crop holds exactly one of them."""
    from nvfm.loader import synthetic_volume
    rec, data, _ = synthetic_volume(np.random.default_rng(5), "MR", shape, volume_id)
    tm = np.zeros(tuple(s // p for s, p in zip(shape, (4, 16, 16))), np.uint8)
    tm[::2, ::2, ::2] = 1
    mask = np.kron(tm, np.ones((4, 16, 16), np.uint8))
    return rec, data * mask, mask


def test_volumes_no_crop_can_serve_are_left_out_before_training(tmp_path):
    """A volume with 8 foreground tokens (min_tokens 8) none of which shares a 2-token crop with another
    (--max_patches=2) raised in the loader mid-run: exit 2, a traceback, no checkpoint. It is left out at
    start with a one-line warning naming it by index and id, and the run trains on the rest; a shard set
    of only such volumes is a one-line error and exit 1, before out_dir is made."""
    from nvfm.loader import synthetic_volume, write_shards
    rng = np.random.default_rng(0)
    items = [synthetic_volume(rng, "MR" if i % 2 == 0 else "CT", (16, 64, 64), f"synthetic-{i}") for i in range(3)]
    mixed = write_shards(str(tmp_path / "mixed"), items + [sparse_volume("sparse-0")])
    out = train(str(tmp_path / "run"), mixed, "--max_patches=2", "--max_steps=3")
    warned = [line for line in out.splitlines() if "left out of training" in line]
    assert warned == ["warning: volume 0 (sparse-0) left out of training: no crop of <= 2 tokens per axis "
                      "holds 2 of its 8 foreground tokens"], out[-2000:]
    assert ckpt_of(str(tmp_path / "run"))["step"] == 3
    only = write_shards(str(tmp_path / "only"), [sparse_volume("sparse-0")])
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, TRAIN, *JOB, f"--shards={only}", f"--out_dir={tmp_path / 'none'}",
                        "--max_patches=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    err = p.stderr.strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1, (p.returncode, p.stderr[-2000:])
    assert "no 'train' volume" in err and "crop of <= 2 tokens" in err and not (tmp_path / "none").exists()


def test_a_run_from_scratch_in_a_used_out_dir_starts_its_own_log(tmp_path):
    """A second run from scratch into the out_dir of a first (a job script without --init_from=resume)
    appended its records to the first run's log.jsonl (steps 1, 2, 3, 1, 2: a curve read from it
    counted every step twice) and replaced the checkpoint without a word. Now it warns, and its log
    is the one the same run writes into a fresh out_dir."""
    from nvfm.loader import write_synthetic_shards
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=4, seed=1, shape=(16, 64, 64))
    used, fresh = str(tmp_path / "used"), str(tmp_path / "fresh")
    assert "holds another run's checkpoint" not in train(used, shards, "--max_steps=3", "--log_interval=1")
    out = train(used, shards, "--max_steps=2", "--log_interval=1", "--seed=5")
    assert "warning: " + used + " holds another run's checkpoint" in out
    train(fresh, shards, "--max_steps=2", "--log_interval=1", "--seed=5")
    assert log_of(used) == log_of(fresh) and [s for s, _ in log_of(used)] == [1, 2]
    assert ckpt_of(used)["step"] == 2


@pytest.mark.parametrize("arg", ["--amp_dtype=bf16", "--model_size=vitx", "--attention=flash", "--device=gpu",
                                 "--init_from=resum", "--export=teachr"])
def test_a_misspelt_choice_is_one_line_before_anything_is_written(tmp_path, arg):
    """A setting's value outside its choices was a KeyError / ValueError / RuntimeError traceback and exit
    2 (the configurator's 'bug' status: amp_dtype, model_size, attention - that one at the first step,
    after out_dir/log.jsonl was made - and device), or exit 1 after out_dir was made (init_from, export).
    Now: exit 1, one line naming the setting and its choices, nothing written."""
    from nvfm.loader import write_synthetic_shards
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=2, seed=1, shape=(16, 64, 64))
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, TRAIN, *JOB, f"--shards={shards}", f"--out_dir={tmp_path / 'run'}", arg],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    err = p.stderr.strip()
    key, value = arg[2:].split("=")
    assert p.returncode == 1 and len(err.splitlines()) == 1, (p.returncode, p.stderr[-2000:])
    assert err.startswith(f"train_jepa.py: error: --{key}={value!r}: choose ") and not (tmp_path / "run").exists(), err
