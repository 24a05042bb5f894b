"""Grounding and anatomy probes: token->voxel->world geometry, NIfTI overlays, pointing game,
flipped reader, patch matching and k-means IoU."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from nvfm import anatomy, features, grounding
from nvfm.tokenize import unpatchify_reference

# canonical voxel (d, h, w) -> RAS world: x = w - 32, y = h - 32, z = 4 d  (4 mm slices)
AFF = np.array([[0, 0, 1, -32], [0, 1, 0, -32], [4, 0, 0, 0], [0, 0, 0, 1]], np.float64)
SHAPE = (8, 64, 64)   # token grid (2, 4, 4)


def test_token_map_matches_unpatchify():
    rng = np.random.default_rng(0)
    shape = (9, 40, 33)                                  # not multiples of the patch
    grid = (3, 3, 3)
    coords = np.argwhere(rng.random(grid) < 0.6).astype(np.int32)
    vals = rng.random(len(coords)).astype(np.float32)
    ours = grounding.token_map_to_volume(vals, coords, shape)
    tokens = torch.from_numpy(np.repeat(vals[:, None], 1024, 1))
    ref = unpatchify_reference(tokens, torch.from_numpy(coords), shape).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_resample_identity_shift_and_flip():
    rng = np.random.default_rng(1)
    vol = rng.random((5, 6, 7)).astype(np.float32)
    A = np.diag([2.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(grounding.resample_to_reference(vol, A, vol.shape, A), vol, atol=1e-6)
    B = A.copy()
    B[:3, 3] = [2.0, 1.0, 0.0]                           # reference grid shifted by one voxel in d and h
    out = grounding.resample_to_reference(vol, A, (4, 5, 7), B)
    np.testing.assert_allclose(out, vol[1:, 1:, :], atol=1e-6)
    F = A.copy()
    F[2, 2], F[2, 3] = -1.0, 6.0                         # reference with the last axis reversed
    np.testing.assert_allclose(grounding.resample_to_reference(vol, A, vol.shape, F, order=0), vol[:, :, ::-1])


def test_mask_lookup_and_lr_axis():
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[2:4, 5:7, 0:2] = 1
    M = np.eye(4)
    M[:3, 3] = [10, 20, 30]
    pts = np.array([[12.2, 25.4, 30.6], [12, 24, 30], [0, 0, 0]], float)
    assert grounding.mask_lookup(pts, mask, M).tolist() == [True, False, False]
    assert grounding.lr_axis({"orientation": "IPR", "affine": AFF.tolist()}) == 2
    assert grounding.lr_axis({"orientation": "LPS", "affine": AFF.tolist()}) == 0
    assert grounding.lr_axis({"affine": AFF.tolist()}) == 2   # from the affine: w runs along x


class FakeReader:
    def __init__(self, modality="CT"):
        rng = np.random.default_rng(2)
        self.data = rng.integers(0, 255, (2,) + SHAPE, dtype=np.uint8)
        self.mask = np.ones(SHAPE, np.uint8)
        self.volumes = [dict(volume_id="vol0000aaaa", study_key="k1", modality=modality, family="CT",
                             shape=list(SHAPE), affine=AFF.tolist(), orientation="SPR")]

    def volume(self, i):
        return self.data, self.mask


def test_flipped_reader_mirrors_left_right():
    r = FakeReader()
    f = grounding.FlippedReader(r)
    d, m = f.volume(0)
    np.testing.assert_array_equal(d, r.data[:, :, :, ::-1])
    np.testing.assert_array_equal(f.window(0, "bone"), (r.data[1, :, :, ::-1] & 15) * 17)


class AttendFeature0(torch.nn.Module):
    """Stub probe: attention = softmax of feature 0 per bag, instance logit = feature 1."""

    def forward(self, x, cu, return_maps=False):
        from nvfm import probe
        seg = probe.bag_ids(cu, x.shape[0])
        a = probe.segment_softmax(x[:, :1] * 10, seg, len(cu) - 1)
        logits = probe.segment_sum(a * x[:, 1:2], seg, len(cu) - 1)
        return (logits, a, x[:, 1:2]) if return_maps else logits


@pytest.mark.parametrize("peak,hit", [((0, 0, 2), True), ((1, 3, 0), False)])
def test_pointing_game_end_to_end(tmp_path, peak, hit):
    # lesion cube at world x 10..14, y -20..-16, z 2..6 -> canonical w 42..46, h 12..16, d 0.5..1.5
    cohort = tmp_path / "cohort"
    os.makedirs(cohort / "gt" / "demo-0001")
    lm = np.ones((5, 5, 5), np.uint8)
    LA = np.eye(4)
    LA[:3, 3] = [10, -20, 2]
    nib.save(nib.Nifti1Image(lm, LA), str(cohort / "gt" / "demo-0001" / "lesion_0.nii.gz"))
    fj = tmp_path / "findings.jsonl"
    fj.write_text(json.dumps({"study_key": "k1", "study": "demo-0001", "lesions": [
        {"diagnosis": "intraparenchymal_hemorrhage", "labels": ["intraparenchymal_hemorrhage"], "side": "right",
         "mask": "gt/demo-0001/lesion_0.nii.gz"}]}) + "\n")
    coords = np.argwhere(np.ones((2, 4, 4), bool)).astype(np.int32)
    emb = np.zeros((len(coords), 4), np.float32)
    emb[:, 1] = 1.0
    emb[np.all(coords == peak, 1), 0] = 5.0                 # the token the stub attends to
    cdir = str(tmp_path / "cache")
    with features.FeatureWriter(cdir, "h", 4) as w:
        w.add("k1", [dict(volume_id="vol0000aaaa", family="CT", window="brain", modality="CT", coords=coords, emb=emb)])
    cache = features.FeatureCache(cdir)
    data = dict(keys=["k1"], y=np.array([[1.0]]), ck={"label_names": ["intraparenchymal_hemorrhage"]},
                models=[AttendFeature0()], cache=cache, wins=None)
    out = str(tmp_path / "overlays")
    res = grounding.pointing_game_eval(data, FakeReader(), str(cohort), str(fj), overlay_dir=out, n_overlays=1)
    assert res["n"] == 1 and res["accuracy"] == (1.0 if hit else 0.0)
    # tokens overlapping the lesion: gz 0 (z 2..6 mm = slices 0.5..1.5), gy 0..1 (h 12..16), gx 2 -> 2 of 32
    assert res["chance"] == pytest.approx(2 / 32)
    att = [p for p in res["overlays"] if "_attention_" in p][0]
    img = nib.load(att)
    np.testing.assert_allclose(img.affine, AFF)
    a = np.asarray(img.dataobj)
    assert a.shape == SHAPE
    z, y, x = np.unravel_index(np.argmax(a), a.shape)
    assert (z // 4, y // 16, x // 16) == peak
    assert "k1" not in att                                   # file names carry the demo name only
    # a class the probe never learned (no training negatives, say) has no map to score: no trial
    untrained = dict(data, ck=dict(data["ck"], trained_classes=[False]))
    res = grounding.pointing_game_eval(untrained, FakeReader(), str(cohort), str(fj))
    assert res["n"] == 0 and res["accuracy"] is None
    les = nib.load(att.replace("_attention_intraparenchymal_hemorrhage", "_lesion_intraparenchymal_hemorrhage"))
    lv = np.asarray(les.dataobj)                             # the mask resampled onto the canonical grid
    assert lv[1, 12:17, 42:47].all() and lv.sum() == 25


def test_patch_matching_and_kmeans():
    rng = np.random.default_rng(3)
    coords = np.argwhere(np.ones((3, 5, 5), bool)).astype(np.int32)
    centers = anatomy.token_centers(coords, AFF)
    # embeddings that encode position: matching is perfect, random ones are at chance
    pos_emb = np.concatenate([centers / 50.0, np.ones((len(centers), 1))], 1)
    m = anatomy.patch_matching(pos_emb, coords, AFF, pos_emb, coords, AFF)
    assert m["median_mm"] == 0.0 and m["within_tol"] == 1.0 and m["chance_median_mm"] > 16
    r = anatomy.patch_matching(rng.normal(size=(75, 8)), coords, AFF, rng.normal(size=(75, 8)), coords, AFF)
    assert r["median_mm"] > 16
    brain = rng.random(300) < 0.4
    emb = rng.normal(size=(300, 6)) * 0.1
    emb[brain, 0] += 3.0
    emb[~brain & (rng.random(300) < 0.5), 1] += 3.0
    k = anatomy.kmeans_iou(emb, brain)
    assert k["iou"] == pytest.approx(1.0) and k["chance_iou"] == pytest.approx(brain.mean())


def test_lesion_token_cover_fraction_and_lesion_index(tmp_path):
    """Share of each token box inside the lesion masks (largest over lesions) and which lesion."""
    import nibabel as nib
    from nvfm.grounding import lesion_token_cover
    m0 = np.zeros((4, 32, 32), np.uint8)
    m0[:, :16, :8] = 1               # half of token (0, 0, 0) along x
    m1 = np.zeros((4, 32, 32), np.uint8)
    m1[:, 16:, :16] = 1              # all of token (0, 1, 0)
    for i, m in enumerate((m0, m1)):
        nib.save(nib.Nifti1Image(m, np.eye(4)), str(tmp_path / f"lesion_{i}.nii.gz"))

    class Cache:
        def __contains__(self, k):
            return k == "s"

        def study(self, k):
            return [{"volume_id": 7, "coords": np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0]])}]

    class Reader:
        volumes = [{"volume_id": 7, "affine": np.eye(4).tolist()}]

    rows = [{"study_key": "s", "lesions": [{"mask": "lesion_0.nii.gz"}, {"mask": "lesion_1.nii.gz"}]},
            {"study_key": "not-cached", "lesions": []}]
    cover = lesion_token_cover(str(tmp_path), Reader(), rows, Cache())
    assert list(cover) == [("s", 7)]
    frac, which = cover["s", 7]
    np.testing.assert_allclose(frac, [0.5, 0.0, 1.0])
    assert which.tolist() == [0, -1, 1]


def test_flip_test_leaves_out_studies_without_tokens_in_the_probes_windows(tmp_path, monkeypatch):
    """An MR study under a probe of CT windows has an empty bag: the flip test crashed on
    torch.cat([]) (the `if ents else` fallback sat in a comment), and as code that fallback would
    have scored an empty bag against an empty bag (a tie). It is left out and counted; the flip
    AUROC over the other studies equals sklearn's on the probe's own logit changes."""
    from sklearn.metrics import roc_auc_score
    from nvfm import model as nvfm_model
    from nvfm import probe as P
    rng = np.random.default_rng(0)
    keys = ["c0", "c1", "c2", "c3", "m0"]
    sides = {"c0": {"left"}, "c1": {"left"}, "c2": {"right"}, "c3": {"right"}, "m0": {"left"}}
    win = {k: "mr" if k == "m0" else "brain" for k in keys}
    emb = {k: rng.normal(size=(6, 4)).astype(np.float32) for k in keys}
    flipped = {k: rng.normal(size=(6, 4)).astype(np.float32) for k in keys}
    with features.FeatureWriter(str(tmp_path / "cache"), "h", 4) as w:
        for k in keys:
            w.add(k, [dict(volume_id=k, family="CT", window=win[k], modality="MR" if k == "m0" else "CT",
                           coords=np.zeros((6, 3), np.int32), emb=emb[k])])

    class Reader:
        volumes = [dict(study_key=k, volume_id=k) for k in keys]

    encoded = dict(flipped)

    def fake_encode(enc, reader, idx, device=None, **rules):
        k = keys[idx[0]]
        return [dict(window=win[k], emb=torch.from_numpy(encoded[k]))] if k in encoded else []
    monkeypatch.setattr(nvfm_model, "encode_study", fake_encode)
    monkeypatch.setattr(grounding, "open_encoder_from_hash", lambda *a: None)
    torch.manual_seed(0)
    m = P.make_probe("mean_pool", 4, 2).eval()
    ck = {"label_names": ["lesion_left", "lesion_right"], "encoder_hash": "h", "thresholds": [0.0, 0.0]}
    data = dict(keys=keys, ck=ck, models=[m], cache=features.FeatureCache(str(tmp_path / "cache")), wins={"brain"})
    res = grounding.flip_test_eval(data, Reader(), sides)
    assert res["n"] == 4 and res["n_no_tokens"] == 1 and res["n_left"] == 2

    def logits(x):
        with torch.no_grad():
            return m(torch.from_numpy(x.astype(np.float16).astype(np.float32)),
                     torch.tensor([0, len(x)], dtype=torch.int32))[0].numpy()
    d = np.array([logits(flipped[k]) - logits(emb[k]) for k in keys[:4]])      # (4, 2): dL, dR
    assert res["auroc"] == pytest.approx(roc_auc_score([1, 1, 0, 0], d[:, 1] - d[:, 0]), abs=1e-6)
    assert res["auroc_dL"] == pytest.approx(roc_auc_score([1, 1, 0, 0], -d[:, 0]), abs=1e-6)
    lo = np.array([logits(emb[k]) for k in keys[:4]])
    assert res["n_flagged"] == int(((lo[:, 0] >= 0) | (lo[:, 1] >= 0)).sum())
    # lesion_left without a fitted threshold (no positives on the selection split): nothing is "flagged"
    unfit = dict(data, ck=dict(ck, sel_labels=torch.tensor([[0, 1], [0, 0]], dtype=torch.uint8)))
    res = grounding.flip_test_eval(unfit, Reader(), sides)
    assert res["n_flagged"] is None and res["auroc_flagged"] is None and res["auroc"] is not None
    # lesion_right never learned (all its training studies one way): its logit changes are noise, not a figure
    res = grounding.flip_test_eval(dict(data, ck=dict(ck, trained_classes=[True, False])), Reader(), sides)
    assert res["auroc"] is None and res["n"] == 0 and "never learned" in res["note"]
    # the cache has brain tokens of c0 but the shards give none: another shard set, an error
    del encoded["c0"]
    with pytest.raises(RuntimeError, match=r"study 'c0' has tokens of the windows \['brain'\] in the feature cache "
                                           r"but no such volume in --shards"):
        grounding.flip_test_eval(data, Reader(), sides)


def _volume_affine(rng, oblique):
    """Canonical voxel (d, h, w) -> world mm: 4 mm slices, ~1 mm in plane, rotated (oblique) or axes permuted."""
    spacing = np.array([4.0, 1.0, 1.0]) * rng.uniform(0.9, 1.1, 3)
    if oblique:
        R, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    else:
        R = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    A = np.eye(4)
    A[:3, :3] = R * spacing
    A[:3, 3] = rng.uniform(-50, 50, 3)
    return A


def _mask_near(rng, A, centre_vox, oblique):
    """A small random lesion mask (1-3 single voxels and a small block, 0.8-2.5 mm voxels) around the
    canonical voxel centre_vox of the volume with affine A -> (mask, mask affine)."""
    mshape = tuple(rng.integers(6, 14, 3))
    mask = np.zeros(mshape, np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        mask[tuple(rng.integers(0, mshape))] = 1
    if rng.random() < 0.5:
        i = rng.integers(0, np.array(mshape) - 2)
        mask[i[0]:i[0] + rng.integers(1, 4), i[1]:i[1] + rng.integers(1, 4), i[2]:i[2] + rng.integers(1, 4)] = 1
    vs = rng.uniform(0.8, 2.5, 3)
    if oblique:
        R = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    else:
        R = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], 3)
    M = np.eye(4)
    M[:3, :3] = R * vs
    centre_world = A[:3, :3] @ centre_vox + A[:3, 3]
    M[:3, 3] = centre_world - M[:3, :3] @ (np.array(mshape) / 2.0) + rng.uniform(-3, 3, 3)
    return mask, M


# the 4 x 4 x 4 points sampled in a 4 x 16 x 16 box (token_box_points): voxel offsets (d, h, w)
SAMPLES = np.stack(np.meshgrid(np.arange(4.0), [0.0, 5, 10, 15], [0.0, 5, 10, 15], indexing="ij"), -1).reshape(-1, 3)


def _brute_force_overlap(coords, A, mask, M, origin):
    """Per token, one by one: how many of its 64 sample points and of its 4*16*16 voxel centres have a
    nonzero nearest mask voxel, and whether the centre of a nonzero mask voxel lies in its box
    [start - 0.5, start + patch - 0.5) (canonical voxels)."""
    return _brute_force_union(coords, A, [(mask, M)], origin)


def _brute_force_union(coords, A, masks, origin):
    """_brute_force_overlap of the union of masks [(mask, M)]: a point counts when its nearest voxel is
    nonzero in any of them, a box holds a mask voxel's centre when it holds one of any mask's."""
    patch = np.array(grounding.PATCH)
    box = np.stack(np.meshgrid(*[np.arange(p) for p in patch], indexing="ij"), -1).reshape(-1, 3)
    centres = np.concatenate([(np.linalg.inv(A) @ (M @ np.c_[nz, np.ones(len(nz))].T)).T[:, :3]
                              for mask, M in masks for nz in [np.argwhere(mask != 0)]])   # canonical voxel coords

    def in_mask(vox):   # scipy's nearest voxel (order 0): voxel i spans [i - 0.5, i + 0.5), outside 0
        hit = np.zeros(len(vox), bool)
        for mask, M in masks:
            ijk = (np.linalg.inv(M) @ A @ np.c_[vox, np.ones(len(vox))].T)[:3]
            hit |= map_coordinates(mask.astype(np.float32), ijk, order=0, mode="grid-constant") != 0
        return int(np.count_nonzero(hit))
    sampled, counts, centre_in = [], [], []
    for c in coords:
        start = c * patch + np.asarray(origin)
        sampled.append(in_mask(start + SAMPLES))
        counts.append(in_mask(start + box))
        centre_in.append(bool(np.any(np.all((centres >= start - 0.5) & (centres < start + patch - 0.5), 1))))
    return np.array(sampled), np.array(counts), np.array(centre_in)


def test_lesion_token_cover_counts_a_lesion_between_the_sample_points(tmp_path):
    """A 2-voxel lesion at canonical (1, 2, 2) and (1, 2, 3) lies between the 4 x 4 x 4 points the box was
    sampled at (h, w in {0, 5, 10, 15}): token (0, 0, 0) got share 0, a lesion-free label in the monitor's
    lesion-token probe. Every voxel of the box looked up (by hand here): 2 of 1024 are in the lesion."""
    from nvfm.grounding import lesion_token_cover
    m = np.zeros((5, 5, 5), np.uint8)
    m[1, 1, 1] = m[2, 1, 1] = 1
    LA = np.eye(4)
    LA[:3, 3] = [-31, -31, 3]     # voxel (1, 1, 1) at x -30, y -30, z 4: canonical w 2, h 2, d 1
    nib.save(nib.Nifti1Image(m, LA), str(tmp_path / "lesion.nii.gz"))

    class Cache:
        def __contains__(self, k):
            return True

        def study(self, k):
            return [{"volume_id": 0, "coords": np.array([[0, 0, 0], [0, 0, 1], [1, 0, 0]])}]

    class Reader:
        volumes = [{"volume_id": 0, "affine": AFF.tolist(), "shape": list(SHAPE)}]

    rows = [{"study_key": "s", "lesions": [{"mask": "lesion.nii.gz"}]}]
    frac, which = lesion_token_cover(str(tmp_path), Reader(), rows, Cache())["s", 0]
    np.testing.assert_allclose(frac, [2 / 1024, 0, 0])
    assert which.tolist() == [0, -1, -1]


def _random_tokens_and_lesion(rng, oblique):
    """A random volume's token origin (pad or centre crop), 80% of its token grid, its affine and a
    small lesion mask near it: (origin, coords (n, 3), affine, mask, mask affine)."""
    shape = tuple(rng.integers([6, 20, 20], [14, 50, 50]))
    origin = grounding.token_origin(shape, rng.choice(["pad", "centre"]))
    grid = [-(-(s - o) // p) for s, o, p in zip(shape, origin, grounding.PATCH)]
    coords = np.argwhere(rng.random(grid) < 0.8)
    A = _volume_affine(rng, oblique)
    mask, M = _mask_near(rng, A, rng.uniform(0, shape), oblique)
    return origin, coords, A, mask, M


@pytest.mark.parametrize("oblique", [False, True])
def test_token_mask_share_against_brute_force(oblique):
    """Random small lesions (some smaller than a canonical voxel's spacing), random voxel sizes, axes
    permuted, mirrored or oblique, pad and centre-crop token origins, against a token-by-token brute
    force: the count of the box's 1024 voxel centres in the mask / 1024, or one voxel's share where
    only a mask voxel's centre is in the box; and 0 (lesion-free) only where the box does not overlap
    the lesion at all. (The share of 64 sample points was used: boxes whose lesion fell between or on
    the points got another share.)"""
    rng = np.random.default_rng(7 + oblique)
    n_touch = n_between = n_sub = n_off = 0
    for _ in range(25):
        origin, coords, A, mask, M = _random_tokens_and_lesion(rng, oblique)
        got = grounding.token_mask_share(coords, A, mask, M, origin=origin)
        sampled, count, centre_in = _brute_force_overlap(coords, A, mask, M, origin)
        want = np.where(count > 0, count, centre_in) / 1024
        np.testing.assert_array_equal(got, want)
        assert np.all(got[(count > 0) | centre_in] > 0) and np.all(got[(count == 0) & ~centre_in] == 0)
        n_between += int(np.sum((sampled == 0) & (count > 0)))
        n_touch += int(np.sum(count > 0))
        n_sub += int(np.sum((count == 0) & centre_in))
        n_off += int(np.sum((sampled > 0) & (sampled / 64 != count / 1024)))
    # the draws cover every kind of overlap, and boxes where the sampled share is not the voxel share
    assert n_touch > 10 and n_between > 3 and n_sub > 3 and n_off > 3, (n_touch, n_between, n_sub, n_off)


@pytest.mark.parametrize("oblique", [False, True])
def test_token_union_share_against_brute_force(oblique):
    """2-3 random small lesions around one spot, each on a grid of its own (voxel sizes, axes permuted or
    oblique), against the token-by-token brute force on their union (a voxel centre is in it when its
    nearest voxel is nonzero in any mask). The draws include boxes that two lesions share, where the union covers more
    than the larger of the two (the largest single lesion was what lesion_token_cover labelled)."""
    rng = np.random.default_rng(17 + oblique)
    n_shared = n_more = 0
    for _ in range(40):
        origin, coords, A, mask, M = _random_tokens_and_lesion(rng, oblique)
        centre = np.linalg.inv(A) @ M @ np.r_[np.array(mask.shape) / 2.0, 1]
        masks = [(mask, M)] + [_mask_near(rng, A, centre[:3] + rng.uniform(-2, 2, 3), oblique)
                               for _ in range(int(rng.integers(1, 3)))]
        got = grounding.token_union_share(coords, A, masks, origin=origin)
        sampled, count, centre_in = _brute_force_union(coords, A, masks, origin)
        want = np.where(count > 0, count, centre_in) / 1024
        np.testing.assert_array_equal(got, want)
        each = np.array([grounding.token_mask_share(coords, A, m, mm, origin=origin) for m, mm in masks])
        n_shared += int(np.sum(np.count_nonzero(each, 0) > 1))
        n_more += int(np.sum(want > each.max(0)))
    assert n_shared > 10 and n_more > 5, (n_shared, n_more)


def test_lesion_token_cover_labels_a_token_by_the_union_and_its_majority_kind(tmp_path):
    """Hand-made masks (identity affines, lesion edges on the sample points, so sampled share = voxel count).
    Token 0: metastases A (z 0) and B (z 1), 25% each, glioma C (z 2-3, x 0-11) 37.5%: union 87.5%, a
    metastasis token (50% of it) although C is the largest single lesion. Token 1: MS lesions D and E touching
    at x = 24, 37.5% each: union 75% (was labelled 37.5%, a partial token, left out of the lesion probes).
    Token 2: glioma C (z 2-3, x 32-35) 12.5%. Against a brute-force voxel count per token; then the monitor's
    lesion-token labels and kinds (ProbeSet.lesion_labels) read off it: lesion, lesion, partial."""
    from nvfm.monitor import ProbeSet
    shape = (4, 16, 48)
    m = {k: np.zeros(shape, np.uint8) for k in "ABCDE"}
    m["A"][0, :, :16] = 1
    m["B"][1, :, :16] = 1
    m["C"][2:, :, :12] = 1
    m["C"][2:, :, 32:36] = 1
    m["D"][:3, :, 16:24] = 1
    m["E"][:3, :, 24:32] = 1
    dx = {"A": "metastasis", "B": "metastasis", "C": "glioma", "D": "ms", "E": "ms"}
    for k, a in m.items():
        nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / f"{k}.nii.gz"))

    class Cache(dict):
        encoder_hash = ""

        def study(self, k):
            return self[k]

    class Reader:
        volumes = [{"volume_id": 0, "affine": np.eye(4).tolist(), "shape": list(shape)}]

    coords = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2]])
    cache = Cache(s=[{"volume_id": 0, "coords": coords}])
    rows = [{"study_key": "s", "lesions": [{"diagnosis": dx[k], "mask": f"{k}.nii.gz"} for k in "ABCDE"]}]
    frac, which = grounding.lesion_token_cover(str(tmp_path), Reader(), rows, cache)["s", 0]
    # brute force: every voxel of each token's box
    names = list("ABCDE")
    want_frac, want_kind = [], []
    for t in range(3):
        box = (slice(None), slice(None), slice(16 * t, 16 * t + 16))
        want_frac.append(np.any([m[k][box] for k in names], 0).mean())
        kinds = {d: np.any([m[k][box] for k in names if dx[k] == d], 0).mean() for d in dict.fromkeys(dx.values())}
        want_kind.append(max(kinds, key=kinds.get))   # the first listed on a tie
    np.testing.assert_allclose(frac, want_frac)
    np.testing.assert_allclose(frac, [0.875, 0.75, 0.125])                       # by hand
    assert [dx[names[i]] for i in which] == want_kind == ["metastasis", "ms", "glioma"]
    assert which.tolist() == [0, 3, 2]   # of the kind's lesions the largest, the first listed on a tie
    probes = object.__new__(ProbeSet)     # the monitor's lesion-token probe labels, from this cover
    probes.token_labels, probes.cohort, probes.reader, probes.findings = None, str(tmp_path), Reader(), rows
    labels = probes.lesion_labels(cache)
    assert labels["s", 0].tolist() == [1, 1, -1]
    assert probes.token_kinds["s", 0].tolist() == ["metastasis", "ms", "glioma"]


@pytest.mark.parametrize("oblique", [False, True])
def test_mask_token_hits_against_its_definition(oblique):
    """mask_token_hits (searching only tokens near the mask's nonzero voxels) against its definition,
    token by token: one of the 4 x 4 x 4 points at offsets (0..3, 0/5/10/15, 0/5/10/15) of the box has
    a nonzero nearest mask voxel, or the centre of a nonzero mask voxel lies in the box. Includes
    empty masks and lesions on the mask array's border."""
    rng = np.random.default_rng(11 + oblique)
    n_hit = 0
    for t in range(25):
        origin, coords, A, mask, M = _random_tokens_and_lesion(rng, oblique)
        if t % 5 == 0:
            mask[:] = 0
        if t % 5 == 1:
            mask[0, :, -1] = 1
        got = grounding.mask_token_hits(coords, A, mask, M, origin=origin)
        sampled, _, centre_in = _brute_force_overlap(coords, A, mask, M, origin)
        want = ((sampled > 0) | centre_in).tolist()
        assert got.tolist() == want
        n_hit += sum(want)
    assert n_hit > 20


def test_nearest_mask_voxel_of_a_tie_is_the_upper_one_everywhere_as_in_scipy_order_0():
    """On a mask grid offset by half a canonical voxel every sample point is a tie between two mask
    voxels: np.rint's half-to-even sent neighbouring ties alternately down and up (and the cropped
    block lookup, at another offset, the other way). The rule is scipy's order-0 one: voxel i spans
    [i - 0.5, i + 0.5), a tie goes up; checked by hand and against map_coordinates."""
    mask = np.zeros((6, 1, 1), np.float32)
    mask[1::2] = 1                                   # 0 1 0 1 0 1 along i
    x = np.array([-0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    world = np.stack([x, 0 * x, 0 * x], -1)
    want = map_coordinates(mask, world.T, order=0, mode="grid-constant") != 0
    assert want.tolist() == [False, True, False, True, False, True, False]   # by hand: floor(x + 0.5)
    assert grounding.mask_lookup(world, mask, np.eye(4)).tolist() == want.tolist()
    # token shares: mask voxel i at canonical z = i + 0.5, odd z planes of the mask lesion
    M = np.eye(4)
    M[0, 3] = 0.5
    m = np.zeros((8, 16, 16), np.float32)
    m[1::2] = 1
    coords = np.array([[0, 0, 0], [1, 0, 0]])
    pts = grounding.to_world(grounding.token_box_points(coords), np.eye(4))
    by_scipy = (map_coordinates(m, (pts - 0.5 * np.eye(3)[0]).reshape(-1, 3).T, order=0, mode="grid-constant")
                .reshape(2, -1) != 0).mean(1)
    np.testing.assert_array_equal(by_scipy, [0.5, 0.5])   # by hand: z 0..3 -> mask -0.5..2.5 -> 0, 1, 2, 3
    np.testing.assert_array_equal(grounding.token_mask_share(coords, np.eye(4), m, M), by_scipy)
    # a one-voxel lesion between the sample points (h, w = 2): the block lookup counts the box's voxel
    # centres whose nearest mask voxel is it, z = 1 only (mask 0.5 -> 1; z = 2 is at 1.5 -> 2)
    one = np.zeros((8, 16, 16), np.float32)
    one[1, 2, 2] = 1
    vox = np.stack(np.meshgrid(np.arange(4.0), np.arange(16.0), np.arange(16.0), indexing="ij"), 0).reshape(3, -1)
    n = np.count_nonzero(map_coordinates(one, vox - np.array([[0.5], [0], [0]]), order=0, mode="grid-constant"))
    assert n == 1
    np.testing.assert_array_equal(grounding.token_mask_share(coords[:1], np.eye(4), one, M), [n / 1024])
    # the order-0 resampling (overlays, masks into a reference grid) takes the same voxel
    res = grounding.resample_to_reference(m, M, (8, 1, 1), np.eye(4), order=0)
    z = np.arange(8.0)
    assert (res[:, 0, 0] != 0).tolist() == grounding.mask_lookup(np.stack([z, 0 * z, 0 * z], -1), m, M).tolist()


def test_the_flip_test_is_not_run_on_a_cache_of_another_precision(tmp_path, monkeypatch):
    """flip_test_eval re-encodes the mirrored volumes on `device` and compares their logits with the
    cached volumes': on a bf16-autocast (GPU) cache flipped on the CPU it mixed the two precisions and
    returned an AUROC (the check sat in evaluate.main only, so another caller ran it). Not run, a note
    says why; a cache of the device's own precision is flip-tested."""
    from nvfm import model as nvfm_model
    from nvfm import probe as P
    rng = np.random.default_rng(0)
    keys = ["c0", "c1", "c2", "c3"]
    sides = {"c0": {"left"}, "c1": {"left"}, "c2": {"right"}, "c3": {"right"}}
    encoded = []
    monkeypatch.setattr(nvfm_model, "encode_study", lambda enc, reader, idx, device=None, **rules: encoded.append(
        device) or [dict(window="brain", emb=torch.from_numpy(rng.normal(size=(6, 4)).astype(np.float32)))])
    monkeypatch.setattr(grounding, "open_encoder_from_hash", lambda *a: None)

    class Reader:
        volumes = [dict(study_key=k, volume_id=k) for k in keys]
    m = P.make_probe("mean_pool", 4, 2).eval()
    ck = {"label_names": ["lesion_left", "lesion_right"], "encoder_hash": "h", "thresholds": [0.0, 0.0]}
    for prec, runs in (("bfloat16-autocast", False), ("float32", True)):
        with features.FeatureWriter(str(tmp_path / prec), "h", 4, precision=prec) as w:
            for k in keys:
                w.add(k, [dict(volume_id=k, family="CT", window="brain", modality="CT",
                               coords=np.zeros((6, 3), np.int32), emb=rng.normal(size=(6, 4)).astype(np.float32))])
        data = dict(keys=keys, ck=ck, models=[m], cache=features.FeatureCache(str(tmp_path / prec)), wins={"brain"})
        encoded.clear()
        res = grounding.flip_test_eval(data, Reader(), sides, device="cpu")
        assert (res["n"], len(encoded)) == ((4, 4) if runs else (0, 0))
        assert ("note" in res) != runs and (res["auroc"] is None) != runs
        if not runs:
            assert "holds bfloat16-autocast features, --device=cpu re-encodes in float32" in res["note"]


def test_overlays_are_drawn_for_the_first_n_trials_and_every_file_is_listed(tmp_path):
    # three studies, one lesion each: n_overlays=2 draws the first two trials (4 files each), not 2 files
    cohort = tmp_path / "cohort"
    lines, coords = [], np.argwhere(np.ones((2, 4, 4), bool)).astype(np.int32)
    emb = np.zeros((len(coords), 4), np.float32)
    emb[:, 1] = 1.0
    cdir = str(tmp_path / "cache")
    with features.FeatureWriter(cdir, "h", 4) as w:
        for s in range(3):
            os.makedirs(cohort / "gt" / f"demo-000{s}")
            LA = np.eye(4)
            LA[:3, 3] = [10, -20, 2]
            nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.uint8), LA), str(cohort / "gt" / f"demo-000{s}" / "l.nii.gz"))
            lines.append(json.dumps({"study_key": f"k{s}", "study": f"demo-000{s}", "lesions": [
                {"diagnosis": "intraparenchymal_hemorrhage", "mask": f"gt/demo-000{s}/l.nii.gz"}]}))
            w.add(f"k{s}", [dict(volume_id="vol0000aaaa", family="CT", window="brain", modality="CT", coords=coords,
                                 emb=emb)])
    fj = tmp_path / "findings.jsonl"
    fj.write_text("\n".join(lines) + "\n")
    data = dict(keys=["k0", "k1", "k2"], y=np.ones((3, 1)), ck={"label_names": ["intraparenchymal_hemorrhage"]},
                models=[AttendFeature0()], cache=features.FeatureCache(cdir), wins=None)
    out = tmp_path / "overlays"
    res = grounding.pointing_game_eval(data, FakeReader(), str(cohort), str(fj), overlay_dir=str(out), n_overlays=2)
    assert res["n"] == 3
    assert sorted(os.path.basename(p) for p in res["overlays"]) == sorted(os.listdir(out))   # nothing unlisted
    assert sorted({os.path.basename(p).split("_")[0] for p in res["overlays"]}) == ["demo-0000", "demo-0001"]
    kinds = sorted(os.path.basename(p).split("_", 3)[3] for p in res["overlays"] if "demo-0000" in p)
    assert kinds == ["attention_intraparenchymal_hemorrhage.nii.gz", "contribution_intraparenchymal_hemorrhage.nii.gz",
                     "image.nii.gz", "lesion_intraparenchymal_hemorrhage.nii.gz"]


def test_lesion_token_labels_count_every_voxel_of_the_box_on_a_mirrored_volume(tmp_path):
    """The monitor's lesion-token labels (ProbeSet.lesion_labels: lesion at >= half of the 4x16x16 voxel
    box, lesion-free at none) on a volume whose w axis runs right to left (x = 47 - w), the mask on a
    world-aligned grid of its own. Token 0 is 50% lesion (w 1..8), token 1 37.5% (w 16..21), token 2 none.
    The 4 x 4 x 4 sample points (w offsets 0, 5, 10, 15) made them 25% (partial, left out) and 50%
    (a lesion token): the labels were [-1, 1, 0]. Against every voxel of each box looked up by hand."""
    from nvfm.monitor import ProbeSet
    shape = (4, 16, 48)
    A = np.array([[0, 0, -1, 47], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], np.float64)   # (d, h, w) -> (x, y, z)
    m = np.zeros((48, 16, 4), np.uint8)                 # indexed (x, y, z), identity affine
    m[47 - 8:47 - 1 + 1] = 1                            # w 1..8 -> x 39..46
    m[47 - 21:47 - 16 + 1] = 1                          # w 16..21 -> x 26..31
    nib.save(nib.Nifti1Image(m, np.eye(4)), str(tmp_path / "lesion.nii.gz"))

    class Cache(dict):
        encoder_hash = ""

        def study(self, k):
            return self[k]

    class Reader:
        volumes = [{"volume_id": 0, "affine": A.tolist(), "shape": list(shape)}]

    coords = np.array([[0, 0, 0], [0, 0, 1], [0, 0, 2]])
    cache = Cache(s=[{"volume_id": 0, "coords": coords}])
    rows = [{"study_key": "s", "lesions": [{"diagnosis": "glioma", "mask": "lesion.nii.gz"}]}]
    want = []
    for t in range(3):                                  # brute force: each voxel -> world -> mask voxel
        n = 0
        for d, h, w in np.ndindex(4, 16, 16):
            x, y, z = (A @ [d, h, 16 * t + w, 1])[:3]
            n += int(m[int(round(x)), int(round(y)), int(round(z))])
        want.append(n / 1024)
    np.testing.assert_allclose(want, [0.5, 0.375, 0.0])  # by hand
    frac, _ = grounding.lesion_token_cover(str(tmp_path), Reader(), rows, cache)["s", 0]
    np.testing.assert_allclose(frac, want)
    probes = object.__new__(ProbeSet)
    probes.token_labels, probes.cohort, probes.reader, probes.findings = None, str(tmp_path), Reader(), rows
    assert probes.lesion_labels(cache)["s", 0].tolist() == [1, -1, 0]



@pytest.mark.parametrize("oblique", [False, True])
def test_mask_token_hits_is_any_voxel_of_the_box(oblique):
    """The pointing game's hit: a token is in the lesion when any of its 1024 voxel centres has a nonzero
    nearest mask voxel, or a mask voxel's centre lies in its box: the same tokens the lesion-token
    labels count as touched (token_mask_share > 0), by a token-by-token brute force."""
    rng = np.random.default_rng(11 + oblique)
    for _ in range(25):
        origin, coords, A, mask, M = _random_tokens_and_lesion(rng, oblique)
        got = grounding.mask_token_hits(coords, A, mask, M, origin=origin)
        _, count, centre_in = _brute_force_overlap(coords, A, mask, M, origin)
        np.testing.assert_array_equal(got, (count > 0) | centre_in)


def test_mask_token_hits_finds_a_lesion_between_the_sample_points():
    """One coarse mask voxel (1 x 4 x 16 mm) centred at canonical h -1.5, w 2, d 1.5: outside token
    (0, 0, 0)'s box (h from -0.5), its region reaches the box's voxels at h 0, w 2, d 0-3 (4 of 1024;
    worked by hand). The 64 sample points (w in 0, 5, 10, 15) miss them: the token was not a hit."""
    M = np.diag([1.0, 4.0, 16.0, 1.0])
    M[:3, 3] = [2 - 32, -1.5 - 32, 6.0]            # world x = w - 32, y = h - 32, z = 4 d (AFF)
    mask = np.ones((1, 1, 1), np.uint8)
    coords = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]])
    np.testing.assert_array_equal(grounding.mask_token_hits(coords, AFF, mask, M), [True, False, False, False])
    np.testing.assert_array_equal(grounding.token_mask_share(coords, AFF, mask, M), [4 / 1024, 0, 0, 0])
