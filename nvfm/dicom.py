"""DICOM/NIfTI ingestion: header scan, series grouping, and slice stacks with exact geometry.

Pipeline (used by preprocess.py):
  1. `find_inputs(root)` lists files (sorted, deterministic). `.nii`/`.nii.gz` are NIfTI,
     everything else is tried as DICOM.
  2. `scan_dicom(root, rel)` reads the header only (a struct parser for the common explicit-VR
     little-endian file, identical results to pydicom's `stop_before_pixels=True` read, which
     handles everything else) and returns a
     small picklable dict: study/series UIDs, SOP class, modality, description, and one
     geometry record per frame (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
     RescaleSlope/Intercept, and ConvolutionKernel, SliceThickness, AcquisitionNumber to tell
     slice stacks apart, EchoTime, InversionTime, RepetitionTime to tell acquisitions apart;
     for enhanced multi-frame objects from the shared and per-frame
     functional groups).
  3. `group_series(headers)` groups frames by StudyInstanceUID + SeriesInstanceUID, then
     splits a series that mixes orientations (row or column directions more than
     IOP_PLANE_DEG = 5 deg apart: other planes; closer ones stay together and are checked by
     `slice_orientation`; "series split into 3 volumes by slice orientation (6 axial, 2 sagittal,
     1 coronal)" is warned, and a plane with too few slices fails as "too few slices (2) in its
     orientation: series mixes 3 slice orientations (...)", a localizer or mixed-plane export,
     not a truncated series), matrix sizes, pixel spacings (not a stray part of < 3 slices that lies
     between another part's slices: it stays with them and fails the series, see Checks), echoes,
     b-values or temporal positions into sub-volumes, and one that mixes acquisitions by
     EchoTime / InversionTime (1 ms apart) or RepetitionTime (a 25% jump: gated TRs vary per
     slice) (TIMING_TAGS: T1 and T2, or a dual-echo series, under one SeriesInstanceUID; warned
     where no other key told them apart), then splits a sub-volume holding slice
     stacks that interleave along the normal (two reconstructions or acquisitions exported as
     one series, also at the same positions) by the first tag that tells them apart:
     ConvolutionKernel or SliceThickness (not when they differ between blocks one above the
     other, e.g. a thin posterior fossa), AcquisitionNumber only where the merged positions
     alternate (it varies per slice, rotation or concatenation within one volume on some
     scanners, and dcm2niix stacks across it); each stack needs >= 3 slices
     (`_split_stacks`). It applies the skip rules
     (`skip_reason`): non-image SOP classes (SR, PR, SC, PDF, RT, SEG, waveforms),
     modalities other than CT/MR, image SOP classes we do not read, localizers/scouts
     (ImageType LOCALIZER or SeriesDescription SCOUT/LOCALIZER/SURVEY/TOPOGRAM/...),
     derived maps (ImageType DERIVED with MIP/MinIP/projection/volume rendering/
     subtraction/perfusion or FA maps), colour images (PALETTE COLOR too: one sample per
     pixel, but a palette index). Kept: derived ADC and TRACE diffusion images, and
     MPR/REFORMATTED series (CT coronal/sagittal reformats are ordinary volumes a radiologist
     reads).
  4. `SliceStack` holds one sub-volume: the frames sorted by their position along the slice
     normal n = row_cosine x column_cosine (never by InstanceNumber or file name), and loads
     pixels one slice at a time (float32, RescaleSlope/Intercept applied per slice). Pixels
     of uncompressed little-endian single-frame files are read straight from the offset the
     header scan found (numpy, no second parse; unused high bits masked as pydicom does);
     single-frame JPEG 2000 codestreams are read from the offset the scan found and decoded by
     openjpeg directly (at half resolution when the pixels are <= 0.5 mm: see dicom_stack);
     everything else goes through pydicom's pixel handlers (pylibjpeg for JPEG, JPEG-LS,
     JPEG 2000, RLE), and a missing handler fails that series with a clear reason.
     MONOCHROME1 is inverted for MR in nvfm/volume.py (an MR series mixing MONOCHROME1 and
     MONOCHROME2 files fails); CT is left alone because Hounsfield units are defined by the
     rescale alone.

Geometry conventions. Internally positions are DICOM patient coordinates (LPS, mm). A
stack has in-plane unit vectors r (along a row, i.e. increasing column index j) and c
(along a column, increasing row index i), normal n = r x c, and per slice k its origin
o_k (the centre of pixel (0, 0)). Pixel (k, i, j) sits at o_k + i*ps_row*c + j*ps_col*r.
Slice positions along n are d_k = n.o_k - n.o_0 (ascending). The in-plane part of o_k - o_0
is the gantry-tilt shear (zero for ordinary series); it is kept per slice and removed
exactly during resampling (nvfm/volume.py), never ignored.

Checks (each a logged, counted rejection of that series only): fewer than `min_slices`
slices; two slices at one position with different pixels ("conflicting slices"; identical
duplicates are dropped); a gap between neighbouring slices larger than
max(2.5 x median gap, 10 mm) ("missing slices": interpolating across it would invent
anatomy); sorted gaps alternating between two clearly different values over >= 5 gaps
("two interleaved slice stacks (gaps alternate 0.5 / 4.5 mm)": two stacks of one period,
offset by other than half of it, that no tag told apart, `alternating_gaps`; one missing
slice, rounding of positions (2.5 / 2.6 mm), other uneven spacing and a part of a series split
by pixel spacing / matrix size, whose gaps are the other part's slices, do not count); smaller
gaps and non-uniform spacing are resampled from the true positions; absurd spacings
(pixel < 0.05 mm or > 20 mm, slice gap < 0.05 mm or > 40 mm) or extents (> 2048 pixels,
> 2000 slices); a slice that lies between the others, at a position no volume of the series holds,
but cannot be stacked with them (its PixelSpacing other, malformed or absent, its matrix size other,
its ImageOrientationPatient absent) and with < 3 such slices cannot be a volume of its own: "PixelSpacing
0.5 x 0.5 mm in a slice between slices of 0.9 x 0.8 mm (without it the volume has a gap)", "matrix size
40 x 48 in a slice between slices of 48 x 40 (...)", "invalid PixelSpacing '0.9\\?' (...)" or "missing
geometry (PixelSpacing)", naming that
file (`_strays_into_holes`). Left out, it would leave a gap that the rules above interpolate (a 10 mm
gap in a 5 mm series) or call "missing slices", though the slice is in the input: a file whose
header contradicts its neighbours is for the user to fix, not to be guessed over, as a missing
ImagePositionPatient fails the series. Such a slice beyond the series' ends only shortens the
volume: the volume loads without it, warned "1 end slice of the series left out (other matrix size
or geometry, failed separately)" (not "series split into 2 volumes": there is one), and the slice
fails on its own, named, with what differs rather than "single-slice series" (it belongs to a
20-file series): "single slice with PixelSpacing 0.5 x 0.5 mm unlike the 19 slices of its series'
volume (0.9 x 0.8 mm): left out, the volume is one slice shorter" (matrix size likewise, both when
both differ; "too few slices (2) with ..." for two; at a position another slice holds, "...: left
out", as nothing is shorter; with its geometry malformed or absent, that reason, below). A part of
>= 3 slices is a series cut apart (kept, warned);
gantry tilt above 45 degrees; slices that are not parallel: a slice's row or column
direction more than IOP_JITTER_DEG = 0.25 deg off the volume's mean ("slice orientation varies
by 0.53 deg (ImageOrientationPatient, more than 0.25 deg)"; within it, float noise and small
jitter, the mean orientation is used: `slice_orientation`); geometry tags (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing) absent or empty, "missing geometry (PixelSpacing)", or
present but malformed, "invalid PixelSpacing '0.9\\?' (expected 2 positive numbers)" (one
value, text, NaN, a spacing <= 0; "... (expected 3 numbers)" / "(expected 6 numbers)" for position /
orientation, "(expected 2 orthogonal unit vectors)" for six numbers that are no plane: all zero, a
repeated or zero direction, scaled, beyond IOP_UNIT_TOL; the value quoted as written, a part that
is not number-like as "?" (text in a geometry tag could be a name), at most MAX_QUOTED = 32 characters:
a user fixing the export must know the tag is there but wrong; `_geometry`); native pixel data
whose length is not exactly Rows x Columns x frames x samples x BitsAllocated (+ one pad
byte) in any file; a RescaleSlope / RescaleIntercept that is present but not a
finite number or has more than one value ("invalid RescaleSlope (2 values)": the first was
taken), a RescaleSlope of zero (a blank slice), or integer pixels without
PixelRepresentation or with one other than 0 / 1 ("invalid PixelRepresentation 2 (only 0 or 1
are defined)": read as signed), missing BitsAllocated / BitsStored or BitsStored outside
1..BitsAllocated, a HighBit other than BitsStored - 1 ("invalid HighBit 15 (BitsStored 12: must
be 11)": the CT and MR image modules require it; pydicom and numpy read the low BitsStored bits
whatever HighBit says while other readers shift, so the writer's layout is unknown and no value
is guessed; an absent HighBit reads the low bits, the only layout the standard allows), a
PhotometricInterpretation that is neither MONOCHROME1/2 nor a colour one ("unknown
PhotometricInterpretation GREYSCALE": it was read as grey, MONOCHROME2), a colour
PhotometricInterpretation with one sample per pixel
("PhotometricInterpretation RGB with SamplesPerPixel 1 (inconsistent header)": it was read as
grey), or a CT without RescaleSlope / RescaleIntercept (Type 1; an enhanced CT's frame without
them in its per-frame or shared Pixel Value Transformation functional group, mandatory there, nor
top-level ones, which are read when the group lacks them; "missing RescaleIntercept
(CT Hounsfield units unknown)"), or a CT whose RescaleType declares other units than HU
("CT RescaleType MGML (values are not Hounsfield units)": iodine or effective-Z maps; US,
unspecified, is read as HU), in any file (read as absent they would shift every value, or make
negative ones huge); Siemens mosaics. An enhanced multi-frame file with an
empty per-frame functional groups sequence is a failed file ("enhanced multi-frame object with no frames"), one
without NumberOfFrames fails its series ("missing NumberOfFrames": its pixels would decode as one frame), as
does a BitsAllocated / BitsStored / PixelRepresentation of several values. Files
cut short are "truncated file" (header or pixel data), at the header scan or when read. Kept
but recorded in `stack.warnings`: a gap interpolated because it is under the missing-slice
limit (> 1.5 x median), a series split into volumes by pixel spacing / matrix size, by
acquisition timing ("series split into 2 volumes by EchoTime, RepetitionTime (different
acquisitions)") or into interleaved slice stacks by a tag ("series split into 2 volumes by
ConvolutionKernel (interleaved slice stacks)"), NaNs in a NIfTI set to its minimum.

NIfTI: the voxel axis with the largest spacing is the acquisition axis (ties within 1%
go to the axis closest to I/S); the affine is used as given (sform, else qform, as nibabel
does; a warning when both are set and disagree, as other readers may take the qform; neither:
nibabel's default from the voxel sizes, with a warning, as the orientation is unknown). A NIfTI
has no study UID: all NIfTI files in one folder form one study whose key is the salted
hash of the folder path relative to the input root (a trailing BIDS datatype folder
anat/dwi/func/perf/fmap is stripped, so one BIDS session = one study). Modality (a NIfTI has no
Modality tag): "CT" when the data look like Hounsfield units (minimum <= -900 and 1st
percentile < -500), else "MR"; never from the file name.

pydicom's warnings (UserWarnings, also sent to the "pydicom" logger) never reach the user
as they are: they quote header values (possibly names or IDs) and mean nothing to a user.
Every pydicom read here runs under `pydicom_quiet`: warnings about header values (VR
mismatches, values that break their VR's rules, unknown character sets; pydicom reads on
and _header_info parses values defensively, so they change nothing) are silenced; warnings
while decoding pixel data become fixed one-line phrases in the stack's notes
(`pixel_phrase`), which preprocess.py logs once per series with the offending file. Other
libraries' warnings pass through.

Privacy: nothing here returns names, IDs, dates or UIDs except the UIDs needed for
grouping, which preprocess.py hashes (salted sha256) before anything is written. Reasons
are fixed phrases plus numbers (and the number-like parts of a malformed geometry value, cut to
MAX_QUOTED characters); file paths appear only as salted hashes (`file_key`) in
outputs.
"""
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import struct
import warnings

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

# Image storage SOP classes we can turn into volumes.
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image",
}
# SOP classes that are never volumes: SR, presentation states, secondary captures, PDF/CDA,
# RT objects, segmentations/raw data, waveforms, DICOMDIR
NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.", "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.481.", "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.9.", "1.2.840.10008.1.3.10")
LOCALIZER_RE = re.compile(r"scout|locali[sz]er|\bsurvey|topogram|scanogram|\bloc\b|3[ -]?pl(ane)?\b|tri-?pilot|"
                          r"\bpilot\b|\baahead|\bplan\b", re.I)
# derived images that are not a plain view of the anatomy; MPR/REFORMATTED series (coronal and
# sagittal CT reformats) are kept: they are ordinary volumes a radiologist reads
DERIVED_SKIP = ("MIP", "MINIP", "PROJECTION IMAGE", "CURVED", "VOLUME RENDER", "VR", "SUBTRACTION", "SUB",
                "FA", "CBF", "CBV", "MTT", "TTP", "TMAX", "PERFUSION", "COLLAPSE", "MOCO")
NIFTI_EXT = (".nii", ".nii.gz")
BIDS_DATATYPES = {"anat", "dwi", "func", "perf", "fmap"}

MIN_PIXEL_MM, MAX_PIXEL_MM = 0.05, 20.0
MIN_GAP_MM, MAX_GAP_MM = 0.05, 40.0
MAX_MATRIX, MAX_SLICES = 2048, 2000
MAX_TILT_DEG = 45.0
# ImageOrientationPatient within one series (see slice_orientation): slices whose row and column
# directions lie within IOP_PLANE_DEG of each other are one plane (farther: another stack, a
# separate volume); within that plane a volume takes the mean orientation when every slice lies
# within IOP_JITTER_DEG of it, else it fails ("slice orientation varies by ...")
IOP_JITTER_DEG = 0.25
IOP_PLANE_DEG = 5.0
# JPEG 2000 (see dicom_stack): decode codestreams directly, and at half resolution when the
# pixels are at most half the 1 mm output spacing (module switches for tests and benchmarks)
J2K_DIRECT = True
J2K_REDUCE = True  # what preprocess.py asks dicom_stack for (its default is a full decode)
J2K_REDUCE_MAX_PIXEL_MM = 0.5


class SeriesError(Exception):
    """A series (or file) that cannot become a volume; str() is a PHI-free reason. `path`
    (optional second argument): the relative path of the offending file, for the console log."""

    def __init__(self, reason, path=None):
        super().__init__(reason)
        self.path = path

    def __str__(self):
        return str(self.args[0])


def salted_hash(text, salt, n=16):
    """Hex sha256 of salt + text, truncated to n hex chars (64 bits at n=16). A path that is
    not valid UTF-8 (its bytes surrogate-escaped by os.walk) is hashed as its raw bytes."""
    return hashlib.sha256((salt + "\x00" + str(text)).encode("utf-8", "surrogateescape")).hexdigest()[:n]


# The salt of every study, series, file and subject key (preprocess.py, nvfm/benchmarks.py):
# --salt, else $NVFM_SALT, else this public default (demos only: with it anyone holding the
# original UIDs can recompute the keys; real data wants a secret salt, kept).
DEFAULT_SALT = "nvfm-public-default-salt-v1"


def resolve_salt(s=""):
    """The salt in effect: s, else $NVFM_SALT, else DEFAULT_SALT."""
    return s or os.environ.get("NVFM_SALT", "") or DEFAULT_SALT


def study_key(study_uid, salt):
    """A DICOM study's key: salted_hash of its StudyInstanceUID."""
    return salted_hash(study_uid, salt)


def nifti_study_key(folder, salt):
    """A NIfTI study's key: salted_hash of "nifti:" + its study folder (nifti_study_folder)
    relative to preprocess.py's --input."""
    return salted_hash("nifti:" + folder, salt)


def subject_key(subject, salt, dataset=""):
    """A subject id's key (a group id for subject-grouped splits; never the id itself)."""
    return salted_hash(f"subject:{dataset}:{subject}" if dataset else f"subject:{subject}", salt)


def find_inputs(root):
    """Sorted relative paths of all regular files under root (hidden files included: they
    are reported, not silently ignored). See walk_inputs."""
    return walk_inputs(root)[0]


def walk_inputs(root):
    """-> (sorted relative paths of all files under root, sorted relative paths of the
    directories that could not be listed). Directory symlinks are followed (a PACS export
    often links study folders); a directory reached twice (a symlink loop, or two links to
    one folder) is walked once, at its first path in sorted order."""
    out, unreadable, seen = [], [], set()

    def onerror(e):
        unreadable.append(os.path.relpath(e.filename, root) if e.filename else ".")

    for d, dirs, files in os.walk(root, followlinks=True, onerror=onerror):
        try:
            st = os.stat(d)
        except OSError:
            unreadable.append(os.path.relpath(d, root))
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for f in files:
            out.append(os.path.relpath(os.path.join(d, f), root))
    return sorted(out), sorted(set(unreadable))


def is_nifti(rel):
    return rel.lower().endswith(NIFTI_EXT)


# ---------------------------------------------------------------------------------------------
# header scan


def _floats(v, n):
    if v is None:
        return None
    try:
        out = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(x) for x in out):
        return None
    return out


# the geometry tags of a frame record: (tag, record key, VM, what a valid value is)
_GEOMETRY = (("ImagePositionPatient", "ipp", 3, "3 numbers"), ("ImageOrientationPatient", "iop", 6, "6 numbers"),
             ("PixelSpacing", "ps", 2, "2 positive numbers"))
MAX_QUOTED = 32  # characters of a malformed value quoted in a reason
_NUMBER_LIKE = re.compile(r"[0-9.,eE+\- ]*|\s*[+-]?(nan|inf|infinity)\s*", re.IGNORECASE)  # a quoted value's parts


IOP_UNIT_TOL = 1e-2  # |row|, |column| within 1 +- this and |row . column| under it (SliceStack's test)


def _orthonormal(iop):
    """Whether an ImageOrientationPatient 6-tuple holds two unit vectors at right angles (to
    IOP_UNIT_TOL: values rounded to a few decimals pass)."""
    r, c = iop[:3], iop[3:]
    dot = sum(u * v for u, v in zip(r, c))
    return (abs(math.sqrt(sum(u * u for u in r)) - 1) <= IOP_UNIT_TOL
            and abs(math.sqrt(sum(u * u for u in c)) - 1) <= IOP_UNIT_TOL and abs(dot) <= IOP_UNIT_TOL)


def _geometry(values):
    """{tag: raw value or None} of _GEOMETRY -> {record key: tuple of floats or None} plus
    "invalid": {tag: the value as written, each backslash-separated part that is not number-like
    (digits, . , + - e, nan, inf) shown as "?", at most MAX_QUOTED characters} for
    each tag present but unusable (other than VM numbers, not finite, a PixelSpacing <= 0, an
    ImageOrientationPatient that is not two orthogonal unit vectors: "iop_not_orthonormal"), else
    None: a value that is there but malformed must not be reported as missing (dicom_stack)."""
    out, bad = {}, {}
    for tag, key, n, _ in _GEOMETRY:
        v = values[tag]
        x = _floats(v, n)
        if x is not None and key == "ps" and min(x) <= 0:
            x = None
        if x is not None and key == "iop" and not _orthonormal(x):
            # six numbers that are no plane (all zero, a zero or repeated direction, scaled): an invalid
            # value, named, not a slice of some other orientation that leaves a hole in its volume
            x = None
            out["iop_not_orthonormal"] = True
        parts = v if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else [v]
        text = "\\".join(str(p).strip(" \x00") for p in parts) if v is not None else ""
        if x is None and text.strip("\\ "):  # an empty value counts as absent
            # only number-like parts are quoted: any other text could be a name put in the wrong tag
            text = "\\".join(p if _NUMBER_LIKE.fullmatch(p) else "?" for p in text.split("\\"))
            bad[tag] = text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + "..."
        out[key] = x
    out["invalid"] = bad or None
    return out


def _num(v, default=None):
    try:
        if v is None or v == "":
            return default
        x = float(v[0] if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else v)
        return x if math.isfinite(x) else default
    except (TypeError, ValueError):
        return default


def _rescale(v, default, name, info):
    """RescaleSlope / RescaleIntercept -> float; absent or empty -> default (a CT Image file
    without them fails instead: _note_pixel_error). A value that is present but not a finite
    number (a decimal comma, NaN) sets info["pixel_error"]: read as absent it would shift or
    scale every pixel silently (a CT 1024 HU too bright), and pydicom cannot apply it either."""
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) and len(v) > 1:  # VM 1: which one is meant?
        info.setdefault("pixel_error", f"invalid {name} ({len(v)} values)")
    x = _num(v)
    if x is None and v is not None and str(v).strip(" \x00[]'\"") != "":
        info.setdefault("pixel_error", f"invalid {name} (not a finite number)")
    if x == 0.0 and name == "RescaleSlope":  # every pixel would read as the intercept: a blank slice
        info.setdefault("pixel_error", "invalid RescaleSlope (zero)")
    return default if x is None else x


# Rescale Type defined terms (PS3.3 C.11.1.1.2) whose values are not Hounsfield units
RESCALE_TYPES_NOT_HU = ("OD", "MGML", "Z_EFF", "10^-2 Z_EFF", "ED", "EDW", "HU_MOD", "PCT")


def _check_rescale_type(v, info):
    """A CT whose rescale output is declared other than HU (an iodine map in mg/ml, effective Z,
    electron density) would be windowed as HU without a word: info["pixel_error"]. Absent, HU and
    US (unspecified, what derived and enhanced CT often declare) are read as HU."""
    t = str(v or "").strip(" \x00").upper()
    if info["modality"] == "CT" and t not in ("", "HU", "US"):
        known = t if t in RESCALE_TYPES_NOT_HU else "other"  # LO: free text is never echoed
        info.setdefault("pixel_error", f"CT RescaleType {known} (values are not Hounsfield units)")


def _int_or_none(v):
    """One integer, else None (absent, not a whole number, or several values: a US element of 4
    bytes is two, and which one the writer meant is unknown)."""
    if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) and len(v) != 1:
        return None
    x = _num(v)
    return int(x) if x is not None and x == int(x) else None


def _kernel(v):
    """ConvolutionKernel (one or more values) -> one upper-case string, or None."""
    if v is None:
        return None
    parts = [str(x).strip(" \x00").upper() for x in (v if isinstance(v, (list, tuple, pydicom.multival.MultiValue))
                                                    else [v])]
    return "\\".join(parts) if any(parts) else None


def _first(seq_owner, seq_name, attr):
    seq = getattr(seq_owner, seq_name, None) if seq_owner is not None else None
    if not seq:
        return None
    return getattr(seq[0], attr, None)


def _fg(item, shared, seq_name, attr):
    """An attribute from a functional group: per-frame item first, then shared."""
    v = _first(item, seq_name, attr)
    return v if v is not None else _first(shared, seq_name, attr)


_PYDICOM_DIRS = tuple(os.sep + d + os.sep for d in ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle"))
# pixel-decoding warnings -> one fixed phrase each (first match); None: harmless, silenced
_PIXEL_PHRASES = (
    ("photometric interpretation", "pixel data: Photometric Interpretation corrected from the codestream"),
    ("excess padding", "pixel data: longer than Rows x Columns x frames needs (padding ignored)"),
    ("number of frames",
     "pixel data: frame count differs from Number of Frames (as many frames read as the header says)"),
    ("compressed pixel data matches the expected number for uncompressed",
     "pixel data: compressed data the size of uncompressed data (transfer syntax may be wrong)"),
    ("decoding plugin has changed", None),
    ("extended offset table", None),
    # header values read along the way: pydicom reads on, _header_info parses defensively
    ("expected explicit vr", None), ("expected implicit vr", None), ("for vr ", None), ("maximum length", None),
    ("unknown encoding", None), ("specific character set", None), ("unknown vr", None), ("deferred read", None),
)
PIXEL_PHRASE_OTHER = "pixel data: pydicom warned while decoding (decoded anyway)"


def pixel_phrase(message):
    """A PHI-free one-line phrase for a pydicom warning raised while decoding pixel data, or
    None when it is harmless (silenced). Never the message itself: it may quote header values."""
    m = str(message).lower()
    for key, phrase in _PIXEL_PHRASES:
        if key in m:
            return phrase
    return PIXEL_PHRASE_OTHER


@contextlib.contextmanager
def pydicom_quiet(notes=None):
    """Run pydicom under this: its UserWarnings (and the copies its logger would print) are
    caught; with `notes` (a list), those of pixel decoding are appended as pixel_phrase()s
    (each once), else all are silenced. Warnings from other code are re-issued unchanged."""
    log = logging.getLogger("pydicom")
    was = log.disabled
    log.disabled = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        log.disabled = was
    for w in caught:
        ours = issubclass(w.category, UserWarning) and any(d in (w.filename or "") for d in _PYDICOM_DIRS)
        if not ours:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        phrase = pixel_phrase(w.message) if notes is not None else None
        if phrase and phrase not in notes:
            notes.append(phrase)


def read_dataset(path, stop_before_pixels):
    with pydicom_quiet():
        return _read_dataset(path, stop_before_pixels)


def _read_dataset(path, stop_before_pixels):
    """dcmread (path or binary file) that accepts files without the 128-byte preamble but
    rejects non-DICOM files."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        if hasattr(path, "seek"):
            path.seek(0)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except Exception as e:  # garbage parsed as tags
        raise _not_dicom(path) from e
    if "SOPClassUID" not in ds and "StudyInstanceUID" not in ds:
        raise _not_dicom(path)
    return ds


def _not_dicom(path):
    """The SeriesError of a file that is no DICOM: an Analyze / NIfTI-pair half says what it is."""
    name = str(path if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "")).lower()
    if name.endswith((".hdr", ".img", ".hdr.gz", ".img.gz")):
        return SeriesError("Analyze or NIfTI-pair file (.hdr/.img): not read, convert the pair to one .nii")
    return SeriesError("not a DICOM file")


def scan_dicom(root, rel, salt=""):
    """Header-only scan of one file -> dict (see module docstring); never raises.

    On failure returns {"path", "file_key", "error": reason}.
    """
    info = {"path": rel, "file_key": salted_hash(rel, salt)}
    try:
        if os.path.islink(os.path.join(root, rel)) and not os.path.exists(os.path.join(root, rel)):
            raise SeriesError("broken symbolic link")
        if os.path.getsize(os.path.join(root, rel)) == 0:
            raise SeriesError("empty file")
        if FAST_SCAN:
            try:
                return _scan_quick(os.path.join(root, rel), dict(info))
            except _NotQuick:  # anything unusual: pydicom below
                pass
        with pydicom_quiet():  # header-value warnings (values are read lazily, below too): silenced
            with open(os.path.join(root, rel), "rb") as fp:
                ds = read_dataset(fp, stop_before_pixels=True)
                pixel_pos = fp.tell()  # pydicom stops at the (7FE0,0010) tag
                pixel_hdr = fp.read(12)
            if not pixel_hdr:  # pydicom ran to the end of the file, silently dropping a cut element
                _check_header_complete(ds, os.path.getsize(os.path.join(root, rel)))
            meta = getattr(ds, "file_meta", None)
            if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
                raise SeriesError("DICOMDIR index file (not an image)")
            info = _header_info(ds, info)
            if not pixel_hdr and info["sop_class"] in IMAGE_SOP_CLASSES and (
                    not info["study_uid"] or not info["series_uid"] or info["rows"] < 1):
                # an image header ending at an element boundary before its UIDs/matrix: cut short
                raise SeriesError("truncated file (header cut short)")
            _note_pixel_error(ds, info, pixel_pos, pixel_hdr, os.path.getsize(os.path.join(root, rel)))
            info["raw_pixels"] = _raw_pixel_location(ds, info, pixel_pos, pixel_hdr)
            info["j2k_pixels"] = _j2k_pixel_location(ds, info, pixel_pos, pixel_hdr)
        return info
    except SeriesError as e:
        info["error"] = str(e)
    except Exception as e:  # truncated or malformed header
        info["error"] = f"unreadable DICOM header ({type(e).__name__})"
    return info


# ---------------------------------------------------------------------------------------------
# quick header parser: the common case (Part 10 file, explicit VR little endian, no
# functional-group sequences) read with struct instead of pydicom, which is most of the
# cost of a header scan. It hands _header_info the same raw element bytes pydicom would
# (RawDataElement-like VR/value), so the result is identical (tests/test_j2k.py compares both
# parsers on every pydicom test file); anything else raises _NotQuick -> pydicom.

FAST_SCAN = True
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_STOP_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # where pydicom's stop_before_pixels stops
# present -> pydicom (sequences and binary values _fast_getter does not decode)
# (DiffusionBValue (0018,9087) is read when it is one FD value: _fast_getter)
_QUICK_BAIL = {0x52009229, 0x52009230, 0x00431039, 0x0019100C}
_QUICK_READ = 1 << 16
_ELEM_HEAD = struct.Struct("<HH2sH")  # group, element, VR, 2-byte length (explicit VR LE)


class _NotQuick(Exception):
    pass


class _Raw:
    __slots__ = ("VR", "value")
    is_little_endian = True

    def __init__(self, vr, value):
        self.VR, self.value = vr, value


class _QuickDS:
    """The part of a pydicom Dataset that _header_info and the pixel locators use."""

    def __init__(self, elems, meta):
        self.elems, self.file_meta = elems, meta

    def get_item(self, tag):
        return self.elems[tag if isinstance(tag, int) else int(pydicom.tag.Tag(tag))]

    def get(self, keyword, default=None):  # only reached for values _fast_getter cannot decode
        tag = pydicom.datadict.tag_for_keyword(keyword)
        if tag is None or tag in self.elems:
            raise _NotQuick
        return default

    def __contains__(self, tag):
        return int(pydicom.tag.Tag(tag)) in self.elems


class _QuickMeta(dict):
    pass


def _quick_elements(buf, i, end_tag_stop):
    """Parse explicit VR little-endian elements from buf[i:]; -> ({tag: _Raw}, stop offset).
    Stops at group change (meta) or a pixel-data tag; sequences are skipped."""
    elems = {}
    n = len(buf)
    unpack = _ELEM_HEAD.unpack_from
    while i + 8 <= n:
        grp, el, vr, short = unpack(buf, i)
        tag = (grp << 16) | el
        if end_tag_stop(tag):
            return elems, i
        if vr in _LONG_VRS:
            if i + 12 > n:
                raise _NotQuick
            length, j = int.from_bytes(buf[i + 8:i + 12], "little"), i + 12
        else:
            if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
                raise _NotQuick  # not explicit VR
            length, j = short, i + 8
        if tag in _QUICK_BAIL:
            raise _NotQuick
        if length == 0xFFFFFFFF:
            if vr != b"SQ":
                raise _NotQuick
            j = _skip_undefined_sq(buf, j)
            elems[tag] = None  # present (a sequence), value not needed
            i = j
            continue
        if j + length > n:
            raise _NotQuick
        # values only of the elements read through _fast_getter; the rest are present (for
        # `in` and _QuickDS.get, which hands them to pydicom) but never looked at
        elems[tag] = _Raw(vr.decode("ascii"), buf[j:j + length]) if tag in _QUICK_VALUES and vr != b"SQ" else None
        i = j + length
    raise _NotQuick  # ran off the buffer before the pixel data


def _skip_undefined_sq(buf, i, depth=0):
    """Offset just past an undefined-length sequence starting at its first item."""
    if depth > 8:
        raise _NotQuick
    n = len(buf)
    while i + 8 <= n:
        tag, length = buf[i:i + 4], int.from_bytes(buf[i + 4:i + 8], "little")
        i += 8
        if tag == SEQ_DELIM_TAG:
            return i
        if tag != ITEM_TAG:
            raise _NotQuick
        if length != 0xFFFFFFFF:
            i += length
            continue
        while True:  # undefined-length item: elements until the item delimiter
            if i + 8 > n:
                raise _NotQuick
            if buf[i:i + 4] == b"\xfe\xff\x0d\xe0":
                i += 8
                break
            vr = buf[i + 4:i + 6]
            if vr in _LONG_VRS:
                ln, j = int.from_bytes(buf[i + 8:i + 12], "little"), i + 12
            elif 65 <= vr[0] <= 90 and 65 <= vr[1] <= 90:
                ln, j = int.from_bytes(buf[i + 6:i + 8], "little"), i + 8
            else:
                raise _NotQuick
            if ln == 0xFFFFFFFF:
                if vr != b"SQ":
                    raise _NotQuick
                i = _skip_undefined_sq(buf, j, depth + 1)
            else:
                i = j + ln
    raise _NotQuick


def _explicit_le(ts):
    return ts == "1.2.840.10008.1.2.1" or ts == "1.2.840.10008.1.2.5" or (
        ts.startswith("1.2.840.10008.1.2.4.") and ts != "1.2.840.10008.1.2.4.95")


def _scan_quick(path, info):
    with open(path, "rb") as fp:
        buf = fp.read(_QUICK_READ)
    if len(buf) < 144 or buf[128:132] != b"DICM":
        raise _NotQuick
    meta_elems, i = _quick_elements(buf, 132, lambda t: (t >> 16) != 0x0002)
    meta = _QuickMeta()
    for kw, tag in (("TransferSyntaxUID", 0x00020010), ("MediaStorageSOPClassUID", 0x00020002)):
        e = meta_elems.get(tag)
        if e is not None:
            meta[kw] = e.value.decode("latin-1").strip(" \x00")
    if not _explicit_le(meta.get("TransferSyntaxUID", "")):
        raise _NotQuick
    if meta.get("MediaStorageSOPClassUID", "") == "1.2.840.10008.1.3.10":
        raise SeriesError("DICOMDIR index file (not an image)")
    elems, pos = _quick_elements(buf, i, lambda t: t in _STOP_TAGS)
    if 0x00080016 not in elems and 0x0020000D not in elems:
        raise _NotQuick  # pydicom decides what this is
    ds = _QuickDS(elems, meta)
    info = _header_info(ds, info)
    hdr = buf[pos:pos + 12]
    _note_pixel_error(ds, info, pos, hdr, os.path.getsize(path))
    info["raw_pixels"] = _raw_pixel_location(ds, info, pos, hdr)
    info["j2k_pixels"] = _j2k_pixel_location(ds, info, pos, hdr)
    return info


NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit / explicit VR little endian
J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")  # JPEG 2000 lossless / lossy
PIXEL_TAG = b"\xe0\x7f\x10\x00"


def _pixel_bytes(rows, cols, frames, samples, bits_alloc):
    """Bytes of native (uncompressed) pixel data, without the even-length pad byte."""
    return (rows * cols * frames * samples * bits_alloc + 7) // 8


def _check_pixel_length(ds, info, pos, hdr, file_size):
    """Native pixel data must hold exactly Rows x Columns x frames x samples x BitsAllocated
    (plus one pad byte to an even length): a wrong Columns would read as a sheared, striped
    image and a wrong Rows as a cropped one. Raises SeriesError (a per-file failure)."""
    if info["transfer_syntax"] not in NATIVE_LE or len(hdr) < 8 or hdr[:4] != PIXEL_TAG:
        return
    if hdr[4:6] in (b"OW", b"OB"):
        if len(hdr) < 12:
            return
        length, start = int.from_bytes(hdr[8:12], "little"), pos + 12
    elif info["transfer_syntax"] == NATIVE_LE[0]:
        length, start = int.from_bytes(hdr[4:8], "little"), pos + 8
    else:
        return
    if length == 0xFFFFFFFF:  # encapsulated in a native syntax: pydicom's decode decides
        return
    if start + length > file_size:
        raise SeriesError("truncated file (pixel data cut short)")
    g = _fast_getter(ds)
    try:
        bits_alloc = int(g("BitsAllocated", 0) or 0)
    except (TypeError, ValueError):
        return
    rows, cols = info["rows"], info["cols"]
    if rows < 1 or cols < 1 or bits_alloc < 1:
        return  # reported as missing Rows/Columns when the series is read
    frames = info.get("legacy_multiframe") or len(info["frames"])
    need = _pixel_bytes(rows, cols, frames, info["samples"], bits_alloc)
    if length != need + (need % 2) and length != need:
        raise SeriesError("pixel data length does not match Rows x Columns x frames x samples x bits")


def _check_header_complete(ds, file_size):
    """A file that ends inside its header (pydicom keeps what it read, so it would look like
    a file missing StudyInstanceUID) -> SeriesError("truncated file ...")."""
    tags = list(ds.keys())
    if not tags:
        raise SeriesError("truncated file (header cut short)")
    raw = ds.get_item(tags[-1])
    tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
    # the last element must end exactly at the end of the file: past it, its value was cut;
    # short of it, the next element's header was (pydicom stops quietly on either)
    if tell is not None and length is not None and length != 0xFFFFFFFF and tell + length != file_size:
        raise SeriesError("truncated file (header cut short)")


def _note_pixel_error(ds, info, pos, hdr, file_size):
    """info["pixel_error"] = the reason the pixel data cannot be this header's image; the
    file keeps its place in its series, which fails with that reason when assembled.
    info["pixel_tag"]: the file has a Pixel Data element (so a read without one is a cut file)."""
    info["pixel_tag"] = len(hdr) >= 4 and hdr[:4] == PIXEL_TAG
    try:
        _check_pixel_length(ds, info, pos, hdr, file_size)
    except SeriesError as e:
        info["pixel_error"] = str(e)
    pr = info.get("pixel_representation")
    if info["pixel_tag"] and pr is None:  # read as unsigned, -1000 is 64536 (present: several values)
        what = "missing" if _fast_getter(ds)("PixelRepresentation", None) is None else "invalid"
        info.setdefault("pixel_error", f"{what} PixelRepresentation (signed or unsigned pixels unknown)")
    elif info["pixel_tag"] and pr not in (0, 1):  # read as signed: which one the writer meant is unknown
        info.setdefault("pixel_error", f"invalid PixelRepresentation {pr} (only 0 or 1 are defined)")
    bits, alloc = info.get("bits_stored"), _int_or_none(_fast_getter(ds)("BitsAllocated", None))
    if info["pixel_tag"] and (bits is None or alloc is None):  # Type 1: the sample layout is unknown
        info.setdefault("pixel_error", f"missing or invalid {'BitsAllocated' if alloc is None else 'BitsStored'}")
    elif info["pixel_tag"] and not 1 <= bits <= alloc:
        info.setdefault("pixel_error", f"invalid BitsStored {bits} (BitsAllocated {alloc})")
    high = _int_or_none(_fast_getter(ds)("HighBit", None))
    if info["pixel_tag"] and bits is not None and high is not None and high != bits - 1:
        # pydicom reads the low bits, other readers shift by HighBit: the stored layout is unknown
        info.setdefault("pixel_error", f"invalid HighBit {high} (BitsStored {bits}: must be {bits - 1})")
    pi = info["photometric"]
    if info["pixel_tag"] and info["samples"] == 1 and pi not in GREY_PHOTOMETRIC + COLOUR_PHOTOMETRIC:
        # read as MONOCHROME2 it could be inverted or a palette index; CS, yet only code characters are echoed
        code = re.sub(r"[^A-Z0-9_ ]", "", pi)[:16] or "other"
        info.setdefault("pixel_error", f"unknown PhotometricInterpretation {code}")
    if info["pixel_tag"] and info["samples"] == 1 and info["photometric"] in COLOUR_PHOTOMETRIC:
        # one sample of a colour image: grey, one channel or a palette index, the header does not say which
        info.setdefault("pixel_error", f"PhotometricInterpretation {info['photometric']} with SamplesPerPixel 1 "
                                       "(inconsistent header)")
    if info["pixel_tag"] and info.get("rescale_missing"):  # read as slope 1 / intercept 0, unsigned CT
        # (HU + 1024) would be 1024 HU too bright: brain as bone, no air
        info.setdefault("pixel_error", f"missing {info['rescale_missing']} (CT Hounsfield units unknown)")


# one-sample Photometric Interpretations (PALETTE COLOR: skipped as a colour image, skip_reason)
GREY_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")
# colour Photometric Interpretation defined terms (PS3.3 C.7.6.3.1.2), retired ones included
COLOUR_PHOTOMETRIC = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
                      "HSV", "ARGB", "CMYK")


def _raw_pixel_location(ds, info, pos, hdr):
    """(offset, dtype, bits_allocated, bits_stored) of uncompressed single-frame pixels that
    can be read with numpy directly (no second pydicom parse), else None."""
    g = _fast_getter(ds)
    try:
        bits_alloc, bits_stored = int(g("BitsAllocated", 0) or 0), int(g("BitsStored", 0) or 0)
        pr = int(g("PixelRepresentation", 0) or 0)
    except (TypeError, ValueError):
        return None
    if (info["transfer_syntax"] not in NATIVE_LE or len(hdr) < 12 or hdr[:4] != PIXEL_TAG
            or info["samples"] != 1 or len(info["frames"]) != 1 or info["frames"][0]["frame"] is not None
            or info.get("legacy_multiframe") or bits_alloc not in (8, 16) or not 0 < bits_stored <= bits_alloc):
        return None
    if hdr[4:6] in (b"OW", b"OB"):  # explicit VR: tag, VR, 2 reserved, 4-byte length
        length, offset = int.from_bytes(hdr[8:12], "little"), pos + 12
    elif info["transfer_syntax"] == NATIVE_LE[0]:  # implicit VR: tag, 4-byte length
        length, offset = int.from_bytes(hdr[4:8], "little"), pos + 8
    else:
        return None
    need = info["rows"] * info["cols"] * bits_alloc // 8
    if length == 0xFFFFFFFF or length < need:
        return None
    dtype = {(8, 0): "u1", (8, 1): "i1", (16, 0): "<u2", (16, 1): "<i2"}[(bits_alloc, 1 if pr else 0)]
    return (offset, dtype, bits_alloc, bits_stored)


def _j2k_pixel_location(ds, info, pos, hdr):
    """(offset of the first item, bits_stored, pixel_representation) of single-frame
    encapsulated JPEG 2000 pixels that `read_j2k_codestream` can read straight from the file,
    else None."""
    if (info["transfer_syntax"] not in J2K_SYNTAXES or len(hdr) < 12 or hdr[:4] != PIXEL_TAG
            or hdr[4:6] not in (b"OB", b"OW") or hdr[8:12] != b"\xff\xff\xff\xff" or info["samples"] != 1
            or len(info["frames"]) != 1 or info["frames"][0]["frame"] is not None or info.get("legacy_multiframe")
            or not info["photometric"].startswith("MONOCHROME")):
        return None
    g = _fast_getter(ds)
    try:
        bits_stored, pr = int(g("BitsStored", 0) or 0), int(g("PixelRepresentation", 0) or 0)
    except (TypeError, ValueError):
        return None
    if not 1 <= bits_stored <= 16:
        return None
    return (pos + 12, bits_stored, pr)


_TEXT_VRS = {"UI", "CS", "DS", "IS", "LO", "SH"}
_FAST_TAGS = {kw: pydicom.datadict.tag_for_keyword(kw) for kw in (
    "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "Modality", "ImageType",
    "SeriesDescription", "ProtocolName", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
    "EchoTime", "RepetitionTime", "InversionTime", "ContrastBolusAgent", "ScanningSequence", "NumberOfFrames",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "RescaleSlope", "RescaleIntercept",
    "EchoNumbers", "TemporalPositionIdentifier", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "DiffusionBValue", "ConvolutionKernel", "SliceThickness", "AcquisitionNumber", "RescaleType", "HighBit")}


_QUICK_VALUES = set(_FAST_TAGS.values()) | {0x00020010, 0x00020002}  # + TransferSyntaxUID, MediaStorageSOPClassUID


_ABSENT, _VIA_PYDICOM = object(), object()


def _fast_getter(ds):
    """ds.get(keyword, default) that decodes common explicit-VR text, US and single FD
    elements from the raw bytes (pydicom's element conversion is half the cost of a header
    scan); anything else, including implicit-VR files, goes through ds.get. Values are str,
    a list of str for multi-valued text (like pydicom's MultiValue), int for US, float for
    FD; each element is decoded once per dataset (callers never modify the values)."""
    memo = {}

    def parse(tag):
        try:
            raw = ds.get_item(tag)
        except KeyError:
            return _ABSENT
        if raw is None:
            return _ABSENT
        vr, val = getattr(raw, "VR", None), getattr(raw, "value", None)
        if not isinstance(val, bytes) or vr not in _TEXT_VRS and vr != "US" and vr != "FD":
            return _VIA_PYDICOM
        if vr == "FD":  # one double (pydicom: a float); anything else through pydicom
            if len(val) != 8:
                return _VIA_PYDICOM
            return struct.unpack("<d" if raw.is_little_endian else ">d", val)[0]
        if vr == "US":
            if len(val) != 2:
                return _VIA_PYDICOM
            return int.from_bytes(val, "little" if raw.is_little_endian else "big")
        text = val.decode("latin-1").strip(" \x00")
        if text == "":
            return _ABSENT
        parts = [x.strip(" \x00") for x in text.split("\\")]
        return parts if len(parts) > 1 else parts[0]

    def get(keyword, default=None):
        tag = _FAST_TAGS.get(keyword)
        if tag is None:
            return ds.get(keyword, default)
        v = memo.get(tag)
        if v is None:
            v = memo[tag] = parse(tag)
        if v is _ABSENT:
            return default
        if v is _VIA_PYDICOM:
            return ds.get(keyword, default)
        return v
    return get


def _header_info(ds, info):
    g = _fast_getter(ds)
    meta = getattr(ds, "file_meta", None)
    info.update(
        study_uid=str(g("StudyInstanceUID", "") or ""),
        series_uid=str(g("SeriesInstanceUID", "") or ""),
        sop_class=str(g("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else "")),
        sop_uid=str(g("SOPInstanceUID", "") or ""),
        modality=str(g("Modality", "") or "").upper(),
        image_type=[str(x).upper() for x in (g("ImageType", None) or [])],
        description=str(g("SeriesDescription", "") or ""),
        protocol=str(g("ProtocolName", "") or ""),
        rows=int(g("Rows", 0) or 0), cols=int(g("Columns", 0) or 0),
        samples=int(g("SamplesPerPixel", 1) or 1),
        photometric=str(g("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").upper(),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta else "",
        te=_num(g("EchoTime", None)), tr=_num(g("RepetitionTime", None)), ti=_num(g("InversionTime", None)),
        contrast=bool(str(g("ContrastBolusAgent", "") or "").strip()),
        scanning_sequence=" ".join(str(x) for x in (g("ScanningSequence", None) or [])),
        # the stored pixel type (dicom_stack: the pixel type SimpleITK reads the series as)
        bits_stored=_int_or_none(g("BitsStored", None)),
        pixel_representation=_int_or_none(g("PixelRepresentation", None)),
    )
    if isinstance(g("ImageType", None), str):
        info["image_type"] = [x.upper() for x in str(g("ImageType")).split("\\")]
    if isinstance(g("ScanningSequence", None), str):
        info["scanning_sequence"] = str(g("ScanningSequence"))
    nframes = int(_num(g("NumberOfFrames", 1), 1) or 1)
    frames = []
    pffg = g("PerFrameFunctionalGroupsSequence", None)
    shared = g("SharedFunctionalGroupsSequence", None)
    shared = shared[0] if shared else None
    if pffg is not None or shared is not None:  # enhanced multi-frame
        items = list(pffg) if pffg is not None else [None] * nframes
        if not items:  # no frame records: the file would join no series and vanish from the counts
            raise SeriesError("enhanced multi-frame object with no frames")
        if pffg is not None and g("NumberOfFrames", None) is None:  # Type 1: pixels would decode as one frame
            info.setdefault("pixel_error", f"missing NumberOfFrames (per-frame functional groups {len(items)})")
        if pffg is not None and g("NumberOfFrames", None) is not None and len(items) != nframes:
            # pixels decode to NumberOfFrames frames: some would have no geometry (dropped unsaid)
            info.setdefault("pixel_error", f"frame count differs: NumberOfFrames {nframes}, "
                                           f"per-frame functional groups {len(items)}")
        top_te = info["te"]
        if not info["contrast"] and g("ContrastBolusAgentSequence", None):
            # the Enhanced Contrast/Bolus module (present when contrast was used) replaces the classic
            # ContrastBolusAgent text; frames may say the agent was not (yet) administered
            said = {str(v).strip(" \x00").upper() for v in (
                _fg(item, shared, "ContrastBolusUsageSequence", "ContrastBolusAgentAdministered") for item in items)
                if v is not None}
            info["contrast"] = not said or "YES" in said
        # outside the functional groups, where an enhanced IOD does not define them, yet unambiguous
        top_rescale = {k: g(k, None) for k in ("RescaleSlope", "RescaleIntercept")}
        for f, item in enumerate(items):
            _check_rescale_type(_fg(item, shared, "PixelValueTransformationSequence", "RescaleType"), info)
            slope, intercept = (_fg(item, shared, "PixelValueTransformationSequence", k) for k in top_rescale)
            slope = top_rescale["RescaleSlope"] if slope is None else slope
            intercept = top_rescale["RescaleIntercept"] if intercept is None else intercept
            if info["modality"] == "CT" and (slope is None or intercept is None):  # as a classic CT's, below
                info.setdefault("rescale_missing", "RescaleIntercept" if intercept is None else "RescaleSlope")
            echo = _num(_fg(item, shared, "MREchoSequence", "EffectiveEchoTime"))
            if info["te"] is None:
                info["te"] = echo
            tr = _num(_fg(item, shared, "MRTimingAndRelatedParametersSequence", "RepetitionTime"))
            ti = _num(_fg(item, shared, "MRModifierSequence", "InversionTimes"))
            frames.append(dict(
                frame=f,
                **_geometry({t: _fg(item, shared, sq, t) for sq, t in (
                    ("PlanePositionSequence", "ImagePositionPatient"),
                    ("PlaneOrientationSequence", "ImageOrientationPatient"),
                    ("PixelMeasuresSequence", "PixelSpacing"))}),
                slope=_rescale(slope, 1.0, "RescaleSlope", info),
                intercept=_rescale(intercept, 0.0, "RescaleIntercept", info),
                echo=echo,
                te=top_te if echo is None else echo, tr=info["tr"] if tr is None else tr,
                ti=info["ti"] if ti is None else ti,
                bvalue=_num(_fg(item, shared, "MRDiffusionSequence", "DiffusionBValue")),
                temporal=_num(_fg(item, shared, "FrameContentSequence", "TemporalPositionIndex")),
                kernel=_kernel(_fg(item, shared, "CTReconstructionSequence", "ConvolutionKernel")),
                thickness=_num(_fg(item, shared, "PixelMeasuresSequence", "SliceThickness")),
                acquisition=_num(_fg(item, shared, "FrameContentSequence", "FrameAcquisitionNumber")),
            ))
    else:
        bval = _num(g("DiffusionBValue", None))
        if bval is None:  # GE and Siemens private b-value tags
            for tag in ((0x0043, 0x1039), (0x0019, 0x100C)):
                if tag in ds:
                    bval = _num(ds[tag].value if not isinstance(ds[tag].value, bytes) else None)
                    break
        base = dict(
            **_geometry({t: g(t, None) for t, _, _, _ in _GEOMETRY}),
            slope=_rescale(g("RescaleSlope", None), 1.0, "RescaleSlope", info),
            intercept=_rescale(g("RescaleIntercept", None), 0.0, "RescaleIntercept", info),
            echo=_num(g("EchoNumbers", None)), te=info["te"], tr=info["tr"], ti=info["ti"], bvalue=bval,
            temporal=_num(g("TemporalPositionIdentifier", None)),
            kernel=_kernel(g("ConvolutionKernel", None)), thickness=_num(g("SliceThickness", None)),
            acquisition=_num(g("AcquisitionNumber", None)),
        )
        _check_rescale_type(g("RescaleType", None), info)
        if info["modality"] == "CT":  # both Type 1 in the CT Image module (enhanced CT: functional groups)
            missing = [k for k in ("RescaleIntercept", "RescaleSlope") if g(k, None) is None]
            if missing:  # _note_pixel_error fails the file's series when it has pixels
                info["rescale_missing"] = missing[0]
        if nframes == 1:
            frames.append(dict(base, frame=None))
        else:  # legacy multi-frame without functional groups: no per-frame geometry
            info["legacy_multiframe"] = nframes
            frames.append(dict(base, frame=None))
    info["frames"] = frames
    return info


# ---------------------------------------------------------------------------------------------
# grouping and skip rules


def skip_reason(h):
    """Why a (file's) series is not an image volume we ingest, or None to keep it."""
    sop = h.get("sop_class", "")
    if sop.startswith(NON_IMAGE_SOP_PREFIXES):
        return "non-image SOP class"
    if h.get("modality") not in ("CT", "MR"):
        return f"unsupported modality {re.sub(r'[^A-Z0-9]', '', h.get('modality', ''))[:8] or 'none'}"
    if sop and sop not in IMAGE_SOP_CLASSES:
        return "unsupported SOP class"
    it = h.get("image_type", [])
    if "LOCALIZER" in it or LOCALIZER_RE.search(h.get("description", "")):
        return "localizer/scout"
    if it and it[0] == "DERIVED":
        kinds = [t for t in it[2:] if t in DERIVED_SKIP]
        if kinds and not any(t in ("ADC", "TRACEW", "TRACE", "EADC") for t in it):
            return f"derived map ({kinds[0]})"
    # PALETTE COLOR has one sample per pixel: an index into the palette, not an intensity
    if h.get("samples", 1) != 1 or h.get("photometric") == "PALETTE COLOR":
        return "colour image"
    if h.get("legacy_multiframe"):
        return "multi-frame object without per-frame geometry"
    return None


def _frame_key(h, fr):
    return (h["rows"], h["cols"], fr["ps"], fr["iop"], fr["echo"], fr["bvalue"], fr["temporal"])


def _same_key(a, b):
    if a[0:2] != b[0:2] or a[4:] != b[4:]:
        return False
    if a[2] is None or b[2] is None or a[3] is None or b[3] is None:
        return a[2] == b[2] and a[3] == b[3]
    return _close(a[2], b[2]) and _same_plane(a[3], b[3])


_PLANE_CHORD2 = (2 * math.sin(math.radians(IOP_PLANE_DEG) / 2)) ** 2


def _same_plane(x, y):
    """Whether two ImageOrientationPatient 6-tuples have row and column directions within
    IOP_PLANE_DEG of each other (chord between the direction cosines; plain Python, as _close)."""
    return (sum((u - v) ** 2 for u, v in zip(x[:3], y[:3])) <= _PLANE_CHORD2
            and sum((u - v) ** 2 for u, v in zip(x[3:], y[3:])) <= _PLANE_CHORD2)


def slice_orientation(iops):
    """ImageOrientationPatient 6-tuples of the slices of one volume -> (the volume's
    orientation (6-tuple), largest angle in degrees between a slice's row or column direction
    and the volume's, index of that slice).

    Identical orientations (the common case) give the first one exactly. Otherwise the volume
    takes the mean row and column directions, and a slice that is off by at most IOP_JITTER_DEG
    (0.25 deg, 4.4e-3 rad) moves none of its pixels by more than 1.1 mm over a 250 mm field of
    view when placed with it: under one 1 mm output voxel. That covers rounding and float noise
    in exports (1e-6 to 1e-4; dcm2niix stacks slices within 1e-4 per cosine, SimpleITK takes
    the first slice's orientation without a check) and small per-slice jitter (2e-3); more
    means slices that are not parallel, which dicom_stack refuses."""
    if all(v == iops[0] for v in iops):
        return tuple(iops[0]), 0.0, 0
    a = np.asarray(iops, float).reshape(-1, 2, 3)
    mean = a.mean(axis=0)  # unnormalised: SliceStack still rejects a non-unit ImageOrientationPatient
    unit = a / np.linalg.norm(a, axis=2, keepdims=True)
    ref = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    ang = np.degrees(np.arccos(np.clip(np.einsum("kij,ij->ki", unit, ref), -1.0, 1.0))).max(axis=1)
    k = int(np.argmax(ang))
    return tuple(float(x) for x in mean.ravel()), float(ang[k]), k


# per-frame tags that tell apart slice stacks exported under one SeriesInstanceUID (two
# reconstructions or acquisitions), in the order tried: (frame record key, DICOM keyword)
STACK_TAGS = (("kernel", "ConvolutionKernel"), ("thickness", "SliceThickness"), ("acquisition", "AcquisitionNumber"))


# acquisition timing that tells apart contrasts exported under one SeriesInstanceUID (T1 and T2,
# the two echoes of a dual-echo series without EchoNumbers, FLAIR and T2): (frame record key,
# DICOM keyword, absolute ms, relative tolerance). TE and TI are constant within an acquisition
# and reported to 0.01-1 ms, while echoes and inversion times of different acquisitions differ by
# milliseconds at least: 1 ms. TR is relative: triggered (cardiac / respiratory gated) sequences
# report each slice's own TR, following the RR or breathing interval, which drifts gradually,
# while acquisitions that differ only in TR differ by a factor (T1 SE 500 vs PD 2000 ms): 25%.
TIMING_TAGS = (("te", "EchoTime", 1.0, 0.0), ("ti", "InversionTime", 1.0, 0.0), ("tr", "RepetitionTime", 1.0, 0.25))


def _timing_groups(values, atol, rtol):
    """{value: group index} for the distinct values of one timing tag over a series: sorted, a
    value more than atol + rtol x the previous one above it starts a new group (a continuous
    spread, e.g. gated TRs, stays one group)."""
    out, g, prev = {}, 0, None
    for v in sorted(set(values)):
        if prev is not None and v - prev > atol + rtol * prev:
            g += 1
        out[v] = g
        prev = v
    return out


def _timing_key(frames):
    """-> (function (header, frame) -> tuple of timing group indices, list of the keywords of
    TIMING_TAGS that part the frames). A frame without the tag rules that tag out, as a file
    whose header lacks it may well be of either acquisition."""
    maps = []
    for key, keyword, atol, rtol in TIMING_TAGS:
        vals = [fr.get(key) for _, fr in frames]
        if not vals or any(v is None for v in vals):
            continue
        groups = _timing_groups(vals, atol, rtol)
        if max(groups.values()) > 0:
            maps.append((key, keyword, groups))
    return (lambda h, fr: tuple(m.get(fr.get(key)) for key, _, m in maps)), [keyword for _, keyword, _ in maps]


def alternating_gaps(d, min_run=5):
    """(short gap, long gap, k) mm when the sorted slice positions d (mm) hold a run of at least
    min_run gaps alternating between two clearly different values (the shorter < 0.75 x the
    longer and >= 0.2 mm shorter; each gap within 0.1 mm + 5% of its value); k: the run's first
    gap. Such positions are two slice stacks of one period offset from each other, merged
    (z = 0, 5, 10, ... and 0.5, 5.5, 10.5, ...). Else None: one missing slice (one long gap),
    gaps that differ by the rounding of positions (2.5 / 2.6 mm) and other non-uniform spacing."""
    g = np.diff(np.asarray(d, float))
    for i in range(len(g) - min_run + 1):
        a, b = float(g[i]), float(g[i + 1])
        if min(a, b) >= 0.75 * max(a, b) or abs(a - b) < 0.2:
            continue
        j = i + 2
        while j < len(g) and abs(g[j] - (a, b)[(j - i) % 2]) <= 0.1 + 0.05 * (a, b)[(j - i) % 2]:
            j += 1
        if j - i >= min_run:
            return min(a, b), max(a, b), i
    return None


def _interleaved(positions):
    """True when two of the sorted position arrays (mm along the normal) each have >= 2
    slices strictly inside the other's span: stacks covering one range, not blocks one above
    the other (a thin posterior-fossa block under a thick cerebrum block, sequential rotations)."""
    def inside(x, y):
        return int(np.sum((x > y[0] + MIN_GAP_MM) & (x < y[-1] - MIN_GAP_MM)))
    return any(inside(x, y) >= 2 and inside(y, x) >= 2
               for i, x in enumerate(positions) for y in positions[i + 1:])


def _split_stacks(frames):
    """Frames [(header, frame)] of one cluster -> (list of frame lists, DICOM keyword or None).

    Splits by the first of STACK_TAGS whose values part the frames into stacks of >= 3 slices
    that interleave along the normal (_interleaved): two reconstructions (another kernel or
    slice thickness) or acquisitions exported as one series. Tags that vary within one volume
    do not split it: SliceThickness and ConvolutionKernel differing between blocks one above the
    other, and AcquisitionNumber, which scanners set per slice, rotation or concatenation, so it
    splits only where the merged positions are two offset stacks already (alternating_gaps),
    as dcm2niix stacks slices despite varying acquisition numbers. A frame without the tag
    rules that tag out."""
    if len(frames) < 6 or any(fr["ipp"] is None or fr["iop"] is None for _, fr in frames):
        return [frames], None
    pos = None
    for key, keyword in STACK_TAGS:
        vals = [fr.get(key) for _, fr in frames]
        if any(v is None for v in vals):
            continue
        if key == "thickness":
            vals = [round(v, 3) for v in vals]
        values = sorted(set(vals))
        if len(values) < 2:  # the common case: decided without numpy
            continue
        if pos is None:
            iop = frames[0][1]["iop"]
            pos = np.array([fr["ipp"] for _, fr in frames]) @ np.cross(iop[:3], iop[3:])
        idx = [[i for i, v in enumerate(vals) if v == u] for u in values]
        if min(len(ix) for ix in idx) < 3 or not _interleaved([np.sort(pos[ix]) for ix in idx]):
            continue
        if key == "acquisition" and alternating_gaps(np.sort(pos)) is None:
            continue
        return [[frames[i] for i in ix] for ix in idx], keyword
    return [frames], None


def _strays_into_holes(clusters):
    """Clusters [key, frames] of one series -> (the clusters with each stray merged into the
    larger cluster it sits in, set of (path, frame) of the strays merged, {index into the clusters
    returned of a stray left apart: (index of the largest cluster it is like, whether all its
    slices lie beyond that cluster's ends)}). A stray: a cluster of
    < 3 frames (too few for a volume of its own, as _split_stacks' stacks) that differs from a cluster of >= 3 only in matrix size or PixelSpacing (other, missing or
    malformed) or a missing ImageOrientationPatient (its key from the echo on equal, the same
    plane), and has a slice strictly inside that cluster's span at a position no cluster of >= 3
    in that plane holds, or has a slice without ImagePositionPatient (it cannot be placed, so it may
    lie in a hole). Apart, that cluster would load with a gap where a file of the series lies,
    interpolated across; merged, dicom_stack fails it naming the file. A stray beyond the ends,
    or at a position held, stays apart (the volume is then only shorter: dicom_stack says so)."""
    order = sorted(range(len(clusters)), key=lambda i: -len(clusters[i][1]))
    into, apart = {}, {}  # stray index -> index of the cluster it joins / (the one it is like, beyond its ends)
    for s in order[::-1]:
        key, frames = clusters[s]
        if len(frames) >= 3:
            continue
        like = [i for i in order if i != s and len(clusters[i][1]) >= 3 and clusters[i][0][4:] == key[4:]
                and clusters[i][0][3] is not None and (key[3] is None or _same_plane(key[3], clusters[i][0][3]))
                and all(fr["ipp"] is not None for _, fr in clusters[i][1])]
        if like and any(fr["ipp"] is None for _, fr in frames):  # cannot be placed, so may lie in a hole: it
            into[s] = like[0]   # fails the series as a slice of it without ImagePositionPatient does
            continue
        for b in like:  # largest first
            iop = clusters[b][0][3]
            n = np.cross(iop[:3], iop[3:])
            span = np.sort([np.dot(fr["ipp"], n) for _, fr in clusters[b][1]])
            held = np.array([np.dot(fr["ipp"], n) for i in like if _same_plane(clusters[i][0][3], iop)
                             for _, fr in clusters[i][1]])
            pos = [np.dot(fr["ipp"], n) for _, fr in frames]
            if any(span[0] + MIN_GAP_MM < p < span[-1] - MIN_GAP_MM and np.abs(held - p).min() >= MIN_GAP_MM
                   for p in pos):
                into[s] = b
                break
            if b == like[0]:  # beyond the ends of the largest, at no position held: that volume is shorter
                apart[s] = (b, all((p < span[0] - MIN_GAP_MM or p > span[-1] + MIN_GAP_MM)
                                   and np.abs(held - p).min() >= MIN_GAP_MM for p in pos))
    for s, b in into.items():
        clusters[b][1].extend(clusters[s][1])
        apart.pop(s, None)
    strays = {(h["path"], fr["frame"]) for s in into for h, fr in clusters[s][1]}
    kept = [i for i in range(len(clusters)) if i not in into]
    apart = {kept.index(s): (kept.index(b), beyond) for s, (b, beyond) in apart.items()}
    return [clusters[i] for i in kept], strays, apart


def _close(x, y):
    """np.allclose(x, y, atol=1e-3) of two equal-length tuples of finite floats, in plain
    Python (the same float64 test |x - y| <= atol + rtol |y|; numpy's call overhead made
    grouping a visible part of a header scan)."""
    return len(x) == len(y) and all(abs(u - v) <= 1e-3 + 1e-5 * abs(v) for u, v in zip(x, y))


_PLANE_NAMES = ("sagittal", "coronal", "axial")  # by the largest LPS component of the slice normal


def _planes(clusters):
    """The slice planes of one series' clusters ([key, frames], key[3] its ImageOrientationPatient)
    -> (list of [plane name ("axial", "oblique coronal", ...; None for a single plane), number of
    slices] largest first, each cluster's index into it or None where its orientation is missing).
    Orientations within IOP_PLANE_DEG are one plane."""
    reps, counts, of = [], [], []
    for key, frames in clusters:
        iop = key[3]
        if iop is None:
            of.append(None)
            continue
        i = next((i for i, r in enumerate(reps) if _same_plane(r, iop)), len(reps))
        if i == len(reps):
            reps.append(iop)
            counts.append(0)
        counts[i] += len(frames)
        of.append(i)
    names = [None] * len(reps)
    for k, r in enumerate(reps if len(reps) > 1 else ()):  # named only to tell planes apart
        n = [abs(r[1] * r[5] - r[2] * r[4]), abs(r[2] * r[3] - r[0] * r[5]), abs(r[0] * r[4] - r[1] * r[3])]
        axis = n.index(max(n))  # "oblique" when the normal is more than IOP_PLANE_DEG off that axis
        tilted = n[axis] < math.hypot(*n) * math.cos(math.radians(IOP_PLANE_DEG))
        names[k] = ("oblique " if tilted else "") + _PLANE_NAMES[axis]
    rank = sorted(range(len(reps)), key=lambda i: -counts[i])
    pos = {i: k for k, i in enumerate(rank)}
    return [[names[i], counts[i]] for i in rank], [None if i is None else pos[i] for i in of]


def plane_phrase(planes):
    """[[plane name, slices], ...] -> "6 axial, 2 sagittal, 1 coronal"."""
    return ", ".join(f"{n} {name}" for name, n in planes)


def _part_info(frames):
    """The header dict that describes a part (its `info`: mr_family reads te / tr / ti from it): its
    first file's, with an enhanced object's timing taken from the part's first frame, as the file's
    top level has none (EchoTime, RepetitionTime, InversionTime live in its functional groups) and
    the echoes of a multi-echo file are parts of their own."""
    h, fr = frames[0]
    if fr.get("frame") is None:
        return h
    return dict(h, te=fr.get("te"), tr=fr.get("tr"), ti=fr.get("ti"))


def group_series(headers):
    """Group header dicts of one study into candidate volumes.

    Returns (groups, skipped): groups is a list of dicts {series_uid, part, headers info of
    the first file as `info`, frames: list of (path, frame record), planes: [[plane name, slices]]
    when the series mixes slice orientations else None, whole_plane: the part is all of its plane's
    slices, strays: {(path, frame)} of the series' slices merged into a part from between its slices
    (_strays_into_holes; dicom_stack fails that part naming the file), left_out: slices of strays
    beyond this part's ends, left apart, apart: for such a stray's part {n slices, rows, cols, ps of
    the volume it is like, beyond: it lies beyond that volume's ends} else None (dicom_stack words
    the reasons), ...} in a deterministic order;
    skipped is a list of (series_uid, n_files, reason, path of the (first) skipped file).
    """
    by_series = {}
    for h in headers:
        by_series.setdefault(h["series_uid"], []).append(h)
    groups, skipped = [], []
    for suid in sorted(by_series):
        hs = sorted(by_series[suid], key=lambda h: h["path"])
        # one skip decision per series, from the majority of files (a stray SR in an image
        # series is skipped on its own below)
        reasons = [skip_reason(h) for h in hs]
        keep = [h for h, r in zip(hs, reasons) if r is None]
        for h, r in zip(hs, reasons):
            if r is not None and keep:
                skipped.append((suid, 1, r, h["path"]))
        if not keep:
            skipped.append((suid, len(hs), reasons[0], hs[0]["path"]))
            continue
        timing, timing_tags = _timing_key([(h, fr) for h in keep for fr in h["frames"]])
        for i, h in enumerate(keep):
            if not h["frames"]:  # never dropped unsaid: a volume of its own, which fails with this reason
                keep[i] = dict(h, pixel_error=h.get("pixel_error") or "enhanced multi-frame object with no frames",
                               frames=[dict(frame=None, ipp=None, iop=None, ps=None, slope=1.0, intercept=0.0,
                                            echo=None, bvalue=None, temporal=None, kernel=None, thickness=None,
                                            acquisition=None)])
        clusters = []  # [key, frames]
        for h in keep:
            for fr in h["frames"]:
                k = _frame_key(h, fr) + (timing(h, fr),)
                for c in clusters:
                    if _same_key(c[0], k):
                        c[1].append((h, fr))
                        break
                else:
                    clusters.append([k, [(h, fr)]])
        clusters, strays, apart = _strays_into_holes(clusters)
        # acquisitions with other TE / TI / TR that the other keys would have stacked together
        # (another contrast under this series UID, a dual-echo series without EchoNumbers): say so
        by_timing = bool(timing_tags) and any(a[0][-1] != b[0][-1] and _same_key(a[0][:-1], b[0][:-1])
                                        for i, a in enumerate(clusters) for b in clusters[i + 1:])
        n_timing = len({c[0][-1] for c in clusters if None not in c[0][-1]})
        # parts that differ only in pixel spacing or matrix size are one acquisition cut apart
        # (each part then has gaps where the others' slices were): say so; a stray left apart
        # (_strays_into_holes) cuts nothing apart, its volume is only shorter (said below)
        rest = [c for i, c in enumerate(clusters) if i not in apart]
        by_geometry = len(rest) > 1 and len({(c[0][3], c[0][4:]) for c in rest}) < len(rest)
        left_out = {}  # cluster index -> slices of strays beyond its ends
        for s, (b, beyond) in apart.items():
            left_out[b] = left_out.get(b, 0) + len(clusters[s][1]) * beyond
        planes, plane_of = _planes(clusters)
        parts = []  # (frames, tag that split its cluster into stacks, number of those stacks, its plane, cluster)
        for i, ((_, frames), plane) in enumerate(zip(clusters, plane_of)):
            stacks, tag = _split_stacks(frames)
            parts.extend((f, tag, len(stacks), plane, i) for f in stacks)
        parts.sort(key=lambda p: -len(p[0]))  # largest first: part 0 is the main volume
        for part, (frames, tag, n_stacks, plane, i) in enumerate(parts):
            like = clusters[apart[i][0]] if i in apart else None
            groups.append(dict(series_uid=suid, part=part, n_parts=len(parts), info=_part_info(frames), frames=frames,
                               split_by_geometry=by_geometry, split_by_tag=tag, n_stacks=n_stacks,
                               split_by_timing=", ".join(timing_tags) if by_timing else None, n_timing=n_timing,
                               planes=planes if len(planes) > 1 else None,
                               whole_plane=plane is not None and len(frames) == planes[plane][1],
                               strays=strays, left_out=left_out.get(i, 0),
                               apart=dict(n=len(like[1]), rows=like[0][0], cols=like[0][1], ps=like[0][2],
                                          beyond=apart[i][1]) if like else None))
    return groups, skipped


# ---------------------------------------------------------------------------------------------
# slice stacks


class SliceStack:
    """One sub-volume as a stack of parallel slices sorted along the normal.

    Attributes (LPS mm): r, c, n (unit vectors), ps (row spacing along c, column spacing
    along r), shape (K, R, C), d (K,) slice positions along n relative to slice 0,
    shear (K, 2) in-plane offsets of each slice origin along (c, r) (gantry tilt), o0 origin
    of slice 0, modality, photometric, tilt_deg. `slice(k)` -> float32 (R, C).
    """

    def __init__(self, origins, r, c, ps, shape_rc, loader, modality, photometric="MONOCHROME2", extent=None,
                 native_ps=None):
        r = np.asarray(r, float)
        c = np.asarray(c, float)
        if not _orthonormal(tuple(r) + tuple(c)):
            raise SeriesError("invalid ImageOrientationPatient (not orthonormal)")
        r /= np.linalg.norm(r)
        c = c - (c @ r) * r
        c /= np.linalg.norm(c)
        self.r, self.c, self.n = r, c, np.cross(r, c)
        self.ps = (float(ps[0]), float(ps[1]))
        if not all(MIN_PIXEL_MM <= p <= MAX_PIXEL_MM for p in self.ps):
            raise SeriesError(f"absurd pixel spacing ({self.ps[0]:.3g} x {self.ps[1]:.3g} mm)")
        R, C = shape_rc
        if not (1 <= R <= MAX_MATRIX and 1 <= C <= MAX_MATRIX):
            raise SeriesError(f"absurd matrix size ({R} x {C})")
        origins = np.asarray(origins, float)
        order = np.argsort(origins @ self.n, kind="stable")
        self.order = order  # sorted index -> loader index
        self.origins = origins[order]
        self.o0 = self.origins[0]
        rel = self.origins - self.o0
        self.d = rel @ self.n
        self.shear = np.stack([rel @ self.c, rel @ self.r], axis=1)
        self.loader = loader
        self.modality = modality
        self.photometric = photometric
        self.shape = (len(order), R, C)
        self.tilt_deg = 0.0
        self.dropped_duplicates = 0
        # in-plane extent (mm along c, r) of the acquired image, and its pixel spacing: for a
        # reduced-resolution decode the samples cover a little less than the acquired image
        # (pixel 2i of the full image is sample i), and the output grid uses the acquired one
        self.extent = tuple(float(x) for x in extent) if extent is not None else ((R - 1) * self.ps[0],
                                                                                  (C - 1) * self.ps[1])
        self.native_ps = tuple(float(x) for x in native_ps) if native_ps is not None else self.ps
        self.notes = []
        self.warnings = []  # PHI-free phrases: written to the volume record and logged
        self.paths = None
        # a part of a series split by pixel spacing / matrix size: its gaps alternate where the
        # other parts' slices were (one acquisition cut apart, warned), not a second stack
        self.cut_apart = False
        # why a part has few slices (a plane of a series mixing orientations), for check()'s reason
        self.few_slices_why = None
        self.reduced = False
        self.finite = False  # True: the loader guarantees finite values (volume.py skips its check)
        # the pixel type (numpy dtype name) SimpleITK reads the input as, set by dicom_stack /
        # nifti_stack: resampled_neurovfm truncates and clamps to it as ITK does; None: unknown
        self.itk_pixel_type = None

    def slice(self, k):
        return self.loader(int(self.order[k]))

    def path_of(self, k):
        """Relative path of the file holding sorted slice k (None when not from files)."""
        return self.paths[int(self.order[k])] if self.paths else None

    def check(self, min_slices=3):
        """Validate slice positions; drops identical duplicates, raises SeriesError."""
        K = len(self.d)
        if K < min_slices:
            if self.few_slices_why:
                raise SeriesError(f"{'single slice' if K == 1 else f'too few slices ({K})'} {self.few_slices_why}")
            raise SeriesError("single-slice series" if K == 1 else f"too few slices ({K})")
        gaps = np.diff(self.d)
        dup = np.nonzero(gaps < MIN_GAP_MM)[0]
        if len(dup):
            drop = []
            for k in dup:  # identical pixels at one position: a copied file; else a conflict
                if np.array_equal(self.slice(k), self.slice(k + 1)):
                    drop.append(k + 1)
                else:
                    raise SeriesError("conflicting slices at the same position (4D, multi-echo or duplicate series)",
                                      self.path_of(k + 1))
            keep = np.setdiff1d(np.arange(K), drop)
            self.order, self.origins = self.order[keep], self.origins[keep]
            self.d, self.shear = self.d[keep], self.shear[keep]
            self.shape = (len(keep),) + self.shape[1:]
            self.dropped_duplicates = len(drop)
            if len(keep) < min_slices:
                raise SeriesError(f"too few slices ({len(keep)}) after removing duplicates")
            gaps = np.diff(self.d)
        if self.shape[0] > MAX_SLICES:
            raise SeriesError(f"absurd slice count ({self.shape[0]})")
        med = float(np.median(gaps))
        if med > MAX_GAP_MM:
            raise SeriesError(f"absurd slice spacing ({med:.3g} mm)")
        # before the gap rules, which would take the other stack's slices for missing ones
        alt = None if self.cut_apart else alternating_gaps(self.d)
        if alt is not None:
            raise SeriesError(f"two interleaved slice stacks (gaps alternate {alt[0]:.3g} / {alt[1]:.3g} mm)",
                              self.path_of(alt[2] + 1))
        limit = max(2.5 * med, 10.0)
        if gaps.max() > limit:
            raise SeriesError(f"missing slices (gap {gaps.max():.1f} mm > {limit:.1f} mm)",
                              self.path_of(int(np.argmax(gaps)) + 1))
        if gaps.max() > 1.5 * med:  # under the limit: interpolated, but the user must know
            self.warnings.append(f"interpolated across a {gaps.max():.1f} mm gap (median {med:.1f} mm): "
                                 "slice(s) missing")
        # gantry tilt: slice origins drift in-plane linearly with position
        if K > 1 and self.d[-1] > 0:
            drift = np.linalg.norm(self.shear[-1]) / self.d[-1]
            self.tilt_deg = float(np.degrees(np.arctan(drift)))
            if self.tilt_deg > MAX_TILT_DEG:
                raise SeriesError(f"gantry tilt too large ({self.tilt_deg:.0f} deg)")
        return self

    @property
    def spacing(self):
        """(slice gap median, row spacing, column spacing) mm, as acquired."""
        g = np.diff(self.d)
        return (float(np.median(g)) if len(g) else 0.0, self.native_ps[0], self.native_ps[1])

    @property
    def uniform(self):
        g = np.diff(self.d)
        return bool(len(g) == 0 or np.ptp(g) <= 1e-3 * max(1.0, g.mean()))

    def native_affine(self):
        """4x4 native voxel (k, i, j) -> RAS world mm (exact for uniform spacing; for a tilted
        stack column 0 is the sheared slice step, as dcm2niix writes before tilt correction)."""
        K = self.shape[0]
        step = (self.origins[-1] - self.o0) / (K - 1) if K > 1 else self.n
        A = np.eye(4)
        A[:3, 0] = step
        A[:3, 1] = self.c * self.ps[0]  # of the samples held (twice native for a reduced decode)
        A[:3, 2] = self.r * self.ps[1]
        A[:3, 3] = self.o0
        return LPS_TO_RAS @ A

    def assemble(self):
        """(K, R, C) float32 native volume, slice order as sorted."""
        return np.stack([self.slice(k) for k in range(self.shape[0])])


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _decode_error(e, tsuid):
    msg = str(e).lower()
    name = pydicom.uid.UID(tsuid).name if tsuid else "unknown"
    if ("plugin" in msg or ("missing" in msg and "depend" in msg) or "no available" in msg
            or "unable to decompress" in msg or isinstance(e, NotImplementedError) or "is not supported" in msg):
        return SeriesError(f"cannot decode pixel data: no pixel-data plugin for transfer syntax '{name}'")
    return SeriesError(f"pixel decode error ({type(e).__name__}, transfer syntax '{name}')")


# ---------------------------------------------------------------------------------------------
# JPEG 2000: direct and reduced-resolution decoding


class J2KError(ValueError):
    """A JPEG 2000 file the direct or reduced decoder does not handle; str() is a fixed,
    PHI-free phrase."""


ITEM_TAG, SEQ_DELIM_TAG = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"


def read_j2k_codestream(path, offset):
    """The JPEG 2000 codestream of a single-frame encapsulated Pixel Data element whose items
    start at `offset` (from the header scan): Basic Offset Table item, fragment items,
    sequence delimiter (DICOM PS3.5 A.4). Fragments are concatenated. Raises J2KError when
    the encapsulation is malformed or truncated."""
    with open(path, "rb") as f:
        f.seek(offset)
        buf = f.read()
    if buf[:4] != ITEM_TAG or len(buf) < 8:
        raise J2KError("no Basic Offset Table item")
    i = 8 + int.from_bytes(buf[4:8], "little")
    frags = []
    while True:
        if i + 8 > len(buf):
            raise J2KError("encapsulated pixel data truncated")
        tag, n = buf[i:i + 4], int.from_bytes(buf[i + 4:i + 8], "little")
        i += 8
        if tag == SEQ_DELIM_TAG:
            break
        if tag != ITEM_TAG or i + n > len(buf):
            raise J2KError("malformed or truncated fragment item")
        frags.append(buf[i:i + n])
        i += n
    if not frags:
        raise J2KError("no fragments")
    return frags[0] if len(frags) == 1 else b"".join(frags)


def j2k_header(cs):
    """Main-header facts of a JPEG 2000 codestream (ISO 15444-1 A.5.1 SIZ, A.6.1 COD):
    dict(width, height, x0, y0, ncomp, precision, signed, xr, yr (component 0 subsampling),
    levels (decomposition levels, main-header COD))."""
    if cs[:4] != b"\xff\x4f\xff\x51":
        raise J2KError("not a JPEG 2000 codestream (no SOC + SIZ)")
    be = lambda a, b: int.from_bytes(cs[a:b], "big")  # noqa: E731
    lsiz = be(4, 6)
    xsiz, ysiz, x0, y0 = be(8, 12), be(12, 16), be(16, 20), be(20, 24)
    ncomp = be(40, 42)
    if ncomp < 1 or len(cs) < 45:
        raise J2KError("bad SIZ marker")
    ssiz = cs[42]
    out = dict(width=xsiz - x0, height=ysiz - y0, x0=x0, y0=y0, ncomp=ncomp, precision=(ssiz & 0x7F) + 1,
               signed=bool(ssiz & 0x80), xr=cs[43], yr=cs[44], levels=None)
    i = 4 + lsiz
    while i + 4 <= len(cs):  # main-header marker segments up to the first tile-part (SOT)
        marker, n = be(i, i + 2), be(i + 2, i + 4)
        if marker == 0xFF90:
            break
        if marker == 0xFF52 and n >= 12:
            out["levels"] = cs[i + 9]  # Lcod(2) Scod(1) SGcod(4) then SPcod: levels first
        i += 2 + n
    if out["levels"] is None:
        raise J2KError("no COD marker in the main header")
    return out


_OPENJPEG = []  # cached pylibjpeg-openjpeg module (or None)


def decode_j2k_full(cs, bits_stored, signed):
    """Full-resolution decode of a one-component codestream whose signedness matches the
    DICOM header and whose precision is at most BitsStored -> ((R, C) int16/uint16 (int8/
    uint8 for <= 8 bits), header facts) with pylibjpeg-openjpeg, the decoder pydicom uses,
    without pydicom's dataset parse. Raises J2KError when it does not apply. (Measured on
    the demo cohort: Pillow's and imagecodecs' OpenJPEG 2.5.4 builds and openjpeg's raw
    decoder core are no faster, so this is the one full-resolution decoder.)"""
    if not _OPENJPEG:
        try:
            import openjpeg
        except Exception:
            openjpeg = None
        _OPENJPEG.append(openjpeg)
    if _OPENJPEG[0] is None:
        raise J2KError("pylibjpeg-openjpeg not installed")
    h = j2k_header(cs)
    if h["ncomp"] != 1 or h["precision"] > bits_stored or h["signed"] != bool(signed):
        raise J2KError("codestream precision/sign differ from the header")
    return _OPENJPEG[0].decode(cs, j2k_format=0), h


def decode_j2k_reduced(cs, bits_stored, signed):
    """Half-resolution decode: the codestream is decoded without its finest wavelet level
    (Pillow's OpenJPEG plugin with `reduce = 1`, i.e. opj_set_decoded_resolution_factor 1),
    which skips tier-1 decoding of the three finest subbands. -> int32 (ceil(R/2), ceil(C/2)).

    The result is the LL band of the first decomposition: the image filtered by the 5/3
    (lossless) or 9/7 (lossy) low-pass analysis filter, DC gain 1 (same units), sampled at
    the EVEN reference-grid positions (ISO 15444-1 F.4.8: the low-pass output of the 1D
    transform sits at 2n), so with an even image offset reduced pixel (i, j) is centred on
    full-resolution pixel (2i, 2j): the spacing doubles and the origin does not move (a box
    average of 2 x 2 pixels would be centred half a pixel further; JPEG 2000's is not).
    Pillow returns (x + 2^(p-1) if signed) << (16 - p) for precision p; this is undone.
    Raises J2KError when it does not apply or fails."""
    h = j2k_header(cs)
    if h["ncomp"] != 1 or h["precision"] > bits_stored or h["signed"] != bool(signed):
        raise J2KError("codestream precision/sign differ from the header")
    if h["levels"] < 1:
        raise J2KError("no wavelet decomposition to drop")
    if h["x0"] % 2 or h["y0"] % 2 or h["xr"] != 1 or h["yr"] != 1:
        raise J2KError("odd image offset or subsampled component")
    if not _pillow_j2k():
        raise J2KError("Pillow with OpenJPEG (JPEG 2000) support is not installed")
    import io
    from PIL import Image
    try:
        im = Image.open(io.BytesIO(cs), formats=["JPEG2000"])
        im.reduce = 1
        im.load()
    except Exception as e:
        raise J2KError(f"Pillow JPEG 2000 decode failed ({type(e).__name__})") from e
    p = h["precision"]
    if im.mode in ("I;16", "I;16L"):
        shift = 16 - p
    elif im.mode == "L" and p <= 8:
        shift = 8 - p
    else:
        raise J2KError(f"unexpected Pillow mode {im.mode}")
    a = np.asarray(im).astype(np.int32)
    if shift:
        a >>= shift
    if h["signed"]:
        a -= 1 << (p - 1)
    want = ((h["height"] + 1) // 2, (h["width"] + 1) // 2)
    if a.shape != want:
        raise J2KError(f"reduced image is {a.shape}, expected {want}")
    return a, h


_PILLOW_J2K = []


def _pillow_j2k():
    """Whether Pillow can decode JPEG 2000 (it links OpenJPEG); cached."""
    if not _PILLOW_J2K:
        try:
            from PIL import features
            _PILLOW_J2K.append(bool(features.check("jpg_2000")))
        except Exception:
            _PILLOW_J2K.append(False)
    return _PILLOW_J2K[0]


LOWPASS_53 = np.array([-1.0, 2.0, 6.0, 2.0, -1.0]) / 8.0  # JPEG 2000 5/3 analysis low-pass


def lowpass_half(x):
    """(R, C) -> (ceil(R/2), ceil(C/2)) float32: the 5/3 low-pass analysis filter along both
    axes with whole-sample symmetric extension, sampled at even indices: the LL band that
    `decode_j2k_reduced` returns, up to the lifting's integer rounding (and the decoder's
    clamp to the sample range). Used for files the reduced decoder cannot read."""
    y = np.asarray(x, np.float64)
    for ax in (0, 1):
        n = y.shape[ax]
        if n < 3:  # too short for the 5-tap filter: plain even samples
            y = np.take(y, np.arange(0, n, 2), axis=ax)
            continue
        pad = [(0, 0), (0, 0)]
        pad[ax] = (2, 2)
        yp = np.pad(y, pad, mode="reflect")  # whole-sample symmetric: x[-1] = x[1]
        idx = np.arange(0, n, 2)
        y = sum(w * np.take(yp, idx + t, axis=ax) for t, w in enumerate(LOWPASS_53))
    return y.astype(np.float32)


def dicom_stack(root, group, reduce=False):
    """SliceStack for a group from group_series; pixels are read lazily, one file at a time.

    JPEG 2000 single-frame files are decoded from the codestream the header scan located
    (no second pydicom parse). With `reduce` (preprocess.py passes J2K_REDUCE), every file of
    the series is such a file and both pixel spacings are <= J2K_REDUCE_MAX_PIXEL_MM (half the 1 mm output grid),
    the series is decoded at half resolution (`decode_j2k_reduced`): the stack then has
    ceil(R/2) x ceil(C/2) pixels at twice the spacing, the same origin, and `extent` = the
    full-resolution in-plane extent, so the output grid and affine are those of the full
    decode. The first file is a probe: if the reduced decoder is missing or fails there, the
    whole series is decoded at full resolution; a later file that fails is decoded in full
    and reduced with the same 5/3 low-pass filter (`lowpass_half`). Both are recorded in
    `stack.notes` (preprocess.py logs them per series).
    """
    info, frames = group["info"], group["frames"]
    if "MOSAIC" in info.get("image_type", []):  # slices tiled into one image (Siemens EPI/DWI)
        raise SeriesError("Siemens mosaic not supported (convert the series with dcm2niix)", info["path"])
    for h, fr in frames:  # a file whose pixel data cannot be its header's image fails the series
        if h.get("pixel_error"):
            raise SeriesError(h["pixel_error"], h["path"])
    for h, fr in frames:
        if fr["ipp"] is None or fr["iop"] is None or fr["ps"] is None:
            bad = fr.get("invalid") or {}
            why = [f"invalid {t} '{bad[t]}' (expected "
                   f"{'2 orthogonal unit vectors' if k == 'iop' and fr.get('iop_not_orthonormal') else what})"
                   for t, k, _, what in _GEOMETRY if t in bad]
            missing = [t for t, k, _, _ in _GEOMETRY if fr[k] is None and t not in bad]
            raise SeriesError("; ".join(why + [f"missing geometry ({', '.join(missing)})"] * bool(missing)), h["path"])
    strays = group.get("strays", ())
    h0, ps0 = next(((h, fr["ps"]) for h, fr in frames if (h["path"], fr["frame"]) not in strays),
                   (frames[0][0], frames[0][1]["ps"]))
    for h, fr in frames:  # a slice group_series merged here, between the others' (_strays_into_holes)
        if (h["path"], fr["frame"]) not in strays:
            continue
        if (h["rows"], h["cols"]) != (h0["rows"], h0["cols"]):
            raise SeriesError(f"matrix size {h['rows']} x {h['cols']} in a slice between slices of {h0['rows']} x "
                              f"{h0['cols']} (without it the volume has a gap)", h["path"])
        if not _close(fr["ps"], ps0):
            raise SeriesError(f"PixelSpacing {fr['ps'][0]:.3g} x {fr['ps'][1]:.3g} mm in a slice between slices of "
                              f"{ps0[0]:.3g} x {ps0[1]:.3g} mm (without it the volume has a gap)", h["path"])
    iop, off_deg, k = slice_orientation([fr["iop"] for _, fr in frames])
    if off_deg > IOP_JITTER_DEG:  # not parallel: no single slice normal to stack them along
        raise SeriesError(f"slice orientation varies by {off_deg:.2g} deg (ImageOrientationPatient, "
                          f"more than {IOP_JITTER_DEG:g} deg)", frames[k][0]["path"])
    rows, cols = info["rows"], info["cols"]
    if rows < 1 or cols < 1:
        raise SeriesError("missing Rows/Columns")
    modality = info["modality"]
    photometric = info["photometric"]
    if modality != "CT":  # MONOCHROME1 is inverted once per volume (volume.py): one kind per volume
        for h, _ in frames:
            if {h.get("photometric", photometric), photometric} == {"MONOCHROME1", "MONOCHROME2"}:
                raise SeriesError("mixed MONOCHROME1 and MONOCHROME2 slices", h["path"])
    cache = {}
    notes = []

    def read_full(h):
        """Stored pixel values of one file at full resolution (all frames)."""
        path = h["path"]
        raw = h.get("raw_pixels")
        if raw is not None:  # uncompressed: numpy reads the bytes directly
            offset, dtype, bits_alloc, bits_stored = raw
            try:
                arr = np.fromfile(os.path.join(root, path), dtype, count=rows * cols, offset=offset)
            except (OSError, ValueError) as e:
                raise SeriesError(f"unreadable DICOM file ({type(e).__name__})") from e
            if arr.size != rows * cols:
                raise SeriesError("pixel data shorter than Rows x Columns (truncated file)")
            if bits_stored < bits_alloc:  # ignore unused high bits, as pydicom does
                shift = bits_alloc - bits_stored
                arr = np.right_shift(np.left_shift(arr, shift), shift)
            return arr.reshape(rows, cols)
        j2k = h.get("j2k_pixels")
        if j2k is not None and J2K_DIRECT:  # JPEG 2000: decode the codestream directly
            try:
                arr, jh = decode_j2k_full(read_j2k_codestream(os.path.join(root, path), j2k[0]), j2k[1], j2k[2])
                if arr.shape == (rows, cols):
                    return arr
            except Exception:  # anything unusual: pydicom's route below gives the precise error
                pass
        with pydicom_quiet(notes):  # pixel-decoding warnings -> the series' notes (once each), others silenced
            return read_pydicom(h)

    def read_pydicom(h):
        """read_full's route through pydicom (compressed or unusual files)."""
        path = h["path"]
        try:
            ds = read_dataset(os.path.join(root, path), stop_before_pixels=False)
        except SeriesError:
            raise
        except Exception as e:
            raise SeriesError(f"unreadable DICOM file ({type(e).__name__})") from e
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            # the header scan saw the Pixel Data tag: pydicom dropped a cut-short element
            raise SeriesError("truncated file (pixel data cut short)" if h.get("pixel_tag") else "missing pixel data")
        if int(ds.get("Rows", 0) or 0) != rows or int(ds.get("Columns", 0) or 0) != cols:
            raise SeriesError("inconsistent Rows/Columns")
        ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if getattr(ds, "file_meta", None) else ""
        if "PixelData" in ds and (ts in NATIVE_LE or ts == "1.2.840.10008.1.2.2"):  # pydicom crops or pads
            need = _pixel_bytes(rows, cols, int(_num(ds.get("NumberOfFrames", 1), 1) or 1),
                                int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("BitsAllocated", 0) or 0))
            if len(ds.PixelData) not in (need, need + need % 2):
                raise SeriesError("pixel data length does not match Rows x Columns x frames x samples x bits")
        try:
            return ds.pixel_array
        except Exception as e:
            raise _decode_error(e, h.get("transfer_syntax", "")) from e

    def read_reduced(h):
        j2k = h["j2k_pixels"]
        arr, _ = decode_j2k_reduced(read_j2k_codestream(os.path.join(root, h["path"]), j2k[0]), j2k[1], j2k[2])
        return arr

    def named(load):
        """Errors raised while loading a slice name its file (SeriesError.path, else
        exception.nvfm_path): the console log points at the offending file."""
        def f(idx):
            try:
                return load(idx)
            except SeriesError as e:
                e.path = e.path or frames[idx][0]["path"]
                raise
            except Exception as e:
                e.nvfm_path = frames[idx][0]["path"]
                raise
        return f

    @named
    def load_full(idx):
        h, fr = frames[idx]
        path = h["path"]
        if path not in cache:
            cache.clear()  # one file at a time: bounded memory
            cache[path] = read_full(h)
        arr = cache[path]
        if fr["frame"] is not None:
            if arr.ndim == 2 and fr["frame"] == 0 and len(h["frames"]) == 1:
                pass  # an enhanced file of one frame: pydicom returns it 2D
            elif arr.ndim != 3 or fr["frame"] >= arr.shape[0]:
                raise SeriesError("pixel data has fewer frames than the header says")
            else:
                arr = arr[fr["frame"]]
        elif arr.ndim == 3 and arr.shape[1:] == (rows, cols):  # a single-frame file holding more frames:
            arr = arr[0]  # the header's one frame (pydicom returns them all; the series notes it)
        if arr.shape != (rows, cols):
            raise SeriesError("pixel data shape does not match Rows/Columns")
        return rescale(arr, fr)

    def rescale(arr, fr):
        """-> a new float32 array of modality values, finite (the stack promises it:
        `SliceStack.finite`, so volume.py skips its own check)."""
        out = arr.astype(np.float32)
        if fr["slope"] != 1.0 or fr["intercept"] != 0.0:
            out = out * np.float32(fr["slope"]) + np.float32(fr["intercept"])
        # integer samples (|x| < 2^32) with finite slope/intercept (header parsing rejects
        # others) stay finite in float32 unless the rescale is absurd; floats are checked
        if (arr.dtype.kind not in "iub" or abs(fr["slope"]) * 2.0 ** 32 + abs(fr["intercept"]) > 1e37) \
                and not np.isfinite(out.sum(dtype=np.float64)):
            raise SeriesError("non-finite pixel values")
        return out

    @named
    def load_reduced(idx):
        h, fr = frames[idx]
        path = h["path"]
        if path not in cache:
            cache.clear()
            try:
                cache[path] = read_reduced(h)
            except Exception as e:  # this file only: full decode, then the same low-pass filter
                cache[path] = lowpass_half(read_full(h))
                fails.append(type(e).__name__)
                if len(fails) == 1:
                    notes.append("JPEG 2000 reduced-resolution decode failed on a file "
                                 f"({type(e).__name__}): decoded in full and low-pass filtered instead")
        return rescale(cache[path], fr)

    fails = []
    ps = frames[0][1]["ps"]
    reduce = (reduce and max(ps) <= J2K_REDUCE_MAX_PIXEL_MM + 1e-6 and min(ps) >= 2 * MIN_PIXEL_MM
              and all(h.get("j2k_pixels") is not None for h, _ in frames))
    if reduce:  # probe the first file: a missing or failing decoder -> full decode for this series
        h0 = frames[0][0]
        try:
            cache[h0["path"]] = read_reduced(h0)
        except Exception as e:
            reduce = False
            why = str(e) if isinstance(e, J2KError) else type(e).__name__
            notes.append(f"JPEG 2000 reduced-resolution decode not used ({why[:120]}): full-resolution decode")
    origins = [fr["ipp"] for _, fr in frames]
    if reduce:
        st = SliceStack(origins, iop[:3], iop[3:], (2 * ps[0], 2 * ps[1]), ((rows + 1) // 2, (cols + 1) // 2),
                        load_reduced, modality, photometric, extent=((rows - 1) * ps[0], (cols - 1) * ps[1]),
                        native_ps=ps)
    else:
        st = SliceStack(origins, iop[:3], iop[3:], ps, (rows, cols), load_full, modality, photometric)
    st.notes = notes
    if group.get("split_by_geometry"):
        st.warnings.append(f"series split into {group['n_parts']} volumes by pixel spacing / matrix size")
        st.cut_apart = True
    if group.get("left_out"):  # strays beyond its ends (_strays_into_holes): each fails on its own, below
        m = group["left_out"]
        st.warnings.append(f"{m} end slice{'s' * (m > 1)} of the series left out (other matrix size or geometry, "
                           "failed separately)")
    like = group.get("apart")
    if like:  # a stray left apart from a volume of its series: check()'s reason says what differs, not "too few"
        diff = []  # (this part's value, the volume's)
        if (rows, cols) != (like["rows"], like["cols"]):
            diff.append((f"matrix size {rows} x {cols}", f"{like['rows']} x {like['cols']}"))
        if like["ps"] is not None and not _close(ps, like["ps"]):
            diff.append((f"PixelSpacing {ps[0]:.3g} x {ps[1]:.3g} mm", f"{like['ps'][0]:.3g} x {like['ps'][1]:.3g} mm"))
        K = len(frames)
        shorter = f", the volume is {'one slice' if K == 1 else f'{K} slices'} shorter" if like["beyond"] else ""
        if diff:
            st.few_slices_why = (f"with {' and '.join(d for d, _ in diff)} unlike the {like['n']} slices of its "
                                 f"series' volume ({', '.join(o for _, o in diff)}): left out{shorter}")
    if group.get("split_by_timing"):
        st.warnings.append(f"series split into {group['n_timing']} volumes by {group['split_by_timing']} "
                           "(different acquisitions)")
    if group.get("split_by_tag"):
        st.warnings.append(f"series split into {group['n_stacks']} volumes by {group['split_by_tag']} "
                           "(interleaved slice stacks)")
    if group.get("planes"):
        st.warnings.append(f"series split into {len(group['planes'])} volumes by slice orientation "
                           f"({plane_phrase(group['planes'])})")
        if group.get("whole_plane"):  # too few slices here means a small plane, not a truncated series
            st.few_slices_why = (f"in its orientation: series mixes {len(group['planes'])} slice orientations "
                                 f"({plane_phrase(group['planes'])})")
    st.paths = [h["path"] for h, _ in frames]  # loader index -> file, for error messages
    st.reduced = bool(reduce)
    st.finite = True  # rescale() checks what is not finite by construction
    st.itk_pixel_type = dicom_pixel_type(frames)
    return st


def dicom_pixel_type(frames):
    """The pixel type SimpleITK (GDCM) reads a series' (header, frame) list as
    (nvfm/volume.py itk_dicom_pixel_type, from BitsStored, PixelRepresentation and the rescale
    slope / intercept), for resampled_neurovfm's truncation and clamp; None when a value is
    missing or the files disagree (resampled_neurovfm then decides from the values)."""
    from nvfm.volume import itk_dicom_pixel_type  # nvfm/volume.py imports this module
    kinds = {(h.get("bits_stored"), h.get("pixel_representation"), fr.get("slope", 1.0), fr.get("intercept", 0.0))
             for h, fr in frames}
    if len(kinds) != 1:
        return None
    bits, pr, slope, inter = kinds.pop()
    if bits is None or pr is None or not 1 <= bits <= 32 or slope is None or inter is None:
        return None
    return itk_dicom_pixel_type(bits, pr, slope, inter)


def nifti_study_folder(rel):
    """The study folder of a NIfTI file (its parent, minus a trailing BIDS datatype folder)."""
    parts = rel.replace(os.sep, "/").split("/")[:-1]
    if parts and parts[-1].lower() in BIDS_DATATYPES:
        parts = parts[:-1]
    return "/".join(parts) or "."


def nifti_sidecar(path):
    """The BIDS / dcm2niix JSON sidecar of a NIfTI file (same name, .json), or None."""
    stem = path[:-len(".nii.gz")] if path.lower().endswith(".nii.gz") else os.path.splitext(path)[0]
    return stem + ".json" if os.path.isfile(stem + ".json") else None


def nifti_modality(path, data):
    """(modality, warning or "") of a NIfTI volume. A NIfTI header has no modality, so:

    1. the sidecar's "Modality" (dcm2niix copies the DICOM tag there), when it says CT or MR (in any
       case, spaces trimmed);
    2. else the data: CT when it holds air in Hounsfield units (min <= -900 HU and 1% of the voxels
       below -500), MR otherwise. Never the file name.
    A volume read as MR whose non-zero voxels look like brain CT in HU (a skull-stripped CT with a
    zero background: integer values, median 15-60, 95% of them within -100..100) gets a warning
    that says how to settle it (a sidecar), since its intensity normalisation would be MR's."""
    side = nifti_sidecar(path)
    if side:
        try:
            with open(side, encoding="utf-8-sig") as f:  # a byte-order mark, as Windows editors write, is no error
                declared = json.load(f).get("Modality")
        except (OSError, ValueError, AttributeError) as e:
            raise SeriesError(f"unreadable NIfTI sidecar ({type(e).__name__})") from e  # no file name: it may name a patient
        if isinstance(declared, str):  # hand-written sidecars: "ct", "CT "
            declared = declared.strip().upper()
        if declared in ("CT", "MR"):
            return declared, ""
        if declared:
            raise SeriesError(f"unsupported modality {re.sub(r'[^A-Za-z0-9]', '', str(declared)).upper()[:8] or 'none'} "
                              "(from its sidecar)")
    sub = data[::2, ::2, ::2]
    if data.min() <= -900 and np.percentile(sub, 1) < -500:
        return "CT", ""
    nz = sub[sub != 0]
    if nz.size >= 0.02 * sub.size and np.array_equal(nz, np.round(nz)):
        lo, med, hi = np.percentile(nz, [2.5, 50, 97.5])
        if 15 <= med <= 60 and lo >= -100 and hi <= 100:
            return "MR", ("NIfTI read as MR (no air), but its values look like brain CT in HU (a skull-stripped "
                          "CT?); a sidecar .json with \"Modality\": \"CT\" or \"MR\" settles it")
    return "MR", ""


def nifti_stack(root, rel):
    """SliceStack for a real-valued 3D NIfTI file (4D with one volume is accepted)."""
    import nibabel as nib
    path = os.path.join(root, rel)
    try:
        if os.path.getsize(path) == 0:
            raise SeriesError("empty file")
        img = nib.load(path)
        shape = img.shape
    except SeriesError:
        raise
    except Exception as e:
        raise SeriesError(f"unreadable NIfTI ({type(e).__name__})") from e
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise SeriesError(f"{len(shape)}D NIfTI (need one 3D volume)")
    if min(shape) < 1:
        raise SeriesError("zero-sized NIfTI")
    if img.get_data_dtype().kind == "c":  # a float32 cast would keep the real part, not the magnitude
        raise SeriesError("complex-valued NIfTI (need magnitude images)")
    if img.get_data_dtype().fields is not None:  # RGB24 / RGBA32: a record per voxel
        raise SeriesError("RGB NIfTI (need grey images)")
    hdr = img.header
    if "sform_code" in hdr and not hdr.get_sform(coded=True)[1]:
        # the affine comes from pixdim (qform or none): nibabel's load replaces a zero size by 1 mm
        # (a log line naming no file), so the header is read again as written
        with nib.openers.ImageOpener(path) as f:
            pix = np.asarray(type(hdr).from_fileobj(f, check=False)["pixdim"][1:4], float)
        if not (np.isfinite(pix).all() and (pix != 0).all()):
            raise SeriesError(f"NIfTI voxel size {' x '.join(f'{v:g}' for v in pix)} (pixdim: zero or not finite)")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as e:
        raise SeriesError(f"unreadable NIfTI data ({type(e).__name__})") from e
    n_bad = 0
    if not np.isfinite(data).all():
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        bad = n_bad / data.size
        if bad > 0.01:
            raise SeriesError(f"non-finite voxels ({100 * bad:.0f}%)")
        # the background value, not 0: in a CT, 0 HU is soft tissue and would make foreground islands
        fill = float(data[np.isfinite(data)].min())
        data = np.nan_to_num(data, nan=fill, posinf=fill, neginf=fill)
    A = np.asarray(img.affine, float)
    if not np.isfinite(A).all() or abs(np.linalg.det(A[:3, :3])) < 1e-9:
        raise SeriesError("invalid NIfTI affine")
    # xyzt_units: nibabel ignores them, SimpleITK scales metres and microns to mm (unknown: mm)
    unit = hdr.get_xyzt_units()[0] if hasattr(hdr, "get_xyzt_units") else "mm"
    A[:3] *= {"meter": 1000.0, "micron": 1e-3}.get(unit, 1.0)
    A = LPS_TO_RAS @ A  # RAS -> LPS (the matrix is its own inverse)
    vox = np.linalg.norm(A[:3, :3], axis=0)
    mx = vox.max()
    cand = [a for a in range(3) if vox[a] >= 0.99 * mx]
    acq = max(cand, key=lambda a: abs(A[2, a]) / vox[a])
    i_ax, j_ax = [a for a in range(3) if a != acq]
    if data.shape[acq] < 1:
        raise SeriesError("zero-sized NIfTI")
    vol = np.moveaxis(data, acq, 0)  # (K, I, J)
    c_vec, r_vec = A[:3, i_ax] / vox[i_ax], A[:3, j_ax] / vox[j_ax]
    if abs(c_vec @ r_vec) > 1e-3:
        raise SeriesError("non-orthogonal NIfTI axes")
    origins = [A[:3, 3] + k * A[:3, acq] for k in range(vol.shape[0])]
    modality, why = nifti_modality(path, data)
    st = SliceStack(origins, r_vec, c_vec, (vox[i_ax], vox[j_ax]), vol.shape[1:],
                    lambda k: np.array(vol[k], np.float32), modality)  # a copy: callers modify it
    if why:
        st.warnings.append(why)
    if n_bad:
        st.warnings.append(f"{n_bad} non-finite NIfTI voxel(s) set to the volume's minimum ({fill:g})")
    if "qform_code" in hdr and "sform_code" in hdr:
        (qf, qc), (sf, sc) = hdr.get_qform(coded=True), hdr.get_sform(coded=True)
        if not qc and not sc:  # no orientation in the file: nibabel's guess and SimpleITK's differ by an A/P flip
            st.warnings.append("NIfTI has no qform/sform: orientation unknown (nibabel's default axes L, A, S assumed)")
        elif qc and sc and not (np.allclose(qf[:3, :3], sf[:3, :3], atol=1e-3)
                                and np.allclose(qf[:3, 3], sf[:3, 3], atol=1e-2)):
            # nibabel takes the sform; SimpleITK takes a scanner qform over an aligned/template sform
            st.warnings.append("NIfTI qform and sform disagree (sform used)")
    from nvfm.volume import itk_nifti_pixel_type  # nvfm/volume.py imports this module
    try:  # the pixel type SimpleITK reads the file as: resampled_neurovfm's truncation and clamp
        st.itk_pixel_type = itk_nifti_pixel_type(img.header)
    except Exception:  # an unusual header: decided from the values
        st.itk_pixel_type = None
    return st


# ---------------------------------------------------------------------------------------------
# MR sequence family

FAMILIES = ("T1", "T1C", "T2", "FLAIR", "DWI", "ADC", "SWI", "OTHER")
_KW = [  # (family, regex on SeriesDescription + ProtocolName), first match wins
    ("ADC", r"\badc\b|apparent diff|\beadc\b"),
    ("DWI", r"\bdwi\b|diffusion|\bdiff\b|\btrace\b|\bb ?1000\b|\bdti\b|ep2d_diff|resolve"),
    ("SWI", r"\bswi|\bswan\b|suscept|\bt2\s?\*|t2star|\bhemo|\bsw[ _]?ip\b|\bmip[ _]swi"),
    ("FLAIR", r"flair|dark[ -_]?fluid|\btirm\b"),
    ("T1", r"\bt1|mprage|mp-rage|mp2rage|spgr|bravo|\btfe\b|\bvibe\b|\bse[ _-]?t1|\bt1w"),
    ("T2", r"\bt2|\btse\b|\bfse\b|\bhaste\b|\bciss\b|\bfiesta\b|\bspace\b"),
]
_CONTRAST = re.compile(r"\+ ?c\b|\bc\+|\bpost\b|\bgad|\bgd\b|\+ ?gd|contrast|\bce\b", re.I)
_T1_FLAIR = re.compile(r"t1.*flair|flair.*t1", re.I)


def mr_family(info):
    """MR sequence family from SeriesDescription/ProtocolName keywords, then the data.

    Keyword rules (case-insensitive, first match wins): ADC (adc, apparent diffusion);
    DWI (dwi, diffusion, trace, b1000, dti); SWI (swi, swan, susceptibility, t2*, hemo);
    FLAIR (flair, dark fluid, tirm; "T1 FLAIR" counts as T1); T1 (t1, mprage, spgr, bravo,
    tfe, vibe); T2 (t2, tse, fse, haste, ciss, fiesta, space). T1 becomes T1C when the
    description says post/gad/contrast/+C or ContrastBolusAgent is set (an enhanced MR: its
    Contrast/Bolus Agent Sequence, unless every frame says the agent was not administered).
    Without a keyword, the header decides: ImageType ADC -> ADC, DIFFUSION/TRACEW or b-value > 0
    -> DWI, TI > 1500 ms and TE > 70 ms -> FLAIR, TE >= 70 ms and TR >= 1500 ms -> T2,
    TR < 1000 ms and TE < 30 ms -> T1 (T1C with contrast agent), else OTHER (an enhanced MR's
    TE / TR / TI: its part's first frame's functional groups, group_series' `_part_info`).
    """
    text = f"{info.get('description', '')} {info.get('protocol', '')}".lower().replace("_", " ")
    it = info.get("image_type", [])
    fam = None
    if _T1_FLAIR.search(text):
        fam = "T1"
    else:
        for f, pat in _KW:
            if re.search(pat, text):
                fam = f
                break
    if fam is None:
        te, tr, ti = info.get("te"), info.get("tr"), info.get("ti")
        bval = max([fr.get("bvalue") or 0 for fr in info.get("frames", [])] or [0])
        if "ADC" in it:
            fam = "ADC"
        elif "DIFFUSION" in it or "TRACEW" in it or bval > 0:
            fam = "DWI"
        elif ti and te and ti > 1500 and te > 70:
            fam = "FLAIR"
        elif te and tr and te >= 70 and tr >= 1500:
            fam = "T2"
        elif te is not None and tr and tr < 1000 and te < 30:
            fam = "T1"
        else:
            fam = "OTHER"
    if fam == "T1" and (_CONTRAST.search(text) or info.get("contrast")):
        fam = "T1C"
    return fam
