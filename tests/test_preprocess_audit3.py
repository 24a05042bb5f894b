"""preprocess.py orchestration audit: array jobs rerun to add studies, label-file duplicates, output
folder placement. Inputs are small synthetic NIfTI / DICOM studies; expectations come from listing
the input folders and from single-process reference runs, never from preprocess.py itself."""
import csv
import glob
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import preprocess  # noqa: E402
from nvfm import dicom  # noqa: E402
from test_preprocess import _outputs  # noqa: E402  (every output file but the log: name -> bytes)

RUN = dict(n_workers=1, cfg_progress=False, cfg_log_paths=False)


def _nifti_study(root, name, seed):
    """One small CT NIfTI study in folder root/name (air -1000 HU around a soft-tissue block)."""
    rng = np.random.default_rng(seed)
    v = np.full((40, 48, 10), -1000.0, np.float32)
    v[5:35, 5:43, 1:9] = 30 + rng.normal(0, 20, (30, 38, 8))
    os.makedirs(os.path.join(root, name))
    nib.save(nib.Nifti1Image(v, np.diag([0.9, 0.9, 5.0, 1.0])), os.path.join(root, name, "ct.nii.gz"))


def _folder_in_shard(prefix, shard, n, salt):
    """A study folder name whose NIfTI study key falls in array job `shard` of n."""
    return next(f"{prefix}{j}" for j in range(1000)
                if int(dicom.nifti_study_key(f"{prefix}{j}", salt), 16) % n == shard)


@pytest.mark.parametrize("new_in", [0, 1])
def test_array_rerun_adding_studies_to_one_job_merges_them(tmp_path, new_in):
    """A finished 2-job output; studies are added that all belong to job `new_in`; the other job is
    run first. It called the output complete without leaving its done marker, so job `new_in`
    processed the new studies and waited forever for that marker: both exited 0, the new studies
    never reached the manifest. Now the output equals a single-process run of the grown input."""
    salt = preprocess.resolve_salt("")
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    for i in range(4):
        _nifti_study(inp, f"a{i}", i)
    for job in (0, 1):
        preprocess.run(inp, out, shard_spec=f"{job}/2", **RUN)
    first = json.load(open(os.path.join(out, "manifest.json")))
    assert len({v["study_key"] for v in first["volumes"]}) == 4
    for k in range(2):
        _nifti_study(inp, _folder_in_shard(f"new{k}_", new_in, 2, salt), 10 + k)
    other = 1 - new_in
    assert preprocess.run(inp, out, shard_spec=f"{other}/2", **RUN) is None   # waits: job new_in has work
    man = preprocess.run(inp, out, shard_spec=f"{new_in}/2", **RUN)
    assert man is not None
    assert len({v["study_key"] for v in man["volumes"]}) == len(os.listdir(inp)) == 6
    ref = str(tmp_path / "ref")
    preprocess.run(inp, ref, **RUN)
    assert _outputs(out) == _outputs(ref)


def _dicom_studies(root, n):
    """n one-series CT studies (small synthetic DICOM, one folder each) -> their StudyInstanceUIDs."""
    from dicom_synth import head_phantom, write_series
    return [write_series(os.path.join(root, f"st{s}", "ct"), head_phantom((8, 48, 40), s), seed=s)[0]
            for s in range(n)]


def _write_labels(path, rows, fields):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _volume_splits(out):
    with open(os.path.join(out, "manifest.json")) as f:
        vols = json.load(f)["volumes"]
    splits = {}
    for v in vols:
        splits.setdefault(v["study_key"], set()).add(v["split"])
    assert all(len(s) == 1 for s in splits.values())
    return {k: next(iter(s)) for k, s in splits.items()}


def test_rekeyed_files_carry_the_split_the_volumes_are_written_in(tmp_path):
    """train_probe / evaluate read a study's split from SHARDS/labels.csv, train_llava from
    SHARDS/findings.jsonl. Those copies kept the input's split text ('Train', blank, none at all) and
    the findings' own split where --labels gave another, while the volumes went to the cleaned /
    hashed / labels' split: 'Train' rows matched no split == 'train', a hashed study had no split
    there, and a study in train for the probes (labels: Train) was a test study of the report
    generator (findings: test)."""
    uids = _dicom_studies(str(tmp_path / "in"), 5)
    given = ["Train", "TEST ", "", "val", None]   # None: the row has no split cell at all
    rows = [dict(study_uid=u, age=40 + i, **({} if s is None else {"split": s})) for i, (u, s) in
            enumerate(zip(uids, given))]
    _write_labels(tmp_path / "labels.csv", rows, ["study_uid", "split", "age"])
    finds = [dict(study_uid=uids[0], findings=["x"], split="test"),   # another split than the labels'
             dict(study_uid=uids[2], findings=["y"]),                  # none
             dict(study_uid=uids[3], findings=["z"], split="val")]
    with open(tmp_path / "findings.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in finds)
    out = str(tmp_path / "out")
    preprocess.run(str(tmp_path / "in"), out, str(tmp_path / "labels.csv"), str(tmp_path / "findings.jsonl"), **RUN)
    vol = _volume_splits(out)
    salt = preprocess.resolve_salt("")
    key = [dicom.study_key(u, salt) for u in uids]
    assert (vol[key[0]], vol[key[1]], vol[key[3]]) == ("train", "test", "val")   # the labels' splits, by hand
    with open(os.path.join(out, "labels.csv"), newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["study_key"] for r in got] == key
    assert {r["study_key"]: r["split"] for r in got} == vol
    with open(os.path.join(out, "findings.jsonl")) as f:
        recs = [json.loads(x) for x in f]
    assert [r["study_key"] for r in recs] == [key[0], key[2], key[3]]
    assert recs[0]["split"] == vol[key[0]] == "train" and recs[2]["split"] == vol[key[3]] == "val"
    assert "split" not in recs[1]   # a record without a split gets none (the keys copied are the input's)


def test_no_split_column_the_copies_get_the_hashed_and_subject_splits(tmp_path):
    """labels.csv with a subject column and no split: the volumes are split by subject; the copy had
    no split column at all, so train_probe's split protocol found no training study."""
    uids = _dicom_studies(str(tmp_path / "in"), 4)
    rows = [dict(study_uid=u, subject="P1" if i < 2 else "", age=30 + i) for i, u in enumerate(uids)]
    _write_labels(tmp_path / "labels.csv", rows, ["study_uid", "subject", "age"])
    out = str(tmp_path / "out")
    preprocess.run(str(tmp_path / "in"), out, str(tmp_path / "labels.csv"), **RUN)
    vol = _volume_splits(out)
    with open(os.path.join(out, "labels.csv"), newline="") as f:
        got = list(csv.DictReader(f))
    assert {r["study_key"]: r["split"] for r in got} == vol and len(vol) == 4
    assert got[0]["subject"] == got[1]["subject"] != "" and vol[got[0]["study_key"]] == vol[got[1]["study_key"]]


@pytest.mark.parametrize("which", ["labels", "findings"])
def test_a_study_on_two_rows_is_refused_before_anything_is_written(tmp_path, which):
    """A study_uid on two labels rows (train, then test) or findings records: the volumes silently took
    the last row's split, both rows were copied (one contradicting the volumes) and train_probe /
    train_llava refused the re-keyed copy only later. Now one line names the file and both lines."""
    uids = ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    rows = [dict(study_uid=u, split="train") for u in uids] + [dict(study_uid=uids[1], split="test")]
    lab, fin = str(tmp_path / "labels.csv"), str(tmp_path / "findings.jsonl")
    _write_labels(lab, rows if which == "labels" else rows[:3], ["study_uid", "split"])
    with open(fin, "w") as f:
        f.writelines(json.dumps(dict(r, findings=[])) + "\n" for r in (rows if which == "findings" else rows[:3]))
    out = tmp_path / "out"
    out.mkdir()
    where = {"labels": (lab, 3, 5), "findings": (fin, 2, 4)}[which]   # csv: line 1 is the header
    with pytest.raises(SystemExit, match=rf"{where[0]}: lines {where[1]} and {where[2]} have the same study_uid"):
        preprocess.rekey_labels(lab, fin, str(out), "s")
    assert os.listdir(out) == []


def test_output_that_is_the_input_or_would_replace_the_labels_is_refused(tmp_path):
    """--output=--input read its own labels.csv / preprocess.log as 2 failed input files and replaced the
    user's labels.csv (study_uid -> label) with the re-keyed copy; --output=the folder holding --labels
    replaced that file too. Both are refused before anything is written; nothing in the input changes."""
    inp = str(tmp_path / "in")
    uids = _dicom_studies(inp, 1)
    lab = os.path.join(inp, "labels.csv")
    _write_labels(lab, [dict(study_uid=uids[0], split="train")], ["study_uid", "split"])

    def listing():
        return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(inp) for f in fs}
    before = listing()
    with pytest.raises(SystemExit, match=r"--output=.*in is the --input folder"):
        preprocess.run(inp, inp, lab, **RUN)
    with pytest.raises(SystemExit, match=r"--labels: .*labels.csv would be replaced by its re-keyed copy"):
        preprocess.run(os.path.join(inp, "st0"), inp, lab, **RUN)
    assert listing() == before


@pytest.mark.parametrize("line,cells", [("1.2.3,fell, hit head,train,1", 5), ("1.2.3,fell train,1", 3)])
def test_a_labels_row_with_another_number_of_cells_is_refused(tmp_path, line, cells):
    """An unquoted comma in a free-text cell shifted the row: its split became 'hithead' (volumes in
    hithead_0.bin, a split nothing reads) and its stroke label 'train'; a missing comma shifts the other
    way. Now one line names the file, the line and both cell counts, before anything is written."""
    lab = tmp_path / "labels.csv"
    lab.write_text(f"study_uid,notes,split,acute_ischemic_stroke\n1.2.4,ok,val,0\n{line}\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit, match=rf"{lab}:3: {cells} cells, the header has 4 \(an unquoted comma"):
        preprocess.rekey_labels(str(lab), "", str(out), "s")
    assert os.listdir(out) == []


def test_done_markers_left_by_a_killed_merge_do_not_start_an_early_merge(tmp_path, monkeypatch):
    """A 2-job merge killed after removing its parts but before its done markers; studies are then
    added to both jobs. Job 0 found job 1's old marker and merged at once (5 of 6 studies, a ledger
    WARNING) and removed the markers; job 1 then processed its new study and waited for job 0's marker
    forever: both exited 0, one study never reached the manifest. Now job 0 waits for the study it
    lacks and job 1 merges: the output equals a single-process run."""
    salt = preprocess.resolve_salt("")
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    for i in range(4):
        _nifti_study(inp, f"a{i}", i)
    preprocess.run(inp, out, shard_spec="0/2", **RUN)

    def killed(d):  # removes every part but the done markers, then the kill
        for p in glob.glob(os.path.join(d, "parts", "*")):
            if not os.path.basename(p).startswith("done_"):
                os.remove(p)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(preprocess.shards, "remove_parts", killed)
        with pytest.raises(KeyboardInterrupt):
            preprocess.run(inp, out, shard_spec="1/2", **RUN)
    assert sorted(os.listdir(os.path.join(out, "parts"))) == ["done_0_of_2.json", "done_1_of_2.json"]
    for j in (0, 1):
        _nifti_study(inp, _folder_in_shard(f"new{j}_", j, 2, salt), 10 + j)
    assert preprocess.run(inp, out, shard_spec="0/2", **RUN) is None
    man = preprocess.run(inp, out, shard_spec="1/2", **RUN)
    assert man is not None and len({v["study_key"] for v in man["volumes"]}) == len(os.listdir(inp)) == 6
    ref = str(tmp_path / "ref")
    preprocess.run(inp, ref, **RUN)
    assert _outputs(out) == _outputs(ref)


def test_array_jobs_rekeying_at_once_neither_crash_nor_cut_the_copy(tmp_path, monkeypatch):
    """Array jobs that start together each re-key --labels into OUTPUT/labels.csv, through one shared
    labels.csv.tmp: the second truncated the file the first was about to rename and the first's
    rename then failed (FileNotFoundError: a job lost to a traceback; reproduced with two processes on
    200k rows). Here a second re-keying runs while the first writes its header: both finish and
    labels.csv holds every row once."""
    import hashlib
    lab = tmp_path / "labels.csv"
    uids = [f"1.2.3.{i}" for i in range(50)]
    _write_labels(lab, [dict(study_uid=u, split="val") for u in uids], ["study_uid", "split"])
    out = tmp_path / "out"
    out.mkdir()
    real, calls = csv.DictWriter, []

    class Interleaved(real):
        def writeheader(self):
            r = super().writeheader()
            if not calls:
                calls.append(1)
                preprocess.rekey_labels(str(lab), "", str(out), "s")   # the other array job
            return r
    monkeypatch.setattr(csv, "DictWriter", Interleaved)
    preprocess.rekey_labels(str(lab), "", str(out), "s")
    monkeypatch.undo()
    with open(out / "labels.csv", newline="") as f:
        got = list(csv.DictReader(f))
    want = [hashlib.sha256(("s\x00" + u).encode()).hexdigest()[:16] for u in uids]
    assert calls and [r["study_key"] for r in got] == want and {r["split"] for r in got} == {"val"}
    assert os.listdir(out) == ["labels.csv"]
