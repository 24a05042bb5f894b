"""Cubic B-spline resampling of preprocess.py --preset=neurovfm (nvfm/volume.py bspline_matrix,
resampled_neurovfm): the authors' SimpleITK sitkBSpline, checked against independent
computations: scipy.ndimage.map_coordinates(order=3, mode="mirror") (its own prefilter and
evaluation, the same mirror boundary as ITK), exactness on constant / linear / cubic fields,
and their output grid worked out by hand from their preprocess_image rules."""
import os
import sys

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from nvfm import dicom, volume as V  # noqa: E402


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 9, 64])
def test_matrix_matches_scipy_map_coordinates(n):
    g = np.random.default_rng(n)
    f = g.normal(0, 100, n)
    p0, gap = 12.5, 0.7  # input positions in mm
    x = np.concatenate([np.linspace(-0.5, n - 0.5, 301, endpoint=False), [-0.5, 0.0, n - 1.0]])
    W = V.bspline_matrix(p0 + gap * np.arange(n), p0 + gap * x).toarray().astype(np.float64)
    got = W @ f
    if n == 1:
        want = np.full_like(x, f[0])  # one sample: the spline is that constant
    else:
        want = ndi.map_coordinates(f, [x], order=3, mode="mirror", prefilter=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(f).max())
    # interpolating: the samples themselves come back
    idx = np.arange(n)
    Ws = V.bspline_matrix(p0 + gap * idx, p0 + gap * idx).toarray().astype(np.float64)
    np.testing.assert_allclose(Ws @ f, f, rtol=0, atol=2e-6 * np.abs(f).max())


def test_outside_half_a_sample_past_the_ends_is_an_empty_row():
    n = 6
    x = np.array([-0.75, -0.5001, -0.5, 5.4999, 5.5, 6.0])  # inside is [-0.5, n - 0.5): ITK's IsInsideBuffer
    W = V.bspline_matrix(np.arange(n, dtype=float), x).toarray()
    np.testing.assert_array_equal(W.sum(1) != 0, [False, False, True, True, False, False])
    np.testing.assert_allclose(W.sum(1)[2:4], 1.0, atol=1e-6)
    # an axis that runs the other way in their RPI image: the open end is at -0.5
    Wr = V.bspline_matrix(np.arange(n, dtype=float), x, reverse=True).toarray()
    np.testing.assert_array_equal(Wr.sum(1) != 0, [False, False, False, True, True, False])


def test_polynomials_of_degree_3_are_exact_in_the_interior_and_constants_everywhere():
    n = 60
    p = 3.0 + 1.25 * np.arange(n)
    x = np.linspace(-0.5, n - 0.5, 997, endpoint=False)
    W = V.bspline_matrix(p, 3.0 + 1.25 * x).toarray().astype(np.float64)
    np.testing.assert_allclose(W @ np.full(n, 7.0), 7.0, rtol=0, atol=7e-6)  # rows sum to 1
    t = np.arange(n, dtype=float)
    inner = (x > 15) & (x < n - 16)  # the mirror bends a non-constant field near the ends; 0.268^15 ~ 3e-9
    for coef in ([0, 1], [2, -1, 0.5], [1, 0.3, -0.02, 0.001]):
        f = np.polyval(coef[::-1], t)
        want = np.polyval(coef[::-1], x)
        got = W @ f
        scale = np.abs(f).max()
        np.testing.assert_allclose(got[inner], want[inner], rtol=0, atol=3e-6 * scale)
    # near an end a line is not reproduced (mirror: zero slope at the end sample): the known boundary rule
    f = t.copy()
    assert abs((W @ f)[np.argmin(np.abs(x + 0.5))] - (-0.5)) > 0.1


def test_non_uniform_positions_follow_the_samples():
    p = np.array([0.0, 1.0, 2.0, 4.0, 6.0, 7.0])  # a missing-slice gap: index is piecewise linear in position
    x = V.bspline_index(p, np.array([0.5, 3.0, 5.0, 7.5, -0.5]))
    np.testing.assert_allclose(x, [0.5, 2.5, 3.5, 5.5, -0.5])
    W = V.bspline_matrix(p, p).toarray().astype(np.float64)
    f = np.random.default_rng(0).normal(size=len(p))
    np.testing.assert_allclose(W @ f, f, atol=2e-6)


def _nifti(tmp_path, arr, zooms, origin):
    A = np.diag(list(zooms) + [1.0])
    A[:3, 3] = origin
    nib.save(nib.Nifti1Image(arr, A), str(tmp_path / "v.nii.gz"))
    return A


def test_volume_matches_map_coordinates_on_the_authors_grid(tmp_path):
    """A RAS-stored MR volume: their grid by hand (RPI: x toward R starts at the first voxel, y
    and z are flipped so they start at the most anterior / superior voxel; sizes
    int(n * spacing / target)) and their values by scipy at the grid's input indices."""
    g = np.random.default_rng(1)
    nx, ny, nz = 37, 23, 9
    zooms, origin = (0.8, 2.0, 5.0), (-10.0, 4.0, 30.0)
    xx, yy, zz = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij")
    arr = (200 + 50 * np.sin(xx / 4.0) * np.cos(yy / 3.0) + 3 * zz + g.uniform(0, 5, (nx, ny, nz))).astype(np.float32)
    arr += 0.25  # not integer-valued: no truncation
    _nifti(tmp_path, arr, zooms, origin)
    vol, A, codes = V.resampled_neurovfm(dicom.nifti_stack(str(tmp_path), "v.nii.gz"))
    assert codes == "IPR"
    mx, my, mz = int(nx * (0.8 / 1)), int(ny * (2.0 / 1)), int(nz * (5.0 / 4))  # 29, 46, 11
    assert vol.shape == (mz, my, mx)
    # voxel (0, 0, 0) is their origin: first x, last (most anterior) y, last (most superior) z
    corner = np.array(origin) + np.array(zooms) * [0, ny - 1, nz - 1]
    np.testing.assert_allclose(A[:3, 3], corner, atol=1e-6)
    np.testing.assert_allclose(A[:3, :3], [[0, 0, 1], [0, -1, 0], [-4, 0, 0]], atol=1e-9)
    # their indices: i * target / spacing in the RPI image, inside when in [-0.5, n - 0.5)
    jx, jy, jz = (np.arange(m) * (t / s) for m, t, s in ((mx, 1, 0.8), (my, 1, 2.0), (mz, 4, 5.0)))
    Z, Y, X = np.meshgrid(jz, jy, jx, indexing="ij")
    outside = (X < -0.5) | (X >= nx - 0.5) | (Y < -0.5) | (Y >= ny - 0.5) | (Z < -0.5) | (Z >= nz - 0.5)
    assert outside[:, -1, :].all() and not outside[:, :-1, :].any()  # 2 mm -> 1 mm: the last row is at n - 0.5
    # y and z are flipped in RPI (RAS storage points them toward A and S): array index n - 1 - j
    want = ndi.map_coordinates(arr.astype(np.float64), [X, ny - 1 - Y, nz - 1 - Z], order=3, mode="mirror")
    want[outside] = 0.0  # their default pixel value
    np.testing.assert_allclose(vol, want, rtol=0, atol=2e-3)


def test_integer_inputs_are_truncated_like_an_integer_pixel_type(tmp_path):
    g = np.random.default_rng(2)
    arr = g.integers(0, 400, (20, 18, 6)).astype(np.int16)
    _nifti(tmp_path, arr, (0.9, 0.9, 5.0), (0, 0, 0))
    vol, _, _ = V.resampled_neurovfm(dicom.nifti_stack(str(tmp_path), "v.nii.gz"))
    assert np.array_equal(vol, np.trunc(vol))
    # the same values plus 0.5 are not integral: kept in float, and truncating them gives the
    # integer result up to the rare voxels within float32 error of an integer
    _nifti(tmp_path, arr.astype(np.float32) + 0.5, (0.9, 0.9, 5.0), (0, 0, 0))
    vf, _, _ = V.resampled_neurovfm(dicom.nifti_stack(str(tmp_path), "v.nii.gz"))
    assert not np.array_equal(vf, np.trunc(vf))
    inside = vol != 0
    diff = np.abs(np.trunc(vf[inside] - 0.5) - vol[inside])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_nvfm_preset_is_unchanged(tmp_path):
    """The default (nvfm) resampling is still the tent / centred grid: the B-spline options
    are the neurovfm preset's only."""
    arr = np.random.default_rng(3).uniform(0, 100, (30, 26, 7)).astype(np.float32)
    _nifti(tmp_path, arr, (0.7, 0.7, 3.0), (0, 0, 0))
    st = dicom.nifti_stack(str(tmp_path), "v.nii.gz")
    a, A1, _ = V.resampled_canonical(st)
    b, A2, _ = V.resampled_canonical(dicom.nifti_stack(str(tmp_path), "v.nii.gz"), kernel="tent", grid="centre")
    np.testing.assert_array_equal(a, b)
    c, A3, _ = V.resampled_neurovfm(dicom.nifti_stack(str(tmp_path), "v.nii.gz"))
    assert c.shape != a.shape or not np.allclose(A1, A3)


def test_tilted_dicom_series_reproduces_a_linear_field(tmp_path):
    """A gantry-tilted CT series (each slice shifted in-plane) of a field linear in patient
    coordinates: the cubic B-spline reproduces it at every output voxel away from the ends,
    at the world position the output affine gives (independent of grid and orientation code)."""
    from dicom_synth import write_series
    K, R, C = 14, 60, 52
    origin, step, ps = np.array([-30.0, -25.0, 10.0]), np.array([0.0, 1.5, 5.0]), (0.9, 0.8)
    coef = np.array([0.8, -0.5, 0.3])  # f(P) = coef . P, P in LPS mm
    k, i, j = np.meshgrid(np.arange(K), np.arange(R), np.arange(C), indexing="ij")
    P = origin + k[..., None] * step + i[..., None] * ps[0] * np.array([0, 1.0, 0]) \
        + j[..., None] * ps[1] * np.array([1.0, 0, 0])
    write_series(str(tmp_path / "ct"), P @ coef, step=step, origin=origin, ps=ps, slope=0.01, intercept=0.0)
    groups, _ = dicom.group_series([dicom.scan_dicom(str(tmp_path), f"ct/{n}") for n in
                                    sorted(os.listdir(tmp_path / "ct"))])
    st = dicom.dicom_stack(str(tmp_path), groups[0]).check(3)
    assert st.tilt_deg > 10
    vol, A, _ = V.resampled_neurovfm(st)
    d, h, w = np.meshgrid(*(np.arange(n) for n in vol.shape), indexing="ij")
    world = (V.LPS_TO_RAS @ A @ np.stack([d, h, w, np.ones_like(d)]).reshape(4, -1))[:3].T  # LPS mm
    # continuous input index (k, i, j) of each output voxel: solve P - origin = k step + i ps0 c + j ps1 r
    M = np.stack([step, ps[0] * np.array([0, 1.0, 0]), ps[1] * np.array([1.0, 0, 0])], 1)
    kij = np.linalg.solve(M, (world - origin).T).T
    inner = ((kij[:, 0] >= 3) & (kij[:, 0] <= K - 4) & (kij[:, 1] >= 8) & (kij[:, 1] <= R - 9)
             & (kij[:, 2] >= 8) & (kij[:, 2] <= C - 9))
    assert inner.sum() > 1000
    np.testing.assert_allclose(vol.reshape(-1)[inner], (world @ coef)[inner], rtol=0, atol=0.02)


def test_rounding_level_shear_adds_no_voxel(tmp_path):
    """An oblique NIfTI: its float32-stored affine leaves ~1e-6 mm of in-plane shear between
    slices. That is no gantry tilt: their size int(n * spacing / target) per axis, no extra
    row, and the first voxel on their RPI origin (SimpleITK gives the same, test_sitk_parity)."""
    t = np.deg2rad(12.0)
    R = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    A = np.eye(4)
    A[:3, :3] = R @ np.diag([1.1, 1.1, 5.5])
    A[:3, 3] = (5.0, -3.0, 2.0)
    arr = np.random.default_rng(4).uniform(10, 500, (45, 45, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(arr, A), str(tmp_path / "v.nii.gz"))
    st = dicom.nifti_stack(str(tmp_path), "v.nii.gz")
    assert 0 < np.abs(st.shear).max() < V.TILT_MM  # the float32 affine's rounding
    vol, Aout, codes = V.resampled_neurovfm(st)
    assert codes == "IPR" and vol.shape == (int(9 * 5.5 / 4), int(45 * 1.1), int(45 * 1.1))
    Af = nib.load(str(tmp_path / "v.nii.gz")).affine  # as stored (float32)
    corner = Af @ [0, 44, 8, 1]  # RPI origin: first x (toward R), last y (most anterior), last z
    np.testing.assert_allclose(Aout[:3, 3], corner[:3], atol=1e-4)


def test_sagittal_arrays_are_in_their_order(tmp_path):
    """Their array is the RPI image transposed so the 4 mm axis is first: for a sagittal series
    (D, H, W) = (R, P, I), where nvfm's own canonical order is (R, I, P)."""
    arr = np.random.default_rng(5).uniform(10, 500, (9, 40, 36)).astype(np.float32)  # x (sagittal slices), y, z
    _nifti(tmp_path, arr, (5.0, 0.75, 1.25), (0, 0, 0))
    vol, A, codes = V.resampled_neurovfm(dicom.nifti_stack(str(tmp_path), "v.nii.gz"))
    assert codes == "RPI" and V.axis_codes(A) == codes
    assert vol.shape == (int(9 * 5.0 / 4), int(40 * 0.75), int(36 * 1.25))
    ref, A2, codes2 = V.resampled_canonical(dicom.nifti_stack(str(tmp_path), "v.nii.gz"), fill=0.0,
                                            kernel="bspline", grid="origin", clamp=False)
    assert codes2 == "RIP"
    np.testing.assert_array_equal(vol, ref.transpose(0, 2, 1))
    np.testing.assert_array_equal(A, A2[:, [0, 2, 1, 3]])
