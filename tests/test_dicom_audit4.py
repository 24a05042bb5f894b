"""Audit 4 of nvfm/dicom.py: headers that loaded silently wrong or failed unclearly.

- a slice whose ImageOrientationPatient is six numbers but no plane (all zero, a repeated or zero
  direction, scaled) was taken for a slice of another orientation: its volume loaded 'ok' with a
  hole where the file lies (interpolated, "slice(s) missing") and the file failed on its own
  without its name;
- an enhanced MR's family came from its top level, where EchoTime, RepetitionTime, InversionTime
  and ContrastBolusAgent do not exist (they live in the functional groups and the Enhanced
  Contrast/Bolus module): an unnamed FLAIR or T2 was OTHER, a post-contrast T1 was T1, and both
  echoes of a dual-echo file took the first echo's TE;
- a pixel-layout element with several values (a US element of 4 bytes) crashed the read with a
  raw TypeError; an enhanced object without NumberOfFrames failed as "pixel data length does
  not match" though its length is right for its frames.
Expected values are hand-worked from the written headers (mr_family's documented rules) or read
back with pydicom."""
import os
import sys

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from dicom_synth import head_phantom, scan_folder, set_raw_text, write_enhanced, write_series  # noqa: E402
from test_dicom_malformed import _load, _reference  # noqa: E402

from nvfm import dicom  # noqa: E402

SHAPE = (10, 16, 16)


def _outcomes(d, fast=True):
    """[(reason or "ok", file name or None, number of slices or None)] of every candidate volume."""
    return [(r, os.path.basename(p) if p else None, None if v is None else v.shape[0]) for r, p, v in _load(d, fast)]


# ----------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("iop, quoted", [
    ([0.0] * 6, "0.0\\0.0\\0.0\\0.0\\0.0\\0.0"),            # zeroed by an export tool
    ([1.0, 0, 0, 1.0, 0, 0], "1.0\\0.0\\0.0\\1.0\\0.0\\0.0"),  # row and column the same direction
    ([2.0, 0, 0, 0, 2.0, 0], "2.0\\0.0\\0.0\\0.0\\2.0\\0.0"),  # not unit vectors
])
def test_orientation_that_is_no_plane_fails_the_series_naming_the_file(tmp_path, iop, quoted, fast):
    """Slice 4 of 10 (5 mm apart) with such an ImageOrientationPatient: before, the other 9 loaded
    'ok' with a 10 mm hole at slice 4 (interpolated) and the file failed as "invalid
    ImageOrientationPatient (not orthonormal)" with no file named. Now the series fails naming it,
    as for a malformed value; with every file so, the first file is named."""
    d = str(tmp_path / "one")
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    ds = pydicom.dcmread(paths[4])
    ds.ImageOrientationPatient = iop
    ds.save_as(paths[4])
    reason = f"invalid ImageOrientationPatient '{quoted}' (expected 2 orthogonal unit vectors)"
    assert _outcomes(d, fast) == [(reason, "IM0004.dcm", None)]
    d = str(tmp_path / "all")
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = iop
        ds.save_as(p)
    assert _outcomes(d, fast) == [(reason, "IM0000.dcm", None)]


def test_orientation_rounded_to_four_decimals_still_loads(tmp_path):
    """An oblique orientation written to 4 decimals (unit length to 1e-4) is a plane: the series
    loads every slice, as pydicom reads them."""
    d = str(tmp_path / "s")
    a = np.radians(12.0)
    r = (round(np.cos(a), 4), round(np.sin(a), 4), 0.0)
    c = (round(-np.sin(a), 4), round(np.cos(a), 4), 0.0)
    write_series(d, head_phantom(SHAPE), r=r, c=c, shuffle=False)
    (reason, _, v), = _load(d)
    assert reason == "ok" and v.shape == SHAPE
    assert np.array_equal(v, _reference(d))  # axial-ish: z order is the slice order


# ----------------------------------------------------------------------------- enhanced MR timing and contrast


def _enhanced_mr(path, te=None, tr=None, ti=None, desc="AX 3", agent=False, administered=None, per_frame_te=None):
    """An enhanced MR file (write_enhanced) with its timing in the shared functional groups, as
    scanners write it (MR Echo, MR Timing and Related Parameters, MR Modifier), optionally
    per-frame echo times, a Contrast/Bolus Agent Sequence and per-frame Contrast/Bolus Usage."""
    vol = np.clip(head_phantom(SHAPE) + 1000, 0, 3000)
    write_enhanced(path, vol, desc=desc)
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    if te is not None:
        e = Dataset()
        e.EffectiveEchoTime = float(te)
        shared.MREchoSequence = Sequence([e])
    if tr is not None:
        t = Dataset()
        t.RepetitionTime = float(tr)
        shared.MRTimingAndRelatedParametersSequence = Sequence([t])
    if ti is not None:
        m = Dataset()
        m.InversionTimes = [float(ti)]
        shared.MRModifierSequence = Sequence([m])
    for k, fr in enumerate(ds.PerFrameFunctionalGroupsSequence):
        if per_frame_te is not None:
            e = Dataset()
            e.EffectiveEchoTime = float(per_frame_te[k % len(per_frame_te)])
            fr.MREchoSequence = Sequence([e])
        if administered is not None:
            u = Dataset()
            u.ContrastBolusAgentNumber = 1
            u.ContrastBolusAgentAdministered = administered
            fr.ContrastBolusUsageSequence = Sequence([u])
    if agent:
        a = Dataset()
        a.CodeValue, a.CodingSchemeDesignator, a.CodeMeaning = "C-17800", "SRT", "Gadolinium"
        a.ContrastBolusAgentNumber = 1
        ds.ContrastBolusAgentSequence = Sequence([a])
    ds.save_as(path)


def _families(d):
    hs = scan_folder(d)
    assert all("error" not in h for h in hs)
    groups, _ = dicom.group_series(hs)
    return sorted(dicom.mr_family(g["info"]) for g in groups)


@pytest.mark.parametrize("timing, family", [
    (dict(te=120, tr=9000, ti=2500), "FLAIR"),  # TI > 1500 and TE > 70
    (dict(te=100, tr=4000), "T2"),              # TE >= 70 and TR >= 1500
    (dict(te=12, tr=500), "T1"),                # TR < 1000 and TE < 30
])
def test_enhanced_mr_family_reads_its_functional_group_timing(tmp_path, timing, family):
    """A description without keywords ("AX 3"): the family comes from TE / TR / TI, which an
    enhanced MR holds in its functional groups only. Before, TR and TI were never read there
    (FLAIR and T2 came out OTHER). Expected: mr_family's documented header rules by hand."""
    _enhanced_mr(str(tmp_path / "e" / "a.dcm"), **timing)
    assert _families(str(tmp_path / "e")) == [family]


def test_each_echo_of_a_dual_echo_enhanced_file_has_its_own_te(tmp_path):
    """PD (TE 15 ms) and T2 (TE 100 ms) echoes, TR 3000 ms, in one enhanced file: two volumes.
    Before, both took the file's first echo time (OTHER, OTHER); the T2 echo is T2 (TE >= 70,
    TR >= 1500) and the PD echo none of the families (OTHER)."""
    _enhanced_mr(str(tmp_path / "e" / "a.dcm"), tr=3000, per_frame_te=(15, 100))
    assert _families(str(tmp_path / "e")) == ["OTHER", "T2"]


@pytest.mark.parametrize("agent, administered, family", [
    (True, None, "T1C"),    # the Enhanced Contrast/Bolus module: contrast was used
    (True, "YES", "T1C"),
    (True, "NO", "T1"),     # every frame says the agent was not administered
    (False, None, "T1"),
])
def test_enhanced_mr_contrast_from_its_contrast_bolus_agent_sequence(tmp_path, agent, administered, family):
    """"AX T1 SE" with a Contrast/Bolus Agent Sequence: an enhanced MR has no ContrastBolusAgent
    text (its IOD has the Enhanced Contrast/Bolus module instead), so a post-contrast T1 came out
    T1. mr_family's rule: T1 becomes T1C with a contrast agent."""
    _enhanced_mr(str(tmp_path / "e" / "a.dcm"), te=12, tr=500, desc="AX T1 SE", agent=agent,
                 administered=administered)
    assert _families(str(tmp_path / "e")) == [family]


# ----------------------------------------------------------------------------- pixel layout headers


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("keyword, raw, reason", [
    ("BitsAllocated", b"\x10\x00\x08\x00", "missing or invalid BitsAllocated"),
    ("BitsStored", b"\x10\x00\x0c\x00", "missing or invalid BitsStored"),
    ("PixelRepresentation", b"\x01\x00\x00\x00", "invalid PixelRepresentation (signed or unsigned pixels unknown)"),
])
def test_pixel_layout_element_with_two_values_fails_naming_the_file(tmp_path, keyword, raw, reason, fast):
    """A 4-byte US element holds two values (16 and 8 bits allocated, signed and unsigned):
    which one the writer meant is unknown. Before, BitsAllocated crashed the read with a raw
    TypeError (int() of a list); now the series fails naming the file."""
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    set_raw_text(paths[3], keyword, raw.decode("latin-1"))
    assert list(pydicom.dcmread(paths[3])[keyword].value) == list(np.frombuffer(raw, "<u2"))  # two values
    assert _outcomes(d, fast) == [(reason, "IM0003.dcm", None)]


@pytest.mark.parametrize("fast", [True, False])
def test_enhanced_object_without_number_of_frames_says_so(tmp_path, fast):
    """NumberOfFrames (Type 1) deleted from a 10-frame enhanced CT whose pixel data holds 10
    frames: pydicom would decode one frame. Before, the reason was "pixel data length does not
    match ..." though the length is right for the 10 frame records."""
    d = str(tmp_path / "e")
    write_enhanced(os.path.join(d, "a.dcm"), head_phantom(SHAPE), modality="CT", intercept=-1024.0)
    ds = pydicom.dcmread(os.path.join(d, "a.dcm"))
    assert len(ds.PixelData) == 10 * 16 * 16 * 2
    del ds.NumberOfFrames
    ds.save_as(os.path.join(d, "a.dcm"))
    assert _outcomes(d, fast) == [("missing NumberOfFrames (per-frame functional groups 10)", "a.dcm", None)]
