"""Feature cache: round trip, resume after a killed write, stale-encoder detection."""
import json
import os

import numpy as np
import pytest

from nvfm import features


def _entries(rng, key_seed, dim=8):
    out = []
    for w in ("brain", "blood"):
        n = int(rng.integers(0, 6))
        out.append(dict(volume_id=f"v{key_seed}", family="CT", window=w, modality="CT",
                        coords=rng.integers(0, 9, (n, 3)), emb=rng.normal(size=(n, dim))))
    return out


def test_round_trip_and_float16(tmp_path):
    rng = np.random.default_rng(0)
    data = {f"s{i}": _entries(rng, i) for i in range(5)}
    with features.FeatureWriter(str(tmp_path), "sha256:abc", 8, flush_every=2) as w:
        for k, e in data.items():
            w.add(k, e)
    c = features.FeatureCache(str(tmp_path), expect_hash="sha256:abc")
    assert c.study_keys() == list(data) and len(c) == 5 and c.encoder_hash == "sha256:abc"
    for k, ents in data.items():
        got = c.study(k)
        assert [g["window"] for g in got] == ["brain", "blood"]
        for g, e in zip(got, ents):
            assert g["emb"].dtype == np.float16 and g["coords"].dtype == np.int32
            np.testing.assert_allclose(g["emb"], e["emb"], rtol=1e-3, atol=1e-3)
            np.testing.assert_array_equal(g["coords"], e["coords"])
        bag, spans = c.study_tokens(k)
        assert len(bag) == sum(len(e["emb"]) for e in ents)
    with pytest.raises(KeyError, match="not in the feature cache"):
        c.study("nope")


def test_resume_after_killed_write_truncates_tail(tmp_path):
    rng = np.random.default_rng(1)
    w = features.FeatureWriter(str(tmp_path), "h1", 8, flush_every=1)
    w.add("a", _entries(rng, 0))
    w.add("b", _entries(rng, 1))
    w.flush()
    # a study half-written when the job died: bytes on disk, no index entry
    w._emb.write(b"\x00" * 8 * 2 * 3)
    w._co.write(b"\x00" * 12 * 3)
    w._emb.flush()
    w._co.flush()
    rows = json.load(open(tmp_path / "index.json"))["rows"]
    # (no close: simulate the kill)
    w2 = features.FeatureWriter(str(tmp_path), "h1", 8)
    assert "a" in w2 and "b" in w2 and "c" not in w2
    assert os.path.getsize(tmp_path / "emb.f16") == rows * 8 * 2
    e = _entries(rng, 2)
    w2.add("c", e)
    w2.close()
    c = features.FeatureCache(str(tmp_path))
    assert len(c) == 3
    np.testing.assert_allclose(c.study("c")[0]["emb"], e[0]["emb"], rtol=1e-3, atol=1e-3)


def test_stale_cache_and_bad_input(tmp_path):
    with features.FeatureWriter(str(tmp_path), "h1", 8) as w:
        w.add("a", _entries(np.random.default_rng(2), 0))
    with pytest.raises(features.StaleCacheError, match="h1"):
        features.FeatureWriter(str(tmp_path), "h2", 8)
    with pytest.raises(features.StaleCacheError):
        features.FeatureCache(str(tmp_path), expect_hash="h2")
    with features.FeatureWriter(str(tmp_path), "h2", 8, overwrite=True) as w:
        assert "a" not in w
        w.add("b", _entries(np.random.default_rng(3), 1))   # the old cache is replaced by the first study
    with pytest.raises(FileNotFoundError, match="encode.py"):
        features.FeatureCache(str(tmp_path / "missing"))
    with features.FeatureWriter(str(tmp_path), "h2", 8) as w:
        bad = [dict(volume_id="v", family="T1", window="mr", modality="MR", coords=np.zeros((2, 3)),
                    emb=np.zeros((2, 5)))]
        with pytest.raises(ValueError, match="dim 8"):
            w.add("x", bad)
        bad[0]["emb"] = np.full((2, 8), 1e6)   # overflows float16
        with pytest.raises(ValueError, match="non-finite"):
            w.add("x", bad)
        assert "x" not in w


def test_file_hash(tmp_path):
    p = tmp_path / "enc.bin"
    p.write_bytes(b"abc")
    assert features.file_hash(str(p)) == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_cut_short_cache_is_refused_by_reader_and_repaired_by_writer(tmp_path):
    """A data file shorter than the index needs is never zero-padded: the reader refuses it
    (naming the file and both sizes), the writer keeps the studies stored before the cut and
    lets the rest be encoded again, giving exactly the uninterrupted cache."""
    rng = np.random.default_rng(3)
    data = {f"s{i}": [dict(volume_id=f"v{i}", family="CT", window="brain", modality="CT",
                           coords=rng.integers(0, 9, (4, 3)), emb=rng.normal(size=(4, 8)))] for i in range(4)}
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    for d in (ref, cut):
        with features.FeatureWriter(str(d), "h1", 8) as w:
            for k, e in data.items():
                w.add(k, e)
    full = os.path.getsize(cut / "emb.f16")
    assert full == 16 * 8 * 2
    with open(cut / "emb.f16", "r+b") as f:   # cut inside study s2 (rows 8..11)
        f.truncate(10 * 8 * 2 - 6)
    with pytest.raises(features.StaleCacheError, match=rf"emb.f16 is {10 * 16 - 6} bytes but .*needs {full}"):
        features.FeatureCache(str(cut))
    w = features.FeatureWriter(str(cut), "h1", 8)
    assert "emb.f16" in w.repaired and "2 to be encoded again" in w.repaired
    assert "s0" in w and "s1" in w and "s2" not in w and "s3" not in w
    for k in ("s2", "s3"):
        w.add(k, data[k])
    w.close()
    a, b = features.FeatureCache(str(ref)), features.FeatureCache(str(cut))
    assert a.index == b.index
    for name in ("emb.f16", "coords.i32"):
        assert (ref / name).read_bytes() == (cut / name).read_bytes()


WRITER = """
import sys
import numpy as np
from nvfm import features
def ent(v):
    return [dict(volume_id="v", family="CT", window="brain", modality="CT", coords=np.zeros((4, 3), int),
                 emb=np.full((4, 8), v))]
with features.FeatureWriter(sys.argv[1], "h1", 8, flush_every=1) as w:
    print("ready", flush=True)
    sys.stdin.readline()
    w.add("a1", ent(1.0))
    print("added", flush=True)
    sys.stdin.readline()
    w.add("a2", ent(3.0))
"""


def _ent(v):
    return [dict(volume_id="v", family="CT", window="brain", modality="CT", coords=np.zeros((4, 3), int),
                 emb=np.full((4, 8), v))]


def test_a_second_writer_process_is_refused(tmp_path):
    """Two processes writing one cache (encode.py twice with one --out): B opened while A held the cache, A added
    a1, B added b1 and closed, A added a2 and closed. Each wrote at its own next row: a1 read back B's 2.0 instead
    of 1.0 and b1, written without an error, was gone. Now B is refused while A holds the cache (--overwrite=True
    too), and every study reads back the values written for it."""
    import subprocess
    import sys
    p = str(tmp_path / "cache")
    with features.FeatureWriter(p, "h1", 8) as w:
        w.add("s0", _ent(0.0))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    a = subprocess.Popen([sys.executable, "-c", WRITER, p], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
    try:
        assert a.stdout.readline().strip() == "ready"
        with pytest.raises(features.StaleCacheError, match=r"cache: another process is writing this feature cache"):
            features.FeatureWriter(p, "h1", 8)
        a.stdin.write("go\n")
        a.stdin.flush()
        assert a.stdout.readline().strip() == "added"
        with pytest.raises(features.StaleCacheError, match="another process"):
            features.FeatureWriter(p, "h1", 8, overwrite=True)
    finally:
        if a.poll() is None:
            a.stdin.write("go\n" * 2)
        a.communicate(timeout=60)
    assert a.returncode == 0
    c = features.FeatureCache(p)
    assert {k: c.study(k)[0]["emb"].tolist() for k in c.study_keys()} == \
        {k: [[v] * 8] * 4 for k, v in (("s0", 0.0), ("a1", 1.0), ("a2", 3.0))}
    with features.FeatureWriter(p, "h1", 8) as w:   # A is done: the cache opens for writing again
        assert "a2" in w


@pytest.mark.parametrize("version", [2, None])
def test_writer_refuses_a_cache_of_another_version_like_the_reader(tmp_path, version):
    """A cache whose index says version 2 (or none) was resumed by the writer, which added study b and kept the
    version, exit 0; the reader then refused the whole cache. Both now refuse it with one line naming the index,
    and the files are left as they were."""
    p = tmp_path / "c"
    with features.FeatureWriter(str(p), "h1", 8) as w:
        w.add("a", _ent(1.0))
    index = json.loads((p / "index.json").read_text())
    index["version"] = version
    (p / "index.json").write_text(json.dumps(index))
    before = {n: (p / n).read_bytes() for n in ("index.json", "emb.f16", "coords.i32")}
    want = rf"c/index.json: cache version {version} != 1"
    with pytest.raises(features.StaleCacheError, match=want):
        with features.FeatureWriter(str(p), "h1", 8) as w:
            w.add("b", _ent(2.0))
    with pytest.raises(features.StaleCacheError, match=want):
        features.FeatureCache(str(p))
    assert {n: (p / n).read_bytes() for n in before} == before
