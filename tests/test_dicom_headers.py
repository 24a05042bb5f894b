"""Pixel-layout and orientation headers that pydicom does not check: a series loads exactly what
was written (numpy on the stored bytes, pydicom's own decode) or fails with a one-line reason
naming the file (and the values) that explains it."""
import os
import sys

import numpy as np
import pydicom
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from dicom_synth import head_phantom, mutate_series, set_raw_text, write_enhanced, write_series  # noqa: E402
from test_dicom_malformed import _load, _reference  # noqa: E402

import preprocess  # noqa: E402
from nvfm import dicom  # noqa: E402

SHAPE = (6, 16, 16)


def _stored(paths, dtype):
    """(K, R, C) float32 of the stored samples of each file, read as raw bytes with numpy."""
    return np.stack([np.frombuffer(pydicom.dcmread(p).PixelData, dtype).reshape(SHAPE[1:]) for p in paths]
                    ).astype(np.float32)


# ----------------------------------------------------------------------------- HighBit


@pytest.mark.parametrize("fast", [True, False])
def test_high_bit_other_than_bits_stored_minus_one_fails_the_series(tmp_path, fast):
    """12-bit MR pixels stored in the HIGH 12 bits (BitsStored 12, HighBit 15): pydicom ignores
    HighBit and keeps the low 12 bits, so the series loaded 'ok' with values up to 1315 off the
    written ones (numpy: stored >> 4). Such a file, and HighBit 11 with BitsStored 16, now fail
    the series naming the file and both values; HighBit = BitsStored - 1 and an absent HighBit
    load the written samples exactly."""
    vol = np.clip(head_phantom(SHAPE) + 1000, 0, 4000)
    d = str(tmp_path / "shifted")
    _, _, paths = write_series(d, vol, modality="MR", intercept=0.0, shuffle=False,
                               extra={"BitsStored": 12, "HighBit": 15, "PixelRepresentation": 0})
    written = _stored(paths, np.uint16)

    def shift(ds, i):
        ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) << 4).astype(np.uint16).tobytes()
    mutate_series(d, shift)
    assert np.array_equal(_stored(paths, np.uint16) / 16, written)  # the layout HighBit 15 describes
    assert [o[:2] for o in _load(d, fast)] == [("invalid HighBit 15 (BitsStored 12: must be 11)",
                                                os.path.basename(paths[0]))]
    d = str(tmp_path / "wide")  # one file of a 16-bit series declares HighBit 11
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    mutate_series(d, lambda ds, i: setattr(ds, "HighBit", 11) if i == 3 else None)
    assert [o[:2] for o in _load(d, fast)] == [("invalid HighBit 11 (BitsStored 16: must be 15)",
                                                os.path.basename(paths[3]))]
    for name, high in (("consistent", 11), ("absent", None)):
        d = str(tmp_path / name)
        _, _, paths = write_series(d, vol, modality="MR", intercept=0.0, shuffle=False,
                                   extra={"BitsStored": 12, "HighBit": 11, "PixelRepresentation": 0})
        if high is None:
            mutate_series(d, lambda ds, i: delattr(ds, "HighBit"))
        (r, _, v), = _load(d, fast)
        assert r == "ok" and np.array_equal(v, _stored(paths, np.uint16)), name


def test_high_bit_of_an_enhanced_file_fails_it(tmp_path):
    """The same check on an enhanced multi-frame file (HighBit is top-level there too)."""
    p = str(tmp_path / "e" / "mf.dcm")
    write_enhanced(p, np.clip(head_phantom(SHAPE) + 1000, 0, 4000))
    ds = pydicom.dcmread(p)
    ds.HighBit = 12
    ds.save_as(p)
    assert [o[:2] for o in _load(os.path.dirname(p))] == [("invalid HighBit 12 (BitsStored 16: must be 15)",
                                                           "mf.dcm")]


# ----------------------------------------------------------------------------- rescale


@pytest.mark.parametrize("drop", ["all", "RescaleIntercept", "RescaleSlope"])
def test_enhanced_ct_without_rescale_fails_like_a_classic_ct(tmp_path, drop):
    """An enhanced CT whose Pixel Value Transformation functional group (mandatory there) is
    missing, or lacks the intercept or the slope, loaded 'ok' as slope 1 / intercept 0: stored
    HU + 1024 read as HU, air at +24 'HU' instead of -1000 (hand-worked below). It fails like a
    classic CT Image without them; top-level RescaleSlope / Intercept (not where the enhanced IOD
    puts them, but unambiguous) fill in what the group lacks (pydicom x the rescale written); an
    enhanced MR without them loads its stored values (pydicom)."""
    vol = head_phantom(SHAPE)
    p = str(tmp_path / "ct" / "mf.dcm")
    write_enhanced(p, vol, modality="CT", intercept=-1024.0, reverse=False)
    ds = pydicom.dcmread(p)
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    if drop == "all":
        del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    else:
        delattr(pvt, drop)
    ds.save_as(p)
    assert ds.pixel_array.min() == round(vol.min()) + 1024  # what the old read called HU
    assert [o[:2] for o in _load(os.path.dirname(p))] == [
        (f"missing {'RescaleIntercept' if drop == 'all' else drop} (CT Hounsfield units unknown)", "mf.dcm")]
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024.0  # top level, as some writers put them: read
    ds.save_as(p)
    (r, _, v), = _load(os.path.dirname(p))
    want = ds.pixel_array * (0.5 if drop in ("all", "RescaleSlope") else 1.0) - 1024.0
    assert r == "ok" and np.array_equal(v, want)
    p = str(tmp_path / "mr" / "mf.dcm")
    write_enhanced(p, np.clip(vol + 1000, 0, None), reverse=False)
    ds = pydicom.dcmread(p)
    del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
    ds.save_as(p)
    (r, _, v), = _load(os.path.dirname(p))
    assert r == "ok" and np.array_equal(v, ds.pixel_array)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("keyword", ["RescaleSlope", "RescaleIntercept"])
def test_rescale_with_several_values_fails_the_series(tmp_path, keyword, fast):
    """RescaleSlope '2\\1' (value multiplicity 1) was read as its first value, 2, without a word:
    which one the writer meant is unknown. The series fails naming the file."""
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    set_raw_text(paths[2], keyword, "2\\1")
    assert pydicom.dcmread(paths[2]).get(keyword) == [2, 1]
    assert [o[:2] for o in _load(d, fast)] == [(f"invalid {keyword} (2 values)", os.path.basename(paths[2]))]


# ----------------------------------------------------------------------------- PhotometricInterpretation


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("value,reason", [
    ("MONOCHROME3", "unknown PhotometricInterpretation MONOCHROME3"),
    ("GREYSCALE", "unknown PhotometricInterpretation GREYSCALE"),
    ("GREY<SCALE>", "unknown PhotometricInterpretation GREYSCALE"),  # only code characters are echoed
    ("monochrome2", None), ("MONOCHROME1", None)])
def test_unknown_photometric_interpretation_fails_the_series(tmp_path, value, reason, fast):
    """A PhotometricInterpretation that is no defined term (MONOCHROME3, GREYSCALE) loaded as
    grey (MONOCHROME2) with no word: whether it is inverted or a palette index is unknown. It
    fails the series naming the file and the value. Lower-case MONOCHROME2 and a CT's
    MONOCHROME1 load the written HU exactly (stored - 1024)."""
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    mutate_series(d, lambda ds, i: setattr(ds, "PhotometricInterpretation", value) if i == 2 else None)
    got = _load(d, fast)
    if reason is None:
        # numpy on the stored bytes (pydicom's own decode refuses lower-case 'monochrome2')
        assert [o[:2] for o in got] == [("ok", None)] and np.array_equal(got[0][2], _stored(paths, np.int16) - 1024)
    else:
        assert [o[:2] for o in got] == [(reason, os.path.basename(paths[2]))]


# ----------------------------------------------------------------------------- orientation


def _mixed_planes(tmp_path, counts):
    """One series holding counts[plane] slices per plane (axial, sagittal, coronal; files A*, S*,
    C*) -> its folder."""
    planes = {"axial": ((1, 0, 0), (0, 1, 0)), "sagittal": ((0, 1, 0), (0, 0, -1)), "coronal": ((1, 0, 0), (0, 0, -1))}
    d = str(tmp_path / "series")
    study = series = None
    for s, (name, n) in enumerate(counts.items()):
        r, c = planes[name]
        study, series, _ = write_series(str(tmp_path / name), head_phantom((n,) + SHAPE[1:], s), r=r, c=c,
                                        study_uid=study, series_uid=series, seed=s,
                                        names=[f"{name[0].upper()}{k}.dcm" for k in range(n)])
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(str(tmp_path / name)):
            os.replace(os.path.join(str(tmp_path / name), f), os.path.join(d, f))
    return d


def test_small_planes_of_a_mixed_orientation_series_say_so(tmp_path):
    """6 axial, 2 sagittal and 1 coronal slices under one SeriesInstanceUID (a localizer or
    mixed-plane export) were split by plane and the small parts failed as 'too few slices (2)'
    and 'single-slice series', as a truncated series would. They now name the orientations and
    their slice counts (counted from the files written); the axial volume loads its pixels
    (pydicom) with a warning saying how the series was split."""
    d = _mixed_planes(tmp_path, {"axial": 6, "sagittal": 2, "coronal": 1})
    mix = "series mixes 3 slice orientations (6 axial, 2 sagittal, 1 coronal)"
    got = _load(d)
    assert [o[0] for o in got] == ["ok", f"too few slices (2) in its orientation: {mix}",
                                   f"single slice in its orientation: {mix}"]
    ax = sorted((pydicom.dcmread(os.path.join(d, f)) for f in os.listdir(d) if f.startswith("A")),
                key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert np.array_equal(got[0][2], np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                                               for ds in ax]))
    hs = [dicom.scan_dicom(d, f) for f in dicom.find_inputs(d)]
    main = dicom.dicom_stack(d, dicom.group_series(hs)[0][0]).check(3)
    assert main.warnings == ["series split into 3 volumes by slice orientation (6 axial, 2 sagittal, 1 coronal)"]


def test_oblique_planes_are_named_oblique(tmp_path):
    """Two slices tilted 20 deg about the left-right axis beside 6 axial ones (over IOP_PLANE_DEG
    = 5 deg: another plane): named 'oblique axial', the axial ones 'axial'."""
    d = str(tmp_path / "s")
    t = np.radians(20)
    study, series, _ = write_series(d, head_phantom(SHAPE), names=[f"A{k}.dcm" for k in range(6)])
    write_series(d, head_phantom((2,) + SHAPE[1:], 1), c=(0, np.cos(t), np.sin(t)), study_uid=study,
                 series_uid=series, names=["O0.dcm", "O1.dcm"])
    assert [o[0] for o in _load(d)] == [
        "ok", "too few slices (2) in its orientation: series mixes 2 slice orientations (6 axial, 2 oblique axial)"]


def test_small_part_of_a_plane_split_otherwise_keeps_its_reason(tmp_path):
    """A part that is not all of its plane (2 of 8 axial slices with another matrix size) is
    small for another reason: its reason does not blame the orientations."""
    d = _mixed_planes(tmp_path, {"axial": 8, "coronal": 4})

    def crop(ds, i):  # the top two axial slices (z -20, -15 mm): a 12 x 16 matrix
        if os.path.basename(ds.filename).startswith("A") and float(ds.ImagePositionPatient[2]) > -25:
            ds.PixelData = np.frombuffer(ds.PixelData, np.int16).reshape(16, 16)[:12].tobytes()
            ds.Rows = 12
    mutate_series(d, crop)
    assert [o[0] for o in _load(d)] == ["ok", "ok", "too few slices (2) with matrix size 12 x 16 unlike the 6 slices "
                                        "of its series' volume (16 x 16): left out, the volume is 2 slices shorter"]


def test_new_header_refusals_reach_the_manifest(tmp_path):
    """The new reasons are counted in the manifest and the good volumes are written."""
    inp = tmp_path / "in"
    write_series(str(inp / "good"), head_phantom((8, 48, 40)))
    write_series(str(inp / "pi"), head_phantom((8, 48, 40), 1), extra={"PhotometricInterpretation": "MONOCHROME3"})
    write_series(str(inp / "hb"), head_phantom((8, 48, 40), 2), extra={"HighBit": 11})
    study, series, _ = write_series(str(inp / "mixed"), head_phantom((8, 48, 40), 3))  # + one coronal slice
    write_series(str(inp / "mixed"), head_phantom((1, 48, 40), 4), c=(0, 0, -1), study_uid=study, series_uid=series,
                 names=["C0.dcm"])
    man = preprocess.run(str(inp), str(tmp_path / "out"), n_workers=1, cfg_progress=False)
    assert man["summary"]["series_failed"] == {
        "unknown PhotometricInterpretation MONOCHROME3": 1, "invalid HighBit 11 (BitsStored 16: must be 15)": 1,
        "single slice in its orientation: series mixes 2 slice orientations (8 axial, 1 coronal)": 1}, man["summary"]
    assert sorted(v["warnings"] for v in man["volumes"]) == [
        [], ["series split into 2 volumes by slice orientation (8 axial, 1 coronal)"]]
