"""A slice whose header keeps it out of its series' volume (another, malformed or absent
PixelSpacing, another matrix size, no ImageOrientationPatient) but which lies between the other
slices fails the series naming that file, instead of leaving a gap that is interpolated across
(nvfm/dicom.py: _strays_into_holes). Expected slice positions are worked by hand from the
positions written (origin + k * step)."""
import os
import sys

import numpy as np
import pydicom
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from dicom_synth import head_phantom, mutate_series, scan_folder, set_raw_text, write_series  # noqa: E402

import preprocess  # noqa: E402
from nvfm import dicom  # noqa: E402

K, STEP, PS = 20, 5.0, (0.9, 0.8)
SHAPE = (K, 48, 40)


def _series(d, **kw):
    """20 axial slices 5 mm apart, file IM00kk.dcm = slice k (z = -50 + 5 k mm)."""
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False, step=(0, 0, STEP), ps=PS, **kw)
    return paths


def _load(d, fast=True):
    """[(reason or "ok", offending file name, stack or None)] per candidate volume, loaded as
    preprocess.py loads them (group_series, dicom_stack, check(min_slices=3))."""
    hs = scan_folder(d, fast)
    groups, skipped = dicom.group_series(hs)
    assert not skipped
    out = []
    for g in groups:
        try:
            st = dicom.dicom_stack(d, g, reduce=dicom.J2K_REDUCE).check(3)
            out.append(("ok", None, st))
        except dicom.SeriesError as e:
            out.append((str(e), e.path and os.path.basename(e.path), None))
    return out


def _set(keyword, value):
    def f(ds, i):
        if i == 10:
            setattr(ds, keyword, value)
    return f


def _swap_matrix(ds, i):
    if i == 10:  # 40 x 48: the same number of pixels, so the pixel data length still matches
        ds.Rows, ds.Columns = ds.Columns, ds.Rows


def _drop(keyword):
    def f(ds, i):
        if i == 10:
            delattr(ds, keyword)
    return f


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name,mutate,raw,reason", [
    ("other", _set("PixelSpacing", [0.5, 0.5]), None,
     "PixelSpacing 0.5 x 0.5 mm in a slice between slices of 0.9 x 0.8 mm (without it the volume has a gap)"),
    ("malformed", None, "0.9\\abc", "invalid PixelSpacing '0.9\\?' (expected 2 positive numbers)"),
    ("one value", None, "0.9", "invalid PixelSpacing '0.9' (expected 2 positive numbers)"),
    ("absent", _drop("PixelSpacing"), None, "missing geometry (PixelSpacing)"),
    ("no orientation", _drop("ImageOrientationPatient"), None, "missing geometry (ImageOrientationPatient)"),
    ("matrix", _swap_matrix, None, "matrix size 40 x 48 in a slice between slices of 48 x 40 "
                                   "(without it the volume has a gap)"),
    # no position to place it by: it may lie in a hole, as a slice of the series without one fails it
    ("no position, other spacing", lambda ds, i: (_drop("ImagePositionPatient")(ds, i),
                                                  _set("PixelSpacing", [0.5, 0.5])(ds, i)), None,
     "missing geometry (ImagePositionPatient)"),
], ids=["other", "malformed", "one_value", "absent", "no_orientation", "matrix", "no_position_other_spacing"])
def test_bad_slice_inside_the_series_fails_it_naming_the_file(tmp_path, name, mutate, raw, reason, fast):
    """Slice 10 of 20 alone has a bad header: before, the other 19 loaded as a volume with a
    10 mm gap at z = -5 mm (interpolated, "slice(s) missing" though the file is there) and slice 10
    failed on its own; now the series is one candidate that fails naming IM0010.dcm."""
    d = str(tmp_path / "s")
    paths = _series(d)
    if raw is not None:
        set_raw_text(paths[10], "PixelSpacing", raw)
    else:
        mutate_series(d, mutate)
    got = [(r, p) for r, p, _ in _load(d, fast)]
    assert got == [(reason, "IM0010.dcm")], got


def test_two_bad_slices_and_an_oblique_series(tmp_path):
    """Two neighbouring slices (10, 11) at another PixelSpacing are still too few for a volume:
    the series fails on the first; the same in an oblique series (positions along its own normal)."""
    d = str(tmp_path / "two")
    _series(d)
    mutate_series(d, lambda ds, i: setattr(ds, "PixelSpacing", [0.5, 0.5]) if i in (10, 11) else None)
    got = [(r, p) for r, p, _ in _load(d)]
    assert got == [("PixelSpacing 0.5 x 0.5 mm in a slice between slices of 0.9 x 0.8 mm "
                    "(without it the volume has a gap)", "IM0010.dcm")], got
    t = np.radians(20)
    r, c = np.array([1.0, 0, 0]), np.array([0, np.cos(t), np.sin(t)])
    n = np.cross(r, c)
    d = str(tmp_path / "oblique")
    write_series(d, head_phantom(SHAPE), r=r, c=c, step=STEP * n, shuffle=False, ps=PS)
    mutate_series(d, _set("PixelSpacing", [0.5, 0.5]))
    got = [(r_, p) for r_, p, _ in _load(d)]
    assert got == [("PixelSpacing 0.5 x 0.5 mm in a slice between slices of 0.9 x 0.8 mm "
                    "(without it the volume has a gap)", "IM0010.dcm")], got


def test_slices_beyond_the_ends_or_many_keep_their_rules(tmp_path):
    """What does not leave a gap keeps its rule: a missing file (one 10 mm gap) is interpolated
    with a warning; a bad slice at an end only shortens the volume (it fails alone); every third
    slice at another spacing (6 slices, a volume of their own) is a series cut apart, both kept."""
    z = -50.0 + STEP * np.arange(K)  # hand-worked positions of the slices written
    d = str(tmp_path / "missing")
    paths = _series(d)
    os.remove(paths[10])
    (r, p, st), = _load(d)
    assert r == "ok" and st.shape == (19, 48, 40), r
    assert np.allclose(st.o0, [-100.0, -110.0, z[0]]) and np.allclose(st.d, np.delete(z, 10) - z[0])
    assert st.warnings == ["interpolated across a 10.0 mm gap (median 5.0 mm): slice(s) missing"]

    d = str(tmp_path / "end")
    _series(d)
    mutate_series(d, lambda ds, i: setattr(ds, "PixelSpacing", [0.5, 0.5]) if i == K - 1 else None)
    (r, p, st), (r1, p1, _) = _load(d)
    assert r == "ok" and st.shape == (19, 48, 40) and st.uniform, r
    assert np.allclose(st.d, z[:-1] - z[0]) and st.spacing == (STEP,) + PS
    assert (r1, p1) == ("single slice with PixelSpacing 0.5 x 0.5 mm unlike the 19 slices of its series' volume "
                        "(0.9 x 0.8 mm): left out, the volume is one slice shorter", None)

    d = str(tmp_path / "cut")
    _series(d)
    mutate_series(d, lambda ds, i: setattr(ds, "PixelSpacing", [0.5, 0.5]) if i % 3 == 2 else None)
    (r, _, main), (r1, _, other) = _load(d)
    assert (r, r1) == ("ok", "ok")
    assert np.allclose(main.d, [z[k] - z[0] for k in range(K) if k % 3 != 2])
    assert np.allclose(other.d, z[2::3] - z[2]) and other.ps == (0.5, 0.5)


def test_preprocess_counts_the_failed_series_and_names_the_file(tmp_path, capsys):
    """End to end: a good series is written, the one with a bad slice between the others fails once
    with its reason, all 20 of its files counted as failed, and the console names the file."""
    inp = tmp_path / "in"
    _series(str(inp / "good"))
    paths = _series(str(inp / "bad"))
    ds = pydicom.dcmread(paths[10])
    ds.PixelSpacing = [0.5, 0.5]
    ds.save_as(paths[10])
    man = preprocess.run(str(inp), str(tmp_path / "out"), n_workers=1, cfg_progress=False, cfg_log_paths=True)
    s = man["summary"]
    reason = "PixelSpacing 0.5 x 0.5 mm in a slice between slices of 0.9 x 0.8 mm (without it the volume has a gap)"
    assert s["series_failed"] == {reason: 1}, s["series_failed"]
    assert len(man["volumes"]) == 1 and not man["volumes"][0]["warnings"]
    f = s["files"]
    assert (f["in_volumes"], f["in_failed_series"], f["unaccounted"]) == (20, {reason: 20}, 0), f
    line = [x for x in capsys.readouterr().err.splitlines() if reason in x]
    assert len(line) == 1 and line[0].endswith(os.path.join("bad", "IM0010.dcm")), line
