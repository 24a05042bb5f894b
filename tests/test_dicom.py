"""Series assembly and resampling against independent tools (dcm2niix, nibabel, scipy).

Tolerances: assembled (pre-resampling) series must match dcm2niix exactly (affine to 1e-3
mm/voxel, voxel values exactly); resampled intensities must match scipy.ndimage
map_coordinates(order=1) to 1e-3 when upsampling (the tent kernel is linear interpolation
there) and to 3% of the data range (0.5% on average) when downsampling a smooth field (the tent kernel then
averages, scipy point-samples).
"""
import glob
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pydicom
import pytest
import scipy.ndimage as ndi
from pydicom.data import get_testdata_file

sys.path.insert(0, os.path.dirname(__file__))
from dicom_synth import head_phantom, write_enhanced, write_series  # noqa: E402

from nvfm import dicom, volume  # noqa: E402

HAVE_DCM2NIIX = shutil.which("dcm2niix") is not None


def rot(axis, deg):
    t = np.radians(deg)
    c, s = np.cos(t), np.sin(t)
    return np.array({0: [[1, 0, 0], [0, c, -s], [0, s, c]], 1: [[c, 0, s], [0, 1, 0], [-s, 0, c]],
                     2: [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis])


OBL = rot(2, 15) @ rot(0, 20)
PLANES = {  # name: (r, c, expected canonical orientation)
    "axial": ((1, 0, 0), (0, 1, 0), "IPR"),
    "sagittal": ((0, 1, 0), (0, 0, -1), "RIP"),
    "coronal": ((1, 0, 0), (0, 0, -1), "PIR"),
    "oblique": (OBL @ [1, 0, 0], OBL @ [0, 1, 0], "IPR"),
}


def stacks_in(d, min_slices=3):
    hs = [dicom.scan_dicom(d, f) for f in dicom.find_inputs(d)]
    groups, skipped = dicom.group_series(hs)
    return [dicom.dicom_stack(d, g).check(min_slices) for g in groups], skipped


def dcm2niix(src, dst):
    os.makedirs(dst, exist_ok=True)
    subprocess.run(["dcm2niix", "-z", "n", "-f", "%s", "-o", dst, src], check=True, capture_output=True)
    return sorted(glob.glob(os.path.join(dst, "*.nii")))


@pytest.mark.skipif(not HAVE_DCM2NIIX, reason="dcm2niix not installed (apt install dcm2niix)")
@pytest.mark.parametrize("plane", list(PLANES))
def test_geometry_matches_dcm2niix_and_nibabel(tmp_path, plane):
    r, c, _ = PLANES[plane]
    vol = head_phantom((9, 40, 34))
    write_series(str(tmp_path / "dcm"), vol, r=r, c=c, ps=(0.9, 0.8), step=np.cross(r, c) * 3.0)
    (st,), _ = stacks_in(str(tmp_path / "dcm"))
    X, A = st.assemble(), st.native_affine()
    nii = dcm2niix(str(tmp_path / "dcm"), str(tmp_path / "nii"))
    assert len(nii) == 1
    img = nib.load(nii[0])
    B, Y = img.affine, np.asarray(img.dataobj, np.float32)
    assert sorted(X.shape) == sorted(Y.shape)
    # my voxel -> their voxel must be an exact signed permutation with integer offsets
    M = np.linalg.inv(B) @ A
    P = np.round(M)
    assert np.allclose(M, P, atol=1e-3), np.round(M, 4)
    assert np.allclose(np.abs(P[:3, :3]).sum(0), 1) and np.allclose(np.abs(P[:3, :3]).sum(1), 1)
    idx = np.indices(X.shape).reshape(3, -1)
    theirs = (P[:3, :3] @ idx + P[:3, 3:4]).astype(int)
    assert np.array_equal(Y[tuple(theirs)], X.reshape(-1))
    # nibabel: both reoriented to the closest RAS canonical are the same image
    a = nib.as_closest_canonical(nib.Nifti1Image(X, A))
    b = nib.as_closest_canonical(img)
    assert np.allclose(a.affine, b.affine, atol=1e-3)
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj, np.float32))


@pytest.mark.parametrize("plane", list(PLANES))
def test_canonical_orientation(tmp_path, plane):
    r, c, codes = PLANES[plane]
    vol = head_phantom((9, 40, 34))
    write_series(str(tmp_path), vol, r=r, c=c, step=np.cross(r, c) * 3.0)
    (st,), _ = stacks_in(str(tmp_path))
    out = volume.process_stack(st)
    assert out["orientation"] == codes
    assert volume.axis_codes(out["affine"]) == codes
    # axis 0 is the acquisition axis at 4 mm, in-plane 1 mm
    assert np.allclose(np.linalg.norm(out["affine"][:3, :3], axis=0), [4, 1, 1])
    n = np.cross(r, c)
    assert abs(abs(out["affine"][:3, 0] @ (n * [-1, -1, 1])) - 4) < 1e-6
    D, H, W = out["data"].shape[1:]
    assert D == int(np.floor(8 * 3.0 / 4 + 1e-6)) + 1


def _smooth_world(w):
    return 500 + 300 * np.sin(w[0] / 9.0) * np.cos(w[1] / 11.0) + 200 * np.sin(w[2] / 13.0)


def _analytic_series(d, step, ps=(0.9, 0.8), shape=(16, 48, 40), shuffle=True, **kw):
    """Slices sampled from a smooth world function (LPS mm) so the truth is known anywhere."""
    K, R, C = shape
    o = np.array([-20.0, -25.0, -30.0])
    ii, jj = np.meshgrid(np.arange(R), np.arange(C), indexing="ij")
    vol = np.stack([_smooth_world(o[:, None, None] + k * np.asarray(step)[:, None, None]
                                  + ii * ps[0] * np.array([0, 1.0, 0])[:, None, None]
                                  + jj * ps[1] * np.array([1.0, 0, 0])[:, None, None]) for k in range(K)])
    write_series(d, vol, origin=o, step=step, ps=ps, modality="MR", intercept=0.0, shuffle=shuffle, **kw)


def _world_lps(A, shape):
    idx = np.indices(shape).reshape(3, -1)
    return (A[:3, :3] @ idx + A[:3, 3:4]) * np.array([-1.0, -1.0, 1.0])[:, None]


def test_gantry_tilt_resampled_exactly(tmp_path):
    step = np.array([0, 5 * np.tan(np.radians(15)), 5.0])
    _analytic_series(str(tmp_path / "dcm"), step, shuffle=False, extra={"GantryDetectorTilt": 15.0})
    (st,), _ = stacks_in(str(tmp_path / "dcm"))
    assert abs(st.tilt_deg - 15) < 0.01
    X, A = st.assemble(), st.native_affine()  # sheared native affine reproduces the slices
    assert np.abs(_smooth_world(_world_lps(A, X.shape)) - X.reshape(-1)).max() <= 0.5 + 1e-3
    v, A2 = volume.resample_stack(st, (2.0, 1.0, 1.0))
    assert np.allclose(A2[:3, :3].T @ A2[:3, :3], np.diag([4.0, 1, 1]))  # orthogonal output grid
    truth = _smooth_world(_world_lps(A2, v.shape))
    valid = v.reshape(-1) != 0
    assert valid.mean() > 0.6
    err = np.abs(truth - v.reshape(-1))[valid]
    assert np.percentile(err, 99) < 15 and err.max() < 30, np.percentile(err, [50, 99, 100])
    if HAVE_DCM2NIIX:  # dcm2niix's uncorrected output keeps the sheared affine: same world samples
        nii = [f for f in dcm2niix(str(tmp_path / "dcm"), str(tmp_path / "nii")) if "Tilt" not in f]
        img = nib.load(nii[0])
        Y = np.asarray(img.dataobj, np.float32)
        world_ras = _world_lps(A2, v.shape) * np.array([-1.0, -1.0, 1.0])[:, None]
        ijk = np.linalg.inv(img.affine)[:3, :3] @ world_ras + np.linalg.inv(img.affine)[:3, 3:4]
        inside = valid & np.all((ijk > 0) & (ijk < np.array(Y.shape)[:, None] - 1), axis=0)
        ref = ndi.map_coordinates(Y, ijk[:, inside], order=1)
        assert np.percentile(np.abs(ref - v.reshape(-1)[inside]), 99) < 15


def test_nonuniform_spacing_is_linear_interpolation(tmp_path):
    d = str(tmp_path)
    pos = np.array([0, 5, 10, 17, 22, 27, 33, 38.0])  # uneven gaps, all < limit
    vol = head_phantom((len(pos), 32, 32))
    write_series(d, vol, step=np.array([0, 0, 1.0]), ps=(1.0, 1.0), modality="MR", intercept=0.0)
    for k, f in enumerate(sorted(dicom.find_inputs(d))):  # move slice files to uneven positions
        ds = pydicom.dcmread(os.path.join(d, f))
        z = ds.ImagePositionPatient[2] - (-50.0)
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], -50.0 + pos[int(round(z))]]
        ds.save_as(os.path.join(d, f))
    (st,), _ = stacks_in(d)
    assert not st.uniform and np.allclose(st.d, pos)
    v, _ = volume.resample_stack(st, (4.0, 1.0, 1.0))
    q = volume.out_grid(0, pos[-1], 4.0)
    X = st.assemble()
    ref = np.stack([np.interp(q, pos, X[:, i, j]) for i in range(32) for j in range(32)], 1).reshape(len(q), 32, 32)
    assert np.allclose(v, ref, atol=1e-3)


def _mem_stack(X, spacing, modality="MR"):
    K, R, C = X.shape
    origins = [(0.0, 0.0, k * spacing[0]) for k in range(K)]
    return dicom.SliceStack(origins, (1, 0, 0), (0, 1, 0), spacing[1:], (R, C), lambda k: X[k].copy(), modality)


def _scipy_reference(X, spacing_in, A_out, shape_out):
    """map_coordinates(order=1) of X at the input-voxel coordinates of the output voxels."""
    w = _world_lps(A_out, shape_out)  # stack frame: x=j*sc, y=i*sr, z=k*sk in LPS
    coords = np.stack([w[2] / spacing_in[0], w[1] / spacing_in[1], w[0] / spacing_in[2]])
    return ndi.map_coordinates(X, coords, order=1, mode="nearest").reshape(shape_out)


def test_resample_upsampling_matches_scipy():
    rng = np.random.default_rng(0)
    X = ndi.gaussian_filter(rng.normal(size=(6, 20, 18)), 1.5).astype(np.float32) * 100
    st = _mem_stack(X, (8.0, 2.0, 2.0)).check()
    v, A = volume.resample_stack(st, (4.0, 1.0, 1.0))
    ref = _scipy_reference(X, (8.0, 2.0, 2.0), A, v.shape)
    assert v.shape == (11, 39, 35)
    assert np.allclose(v, ref, atol=1e-3 * np.ptp(X))


def test_resample_downsampling_close_to_scipy():
    rng = np.random.default_rng(1)
    X = ndi.gaussian_filter(rng.normal(size=(40, 64, 60)), 6).astype(np.float32)
    X = (X - X.min()) / np.ptp(X) * 1000
    st = _mem_stack(X, (1.0, 0.5, 0.5)).check()
    v, A = volume.resample_stack(st, (4.0, 1.0, 1.0))
    ref = _scipy_reference(X, (1.0, 0.5, 0.5), A, v.shape)
    err = np.abs(v - ref)
    assert err.max() < 0.03 * 1000 and err.mean() < 0.005 * 1000, (err.max(), err.mean())


def test_tent_matrix_rows_sum_to_one_and_linear_exact():
    p = np.array([0.0, 1.0, 2.5, 4.0, 7.0])
    q = np.array([0.0, 0.5, 3.0, 7.0, 8.0])
    Wm = volume.tent_matrix(p, q, 0.5).toarray()
    assert np.allclose(Wm[:4].sum(1), 1) and Wm[4].sum() == 0  # 8.0 is outside
    assert np.allclose(Wm[:4] @ (3 * p + 1), 3 * q[:4] + 1)  # linear functions reproduced


def test_ct_windows_known_values():
    hu = np.array([-1000, -20, 0, 40, 80, 180, 600, 2000, 3000], np.float32)
    assert volume.window(hu, 80, 40, 256).tolist() == [0, 0, 0, 128, 255, 255, 255, 255, 255]
    assert volume.window(hu, 200, 80, 16).tolist() == [0, 0, 2, 5, 8, 15, 15, 15, 15]
    assert volume.window(hu, 2800, 600, 16).tolist() == [0, 4, 4, 5, 5, 5, 8, 15, 15]
    ch = volume.ct_channels(hu.reshape(1, 1, -1))
    assert ch[0].ravel().tolist() == [0, 0, 0, 128, 255, 255, 255, 255, 255]
    assert (ch[1] >> 4).ravel().tolist() == [0, 0, 2, 5, 8, 15, 15, 15, 15]
    assert (ch[1] & 15).ravel().tolist() == [0, 4, 4, 5, 5, 5, 8, 15, 15]


def test_ct_series_rescale_and_windows(tmp_path):
    """RescaleSlope/Intercept -> HU; uniform HU regions land on the known window values."""
    vol = np.full((6, 40, 40), -1000.0)
    vol[:, 8:32, 8:20] = 40.0
    vol[:, 8:32, 20:32] = 1000.0
    write_series(str(tmp_path), vol, slope=2.0, intercept=-2048.0, ps=(1.0, 1.0))
    (st,), _ = stacks_in(str(tmp_path))
    out = volume.process_stack(st)
    data, mask = out["data"], out["mask"]
    mid = data[:, 2]  # (C, H, W) of a middle slice; centres of the regions
    # canonical axial is IPR: W points to R, i.e. against the DICOM column direction (+x = L)
    soft, bone = mid[:, 20, 40 - 1 - 13], mid[:, 20, 40 - 1 - 26]
    assert soft[0] == 128 and soft[1] >> 4 == 5 and soft[1] & 15 == 5  # 40 HU: 4.5 -> 5 in the bone window
    assert bone[0] == 255 and bone[1] >> 4 == 15 and bone[1] & 15 == 10  # 1000 HU: 9.64 -> 10
    assert mask[2, 20, 26] == 1 and mask[2, 2, 2] == 0


def test_monochrome1_mr_inverted(tmp_path):
    base = np.clip(head_phantom((6, 32, 32)) + 1000, 0, None)
    write_series(str(tmp_path / "m2"), base, modality="MR", intercept=0.0, ps=(1.0, 1.0))
    write_series(str(tmp_path / "m1"), base, modality="MR", intercept=0.0, ps=(1.0, 1.0), photometric="MONOCHROME1")
    (a,), _ = stacks_in(str(tmp_path / "m2"))
    (b,), _ = stacks_in(str(tmp_path / "m1"))
    ua, ub = volume.process_stack(a)["data"], volume.process_stack(b)["data"]
    assert np.abs(ua.astype(int) - ub).max() <= 1


@pytest.mark.parametrize("tilt_deg", [0.0, 25.0])
def test_monochrome1_mr_inverted_with_tilt_fill(tmp_path, tilt_deg):
    """A sheared (gantry-tilt-like) stack gets the fill value outside the input. For MONOCHROME1
    it was applied before the inversion (max + min - x), so the no-data corners became the
    brightest value and every other level was squeezed: the MONOCHROME2 version of the same data
    is the expectation, tilted or not (uint8 within 1 level, float volume equal up to the
    inversion's constant shift, the fill corners black)."""
    base = np.clip(head_phantom((10, 32, 32)) + 1000, 0, None)
    step = (0.0, 5.0 * np.tan(np.radians(tilt_deg)), 5.0)
    for pi in ("MONOCHROME2", "MONOCHROME1"):
        write_series(str(tmp_path / pi), base, modality="MR", intercept=0.0, ps=(1.0, 1.0), step=step, photometric=pi)
    (a,), _ = stacks_in(str(tmp_path / "MONOCHROME2"))
    (b,), _ = stacks_in(str(tmp_path / "MONOCHROME1"))
    assert abs(b.tilt_deg - tilt_deg) < 0.1
    ua, ub = volume.process_stack(a)["data"], volume.process_stack(b)["data"]
    assert np.abs(ua.astype(int) - ub).max() <= 1
    if tilt_deg:
        assert ua[0, 0, 0, 0] == ub[0, 0, 0, 0] == 0 and (ub == 255).mean() < 0.02
    (fa, _, _), (fb, _, _) = volume.resampled_canonical(a), volume.resampled_canonical(b)
    shift = fb - fa  # MONOCHROME1 stored 4095 - x: inverted, x + a constant
    assert np.ptp(shift) < 1e-2, np.ptp(shift)


def test_enhanced_multiframe_and_rle(tmp_path):
    vol = np.clip(head_phantom((7, 32, 30)) + 1000, 0, None)
    write_enhanced(str(tmp_path / "mf" / "mf.dcm"), vol, ps=(1.0, 1.0), step=(0, 0, 4.0), slope=2.0)
    write_series(str(tmp_path / "rle"), vol, modality="MR", intercept=0.0, ps=(1.0, 1.0), step=(0, 0, 4.0),
                 compress=True)
    write_series(str(tmp_path / "raw"), vol, modality="MR", intercept=0.0, ps=(1.0, 1.0), step=(0, 0, 4.0))
    first = os.path.join(tmp_path, "rle", dicom.find_inputs(str(tmp_path / "rle"))[0])
    assert pydicom.dcmread(first).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    (mf,), _ = stacks_in(str(tmp_path / "mf"))
    (rle,), _ = stacks_in(str(tmp_path / "rle"))
    (raw,), _ = stacks_in(str(tmp_path / "raw"))
    assert np.allclose(mf.assemble(), raw.assemble(), atol=1.0)  # slope 2: stored values halved
    assert np.array_equal(rle.assemble(), raw.assemble())
    assert np.allclose(mf.native_affine(), raw.native_affine())


def test_enhanced_files_of_one_frame_each(tmp_path):
    """A series of enhanced multi-frame files holding one frame each (NumberOfFrames 1, as
    some scanners export 2D series): pydicom returns such a file's pixels as one 2D frame,
    which was refused as "fewer frames than the header says". They load as the classic series."""
    vol = np.clip(head_phantom((5, 16, 16)) + 1000, 0, None)
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for k in range(5):
        write_enhanced(str(tmp_path / "mf" / f"f{k}.dcm"), vol[k:k + 1], origin=(-100.0, -110.0, -50.0 + 4.0 * k),
                       ps=(1.0, 1.0), study_uid=study, series_uid=series, slope=2.0)
    write_series(str(tmp_path / "raw"), vol, modality="MR", intercept=0.0, ps=(1.0, 1.0), step=(0, 0, 4.0))
    (mf,), _ = stacks_in(str(tmp_path / "mf"))
    (raw,), _ = stacks_in(str(tmp_path / "raw"))
    assert np.allclose(mf.assemble(), raw.assemble(), atol=1.0)  # slope 2: stored values halved
    assert np.allclose(mf.native_affine(), raw.native_affine())


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_real_compressed_transfer_syntaxes(tmp_path, name):
    """pydicom's bundled MR_small in compressed syntaxes decodes to the same pixels."""
    ref = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    src = pydicom.dcmread(get_testdata_file(name))
    for k in range(3):  # make a 3-slice series out of copies at distinct positions
        src.SOPInstanceUID = pydicom.uid.generate_uid()
        ipp = [float(x) for x in src.ImagePositionPatient]
        n = np.cross(np.array(src.ImageOrientationPatient[:3], float), np.array(src.ImageOrientationPatient[3:], float))
        src.ImagePositionPatient = list(np.array(ipp) + k * 5.0 * n)
        src.save_as(str(tmp_path / f"{k}.dcm"))
        src = pydicom.dcmread(get_testdata_file(name))
    (st,), _ = stacks_in(str(tmp_path))
    X = st.assemble()
    assert X.shape == (3,) + ref.shape
    assert np.array_equal(X[1], ref.astype(np.float32) * float(src.get("RescaleSlope", 1))
                          + float(src.get("RescaleIntercept", 0)))


def test_missing_pixel_plugin_is_clear_error(tmp_path):
    vol = head_phantom((4, 16, 16))
    write_series(str(tmp_path), vol)
    for f in dicom.find_inputs(str(tmp_path)):  # claim an encapsulated syntax nobody decodes
        ds = pydicom.dcmread(os.path.join(tmp_path, f))
        ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 main profile
        ds.save_as(os.path.join(tmp_path, f), enforce_file_format=True)
    with pytest.raises(dicom.SeriesError, match="cannot decode pixel data: no pixel-data plugin .*MPEG2"):
        hs = [dicom.scan_dicom(str(tmp_path), f) for f in dicom.find_inputs(str(tmp_path))]
        groups, _ = dicom.group_series(hs)
        dicom.dicom_stack(str(tmp_path), groups[0]).check().assemble()


def test_real_localizer_series_skipped():
    """pydicom's bundled 3-plane 'T/S/C RF FAST PILOT' MR localizer is skipped by rule."""
    d = os.path.join(os.path.dirname(get_testdata_file("MR_small.dcm")), "dicomdirtests", "98892003", "MR2")
    hs = [dicom.scan_dicom(d, f) for f in dicom.find_inputs(d)]
    groups, skipped = dicom.group_series(hs)
    assert groups == [] and {r for _, _, r, _ in skipped} == {"localizer/scout"}


def test_mr_family_rules():
    f = dicom.mr_family
    assert f({"description": "AX T1 MPRAGE POST"}) == "T1C"
    assert f({"description": "Ax T1 SE", "contrast": True}) == "T1C"
    assert f({"description": "SAG T1 FLAIR"}) == "T1"
    assert f({"description": "AX T2 FLAIR"}) == "FLAIR"
    assert f({"description": "ep2d_diff_3scan_trace"}) == "DWI"
    assert f({"description": "ep2d_diff ADC"}) == "ADC"
    assert f({"description": "SWI_Images"}) == "SWI"
    assert f({"description": "AX T2 TSE"}) == "T2"
    assert f({"description": "Posterior fossa T2"}) == "T2"
    assert f({"description": "series 5", "te": 100.0, "tr": 9000.0, "ti": 2500.0}) == "FLAIR"
    assert f({"description": "series 6", "te": 12.0, "tr": 500.0}) == "T1"
    assert f({"description": "series 7", "image_type": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]}) == "ADC"
    assert f({"description": "x"}) == "OTHER"


def test_nifti_matches_dicom_geometry(tmp_path):
    vol = head_phantom((9, 40, 34))
    r, c, _ = PLANES["sagittal"]
    write_series(str(tmp_path / "dcm"), vol, r=r, c=c, step=np.cross(r, c) * 3.0, ps=(0.9, 0.8))
    (st,), _ = stacks_in(str(tmp_path / "dcm"))
    X, A = st.assemble(), st.native_affine()
    os.makedirs(tmp_path / "nii")
    nib.save(nib.Nifti1Image(np.transpose(X, (2, 1, 0)), A @ np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0],
                                                                         [0, 0, 0, 1.0]])),
             str(tmp_path / "nii" / "t1.nii.gz"))
    st2 = dicom.nifti_stack(str(tmp_path / "nii"), "t1.nii.gz").check()
    a, b = volume.process_stack(st), volume.process_stack(st2)
    assert a["orientation"] == b["orientation"] == "RIP"
    assert np.allclose(a["affine"], b["affine"], atol=1e-3)
    assert np.abs(a["data"].astype(int) - b["data"]).max() <= 1


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm"])
def test_raw_pixel_fast_path_equals_pydicom(tmp_path, name):
    """The direct numpy read of uncompressed pixels gives pydicom's pixel_array exactly."""
    shutil.copy(get_testdata_file(name), tmp_path / "a.dcm")
    h = dicom.scan_dicom(str(tmp_path), "a.dcm")
    assert h["raw_pixels"] is not None
    ds = pydicom.dcmread(get_testdata_file(name))
    ref = ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    g = {"info": h, "frames": [(h, h["frames"][0])]}
    st = dicom.dicom_stack(str(tmp_path), g)
    assert np.array_equal(st.slice(0), ref)


def test_excess_pixel_data_is_rejected_not_cropped(tmp_path):
    """pydicom's MR_small_padded.dcm holds one row more than Rows x Columns: by length alone
    that is also a file whose Rows is one short (pydicom would crop it), so it is refused."""
    shutil.copy(get_testdata_file("MR_small_padded.dcm"), tmp_path / "a.dcm")
    h = dicom.scan_dicom(str(tmp_path), "a.dcm")
    assert h["pixel_error"].startswith("pixel data length does not match")
    with pytest.raises(dicom.SeriesError, match="pixel data length does not match"):
        dicom.dicom_stack(str(tmp_path), {"info": h, "frames": [(h, h["frames"][0])]})


def test_raw_pixel_fast_path_masks_unused_bits(tmp_path):
    vol = head_phantom((3, 16, 16))
    write_series(str(tmp_path), vol, extra={"BitsStored": 12, "HighBit": 11}, intercept=-1024.0)
    for f in dicom.find_inputs(str(tmp_path)):  # garbage in the 4 unused high bits
        ds = pydicom.dcmread(os.path.join(tmp_path, f))
        a = np.frombuffer(ds.PixelData, np.int16).copy()
        a = (a & 0x0FFF) | 0x5000
        ds.PixelData = a.tobytes()
        ds.save_as(os.path.join(tmp_path, f))
    (st,), _ = stacks_in(str(tmp_path))
    ref = [pydicom.dcmread(os.path.join(tmp_path, f)) for f in dicom.find_inputs(str(tmp_path))]
    ref.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    for k, d in enumerate(ref):
        assert np.array_equal(st.slice(k), d.pixel_array.astype(np.float32) - 1024.0)


def test_fill_holes_and_token_mask_match_references():
    rng = np.random.default_rng(5)
    for _ in range(5):
        m = ndi.binary_opening(rng.random((37, 41)) < 0.6)
        assert np.array_equal(volume.fill_holes_2d(m), ndi.binary_fill_holes(m))
    import torch
    from nvfm.tokenize import token_foreground
    for shape in [(9, 40, 33), (4, 16, 16), (13, 70, 51)]:
        mask = (rng.random(shape) < 0.55).astype(np.uint8)
        for frac in (0.5, 1.0, 0.1):
            assert np.array_equal(volume.token_mask(mask, frac), token_foreground(torch.from_numpy(mask), frac).numpy())


def test_float16_percentiles_exact_and_overflow_fallback(tmp_path):
    rng = np.random.default_rng(6)
    buf = (rng.gamma(2.0, 300.0, (6, 20, 30))).astype(np.float16)
    got = volume.percentiles_f16(buf, (0.5, 99.5))
    assert np.allclose(got, np.percentile(buf.astype(np.float64), (0.5, 99.5)), rtol=1e-6)
    # MR values beyond float16 take the float32 path; percentile scaling makes the output
    # independent of the intensity scale
    base = np.clip(head_phantom((6, 32, 32)) + 1000, 0, None)
    write_series(str(tmp_path / "a"), base, modality="MR", intercept=0.0, ps=(1.0, 1.0))
    write_series(str(tmp_path / "b"), base * 100, modality="MR", intercept=0.0, slope=100.0, ps=(1.0, 1.0))
    (a,), _ = stacks_in(str(tmp_path / "a"))
    (b,), _ = stacks_in(str(tmp_path / "b"))
    assert max(b.slice(k).max() for k in range(6)) > 65504
    ua, ub = volume.process_stack(a)["data"], volume.process_stack(b)["data"]
    assert np.abs(ua.astype(int) - ub).max() <= 1


def test_fill_holes_slices_matches_scipy_per_slice():
    rng = np.random.default_rng(7)
    m = ndi.binary_opening(rng.random((20, 33, 29)) < 0.6).astype(np.uint8)
    ref = np.stack([ndi.binary_fill_holes(x) for x in m]).astype(np.uint8)
    assert np.array_equal(volume.fill_holes_slices(m.copy(), chunk=6), ref)


def test_fast_header_getter_equals_pydicom(tmp_path):
    """The raw-bytes header decoding gives the same scan as pydicom's own conversion."""
    write_series(str(tmp_path / "s"), head_phantom((3, 16, 16)), desc="AX T2 FLAIR", modality="MR",
                 intercept=0.0, image_type=("DERIVED", "PRIMARY", "ADC"))
    names = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_expb.dcm", "emri_small.dcm",
             "eCT_Supplemental.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "693_J2KR.dcm"]
    paths = [get_testdata_file(n) for n in names] + [str(p) for p in sorted((tmp_path / "s").iterdir())]
    for p in paths:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        fast, ref = dicom._header_info(ds, {}), None
        orig = dicom._fast_getter
        try:
            dicom._fast_getter = lambda d: d.get
            ref = dicom._header_info(pydicom.dcmread(p, stop_before_pixels=True), {})
        finally:
            dicom._fast_getter = orig
        assert fast == ref, p


def test_stack_records_the_pixel_type_simpleitk_reads(tmp_path):
    """dicom_stack sets SliceStack.itk_pixel_type from BitsStored, PixelRepresentation and the
    rescale (volume.itk_dicom_pixel_type; preprocess.py --preset=neurovfm truncates and clamps to
    it, tests/test_sitk_parity.py); files of one series that disagree leave it unknown (None).
    nifti_stack sets it from the header's data type (volume.itk_nifti_pixel_type)."""
    vol = np.random.default_rng(0).uniform(0, 1000, (4, 8, 8))
    u12 = {"PixelRepresentation": 0, "BitsStored": 12, "HighBit": 11}

    def stack(name, **kw):
        d = tmp_path / name
        write_series(str(d), vol, modality="MR", **kw)
        hs = [dicom.scan_dicom(str(tmp_path), f"{name}/{n}") for n in sorted(os.listdir(d))]
        groups, _ = dicom.group_series(hs)
        return dicom.dicom_stack(str(tmp_path), groups[0]), hs, groups[0]

    st, hs, _ = stack("u12", intercept=0.0, extra=u12)
    assert (hs[0]["bits_stored"], hs[0]["pixel_representation"]) == (12, 0) and st.itk_pixel_type == "uint16"
    assert stack("s16", intercept=0.0)[0].itk_pixel_type == "int16"
    assert stack("ct", intercept=-1024.0)[0].itk_pixel_type == "int32"  # signed 16-bit - 1024
    assert stack("half", slope=0.5, intercept=0.0)[0].itk_pixel_type == "float64"
    _, _, g = stack("mixed", intercept=0.0, extra=u12)
    g["frames"][1][0]["bits_stored"] = 16  # one file of the series disagrees
    assert dicom.dicom_stack(str(tmp_path), g).itk_pixel_type is None
    g["frames"][1][0]["bits_stored"] = 12
    g["frames"][2][1]["slope"] = 2.0
    assert dicom.dicom_stack(str(tmp_path), g).itk_pixel_type is None
    for dt, want in ((np.uint16, "uint16"), (np.int16, "int16"), (np.float32, "float32")):  # nifti_stack too
        nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0).astype(dt), np.diag([1.0, 1.0, 5.0, 1.0])),
                 str(tmp_path / "v.nii.gz"))
        assert dicom.nifti_stack(str(tmp_path), "v.nii.gz").itk_pixel_type == want


def test_alternating_gaps_are_two_stacks_other_spacings_are_not():
    """Hand-worked positions (mm): interleaved stacks (also when the second covers only part of
    the first, or sits mid-period) are found with their two gaps and the run's first gap; a
    missing slice, uneven spacing, rounding of positions and a gantry-tilt series are not."""
    z5 = 5.0 * np.arange(10)
    two = np.sort(np.r_[z5, z5 + 0.5])
    assert dicom.alternating_gaps(two) == (0.5, 4.5, 0)
    part = np.sort(np.r_[z5, 20.0 + 2.0 * np.ones(4) + 5.0 * np.arange(4)])  # 22, 27, 32, 37 among 0..45
    short, long_, k = dicom.alternating_gaps(part)
    assert (round(short, 6), round(long_, 6), k) == (2.0, 3.0, 4)
    assert dicom.alternating_gaps(np.sort(np.r_[z5, z5 + 1.0])) == (1.0, 4.0, 0)
    for ok in (z5, np.delete(z5, 4), [0, 5, 10, 17, 22, 27, 33, 38.0], [0, 2.5, 5.1, 7.6, 10.2, 12.7, 15.3, 17.8],
               np.r_[2.5 * np.arange(6), 15.0 + 5.0 * np.arange(6)], 2.5 * np.arange(20)):
        assert dicom.alternating_gaps(ok) is None, ok
    X = np.zeros((len(two), 8, 8), np.float32)
    X[:, 2:6, 2:6] = np.arange(len(two))[:, None, None]  # distinct slices: no duplicates
    st = dicom.SliceStack([(0.0, 0.3 * z, z) for z in two], (1, 0, 0), (0, 1, 0), (1.0, 1.0), (8, 8),
                          lambda k: X[k].copy(), "CT")  # tilted (shear along y) and interleaved
    with pytest.raises(dicom.SeriesError, match=r"^two interleaved slice stacks \(gaps alternate 0.5 / 4.5 mm\)$"):
        st.check()
    st = dicom.SliceStack([(0.0, 0.3 * z, z) for z in z5], (1, 0, 0), (0, 1, 0), (1.0, 1.0), (8, 8),
                          lambda k: X[k].copy(), "CT").check()
    assert abs(st.tilt_deg - np.degrees(np.arctan(0.3))) < 1e-6 and st.uniform
