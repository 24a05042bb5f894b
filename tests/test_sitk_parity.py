"""preprocess.py --preset=neurovfm against real SimpleITK: the authors' resampling recipe
(MLNeurosurg/neurovfm, neurovfm/data/utils.py preprocess_image and
neurovfm/data/preprocess.py prepare_for_inference), written here from what it does with
SimpleITK calls, run on small synthetic NIfTI volumes and DICOM series, and compared with
nvfm's own implementation (nvfm/volume.py resampled_neurovfm, no SimpleITK): grid (shape,
affine, array order) and values.

Their recipe: sitk.ReadImage (or ImageSeriesReader) -> DICOMOrient to "RPI" -> the 4 mm axis
z_dim by a spacing / size heuristic -> ResampleImageFilter(sitkBSpline, output spacing
1 x 1 x 4 with the 4 on z_dim, size int(n * spacing / target) per axis, origin and direction
of the RPI image, default pixel value 0, output pixel type = input pixel type) -> Extract a
centred crop to multiples of 16 in-plane / 4 on z_dim -> GetArrayFromImage (z, y, x),
transposed so the 4 mm axis is first.

Measured tolerances (the reasons, not slack): float input (MR) max |diff| <= 2e-6 of the
value range (nvfm sums in float32, ITK in double; ~4e-4 on a 0..800 range); integer input
max |diff| <= 1, only at voxels whose exact interpolated value is an integer or within
float32 rounding of one (ITK truncates its double result to the pixel type and nvfm its
float32 one, so a value of exactly -1000 in air comes out -1000 or -999 by rounding noise):
everywhere else the integers are equal. The pixel type (itk_nifti_pixel_type /
itk_dicom_pixel_type) decides truncation and clamping: an unsigned MR volume's undershoot
is 0 in theirs."""
import os
import sys

import nibabel as nib
import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from nvfm import dicom, volume as V  # noqa: E402


# ------------------------------------------------------------------ the authors' recipe, in SimpleITK
def their_z_dim(img):
    """Their slice-axis heuristic on the RPI image: equal spacings -> 2; all sizes different
    -> the largest spacing; else the axis whose size occurs once."""
    sp = np.array(img.GetSpacing(), float)
    size = np.array(img.GetSize())
    if len(set(sp.tolist())) == 1:
        return 2
    counts = np.bincount(size)
    if (counts == 1).all():
        return int(np.argmax(sp))
    return int(np.nonzero(size == np.nonzero(counts == 1)[0][0])[0][0])


def their_resample(path, cast=None):
    """-> (resampled SimpleITK image before the crop, z_dim). cast: a SimpleITK pixel type to
    cast the input to first (sitk.sitkFloat64: ITK's interpolated values before the cast
    back to an integer pixel type)."""
    img = sitk.DICOMOrient(sitk.ReadImage(path), "RPI")
    if cast is not None:
        img = sitk.Cast(img, cast)
    z = their_z_dim(img)
    target = [1.0, 1.0, 1.0]
    target[z] = 4.0
    sp, size = img.GetSpacing(), img.GetSize()
    new_size = [int(size[i] * (sp[i] / target[i])) for i in range(3)]
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing(target)
    f.SetSize(new_size)
    f.SetOutputOrigin(img.GetOrigin())
    f.SetOutputDirection(img.GetDirection())
    f.SetInterpolator(sitk.sitkBSpline)
    return f.Execute(img), z


def their_crop(img, z):
    """Their centred crop: start (n % p) // 2, length (n // p) * p, p = 4 on z_dim, 16 else."""
    size = img.GetSize()
    p = [4 if i == z else 16 for i in range(3)]
    return sitk.Extract(img, [(n // q) * q for n, q in zip(size, p)], [(n % q) // 2 for n, q in zip(size, p)])


_DHW = {2: (0, 1, 2), 1: (1, 0, 2), 0: (2, 1, 0)}  # z_dim -> transpose of the (z, y, x) array


def their_array(img, z):
    """GetArrayFromImage (z, y, x), with the 4 mm axis moved first as they do."""
    return np.transpose(sitk.GetArrayFromImage(img), _DHW[z])


def their_affine(img, z):
    """Voxel (D, H, W) of their_array -> RAS mm."""
    A = np.eye(4)
    A[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    A[:3, 3] = img.GetOrigin()
    A = V.LPS_TO_RAS @ A  # columns: sitk index x, y, z
    xyz = [2 - a for a in _DHW[z]]  # array axis t of their_array is sitk index xyz[t]
    return A[:, xyz + [3]]


# ------------------------------------------------------------------ synthetic inputs
def _field(shape, lo, hi, seed):
    import scipy.ndimage as ndi
    x = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=shape), 2.0)
    return lo + (hi - lo) * (x - x.min()) / (x.max() - x.min())


def _rot_x(deg):
    t = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def _ct(shape, seed):
    """int16 HU: soft tissue, an air border (-1000) and a bone block."""
    x = _field(shape, -50, 120, seed)
    x[:max(3, shape[0] // 12)] = -1000
    x[:, :4] = -1000
    c = [n // 2 for n in shape]
    x[c[0] - 5:c[0] + 5, c[1] - 4:c[1] + 6, max(c[2] - 1, 0):c[2] + 1] = 900
    return np.round(x).astype(np.int16)


def _mr(shape, seed):
    return (_field(shape, 10, 800, seed) + 0.3).astype(np.float32)  # not integer-valued: no truncation


# name: (array, voxel size (x, y, z) of the NIfTI array, rotation/flip of its axes, origin, their z_dim)
CASES = {
    "ct_axial_0.45x0.45x5": (lambda: _ct((101, 101, 9), 0), (0.45, 0.45, 5.0), np.eye(3), (-20.0, 10.0, 5.0), 2),
    "ct_flipped_yz_0.45x0.45x8": (lambda: _ct((67, 67, 7), 1), (0.45, 0.45, 8.0), np.diag([1.0, -1, -1]),
                                  (-15.0, 30.0, 40.0), 2),  # 8 mm slices: the last output is half a slice out
    "mr_flipped_x_1.2x1.2x6": (lambda: _mr((53, 53, 7), 2), (1.2, 1.2, 6.0), np.diag([-1.0, 1, 1]),
                               (30.0, -20.0, 10.0), 2),
    "mr_2x2x8_flipped_y": (lambda: _mr((40, 37, 9), 3), (2.0, 2.0, 8.0), np.diag([1.0, -1, 1]), (0.0, 0.0, 0.0), 2),
    "mr_coronal_0.9x5x0.9": (lambda: _mr((61, 9, 61), 4), (0.9, 5.0, 0.9), np.eye(3), (0.0, 0.0, 0.0), 1),
    "mr_sagittal_5x0.9x0.95": (lambda: _mr((9, 61, 57), 5), (5.0, 0.9, 0.95), np.eye(3), (0.0, 0.0, 0.0), 0),
    "mr_oblique12_1.1x1.1x5.5": (lambda: _mr((45, 45, 9), 6), (1.1, 1.1, 5.5), _rot_x(12.0), (5.0, -3.0, 2.0), 2),
}


def _write(root, name, arr, zooms, R, origin):
    A = np.eye(4)
    A[:3, :3] = R @ np.diag(zooms)
    A[:3, 3] = origin
    img = nib.Nifti1Image(arr, A)
    img.set_qform(A, code=1)  # both set, same affine: SimpleITK and nibabel read one geometry
    img.set_sform(A, code=1)
    nib.save(img, os.path.join(root, name))
    return os.path.join(root, name)


def _compare(theirs, ours, integer, theirs_exact=None):
    """-> max |diff|; asserts the documented tolerance (module docstring)."""
    d = np.abs(theirs.astype(np.float64) - ours.astype(np.float64))
    if not integer:
        assert d.max() <= 2e-6 * np.abs(theirs).max(), d.max()
        return float(d.max())
    assert np.array_equal(ours, np.trunc(ours))
    assert d.max() <= 1.0, d.max()
    assert (d > 0).mean() <= 0.05, (d > 0).mean()
    if theirs_exact is not None:  # and only where ITK's own value is (within rounding) an integer
        tie = np.abs(theirs_exact - np.round(theirs_exact)) <= 1e-3
        assert not (d > 0)[~tie].any(), np.argwhere((d > 0) & ~tie)[:5]
        np.testing.assert_array_equal(np.trunc(theirs_exact), theirs)  # (the cast is ITK's truncation)
    return float(d.max())


@pytest.mark.parametrize("name", list(CASES))
def test_resampled_neurovfm_matches_simpleitk(name, tmp_path):
    make, zooms, R, origin, z_want = CASES[name]
    arr = make()
    path = _write(str(tmp_path), "v.nii.gz", arr, zooms, R, origin)
    img, z = their_resample(path)
    assert z == z_want  # their heuristic picks the acquisition axis here (nvfm always does)
    integer = arr.dtype.kind == "i"
    assert img.GetPixelID() == (sitk.sitkInt16 if integer else sitk.sitkFloat32)  # their output pixel type
    theirs, A_theirs = their_array(img, z), their_affine(img, z)

    st = dicom.nifti_stack(str(tmp_path), "v.nii.gz")
    assert st.modality == ("CT" if integer else "MR")
    ours, A, codes = V.resampled_neurovfm(st)
    # grid: the same array layout (their transpose, 4 mm axis first) and the same voxel -> world map
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    np.testing.assert_allclose(A, A_theirs, rtol=0, atol=1e-4)
    assert codes == "".join(nib.aff2axcodes(A_theirs))
    exact = None
    if integer:
        exact = their_array(their_resample(path, cast=sitk.sitkFloat64)[0], z)
    diff = _compare(theirs, ours, integer, exact)
    # their crop to whole patches is nvfm's neurovfm_crop of the same array
    cropped = their_array(their_crop(img, z), z)
    np.testing.assert_array_equal(cropped, theirs[V.neurovfm_crop(theirs.shape)])
    print(f"{name}: shape {ours.shape} {codes} max|diff| {diff:.3g}, differing voxels "
          f"{(theirs != ours).mean():.2%}")


def _mr_edge(dtype, seed):
    """An MR volume with a sharp edge to a 0 background: the B-spline undershoots below 0 there."""
    x = _field((53, 53, 7), 100, 800 if dtype != np.uint8 else 250, seed)
    x[:10] = 0
    x[:, :8] = 0
    return np.round(x).astype(dtype)


@pytest.mark.parametrize("kind", ["uint16", "uint8", "int16", "int16_scl_inter", "float32_integral"])
def test_pixel_type_truncation_and_clamp_match_simpleitk(kind, tmp_path):
    """ITK keeps the input's pixel type: an unsigned MR volume's undershoot at the edge of the
    head is clamped to 0 (the 0.5th percentile of their MR clip is 0, not negative); int16 is
    truncated but not clamped; a NIfTI rescaled by scl_inter (and a float file) is float and not
    truncated. nvfm follows the pixel type (itk_nifti_pixel_type of the header), which
    nifti_stack records (SliceStack.itk_pixel_type) as resampled_neurovfm's default."""
    dtype = {"uint16": np.uint16, "uint8": np.uint8}.get(kind, np.int16)
    arr = _mr_edge(dtype, 7)
    path = _write(str(tmp_path), "v.nii.gz", arr.astype(np.float32) if kind.startswith("float") else arr,
                  (1.2, 1.2, 6.0), np.eye(3), (0.0, 0.0, 0.0))
    if kind == "int16_scl_inter":
        img = nib.load(path)
        img.header.set_slope_inter(1.0, -1000.0)  # stored value - 1000: still integer-valued
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16), img.affine, img.header), path)
    simg, z = their_resample(path)
    theirs = their_array(simg, z)
    pt = V.itk_nifti_pixel_type(nib.load(path).header)
    assert pt == theirs.dtype.name  # the helper predicts SimpleITK's reader
    st = dicom.nifti_stack(str(tmp_path), "v.nii.gz")
    assert st.itk_pixel_type == pt  # nifti_stack sets it from the header: the default below
    ours, _, _ = V.resampled_neurovfm(st, pixel_type=pt)
    np.testing.assert_array_equal(V.resampled_neurovfm(st)[0], ours)
    exact = their_array(their_resample(path, cast=sitk.sitkFloat64)[0], z)
    assert exact.min() < -5  # the undershoot is there
    if theirs.dtype.kind in "iu":
        _compare(theirs, ours, True, np.clip(exact, np.iinfo(theirs.dtype).min, np.iinfo(theirs.dtype).max))
    else:
        _compare(theirs, ours, False)
    assert abs(float(ours.min()) - float(theirs.min())) <= 1e-3
    crop = V.neurovfm_crop(ours.shape)
    lo_t, lo_o = (np.percentile(np.asarray(x[crop], np.float64), 0.5) for x in (theirs, ours))
    assert abs(lo_t - lo_o) <= 1e-3 * (800 - lo_t)  # their MR clip's lower end
    if kind.startswith("uint"):  # without the pixel type (int16-like rule): the undershoot stays
        st.itk_pixel_type = None
        plain, _, _ = V.resampled_neurovfm(st)
        assert plain.min() < -5 and theirs.min() == 0


DICOM_TYPES = {  # name: (write_series keywords, BitsStored, PixelRepresentation, slope, intercept)
    "ct_s16_m1024": (dict(), 16, 1, 1.0, -1024.0),
    "ct_u12_m1024": (dict(extra={"PixelRepresentation": 0, "BitsStored": 12, "HighBit": 11}), 12, 0, 1.0, -1024.0),
    "ct_s12_m1024": (dict(extra={"BitsStored": 12, "HighBit": 11}), 12, 1, 1.0, -1024.0),
    "ct_u16_m1024": (dict(extra={"PixelRepresentation": 0}), 16, 0, 1.0, -1024.0),
    "mr_u12": (dict(intercept=0.0, extra={"PixelRepresentation": 0, "BitsStored": 12, "HighBit": 11}), 12, 0, 1.0, 0.0),
    "mr_u16": (dict(intercept=0.0, extra={"PixelRepresentation": 0}), 16, 0, 1.0, 0.0),
    "mr_s16": (dict(intercept=0.0), 16, 1, 1.0, 0.0),
    "mr_u12_slope2": (dict(slope=2.0, intercept=0.0, extra={"PixelRepresentation": 0, "BitsStored": 12, "HighBit": 11}),
                      12, 0, 2.0, 0.0),
    "mr_slope0.5": (dict(slope=0.5, intercept=0.0), 16, 1, 0.5, 0.0),
}


def _read_series(d):
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(d))
    return r.Execute()


def their_dicom_resample(d):
    """Their recipe on the DICOM series in folder d (ImageSeriesReader) -> (resampled image
    before the crop, z_dim, ITK's interpolated values before the cast back to the pixel type
    (float64, as their_array))."""
    img = sitk.DICOMOrient(_read_series(d), "RPI")
    z = their_z_dim(img)
    target = [1.0, 1.0, 1.0]
    target[z] = 4.0
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing(target)
    f.SetSize([int(n * (s / t)) for n, s, t in zip(img.GetSize(), img.GetSpacing(), target)])
    f.SetOutputOrigin(img.GetOrigin())
    f.SetOutputDirection(img.GetDirection())
    f.SetInterpolator(sitk.sitkBSpline)
    return f.Execute(img), z, their_array(f.Execute(sitk.Cast(img, sitk.sitkFloat64)), z)


def test_dicom_pixel_type_rule_matches_simpleitk(tmp_path):
    from dicom_synth import write_series
    vol = np.random.default_rng(8).uniform(0, 1000, (3, 8, 8))
    for name, (kw, bits, pr, slope, inter) in DICOM_TYPES.items():
        d = str(tmp_path / name)
        write_series(d, vol, **kw)
        got = sitk.GetArrayViewFromImage(_read_series(d)).dtype.name
        assert V.itk_dicom_pixel_type(bits, pr, slope, inter) == got, name


@pytest.mark.parametrize("name", ["ct_s16_m1024", "mr_u12"])
def test_dicom_series_matches_simpleitk(name, tmp_path):
    """A DICOM series, read by their loader (ImageSeriesReader) and by nvfm's: the same grid,
    values as for NIfTI; an unsigned MR series clamps its undershoot to 0 in both."""
    from dicom_synth import write_series
    kw, bits, pr, slope, inter = DICOM_TYPES[name]
    if name.startswith("ct"):
        vol = _ct((99, 101, 9), 0).transpose(2, 1, 0).astype(np.float64)  # (K, R, C)
        geo = dict(ps=(0.45, 0.45), step=(0.0, 0.0, 5.0))
    else:
        vol = _mr_edge(np.uint16, 3).transpose(2, 1, 0).astype(np.float64)
        geo = dict(ps=(1.2, 1.2), step=(0.0, 0.0, 6.0), modality="MR")
    d = str(tmp_path / "s")
    write_series(d, vol, **geo, **kw)
    out, z, exact = their_dicom_resample(d)
    theirs, A_theirs = their_array(out, z), their_affine(out, z)
    groups, _ = dicom.group_series([dicom.scan_dicom(str(tmp_path), f"s/{n}") for n in sorted(os.listdir(d))])
    st = dicom.dicom_stack(str(tmp_path), groups[0]).check(3)
    pt = V.itk_dicom_pixel_type(bits, pr, slope, inter)
    assert st.itk_pixel_type == pt  # dicom_stack sets it from the headers
    ours, A, _ = V.resampled_neurovfm(st, pixel_type=pt)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(A, A_theirs, rtol=0, atol=1e-4)
    info = np.iinfo(theirs.dtype)
    diff = _compare(theirs, ours, True, np.clip(exact, info.min, info.max))
    if name.startswith("mr"):
        assert exact.min() < -5 and theirs.min() == 0 == ours.min()
    print(f"DICOM {name} ({pt}): max|diff| {diff:.3g}, differing voxels {(theirs != ours).mean():.2%}")


def test_outside_voxels_are_their_default_pixel_value():
    """The 2 mm -> 1 mm axis: the last output row is half a pixel past the input: 0 in both
    (their default pixel value, not air: -1024 would be ours)."""
    import tempfile
    with tempfile.TemporaryDirectory() as root:
        make, zooms, R, origin, _ = CASES["mr_2x2x8_flipped_y"]
        path = _write(root, "v.nii.gz", make(), zooms, R, origin)
        img, z = their_resample(path)
        theirs = their_array(img, z)
        ours, _, _ = V.resampled_neurovfm(dicom.nifti_stack(root, "v.nii.gz"))
    edge_t = np.all(theirs == 0, axis=(0, 2))
    assert edge_t.any() and np.array_equal(edge_t, np.all(ours == 0, axis=(0, 2)))


def test_preprocess_neurovfm_shard_matches_simpleitk(tmp_path):
    """The full preprocess.py --preset=neurovfm path on a CT NIfTI: the shard's values block
    is their resampled HU array, and its float brain window over the crop is theirs (their
    clip_by_window: (clip(x, L - W/2, L + W/2) - lo) / (W + 1e-8))."""
    import preprocess
    from nvfm.data import ShardReader
    make, zooms, R, origin, _ = CASES["ct_axial_0.45x0.45x5"]
    root = tmp_path / "in"
    root.mkdir()
    path = _write(str(root), "ct.nii.gz", make(), zooms, R, origin)
    out = str(tmp_path / "shards")
    man = preprocess.run(str(root), out, n_workers=0, cfg_min_fg=-1.0, cfg_progress=False, cfg_preset="neurovfm")
    assert man["preset"] == "neurovfm"
    r = ShardReader(out)
    assert len(r) == 1 and r.volumes[0]["modality"] == "CT"
    img, z = their_resample(path)
    theirs = their_array(img, z)
    vals = np.asarray(r.values(0))
    assert vals.shape == theirs.shape
    np.testing.assert_allclose(r.volumes[0]["affine"], their_affine(img, z), rtol=0, atol=1e-4)
    _compare(theirs, vals, integer=True)
    crop = their_array(their_crop(img, z), z).astype(np.float64)
    for name in ("brain", "blood", "bone"):
        W, L, _ = V.CT_WINDOWS[name]
        lo, hi = L - W / 2, L + W / 2
        want = (np.clip(crop, lo, hi) - lo) / (hi - lo + 1e-8)
        got = r.window_float(0, name)[V.neurovfm_crop(vals.shape)]
        assert np.abs(got - want).max() <= 1.0 / W + 1e-6  # one HU at a truncation tie


def _their_mr_scaling(crop):
    """Their MR intensity scaling of the centre crop: clip to the 0.5 / 99.5th percentiles,
    then min-max (+ 1e-8) -> (scaled, (lo, hi))."""
    x = np.asarray(crop, np.float64)
    lo, hi = np.percentile(x, V.MR_PERCENTILES[0]), np.percentile(x, V.MR_PERCENTILES[1])
    c = np.clip(x, lo, hi)
    return (c - c.min()) / (c.max() - c.min() + 1e-8), (lo, hi)


@pytest.mark.parametrize("kind", ["nifti_uint16", "dicom_u12"])
def test_preprocess_neurovfm_unsigned_mr_matches_simpleitk(kind, tmp_path):
    """The full preprocess.py --preset=neurovfm path on an unsigned MR input (a uint16 NIfTI;
    an unsigned 12-bit DICOM series, read by GDCM as uint16): the reader records the pixel
    type SimpleITK reads (SliceStack.itk_pixel_type), so the B-spline undershoot at the edge
    of the head is clamped to 0 as in theirs. The shard's values block is their resampled
    array, its MR clip their 0.5 / 99.5th percentiles and its float MR window their scaling
    (without the pixel type the undershoot stays negative: values differ by > 5 and the clip's
    lower end moves)."""
    import preprocess
    from nvfm.data import ShardReader
    root = tmp_path / "in"
    arr = _mr_edge(np.uint16, 11)  # (x, y, z) = (53, 53, 7), 1.2 x 1.2 x 6 mm
    if kind.startswith("nifti"):
        root.mkdir()
        path = _write(str(root), "mr.nii.gz", arr, (1.2, 1.2, 6.0), np.eye(3), (0.0, 0.0, 0.0))
        img, z = their_resample(path)
        exact = their_array(their_resample(path, cast=sitk.sitkFloat64)[0], z)
    else:
        from dicom_synth import write_series
        kw, bits, pr, slope, inter = DICOM_TYPES["mr_u12"]
        d = str(root / "study" / "s")
        write_series(d, arr.transpose(2, 1, 0).astype(np.float64), ps=(1.2, 1.2), step=(0.0, 0.0, 6.0),
                     modality="MR", **kw)
        img, z, exact = their_dicom_resample(d)
    theirs, A_theirs = their_array(img, z), their_affine(img, z)
    assert theirs.dtype == np.uint16 and exact.min() < -5 and theirs.min() == 0  # their clamp bites
    out = str(tmp_path / "shards")
    man = preprocess.run(str(root), out, n_workers=0, cfg_min_fg=-1.0, cfg_progress=False, cfg_preset="neurovfm")
    assert man["preset"] == "neurovfm" and man["resampling"] == "bspline-sitk2"
    r = ShardReader(out)
    assert len(r) == 1 and r.volumes[0]["modality"] == "MR"
    vals = np.asarray(r.values(0))
    assert vals.shape == theirs.shape
    np.testing.assert_allclose(r.volumes[0]["affine"], A_theirs, rtol=0, atol=1e-4)
    diff = _compare(theirs, vals, True, np.clip(exact, 0, 65535))
    assert vals.min() == 0
    crop = V.neurovfm_crop(vals.shape)
    cropped = their_array(their_crop(img, z), z)
    np.testing.assert_array_equal(cropped, theirs[crop])
    want, (lo, hi) = _their_mr_scaling(cropped)
    assert lo == 0.0
    np.testing.assert_allclose(r.volumes[0]["clip"], [lo, hi], rtol=0, atol=1.0)  # one level at a truncation tie
    got = r.window_float(0, "mr")[crop]
    wdiff = float(np.abs(got - want).max())
    assert wdiff <= 1.0 / (hi - lo) + 1e-6, wdiff
    print(f"preprocess {kind}: max|diff| values {diff:.3g}, MR window {wdiff:.3g}")
