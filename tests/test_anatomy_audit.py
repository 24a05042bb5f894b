"""nvfm.anatomy against independent computations: scipy.ndimage's order-0 lookup, sklearn's brute-force
cosine neighbours and Jaccard score, and hand-worked geometry on tiny synthetic templates and affines."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage as ndi

from nvfm import anatomy
from nvfm import phantom_anatomy as pa
from nvfm.grounding import to_world, token_box_points


def _template(tissue, affine=None):
    """A stand-in for phantom_anatomy.Anatomy: only .tissue and .affine (template voxel -> RAS mm) are read."""
    return SimpleNamespace(tissue=tissue, affine=np.eye(4) if affine is None else np.asarray(affine, np.float64))


def test_brain_tokens_resolve_half_voxel_ties_like_scipy():
    """Canonical voxel i lands on template voxel i + 0.5 (a tie on every axis). Brain = odd z slabs; each token's
    sample points sit at z = 0.5 and 3.5 (+4 per token), which scipy's order-0 rule (voxel i spans [i - 0.5, i + 0.5))
    sends to voxels 1 (brain) and 4: half brain -> a brain token. np.rint's half-to-even sent them to 0 and 4: none."""
    tissue = np.zeros((14, 40, 40), np.uint8)
    tissue[1::2] = pa.GM
    coords = np.argwhere(np.ones((3, 2, 2), bool))
    aff = np.eye(4)
    aff[:3, 3] = 0.5
    got = anatomy.brain_tokens(coords, aff, np.eye(4), anat=_template(tissue))
    pts = to_world(token_box_points(coords, per_axis=(2, 3, 3)), aff)          # template voxel coords (identity)
    brain = np.isin(tissue, (pa.GM, pa.WM, pa.VENT)).astype(np.float64)
    frac = ndi.map_coordinates(brain, pts.reshape(-1, 3).T, order=0, mode="grid-constant").reshape(pts.shape[:2])
    np.testing.assert_array_equal(got, frac.mean(1) >= 0.5)
    assert got.all()


def test_brain_tokens_keep_the_patient_left_on_the_left():
    """Hand-worked laterality. Template (64,)*3, 1 mm, index (i, j, k) = RAS (x, y, z) + 32: brain only in the
    patient's left half (x < 0, i <= 31). The subject's template sits 16 mm to the right (world x = template x + 16).
    Canonical (d, h, w) -> RAS: x = 40 - w (w runs right to left, as after an LPS-style flip), y = 15 - h, z = 2 d - 7.
    A token's w samples are 16 gw + {0, 7.5, 15}, template voxel i = 56 - w (ties up): gw = 0 -> i 56, 48.5, 41: none;
    gw = 1 -> 40, 32.5, 25: 1/3; gw = 2, 3 -> all brain. So brain tokens = gw in {2, 3}, whatever d and h.
    A swapped x axis would give gw in {0, 1, 2}; applying world_from_template instead of its inverse, none."""
    tissue = np.zeros((64, 64, 64), np.uint8)
    tissue[:32] = pa.WM
    tpl = np.eye(4)
    tpl[:3, 3] = -32.0
    rec = np.array([[0.0, 0, -1, 40], [0, -1, 0, 15], [2, 0, 0, -7], [0, 0, 0, 1]])
    wft = np.eye(4)
    wft[0, 3] = 16.0
    coords = np.argwhere(np.ones((2, 2, 4), bool))
    got = anatomy.brain_tokens(coords, rec, wft, anat=_template(tissue, tpl))
    np.testing.assert_array_equal(got, np.isin(coords[:, 2], (2, 3)))


def _centre(coords, aff):
    """Hand rule: a token's box centre is its first voxel + (patch - 1) / 2 = + (1.5, 7.5, 7.5), mapped to mm."""
    v = np.asarray(coords) * [4, 16, 16] + [1.5, 7.5, 7.5]
    return v @ aff[:3, :3].T + aff[:3, 3]


def test_patch_matching_equals_a_brute_force_cosine_neighbour():
    """4500 tokens of A (past the 4096-row chunk) into 1600 of B under two different oblique affines: errors
    against sklearn's brute-force cosine neighbour and the hand box centres."""
    from sklearn.neighbors import NearestNeighbors
    rng = np.random.default_rng(0)
    ca, cb = np.argwhere(np.ones((5, 30, 30), bool)), np.argwhere(np.ones((4, 20, 20), bool))
    A = np.diag([2.0, 0.9, 0.9, 1.0])
    A[:3, 3] = [-30, 10, 5]
    B = np.array([[0, 0, -0.9, 200], [0, -0.9, 0, 280], [4, 0, 0, -2], [0, 0, 0, 1.0]])
    ea = rng.normal(size=(len(ca), 5))
    eb = rng.normal(size=(len(cb), 5))
    m = anatomy.patch_matching(ea, ca, A, eb, cb, B)
    nn = NearestNeighbors(n_neighbors=1, metric="cosine", algorithm="brute").fit(eb).kneighbors(ea)[1][:, 0]
    err = np.linalg.norm(_centre(ca, A) - _centre(cb, B)[nn], axis=1)
    assert m["n"] == len(ca) and 0.0 < (err <= 16).mean() < 1.0
    assert m["median_mm"] == pytest.approx(np.median(err), rel=1e-9)
    assert m["within_tol"] == pytest.approx((err <= 16.0).mean())


def test_kmeans_iou_is_the_best_cluster_jaccard():
    """Best-cluster IoU against sklearn's jaccard_score on the same standardized k-means labels; chance = the
    Jaccard of 'every token' with the brain."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import jaccard_score
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(400, 6))
    brain = rng.random(400) < 0.3
    k = anatomy.kmeans_iou(emb, brain)
    x = ((emb - emb.mean(0)) / emb.std(0)).astype(np.float32)
    lab = KMeans(n_clusters=3, n_init=4, random_state=0).fit_predict(x)
    assert k["iou"] == pytest.approx(max(jaccard_score(brain, lab == c) for c in range(3)), rel=1e-6)
    assert k["chance_iou"] == pytest.approx(jaccard_score(brain, np.ones(400, bool)))
    assert sorted(k["cluster_sizes"]) == sorted(np.bincount(lab, minlength=3).tolist())


class _Cache:
    encoder_hash = ""   # nvfm's own encoder: "pad" crop, tokens start at voxel (0, 0, 0)
    path = "/nowhere/features"

    def __init__(self, studies):
        self.studies = studies

    def study(self, key):
        return self.studies[key]


def _entry(vid, family, coords, emb):
    return dict(volume_id=vid, family=family, window="brain", modality="MR", coords=coords, emb=emb)


def test_anatomy_eval_names_a_volume_missing_from_the_shards():
    """A feature cache made from other shards: a clear error naming the cache and the volume (was a bare KeyError)."""
    rng = np.random.default_rng(2)
    coords = np.argwhere(np.ones((2, 3, 3), bool))
    cache = _Cache({"a1b2": [_entry("a1b2-s1", "T1", coords, rng.normal(size=(18, 4))),
                             _entry("a1b2-s2", "FLAIR", coords, rng.normal(size=(18, 4)))]})
    reader = SimpleNamespace(root="/nowhere/shards", volumes=[dict(volume_id="a1b2-s1", affine=np.eye(4),
                                                                  shape=(8, 48, 48))])
    with pytest.raises(ValueError, match=r"/nowhere/features: volume a1b2-s2 of study a1b2 is not in the shards "
                                         r"/nowhere/shards"):
        anatomy.anatomy_eval(cache, reader, "", ["a1b2"], {})


def test_anatomy_eval_counts_volumes_and_writes_no_identifiers(tmp_path, monkeypatch):
    """Two studies: one with T1 + FLAIR in one frame (embeddings = token centres, so matching is exact: 0 mm,
    all within 16 mm), one single-volume study (no pair; its k-means still runs). The template's brain covers the
    tokens with d = 0 only, so every volume has brain and non-brain tokens: 3 k-means volumes. The summary holds
    numbers only: no study key, demo study name or volume id."""
    tissue = np.zeros((40, 80, 80), np.uint8)       # template index = canonical voxel (identity affines)
    tissue[:4] = pa.GM
    monkeypatch.setattr(pa, "load_anatomy", lambda *a, **k: _template(tissue))
    coords = np.argwhere(np.ones((2, 3, 3), bool))
    aff = np.eye(4)
    pos = np.concatenate([_centre(coords, aff) / 50.0, np.ones((len(coords), 1))], 1)
    rng = np.random.default_rng(3)
    cache = _Cache({"k7f3": [_entry("k7f3-s1", "T1", coords, pos), _entry("k7f3-s2", "FLAIR", coords, pos)],
                    "9c0d": [_entry("9c0d-s1", "T1", coords, rng.normal(size=(18, 4)))]})
    vols = [dict(volume_id=v, affine=aff, shape=(8, 48, 48)) for v in ("k7f3-s1", "k7f3-s2", "9c0d-s1")]
    reader = SimpleNamespace(root=str(tmp_path), volumes=vols)
    for name in ("demo_0001", "demo_0002"):
        (tmp_path / "gt" / name).mkdir(parents=True)
        (tmp_path / "gt" / name / "subject.json").write_text(json.dumps({"world_from_template": np.eye(4).tolist()}))
    out = anatomy.anatomy_eval(cache, reader, str(tmp_path), ["k7f3", "9c0d"],
                               {"k7f3": "demo_0001", "9c0d": "demo_0002"})
    pm, km = out["patch_matching"], out["kmeans_brain"]
    assert pm["n_pairs"] == 1 and pm["median_mm"] == 0.0 and pm["within_16mm"] == 1.0
    assert km["n_volumes"] == 3 and km["chance_iou"] == pytest.approx(1 / 2)
    text = json.dumps(out)
    assert "NaN" not in text and not any(s in text for s in ("k7f3", "9c0d", "demo_000", "-s1", "-s2"))


def _five_studies(tmp_path, monkeypatch):
    """Template brain = canonical slab d < 4 (identity affines), so a volume of token rows d = 0, 1 has brain and
    non-brain tokens, one of d = 0 only every token brain. Studies, in order: k7f3 T1 + FLAIR (a pair, 2 k-means
    volumes); 9c0d one volume of 4 tokens (nothing); 5e1a one volume, no gt/ subject.json (nothing); 3b8e T1 of 18
    tokens + FLAIR of 5 (no pair; its T1 is clustered); 0aa1 one all-brain volume (nothing)."""
    tissue = np.zeros((40, 80, 80), np.uint8)
    tissue[:4] = pa.GM
    monkeypatch.setattr(pa, "load_anatomy", lambda *a, **k: _template(tissue))
    rng = np.random.default_rng(4)
    two, one = np.argwhere(np.ones((2, 3, 3), bool)), np.argwhere(np.ones((1, 3, 3), bool))

    def ent(vid, fam, coords):
        return _entry(vid, fam, coords, rng.normal(size=(len(coords), 4)))
    studies = {"k7f3": [ent("k7f3-s1", "T1", two), ent("k7f3-s2", "FLAIR", two), ent("k7f3-s2", "FLAIR", two)],
               "9c0d": [ent("9c0d-s1", "T1", two[:4])],
               "5e1a": [ent("5e1a-s1", "T1", two)],
               "3b8e": [ent("3b8e-s1", "T1", two), ent("3b8e-s2", "FLAIR", two[:5])],
               "0aa1": [ent("0aa1-s1", "T1", one)]}
    names = {k: f"demo_{i:04d}" for i, k in enumerate(studies)}
    for k in studies:
        if k != "5e1a":
            (tmp_path / "gt" / names[k]).mkdir(parents=True)
            (tmp_path / "gt" / names[k] / "subject.json").write_text(
                json.dumps({"world_from_template": np.eye(4).tolist()}))
    vols = [dict(volume_id=e["volume_id"], affine=np.eye(4), shape=(8, 48, 48)) for es in studies.values() for e in es]
    return _Cache(studies), SimpleNamespace(root=str(tmp_path), volumes=vols), names


def test_anatomy_eval_accounts_for_every_study_and_volume(tmp_path, monkeypatch):
    """Studies left out (over max_studies, too few tokens, no brain map, every token brain) were missing from the
    result: 6 studies gave n_pairs 1, n_volumes 3 and no word on the other 4 studies / 4 volumes. Each is counted
    now, under its reason (tallied by hand from the construction), the counts add up to the inputs (distinct
    volumes counted here from the cache), and the summary names no study."""
    cache, reader, names = _five_studies(tmp_path, monkeypatch)
    keys = list(cache.studies) + ["ffff"]           # the 6th is over max_studies=5 (never read)
    out = anatomy.anatomy_eval(cache, reader, str(tmp_path), keys, names, max_studies=5)
    st, pm, km = out["studies"], out["patch_matching"], out["kmeans_brain"]
    assert st == {"n": 6, "done": 2, "skipped": {"over max_studies=5": 1, "no volume of >= 8 tokens": 1,
                                                 "a single volume, not clustered": 2}}
    assert pm["n_pairs"] == 1 and pm["skipped"] == {"fewer than 2 volumes of >= 8 tokens": 4}
    assert km["n_volumes"] == 3 and km["skipped"] == {"fewer than 8 tokens": 2, "every token brain": 1,
                                                      "no brain map (no cohort gt/<study>/subject.json)": 1}
    n_vols = sum(len({e["volume_id"] for e in es}) for es in cache.studies.values())
    assert st["done"] + sum(st["skipped"].values()) == len(keys)
    assert pm["n_pairs"] + sum(pm["skipped"].values()) == len(cache.studies)
    assert km["n_volumes"] + sum(km["skipped"].values()) == n_vols == 7
    text = json.dumps(out)
    assert not any(s in text for s in list(cache.studies) + ["demo_000", "-s1", "-s2"])


def test_anatomy_eval_without_any_figure_is_an_error_naming_the_cache(tmp_path, monkeypatch):
    """Only studies that give neither a pair nor a k-means volume: it returned all-None figures, and evaluate.py
    --anatomy exited 0. Now a ValueError naming the cache and every reason (evaluate.py turns it into exit 1)."""
    cache, reader, names = _five_studies(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match=r"^/nowhere/features: neither a volume pair nor a k-means volume from 3 "
                                         r"studies \(1 no volume of >= 8 tokens; 2 a single volume, not clustered; "
                                         r"3 fewer than 2 volumes of >= 8 tokens; 1 fewer than 8 tokens; "
                                         r"1 no brain map \(no cohort gt/<study>/subject.json\); 1 every token brain\)$"):
        anatomy.anatomy_eval(cache, reader, str(tmp_path), ["9c0d", "5e1a", "0aa1"], names)
    with pytest.raises(ValueError, match="neither a volume pair"):   # no cohort: no brain map at all
        anatomy.anatomy_eval(cache, reader, "", ["5e1a"], names)
