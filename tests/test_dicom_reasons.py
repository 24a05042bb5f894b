"""The reason a bad slice fails with is the true one (nvfm/dicom.py: _geometry, _strays_into_holes,
dicom_stack): a geometry tag that is present but malformed is "invalid ..." quoting it, not
"missing geometry"; a slice at an end of a series with another PixelSpacing / matrix size says what
differs and that the volume is shorter, not "single-slice series". Expected reasons are written by
hand; slice positions are worked by hand from the positions written (z = -50 + 5 k mm)."""
import os
import sys

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from dicom_synth import head_phantom, mutate_series, set_raw_text, write_enhanced, write_series  # noqa: E402
from test_dicom_gap import K, PS, SHAPE, STEP, _load, _series  # noqa: E402

import preprocess  # noqa: E402
from nvfm import dicom  # noqa: E402

Z = -50.0 + STEP * np.arange(K)  # slice k's position, as written
LEFT_OUT = "1 end slice of the series left out (other matrix size or geometry, failed separately)"


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("raw,reason", [
    ({"PixelSpacing": "0.9\\abc"}, "invalid PixelSpacing '0.9\\?' (expected 2 positive numbers)"),
    ({"PixelSpacing": "0.9"}, "invalid PixelSpacing '0.9' (expected 2 positive numbers)"),
    ({"PixelSpacing": "0,9\\0,8"}, "invalid PixelSpacing '0,9\\0,8' (expected 2 positive numbers)"),
    ({"PixelSpacing": "0\\0.8"}, "invalid PixelSpacing '0\\0.8' (expected 2 positive numbers)"),
    ({"PixelSpacing": "0.9\xb5\\0.8"}, "invalid PixelSpacing '?\\0.8' (expected 2 positive numbers)"),
    ({"PixelSpacing": "DOE^JOHN\\0.8"}, "invalid PixelSpacing '?\\0.8' (expected 2 positive numbers)"),  # a name
    ({"PixelSpacing": "1234567890.\\1234567890.\\1234567890.\\1"},  # quoted up to 32 characters
     "invalid PixelSpacing '1234567890.\\1234567890.\\12345678...' (expected 2 positive numbers)"),
    ({"PixelSpacing": ""}, "missing geometry (PixelSpacing)"),  # empty: absent, as before
    ({"ImageOrientationPatient": "1\\0\\0\\0\\1"},
     "invalid ImageOrientationPatient '1\\0\\0\\0\\1' (expected 6 numbers)"),
    ({"ImagePositionPatient": "-100\\-110\\nan"},
     "invalid ImagePositionPatient '-100\\-110\\nan' (expected 3 numbers)"),
    ({"ImageOrientationPatient": "1\\0\\0", "PixelSpacing": "0.9"},
     "invalid ImageOrientationPatient '1\\0\\0' (expected 6 numbers); invalid PixelSpacing '0.9' "
     "(expected 2 positive numbers)"),
], ids=["text", "one_value", "decimal_comma", "zero", "non_ascii", "name", "long", "empty", "iop_5", "ipp_nan", "two_tags"])
def test_malformed_geometry_is_reported_as_invalid_not_missing(tmp_path, raw, reason, fast):
    """Slice 10 of 20 has a malformed geometry value: before, both header scans turned it into
    None and the series failed as "missing geometry (PixelSpacing)", though the tag is there."""
    d = str(tmp_path / "s")
    paths = _series(d)
    for tag, text in raw.items():
        set_raw_text(paths[10], tag, text)
    got = [(r, p) for r, p, _ in _load(d, fast)]
    assert got == [(reason, "IM0010.dcm")], got


def test_malformed_pixel_spacing_of_an_enhanced_object(tmp_path):
    """The same for an enhanced multi-frame object's shared PixelMeasuresSequence (pydicom path)."""
    p = str(tmp_path / "e" / "enh.dcm")
    write_enhanced(p, head_phantom((6, 32, 32)))
    ds = pydicom.dcmread(p)
    item = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    tag = pydicom.tag.Tag("PixelSpacing")
    item._dict[tag] = RawDataElement(tag, "DS", 8, b"0.9\\abc ", 0, False, True)
    ds.save_as(p)
    h = dicom.scan_dicom(str(tmp_path / "e"), "enh.dcm")
    assert [fr["ps"] for fr in h["frames"]] == [None] * 6
    (g,), _ = dicom.group_series([h])
    with pytest.raises(dicom.SeriesError) as e:
        dicom.dicom_stack(str(tmp_path / "e"), g)
    assert (str(e.value), e.value.path) == ("invalid PixelSpacing '0.9\\?' (expected 2 positive numbers)", "enh.dcm")


def _set(which, **tags):
    def f(ds, i):
        if i in which:
            for k, v in tags.items():
                setattr(ds, k, v)
    return f


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("which,tags,reason,kept", [
    ((K - 1,), dict(PixelSpacing=[0.5, 0.5]),
     "single slice with PixelSpacing 0.5 x 0.5 mm unlike the 19 slices of its series' volume (0.9 x 0.8 mm): "
     "left out, the volume is one slice shorter", list(range(K - 1))),
    ((0,), dict(Rows=40, Columns=48),  # the same number of pixels: the pixel data length still matches
     "single slice with matrix size 40 x 48 unlike the 19 slices of its series' volume (48 x 40): "
     "left out, the volume is one slice shorter", list(range(1, K))),
    ((K - 1,), dict(Rows=40, Columns=48, PixelSpacing=[0.5, 0.5]),
     "single slice with matrix size 40 x 48 and PixelSpacing 0.5 x 0.5 mm unlike the 19 slices of its series' "
     "volume (48 x 40, 0.9 x 0.8 mm): left out, the volume is one slice shorter", list(range(K - 1))),
    ((K - 2, K - 1), dict(PixelSpacing=[0.5, 0.5]),
     "too few slices (2) with PixelSpacing 0.5 x 0.5 mm unlike the 18 slices of its series' volume (0.9 x 0.8 mm): "
     "left out, the volume is 2 slices shorter", list(range(K - 2))),
], ids=["last_spacing", "first_matrix", "both", "last_two"])
def test_slice_at_an_end_with_other_geometry_says_what_differs(tmp_path, which, tags, reason, kept, fast):
    """Before: the rest loaded one slice shorter, warned "series split into 2 volumes by pixel
    spacing / matrix size", and the end slice failed as "single-slice series" though its series has
    20 files. Now the volume says slices were left out and the slice says why."""
    d = str(tmp_path / "s")
    _series(d)
    mutate_series(d, _set(which, **tags))
    (r, _, st), (r1, p1, _) = _load(d, fast)
    assert (r, r1, p1) == ("ok", reason, None), (r, r1)
    assert st.shape == (len(kept), 48, 40) and st.ps == PS
    assert np.allclose(st.o0, [-100.0, -110.0, Z[kept[0]]]) and np.allclose(st.d, Z[kept] - Z[kept[0]])
    n = len(which)
    assert st.warnings == [f"{n} end slice{'s' * (n > 1)} of the series left out (other matrix size or geometry, "
                           "failed separately)"]


def test_other_geometry_at_a_held_position_or_malformed_at_an_end(tmp_path):
    """A 21st file at slice 10's position with another PixelSpacing leaves the volume whole: the
    file fails saying what differs, with nothing shorter, and the volume has no warning. A malformed
    PixelSpacing in the last slice fails that file with "invalid ..." and the volume is warned."""
    d = str(tmp_path / "held")
    paths = _series(d)
    ds = pydicom.dcmread(paths[0])
    write_series(d, head_phantom((1, 48, 40)), origin=(-100.0, -110.0, Z[10]), ps=(0.5, 0.5), names=["EXTRA.dcm"],
                 study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID)
    (r, _, st), (r1, p1, _) = _load(d)
    assert (r, r1, p1) == ("ok", "single slice with PixelSpacing 0.5 x 0.5 mm unlike the 20 slices of its series' "
                                 "volume (0.9 x 0.8 mm): left out", None), r1
    assert st.shape == (K, 48, 40) and np.allclose(st.d, Z - Z[0]) and st.warnings == []

    d = str(tmp_path / "end")
    paths = _series(d)
    set_raw_text(paths[K - 1], "PixelSpacing", "0.9\\abc")
    (r, _, st), (r1, p1, _) = _load(d)
    assert (r, r1, p1) == ("ok", "invalid PixelSpacing '0.9\\?' (expected 2 positive numbers)", "IM0019.dcm")
    assert np.allclose(st.d, Z[:-1] - Z[0]) and st.warnings == [LEFT_OUT]


def test_preprocess_records_the_true_reasons(tmp_path, capsys):
    """End to end: a series with a malformed PixelSpacing between its slices fails with "invalid
    ..." (20 files counted failed), one with another PixelSpacing at its end is written 19 slices
    deep with the left-out warning and the end file fails with what differs (1 file); the console
    names both files; the manifest's failure records hold fixed keys only."""
    inp = tmp_path / "in"
    paths = _series(str(inp / "inside"))
    set_raw_text(paths[10], "PixelSpacing", "0.9\\abc")
    _series(str(inp / "end"))
    mutate_series(str(inp / "end"), _set((K - 1,), PixelSpacing=[0.5, 0.5]))
    man = preprocess.run(str(inp), str(tmp_path / "out"), n_workers=1, cfg_progress=False, cfg_log_paths=True)
    inside = "invalid PixelSpacing '0.9\\?' (expected 2 positive numbers)"
    end = ("single slice with PixelSpacing 0.5 x 0.5 mm unlike the 19 slices of its series' volume (0.9 x 0.8 mm): "
           "left out, the volume is one slice shorter")
    s = man["summary"]
    assert s["series_failed"] == {inside: 1, end: 1}, s["series_failed"]
    f = s["files"]
    assert (f["in_volumes"], f["in_failed_series"], f["unaccounted"]) == (19, {inside: 20, end: 1}, 0), f
    (v,) = man["volumes"]
    assert v["warnings"] == [LEFT_OUT] and s["volume_warnings"] == {LEFT_OUT: 1}
    assert all(set(x) <= {"kind", "status", "reason", "study_key", "series_key", "file_key", "n_files"}
               for x in man["failures"])
    err = capsys.readouterr().err.splitlines()
    for reason, name in ((inside, os.path.join("inside", "IM0010.dcm")), (end, os.path.join("end", "IM0019.dcm"))):
        line = [x for x in err if reason in x]
        assert len(line) == 1 and line[0].endswith(name), (reason, line)
    with open(tmp_path / "out" / "preprocess.log") as fh:
        log = fh.read()
    assert inside in log and end in log and LEFT_OUT in log
