"""Volume processing after loading against independent computations: MR intensity
normalisation against the documented formula in float64 (numpy), whatever the data's scale;
constant volumes; orientation and affine of every axis permutation / flip against scipy."""
import itertools

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from nvfm import dicom, volume


def _mem_stack(X, spacing=(4.0, 1.0, 1.0), modality="MR"):
    K, R, C = X.shape
    origins = [(0.0, 0.0, k * spacing[0]) for k in range(K)]
    return dicom.SliceStack(origins, (1, 0, 0), (0, 1, 0), spacing[1:], (R, C), lambda k: X[k].copy(),
                            modality).check()


def _smooth(seed=0, shape=(12, 48, 40)):
    """A smooth field in [0, 1]: every uint8 level is used after the percentile clip."""
    X = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2)
    return (X - X.min()) / np.ptp(X)


def _documented_mr_u8(stack):
    """Module docstring's MR rule in float64: clip the resampled volume to its 0.5 / 99.5th
    percentiles, scale to 0..255, round half up."""
    vol = volume.resampled_canonical(stack)[0].astype(np.float64)
    lo, hi = np.percentile(vol, volume.MR_PERCENTILES)
    return np.floor(np.clip((vol - lo) / (hi - lo) * 255.0, 0, 255) + 0.5)


@pytest.mark.parametrize("scale, offset", [(1000.0, 0.0), (1e-6, 0.0), (1e-9, 0.0), (1e-12, 0.0),
                                           (100.0, 30000.0), (100.0, -30000.0)])
def test_mr_levels_match_float64_at_any_scale(scale, offset):
    # quantitative maps in SI units (ADC ~1e-9 m^2/s) and narrow ranges far from 0 are below
    # float16's resolution: they must not lose levels (before: 12 of 256 levels at 1e-9, max
    # error 16; 43 levels at +30000, max error 6; "constant image" at 1e-12)
    X = (_smooth() * scale + offset).astype(np.float32)
    st = _mem_stack(X)
    out = volume.process_stack(st)["data"][0].astype(np.int64)
    want = _documented_mr_u8(st)
    assert np.abs(out - want).max() <= 1, np.abs(out - want).max()
    assert len(np.unique(out)) >= 250


def test_mr_range_too_small_for_float32_scale_is_an_error():
    # one bright voxel keeps the float32 buffer; the clip range ~1e-37 makes 255 / range overflow
    # (before: every voxel 0 or NaN-cast garbage, no error)
    X = (_smooth() * 1e-37).astype(np.float32)
    X[0, 0, 0] = 70000.0
    with pytest.raises(dicom.SeriesError, match="intensity range too small"):
        volume.process_stack(_mem_stack(X))


@pytest.mark.parametrize("process", [volume.process_stack, volume.process_stack_neurovfm])
@pytest.mark.parametrize("hu", [0.0, 40.0])
def test_constant_ct_fails_as_constant_mr_does(process, hu):
    # zero-filled pixel data (intercept 0) is 0 HU everywhere: before, written with every token
    # foreground (27 of 27) and one level per window
    X = np.full((12, 48, 40), hu, np.float32)
    with pytest.raises(dicom.SeriesError, match="constant image"):
        process(_mem_stack(X, modality="CT"))
    X[5, 20:30, 10:20] = hu + 50.0  # any structure is processed (input on the output grid: no interpolation)
    out = process(_mem_stack(X, modality="CT"))
    brain = {int(np.floor(np.clip(v / 80.0 * 255, 0, 255) + 0.5)) for v in (hu, hu + 50.0)}  # W80/L40: lo 0 HU
    assert set(np.unique(out["data"][0]).tolist()) == brain


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_every_axis_permutation_and_flip_lands_on_the_right_world_points(tmp_path, perm):
    # a NIfTI whose voxel axes are any signed permutation of RAS (odd spacings, so the centred
    # grid sits off the samples): each output voxel's value is the input's linear interpolation
    # (scipy) at the world point its affine names, and its codes are the documented ones
    X = ndi.gaussian_filter(np.random.default_rng(1).normal(size=(9, 11, 7)), 1).astype(np.float32) * 1000 + 500
    for n, signs in enumerate(itertools.product((1, -1), repeat=3)):
        A = np.zeros((4, 4))
        A[3, 3] = 1
        for a, s in enumerate((1.3, 1.7, 5.5)):  # upsampled to 1 x 1 x 4 mm: linear interpolation
            A[perm[a], a] = signs[a] * s
        A[:3, 3] = (10.3, -20.7, 30.1)
        name = f"v{n}.nii"
        nib.save(nib.Nifti1Image(X, A), str(tmp_path / name))
        st = dicom.nifti_stack(str(tmp_path), name).check()
        vol, Ac, codes = volume.resampled_canonical(st)
        out = volume.process_stack(st)
        assert np.array_equal(out["affine"], Ac) and out["orientation"] == codes
        assert codes == {0: "RIP", 1: "PIR", 2: "IPR"}[perm[2]] == "".join(nib.aff2axcodes(Ac))
        idx = np.indices(vol.shape).reshape(3, -1)
        ijk = np.linalg.inv(A)[:3] @ np.vstack([Ac[:3] @ np.vstack([idx, np.ones(idx.shape[1])]),
                                                np.ones(idx.shape[1])])
        assert ijk.min() > -1e-6 and (ijk.max(1) < np.array(X.shape) - 1 + 1e-6).all()  # inside the input
        ref = ndi.map_coordinates(X.astype(np.float64), ijk, order=1, mode="nearest").reshape(vol.shape)
        assert np.abs(vol - ref).max() < 1e-3, (perm, signs)
