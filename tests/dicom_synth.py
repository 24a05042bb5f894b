"""Small synthetic DICOM series for the ingestion tests (written with pydicom, no downloads).

`write_series` writes one file per slice with exact geometry: slice k's origin is
origin + k * step (LPS mm), in-plane unit vectors r (along a row) and c (along a column).
Every file carries fake PHI (FAKE_PHI values) so the privacy test can grep outputs for it.
"""
import os

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

FAKE_PHI = {
    "PatientName": "Zzyzxington^Quillfeather",
    "PatientID": "PID-778899-QX",
    "PatientBirthDate": "19230417",
    "AccessionNumber": "ACC-55443322",
    "InstitutionName": "Saint Fakenham Infirmary",
    "ReferringPhysicianName": "Vorpalblade^Ignatius",
}
UID_ROOT = "1.2.826.0.1.3680043.8.498."


def head_phantom(shape, seed=0):
    """(K, R, C) float: an off-centre ellipsoid 'head' with an asymmetric bright blob, so a
    flipped or transposed axis changes the data."""
    K, R, C = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, K), np.linspace(-1, 1, R), np.linspace(-1, 1, C), indexing="ij")
    head = ((z / 0.9) ** 2 + ((y - 0.05) / 0.8) ** 2 + ((x + 0.03) / 0.7) ** 2) < 1
    blob = ((z - 0.3) ** 2 + (y + 0.35) ** 2 + (x - 0.3) ** 2) < 0.08
    rng = np.random.default_rng(seed)
    v = np.where(head, 40.0, -1000.0) + np.where(blob, 400.0, 0.0) + 20.0 * x * head
    return v + rng.normal(0, 2, shape) * head


def _base(modality, study_uid, series_uid, desc, phi=True):
    ds = Dataset()
    if phi:
        for k, v in FAKE_PHI.items():
            setattr(ds, k, v)
        ds.PatientSex = "O"
        ds.StudyDate = "20240102"
    ds.Modality = modality
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = desc
    ds.StudyID = "STUDYID-4411"
    return ds


def _file_meta(sop_class, sop_uid, ts=ExplicitVRLittleEndian):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    return meta


def write_series(out_dir, vol, r=(1, 0, 0), c=(0, 1, 0), origin=(-100.0, -110.0, -50.0), step=None,
                 ps=(0.9, 0.8), modality="CT", slope=1.0, intercept=-1024.0, study_uid=None, series_uid=None,
                 desc="HEAD W/O", photometric="MONOCHROME2", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                 sop_class=None, compress=False, shuffle=True, phi=True, extra=None, names=None, seed=0):
    """Write vol (K, R, C) in physical units (HU for CT) as one file per slice.

    step: LPS vector between consecutive slice origins (default normal * 5 mm, where
    normal = r x c). Returns (study_uid, series_uid, list of paths) in slice order.
    """
    os.makedirs(out_dir, exist_ok=True)
    r, c = np.asarray(r, float), np.asarray(c, float)
    r /= np.linalg.norm(r)
    c /= np.linalg.norm(c)
    n = np.cross(r, c)
    step = n * 5.0 if step is None else np.asarray(step, float)
    study_uid = study_uid or generate_uid(UID_ROOT)
    series_uid = series_uid or generate_uid(UID_ROOT)
    sop_class = sop_class or ("1.2.840.10008.5.1.4.1.1.2" if modality == "CT" else "1.2.840.10008.5.1.4.1.1.4")
    K = vol.shape[0]
    order = np.random.default_rng(seed).permutation(K) if shuffle else np.arange(K)
    paths = [None] * K
    for idx, k in enumerate(order):
        stored = np.rint((vol[k] - intercept) / slope)
        if photometric == "MONOCHROME1":
            stored = 4095 - stored if modality != "CT" else stored  # one constant for the series
        stored = stored.astype(np.int16)
        sop_uid = generate_uid(UID_ROOT)
        ds = _base(modality, study_uid, series_uid, desc, phi)
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = list(image_type)
        # instance numbers deliberately disagree with position: sorting must use geometry
        ds.InstanceNumber = int(order[(idx * 7) % K]) + 1
        ds.ImagePositionPatient = [float(x) for x in np.asarray(origin, float) + k * step]
        ds.ImageOrientationPatient = [float(x) for x in np.concatenate([r, c])]
        ds.PixelSpacing = [float(ps[0]), float(ps[1])]
        ds.SliceThickness = float(np.linalg.norm(step))
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        if modality == "MR":
            ds.EchoTime, ds.RepetitionTime = 90.0, 4000.0
        for key, val in (extra or {}).items():
            setattr(ds, key, val)
        ds.PixelData = stored.tobytes()
        ds.file_meta = _file_meta(sop_class, sop_uid)
        if compress:
            ds.compress(RLELossless, stored)
        name = names[idx] if names else f"IM{idx:04d}.dcm"
        path = os.path.join(out_dir, name)
        ds.save_as(path, enforce_file_format=True)
        paths[k] = path
    return study_uid, series_uid, paths


def write_enhanced(path, vol, r=(1, 0, 0), c=(0, 1, 0), origin=(-100.0, -110.0, -50.0), step=None, ps=(0.9, 0.8),
                   modality="MR", study_uid=None, series_uid=None, desc="AX T2 FLAIR", slope=1.0, intercept=0.0,
                   reverse=True):
    """One enhanced multi-frame file (PerFrameFunctionalGroupsSequence) holding vol (K, R, C);
    frames are stored in reverse position order when reverse (sorting must fix it)."""
    r, c = np.asarray(r, float), np.asarray(c, float)
    n = np.cross(r, c)
    step = n * 4.0 if step is None else np.asarray(step, float)
    study_uid = study_uid or generate_uid(UID_ROOT)
    series_uid = series_uid or generate_uid(UID_ROOT)
    sop_class = "1.2.840.10008.5.1.4.1.1.4.1" if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2.1"
    sop_uid = generate_uid(UID_ROOT)
    K = vol.shape[0]
    order = np.arange(K)[::-1] if reverse else np.arange(K)
    ds = _base(modality, study_uid, series_uid, desc)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.NumberOfFrames = K
    ds.Rows, ds.Columns = vol.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [float(ps[0]), float(ps[1])]
    pm.SliceThickness = float(np.linalg.norm(step))
    po = Dataset()
    po.ImageOrientationPatient = [float(x) for x in np.concatenate([r, c])]
    pvt = Dataset()
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slope, intercept, "US"
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelValueTransformationSequence = Sequence([pvt])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        fr = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [float(x) for x in np.asarray(origin, float) + k * step]
        fr.PlanePositionSequence = Sequence([pp])
        frames.append(fr)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    stored = np.rint((vol[order] - intercept) / slope).astype(np.int16)
    ds.PixelData = stored.tobytes()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return study_uid, series_uid


def mutate_series(d, fn):
    """Apply fn(ds, index) to every file of a written series (sorted names) and save."""
    for i, f in enumerate(sorted(os.listdir(d))):
        p = os.path.join(d, f)
        ds = pydicom.dcmread(p)
        fn(ds, i)
        ds.save_as(p)


def set_raw_text(path, keyword, text):
    """Store `text` as the raw value of a text element (DS, IS, CS, ...) of one file, bypassing
    pydicom's value checks: how malformed headers from the field are reproduced."""
    from pydicom.dataelem import RawDataElement
    ds = pydicom.dcmread(path)
    tag = pydicom.tag.Tag(pydicom.datadict.tag_for_keyword(keyword))
    raw = text.encode("latin-1")
    raw += b" " * (len(raw) % 2)
    ds._dict[tag] = RawDataElement(tag, pydicom.datadict.dictionary_VR(tag), len(raw), raw, 0, False, True)
    ds.save_as(path)


def write_stacks(out_dir, stacks, modality="CT", **kw):
    """Several slice stacks written as ONE series (same Study/SeriesInstanceUID), e.g. two
    reconstructions interleaved along z. stacks: list of (vol (K, R, C), origin, step, extra)
    passed to write_series; file names S<stack>_IM<k>.dcm. Returns [paths per stack in slice order]."""
    study_uid, series_uid = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    out = []
    for s, (vol, origin, step, extra) in enumerate(stacks):
        names = [f"S{s}_IM{k:04d}.dcm" for k in range(vol.shape[0])]
        _, _, paths = write_series(out_dir, vol, origin=origin, step=step, modality=modality, study_uid=study_uid,
                                   series_uid=series_uid, extra=extra, names=names, seed=s, **kw)
        out.append(paths)
    return out


def scan_folder(d, fast=True):
    """nvfm.dicom.scan_dicom of every input file under d, with its fast header parser on (fast) or
    pydicom's (the module setting is restored)."""
    from nvfm import dicom
    old, dicom.FAST_SCAN = dicom.FAST_SCAN, fast
    try:
        return [dicom.scan_dicom(d, f) for f in dicom.find_inputs(d)]
    finally:
        dicom.FAST_SCAN = old
