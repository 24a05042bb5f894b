"""Feature-cache audit: overwrite, kills at every write, concurrent readers, float16 limits,
odd study keys, read-only access, file_hash chunks and the token-rules suffix, each against an
independent computation (an uninterrupted cache, numpy's float16, hashlib on the whole file)."""
import builtins
import gc
import hashlib
import json
import os

import numpy as np
import pytest

from nvfm import features as F
from nvfm import tokenize as T

FILES = ("index.json", "emb.f16", "coords.i32")


def _entry(n, seed, dim=8, window="brain"):
    r = np.random.default_rng(seed)
    return [dict(volume_id=f"v{seed}", family="CT", window=window, modality="CT",
                 coords=r.integers(0, 9, (n, 3)), emb=r.normal(size=(n, dim)))]


def _snapshot(p):
    return {n: (p / n).read_bytes() for n in FILES}


def _check_study(cache, key, entries):
    got = cache.study(key)
    assert len(got) == len(entries)
    for g, e in zip(got, entries):
        np.testing.assert_array_equal(np.asarray(g["emb"]), np.asarray(e["emb"], np.float32).astype(np.float16))
        np.testing.assert_array_equal(np.asarray(g["coords"]), np.asarray(e["coords"]).astype(np.int32))


def _old_cache(p):
    with F.FeatureWriter(str(p), "h1", 8) as w:
        w.add("a", _entry(3, 0))
        w.add("b", _entry(4, 1))
    return _snapshot(p)


def test_overwrite_keeps_the_old_cache_until_the_first_study(tmp_path):
    """FeatureWriter(overwrite=True) emptied the old cache when opened: a run whose first study
    failed (or was refused, or killed) lost every cached study (7 rows -> 0). Now the old cache
    is byte-identical until a study is added, and then holds only the new run's studies."""
    p = tmp_path / "c"
    before = _old_cache(p)
    with pytest.raises(RuntimeError):
        with F.FeatureWriter(str(p), "h2", 8, overwrite=True) as w:
            assert "a" not in w
            raise RuntimeError("the first study failed to encode")
    assert _snapshot(p) == before
    with F.FeatureWriter(str(p), "h2", 8, overwrite=True) as w:
        bad = _entry(2, 5)
        bad[0]["emb"][1, 3] = np.nan
        with pytest.raises(ValueError, match="non-finite"):
            w.add("x", bad)
    assert _snapshot(p) == before
    F.FeatureWriter(str(p), "h2", 8, overwrite=True)   # killed: never closed
    assert _snapshot(p) == before
    c = F.FeatureCache(str(p))
    assert c.encoder_hash == "h1" and c.study_keys() == ["a", "b"]
    _check_study(c, "a", _entry(3, 0))
    _check_study(c, "b", _entry(4, 1))
    # the first study added replaces it; killed before any flush: an empty new cache, never a mix
    w = F.FeatureWriter(str(p), "h2", 8, overwrite=True)
    w.add("z", _entry(5, 9))
    c = F.FeatureCache(str(p))
    assert c.encoder_hash == "h2" and c.study_keys() == [] and c.index["rows"] == 0
    w.close()
    c = F.FeatureCache(str(p))
    assert c.encoder_hash == "h2" and c.study_keys() == ["z"] and c.index["rows"] == 5
    _check_study(c, "z", _entry(5, 9))
    assert os.path.getsize(p / "emb.f16") == 5 * 8 * 2 and os.path.getsize(p / "coords.i32") == 5 * 3 * 4


def test_reader_opened_before_an_overwrite_reads_its_own_data(tmp_path):
    """The reader mapped its files at the first study(): opened before an --overwrite run
    replaced them, it read the new files through the old index (study a off by 3.1)."""
    p = tmp_path / "c"
    _old_cache(p)
    r = F.FeatureCache(str(p))
    with F.FeatureWriter(str(p), "h2", 8, overwrite=True) as w:
        w.add("z", _entry(9, 9))
    _check_study(r, "a", _entry(3, 0))
    _check_study(r, "b", _entry(4, 1))
    _check_study(F.FeatureCache(str(p)), "z", _entry(9, 9))


class _Killed(Exception):
    pass


class _Dies:
    """A file whose write raises once the shared budget of writes is spent (a kill mid-add)."""

    def __init__(self, f, budget):
        self.f, self.budget = f, budget

    def write(self, b):
        self.budget[0] -= 1
        if self.budget[0] < 0:
            self.f.write(b[: len(b) // 2])   # half of it reached the file
            raise _Killed
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_kill_at_every_write_then_resume_equals_the_uninterrupted_cache(tmp_path, monkeypatch):
    """A kill at each data-file write and each index write of `add`/`flush`, with all bytes
    written so far on disk (worst case); the resumed run then gives byte for byte the cache of
    a run never interrupted."""
    data = {f"s{i}": _entry(i % 3 + 1, i) + _entry(2, 100 + i, window="blood") for i in range(5)}
    ref = tmp_path / "ref"
    with F.FeatureWriter(str(ref), "h", 8, flush_every=2) as w:
        for k, e in data.items():
            w.add(k, e)
    want = _snapshot(ref)
    real_atomic = F.write_atomic
    # the new index, two files x two entries per study, index flushes, the last one
    n_writes = 1 + 2 * 2 * len(data) + len(data) // 2 + 1
    for kill_at in range(n_writes):
        p = tmp_path / f"k{kill_at}"
        budget = [kill_at]
        w = F.FeatureWriter(str(p), "h", 8, flush_every=2)

        def atomic(path, text):
            budget[0] -= 1
            if budget[0] < 0:
                raise _Killed
            real_atomic(path, text)

        def dying_open(path, mode="r", *a, **kw):   # the data files, opened by the first add
            f = open(path, mode, *a, **kw)
            return _Dies(f, budget) if mode == "r+b" else f
        monkeypatch.setattr(F, "write_atomic", atomic)
        monkeypatch.setattr(F, "open", dying_open, raising=False)
        with pytest.raises(_Killed):
            for k, e in data.items():
                w.add(k, e)
            w.close()
        monkeypatch.setattr(F, "write_atomic", real_atomic)
        monkeypatch.delattr(F, "open")
        for f in ((w._emb.f, w._co.f) if w._emb is not None else ()):   # what was written reaches the disk
            f.flush()
            f.close()
        with F.FeatureWriter(str(p), "h", 8, flush_every=2) as w2:
            for k, e in data.items():
                if k not in w2:
                    w2.add(k, e)
        assert _snapshot(p) == want, f"kill at write {kill_at}"


def test_readers_opened_while_the_writer_appends(tmp_path):
    """Each reader sees the studies flushed before it opened, read back exactly, and still does
    after the writer has appended more and closed."""
    p = tmp_path / "c"
    data = {f"s{i}": _entry(i + 1, i) for i in range(4)}
    readers = []
    w = F.FeatureWriter(str(p), "h", 8, flush_every=1)
    for i, (k, e) in enumerate(data.items()):
        w.add(k, e)
        readers.append((F.FeatureCache(str(p)), list(data)[: i + 1]))
    w.close()
    for r, keys in readers:
        assert r.study_keys() == keys
        for k in keys:
            _check_study(r, k, data[k])


def test_float16_limits(tmp_path):
    """Values float16 rounds to a finite number are stored as numpy's float16 has them; a value
    that overflows (|x| >= 65520), inf or NaN is refused and writes nothing."""
    p = tmp_path / "c"
    ok = np.array([[65504.0, -65504.0, 65519.0, -65519.99, 6e-8, 1e-9, -0.0, 1.0]])
    with F.FeatureWriter(str(p), "h", 8) as w:
        w.add("ok", [dict(volume_id="v", family="CT", window="brain", modality="CT", coords=[[0, 0, 0]], emb=ok)])
        for bad in (65520.0, -1e6, np.inf, np.nan):
            e = ok.copy()
            e[0, 2] = bad
            with pytest.raises(ValueError, match="non-finite"):
                w.add(f"bad{bad}", [dict(volume_id="v", family="CT", window="brain", modality="CT",
                                         coords=[[0, 0, 0]], emb=e)])
    c = F.FeatureCache(str(p))
    assert c.study_keys() == ["ok"] and c.index["rows"] == 1
    got = np.asarray(c.study("ok")[0]["emb"])
    np.testing.assert_array_equal(got.view(np.uint16), ok.astype(np.float16).view(np.uint16))
    assert os.path.getsize(p / "emb.f16") == 8 * 2


def test_odd_study_keys_round_trip(tmp_path):
    keys = ["", "a/b\\c", 'q"uote', "new\nline", "\u00e9t\u00e9 \u4e2d", "..", "+tokens:fg1,pad", " "]
    p = tmp_path / "c"
    with F.FeatureWriter(str(p), "h", 8) as w:
        for i, k in enumerate(keys):
            w.add(k, _entry(i % 3, i))
    with F.FeatureWriter(str(p), "h", 8) as w:   # a resume finds every key as cached
        assert all(k in w for k in keys)
    c = F.FeatureCache(str(p))
    assert c.study_keys() == keys
    for i, k in enumerate(keys):
        _check_study(c, k, _entry(i % 3, i))


def test_study_views_outlive_the_cache_and_are_read_only(tmp_path):
    p = tmp_path / "c"
    _old_cache(p)
    c = F.FeatureCache(str(p))
    got = c.study("b")
    del c
    gc.collect()
    np.testing.assert_array_equal(np.asarray(got[0]["emb"]), _entry(4, 1)[0]["emb"].astype(np.float16))
    with pytest.raises(ValueError):
        got[0]["emb"][0, 0] = 1.0


def test_reader_opens_nothing_for_writing(tmp_path, monkeypatch):
    """A cache on a read-only filesystem: FeatureCache and trained_precision open every file
    read-only (root ignores chmod, so any writing open is refused here instead)."""
    p = tmp_path / "c"
    _old_cache(p)
    real_open, opened = builtins.open, []

    def read_only_open(file, mode="r", *a, **k):
        opened.append(str(file))
        if any(m in mode for m in "wax+"):
            raise PermissionError(30, "Read-only file system", str(file))
        return real_open(file, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", read_only_open)
    c = F.FeatureCache(str(p))
    _check_study(c, "b", _entry(4, 1))
    assert F.trained_precision({}, str(p)) is None
    assert {os.path.basename(f) for f in opened} >= {"index.json", "emb.f16", "coords.i32"}


@pytest.mark.parametrize("size,chunk", [(0, 7), (1, 7), (7, 7), (100, 7), ((1 << 22) * 2 + 1, 1 << 22)])
def test_file_hash_in_chunks_is_the_whole_file_sha256(tmp_path, size, chunk):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    p = tmp_path / "enc.bin"
    p.write_bytes(data)
    assert F.file_hash(str(p), chunk=chunk) == "sha256:" + hashlib.sha256(data).hexdigest()


BASES = ["sha256:" + "ab" * 32, "sha256:" + "cd" * 32 + "+heads:12", "sha256:" + "ef" * 32 + "+config:0123abcd",
         "random:tiny:seed3"]


def test_token_rules_of_each_encoder_kind():
    """The documented suffixes: nvfm's rules none, the authors' (encode.py --preset=neurovfm)
    '+tokens:fg1,centre,float', and the encoder's own hash (a checkpoint's sha256, the release's
    with '+heads:' or '+config:', random:) read back unchanged."""
    nvfm = dict(min_fg_fraction=0.5, crop="pad", full_precision=False)
    authors = dict(min_fg_fraction=1.0, crop="centre", full_precision=True)
    assert F.rules_suffix(nvfm) == ""
    assert F.rules_suffix(authors) == "+tokens:fg1,centre,float"
    assert F.rules_suffix(dict(nvfm, min_fg_fraction=0.3)) == "+tokens:fg0.3,pad"
    for base in BASES:
        for rules in (nvfm, authors, dict(nvfm, min_fg_fraction=0.0), dict(authors, full_precision=False)):
            assert F.token_rules(base + F.rules_suffix(rules)) == (base, rules)
    for bad in ("fgabc,pad", "fg,pad", "fgnan,pad", "fg2,pad", "fg-0.5,pad", "fg0.5", "fg0.5,crop", "0.5,pad",
                "fg0.5,pad,half"):
        with pytest.raises(ValueError, match=r"unreadable token rules"):
            F.token_rules(BASES[0] + "+tokens:" + bad)


def test_token_rules_suffix_keeps_the_fraction_exactly():
    """rules_suffix wrote the fraction with :g (6 digits): 500.0001/1024 and 0.488281 gave the
    same hash '+tokens:fg0.488281,pad' though patches need 501 vs 500 foreground voxels, so two
    token rules shared one cache and the flip test re-encoded with the wrong one."""
    rng = np.random.default_rng(0)
    fracs = [500.0001 / 1024, 0.488281, 1 / 3, 0.1 + 0.2, 0.3] + [float(k) / 1024 for k in (1, 511, 512, 1023)] \
        + [float(x) for x in rng.random(50)]
    suffixes = set()
    for f in fracs:
        rules = dict(min_fg_fraction=f, crop="pad", full_precision=False)
        s = F.rules_suffix(rules)
        got = F.token_rules("random:tiny:seed0" + s)[1]
        assert got["min_fg_fraction"] == f and T.min_fg_voxels(got["min_fg_fraction"]) == T.min_fg_voxels(f)
        suffixes.add(s)
    assert len(suffixes) == len(set(fracs))
    # two fractions whose patches need different voxel counts never share a hash
    assert T.min_fg_voxels(500.0001 / 1024) == 501 and T.min_fg_voxels(0.488281) == 500


def test_index_json_is_plain_json_of_the_layout(tmp_path):
    """index.json as documented: rows, dim and each entry's row / n, contiguous in write order."""
    p = tmp_path / "c"
    with F.FeatureWriter(str(p), "h", 8, precision="float32") as w:
        w.add("a", _entry(3, 0) + _entry(0, 1, window="blood") + _entry(2, 2, window="bone"))
        w.add("b", _entry(4, 3))
    idx = json.loads((p / "index.json").read_text())
    assert (idx["rows"], idx["dim"], idx["encoder_hash"], idx["precision"]) == (9, 8, "h", "float32")
    assert [(r["window"], r["row"], r["n"]) for r in idx["studies"]["a"]] == [("brain", 0, 3), ("blood", 3, 0),
                                                                              ("bone", 3, 2)]
    assert [(r["row"], r["n"]) for r in idx["studies"]["b"]] == [(5, 4)]
    emb = np.fromfile(p / "emb.f16", np.float16).reshape(-1, 8)
    np.testing.assert_array_equal(emb[5:9], _entry(4, 3)[0]["emb"].astype(np.float16))


@pytest.mark.parametrize("coords", [[[0.9, 1.5, 2.7], [1, 0, 3]], [[0, 1, 2], [-1, 0, 3]],
                                    np.array([[0, 0, 2**32 + 3], [1, 2, 3]], np.int64),
                                    np.array([[0, 0, 0], [1, 1, np.nan]])])
def test_coords_that_are_not_grid_indices_are_refused(tmp_path, coords):
    """Coords were cast with int32: 2.7 was stored as 2, int64 2**32 + 3 as 3 and -1 kept (a token
    placed elsewhere, or at the far end by grounding's indexing); now refused, nothing written."""
    p = tmp_path / "c"
    with F.FeatureWriter(str(p), "h", 2) as w:
        with pytest.raises(ValueError, match="coords must be token grid indices"):
            w.add("a", [dict(volume_id="v", family="CT", window="brain", modality="CT", coords=coords,
                             emb=np.ones((2, 2)))])
        ok = [[0, 1.0, 2], [3, 4, 5]]   # integral floats are indices
        w.add("b", [dict(volume_id="v", family="CT", window="brain", modality="CT", coords=ok, emb=np.ones((2, 2)))])
    c = F.FeatureCache(str(p))
    assert c.study_keys() == ["b"] and c.study("b")[0]["coords"].tolist() == [[0, 1, 2], [3, 4, 5]]
