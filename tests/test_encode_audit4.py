"""encode.py / nvfm.official audit (4): a config option of the authors' that changes their features,
a shard manifest that is not one, and a feature cache that cannot be written, each checked against an
independent reference (the authors' fixture output, an uninterrupted run's cache)."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from nvfm import features
from nvfm import official as O
from nvfm.loader import write_synthetic_shards

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIX = os.path.join(HERE, "fixtures", "neurovfm_official")
ENV = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def small():
    return torch.load(os.path.join(FIX, "official_small.pt"), weights_only=True)


def _official_dir(d, small, edit):
    """The fixture's weights with its config.json edited by edit(pos_params, embed_params)."""
    cfg = copy.deepcopy(small["config"])
    edit(cfg["params"]["pos_emb_cf"]["params"], cfg["params"]["embed_layer_cf"]["params"])
    os.makedirs(d, exist_ok=True)
    torch.save(small["state_dict"], os.path.join(d, "pytorch_model.bin"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(d)


def _their_output_error(enc, small):
    with torch.no_grad():
        got = enc(small["tokens"], small["coords"], small["cu_seqlens"], int(small["max_seqlen"]))
    return (got - small["output"]).abs().max().item()


def test_official_config_options_that_change_the_features_are_refused(small, tmp_path):
    """Their PositionalEncoding3DWrapper multiplies the positional code by `pe_factor`; a config.json
    with pe_factor 2 loaded silently as the unscaled encoder (other features than their code's), and
    unknown keys inside embed_layer_cf / pos_emb_cf params were ignored. Now each is a one-line
    ConversionError naming config.json; pe_factor 1 and an omitted `concat` (their default, true)
    load and reproduce their fixture output."""
    def pe2(pp, ep):
        pp["pe_factor"] = 2.0
    with pytest.raises(O.ConversionError, match=r"config\.json: .*pe_factor 2\.0") as e:
        O.load_official(_official_dir(tmp_path / "pe2", small, pe2))
    assert "\n" not in str(e.value)
    enc = O.load_official(_official_dir(tmp_path / "ref", small, lambda pp, ep: None))  # their config as is
    assert _their_output_error(enc, small) <= 1e-5

    def temp(pp, ep):
        pp["temperature"] = 100
    with pytest.raises(O.ConversionError, match=r"config\.json: .*unknown params\.pos_emb_cf\.params temperature"):
        O.load_official(_official_dir(tmp_path / "temp", small, temp))

    def norm(pp, ep):
        ep["norm_layer"] = "LayerNorm"
    with pytest.raises(O.ConversionError, match=r"config\.json: .*norm_layer 'LayerNorm'"):
        O.load_official(_official_dir(tmp_path / "norm", small, norm))

    def same(pp, ep):  # explicit defaults of theirs: the same model
        pp["pe_factor"] = 1
        del pp["concat"]
        pp["in_dim"] = 66
        ep["bias"] = True
        ep["fused_bias_fc"] = True
    enc = O.load_official(_official_dir(tmp_path / "same", small, same))
    assert _their_output_error(enc, small) <= 1e-5


def _encode(shards, out, *extra, wrapper=""):
    """encode.py with a random tiny encoder on CPU; wrapper: Python run first in the same process."""
    args = [f"--shards={shards}", "--encoder=random:tiny", f"--out={out}", "--device=cpu", *extra]
    code = (wrapper + "\nimport runpy, sys\n"
            f"sys.argv = [{os.path.join(ROOT, 'encode.py')!r}] + {args!r}\n"
            f"runpy.run_path({os.path.join(ROOT, 'encode.py')!r}, run_name='__main__')\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


def test_a_manifest_that_is_not_one_is_a_one_line_error(tmp_path):
    """An empty or cut-short manifest.json (a partial copy) was a JSONDecodeError traceback (exit 2), a
    JSON list an AttributeError, and a volume record without its split a KeyError. Now one line
    naming manifest.json, exit 1, nothing written."""
    shards = write_synthetic_shards(str(tmp_path / "s"), n=2, seed=0, shape=(8, 32, 32))
    man_path = os.path.join(shards, "manifest.json")
    with open(man_path) as f:
        text = f.read()
    man = json.loads(text)
    no_split = copy.deepcopy(man)
    del no_split["volumes"][1]["split"]
    cases = [("", "not a readable shard manifest"), (text[: len(text) // 2], "not a readable shard manifest"),
             ("[]", 'no "volumes" list'), (json.dumps(no_split), "volume record 1 has no split")]
    out = tmp_path / "cache"
    for content, why in cases:
        with open(man_path, "w") as f:
            f.write(content)
        r = _encode(shards, out)
        err = r.stderr.strip()
        assert r.returncode == 1 and len(err.splitlines()) == 1, r.stderr
        assert man_path in err and why in err and "Traceback" not in err, err
        assert not out.exists()


DISK_FULL = """
import errno
from nvfm import features
_add, _flush, state = features.FeatureWriter.add, features.FeatureWriter.flush, {"adds": 0, "full": False}
def add(self, key, entries):
    state["adds"] += 1
    if state["adds"] > FULL_AFTER:
        state["full"] = True
        raise OSError(errno.ENOSPC, "No space left on device")
    return _add(self, key, entries)
def flush(self):
    if state["full"] and FLUSH_FAILS:
        raise OSError(errno.ENOSPC, "No space left on device")
    return _flush(self)
features.FeatureWriter.add, features.FeatureWriter.flush = add, flush
"""


def _error_line(r):
    """The one error line of a run that exited 1 (stderr also holds the progress bar), no traceback."""
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and lines[0].startswith("encode.py: error: "), r.stderr
    return lines[0]


def _same_cache(a, b, keys):
    for k in keys:
        ea, eb = a.study(k), b.study(k)
        assert [e["volume_id"] for e in ea] == [e["volume_id"] for e in eb]
        for x, y in zip(ea, eb):
            np.testing.assert_array_equal(np.asarray(x["emb"]), np.asarray(y["emb"]))
            np.testing.assert_array_equal(np.asarray(x["coords"]), np.asarray(y["coords"]))


@pytest.mark.parametrize("flush_fails", [False, True])
def test_a_cache_that_cannot_be_written_stops_the_run(tmp_path, flush_fails):
    """A full disk made every later study 'fail and be skipped' after it was encoded (hours of GPU
    for nothing), the run exited 0 when the first studies had been stored, and an index that could
    not be written at close either was a traceback (exit 2). Now the run stops at the first write
    failure with one line (exit 1); the cache stays readable, and rerunning the command completes it
    to what an uninterrupted run writes."""
    shards = write_synthetic_shards(str(tmp_path / "s"), n=4, seed=0, shape=(16, 64, 64))
    out = tmp_path / "cache"
    r = _encode(shards, out, wrapper=DISK_FULL.replace("FULL_AFTER", "1").replace("FLUSH_FAILS", str(flush_fails)))
    err = _error_line(r)
    assert "writing the feature cache failed (OSError: [Errno 28] No space left on device)" in err, err
    assert str(out) in err and "stopped after encoding 1 of 4 studies" in err, err
    assert "failed and was skipped" not in r.stdout + r.stderr
    kept = features.FeatureCache(str(out))
    assert len(kept) == (0 if flush_fails else 1)
    r = _encode(shards, out)
    assert r.returncode == 0, r.stdout + r.stderr
    ref = tmp_path / "ref"
    assert _encode(shards, ref).returncode == 0
    c, f = features.FeatureCache(str(out)), features.FeatureCache(str(ref))
    assert sorted(c.study_keys()) == sorted(f.study_keys()) and len(f) == 4
    _same_cache(c, f, f.study_keys())


def test_out_naming_a_file_stops_before_a_second_study(tmp_path):
    """--out naming an existing file: every study was encoded, then 'failed and was skipped' with a
    FileExistsError of its own. Now one line naming it, after the first study."""
    shards = write_synthetic_shards(str(tmp_path / "s"), n=3, seed=0, shape=(8, 32, 32))
    out = tmp_path / "features.bin"
    out.write_bytes(b"not a cache")
    r = _encode(shards, out)
    err = _error_line(r)
    assert "FileExistsError" in err and str(out) in err and "stopped after encoding 0 of 3 studies" in err, err
    assert "failed and was skipped" not in r.stdout + r.stderr
    assert out.read_bytes() == b"not a cache"


def test_a_cache_is_not_extended_from_a_shard_set_with_other_settings(tmp_path):
    """--split=train from one shard set, then --split=val from another (another salt: another data set;
    another foreground rule) into the same --out: no study was in both, so the per-volume check never
    fired and the cache mixed the two (exit 0). Now the second run is a one-line error, the cache
    untouched; the same shard set (moved) still extends it to what one run of both splits writes."""
    import shutil
    a = write_synthetic_shards(str(tmp_path / "a"), n=4, seed=0, shape=(8, 32, 32))
    man_path = os.path.join(a, "manifest.json")
    with open(man_path) as f:
        man = json.load(f)
    for i, v in enumerate(man["volumes"]):
        v["split"] = "train" if i < 2 else "val"
    with open(man_path, "w") as f:
        json.dump(man, f)
    b = str(tmp_path / "b")
    shutil.copytree(a, b)
    with open(os.path.join(b, "manifest.json"), "w") as f:
        json.dump(dict(man, salt_id="another-data-set", min_fg_fraction=0.9), f)
    out = tmp_path / "cache"
    assert _encode(a, out, "--split=train").returncode == 0
    before = {n: (out / n).read_bytes() for n in ("index.json", "emb.f16", "coords.i32")}
    r = _encode(b, out, "--split=val")
    err = _error_line(r)
    assert str(out) in err and "encoded from another shard set" in err, err
    assert {n: (out / n).read_bytes() for n in before} == before
    moved = str(tmp_path / "moved")
    shutil.copytree(a, moved)
    assert _encode(moved, out, "--split=val").returncode == 0
    ref = tmp_path / "ref"
    assert _encode(a, ref).returncode == 0
    c, f = features.FeatureCache(str(out)), features.FeatureCache(str(ref))
    assert sorted(c.study_keys()) == sorted(f.study_keys()) and len(f) == 4
    _same_cache(c, f, f.study_keys())
