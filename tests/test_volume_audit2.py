"""Volume processing, second audit, against independent computations: a gantry-tilted stack's
voxels outside the input (brute-force geometry per voxel) are air, not tissue, in both presets;
the neurovfm B-spline keeps a tilted constant constant (hand-worked); a tilted constant image is
refused as an untilted one is; their grid under one voxel is a clear error (hand-worked size)."""
import numpy as np
import pytest

from dicom_synth import head_phantom
from nvfm import dicom, volume


def _tilted_ct(K=30, R=64, C=64, gap=5.0, deg=20.0):
    """In-memory CT stack (air -1000 HU, head ~40 HU), slices shifted along c by gap * tan(deg)."""
    X = head_phantom((K, R, C)).astype(np.float32)
    shear = gap * np.tan(np.radians(deg))
    origins = [np.array([0.0, k * shear, k * gap]) for k in range(K)]
    st = dicom.SliceStack(origins, (1, 0, 0), (0, 1, 0), (1.0, 1.0), (R, C), lambda k: X[k].copy(), "CT").check()
    return st, shear, gap


def _coverage(out, st, shear, gap, reach, margin):
    """Per output voxel (flat), from its world point (LPS mm, through the recorded affine) in a
    stack of 1 mm pixels, slice k's origin shifted by k * shear along c: (covered by every input
    slice within `reach` slices of it, `margin` pixels inside each; covered by none, `margin`
    pixels outside each or more than `margin` slices past the stack)."""
    K, R, C = st.shape
    idx = np.indices(out["mask"].shape).reshape(3, -1)
    w = (dicom.LPS_TO_RAS @ out["affine"] @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]
    kf = w[2] / gap
    every, anyk = np.ones(kf.shape, bool), np.zeros(kf.shape, bool)
    for dk in range(-reach, reach + 1):
        k = np.round(kf) + dk
        i = w[1] - k * shear  # pixel index along c in slice k
        ok = (k >= 0) & (k < K)
        every &= ok & (i >= margin) & (i <= R - 1 - margin) & (w[0] >= margin) & (w[0] <= C - 1 - margin)
        anyk |= ok & (i >= -margin) & (i <= R - 1 + margin) & (w[0] >= -margin) & (w[0] <= C - 1 + margin)
    return every, (kf < -margin) | (kf > K - 1 + margin) | ~anyk


def _far_outside(out, st, shear, gap):
    """Voxels outside the input whatever the kernel (B-spline: 2 samples of support): 3 pixels
    past every slice within 3 slices."""
    return _coverage(out, st, shear, gap, 3, 3)[1]


@pytest.mark.parametrize("process", [volume.process_stack, volume.process_stack_neurovfm])
def test_tilted_ct_outside_the_input_is_air(process):
    # the neurovfm preset filled a tilt's sheared-away wedges with 0 HU (SimpleITK's default pixel
    # value, which theirs never uses there: their reader keeps the tilt): soft tissue, foreground
    # (before: all 94912 far-outside voxels of this 277056-voxel volume were 0 HU with mask 1)
    st, shear, gap = _tilted_ct()
    assert st.tilt_deg > 15
    out = process(st)
    far = _far_outside(out, st, shear, gap)
    assert far.mean() > 0.1  # the wedges are a large part of the volume
    assert out["mask"].reshape(-1)[far].max() == 0
    for c in range(out["data"].shape[0]):  # every window at its bottom level, as air
        assert out["data"][c].reshape(-1)[far].max() == 0
    if "values" in out:
        assert np.all(out["values"].reshape(-1)[far] == volume.HU_RANGE[0])
    # and the head is still there, inside
    assert out["mask"].reshape(-1)[~far].mean() > 0.2


def _mem_ct(shape, gap, ps=(1.0, 1.0)):
    X = np.random.default_rng(0).normal(40.0, 100.0, shape).astype(np.float32)
    origins = [np.array([0.0, 0.0, k * gap]) for k in range(shape[0])]
    return dicom.SliceStack(origins, (1, 0, 0), (0, 1, 0), ps, shape[1:], lambda k: X[k].copy(), "CT").check()


@pytest.mark.parametrize("shape, gap, ps", [((3, 20, 20), 0.5, (1.0, 1.0)),  # int(3 * 0.5 / 4) = 0 slices
                                            ((5, 1, 20), 2.0, (0.5, 1.0))])  # int(1 * 0.5 / 1) = 0 rows
def test_neurovfm_grid_under_one_voxel_is_a_clear_error(shape, gap, ps):
    # their grid has int(n * spacing / target) voxels per axis: 0 for a slab thinner than 4 mm or
    # an image under 1 mm wide (before: IndexError in resample_grid, logged as "error (IndexError)")
    st = _mem_ct(shape, gap, ps)
    with pytest.raises(dicom.SeriesError, match="empty volume after resampling"):
        volume.process_stack_neurovfm(st)
    out = volume.process_stack(st)  # nvfm's centred grid keeps one voxel over the extent
    assert out["data"].shape[1:] == tuple(int(np.floor(e / s + 1e-6)) + 1 for e, s in
                                          zip(((shape[0] - 1) * gap, (shape[1] - 1) * ps[0], (shape[2] - 1) * ps[1]),
                                              volume.SPACING))


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_neurovfm_tilted_constant_stays_constant(modality):
    # the cubic B-spline reproduces a constant exactly (hand-worked: its weights sum to 1). Along
    # the normal of a tilted stack its negative lobes reached slices sheared away at that point;
    # those were dropped without filling the voxel (only a coverage < 0.999 was), so the kept
    # weights summed to up to 1.11 (before: 100 HU came out as up to 110 HU at 4742 voxels, air
    # -1000 HU as -1109, below the HU scale)
    K, R, C, gap = 30, 64, 64, 5.0
    shear = gap * np.tan(np.radians(20))
    X = np.full((K, R, C), 100.0, np.float32)
    X[14:16, 30:34, 30:34] = 500.0  # a blob at the centre: not a constant image
    origins = [np.array([0.0, k * shear, k * gap]) for k in range(K)]
    st = dicom.SliceStack(origins, (1, 0, 0), (0, 1, 0), (1.0, 1.0), (R, C), lambda k: X[k].copy(), modality).check()
    out = volume.process_stack_neurovfm(st)
    vals = out["values"].reshape(-1).astype(np.float64)
    idx = np.indices(out["mask"].shape).reshape(3, -1)
    w = (dicom.LPS_TO_RAS @ out["affine"] @ np.vstack([idx, np.ones(idx.shape[1])]))[:3]  # LPS mm
    blob = np.array([31.5, 31.5 + 14.5 * shear, 14.5 * gap])
    far = np.linalg.norm(w - blob[:, None], axis=0) > 40  # beyond the blob's B-spline support
    fill = volume.HU_RANGE[0] if modality == "CT" else 0.0
    kept = far & (vals != fill)
    assert kept.sum() > 50000
    deep = _coverage(out, st, shear, gap, 8, 1)[0]  # every slice under the kernel's reach covers it
    assert deep.sum() > 20000 and np.all(vals[deep] != fill)  # such voxels are not filled
    assert np.abs(vals[kept] - 100.0).max() <= 1.0  # +-1: ITK's truncation of the integer-valued input


@pytest.mark.parametrize("process", [volume.process_stack, volume.process_stack_neurovfm])
@pytest.mark.parametrize("modality, value", [("CT", 0.0), ("CT", 40.0), ("MR", 300.0)])
def test_tilted_constant_image_fails_as_untilted_does(process, modality, value):
    # zero-filled pixel data of a gantry-tilted series: the fill of the sheared-away wedges is no
    # intensity of the input, yet it gave the volume a range (before: processed, 24 of 48 tokens
    # foreground, one brain level inside; the untilted series failed as "constant image")
    K, R, C, gap = 12, 48, 40, 5.0
    shear = gap * np.tan(np.radians(15))
    X = np.full((K, R, C), value, np.float32)
    origins = [np.array([0.0, k * shear, k * gap]) for k in range(K)]
    st = dicom.SliceStack(origins, (1, 0, 0), (0, 1, 0), (1.0, 1.0), (R, C), lambda k: X[k].copy(), modality).check()
    assert st.tilt_deg > 10
    with pytest.raises(dicom.SeriesError, match="constant image"):
        process(st)
    X[6, 20:30, 10:20] = value + 50.0  # any structure is an image
    assert process(st)["token_mask"].any()
