"""Demo cohort generator: determinism, DICOM geometry vs ground truth (and dcm2niix), lesion
masks and sides, label prevalences, non-image objects, fake PHI, bad arguments.
Uses the "tiny" acquisition profile (2.6-3 mm pixels) so a study renders in about a second."""
import csv
import glob
import json
import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pydicom
import pytest

from nvfm import ontology
from nvfm import phantom as ph
from nvfm import phantom_anatomy as pa

SEED = 3


@pytest.fixture(scope="module")
def anat():
    return pa.load_anatomy()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, anat):
    out = str(tmp_path_factory.mktemp("cohort"))
    ph.generate_cohort(out, 3, seed=SEED, profile="tiny", workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def forced(tmp_path_factory, anat):
    """Hand-picked studies so every lesion painter and object type is exercised."""
    out = str(tmp_path_factory.mktemp("forced"))
    specs = [("CT", ["iph", "sdh", "fracture", "catheter", "sah"], True),
             ("CT", ["edh", "infarct", "hydrocephalus", "craniotomy", "arachnoid_cyst"], False),
             ("MR", ["glioma", "metastases", "ms", "atrophy", "svd", "meningioma"], True)]
    recs = []
    for i, (mod, kinds, large) in enumerate(specs):
        p = ph.plan_study(11, 100 + i, "tiny", modality=mod, kinds=kinds, large=large)
        if mod == "MR":  # a full protocol: T1, FLAIR, T1C, DWI + ADC, T2, ...
            p["series"] = ph._series_plan(np.random.default_rng(1), "MR", dict(ph.PROFILES["tiny"], mr_series=(6, 6)),
                                          p["kinds"], True)
        p["scout"], p["sr"], p["pdf"] = True, i != 1, i == 1
        p["series"][0]["multiframe"] = i == 2
        if i == 2:
            p["series"][0]["transfer_syntax"] = "explicit"
        p["series"][-1]["transfer_syntax"] = ("j2k", "rle", "explicit")[i]
        recs.append(ph.generate_study(p, out, anat))
    return out, recs


# -- helpers --------------------------------------------------------------------

def read_series(folder):
    """DICOM series -> (RAS affine (4,4), data (C, R, K) real-world values) like a converter."""
    dss = [pydicom.dcmread(f) for f in sorted(glob.glob(os.path.join(folder, "*.dcm")))]
    if len(dss) == 1 and int(getattr(dss[0], "NumberOfFrames", 1)) > 1:
        ds = dss[0]
        sh = ds.SharedFunctionalGroupsSequence[0]
        iop = np.array(sh.PlaneOrientationSequence[0].ImageOrientationPatient, float)
        ps = np.array(sh.PixelMeasuresSequence[0].PixelSpacing, float)
        ipps = np.array([f.PlanePositionSequence[0].ImagePositionPatient
                         for f in ds.PerFrameFunctionalGroupsSequence], float)
        frames = ds.pixel_array.astype(np.float64)
        if "PixelValueTransformationSequence" in sh:
            pv = sh.PixelValueTransformationSequence[0]
            frames = frames * float(pv.RescaleSlope) + float(pv.RescaleIntercept)
    else:
        iop = np.array(dss[0].ImageOrientationPatient, float)
        ps = np.array(dss[0].PixelSpacing, float)
        ipps = np.array([d.ImagePositionPatient for d in dss], float)
        frames = np.stack([d.pixel_array * float(getattr(d, "RescaleSlope", 1)) + float(getattr(d, "RescaleIntercept", 0))
                           for d in dss])
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort(ipps @ normal)
    ipps, frames = ipps[order], frames[order]
    A = np.eye(4)
    A[:3, 0] = iop[:3] * ps[1]
    A[:3, 1] = iop[3:] * ps[0]
    A[:3, 2] = (ipps[-1] - ipps[0]) / max(len(ipps) - 1, 1)
    A[:3, 3] = ipps[0]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ A, frames.transpose(2, 1, 0)


def records(out):
    return [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, "gt", "*", "subject.json")))]


# -- tests ----------------------------------------------------------------------

def test_ontology():
    assert len(ontology.CT_DIAGNOSES) == 82 and len(ontology.MR_DIAGNOSES) == 74
    assert ontology.triage([]) == "unremarkable"
    assert ontology.triage(["cerebral_atrophy"]) == "routine"
    assert ontology.triage(["cerebral_atrophy", "epidural_hematoma"]) == "urgent"
    assert ontology.DIAGNOSES["epidural_hematoma"].lateral and not ontology.DIAGNOSES["cerebral_atrophy"].lateral
    assert ontology.DIAGNOSES["multiple_sclerosis"].modalities == {"MR"}
    with pytest.raises(ValueError, match="unknown diagnosis"):
        ontology.triage(["not_a_disease"])
    # every label the phantom can emit is in the ontology of its modality
    for kind in ph.RATES:
        for mod in ("CT", "MR"):
            if ph.RATES[kind][mod == "MR"] == 0:
                continue
            for v in ("", "acute", "chronic", "hgg", "lgg", "displaced", "linear"):
                for name in ph.kind_labels(kind, mod, v):
                    assert mod in ontology.DIAGNOSES[name].modalities, (kind, mod, name)


def test_cohort_files(cohort):
    rows = list(csv.DictReader(open(os.path.join(cohort, "labels.csv"))))
    assert [r["study"] for r in rows] == ["demo-0000", "demo-0001", "demo-0002"]
    assert list(rows[0])[:5] == ["study_uid", "study", "modality", "split", "age"]
    assert set(list(rows[0])[5:]) == set(ontology.ALL_DIAGNOSES)
    fnd = [json.loads(l) for l in open(os.path.join(cohort, "findings.jsonl"))]
    for r, f in zip(rows, fnd):
        assert r["study_uid"] == f["study_uid"] and r["split"] in ("train", "val", "test")
        pos = [c for c in ontology.ALL_DIAGNOSES if r[c] == "1"]
        assert f["triage"] == ontology.triage(pos)
        assert (len(f["findings"]) == 0) == (f["triage"] == "unremarkable")
        for c in pos:
            assert r["modality"] in ontology.DIAGNOSES[c].modalities
        ds = pydicom.dcmread(glob.glob(os.path.join(cohort, "dicom", r["study"], "*", "*.dcm"))[0])
        assert ds.StudyInstanceUID == r["study_uid"]
    readme = open(os.path.join(cohort, "README.md")).read()
    assert "Triage" in readme and "labels.csv" in readme


def test_deterministic(cohort, tmp_path, anat):
    """Same seed -> byte-identical DICOM files, labels and findings."""
    ph.generate_cohort(str(tmp_path), 3, seed=SEED, profile="tiny", workers=2, progress=False)
    a = sorted(glob.glob(os.path.join(cohort, "dicom", "*", "*", "*.dcm")))
    b = sorted(glob.glob(os.path.join(tmp_path, "dicom", "*", "*", "*.dcm")))
    assert len(a) == len(b) > 10
    for fa, fb in zip(a, b):
        assert os.path.relpath(fa, cohort) == os.path.relpath(fb, tmp_path)
        assert open(fa, "rb").read() == open(fb, "rb").read(), fa
    for name in ("labels.csv", "findings.jsonl"):
        assert open(os.path.join(cohort, name)).read() == open(os.path.join(tmp_path, name)).read()
    for fa in glob.glob(os.path.join(cohort, "gt", "*", "*.nii.gz")):
        fb = os.path.join(tmp_path, os.path.relpath(fa, cohort))
        assert np.array_equal(np.asarray(nib.load(fa).dataobj), np.asarray(nib.load(fb).dataobj))
    # a different seed gives a different cohort
    p0, p1 = ph.plan_study(SEED, 0, "tiny"), ph.plan_study(SEED + 1, 0, "tiny")
    assert p0["phi"]["PatientID"] != p1["phi"]["PatientID"]


def test_resume(cohort, tmp_path):
    """A finished cohort is not regenerated; a study whose record is missing is redone."""
    out = str(tmp_path / "c")
    shutil.copytree(cohort, out)
    rec = os.path.join(out, "gt", "demo-0001", "subject.json")
    os.remove(rec)
    before = os.path.getmtime(os.path.join(out, "gt", "demo-0000", "subject.json"))
    ph.generate_cohort(out, 3, seed=SEED, profile="tiny", workers=1, progress=False)
    assert os.path.exists(rec)
    assert os.path.getmtime(os.path.join(out, "gt", "demo-0000", "subject.json")) == before
    # growing the cohort renders only the new study
    ph.generate_cohort(out, 4, seed=SEED, profile="tiny", workers=1, progress=False)
    assert os.path.getmtime(os.path.join(out, "gt", "demo-0000", "subject.json")) == before
    assert len(open(os.path.join(out, "labels.csv")).read().splitlines()) == 5


def check_geometry(out, recs):
    n = 0
    for rec in recs:
        for s in rec["series"]:
            if not s["gt"]:
                continue
            gt = nib.load(os.path.join(out, s["gt"]))
            aff, data = read_series(os.path.join(out, "dicom", rec["study"], s["series"]))
            assert data.shape == gt.shape, s
            np.testing.assert_allclose(aff, gt.affine, atol=1e-3, err_msg=str(s))
            g = np.asarray(gt.dataobj, np.float64)
            # pixel data is the ground truth plus noise: same layout, close values
            assert np.corrcoef(g.ravel(), data.ravel())[0, 1] > 0.9, s
            if s["family"] == "CT":
                assert np.median(np.abs(g - data)) < 40
            n += 1
    return n


def test_geometry_matches_ground_truth(cohort, forced):
    assert check_geometry(cohort, records(cohort)) >= 5
    out, recs = forced
    assert check_geometry(out, recs) >= 5
    # the ADC map lies on its DWI grid
    for rec in recs + records(cohort):
        fam = {s["family"]: s for s in rec["series"] if s["gt"]}
        if "DWI" in fam and "ADC" in fam:
            a = nib.load(os.path.join(out if rec in recs else cohort, fam["DWI"]["gt"]))
            b = nib.load(os.path.join(out if rec in recs else cohort, fam["ADC"]["gt"]))
            assert a.shape == b.shape and np.allclose(a.affine, b.affine)
    # one subject: every series shares the frame of reference and the study UID
    for rec in recs:
        uids = {pydicom.dcmread(f, stop_before_pixels=True).FrameOfReferenceUID
                for f in glob.glob(os.path.join(out, "dicom", rec["study"], "*", "IM0001.dcm"))}
        assert len(uids) == 1


@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="dcm2niix not on PATH")
def test_dcm2niix_affine(forced, tmp_path):
    out, recs = forced
    n = 0
    for rec in recs:
        for s in rec["series"]:
            if not s["gt"] or s["tilt_deg"]:  # dcm2niix resamples gantry-tilted series
                continue
            dst = tmp_path / f"{rec['study']}_{s['series']}"
            dst.mkdir()
            subprocess.run(["dcm2niix", "-z", "n", "-f", "vol", "-o", str(dst),
                            os.path.join(out, "dicom", rec["study"], s["series"])], check=True, capture_output=True)
            files = sorted(glob.glob(str(dst / "vol*.nii")))
            assert len(files) == 1, files
            a = nib.as_closest_canonical(nib.load(files[0]))
            b = nib.as_closest_canonical(nib.load(os.path.join(out, s["gt"])))
            assert a.shape[:3] == b.shape, s
            np.testing.assert_allclose(a.affine, b.affine, atol=2e-3, err_msg=str(s))
            n += 1
    assert n >= 4


def test_lesions_present_and_lateralized(forced, anat):
    out, recs = forced
    kinds = set()
    for rec in recs:
        A = np.array(rec["world_from_template"])
        assert rec["lesions"], rec["study"]
        for les in rec["lesions"]:
            kinds.add(les["kind"])
            img = nib.load(os.path.join(out, les["mask"]))
            m = np.asarray(img.dataobj)
            assert m.dtype == np.uint8 and m.sum() > 0, les
            assert les["diagnosis"] in rec["labels"]
            ijk = np.argwhere(m > 0)
            world = ijk @ img.affine[:3, :3].T + img.affine[:3, 3]
            # back to template (head) coordinates: x < 0 is the patient's left hemisphere
            tmpl = (world - A[:3, 3]) @ np.linalg.inv(A[:3, :3]).T
            if les["side"] in ("left", "right"):
                frac_left = float((tmpl[:, 0] < 0).mean())
                assert (frac_left > 0.9) if les["side"] == "left" else (frac_left < 0.1), (les, frac_left)
            else:
                assert les["side"] == "bilateral"
    assert kinds == {"iph", "sdh", "fracture", "catheter", "sah", "edh", "infarct", "hydrocephalus", "craniotomy",
                     "arachnoid_cyst", "glioma", "metastases", "ms", "atrophy", "svd", "meningioma",
                     "ivh"}  # the first study's IPH blood reaches a ventricle: its IVH is a lesion of its own
    assert all("{" not in rec["indication"] for rec in recs)  # every template filled
    # mass effect of the large lesions is reported
    assert any("midline shift" in f for f in recs[0]["findings"])
    assert "brain_mass_effect" in recs[0]["labels"] and "midline_shift" in recs[0]["labels"]


def test_lesions_visible_on_ct(forced):
    """The IPH mask lands on hyperdense voxels of the CT ground truth (world frames agree)."""
    out, recs = forced
    rec = recs[0]
    les = next(l for l in rec["lesions"] if l["kind"] == "iph")
    s = next(s for s in rec["series"] if s["family"] == "CT" and s["gt"])
    img, gt = nib.load(os.path.join(out, les["mask"])), nib.load(os.path.join(out, s["gt"]))
    world = np.argwhere(np.asarray(img.dataobj) > 0) @ img.affine[:3, :3].T + img.affine[:3, 3]
    vox = np.round((world - gt.affine[:3, 3]) @ np.linalg.inv(gt.affine[:3, :3]).T).astype(int)
    ok = np.all((vox >= 0) & (vox < gt.shape), 1)
    hu = np.asarray(gt.dataobj)[tuple(vox[ok].T)]
    assert ok.mean() > 0.9 and np.median(hu) > 45, np.median(hu)


def test_objects_and_phi(forced, cohort):
    out, recs = forced
    classes, image_types, descs = set(), [], set()
    for f in glob.glob(os.path.join(out, "dicom", "*", "*", "*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        classes.add(ds.SOPClassUID)
        descs.add(ds.SeriesDescription)
        if "ImageType" in ds:
            image_types.append(list(ds.ImageType))
        assert ds.PatientName and ds.PatientID.startswith("NVFMPID") and ds.AccessionNumber.startswith("NVFMACC")
    assert {"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1",
            "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.5.1.4.1.1.104.1"} <= classes
    assert any("LOCALIZER" in t for t in image_types)
    assert any("ADC" in d for d in descs) and any("FLAIR" in d for d in descs)
    assert any(("POST" in d or "+C" in d) for d in descs)
    # the fake identifiers are recorded for leak tests, and the cohort tables do not carry them
    phi = json.load(open(os.path.join(cohort, ".phi.json")))
    assert set(phi) == {"demo-0000", "demo-0001", "demo-0002"}
    tables = open(os.path.join(cohort, "labels.csv")).read() + open(os.path.join(cohort, "findings.jsonl")).read()
    for study, tags in phi.items():
        ds = pydicom.dcmread(glob.glob(os.path.join(cohort, "dicom", study, "*", "*.dcm"))[0], stop_before_pixels=True)
        assert str(ds.PatientName) == tags["PatientName"] and ds.PatientBirthDate == tags["PatientBirthDate"]
        for key in ("PatientName", "PatientID", "AccessionNumber", "PatientBirthDate", "InstitutionName"):
            assert tags[key] not in tables
    # the PDF requisition carries identifiers inside the document, as real ones do
    pdf = pydicom.dcmread(glob.glob(os.path.join(out, "dicom", recs[1]["study"], "*_DOC", "*.dcm"))[0])
    assert pdf.EncapsulatedDocument.startswith(b"%PDF") and b"NVFMPID" in pdf.EncapsulatedDocument


def test_label_prevalence_and_splits():
    """Label sampling alone (no rendering): rates, ~1/3 unremarkable, ~70/15/15 splits."""
    n = 4000
    plans = ph.plan_cohort(n, seed=5, profile="demo")
    for mod, col in (("CT", 0), ("MR", 1)):
        ps = [p for p in plans if p["modality"] == mod]
        assert abs(len(ps) / n - (ph.P_CT if mod == "CT" else 1 - ph.P_CT)) < 0.03
        for kind, rates in ph.RATES.items():
            rate = rates[col]
            obs = np.mean([any(k["kind"] == kind for k in p["kinds"]) for p in ps])
            tol = 4 * np.sqrt(max(rate * (1 - rate), 1e-4) / len(ps))
            assert abs(obs - rate) <= tol, (mod, kind, obs, rate)
        expect_unrem = np.prod([1 - r[col] for r in ph.RATES.values()])
        unrem = np.mean([p["triage"] == "unremarkable" for p in ps])
        assert abs(unrem - expect_unrem) < 0.04 and 0.25 < unrem < 0.42
    splits = [p["split"] for p in plans]
    for s, f in zip(("train", "val", "test"), ph.SPLIT_FRACTIONS):
        assert abs(splits.count(s) / n - f) < 0.02
    for key in {(p["modality"], p["triage"]) for p in plans}:  # stratified
        g = [p["split"] for p in plans if (p["modality"], p["triage"]) == key]
        if len(g) > 100:
            assert abs(g.count("train") / len(g) - 0.7) < 0.05
    assert [p["labels"] for p in ph.plan_cohort(20, seed=5)] == [p["labels"] for p in plans[:20]]


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        ph.main([str(tmp_path / "o"), "--studies", "0"])
    with pytest.raises(SystemExit):
        ph.main([str(tmp_path / "o"), "--resolution", "huge"])
    with pytest.raises(SystemExit):
        ph.main([str(tmp_path / "o"), "--studies", "many"])
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        ph.main([str(f), "--studies", "1"])
    with pytest.raises(ValueError, match="positive integer"):
        ph.plan_cohort(0)
    with pytest.raises(ValueError, match="profile"):
        ph.plan_cohort(3, profile="huge")
    with pytest.raises(ValueError, match="pathology"):
        ph.plan_study(0, 0, modality="CT", kinds=["ms"])
    with pytest.raises(ValueError, match="unknown pathology"):
        ph.plan_study(0, 0, kinds=["plague"])
    with pytest.raises(ValueError, match="anatomy source"):
        pa.load_anatomy("atlas-of-mars")


def test_cli_error_message(tmp_path):
    r = subprocess.run([os.sys.executable, "-m", "nvfm.phantom", str(tmp_path / "o"), "--studies", "-2"],
                       capture_output=True, text=True, env=dict(os.environ, NVFM_QUIET="1"))
    assert r.returncode == 2 and "--studies must be >= 1" in r.stderr


def test_nilearn_fallback_anatomy(tmp_path):
    """Without mricron-data the MNI152 brain from the nilearn wheel (synthesized skull) is used."""
    anat = pa.load_anatomy("nilearn")
    assert anat.source.startswith("nilearn")
    counts = np.bincount(anat.tissue.ravel(), minlength=8)
    assert all(counts[c] > 1000 for c in (pa.SOFT, pa.BONE, pa.CSF, pa.VENT, pa.GM, pa.WM))
    p = ph.plan_study(2, 0, "tiny", modality="MR", kinds=["infarct"], large=False)
    rec = ph.generate_study(p, str(tmp_path), anat)
    assert rec["anatomy"] == anat.source and rec["lesions"][0]["region"].split("_")[0] in ("Frontal", "Temporal",
                                                                                          "Parietal", "Occipital")
    assert check_geometry(str(tmp_path), [rec]) >= 3


def test_extent_of_an_empty_lesion_mask_is_zero():
    """A metastasis clipped away entirely by the tissue it must lie in (seen at --studies 400) used
    to crash the cohort: its extent is (0, 0) and the empty lesion is dropped."""
    from nvfm import phantom as ph
    assert ph._extent_cm(None, np.zeros((4, 5, 6), bool), 1.0) == (0.0, 0.0)
    m = np.zeros((4, 30, 6), bool)
    m[1:3, 2:27, 1:4] = True
    assert ph._extent_cm(None, m, 1.0) == (2.5, 0.3)


def test_infarct_indication_names_the_weak_side():
    """The infarct indications say which side is weak: the side opposite the infarct."""
    t1, t2 = ph.INDICATIONS["infarct"]
    les = [dict(kind="sdh", side="left"), dict(kind="infarct", side="left")]
    assert ph.fill_indication(t1, les).startswith("Acute onset right-sided weakness")
    assert ph.fill_indication(t2, [dict(kind="infarct", side="right")]) == "Code stroke: aphasia and left hemiparesis."
    assert ph.fill_indication(t1, []).startswith("Acute onset unilateral weakness")
    assert ph.fill_indication(t2, []) == "Code stroke: aphasia and hemiparesis."
    assert ph.fill_indication("Headache.", les) == "Headache."
    for texts in ph.INDICATIONS.values():
        for t in texts:
            for lesions in ([], les):
                assert "{" not in ph.fill_indication(t, lesions)
