"""Checkpoints: plain dicts written atomically, read back safely.

Writes go to a temporary file in the same directory, are fsync'ed, then renamed over the
target, so a job killed mid-write never leaves a truncated checkpoint. Reads use
`torch.load(weights_only=True)`: no pickled code runs.
"""
import os
import tempfile

import torch


def save_atomic(obj, path):
    """torch.save obj to path atomically (same-directory temp file + fsync + rename)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_atomic with weights_only=True."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_state_strict(module, state, what="model"):
    """load_state_dict with strict key checks and a readable error listing the mismatches."""
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(f"{what}: checkpoint does not match the model: "
                           f"missing {result.missing_keys[:10]}, unexpected {result.unexpected_keys[:10]}")
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
