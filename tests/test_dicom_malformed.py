"""Malformed or unusual but real-world DICOM exports: each loads exactly what was written
(checked against numpy on the stored pixels and the rescale written, slices ordered by the
ImagePositionPatient written), or fails its series with a one-line reason naming the file."""
import math
import os
import sys

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from dicom_synth import head_phantom, mutate_series, scan_folder, write_enhanced, write_series  # noqa: E402

import preprocess  # noqa: E402
from nvfm import dicom  # noqa: E402

SHAPE = (6, 16, 16)


def _load(d, fast=True):
    """[(reason or "ok", offending path, assembled volume or None)] for every candidate volume
    under d, after the skipped files as ("skipped: reason", path, None)."""
    hs = scan_folder(d, fast)
    out = [(h["error"], h["path"], None) for h in hs if "error" in h]
    groups, skipped = dicom.group_series([h for h in hs if "error" not in h])
    out += [(f"skipped: {reason}", path, None) for _, _, reason, path in skipped]
    for g in groups:
        try:
            st = dicom.dicom_stack(d, g).check(3)
            out.append(("ok", None, st.assemble()))
        except dicom.SeriesError as e:
            out.append((str(e), e.path, None))
    return out


def _reference(d):
    """(K, R, C) float64: every image file's stored pixels (pydicom) x RescaleSlope +
    RescaleIntercept, ordered by ImagePositionPatient z (the synthetic series are axial)."""
    out = []
    for f in sorted(os.listdir(d)):
        ds = pydicom.dcmread(os.path.join(d, f))
        if "PixelData" in ds and ds.get("SamplesPerPixel", 1) == 1:
            a = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            out.append((float(ds.ImagePositionPatient[2]), a))
    out.sort(key=lambda t: t[0])
    return np.stack([a for _, a in out])


# ----------------------------------------------------------------------------- rescale


@pytest.mark.parametrize("fast", [True, False])
def test_zero_rescale_slope_fails_the_series(tmp_path, fast):
    """RescaleSlope 0 (a broken export) maps every pixel to the intercept: slice 3 of this CT
    came out a flat -1024 HU (air where the head is) and the series loaded 'ok'. It fails now,
    naming the file; a negative slope is a valid rescale and loads as written."""
    d = str(tmp_path / "zero")
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    mutate_series(d, lambda ds, i: setattr(ds, "RescaleSlope", "0") if i == 3 else None)
    assert [o[:2] for o in _load(d, fast)] == [("invalid RescaleSlope (zero)", os.path.basename(paths[3]))]
    d = str(tmp_path / "negative")
    write_series(d, head_phantom(SHAPE), shuffle=False)
    mutate_series(d, lambda ds, i: setattr(ds, "RescaleSlope", -1.0) if i == 3 else None)
    (reason, _, vol), = _load(d, fast)
    assert reason == "ok" and np.array_equal(vol, _reference(d))


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("rescale_type,reason", [
    ("HU", None), ("US", None), ("OD", "CT RescaleType OD (values are not Hounsfield units)"),
    ("MGML", "CT RescaleType MGML (values are not Hounsfield units)"),
    ("Z_EFF", "CT RescaleType Z_EFF (values are not Hounsfield units)"),
    ("IODINE MAP", "CT RescaleType other (values are not Hounsfield units)")])
def test_ct_rescale_type_other_than_hu_fails_the_series(tmp_path, rescale_type, reason, fast):
    """A CT whose rescale output is declared in other units (a dual-energy iodine map in mg/ml,
    an effective-Z map) was windowed as Hounsfield units with no word. Such a series fails
    naming the file (an unknown value is not echoed: Rescale Type is free text); HU and US
    (unspecified) load as HU, hand-worked: stored - 1024. Classic and enhanced CT alike."""
    vol = head_phantom(SHAPE)
    d = str(tmp_path / "ct")
    _, _, paths = write_series(d, vol, shuffle=False)
    mutate_series(d, lambda ds, i: setattr(ds, "RescaleType", rescale_type) if i == 2 else None)
    stored = np.stack([np.frombuffer(pydicom.dcmread(p).PixelData, np.int16).reshape(SHAPE[1:]) for p in paths])
    e = str(tmp_path / "enhanced")
    write_enhanced(os.path.join(e, "mf.dcm"), vol, modality="CT", intercept=-1024.0, reverse=False)
    ds = pydicom.dcmread(os.path.join(e, "mf.dcm"))
    ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleType = rescale_type
    ds.save_as(os.path.join(e, "mf.dcm"))
    for where, name in ((d, os.path.basename(paths[2])), (e, "mf.dcm")):
        got = _load(where, fast)
        if reason is None:
            assert [o[:2] for o in got] == [("ok", None)]
            assert np.array_equal(got[0][2], stored - 1024.0), where
        else:
            assert [o[:2] for o in got] == [(reason, name)], where
    d = str(tmp_path / "mr")  # an MR's rescale units are arbitrary: loaded as written
    write_series(d, np.clip(vol + 1000, 0, None), modality="MR", intercept=0.0, extra={"RescaleType": rescale_type})
    (r, _, v), = _load(d, fast)
    assert r == "ok" and np.array_equal(v, _reference(d))


def test_refused_rescale_reaches_the_manifest(tmp_path):
    """The new refusals are counted by reason in the manifest, like the existing ones, and the
    good series of the same run is written."""
    inp = tmp_path / "in"
    write_series(str(inp / "good"), head_phantom((8, 48, 40)))
    write_series(str(inp / "iodine"), head_phantom((8, 48, 40), 1), extra={"RescaleType": "MGML"})
    write_series(str(inp / "zero"), head_phantom((8, 48, 40), 2))
    mutate_series(str(inp / "zero"), lambda ds, i: setattr(ds, "RescaleSlope", 0) if i == 1 else None)
    man = preprocess.run(str(inp), str(tmp_path / "out"), n_workers=1, cfg_progress=False)
    assert man["summary"]["series_failed"] == {"CT RescaleType MGML (values are not Hounsfield units)": 1,
                                               "invalid RescaleSlope (zero)": 1}, man["summary"]
    assert len(man["volumes"]) == 1


@pytest.mark.parametrize("fast", [True, False])
def test_rescale_that_differs_per_slice_and_per_frame(tmp_path, fast):
    """Each slice (file, or frame of an enhanced file) takes its own RescaleSlope / Intercept."""
    d = str(tmp_path / "files")
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    slopes, inters = [1.0, 0.5, 2.0, 0.25, 1.0, 4.0], [-1024.0, -1000.0, -1030.0, -1024.0, -990.0, -1024.0]

    def restore(ds, i):  # the same HU, stored under another rescale
        hu = np.frombuffer(ds.PixelData, np.int16) - 1024.0
        ds.PixelData = np.rint((hu - inters[i]) / slopes[i]).astype(np.int16).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = slopes[i], inters[i]
    mutate_series(d, restore)
    (r, _, v), = _load(d, fast)
    assert r == "ok" and np.array_equal(v, _reference(d))
    p = str(tmp_path / "enhanced" / "mf.dcm")
    write_enhanced(p, np.clip(head_phantom(SHAPE) + 1000, 0, None), reverse=True)
    ds = pydicom.dcmread(p)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slopes[f], inters[f] + 1024.0, "US"
        item.PixelValueTransformationSequence = Sequence([pvt])
    ds.save_as(p)
    stored = ds.pixel_array.astype(np.float64)  # frames stored top to bottom (reverse)
    want = np.stack([stored[f] * slopes[f] + inters[f] + 1024.0 for f in range(SHAPE[0])])[::-1]
    (r, _, v), = _load(os.path.dirname(p), fast)
    assert r == "ok" and np.array_equal(v, want)


# ----------------------------------------------------------------------------- pixel bits


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("signed", [True, False])
def test_twelve_bit_pixels_with_garbage_high_bits(tmp_path, signed, compress):
    """BitsStored 12 of 16 with the 4 unused high bits set: signed pixels sign-extend from
    bit 11 (-1000 HU stays -1000), unsigned ones are masked; the direct read and pydicom's
    (RLE) alike. Hand-worked: the values written before the garbage went in."""
    d = str(tmp_path / "s")
    vol = head_phantom(SHAPE) if signed else np.clip(head_phantom(SHAPE) + 1000, 0, 4000)
    dtype = np.int16 if signed else np.uint16
    _, _, paths = write_series(d, vol, modality="CT" if signed else "MR", intercept=0.0, shuffle=False,
                               extra={"BitsStored": 12, "HighBit": 11, "PixelRepresentation": int(signed)})
    want = []
    for p in paths:
        ds = pydicom.dcmread(p)
        a = np.frombuffer(ds.PixelData, dtype)
        want.append(a.reshape(SHAPE[1:]).astype(np.float32))
        garbage = ((a.view(np.uint16) & 0x0FFF) | 0xA000).view(dtype).reshape(SHAPE[1:])
        ds.PixelData = garbage.tobytes()
        if compress:  # pydicom's encoder checks the 12-bit range: encode as 16 bits, then declare 12
            ds.BitsStored, ds.HighBit = 16, 15
            ds.compress(pydicom.uid.RLELossless, garbage)
            ds.BitsStored, ds.HighBit = 12, 11
        ds.save_as(p)
    assert (np.stack(want) < 0).any() == signed
    (r, _, v), = _load(d)
    assert r == "ok" and np.array_equal(v, np.stack(want))


# ----------------------------------------------------------------------------- slices and series


def test_monochrome1_ct_keeps_its_hounsfield_units(tmp_path):
    """MONOCHROME1 is a display inversion: a CT's HU come from the rescale alone (no inversion)."""
    d = str(tmp_path / "s")
    write_series(d, head_phantom(SHAPE), photometric="MONOCHROME1")
    (r, _, v), = _load(d)
    assert r == "ok" and np.array_equal(v, _reference(d))


def test_slice_order_ignores_duplicate_instance_numbers(tmp_path):
    """Every file InstanceNumber 1, positions shuffled: the order is ImagePositionPatient's."""
    d = str(tmp_path / "s")
    write_series(d, head_phantom(SHAPE), shuffle=True)
    mutate_series(d, lambda ds, i: setattr(ds, "InstanceNumber", 1))
    (r, _, v), = _load(d)
    assert r == "ok" and np.array_equal(v, _reference(d))


def test_non_image_files_in_a_series_folder_are_skipped_one_by_one(tmp_path):
    """A structured report, a presentation state (no Pixel Data) and an RGB screenshot (secondary
    capture, and one labelled CT Image) under the series' UIDs: each skipped with its reason and
    file, the image slices load unchanged."""
    d = str(tmp_path / "s")
    study, series, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    for name, sop, modality in (("sr.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "SR"),
                                ("pr.dcm", "1.2.840.10008.5.1.4.1.1.11.1", "PR")):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop, pydicom.uid.generate_uid(), modality
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        ds.save_as(os.path.join(d, name), enforce_file_format=True)
    for name, sop in (("sc.dcm", "1.2.840.10008.5.1.4.1.1.7"), ("rgb.dcm", "1.2.840.10008.5.1.4.1.1.2")):
        ds = pydicom.dcmread(paths[0])
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.Rows, ds.Columns = 30, 40
        ds.PixelData = np.full((30, 40, 3), 200, np.uint8).tobytes()
        ds.save_as(os.path.join(d, name))
    got = _load(d)
    assert [o[:2] for o in got] == [("skipped: non-image SOP class", "pr.dcm"), ("skipped: colour image", "rgb.dcm"),
                                    ("skipped: non-image SOP class", "sc.dcm"),
                                    ("skipped: non-image SOP class", "sr.dcm"), ("ok", None)], got
    assert np.array_equal(got[-1][2], _reference(d))


# ----------------------------------------------------------------------------- orientation


def _turn_slices(d, angles):
    """Rotate slice k's row and column directions by angles[k] rad about the normal (z), its
    ImagePositionPatient unchanged (files of an axial write_series, shuffle=False)."""
    def turn(ds, i):
        a = float(angles[i])
        ds.ImageOrientationPatient = [math.cos(a), math.sin(a), 0.0, -math.sin(a), math.cos(a), 0.0]
    mutate_series(d, turn)


def _spread_deg(angles):
    """(largest angle in degrees between a slice's in-plane directions and the mean direction
    of all slices, its slice): for rotations about one axis, |angle_k - angle of the mean vector|."""
    mean = math.atan2(np.mean(np.sin(angles)), np.mean(np.cos(angles)))
    off = np.degrees(np.abs(np.asarray(angles) - mean))
    return float(off.max()), int(off.argmax())


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("amp", [1e-6, 2e-3])
def test_orientation_jitter_loads_as_one_volume(tmp_path, amp, fast):
    """ImageOrientationPatient that jitters from slice to slice by 2e-3 (0.11 deg) was split
    into sub-volumes ('too few slices (2)' twice beside a 4-slice volume, nothing naming the
    orientation); float noise (1e-6) loaded with the first slice's orientation. Both load as one
    volume: every slice's pixels as pydicom reads them, ordered by position, with the mean of the
    written row / column directions (numpy on the written angles)."""
    d = str(tmp_path / "s")
    write_series(d, head_phantom(SHAPE), shuffle=False)
    angles = amp * np.array([0, 1, -1, 2, -2, 1, 0, -1], float)[:SHAPE[0]]
    _turn_slices(d, angles)
    hs = scan_folder(d, fast)
    groups, _ = dicom.group_series(hs)
    assert len(groups) == 1
    st = dicom.dicom_stack(d, groups[0]).check(3)
    assert np.array_equal(st.assemble(), _reference(d))
    mean = math.atan2(np.mean(np.sin(angles)), np.mean(np.cos(angles)))
    np.testing.assert_allclose(st.r, [math.cos(mean), math.sin(mean), 0.0], atol=1e-12)
    np.testing.assert_allclose(st.c, [-math.sin(mean), math.cos(mean), 0.0], atol=1e-12)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("amp", [1e-2, 5e-2])
def test_slices_that_are_not_parallel_fail_naming_the_orientation(tmp_path, amp, fast):
    """Orientations 0.6 - 5.7 deg apart within one series loaded as eight 'single-slice series'
    (and as sub-volumes for smaller differences). The series fails once, with the size of the
    disagreement (numpy on the written angles) and the file farthest from the mean."""
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    angles = amp * np.array([0, 1, -1, 0.5, -0.5, 0.2, 0, -0.3], float)[:SHAPE[0]]
    _turn_slices(d, angles)
    deg, k = _spread_deg(angles)
    assert deg > dicom.IOP_JITTER_DEG
    assert [o[:2] for o in _load(d, fast)] == [
        (f"slice orientation varies by {deg:.2g} deg (ImageOrientationPatient, more than 0.25 deg)",
         os.path.basename(paths[k]))]


def test_other_planes_in_one_series_are_still_separate_volumes(tmp_path):
    """An axial and a coronal stack under one SeriesInstanceUID (90 deg apart) stay two volumes,
    each loading the pixels written (pydicom)."""
    vol = head_phantom(SHAPE)
    ax, co = str(tmp_path / "ax"), str(tmp_path / "co")
    study, series, _ = write_series(ax, vol, names=[f"A{k}.dcm" for k in range(SHAPE[0])])
    write_series(co, head_phantom(SHAPE, 1), r=(1, 0, 0), c=(0, 0, -1), study_uid=study, series_uid=series,
                 names=[f"C{k}.dcm" for k in range(SHAPE[0])])
    for f in os.listdir(co):
        os.replace(os.path.join(co, f), os.path.join(ax, f))
    got = _load(ax)
    assert [o[0] for o in got] == ["ok", "ok"]
    files = sorted(os.listdir(ax))
    for prefix, key in (("A", lambda ds: float(ds.ImagePositionPatient[2])),
                        ("C", lambda ds: float(ds.ImagePositionPatient[1]))):  # coronal: r x c = +y
        dss = sorted((pydicom.dcmread(os.path.join(ax, f)) for f in files if f.startswith(prefix)), key=key)
        want = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in dss])
        assert sum(np.array_equal(v, want) for _, _, v in got) == 1, prefix


# ----------------------------------------------------------------------------- inconsistent pixel headers


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("tags,reason", [
    ({"PixelRepresentation": 2}, "invalid PixelRepresentation 2 (only 0 or 1 are defined)"),
    ({"PhotometricInterpretation": "RGB"}, "PhotometricInterpretation RGB with SamplesPerPixel 1 (inconsistent header)"),
    ({"PhotometricInterpretation": "YBR_FULL"},
     "PhotometricInterpretation YBR_FULL with SamplesPerPixel 1 (inconsistent header)"),
    ({"BitsStored": 17, "HighBit": 16}, "invalid BitsStored 17 (BitsAllocated 16)"),
    ({"BitsStored": None}, "missing or invalid BitsStored"),
])
def test_inconsistent_pixel_header_fails_the_series(tmp_path, tags, reason, fast):
    """PixelRepresentation 2 (only 0 / 1 are defined) was read as signed, and a colour
    PhotometricInterpretation with one sample per pixel as grey, both loading 'ok'; BitsStored
    above BitsAllocated or missing failed as 'pixel decode error (ValueError / AttributeError)'.
    One such file fails its series with the reason, naming the file."""
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)

    def spoil(ds, i):
        if i == 2:
            for k, v in tags.items():
                if v is None:
                    delattr(ds, k)
                else:
                    setattr(ds, k, v)
    mutate_series(d, spoil)
    assert [o[:2] for o in _load(d, fast)] == [(reason, os.path.basename(paths[2]))]


def test_new_refusals_reach_the_manifest(tmp_path):
    """Each refusal is counted by its reason in the manifest; the good series is written."""
    inp = tmp_path / "in"
    write_series(str(inp / "good"), head_phantom((8, 48, 40)))
    write_series(str(inp / "pr2"), head_phantom((8, 48, 40), 1), extra={"PixelRepresentation": 2})
    write_series(str(inp / "rgb"), head_phantom((8, 48, 40), 2), extra={"PhotometricInterpretation": "RGB"})
    write_series(str(inp / "tilted"), head_phantom((8, 48, 40), 3), shuffle=False)
    _turn_slices(str(inp / "tilted"), [0.0, 0.02, 0, 0, 0, 0, 0, 0])
    man = preprocess.run(str(inp), str(tmp_path / "out"), n_workers=1, cfg_progress=False)
    deg, _ = _spread_deg([0.0, 0.02, 0, 0, 0, 0, 0, 0])
    assert man["summary"]["series_failed"] == {
        "invalid PixelRepresentation 2 (only 0 or 1 are defined)": 1,
        "PhotometricInterpretation RGB with SamplesPerPixel 1 (inconsistent header)": 1,
        f"slice orientation varies by {deg:.2g} deg (ImageOrientationPatient, more than 0.25 deg)": 1}, man["summary"]
    assert len(man["volumes"]) == 1
