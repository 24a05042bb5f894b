"""Weights and caches audit: the authors' encoder files (nvfm/official.py), nvfm encoder files
(model.load_encoder / save_encoder), the feature cache (nvfm/features.py) and checkpoints
(nvfm/checkpoint.py) are read strictly and safely, refused in one line naming the file, and
written so that a crash or a failed write never corrupts what is already there."""
import io
import json
import os
import re
import struct

import numpy as np
import pytest
import torch

from nvfm import checkpoint as C
from nvfm import features as F
from nvfm import model as Mdl
from nvfm import official as O

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "neurovfm_official")


@pytest.fixture(scope="module")
def small():
    return torch.load(os.path.join(FIX, "official_small.pt"), weights_only=True)


def _write(d, state=None, config=None, raw=None):
    """An official directory: pytorch_model.bin (torch.save(state), or raw bytes) + config.json."""
    os.makedirs(d, exist_ok=True)
    weights = os.path.join(d, "pytorch_model.bin")
    if raw is not None:
        with open(weights, "wb") as f:
            f.write(raw)
    else:
        torch.save(state, weights)
    if config is not None:
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write(config if isinstance(config, str) else json.dumps(config))
    return weights


def _cfg(base, *path_value):
    cfg = json.loads(json.dumps(base))
    for path, value in path_value:
        node = cfg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return cfg


class _Pickled:
    pass


def _official_cases(sd, cfg, ok_bytes):
    """name -> (state, config, raw bytes, heads, which file the message must name, reason regex)."""
    P, E, PE = ("params",), ("params", "embed_layer_cf", "params"), ("params", "pos_emb_cf", "params")
    f64 = dict(sd, **{"norm.weight": sd["norm.weight"].double() + 2.0 ** -40})  # float32 rounds it away
    return {
        "extra key": (dict(sd, extra=torch.zeros(2)), cfg, None, None, "bin", r"unexpected keys \[extra\]"),
        "missing key": ({k: v for k, v in sd.items() if k != "norm.bias"}, cfg, None, None, "bin",
                        r"missing keys \[norm.bias\]"),
        "wrong shape": (dict(sd, **{"norm.bias": torch.zeros(95)}), cfg, None, None, "bin",
                        r"norm.bias \(95,\) \(want \(96,\)\)"),
        "heads not dividing dim (config)": (sd, _cfg(cfg, (P + ("num_heads",), 5)), None, None, "json",
                                            "not divisible by heads 5"),
        "heads not dividing dim (no config)": (sd, None, None, 5, "bin", "not divisible by heads 5"),
        "config dim": (sd, _cfg(cfg, (P + ("embed_dim",), 120), (E + ("embed_dim",), 90)), None, None, "bin",
                       r"wrong shapes \[blocks\.0\..*\(want \(.*120.*\(26 in all\)"),
        "config depth": (sd, _cfg(cfg, (P + ("depth",), 1)), None, None, "bin", r"unexpected keys \[blocks.1."),
        "config patch size": (sd, _cfg(cfg, (E + ("patch_d_size",), 8)), None, None, "json", "patch 8 x 16"),
        "config pos dim": (sd, _cfg(cfg, (PE + ("d",), 24), (E + ("embed_dim",), 72)), None, None, "bin",
                           r"token_embed.proj.bias \(66,\) \(want \(72,\)\)"),
        "config pos layout": (sd, _cfg(cfg, (PE + ("concat",), False)), None, None, "json", "concat=False"),
        "config not JSON": (sd, "{not json", None, None, "json", "not a readable JSON config"),
        "config a list": (sd, [1, 2], None, None, "json", "'which' must be 'vit'"),
        "config params a list": (sd, {"which": "vit", "params": [1]}, None, None, "json", "must each be an object"),
        "pickled object": ({"a": _Pickled()}, cfg, None, None, "bin", r"pickled Python object \(.*_Pickled\)"),
        "non-tensor value": (dict(sd, step=3), cfg, None, None, "bin", "step is a int, not a tensor"),
        "integer weights": (dict(sd, **{"norm.bias": torch.zeros(96, dtype=torch.int64)}), cfg, None, None, "bin",
                            "norm.bias int64"),
        "float64 that float32 rounds": (f64, cfg, None, None, "bin", "norm.weight float64"),
        "truncated file": (None, cfg, ok_bytes[:len(ok_bytes) // 2], None, "bin", "not a torch checkpoint"),
        "empty file": (None, cfg, b"", None, "bin", "not a torch checkpoint .*EOFError"),
    }


def test_official_refusals_are_one_line_naming_the_file(small, tmp_path):
    """Every way an official file can be wrong: a ConversionError of one line that names the file
    at fault (the weights or config.json) and the reason; before, most were ValueError,
    AttributeError, JSONDecodeError or a 6-line torch tutorial, none naming the file."""
    sd, cfg = small["state_dict"], small["config"]
    ok = _write(tmp_path / "ok", sd, cfg)
    with open(ok, "rb") as f:
        ok_bytes = f.read()
    for i, (name, (state, config, raw, heads, at, reason)) in enumerate(_official_cases(sd, cfg, ok_bytes).items()):
        weights = _write(tmp_path / f"c{i}", state, config, raw)
        where = weights if at == "bin" else os.path.join(tmp_path / f"c{i}", "config.json")
        with pytest.raises(O.ConversionError) as e:
            O.load_official(tmp_path / f"c{i}", heads=heads)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and "\x1b" not in msg, (name, msg)
        assert msg.startswith(where + ":"), (name, msg)
        assert re.search(reason, msg), (name, msg)


def _bits_to_float32(raw, dtype):
    """Raw little-endian bytes of a float16 / bfloat16 / float32 tensor -> float32 numpy, by bit
    layout (not through torch): bfloat16 is the top half of a float32."""
    if dtype == "F16":
        return np.frombuffer(raw, "<f2").astype(np.float32)
    if dtype == "BF16":
        return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(raw, "<f4").copy()


def _safetensors_tensors(path):
    """Parse a safetensors file by hand: {name: (dtype, shape, raw bytes)}."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]])
            for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_load_exactly(small, tmp_path, dtype):
    """float16 / bfloat16 weights become float32 exactly, in an nvfm .safetensors file (checked
    against the file's own bytes) and in the authors' .bin (checked against their bit layout)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    enc = Mdl.Encoder(Mdl.EncoderConfig(dim=48, depth=1, heads=2))
    path = str(tmp_path / "half.safetensors")
    save_file({k: v.detach().to(dtype).contiguous() for k, v in enc.state_dict().items()}, path,
              metadata={"nvfm_encoder_config": json.dumps(Mdl.asdict(enc.config)), "format": Mdl.ENCODER_FORMAT})
    got = Mdl.load_encoder(path).state_dict()
    for k, (st_dtype, shape, raw) in _safetensors_tensors(path).items():
        assert st_dtype == {torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]
        assert got[k].dtype == torch.float32
        np.testing.assert_array_equal(got[k].numpy().ravel(), _bits_to_float32(raw, st_dtype), err_msg=k)
    theirs = {k: v.to(dtype) for k, v in small["state_dict"].items()}
    _write(tmp_path / "rel", theirs, small["config"])
    ours = O.load_official(tmp_path / "rel").state_dict()
    name = O._official_name
    for k, v in ours.items():
        bits = theirs[name(k)].contiguous().view(torch.int16).numpy().tobytes()
        np.testing.assert_array_equal(v.numpy().ravel(), _bits_to_float32(bits, "F16" if dtype == torch.float16 else "BF16"))


def test_nvfm_file_with_weights_float32_cannot_hold_is_refused(tmp_path):
    """An int8 (e.g. quantised) or float64 file used to load silently, cast or rounded; now a
    ValueError names the file and the keys. float64 holding float32 values still loads, exactly."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    enc = Mdl.Encoder(Mdl.EncoderConfig(dim=48, depth=1, heads=2))
    sd = {k: v.detach().contiguous() for k, v in enc.state_dict().items()}
    meta = {"nvfm_encoder_config": json.dumps(Mdl.asdict(enc.config)), "format": Mdl.ENCODER_FORMAT}
    lossless = str(tmp_path / "f64ok.safetensors")
    save_file({k: v.double() for k, v in sd.items()}, lossless, metadata=meta)
    got = Mdl.load_encoder(lossless).state_dict()
    assert all(np.array_equal(got[k].numpy(), sd[k].numpy()) for k in sd)
    w = sd["blocks.norm.weight"].double()
    w[0] = 1.0 + 2.0 ** -40   # float32 has 24 significant bits: this is 1.0 there
    for name, state, key in [("f64", dict(sd, **{"blocks.norm.weight": w}), "blocks.norm.weight float64"),
                             ("int8", {k: (v * 100).to(torch.int8) for k, v in sd.items()}, "int8")]:
        path = str(tmp_path / f"{name}.safetensors")
        save_file(state, path, metadata=meta)
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: weights that float32 does not hold exactly.*{key}"):
            Mdl.load_encoder(path)


def test_unreadable_nvfm_file_is_one_line_and_the_cli_says_so(tmp_path, capsys):
    """A truncated .safetensors raised safetensors' own error without the file name, and
    `python -m nvfm.official convert` crashed with a traceback on it."""
    enc = Mdl.Encoder(Mdl.EncoderConfig(dim=48, depth=1, heads=2))
    path = tmp_path / "enc.safetensors"
    Mdl.save_encoder(enc, path)
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not a readable safetensors file") as e:
        Mdl.load_encoder(path)
    assert len(str(e.value).splitlines()) == 1
    assert O.main(["convert", str(path), str(tmp_path / "theirs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and not os.path.exists(tmp_path / "theirs" / "pytorch_model.bin")


def _crash_halfway(real_save):
    def save(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as out:
                out.write(data[:len(data) // 2])
        else:
            f.write(data[:len(data) // 2])
        raise KeyboardInterrupt("killed mid-write")
    return save


def test_save_official_crash_keeps_the_previous_file(small, tmp_path, monkeypatch):
    """save_official wrote pytorch_model.bin in place: a kill mid-write left half a file."""
    d = tmp_path / "theirs"
    enc = O.load_official(_write(tmp_path / "rel", small["state_dict"], small["config"]))
    O.save_official(enc, d)
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    other = Mdl.Encoder(enc.config)
    monkeypatch.setattr(torch, "save", _crash_halfway(torch.save))
    with pytest.raises(KeyboardInterrupt):
        O.save_official(other, d)
    monkeypatch.undo()
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before


def test_save_encoder_fsyncs_the_weights_before_the_rename(tmp_path, monkeypatch):
    """The .safetensors was renamed into place without an fsync (only its .json was synced):
    a power cut could leave an empty encoder file under the final name."""
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_ino), real(fd)))
    path = tmp_path / "enc.safetensors"
    Mdl.save_encoder(Mdl.Encoder(Mdl.EncoderConfig(dim=48, depth=1, heads=2)), path)
    assert os.stat(path).st_ino in synced   # the rename keeps the inode that was synced


# ---------------------------------------------------------------------------------------
# feature cache

def _entry(n, seed, dim=8, vid=None):
    r = np.random.default_rng(seed)
    return [dict(volume_id=vid or f"v{seed}", family="CT", window="brain", modality="CT",
                 coords=r.integers(0, 9, (n, 3)), emb=r.normal(size=(n, dim)))]


def _read_back(cache, key):
    got = cache.study(key)[0]
    return np.asarray(got["emb"]), np.asarray(got["coords"])


def _expect(entries):
    e = entries[0]
    return e["emb"].astype(np.float16), e["coords"].astype(np.int32)


def test_failed_add_does_not_shift_the_next_study(tmp_path):
    """A study whose add failed after bytes were written (an entry without 'modality'; a disk
    full on coords.i32) left those bytes in the files: the next study was indexed at the old
    end but written after them, so it read back another study's rows (max |diff| 1.4)."""
    for case in ("missing field", "disk full"):
        p = str(tmp_path / case.replace(" ", "_"))
        w = F.FeatureWriter(p, "h", 8)
        w.add("s0", _entry(3, 0))
        bad = _entry(2, 1)
        if case == "missing field":
            del bad[0]["modality"]
            with pytest.raises((KeyError, ValueError), match="modality"):
                w.add("s1", bad)
        else:
            real = w._co

            class Full:
                def __getattr__(self, name):
                    return getattr(real, name)

                def write(self, b):
                    raise OSError(28, "No space left on device")
            w._co = Full()
            with pytest.raises(OSError):
                w.add("s1", bad)
            w._co = real
        good = _entry(4, 2)
        w.add("s2", good)
        w.close()
        c = F.FeatureCache(p)
        assert "s1" not in c and c.index["rows"] == 7
        for (got, want) in zip(_read_back(c, "s2"), _expect(good)):
            np.testing.assert_array_equal(got, want, err_msg=case)
        assert os.path.getsize(os.path.join(p, "emb.f16")) == 7 * 8 * 2
        assert os.path.getsize(os.path.join(p, "coords.i32")) == 7 * 3 * 4


def test_duplicate_study_is_refused_and_changes_nothing(tmp_path):
    """Adding a study twice replaced its index entry and orphaned its first rows (rows 8 for a
    5-row study); now a ValueError, and the cache is byte-identical."""
    p = tmp_path / "c"
    with F.FeatureWriter(str(p), "h", 8) as w:
        w.add("a", _entry(3, 0))
    before = {n: (p / n).read_bytes() for n in ("index.json", "emb.f16", "coords.i32")}
    with F.FeatureWriter(str(p), "h", 8) as w:
        with pytest.raises(ValueError, match="study a is already in the feature cache"):
            w.add("a", _entry(5, 1))
    assert {n: (p / n).read_bytes() for n in before} == before


def test_index_pointing_past_the_data_is_refused(tmp_path):
    """An index entry whose rows run past index["rows"] read back short (4 rows for n=6, 0 for
    n=2), and the writer resumed over it; now both refuse, naming index.json and the study."""
    p = tmp_path / "c"
    with F.FeatureWriter(str(p), "h", 8) as w:
        w.add("a", _entry(3, 0))
        w.add("b", _entry(4, 1))
    idx = json.loads((p / "index.json").read_text())
    idx["studies"]["b"][0]["n"] = 6
    (p / "index.json").write_text(json.dumps(idx))
    before = {n: (p / n).read_bytes() for n in ("index.json", "emb.f16", "coords.i32")}
    msg = rf"^{re.escape(str(p / 'index.json'))}: study b lists rows \[3, 9\) but the cache holds 7 rows"
    with pytest.raises(F.StaleCacheError, match=msg):
        F.FeatureCache(str(p))
    with pytest.raises(F.StaleCacheError, match=msg):
        F.FeatureWriter(str(p), "h", 8)
    assert {n: (p / n).read_bytes() for n in before} == before


def test_unreadable_index_is_one_line(tmp_path):
    p = tmp_path / "c"
    p.mkdir()
    (p / "index.json").write_text('{"version": 1, "enc')   # a copy cut short
    for make in (lambda: F.FeatureCache(str(p)), lambda: F.FeatureWriter(str(p), "h", 8)):
        with pytest.raises(F.StaleCacheError, match=rf"^{re.escape(str(p / 'index.json'))}: not a readable") as e:
            make()
        assert len(str(e.value).splitlines()) == 1


def test_zero_token_studies_round_trip(tmp_path):
    p = str(tmp_path / "c")
    a, b = _entry(3, 0), _entry(2, 1)
    with F.FeatureWriter(p, "h", 8) as w:
        w.add("a", a)
        w.add("empty", _entry(0, 5))
        w.add("none", [])
        w.add("b", b)
    c = F.FeatureCache(p)
    assert c.n_tokens("empty") == 0 and c.study_tokens("empty")[0].shape == (0, 8)
    assert c.study_tokens("none")[0].shape == (0, 8) and c.index["rows"] == 5
    for key, ents in (("a", a), ("b", b)):
        for got, want in zip(_read_back(c, key), _expect(ents)):
            np.testing.assert_array_equal(got, want)


def test_bfloat16_features_differ_beyond_float16_storage():
    """Why the precision is recorded: the same encoder's bfloat16-autocast features (CUDA's
    encode_study; CPU autocast here) differ from its float32 ones by far more than the cache's
    float16 rounding, so a cache mixing the two is not one encoder's features."""
    torch.manual_seed(0)
    enc = Mdl.Encoder(Mdl.EncoderConfig.preset("tiny")).eval()
    x = Mdl.normalize_tokens(torch.randint(0, 256, (200, 1024), dtype=torch.uint8), 1)
    c = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(10), torch.arange(10), indexing="ij"), -1)
    args = (x, c.reshape(-1, 3).int(), torch.tensor([0, 200], dtype=torch.int32), 200)
    with torch.no_grad():
        f32 = enc(*args).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = enc(*args).float().numpy()
    storage = np.abs(f32.astype(np.float16).astype(np.float32) - f32).max()
    assert np.abs(bf.astype(np.float16).astype(np.float32) - f32.astype(np.float16).astype(np.float32)).max() > 5 * storage


def test_precision_is_recorded_and_a_mix_is_refused(tmp_path):
    """A cache started on the CPU (float32) and resumed on a GPU (bfloat16 autocast) mixed the
    two silently; the precision is now in the index and a resume with another is refused.
    A cache from before the field existed stays readable (precision None)."""
    assert F.encode_precision("cpu") == "float32"
    assert F.encode_precision(torch.device("cuda:1")) == "bfloat16-autocast"
    p = tmp_path / "c"
    with F.FeatureWriter(str(p), "h", 8, precision="float32") as w:
        w.add("a", _entry(3, 0))
    assert json.loads((p / "index.json").read_text())["precision"] == "float32"
    before = {n: (p / n).read_bytes() for n in ("index.json", "emb.f16", "coords.i32")}
    with pytest.raises(F.StaleCacheError, match="computed in float32, this run computes bfloat16-autocast"):
        F.FeatureWriter(str(p), "h", 8, precision="bfloat16-autocast")
    assert {n: (p / n).read_bytes() for n in before} == before
    with F.FeatureWriter(str(p), "h", 8, precision="float32") as w:
        w.add("b", _entry(2, 1))
    assert F.FeatureCache(str(p)).precision == "float32"
    # an index written before the field existed
    idx = json.loads((p / "index.json").read_text())
    del idx["precision"]
    (p / "index.json").write_text(json.dumps(idx))
    old = F.FeatureCache(str(p))
    assert old.precision is None and sorted(old.study_keys()) == ["a", "b"]
    for got, want in zip(_read_back(old, "a"), _expect(_entry(3, 0))):
        np.testing.assert_array_equal(got, want)
    w = F.FeatureWriter(str(p), "h", 8, precision="bfloat16-autocast")
    assert "2 cached studies were written before the precision was recorded" in w.note
    w.close()
    assert "precision" not in json.loads((p / "index.json").read_text())  # not recorded as if known
    empty = tmp_path / "empty"   # a cache of an earlier version with no studies yet: unknown precision
    empty.mkdir()
    (empty / "index.json").write_text(json.dumps(dict(idx, studies={}, rows=0)))
    for name in ("emb.f16", "coords.i32"):
        (empty / name).write_bytes(b"")
    with F.FeatureWriter(str(empty), "h", 8, precision="float32") as w:
        assert w.note is None
    assert F.FeatureCache(str(empty)).precision == "float32"


# ---------------------------------------------------------------------------------------
# checkpoints

def test_save_atomic_crash_keeps_the_old_file_with_a_normal_mode(tmp_path, monkeypatch):
    """A kill mid-write leaves the old checkpoint byte-identical and no temp file; the file gets
    the mode a plain open() gives (mkstemp's 0600 made checkpoints unreadable to the group)."""
    path = tmp_path / "ckpt.pt"
    C.save_atomic({"w": torch.arange(4.0)}, path)
    old = path.read_bytes()
    monkeypatch.setattr(torch, "save", _crash_halfway(torch.save))
    with pytest.raises(KeyboardInterrupt):
        C.save_atomic({"w": torch.arange(1000.0)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["ckpt.pt"]
    with open(tmp_path / "plain", "w"):
        pass
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "plain").st_mode & 0o777


def test_load_state_strict_names_every_mismatch_and_leaves_the_module_untouched():
    """Missing / unexpected keys were loaded partly before the error (the weight overwritten when
    the bias was missing), a shape mismatch was torch's two-line message, the lists cut at 10."""
    cases = {
        "missing": ({"weight": torch.ones(2, 2)}, r"missing \[bias\], unexpected \[\], wrong shape \[\]"),
        "extra": ({"weight": torch.ones(2, 2), "bias": torch.ones(2), "x": torch.ones(1)}, r"unexpected \[x\]"),
        "shape": ({"weight": torch.ones(2, 3), "bias": torch.ones(2)}, r"wrong shape \[weight \(2, 3\) \(model \(2, 2\)\)\]"),
        "not a tensor": ({"weight": [1.0], "bias": torch.ones(2)}, r"wrong shape \[weight list"),
    }
    for name, (state, reason) in cases.items():
        m = torch.nn.Linear(2, 2)
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(RuntimeError) as e:
            C.load_state_strict(m, state, "probe")
        assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items()), name
        assert re.match(r"probe: checkpoint does not match the model: .*" + reason, str(e.value)), str(e.value)
        assert len(str(e.value).splitlines()) == 1, name
    big = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(8)])
    with pytest.raises(RuntimeError, match=r"\(16 in all\)"):
        C.load_state_strict(big, {})


def test_load_checkpoint_refusals_are_one_line_naming_the_file(tmp_path):
    """Non-tensor pickles gave torch's 6-line tutorial (with terminal escapes), a truncated file
    a message without its name, an empty one an EOFError with no message."""
    import subprocess
    torch.save({"obj": _Pickled()}, tmp_path / "object.pt")
    torch.save({"cls": subprocess.Popen}, tmp_path / "class.pt")
    C.save_atomic({"w": torch.arange(100.0)}, tmp_path / "ok.pt")
    blob = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[:len(blob) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, reason in [("object.pt", r"holds a pickled Python object \(.*_Pickled\), refused by "
                                        r"torch.load\(weights_only=True\)"),
                         ("class.pt", r"holds a pickled Python object \(.*Popen\)"),
                         ("cut.pt", "not a torch checkpoint"), ("empty.pt", "not a torch checkpoint .*EOFError")]:
        with pytest.raises(Exception) as e:
            C.load_checkpoint(tmp_path / name)
        assert re.match(rf"{re.escape(str(tmp_path / name))}: {reason}", str(e.value)), str(e.value)
        assert len(str(e.value).splitlines()) == 1 and "\x1b" not in str(e.value)
        assert isinstance(e.value, C.CheckpointError) and isinstance(e.value, RuntimeError)  # evaluate.py catches it
