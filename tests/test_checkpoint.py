import os
import subprocess  # noqa: F401  (a class reference for the unsafe-pickle test)
import sys

import pytest
import torch

from nvfm.checkpoint import load_checkpoint, load_state_strict, save_atomic


def test_roundtrip_and_no_temp_left(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    state = {"model": {"w": torch.arange(5.0)}, "step": 3, "config": {"lr": 0.1}}
    save_atomic(state, path)
    back = load_checkpoint(path)
    assert back["step"] == 3 and torch.equal(back["model"]["w"], state["model"]["w"])
    assert os.listdir(path.parent) == ["ckpt.pt"]


def test_unsafe_pickle_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": subprocess.Popen}, path)  # a class reference: not allowed under weights_only
    with pytest.raises(Exception):
        load_checkpoint(path)


def test_strict_keys():
    m = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="missing"):
        load_state_strict(m, {"weight": torch.zeros(2, 2)})
    load_state_strict(m, {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)})
    assert m.weight.abs().sum() == 0


def test_load_state_strict_refuses_a_dtype_the_model_cannot_hold():
    """int64 weights were cast into the float32 Linear and float64 1 + 2**-40 rounded to 1.0,
    both silently; float16 (exact in float32) still loads, value for value."""
    for name, w, dtype in [("int64", torch.ones(2, 2, dtype=torch.int64), "int64"),
                           ("float64 rounded", torch.full((2, 2), 1 + 2.0 ** -40, dtype=torch.float64), "float64")]:
        m = torch.nn.Linear(2, 2)
        before = m.weight.detach().clone()
        with pytest.raises(RuntimeError, match=rf"wrong dtype \[weight {dtype} \(model float32\)\]"):
            load_state_strict(m, {"weight": w, "bias": torch.zeros(2)}, name)
        assert torch.equal(m.weight, before), name
    m = torch.nn.Linear(2, 2)
    half = torch.tensor([[0.1, -3.5], [65504.0, 2.0 ** -14]], dtype=torch.float16)
    load_state_strict(m, {"weight": half, "bias": torch.tensor([float("nan"), 1.0], dtype=torch.float64)})
    assert m.weight.detach().double().tolist() == [[float(v) for v in row] for row in half.tolist()]
    assert m.bias.isnan()[0] and m.bias[1] == 1.0


def test_save_atomic_fsyncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    """The file was fsync'ed but not the directory entry the rename made: after a power cut the
    directory could still list the old checkpoint (or none)."""
    import stat
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd)), real(fd)))
    path = tmp_path / "ckpt.pt"
    save_atomic({"w": torch.arange(3.0)}, path)
    dirs = [s.st_ino for s in synced if stat.S_ISDIR(s.st_mode)]
    assert os.stat(tmp_path).st_ino in dirs
    assert os.stat(path).st_ino in [s.st_ino for s in synced if stat.S_ISREG(s.st_mode)]


def test_save_atomic_disk_full_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"w": torch.arange(3.0)}, path)
    old = path.read_bytes()

    def full(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(b"PK\x03\x04 half")
        else:
            f.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        save_atomic({"w": torch.arange(9.0)}, path)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_save_killed_by_sigkill_leaves_no_temp_file_after_the_next_save(tmp_path):
    """A save killed with SIGKILL (nothing can clean up) left .ckpt.pt.tmp-XXXX, the checkpoint's size, and
    every later save kept it: repeated preemptions piled them up. A temp file of another target, or one
    written since the save began (a write in progress), is left alone."""
    path = tmp_path / "ckpt.pt"
    code = ("import os, torch, nvfm.checkpoint as c\n"
            "real = torch.save\n"
            "def dying(obj, f, *a, **k):\n"
            "    real(obj, f, *a, **k)\n"
            "    os._exit(9)\n"
            "torch.save = dying\n"
            f"c.save_atomic({{'w': torch.arange(1000.0)}}, {str(path)!r})\n")
    for _ in range(2):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 9, p.stderr[-2000:]
    left = sorted(f for f in os.listdir(tmp_path) if f.startswith(".ckpt.pt.tmp-"))
    assert len(left) == 2 and not path.exists()
    old = os.path.getmtime(tmp_path / left[0]) - 60
    for f in left:
        os.utime(tmp_path / f, (old, old))
    other = tmp_path / ".log.jsonl.tmp-abc"
    other.write_text("another target's")
    os.utime(other, (old, old))
    busy = tmp_path / ".ckpt.pt.tmp-busy"   # another writer's, written just now
    busy.write_bytes(b"PK")
    save_atomic({"w": torch.arange(3.0)}, path)
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt.pt", other.name, busy.name])
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(3.0))
