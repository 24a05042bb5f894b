"""encode.py's outputs when studies fail and when a cache is resumed: a run that encodes nothing leaves
no cache behind (and keeps the one it was pointed at), a resume never mixes what it should not."""
import os
import subprocess
import sys

from conftest import unencodable_shards
from nvfm import features
from nvfm.loader import write_synthetic_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def encode(shards, out, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "encode.py"), f"--shards={shards}",
                           "--encoder=random:tiny", f"--out={out}", "--device=cpu", *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_run_that_encodes_nothing_leaves_no_cache_and_keeps_the_old_one(tmp_path):
    """Every study failing exited 1 but left DIR/index.json with 0 studies (a valid-looking empty cache a
    later train_probe / evaluate opens as finished); with --overwrite=True it first emptied the good
    2-study cache it was pointed at. Now nothing is created, and an existing cache keeps its studies."""
    bad = unencodable_shards(str(tmp_path / "bad"))
    r = encode(bad, tmp_path / "new")
    assert r.returncode == 1 and "every one of the 2 studies to encode failed" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "new").exists()
    good = write_synthetic_shards(str(tmp_path / "good"), n=2, seed=0, shape=(8, 32, 32))
    out = tmp_path / "cache"
    assert encode(good, out).returncode == 0
    before = {name: (out / name).read_bytes() for name in ("index.json", "emb.f16", "coords.i32")}
    assert len(features.FeatureCache(str(out))) == 2
    r = encode(bad, out, "--overwrite=True")
    assert r.returncode == 1 and "every one of the 2 studies to encode failed" in r.stderr, r.stdout + r.stderr
    assert {name: (out / name).read_bytes() for name in before} == before
    # a run that does encode something still overwrites
    r = encode(write_synthetic_shards(str(tmp_path / "good2"), n=3, seed=4, shape=(8, 32, 32)), out, "--overwrite=True")
    assert r.returncode == 0 and len(features.FeatureCache(str(out))) == 3


def test_a_cache_is_not_resumed_from_other_shards(tmp_path):
    """Resuming a cache with a shard set preprocessed again (same study keys, other volumes) skipped the
    cached studies and added the rest: the cache mixed features of two shard sets, exit 0. Now a
    one-line error, the cache untouched;
    the same shards moved, or extended with new studies, still resume."""
    import shutil
    a = write_synthetic_shards(str(tmp_path / "a"), n=2, seed=0, shape=(16, 64, 64))
    out = tmp_path / "cache"
    assert encode(a, out).returncode == 0
    before = {name: (out / name).read_bytes() for name in ("index.json", "emb.f16", "coords.i32")}
    again = write_synthetic_shards(str(tmp_path / "again"), n=4, seed=1, shape=(16, 80, 80))
    r = encode(again, out)
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1, r.stdout + r.stderr
    assert "2 cached studies were encoded from other shards" in err and "study-synthetic-0" in err, err
    assert {name: (out / name).read_bytes() for name in before} == before
    moved = str(tmp_path / "moved")
    shutil.copytree(a, moved)
    r = encode(moved, out)
    assert r.returncode == 0 and "resuming, 2 studies already" in r.stdout, r.stdout + r.stderr
    grown = write_synthetic_shards(str(tmp_path / "grown"), n=4, seed=0, shape=(16, 64, 64))  # a's 2 studies + 2
    r = encode(grown, out)
    assert r.returncode == 0 and "resuming, 2 studies already" in r.stdout, r.stdout + r.stderr
    fresh = tmp_path / "fresh"
    assert encode(grown, fresh).returncode == 0  # the resumed cache holds what a fresh run of the grown set does
    c, f = features.FeatureCache(str(out)), features.FeatureCache(str(fresh))
    assert sorted(c.study_keys()) == sorted(f.study_keys()) and len(c) == 4
    for k in f.study_keys():
        assert [e["n"] for e in c.index["studies"][k]] == [e["n"] for e in f.index["studies"][k]]
