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
