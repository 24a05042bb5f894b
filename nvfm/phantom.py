"""Demo cohort: clinical-like head CT/MRI studies written as real DICOM, with labels,
findings, triage and ground truth, from real human anatomy (see nvfm/phantom_anatomy.py).

    python -m nvfm.phantom OUT_DIR --studies 200 --seed 0 [--resolution demo] [--workers 2]

Output (DESIGN.md section 1):
    OUT/dicom/<study>/<series>/IM*.dcm     one file per slice (some enhanced multi-frame)
    OUT/gt/<study>/<series>.nii.gz         noise-free ground-truth volume on the series grid
                                           (RAS affine = diag(-1,-1,1,1) @ DICOM LPS affine)
    OUT/gt/<study>/lesion_<i>.nii.gz       lesion mask, uint8, 1 mm RAS-aligned grid cropped
                                           around the lesion (same world frame)
    OUT/gt/<study>/subject.json            per-study record (template->world affine, lesions)
    OUT/labels.csv, OUT/findings.jsonl, OUT/README.md, OUT/cohort.json
    OUT/.phi.json                          the fake patient identifiers written into the DICOM
                                           (for leak tests of later stages)

Two separable steps: `plan_cohort` samples labels, series plans and splits (fast, no
anatomy); `generate_study` renders one planned study. The same (seed, index) always gives
the same bytes.
"""
import argparse
import copy
import csv
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import time

import numpy as np
from scipy import ndimage as ndi

from nvfm import ontology
from nvfm import phantom_anatomy as pa
from nvfm import phantom_dicom as pd

GENERATOR_VERSION = "5"  # 5: reported sizes and thicknesses measured on the written world masks (a large lesion's
# mass effect enlarges it: sizes and SDH/EDH thicknesses read up to 2x small), cerebellar metastases
# named, the CT catheter's burr hole named; images and masks as in 2

# -----------------------------------------------------------------------------
# configuration: acquisition profiles and pathology rates

# In-plane pixel (mm), slice thickness (mm), series counts per study. "clinical" spans the
# real ranges; "demo" (default) keeps to their coarse ends so that 200 studies stay under
# 1 GB and 5 minutes on 2 cores; "tiny" is for unit tests (seconds per study).
PROFILES = {
    "clinical": dict(ct_pixel=(0.4, 0.6), ct_slice=(0.6, 5.0), mr_pixel=(0.5, 1.2), mr_slice=(1.0, 6.0),
                     ct_series=(1, 5), mr_series=(3, 12), fov=(220.0, 250.0), max_sub=3, compressed=0.25, multiframe=0.12),
    "demo": dict(ct_pixel=(0.95, 1.0), ct_slice=(5.0, 5.0), mr_pixel=(1.1, 1.2), mr_slice=(6.0, 6.0),
                 ct_series=(1, 2), mr_series=(3, 4), fov=(220.0, 235.0), max_sub=1, compressed=1.0,
                 multiframe=0.04),
    "tiny": dict(ct_pixel=(2.6, 3.0), ct_slice=(5.0, 6.0), mr_pixel=(2.6, 3.0), mr_slice=(5.0, 6.0),
                 ct_series=(1, 3), mr_series=(3, 5), fov=(220.0, 240.0), max_sub=1, compressed=0.25,
                 multiframe=0.12),
}
# (compressed: fraction of series written JPEG 2000 lossless (93%) or RLE (7%), as PACS exports
# often are; "demo" compresses most so that 200 studies stay under 1 GB)

# per-study probability of each pathology kind, (CT rate, MR rate); kinds are drawn
# independently, so ~1/3 of studies come out unremarkable (prod(1 - rate))
RATES = {
    "iph": (0.10, 0.05), "sdh": (0.09, 0.04), "edh": (0.04, 0.02), "sah": (0.07, 0.03),
    "infarct": (0.09, 0.10), "glioma": (0.04, 0.08), "meningioma": (0.04, 0.06),
    "metastases": (0.04, 0.07), "hydrocephalus": (0.04, 0.04), "atrophy": (0.12, 0.12),
    "svd": (0.11, 0.12), "ms": (0.0, 0.08), "arachnoid_cyst": (0.04, 0.04),
    "fracture": (0.06, 0.0), "craniotomy": (0.05, 0.05), "catheter": (0.04, 0.03),
}
P_LARGE = 0.35          # space-occupying lesion large enough for mass effect + midline shift
P_CT = 0.5              # modality mix
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)
P_SCOUT = 0.5
P_SR = 0.25
P_PDF = 0.12

# ontology labels per kind and modality; the "large" variant adds mass effect + shift
SPACE_OCCUPYING = ("iph", "sdh", "edh", "infarct", "glioma", "meningioma")
KIND_ORDER = ["edh", "sdh", "iph", "sah", "infarct", "glioma", "metastases", "meningioma",
              "hydrocephalus", "fracture", "catheter", "craniotomy", "ms", "arachnoid_cyst",
              "svd", "atrophy"]


def kind_labels(kind, modality, variant):
    """Ontology diagnosis names implied by one drawn kind (variant: kind-specific string)."""
    ct = modality == "CT"
    if kind == "iph":  # painted with a perihematomal edema ring, which its findings sentence names
        return ["intraparenchymal_hemorrhage", "intracranial_hemorrhage", "cerebral_edema"]
    if kind == "sdh":
        if ct:
            return ["acute_subdural_hematoma" if variant == "acute" else "subacute_chronic_subdural_hematoma",
                    "intracranial_hemorrhage"]
        return ["subdural_hematoma", "intracranial_hemorrhage"]
    if kind == "edh":
        return ["epidural_hematoma", "intracranial_hemorrhage"]
    if kind == "ivh":  # not drawn: the ventricular part of an IPH's blood (paint_kind)
        return ["intraventricular_hemorrhage", "intracranial_hemorrhage"]
    if kind == "sah":
        return ["traumatic_subarachnoid_hemorrhage", "intracranial_hemorrhage"]
    if kind == "infarct":
        return ["acute_ischemic_stroke"]
    if kind == "glioma":
        if ct:
            return ["intra_axial_brain_tumor"] + (["cerebral_edema"] if variant == "hgg" else [])
        return ["brain_tumor", "glioma", "high_grade_glioma" if variant == "hgg" else "low_grade_glioma"] + (
            ["cerebral_edema"] if variant == "hgg" else [])
    if kind == "meningioma":
        return ["extra_axial_brain_tumor"] if ct else ["brain_tumor", "meningioma"]
    if kind == "metastases":
        return (["intra_axial_brain_tumor"] if ct else ["brain_tumor", "brain_metastasis"]) + ["cerebral_edema"]
    if kind == "hydrocephalus":
        return ["ventriculomegaly", "obstructive_hydrocephalus"] + (["transependymal_flow"] if ct else [])
    if kind == "atrophy":
        return ["cerebral_atrophy"]
    if kind == "svd":
        return ["small_vessel_ischemic_disease"]
    if kind == "ms":
        return ["multiple_sclerosis"]
    if kind == "arachnoid_cyst":
        return ["arachnoid_cyst"]
    if kind == "fracture":
        return ["displaced_skull_fracture" if variant == "displaced" else "nondisplaced_skull_fracture"]
    if kind == "craniotomy":
        return (["craniotomy"] if ct else ["craniotomy_craniectomy"]) + ["postsurgical_changes"]
    if kind == "catheter":
        return ["catheter"] + (["burr_hole"] if ct else [])
    raise ValueError(f"unknown pathology kind {kind!r}")


def mass_effect_labels(modality):
    return ["brain_mass_effect", "midline_shift" if modality == "CT" else "brain_midline_shift"]


# -----------------------------------------------------------------------------
# planning: labels, series, splits (no anatomy, fast)

def _rng(seed, index, *salt):
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), *salt])


FIRST = ["QUILLON", "MARVETTE", "ZOBRINA", "TALWYN", "OSKERBY", "FENWICA", "BRYLOCK", "JESSAMY",
         "KORRIGAN", "LUMINA", "DAXTERLY", "PERRIWEN"]
LAST = ["ZZPHANTOMSON", "ZZFAKEWORTH", "ZZSYNTHERLY", "ZZDEMOVITZ", "ZZNOTREALE", "ZZMOCKINGTON"]
INSTITUTIONS = ["NVFM Phantom General Hospital", "Fakeville Synthetic Medical Center",
                "Nowhere County Demo Clinic"]


def fake_phi(seed, index):
    """The fake patient/study identifiers of study `index`: dict tag -> value (all distinctive
    strings that never occur by chance, so later stages can grep their outputs for leaks)."""
    r = _rng(seed, index, 7)
    h = hashlib.sha256(f"nvfm-phi|{seed}|{index}".encode()).hexdigest().upper()
    year = 2010 + int(r.integers(0, 13))
    month, day = int(r.integers(1, 13)), int(r.integers(1, 29))
    return {
        "PatientName": f"{LAST[int(r.integers(len(LAST)))]}^{FIRST[int(r.integers(len(FIRST)))]}^Q{h[:4]}",
        "PatientID": f"NVFMPID{h[4:12]}",
        "AccessionNumber": f"NVFMACC{int(h[12:20], 16) % 10**8:08d}",
        "StudyID": f"NVS{int(h[20:26], 16) % 10**6:06d}",
        "InstitutionName": f"{INSTITUTIONS[int(r.integers(len(INSTITUTIONS)))]} NVFMINST{h[26:30]}",
        "InstitutionAddress": f"{int(r.integers(1, 999))} Nonexistent Lane NVFMADDR{h[30:34]}",
        "ReferringPhysicianName": f"ZZREFDOC^{FIRST[int(r.integers(len(FIRST)))]}^R{h[34:38]}",
        "OperatorsName": f"ZZTECH^T{h[38:42]}",
        "StationName": f"NVFMSTN{h[42:46]}",
        "StudyDate": f"{year:04d}{month:02d}{day:02d}",
        "StudyTime": f"{int(r.integers(0, 24)):02d}{int(r.integers(0, 60)):02d}{int(r.integers(0, 60)):02d}",
        "StudyInstanceUID": str(pd.make_uid("study", seed, index)),
    }  # PatientBirthDate / PatientAge / PatientSex are added by plan_study (tied to the age)


INDICATIONS = {
    "edh": ["Motor vehicle collision with loss of consciousness.", "Assault with head injury, GCS 13."],
    "sdh": ["Fall with head strike on anticoagulation.", "Elderly patient, fall, confusion."],
    "iph": ["Sudden severe headache, blood pressure 210/120.", "Acute onset weakness and headache."],
    "sah": ["Fall from ladder, head trauma.", "Head trauma, evaluate for intracranial hemorrhage."],
    "infarct": ["Acute onset {contra}-sided weakness and facial droop, last known well 2 hours ago.",
                "Code stroke: aphasia and {contra} hemiparesis."],
    "glioma": ["New onset seizure.", "Progressive headache and personality change."],
    "metastases": ["History of lung cancer, staging.", "Breast cancer, new headache."],
    "meningioma": ["Chronic headaches.", "Incidental finding on outside imaging, characterize."],
    "hydrocephalus": ["Headache, nausea and vomiting, papilledema.", "Gait disturbance and lethargy."],
    "fracture": ["Fall with scalp laceration.", "Blunt head trauma."],
    "catheter": ["Shunt evaluation.", "Ventricular drain placement, check position."],
    "craniotomy": ["Post-operative follow-up.", "Status post craniotomy, new headache."],
    "ms": ["Optic neuritis, evaluate for demyelinating disease.", "Numbness and tingling, evaluate for MS."],
    "arachnoid_cyst": ["Headache.", "Dizziness."],
    "svd": ["Dizziness, history of hypertension.", "Transient confusion."],
    "atrophy": ["Memory loss.", "Cognitive decline, evaluate for dementia."],
    None: ["Headache.", "Dizziness.", "Syncope.", "Fall, evaluate for hemorrhage.", "Altered mental status.",
           "Seizure.", "Follow-up imaging.", "Vertigo.", "Numbness of the left hand."],
}


def _series_plan(r, modality, prof, kinds, has_contrast):
    """List of series dicts (kind, contrast, orientation, pixel, thickness, description, ...)."""
    lo, hi = prof["ct_series" if modality == "CT" else "mr_series"]
    n = int(r.integers(lo, hi + 1))
    out = []
    if modality == "CT":
        pool = [("soft", "axial"), ("bone", "axial"), ("soft", "coronal"), ("soft", "sagittal"), ("bone", "coronal")]
        for kernel, orient in pool[:n]:
            px = float(r.uniform(*prof["ct_pixel"]))
            if kernel == "bone" and orient == "axial":
                th = float(r.uniform(prof["ct_slice"][0], 0.5 * (prof["ct_slice"][0] + prof["ct_slice"][1])))
            else:
                th = float(r.uniform(*prof["ct_slice"]))
            th = round(th * 4) / 4
            tilt = float(r.uniform(10, 22)) if (orient == "axial" and kernel == "soft" and r.random() < 0.2) else 0.0
            if orient == "axial":
                desc = (f"HEAD W/O {th:g}mm" if r.random() < 0.6 else f"AX BRAIN {th:g}mm") if kernel == "soft" \
                    else (f"BONE {th:g}mm" if r.random() < 0.6 else f"AX BONE {th:g}mm")
            else:
                desc = f"{'COR' if orient == 'coronal' else 'SAG'} {'BRAIN' if kernel == 'soft' else 'BONE'} {th:g}mm"
            out.append(dict(contrast="CT", kernel=kernel, orientation=orient, pixel=px, thickness=th,
                            tilt=tilt, oblique=0.0, description=desc, geom_seed=int(r.integers(2**31))))
    else:
        core = [("T1", "sagittal"), ("FLAIR", "axial"), ("DWI", "axial"), ("T2", "axial")]
        if has_contrast:  # a contrast study always has an axial post-contrast T1 early on
            core = [("T1", "sagittal"), ("FLAIR", "axial"), ("T1C", "axial"), ("DWI", "axial"), ("T2", "axial")]
        extra = [("T1C", "coronal"), ("SWI", "axial"), ("T1", "axial"), ("T2", "coronal"),
                 ("T1C", "sagittal"), ("FLAIR", "coronal"), ("T2", "sagittal")]
        if not has_contrast:
            extra = [e for e in extra if e[0] != "T1C"]
        r.shuffle(extra)
        wanted = core + extra
        series = []
        for c, o in wanted:
            if len(series) >= n:
                break
            series.append((c, o))
            if c == "DWI":
                series.append(("ADC", o))  # DWI comes with its ADC map
        names = {"T1": {"axial": ["AX T1", "AX T1 SE"], "sagittal": ["SAG T1", "SAG T1 MPRAGE"], "coronal": ["COR T1"]},
                 "T1C": {"axial": ["AX T1 POST GAD", "AX T1 +C", "AX T1 FS POST"], "sagittal": ["SAG T1 MPRAGE POST"],
                         "coronal": ["COR T1 +C", "COR T1 POST"]},
                 "T2": {"axial": ["AX T2", "AX T2 FSE"], "coronal": ["COR T2"], "sagittal": ["SAG T2"]},
                 "FLAIR": {"axial": ["AX FLAIR", "AX T2 FLAIR"], "coronal": ["COR FLAIR"]},
                 "DWI": {"axial": ["AX DWI B1000", "DWI TRACE"]}, "ADC": {"axial": ["ADC", "AX ADC"]},
                 "SWI": {"axial": ["AX SWI"]}}
        dwi_geom = None
        for c, o in series:
            gseed = int(r.integers(2**31))
            if c == "ADC" and dwi_geom is not None:  # the ADC map is computed on the DWI grid
                px, th, obl, gseed = dwi_geom
            else:
                px = float(r.uniform(*prof["mr_pixel"]))
                th = round(float(r.uniform(*prof["mr_slice"])) * 2) / 2
                obl = float(r.uniform(8, 20)) if r.random() < 0.2 else 0.0
                if c == "DWI":
                    px = max(px, prof["mr_pixel"][1] * 0.95)  # DWI is the coarsest sequence
                    dwi_geom = (px, th, obl, gseed)
            lst = names[c][o]
            out.append(dict(contrast=c, kernel="", orientation=o, pixel=px, thickness=th, tilt=0.0,
                            oblique=obl, description=lst[int(r.integers(len(lst)))], geom_seed=gseed))
    for s in out:
        s["multiframe"] = bool(r.random() < prof["multiframe"])  # one enhanced multi-frame object
        u = r.random()
        pc = prof["compressed"]
        s["transfer_syntax"] = "j2k" if u < pc * 0.93 else ("rle" if u < pc else "explicit")
        if s["multiframe"]:  # dcm2niix cannot read compressed multi-frame objects
            s["transfer_syntax"] = "explicit"
        s["noise_seed"] = int(r.integers(2**31))
    return out


def plan_study(seed, index, profile="demo", modality=None, kinds=None, large=None):
    """Sample everything about study `index` that does not need anatomy: modality, age,
    drawn pathology kinds (with variants), ontology labels, indication, series plan.
    modality / kinds (list of kind names) / large (bool) force those choices (for tests and
    hand-made examples); the rest is still drawn from (seed, index)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown resolution profile {profile!r}: choose from {sorted(PROFILES)}")
    if modality not in (None, "CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    for k in kinds or []:
        if k not in RATES:
            raise ValueError(f"unknown pathology kind {k!r}: choose from {sorted(RATES)}")
    prof = PROFILES[profile]
    r = _rng(seed, index, 1)
    u_mod = r.random()
    modality = modality or ("CT" if u_mod < P_CT else "MR")
    col = 0 if modality == "CT" else 1
    if kinds is not None:
        bad = [k for k in kinds if RATES[k][col] == 0]
        if bad:
            raise ValueError(f"pathology {bad} is not drawn on {modality} (rate 0)")
    forced, large_forced = kinds, large
    kinds = []
    for kind in KIND_ORDER:  # fixed order: one draw per kind, so each rate is exact
        u = r.random()
        if (u < RATES[kind][col]) if forced is None else (kind in forced):
            variant = ""
            if kind == "sdh":
                variant = "acute" if r.random() < 0.6 else "chronic"
            elif kind == "glioma":
                variant = "hgg" if r.random() < 0.6 else "lgg"
            elif kind == "fracture":
                variant = "displaced" if r.random() < 0.35 else "linear"
            elif kind == "craniotomy":
                variant = "craniectomy" if r.random() < 0.3 else "flap"
            large = bool(kind in SPACE_OCCUPYING and r.random() < P_LARGE)
            if large_forced is not None:
                large = bool(kind in SPACE_OCCUPYING and large_forced)
            kinds.append(dict(kind=kind, variant=variant, large=large))
    labels = set()
    for k in kinds:
        labels.update(kind_labels(k["kind"], modality, k["variant"]))
        if k["large"]:
            labels.update(mass_effect_labels(modality))
            if k["kind"] == "infarct":
                labels.add("cerebral_edema")
    for name in labels:
        assert modality in ontology.DIAGNOSES[name].modalities, (name, modality)
    kset = {k["kind"] for k in kinds}
    if kset & {"atrophy", "svd"}:
        age = int(r.integers(60, 93))
    elif "ms" in kset:
        age = int(r.integers(20, 51))
    else:
        age = int(r.integers(18, 90))
    sex = "F" if r.random() < 0.5 else "M"
    top = min(kset, key=KIND_ORDER.index) if kset and r.random() < 0.75 else None
    indication = INDICATIONS[top][int(r.integers(len(INDICATIONS[top])))]
    has_contrast = modality == "MR" and (bool(kset & {"glioma", "meningioma", "metastases", "ms"}) or r.random() < 0.5)
    series = _series_plan(r, modality, prof, kinds, has_contrast)
    phi = fake_phi(seed, index)
    by = int(phi["StudyDate"][:4]) - age
    phi["PatientBirthDate"] = f"{by:04d}{phi['StudyDate'][4:]}"
    phi["PatientAge"] = f"{age:03d}Y"
    phi["PatientSex"] = sex
    return dict(index=index, study=f"demo-{index:04d}", seed=seed, profile=profile, modality=modality, split="train",
                age=age, sex=sex, kinds=kinds, labels=sorted(labels), indication=indication,
                triage=ontology.triage(labels), has_contrast=has_contrast, series=series,
                scout=bool(r.random() < P_SCOUT), sr=bool(r.random() < P_SR), pdf=bool(r.random() < P_PDF),
                phi=phi, geometry_seed=int(r.integers(2**31)), lesion_seed=int(r.integers(2**31)))


def assign_splits(plans, seed):
    """~70/15/15 train/val/test, stratified by (modality, triage); deterministic for a seed.
    Studies are ordered by stratum (random within), then a low-discrepancy sequence deals
    the splits, so every stratum, and even a cohort of a few studies, gets all three."""
    r = np.random.default_rng([int(seed) & 0xFFFFFFFF, 99])
    keys = [(p["modality"], p["triage"], float(r.random())) for p in plans]
    order = sorted(range(len(plans)), key=lambda i: keys[i])
    offset = float(r.random())
    for rank, i in enumerate(order):
        u = (offset + rank * 0.6180339887498949) % 1.0
        plans[i]["split"] = "val" if u < SPLIT_FRACTIONS[1] else (
            "test" if u < SPLIT_FRACTIONS[1] + SPLIT_FRACTIONS[2] else "train")
    return plans


def plan_cohort(n_studies, seed=0, profile="demo"):
    """Plans (labels, series, split) of all studies; cheap, no anatomy or rendering."""
    if not isinstance(n_studies, (int, np.integer)) or n_studies < 1:
        raise ValueError(f"number of studies must be a positive integer, got {n_studies!r}")
    if profile not in PROFILES:
        raise ValueError(f"unknown resolution profile {profile!r}: choose from {sorted(PROFILES)}")
    return assign_splits([plan_study(seed, i, profile) for i in range(n_studies)], seed)


# -----------------------------------------------------------------------------
# subject: template anatomy + pathology painted in, plus a smooth spatial transform

# pathology tissue classes continue after the normal ones
BLOOD, BLOOD_OLD, EDEMA, TUMOR, NECROSIS, INFARCT, WMH, CYST, MENINGIOMA, CATHETER, TUMOR_NE = range(8, 19)
N_CLASSES = 19

#          air    soft  fat   bone  csf   vent  gm    wm    blood bl_old edema tumor necro infar wmh   cyst  menin cath  tum_ne
LUT = {
    "CT":    [-1000, 40, -90, 1000, 5, 5, 37, 27, 68, 30, 17, 36, 14, 18, 21, 4, 50, 600, 24],
    "T1":    [0.0, 0.45, 0.95, 0.05, 0.12, 0.12, 0.55, 0.78, 0.55, 0.88, 0.38, 0.45, 0.20, 0.42, 0.62, 0.12, 0.50, 0.02, 0.40],
    "T1C":   [0.0, 0.55, 0.95, 0.05, 0.12, 0.12, 0.56, 0.78, 0.55, 0.88, 0.38, 1.00, 0.20, 0.45, 0.62, 0.12, 1.00, 0.02, 0.40],
    "T2":    [0.0, 0.35, 0.60, 0.03, 1.00, 1.00, 0.55, 0.40, 0.25, 0.90, 0.85, 0.70, 0.95, 0.80, 0.80, 1.00, 0.55, 0.02, 0.85],
    "FLAIR": [0.0, 0.40, 0.70, 0.03, 0.08, 0.08, 0.55, 0.42, 0.45, 0.90, 0.90, 0.75, 0.30, 0.85, 0.92, 0.08, 0.55, 0.02, 0.88],
    "DWI":   [0.0, 0.15, 0.05, 0.02, 0.05, 0.05, 0.40, 0.35, 0.25, 0.60, 0.30, 0.50, 0.10, 1.00, 0.40, 0.05, 0.45, 0.02, 0.35],
    "ADC":   [0.0, 1.00, 0.10, 0.00, 3.00, 3.00, 0.85, 0.75, 0.60, 1.00, 1.60, 1.00, 2.50, 0.40, 1.10, 3.00, 0.80, 0.00, 1.40],
    "SWI":   [0.0, 0.40, 0.50, 0.05, 0.80, 0.80, 0.55, 0.62, 0.05, 0.30, 0.65, 0.55, 0.60, 0.55, 0.60, 0.80, 0.50, 0.00, 0.60],
}
LUT = {k: np.asarray(v, np.float32) for k, v in LUT.items()}
assert all(len(v) == N_CLASSES for v in LUT.values())


def _rot(ax, ay, az):
    """Rotation matrix from angles (degrees) about x, y, z."""
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_rotation(r, max_deg):
    return _rot(*r.uniform(-max_deg, max_deg, 3))


class Subject:
    """One patient: painted tissue classes on the template grid and the map world -> template.

    world (RAS mm) p -> template mm q:  q = M^-1 (p - t) + c_head, then a smooth sinusoidal
    warp (1-2 mm) and the mass-effect pushes of large lesions.
    """

    def __init__(self, anat, r, age):
        self.anat = anat
        self.tissue = anat.tissue.copy()
        head = np.argwhere(anat.tissue[::4, ::4, ::4] > 0) * 4
        lo, hi = head.min(0), head.max(0)
        self.head_lo_mm, self.head_hi_mm = anat.world(lo), anat.world(hi)
        self.c_head = anat.world((lo + hi) / 2.0)
        scale = np.clip(r.normal(1.0, 0.035, 3), 0.92, 1.08) * (0.98 if age > 70 else 1.0)
        rot = _rot(r.uniform(-6, 6), r.uniform(-5, 5), r.uniform(-7, 7))
        self.M = rot @ np.diag(scale)
        self.Minv = np.linalg.inv(self.M)
        self.t = np.array([r.uniform(-8, 8), r.uniform(-8, 8), r.uniform(-10, 10)])
        self.warp_k = r.normal(0, 1, (3, 3, 3)) / r.uniform(25, 45, (3, 3, 1))  # wave vectors (rad/mm)
        self.warp_phase = r.uniform(0, 2 * np.pi, (3, 3))
        self.warp_amp = r.uniform(0.4, 0.8, (3, 3))                        # mm per term
        self.pushes = []  # (center mm, radial amp mm, radial sigma mm, shift vector mm)
        self.lesions = []  # dicts: kind, diagnosis, side, region, sl, mask (bool), facts

    def world_from_template(self):
        """4x4 affine template mm -> world RAS mm (the rigid+scale part, without warps)."""
        A = np.eye(4)
        A[:3, :3] = self.M
        A[:3, 3] = self.t - self.M @ self.c_head
        return A

    def template_voxel(self, p):
        """world RAS mm (N, 3) float32 -> template voxel coordinates (3, N) float32."""
        q = (p - self.t.astype(np.float32)) @ self.Minv.T.astype(np.float32) + self.c_head.astype(np.float32)
        disp = np.zeros_like(q)
        for a in range(3):
            for j in range(3):
                disp[:, a] += self.warp_amp[a, j] * np.sin(q @ self.warp_k[a, j].astype(np.float32) + self.warp_phase[a, j])
        q += disp
        for c, amp, sig, shift in self.pushes:
            d = q - c.astype(np.float32)
            r2 = (d * d).sum(1)
            # keep the skull still: fade the push out towards the inner table
            ell = (((q - self.c_head.astype(np.float32)) / np.float32([62, 80, 62])) ** 2).sum(1)
            fade = np.clip((1.0 - np.sqrt(ell)) / 0.3, 0, 1)
            g = np.exp(-r2 / (2 * sig * sig)) * fade
            rn = np.sqrt(r2) + 1e-3
            q -= (amp * g / rn)[:, None] * d
            gs = np.exp(-(d[:, 1] ** 2 + d[:, 2] ** 2) / (2 * 35.0 ** 2) - d[:, 0] ** 2 / (2 * 60.0 ** 2)) * fade
            q -= gs[:, None] * shift.astype(np.float32)[None]
        inv = self.anat.inv_affine.astype(np.float32)
        return (q @ inv[:3, :3].T + inv[:3, 3]).T


# -----------------------------------------------------------------------------
# pathology painting on the template grid (1 mm voxels; template mm == voxel offsets)

def _box(center, radius, shape):
    """Slices of a cube around center (voxel) and broadcastable offsets (mm) to the center."""
    c = np.round(center).astype(int)
    rr = int(math.ceil(radius)) + 1
    sl = tuple(slice(max(ci - rr, 0), min(ci + rr + 1, n)) for ci, n in zip(c, shape))
    grids = np.ogrid[sl]
    return sl, [g.astype(np.float32) - np.float32(center[a]) for a, g in enumerate(grids)]


def _ellipsoid(center, radii, rot, shape, wobble=None):
    """Boolean ellipsoid (radii mm, rotation rot) around center; optional wobble (r) makes the
    surface lumpy with low-order harmonics. Returns (slices, mask)."""
    sl, d = _box(center, max(radii) * 1.3, shape)
    v = [sum(rot[j, i] * d[j] for j in range(3)) for i in range(3)]
    q = sum((v[i] / radii[i]) ** 2 for i in range(3))
    if wobble is not None:
        theta = np.arctan2(v[1], v[0])
        phi = np.arctan2(v[2], np.sqrt(v[0] ** 2 + v[1] ** 2) + 1e-6)
        a = wobble.uniform(0, 2 * np.pi, 3)
        f = 1 + 0.18 * np.sin(3 * theta + a[0]) * np.cos(2 * phi + a[1]) + 0.1 * np.sin(5 * theta + a[2])
        q = q / f ** 2
    return sl, q <= 1.0


def _xworld(anat):
    return (np.arange(anat.shape[0]) * anat.affine[0, 0] + anat.affine[0, 3]).astype(np.float32)


def _pick(r, cands):
    if len(cands) == 0:
        raise RuntimeError("no candidate voxels for a lesion in this anatomy")
    return cands[int(r.integers(len(cands)))].astype(float)


def _side_ok(anat, side, margin=8.0):
    xw = _xworld(anat)[:, None, None]
    return (xw < -margin) if side == "left" else (xw > margin)


def _convexity_point(r, anat, side, zmin=-10.0, depth=(0.5, 1.8)):
    """A voxel just inside the inner table over the side's convexity."""
    def fn(a, s=side):
        zw = (np.arange(a.shape[2]) * a.affine[2, 2] + a.affine[2, 3])[None, None, :]
        return (a.depth_icv >= depth[0]) & (a.depth_icv <= depth[1]) & _side_ok(a, s, 25.0) & (zw > zmin)
    return _pick(r, anat.voxels(f"convexity_{side}_{zmin}", fn))


AAL_TERRITORY = {
    "MCA": ("Frontal_Mid", "Frontal_Inf", "Precentral", "Postcentral", "Rolandic_Oper", "Insula",
            "Temporal_Sup", "Temporal_Mid", "Parietal_Inf", "SupraMarginal", "Angular", "Putamen", "Heschl"),
    "ACA": ("Frontal_Sup_Medial", "Cingulum_Ant", "Cingulum_Mid", "Paracentral_Lobule", "Supp_Motor_Area",
            "Frontal_Med_Orb"),
    "PCA": ("Occipital_Sup", "Occipital_Mid", "Occipital_Inf", "Calcarine", "Cuneus", "Lingual", "Fusiform"),
}
LOBE_TERRITORY = {"MCA": ("Frontal", "Temporal", "Parietal"), "ACA": ("Frontal",), "PCA": ("Occipital",)}


def _region_ids(anat, prefixes, side):
    suffix = "_L" if side == "left" else "_R"
    return [k for k, v in anat.region_names.items()
            if v.endswith(suffix) and any(v[:-2] == p or v.startswith(p + "_") for p in prefixes)]


def _majority_region(anat, sl, mask):
    labs = anat.region[sl][mask]
    labs = labs[labs > 0]
    if len(labs) == 0:
        c = np.argwhere(mask).mean(0) + [s.start for s in sl]
        return anat.region_at(c)
    return anat.region_names.get(int(np.bincount(labs).argmax()), "")


def _paint(subj, sl, mask, cls, where=None):
    t = subj.tissue[sl]
    m = mask if where is None else (mask & np.isin(t, where))
    t[m] = cls
    return m


def _add_lesion(subj, kind, side, sl, mask, facts, region=None):
    if mask.sum() == 0:
        return
    if region is None:
        region = _majority_region(subj.anat, sl, mask)
    # tissue as painted: a later lesion that repaints some of these voxels takes them (_drop_overwritten)
    subj.lesions.append(dict(kind=kind, side=side, region=region, sl=sl, mask=mask.copy(), facts=facts,
                             painted=subj.tissue[sl][mask]))


def _extent_cm(sl, mask, scale):
    """The two largest extents (cm) of a lesion mask of `scale` mm voxels; (0, 0) for an empty one (a
    lesion clipped away entirely by the tissue it must lie in; _add_lesion then drops it)."""
    idx = np.argwhere(mask)
    if not len(idx):
        return 0.0, 0.0
    ext = (idx.max(0) - idx.min(0) + 1) * scale
    ext = np.sort(ext)[::-1]
    return round(float(ext[0]) / 10, 1), round(float(ext[1]) / 10, 1)


def paint_kind(subj, r, item, modality):
    """Paint one drawn pathology kind into the subject; appends to subj.lesions."""
    anat, kind, variant, large = subj.anat, item["kind"], item["variant"], item["large"]
    shape = anat.shape
    side = "left" if r.random() < 0.5 else "right"
    scale = float(np.abs(np.linalg.det(subj.M)) ** (1 / 3))
    GW = (pa.GM, pa.WM)
    if kind == "iph":
        deep = r.random() < 0.6
        if deep:
            ids = _region_ids(anat, ("Putamen", "Thalamus", "Pallidum"), side)
            cands = anat.voxels(f"deep_{side}", lambda a: np.isin(a.region, ids) & np.isin(a.tissue, GW))
        else:
            cands = anat.voxels(f"lobar_wm_{side}", lambda a: (a.tissue == pa.WM) & _side_ok(a, side, 15.0)
                                & (a.depth_brain > 4))
        c = _pick(r, cands)
        rad = r.uniform(13, 20, 3) if large else r.uniform(5, 11, 3)
        sl, m = _ellipsoid(c, rad, _random_rotation(r, 90), shape, wobble=r)
        m &= _side_ok(anat, side, 2.0)[sl[0]]
        vent = subj.tissue[sl] == pa.VENT
        bl = _paint(subj, sl, m, BLOOD, where=GW + (pa.CSF, pa.VENT))
        ring = ndi.binary_dilation(bl, iterations=3) & ~bl
        _paint(subj, sl, ring, EDEMA, where=GW)
        # blood painted into a ventricle is intraventricular extension: its own lesion, label and sentence
        ivh = bl & vent
        _add_lesion(subj, kind, side, sl, bl & ~ivh, dict(size=_extent_cm(sl, bl & ~ivh, scale)))
        _add_lesion(subj, "ivh", side, sl, ivh, {}, region=f"Lateral_Ventricle_{side[0].upper()}")
        return c, max(rad)
    if kind in ("sdh", "edh"):
        c = _convexity_point(r, anat, side, zmin=0.0)
        if kind == "sdh":
            R, T0 = r.uniform(50, 70), (r.uniform(11, 17) if large else r.uniform(4, 9))
        else:
            R, T0 = r.uniform(24, 34), (r.uniform(14, 22) if large else r.uniform(7, 12))
        sl, d = _box(c, R, shape)
        dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        u = np.clip(1 - (dist / R) ** 2, 0, 1)
        T = T0 * (u if kind == "sdh" else np.sqrt(u))
        m = (anat.depth_icv[sl] > 0) & (anat.depth_icv[sl] < T) & _side_ok(anat, side, 3.0)[sl[0]]
        cls = BLOOD if (kind == "edh" or variant == "acute" or modality == "MR" and variant == "acute") else BLOOD_OLD
        _paint(subj, sl, m, cls)
        _add_lesion(subj, kind, side, sl, m, dict(thickness_mm=0))  # measured by _measure_masks
        return c, T0 * 2.5
    if kind == "sah":
        c = _convexity_point(r, anat, side, zmin=-20.0, depth=(2.0, 6.0))
        sl, d = _box(c, 38, shape)
        dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        m = (dist < r.uniform(28, 38)) & (subj.tissue[sl] == pa.CSF) & _side_ok(anat, side, 3.0)[sl[0]]
        _paint(subj, sl, m, BLOOD)
        _add_lesion(subj, kind, side, sl, m, {})
        return None
    if kind == "infarct":
        terr = str(r.choice(["MCA", "MCA", "MCA", "PCA", "ACA"]))
        if anat.source.startswith("mricron"):
            ids = _region_ids(anat, AAL_TERRITORY[terr], side)
        else:
            ids = _region_ids(anat, LOBE_TERRITORY[terr], side)
        terr_mask_key = f"terr_{terr}_{side}"
        cands = anat.voxels(terr_mask_key, lambda a: np.isin(a.region, ids) & (a.tissue == pa.GM))
        c = _pick(r, cands)
        rad = r.uniform(25, 38) if large else r.uniform(10, 18)
        sl, d = _box(c, rad, shape)
        dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        ball = dist < rad
        t = subj.tissue[sl]
        in_terr = np.isin(anat.region[sl], ids)
        gm = ball & in_terr & (t == pa.GM)
        wm = ball & (t == pa.WM) & (dist < rad * 0.85) & ndi.binary_dilation(gm, iterations=6)
        m = (gm | wm) & _side_ok(anat, side, 2.0)[sl[0]]
        _paint(subj, sl, m, INFARCT)
        _add_lesion(subj, kind, side, sl, m, dict(territory=terr, size=_extent_cm(sl, m, scale)))
        return c, rad * 0.6
    if kind == "glioma":
        cands = anat.voxels(f"lobar_wm_{side}", lambda a: (a.tissue == pa.WM) & _side_ok(a, side, 15.0)
                            & (a.depth_brain > 4))
        c = _pick(r, cands)
        rt = r.uniform(18, 26) if large else r.uniform(9, 16)
        rot = _random_rotation(r, 90)
        rad = rt * r.uniform(0.8, 1.1, 3)
        sl, m = _ellipsoid(c, rad + 18, rot, shape)
        _, tum = _ellipsoid(c, rad, rot, shape, wobble=r)
        tum = _crop_like(tum, sl, c, rad, shape)
        side_ok = _side_ok(anat, side, 2.0)[sl[0]]
        t = subj.tissue[sl]
        tum &= side_ok & np.isin(t, GW + (pa.CSF,))
        edema = np.zeros_like(tum)
        if variant == "hgg":
            _, core = _ellipsoid(c, rad * 0.55, rot, shape)
            core = _crop_like(core, sl, c, rad * 0.55, shape) & tum
            grow = ndi.binary_dilation(tum, iterations=int(r.integers(6, 14)))
            edema = grow & ~tum & (t == pa.WM) & side_ok
            t[edema] = EDEMA
            t[tum] = TUMOR
            t[core] = NECROSIS
        else:
            t[tum] = TUMOR_NE
        _add_lesion(subj, kind, side, sl, tum, dict(size=_extent_cm(sl, tum, scale), variant=variant))
        return c, rt
    if kind == "meningioma":
        c = _convexity_point(r, anat, side, zmin=-5.0)
        rad = r.uniform(17, 24) if large else r.uniform(8, 14)
        sl, m = _ellipsoid(c, [rad, rad, rad * 0.85], _random_rotation(r, 30), shape)
        m &= (anat.depth_icv[sl] > 0) & _side_ok(anat, side, 3.0)[sl[0]]
        _paint(subj, sl, m, MENINGIOMA)
        _add_lesion(subj, kind, side, sl, m, dict(size=_extent_cm(sl, m, scale)))
        return c, rad
    if kind == "metastases":
        n = int(r.integers(2, 6))
        cands = anat.voxels("gw_junction", lambda a: (a.tissue == pa.WM) & (a.depth_brain > 1) & (a.depth_brain < 3)
                            & (np.abs(_xworld(a))[:, None, None] > 8))
        for i in range(n):
            c = _pick(r, cands)
            s = "left" if _xworld(anat)[int(c[0])] < 0 else "right"
            rr = float(r.uniform(3, 8))
            sl, tum = _ellipsoid(c, [rr] * 3, np.eye(3), shape)
            _, core = _ellipsoid(c, [rr * 0.5] * 3, np.eye(3), shape)
            core = _crop_like(core, sl, c, rr * 0.5, shape)
            t = subj.tissue[sl]
            tum &= np.isin(t, GW + (EDEMA,))
            ed = ndi.binary_dilation(tum, iterations=int(r.integers(3, 9))) & ~tum & np.isin(t, (pa.WM,))
            t[ed] = EDEMA
            t[tum] = TUMOR
            if rr > 5:
                t[core & tum] = NECROSIS
            _add_lesion(subj, kind, s, sl, tum, dict(size=_extent_cm(sl, tum, scale), count=n))
        return None
    if kind == "hydrocephalus":
        v = float(r.uniform(4, 8))
        m = (anat.dist_vent <= v) & np.isin(subj.tissue, GW + (pa.CSF,)) & (anat.depth_icv > 4)
        subj.tissue[m] = pa.VENT
        halo = (anat.dist_vent > v) & (anat.dist_vent <= v + 2.5) & (subj.tissue == pa.WM)
        subj.tissue[halo] = WMH
        vent = subj.tissue == pa.VENT
        _add_lesion(subj, kind, "bilateral", _tight(vent)[0], _tight(vent)[1], dict(dilation_mm=v),
                    region="Lateral_Ventricles")
        return None
    if kind == "atrophy":
        a = float(r.uniform(0.8, 2.2))
        m = (anat.depth_brain <= a) & (subj.tissue == pa.GM) & (anat.depth_icv > 2)
        subj.tissue[m] = pa.CSF
        mv = (anat.dist_vent <= 1.5 * a) & np.isin(subj.tissue, GW)
        subj.tissue[mv] = pa.VENT
        sl, mm = _tight(m | mv)
        _add_lesion(subj, kind, "bilateral", sl, mm, dict(severity="mild" if a < 1.5 else "moderate"),
                    region="Diffuse")
        return None
    if kind in ("svd", "ms"):
        n = int(r.integers(12, 35)) if kind == "svd" else int(r.integers(6, 16))
        lo, hi = (2.0, 18.0) if kind == "svd" else (0.5, 7.0)
        cands = anat.voxels(f"periv_{kind}", lambda a: (a.tissue == pa.WM) & (a.dist_vent > lo) & (a.dist_vent < hi))
        total = np.zeros(shape, bool)
        for i in range(n):
            c = _pick(r, cands)
            if kind == "ms":  # Dawson fingers: long axis along the gradient of the ventricle distance
                g = np.array([anat.dist_vent[tuple(np.clip(c.astype(int) + e, 0, np.array(shape) - 1))] -
                              anat.dist_vent[tuple(np.clip(c.astype(int) - e, 0, np.array(shape) - 1))]
                              for e in np.eye(3, dtype=int)])
                g = g / (np.linalg.norm(g) + 1e-6)
                a = np.cross(g, [0, 0, 1.0]) if abs(g[2]) < 0.9 else np.cross(g, [1.0, 0, 0])
                a /= np.linalg.norm(a)
                rot = np.stack([g, a, np.cross(g, a)], 1)
                rad = [r.uniform(4, 7), r.uniform(1.8, 3), r.uniform(1.8, 3)]
            else:
                rot, rad = _random_rotation(r, 90), r.uniform(1.5, 4.5, 3)
            sl, m = _ellipsoid(c, rad, rot, shape)
            m &= np.isin(subj.tissue[sl], (pa.WM, WMH))
            subj.tissue[sl][m] = WMH
            total[sl] |= m
        sl, mm = _tight(total)
        _add_lesion(subj, kind, "bilateral", sl, mm, dict(count=0), region="Periventricular_White_Matter")
        return None
    if kind == "arachnoid_cyst":
        ids = _region_ids(anat, ("Temporal_Pole_Sup", "Temporal_Pole_Mid", "Temporal"), side)
        cands = anat.voxels(f"temporal_surface_{side}", lambda a: np.isin(a.region, ids)
                            & (a.depth_icv > 2.0) & (a.depth_icv < 6.0))
        c = _pick(r, cands)
        rad = r.uniform(9, 17)
        sl, m = _ellipsoid(c, [rad, rad * 1.3, rad * 0.9], _random_rotation(r, 15), shape)
        m &= (anat.depth_icv[sl] > 0) & _side_ok(anat, side, 3.0)[sl[0]]
        _paint(subj, sl, m, CYST)
        _add_lesion(subj, kind, side, sl, m, dict(size=_extent_cm(sl, m, scale)), region=f"Middle_Cranial_Fossa_{side[0].upper()}")
        return None
    if kind == "fracture":
        c = _convexity_point(r, anat, side, zmin=10.0)
        sl, d = _box(c, 45, shape)
        normal = r.normal(0, 1, 3)
        normal /= np.linalg.norm(normal)
        dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        plane = np.abs(d[0] * normal[0] + d[1] * normal[1] + d[2] * normal[2])
        bone = subj.tissue[sl] == pa.BONE
        L = r.uniform(25, 45)
        gap = bone & (plane < 0.9) & (dist < L) & _side_ok(anat, side, 5.0)[sl[0]]
        subj.tissue[sl][gap] = pa.SOFT
        m = gap
        if variant == "displaced":  # depress a bone fragment 3-5 mm towards the brain
            frag = bone & ~gap & (dist < r.uniform(10, 15)) & _side_ok(anat, side, 5.0)[sl[0]]
            inward = -(c - np.array(shape) / 2.0)
            inward /= np.linalg.norm(inward)
            shift = tuple(int(round(v)) for v in inward * r.uniform(3, 5))
            moved = np.roll(frag, shift, axis=(0, 1, 2))
            subj.tissue[sl][frag] = pa.SOFT
            subj.tissue[sl][moved] = pa.BONE
            m = gap | frag | moved
        _add_lesion(subj, kind, side, sl, m, dict(bone=_bone_name(anat, c)))
        return None
    if kind == "craniotomy":
        c = _convexity_point(r, anat, side, zmin=15.0)
        R = r.uniform(25, 38)
        sl, d = _box(c, R + 12, shape)
        dist = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
        bone = subj.tissue[sl] == pa.BONE
        if variant == "craniectomy":
            m = bone & (dist < R) & (anat.depth_icv[sl] == 0)
            subj.tissue[sl][m] = pa.SOFT
        else:  # bone flap with kerf and burr holes
            m = bone & (np.abs(dist - R) < 1.2)
            subj.tissue[sl][m] = pa.SOFT
        m &= _side_ok(anat, side, 3.0)[sl[0]]
        _add_lesion(subj, kind, side, sl, m, dict(lobe=_lobe(anat.region_at(c)) or "frontoparietal"))
        return None
    if kind == "catheter":
        # Kocher's point: ~11 cm behind the nasion, 3 cm off midline, to the frontal horn
        sgn = -1 if side == "left" else 1
        target = anat.voxel([sgn * 12.0, 8.0, 12.0])
        vent = anat.voxels(f"vent_{side}", lambda a: (a.tissue == pa.VENT) & _side_ok(a, side, 4.0))
        target = vent[np.argmin(((vent - target) ** 2).sum(1))].astype(float)
        entry = anat.voxel([sgn * 30.0, 15.0, 95.0])
        direc = target - entry
        direc /= np.linalg.norm(direc)
        start = entry - direc * 10
        length = np.linalg.norm(target - start) + 8
        sl, _ = _box((start + target) / 2, length / 2 + 4, shape)
        pts = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in sl], indexing="ij"), -1).astype(np.float32)
        rel = pts - start.astype(np.float32)
        tpar = rel @ direc.astype(np.float32)
        perp = np.linalg.norm(rel - tpar[..., None] * direc.astype(np.float32), axis=-1)
        m = (perp < 1.3) & (tpar > 0) & (tpar < length) & (subj.tissue[sl] != pa.AIR)
        burr = (perp < 6) & (tpar > 0) & (tpar < length) & (subj.tissue[sl] == pa.BONE)
        subj.tissue[sl][burr] = pa.SOFT
        subj.tissue[sl][m] = CATHETER
        _add_lesion(subj, kind, side, sl, m, {}, region=f"Frontal_Horn_{side[0].upper()}")
        return None
    raise ValueError(f"unknown pathology kind {kind!r}")


def _crop_like(mask, sl_big, center, radius, shape):
    """Re-embed an ellipsoid mask made on a smaller box into the bigger box sl_big."""
    sl_small, _ = _box(center, max(np.atleast_1d(radius)) * 1.3, shape)
    out = np.zeros(tuple(s.stop - s.start for s in sl_big), bool)
    inner = tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl_small, sl_big))
    out[inner] = mask
    return out


def _tight(mask):
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return (slice(0, 1),) * 3, np.zeros((1, 1, 1), bool)
    lo, hi = idx.min(0), idx.max(0) + 1
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return sl, mask[sl]


def _lobe(region):
    for key, lobe in (("Frontal", "frontal"), ("Precentral", "frontal"), ("Supp_Motor", "frontal"),
                      ("Rolandic", "frontal"), ("Rectus", "frontal"), ("Olfactory", "frontal"),
                      ("Temporal", "temporal"), ("Heschl", "temporal"), ("Fusiform", "temporal"),
                      ("Hippocampus", "temporal"), ("ParaHippocampal", "temporal"), ("Amygdala", "temporal"),
                      ("Parietal", "parietal"), ("Postcentral", "parietal"), ("SupraMarginal", "parietal"),
                      ("Angular", "parietal"), ("Precuneus", "parietal"), ("Paracentral", "parietal"),
                      ("Occipital", "occipital"), ("Calcarine", "occipital"), ("Cuneus", "occipital"),
                      ("Lingual", "occipital"), ("Cerebel", "cerebellar"), ("Vermis", "cerebellar")):
        if region.startswith(key):
            return lobe
    return ""


def region_phrase(region, side):
    """Readable location from an atlas name, e.g. ("Putamen_L", "left") -> "left putamen"."""
    base = region[:-2] if region[-2:] in ("_L", "_R") else region
    deep = {"Putamen": "putamen", "Thalamus": "thalamus", "Caudate": "caudate nucleus", "Pallidum": "globus pallidus",
            "Insula": "insula", "Cingulum_Ant": "anterior cingulate gyrus", "Cingulum_Mid": "middle cingulate gyrus",
            "Cingulum_Post": "posterior cingulate gyrus", "Hippocampus": "hippocampus"}
    if base in deep:
        return f"{side} {deep[base]}"
    lobe = _lobe(base)
    if lobe == "cerebellar":
        return f"{side} cerebellar hemisphere"
    return f"{side} {lobe} lobe" if lobe else f"{side} cerebral hemisphere"


def _bone_name(anat, c):
    lobe = _lobe(anat.region_at(c))
    return {"frontal": "frontal", "temporal": "temporal", "parietal": "parietal", "occipital": "occipital"}.get(lobe, "parietal")


def fill_indication(template, lesions):
    """The indication text with "{contra}" (the infarct indications: the weak side) filled in:
    the side opposite the study's first infarct. Without a placed infarct (none survived the
    brain mask) the deficit is left unsided: "{contra}-sided weakness" -> "unilateral weakness"."""
    if "{contra}" not in template:
        return template
    side = next((l["side"] for l in lesions if l["kind"] == "infarct" and l["side"] in ("left", "right")), None)
    if side is None:
        return template.replace("{contra}-sided", "unilateral").replace("{contra} ", "")
    return template.replace("{contra}", "right" if side == "left" else "left")


def build_subject(plan, anat):
    """Subject with the plan's pathology painted in (deterministic from the plan)."""
    r = np.random.default_rng([plan["lesion_seed"]])
    subj = Subject(anat, np.random.default_rng([plan["geometry_seed"]]), plan["age"])
    order = sorted(plan["kinds"], key=lambda k: ["atrophy", "hydrocephalus", "svd", "ms"].index(k["kind"])
                   if k["kind"] in ("atrophy", "hydrocephalus", "svd", "ms") else 4)
    for item in order:
        n0 = len(subj.lesions)
        res = paint_kind(subj, r, item, plan["modality"])
        if item["large"]:
            c, rad = res
            sgn = -1.0 if subj.lesions[n0]["side"] == "left" else 1.0  # (an IPH's IVH has its side)
            c_mm = anat.world(c)
            shift_mm = float(r.uniform(5, 11))  # the push's nominal size; the report gives the rendered shift
            subj.pushes.append((c_mm, float(rad) * 0.35, float(rad) * 1.6, np.array([-sgn * shift_mm, 0, 0])))
    _drop_overwritten(subj)
    _measure_masks(subj)
    subj.midline_shift_mm = midline_shift_mm(subj) if subj.pushes else 0.0
    return subj


def _drop_overwritten(subj):
    """Take out of each lesion's mask the voxels a later-painted lesion repainted (a catheter
    through a hematoma, blood in an atrophic sulcus, ...), so that every mask holds what is
    rendered; a lesion left with no voxel is dropped."""
    for les in subj.lesions:
        m = les["mask"]
        m[m] = subj.tissue[les["sl"]][m] == les["painted"]
    subj.lesions = [les for les in subj.lesions if les["mask"].any()]


def _measure_masks(subj):
    """Measure the facts a report quotes on each final mask (after _drop_overwritten), not on what
    was drawn, and as rendered: extents (cm) and a collection's thickness (mm: its deepest voxel's
    distance from the inner table) on the world mask that is written (the mass effect of a large
    lesion enlarges it in the images: a large SDH drawn 15 mm thick renders 30 mm thick), and a
    white-matter disease's lesion count (26-connected pieces of the template mask: ovoids drawn to
    overlap are one lesion, one clipped by grey matter may be two)."""
    icv = None
    for les in subj.lesions:
        f, m = les["facts"], les["mask"]
        if "size" in f or "thickness_mm" in f:
            mask, aff, coords = lesion_world_mask(subj, les)
            les["world"] = (mask, aff)  # written as is by _generate_study
            step = float(aff[0, 0])
            if "size" in f:
                f["size"] = _extent_cm(None, mask, step)
            if "thickness_mm" in f:
                if icv is None:
                    icv = (subj.anat.depth_icv > 0).astype(np.float32)
                inside = _sample_template(icv, coords, subj.anat.shape).reshape(mask.shape) >= 0.5
                depth = ndi.distance_transform_edt(inside) * step  # world mm to the inner table
                f["thickness_mm"] = max(1, int(round(float(depth[mask > 0].max()))))
        if les["kind"] in ("ms", "svd"):
            f["count"] = int(ndi.label(m, structure=np.ones((3, 3, 3)))[1])


def midline_shift_mm(subj):
    """Rendered midline shift (world RAS mm, signed: + = towards the patient's right): the largest
    displacement of the template's midsagittal plane (x = 0, the falx and septum) over the
    supratentorial brain that the mass-effect pushes cause. Each point (0, y, z) on a 5 mm grid is
    followed along the world x line through it: where the template x of the map crosses 0, with
    and without the pushes."""
    anat = subj.anat
    y, z = np.meshgrid(np.arange(-100.0, 75.0, 5.0), np.arange(-10.0, 85.0, 5.0), indexing="ij")
    pts = np.stack([np.zeros(y.size), y.ravel(), z.ravel()], 1)
    vox = np.round(anat.voxel(pts)).astype(int)
    inside = np.all((vox >= 0) & (vox < anat.shape), 1)
    pts, vox = pts[inside], vox[inside]
    cerebellum = [k for k, v in anat.region_names.items() if v.startswith(("Cerebel", "Vermis"))]
    idx = tuple(vox.T)
    keep = np.isin(anat.tissue[idx], (pa.GM, pa.WM, pa.CSF, pa.VENT)) & ~np.isin(anat.region[idx], cerebellum)
    A = subj.world_from_template()
    p0 = pts[keep] @ A[:3, :3].T + A[:3, 3]
    xs = np.arange(-40.0, 40.001, 0.25)                      # world x offsets along each line (mm)
    line = np.repeat(p0[:, None], len(xs), 1)
    line[..., 0] += xs
    flat = copy.copy(subj)
    flat.pushes = []
    cross = []
    for s in (subj, flat):
        tx = s.template_voxel(line.reshape(-1, 3).astype(np.float32))[0].reshape(len(p0), len(xs))
        tx = tx * anat.affine[0, 0] + anat.affine[0, 3]       # template x, mm
        sc = np.sign(tx[:, :-1]) != np.sign(tx[:, 1:])
        k = np.argmin(np.where(sc, np.abs(xs[:-1]), np.inf), 1)  # the crossing nearest the line's point
        ok = sc[np.arange(len(k)), k]
        a, b = tx[np.arange(len(k)), k], tx[np.arange(len(k)), k + 1]
        cross.append(np.where(ok, p0[:, 0] + xs[k] + a / (a - b) * (xs[1] - xs[0]), np.nan))
    d = cross[0] - cross[1]
    d = d[np.isfinite(d)]
    return float(d[np.argmax(np.abs(d))]) if len(d) else 0.0


def shift_phrase(shift_mm):
    """(whole mm as reports give it, 'rightward' / 'leftward') of a signed RAS shift."""
    return int(math.floor(abs(shift_mm) + 0.5)), "rightward" if shift_mm > 0 else "leftward"


def study_labels(plan, subj):
    """Sorted diagnosis names of the rendered study: the plan's, plus intraventricular hemorrhage where
    an IPH's blood reached a ventricle, less the midline shift where the rendered one rounds to 0 mm."""
    labels = set(plan["labels"])
    if any(l["kind"] == "ivh" for l in subj.lesions):
        labels.update(kind_labels("ivh", plan["modality"], ""))
    if any(k["large"] for k in plan["kinds"]) and shift_phrase(subj.midline_shift_mm)[0] == 0:
        labels -= set(mass_effect_labels(plan["modality"])[1:])
    return sorted(labels)


# -----------------------------------------------------------------------------
# findings text

def findings_sentences(plan, subj):
    """Findings as sentences ordered by clinical relevance (urgent kinds first)."""
    ct = plan["modality"] == "CT"
    out = []
    by_kind = {}
    for l in subj.lesions:
        by_kind.setdefault(l["kind"], []).append(l)
    variants = {k["kind"]: k["variant"] for k in plan["kinds"]}
    for kind in KIND_ORDER:
        if kind not in by_kind:
            continue
        ls = by_kind[kind]
        l0 = ls[0]
        f, side = l0["facts"], l0["side"]
        loc = region_phrase(l0["region"], side)
        sz = f.get("size")
        dims = f"{sz[0]} x {sz[1]} cm" if sz else ""
        if kind == "iph":
            s = (f"Acute intraparenchymal hemorrhage in the {loc} measuring {dims} with surrounding edema." if ct else
                 f"Acute intraparenchymal hematoma in the {loc} measuring {dims} with blooming on SWI and surrounding edema.")
        elif kind == "sdh":
            age = variants.get("sdh")
            s = (f"{'Acute hyperdense' if age == 'acute' else 'Chronic hypodense'} {side} convexity subdural hematoma "
                 f"measuring up to {f['thickness_mm']} mm in thickness." if ct else
                 f"{side.capitalize()} convexity subdural hematoma measuring up to {f['thickness_mm']} mm in thickness.")
        elif kind == "edh":
            s = f"Biconvex {side} epidural hematoma measuring up to {f['thickness_mm']} mm in thickness."
        elif kind == "sah":
            s = f"Traumatic subarachnoid hemorrhage within the {loc.replace(' lobe', '')} sulci."
        elif kind == "infarct":
            s = (f"Acute {side} {f['territory']} territory infarct involving the {loc} with loss of grey-white "
                 f"differentiation and hypodensity." if ct else
                 f"Acute {side} {f['territory']} territory infarct involving the {loc} with restricted diffusion "
                 f"(DWI hyperintense, ADC hypointense).")
        elif kind == "glioma":
            if variants.get("glioma") == "hgg":
                s = (f"Intra-axial mass in the {loc} measuring {dims} with central hypodensity and surrounding vasogenic "
                     f"edema, suspicious for high-grade glioma." if ct else
                     f"Heterogeneously enhancing necrotic intra-axial mass in the {loc} measuring {dims} with "
                     f"surrounding FLAIR hyperintense edema, compatible with high-grade glioma.")
            else:
                s = (f"Ill-defined hypodense intra-axial mass in the {loc} measuring {dims}, suspicious for "
                     f"low-grade glioma." if ct else
                     f"Non-enhancing T2/FLAIR hyperintense infiltrative mass in the {loc} measuring {dims}, "
                     f"compatible with low-grade glioma.")
        elif kind == "meningioma":
            s = (f"Hyperdense extra-axial mass along the {side} {_lobe(l0['region']) or 'cerebral'} convexity measuring "
                 f"{dims}, likely meningioma." if ct else
                 f"Homogeneously enhancing dural-based extra-axial mass along the {side} "
                 f"{_lobe(l0['region']) or 'cerebral'} convexity measuring {dims}, compatible with meningioma.")
        elif kind == "metastases":
            # each compartment the lesions lie in, with its sides (a metastasis may seed the cerebellum)
            comp = {}
            for l in ls:
                c = "cerebellar" if _lobe(l["region"]) == "cerebellar" else "cerebral"
                comp.setdefault(c, set()).add(l["side"])
            where = " and ".join(f"both {c} hemispheres" if len(comp[c]) == 2 else f"the {min(comp[c])} {c} hemisphere"
                                 for c in ("cerebral", "cerebellar") if c in comp)
            big = max(ls, key=lambda l: l["facts"]["size"][0])
            s = (f"Multiple ({len(ls)}) rounded lesions at the grey-white junction in {where} with surrounding "
                 f"vasogenic edema, largest {big['facts']['size'][0]} cm in the "
                 f"{region_phrase(big['region'], big['side'])}, suspicious for metastases." if ct else
                 f"Multiple ({len(ls)}) ring-enhancing lesions at the grey-white junction in {where} with "
                 f"surrounding edema, largest {big['facts']['size'][0]} cm in the "
                 f"{region_phrase(big['region'], big['side'])}, compatible with metastases.")
        elif kind == "hydrocephalus":
            s = ("Enlarged lateral and third ventricles out of proportion to the sulci with periventricular "
                 "hypodensity, compatible with obstructive hydrocephalus with transependymal flow." if ct else
                 "Enlarged lateral and third ventricles out of proportion to the sulci with periventricular FLAIR "
                 "hyperintensity, compatible with obstructive hydrocephalus.")
        elif kind == "atrophy":
            s = f"{f['severity'].capitalize()} generalized cerebral volume loss with prominent sulci and ventricles."
        elif kind == "svd":
            s = ("Patchy periventricular and deep white matter hypodensities, compatible with chronic small vessel "
                 "ischemic disease." if ct else
                 "Patchy periventricular and deep white matter T2/FLAIR hyperintensities, compatible with chronic "
                 "small vessel ischemic disease.")
        elif kind == "ms":
            s = (f"Multiple ({f['count']}) ovoid periventricular T2/FLAIR hyperintense lesions oriented "
                 "perpendicular to the lateral ventricles, compatible with multiple sclerosis.")
        elif kind == "arachnoid_cyst":
            s = (f"{'CSF-density' if ct else 'CSF-intensity'} extra-axial cyst in the {side} middle cranial fossa "
                 f"measuring {dims}, compatible with arachnoid cyst.")
        elif kind == "fracture":
            s = (f"Depressed displaced fracture of the {side} {f['bone']} bone." if variants.get("fracture") == "displaced"
                 else f"Non-displaced linear fracture of the {side} {f['bone']} bone.")
        elif kind == "craniotomy":
            s = (f"Postsurgical changes of {side} {f['lobe']} craniectomy with absent bone flap."
                 if variants.get("craniotomy") == "craniectomy" else
                 f"Postsurgical changes of {side} {f['lobe']} craniotomy.")
        elif kind == "catheter":
            via = " via a burr hole" if ct else ""  # rendered in both; only the CT ontology names a burr hole
            s = (f"{side.capitalize()} frontal approach ventricular catheter{via} terminating in the {side} "
                 "lateral ventricle.")
        else:
            continue
        out.append((kind, s))
        if kind == "iph" and "ivh" in by_kind:
            out.append((kind, "Intraventricular hemorrhage from extension of the hematoma into the ventricle."))
    large = [k["kind"] for k in plan["kinds"] if k["large"]]
    if large:  # one net shift, however many lesions push: the rendered one
        mm, way = shift_phrase(subj.midline_shift_mm)
        out.append((min(large, key=KIND_ORDER.index),
                    f"Mass effect with {mm} mm {way} midline shift." if mm else "Mass effect without midline shift."))
    urgent = {k["kind"] for k in plan["kinds"]
              if any(ontology.DIAGNOSES[n].urgency == "urgent" for n in kind_labels(k["kind"], plan["modality"], k["variant"]))
              or k["large"]}
    out.sort(key=lambda ks: (ks[0] not in urgent, KIND_ORDER.index(ks[0])))
    return [s for _, s in out]


# -----------------------------------------------------------------------------
# series geometry and rendering

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
# box a brain protocol covers, template mm (MNI-like): skull base to vertex, not face or neck
CRANIUM_LO, CRANIUM_HI = np.array([-78.0, -116.0, -62.0]), np.array([78.0, 82.0, 100.0])
ORIENT = {  # DICOM row dir (IOP[:3]) and column dir (IOP[3:]) in LPS
    "axial": ([1, 0, 0], [0, 1, 0]), "coronal": ([1, 0, 0], [0, 0, -1]), "sagittal": ([0, 1, 0], [0, 0, -1]),
}


def series_geometry(spec, subj, r, prof):
    """Grid of one series: dict(iop, ipp0, step, spacing, thickness, spacing_between, shape (K, R, C),
    normal) in LPS mm."""
    X, Y = (np.array(v, float) for v in ORIENT[spec["orientation"]])
    if spec["oblique"]:
        ob = _rot(*(r.uniform(-1, 1, 3) * spec["oblique"]))
        X, Y = ob @ X, ob @ Y
    N = np.cross(X, Y)
    step_dir = N.copy()
    if spec["tilt"]:
        tilt = _rot(-spec["tilt"], 0, 0)  # rotate the image plane about the patient x axis
        Y = tilt @ Y
        N = np.cross(X, Y)
        step_dir = N / N[2]  # tilted CT steps along the table (z), not along the plane normal
    # head box corners (template mm -> world RAS -> LPS)
    lo, hi = np.maximum(subj.head_lo_mm, CRANIUM_LO), np.minimum(subj.head_hi_mm, CRANIUM_HI)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    A = subj.world_from_template()
    world = corners @ A[:3, :3].T + A[:3, 3]
    lps = world @ LPS.T
    center = lps.mean(0) + r.uniform(-4, 4, 3)
    px = spec["pixel"]
    fov = float(np.clip(max(np.ptp(lps @ X), np.ptp(lps @ Y)) + 12, *prof["fov"]))
    n_in = int(round(fov / px))
    n_in += n_in % 2
    th = spec["thickness"]
    gap = th  # contiguous slices (spacing == thickness)
    proj = lps @ N
    cov = np.ptp(proj)
    K = max(int(math.ceil(cov / gap)), 1)
    s0 = float(center @ N) - (K - 1) * gap / 2.0
    # IPP of slice 0: in-plane corner, then along the normal to s0 (table axis for tilt)
    c_in = center - (n_in - 1) / 2.0 * px * X - (n_in - 1) / 2.0 * px * Y
    ipp0 = c_in + (s0 - c_in @ N) / (step_dir @ N) * step_dir
    step = step_dir * gap / (step_dir @ N)
    return dict(iop=np.concatenate([X, Y]), ipp0=ipp0, step=step, spacing=(px, px), thickness=th,
                spacing_between=float(np.linalg.norm(step)), shape=(K, n_in, n_in), normal=N)


def lps_affine(geom):
    """4x4 voxel (column i, row j, slice k) -> LPS mm."""
    X, Y = geom["iop"][:3], geom["iop"][3:]
    A = np.eye(4)
    A[:3, 0] = X * geom["spacing"][1]
    A[:3, 1] = Y * geom["spacing"][0]
    A[:3, 2] = geom["step"]
    A[:3, 3] = geom["ipp0"]
    return A


def ras_affine(geom):
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine(geom)


def contrast_volume(subj, contrast):
    """Template-grid float32 intensity (HU for CT, arbitrary for MR) of one contrast."""
    vol = LUT[contrast][subj.tissue]
    if contrast == "CT":  # bone density texture: dark T1 (cortical) -> dense
        bone = subj.tissue == pa.BONE
        vol[bone] = 1700 - 1500 * np.clip(subj.anat.t1[bone] / 0.45, 0, 1)
    return vol


def _interp_matrix(n, step):
    """Coarse sample positions along an axis of n pixels (every `step`, last included) and the
    (n, m) linear interpolation matrix back to every pixel."""
    pts = np.unique(np.r_[np.arange(0, n, step), n - 1])
    if len(pts) == 1:
        return pts, np.ones((n, 1), np.float32)
    x = np.arange(n)
    idx = np.clip(np.searchsorted(pts, x, side="right") - 1, 0, len(pts) - 2)
    t = (x - pts[idx]) / (pts[idx + 1] - pts[idx])
    W = np.zeros((n, len(pts)), np.float32)
    W[x, idx] = 1 - t
    W[x, idx + 1] = t
    return pts, W


COARSE = 8  # the world->template map is smooth: evaluate it every 8 pixels, interpolate between


def _plane_coords(subj, geom, k, offset, Wr, Wc, pr, pc):
    """Template voxel coordinates (3, R*C) of slice k shifted by `offset` mm along the normal."""
    A = lps_affine(geom)
    N = geom["normal"] / np.linalg.norm(geom["normal"])
    jj, ii = np.meshgrid(pr.astype(np.float32), pc.astype(np.float32), indexing="ij")
    lps = (np.stack([ii.ravel(), jj.ravel()], 1) @ A[:3, :2].T.astype(np.float32)
           + (A[:3, 3] + k * A[:3, 2] + offset * N).astype(np.float32))
    coarse = subj.template_voxel(lps * np.float32([-1, -1, 1])).reshape(3, len(pr), len(pc))
    return np.stack([(Wr @ coarse[a] @ Wc.T).ravel() for a in range(3)])


def render(subj, vols, geom, n_sub, cvals):
    """Sample template-grid volumes on a series grid (slab-averaged over n_sub sub-slices,
    order-1 interpolation). vols: list of float32 volumes. Returns list of float32 (K, R, C)."""
    K, R, C = geom["shape"]
    pr, Wr = _interp_matrix(R, COARSE)
    pc, Wc = _interp_matrix(C, COARSE)
    outs = [np.empty((K, R, C), np.float32) for _ in vols]
    offs = (np.arange(n_sub) + 0.5) / n_sub - 0.5 if n_sub > 1 else np.zeros(1)
    for k in range(K):
        accs = [np.zeros(R * C, np.float32) for _ in vols]
        for o in offs:
            coords = _plane_coords(subj, geom, k, o * geom["thickness"], Wr, Wc, pr, pc)
            for acc, vol, cval in zip(accs, vols, cvals):
                acc += ndi.map_coordinates(vol, coords, order=1, mode="constant", cval=cval, prefilter=False)
        for out, acc in zip(outs, accs):
            out[k] = (acc / len(offs)).reshape(R, C)
    return outs


def _bias_field(geom, r):
    """Smooth multiplicative MR receive-coil bias, (K, R, C) float32 around 1."""
    K, R, C = geom["shape"]
    A = lps_affine(geom)
    pr, Wr = _interp_matrix(R, COARSE)
    pc, Wc = _interp_matrix(C, COARSE)
    kk, jj, ii = np.meshgrid(np.arange(K), pr, pc, indexing="ij")
    p = np.stack([ii, jj, kk, np.ones_like(ii)], -1).reshape(-1, 4).astype(np.float32) @ A.T.astype(np.float32)
    f = np.zeros(len(p), np.float32)
    for _ in range(3):
        w = r.normal(0, 1, 3) / r.uniform(120, 220)
        f += r.uniform(0.05, 0.12) * np.sin(p[:, :3] @ w.astype(np.float32) + r.uniform(0, 6.3))
    f = f.reshape(K, len(pr), len(pc))
    return np.exp(np.stack([Wr @ f[k] @ Wc.T for k in range(K)]))


# -----------------------------------------------------------------------------
# study generation

MR_PARAMS = {  # (TR ms, TE ms, TI ms or None, scanning sequence, noise fraction of WM)
    "T1": (600, 12, None, "SE", 0.02), "T1C": (600, 12, None, "SE", 0.02), "T2": (4500, 95, None, "SE", 0.02),
    "FLAIR": (9000, 120, 2500, ["SE", "IR"], 0.025), "DWI": (5500, 80, None, ["EP", "SE"], 0.015),
    "ADC": (5500, 80, None, ["EP", "SE"], 0.02), "SWI": (28, 20, None, "GR", 0.03),
}


def _series_tags(plan, spec, number, frame_uid):
    series_uid = str(pd.make_uid("series", plan["seed"], plan["index"], number))
    t = {"Modality": "CT" if spec["contrast"] == "CT" else "MR", "SeriesInstanceUID": series_uid,
         "SeriesNumber": number, "SeriesDescription": spec["description"], "ProtocolName": spec["description"],
         "FrameOfReferenceUID": frame_uid, "PatientPosition": "HFS", "BodyPartExamined": "HEAD",
         "SeriesDate": plan["phi"]["StudyDate"], "SeriesTime": plan["phi"]["StudyTime"],
         "PositionReferenceIndicator": ""}
    return t


def _study_tags(plan):
    phi = plan["phi"]
    t = {k: phi[k] for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                             "AccessionNumber", "StudyID", "InstitutionName", "InstitutionAddress",
                             "ReferringPhysicianName", "OperatorsName", "StationName", "StudyDate", "StudyTime",
                             "StudyInstanceUID")}
    t["StudyDescription"] = "CT HEAD W/O CONTRAST" if plan["modality"] == "CT" else (
        "MRI BRAIN W/WO CONTRAST" if plan["has_contrast"] else "MRI BRAIN W/O CONTRAST")
    t["Manufacturer"] = "NVFM Phantom Systems"
    t["ManufacturerModelName"] = "SynthScan CT 64" if plan["modality"] == "CT" else "SynthScan MR 3T"
    t["DeviceSerialNumber"] = "NVFMSN" + plan["phi"]["PatientID"][-4:]
    t["ContentDate"], t["ContentTime"] = phi["StudyDate"], phi["StudyTime"]
    return t


def _slug(s):
    return "".join(ch if ch.isalnum() else "_" for ch in s).strip("_")


def _write_nifti(path, data_ijk, affine, dtype):
    import nibabel as nib
    img = nib.Nifti1Image(np.asarray(data_ijk, dtype), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def _sample_template(vol, coords, shape):
    """Order-1 samples (N,) of a template-grid volume at template voxel coordinates (3, N), 0 outside;
    reads only the template box the coordinates span (cheap)."""
    lo_t = np.clip(np.floor(coords.min(1)).astype(int) - 1, 0, np.array(shape) - 1)
    hi_t = np.clip(np.ceil(coords.max(1)).astype(int) + 2, lo_t + 1, np.array(shape))
    sub = vol[lo_t[0]:hi_t[0], lo_t[1]:hi_t[1], lo_t[2]:hi_t[2]]
    return ndi.map_coordinates(sub, coords - lo_t[:, None].astype(np.float32), order=1, mode="constant",
                               cval=0.0, prefilter=False)


def lesion_world_mask(subj, lesion):
    """A template-grid lesion mask resampled onto a 1 mm RAS-aligned grid around it (2 mm for the
    diffuse kinds), as written to lesion_<i>.nii.gz: (mask uint8 (X, Y, Z), affine (4, 4) voxel ->
    RAS mm, template voxel coordinates (3, X*Y*Z) of the grid's voxels)."""
    sl, m = lesion["sl"], lesion["mask"]
    idx = np.argwhere(m)
    lo = idx.min(0) + [s.start for s in sl]
    hi = idx.max(0) + [s.start for s in sl]
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])], float)
    A = subj.world_from_template()
    w = subj.anat.world(corners) @ A[:3, :3].T + A[:3, 3]
    pad = 6.0 + sum(amp + float(np.abs(shift).max()) for _, amp, _, shift in subj.pushes)  # warps move it
    step = 2.0 if lesion["kind"] in ("atrophy", "hydrocephalus") else 1.0  # diffuse: 2 mm grid
    wlo, whi = np.floor(w.min(0) - pad), np.ceil(w.max(0) + pad)
    shape = (np.floor((whi - wlo) / step) + 1).astype(int)
    # world->template map on a coarse 3D grid, then separable linear upsampling (it is smooth)
    axes = [_interp_matrix(int(n), max(1, int(round(COARSE / step)))) for n in shape]
    cg = np.stack(np.meshgrid(*[pts.astype(np.float32) for pts, _ in axes], indexing="ij"), -1).reshape(-1, 3)
    coarse = subj.template_voxel(cg * np.float32(step) + wlo.astype(np.float32))
    coarse = coarse.reshape(3, *[len(pts) for pts, _ in axes])
    coords = np.stack([np.einsum("ia,jb,kc,abc->ijk", axes[0][1], axes[1][1], axes[2][1], coarse[a], optimize=True)
                       for a in range(3)]).reshape(3, -1)
    full = np.zeros(subj.anat.shape, np.float32)
    full[sl] = m
    vals = _sample_template(full, coords, subj.anat.shape)
    mask = (vals.reshape(tuple(shape)) >= 0.5).astype(np.uint8)
    if mask.sum() == 0:  # a thin lesion can fall between samples: keep its nearest voxels
        mask = (vals.reshape(tuple(shape)) > 0).astype(np.uint8)
    aff = np.diag([step, step, step, 1.0])
    aff[:3, 3] = wlo
    return mask, aff, coords


def _lesion_mask_world(subj, lesion, path):
    """Write a lesion's world mask (measured and kept by _measure_masks, else made here); its voxel count."""
    mask, aff = lesion["world"] if "world" in lesion else lesion_world_mask(subj, lesion)[:2]
    _write_nifti(path, mask, aff, np.uint8)
    return int(mask.sum())


def generate_study(plan, out_dir, anat=None):
    """Render and write one planned study; returns its record (also written as
    OUT/gt/<study>/subject.json). Deterministic for the plan."""
    # the many tiny matrix products here run ~100x slower when BLAS spins up its threads
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return _generate_study(plan, out_dir, anat)
    with threadpool_limits(1):
        return _generate_study(plan, out_dir, anat)


def _generate_study(plan, out_dir, anat=None):
    anat = anat or pa.load_anatomy()
    prof = PROFILES[plan["profile"]]
    study = plan["study"]
    ddir = os.path.join(out_dir, "dicom", study)
    gdir = os.path.join(out_dir, "gt", study)
    for d in (ddir, gdir):  # a half-written study from an interrupted run is redone
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    subj = build_subject(plan, anat)
    indication = fill_indication(plan["indication"], subj.lesions)
    study_tags = _study_tags(plan)
    frame_uid = str(pd.make_uid("frame", plan["seed"], plan["index"]))
    uid_seed = f"{plan['seed']}|{plan['index']}"
    ct = plan["modality"] == "CT"
    series_out = []
    number = 1
    vol_cache = {}
    rg = np.random.default_rng([plan["geometry_seed"], 5])

    if plan["scout"]:
        tags = _series_tags(plan, dict(contrast=plan["modality"] if ct else "MR", description="SCOUT" if ct else "3-PLANE LOC"),
                            number, frame_uid)
        tags["Modality"] = plan["modality"]
        tags["ImageType"] = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        folder = os.path.join(ddir, f"{number:02d}_{_slug(tags['SeriesDescription'])}")
        orients = ["sagittal"] if ct else ["axial", "sagittal", "coronal"]
        contrast = "CT" if ct else "T1"
        vol = vol_cache.setdefault(contrast, contrast_volume(subj, contrast))
        for i, o in enumerate(orients):
            spec = dict(orientation=o, oblique=0.0, tilt=0.0, pixel=4.0 if plan["profile"] == "tiny" else 1.8,
                        thickness=8.0 if ct else 5.0)
            g = series_geometry(spec, subj, rg, dict(fov=(240.0, 260.0)))
            mid = g["shape"][0] // 2
            g["ipp0"] = g["ipp0"] + mid * g["step"]
            g["shape"] = (1,) + g["shape"][1:]
            img = render(subj, [vol], g, 1, [float(LUT[contrast][0])])[0]
            if ct:
                pix = np.clip(img + 1024, 0, 4095).astype(np.uint16)
                extra = {"RescaleIntercept": "-1024", "RescaleSlope": "1", "RescaleType": "HU"}
            else:
                pix = np.clip(img * 1000, 0, 4095).astype(np.uint16)
                extra = {}
            pd.write_image_series(folder, pix, g, study_tags, tags, per_image=extra, uid_seed=uid_seed,
                                  first_instance=i + 1)
        series_out.append(dict(series=os.path.basename(folder), description=tags["SeriesDescription"],
                               family="LOCALIZER", gt=None, shape=None))
        number += 1

    for spec in plan["series"]:
        rs = np.random.default_rng([spec["noise_seed"]])
        geom = series_geometry(spec, subj, np.random.default_rng([spec["geom_seed"]]), prof)
        contrast = spec["contrast"]
        n_sub = int(min(prof["max_sub"], max(1, round(spec["thickness"] / 2.0))))
        vol = vol_cache.get(contrast)
        if vol is None:
            vol = vol_cache[contrast] = contrast_volume(subj, contrast)
        clean = render(subj, [vol], geom, n_sub, [float(LUT[contrast][0])])[0]
        tags = _series_tags(plan, spec, number, frame_uid)
        if ct:
            sigma = rs.uniform(3.0, 6.0) if spec["kernel"] == "soft" else rs.uniform(18.0, 35.0)
            noisy = clean + rs.standard_normal(clean.shape, np.float32) * np.float32(sigma)
            # outside the circular reconstruction field: exact air, no noise
            K, R, C = geom["shape"]
            yy, xx = np.ogrid[:R, :C]
            outside = ((yy - (R - 1) / 2) ** 2 + (xx - (C - 1) / 2) ** 2) > (min(R, C) / 2.0) ** 2
            noisy[:, outside] = -1024
            signed = rs.random() < 0.4
            if signed:
                pix = np.clip(np.round(noisy), -1024, 3071).astype(np.int16)
                intercept = 0
            else:
                pix = np.clip(np.round(noisy) + 1024, 0, 4095).astype(np.uint16)
                intercept = -1024
            gt_vals = np.round(clean).astype(np.int16)
            bone = spec["kernel"] == "bone"
            tags["ImageType"] = ["ORIGINAL", "PRIMARY", "AXIAL"] if spec["orientation"] == "axial" else \
                ["DERIVED", "SECONDARY", "REFORMATTED"]
            extra = {"RescaleIntercept": str(intercept), "RescaleSlope": "1", "RescaleType": "HU",
                     "WindowCenter": "600" if bone else "40", "WindowWidth": "2800" if bone else "80",
                     "KVP": "120", "ConvolutionKernel": "BONE" if bone else "STANDARD",
                     "GantryDetectorTilt": f"{spec['tilt']:.1f}", "XRayTubeCurrent": int(rs.integers(150, 350)),
                     "AcquisitionDate": plan["phi"]["StudyDate"], "AcquisitionTime": plan["phi"]["StudyTime"]}
            family = "CT"
        else:
            scale = float(rs.uniform(200, 800)) if contrast != "ADC" else 1000.0
            bias = _bias_field(geom, rs) if contrast != "ADC" else np.float32(1.0)
            signal = clean * bias * np.float32(scale)
            sigma = np.float32(MR_PARAMS[contrast][4] * scale * (0.8 if contrast == "ADC" else 1.0))
            n1 = rs.standard_normal(clean.shape, np.float32) * sigma
            n2 = rs.standard_normal(clean.shape, np.float32) * sigma
            noisy = np.sqrt((signal + n1) ** 2 + n2 ** 2)  # Rician magnitude noise
            if contrast == "ADC":  # scanners zero the ADC map outside the head (b0 threshold)
                noisy[clean < 0.05] = 0
            pix = np.clip(np.round(noisy), 0, 32767).astype(np.uint16)
            gt_vals = np.clip(np.round(clean * np.float32(scale)), 0, 32767).astype(np.int16)
            tr, te, ti, seq, _ = MR_PARAMS[contrast]
            tags["ImageType"] = {"DWI": ["ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW"],
                                 "ADC": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]}.get(contrast, ["ORIGINAL", "PRIMARY", "M", "ND"])
            extra = {"RepetitionTime": str(tr), "EchoTime": str(te), "ScanningSequence": seq,
                     "SequenceVariant": "SK", "MRAcquisitionType": "2D", "MagneticFieldStrength": "3",
                     "ImagingFrequency": "127.74", "FlipAngle": "90" if contrast != "SWI" else "15",
                     "WindowCenter": str(int(np.percentile(pix, 99) / 2) + 1),
                     "WindowWidth": str(int(np.percentile(pix, 99)) + 2),
                     "AcquisitionDate": plan["phi"]["StudyDate"], "AcquisitionTime": plan["phi"]["StudyTime"]}
            if ti:
                extra["InversionTime"] = str(ti)
            if contrast == "T1C":
                extra["ContrastBolusAgent"] = "GADOLINIUM"
            family = contrast
        name = f"{number:02d}_{_slug(spec['description'])}"
        pd.write_image_series(os.path.join(ddir, name), pix, geom, study_tags, tags, per_image=extra,
                              multiframe=spec["multiframe"], transfer_syntax=spec["transfer_syntax"], uid_seed=uid_seed,
                              trace_b_value=1000 if contrast == "DWI" else None)
        gt_path = os.path.join(gdir, f"{name}.nii.gz")
        # NIfTI voxel (i=column, j=row, k=slice); world RAS = diag(-1,-1,1) @ DICOM LPS
        _write_nifti(gt_path, gt_vals.transpose(2, 1, 0), ras_affine(geom), np.int16)
        series_out.append(dict(series=name, description=spec["description"], family=family,
                               gt=os.path.relpath(gt_path, out_dir), shape=list(geom["shape"]),
                               orientation=spec["orientation"], pixel_mm=round(spec["pixel"], 4),
                               thickness_mm=spec["thickness"], tilt_deg=round(spec["tilt"], 2),
                               oblique=bool(spec["oblique"]), multiframe=spec["multiframe"],
                               transfer_syntax=spec["transfer_syntax"],
                               units="HU" if ct else ("1e-6 mm2/s" if contrast == "ADC" else "a.u."),
                               series_instance_uid=tags["SeriesInstanceUID"]))
        number += 1

    findings = findings_sentences(plan, subj)
    labels = study_labels(plan, subj)
    if plan["sr"] or plan["pdf"]:
        if plan["sr"]:
            tags = _series_tags(plan, dict(contrast="SR", description="DOSE REPORT" if ct else "PRELIMINARY READ"),
                                number, frame_uid)
            tags["Modality"] = "SR"
            lines = ([f"CTDIvol {rg.uniform(40, 60):.1f} mGy", f"DLP {rg.uniform(700, 1100):.0f} mGy*cm"] if ct
                     else ["Technologist note: patient tolerated the exam."])
            lines.append(f"Patient {plan['phi']['PatientName']} MRN {plan['phi']['PatientID']}")
            os.makedirs(os.path.join(ddir, f"{number:02d}_SR"))
            pd.write_text_sr(os.path.join(ddir, f"{number:02d}_SR", "SR0001.dcm"), study_tags, tags,
                             tags["SeriesDescription"], lines, uid_seed=uid_seed)
            series_out.append(dict(series=f"{number:02d}_SR", description=tags["SeriesDescription"], family="SR",
                                   gt=None, shape=None))
            number += 1
        if plan["pdf"]:
            tags = _series_tags(plan, dict(contrast="DOC", description="REQUISITION"), number, frame_uid)
            tags["Modality"] = "DOC"
            lines = [f"Patient: {plan['phi']['PatientName']}", f"MRN: {plan['phi']['PatientID']}",
                     f"DOB: {plan['phi']['PatientBirthDate']}", f"Accession: {plan['phi']['AccessionNumber']}",
                     f"Indication: {indication}"]
            os.makedirs(os.path.join(ddir, f"{number:02d}_DOC"))
            pd.write_encapsulated_pdf(os.path.join(ddir, f"{number:02d}_DOC", "DOC0001.dcm"), study_tags, tags,
                                      "Imaging Requisition", lines, uid_seed=uid_seed)
            series_out.append(dict(series=f"{number:02d}_DOC", description="REQUISITION", family="DOC",
                                   gt=None, shape=None))
            number += 1

    lesions = []
    variants = {k["kind"]: k["variant"] for k in plan["kinds"]}
    for i, l in enumerate(subj.lesions):
        path = os.path.join(gdir, f"lesion_{i}.nii.gz")
        n_vox = _lesion_mask_world(subj, l, path)
        labs = kind_labels(l["kind"], plan["modality"], variants.get(l["kind"], ""))
        lesions.append(dict(diagnosis=labs[0], kind=l["kind"], labels=labs, side=l["side"], region=l["region"],
                            mask=os.path.relpath(path, out_dir), voxels=n_vox))
    record = dict(study_uid=plan["phi"]["StudyInstanceUID"], study=study, modality=plan["modality"],
                  split=plan["split"], age=plan["age"], sex=plan["sex"], indication=indication,
                  findings=findings, triage=ontology.triage(labels), labels=labels, lesions=lesions,
                  series=series_out, world_from_template=subj.world_from_template().round(6).tolist(),
                  anatomy=anat.source, generator_version=GENERATOR_VERSION, plan_hash=_plan_hash(plan))
    tmp = os.path.join(gdir, "subject.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, os.path.join(gdir, "subject.json"))  # written last: marks the study complete
    return record


def _plan_hash(plan):
    """Identity of a rendered study; the split is left out (it depends on the cohort size and
    is rewritten on resume, so growing a cohort re-renders nothing)."""
    p = {k: v for k, v in plan.items() if k != "split"}
    return hashlib.sha256(json.dumps(p, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -----------------------------------------------------------------------------
# cohort: parallel generation with resume, then the cohort-level files

_WORKER = {}


def _work(args):
    plan, out_dir = args
    rec = generate_study(plan, out_dir, _WORKER.get("anat"))
    return plan["index"], rec


def _init_worker(source):
    _WORKER["anat"] = pa.load_anatomy(source)


def generate_cohort(out_dir, n_studies, seed=0, profile="demo", workers=None, source="auto", progress=True):
    """Generate (or resume) a cohort; returns the list of study records."""
    plans = plan_cohort(n_studies, seed, profile)
    os.makedirs(out_dir, exist_ok=True)
    anat = pa.load_anatomy(source)  # loaded before forking, so workers share it
    _WORKER["anat"] = anat
    records, todo = {}, []
    for p in plans:
        path = os.path.join(out_dir, "gt", p["study"], "subject.json")
        try:
            with open(path) as f:
                rec = json.load(f)
            if (rec.get("plan_hash") == _plan_hash(p) and rec.get("anatomy") == anat.source
                    and rec.get("generator_version") == GENERATOR_VERSION):  # an older generator's study is redone
                rec["split"] = p["split"]
                records[p["index"]] = rec
                continue
        except (OSError, ValueError):
            pass
        todo.append(p)
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plans), initial=len(records), desc="phantom studies", unit="study")
    if workers <= 1 or len(todo) <= 1:
        for p in todo:
            records[p["index"]] = generate_study(p, out_dir, anat)
            bar and bar.update(1)
    else:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        with ctx.Pool(workers, initializer=_init_worker, initargs=(source,)) as pool:
            for idx, rec in pool.imap_unordered(_work, [(p, out_dir) for p in todo], chunksize=1):
                records[idx] = rec
                bar and bar.update(1)
    bar and bar.close()
    recs = [records[p["index"]] for p in plans]
    write_cohort_files(out_dir, plans, recs, seed, profile, anat.source)
    return recs


def write_cohort_files(out_dir, plans, recs, seed, profile, source):
    cols = ontology.ALL_DIAGNOSES
    with open(os.path.join(out_dir, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_uid", "study", "modality", "split", "age"] + cols)
        for rec in recs:
            pos = set(rec["labels"])
            w.writerow([rec["study_uid"], rec["study"], rec["modality"], rec["split"], rec["age"]]
                       + [int(c in pos) for c in cols])
    with open(os.path.join(out_dir, "findings.jsonl"), "w") as f:
        for rec in recs:
            f.write(json.dumps({k: rec[k] for k in ("study_uid", "study", "modality", "split", "indication",
                                                    "findings", "triage")}
                               | {"lesions": [{k: l[k] for k in ("diagnosis", "side", "region", "mask")}
                                              for l in rec["lesions"]]}) + "\n")
    phi = {}
    for p, rec in zip(plans, recs):
        d = dict(p["phi"])
        d["SeriesInstanceUIDs"] = [s["series_instance_uid"] for s in rec["series"] if s.get("series_instance_uid")]
        phi[p["study"]] = d
    with open(os.path.join(out_dir, ".phi.json"), "w") as f:
        json.dump(phi, f, indent=1)
    summary = dict(studies=len(recs), seed=seed, profile=profile, anatomy=source, generator_version=GENERATOR_VERSION,
                   modality={m: sum(r["modality"] == m for r in recs) for m in ("CT", "MR")},
                   triage={t: sum(r["triage"] == t for r in recs) for t in ("unremarkable", "routine", "urgent")},
                   split={s: sum(r["split"] == s for r in recs) for s in ("train", "val", "test")},
                   rates={k: list(v) for k, v in RATES.items()}, profile_settings=PROFILES[profile])
    with open(os.path.join(out_dir, "cohort.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write(readme_text(summary))


def readme_text(summary):
    rates = "\n".join(f"| {k} | {v[0]:.2f} | {v[1]:.2f} | {', '.join(kind_labels(k, 'CT', _dv(k)) if v[0] else ['-'])} | "
                      f"{', '.join(kind_labels(k, 'MR', _dv(k)) if v[1] else ['-'])} |" for k, v in RATES.items())
    p = summary["profile_settings"]
    return f"""# nvfm demo cohort (synthetic, no real patient)

Generated by `python -m nvfm.phantom` (generator version {summary['generator_version']}), seed {summary['seed']},
{summary['studies']} studies ({summary['modality']['CT']} CT, {summary['modality']['MR']} MR), resolution profile
`{summary['profile']}`, anatomy `{summary['anatomy']}`.
Triage counts: {summary['triage']}; splits: {summary['split']}.

All patient identifiers in the DICOM headers (and inside the SR / PDF objects) are fake but
look real; they are listed in `.phi.json` so that later stages can check none leaks.

## Layout
- `dicom/<study>/<NN_SERIES>/IM*.dcm`: one file per slice (about {p['multiframe']:.0%} of series are one enhanced
  multi-frame object), about {p['compressed']:.0%} of series JPEG 2000 lossless or RLE; a localizer
  (`ImageType` ...\\LOCALIZER) in ~{P_SCOUT:.0%} of studies; a Basic Text SR (~{P_SR:.0%}) or an
  Encapsulated PDF requisition (~{P_PDF:.0%}) now and then.
- `gt/<study>/<NN_SERIES>.nii.gz`: noise-free ground truth on the same grid as the series
  (CT in HU; MR in the series' stored units before bias field and noise). Voxel (i, j, k) =
  (column, row, slice); affine = diag(-1,-1,1,1) @ DICOM LPS affine, i.e. RAS world mm.
- `gt/<study>/lesion_<i>.nii.gz`: uint8 mask of lesion i on a 1 mm RAS-aligned grid cropped
  around it (same world frame as the series).
- `gt/<study>/subject.json`: full record (series list, lesions, template->world affine).
- `labels.csv`: study_uid, study, modality, split, age, one 0/1 column per diagnosis of the
  paper's ontology (82 CT + 74 MR names; a column outside the study's modality is always 0).
- `findings.jsonl`: study_uid, study, modality, split, indication, findings (sentences
  ordered by clinical relevance: urgent first, then the fixed order {', '.join(KIND_ORDER)}),
  triage, lesions [{{diagnosis, side, region, mask}}].

## Rules
- Modality: CT with probability {P_CT}; split ~70/15/15 stratified by (modality, triage).
- Each pathology kind is drawn independently per study with the rate below, so about a third of
  studies are unremarkable. Space-occupying kinds ({', '.join(SPACE_OCCUPYING)}) are large with
  probability {P_LARGE}, adding brain_mass_effect + midline shift (and cerebral_edema for infarcts); the
  findings give the rendered shift: the largest displacement of the midsagittal plane over the
  supratentorial brain, in whole mm (no midline_shift label where that rounds to 0).
- An intraparenchymal hemorrhage whose blood reaches a ventricle adds intraventricular_hemorrhage, with a
  findings sentence and a lesion mask of its own (the IPH mask keeps the parenchymal blood). A voxel that a
  later-painted lesion repaints belongs to that lesion's mask only.
- Triage: unremarkable if no label; urgent if any label is urgent in `nvfm/ontology.py`
  (acute blood, acute infarct, mass effect/shift/herniation, obstructive hydrocephalus, edema,
  displaced fracture, ...); routine otherwise.
- Sizes (cm) and collection thicknesses (mm) in the findings are measured on the written lesion masks, i.e.
  as rendered (a large lesion's mass effect enlarges it).
- Side: left/right is the patient's side (RAS x < 0 is left), taken from the template
  hemisphere the lesion is drawn in; diffuse processes are "bilateral". Region: the AAL atlas
  label covering most of the lesion (or a descriptive name for extra-axial/diffuse findings).
- Anatomy: Colin27 head + AAL (mricron-data), else MNI152 (nilearn) with synthesized skull;
  each subject gets a random scale (+-8%), head rotation (+-7 deg), translation and a smooth
  1-2 mm warp; mass effect pushes tissue away from large lesions and shifts the midline.
- Acquisition ({summary['profile']}): CT pixel {p['ct_pixel']} mm, slices {p['ct_slice']} mm, {p['ct_series']}
  series (+ bone kernel, reformats, ~20% gantry tilt 10-22 deg); MR pixel {p['mr_pixel']} mm, slices
  {p['mr_slice']} mm, {p['mr_series']} series (+ ADC with each DWI; axial/sagittal/coronal, ~20% oblique),
  FOV {p['fov']} mm. CT noise 3-6 HU (soft) / 18-35 HU (bone kernel); MR Rician noise, smooth bias
  field, random intensity scale.

| kind | CT rate | MR rate | CT labels | MR labels |
|---|---|---|---|---|
{rates}
"""


def _dv(kind):
    return {"sdh": "acute", "glioma": "hgg", "fracture": "linear"}.get(kind, "")


# -----------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m nvfm.phantom",
                                 description="Generate the synthetic demo cohort (DICOM + labels + findings).")
    ap.add_argument("out_dir", help="output folder (created; an existing cohort is resumed)")
    ap.add_argument("--studies", type=int, default=24, help="number of studies (default 24)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--resolution", default="demo", choices=sorted(PROFILES),
                    help="acquisition profile: tiny (tests), demo (default), clinical (full ranges, large)")
    ap.add_argument("--workers", type=int, default=0, help="processes (default: all cores)")
    ap.add_argument("--anatomy", default="auto", choices=["auto", "mricron", "nilearn"])
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    if args.studies < 1:
        ap.error(f"--studies must be >= 1, got {args.studies}")
    if args.seed < 0:
        ap.error(f"--seed must be >= 0, got {args.seed}")
    if args.workers < 0:
        ap.error(f"--workers must be >= 0, got {args.workers}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        ap.error(f"output path {args.out_dir!r} exists and is not a directory")
    t0 = time.time()
    recs = generate_cohort(args.out_dir, args.studies, args.seed, args.resolution, args.workers or None,
                           args.anatomy, progress=not args.quiet)
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(args.out_dir) for f in fs)
    print(f"wrote {len(recs)} studies to {args.out_dir} in {time.time() - t0:.1f} s ({size / 1e6:.1f} MB)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
