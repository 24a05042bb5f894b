"""DICOM writer for the demo cohort: single-frame and enhanced multi-frame CT/MR, localizers,
Basic Text SR and Encapsulated PDF, with deterministic UIDs.

Geometry convention (DICOM, LPS patient mm): pixel (row r, column c) of slice k lies at
    P = IPP_k + c * PixelSpacing[1] * IOP[:3] + r * PixelSpacing[0] * IOP[3:]
and IPP_k = IPP_0 + k * step (step is along the slice normal, or along the table axis
for gantry-tilted CT).

Vendor. The equipment tags (set by nvfm/phantom.py) name a plainly synthetic scanner,
Manufacturer "NVFM Phantom Systems": the demo must never pass for a real vendor's data. So
dcm2niix, which recognises a vendor by the first two letters of a real one's name, prints
"Warning: Unable to determine manufacturer (0008,0070), so conversion is not tuned for
vendor." on every series. It is harmless here: vendor tuning reads vendor private tags
(Siemens CSA headers and mosaics, GE and Philips private diffusion, scaling and timing tags),
and the phantom writes none, so the conversion is the same with any vendor name. On an
enhanced trace DWI the same fact reads "Found 0018,9087 but manufacturer (0008,0070) unknown:
assuming Philips." (the standard b-value attribute is read as Philips writes it: one b-value,
one 3D volume). Besides these, dcm2niix only says "Slices not stacked: orientation varies" on
the 3-plane localizer, as on a real one. tests/test_phantom_dcm2niix.py fails on any other
line for the DWI, ADC and CT series.
"""
import hashlib

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         RLELossless, UID)

CT_IMAGE = UID("1.2.840.10008.5.1.4.1.1.2")
ENHANCED_CT = UID("1.2.840.10008.5.1.4.1.1.2.1")
MR_IMAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR = UID("1.2.840.10008.5.1.4.1.1.4.1")
BASIC_TEXT_SR = UID("1.2.840.10008.5.1.4.1.1.88.11")
ENCAPSULATED_PDF = UID("1.2.840.10008.5.1.4.1.1.104.1")
IMPLEMENTATION_UID = UID("2.25.160591849027138419237405826118403757551")
TRANSFER_SYNTAXES = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian,
                     "j2k": JPEG2000Lossless, "rle": RLELossless}


def make_uid(*parts):
    """Deterministic UID under the 2.25 (UUID-derived) root from any hashable parts."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()
    return UID("2.25." + str(int.from_bytes(h[:15], "big")))


def _fmt(v):
    return [float(f"{x:.6f}") for x in v]


def _base(sop_class, sop_uid, study, series, transfer_syntax):
    """Dataset with file meta, patient/study/series modules filled from dicts."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "NVFM_PHANTOM"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    for k, v in study.items():          # patient + study + equipment tags (fake PHI)
        setattr(ds, k, v)
    for k, v in series.items():
        setattr(ds, k, v)
    return ds


def _image_pixel_module(ds, rows, cols, signed):
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if signed else 0


def _save(ds, path, arr):
    """Attach pixel data (uncompressed or compressed per the transfer syntax) and write."""
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed:
        ds.compress(ts, arr, generate_instance_uid=False)
    else:
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_image_series(folder, pixels, geom, study, series, per_image=None, multiframe=False,
                       transfer_syntax="explicit", uid_seed="", first_instance=1, trace_b_value=None):
    """Write one image series.

    pixels  int16/uint16 (K, R, C) stored values (K slices of R rows x C columns)
    geom    dict: iop (6,), ipp0 (3,) LPS mm, step (3,) LPS mm per slice, spacing (row, col) mm,
            thickness mm, spacing_between mm
    study   dict of patient/study-level tags; series: dict of series-level tags (incl. SOPClass-
            independent ones: Modality, SeriesInstanceUID, SeriesDescription, ImageType, ...)
    per_image  optional dict of extra per-image tags (same for every slice)
    trace_b_value  b-value (s/mm2) of an isotropic trace DWI series, as scanners write one: one
            b-value per series, DiffusionDirectionality ISOTROPIC, no gradient vector. Enhanced
            objects carry it in a shared MRDiffusionSequence (the MR Diffusion macro). Classic
            single-frame objects get DiffusionDirectionality only: their IOD has no b-value
            attribute, and dcm2niix reads a top-level DiffusionBValue (0018,9087) with a zero
            vector as a Philips trace volume mixed into a DTI run ("Check sorted order: 4D
            dataset has 1 volumes, but volume index ranges from 65536..65537"); the b-value
            stays in the series description, as on scanners that keep it in private tags.
    Returns the list of written file paths.
    """
    import os
    K, R, C = pixels.shape
    signed = pixels.dtype == np.int16
    ts = TRANSFER_SYNTAXES[transfer_syntax]
    modality = series["Modality"]
    iop = np.asarray(geom["iop"], float)
    ipps = np.asarray(geom["ipp0"], float)[None] + np.arange(K)[:, None] * np.asarray(geom["step"], float)[None]
    normal = np.cross(iop[:3], iop[3:])
    os.makedirs(folder, exist_ok=True)
    paths = []
    if not multiframe:
        sop_class = CT_IMAGE if modality == "CT" else MR_IMAGE
        for k in range(K):
            inst = first_instance + k
            uid = make_uid(uid_seed, series["SeriesInstanceUID"], inst)
            ds = _base(sop_class, uid, study, series, ts)
            ds.InstanceNumber = inst
            ds.ImagePositionPatient = _fmt(ipps[k])
            ds.ImageOrientationPatient = _fmt(iop)
            ds.SliceLocation = f"{float(ipps[k] @ normal):.4f}"
            ds.PixelSpacing = _fmt(geom["spacing"])
            ds.SliceThickness = f"{geom['thickness']:.4f}"
            ds.SpacingBetweenSlices = f"{geom['spacing_between']:.4f}"
            ds.AcquisitionNumber = 1
            if trace_b_value is not None:
                ds.DiffusionDirectionality = "ISOTROPIC"
            for key, v in (per_image or {}).items():
                setattr(ds, key, v)
            _image_pixel_module(ds, R, C, signed)
            path = os.path.join(folder, f"IM{inst:04d}.dcm")
            _save(ds, path, pixels[k])
            paths.append(path)
        return paths
    # enhanced multi-frame: geometry lives in functional group sequences
    sop_class = ENHANCED_CT if modality == "CT" else ENHANCED_MR
    uid = make_uid(uid_seed, series["SeriesInstanceUID"], "mf")
    ds = _base(sop_class, uid, study, series, ts)
    ds.InstanceNumber = 1
    ds.NumberOfFrames = K
    ds.ContentQualification = "PRODUCT"
    ds.ImageType = list(series["ImageType"])[:2] + ["VOLUME", "NONE"]
    extra = dict(per_image or {})
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = _fmt(geom["spacing"])
    pm.SliceThickness = f"{geom['thickness']:.4f}"
    pm.SpacingBetweenSlices = f"{geom['spacing_between']:.4f}"
    shared.PixelMeasuresSequence = Sequence([pm])
    po = Dataset()
    po.ImageOrientationPatient = _fmt(iop)
    shared.PlaneOrientationSequence = Sequence([po])
    if modality == "CT":
        pv = Dataset()
        pv.RescaleIntercept = extra.pop("RescaleIntercept", "0")
        pv.RescaleSlope = extra.pop("RescaleSlope", "1")
        pv.RescaleType = "HU"
        shared.PixelValueTransformationSequence = Sequence([pv])
    voi = Dataset()
    voi.WindowCenter = extra.pop("WindowCenter", "40")
    voi.WindowWidth = extra.pop("WindowWidth", "80")
    shared.FrameVOILUTSequence = Sequence([voi])
    if trace_b_value is not None:
        dif = Dataset()
        dif.DiffusionBValue = float(trace_b_value)
        dif.DiffusionDirectionality = "ISOTROPIC"  # trace: no DiffusionGradientDirectionSequence
        shared.MRDiffusionSequence = Sequence([dif])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in range(K):
        f = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = _fmt(ipps[k])
        f.PlanePositionSequence = Sequence([pp])
        fc = Dataset()
        fc.StackID = "1"
        fc.InStackPositionNumber = k + 1
        fc.DimensionIndexValues = [1, k + 1]
        f.FrameContentSequence = Sequence([fc])
        frames.append(f)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    for key, v in extra.items():
        setattr(ds, key, v)
    _image_pixel_module(ds, R, C, signed)
    path = os.path.join(folder, "IM0001.dcm")
    _save(ds, path, pixels)
    return [path]


def write_text_sr(path, study, series, title, lines, uid_seed=""):
    """Basic Text SR (e.g. a dose report or a preliminary read) holding `lines` as TEXT items."""
    uid = make_uid(uid_seed, series["SeriesInstanceUID"], "sr")
    ds = _base(BASIC_TEXT_SR, uid, study, series, ExplicitVRLittleEndian)
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    cn = Dataset()
    cn.CodeValue, cn.CodingSchemeDesignator, cn.CodeMeaning = "18748-4", "LN", title
    ds.ConceptNameCodeSequence = Sequence([cn])
    items = []
    for i, line in enumerate(lines):
        it = Dataset()
        it.RelationshipType, it.ValueType = "CONTAINS", "TEXT"
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = "121071", "DCM", "Finding"
        it.ConceptNameCodeSequence = Sequence([c])
        it.TextValue = line[:1024]
        items.append(it)
    ds.ContentSequence = Sequence(items)
    ds.save_as(path, enforce_file_format=True)
    return path


def _minimal_pdf(lines):
    """A valid one-page PDF with the given text lines (Helvetica), built by hand."""
    def esc(s):
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    text = "BT /F1 10 Tf 50 780 Td 14 TL " + " ".join(f"({esc(s)}) Tj T*" for s in lines) + " ET"
    objs = ["<< /Type /Catalog /Pages 2 0 R >>",
            "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 842] /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
            "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
            f"<< /Length {len(text)} >>\nstream\n{text}\nendstream"]
    out = b"%PDF-1.4\n"
    offsets = []
    for i, o in enumerate(objs):
        offsets.append(len(out))
        out += f"{i + 1} 0 obj\n{o}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def write_encapsulated_pdf(path, study, series, title, lines, uid_seed=""):
    """Encapsulated PDF (e.g. a scanned requisition) holding `lines` as text."""
    uid = make_uid(uid_seed, series["SeriesInstanceUID"], "pdf")
    ds = _base(ENCAPSULATED_PDF, uid, study, series, ExplicitVRLittleEndian)
    ds.InstanceNumber = 1
    ds.DocumentTitle = title
    ds.BurnedInAnnotation = "YES"
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf = _minimal_pdf([title] + list(lines))
    if len(pdf) % 2:
        pdf += b"\x00"
    ds.EncapsulatedDocument = pdf
    cn = Dataset()
    cn.CodeValue, cn.CodingSchemeDesignator, cn.CodeMeaning = "34108-1", "LN", title
    ds.ConceptNameCodeSequence = Sequence([cn])
    ds.save_as(path, enforce_file_format=True)
    return path
