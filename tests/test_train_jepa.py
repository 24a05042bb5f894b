"""train_jepa.py end to end on CPU with a tiny model and small synthetic shards:
the loss goes down, the teacher changes only through the EMA, resume is bit-for-bit, and a
2-process gloo DDP run equals 1 process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nvfm.checkpoint import load_checkpoint
from nvfm.loader import write_synthetic_shards
from nvfm.model import load_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
ARGS = ["config/jepa_tiny.py", "--global_batch=4", f"--max_steps={STEPS}", "--num_workers=0", "--log_interval=4",
        "--ckpt_interval=1000", "--predictor_depth=1", "--lr_peak=0.002"]


def run(args, out_dir, shards, nproc=1, pre=()):
    """train_jepa.py in a subprocess; pre: python arguments before the script (e.g. "-c", a wrapper)."""
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable, *pre]
    cmd = launcher + ["train_jepa.py"] + ARGS + [f"--shards={shards}", f"--out_dir={out_dir}"] + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")), n=6, seed=0, shape=(16, 80, 80))


@pytest.fixture(scope="module")
def full_run(shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full"))
    run([], out, shards)
    return out


def weights(path):
    ck = load_checkpoint(path)
    return {f"{part}.{k}": v for part in ("student", "predictor", "teacher") for k, v in ck[part].items()}


def read_log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def test_loss_goes_down_and_outputs(full_run):
    log = [r for r in read_log(full_run) if "loss" in r]
    assert [r["step"] for r in log] == [1] + list(range(4, STEPS + 1, 4))  # step 1: the monitors' reference
    losses = [r["loss"] for r in log[1:]]  # each the mean over its 4 steps
    assert sum(losses[-2:]) / 2 < 0.85 * losses[0], losses
    for r in log:
        assert r["tokens_per_s"] > 0 and r["volumes_per_s"] > 0 and r["std_target"] > 0 and r["std_pred"] > 0
        assert r["mfu"] is None  # no peak FLOP/s on CPU
        for k in ("rank_student", "rank_target", "rank_pred"):
            assert 1.0 <= r[k] <= 96.0
        assert 0.0 <= r["intensity_share_student"] <= 1.0 and 0.0 <= r["intensity_share_target"] <= 1.0
    assert log[0]["momentum"] < log[-1]["momentum"] <= 1.0
    # the teacher moves away from its init by the EMA only, and stays closer to its init than the student is
    moved = [r["teacher_moved"] for r in log]
    assert moved[0] > 0 and all(a < b for a, b in zip(moved, moved[1:]))
    assert all(0 < r["teacher_to_student"] < 2 for r in log)   # relative distances of two nearby inits
    ck = load_checkpoint(os.path.join(full_run, "ckpt.pt"))
    assert ck["step"] == STEPS and ck["config"]["model_size"] == "tiny"
    # both encoders are exported: encoder.safetensors is the teacher (the default `export`)
    for name, part in (("encoder", "teacher"), ("student", "student")):
        enc = load_encoder(os.path.join(full_run, f"{name}.safetensors"))
        for k, v in enc.state_dict().items():
            assert torch.equal(v, ck[part][k]), (name, k)
    assert not os.path.exists(os.path.join(full_run, "teacher.safetensors"))


def test_position_control_and_online_probe(shards, tmp_path):
    """The position-only predictor trains beside the main run without changing it (same student
    weights to the bit), resumes strictly, and the online probe logs both encoders."""
    # a tight clip, so that clipping is active and the control must be clipped on its own
    ctl, out = str(tmp_path / "control"), str(tmp_path / "plain")
    run(["--position_control=True", "--grad_clip=0.001"], ctl, shards)
    run(["--position_control=False", "--grad_clip=0.001", f"--stop_at_step={STEPS // 2}", "--eval_interval=8"],
        out, shards)
    run(["--position_control=False", "--grad_clip=0.001", "--init_from=resume", "--eval_interval=8"], out, shards)
    ck, ref = load_checkpoint(os.path.join(out, "ckpt.pt")), load_checkpoint(os.path.join(ctl, "ckpt.pt"))
    assert "pos_predictor" not in ck and set(ref["pos_predictor"]) == set(ref["predictor"])
    for part in ("student", "predictor", "teacher"):
        for k, v in ref[part].items():
            assert torch.equal(ck[part][k], v), f"{part}.{k} changed by the position control"
    ctl_log = [r for r in read_log(ctl) if "loss" in r]
    assert all(r["loss_position_only"] > 0 for r in ctl_log)
    assert all(0 < r["loss_content"] and 0 < r["loss_content_position_only"] for r in ctl_log)
    assert any(r["loss_content"] != r["loss_content_position_only"] for r in ctl_log)
    log = read_log(out)
    assert not any("loss_position_only" in r or "loss_content" in r for r in log)
    probes = {r["step"]: r["probe"] for r in log if "probe" in r}
    assert sorted(probes) == [0, 8, 16]
    assert probes[0]["student"]["rank"] == pytest.approx(probes[0]["teacher"]["rank"])  # identical at init
    assert probes[16]["student"]["rank"] != pytest.approx(probes[16]["teacher"]["rank"])
    assert all(p[n]["n_tokens"] > 0 for p in probes.values() for n in ("student", "teacher"))


# an fp16 run's loss scaling (on CUDA only) forced on for the CPU, and a position-only control whose
# output is NaN: the gradients that overflow in float16 are its own
OVERFLOWING_CONTROL = """import runpy, sys, torch
import nvfm.model as M
Scaler = torch.amp.GradScaler
torch.amp.GradScaler = lambda device, enabled=True, **kw: Scaler(device, enabled=True, **kw)
forward = M.Predictor.forward
def nan_control(self, z, *a, **kw):
    out = forward(self, z, *a, **kw)
    return out * float("nan") if not z.any() else out   # the control alone is fed zeros for the context
M.Predictor.forward = nan_control
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_an_overflowing_position_control_leaves_the_main_run_alone(full_run, shards, tmp_path):
    """With float16 loss scaling, a step whose control gradients overflow skips the control's update, not
    the main run's: the student, predictor and teacher equal those of the run whose control is sound
    (config/jepa_tiny.py trains the control) to the bit. (One GradScaler
    and one optimizer held both: every step of the main run was skipped, its scale halved each time.)"""
    out = str(tmp_path)
    run(["--position_control=True"], out, shards, pre=("-c", OVERFLOWING_CONTROL))
    ck, ref = load_checkpoint(os.path.join(out, "ckpt.pt")), load_checkpoint(os.path.join(full_run, "ckpt.pt"))
    for part in ("student", "predictor", "teacher"):
        for k, v in ref[part].items():
            assert torch.equal(ck[part][k], v), f"{part}.{k}: the control's overflow changed the main run"
    assert ck["scaler"]["scale"] == 2.0 ** 16 and ck["pos_scaler"]["scale"] < 2.0 ** 16   # only the control's backs off


def test_resume_is_exact_and_teacher_moves_only_by_ema(full_run, shards, tmp_path):
    out = str(tmp_path)
    half = STEPS // 2
    run([f"--stop_at_step={half}"], out, shards)
    before = load_checkpoint(os.path.join(out, "ckpt.pt"))
    assert before["step"] == half
    first = next(r for r in read_log(out) if "rank_student" in r)
    assert first["step"] == 1 and before["collapse_ref"] == pytest.approx(first["rank_student"])
    run(["--init_from=resume", f"--stop_at_step={half + 1}"], out, shards)
    after = load_checkpoint(os.path.join(out, "ckpt.pt"))
    # a job slot's last step is logged, off the log interval too: its FLOPs and loss are not lost
    assert [r["step"] for r in read_log(out) if "loss" in r][-2:] == [half, half + 1]
    # teacher_{s+1} = lerp(teacher_s, student_{s+1}, 1 - m_s): its only update is the EMA
    cfg = before["config"]
    m = cfg["ema_start"] + (cfg["ema_end"] - cfg["ema_start"]) * half / STEPS
    for k, t0 in before["teacher"].items():
        expect = t0 + (1 - m) * (after["student"][k] - t0)
        torch.testing.assert_close(after["teacher"][k], expect, atol=1e-7, rtol=1e-6)
    assert any(not torch.equal(before["teacher"][k], after["teacher"][k]) for k in before["teacher"])
    # the optimizer holds student + predictor parameters only, the position-only control's its own
    assert len(after["optimizer"]["state"]) == len(before["student"]) + len(before["predictor"])
    assert len(after["pos_optimizer"]["state"]) == len(before["pos_predictor"]) > 0   # the tiny config has the control
    assert after["collapse_ref"] == before["collapse_ref"]   # the collapse warning still compares with step 1
    run(["--init_from=resume"], out, shards)
    a, b = weights(os.path.join(full_run, "ckpt.pt")), weights(os.path.join(out, "ckpt.pt"))
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_resume_refuses_changed_settings(shards, tmp_path):
    """--init_from=resume with a setting that changes training (another shard set, seed, lr schedule,
    batch, predictor size, position control) is one line and exit 1 naming each key old -> new; the
    checkpoint is untouched. The same shards moved elsewhere and the logging settings may change."""
    import shutil
    out = str(tmp_path / "run")
    run(["--stop_at_step=2"], out, shards)
    ck_path = os.path.join(out, "ckpt.pt")
    before = open(ck_path, "rb").read()
    other = write_synthetic_shards(str(tmp_path / "other"), n=6, seed=5, shape=(16, 80, 80))
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    cases = [([f"--shards={other}", "--seed=7", "--lr_peak=0.05", "--max_steps=40", "--global_batch=2"],
              [f"shards {shards!r} (manifest", f"-> {other!r} (manifest", "global_batch 4 -> 2", "lr_peak 0.002 -> 0.05", "max_steps 16 -> 40", "seed 0 -> 7"]),
             (["--position_control=False", "--predictor_dim=32"],  # were tracebacks (strict state-dict load)
              ["position_control True -> False", "predictor_dim 64 -> 32"])]
    for extra, named in cases:
        cmd = [sys.executable, "train_jepa.py"] + ARGS + [f"--shards={shards}", f"--out_dir={out}",
                                                         "--init_from=resume"] + extra
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        err = p.stderr.strip()
        assert p.returncode == 1 and len(err.splitlines()) == 1, (extra, p.returncode, p.stderr[-2000:])
        assert err.startswith("train_jepa.py: error: ") and "other settings" in err and "--out_dir" in err, err
        assert all(n in err for n in named), (named, err)
    assert open(ck_path, "rb").read() == before
    # a checkpoint whose weights are not the run's (a tensor of another shape, a part missing): one line naming
    # the file and the part, not a traceback naming neither
    ck = load_checkpoint(ck_path)
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    for part, edit in (("predictor", lambda c: c["predictor"].update(
            {k: v[:1] for k, v in list(c["predictor"].items())[:1]})), ("teacher", lambda c: c.pop("teacher"))):
        c = {k: (dict(v) if isinstance(v, dict) else v) for k, v in ck.items()}
        edit(c)
        torch.save(c, os.path.join(bad, "ckpt.pt"))
        cmd = [sys.executable, "train_jepa.py"] + ARGS + [f"--shards={shards}", f"--out_dir={bad}", "--init_from=resume"]
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        err = p.stderr.strip()
        assert p.returncode == 1 and len(err.splitlines()) == 1, (part, p.returncode, p.stderr[-2000:])
        assert os.path.join(bad, "ckpt.pt") in err and part in err, err
    moved = str(tmp_path / "moved")
    shutil.copytree(shards, moved)
    stdout = run(["--init_from=resume", "--stop_at_step=3", "--log_interval=1", f"--shards={moved}"], out, moved)
    assert "resumed from" in stdout and load_checkpoint(ck_path)["step"] == 3


def test_ddp_two_processes_equal_one(full_run, shards, tmp_path):
    out = str(tmp_path)
    stdout = run([], out, shards, nproc=2)
    assert f"step {STEPS}:" in stdout
    a, b = weights(os.path.join(full_run, "ckpt.pt")), weights(os.path.join(out, "ckpt.pt"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    la = [json.loads(x)["loss"] for x in open(os.path.join(full_run, "log.jsonl"))]
    lb = [json.loads(x)["loss"] for x in open(os.path.join(out, "log.jsonl"))]
    assert la == pytest.approx(lb, rel=1e-4)


def test_the_tiny_recipe_learns_what_the_context_predicts(tmp_path):
    """Positive control (nvfm.loader.write_control_shards): every volume carries a faint grating
    along x or y, one latent per volume that a token's context shows and its position does not.
    config/jepa_tiny.py must learn it: its loss falls clearly below the position-only control's,
    and a token probe reads the latent from the student's features far better than from its
    random init's (the same seed's init), whatever the student's effective rank does meanwhile."""
    from nvfm.loader import write_control_shards
    from nvfm.monitor import ProbeSet
    shards = write_control_shards(str(tmp_path / "control"), n=48, shape=(32, 96, 96))
    out = str(tmp_path / "run")
    run(["--global_batch=8", "--max_steps=300", "--predictor_depth=2", "--lr_peak=0.001", "--log_interval=50"],
        out, shards)
    last = read_log(out)[-1]
    assert last["step"] == 300
    assert last["loss"] < 0.85 * last["loss_position_only"], last
    assert last["loss_content"] < 0.85 * last["loss_content_position_only"], last
    student = load_encoder(os.path.join(out, "student.safetensors"))
    torch.manual_seed(0)  # train_jepa.py's seed: the student is the first module it builds
    init = type(student)(student.config)
    probes = ProbeSet(shards, token_task="grating_y")
    random_auc, student_auc = (probes(e.eval())["token_auroc"] for e in (init, student))
    assert student_auc > random_auc + 0.1, (random_auc, student_auc)
