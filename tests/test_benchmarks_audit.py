"""Audit of the public benchmarks (nvfm/benchmarks.py, bench/bench_public.py): ADNI's pMCI / sMCI
labels under the older ADNIMERGE DX coding and rows without a month, stage records that must not
vouch for a killed stage's output or for inputs that changed in an earlier killed invocation, the
salt kept out of command lines and records, no subject id or UID in error messages, grounding sets'
image-mask pairs of one subject, session and space (a subject found twice left out, not paired across
copies), external runs refused on the probe's own training studies, and no adapter silently taking
the first of several candidate images, study folders or label files (left out and counted, or an error)."""
import csv
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_fakes  # noqa: E402

from nvfm import benchmarks as B  # noqa: E402
from nvfm import dicom  # noqa: E402


def _adni_copy(root, subjects):
    """ADNIMERGE.csv + one baseline MPRAGE NIfTI per subject; subjects: {PTID: [(VISCODE, M, DX)]}."""
    rows = []
    for k, (ptid, visits) in enumerate(subjects.items()):
        for vis, m, dx in visits:
            rows.append([k + 1, ptid, vis, "2006-01-05", "LMCI", dx, 70.0, m])
        d = os.path.join(root, "ADNI", ptid, "MPRAGE", "2006-01-10_10_20_30.0", f"I{k + 1}00")
        bench_fakes.write_nifti(os.path.join(d, f"ADNI_{ptid}_MR_MPRAGE_I{k + 1}00.nii"), seed=k)
    bench_fakes.write_csv(os.path.join(root, "ADNIMERGE.csv"), bench_fakes.ADNI_HEADER, rows)


def test_adni_pmci_reads_older_dx_coding_and_takes_a_missing_month_from_viscode(tmp_path):
    # hand-worked with the default horizon of 36 months
    subjects = {
        "002_S_0001": [("bl", 0, "MCI"), ("m12", 12, "MCI"), ("m36", 36, "MCI to Dementia")],   # converts at 36: 1
        "002_S_0002": [("bl", 0, "MCI"), ("m24", 24, "MCI"), ("m36", 36, "MCI"), ("m60", "", "Dementia")],  # at 60: out
        "002_S_0003": [("bl", 0, "MCI"), ("m06", "", "Dementia")],                           # at 6 (VISCODE): 1
        "002_S_0004": [("bl", 0, "MCI"), ("m12", 12, "MCI to NL"), ("m36", 36, "NL")],       # stable to 36: 0
        "002_S_0005": [("bl", 0, "MCI"), ("m36", 36, "MCI"), ("uns1", "", "Dementia")],      # undated dementia: out
        "002_S_0006": [("bl", 0, "MCI"), ("m48", "", "MCI")],                                # no dementia to 48: 0
    }
    _adni_copy(str(tmp_path), subjects)
    studies, tally, _ = B.adni(str(tmp_path))
    got = {st.subject: st.tasks["pmci"]["pmci"] for st in studies}
    assert got == {"002_S_0001": 1, "002_S_0003": 1, "002_S_0004": 0, "002_S_0006": 0}
    assert tally["baseline MCI: late conversion or follow-up < horizon (left out)"] == 2
    # an unknown DX value is an error naming the file and line, not a silent "no dementia"
    _adni_copy(str(tmp_path / "bad"), {"002_S_0001": [("bl", 0, "MCI"), ("m12", 12, "Demented"), ("m36", 36, "MCI")]})
    with pytest.raises(B.BenchmarkError, match=r"ADNIMERGE\.csv:3: DX must be"):
        B.adni(str(tmp_path / "bad"))


def _stages_module():
    spec = importlib.util.spec_from_file_location("bench_public_audit", os.path.join(ROOT, "bench", "bench_public.py"))
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    return bp


def test_stage_records_never_vouch_for_a_killed_stage_or_for_changed_inputs(tmp_path):
    bp = _stages_module()
    d = str(tmp_path)
    a, x, version, die = (os.path.join(d, f) for f in ("a.txt", "x.txt", "version", "die"))
    # the adapter writes labels of the current version; x writes a partial output first, dies when told to
    adapter = ["-c", f"open({a!r}, 'w').write(open({version!r}).read())"]
    stage_x = ["-c", f"import os; open({x!r}, 'w').write('PART'); os.path.exists({die!r}) and exit(137); "
                     f"open({x!r}, 'w').write('done ' + open({a!r}).read())"]

    def invocation(with_x=True):
        run = bp.Stages(d)
        run("adapter", adapter, [a])
        if with_x:
            run("x", stage_x, [x], deps=["adapter"])

    def read(p):
        with open(p) as f:
            return f.read()
    with open(version, "w") as f:
        f.write("v1")
    invocation()
    assert read(x) == "done v1"
    # 1. x's output is gone: x reruns and is killed midway; the same command again
    os.remove(x)
    open(die, "w").close()
    with pytest.raises(SystemExit, match="stage x failed"):
        invocation()
    os.remove(die)
    assert read(x) == "PART"
    invocation()
    assert read(x) == "done v1"   # reran: a record from before the kill must not pass PART as finished
    # 2. new labels: the adapter reruns, and the invocation is killed before x starts; the same command again
    with open(version, "w") as f:
        f.write("v2")
    os.remove(a)
    invocation(with_x=False)
    invocation()
    assert read(x) == "done v2"   # x was made from v1: the adapter's run it depends on changed
    # nothing changed: both skipped
    run = bp.Stages(d)
    assert run("adapter", adapter, [a]) is False and run("x", stage_x, [x], deps=["adapter"]) is False


def test_bench_public_passes_the_salt_by_environment_never_in_commands_or_records(tmp_path):
    secret = "audit-secret-salt-7f3"
    bench_fakes.abide(str(tmp_path / "abide"))
    out = tmp_path / "o"
    args = [sys.executable, os.path.join(ROOT, "bench", "bench_public.py"), "--dataset=abide",
            f"--root={tmp_path / 'abide'}", f"--out={out}", "--encoders=random:tiny",
            "--preprocess_args=--workers=1 --progress=False --log_paths=False",
            "--encode_args=--no_such_option=1"]   # stops the chain after preprocess: fast
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1")
    env.pop("NVFM_SALT", None)
    r = subprocess.run(args + [f"--salt={secret}"], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                       timeout=300)
    assert r.returncode == 1 and "stage encode/random_tiny failed" in r.stderr, r.stdout + r.stderr
    # the salt reached the adapter and preprocess: subject hashes and the manifest's salt id are of it
    with open(out / "labels_autism.csv") as f:
        assert dicom.subject_key("50002", secret, "abide") in f.read()
    with open(out / "shards" / "manifest.json") as f:
        assert json.load(f)["salt_id"] == hashlib.sha256(secret.encode()).hexdigest()[:16]
    # ... but no line printed (the 'config:' line hides it: nvfm/configurator.py), stage command line,
    # stage output or file under OUT holds it
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if secret in ln]
    assert lines == [] and "salt=<hidden>" in r.stdout + r.stderr, lines
    for d, _, files in os.walk(out):
        for fn in files:
            p = os.path.join(d, fn)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    assert secret.encode() not in f.read(), p
    # the records still tell salts apart: the same salt skips the adapter, another one reruns it
    r = subprocess.run(args + [f"--salt={secret}"], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                       timeout=300)
    assert "[adapter] done earlier, skipped" in r.stdout and "[preprocess_nvfm] done earlier, skipped" in r.stdout
    r = subprocess.run(args + ["--salt=another-salt"], capture_output=True, text=True, env=env, cwd=str(tmp_path),
                       timeout=300)
    assert re.search(r"\[adapter\] \S*python\S* -m nvfm\.benchmarks ", r.stdout), r.stdout  # python or python3


def test_label_file_errors_name_the_line_not_the_uid_or_subject_id(tmp_path):
    (tmp_path / "rsna").mkdir()
    (tmp_path / "rsna" / "stage_2_train.csv").write_text("ID,Label\nID_63eb1e259_any,0\nID_7a1c0de55_epidurl,0\n")
    with pytest.raises(B.BenchmarkError) as e:
        B.rsna(str(tmp_path / "rsna"))
    assert "stage_2_train.csv:3:" in str(e.value) and "epidurl" in str(e.value) and "7a1c0de55" not in str(e.value)
    (tmp_path / "rsna" / "stage_2_train.csv").write_text("ID,Label\nID_63eb1e2-59_any,0\n")
    with pytest.raises(B.BenchmarkError) as e:
        B.rsna(str(tmp_path / "rsna"))
    assert "stage_2_train.csv:2:" in str(e.value) and "63eb1e2" not in str(e.value)
    bench_fakes.write_csv(str(tmp_path / "abide" / "Phenotypic_V1_0b.csv"), ["SUB_ID", "DX_GROUP", "AGE_AT_SCAN"],
                          [(50002, 1, 12.0), ("50003X", 2, 13.0)])
    with pytest.raises(B.BenchmarkError) as e:
        B.abide(str(tmp_path / "abide"))
    assert "Phenotypic_V1_0b.csv:3: SUB_ID" in str(e.value) and "50003" not in str(e.value)


# ----------------------------------------------------------------------------- grounding sets: exact pairing


def _mask(path, mark):
    """A lesion mask whose one nonzero voxel (flat index `mark`) names the file it was written as."""
    m = np.zeros(bench_fakes.SHAPE[::-1], np.uint8)
    m.flat[mark] = 1
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(m, np.diag([1.0, 1.0, 4.0, 1.0])), path)


def _staged_pairs(out):
    """{image file the study links to: the mark of its mask} from the adapter's findings.jsonl, masks/ and images/."""
    pairs = {}
    for ln in open(os.path.join(out, "findings.jsonl")):
        rec = json.loads(ln)
        (les,) = rec["lesions"]
        mark = int(np.flatnonzero(np.asarray(nib.load(os.path.join(out, les["mask"])).dataobj))[0])
        folder = next(f for f in os.listdir(os.path.join(out, "images"))
                      if dicom.salted_hash("nifti:" + f, "s") == rec["study_key"])
        pairs[os.readlink(os.path.join(out, "images", folder, "image.nii.gz"))] = mark
    return pairs


def test_atlas2_pairs_image_and_mask_of_one_subject_session_and_space(tmp_path):
    root = tmp_path / "atlas"
    ent = "sub-{0}_ses-{1}_space-{2}"
    # (subject, session, space): mask mark or None; a T1w is written for every entry
    plan = {("r001s001", "1", "MNI152NLin2009aSym"): None,   # ses-1 without a mask: must not get ses-2's
            ("r001s001", "2", "MNI152NLin2009aSym"): 11,
            ("r001s002", "1", "MNI152NLin2009aSym"): None,   # the mask is in the native space only
            ("r001s002", "1", "orig"): 22,
            ("r001s003", "1", "MNI152NLin2009aSym"): 33,     # two annotated sessions: two studies
            ("r001s003", "2", "MNI152NLin2009aSym"): 44}
    img_of = {}
    for i, ((sub, ses, sp), mark) in enumerate(sorted(plan.items())):
        d = root / "Training" / "R001" / f"sub-{sub}" / f"ses-{ses}" / "anat"
        name = ent.format(sub, ses, sp)
        img_of[(sub, ses, sp)] = bench_fakes.write_nifti(str(d / f"{name}_T1w.nii.gz"), seed=i)
        if mark is not None:
            _mask(str(d / f"{name}_label-L_desc-T1lesion_mask.nii.gz"), mark)
    out = str(tmp_path / "out")
    rep = B.run("atlas2", str(root), out, "s")
    # hand-worked: each mask with the T1w of its own subject, session and space; nothing else
    want = {img_of[k]: mark for k, mark in plan.items() if mark is not None}
    assert _staged_pairs(out) == want
    rows = list(csv.DictReader(open(os.path.join(out, "labels_grounding.csv"))))
    subj = {r["subject"] for r in rows}
    assert len(rows) == 4 and len(subj) == 3   # r001s003's two sessions: one subject (one side of every split)
    assert rep["input"] == {"rows": 5, "subjects labelled": 1, "sessions (of subjects with several) labelled": 3,
                            "sessions (of subjects with several) with an image but no mask (left out)": 1,
                            "images in another space than their session's mask (not used)": 1}


def test_grounding_sets_leave_out_a_subject_found_twice_rather_than_pair_across_copies(tmp_path):
    # BraTS: one subject in two copies of a release, the first without its seg
    root = tmp_path / "brats"
    for k, (copy, seg) in enumerate((("A_Validation", False), ("B_Training", True))):
        d = root / copy / "BraTS2021_00000"
        for q in ("t1", "t1ce", "t2", "flair"):
            bench_fakes.write_nifti(str(d / f"BraTS2021_00000_{q}.nii.gz"), seed=k)
        if seg:
            _mask(str(d / "BraTS2021_00000_seg.nii.gz"), 5)
    d = root / "B_Training" / "BraTS2021_00001"
    for q in ("t1", "t1ce", "t2", "flair"):
        bench_fakes.write_nifti(str(d / f"BraTS2021_00001_{q}.nii.gz"), seed=7)
    _mask(str(d / "BraTS2021_00001_seg.nii.gz"), 6)
    studies, tally, _ = B.brats21(str(root))
    assert [(s.image, s.mask) for s in studies] == [(str(d / "BraTS2021_00001_t1.nii.gz"),
                                                     str(d / "BraTS2021_00001_seg.nii.gz"))]
    assert sorted(os.path.dirname(p) for p, _ in studies[0].more_images) == [str(d)] * 3
    assert tally == {"rows": 2, "subjects labelled": 1,
                     "subjects with two or more files for one image, mask or sequence (left out: ambiguous)": 1}
    # MSSEG-2016: Center_01/Patient_01 in Testing (preprocessed FLAIR) and in Training (raw FLAIR only)
    root = tmp_path / "msseg"
    te, tr = root / "Testing" / "Center_01" / "Patient_01", root / "Training" / "Center_01" / "Patient_01"
    bench_fakes.write_nifti(str(te / "Preprocessed_Data" / "FLAIR_preprocessed.nii.gz"), seed=1)
    _mask(str(te / "Masks" / "Consensus.nii.gz"), 7)
    bench_fakes.write_nifti(str(tr / "Raw_Data" / "FLAIR.nii.gz"), seed=2)
    _mask(str(tr / "Masks" / "Consensus.nii.gz"), 8)
    studies, tally, _ = B.msseg16(str(root))
    patient = os.path.dirname
    got = sorted((patient(patient(s.image)), patient(patient(s.mask))) for s in studies)
    assert got == [(str(te), str(te)), (str(tr), str(tr))] and tally == {"rows": 2, "subjects labelled": 2}


# ----------------------------------------------------------------------------- external transfer: the probe's own studies


def _labels_csv(path, rows):
    """rows: [(study_key, subject, split)] -> a labels file with one class column."""
    bench_fakes.write_csv(str(path), ["study_key", "subject", "modality", "split", "age", "autism"],
                          [(k, s, "MR", sp, "", 1) for k, s, sp in rows])
    return str(path)


def _made_up_probe(path, trained_on):
    """A probe.pt holding only what train_probe.py records of its run's settings (config: its --labels)."""
    import torch
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(config=dict(labels=trained_on, protocol=""), models=[]), path)
    return str(path)


def test_training_overlap_counts_studies_and_subjects_of_the_probes_training_labels(tmp_path):
    bp = _stages_module()
    here = _labels_csv(tmp_path / "here.csv", [("k1", "s1", ""), ("k2", "s2", ""), ("k3", "s2", ""), ("k4", "", ""),
                                               ("k5", "s5", "")])
    # a split-protocol probe (no test_keys) trained on k1 and validated on k8: k1 was seen
    split = _labels_csv(tmp_path / "split.csv", [("k1", "s1", "train"), ("k8", "s8", "val"), ("k9", "", "test")])
    assert bp.training_overlap(_made_up_probe(tmp_path / "p1.pt", split), here, "") == (1, 5, split)
    # another session of a training subject (s2): both of its studies; empty subjects never match
    other = _labels_csv(tmp_path / "other.csv", [("k7", "s2", ""), ("k6", "", "")])
    assert bp.training_overlap(_made_up_probe(tmp_path / "p2.pt", other), here, "") == (2, 5, other)
    # the recorded path is gone: the other run's labels file of the task; neither: not checked
    gone = str(tmp_path / "moved.csv")
    assert bp.training_overlap(_made_up_probe(tmp_path / "p3.pt", gone), here, split) == (1, 5, split)
    assert bp.training_overlap(str(tmp_path / "p3.pt"), here, gone) is None
    disjoint = _labels_csv(tmp_path / "disjoint.csv", [("k6", "s6", ""), ("k0", "", "")])
    assert bp.training_overlap(_made_up_probe(tmp_path / "p4.pt", disjoint), here, "") == (0, 5, disjoint)


def test_bench_public_external_run_refuses_the_probes_own_training_studies(tmp_path):
    bench_fakes.abide(str(tmp_path / "abide"))
    B.run("abide", str(tmp_path / "abide"), str(tmp_path / "adapted"), "s")
    rows = list(csv.DictReader(open(tmp_path / "adapted" / "labels_autism.csv")))
    # the other run: a probe trained (split protocol, no test keys) on two of this dataset's studies
    src = tmp_path / "src"
    trained = _labels_csv(src / "labels_autism.csv", [(r["study_key"], r["subject"], "train") for r in rows[:2]])
    _made_up_probe(src / "probes" / "random_tiny" / "autism" / "probe.pt", trained)
    out = tmp_path / "o"
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", NVFM_SALT="s")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_public.py"), "--dataset=abide",
                        f"--root={tmp_path / 'abide'}", f"--out={out}", "--encoders=random:tiny",
                        f"--external_from={src}", "--preprocess_args=--workers=1 --progress=False --log_paths=False"],
                       capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"2 of the {len(rows)} studies in {out / 'labels_autism.csv'} share a study or subject" in r.stderr
    assert "[evaluate/" not in r.stdout and not os.path.exists(out / "eval")


# ----------------------------------------------------------------------------- no silent first pick among candidates


def test_adni_never_takes_the_first_of_several_nifti_files_of_one_image(tmp_path):
    # 002_S_0001's baseline image folder holds a second NIfTI that sorts first; 003_S_0003 has
    # MPRAGE (I300) and MPRAGE_Repeat (I301) on one day (equally close: the lowest image id, counted)
    root = str(tmp_path / "adni")
    expect, _ = bench_fakes.adni(root, dicom_subject=False)
    d = os.path.join(root, "ADNI", "002_S_0001", "MPRAGE", "2006-01-10_10_20_30.0", "I100")
    bench_fakes.write_nifti(os.path.join(d, "AAA_ADNI_002_S_0001_MR_MPRAGE_I100_e2.nii"), seed=6)
    rep_dir = os.path.join(root, "ADNI", "003_S_0003", "MPRAGE_Repeat", "2006-01-10_10_40_30.0", "I301")
    bench_fakes.write_nifti(os.path.join(rep_dir, "ADNI_003_S_0003_MR_MPRAGE_Repeat_I301.nii"), seed=7)
    studies, tally, _ = B.adni(root)
    assert sorted(st.subject for st in studies) == sorted(set(expect) - {"002_S_0001"})
    assert "/MPRAGE/" in next(st.image for st in studies if st.subject == "003_S_0003")
    assert tally["image folders with two or more NIfTI files (not used: ambiguous)"] == 1
    assert tally["baseline rows with several equally close images (the lowest image id taken)"] == 1
    assert tally["baseline rows without a baseline image (left out)"] == 3 + 1


def test_aibl_never_takes_the_first_of_several_nifti_files_or_copies_of_one_image(tmp_path):
    # RID 4's baseline folder holds two NIfTI files; RID 8's image id is found in a second copy
    root = str(tmp_path / "aibl")
    expect, _ = bench_fakes.aibl(root)
    d = os.path.join(root, "AIBL", "4", "MPRAGE", "2008-03-04_11_22_33.0", "I90040")
    bench_fakes.write_nifti(os.path.join(d, "AAA_AIBL_4_I90040.nii"), seed=6)
    d = os.path.join("AIBL", "8", "MPRAGE", "2008-03-04_11_22_33.0", "I90080")
    bench_fakes.write_nifti(os.path.join(root, "copy2", d, "AIBL_8_I90080.nii"), seed=3)
    studies, tally, _ = B.aibl(root)
    assert sorted(st.subject for st in studies) == sorted(set(expect) - {"4", "8"})
    assert tally["image folders with two or more NIfTI files, or an image id found twice (not used: ambiguous)"] == 3


def test_cq500_leaves_out_a_read_whose_number_names_folders_of_two_studies(tmp_path):
    from dicom_synth import head_phantom, write_series
    root = str(tmp_path / "cq500")
    expect, _ = bench_fakes.cq500(root)
    # CQ500-CT-1 also names another study's folder (sorted first); CQ500-CT-2 is copied whole
    other, _, _ = write_series(os.path.join(root, "CQ500-CT-1", "Unknown Study", "CT 5mm"),
                               head_phantom((3, 32, 32), 77), phi=False)
    shutil.copytree(os.path.join(root, "CQ500CT2 CQ500CT2"), os.path.join(root, "copy", "CQ500-CT-2"))
    studies, tally, _ = B.cq500(root)
    uid1 = list(expect)[1]   # CQ500-CT-1's own study (the fake writes 0, 1, 2 in order)
    assert sorted(st.uid for st in studies) == sorted(set(expect) - {uid1}) and other not in expect
    assert tally["rows whose study number names folders of different studies (left out: ambiguous)"] == 1
    assert tally["rows labelled"] == 2 and tally["study folders without a read (not labelled)"] == 1


def test_openbhb_gives_an_age_to_no_image_when_several_sessions_match(tmp_path):
    # no session column; 2001 has two sessions (the age may be of either), 2002 one
    r = tmp_path / "bids"
    bench_fakes.write_csv(str(r / "participants.tsv"), ["participant_id", "age"], [("2001", "60.0"), ("2002", "61.0")],
                          "\t")
    for pid, ses in (("2001", "1"), ("2001", "2"), ("2002", "1")):
        bench_fakes.write_nifti(str(r / f"sub-{pid}" / f"ses-{ses}" / "anat" / f"sub-{pid}_ses-{ses}_T1w.nii.gz"))
    studies, tally, _ = B.openbhb(str(r))
    got = [(st.subject, os.path.basename(st.image), st.age) for st in studies]
    assert got == [("2002", "sub-2002_ses-1_T1w.nii.gz", 61.0)]
    assert tally["rows matching two or more T1w images (left out: ambiguous)"] == 1


def test_openbhb_never_stages_a_derived_map_of_the_npy_release(tmp_path):
    # the cat12vbm gray-matter map beside the quasi-raw T1w (by name it sorts first)
    r = tmp_path / "npy"
    os.makedirs(r / "train")
    for name in ("sub-3001_preproc-quasiraw_T1w.npy", "sub-3001_preproc-cat12vbm_desc-gm_T1w.npy"):
        np.save(r / "train" / name, np.zeros((1, 4, 5, 6), np.float32))
    bench_fakes.write_csv(str(r / "participants.tsv"), ["participant_id", "age"], [("3001", "40.5")], "\t")
    (st,), tally, _ = B.openbhb(str(r))
    assert os.path.basename(st.image) == "sub-3001_preproc-quasiraw_T1w.npy"
    assert tally["derived images (preproc- other than quasiraw, not used)"] == 1


def test_abide_leaves_out_a_subject_with_two_anatomical_images(tmp_path):
    root = str(tmp_path / "abide")
    expect = bench_fakes.abide(root)
    bench_fakes.write_nifti(os.path.join(root, "Pitt", "0050002", "session_1", "anat_2", "mprage.nii.gz"), 9)
    studies, tally, _ = B.abide(root)
    assert sorted(st.subject for st in studies) == sorted(set(expect) - {"50002"})
    assert tally["rows with two or more anatomical images (left out: ambiguous)"] == 1
    assert tally["image subjects without a label row (not staged)"] == 1   # 0051999 only


def test_oasis1_leaves_out_a_session_found_on_two_discs(tmp_path):
    root = str(tmp_path / "oasis")
    expect, _ = bench_fakes.oasis1(root)
    bench_fakes.write_analyze(os.path.join(root, "disc2", "OAS1_0001_MR1", "PROCESSED", "MPRAGE", "SUBJ_111",
                                           "OAS1_0001_MR1_mpr_n3_anon_sbj_111.img"), seed=8)
    studies, tally, _ = B.oasis1(root)
    assert sorted(st.sid for st in studies) == sorted(f"oasis1:{s}" for s in expect if s != "OAS1_0001_MR1")
    assert tally["rows with two or more session folders or candidate images (left out: ambiguous)"] == 1


def _second_label_file(dataset, root):
    """A copy of the dataset with a second label file under ROOT -> (the error's pattern, the intended file)."""
    if dataset == "aibl":   # two releases in one folder: by name the 2017 one sorts last
        bench_fakes.aibl(root)
        bench_fakes.write_csv(os.path.join(root, "Data_extract_3.3.0", "aibl_pdxconv_15-Feb-2017.csv"),
                              ["RID", "SITEID", "VISCODE", "DXCURREN"], [(4, 1, "bl", 1)])
        intended = os.path.join(root, "Data_extract_3.3.0", "aibl_pdxconv_01-Jun-2018.csv")
        return r"aibl_pdxconv_\*\.csv .*: 2 found", intended
    if dataset == "adni":   # none at ROOT, two releases below it
        bench_fakes.adni(root)
        for sub in ("2019", "2024"):
            os.makedirs(os.path.join(root, sub))
            shutil.copyfile(os.path.join(root, "ADNIMERGE.csv"), os.path.join(root, sub, "ADNIMERGE.csv"))
        os.remove(os.path.join(root, "ADNIMERGE.csv"))
        return r"ADNIMERGE\.csv: 2 found", os.path.join(root, "2024", "ADNIMERGE.csv")
    bench_fakes.abide(root)
    bench_fakes.write_csv(os.path.join(root, "old", "Phenotypic_V1_0b_preprocessed1.csv"),
                          ["SUB_ID", "SITE_ID", "DX_GROUP", "AGE_AT_SCAN"], [(50002, "PITT", 2, 16.77)])
    return r"Phenotypic_V1_0b_preprocessed1\.csv: 2 found", os.path.join(root, "Phenotypic_V1_0b_preprocessed1.csv")


@pytest.mark.parametrize("dataset", ["aibl", "adni", "abide"])
def test_two_label_files_under_root_are_an_error_not_a_pick_by_name(tmp_path, dataset):
    root = str(tmp_path / dataset)
    pattern, intended = _second_label_file(dataset, root)
    with pytest.raises(B.BenchmarkError, match=pattern + ".*--labels_file"):
        B.ADAPTERS[dataset](root)
    studies, _, _ = B.ADAPTERS[dataset](root, intended)   # the one named is read
    assert studies


# ----------------------------------------------------------------------------- ties, mixed DICOM folders, reruns


def _adni_tied(root, subjects):
    """ADNIMERGE.csv (CN at baseline) + NIfTI images of one day; subjects: {PTID: [(series, image id folder)]}."""
    rows = []
    for k, (ptid, series) in enumerate(subjects.items()):
        rows.append([k + 1, ptid, "bl", "2006-01-05", "CN", "CN", 70.0, 0])
        for j, (name, iid) in enumerate(series):
            d = os.path.join(root, "ADNI", ptid, name, "2006-01-10_10_20_30.0", iid)
            bench_fakes.write_nifti(os.path.join(d, f"ADNI_{ptid}_{name}.nii"), seed=k * 10 + j)
    bench_fakes.write_csv(os.path.join(root, "ADNIMERGE.csv"), bench_fakes.ADNI_HEADER, rows)


def test_adni_equally_close_images_take_the_lowest_image_id_not_the_first_path(tmp_path):
    # two vendors' names for a plain and an accelerated MPRAGE of one visit: by path the accelerated
    # one sorts first in the first subject, the plain one in the second
    plan = {"002_S_0001": [("MPRAGE", "I100"), ("Accelerated_Sagittal_MPRAGE", "I150")],
            "002_S_0002": [("MPRAGE", "I250"), ("MPRAGE_SENSE2", "I200")],
            "002_S_0003": [("MPRAGE", "raw"), ("MPRAGE_Repeat", "I310")]}   # one without an image id: undecidable
    root = str(tmp_path / "adni")
    _adni_tied(root, plan)
    studies, tally, _ = B.adni(root)
    got = {st.subject: os.path.basename(os.path.dirname(st.image)) for st in studies}
    assert got == {"002_S_0001": "I100", "002_S_0002": "I200"}   # by hand: the lowest id of each
    by_path = {p: sorted(os.path.join(s, i) for s, i in v)[0].split(os.sep)[1] for p, v in plan.items()}
    assert by_path["002_S_0001"] != got["002_S_0001"] and by_path["002_S_0002"] != got["002_S_0002"]
    assert tally["baseline rows with several equally close images (the lowest image id taken)"] == 2
    assert tally["baseline rows with several equally close images not told apart by image id (left out: "
                 "ambiguous)"] == 1
    assert tally["baseline rows labelled"] == 2 and tally["rows"] == 3


def test_a_dicom_folder_mixing_two_studies_is_left_out_not_labelled_by_its_first_file(tmp_path):
    import pydicom
    from dicom_synth import head_phantom, write_series
    # ADNI: 002_S_0002's baseline series folder (DICOM) also holds a file of another study, sorted first
    root = str(tmp_path / "adni")
    expect, _ = bench_fakes.adni(root, dicom_subject=True)
    d = os.path.join(root, "ADNI", "002_S_0002", "MPRAGE", "2006-01-10_10_20_30.0", "I200")
    own = {str(pydicom.dcmread(os.path.join(d, f)).StudyInstanceUID) for f in os.listdir(d)}
    other, _, _ = write_series(d, head_phantom((1, 32, 32), 5), modality="MR", names=["AAA.dcm"], phi=False)
    assert len(own) == 1 and other not in own
    studies, tally, _ = B.adni(root)
    assert sorted(st.subject for st in studies) == sorted(set(expect) - {"002_S_0002"})
    assert tally["baseline rows whose DICOM folder mixes two or more studies (left out: ambiguous)"] == 1
    # CQ500: CQ500-CT-1's folder also holds a series of another study (sorted first); CQ500-CT-3 (read,
    # not in the fake download) gets a folder without a DICOM file: both left out, counted, the rest labelled
    root = str(tmp_path / "cq500")
    expect, _ = bench_fakes.cq500(root)
    other, _, _ = write_series(os.path.join(root, "CQ500CT1 CQ500CT1", "A other", "CT 5mm"),
                               head_phantom((3, 32, 32), 77), phi=False)
    os.makedirs(os.path.join(root, "CQ500-CT-3"))
    with open(os.path.join(root, "CQ500-CT-3", "readme.txt"), "w") as f:
        f.write("not a DICOM file")
    studies, tally, _ = B.cq500(root)
    uid1 = list(expect)[1]   # CQ500-CT-1's own study (the fake writes 0, 1, 2 in order)
    assert sorted(st.uid for st in studies) == sorted(set(expect) - {uid1}) and other not in expect
    assert tally["rows whose study folder mixes two or more studies (left out: ambiguous)"] == 1
    assert tally["rows with a study folder holding no DICOM file with a StudyInstanceUID (left out)"] == 1
    assert tally["rows labelled"] == 2


def test_a_rerun_that_picks_another_image_stages_it_not_the_earlier_link(tmp_path):
    root = str(tmp_path / "adni")
    _adni_tied(root, {"002_S_0001": [("MPRAGE", "I100"), ("Accelerated_Sagittal_MPRAGE", "I150")]})
    out = str(tmp_path / "out")

    def staged():
        (folder,) = os.listdir(os.path.join(out, "images"))
        (f,) = os.listdir(os.path.join(out, "images", folder))
        return os.path.join(out, "images", folder, f)
    B.run("adni", root, out, "s")
    assert os.readlink(staged()).split(os.sep)[-4] == "MPRAGE"
    # the docstring's way to choose the other series: narrow adni_series, rerun into the same OUT
    B.run("adni", root, out, "s", series_regex="accelerated")
    want = os.path.join(root, "ADNI", "002_S_0001", "Accelerated_Sagittal_MPRAGE", "2006-01-10_10_20_30.0", "I150",
                        "ADNI_002_S_0001_Accelerated_Sagittal_MPRAGE.nii")
    assert os.readlink(staged()) == want
    # --link=copy after a symlink run: a copy of that file, not the earlier link
    B.run("adni", root, out, "s", how="copy", series_regex="accelerated")
    assert not os.path.islink(staged()) and open(staged(), "rb").read() == open(want, "rb").read()
    # nothing changed: the folder is left as it is (the copy is not made again)
    ino = os.stat(staged()).st_ino
    B.run("adni", root, out, "s", how="copy", series_regex="accelerated")
    assert os.stat(staged()).st_ino == ino


def test_openbhb_never_gives_one_image_the_ages_of_two_rows(tmp_path):
    # a session column; 2001 has a row without a session and one of ses-1, and one image (ses-1)
    r = tmp_path / "bids"
    bench_fakes.write_csv(str(r / "participants.tsv"), ["participant_id", "session", "age"],
                          [("2001", "", "60.0"), ("2001", "1", "64.0"), ("2002", "1", "61.0")], "\t")
    for pid in ("2001", "2002"):
        bench_fakes.write_nifti(str(r / f"sub-{pid}" / "ses-1" / "anat" / f"sub-{pid}_ses-1_T1w.nii.gz"))
    studies, tally, _ = B.openbhb(str(r))
    assert [(st.subject, st.age) for st in studies] == [("2002", 61.0)]
    assert tally["rows whose one T1w image another row also matches (left out: ambiguous)"] == 2
    assert tally["images of listed participants not staged (row left out, or a session without a row)"] == 1


def test_training_overlap_uses_the_probes_own_record_before_its_labels_file(tmp_path):
    import torch
    bp = _stages_module()
    # the training labels file was rewritten after training (k3 gone, k4 new); probe.pt records what it saw
    trained = _labels_csv(tmp_path / "trained.csv", [("k1", "s1", ""), ("k4", "s4", "")])
    pt = str(tmp_path / "probe.pt")
    torch.save(dict(config=dict(labels=trained), models=[], seen_keys=["k1", "k2", "k3"], seen_subjects=["s1", "s2"],
                    test_keys=["k5"]), pt)
    here = _labels_csv(tmp_path / "here.csv", [("k3", "x3", ""), ("k4", "x4", ""), ("k5", "x5", ""), ("k9", "s2", ""),
                                               ("k7", "", "")])
    # by hand, evaluate.py's rule: k3 (seen), k5 (a held-out test key), k9 (a seen subject); not k4 (never seen)
    n, total, source = bp.training_overlap(pt, here, "")
    assert (n, total) == (3, 5) and source != trained
    from nvfm import probe as P
    seen = P.seen_studies(torch.load(pt, weights_only=True))
    rows = list(csv.DictReader(open(here)))
    assert P.own_studies([r["study_key"] for r in rows], [r.get("subject") for r in rows], *seen) == ["k3", "k5", "k9"]


def test_lesion_overlay_keeps_a_lesion_on_the_mask_arrays_edge():
    from nvfm import grounding
    # a 2 mm mask of 4 voxels per axis, lesion on its last x plane and its first voxel; a 1 mm reference
    # grid over the same extent: reference voxel j lies at mask coordinate (j - 0.5) / 2, inside mask voxel
    # round((j - 0.5) / 2), so x planes 6 and 7 (mask 2.75, 3.25) are of the last plane, 0 and 1 of the first
    mask = np.zeros((4, 4, 4), np.float32)
    mask[3] = 1
    mask[0, 0, 0] = 1
    ref = np.eye(4)
    ref[:3, 3] = -0.5
    got = grounding.resample_to_reference(mask, np.diag([2.0, 2.0, 2.0, 1.0]), (8, 8, 8), ref, order=0)
    want = mask.repeat(2, 0).repeat(2, 1).repeat(2, 2)   # each 2 mm voxel is 2 x 2 x 2 reference voxels
    np.testing.assert_array_equal(got, want)


def test_aibl_an_image_id_in_two_collection_csvs_kept_once_when_they_agree_left_out_when_not(tmp_path, capsys):
    # a second collection csv (sorted after the first) repeats I90080 as is, gives I90040 (RID 4's
    # baseline) to subject 16 and I90150 (RID 15's baseline) to visit m18: before, the last row won,
    # so RID 16 (images I90040, I90160 at bl) was labelled with RID 4's lower image id
    root = str(tmp_path / "aibl")
    expect, ages = bench_fakes.aibl(root)

    def row(iid, rid, age, visit="bl"):   # as bench_fakes.aibl writes them
        return [iid, rid, "", "F", age, visit, "MRI", "MPRAGE", "Original", "2008-03-04", "NiFTI", ""]
    bench_fakes.write_csv(os.path.join(root, "zz_second_collection.csv"), bench_fakes.COLLECTION_HEADER,
                          [row("I90080", "8", 76.0), row("I90040", "16", 75.0), row("I90150", "15", 77.0, "m18")])
    # a third, exported without the Age column: its row of I90420 (RID 42) lacks a value, not a different one
    bench_fakes.write_csv(os.path.join(root, "zz_third_collection.csv"), ["Image Data ID", "Subject", "Visit"],
                          [["I90420", "42", "bl"]])
    studies, tally, _ = B.aibl(root)
    assert sorted(st.subject for st in studies) == sorted(set(expect) - {"4", "15"})
    assert "/AIBL/16/" in next(st.image for st in studies if st.subject == "16")
    assert next(st.age for st in studies if st.subject == "42") == ages["42"]
    assert tally["collection rows repeating an image id (in agreement, counted once)"] == 2
    assert tally["image ids whose collection rows conflict (left out, warned)"] == 2
    assert tally["T1 images whose collection rows conflict (not used)"] == 2
    assert tally["T1 images without a collection row (not used)"] == 0
    warned = capsys.readouterr().err.strip().splitlines()
    assert len(warned) == 2 and all("AIBL_T1_baseline_6_01_2026.csv:" in w and "zz_second_collection.csv:" in w
                                    for w in warned)
    assert sorted(w.rsplit("different ", 1)[1] for w in warned) == ["subject (image left out)",
                                                                    "visit (image left out)"]
    assert not any("I90" in w for w in warned)


# LONI's series folder names: as acquired, and the series LONI derived from them (steps joined by "__")
RAW_SERIES = ["MPRAGE", "MPRAGE_Repeat", "MP-RAGE", "MP-RAGE_REPEAT", "Accelerated_Sagittal_MPRAGE", "Sag_IR-SPGR",
              "IR-FSPGR", "Accelerated_Sag_IR-FSPGR", "MPRAGE_SENSE2", "MPRAGE_ADNI_confirmed"]
DERIVED_SERIES = ["MT1__N3m", "MT1__GradWarp__N3m", "MPR__GradWarp__B1_Correction__N3__Scaled", "MPR____N3__Scaled",
                  "MPR-R__GradWarp__N3__Scaled_2", "Spatially_Normalized,_Masked_and_N3_corrected_T1_image",
                  "HHP_6_DOF_AC-PC_registered_MPRAGE"]


def test_adni_and_aibl_default_series_are_raw_t1_never_a_preprocessed_series(tmp_path):
    rx = re.compile(B.adni_series, re.I)
    assert [n for n in RAW_SERIES if not rx.search(n)] == []
    assert [n for n in DERIVED_SERIES if rx.search(n)] == []
    # ADNI: 002_S_0001's MT1__N3m (I50) and 003_S_0003's MT1__GradWarp__N3m (I60), same day as the raw
    # MPRAGE (I100, I300) and a lower image id: before, the preprocessed image was the one staged
    root = str(tmp_path / "adni")
    expect, _ = bench_fakes.adni(root, dicom_subject=False)
    for ptid, series, iid in (("002_S_0001", "MT1__N3m", 50), ("003_S_0003", "MT1__GradWarp__N3m", 60)):
        d = os.path.join(root, "ADNI", ptid, series, "2006-01-10_10_20_30.0", f"I{iid}")
        bench_fakes.write_nifti(os.path.join(d, f"ADNI_{ptid}_MR_{series}_Br_20070101_S1_I{iid}.nii"), seed=5)
    studies, tally, _ = B.adni(root)
    assert sorted(st.subject for st in studies) == sorted(expect)
    for st in studies:
        assert f"/ADNI/{st.subject}/MPRAGE/" in st.image
    assert tally["image folders of other series (not matching adni_series)"] == 1 + 2   # Field_Mapping too
    # AIBL: RID 16's MT1__N3m image I100 at bl, in the collection csv too
    root = str(tmp_path / "aibl")
    expect, _ = bench_fakes.aibl(root)
    d = os.path.join(root, "AIBL", "16", "MT1__N3m", "2008-03-04_11_22_33.0", "I100")
    bench_fakes.write_nifti(os.path.join(d, "AIBL_16_MR_MT1__N3m_Br_20090101_S1_I100.nii"), seed=5)
    with open(os.path.join(root, "AIBL_T1_baseline_6_01_2026.csv"), "a", newline="") as f:
        csv.writer(f).writerow(["I100", "16", "", "F", 65.0, "bl", "MRI", "MT1; N3m", "Processed", "2008-03-04",
                                "NiFTI", ""])
    studies, tally, _ = B.aibl(root)
    assert "/AIBL/16/MPRAGE/" in next(st.image for st in studies if st.subject == "16")
    assert tally["image folders of other series (not matching adni_series)"] == 1 + 1


def _edit_csv(path, line, col, value, delimiter=","):
    rows = list(csv.reader(open(path, newline=""), delimiter=delimiter))
    rows[line - 1][rows[0].index(col)] = value
    bench_fakes.write_csv(path, rows[0], rows[1:], delimiter)


def test_a_cell_written_nan_is_a_missing_value_never_a_label_or_an_age(tmp_path):
    # OASIS-1: OAS1_0002_MR1 (line 3, CDR 1) re-saved as NaN: before, float("NaN") passed, was not 0.5
    # and not >= 1, so the row was labelled dementia 0; OpenBHB: 1002's age NaN became an age
    root = str(tmp_path / "oasis")
    expect, _ = bench_fakes.oasis1(root)
    _edit_csv(os.path.join(root, "oasis_cross-sectional.csv"), 3, "CDR", "NaN")
    studies, tally, _ = B.oasis1(root)
    assert {st.subject for st in studies} == {s[:9] for s in expect} - {"OAS1_0002"}
    assert tally["rows without CDR (left out)"] == 2
    root = str(tmp_path / "openbhb")
    ages = bench_fakes.openbhb(root)
    tsv = os.path.join(root, "participants.tsv")
    _edit_csv(tsv, 3, "age", "NaN", "\t")
    studies, tally, _ = B.openbhb(root)
    assert {st.subject: st.age for st in studies} == {k: v for k, v in ages.items() if k != "1002"}
    assert tally["rows without age (left out)"] == 2
    _edit_csv(tsv, 3, "age", "inf", "\t")   # not a missing value, not an age: the line named
    with pytest.raises(B.BenchmarkError, match=r"participants.tsv:3: column 'age' must be a number"):
        B.openbhb(root)


def test_adni_examdate_that_is_no_date_is_a_one_line_error_naming_the_line(tmp_path):
    # a day-first date (ADNIMERGE re-saved by a spreadsheet): before, date() raised a bare ValueError
    root = str(tmp_path / "adni")
    bench_fakes.adni(root, dicom_subject=False)
    _edit_csv(os.path.join(root, "ADNIMERGE.csv"), 2, "EXAMDATE", "25/01/2006")
    with pytest.raises(B.BenchmarkError, match=r"ADNIMERGE.csv:2: EXAMDATE must be a date") as e:
        B.adni(root)
    assert "2006" not in str(e.value).split("ADNIMERGE.csv")[1]
    _edit_csv(os.path.join(root, "ADNIMERGE.csv"), 2, "EXAMDATE", "1/5/2006")   # a US spreadsheet: read
    assert "002_S_0001" in {st.subject for st in B.adni(root)[0]}


def test_label_file_errors_name_the_files_own_line_past_blank_lines_and_multi_line_fields(tmp_path):
    # participants.tsv: a quoted note over lines 2-3, a blank line 4, a bad age on line 6; before, the
    # rows were numbered by their order (line 4 named) and the note lost its line break
    root = str(tmp_path / "openbhb")
    bench_fakes.openbhb(root)
    with open(os.path.join(root, "participants.tsv"), "w", newline="") as f:
        f.write('participant_id\tage\tnote\n1001\t23.5\t"scanned\ntwice"\n\n1002\t67.25\t\n1003\tforty\t\n')
    with pytest.raises(B.BenchmarkError, match=r"participants.tsv:6: column 'age' must be a number"):
        B.openbhb(root)
    rows, _ = B._read_table(os.path.join(root, "participants.tsv"), ["participant_id"])
    assert [(r["participant_id"], r["_line"], r["note"]) for r in rows] == [
        ("1001", 3, "scanned\ntwice"), ("1002", 5, ""), ("1003", 6, "")]
