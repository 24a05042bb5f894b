"""Checkpoints: plain dicts written atomically, read back safely.

Writes go to a temporary file in the same directory, are fsync'ed, then renamed over the
target and the directory fsync'ed (atomic_path), so a job killed mid-write or a full disk never
leaves a truncated checkpoint, and a completed one survives a power cut. Reads use
`torch.load(weights_only=True)`: no pickled code runs; a file that is not such a checkpoint
is a `CheckpointError` with one line naming the file and the reason.
"""
import os
import re

import torch

from nvfm.data import atomic_path


class CheckpointError(RuntimeError):
    """A file that torch.load(weights_only=True) cannot read; the message is one line."""


def names(keys, n=8):
    """'a, b, c ... (12 in all)': the first n sorted keys of a list, with the count."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def load_failure(path, err):
    """One line: why torch.load(path, weights_only=True) raised `err` (torch's own message for a
    refused pickle is a multi-line tutorial)."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    glob = re.search(r"Unsupported global: GLOBAL (\S+)", msg)
    if glob:
        return f"{path}: holds a pickled Python object ({glob.group(1)}), refused by torch.load(weights_only=True)"
    m = re.search(r"WeightsUnpickler error: ([^\n]*)", msg)
    if m:
        return f"{path}: refused by torch.load(weights_only=True): {m.group(1).strip()[:200]}"
    first = msg.strip().splitlines()[0][:200] if msg.strip() else ""
    return (f"{path}: not a torch checkpoint (truncated, empty or another format): "
            f"{type(err).__name__}{': ' + first if first else ''}")


def save_atomic(obj, path):
    """torch.save obj to path atomically (see atomic_path). A job killed mid-write leaves the
    old file intact."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_atomic with weights_only=True (CheckpointError if unreadable)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a refused pickle, a truncated or foreign file
        raise CheckpointError(load_failure(path, e)) from None


def _holds_exactly(value, own):
    """True if tensor `value` cast to `own`'s dtype keeps every value: same dtype, or both floating
    point and the cast round-trips (float16 -> float32 does; float64 1 + 2**-40 -> float32 does not)."""
    if value.dtype == own.dtype:
        return True
    if not (value.is_floating_point() and own.is_floating_point()):
        return False  # an integer or bool tensor for a float weight (or back) is another kind of file
    back = value.to(own.dtype).to(value.dtype)
    return bool(((back == value) | (back.isnan() & value.isnan())).all())


def load_state_strict(module, state, what="model"):
    """load_state_dict with every key, shape and dtype checked first: a mismatch (or a dtype the
    module's cannot hold exactly) is a one-line RuntimeError naming the keys, and the module is
    left untouched."""
    own = module.state_dict()
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    common = set(own) & set(state)
    bad = [f"{k} {tuple(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__} "
           f"(model {tuple(own[k].shape)})" for k in common
           if not torch.is_tensor(state[k]) or state[k].shape != own[k].shape]
    lossy = [f"{k} {str(state[k].dtype).replace('torch.', '')} (model {str(own[k].dtype).replace('torch.', '')})"
             for k in common if torch.is_tensor(state[k]) and state[k].shape == own[k].shape
             and not _holds_exactly(state[k], own[k])]
    if missing or unexpected or bad or lossy:
        raise RuntimeError(f"{what}: checkpoint does not match the model: missing [{names(missing)}], "
                           f"unexpected [{names(unexpected)}], wrong shape [{names(bad)}]"
                           + (f", wrong dtype [{names(lossy)}]" if lossy else ""))
    module.load_state_dict(state, strict=True)
    return module


def changed_settings(saved, now, may_change=()):
    """["key old -> new", ...] for the settings whose values differ between a checkpoint's stored
    config and this run's, except the keys in may_change. A key missing from either side (a setting
    added or removed since the checkpoint was written) is not compared."""
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in sorted(set(saved) & set(now))
            if k not in may_change and saved[k] != now[k]]


def resume_refusal(ckpt_path, changes):
    """The one-line reason a --init_from=resume run with other settings is refused (None if none)."""
    if not changes:
        return None
    return (f"{ckpt_path} was made with other settings: {', '.join(changes)}; resume with the checkpoint's "
            f"settings, or start a new --out_dir")
