"""Grounding and anatomy probes: token->voxel->world geometry, NIfTI overlays, pointing game,
flipped reader, patch matching and k-means IoU."""
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

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
    les = nib.load(att.replace("_attention_intraparenchymal_hemorrhage", "_lesion"))
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
    # the cache has brain tokens of c0 but the shards give none: another shard set, an error
    del encoded["c0"]
    with pytest.raises(RuntimeError, match=r"study 'c0' has tokens of the windows \['brain'\] in the feature cache "
                                           r"but no such volume in --shards"):
        grounding.flip_test_eval(data, Reader(), sides)
