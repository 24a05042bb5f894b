"""Miniature copies of the public benchmark datasets in their published layouts, written by the
tests (tiny phantom volumes, the distributed file names and label columns), for
tests/test_benchmarks.py. Each builder returns what a test needs to check the adapter by hand:
the expected labels per dataset subject id and the inputs planted to be left out.

The subject ids, dates and UIDs below play the part of the identifiers the adapters must never
write: tests grep every output file for them."""
import csv
import os
import warnings

import nibabel as nib
import numpy as np

from dicom_synth import head_phantom, mutate_series, write_series

SHAPE = (10, 40, 36)   # (slices, rows, cols): enough foreground for a few tokens at 1 x 1 x 4 mm


def mr_volume(seed=0):
    """(K, R, C) MR-like intensities (no negative values)."""
    return np.clip(head_phantom(SHAPE, seed) + 1000, 0, None).astype(np.float32)


def write_nifti(path, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    v = mr_volume(seed).transpose(2, 1, 0)    # NIfTI i, j, k = columns, rows, slices
    nib.save(nib.Nifti1Image(v, np.diag([1.0, 1.0, 4.0, 1.0])), path)
    return path


def write_analyze(path, seed=0):
    """Analyze 7.5 .img/.hdr pair (OASIS-1's format)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    v = mr_volume(seed).transpose(2, 1, 0).astype(np.int16)
    nib.save(nib.AnalyzeImage(v, np.diag([1.0, 1.0, 4.0, 1.0])), path)
    return v


def write_csv(path, header, rows, delimiter=","):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)


# ----------------------------------------------------------------------------- OpenBHB

def openbhb(root):
    """participants.tsv + BIDS quasi-raw T1w. Returns {participant: age} of the studies the
    adapter must write, and the planted cases."""
    rows = [("sub-1001", "23.5", "M", "3"), ("1002", "67.25", "F", "5"), ("1003", "45.0", "F", "3"),
            ("1004", "n/a", "M", "5"),        # no age: left out
            ("1005", "30.0", "M", "3"),       # no image: left out
            ("1006", "71.0", "F", "7")]
    write_csv(os.path.join(root, "participants.tsv"), ["participant_id", "age", "sex", "site"], rows, "\t")
    for i, pid in enumerate(("1001", "1002", "1003", "1004", "1006", "1099")):   # 1099: image without a row
        d = os.path.join(root, f"sub-{pid}", "ses-1", "anat")
        write_nifti(os.path.join(d, f"sub-{pid}_ses-1_preproc-quasiraw_T1w.nii.gz"), seed=i)
    # a derived mask beside an image: must not become a study
    write_nifti(os.path.join(root, "sub-1001", "ses-1", "anat", "sub-1001_ses-1_desc-brain_mask.nii.gz"), seed=9)
    return {"1001": 23.5, "1002": 67.25, "1003": 45.0, "1006": 71.0}


# ----------------------------------------------------------------------------- ADNI

ADNI_HEADER = ["RID", "PTID", "VISCODE", "EXAMDATE", "DX_bl", "DX", "AGE", "M"]


def adni(root, dicom_subject=True, n_more=0):
    """ADNIMERGE.csv + LONI download layout; n_more further AD/CN subjects (alternating) and n_more
    MCI subjects (converting at m12 or stable to m36, alternating), enough for the paper protocol.
    Returns ({PTID: {task: label}}, {PTID: age})."""
    rows, expect, ages = [], {}, {}

    def subj(rid, ptid, dx_bl, visits, age, image_date="2006-01-10", series="MPRAGE", image=True, dicom_dir=False):
        for vis, m, dx in visits:
            rows.append([rid, ptid, vis, "2006-01-05" if vis == "bl" else "2008-01-05", dx_bl, dx, age, m])
        if image:
            d = os.path.join(root, "ADNI", ptid, series, f"{image_date}_10_20_30.0", f"I{rid}00")
            if dicom_dir:
                write_series(d, head_phantom(SHAPE, rid), modality="MR", intercept=0.0, phi=False, shuffle=False)
            else:
                write_nifti(os.path.join(d, f"ADNI_{ptid}_MR_{series}_br_raw_{image_date.replace('-', '')}_S1_I{rid}00.nii"),
                            seed=rid)
    subj(1, "002_S_0001", "AD", [("bl", 0, "Dementia"), ("m12", 12, "Dementia")], 74.3)
    expect["002_S_0001"], ages["002_S_0001"] = {"dementia": 1}, 74.3
    subj(2, "002_S_0002", "CN", [("bl", 0, "CN"), ("m24", 24, "CN")], 70.1, dicom_dir=dicom_subject)
    expect["002_S_0002"], ages["002_S_0002"] = {"dementia": 0}, 70.1
    subj(3, "003_S_0003", "CN", [("bl", 0, "CN")], 68.0)
    expect["003_S_0003"], ages["003_S_0003"] = {"dementia": 0}, 68.0
    subj(4, "003_S_0004", "SMC", [("bl", 0, "CN")], 66.0)                                  # SMC: left out
    subj(5, "005_S_0005", "LMCI", [("bl", 0, "MCI"), ("m06", 6, "MCI"), ("m12", 12, "Dementia")], 72.0)
    expect["005_S_0005"], ages["005_S_0005"] = {"pmci": 1}, 72.0
    subj(6, "005_S_0006", "EMCI", [("bl", 0, "MCI"), ("m24", 24, "MCI"), ("m36", 36, "MCI"), ("m48", 48, "")], 71.0)
    expect["005_S_0006"], ages["005_S_0006"] = {"pmci": 0}, 71.0
    subj(7, "007_S_0007", "LMCI", [("bl", 0, "MCI"), ("m12", 12, "MCI")], 75.0)             # short follow-up
    subj(8, "007_S_0008", "LMCI", [("bl", 0, "MCI"), ("m36", 36, "MCI"), ("m48", 48, "Dementia")], 77.0)  # late
    subj(9, "009_S_0009", "AD", [("bl", 0, "Dementia")], 80.0, image=False)                  # no image
    subj(10, "009_S_0010", "CN", [("bl", 0, "CN")], 69.0, image_date="2007-06-01")           # image a year late
    subj(11, "011_S_0011", "AD", [("bl", 0, "Dementia")], 79.0, series="Field_Mapping")      # not a T1 series
    for j in range(n_more):
        ad, conv = j % 2 == 0, j % 2 == 1
        ptid = f"{100 + j:03d}_S_{1000 + j:04d}"
        subj(1000 + j, ptid, "AD" if ad else "CN", [("bl", 0, "Dementia" if ad else "CN")], 60.0 + j)
        expect[ptid], ages[ptid] = {"dementia": int(ad)}, 60.0 + j
        ptid = f"{200 + j:03d}_S_{2000 + j:04d}"
        subj(2000 + j, ptid, "LMCI", [("bl", 0, "MCI"), ("m12", 12, "Dementia" if conv else "MCI"), ("m36", 36, "")
                                      if conv else ("m36", 36, "MCI")], 65.0 + j)
        expect[ptid], ages[ptid] = {"pmci": int(conv)}, 65.0 + j
    write_csv(os.path.join(root, "ADNIMERGE.csv"), ADNI_HEADER, rows)
    return expect, ages


# ----------------------------------------------------------------------------- AIBL

COLLECTION_HEADER = ["Image Data ID", "Subject", "Group", "Sex", "Age", "Visit", "Modality", "Description", "Type",
                     "Acq Date", "Format", "Downloaded"]


def aibl(root):
    """aibl_pdxconv_*.csv + the LONI collection csv + AIBL/<RID>/<series>/<date>/I<id>/ images.
    Returns ({RID: dementia label}, {RID: age})."""
    pdx, coll, expect, ages = [], [], {}, {}

    def subj(rid, dx, visits=("bl",), image_visits=("bl",), series="MPRAGE", dicom_dir=False, age=70.0):
        for v in visits:
            pdx.append([rid, 1, v, dx if v == "bl" else 3])
        for k, v in enumerate(image_visits):
            iid = 90000 + 10 * rid + k
            when = "2008-03-04" if v == "bl" else "2009-09-04"
            d = os.path.join(root, "AIBL", str(rid), series, f"{when}_11_22_33.0", f"I{iid}")
            if dicom_dir:
                write_series(d, head_phantom(SHAPE, rid), modality="MR", intercept=0.0, phi=False, shuffle=False)
            else:
                write_nifti(os.path.join(d, f"AIBL_{rid}_MR_{series}_br_raw_{when.replace('-', '')}_S1_I{iid}.nii"),
                            seed=rid % 7)
            coll.append([f"I{iid}", str(rid), "", "F", age, v, "MRI", series, "Original", when, "NiFTI", ""])
    for i, rid in enumerate((4, 8, 15)):
        subj(rid, 3, visits=("bl", "m18"), age=75.0 + i)
        expect[str(rid)], ages[str(rid)] = 1, 75.0 + i
    for i, rid in enumerate((16, 23, 42)):
        subj(rid, 1, age=65.0 + i, dicom_dir=rid == 23)
        expect[str(rid)], ages[str(rid)] = 0, 65.0 + i
    subj(50, 2)                                              # MCI: left out
    subj(51, -4)                                             # no diagnosis: left out
    subj(52, 3, image_visits=())                             # no image
    subj(53, 1, visits=("bl", "m18"), image_visits=("m18",))  # only a follow-up image
    subj(54, 3, series="Field_Mapping")                      # not a T1 series
    write_csv(os.path.join(root, "Data_extract_3.3.0", "aibl_pdxconv_01-Jun-2018.csv"),
              ["RID", "SITEID", "VISCODE", "DXCURREN"], pdx)
    write_csv(os.path.join(root, "AIBL_T1_baseline_6_01_2026.csv"), COLLECTION_HEADER, coll)
    return expect, ages


# ----------------------------------------------------------------------------- OASIS-1

OASIS_HEADER = ["ID", "M/F", "Hand", "Age", "Educ", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF", "Delay"]


def oasis1(root):
    """oasis_cross-sectional.csv + disc folders (Analyze). Returns ({ID: label}, {ID: voxels})."""
    rows = [("OAS1_0001_MR1", "F", "R", 74, 2, 3, 29, 0, 1344, 0.743, 1.306, ""),
            ("OAS1_0002_MR1", "F", "R", 55, 4, 1, 29, 1, 1147, 0.81, 1.531, ""),
            ("OAS1_0003_MR1", "F", "R", 73, 4, 3, 27, 2, 1454, 0.708, 1.207, ""),
            ("OAS1_0004_MR1", "M", "R", 28, "", "", "", "", 1588, 0.803, 1.105, ""),    # no CDR: left out
            ("OAS1_0005_MR1", "M", "R", 18, "", "", "", 0.5, 1737, 0.848, 1.01, ""),    # CDR 0.5: left out
            ("OAS1_0006_MR1", "F", "R", 80, 2, 4, 25, 0, 1400, 0.7, 1.2, ""),           # no image folder
            ("OAS1_0001_MR2", "F", "R", 74, 2, 3, 29, 0, 1344, 0.743, 1.306, 20)]       # repeat session
    write_csv(os.path.join(root, "oasis_cross-sectional.csv"), OASIS_HEADER, rows)
    vox = {}
    for i, sid in enumerate(("OAS1_0001_MR1", "OAS1_0002_MR1", "OAS1_0003_MR1", "OAS1_0004_MR1", "OAS1_0005_MR1")):
        s = os.path.join(root, "disc1", sid)
        if sid == "OAS1_0003_MR1":   # only RAW: the fallback image
            vox[sid] = write_analyze(os.path.join(s, "RAW", f"{sid}_mpr-1_anon.img"), seed=i)
        else:
            vox[sid] = write_analyze(os.path.join(s, "PROCESSED", "MPRAGE", "SUBJ_111", f"{sid}_mpr_n4_anon_sbj_111.img"), i)
            write_analyze(os.path.join(s, "RAW", f"{sid}_mpr-1_anon.img"), seed=i + 20)
            write_analyze(os.path.join(s, "FSL_SEG", f"{sid}_mpr_n4_anon_111_t88_masked_gfc_fseg.img"), seed=i + 40)
    return {"OAS1_0001_MR1": 0, "OAS1_0002_MR1": 1, "OAS1_0003_MR1": 1}, vox


# ----------------------------------------------------------------------------- ABIDE

def abide(root):
    """Phenotypic csv + INDI (site/id/session/anat) and BIDS layouts. Returns {SUB_ID: label}."""
    rows = [(50002, "PITT", 1, 16.77), (50003, "PITT", 2, 24.45), (51456, "CALTECH", 1, 55.4),
            (51457, "CALTECH", 2, 22.9),        # no image: left out
            ]
    write_csv(os.path.join(root, "Phenotypic_V1_0b_preprocessed1.csv"), ["SUB_ID", "SITE_ID", "DX_GROUP", "AGE_AT_SCAN"],
              rows)
    write_nifti(os.path.join(root, "Pitt", "0050002", "session_1", "anat_1", "mprage.nii.gz"), 0)
    write_nifti(os.path.join(root, "Pitt", "0050002", "session_1", "rest_1", "rest.nii.gz"), 5)   # functional: unused
    write_nifti(os.path.join(root, "sub-0050003", "anat", "sub-0050003_T1w.nii.gz"), 1)
    write_nifti(os.path.join(root, "Caltech", "0051456", "session_1", "anat_1", "mprage.nii.gz"), 2)
    write_nifti(os.path.join(root, "Caltech", "0051999", "session_1", "anat_1", "mprage.nii.gz"), 3)   # no row
    return {"50002": 1, "50003": 0, "51456": 1}


# ----------------------------------------------------------------------------- RSNA ICH 2019

RSNA_ORDER = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


def rsna(root, n_more=0):
    """stage_2_train.csv + stage_2_train/ID_<hex>.dcm. Three studies (two of one patient), each a
    8-slice series whose SOPInstanceUIDs are Kaggle's ID_<hex>, plus n_more studies of one patient
    each (every other one a bleed of one or two subtypes: enough for the paper protocol's test set
    and 8 folds). Returns ({StudyInstanceUID: {class: label}}, {StudyInstanceUID: PatientID},
    planted counts)."""
    img_dir = os.path.join(root, "stage_2_train")
    tmp = os.path.join(root, "_tmp")
    # per study: per slice the set of subtypes present
    plan = [("ID_aaa001", [set(), {"subdural"}, {"subdural", "subarachnoid"}] + [set()] * 8),
            ("ID_aaa001", [set()] * 8),
            ("ID_bbb002", [{"intraparenchymal"}, set(), {"intraventricular"}] + [set()] * 5)]
    subtypes = RSNA_ORDER[:5]
    for j in range(n_more):
        bleed = [set()] * 8
        if j % 2 == 0:
            a, b = subtypes[j % 5], subtypes[(j // 2) % 5]
            bleed = [set(), {a}, {a, b}] + [set()] * 5
        plan.append((f"ID_c{j:04x}", bleed))
    rows, expect, patients, n = [], {}, {}, 0
    for s, (pid, slices) in enumerate(plan):
        uid, _, paths = write_series(os.path.join(tmp, str(s)), head_phantom((8, 48, 40), s), phi=False,
                                     shuffle=False)
        sops = [f"ID_{s:02d}{k:02d}{'abcdefgh'[k]}{s}e9" for k in range(8)]

        def fix(ds, i, sops=sops, pid=pid):
            ds.SOPInstanceUID = sops[i]
            ds.PatientID = pid
        with warnings.catch_warnings():   # Kaggle's SOPInstanceUIDs (ID_<hex>) are not valid UIDs
            warnings.simplefilter("ignore")
            mutate_series(os.path.join(tmp, str(s)), fix)
        os.makedirs(img_dir, exist_ok=True)
        for i, p in enumerate(sorted(paths)):
            os.replace(p, os.path.join(img_dir, sops[i] + ".dcm"))
        y = {c: 0 for c in ("ich", "edh", "iph", "ivh", "sah", "sdh")}
        for sop, present in zip(sops, slices):
            for t in RSNA_ORDER:
                v = int(t in present or (t == "any" and bool(present)))
                rows.append((f"{sop}_{t}", v))
            for t in present:
                y[{"epidural": "edh", "intraparenchymal": "iph", "intraventricular": "ivh", "subarachnoid": "sah",
                   "subdural": "sdh"}[t]] = 1
            y["ich"] |= int(bool(present))
            n += 1
        expect[uid], patients[uid] = y, pid
    rows.insert(3, rows[2])                                                    # identical duplicate row
    rows += [(f"ID_ffff99_{t}", int(t in ("epidural", "any"))) for t in RSNA_ORDER]   # label rows, no file
    # a DICOM file without label rows (another study): preprocessed, never labelled
    write_series(os.path.join(tmp, "x"), head_phantom((8, 48, 40), 7), phi=False, names=[f + ".dcm" for f in "abcdefgh"])
    for f in "abcdefgh":
        os.replace(os.path.join(tmp, "x", f + ".dcm"), os.path.join(img_dir, f"ID_unlab{f}.dcm"))
    write_csv(os.path.join(root, "stage_2_train.csv"), ["ID", "Label"], rows)
    return expect, patients, dict(n_images=n, n_nofile=1, n_unlabelled=8)


# ----------------------------------------------------------------------------- CQ500

CQ500_COLS = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "BleedLocation-Left", "BleedLocation-Right", "ChronicBleed",
              "Fracture", "CalvarialFracture", "OtherFracture", "MassEffect", "MidlineShift"]


def cq500(root, n_more=0, shape=(3, 32, 32)):
    """reads.csv (three readers) + "CQ500CT<n> CQ500CT<n>/Unknown Study/<series>/*.dcm", volumes of
    `shape` (K, R, C), plus n_more studies whose readers agree on a bleed (three in four studies)
    and its side (left or right). Returns ({StudyInstanceUID: {column: majority}}, reads
    as {name: (3, 14) array})."""
    rng = np.random.default_rng(3)
    reads, rows, expect = {}, [], {}
    for n in (0, 1, 2, 3, *range(10, 10 + n_more)):
        r = (rng.random((3, len(CQ500_COLS))) < 0.4).astype(int)
        if n == 1:
            r[:, 0] = [1, 1, 0]
            r[:, 6] = [1, 1, 0]
            r[:, 7] = [0, 0, 1]    # left by majority
        if n >= 10:
            j = n - 10
            r[:, 0] = r[:, 1] = int(j % 4 != 3)
            r[:, 6], r[:, 7] = int(j % 4 in (0, 2)), int(j % 4 == 1)
        name = f"CQ500-CT-{n}"
        reads[name] = r
        rows.append([name, "B1"] + [int(r[i, j]) for i in range(3) for j in range(len(CQ500_COLS))])
        if n != 3:   # CQ500-CT-3: read but not downloaded
            d = os.path.join(root, f"CQ500CT{n} CQ500CT{n}", "Unknown Study", "CT PLAIN THIN")
            uid, _, _ = write_series(d, head_phantom(shape, n), phi=False)
            write_series(os.path.join(root, f"CQ500CT{n} CQ500CT{n}", "Unknown Study", "CT 0.625mm"),
                         head_phantom(shape, n + 10), study_uid=uid, phi=False)
            expect[uid] = r
    d = os.path.join(root, "CQ500CT9 CQ500CT9", "Unknown Study", "CT 5mm")
    write_series(d, head_phantom(shape, 9), phi=False)                         # folder without a read
    header = ["name", "Category"] + [f"R{i}:{c}" for i in (1, 2, 3) for c in CQ500_COLS]
    write_csv(os.path.join(root, "reads.csv"), header, rows)
    return expect, reads


# ----------------------------------------------------------------------------- grounding sets

def brats21(root):
    """BraTS2021_<id>/BraTS2021_<id>_{t1,t1ce,t2,flair,seg}.nii.gz; one subject without seg.
    Returns {id: seg voxels} of the subjects with both."""
    segs = {}
    for i, sid in enumerate(("BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003")):
        d = os.path.join(root, "BraTS2021_Training_Data", sid)
        for q in ("t1", "t1ce", "t2", "flair"):
            write_nifti(os.path.join(d, f"{sid}_{q}.nii.gz"), seed=i)
        if sid != "BraTS2021_00003":
            seg = np.zeros(SHAPE[::-1], np.uint8)
            seg[10:16, 12:20, 3:6] = [1, 2, 4][i]
            nib.save(nib.Nifti1Image(seg, np.diag([1.0, 1.0, 4.0, 1.0])), os.path.join(d, f"{sid}_seg.nii.gz"))
            segs[sid] = seg
    return segs


def atlas2(root):
    """ATLAS v2.0 BIDS layout; one test-release subject without a mask. Returns the masked ids."""
    out = []
    for i, sid in enumerate(("r001s001", "r001s002", "r040s001")):
        d = os.path.join(root, "ATLAS_2", "Training" if i < 2 else "Testing", sid[:4].upper(), f"sub-{sid}", "ses-1", "anat")
        write_nifti(os.path.join(d, f"sub-{sid}_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz"), seed=i)
        if i < 2:
            m = np.zeros(SHAPE[::-1], np.uint8)
            m[5:9, 5:9, 2:4] = 1
            nib.save(nib.Nifti1Image(m, np.diag([1.0, 1.0, 4.0, 1.0])),
                     os.path.join(d, f"sub-{sid}_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz"))
            out.append(f"sub-{sid}")
    return out



def msseg16(root):
    """MSSEG-2016 Center_<cc>/Patient_<pp>/{Preprocessed_Data,Raw_Data,Masks}; one patient without
    a consensus, one with only the raw FLAIR. Returns {Center/Patient: consensus voxels}."""
    masks = {}
    for i, (c, p) in enumerate(((1, 1), (1, 2), (3, 1), (7, 4))):
        d = os.path.join(root, "Training", f"Center_{c:02d}", f"Patient_{p:02d}")
        if (c, p) != (3, 1):
            write_nifti(os.path.join(d, "Preprocessed_Data", "FLAIR_preprocessed.nii.gz"), seed=i)
            write_nifti(os.path.join(d, "Preprocessed_Data", "T1_preprocessed.nii.gz"), seed=i + 10)
        write_nifti(os.path.join(d, "Raw_Data", "FLAIR.nii.gz"), seed=i + 20)
        if (c, p) != (7, 4):
            m = np.zeros(SHAPE[::-1], np.uint8)
            m[20 + i:26 + i, 15:21, 4:7] = 1
            os.makedirs(os.path.join(d, "Masks"), exist_ok=True)
            for name in ("Consensus", "ManualSegmentation_1"):
                nib.save(nib.Nifti1Image(m, np.diag([1.0, 1.0, 4.0, 1.0])), os.path.join(d, "Masks", f"{name}.nii.gz"))
            masks[f"Center_{c:02d}/Patient_{p:02d}"] = m
    return masks
