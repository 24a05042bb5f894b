"""nvfm/benchmarks.py on miniature copies of each public dataset in its published layout
(tests/bench_fakes.py): labels by hand, keys equal to preprocess.py's, every input counted, no
identifier in any output; the paper protocol (subject-grouped stratification against a brute
force, train_probe --protocol=paper, evaluate's external mode, paper table and plots)."""
import csv
import itertools
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import bench_fakes  # noqa: E402

from nvfm import benchmarks as B  # noqa: E402
from nvfm import dicom  # noqa: E402
from nvfm import probe as P  # noqa: E402

SALT = "test-salt-25"


def _labels(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _all_output_text(out):
    """Every byte of every regular file under out (links not followed) as latin-1 text, plus the
    file and folder names."""
    parts = []
    for d, dirs, files in os.walk(out):
        parts += dirs + files
        for f in files:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                with open(p, "rb") as fh:
                    parts.append(fh.read().decode("latin-1"))
    return "\n".join(parts)


def _stage_folder_key(out, row_key):
    """The images/ folder whose preprocess key is row_key (NIfTI rule: hash of "nifti:" + folder)."""
    hits = [f for f in os.listdir(os.path.join(out, "images")) if dicom.salted_hash("nifti:" + f, SALT) == row_key]
    assert len(hits) == 1
    return os.path.join(out, "images", hits[0])


def _check_report_sums(rep, parts):
    """Every input row is in exactly one outcome."""
    assert sum(rep["input"][k] for k in parts) == rep["input"]["rows"], rep["input"]


def test_library_imports_no_script():
    """nvfm/benchmarks.py takes its salt rule from nvfm/dicom.py, never by loading preprocess.py."""
    code = ("import sys, nvfm.benchmarks as B; B.resolve_salt(''); "
            "print(sorted(m for m in sys.modules if 'preprocess' in m))")
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    assert B.resolve_salt(SALT) == SALT and B.resolve_salt("") == dicom.resolve_salt("")


def test_openbhb_ages_keys_and_counts(tmp_path):
    ages = bench_fakes.openbhb(str(tmp_path / "openBHB"))
    out = str(tmp_path / "out")
    rep = B.run("openbhb", str(tmp_path / "openBHB"), out, SALT)
    rows = _labels(os.path.join(out, "labels_age.csv"))
    assert len(rows) == 4 and {r["modality"] for r in rows} == {"MR"}
    assert list(rows[0]) == ["study_key", "subject", "modality", "split", "age"]
    # which participant each row is: the staged link's target names it
    got = {}
    for r in rows:
        img = os.listdir(_stage_folder_key(out, r["study_key"]))
        assert img == ["image.nii.gz"]
        target = os.readlink(os.path.join(_stage_folder_key(out, r["study_key"]), img[0]))
        pid = target.split("sub-")[1].split("/")[0]
        assert "T1w" in target and "mask" not in target
        got[pid] = float(r["age"])
        assert r["subject"] == dicom.salted_hash(f"subject:openbhb:{pid}", SALT)
    assert got == ages
    _check_report_sums(rep, ["rows labelled", "rows without age (left out)", "rows without an image (left out)"])
    # a rerun with another salt replaces the staged studies instead of adding to them; originals untouched
    rep2 = B.run("openbhb", str(tmp_path / "openBHB"), out, "another-salt")
    assert rep2["input"]["earlier staged folders removed from images/"] == 4
    assert len(os.listdir(os.path.join(out, "images"))) == 4
    assert len(B._walk_images(str(tmp_path / "openBHB"))) == 7
    B.run("openbhb", str(tmp_path / "openBHB"), out, SALT)
    assert rep["input"]["rows without age (left out)"] == 1 and rep["input"]["rows without an image (left out)"] == 1
    assert rep["input"]["images without a label row (not staged)"] == 1
    text = _all_output_text(out)
    for pid in ("1001", "1002", "1006", "1099"):
        assert f"sub-{pid}" not in text and f",{pid}," not in text


def test_openbhb_keys_equal_preprocess_keys(tmp_path):
    import preprocess
    bench_fakes.openbhb(str(tmp_path / "openBHB"))
    out = str(tmp_path / "out")
    B.run("openbhb", str(tmp_path / "openBHB"), out, SALT)
    man = preprocess.run(os.path.join(out, "images"), str(tmp_path / "shards"), n_workers=1, salt_value=SALT,
                         cfg_progress=False, cfg_log_paths=False)
    assert {v["study_key"] for v in man["volumes"]} == {r["study_key"] for r in _labels(os.path.join(out, "labels_age.csv"))}


def test_openbhb_npy_release_becomes_nifti_on_the_mni_grid(tmp_path):
    r = str(tmp_path / "o")
    arr = np.random.default_rng(0).random((1, 9, 11, 7)).astype(np.float32)
    os.makedirs(os.path.join(r, "train"))
    np.save(os.path.join(r, "train", "sub-3001_preproc-quasiraw_T1w.npy"), arr)
    bench_fakes.write_csv(os.path.join(r, "participants.tsv"), ["participant_id", "age"], [("3001", "40.5")], "\t")
    B.run("openbhb", r, str(tmp_path / "out"), SALT)
    (row,) = _labels(os.path.join(tmp_path / "out", "labels_age.csv"))
    img = nib.load(os.path.join(_stage_folder_key(str(tmp_path / "out"), row["study_key"]), "image.nii.gz"))
    np.testing.assert_array_equal(np.asarray(img.dataobj), arr[0])
    np.testing.assert_array_equal(img.affine, np.array(B.MNI152_1MM_AFFINE))
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S") and row["age"] == "40.50"


def test_openbhb_bad_inputs(tmp_path):
    r = str(tmp_path / "o")
    bench_fakes.write_csv(os.path.join(r, "participants.tsv"), ["participant_id", "sex"], [("1", "M")], "\t")
    with pytest.raises(B.BenchmarkError, match=r"participants.tsv: missing column\(s\) \['age'\]"):
        B.run("openbhb", r, str(tmp_path / "out"), SALT)
    bench_fakes.openbhb(r)
    with open(os.path.join(r, "participants.tsv"), "a") as f:
        f.write("1002\t50\tF\t3\n")
    with pytest.raises(B.BenchmarkError, match=r"participants.tsv:8: duplicate participant \(also line 3\)"):
        B.run("openbhb", r, str(tmp_path / "out"), SALT)
    with pytest.raises(B.BenchmarkError, match="not a directory"):
        B.run("openbhb", str(tmp_path / "none"), str(tmp_path / "out"), SALT)
    with pytest.raises(B.BenchmarkError, match="choose one of"):
        B.run("openneuro", r, str(tmp_path / "out"), SALT)


def _check_study_key(row, folder, dicom_download):
    """An adapter's labels row is keyed as preprocess.py keys its image folder: a DICOM download
    (a dicom/ folder, expected exactly when `dicom_download`) by its StudyInstanceUID, a NIfTI
    image by the folder's name."""
    d = os.path.join(folder, "dicom")
    assert os.path.isdir(d) == dicom_download, folder
    if dicom_download:
        import pydicom
        uid = pydicom.dcmread(os.path.join(d, sorted(os.listdir(d))[0])).StudyInstanceUID
        assert row["study_key"] == dicom.salted_hash(uid, SALT)
    else:
        assert row["study_key"] == dicom.salted_hash("nifti:" + os.path.basename(folder), SALT)


def test_adni_tasks_baseline_images_and_dicom_folder(tmp_path):
    root = str(tmp_path / "ADNI_dl")
    expect, ages = bench_fakes.adni(root)
    out = str(tmp_path / "out")
    rep = B.run("adni", root, out, SALT)
    got = {}
    for task in ("dementia", "pmci"):
        for r in _labels(os.path.join(out, f"labels_{task}.csv")):
            ptid = next(p for p in expect if dicom.salted_hash(f"subject:adni:{p}", SALT) == r["subject"])
            got.setdefault(ptid, {})[task] = int(r[task])
            assert float(r["age"]) == pytest.approx(ages[ptid])
            folder = os.path.join(out, "images", dicom.salted_hash(f"study:adni:{ptid}", SALT))
            _check_study_key(r, folder, dicom_download=ptid == "002_S_0002")
    assert got == expect
    left = rep["input"]
    assert left["baseline SMC (left out)"] == 1
    assert left["baseline MCI: late conversion or follow-up < horizon (left out)"] == 2
    assert left["baseline rows without a baseline image (left out)"] == 3   # none, a year late, a field map
    n_base = 11
    assert left["baseline rows labelled"] + 1 + 2 + 3 == n_base
    assert left["follow-up rows (read for pmci)"] + n_base == left["rows"]
    assert left["image folders of other series (not matching adni_series)"] == 1
    assert left["images not used (other visits or subjects)"] == 9 - 5   # 9 T1 images, 5 labelled baselines
    text = _all_output_text(out)
    for s in ("002_S_0001", "005_S_0006", "2006-01", "I100"):
        assert s not in text
    # a second baseline row for one subject: one line naming the file and line
    with open(os.path.join(root, "ADNIMERGE.csv"), "a") as f:
        f.write("3,003_S_0003,bl,2006-01-05,CN,CN,68.0,0\n")
    with pytest.raises(B.BenchmarkError, match=r"ADNIMERGE.csv:\d+: duplicate subject"):
        B.run("adni", root, out, SALT)


def test_oasis1_cdr_rule_analyze_conversion_and_counts(tmp_path):
    root = str(tmp_path / "oasis")
    expect, vox = bench_fakes.oasis1(root)
    out = str(tmp_path / "out")
    rep = B.run("oasis1", root, out, SALT)
    rows = _labels(os.path.join(out, "labels_dementia.csv"))
    got = {}
    for r in rows:
        sid = next(s for s in expect if dicom.salted_hash(f"subject:oasis1:{s[:9]}", SALT) == r["subject"])
        got[sid] = int(r["dementia"])
        img = nib.load(os.path.join(_stage_folder_key(out, r["study_key"]), "image.nii.gz"))
        np.testing.assert_array_equal(np.asarray(img.dataobj), vox[sid])   # the SUBJ_111 image (RAW for 0003)
        np.testing.assert_allclose(img.affine, nib.load(os.path.join(root, "disc1", sid, *(
            ["RAW", f"{sid}_mpr-1_anon.img"] if sid == "OAS1_0003_MR1" else
            ["PROCESSED", "MPRAGE", "SUBJ_111", f"{sid}_mpr_n4_anon_sbj_111.img"]))).affine)
    assert got == expect
    _check_report_sums(rep, ["rows labelled", "rows without CDR (left out)", "CDR 0.5 (left out)",
                             "rows without an image (left out)", "repeat sessions MR2+ (left out)"])
    assert rep["tasks"]["dementia"]["positives"] == {"dementia": 2}
    assert "OAS1" not in _all_output_text(out)


def test_abide_layouts(tmp_path):
    root = str(tmp_path / "abide")
    expect = bench_fakes.abide(root)
    out = str(tmp_path / "out")
    rep = B.run("abide", root, out, SALT)
    got = {}
    for r in _labels(os.path.join(out, "labels_autism.csv")):
        sid = next(s for s in expect if dicom.salted_hash(f"subject:abide:{s}", SALT) == r["subject"])
        got[sid] = int(r["autism"])
        target = os.readlink(os.path.join(_stage_folder_key(out, r["study_key"]), "image.nii.gz"))
        assert "rest" not in target and sid in target
    assert got == expect
    assert rep["input"]["rows without an image (left out)"] == 1
    assert rep["input"]["image subjects without a label row (not staged)"] == 1


def test_rsna_study_level_labels_through_dicom_headers(tmp_path):
    import preprocess
    root = str(tmp_path / "rsna")
    expect, patients, planted = bench_fakes.rsna(root)
    out = str(tmp_path / "out")
    rep = B.run("rsna", root, out, SALT, n_workers=1)
    rows = _labels(os.path.join(out, "labels_ich.csv"))
    assert list(rows[0])[5:] == ["ich", "edh", "iph", "ivh", "sah", "sdh"]
    got = {}
    for uid, y in expect.items():
        r = next(r for r in rows if r["study_key"] == dicom.salted_hash(uid, SALT))
        got[uid] = {c: int(r[c]) for c in y}
        assert r["subject"] == dicom.salted_hash(f"subject:rsna:{patients[uid]}", SALT) and r["modality"] == "CT"
    assert got == expect and len(rows) == 3
    assert len({r["subject"] for r in rows}) == 2          # two studies of one patient share a group
    inp = rep["input"]
    assert inp["duplicate rows (identical, counted once)"] == 1
    assert inp["images (6 rows each) labelled"] == planted["n_images"]
    assert inp["images with label rows but no DICOM file (left out)"] == planted["n_nofile"]
    assert inp["DICOM files without label rows"] == planted["n_unlabelled"]
    assert inp["rows"] == 6 * (planted["n_images"] + planted["n_nofile"]) + 1
    # the keys are preprocess.py's: run it on the image folder as distributed
    man = preprocess.run(os.path.join(root, "stage_2_train"), str(tmp_path / "shards"), n_workers=1, salt_value=SALT,
                         cfg_progress=False, cfg_log_paths=False)
    keys = {v["study_key"] for v in man["volumes"]}
    assert {r["study_key"] for r in rows} <= keys and len(keys) == 4   # + the unlabelled study
    text = _all_output_text(out)
    assert "ID_aaa001" not in text and not any(uid in text for uid in expect)
    # a conflicting duplicate row is an error naming the file and line
    with open(os.path.join(root, "stage_2_train.csv"), "a") as f:
        f.write("ID_0000a0e9_any,1\n")
    with pytest.raises(B.BenchmarkError, match=r"stage_2_train.csv:\d+: conflicting duplicate row"):
        B.run("rsna", root, out, SALT, n_workers=1)
    bench_fakes.write_csv(os.path.join(root, "stage_2_train.csv"), ["ID", "Lbl"], [("ID_0000a0e9_any", 1)])
    with pytest.raises(B.BenchmarkError, match=r"stage_2_train.csv: missing column\(s\) \['Label'\]"):
        B.run("rsna", root, out, SALT, n_workers=1)


def test_cq500_majority_of_three_readers(tmp_path):
    root = str(tmp_path / "cq500")
    expect, reads = bench_fakes.cq500(root)
    out = str(tmp_path / "out")
    rep = B.run("cq500", root, out, SALT)
    rows = _labels(os.path.join(out, "labels_ich.csv"))
    cols = list(B.CQ500_READS.values())
    assert list(rows[0])[5:] == cols and len(rows) == 3
    for uid, r3 in expect.items():
        r = next(r for r in rows if r["study_key"] == dicom.salted_hash(uid, SALT))
        majority = [int(r3[:, j].sum() >= 2) for j in range(r3.shape[1])]   # 2 of 3 readers
        assert [int(r[c]) for c in cols] == majority
    one = next(r for r in rows if r["study_key"] == dicom.salted_hash(list(expect)[1], SALT))
    assert (one["ich"], one["bleed_left"], one["bleed_right"]) == ("1", "1", "0")
    assert rep["input"]["rows without a study folder (left out)"] == 1
    assert rep["input"]["study folders without a read (not labelled)"] == 1
    assert "CQ500" not in _all_output_text(out)
    with open(os.path.join(root, "reads.csv")) as f:
        text = f.read()
    with open(os.path.join(root, "reads.csv"), "w") as f:
        f.write(text.replace("R2:SAH", "R2:SAHX"))
    with pytest.raises(B.BenchmarkError, match=r"reads.csv: missing column\(s\) \['R2:SAH'\]"):
        B.run("cq500", root, out, SALT)


def _pointing_game(tmp_path, out, classes, task_name, monkeypatch, n_lesions):
    """evaluate.py's pointing game on a grounding set's shards (tmp_path/shards): random:tiny
    features and a made-up MR probe of another dataset with these classes, scored --external
    against the set's masks. Checks that only the set's class (classes[0]) is scored, on
    `n_lesions` lesions, with an accuracy in [0, 1] and a row in paper_table.md."""
    r = _run("encode.py", [f"--shards={tmp_path / 'shards'}", "--encoder=random:tiny", f"--out={tmp_path / 'feat'}"],
             tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    import evaluate
    from nvfm.features import FeatureCache
    cache = FeatureCache(str(tmp_path / "feat"))
    torch.manual_seed(0)
    n = len(classes)
    m = P.make_probe("attentive_mil", cache.dim, n, hidden=8)
    torch.save(dict(models=[m.state_dict()], probe_args=dict(kind="attentive_mil", dim=cache.dim, n_out=n, hidden=8,
                                                             dropout=0.1),
                    task="classify", label_names=list(classes), modality="MR", eval_modality="MR",
                    encoder_hash=cache.encoder_hash, features=str(tmp_path / "feat"), windows="", protocol="made up",
                    thresholds=[0.0] * n, platt_a=[1.0] * n, platt_b=[0.0] * n, n_train_pos=[5.0] * n),
               tmp_path / "probe.pt")
    for k, v in dict(probes=str(tmp_path / "probe.pt"), names="ours", labels=os.path.join(out, "labels_grounding.csv"),
                     external=True, shards=str(tmp_path / "shards"), cohort=out, out=str(tmp_path / "ev"),
                     findings=os.path.join(out, "findings.jsonl"), n_boot=0, plots=False, device="cpu",
                     task_name=task_name).items():
        monkeypatch.setattr(evaluate, k, v)
    evaluate.main()
    with open(tmp_path / "ev" / "metrics.json") as f:
        res = json.load(f)["results"]["ours"]
    assert list(res["per_class"]) == [classes[0]] and res["grounding"]["n"] == n_lesions
    assert 0 <= res["grounding"]["accuracy"] <= 1
    assert f"| {task_name}: pointing game ({n_lesions} study-class targets, chance" in open(tmp_path / "ev" / "paper_table.md").read()


def _grounding_set(dataset, root, out, cls, masks):
    """Runs a grounding adapter and checks what every such set must give: each labelled study
    positive for `cls`, with one `cls` lesion in findings.jsonl whose mask is exactly one of the
    fake's masks ({subject: array}), every mask used. -> (report, label rows, {study_key: subject})."""
    rep = B.run(dataset, root, out, SALT)
    rows = _labels(os.path.join(out, "labels_grounding.csv"))
    assert all(r[cls] == "1" for r in rows)
    recs = [json.loads(x) for x in open(os.path.join(out, "findings.jsonl"))]
    assert sorted(r["study_key"] for r in recs) == sorted(r["study_key"] for r in rows)
    sid_of = {}
    for r in recs:
        (les,) = r["lesions"]
        assert les["diagnosis"] == cls
        m = np.asarray(nib.load(os.path.join(out, les["mask"])).dataobj)
        hit = [sid for sid, mk in masks.items() if np.array_equal(mk, m)]
        assert len(hit) == 1
        sid_of[r["study_key"]] = hit[0]
    assert set(sid_of.values()) == set(masks)
    return rep, rows, sid_of


def test_grounding_sets_masks_findings_preprocess_keys_and_pointing_game(tmp_path, monkeypatch):
    import preprocess
    segs = bench_fakes.brats21(str(tmp_path / "brats"))
    out = str(tmp_path / "out")
    rep, rows, sid_of = _grounding_set("brats21", str(tmp_path / "brats"), out, "glioma", segs)
    assert len(rows) == 2
    assert rep["input"] == {"rows": 3, "subjects labelled": 2, "subjects with an image but no mask (left out)": 1}
    for key in sid_of:
        folder = _stage_folder_key(out, key)
        assert sorted(os.listdir(folder)) == ["flair.nii.gz", "image.nii.gz", "t1ce.nii.gz", "t2.nii.gz"]   # no seg
    man = preprocess.run(os.path.join(out, "images"), str(tmp_path / "shards"), n_workers=1, salt_value=SALT,
                         cfg_progress=False, cfg_log_paths=False)
    per_study = {}
    for v in man["volumes"]:
        per_study[v["study_key"]] = per_study.get(v["study_key"], 0) + 1
    assert per_study == {r["study_key"]: 4 for r in rows}           # four sequences, one study
    assert "BraTS" not in _all_output_text(out)
    # the pointing game through evaluate.py: a (made-up) MR probe of another dataset with classes
    # glioma and meningioma, scored --external on the set's glioma column against its masks
    _pointing_game(tmp_path, out, ["glioma", "meningioma"], "brats21", monkeypatch, n_lesions=2)
    assert len(os.listdir(tmp_path / "ev" / "grounding")) > 0
    ids = bench_fakes.atlas2(str(tmp_path / "atlas"))
    rep = B.run("atlas2", str(tmp_path / "atlas"), str(tmp_path / "out2"), SALT, cls="acute_ischemic_stroke")
    rows = _labels(os.path.join(tmp_path / "out2", "labels_grounding.csv"))
    assert len(rows) == len(ids) == 2 and list(rows[0])[-1] == "acute_ischemic_stroke"
    assert rep["input"]["subjects with an image but no mask (left out)"] == 1


def test_aibl_baseline_diagnosis_collection_links_and_counts(tmp_path):
    root = str(tmp_path / "aibl_dl")
    expect, ages = bench_fakes.aibl(root)
    out = str(tmp_path / "out")
    rep = B.run("aibl", root, out, SALT)
    rows = _labels(os.path.join(out, "labels_dementia.csv"))
    assert list(rows[0]) == ["study_key", "subject", "modality", "split", "age", "dementia"]
    got = {}
    for r in rows:
        rid = next(s for s in expect if dicom.salted_hash(f"subject:aibl:{s}", SALT) == r["subject"])
        got[rid] = int(r["dementia"])
        assert float(r["age"]) == pytest.approx(ages[rid]) and r["modality"] == "MR"
        folder = os.path.join(out, "images", dicom.salted_hash(f"study:aibl:{rid}", SALT))
        _check_study_key(r, folder, dicom_download=rid == "23")
        if rid != "23":
            target = os.readlink(os.path.join(folder, "image.nii"))
            assert f"/AIBL/{rid}/MPRAGE/2008-03-04_" in target   # the baseline image, not the m18 one
    assert got == expect
    _check_report_sums(rep, ["baseline rows labelled", "follow-up rows (not used)", "baseline MCI (left out)",
                             "baseline rows without a diagnosis (left out)",
                             "baseline rows without a baseline T1 image (left out)"])
    inp = rep["input"]
    assert inp["baseline rows without a baseline T1 image (left out)"] == 3   # none, only m18, a field map
    assert inp["T1 images not used (other visits or subjects)"] == 3   # MCI, no diagnosis, the m18 image
    assert inp["T1 images without a collection row (not used)"] == 0
    assert inp["image folders of other series (not matching adni_series)"] == 1
    assert rep["tasks"]["dementia"]["positives"] == {"dementia": 3}
    text = _all_output_text(out)
    for s_ in ("I90", "2008-03", "AIBL_"):
        assert s_ not in text
    # bad inputs: no collection csv; a second baseline row
    coll = os.path.join(root, "AIBL_T1_baseline_6_01_2026.csv")
    os.rename(coll, coll + ".bak")
    with pytest.raises(B.BenchmarkError, match="no LONI collection csv"):
        B.run("aibl", root, out, SALT)
    os.rename(coll + ".bak", coll)
    with open(os.path.join(root, "Data_extract_3.3.0", "aibl_pdxconv_01-Jun-2018.csv"), "a") as f:
        f.write("16,1,bl,1\n")
    with pytest.raises(B.BenchmarkError, match=r"aibl_pdxconv_01-Jun-2018.csv:\d+: duplicate subject"):
        B.run("aibl", root, out, SALT)


def test_msseg16_consensus_masks_preprocess_keys_and_pointing_game(tmp_path, monkeypatch):
    import preprocess
    masks = bench_fakes.msseg16(str(tmp_path / "msseg"))
    out = str(tmp_path / "out")
    rep, rows, sid_of = _grounding_set("msseg16", str(tmp_path / "msseg"), out, "multiple_sclerosis", masks)
    assert len(rows) == 3
    assert rep["input"] == {"rows": 4, "subjects labelled": 3, "subjects with an image but no mask (left out)": 1}
    for key, sid in sid_of.items():
        target = os.readlink(os.path.join(_stage_folder_key(out, key), "image.nii.gz"))
        assert sid in target and target.endswith("FLAIR_preprocessed.nii.gz" if sid != "Center_03/Patient_01"
                                                 else "Raw_Data/FLAIR.nii.gz")
    man = preprocess.run(os.path.join(out, "images"), str(tmp_path / "shards"), n_workers=1, salt_value=SALT,
                         cfg_progress=False, cfg_log_paths=False)
    assert {v["study_key"] for v in man["volumes"]} == {r["study_key"] for r in rows}
    assert "Center_" not in _all_output_text(out) and "Patient_" not in _all_output_text(out)
    _pointing_game(tmp_path, out, ["multiple_sclerosis", "glioma"], "msseg16", monkeypatch, n_lesions=3)
    with pytest.raises(B.BenchmarkError, match="no MSSEG-2016 FLAIR found"):
        B.run("msseg16", str(tmp_path / "shards"), str(tmp_path / "o2"), SALT)


def test_cli_one_line_error_and_summary(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1")
    r = subprocess.run([sys.executable, "-m", "nvfm.benchmarks", "--dataset=cq500", f"--root={tmp_path}",
                        f"--out={tmp_path / 'o'}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "reads.csv: not found" in r.stderr
    bench_fakes.abide(str(tmp_path / "abide"))
    r = subprocess.run([sys.executable, "-m", "nvfm.benchmarks", "--dataset=abide", f"--root={tmp_path / 'abide'}",
                        f"--out={tmp_path / 'o'}", f"--salt={SALT}"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3 labelled studies" in r.stdout and "labels_autism.csv" in r.stdout and "preprocess.py --input=" in r.stdout


# ----------------------------------------------------------------------------- the protocol


def _deviation(y, part, props):
    """Largest |positives of a label in a fold - its share of that label's positives|."""
    return max(abs(y[part == f, k].sum() - props[f] * y[:, k].sum()) for f in range(len(props)) for k in range(y.shape[1]))


def test_grouped_stratification_keeps_subjects_whole_and_is_near_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    # 10 subjects, 1-3 studies each, 2 labels
    groups = np.repeat(np.arange(10), rng.integers(1, 4, 10))
    ys = (rng.random((10, 2)) < [0.5, 0.3]).astype(int)
    y = ys[groups]
    props = [0.2, 0.8]
    part = P.grouped_stratification(y, [f"s{g}" for g in groups], props, seed=0)
    for g in range(10):
        assert len(set(part[groups == g])) == 1
    # brute force over subject assignments with 2 subjects in the test fold (20% of 10)
    best = min(_deviation(ys, np.array([int(i not in c) for i in range(10)]), props)
               for c in itertools.combinations(range(10), 2))
    got = _deviation(ys, np.array([part[groups == g][0] for g in range(10)]), props)
    assert (part == 0).sum() > 0 and got <= best + 1.0, (got, best)
    # empty subject ids: each study its own subject
    p2 = P.grouped_stratification(y, [""] * len(y), [1] * 4, seed=0)
    assert sorted(set(p2.tolist())) == [0, 1, 2, 3]


def test_quantile_bins_match_numpy():
    v = np.random.default_rng(1).uniform(20, 80, 101)
    b = P.quantile_bins(v, 5)
    assert b.shape == (101, 5) and (b.sum(1) == 1).all()
    ref = np.digitize(v, np.quantile(v, [0.2, 0.4, 0.6, 0.8]), right=False)
    np.testing.assert_array_equal(b.argmax(1), ref)
    assert abs(b.sum(0) - 101 / 5).max() <= 1


def _synthetic_benchmark(d, n_subj=40, seed=0, name="cache", hash_="sha256:synthetic"):
    """Feature cache + a CQ500-like labels file (ich with sides) with 1-2 studies per subject."""
    from nvfm import features
    rng = np.random.default_rng(seed)
    dirs = np.random.default_rng(123).normal(size=(3, 8)) * 6   # one "encoder": same directions in every dataset
    rows = []
    with features.FeatureWriter(str(d / name), hash_, 8, precision="float32") as w:
        for s in range(n_subj):
            ich = int(rng.random() < 0.5)
            side = int(rng.random() < 0.5)
            for v in range(1 + s % 2):
                key = f"{name}{s:03d}{v}"
                e = rng.normal(size=(int(rng.integers(5, 10)), 8))
                if ich:
                    e += dirs[0] + dirs[1 + side]   # every token: learnable in a few steps
                w.add(key, [dict(volume_id=key, family="CT", window="brain", modality="CT",
                                 coords=np.zeros((len(e), 3)), emb=e)])
                rows.append([key, f"{name}-subj{s}", "CT", "", 40 + s + v, ich, ich * (1 - side), ich * side])
    path = d / f"labels_{name}.csv"
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["study_key", "subject", "modality", "split", "age", "ich", "bleed_left", "bleed_right"])
        wr.writerows(rows)
    return path


def _run(script, args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_paper_protocol_external_transfer_table_and_plots(tmp_path, monkeypatch, capsys):
    lab = _synthetic_benchmark(tmp_path)
    common = [f"--features={tmp_path / 'cache'}", f"--labels={lab}", "--threads=1", "--hidden=16", "--steps=40",
              "--eval_interval=10", "--lr=1e-2", "--protocol=paper"]
    # a hyperparameter grid chosen by the out-of-fold score: lr 0 cannot learn, lr 1e-2 does
    r = _run("train_probe.py", [*common, f"--out={tmp_path / 'p'}", "--cv_grid=lr=0.0,1e-2;hidden=16"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "cv grid: chose {'lr': 0.01, 'hidden': 16}" in r.stdout
    ck = torch.load(tmp_path / "p" / "probe.pt", weights_only=True)
    assert ck["cv_grid_choice"] == {"lr": 0.01, "hidden": 16}
    assert ck["label_names"] == ["ich", "bleed_left", "bleed_right"] and len(ck["models"]) == 8
    assert ck["protocol"] == "paper: 8-fold CV"
    assert ck["feature_precision"] == "float32"   # the training cache's: evaluate refuses a cache of another
    rows = _labels(lab)
    subj = {r["study_key"]: r["subject"] for r in rows}
    test_subj = {subj[k] for k in ck["test_keys"]}
    assert not test_subj & {subj[k] for k in subj if k not in set(ck["test_keys"])}   # no subject on both sides
    assert abs(len(test_subj) - 8) <= 1                                                # 20% of 40 subjects
    seen = set(subj) - set(ck["test_keys"])                # every other study fitted a fold model or chose one
    assert set(ck["seen_keys"]) == seen and set(ck["seen_subjects"]) == {subj[k] for k in seen}
    # a second dataset from the same encoder: the probe applied unchanged (external transfer)
    lab2 = _synthetic_benchmark(tmp_path, n_subj=30, seed=1, name="ext")
    ev = ["--n_boot=200", "--threads=1", "--names=ours"]
    r = _run("evaluate.py", [f"--probes={tmp_path / 'p' / 'probe.pt'}", f"--labels={lab}", f"--out={tmp_path / 'ev'}",
                             "--task_name=cq500", *ev], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["ours"]
    assert res["n_studies"] == len(ck["test_keys"]) and "laterality" in res and res["laterality"]["n"] >= 1
    for f in ("roc_ours.png", "pr_ours.png", "paper_table.md"):
        assert os.path.getsize(tmp_path / "ev" / f) > 0
    r = _run("evaluate.py", [f"--probes={tmp_path / 'p' / 'probe.pt'}", f"--labels={lab2}", f"--out={tmp_path / 'ex'}",
                             f"--features={tmp_path / 'ext'}", "--external=True", "--task_name=ext", *ev], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ex = json.load(open(tmp_path / "ex" / "metrics.json"))["results"]["ours"]
    assert ex["external"] and ex["n_studies"] == len(_labels(lab2)) and ex["per_class"]["ich"]["auroc"] > 0.7
    au = ex["per_class"]["ich"]
    # a dataset labelling a subset of the probe's classes: those are scored, the rest named and skipped
    sub = tmp_path / "labels_sub.csv"
    with open(sub, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_key", "subject", "modality", "split", "age", "ich"])
        w.writerows([[r["study_key"], r["subject"], "CT", "", r["age"], r["ich"]] for r in _labels(lab2)])
    import evaluate   # in-process from here: the same code without three more interpreter start-ups
    probe_pt = str(tmp_path / "p" / "probe.pt")
    for k, v in dict(features=str(tmp_path / "ext"), external=True, n_boot=200, device="cpu", labels=str(sub),
                     out=str(tmp_path / "m")).items():
        monkeypatch.setattr(evaluate, k, v)
    sub_rows = {r["study_key"]: r for r in P.load_labels(str(sub))[0]}
    probe = evaluate.load_probe(probe_pt)
    exs, _ = evaluate.evaluate_probe(probe_pt, probe, "ours", sub_rows, {}, str(tmp_path / "findings.jsonl"))
    assert "2 probe classes are not columns" in capsys.readouterr().out
    assert list(exs["per_class"]) == ["ich"] and exs["per_class"]["ich"]["auroc"] == pytest.approx(au["auroc"])
    monkeypatch.setattr(evaluate, "external", False)
    with pytest.raises(SystemExit, match="--external=True"):   # the probe's test keys are another dataset's
        evaluate.evaluate_probe(probe_pt, probe, "ours", sub_rows, {}, str(tmp_path / "findings.jsonl"))
    monkeypatch.setattr(evaluate, "merge", f"{tmp_path / 'ev' / 'metrics.json'},{tmp_path / 'ex' / 'metrics.json'}")
    evaluate.merge_tables()
    table = open(tmp_path / "m" / "paper_table.md").read()
    assert f"| ext: ich AUROC (external) | {au['auroc']:.3f} [{au['auroc_ci'][0]:.3f}, {au['auroc_ci'][1]:.3f}] |" in table
    assert "| cq500: side accuracy given detection |" in table and "| cq500: ich PR lift |" in table
    assert table.splitlines()[2] == "| task | ours |"   # one column per encoder name


def test_bench_public_one_command_openbhb_to_the_table_resumed_with_another_encoder(tmp_path):
    """bench/bench_public.py on a miniature OpenBHB: adapter -> preprocess -> encode (random init)
    -> train_probe --protocol=paper --task=age -> evaluate -> the merged table, CIs, brain-age
    plot; a rerun with a second encoder runs only that encoder's stages and adds its column."""
    root = str(tmp_path / "openBHB")
    rows = []
    for i in range(18):
        pid = f"{2000 + i}"
        bench_fakes.write_nifti(os.path.join(root, f"sub-{pid}", "ses-1", "anat",
                                             f"sub-{pid}_ses-1_preproc-quasiraw_T1w.nii.gz"), seed=i)
        rows.append((pid, 20 + 3 * i, "F", "1"))
    bench_fakes.write_csv(os.path.join(root, "participants.tsv"), ["participant_id", "age", "sex", "site"], rows, "\t")
    b = tmp_path / "b"
    common = ["--dataset=openbhb", f"--root={root}", f"--out={b}", f"--salt={SALT}",
              "--preprocess_args=--workers=1 --progress=False --log_paths=False",
              "--probe_args=--steps=10 --eval_interval=5 --threads=1 --hidden=16",
              "--evaluate_args=--n_boot=200 --threads=1"]
    r = _run("bench/bench_public.py", [*common, "--encoders=random:tiny", "--names=random_init"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 stages run, 0 skipped" in r.stdout and f"table: {b / 'paper_table.md'}" in r.stdout
    # the keys of the labels are the keys preprocess gave the studies
    import preprocess
    from nvfm.data import ShardReader
    assert {r_["study_key"] for r_ in _labels(b / "labels_age.csv")} == \
        {v["study_key"] for v in ShardReader(str(b / "shards")).volumes}
    res = json.load(open(b / "eval" / "age" / "random_init" / "metrics.json"))["results"]["random_init"]
    ck = torch.load(b / "probes" / "random_init" / "age" / "probe.pt", weights_only=True)
    assert ck["protocol"] == "paper: 8-fold CV" and ck["task"] == "age" and ck["modality"] == "MR"
    assert res["n_studies"] == len(ck["test_keys"]) == res["n"] and len(ck["models"]) == 8
    lo, hi = res["mae_ci"]
    assert lo <= res["mae"] <= hi
    row = f"| openbhb: age MAE, years | {res['mae']:.2f} [{lo:.2f}, {hi:.2f}] |"
    assert row in open(b / "paper_table.md").read() and row in r.stdout
    assert os.path.getsize(b / "eval" / "age" / "random_init" / "age_random_init.png") > 0
    assert "age_random_init.png" in r.stdout
    # resumed: the first encoder's stages are skipped, the second's run, the table gets its column
    r = _run("bench/bench_public.py", [*common, "--encoders=random:tiny,random:tiny", "--names=random_init,again"],
             tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for stage in ("adapter", "preprocess_nvfm", "encode/random_init", "probe/random_init/age",
                  "evaluate/age/random_init"):
        assert f"[{stage}] done earlier, skipped" in r.stdout
    assert "4 stages run, 5 skipped" in r.stdout   # the new encoder's encode, probe, evaluate; the table
    table = open(b / "paper_table.md").read().splitlines()
    assert table[2] == "| task | random_init | again |"
    body = [ln.strip("| ").split(" | ") for ln in table[4:] if ln.startswith("|")]
    assert [c[0] for c in body] == ["openbhb: age MAE, years", "openbhb: age RMSE, years", "openbhb: age Pearson r"]
    assert body[0][1] == f"{res['mae']:.2f} [{lo:.2f}, {hi:.2f}]"
    assert all(c[1] == c[2] for c in body)   # the same encoder and seed under two names: the same figures
    with open(b / "stages" / "probe__again__age.json") as f:
        assert "--protocol=paper" in json.load(f)["cmd"]
    # external transfer (dry run: the commands only): this dataset's probes applied unchanged, no training
    r = _run("bench/bench_public.py", [*common, "--encoders=random:tiny", "--names=random_init", f"--external_from={b}",
                                       "--dry_run=True"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ev = next(ln for ln in r.stdout.splitlines() if ln.startswith("[evaluate/age/random_init]"))
    assert f"--probes={b / 'probes' / 'random_init' / 'age' / 'probe.pt'}" in ev and "--external=True" in ev
    assert f"--features={b / 'features' / 'random_init'}" in ev and "'--task_name=openbhb <- b'" in ev
    assert "[probe/" not in r.stdout and "[encode/random_init] done earlier, skipped" in r.stdout
    r = _run("bench/bench_public.py", [*common, "--encoders=random:tiny", "--names=other", f"--external_from={b}"],
             tmp_path)
    assert r.returncode == 1 and "--external_from: no probe" in r.stderr and "named other" in r.stderr
    # per-encoder settings: two random-init encoders of different seeds (dry run: the commands only)
    r = _run("bench/bench_public.py", [*common, "--encoders=random:tiny@seed=1,random:tiny@seed=2", "--dry_run=True"],
             tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    enc = {ln.split("]")[0][1:]: ln for ln in r.stdout.splitlines() if ln.startswith("[encode/")}
    assert sorted(enc) == ["encode/random_tiny_seed1", "encode/random_tiny_seed2"]
    for k in (1, 2):
        ln = enc[f"encode/random_tiny_seed{k}"]
        assert ln.endswith(f"--seed={k}") and "--encoder=random:tiny " in ln and f"--seed={3 - k}" not in ln
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_public", os.path.join(ROOT, "bench", "bench_public.py"))
    bp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bp)
    with pytest.raises(SystemExit, match="per-encoder settings are @key=value"):
        bp.split_encoder("random:tiny@seed")
    assert bp.split_encoder(str(tmp_path)) == (str(tmp_path), [])   # an existing path is never split


# ----------------------------------------------------------------------------- full chains on the miniature copies

CHAIN = ["--encoders=random:tiny", "--names=random_init", f"--salt={SALT}",
         "--preprocess_args=--workers=1 --progress=False --log_paths=False",
         "--probe_args=--steps=10 --eval_interval=5 --threads=1 --hidden=16"]


def _chain(dataset, root, out, *extra, plots=True):
    """bench/bench_public.py on one miniature copy; returns (stdout, paper_table.md lines).
    plots=False: evaluate.py draws none (5 s less a run; the external runs)."""
    ev = f"--evaluate_args=--n_boot=100 --threads=1{'' if plots else ' --plots=False'}"
    r = _run("bench/bench_public.py", [f"--dataset={dataset}", f"--root={root}", f"--out={out}", *CHAIN, ev, *extra],
             os.path.dirname(str(out)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(os.path.join(out, "paper_table.md")) as f:
        return r.stdout, f.read().splitlines()


def _row(table, name):
    """The figure of the table row called name (first column)."""
    hits = [ln.strip("| ").split(" | ") for ln in table if ln.startswith(f"| {name} |")]
    assert len(hits) == 1, (name, table)
    return hits[0][1]


def _check_chain(out, task, stdout, n_tasks=1):
    """Every stage ran, labels keyed like the shards, the paper protocol's 8-probe ensemble, plots."""
    from nvfm.data import ShardReader
    assert f"{5 + 2 * n_tasks - 1} stages run, 0 skipped" in stdout
    keys = {r["study_key"] for r in _labels(os.path.join(out, f"labels_{task}.csv"))}
    assert keys <= {v["study_key"] for v in ShardReader(os.path.join(out, "shards")).volumes}
    ck = torch.load(os.path.join(out, "probes", "random_init", task, "probe.pt"), weights_only=True)
    assert ck["protocol"] == "paper: 8-fold CV" and len(ck["models"]) == 8
    assert set(ck["test_keys"]) <= keys and 0 < len(ck["test_keys"]) < len(keys)
    ev = os.path.join(out, "eval", task, "random_init")
    for f in ("roc_random_init.png", "pr_random_init.png"):
        assert os.path.getsize(os.path.join(ev, f)) > 0
    with open(os.path.join(ev, "metrics.json")) as f:
        return json.load(f)["results"]["random_init"], ck


def test_bench_public_rsna_miniature_to_the_table_with_pr_lift(tmp_path):
    """RSNA-ICH: 17 studies as distributed (Kaggle's ID_<hex> files) through the whole chain."""
    root = str(tmp_path / "rsna")
    bench_fakes.rsna(root, n_more=14)
    out = tmp_path / "b_rsna"
    stdout, table = _chain("rsna", root, out, "--adapter_args=--workers=1")
    res, ck = _check_chain(str(out), "ich", stdout)
    assert ck["label_names"] == ["ich", "edh", "iph", "ivh", "sah", "sdh"] and ck["modality"] == "CT"
    pc = res["per_class"]["ich"]
    assert _row(table, "rsna: ich AUROC").startswith(f"{pc['auroc']:.3f}")
    lift = float(_row(table, "rsna: ich PR lift").split()[0])   # AUPRC / prevalence
    n_test = len(ck["test_keys"])
    assert 0 < lift <= n_test and lift == pytest.approx(pc["pr_lift"], abs=0.01)
    assert res["n_studies"] == len(ck["test_keys"])
    assert "ID_aaa001" not in "\n".join(table) and "ID_c0000" not in "\n".join(table)


def test_bench_public_cq500_miniature_to_the_table_with_side_accuracy(tmp_path):
    """CQ500: 17 read studies of 8 slices (two series each) through the whole chain: the
    laterality row (side accuracy given detection) reaches the table."""
    root = str(tmp_path / "cq500")
    expect, _ = bench_fakes.cq500(root, n_more=14, shape=(8, 48, 40))
    out = tmp_path / "b_cq500"
    stdout, table = _chain("cq500", root, out)
    res, ck = _check_chain(str(out), "ich", stdout)
    assert ck["label_names"] == list(B.CQ500_READS.values()) and len(_labels(out / "labels_ich.csv")) == len(expect)
    lat = res["laterality"]   # the detected one-sided bleeds of the test set (a random encoder may detect none)
    assert lat["n_positive"] >= 1 and lat["n"] <= lat["n_detected"] <= lat["n_positive"]
    side = _row(table, "cq500: side accuracy given detection")
    assert side.startswith(f"{lat['accuracy']:.3f}") if lat["n"] else side
    assert any(ln.startswith("| cq500: ") and " PR lift |" in ln for ln in table)


def test_bench_public_adni_then_oasis1_and_aibl_external_transfer(tmp_path):
    """ADNI (dementia and pmci probes under the paper protocol), then its dementia probe applied
    unchanged to OASIS-1 (CDR >= 1 vs 0) and AIBL (AD vs CN): no probe trained there, every
    labelled study scored."""
    adni_root, oasis_root = str(tmp_path / "adni"), str(tmp_path / "oasis")
    bench_fakes.adni(adni_root, n_more=8)
    oasis_expect, _ = bench_fakes.oasis1(oasis_root)
    src = tmp_path / "adni_run"
    stdout, table = _chain("adni", adni_root, src)
    res, ck = _check_chain(str(src), "dementia", stdout, n_tasks=2)
    assert "| adni: pmci AUROC |" in "\n".join(table) and "| adni: dementia PR lift |" in "\n".join(table)
    out = tmp_path / "b_oasis1"
    stdout, table = _chain("oasis1", oasis_root, out, f"--external_from={src}", "--external_task=dementia",
                           plots=False)
    assert not [ln for ln in stdout.splitlines() if ln.startswith("[probe/")]   # nothing trained here
    assert "5 stages run, 0 skipped" in stdout   # adapter, preprocess, encode, evaluate, table
    with open(out / "eval" / "dementia" / "random_init" / "metrics.json") as f:
        ext = json.load(f)["results"]["random_init"]
    assert ext["external"] and ext["n_studies"] == len(oasis_expect)
    auc = ext["per_class"]["dementia"]["auroc"]
    assert _row(table, "oasis1 <- adni_run: dementia AUROC (external)").startswith(f"{auc:.3f}")
    # AIBL: the same probe, unchanged (its task is named dementia too: no --external_task needed)
    aibl_root = str(tmp_path / "aibl")
    aibl_expect, _ = bench_fakes.aibl(aibl_root)
    out = tmp_path / "b_aibl"
    stdout, table = _chain("aibl", aibl_root, out, f"--external_from={src}", plots=False)
    assert not [ln for ln in stdout.splitlines() if ln.startswith("[probe/")] and "5 stages run, 0 skipped" in stdout
    with open(out / "eval" / "dementia" / "random_init" / "metrics.json") as f:
        ext = json.load(f)["results"]["random_init"]
    assert ext["external"] and ext["n_studies"] == len(aibl_expect) and ext["per_class"]["dementia"]["n_pos"] == 3
    auc = ext["per_class"]["dementia"]["auroc"]
    assert _row(table, "aibl <- adni_run: dementia AUROC (external)").startswith(f"{auc:.3f}")
