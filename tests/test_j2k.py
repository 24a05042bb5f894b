"""JPEG 2000: direct codestream decoding and the reduced-resolution path (nvfm/dicom.py).

Direct decode == pydicom's pixel_array exactly (real pydicom-data files). Reduced decode
(finest wavelet level dropped) == the 5/3 low-pass filter sampled at EVEN pixels (no
half-pixel shift), and on whole series the reduced path gives the same output grid and
affine as the full decode, with intensities within a stated tolerance. Fall-backs: no
reduced decoder -> full decode for the series (noted); a file that fails -> full decode +
the same low-pass filter (noted).
"""
import json
import os
import sys

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from dicom_synth import head_phantom, write_series  # noqa: E402

import preprocess  # noqa: E402
from nvfm import dicom, volume  # noqa: E402

# real files: CT 14-bit signed 0.48 mm, MR 12-bit unsigned 0.2 mm, MR 16-bit signed with an
# OW (non-conformant) encapsulated element, NM 16-bit signed 1024 x 256
needs_pillow_j2k = pytest.mark.skipif(not dicom._pillow_j2k(), reason="Pillow without OpenJPEG (JPEG 2000)")

REAL = ["693_J2KR.dcm", "MR2_J2KR.dcm", "MR_small_jp2klossless.dcm", "JPEG2000.dcm"]


def _codestream(name):
    p = get_testdata_file(name)
    h = dicom.scan_dicom(os.path.dirname(p), os.path.basename(p))
    assert h["j2k_pixels"] is not None, "header scan must locate the encapsulated codestream"
    return p, h, dicom.read_j2k_codestream(p, h["j2k_pixels"][0])


@pytest.mark.parametrize("name", REAL)
def test_direct_decode_equals_pydicom(name):
    p, h, cs = _codestream(name)
    arr, hd = dicom.decode_j2k_full(cs, *h["j2k_pixels"][1:])
    ref = pydicom.dcmread(p).pixel_array
    assert hd["levels"] >= 1 and hd["ncomp"] == 1
    assert np.array_equal(arr, ref)


@needs_pillow_j2k
@pytest.mark.parametrize("name", REAL)
def test_reduced_decode_is_lowpass_at_even_pixels(name):
    """The reduced image is the LL band: pixel (i, j) is centred on full pixel (2i, 2j), same
    units (DC gain 1). A half-pixel (or one-pixel) shift would be far off."""
    p, h, cs = _codestream(name)
    red, _ = dicom.decode_j2k_reduced(cs, *h["j2k_pixels"][1:])
    full = pydicom.dcmread(p).pixel_array.astype(np.float64)
    R, C = full.shape
    assert red.shape == ((R + 1) // 2, (C + 1) // 2)
    err = np.abs(red - dicom.lowpass_half(full))
    shifted = np.abs(red - dicom.lowpass_half(np.roll(full, -1, (0, 1))))
    rng = np.ptp(full)
    assert np.median(err) <= 1.0  # the 5/3 lifting's integer rounding
    assert err.mean() < 0.01 * rng
    assert shifted.mean() > 3 * err.mean()
    assert abs(red.mean() - full.mean()) < 0.01 * rng


@needs_pillow_j2k
def test_pillow_conversion_of_signed_and_unsigned_precisions():
    """Pillow returns (x + 2^(p-1) if signed) << (16 - p); the inverse must be exact (checked
    at full resolution, reduce = 0, against pydicom): 14-bit signed, 12-bit unsigned, 16-bit signed."""
    import io
    from PIL import Image
    for name in ("693_J2KR.dcm", "MR2_J2KR.dcm", "MR_small_jp2klossless.dcm"):
        p, h, cs = _codestream(name)
        hd = dicom.j2k_header(cs)
        im = Image.open(io.BytesIO(cs))
        a = np.asarray(im).astype(np.int32) >> (16 - hd["precision"])
        if hd["signed"]:
            a -= 1 << (hd["precision"] - 1)
        assert np.array_equal(a, pydicom.dcmread(p).pixel_array), name


def test_fragmented_codestream_and_truncation(tmp_path):
    """Several fragments are joined; a truncated encapsulation raises J2KError and the
    series loader falls back to pydicom, which reports a clear SeriesError."""
    p, h, cs = _codestream("MR_small_jp2klossless.dcm")
    ds = pydicom.dcmread(p)
    ds.PixelData = pydicom.encaps.encapsulate([cs], fragments_per_frame=3)
    ds["PixelData"].VR = "OB"
    out = tmp_path / "frag.dcm"
    ds.save_as(out)
    h2 = dicom.scan_dicom(str(tmp_path), "frag.dcm")
    cs2 = dicom.read_j2k_codestream(str(out), h2["j2k_pixels"][0])
    assert cs2.rstrip(b"\0") == cs.rstrip(b"\0")
    data = out.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-400])
    with pytest.raises(dicom.J2KError):
        dicom.read_j2k_codestream(str(tmp_path / "cut.dcm"), h2["j2k_pixels"][0])


def _j2k_series(d, vol, ps, modality="CT", **kw):
    """write_series, then re-encode every file JPEG 2000 lossless (one fragment)."""
    intercept = -1024.0 if modality == "CT" else 0.0
    _, _, paths = write_series(str(d), vol, ps=ps, modality=modality, intercept=intercept, phi=False, **kw)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(JPEG2000Lossless, ds.pixel_array, generate_instance_uid=False)
        ds.save_as(p, enforce_file_format=True)
    return paths


def _stack(d):
    """The stack preprocess.py builds (reduced decode as dicom.J2K_REDUCE says)."""
    hs = [dicom.scan_dicom(str(d), f) for f in dicom.find_inputs(str(d))]
    groups, _ = dicom.group_series(hs)
    assert len(groups) == 1
    return dicom.dicom_stack(str(d), groups[0], reduce=dicom.J2K_REDUCE).check()


def _smooth_head(shape, seed=0):
    """head_phantom with a soft (~1.5 mm at 0.45 mm pixels) skin edge: real CT is band-limited
    by the scanner's reconstruction kernel; the noise stays."""
    import scipy.ndimage as ndi
    v = head_phantom(shape, seed)
    return ndi.gaussian_filter(v, (0, 1.5, 1.5))


# tolerances of the reduced path against the full decode + the same resampling, on a CT
# head at 0.45 mm (with noise and a sharp blob edge): HU mean |diff| and 99th percentile
HU_MEAN_TOL, HU_P99_TOL = 2.0, 25.0
REAL_HU_MEAN_TOL, REAL_HU_P99_TOL = 6.0, 90.0  # real CT slice: sharp skull edges (measured 4.3, 67)


@needs_pillow_j2k
@pytest.mark.parametrize("plane", ["axial", "oblique"])
def test_reduced_series_same_grid_and_close_intensities(tmp_path, monkeypatch, plane):
    rc = {"axial": ((1, 0, 0), (0, 1, 0)),
          "oblique": ((0.9659258, 0.2588190, 0.0), (-0.2432103, 0.9076734, 0.3420201))}[plane]
    vol = _smooth_head((5, 190, 171))  # odd column count: the last full pixel is a low-pass centre
    _j2k_series(tmp_path, vol, ps=(0.45, 0.47), r=rc[0], c=rc[1])
    st_red = _stack(tmp_path)
    assert st_red.reduced and st_red.notes == []
    assert st_red.shape[1:] == (95, 86) and st_red.ps == (0.9, 0.94)
    assert st_red.spacing[1:] == (0.45, 0.47)  # recorded as acquired
    monkeypatch.setattr(dicom, "J2K_REDUCE", False)
    st_full = _stack(tmp_path)
    assert not st_full.reduced and st_full.shape[1:] == (190, 171)
    v_red, A_red = volume.resample_stack(st_red)
    v_full, A_full = volume.resample_stack(st_full)
    assert v_red.shape == v_full.shape
    assert np.allclose(A_red, A_full, atol=1e-6)
    d = np.abs(v_red - v_full)
    assert d.mean() < HU_MEAN_TOL and np.percentile(d, 99) < HU_P99_TOL, (d.mean(), np.percentile(d, 99))
    # and the processed uint8 output: same canonical grid, brain window within a level on average
    o_red, o_full = volume.process_stack(st_red), volume.process_stack(st_full)
    assert o_red["data"].shape == o_full["data"].shape
    assert np.allclose(o_red["affine"], o_full["affine"], atol=1e-6)
    assert o_red["original_spacing"] == o_full["original_spacing"]
    assert np.abs(o_red["data"][0].astype(int) - o_full["data"][0]).mean() < 1.0


def test_coarse_pixels_and_uncompressed_not_reduced(tmp_path):
    """The demo cohort's ~1 mm pixels (and any non-JPEG 2000 series) use the full decode."""
    vol = _smooth_head((4, 64, 64))
    _j2k_series(tmp_path / "a", vol, ps=(0.97, 0.97))
    assert not _stack(tmp_path / "a").reduced
    write_series(str(tmp_path / "b"), vol, ps=(0.45, 0.45), phi=False)
    assert not _stack(tmp_path / "b").reduced


def test_fallback_when_reduced_decoder_missing(tmp_path, monkeypatch):
    vol = _smooth_head((4, 80, 80))
    _j2k_series(tmp_path, vol, ps=(0.45, 0.45))
    monkeypatch.setattr(dicom, "J2K_REDUCE", False)
    ref, A_ref = volume.resample_stack(_stack(tmp_path))
    monkeypatch.setattr(dicom, "J2K_REDUCE", True)
    monkeypatch.setattr(dicom, "_PILLOW_J2K", [False])  # as if Pillow had no OpenJPEG
    st = _stack(tmp_path)
    assert not st.reduced and len(st.notes) == 1 and "not used" in st.notes[0] and "Pillow" in st.notes[0]
    v, A = volume.resample_stack(st)
    assert np.array_equal(v, ref) and np.array_equal(A, A_ref)  # exactly the full path


@needs_pillow_j2k
def test_fallback_when_a_file_fails(tmp_path, monkeypatch):
    """Later files the reduced decoder rejects are decoded in full and low-pass filtered:
    same grid, values within the lifting's rounding of the reduced decode."""
    vol = _smooth_head((4, 80, 80))
    _j2k_series(tmp_path, vol, ps=(0.45, 0.45))
    good = _stack(tmp_path).assemble()
    real = dicom.decode_j2k_reduced
    calls = []

    def flaky(cs, bits, signed):
        calls.append(1)
        if len(calls) > 1:
            raise dicom.J2KError("simulated failure")
        return real(cs, bits, signed)
    monkeypatch.setattr(dicom, "decode_j2k_reduced", flaky)
    st = _stack(tmp_path)
    assert st.reduced
    X = st.assemble()
    assert len(st.notes) == 1 and "failed on a file" in st.notes[0]
    assert X.shape == good.shape and np.abs(X - good).max() <= 2.0


@needs_pillow_j2k
def test_preprocess_logs_fallback_per_series(tmp_path, monkeypatch):
    """End to end in this process: the output records the acquired spacing; a series whose
    reduced decode is unavailable is logged (hashed key, no path) and still written."""
    vol = _smooth_head((5, 96, 96))
    _j2k_series(tmp_path / "in" / "s1", vol, ps=(0.45, 0.45))
    man = preprocess.run(str(tmp_path / "in"), str(tmp_path / "out"), n_workers=1, cfg_fsync=False,
                         cfg_progress=False)
    (v,) = man["volumes"]
    assert v["original_spacing"][1:] == [0.45, 0.45] and v["shape"][1:] == [43, 43]
    monkeypatch.setattr(dicom, "_PILLOW_J2K", [False])
    man2 = preprocess.run(str(tmp_path / "in"), str(tmp_path / "out2"), n_workers=1, cfg_fsync=False,
                          cfg_progress=False)
    assert man2["volumes"][0]["shape"] == v["shape"] and man2["volumes"][0]["affine"] == v["affine"]
    log = open(tmp_path / "out2" / "preprocess.log").read()
    assert "note: JPEG 2000 reduced-resolution decode not used" in log
    assert "s1" not in log and "IM0" not in log
    assert "reduced-resolution" not in open(tmp_path / "out" / "preprocess.log").read()
    json.dumps(man2)


def test_quick_header_parser_equals_pydicom(tmp_path):
    """The struct header parser (dicom.FAST_SCAN) gives the same scan dict as pydicom on every
    file it accepts, and hands everything else to pydicom: all pydicom test files (odd and
    broken ones included) plus synthetic CT/MR, RLE and JPEG 2000 series."""
    d0 = os.path.dirname(get_testdata_file("MR_small.dcm"))
    vol = _smooth_head((3, 40, 36))
    write_series(str(tmp_path / "ct"), vol, compress=True)
    write_series(str(tmp_path / "mr"), np.clip(vol + 1000, 0, None), modality="MR", intercept=0.0)
    _j2k_series(tmp_path / "j2k", vol, ps=(0.45, 0.45))
    n = quick = 0
    for root in (d0, str(tmp_path)):
        for f in dicom.find_inputs(root):
            dicom.FAST_SCAN = False
            try:
                ref = dicom.scan_dicom(root, f)
            finally:
                dicom.FAST_SCAN = True
            assert dicom.scan_dicom(root, f) == ref, f
            try:
                dicom._scan_quick(os.path.join(root, f), {})
                quick += 1
            except Exception:
                pass
            n += 1
    assert n > 150 and quick > n // 3  # many files take the quick path


@needs_pillow_j2k
def test_reduced_on_real_ct_series(tmp_path, monkeypatch):
    """A real 0.48 mm JPEG 2000 CT slice (pydicom-data 693_J2KR) as a 3-slice series: the
    reduced path keeps the full path's grid and affine; HU within tolerance."""
    src = pydicom.dcmread(get_testdata_file("693_J2KR.dcm"))
    iop = np.array(src.ImageOrientationPatient, float)
    n = np.cross(iop[:3], iop[3:])
    ipp = np.array(src.ImagePositionPatient, float)
    for k in range(3):
        src.SOPInstanceUID = pydicom.uid.generate_uid()
        src.ImagePositionPatient = [float(x) for x in ipp + 5.0 * k * n]
        src.save_as(str(tmp_path / f"{k}.dcm"))
    st_red = _stack(tmp_path)
    monkeypatch.setattr(dicom, "J2K_REDUCE", False)
    st_full = _stack(tmp_path)
    assert st_red.reduced and not st_full.reduced
    v_red, A_red = volume.resample_stack(st_red)
    v_full, A_full = volume.resample_stack(st_full)
    assert v_red.shape == v_full.shape and np.allclose(A_red, A_full, atol=1e-6)
    d = np.abs(v_red - v_full)
    assert d.mean() < REAL_HU_MEAN_TOL and np.percentile(d, 99) < REAL_HU_P99_TOL, (d.mean(), np.percentile(d, 99))
    o_red, o_full = volume.process_stack(st_red), volume.process_stack(st_full)
    assert np.allclose(o_red["affine"], o_full["affine"], atol=1e-6)
    assert np.abs(o_red["data"][0].astype(int) - o_full["data"][0]).mean() < 1.5  # brain window levels (0.97)


# the pipeline speed-ups that came with this work keep their outputs exactly


def test_fill_holes_bounding_box_exact():
    import scipy.ndimage as ndi
    rng = np.random.default_rng(1)
    for t in range(150):
        D, H, W = rng.integers(1, 9), rng.integers(1, 40), rng.integers(1, 40)
        m = (ndi.gaussian_filter(rng.random((D, H, W)), 1.5) > rng.uniform(0.45, 0.55)).astype(np.uint8)
        if t % 3 == 0:
            m[:, rng.integers(0, H):, :] = 0
        ref = np.stack([ndi.binary_fill_holes(x) for x in m]).astype(np.uint8)
        assert np.array_equal(volume.fill_holes_slices(m.copy()), ref), t


def test_float16_cast_bit_identical_to_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) < 65000)]
    grid = np.arange(0, 2 ** 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    grid = grid[np.isfinite(grid)]
    halfway = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)  # round-to-even cases
    for src in (x, halfway[np.abs(halfway) < 65000]):
        src = np.ascontiguousarray(src)
        dst = np.empty(src.shape, np.float16)
        volume._to_f16(src, dst)
        assert np.array_equal(dst.view(np.uint16), src.astype(np.float16).view(np.uint16))


def test_f16_percentiles_and_lut_match_numpy():
    """percentiles_f16 from the bit-pattern histogram == np.percentile; the MR uint8 output
    (tabulated over float16 bit patterns) == the direct formula."""
    rng = np.random.default_rng(2)
    buf = (rng.gamma(2.0, 300.0, (11, 30, 27)) - 50).astype(np.float16)
    lo, hi = volume.percentiles_f16(buf, (0.5, 99.5))
    assert np.allclose([lo, hi], np.percentile(buf.astype(np.float64), (0.5, 99.5)), rtol=0, atol=1e-6)
    st = dicom.SliceStack([(0, 0, 4.0 * k) for k in range(11)], (1, 0, 0), (0, 1, 0), (1.0, 1.0), (30, 27),
                          lambda k: buf[k].astype(np.float32), "MR").check()
    out = volume.process_stack(st)
    D = out["data"].shape[1]
    assert D == 11
    v = buf.astype(np.float32)  # the same grid: resampling is the identity here
    lo, hi = volume.percentiles_f16(buf, (0.5, 99.5))
    ref = np.floor(np.clip((v - np.float32(lo)) * np.float32(255.0 / (hi - lo)), 0, 255) + np.float32(0.5))
    ref_canonical = volume.to_canonical(ref.astype(np.uint8), volume.resample_grid(st)[3])[0]
    assert np.array_equal(out["data"][0], ref_canonical)


def test_quick_parser_reads_diffusion_bvalue(tmp_path):
    """A DWI file with DiffusionBValue (FD) takes the quick path and scans exactly as with
    pydicom (it used to be handed to pydicom)."""
    vol = np.clip(_smooth_head((3, 20, 18)) + 1000, 0, None)
    _, _, paths = write_series(str(tmp_path / "dwi"), vol, modality="MR", intercept=0.0,
                               extra={"DiffusionBValue": 1000.0})
    for p in paths:
        root, f = os.path.dirname(p), os.path.basename(p)
        quick = dicom._scan_quick(p, {"path": f, "file_key": dicom.salted_hash(f, "")})  # no _NotQuick
        dicom.FAST_SCAN = False
        try:
            ref = dicom.scan_dicom(root, f)
        finally:
            dicom.FAST_SCAN = True
        assert quick == ref == dicom.scan_dicom(root, f)
        assert ref["frames"][0]["bvalue"] == 1000.0


def test_csr_dot_and_window_into_bit_identical():
    """The direct CSR kernel call == scipy's `W @ x` and `(x.T @ W.T).T` (the in-plane
    resampling's old form), bit for bit; window_into == window == the plain formula."""
    rng = np.random.default_rng(3)
    for t in range(30):
        n_in, m = int(rng.integers(3, 60)), int(rng.integers(1, 40))
        p = np.cumsum(rng.uniform(0.2, 1.5, n_in))
        q = volume.out_grid(p[0], p[-1], float(rng.choice([0.5, 1.0, 4.0])))
        W = volume.tent_matrix(p, q, float(q[1] - q[0]) if len(q) > 1 else 1.0)
        x = (rng.normal(size=(n_in, m)) * 1000).astype(np.float32)
        y = volume.csr_dot(W, x)
        assert y.flags.c_contiguous and y.dtype == np.float32
        assert np.array_equal(y, np.asarray(W @ x, np.float32))
        xt = np.ascontiguousarray(x.T)
        assert np.array_equal(y, np.asarray(xt @ W.T.tocsr(), np.float32).T)
    hu = (rng.normal(size=(33, 29)) * 800 + 100).astype(np.float32)
    hu.flat[:6] = [-1024, 3071, 0, 40, 80, -500]
    for w in volume.CT_WINDOWS.values():
        got = volume.window_into(hu, *w, np.empty(hu.shape, np.uint8), np.empty(hu.shape, np.float32))
        width, level, levels = w  # the plain formula: float32 ops, floor(x + 0.5)
        x = np.clip((hu - np.float32(level - width / 2.0)) * np.float32((levels - 1) / width), 0, levels - 1)
        assert np.array_equal(got, np.floor(x + np.float32(0.5)).astype(np.uint8))
        assert np.array_equal(got, volume.window(hu, *w))


def test_token_mask_matches_tokenize_on_odd_shapes():
    import torch
    from nvfm.tokenize import token_foreground
    rng = np.random.default_rng(4)
    for t in range(60):
        shape = tuple(int(s) for s in rng.integers(1, 45, 3))
        m = (rng.random(shape) < rng.random()).astype(np.uint8)
        for mm, frac in ((m, 0.5), (m.astype(bool), 1.0), (m * 7, 0.25)):
            ref = token_foreground(torch.from_numpy(np.ascontiguousarray(mm)), frac).numpy()
            assert np.array_equal(volume.token_mask(mm, frac), ref), (t, shape)


def test_dicom_stack_rejects_non_finite_float_pixels(tmp_path, monkeypatch):
    """The stack's loader checks float pixel data itself (volume.py trusts `stack.finite`)."""
    vol = np.clip(_smooth_head((3, 12, 10)) + 1000, 0, None)
    write_series(str(tmp_path / "mr"), vol, modality="MR", intercept=0.0)
    hs = [dicom.scan_dicom(str(tmp_path), f) for f in dicom.find_inputs(str(tmp_path))]
    g = dicom.group_series(hs)[0][0]
    st = dicom.dicom_stack(str(tmp_path), g).check()
    assert st.finite and np.isfinite(st.slice(0)).all()
    real = dicom.read_dataset  # the pydicom route returning float pixels with a NaN

    class FloatDS:
        def __init__(self, ds):
            self.ds = ds

        def __contains__(self, k):
            return k in self.ds

        def get(self, *a):
            return self.ds.get(*a)

        @property
        def pixel_array(self):
            a = self.ds.pixel_array.astype(np.float32)
            a[0, 0] = np.nan
            return a
    for h in hs:
        h["raw_pixels"] = None  # force the pydicom route
    g = dicom.group_series(hs)[0][0]
    monkeypatch.setattr(dicom, "read_dataset", lambda p, stop_before_pixels: FloatDS(real(p, stop_before_pixels)))
    st = dicom.dicom_stack(str(tmp_path), g).check()
    with pytest.raises(dicom.SeriesError, match="non-finite"):
        volume.process_stack(st)
