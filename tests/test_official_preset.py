"""preprocess.py --preset=neurovfm: the authors' foreground and intensity rules (nvfm/volume.py
neurovfm_*), each checked against an independent computation on a small planted volume
(percentiles by hand from the sorted values, not np.percentile), and the preset's plumbing
(manifest record, resume refusal, nvfm default unchanged)."""
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from dicom_synth import head_phantom  # noqa: E402

import preprocess  # noqa: E402
from nvfm import dicom, volume as V  # noqa: E402
from nvfm.data import ShardReader  # noqa: E402


def pct_by_hand(values, q):
    """Linear-interpolation percentile (numpy's default method) from the sorted values."""
    s = np.sort(np.asarray(values, np.float64).ravel())
    idx = q / 100.0 * (len(s) - 1)
    lo = int(np.floor(idx))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (idx - lo) * (s[hi] - s[lo])


def planted_mr(shape=(10, 37, 50), seed=0):
    """Noise background, a bright 'head' block, a few outliers (so the 0.5 / 99.5 clip bites)."""
    g = np.random.default_rng(seed)
    v = g.uniform(0, 20, shape).astype(np.float32)
    v[2:8, 6:30, 8:40] += 300 + g.normal(0, 30, (6, 24, 32)).astype(np.float32)
    v[5, 10, 10], v[4, 20, 30], v[0, 0, 0] = 5000, 4000, -100  # one outlier outside the crop
    return v


def test_crop_is_the_centre_crop_to_patches():
    from nvfm.model import centre_crop_to_patches
    a = np.arange(10 * 37 * 50).reshape(10, 37, 50)
    assert V.neurovfm_crop(a.shape) == (slice(1, 9), slice(2, 34), slice(1, 49))
    np.testing.assert_array_equal(a[V.neurovfm_crop(a.shape)], centre_crop_to_patches(a))


def test_mr_foreground_and_scaling_match_a_hand_computation():
    v = planted_mr()
    crop = v[1:9, 2:34, 1:49]  # (10 % 4) // 2 = 1, (37 % 16) // 2 = 2, (50 % 16) // 2 = 1
    t, lo, hi = (pct_by_hand(crop, q) for q in (10, 0.5, 99.5))
    assert V.neurovfm_mr_stats(v) == pytest.approx((t, lo, hi), rel=1e-12, abs=1e-9)
    data, mask = V.neurovfm_mr(v)
    # foreground: strictly above the 10th percentile, voxel by voxel, no hole filling
    np.testing.assert_array_equal(mask, (v.astype(np.float64) > t).astype(np.uint8))
    # their scaling, literally: clip to the percentiles, then min-max with + 1e-8
    c = np.clip(crop.astype(np.float64), lo, hi)
    theirs = (c - c.min()) / (c.max() - c.min() + 1e-8)
    np.testing.assert_allclose(V.neurovfm_mr_scale(crop, lo, hi), theirs, rtol=0, atol=1e-15)
    assert theirs.min() == 0 and 0.999 < theirs.max() <= 1
    # stored as uint8 levels: round half up of 255 x theirs, so |stored / 255 - theirs| <= 1/510
    np.testing.assert_array_equal(data[0][1:9, 2:34, 1:49], np.floor(theirs * 255 + 0.5).astype(np.uint8))
    assert np.abs(data[0][1:9, 2:34, 1:49] / 255.0 - theirs).max() <= 1 / 510 + 1e-12
    # the statistics ignore what the crop removes (the -100 outlier at [0, 0, 0] is outside it)
    assert data[0, 0, 0, 0] == 0 and lo > 0


def test_mr_constant_and_tiny_volumes_are_series_errors():
    with pytest.raises(dicom.SeriesError, match="constant"):
        V.neurovfm_mr(np.full((4, 16, 16), 7.0, np.float32))
    with pytest.raises(dicom.SeriesError, match="smaller than one patch"):
        V.neurovfm_mr(np.ones((3, 40, 40), np.float32))


def test_ct_foreground_keeps_holes():
    hu = np.full((8, 48, 48), 40.0, np.float32)
    hu[:, 16:32, 16:32] = -800.0  # an air cavity inside the head (a sinus), one whole token column
    m = V.neurovfm_ct_mask(hu)
    np.testing.assert_array_equal(m, (hu > -500).astype(np.uint8))
    assert m[:, 20, 20].sum() == 0
    assert V.foreground(None, hu)[:, 20, 20].all()  # nvfm's rule fills the hole; theirs does not
    tm = V.token_mask(m, 1.0)
    assert not tm[:, 1, 1].any() and tm.sum() == tm.size - 2  # only the cavity's tokens are dropped


def _write_nifti(root, name, vol, zooms):
    os.makedirs(root, exist_ok=True)
    nib.save(nib.Nifti1Image(vol.astype(np.float32), np.diag(list(zooms) + [1.0])), os.path.join(root, name))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("preset_in"))
    head = head_phantom((96, 90, 16), 1)  # (x, y, z) in the NIfTI: axial, 16 slices
    _write_nifti(root, "ct.nii.gz", head, (0.9, 1.0, 3.0))
    _write_nifti(root, "mr.nii.gz", np.clip(head + 1000, 0, None) + 5 * np.random.default_rng(0).random(head.shape),
                 (1.1, 1.0, 5.0))
    return root


def test_resampling_and_orientation_are_process_stacks(inputs):
    """resampled_canonical is process_stack's geometry: CT channels identical byte for byte."""
    st = dicom.nifti_stack(inputs, "ct.nii.gz")
    assert st.modality == "CT"
    ours = V.process_stack(st)
    vol, A, codes = V.resampled_canonical(dicom.nifti_stack(inputs, "ct.nii.gz"))
    np.testing.assert_array_equal(V.ct_channels(vol), ours["data"])
    np.testing.assert_array_equal(A, ours["affine"])
    assert codes == ours["orientation"]
    np.testing.assert_array_equal(V.neurovfm_ct_mask(vol), (vol > -500).astype(np.uint8))


def test_preprocess_preset_writes_the_authors_rules(inputs, tmp_path):
    out = str(tmp_path / "shards")
    man = preprocess.run(inputs, out, n_workers=0, cfg_min_fg=-1.0, cfg_progress=False, cfg_preset="neurovfm")
    assert man["preset"] == "neurovfm" and man["min_fg_fraction"] == 1.0 and man["resampling"] == "bspline-sitk2"
    r = ShardReader(out)
    by_mod = {v["modality"]: i for i, v in enumerate(r.volumes)}
    assert set(by_mod) == {"CT", "MR"}
    i = by_mod["MR"]
    data, mask = r.volume(i)
    vol, _, _ = V.resampled_neurovfm(dicom.nifti_stack(inputs, "mr.nii.gz"))
    crop = vol[V.neurovfm_crop(vol.shape)]
    t, lo, hi = (pct_by_hand(crop, q) for q in (10, 0.5, 99.5))
    np.testing.assert_array_equal(np.asarray(mask), (vol > t).astype(np.uint8))
    want = np.floor((np.clip(vol.astype(np.float64), lo, hi) - lo) / (hi - lo + 1e-8) * 255 + 0.5)
    np.testing.assert_array_equal(np.asarray(data)[0], want.astype(np.uint8))
    tm = V.token_mask(np.asarray(mask), 1.0)
    assert r.volumes[i]["n_tokens"] == int(tm.sum())
    # full precision (shard format 2): their float [0, 1] intensities, not the uint8 levels
    assert man["version"] == 2 and r.volumes[i]["clip"] == pytest.approx([lo, hi], rel=1e-15)
    np.testing.assert_array_equal(r.values(i), vol.astype(r.values(i).dtype))
    c = np.clip(crop.astype(np.float64), lo, hi)
    theirs = (c - c.min()) / (c.max() - c.min() + 1e-8)
    np.testing.assert_allclose(r.window_float(i, "mr")[V.neurovfm_crop(vol.shape)], theirs, rtol=0, atol=1e-7)
    j = by_mod["CT"]
    hu, _, _ = V.resampled_neurovfm(dicom.nifti_stack(inputs, "ct.nii.gz"))
    assert r.volumes[j]["values"] in ("int16", "float32")
    np.testing.assert_array_equal(r.values(j), hu)
    for name, (width, level) in (("brain", (80, 40)), ("blood", (200, 80)), ("bone", (2800, 600))):
        lo_w, hi_w = level - width / 2, level + width / 2
        want_w = (np.clip(hu.astype(np.float64), lo_w, hi_w) - lo_w) / (hi_w - lo_w + 1e-8)  # their clip_by_window
        np.testing.assert_allclose(r.window_float(j, name), want_w, rtol=0, atol=1e-7)
        # the uint8 windows stay as before (1/510 brain, 1/30 blood and bone off)
        assert np.abs(r.window(j, name) / 255.0 - want_w).max() <= (1 / 510 if name == "brain" else 1 / 30) + 1e-6
    # a rerun into the same output with the other preset is refused; the nvfm default adds no key
    with pytest.raises(SystemExit, match="preset=neurovfm"):
        preprocess.run(inputs, out, n_workers=0, cfg_progress=False)
    man2 = preprocess.run(inputs, str(tmp_path / "nvfm"), n_workers=0, cfg_progress=False)
    assert "preset" not in man2 and man2["min_fg_fraction"] == 0.5
    with open(os.path.join(tmp_path / "nvfm", "manifest.json")) as f:
        assert "preset" not in json.load(f)


def test_encode_feeds_the_authors_float_windows(inputs, tmp_path):
    """encode_study(full_precision=True) on format-2 shards equals the encoder run on tokens built
    here from the stored HU by the authors' window formula; the uint8 path differs."""
    import torch
    from nvfm.model import WINDOW_MEAN, WINDOW_STD, WINDOWS, Encoder, EncoderConfig, encode_study
    from nvfm.tokenize import patchify_reference
    out = str(tmp_path / "shards")
    preprocess.run(inputs, out, n_workers=0, cfg_min_fg=-1.0, cfg_progress=False, cfg_preset="neurovfm")
    r = ShardReader(out)
    j = next(i for i, v in enumerate(r.volumes) if v["modality"] == "CT")
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.preset("tiny")).eval()
    got = encode_study(enc, r, [j], min_fg_fraction=1.0, crop="centre", full_precision=True)
    coarse = encode_study(enc, r, [j], min_fg_fraction=1.0, crop="centre")
    hu = np.asarray(r.values(j), np.float64)
    crop = V.neurovfm_crop(hu.shape)
    mask = torch.from_numpy(np.ascontiguousarray(np.asarray(r.volume(j)[1])[crop]))
    for e, e8, (name, (width, level)) in zip(got, coarse, (("brain", (80, 40)), ("blood", (200, 80)), ("bone", (2800, 600)))):
        lo, hi = level - width / 2, level + width / 2
        w = (np.clip(hu, lo, hi) - lo) / (hi - lo + 1e-8) * 255.0
        tok, coords, cu = patchify_reference([torch.from_numpy(np.ascontiguousarray(w[crop], np.float32))], [mask], 1.0)
        k = WINDOWS.index(name)
        with torch.no_grad():
            want = enc((tok / 255.0 - WINDOW_MEAN[k]) / WINDOW_STD[k], coords, cu, int(cu[-1]))
        assert e["window"] == name and len(tok) > 0
        np.testing.assert_array_equal(e["coords"], coords.numpy())
        np.testing.assert_allclose(e["emb"], want.numpy(), rtol=0, atol=2e-5)
        assert np.abs(np.asarray(e8["emb"]) - np.asarray(e["emb"])).max() > 1e-3  # the uint8 levels give other features


def _interrupt_before_merge(monkeypatch):
    """A run that commits its studies to parts/ and is then killed (Ctrl-C) before the merge."""
    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(preprocess, "acquire_merge_lock", boom)


def test_resume_with_another_preset_is_refused(inputs, tmp_path, monkeypatch):
    out = str(tmp_path / "shards")
    with monkeypatch.context() as m:
        _interrupt_before_merge(m)
        with pytest.raises(KeyboardInterrupt):
            preprocess.run(inputs, out, n_workers=0, cfg_progress=False, cfg_preset="neurovfm")
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    with open(os.path.join(out, "parts", "settings.json")) as f:
        assert json.load(f)["preset"] == "neurovfm"
    parts_before = sorted(os.listdir(os.path.join(out, "parts")))
    for kw, msg in ((dict(cfg_preset="nvfm"), "written with --preset=neurovfm min_fg_fraction=1.0; this run has "
                                              "--preset=nvfm"),
                    (dict(cfg_preset="neurovfm", cfg_min_fg=0.5), "this run has --preset=neurovfm min_fg_fraction=0.5"),
                    (dict(cfg_preset="neurovfm", salt_value="other"), "another salt")):
        with pytest.raises(SystemExit, match=msg) as e:
            preprocess.run(inputs, out, n_workers=0, cfg_progress=False, **kw)
        assert "\n" not in str(e.value) and out in str(e.value)
        assert sorted(os.listdir(os.path.join(out, "parts"))) == parts_before  # nothing written
    # parts written by a newer nvfm (a shard format this one does not know) are not extended
    sp = os.path.join(out, "parts", "settings.json")
    with open(sp) as f:
        st = json.load(f)
    with open(sp, "w") as f:
        json.dump(dict(st, format=st["format"] + 1), f)
    with pytest.raises(SystemExit, match=f"shard format {st['format'] + 1} \\(this version writes {st['format']}\\)"):
        preprocess.run(inputs, out, n_workers=0, cfg_progress=False, cfg_preset="neurovfm")
    with open(sp, "w") as f:  # an older format's parts are a subset: resumed
        json.dump(dict(st, format=1), f)
    # the same settings resume, and the result is that of an uninterrupted run
    man = preprocess.run(inputs, out, n_workers=0, cfg_progress=False, cfg_preset="neurovfm")
    ref = preprocess.run(inputs, str(tmp_path / "ref"), n_workers=0, cfg_progress=False, cfg_preset="neurovfm")
    assert man["volumes"] == ref["volumes"] and not os.path.exists(os.path.join(out, "parts"))


def test_array_jobs_with_mixed_presets_are_refused(inputs, tmp_path):
    out = str(tmp_path / "shards")
    assert preprocess.run(inputs, out, n_workers=0, shard_spec="0/2", cfg_progress=False,
                          cfg_preset="neurovfm") is None
    with pytest.raises(SystemExit, match="written with --preset=neurovfm"):
        preprocess.run(inputs, out, n_workers=0, shard_spec="1/2", cfg_progress=False)
    # a done marker of other settings (a job that raced past the check, or an older version's
    # settings file removed) is caught when the last job merges
    done0 = os.path.join(out, "parts", "done_0_of_2.json")
    with open(done0) as f:
        d = json.load(f)
    assert d["settings"]["preset"] == "neurovfm"
    d["settings"]["preset"] = "nvfm"
    with open(done0, "w") as f:
        json.dump(d, f)
    with pytest.raises(SystemExit, match=r"parts/done_0_of_2.json\) written with --preset=nvfm"):
        preprocess.run(inputs, out, n_workers=0, shard_spec="1/2", cfg_progress=False, cfg_preset="neurovfm")
    assert not os.path.exists(os.path.join(out, "merge.lock"))
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    d["settings"]["preset"] = "neurovfm"
    with open(done0, "w") as f:
        json.dump(d, f)
    man = preprocess.run(inputs, out, n_workers=0, shard_spec="1/2", cfg_progress=False, cfg_preset="neurovfm")
    assert man["preset"] == "neurovfm" and man["volumes"]


def test_output_of_an_older_neurovfm_preset_is_not_extended(inputs, tmp_path):
    """A neurovfm output written before the B-spline resampling (no "resampling" key) gets no
    studies resampled the new way: a rerun into it is refused; nvfm outputs are unaffected."""
    out = str(tmp_path / "shards")
    preprocess.run(inputs, out, n_workers=0, cfg_progress=False, cfg_preset="neurovfm")
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        man = json.load(f)
    del man["resampling"]
    with open(path, "w") as f:
        json.dump(man, f)
    with pytest.raises(SystemExit, match="written with tent resampling .*an older --preset=neurovfm.* bspline"):
        preprocess.run(inputs, out, n_workers=0, cfg_progress=False, cfg_preset="neurovfm")
    nv = str(tmp_path / "nvfm")
    preprocess.run(inputs, nv, n_workers=0, cfg_progress=False)
    man2 = preprocess.run(inputs, nv, n_workers=0, cfg_progress=False)  # a rerun of a complete nvfm output
    assert "resampling" not in man2 and man2["volumes"]


def test_output_of_the_pre_sitk_parity_neurovfm_preset_is_refused(inputs, tmp_path, monkeypatch):
    """An output written by --preset=neurovfm before SimpleITK parity (resampling "bspline": a
    sagittal series in another array order, truncation decided from the values, an unsigned MR
    undershoot not clamped) is neither resumed (parts/settings.json) nor extended (manifest)."""
    assert preprocess.RESAMPLING["neurovfm"] == "bspline-sitk2"
    out = str(tmp_path / "shards")
    with monkeypatch.context() as m:
        _interrupt_before_merge(m)
        with pytest.raises(KeyboardInterrupt):
            preprocess.run(inputs, out, n_workers=0, cfg_progress=False, cfg_preset="neurovfm")
    sp = os.path.join(out, "parts", "settings.json")
    with open(sp) as f:
        st = json.load(f)
    assert st["resampling"] == "bspline-sitk2"
    with open(sp, "w") as f:
        json.dump(dict(st, resampling="bspline"), f)
    parts_before = sorted(os.listdir(os.path.join(out, "parts")))
    with pytest.raises(SystemExit, match=r"parts/settings.json\) written with bspline resampling \(this version's "
                                         r"--preset=neurovfm: bspline-sitk2\)") as e:
        preprocess.run(inputs, out, n_workers=0, cfg_progress=False, cfg_preset="neurovfm")
    assert "\n" not in str(e.value) and out in str(e.value)
    assert sorted(os.listdir(os.path.join(out, "parts"))) == parts_before  # nothing written
    with open(sp, "w") as f:  # this version's settings: resumed
        json.dump(st, f)
    preprocess.run(inputs, out, n_workers=0, cfg_progress=False, cfg_preset="neurovfm")
    path = os.path.join(out, "manifest.json")
    with open(path) as f:
        man = json.load(f)
    assert man["resampling"] == "bspline-sitk2"
    with open(path, "w") as f:  # a complete pre-parity output: not extended
        json.dump(dict(man, resampling="bspline"), f)
    with pytest.raises(SystemExit, match="written with bspline resampling .*an older --preset=neurovfm.* bspline-sitk2"):
        preprocess.run(inputs, out, n_workers=0, cfg_progress=False, cfg_preset="neurovfm")
