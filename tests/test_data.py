"""nvfm.data: part writer commit protocol, deterministic merge, zero-copy reader, tokens."""
import json
import os

import numpy as np
import pytest
import torch

from nvfm import data as shards
from nvfm.tokenize import patchify_reference, token_foreground


def _volume(rng, modality, shape):
    D, H, W = shape
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    mask = ((z / 0.9) ** 2 + (y / 0.8) ** 2 + (x / 0.7) ** 2 < 1).astype(np.uint8)
    C = 2 if modality == "CT" else 1
    data = rng.integers(0, 256, (C,) + shape, dtype=np.uint8)
    tm = token_foreground(torch.from_numpy(mask)).numpy()
    return data, mask, tm


def _write_set(out, rng, n_studies=4, order=None):
    """A shard set written by two part writers, studies in `order`."""
    studies = []
    for s in range(n_studies):
        vols = []
        for j, (mod, shape) in enumerate([("CT", (10, 61, 75)), ("MR", (16, 96, 90))]):
            data, mask, tm = _volume(rng, mod, shape)
            rec = dict(volume_id=f"k{s:02d}-v{j}", study_key=f"k{s:02d}", series_key=f"v{j}",
                       split=["train", "val"][s % 2], modality=mod, family="CT" if mod == "CT" else "T2",
                       shape=list(shape), channels=data.shape[0], spacing=[4.0, 1.0, 1.0],
                       token_grid=list(tm.shape), n_tokens=int(tm.sum()), token_mask=shards.pack_mask(tm))
            vols.append((rec, data, mask))
        studies.append((f"k{s:02d}", vols))
    order = order or list(range(n_studies))
    writers = [shards.PartWriter(out, "a", fsync=False), shards.PartWriter(out, "b", fsync=False)]
    for n, s in enumerate(order):
        writers[n % 2].add_study(studies[s][0], studies[s][1], [])
    for w in writers:
        w.close()
    return studies


@pytest.fixture()
def shard_set(tmp_path):
    rng = np.random.default_rng(0)
    studies = _write_set(str(tmp_path), rng)
    shards.merge(str(tmp_path), shards.read_done(str(tmp_path)), {"salt_id": "x"})
    return str(tmp_path), studies


def test_reader_roundtrip_and_zero_copy(shard_set):
    out, studies = shard_set
    r = shards.ShardReader(out)
    expected = {rec["volume_id"]: (data, mask) for _, vols in studies for rec, data, mask in vols}
    assert len(r) == len(expected)
    for i, v in enumerate(r.volumes):
        data, mask = r.volume(i)
        assert np.array_equal(data, expected[v["volume_id"]][0]) and np.array_equal(mask, expected[v["volume_id"]][1])
        buf = r._map(v["shard"])
        assert np.shares_memory(data, buf) and np.shares_memory(mask, buf)  # views, no copy
        assert v["offset"] % shards.ALIGN == 0
        assert v["shard"].startswith(v["split"] + "_")
        if v["modality"] == "CT":
            assert np.shares_memory(r.window(i, "brain"), buf)
            assert np.array_equal(r.window(i, "blood"), (data[1] >> 4) * 17)
            assert np.array_equal(r.window(i, "bone"), (data[1] & 15) * 17)
            assert r.window(i, "bone").max() <= 255
            with pytest.raises(ValueError):
                r.window(i, "mr")
        else:
            assert np.shares_memory(r.window(i, "mr"), buf)
        assert np.array_equal(r.token_mask(i), token_foreground(torch.from_numpy(np.array(mask))).numpy())


def test_tokens_match_patchify_and_ranges_concatenate(shard_set):
    out, _ = shard_set
    r = shards.ShardReader(out)
    slabs = 0
    for i, v in enumerate(r.volumes):
        name = "bone" if v["modality"] == "CT" else "mr"
        vol = torch.from_numpy(np.array(r.window(i, name)))
        ref_tok, ref_coords, _ = patchify_reference([vol], [torch.from_numpy(np.array(r.volume(i)[1]))])
        tok, coords = r.tokens(i, name)
        assert np.array_equal(tok, ref_tok.numpy()) and np.array_equal(coords, ref_coords.numpy())
        n = len(tok)
        parts = [r.tokens(i, name, a, min(a + 5, n)) for a in range(0, n, 5)]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), tok)
        if n >= 9:
            data, mask, c, z0 = r.slab(i, 3, 9)
            assert np.shares_memory(data, r._map(v["shard"])) and z0 % 4 == 0
            assert np.array_equal(c, coords[3:9]) and data.shape[1] == (c[-1, 0] - c[0, 0] + 1) * 4
            slabs += 1
    assert slabs > 0


def test_merge_is_deterministic_regardless_of_write_order(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write_set(a, np.random.default_rng(1), order=[0, 1, 2, 3])
    _write_set(b, np.random.default_rng(1), order=[3, 1, 0, 2])
    for d in (a, b):
        shards.merge(d, shards.read_done(d), {"salt_id": "x"})
    for name in ("manifest.json", "train_0.bin", "val_0.bin"):
        with open(os.path.join(a, name), "rb") as f, open(os.path.join(b, name), "rb") as g:
            assert f.read() == g.read(), name


def test_uncommitted_tail_is_ignored(tmp_path):
    out = str(tmp_path)
    rng = np.random.default_rng(2)
    w = shards.PartWriter(out, "w", fsync=False)
    data, mask, tm = _volume(rng, "MR", (8, 32, 32))
    rec = dict(volume_id="s1-v", study_key="s1", split="train", modality="MR", shape=[8, 32, 32], channels=1)
    w.add_study("s1", [(rec, data, mask)], [])
    w.add_study("s2", [(dict(rec, volume_id="s2-v", study_key="s2"), data, mask)], [])
    w.close()
    bin_path = os.path.join(out, "parts", "w.bin")
    with open(bin_path, "r+b") as f:  # killed while writing s2's bytes...
        f.truncate(os.path.getsize(bin_path) - 100)
    with open(os.path.join(out, "parts", "w.jsonl"), "a") as f:  # ...and a torn commit line
        f.write('{"study_key": "s3", "volu')
    done = shards.read_done(out)
    assert set(done) == {"s1"}


def test_shard_size_limit_starts_new_files(tmp_path):
    out = str(tmp_path)
    _write_set(out, np.random.default_rng(3), n_studies=6)
    man = shards.merge(out, shards.read_done(out), {}, shard_bytes=300_000)
    names = sorted(man["shards"])
    assert len(names) > 2 and "train_1.bin" in names
    per_shard = {n: [v for v in man["volumes"] if v["shard"] == n] for n in names}
    for n, size in man["shards"].items():  # a shard exceeds the limit only when it holds one volume
        assert size <= 300_000 or len(per_shard[n]) == 1
    r = shards.ShardReader(out)
    for i in range(len(r)):
        data, mask = r.volume(i)
        assert mask.max() == 1
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["version"] == 1  # no values block: format 1, as before


def test_pack_mask_roundtrip():
    rng = np.random.default_rng(4)
    for grid in [(1, 1, 1), (3, 5, 7), (10, 14, 14)]:
        m = rng.random(grid) < 0.4
        assert np.array_equal(shards.unpack_mask(shards.pack_mask(m), grid), m)


def test_manifest_format_version_is_checked(shard_set):
    """Shards record their format version; version 1 (and older manifests without the key)
    load, a version this nvfm does not know is a one-line error naming the file."""
    out, _ = shard_set
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        man = json.load(f)
    assert man["version"] == 1 and shards.VERSION == 2
    ref = shards.ShardReader(out)
    data0, mask0 = (np.asarray(a).copy() for a in ref.volume(0))
    del man["version"]  # an older manifest without the key
    with open(path, "w") as f:
        json.dump(man, f)
    r = shards.ShardReader(out)
    np.testing.assert_array_equal(r.volume(0)[0], data0)
    np.testing.assert_array_equal(r.volume(0)[1], mask0)
    for bad in (shards.VERSION + 1, "2", 0):
        man["version"] = bad
        with open(path, "w") as f:
            json.dump(man, f)
        with pytest.raises(ValueError, match=r"manifest.json: shard format version .*reads versions 1\.\.2") as e:
            shards.ShardReader(out)
        assert "\n" not in str(e.value)


def _their_window(x, lo, hi):
    """The authors' clip_by_window / MR min-max after the clip, literally, in float64."""
    x = np.clip(np.asarray(x, np.float64), lo, hi)
    return (x - lo) / (hi - lo + 1e-8)


def test_values_block_format_2(tmp_path):
    """A volume with a values block (int16 HU / float32 MR): format 2, uint8 windows and masks
    read as before, the values come back exactly, window_float is the authors' float window."""
    out = str(tmp_path)
    rng = np.random.default_rng(5)
    studies = _write_set(out, rng, n_studies=2)  # format-1 volumes in parts a / b
    hu = rng.integers(-1100, 2500, (9, 33, 47)).astype(np.int16)
    mr = rng.uniform(0, 900, (5, 20, 31)).astype(np.float32)
    vols = []
    for j, (mod, vals, extra) in enumerate([("CT", hu, {}), ("MR", mr, {"clip": [12.5, 800.25]})]):
        data, mask, tm = _volume(rng, mod, vals.shape)
        rec = dict(volume_id=f"z-v{j}", study_key="z", series_key=f"v{j}", split="train", modality=mod,
                   family="CT" if mod == "CT" else "T1", shape=list(vals.shape), channels=data.shape[0],
                   spacing=[4.0, 1.0, 1.0], token_grid=list(tm.shape), n_tokens=int(tm.sum()),
                   token_mask=shards.pack_mask(tm), **extra)
        vols.append((rec, data, mask, vals))
    w = shards.PartWriter(out, "c", fsync=False)
    w.add_study("z", vols, [])
    w.close()
    man = shards.merge(out, shards.read_done(out), {})
    assert man["version"] == 2
    r = shards.ShardReader(out)
    by_id = {v["volume_id"]: i for i, v in enumerate(r.volumes)}
    for rec, data, mask, vals in vols:
        i = by_id[rec["volume_id"]]
        v = r.volumes[i]
        assert v["values"] == {np.dtype(np.int16): "int16", np.dtype(np.float32): "float32"}[vals.dtype]
        assert v["values_at"] % 8 == 0 and v["nbytes"] == v["values_at"] + vals.nbytes
        np.testing.assert_array_equal(r.volume(i)[0], data)  # what format-1 readers read is unchanged
        np.testing.assert_array_equal(r.volume(i)[1], mask)
        np.testing.assert_array_equal(r.values(i), vals)
    # the authors' windows from the values, to float32 rounding
    i = by_id["z-v0"]
    for name, (lo, hi) in (("brain", (0.0, 80.0)), ("blood", (-20.0, 180.0)), ("bone", (-800.0, 2000.0))):
        got = r.window_float(i, name)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, _their_window(hu, lo, hi), rtol=0, atol=1e-7)
    i = by_id["z-v1"]
    np.testing.assert_allclose(r.window_float(i, "mr"), _their_window(mr, 12.5, 800.25), rtol=0, atol=1e-7)
    with pytest.raises(ValueError, match="only the 'mr' window"):
        r.window_float(i, "brain")
    # format-1 volumes of the same set: no values, window_float is the uint8 window / 255
    j = by_id["k00-v0"]
    assert r.values(j) is None
    np.testing.assert_array_equal(r.window_float(j, "blood"), r.window(j, "blood").astype(np.float32) / 255)
    assert len(studies) == 2


def test_reader_checks_shard_sizes_against_the_manifest(shard_set):
    """A shard file cut short (full disk, partial copy) or missing is refused on open, in one line
    naming the file, its size and the manifest's; the intact set opens and reads as written."""
    out, studies = shard_set
    man = json.load(open(os.path.join(out, "manifest.json")))
    name = sorted(man["shards"])[0]
    path = os.path.join(out, name)
    size = os.path.getsize(path)
    assert man["shards"][name] == size
    shards.ShardReader(out)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match=rf"{name} is {size - 100} bytes, but .*manifest.json records {size} bytes") as e:
        shards.ShardReader(out)
    assert "\n" not in str(e.value)
    os.remove(path)
    with pytest.raises(ValueError, match=rf"{name} is missing, but .*records {size} bytes"):
        shards.ShardReader(out)


@pytest.mark.parametrize("bad", ["values_float64", "data_float32", "record_shape"])
def test_a_refused_study_writes_nothing_and_the_next_study_reads_back(tmp_path, bad):
    """A study the writer refuses (a float64 values block, float data that uint8 would wrap, a
    record whose shape is not the data's) raises naming the volume, and the study written after it
    reads back byte for byte (the refused study's bytes once shifted every later offset)."""
    out = str(tmp_path)
    rng = np.random.default_rng(7)
    data, mask, tm = _volume(rng, "CT", (8, 32, 32))
    rec = dict(volume_id="bad-v0", study_key="bad", series_key="v0", split="train", modality="CT", family="CT",
               shape=[8, 32, 32], channels=2, spacing=[4.0, 1.0, 1.0], token_grid=list(tm.shape),
               n_tokens=int(tm.sum()), token_mask=shards.pack_mask(tm))
    vol = {"values_float64": (rec, data, mask, np.zeros(mask.shape, np.float64)),
           "data_float32": (rec, data.astype(np.float32) * 2, mask),
           "record_shape": (dict(rec, shape=[8, 32, 16]), data, mask)}[bad]
    good, gmask, gtm = _volume(rng, "MR", (12, 48, 40))
    grec = dict(rec, volume_id="good-v0", study_key="good", modality="MR", family="T1", shape=[12, 48, 40], channels=1,
                token_grid=list(gtm.shape), n_tokens=int(gtm.sum()), token_mask=shards.pack_mask(gtm))
    w = shards.PartWriter(out, "a", fsync=False)
    with pytest.raises(ValueError, match="volume bad-v0"):
        w.add_study("bad", [vol], [])
    w.add_study("good", [(grec, good, gmask)], [])
    w.close()
    assert os.path.getsize(os.path.join(out, "parts", "a.bin")) == good.nbytes + gmask.nbytes  # nothing of "bad"
    shards.merge(out, shards.read_done(out), {})
    r = shards.ShardReader(out)
    assert [v["volume_id"] for v in r.volumes] == ["good-v0"]
    raw = np.fromfile(os.path.join(out, r.volumes[0]["shard"]), np.uint8)  # a direct read of the file
    o = r.volumes[0]["offset"]
    np.testing.assert_array_equal(raw[o:o + good.size].reshape(good.shape), good)
    np.testing.assert_array_equal(raw[o + good.size:o + good.size + gmask.size].reshape(gmask.shape), gmask)
    np.testing.assert_array_equal(r.volume(0)[0], good)
