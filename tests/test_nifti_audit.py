"""NIfTI input loads correctly or fails loudly: orientation (a planted marker on the patient's
left, checked with nibabel's own affine), header variants (sform / qform / qfac / shear),
constant volumes, and a batch of bad files run through preprocess.py end to end (every file
accounted for, no header text or path in the output)."""
import glob
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import preprocess  # noqa: E402
from nvfm import dicom, volume  # noqa: E402

SHAPE = (48, 56, 12)  # NIfTI (i, j, k); k is the 5 mm axis


def _head(marker=None):
    """Float32 CT in HU: air, a 30 HU head box, and a 1000 HU cube at the voxels `marker` (bool)."""
    v = np.full(SHAPE, -1000.0, np.float32)
    v[5:43, 5:51, 1:11] = 30.0
    if marker is not None:
        v[marker] = 1000.0
    return v


def _rot_z(deg):
    t = np.radians(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _headers():
    """name -> (qform or None, sform or None): the transforms a writer may leave."""
    A = np.diag([0.9, 0.9, 5.0, 1.0])
    las = np.diag([-0.9, 0.9, 5.0, 1.0])  # x flipped: det < 0, a qform with qfac -1
    down = np.diag([0.9, 0.9, -5.0, 1.0])  # slices stored top to bottom: qfac -1 too
    rot = np.eye(4)
    rot[:3, :3] = _rot_z(20) @ np.diag([0.9, 0.9, 5.0])
    rot[:3, 3] = (-20.0, -25.0, -30.0)
    shear = A.copy()
    shear[1, 2] = 0.5  # each slice 0.5 mm further anterior: a tilted (sheared) sform
    sag = np.array([[0, 0, -5.0, 0], [0.9, 0, 0, 0], [0, 0.9, 0, 0], [0, 0, 0, 1.0]])
    return {"sform": (None, A), "qform_las": (las, None), "qform_down": (down, None),
            "both_agree_las": (las, las), "sform_rotated": (None, rot), "sform_sheared": (None, shear),
            "sagittal": (sag, sag)}


@pytest.mark.parametrize("process", [volume.process_stack, volume.process_stack_neurovfm])
@pytest.mark.parametrize("name", sorted(_headers()))
def test_marker_on_the_patients_left_lands_on_the_left(tmp_path, name, process):
    """A bright cube planted on the patient's left (low RAS x), anterior and superior of the head,
    as nibabel's img.affine places the voxels: in the shard volume its centroid is at the same
    world point (by the output affine, within 2 mm) and on the documented side of
    each canonical axis (W toward R, so left is the low W half; H toward P / I; D toward I / R)."""
    qform, sform = _headers()[name]
    img = nib.Nifti1Image(_head(), None)
    img.set_qform(qform, code=1 if qform is not None else 0)
    img.set_sform(sform, code=2 if sform is not None else 0)
    p = str(tmp_path / "m.nii.gz")
    nib.save(img, p)
    A = nib.load(p).affine  # nibabel's choice: sform when set, else qform
    ijk = np.indices(SHAPE).reshape(3, -1).T
    xyz = ijk @ A[:3, :3].T + A[:3, 3]
    head = _head().reshape(-1) > 0
    x, y, z = xyz.T
    cut = [np.percentile(c[head], q) for c, q in ((x, 20), (y, 75), (z, 60))]
    marker = (head & (x < cut[0]) & (y > cut[1]) & (z > cut[2])).reshape(SHAPE)
    assert 20 < marker.sum() < 0.1 * head.sum()
    nib.save(nib.Nifti1Image(_head(marker), None, header=img.header), p)
    want = xyz[marker.reshape(-1)].mean(0)
    st = dicom.nifti_stack(str(tmp_path), "m.nii.gz").check(3)
    assert st.modality == "CT" and st.warnings == []
    out = process(st)
    bone = out["data"][1] & 15  # bone window W2800/L600: 1000 HU is level 10 of 16, 30 HU is 5
    idx = np.argwhere(bone >= 8)
    got = out["affine"][:3, :3] @ idx.mean(0) + out["affine"][:3, 3]
    assert np.linalg.norm(got - want) < 2.0, (got, want)
    codes = "".join(nib.aff2axcodes(out["affine"]))
    assert codes == out["orientation"] and sorted(codes) == ["I", "P", "R"]
    frac = idx.mean(0) / np.array(bone.shape)
    side = {"R": frac[codes.index("R")] < 0.5,  # left: low index of the axis toward R
            "P": frac[codes.index("P")] < 0.5,  # anterior: low index of the axis toward P
            "I": frac[codes.index("I")] < 0.5}  # superior: low index of the axis toward I
    assert all(side.values()), (codes, frac)


@pytest.mark.parametrize("process", [volume.process_stack, volume.process_stack_neurovfm])
@pytest.mark.parametrize("value,modality", [(7.0, "MR"), (1234.5, "MR"), (1e-3, "MR"), (40.0, "CT")])
def test_constant_nifti_fails_as_constant(tmp_path, process, value, modality):
    """A constant volume is no image. On a grid the output does not sit on (0.9 mm pixels),
    float32 resampling turned the constant into values a few ulps apart (7 -> 6.9999995 .. 7.0):
    MR came out as a 0 / 255 noise pattern with 12 to 27 foreground tokens, CT (40 HU, from its
    sidecar) with every token foreground, and both were written. They fail as "constant image";
    one voxel of structure is processed (the rule is about the data, not the rounding)."""
    v = np.full((50, 60, 10), value, np.float32)
    aff = np.diag([0.9, 0.9, 5.0, 1.0])
    nib.save(nib.Nifti1Image(v, aff), str(tmp_path / "c.nii"))
    json.dump({"Modality": modality}, open(tmp_path / "c.json", "w"))
    with pytest.raises(dicom.SeriesError, match=r"^constant image \(no intensity range\)$"):
        process(dicom.nifti_stack(str(tmp_path), "c.nii").check(3))
    v[10:40, 10:50, 2:8] = value * 2 + 50.0
    nib.save(nib.Nifti1Image(v, aff), str(tmp_path / "c.nii"))
    out = process(dicom.nifti_stack(str(tmp_path), "c.nii").check(3))
    assert len(np.unique(out["data"][0])) > 2


def test_bad_nifti_batch_is_accounted_for_and_leaks_nothing(tmp_path):
    """A BIDS-like folder of NIfTIs whose headers and names carry identifiers (descrip, aux_file,
    db_name, the path): the good one is written; a truncated .nii.gz, a 4D series, a 2D image, a
    constant volume and a tiny one each fail with their reason; summary.files splits files_input
    exactly; no identifier reaches any byte under --output."""
    inp, out = tmp_path / "in", tmp_path / "out"
    d = inp / "sub-Quillfeather" / "ses-20240101" / "anat"
    d.mkdir(parents=True)
    phi = [b"Quillfeather", b"MRN99887766", b"ACC5551234", b"20240101", b"HEADERNAME"]

    def save(name, x):
        im = nib.Nifti1Image(np.asarray(x, np.float32), np.diag([0.9, 0.9, 5.0, 1.0]))
        im.header["descrip"], im.header["aux_file"], im.header["db_name"] = b"HEADERNAME", b"MRN99887766", b"ACC5551234"
        nib.save(im, str(d / name))
    save("sub-Quillfeather_MRN99887766_ct.nii.gz", _head())
    json.dump({"Modality": "CT", "PatientName": "Quillfeather^HEADERNAME"}, open(d / "sub-Quillfeather_MRN99887766_ct.json", "w"))
    raw = (d / "sub-Quillfeather_MRN99887766_ct.nii.gz").read_bytes()
    (d / "Quillfeather_cut.nii.gz").write_bytes(raw[:len(raw) // 2])
    save("Quillfeather_bold.nii.gz", np.stack([_head()] * 3, -1))
    save("Quillfeather_2d.nii.gz", _head()[:, :, 5])
    save("Quillfeather_const.nii.gz", np.full(SHAPE, 300.0))
    save("Quillfeather_tiny.nii.gz", _head()[:6, :6, :4])
    m = preprocess.run(str(inp), str(out), n_workers=1, cfg_progress=False)
    s = m["summary"]
    assert s["files_input"] == 7 and s["files"]["unaccounted"] == 0
    assert s["files"]["in_volumes"] == 1 and s["files"]["nifti_sidecars"] == 1
    assert s["files"]["in_failed_series"] == {
        "unreadable NIfTI data (EOFError)": 1, "4D NIfTI (need one 3D volume)": 1, "2D NIfTI (need one 3D volume)": 1,
        "constant image (no intensity range)": 1, "too few foreground tokens (0 < min_tokens 1)": 1}
    assert [v["modality"] for v in m["volumes"]] == ["CT"]
    for p in glob.glob(str(out / "**"), recursive=True):
        if os.path.isfile(p):
            blob = open(p, "rb").read()
            assert not [t for t in phi if t in blob], p


@pytest.mark.parametrize("text,want", [('{"Modality": "ct"}', "CT"), ('{"Modality": " CT "}', "CT"),
                                       ('\ufeff{"Modality": "MR"}', "MR"), ('{"Modality": "Mr"}', "MR"),
                                       ('{"Modality": "pt"}', "unsupported modality PT"),
                                       ('{"Modality": "CT-2"}', "unsupported modality CT2")])
def test_sidecar_modality_is_read_as_written(tmp_path, text, want):
    """A hand-written sidecar's modality in any case and spacing, or behind a byte-order mark, is read
    as CT / MR (an MR-looking volume, so only the sidecar can say CT). They failed as 'unsupported
    modality CT' for "CT ", 'unsupported modality none' for "ct" and as unreadable JSON with a BOM."""
    v = np.full(SHAPE, 100.0, np.float32)
    v[5:43, 5:51, 1:11] = 400.0
    nib.save(nib.Nifti1Image(v, np.diag([0.9, 0.9, 5.0, 1.0])), str(tmp_path / "s.nii"))
    (tmp_path / "s.json").write_text(text, encoding="utf-8")
    if want.startswith("unsupported"):
        with pytest.raises(dicom.SeriesError, match=rf"^{want} \(from its sidecar\)$"):
            dicom.nifti_stack(str(tmp_path), "s.nii")
    else:
        assert dicom.nifti_stack(str(tmp_path), "s.nii").modality == want


def test_zero_voxel_size_under_a_qform_fails(tmp_path):
    """pixdim 0 on a file whose affine comes from the qform: nibabel silently makes it 1 mm (it was
    loaded as a 1 mm volume); it fails naming the voxel size. With an sform, pixdim is not used."""
    img = nib.Nifti1Image(_head(), None)
    img.set_qform(np.diag([0.9, 0.9, 5.0, 1.0]), code=1)
    img.set_sform(None, code=0)
    def save_with_zero_pixdim(name):  # pixdim[2], float32 at byte 84 (nib.save rewrites the header's)
        nib.save(img, str(tmp_path / name))
        with open(tmp_path / name, "r+b") as f:
            f.seek(84)
            f.write(np.float32(0).tobytes())
    save_with_zero_pixdim("z.nii")
    with pytest.raises(dicom.SeriesError, match=r"^NIfTI voxel size 0.9 x 0 x 5 \(pixdim: zero or not finite\)$"):
        dicom.nifti_stack(str(tmp_path), "z.nii")
    img.set_sform(np.diag([0.9, 0.9, 5.0, 1.0]), code=1)
    save_with_zero_pixdim("z2.nii")
    assert dicom.nifti_stack(str(tmp_path), "z2.nii").ps == pytest.approx((0.9, 0.9))


def test_rgb_nifti_fails_with_its_reason(tmp_path):
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.diag([0.9, 0.9, 5.0, 1.0])), str(tmp_path / "c.nii"))
    with pytest.raises(dicom.SeriesError, match=r"^RGB NIfTI \(need grey images\)$"):
        dicom.nifti_stack(str(tmp_path), "c.nii")


@pytest.mark.parametrize("unit,factor", [("meter", 1e-3), ("micron", 1e3), ("mm", 1.0)])
def test_spatial_units_are_read_in_mm(tmp_path, unit, factor):
    """xyzt_units metres or microns: the affine is in those units (SimpleITK scales them to mm,
    nibabel does not). A 0.9 x 0.9 x 5 mm volume written in metres failed as 'absurd pixel spacing
    (0.0009 x 0.0009 mm)'; it loads with its spacing and origin in mm."""
    A = np.diag([0.9, 0.9, 5.0, 1.0])
    A[:3, 3] = (-21.6, -25.2, -30.0)
    img = nib.Nifti1Image(_head(), A * [[factor], [factor], [factor], [1]])
    img.header.set_xyzt_units(xyz=unit)
    nib.save(img, str(tmp_path / "u.nii"))
    st = dicom.nifti_stack(str(tmp_path), "u.nii")
    assert st.ps == pytest.approx((0.9, 0.9))
    want = [(21.6, 25.2, -30.0 + 5.0 * k) for k in range(SHAPE[2])]  # LPS: x and y of RAS negated, by hand
    got = sorted(map(tuple, np.asarray(st.origins, float)), key=lambda o: o[2])
    assert np.allclose(got, want, atol=1e-4)


def test_an_analyze_pair_is_named_not_called_a_non_dicom_file(tmp_path):
    """Both halves of an Analyze / NIfTI-pair image (.hdr + .img) failed as 'not a DICOM file', which
    sent users looking for a broken DICOM export; each now says what it is and what to do."""
    nib.save(nib.AnalyzeImage(_head(), np.diag([0.9, 0.9, 5.0, 1.0])), str(tmp_path / "head.img"))
    assert sorted(os.listdir(tmp_path)) == ["head.hdr", "head.img"]
    for name in ("head.hdr", "head.img"):
        err = dicom.scan_dicom(str(tmp_path), name)["error"]
        assert err.startswith("Analyze or NIfTI-pair file (.hdr/.img)"), err
    (tmp_path / "notes.txt").write_text("not an image")
    assert dicom.scan_dicom(str(tmp_path), "notes.txt")["error"] == "not a DICOM file"
