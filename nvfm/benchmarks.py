r"""The paper's public benchmarks from a user's local copy of each dataset -> labels for
`train_probe.py --protocol=paper`.

    python -m nvfm.benchmarks --dataset=openbhb --root=/data/openBHB --out=bench/openbhb
    python preprocess.py --input=bench/openbhb/images --output=bench/openbhb/shards
    python encode.py --shards=bench/openbhb/shards --encoder=ENC --out=bench/openbhb/features
    python train_probe.py --protocol=paper --task=age --modality=MR --features=bench/openbhb/features \
        --labels=bench/openbhb/labels_age.csv --out=bench/openbhb/probe_age
    python evaluate.py --probes=bench/openbhb/probe_age/probe.pt --labels=bench/openbhb/labels_age.csv --out=...

or all of it, resumable, for several encoders, in one command (the same stage scripts as subprocesses):

    python bench/bench_public.py --dataset=openbhb --root=/data/openBHB --encoders=ENC,random:vitb

Each adapter reads the dataset's folder layout and label files as distributed (nothing is
downloaded, nothing in --root is modified) and writes under --out:
- labels_<task>.csv: study_key, subject, modality, split (empty: the protocol splits), age,
  then the task's 0/1 class columns (none for the age task). study_key is the key preprocess.py
  gives the study (dicom.salted_hash of its StudyInstanceUID, or of "nifti:" + its folder under
  --input); subject is a salted hash of the dataset's subject id, used only to keep a subject's
  studies on one side of every split. Same --salt (or $NVFM_SALT) as preprocess.py.
- images/ (NIfTI/Analyze datasets): one folder per study, named by a salted hash, holding a
  link to (or, with link=copy, a copy of; Analyze .img/.hdr: a NIfTI conversion of) the one
  image the labels describe, so preprocess.py sees exactly the labelled scans and not the
  dataset's masks or derived maps. preprocess.py --input=OUT/images. The links point at your
  copy (their targets hold the dataset's subject ids): images/ is an input, not for sharing.
  DICOM datasets (RSNA, CQ500): preprocess.py --input=the dataset's own image folder.
- adapter_report.json: what happened to every input row and image (counts by reason, per task
  class counts); no ids, names, dates or UIDs. The same counts are printed.
- staged.json: a salted hash per images/ folder of the files it was staged from, so that a rerun
  which picks other files (or another --link) stages that folder afresh rather than keeping links
  to the earlier pick.
Nothing written holds a name, subject id, date or UID of the dataset.

Bad input: a missing label file or column, an unparsable value or conflicting duplicate rows stop
the adapter with one line naming the file (and line) and the reason; label rows without an
image, images without a label row and rows outside a task are counted by reason, so every input
row is accounted for (`Tally`). Where several files could be a row's image (or several label
files match), no adapter silently takes the first found: each docstring states its rule, which
either picks by a stated order and counts the rows it applied to (OpenBHB's quasi-raw over its
derived maps, ADNI's image closest to the exam date then the lowest LONI image id, AIBL's lowest
image id; never an order of paths or series names) or leaves the row out, counted as ambiguous (a
second label file is an error asking for --labels_file). A DICOM folder is labelled by the one
StudyInstanceUID of all its files' headers: a folder of several studies is left out, counted, and so
are two rows (subjects, reads) whose folders hold one and the same study (which one it is of cannot
be told).

Datasets (labels as distributed; citation; licence: each dataset's own terms apply to your copy
and everything derived from it, check them before sharing figures or outputs):
- openbhb  OpenBHB (Dufumier et al., NeuroImage 2022): participants.tsv, T1w NIfTI. Task age.
- adni     ADNI (adni.loni.usc.edu): ADNIMERGE.csv + the NIfTI/DICOM download. Tasks
           dementia (AD vs CN), pmci (pMCI vs sMCI). ADNI Data Use Agreement (no redistribution).
- aibl     AIBL (Ellis et al., Int Psychogeriatr 2009): aibl_pdxconv_*.csv + the LONI collection csv +
           the NIfTI/DICOM download. Task dementia (AD vs CN at baseline), the ADNI probe's
           external test. AIBL data use agreement (no redistribution).
- oasis1   OASIS-1 cross-sectional (Marcus et al., J Cogn Neurosci 2007): oasis_cross-sectional.csv
           + disc folders (Analyze). Task dementia (CDR >= 1 vs 0). OASIS Data Use Agreement.
- abide    ABIDE I (Di Martino et al., Mol Psychiatry 2014): phenotypic csv + anatomical NIfTI.
           Task autism. CC BY-NC-SA (INDI).
- rsna     RSNA Intracranial Hemorrhage Detection 2019 (Flanders et al., Radiol AI 2020):
           stage_2_train.csv + stage_2_train/*.dcm. Task ich (study level). Competition data
           licence: non-commercial research.
- cq500    CQ500 (Chilamkurthy et al., Lancet 2018): reads.csv + the study folders. Task ich
           (ICH, subtypes, bleed sides, fractures, mass effect, midline shift; majority of three
           readers). CC BY-NC-SA 4.0.
- brats21, atlas2, msseg16  grounding sets (BraTS 2021 tumour, ATLAS v2.0 stroke, MSSEG-2016
           multiple sclerosis): lesion masks for the pointing game (findings.jsonl + masks/); see
           their docstrings.
"""
import csv
import io
import json
import math
import os
import re
import shutil
import sys
from collections import Counter
from datetime import date

from nvfm import dicom
from nvfm.data import write_atomic

# ----------------------------------------------------------------------------- CLI settings
dataset = ""             # openbhb | adni | aibl | oasis1 | abide | rsna | cq500 | brats21 | atlas2 | msseg16
root = ""                # your copy of the dataset, as distributed
out = ""                 # output folder (labels_<task>.csv, images/, adapter_report.json)
salt = ""                # "" -> $NVFM_SALT -> dicom.DEFAULT_SALT; must equal preprocess.py's
link = "symlink"         # how images/ refers to the originals: symlink | hardlink | copy
workers = 4              # processes reading DICOM headers (rsna)
labels_file = ""         # the label file, when not at its distributed name under root
adni_horizon_months = 36  # pMCI: dementia by this visit; sMCI: followed this long without it
adni_max_days = 90       # a baseline image must be this close to the baseline exam date
adni_series = (r"^(?!.*(__|gradwarp|b1_corr|n3|scaled|normali[sz]ed|masked|registered))"
               r"(?=.*(mp.?rage|ir.?f?spgr))")   # regex (case-insensitive) on ADNI/AIBL series folders;
    # default: raw T1 only (MPRAGE, IR-SPGR, IR-FSPGR); LONI names a preprocessed series by its steps
    # joined "__" (MT1__N3m, MPR__GradWarp__B1_Correction__N3__Scaled) or in words (..._registered_MPRAGE)
grounding_class = ""     # grounding sets: the lesions' class ("" = glioma, chronic_ischemic_stroke, multiple_sclerosis)
# -----------------------------------------------------------------------------


class BenchmarkError(ValueError):
    """A one-line user error: the file and the reason."""


def resolve_salt(s=""):
    """The salt rule preprocess.py uses too (nvfm/dicom.py): s, else $NVFM_SALT, else the public default."""
    return dicom.resolve_salt(s)


class Tally(Counter):
    """Counts of what happened to every input row / image, by reason."""

    def line(self):
        return ", ".join(f"{v} {k}" for k, v in sorted(self.items()))


def _read_table(path, required, delimiter=None):
    """csv/tsv -> (rows as dicts with their line numbers under '_line', columns). One-line errors
    for a missing file or missing required columns."""
    if not os.path.isfile(path):
        raise BenchmarkError(f"{path}: not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        text = f.read()
    if delimiter is None:
        head = text.split("\n", 1)[0]
        delimiter = "\t" if path.endswith(".tsv") or head.count("\t") > head.count(",") else ","
    # the file's own line breaks: a quoted field may hold one, and str.splitlines would also split at \x0c, \u2028...
    rd = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    cols = [c.strip() for c in (rd.fieldnames or [])]
    missing = [c for c in required if c not in cols]
    if missing:
        raise BenchmarkError(f"{path}: missing column(s) {missing} (found {cols[:12]})")
    rows = []
    for r in rd:
        r = {(k or "").strip(): (v or "").strip() if isinstance(v, str) else "" for k, v in r.items()}
        r["_line"] = rd.line_num   # the row's (last) line in the file, blank lines and multi-line fields counted
        rows.append(r)
    return rows, cols


# how exports write an empty cell (compared lower-case): a missing value, never a number
MISSING = ("", "n/a", "na", "nan", "none", "null")


def _missing(v):
    return (v or "").strip().lower() in MISSING


def _number(v, path, ln, col):
    """A finite float, else a one-line error (float() alone takes "nan" and "inf")."""
    try:
        x = float(v)
    except ValueError:
        x = float("nan")
    if not math.isfinite(x):
        raise BenchmarkError(f"{path}:{ln}: column {col!r} must be a number, got {v!r}")
    return x


def _nifti_or_analyze(name):
    n = name.lower()
    return n.endswith((".nii", ".nii.gz", ".img")) or n.endswith("_t1w.npy")


# OpenBHB's .npy release: quasi-raw T1w arrays (1, 182, 218, 182) on the 1 mm MNI152 grid; this is
# that grid's affine (FSL's MNI152_T1_1mm, RAS mm), which their arrays are assumed to be stored in
MNI152_1MM_AFFINE = ((-1.0, 0.0, 0.0, 90.0), (0.0, 1.0, 0.0, -126.0), (0.0, 0.0, 1.0, -72.0), (0.0, 0.0, 0.0, 1.0))


def _one_label_file(root_dir, pattern, what):
    """The one file under root_dir whose name fully matches `pattern` (case-insensitive). None, or
    several (two releases or copies of the label file: which one is meant is ambiguous), is a
    one-line error asking for --labels_file."""
    hits = sorted(os.path.join(d, f) for d, _, fs in os.walk(root_dir, followlinks=True) for f in fs
                  if re.fullmatch(pattern, f, re.I))
    if len(hits) != 1:
        names = ", ".join(os.path.relpath(h, root_dir) for h in hits)
        why = f"{len(hits)} found ({names})" if hits else "none found"
        raise BenchmarkError(f"{root_dir}: {what}: {why}; pass the one to use as --labels_file")
    return hits[0]


def _walk_images(base):
    """Sorted relative paths of NIfTI (.nii, .nii.gz) and Analyze (.img) files under base."""
    found = []
    for d, dirs, files in os.walk(base, followlinks=True):
        dirs.sort()
        found += [os.path.relpath(os.path.join(d, f), base) for f in files if _nifti_or_analyze(f)]
    return sorted(found)


# ----------------------------------------------------------------------------- one study


class Study:
    """One labelled study: what preprocess.py will see and the labels of each task.

    sid: a dataset-unique study id (used only for hashing); subject: the dataset's subject id;
    image: absolute path of the image file (NIfTI/Analyze) or DICOM series folder to stage, or
    None for DICOM studies keyed by uid; uid: StudyInstanceUID (DICOM datasets); modality
    CT | MR; age in years or None; tasks: {task: {class: 0/1}} ({} values for the age task)."""

    def __init__(self, sid, subject, modality, image=None, uid=None, age=None):
        self.sid, self.subject, self.modality, self.image, self.uid, self.age = sid, subject, modality, image, uid, age
        self.tasks = {}
        self.more_images = []   # [(path, name)]: further sequences of the study (BraTS)
        self.mask = None        # lesion mask NIfTI (grounding sets)


def _source_stamp(study, salt_value, how):
    """A salted hash of what a study's staged folder (and mask) is made from: the files' paths, sizes
    and mtimes, their roles and the link mode. No id reaches it (the paths are hashed)."""
    files = [("image", study.image)] + [(q, p) for p, q in study.more_images]
    files += [("mask", study.mask)] if study.mask else []
    stat = [(q, os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for q, p in files]
    return dicom.salted_hash(json.dumps([how, stat]), salt_value)


def _stage(study, images_dir, salt_value, how):
    """Put the study's image under images_dir/<hashed folder>/ and return its study key, the key
    preprocess.py --input=images_dir derives: NIfTI -> salted_hash("nifti:" + folder); a DICOM
    folder -> salted_hash(its StudyInstanceUID, study.uid, which the adapter read from its files)."""
    folder = dicom.salted_hash(f"study:{study.sid}", salt_value)
    dst_dir = os.path.join(images_dir, folder)
    os.makedirs(dst_dir, exist_ok=True)
    src = study.image
    if os.path.isdir(src):   # a DICOM series folder (ADNI DICOM download)
        if not study.uid:
            raise BenchmarkError(f"{src}: a DICOM image folder whose StudyInstanceUID was not read")
        dst = os.path.join(dst_dir, "dicom")
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(src), dst) if how != "copy" else shutil.copytree(src, dst)
        return dicom.study_key(study.uid, salt_value)
    low = src.lower()
    if low.endswith(".npy"):   # OpenBHB arrays: NIfTI on the MNI grid they were resampled to
        dst = os.path.join(dst_dir, "image.nii.gz")
        if not os.path.exists(dst):
            import nibabel as nib
            import numpy as np
            a = np.load(src, mmap_mode="r")
            a = np.asarray(a[0] if a.ndim == 4 and a.shape[0] == 1 else a, np.float32)
            if a.ndim != 3:
                raise BenchmarkError(f"{src}: a {a.ndim}D array (need one 3D volume)")
            nib.save(nib.Nifti1Image(a, np.array(MNI152_1MM_AFFINE)), dst + ".tmp.nii.gz")
            os.replace(dst + ".tmp.nii.gz", dst)
    elif low.endswith(".img"):   # Analyze 7.5 (OASIS): preprocess reads NIfTI, so convert once
        dst = os.path.join(dst_dir, "image.nii.gz")
        if not os.path.exists(dst):
            import nibabel as nib
            img = nib.load(src)
            nib.save(nib.Nifti1Image(img.get_fdata(dtype="float32"), img.affine), dst + ".tmp.nii.gz")
            os.replace(dst + ".tmp.nii.gz", dst)
    else:
        _place(src, os.path.join(dst_dir, "image.nii.gz" if low.endswith(".gz") else "image.nii"), how)
    for p, name in study.more_images:
        _place(p, os.path.join(dst_dir, name + (".nii.gz" if p.lower().endswith(".gz") else ".nii")), how)
    return dicom.nifti_study_key(folder, salt_value)


def _place(src, dst, how):
    if os.path.lexists(dst):
        return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if how == "symlink":
        os.symlink(os.path.abspath(src), dst)
    elif how == "hardlink":
        os.link(src, dst)
    else:
        shutil.copyfile(src, dst)


def _folder_study_uids(path):
    """The StudyInstanceUIDs of the DICOM files under a folder: a set (empty: none). Every file's
    header is read (no pixels), so a folder mixing two studies is seen, not labelled by its first file."""
    import pydicom
    uids = set()
    for d, dirs, files in os.walk(path, followlinks=True):
        for f in files:
            try:
                ds = pydicom.dcmread(os.path.join(d, f), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            except Exception:   # not a DICOM file: preprocess.py counts it too
                continue
            uids.add(str(ds.get("StudyInstanceUID", "") or ""))
    return uids - {""}


def _one_study_uid(path, tally, what):
    """The one StudyInstanceUID of a DICOM folder, or None with the reason counted in tally
    ("<what> whose DICOM folder <reason> (left out...)")."""
    uids = _folder_study_uids(path)
    if len(uids) == 1:
        return uids.pop()
    why = "holds no DICOM file with a StudyInstanceUID (left out)" if not uids else \
        "mixes two or more studies (left out: ambiguous)"
    tally[f"{what} whose DICOM folder {why}"] += 1
    return None


def write_outputs(name, studies, tally, out_dir, salt_value="", how="symlink", columns=None, extra=None):
    """Key, stage and write one dataset: labels_<task>.csv per task, images/, adapter_report.json.

    studies: list of Study; columns: {task: [class names]} (the age task has none). Returns the
    report dict (also written as JSON). No input id reaches a file: keys and subjects are salted
    hashes, image folders are named by hashes."""
    s = resolve_salt(salt_value)
    os.makedirs(out_dir, exist_ok=True)
    images_dir = os.path.join(out_dir, "images")
    rows = {t: [] for t in (columns or {})}
    seen, findings = {}, []
    # a folder staged from other files (another pick, a narrowed adni_series, another --link) is
    # staged afresh: its existing links would otherwise stand for the new pick
    staged_path = os.path.join(out_dir, "staged.json")   # {folder: _source_stamp}
    try:
        with open(staged_path) as f:
            staged = json.load(f)
    except (OSError, ValueError):
        staged = {}
    plan = {dicom.salted_hash(f"study:{st.sid}", s): _source_stamp(st, s, how) for st in studies if st.image}
    same = {f: v for f, v in plan.items() if staged.get(f) == v}
    write_atomic(staged_path, json.dumps(same))   # a run killed while restaging vouches only for untouched folders
    for f in sorted(plan.keys() - same.keys()):
        if os.path.lexists(os.path.join(images_dir, f)):
            shutil.rmtree(os.path.join(images_dir, f))   # links inside are removed, never followed
        for ext in (".nii", ".nii.gz"):
            mask = os.path.join(out_dir, "masks", dicom.nifti_study_key(f, s) + ext)
            if os.path.lexists(mask):
                os.remove(mask)
    for st in studies:
        key = _stage(st, images_dir, s, how) if st.image else dicom.study_key(st.uid, s)
        if key in seen:
            # the sids are not named: they hold the dataset's subject ids (run() leaves such studies out)
            raise BenchmarkError(f"{name}: two labelled studies share one image study (one StudyInstanceUID)")
        seen[key] = st.sid
        subj = dicom.subject_key(st.subject, s, name)
        if st.mask:   # grounding: the lesion mask, in the image's space, for evaluate.py's pointing game
            rel = f"masks/{key}.nii.gz" if st.mask.lower().endswith(".gz") else f"masks/{key}.nii"
            _place(st.mask, os.path.join(out_dir, rel), how)
            cls = next(c for y in st.tasks.values() for c in y)
            findings.append({"study_key": key, "study": key[:12], "lesions": [{"diagnosis": cls, "mask": rel}]})
        for t, y in st.tasks.items():
            rows[t].append(dict(study_key=key, subject=subj, modality=st.modality, split="",
                                age="" if st.age is None else f"{st.age:.2f}", **y))
    # a rerun (another salt, fewer rows) must not leave earlier staged studies for preprocess.py to pick up
    keep = {dicom.salted_hash(f"study:{st.sid}", s) for st in studies if st.image}
    stale = [f for f in (os.listdir(images_dir) if os.path.isdir(images_dir) else [])
             if re.fullmatch(r"[0-9a-f]{16}", f) and f not in keep]
    for f in stale:
        shutil.rmtree(os.path.join(images_dir, f))   # links inside are removed, never followed
    if stale:
        tally["earlier staged folders removed from images/"] = len(stale)
    write_atomic(staged_path, json.dumps(plan))
    report = {"dataset": name, "input": dict(sorted(tally.items())), "n_studies": len(studies),
              "n_subjects": len({st.subject for st in studies}), "tasks": {}, **(extra or {})}
    for t, rs in rows.items():
        path = os.path.join(out_dir, f"labels_{t}.csv")
        fields = ["study_key", "subject", "modality", "split", "age"] + list(columns[t])
        rs.sort(key=lambda r: r["study_key"])   # no input order leaks; same input, same bytes
        with open(path + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(rs)
        os.replace(path + ".tmp", path)
        report["tasks"][t] = {"file": os.path.basename(path), "n_studies": len(rs),
                              "n_subjects": len({r["subject"] for r in rs}),
                              "positives": {c: sum(int(r[c]) for r in rs) for c in columns[t]}}
    if findings:
        findings.sort(key=lambda r: r["study_key"])
        with open(os.path.join(out_dir, "findings.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in findings)
        report["findings"] = "findings.jsonl"
    with open(os.path.join(out_dir, "adapter_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report


# ----------------------------------------------------------------------------- OpenBHB


def openbhb(root_dir, labels_path=""):
    """OpenBHB: brain-age regression on T1w MRI (Dufumier et al., NeuroImage 2022; the
    "quasi-raw" T1w images of ~10 public cohorts). Licence: per source cohort (see OpenBHB's page).

    Layout: ROOT/participants.tsv (columns participant_id, age; optional session) and the T1w
    NIfTI files anywhere under ROOT, named BIDS-style with sub-<participant_id> (e.g.
    sub-1000/ses-1/anat/sub-1000_ses-1_preproc-quasiraw_T1w.nii.gz), or the .npy release (see
    below). participant_id with or without 'sub-'.
    Labels: age (years) of the row. One study per row, whose image is the one T1w of its
    participant (and session, when the tsv has one and the row's cell is not empty or n/a). A row that matches two or more T1w files
    (several sessions and no session column: the age may be of any; two runs; .nii beside .nii.gz)
    is left out, counted, never given the first file; so are rows that match one and the same image
    (a row without a session beside a row of its session: one image, two ages). Derived maps of the
    release (sub-<id>_preproc-cat12vbm_desc-gm_T1w, _preproc-freesurfer_..., any preproc- other than
    quasiraw) are counted and never staged. The .npy release
    (sub-<id>_preproc-quasiraw_T1w.npy, arrays on the 1 mm MNI152 grid) is converted to NIfTI in
    images/ with that grid's affine (MNI152_1MM_AFFINE, an assumption about their arrays' axis
    order: check one overlay before trusting laterality; brain age does not depend on it).
    Returns (studies, tally, columns)."""
    path = labels_path or os.path.join(root_dir, "participants.tsv")
    rows, cols = _read_table(path, ["participant_id", "age"])
    images, derived = {}, 0
    for rel in _walk_images(root_dir):
        m = re.search(r"sub-([A-Za-z0-9]+)", rel)
        if m and "t1w" in os.path.basename(rel).lower():
            pre = re.search(r"_preproc-([A-Za-z0-9]+)", os.path.basename(rel))
            if pre and pre.group(1).lower() != "quasiraw":   # cat12vbm gray matter, freesurfer maps: not a T1w
                derived += 1
                continue
            ses = re.search(r"ses-([A-Za-z0-9]+)", rel)
            images.setdefault((m.group(1), ses.group(1) if ses else ""), []).append(rel)
    if not images:
        raise BenchmarkError(f"{root_dir}: no sub-<id>*T1w*.nii(.gz) or sub-<id>*_T1w.npy image")
    tally, studies, seen, picked = Tally(rows=len(rows)), [], {}, []
    for r in rows:
        pid = r["participant_id"].removeprefix("sub-")
        # a session cell written n/a (BIDS's missing value) is no session, as an empty one: never a session "n/a"
        ses = "" if _missing(r.get("session")) else r["session"].removeprefix("ses-")
        if (pid, ses) in seen:
            raise BenchmarkError(f"{path}:{r['_line']}: duplicate participant (also line {seen[pid, ses]})")
        seen[pid, ses] = r["_line"]
        if _missing(r["age"]):
            tally["rows without age (left out)"] += 1
            continue
        age = _number(r["age"], path, r["_line"], "age")
        keys = sorted(k for k in images if k[0] == pid and (not ses or k[1] == ses))
        if not keys:
            tally["rows without an image (left out)"] += 1
            continue
        cand = [p for k in keys for p in images[k]]
        if len(cand) > 1:   # the age may be of any of them (another session, another run)
            tally["rows matching two or more T1w images (left out: ambiguous)"] += 1
            continue
        picked.append((pid, ses, age, cand[0]))
    claims = Counter(img for *_, img in picked)
    for pid, ses, age, img in picked:
        if claims[img] > 1:   # a row without a session beside one with it: which age is the image's?
            tally["rows whose one T1w image another row also matches (left out: ambiguous)"] += 1
            continue
        st = Study(f"openbhb:{pid}:{ses}", pid, "MR", image=os.path.join(root_dir, img), age=age)
        st.tasks["age"] = {}
        studies.append(st)
        tally["rows labelled"] += 1
    listed = {pid for pid, _ in seen}
    tally["images without a label row (not staged)"] = sum(len(v) for k, v in images.items() if k[0] not in listed)
    tally["images of listed participants not staged (row left out, or a session without a row)"] = sum(
        len(v) for k, v in images.items() if k[0] in listed) - len(studies)
    if derived:
        tally["derived images (preproc- other than quasiraw, not used)"] = derived
    return studies, tally, {"age": []}


# ----------------------------------------------------------------------------- ADNI


def _date(v):
    """YYYY-MM-DD (or M/D/YYYY, ADNIMERGE saved by a US spreadsheet) -> date; None when it is not
    one (unparsable, or no such day: a day-first 25/01/2006)."""
    m = re.match(r"(\d{4})-(\d{1,2})-(\d{1,2})", v or "")
    ymd = (m.group(1), m.group(2), m.group(3)) if m else None
    m = re.match(r"(\d{1,2})/(\d{1,2})/(\d{4})", v or "")
    ymd = ymd or ((m.group(3), m.group(1), m.group(2)) if m else None)
    try:
        return date(*map(int, ymd)) if ymd else None
    except ValueError:
        return None


def _adni_images(root_dir, series_regex):
    """({PTID: [(scan date or None, path)]}, number of image folders of other series, number of
    image folders with two or more NIfTI files): the LONI layout
    ADNI/<PTID>/<series description>/<YYYY-MM-DD_hh_mm_ss.s>/<I image id>/(*.nii | *.dcm), the
    series description matching series_regex. An image id folder's one NIfTI file, or the folder
    itself when it holds DICOM files; a folder with several NIfTI files is not used (which one is
    the image id's is ambiguous) and only counted."""
    rx = re.compile(series_regex, re.I)
    out, other, ambiguous = {}, 0, 0
    for d, dirs, files in os.walk(root_dir, followlinks=True):
        dirs.sort()
        rel = os.path.relpath(d, root_dir).replace(os.sep, "/")
        # PTID <site>_S_<RID>: the RID zero-padded to 4 digits, 5 for ADNI4's RIDs (10000 on)
        m = re.search(r"(?:^|/)(\d{3}_S_\d{4,})/([^/]+)/(\d{4}-\d{2}-\d{2})_[^/]*(?:/|$)", rel + "/")
        if not m:
            continue
        if not rx.search(m.group(2)):
            other += any(f.lower().endswith((".nii", ".nii.gz", ".dcm")) for f in files)
            continue
        when = _date(m.group(3))
        nii = [f for f in files if f.lower().endswith((".nii", ".nii.gz"))]
        if len(nii) > 1:   # e.g. a converter's second echo or .nii beside .nii.gz: no file is the image
            ambiguous += 1
        elif nii:
            out.setdefault(m.group(1), []).append((when, os.path.join(d, nii[0])))
        elif any(f.lower().endswith(".dcm") for f in files):
            out.setdefault(m.group(1), []).append((when, d))
    return out, other, ambiguous


def _loni_image_id(path):
    """The LONI image id (an int) of an image file or DICOM folder in its <I id> folder, else None."""
    m = re.fullmatch(r"I(\d+)", os.path.basename(path if os.path.isdir(path) else os.path.dirname(path)))
    return int(m.group(1)) if m else None


# ADNIMERGE DX: CN / MCI / Dementia; older releases: NL / MCI / Dementia and "<from> to <to>" at a change
ADNI_DX_STATES = {"CN": "CN", "NL": "CN", "MCI": "MCI", "Dementia": "Dementia"}


def _adni_dx(v, path, ln):
    """A DX value -> CN | MCI | Dementia: the state reached ("MCI to Dementia" -> Dementia)."""
    state = ADNI_DX_STATES.get(v.rsplit(" to ", 1)[-1].strip())
    if state is None:
        raise BenchmarkError(f"{path}:{ln}: DX must be CN, NL, MCI, Dementia or '<state> to <state>', got {v!r}")
    return state


def _adni_month(r, mcol, path):
    """Months since baseline of a row: its M (or Month) column, else its VISCODE (bl, m<NN>), else None."""
    if not _missing(r[mcol]):
        return _number(r[mcol], path, r["_line"], mcol)
    m = re.fullmatch(r"bl|m(\d+)", r["VISCODE"].strip().lower())
    return None if m is None else float(m.group(1) or 0)


def adni(root_dir, labels_path="", horizon=36, max_days=90, series_regex=adni_series):
    """ADNI: dementia (AD vs CN at baseline) and pmci (MCI at baseline that progresses to
    dementia by `horizon` months: 1, vs MCI followed >= horizon months without dementia: 0),
    each on the subject's baseline T1 (adni.loni.usc.edu; ADNI Data Use Agreement: no
    redistribution, cite ADNI as its DUA asks).

    Layout: ROOT/ADNIMERGE.csv, else the one ADNIMERGE.csv under ROOT (several: an error, pass
    --labels_file; columns PTID, VISCODE, EXAMDATE, DX_bl, DX, AGE, and M or Month) and the image
    download under ROOT: ADNI/<PTID>/<series>/<date_time>/<I id>/ (PTID <site>_S_<RID>, 4 or 5 RID
    digits) holding one NIfTI file or a DICOM series (a folder with two or more NIfTI files is counted
    and not used); the series as adni_series chooses, by default raw MPRAGE / IR-SPGR / IR-FSPGR only: a
    series LONI derived from one (its name joins the steps with "__", MT1__N3m,
    MPR__GradWarp__B1_Correction__N3__Scaled, or names them: ..._N3_corrected_T1_image,
    ..._registered_MPRAGE) is counted as another series and never staged, so the benchmark runs on the
    scans as acquired. Labels: from the baseline row (VISCODE bl): DX_bl AD -> dementia 1, CN -> 0 (SMC
    left out); DX_bl EMCI/LMCI -> pmci by the follow-up rows' DX (Dementia at M <= horizon -> 1; no
    Dementia and a diagnosis at M >= horizon -> 0; otherwise left out: late converter, short follow-up,
    or dementia at a visit of unknown month). DX as in older ADNIMERGE releases (NL, "MCI to Dementia",
    ...) counts as the state reached; a DX cell that is empty, NA or NaN is no diagnosis at that visit;
    an unknown DX value, and an EXAMDATE that is no date (a day-first 25/01/2006), are errors; a row
    without M (or Month) takes its month from VISCODE m<NN>. Image: the matching series closest to the
    baseline EXAMDATE, within max_days; several equally close (ADNI1's MPRAGE and MPRAGE_Repeat of one
    visit, an accelerated and a plain MPRAGE, or two series adni_series matches): the lowest LONI image
    id (the <I id> folder; as for AIBL), counted; never by path, whose order follows the vendors' series
    names (Accelerated_Sagittal_MPRAGE sorts before MPRAGE, MPRAGE before MPRAGE_SENSE2); tied images
    without an image id, or with one id, leave the row out, counted as ambiguous (narrow adni_series to
    choose another series). A DICOM image folder must hold one study (every file's header read): none or
    several leave the row out, counted. Age: AGE at baseline. Dates are used in memory only.
    Returns (studies, tally, columns)."""
    path = labels_path or os.path.join(root_dir, "ADNIMERGE.csv")
    if not labels_path and not os.path.exists(path):
        path = _one_label_file(root_dir, r"ADNIMERGE\.csv", "ADNIMERGE.csv")
    rows, cols = _read_table(path, ["PTID", "VISCODE", "EXAMDATE", "DX_bl", "DX", "AGE"])
    mcol = "M" if "M" in cols else "Month" if "Month" in cols else None
    if mcol is None:
        raise BenchmarkError(f"{path}: missing column(s) ['M'] (months since baseline; or 'Month')")
    images, other_series, ambiguous = _adni_images(root_dir, series_regex)
    by_subject, base = {}, {}
    for r in rows:
        by_subject.setdefault(r["PTID"], []).append(r)
        if r["VISCODE"] == "bl":
            if r["PTID"] in base:
                raise BenchmarkError(f"{path}:{r['_line']}: duplicate subject (a second baseline row; first at line "
                                     f"{base[r['PTID']]['_line']})")
            base[r["PTID"]] = r
    tally = Tally(rows=len(rows))
    tally["follow-up rows (read for pmci)"] = len(rows) - len(base)
    studies, used = [], set()
    for ptid, b in base.items():
        dx = b["DX_bl"]
        tasks = {}
        if dx in ("AD", "CN"):
            tasks["dementia"] = {"dementia": int(dx == "AD")}
        elif dx in ("EMCI", "LMCI", "MCI"):
            fu = [(_adni_month(r, mcol, path), _adni_dx(r["DX"], path, r["_line"]))
                  for r in by_subject[ptid] if not _missing(r["DX"])]   # NA, NaN: no diagnosis at that visit
            conv = [m for m, d in fu if d == "Dementia"]
            known = [m for m in conv if m is not None]
            if known and min(known) <= horizon:
                tasks["pmci"] = {"pmci": 1}
            elif not conv and any(m is not None and m >= horizon for m, _ in fu):
                tasks["pmci"] = {"pmci": 0}
            else:   # a dementia visit of unknown month is neither a timely conversion nor stability
                tally["baseline MCI: late conversion or follow-up < horizon (left out)"] += 1
                continue
        else:
            tally[f"baseline {'no diagnosis' if _missing(dx) else dx} (left out)"] += 1
            continue
        when = _date(b["EXAMDATE"])
        if when is None and not _missing(b["EXAMDATE"]):   # the value is a date: named by its line only
            raise BenchmarkError(f"{path}:{b['_line']}: EXAMDATE must be a date (YYYY-MM-DD or M/D/YYYY), got "
                                 "another value")
        cand = [(abs((d - when).days) if (d and when) else None, p) for d, p in images.get(ptid, [])]
        cand = [(dd, p) for dd, p in cand if dd is not None and dd <= max_days]
        if not cand:
            tally["baseline rows without a baseline image (left out)"] += 1
            continue
        ties = [p for dd, p in cand if dd == min(d for d, _ in cand)]
        ids = [_loni_image_id(p) for p in ties]
        if len(ties) > 1 and (None in ids or len(set(ids)) < len(ids)):
            tally["baseline rows with several equally close images not told apart by image id (left out: "
                  "ambiguous)"] += 1
            continue
        if len(ties) > 1:   # not by path: its order follows the vendors' series names
            tally["baseline rows with several equally close images (the lowest image id taken)"] += 1
        image = ties[ids.index(min(ids))] if len(ties) > 1 else ties[0]
        uid = _one_study_uid(image, tally, "baseline rows") if os.path.isdir(image) else None
        if os.path.isdir(image) and uid is None:
            continue
        used.add(image)
        age = None if _missing(b["AGE"]) else _number(b["AGE"], path, b["_line"], "AGE")
        st = Study(f"adni:{ptid}", ptid, "MR", image=image, uid=uid, age=age)
        st.tasks = tasks
        studies.append(st)
        tally["baseline rows labelled"] += 1
    tally["images not used (other visits or subjects)"] = sum(len(v) for v in images.values()) - len(used)
    tally["image folders of other series (not matching adni_series)"] = other_series
    if ambiguous:
        tally["image folders with two or more NIfTI files (not used: ambiguous)"] = ambiguous
    return studies, tally, {"dementia": ["dementia"], "pmci": ["pmci"]}


# ----------------------------------------------------------------------------- OASIS-1

CDR_SCALE = (0, 0.5, 1, 2, 3)   # the Clinical Dementia Rating's global scores


def oasis1(root_dir, labels_path=""):
    """OASIS-1 cross-sectional: dementia = CDR >= 1 (1) vs CDR 0 (0), the external test of the
    ADNI dementia probe (Marcus et al., J Cogn Neurosci 2007; oasis-brains.org; OASIS Data Use
    Agreement: cite OASIS-1 and its grants).

    Layout: ROOT/oasis_cross-sectional.csv (columns ID, Age, CDR) and the disc folders
    ROOT/disc*/OAS1_xxxx_MR1/ as distributed: the image is
    PROCESSED/MPRAGE/SUBJ_111/*_sbj_111.img (the averaged, bias-corrected T1 in subject space)
    or else RAW/*_mpr-1_anon.img (Analyze 7.5, converted to NIfTI in images/). Labels: CDR 0
    -> 0, CDR 1, 2 or 3 -> 1; CDR 0.5 and no CDR (most subjects under 60) are left out, counted;
    any other value (not a CDR global score: -1, 0.25) is an error naming the line.
    MR2 rows (reliability rescans of 20 subjects) are left out: one study per subject. A session
    whose folder is found twice (on two discs) or with two candidates for its image (two
    *_sbj_111.img) is left out, counted, never given the first. Returns (studies, tally, columns)."""
    path = labels_path or os.path.join(root_dir, "oasis_cross-sectional.csv")
    rows, _ = _read_table(path, ["ID", "Age", "CDR"])
    sessions = {}
    for d, dirs, files in os.walk(root_dir, followlinks=True):
        dirs.sort()
        m = re.fullmatch(r"OAS1_\d{4}_MR\d", os.path.basename(d))
        if m:
            dirs[:] = [x for x in dirs if x in ("PROCESSED", "RAW")]
            sessions.setdefault(m.group(0), []).append(d)
    tally, studies, seen = Tally(rows=len(rows)), [], {}
    for r in rows:
        sid = r["ID"]
        if sid in seen:
            raise BenchmarkError(f"{path}:{r['_line']}: duplicate subject (also line {seen[sid]})")
        seen[sid] = r["_line"]
        if not re.fullmatch(r"OAS1_\d{4}_MR1", sid):
            repeat = re.fullmatch(r"OAS1_\d{4}_MR\d", sid)
            tally["repeat sessions MR2+ (left out)" if repeat else "rows with an unknown ID (left out)"] += 1
            continue
        cdr = r["CDR"]
        if _missing(cdr):
            tally["rows without CDR (left out)"] += 1
            continue
        c = _number(cdr, path, r["_line"], "CDR")
        if c not in CDR_SCALE:   # a missing-value code (-1, -4) is no CDR 0: never a control
            raise BenchmarkError(f"{path}:{r['_line']}: CDR must be one of 0, 0.5, 1, 2, 3 (empty: missing), "
                                 f"got {cdr!r}")
        if c == 0.5:
            tally["CDR 0.5 (left out)"] += 1
            continue
        folders, hits = sessions.get(sid, []), []
        for sub, pat in (("PROCESSED/MPRAGE/SUBJ_111", r".*_sbj_111\.img"), ("RAW", r".*_mpr-1_anon\.img")):
            for f in folders:
                p = os.path.join(f, *sub.split("/"))
                names = os.listdir(p) if os.path.isdir(p) else []
                hits += [os.path.join(p, x) for x in names if re.fullmatch(pat, x)]
            if hits:
                break
        if len(folders) > 1 or len(hits) > 1:   # the session on two discs, or two candidates: which is meant?
            tally["rows with two or more session folders or candidate images (left out: ambiguous)"] += 1
            continue
        if not hits:
            tally["rows without an image (left out)"] += 1
            continue
        img = hits[0]
        age = None if _missing(r["Age"]) else _number(r["Age"], path, r["_line"], "Age")
        st = Study(f"oasis1:{sid}", sid[:9], "MR", image=img, age=age)
        st.tasks["dementia"] = {"dementia": int(c >= 1)}
        studies.append(st)
        tally["rows labelled"] += 1
    tally["session folders without a label row (not staged)"] = len(set(sessions) - set(seen))
    return studies, tally, {"dementia": ["dementia"]}


# ----------------------------------------------------------------------------- AIBL

AIBL_DX = {"1": "CN", "2": "MCI", "3": "AD"}   # aibl_pdxconv DXCURREN codes; -4 (and empty): missing


def _aibl_collection(root_dir):
    """The LONI IDA collection csv(s) under ROOT (any *.csv with columns Image Data ID, Subject,
    Visit; optional Age, Group) -> ({image id digits: (subject, visit, age or None)}, number of
    rows repeating an image id in agreement, {image ids left out}). An image id in two or more
    rows (two collections of one download, a csv copied twice) is kept once when the rows agree on
    subject, visit ("baseline" = bl), age and group (a value a row or its csv lacks agrees with
    any); rows that disagree leave it out, each such image id with a one-line warning on stderr
    naming the csv files and lines and the fields that differ (not their values)."""
    found, rows_of = [], {}
    for d, dirs, files in os.walk(root_dir, followlinks=True):
        dirs.sort()
        for f in sorted(files):
            if not f.lower().endswith(".csv"):
                continue
            p = os.path.join(d, f)
            with open(p, newline="", encoding="utf-8-sig") as fh:
                head = [h.strip() for h in next(csv.reader(fh), [])]
            if {"Image Data ID", "Subject", "Visit"} <= set(head):
                found.append(p)
    if not found:
        raise BenchmarkError(f"{root_dir}: no LONI collection csv (columns Image Data ID, Subject, Visit) for the "
                             "AIBL images")
    for p in found:
        rows, cols = _read_table(p, ["Image Data ID", "Subject", "Visit"])
        for r in rows:
            m = re.fullmatch(r"I?(\d+)", r["Image Data ID"].strip())
            if not m:
                raise BenchmarkError(f"{p}:{r['_line']}: Image Data ID must be I<digits>, got a malformed value")
            age = None if _missing(r.get("Age")) else _number(r["Age"], p, r["_line"], "Age")
            visit = r["Visit"].strip().lower()
            rec = {"subject": r["Subject"].strip(), "visit": "bl" if visit == "baseline" else visit, "age": age,
                   "group": r.get("Group", "").strip().lower()}
            rows_of.setdefault(m.group(1), []).append((rec, f"{p}:{r['_line']}"))
    links, repeats, conflicts = {}, 0, set()
    for iid, recs in rows_of.items():
        # a value one csv lacks (no Age column, an empty cell) is not a different value
        given = {k: {rec[k] for rec, _ in recs if rec[k] not in (None, "")} for k in recs[0][0]}
        differ = [k for k, v in given.items() if len(v) > 1]
        if differ:   # which row is the image's cannot be told: neither is taken
            conflicts.add(iid)
            print(f"nvfm.benchmarks: {', '.join(w for _, w in recs)}: one image id with different "
                  f"{', '.join(differ)} (image left out)", file=sys.stderr)
            continue
        repeats += len(recs) - 1
        links[iid] = tuple(next(iter(given[k]), None if k == "age" else "") for k in ("subject", "visit", "age"))
    return links, repeats, conflicts


def _aibl_images(root_dir, series_regex):
    """({image id digits: path}, folders of other series, ambiguous image folders):
    AIBL/<subject>/<series>/<date_time>/<I id>/ (one *.nii | *.nii.gz, or *.dcm), the series
    description matching series_regex. A folder with two or more NIfTI files, and an image id
    found in two folders (two copies of a download), are not used (which file is the image id's
    is ambiguous) and only counted."""
    rx = re.compile(series_regex, re.I)
    found, other, ambiguous = {}, 0, 0
    for d, dirs, files in os.walk(root_dir, followlinks=True):
        dirs.sort()
        rel = os.path.relpath(d, root_dir).replace(os.sep, "/")
        m = re.search(r"(?:^|/)AIBL/(\d+)/([^/]+)/\d{4}-\d{2}-\d{2}_[^/]*/I?(\d+)$", rel)
        if not m:
            continue
        nii = [f for f in files if f.lower().endswith((".nii", ".nii.gz"))]
        has_dcm = any(f.lower().endswith(".dcm") for f in files)
        if not rx.search(m.group(2)):
            other += bool(nii or has_dcm)
            continue
        if len(nii) > 1:   # e.g. a converter's second echo or .nii beside .nii.gz: no file is the image
            ambiguous += 1
        elif nii or has_dcm:
            found.setdefault(m.group(3), []).append(os.path.join(d, nii[0]) if nii else d)
    out = {iid: p[0] for iid, p in found.items() if len(p) == 1}
    return out, other, ambiguous + sum(len(p) for p in found.values() if len(p) > 1)


def aibl(root_dir, labels_path="", series_regex=adni_series):
    """AIBL (the Australian Imaging, Biomarker & Lifestyle study of ageing; Ellis et al., Int
    Psychogeriatr 2009; distributed through ADNI's LONI IDA, aibl.csiro.au; AIBL data use
    agreement: no redistribution, acknowledge AIBL as it asks): dementia (AD vs CN at the
    baseline visit), the external test of the ADNI dementia probe (the paper applies the
    ADNI-trained classifier unchanged: --external_from=<ADNI run> --external_task=dementia).

    Layout assumed (the IDA download as distributed; we have no copy to check it against):
    - the clinical csv aibl_pdxconv_<date>.csv anywhere under ROOT (or --labels_file; two releases
      under ROOT are an error, never a pick by file name): columns RID,
      VISCODE, DXCURREN (1 = CN, 2 = MCI, 3 = AD; -4 = missing);
    - the LONI collection csv of the download (any *.csv under ROOT with columns Image Data ID,
      Subject, Visit; optional Age): links each image id to its subject (= RID) and visit (bl,
      m18, ...; "baseline" read as bl); an image id in several rows (of one or more such csv
      files) is kept once when they agree on subject, visit, age and Group (a missing value agrees),
      and left out with a one-line warning on stderr when they do not (counted);
    - the images: ROOT/.../AIBL/<RID>/<series description>/<YYYY-MM-DD_hh_mm_ss.s>/<I image id>/
      (one NIfTI file, or one DICOM series per image id), the series matching adni_series
      (by default raw MPRAGE / IR-SPGR only, never a preprocessed series: see adni); a folder
      with two or more NIfTI files, or an image id in two folders, is counted and not used; a
      DICOM image folder of no study or of several leaves the row out, counted.
    Labels: from the VISCODE bl row: DXCURREN 3 -> dementia 1, 1 -> 0; 2 (MCI) and missing are
    left out, counted. Image: a T1 image whose collection row names the subject and visit bl (the
    lowest image id when several). Age: the collection csv's Age at that image, when given.
    Follow-up rows are counted and not used. Returns (studies, tally, columns)."""
    path = labels_path or _one_label_file(root_dir, r"aibl_pdxconv.*\.csv",
                                          "aibl_pdxconv_*.csv (the AIBL diagnosis file)")
    rows, _ = _read_table(path, ["RID", "VISCODE", "DXCURREN"])
    links, repeats, conflicts = _aibl_collection(root_dir)
    images, other_series, ambiguous = _aibl_images(root_dir, series_regex)
    baseline = {}   # RID -> [image ids] of T1 images at bl
    for iid in sorted(images, key=int):
        if iid in links and links[iid][1] == "bl":
            baseline.setdefault(links[iid][0], []).append(iid)
    tally, studies, seen, used = Tally(rows=len(rows)), [], {}, set()
    for r in rows:
        if r["VISCODE"].strip().lower() != "bl":
            tally["follow-up rows (not used)"] += 1
            continue
        rid = r["RID"].strip()
        if rid in seen:
            raise BenchmarkError(f"{path}:{r['_line']}: duplicate subject (a second baseline row; first at line "
                                 f"{seen[rid]})")
        seen[rid] = r["_line"]
        dx = AIBL_DX.get(r["DXCURREN"].strip())
        if dx is None:
            tally["baseline rows without a diagnosis (left out)"] += 1
            continue
        if dx == "MCI":
            tally["baseline MCI (left out)"] += 1
            continue
        if rid not in baseline:
            tally["baseline rows without a baseline T1 image (left out)"] += 1
            continue
        iid = baseline[rid][0]
        uid = _one_study_uid(images[iid], tally, "baseline rows") if os.path.isdir(images[iid]) else None
        if os.path.isdir(images[iid]) and uid is None:
            continue
        if len(baseline[rid]) > 1:
            tally["baseline rows with several baseline T1 images (the lowest image id taken)"] += 1
        used.add(iid)
        st = Study(f"aibl:{rid}", rid, "MR", image=images[iid], uid=uid, age=links[iid][2])
        st.tasks["dementia"] = {"dementia": int(dx == "AD")}
        studies.append(st)
        tally["baseline rows labelled"] += 1
    # each image under one reason: those without a (consistent) collection row are counted below
    tally["T1 images not used (other visits or subjects)"] = sum(iid in links for iid in images) - len(used)
    tally["T1 images without a collection row (not used)"] = sum(iid not in links and iid not in conflicts
                                                                for iid in images)
    if repeats:
        tally["collection rows repeating an image id (in agreement, counted once)"] = repeats
    if conflicts:
        tally["image ids whose collection rows conflict (left out, warned)"] = len(conflicts)
        tally["T1 images whose collection rows conflict (not used)"] = sum(iid in conflicts for iid in images)
    tally["image folders of other series (not matching adni_series)"] = other_series
    if ambiguous:
        tally["image folders with two or more NIfTI files, or an image id found twice (not used: ambiguous)"] = (
            ambiguous)
    return studies, tally, {"dementia": ["dementia"]}


# ----------------------------------------------------------------------------- ABIDE


def abide(root_dir, labels_path=""):
    """ABIDE I: autism (DX_GROUP 1) vs typical controls (DX_GROUP 2) on the anatomical T1 (Di
    Martino et al., Mol Psychiatry 2014; fcon_1000.projects.nitrc.org/indi/abide; CC BY-NC-SA).

    Layout: the phenotypic csv under ROOT (Phenotypic_V1_0b_preprocessed1.csv, else
    Phenotypic_V1_0b.csv; two copies of it are an error, pass --labels_file; columns SUB_ID,
    DX_GROUP, AGE_AT_SCAN) and the anatomical NIfTI under
    ROOT with the subject id as a path component: <site>/<SUB_ID, maybe zero-padded>/session_1/
    anat_1/mprage.nii.gz (INDI release) or sub-<SUB_ID>/anat/sub-<SUB_ID>_T1w.nii.gz (BIDS).
    Labels: autism = DX_GROUP == 1. Image: the subject's one anat/mprage/T1w NIfTI; a subject
    with two or more (anat_1 and anat_2, the INDI and the BIDS copy of one subject) is left out,
    counted, never given the first file. Returns (studies, tally, columns)."""
    path = labels_path
    if not path:
        names = ("Phenotypic_V1_0b_preprocessed1.csv", "Phenotypic_V1_0b.csv")
        for name in names:
            if any(f.lower() == name.lower() for _, _, fs in os.walk(root_dir, followlinks=True) for f in fs):
                path = _one_label_file(root_dir, re.escape(name), name)
                break
        else:
            raise BenchmarkError(f"{root_dir}: no {' or '.join(names)} (--labels_file=...)")
    rows, _ = _read_table(path, ["SUB_ID", "DX_GROUP", "AGE_AT_SCAN"])
    images = {}
    for rel in _walk_images(root_dir):
        low = rel.lower().replace(os.sep, "/")
        if not re.search(r"(anat|mprage|t1w)", low):
            continue
        for part in low.split("/")[:-1] + [os.path.basename(low)]:
            m = re.fullmatch(r"(?:sub-)?0*(\d{5,})(?:_.*)?", part.split(".")[0])
            if m:
                images.setdefault(m.group(1), []).append(rel)
                break
    tally, studies, seen = Tally(rows=len(rows)), [], {}
    for r in rows:
        if not re.fullmatch(r"\d+(?:\.0*)?", r["SUB_ID"]):   # the value is a subject id: named by its line only
            raise BenchmarkError(f"{path}:{r['_line']}: SUB_ID must be a whole number, got a malformed value")
        sid = str(int(float(r["SUB_ID"])))
        if sid in seen:
            raise BenchmarkError(f"{path}:{r['_line']}: duplicate subject (also line {seen[sid]})")
        seen[sid] = r["_line"]
        if r["DX_GROUP"] not in ("1", "2"):
            raise BenchmarkError(f"{path}:{r['_line']}: DX_GROUP must be 1 (autism) or 2 (control), got {r['DX_GROUP']!r}")
        if sid not in images:
            tally["rows without an image (left out)"] += 1
            continue
        if len(images[sid]) > 1:   # anat_1 and anat_2, or the INDI and the BIDS copy: which scan is meant?
            tally["rows with two or more anatomical images (left out: ambiguous)"] += 1
            continue
        age = None if _missing(r["AGE_AT_SCAN"]) else _number(r["AGE_AT_SCAN"], path, r["_line"], "AGE_AT_SCAN")
        st = Study(f"abide:{sid}", sid, "MR", image=os.path.join(root_dir, images[sid][0]), age=age)
        st.tasks["autism"] = {"autism": int(r["DX_GROUP"] == "1")}
        studies.append(st)
        tally["rows labelled"] += 1
    tally["image subjects without a label row (not staged)"] = len(set(images) - set(seen))
    return studies, tally, {"autism": ["autism"]}


# ----------------------------------------------------------------------------- RSNA ICH 2019

RSNA_SUBTYPES = {"any": "ich", "epidural": "edh", "intraparenchymal": "iph", "intraventricular": "ivh",
                 "subarachnoid": "sah", "subdural": "sdh"}


def _rsna_header(path):
    import warnings

    import pydicom
    warnings.filterwarnings("ignore", message="Invalid value for VR UI")   # Kaggle's SOPInstanceUIDs are ID_<hex>
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPInstanceUID", "StudyInstanceUID", "PatientID"])
        return path, str(ds.get("SOPInstanceUID", "")), str(ds.get("StudyInstanceUID", "")), str(ds.get("PatientID", ""))
    except Exception:
        return path, "", "", ""


def rsna(root_dir, labels_path="", n_workers=4):
    """RSNA Intracranial Hemorrhage Detection 2019, study level (Flanders et al., Radiology: AI
    2020; kaggle.com/c/rsna-intracranial-hemorrhage-detection; competition licence:
    non-commercial research, cite the paper).

    Layout: ROOT/stage_2_train.csv (columns ID, Label; ID = ID_<SOPInstanceUID>_<subtype>, subtype
    in any, epidural, intraparenchymal, intraventricular, subarachnoid, subdural) and the images
    ROOT/stage_2_train/ID_<SOPInstanceUID>.dcm (without that folder: anywhere under ROOT).
    Labels: the image labels are joined to studies through each file's DICOM header
    (SOPInstanceUID -> StudyInstanceUID, PatientID for grouping); a study is positive for a class
    when any of its labelled images is: columns ich (any), edh, iph, ivh, sah, sdh. Identical duplicate csv rows are counted,
    conflicting ones are an error. preprocess.py --input=ROOT/stage_2_train.
    Returns (studies, tally, columns)."""
    path = labels_path or os.path.join(root_dir, "stage_2_train.csv")
    if not os.path.isfile(path):
        raise BenchmarkError(f"{path}: not found")
    # 4.5 million rows: streamed, each image's six labels kept as two bit masks (rows seen, positives)
    bit = {t: 1 << i for i, t in enumerate(RSNA_SUBTYPES)}
    seen, pos, tally = {}, {}, Tally(rows=0)
    rx = re.compile(r"(ID_[0-9A-Za-z]+)_([a-z]+)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rd = csv.reader(f)
        head = [h.strip() for h in next(rd, [])]
        if "ID" not in head or "Label" not in head:
            raise BenchmarkError(f"{path}: missing column(s) {[c for c in ('ID', 'Label') if c not in head]} "
                                 f"(found {head[:12]})")
        i_id, i_lab = head.index("ID"), head.index("Label")
        for ln, r in enumerate(rd, start=2):
            if not r:
                continue
            tally["rows"] += 1
            m = rx.fullmatch(r[i_id].strip()) if len(r) > max(i_id, i_lab) else None
            if not m or m.group(2) not in bit:   # the value holds a UID: named by its line only
                why = f"unknown subtype {m.group(2)!r}" if m else "a malformed value"
                raise BenchmarkError(f"{path}:{ln}: ID must be ID_<SOPInstanceUID>_<subtype>, got {why}")
            v = r[i_lab].strip()
            if v not in ("0", "1"):
                raise BenchmarkError(f"{path}:{ln}: Label must be 0 or 1, got {v!r}")
            sop, b = m.group(1), bit[m.group(2)]
            if seen.get(sop, 0) & b:
                if bool(pos.get(sop, 0) & b) != (v == "1"):
                    raise BenchmarkError(f"{path}:{ln}: conflicting duplicate row for one image and subtype")
                tally["duplicate rows (identical, counted once)"] += 1
                continue
            seen[sop] = seen.get(sop, 0) | b
            if v == "1":
                pos[sop] = pos.get(sop, 0) | b
    full = (1 << len(RSNA_SUBTYPES)) - 1
    incomplete = sum(m != full for m in seen.values())
    if incomplete:
        raise BenchmarkError(f"{path}: {incomplete} images lack some of the six subtype rows")
    scan = os.path.join(root_dir, "stage_2_train")   # not stage_2_test/: no labels there
    scan = scan if os.path.isdir(scan) else root_dir
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(scan, followlinks=True) for f in fs
                   if f.lower().endswith(".dcm"))
    if n_workers > 1 and len(files) > 200:
        import multiprocessing as mp
        with mp.Pool(n_workers) as pool:
            heads = pool.map(_rsna_header, files, chunksize=256)
    else:
        heads = [_rsna_header(f) for f in files]
    studies, img_tally = {}, Tally(dicom_files=len(files))
    labelled = set()
    for p, sop, uid, pid in heads:
        if not sop or not uid:
            img_tally["DICOM files unreadable or without UIDs"] += 1
            continue
        if sop not in seen:
            img_tally["DICOM files without label rows"] += 1
            continue
        labelled.add(sop)
        st = studies.get(uid)
        if st is None:
            st = studies[uid] = Study(f"rsna:{uid}", pid or uid, "CT", uid=uid)
            st.tasks["ich"] = {c: 0 for c in RSNA_SUBTYPES.values()}
        for t, c in RSNA_SUBTYPES.items():   # a study is positive when any of its labelled images is
            st.tasks["ich"][c] |= int(bool(pos.get(sop, 0) & bit[t]))
        img_tally["DICOM files labelled"] += 1
    tally["images (6 rows each) labelled"] = len(labelled)
    tally["images with label rows but no DICOM file (left out)"] = len(seen) - len(labelled)
    for k, v in img_tally.items():
        tally[k] = v
    return list(studies.values()), tally, {"ich": list(RSNA_SUBTYPES.values())}


# ----------------------------------------------------------------------------- CQ500

CQ500_READS = {"ICH": "ich", "IPH": "iph", "IVH": "ivh", "SDH": "sdh", "EDH": "edh", "SAH": "sah",
               "BleedLocation-Left": "bleed_left", "BleedLocation-Right": "bleed_right", "ChronicBleed": "chronic_bleed",
               "Fracture": "fracture", "CalvarialFracture": "calvarial_fracture", "OtherFracture": "other_fracture",
               "MassEffect": "mass_effect", "MidlineShift": "midline_shift"}
# side columns of the detection class, for evaluate.py's side accuracy given detection
LATERALITY = ("ich", "bleed_left", "bleed_right")


def cq500(root_dir, labels_path=""):
    """CQ500 head CT (Chilamkurthy et al., Lancet 2018; headctstudy.qure.ai; CC BY-NC-SA 4.0).

    Layout: ROOT/reads.csv (columns name, and R1:/R2:/R3: reads of ICH, IPH, IVH, SDH, EDH, SAH,
    BleedLocation-Left, BleedLocation-Right, ChronicBleed, Fracture, CalvarialFracture,
    OtherFracture, MassEffect, MidlineShift) and the unzipped studies: a folder per name
    CQ500-CT-<n> named "CQ500CT<n> CQ500CT<n>" (or CQ500-CT-<n>) holding the DICOM series.
    Labels: majority (2 of 3 readers) per read: ich, iph, ivh, sdh, edh, sah, bleed_left,
    bleed_right, chronic_bleed, fracture, calvarial_fracture, other_fracture, mass_effect,
    midline_shift. The study key comes from the StudyInstanceUID of the folder's DICOM files. A
    number found in two or more folders (CQ500CT5 CQ500CT5 beside CQ500-CT-5): one StudyInstanceUID
    in all of them (copies of one study) is labelled once; different ones leave the read out,
    counted (which study it is of cannot be told), as does a folder whose files are of two or more
    studies (every file's header is read, no pixels) or of none. preprocess.py --input=ROOT.
    Returns (studies, tally, columns)."""
    path = labels_path or os.path.join(root_dir, "reads.csv")
    need = ["name"] + [f"R{i}:{c}" for i in (1, 2, 3) for c in CQ500_READS]
    rows, _ = _read_table(path, need)
    folders = {}
    for d, dirs, _ in os.walk(root_dir, followlinks=True):
        dirs.sort()
        for x in list(dirs):
            m = re.match(r"CQ500-?CT-?(\d+)(?:\s|$)", x)
            if m:
                folders.setdefault(int(m.group(1)), []).append(os.path.join(d, x))
                dirs.remove(x)
    tally, studies, seen = Tally(rows=len(rows)), [], {}
    for r in rows:
        m = re.fullmatch(r"CQ500-?CT-?(\d+)", r["name"])
        if not m:
            raise BenchmarkError(f"{path}:{r['_line']}: name must be CQ500-CT-<n>, got {r['name']!r}")
        n = int(m.group(1))
        if n in seen:
            raise BenchmarkError(f"{path}:{r['_line']}: duplicate study (also line {seen[n]})")
        seen[n] = r["_line"]
        y = {}
        for c, col in CQ500_READS.items():
            v = [r[f"R{i}:{c}"] for i in (1, 2, 3)]
            if any(x not in ("0", "1") for x in v):
                raise BenchmarkError(f"{path}:{r['_line']}: R*:{c} must be 0 or 1, got {v}")
            y[col] = int(sum(map(int, v)) >= 2)
        if n not in folders:
            tally["rows without a study folder (left out)"] += 1
            continue
        per_folder = [_folder_study_uids(f) for f in folders[n]]
        uids = set().union(*per_folder)
        if not all(per_folder):
            tally["rows with a study folder holding no DICOM file with a StudyInstanceUID (left out)"] += 1
            continue
        if any(len(u) > 1 for u in per_folder):   # one folder of two studies: which one was read?
            tally["rows whose study folder mixes two or more studies (left out: ambiguous)"] += 1
            continue
        if len(uids) > 1:   # which of the folders' studies the read is of cannot be told
            tally["rows whose study number names folders of different studies (left out: ambiguous)"] += 1
            continue
        st = Study(f"cq500:{n}", f"cq500:{n}", "CT", uid=uids.pop())
        st.tasks["ich"] = y
        studies.append(st)
        tally["rows labelled"] += 1
    tally["study folders without a read (not labelled)"] = sum(len(v) for n, v in folders.items() if n not in seen)
    return studies, tally, {"ich": list(CQ500_READS.values())}


# ----------------------------------------------------------------------------- grounding sets


def _grounding(root_dir, name, pattern_image, pattern_mask, cls, sequences=()):
    """Shared part of the file-name keyed grounding adapters (brats21, atlas2). pattern_*: regexes
    on file names with a named group `subject` and, where the names carry them, `session` and
    `space`; sequences: [(regex with the same groups, name)] of further series of the study. A
    study is one (subject, session); its image, mask and sequences must agree on all three
    entities (grounding_studies)."""
    found = {}
    roles = [(pattern_image, "image"), (pattern_mask, "mask")] + [(rx, q) for rx, q in sequences]
    for rel in _walk_images(root_dir):
        base = os.path.basename(rel)
        for rx, role in roles:
            m = re.fullmatch(rx, base)
            if m:
                g = m.groupdict()
                spaces = found.setdefault((g["subject"], g.get("session") or ""), {})
                spaces.setdefault(g.get("space") or "", {}).setdefault(role, []).append(os.path.join(root_dir, rel))
    if not any(r.get("image") for sp in found.values() for r in sp.values()):
        raise BenchmarkError(f"{root_dir}: no {name} image found (expected names like {pattern_image})")
    return grounding_studies(name, found, cls)


def grounding_studies(name, found, cls):
    """Studies of a segmentation set: one MR study per (subject, session) with exactly one image
    and one mask in one space, labelled positive for `cls`; the others are counted and left out.

    found: {(subject, session): {space: {role: [paths]}}}, session and space "" where the set has
    none; role "image", "mask", or a further sequence's name (staged beside the image, sorted by
    name). Exact pairing: an image is never paired with a mask of another session or space. A
    subject with several sessions gives one study per annotated session (its studies share the
    subject column: one side of every split, one cluster of evaluate.py's bootstrap); the tally
    counts its sessions as "sessions (of subjects with several)", other subjects as
    "subjects". Left out, by reason: no mask, no image, image and mask only in different spaces,
    an image and a mask in each of several spaces (which one is meant is ambiguous), two or more
    files for the study's image, mask or one sequence (ambiguous: a second copy of the subject,
    or .nii beside .nii.gz). Returns (studies, tally, columns)."""
    tally, studies = Tally(rows=len(found)), []
    n_sessions = Counter(subj for subj, _ in found)
    for subj, ses in sorted(found):
        unit = "subjects" if n_sessions[subj] == 1 else "sessions (of subjects with several)"
        spaces = found[subj, ses]
        pairs = [sp for sp, r in spaces.items() if r.get("image") and r.get("mask")]
        if not pairs:
            has_image, has_mask = (any(r.get(k) for r in spaces.values()) for k in ("image", "mask"))
            why = ("with an image but no mask" if not has_mask else "with a mask but no image" if not has_image
                   else "with an image and a mask only in different spaces")
            tally[f"{unit} {why} (left out)"] += 1
            continue
        if len(pairs) > 1:
            tally[f"{unit} with an image and a mask in each of several spaces (left out: ambiguous)"] += 1
            continue
        r = spaces[pairs[0]]
        if any(len(v) > 1 for v in r.values()):
            tally[f"{unit} with two or more files for one image, mask or sequence (left out: ambiguous)"] += 1
            continue
        other = sum(len(o.get("image", [])) for sp, o in spaces.items() if sp != pairs[0])
        if other:
            tally["images in another space than their session's mask (not used)"] += other
        st = Study(f"{name}:{subj}" + (f":ses-{ses}" if ses else ""), subj, "MR", image=r["image"][0])
        st.more_images = sorted(((v[0], q) for q, v in r.items() if q not in ("image", "mask")), key=lambda t: t[1])
        st.mask = r["mask"][0]
        st.tasks["grounding"] = {cls: 1}
        studies.append(st)
        tally[f"{unit} labelled"] += 1
    return studies, tally, {"grounding": [cls]}


def brats21(root_dir, labels_path="", cls="glioma"):
    """BraTS 2021 (Baid et al., arXiv:2107.02314; RSNA-ASNR-MICCAI BraTS challenge; CC BY 4.0 for
    the training data as distributed by the challenge, check your copy's terms): the pointing
    game of a glioma probe against the tumour segmentation.

    Layout: ROOT/.../BraTS2021_<id>/BraTS2021_<id>_{t1,t1ce,t2,flair,seg}.nii.gz. Each subject
    is one study of four MR sequences (t1 is the study's image, the others beside it) and its
    seg (labels 1, 2, 4: the whole tumour is where it is nonzero) the lesion mask. A subject
    found twice under ROOT (two copies of a release, .nii beside .nii.gz) is counted and left
    out, never paired across copies (grounding_studies). Labels:
    labels_grounding.csv with column `cls` (1 for every study: this set has no negatives, so it
    scores grounding, not detection; evaluate a probe trained elsewhere with --external=True).
    Writes findings.jsonl + masks/ for evaluate.py --cohort=OUT --findings=OUT/findings.jsonl."""
    sub = r"(?P<subject>BraTS2021_\d+)"
    return _grounding(root_dir, "brats21", sub + r"_t1\.nii(?:\.gz)?", sub + r"_seg\.nii(?:\.gz)?", cls,
                      sequences=[(sub + rf"_{q}\.nii(?:\.gz)?", q) for q in ("t1ce", "t2", "flair")])


def atlas2(root_dir, labels_path="", cls="chronic_ischemic_stroke"):
    """ATLAS v2.0 (Liew et al., Sci Data 2022; fcon_1000.projects.nitrc.org/indi/retro/atlas.html;
    ATLAS data use agreement, CC BY-NC 4.0): the pointing game of a stroke probe against the
    manually traced lesion masks.

    Layout (BIDS): ROOT/.../sub-<id>/ses-<s>/anat/sub-<id>_ses-<s>_space-<space>_T1w.nii.gz
    and ..._label-L_desc-T1lesion_mask.nii.gz (v2.0: space MNI152NLin2009aSym). Each session
    of a subject is one study (T1w), its lesion mask of the same subject, session and space the
    pointing-game target; a subject with several annotated sessions gives one study per session
    (grounding_studies: pairing rules, what is left out); labels as brats21 (column `cls`, all
    1). The test release has no masks: its subjects are counted and left out."""
    ent = r"(?P<subject>sub-[A-Za-z0-9]+)_ses-(?P<session>[A-Za-z0-9]+)_space-(?P<space>[A-Za-z0-9]+)"
    return _grounding(root_dir, "atlas2", ent + r"_T1w\.nii(?:\.gz)?",
                      ent + r"_label-L_desc-T1lesion_mask\.nii(?:\.gz)?", cls)


def msseg16(root_dir, labels_path="", cls="multiple_sclerosis"):
    """MSSEG-2016 (the MICCAI 2016 MS lesion segmentation challenge; Commowick et al., Sci Rep
    2018; distributed through the Shanoir / FLI-IAM platform under its data use agreement: research
    only, no redistribution, cite the paper): the pointing game of a multiple sclerosis probe
    against the consensus of seven experts' lesion masks.

    Layout: ROOT/.../Center_<cc>/Patient_<pp>/ with Preprocessed_Data/FLAIR_preprocessed.nii.gz
    (else Raw_Data/FLAIR.nii.gz) and Masks/Consensus.nii.gz (the expert masks
    ManualSegmentation_<k> are not used). The consensus is on the preprocessed FLAIR's grid; a
    patient with only the raw FLAIR is staged with it, the mask assumed on its grid (check your
    copy). Each patient folder is one study (FLAIR), the consensus in that same folder its lesion
    mask: a patient is its folder's path under ROOT (Training/Center_01/Patient_01 and
    Testing/Center_01/Patient_01 are two patients, never paired with each other's files). Labels
    as brats21 (column `cls`, all 1). Patients without a consensus (the test release) are
    counted and left out, as are those with two files for one role (.nii beside .nii.gz;
    grounding_studies). Returns (studies, tally, columns)."""
    found = {}
    for rel in _walk_images(root_dir):
        m = re.search(r"^((?:.*/)?Center_\d+/Patient_\d+)/(Preprocessed_Data/FLAIR_preprocessed|Raw_Data/FLAIR|"
                      r"Masks/Consensus)\.nii(?:\.gz)?$", rel.replace(os.sep, "/"))
        if m:
            role = {"Masks/Consensus": "mask", "Raw_Data/FLAIR": "raw"}.get(m.group(2), "image")
            found.setdefault((m.group(1), ""), {}).setdefault("", {}).setdefault(role, []).append(
                os.path.join(root_dir, rel))
    for spaces in found.values():   # the raw FLAIR only where the patient has no preprocessed one
        r = spaces[""]
        raw = r.pop("raw", [])
        if "image" not in r and raw:
            r["image"] = raw
    if not any(sp[""].get("image") for sp in found.values()):
        raise BenchmarkError(f"{root_dir}: no MSSEG-2016 FLAIR found (expected Center_<cc>/Patient_<pp>/"
                             "Preprocessed_Data/FLAIR_preprocessed.nii.gz)")
    return grounding_studies("msseg16", found, cls)


ADAPTERS = {"openbhb": openbhb, "adni": adni, "aibl": aibl, "oasis1": oasis1, "abide": abide, "rsna": rsna,
            "cq500": cq500, "brats21": brats21, "atlas2": atlas2, "msseg16": msseg16}


def _one_study_per_uid(studies, tally):
    """studies less those whose DICOM StudyInstanceUID another labelled study (another subject's
    image folder, another read's study folder) also has: which one the study is of cannot be told,
    so none is labelled; counted in tally."""
    n = Counter(st.uid for st in studies if st.uid)
    shared = sum(n[st.uid] > 1 for st in studies if st.uid)
    if shared:
        tally["labelled rows whose DICOM folder's StudyInstanceUID another row's folder also has (left out: "
              "ambiguous)"] = shared
    return [st for st in studies if not (st.uid and n[st.uid] > 1)]


def run(name, root_dir, out_dir, salt_value="", how="symlink", labels_path="", **options):
    """One dataset end to end: adapter -> write_outputs. Returns the report dict."""
    if name not in ADAPTERS:
        raise BenchmarkError(f"--dataset={name!r}: choose one of {', '.join(ADAPTERS)}")
    if not root_dir or not os.path.isdir(root_dir):
        raise BenchmarkError(f"--root={root_dir!r}: not a directory (your copy of {name})")
    if how not in ("symlink", "hardlink", "copy"):
        raise BenchmarkError(f"--link={how!r}: choose symlink, hardlink or copy")
    studies, tally, columns = ADAPTERS[name](root_dir, labels_path, **options)
    studies = _one_study_per_uid(studies, tally)
    if not studies:
        raise BenchmarkError(f"{name}: no labelled study with an image under {root_dir} ({tally.line()})")
    # DICOM datasets are read where they are (keys from their headers); the others from images/
    pre = os.path.join(out_dir, "images")
    if name == "cq500":
        pre = root_dir
    elif name == "rsna":
        pre = os.path.join(root_dir, "stage_2_train")
        pre = pre if os.path.isdir(pre) else root_dir
    return write_outputs(name, studies, tally, out_dir, salt_value, how, columns, extra={"preprocess_input": pre})


def main():
    from nvfm.configurator import configure, fail
    configure(globals())
    opts = {"adni": dict(horizon=adni_horizon_months, max_days=adni_max_days, series_regex=adni_series),
            "aibl": dict(series_regex=adni_series), "rsna": dict(n_workers=workers)}.get(dataset, {})
    if dataset in ("brats21", "atlas2", "msseg16") and grounding_class:
        opts = dict(cls=grounding_class)
    try:
        rep = run(dataset, root, out or f"bench/{dataset}", salt, link, labels_file, **opts)
    except BenchmarkError as e:
        fail(str(e))
    print(f"{dataset}: {rep['n_studies']} labelled studies of {rep['n_subjects']} subjects; input: "
          + ", ".join(f"{v} {k}" for k, v in rep["input"].items() if v))
    for t, r in rep["tasks"].items():
        print(f"  {r['file']}: {r['n_studies']} studies, {r['n_subjects']} subjects, positives {r['positives']}")
    shards_dir = os.path.join(out or f"bench/{dataset}", "shards")
    print(f"next: python preprocess.py --input={rep['preprocess_input']} --output={shards_dir} (same --salt)")


if __name__ == "__main__":
    main()
