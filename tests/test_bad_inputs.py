"""Inputs that used to pass unnoticed or kill a run (issue 22, items 9 to 17): each must be
processed, or failed/skipped/warned with a one-line reason naming the file, and accounted
for in the manifest."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pydicom
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from dicom_synth import (head_phantom, mutate_series, scan_folder, set_raw_text, write_enhanced,  # noqa: E402
                         write_series, write_stacks)

import preprocess  # noqa: E402
from nvfm import dicom  # noqa: E402

SHAPE = (8, 48, 40)
RUN = dict(n_workers=1, cfg_progress=False)



def _outcomes(d, fast=True):
    """[(reason or "ok", offending path)] for every candidate volume of the series under d."""
    hs = scan_folder(d, fast)
    out = [(h["error"], h["path"]) for h in hs if "error" in h]
    groups, _ = dicom.group_series([h for h in hs if "error" not in h])
    for g in groups:
        try:
            st = dicom.dicom_stack(d, g).check(3)
            st.assemble()
            out.append(("ok", None))
        except dicom.SeriesError as e:
            out.append((str(e), e.path))
    return out


# ----------------------------------------------------------------------------- item 10


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("tag,delta", [("Columns", -1), ("Rows", -1), ("Columns", 1), ("Rows", -3)])
def test_pixel_geometry_mismatch_fails_the_series(tmp_path, tag, delta, fast):
    d = str(tmp_path / "s")
    write_series(d, head_phantom(SHAPE), shuffle=False)
    mutate_series(d, lambda ds, i: setattr(ds, tag, getattr(ds, tag) + delta))
    got = _outcomes(d, fast)
    assert got and all(r.startswith("pixel data length does not match") for r, _ in got), got


def test_pixel_geometry_mismatch_names_the_offending_file(tmp_path):
    d = str(tmp_path / "s")
    write_series(d, head_phantom(SHAPE), shuffle=False)
    bad = sorted(os.listdir(d))[0]  # an end slice: the rest stays a valid series

    def shear(ds, i):
        if i == 0:
            ds.Columns = ds.Columns - 1
    mutate_series(d, shear)
    got = sorted(_outcomes(d))
    assert ("ok", None) in got
    assert ("pixel data length does not match Rows x Columns x frames x samples x bits", bad) in got, got


def test_pixel_geometry_mismatch_in_preprocess(tmp_path):
    inp = tmp_path / "in"
    write_series(str(inp / "good"), head_phantom(SHAPE))
    write_series(str(inp / "sheared"), head_phantom(SHAPE, 1), shuffle=False)
    mutate_series(str(inp / "sheared"), lambda ds, i: setattr(ds, "Columns", ds.Columns - 1))
    man = preprocess.run(str(inp), str(tmp_path / "out"), **RUN)
    assert man["summary"]["volumes"] == 1
    assert any(r.startswith("pixel data length does not match") for r in man["summary"]["series_failed"])


# ----------------------------------------------------------------------------- item 17


def test_identifier_columns_never_reach_the_shards(tmp_path, capsys):
    inp = tmp_path / "in"
    st, _, _ = write_series(str(inp / "a"), head_phantom(SHAPE))
    phi = {"MRN": "MRN-99887766", "AccessionNumber": "ACC-31415926", "PatientName": "Quuxley^Bartholomew",
           "notes": "seen by Dr Plumtree on 2024-03-05"}
    row = {"study_uid": st, "study": "demo-0001", "modality": "CT", "split": "train", "age": "57",
           "acute_subdural_hematoma": "1", "my_score": "0", **phi}
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(row))
        w.writeheader()
        w.writerow(row)
    with open(tmp_path / "findings.jsonl", "w") as f:
        f.write(json.dumps({"study_uid": st, "study": "demo-0001", "findings": ["Normal."], "triage": "unremarkable",
                            "patient_name": phi["PatientName"], "report_date": "20240305",
                            "radiologist": "Plumtree"}) + "\n")
    out = tmp_path / "out"
    preprocess.run(str(inp), str(out), str(tmp_path / "labels.csv"), str(tmp_path / "findings.jsonl"),
                   cfg_label_columns="my_score", **RUN)
    err = capsys.readouterr().err
    assert "dropped 4 column(s)" in err and "dropped 3 key(s)" in err
    with open(out / "labels.csv") as f:
        cols = next(csv.reader(f))
    assert cols == ["study_key", "study", "modality", "split", "age", "acute_subdural_hematoma", "my_score"]
    with open(out / "findings.jsonl") as f:
        assert set(json.loads(f.readline())) == {"study_key", "study", "findings", "triage"}
    for p in out.rglob("*"):
        if p.is_file():
            blob = p.read_bytes()
            for v in list(phi.values()) + ["Plumtree", "20240305", "Quuxley"]:
                assert v.encode() not in blob, (v, p.name)


def test_labels_file_named_after_a_patient_stays_out_of_the_output(tmp_path, capsys):
    # the dropped-columns warning named the labels/findings file in OUTPUT/preprocess.log
    inp = tmp_path / "in"
    st, _, _ = write_series(str(inp / "a"), head_phantom(SHAPE))
    lab, fnd = tmp_path / "Quuxley_Bartholomew_labels.csv", tmp_path / "Quuxley_Bartholomew_findings.jsonl"
    lab.write_text(f"study_uid,mrn\n{st},7\n")
    fnd.write_text(json.dumps({"study_uid": st, "radiologist": "x"}) + "\n")
    out = tmp_path / "out"
    preprocess.run(str(inp), str(out), str(lab), str(fnd), cfg_log_paths=False, **RUN)
    assert (out / "preprocess.log").is_file()
    for p in out.rglob("*"):
        if p.is_file():
            assert b"Quuxley" not in p.read_bytes(), p.name
    err = capsys.readouterr().err
    assert "--labels: dropped 1 column(s)" in err and "--findings: dropped 1 key(s)" in err
    assert "Quuxley" not in err  # log_paths=False: hashed keys only on the console too
    preprocess.run(str(inp), str(tmp_path / "out2"), str(lab), cfg_log_paths=True, **RUN)
    assert "Quuxley_Bartholomew_labels.csv" in capsys.readouterr().err  # the operator still sees which file


# ----------------------------------------------------------------------------- item 15


def test_symlinked_study_folder_is_followed_once(tmp_path):
    inp, elsewhere = tmp_path / "in", tmp_path / "elsewhere"
    write_series(str(inp / "a"), head_phantom(SHAPE))
    write_series(str(elsewhere / "b" / "ct"), head_phantom(SHAPE, 1))
    os.symlink(elsewhere / "b", inp / "b")             # a linked study folder
    os.symlink(inp, inp / "b" / "loop")                # a loop back to the root (inside the link)
    os.symlink(elsewhere / "b", inp / "c")             # a second link to the same folder
    files, bad = dicom.walk_inputs(str(inp))
    assert len(files) == 16 and not bad
    man = preprocess.run(str(inp), str(tmp_path / "out"), **RUN)
    assert man["summary"]["volumes"] == 2 and man["summary"]["studies_input"] == 2
    # each file once in the ledger, though reached by three paths
    assert man["summary"]["files_input"] == man["summary"]["files"]["in_volumes"] == 2 * SHAPE[0]


def test_unreadable_directory_is_counted(tmp_path, monkeypatch, capsys):
    inp = tmp_path / "in"
    write_series(str(inp / "a"), head_phantom(SHAPE))
    os.makedirs(inp / "locked" / "x")
    real = os.scandir

    def scandir(p="."):
        if os.fspath(p).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(p))
        return real(p)
    monkeypatch.setattr(os, "scandir", scandir)
    man = preprocess.run(str(inp), str(tmp_path / "out"), **RUN)
    assert man["summary"]["files_failed"] == {"unreadable directory": 1}
    f = man["summary"]["files"]  # a directory is no file: the ledger holds the series' files only
    assert man["summary"]["files_input"] == f["in_volumes"] == SHAPE[0]
    assert f["failed_before_grouping"] == f["unaccounted"] == 0
    assert "failed directory: unreadable directory (permissions?) locked" in capsys.readouterr().err


def _cli(*args, timeout=120):
    env = dict(os.environ, NVFM_QUIET="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "preprocess.py"), "--progress=False", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_empty_input_exits_nonzero(tmp_path):
    os.makedirs(tmp_path / "in" / "sub")
    res = _cli(f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}")
    assert res.returncode != 0 and "no files under --input" in res.stderr


def test_nothing_written_exits_nonzero(tmp_path):
    os.makedirs(tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("not DICOM\n")
    res = _cli(f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}")
    assert res.returncode != 0 and "no volume was written" in res.stderr
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["summary"]["files_failed"] == {"not a DICOM file": 1}  # still accounted for


def test_labels_matching_no_study_exit_nonzero(tmp_path):
    write_series(str(tmp_path / "in" / "a"), head_phantom(SHAPE))
    with open(tmp_path / "labels.csv", "w") as f:
        f.write("study_uid,split\n1.2.3.4,train\n")
    with pytest.raises(SystemExit, match="none of the 1 studies in --labels"):
        preprocess.run(str(tmp_path / "in"), str(tmp_path / "out"), str(tmp_path / "labels.csv"), **RUN)


def test_demo_cohort_root_is_refused_with_the_right_folder(tmp_path):
    write_series(str(tmp_path / "cohort" / "dicom" / "a"), head_phantom(SHAPE))
    os.makedirs(tmp_path / "cohort" / "gt" / "a")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "cohort/gt/a/s.nii.gz"))
    (tmp_path / "cohort" / "labels.csv").write_text("study_uid\n")
    with pytest.raises(SystemExit, match=f"use --input={tmp_path / 'cohort' / 'dicom'}"):
        preprocess.run(str(tmp_path / "cohort"), str(tmp_path / "out"), **RUN)


# ----------------------------------------------------------------------------- item 16

KILLER = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import preprocess
from nvfm import data
point, calls = sys.argv[4], []

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

def nth(fn, n):  # SIGKILL on the n-th call made during the merge
    def f(*a, **k):
        if merging:
            calls.append(1)
            if len(calls) == n:
                die()
        return fn(*a, **k)
    return f

merging = False
real_merge = data.merge
def merge(*a, **k):
    global merging
    merging = True
    return real_merge(*a, **k)
data.merge = merge
if point == "before":
    data.merge = die
elif point == "shards":
    os.replace = nth(os.replace, 2)
elif point == "manifest":
    data.remove_parts = die
elif point == "cleanup":
    os.remove = nth(os.remove, 2)
preprocess.run(sys.argv[2], sys.argv[3], n_workers=1, cfg_progress=False)
"""


def _outputs(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "preprocess.log"}


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    for s in range(3):
        write_series(str(root / "in" / f"s{s}"), head_phantom(SHAPE, s), seed=s)
    preprocess.run(str(root / "in"), str(root / "ref"), **RUN)
    return root


@pytest.mark.parametrize("point", ["before", "shards", "manifest", "cleanup"])
def test_kill_during_merge_then_rerun_completes(small_cohort, tmp_path, point):
    out = tmp_path / "out"
    env = dict(os.environ, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-c", KILLER, ROOT, str(small_cohort / "in"), str(out), point], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert (out / "merge.lock").exists()
    res = _cli(f"--input={small_cohort / 'in'}", f"--output={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "removing a stale merge.lock" in res.stderr
    assert _outputs(out) == _outputs(small_cohort / "ref") and not (out / "merge.lock").exists()
    assert not (out / "parts").exists()


def test_live_merge_lock_is_respected_and_old_locks_are_stale(tmp_path):
    lock = tmp_path / "merge.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": 0}))
    assert preprocess.lock_stale(str(lock))[0] is False  # this process is alive
    assert preprocess.acquire_merge_lock(str(tmp_path), lambda *a, **k: None) is None
    os.utime(lock, (time.time() - 1000, time.time() - 1000))
    assert preprocess.lock_stale(str(lock))[0] is True  # not refreshed: its owner died on some host
    lock.write_text("")
    assert preprocess.lock_stale(str(lock))[0] is True  # an empty lock from an older version
    held = preprocess.acquire_merge_lock(str(tmp_path), lambda *a, **k: None)
    assert held is not None and json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()


def test_ctrl_c_stops_cleanly_once_and_resumes(tmp_path):
    inp = tmp_path / "in"
    for s in range(6):
        write_series(str(inp / f"s{s}"), head_phantom((24, 128, 112), s), seed=s, ps=(0.5, 0.5), step=(0, 0, 2.0))
    out = tmp_path / "out"
    env = dict(os.environ, NVFM_QUIET="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "preprocess.py"), f"--input={inp}",
                             f"--output={out}", "--progress=False", "--workers=2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # as in a terminal: a harness started in the background (nohup cmd &) passes
                            # SIGINT down ignored, and Python then never raises KeyboardInterrupt
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    t0 = time.time()
    while time.time() - t0 < 120 and proc.poll() is None:
        if any(p.stat().st_size for p in out.glob("parts/*.jsonl")):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "finished before the interrupt"
    os.killpg(proc.pid, signal.SIGINT)  # what one Ctrl-C in a terminal does: the whole process group
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("one Ctrl-C did not stop the run")
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err[-2000:]
    res = _cli(f"--input={inp}", f"--output={out}", "--workers=2")
    assert res.returncode == 0 and "already done" in res.stderr, res.stderr[-2000:]
    ref = tmp_path / "ref"
    preprocess.run(str(inp), str(ref), **RUN)
    assert _outputs(out) == _outputs(ref)


# ----------------------------------------------------------------------------- item 9


def test_non_utf8_file_and_folder_names(tmp_path):
    inp = tmp_path / "in"
    folder = os.path.join(str(inp), os.fsdecode(b"\xe9tude_M\xfcller"))  # latin-1 bytes, not UTF-8
    try:
        os.makedirs(folder)
    except (UnicodeEncodeError, OSError):
        pytest.skip("file system refuses non-UTF-8 names")
    write_series(folder, head_phantom(SHAPE), names=[os.fsdecode(b"IM\xff%d.dcm" % i) for i in range(SHAPE[0])])
    nd = os.path.join(str(inp), os.fsdecode(b"nii_\xe9"))
    os.makedirs(nd)
    nib.save(nib.Nifti1Image(np.clip(head_phantom(SHAPE) + 1000, 0, None).transpose(2, 1, 0).astype(np.float32),
                             np.diag([0.8, 0.9, 5.0, 1.0])), os.path.join(nd, os.fsdecode(b"t1_\xfc.nii.gz")))
    with open(os.path.join(folder, os.fsdecode(b"junk_\xe9.txt")), "w") as f:
        f.write("not DICOM\n")
    out = tmp_path / "out"
    res = _cli(f"--input={inp}", f"--output={out}", "--log_paths=True")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "failed file: not a DICOM file \\xe9tude_M\\xfcller/junk_\\xe9.txt" in res.stderr
    man = json.loads((out / "manifest.json").read_text())
    assert man["summary"]["volumes"] == 2 and man["summary"]["files_failed"] == {"not a DICOM file": 1}


# ----------------------------------------------------------------------------- item 13


@pytest.mark.parametrize("fast", [True, False])
def test_truncated_header_is_reported_as_truncated(tmp_path, fast):
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, head_phantom((3, 48, 40)), shuffle=False)
    with open(paths[0], "rb") as f:
        blob = f.read()
    ds = pydicom.dcmread(paths[0])
    pix = blob.index(b"\xe0\x7f\x10\x00")
    cuts = [140, 300, 500, 700, 900, pix - 5]
    for n in cuts:
        with open(os.path.join(d, f"cut{n}.dcm"), "wb") as f:
            f.write(blob[:n])
    old, dicom.FAST_SCAN = dicom.FAST_SCAN, fast
    try:
        for n in cuts:
            h = dicom.scan_dicom(d, f"cut{n}.dcm")
            assert h.get("error") == "truncated file (header cut short)", (n, h.get("error"))
    finally:
        dicom.FAST_SCAN = old
    assert ds.StudyInstanceUID  # the uncut file is fine


def test_truncated_rle_frame_is_reported_as_truncated(tmp_path):
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, head_phantom((4, 48, 40)), shuffle=False, compress=True)
    with open(paths[1], "r+b") as f:
        f.truncate(os.path.getsize(paths[1]) - 300)
    got = _outcomes(d)
    assert got == [("truncated file (pixel data cut short)", os.path.basename(paths[1]))], got


# ----------------------------------------------------------------------------- item 12


def test_log_names_the_offending_file_and_skipped_series(tmp_path, capsys):
    inp = tmp_path / "in"
    write_series(str(inp / "good"), head_phantom(SHAPE))
    _, _, p = write_series(str(inp / "conflict"), head_phantom(SHAPE, 1), shuffle=False)
    ipp = list(pydicom.dcmread(p[2]).ImagePositionPatient)
    mutate_series(str(inp / "conflict"), lambda ds, i: setattr(ds, "ImagePositionPatient", ipp) if i == 3 else None)
    _, _, p = write_series(str(inp / "gap"), head_phantom(SHAPE, 2), shuffle=False)
    for q in p[3:6]:
        os.remove(q)
    write_series(str(inp / "loc"), head_phantom(SHAPE, 3)[:3], desc="SCOUT")
    preprocess.run(str(inp), str(tmp_path / "out"), cfg_log_paths=True, **RUN)
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if "conflicting slices" in x][0]
    assert line.endswith(("conflict/IM0002.dcm", "conflict/IM0003.dcm")), line
    line = [x for x in err.splitlines() if "missing slices" in x][0]
    assert line.endswith("gap/IM0006.dcm"), line
    line = [x for x in err.splitlines() if "localizer/scout" in x][0]
    assert line.endswith(".dcm") and " loc/IM" in line, line


# ----------------------------------------------------------------------------- item 11


def test_silent_repairs_become_warnings_and_tiny_volumes_fail(tmp_path, capsys):
    inp = tmp_path / "in"
    big = (16, 80, 80)
    _, _, p = write_series(str(inp / "gap"), head_phantom(big), shuffle=False, step=(0, 0, 3.0), ps=(1.0, 1.0))
    os.remove(p[7])  # one slice missing from a 3 mm series: a 6 mm gap, interpolated
    _, _, p = write_series(str(inp / "mixed"), head_phantom(big, 1), shuffle=False, step=(0, 0, 3.0), ps=(1.0, 1.0))
    mutate_series(str(inp / "mixed"), lambda ds, i: setattr(ds, "PixelSpacing", [0.5, 0.5]) if i % 4 == 3 else None)
    write_series(str(inp / "tiny"), head_phantom((8, 16, 16), 2))
    nd = inp / "nii"
    os.makedirs(nd)
    v = np.clip(head_phantom(SHAPE, 3) + 1000, 0, None).transpose(2, 1, 0).astype(np.float32)
    v[5, 5, 2] = np.nan
    nib.save(nib.Nifti1Image(v, np.diag([0.8, 0.9, 5.0, 1.0])), str(nd / "t1.nii.gz"))
    man = preprocess.run(str(inp), str(tmp_path / "out"), **RUN)
    err = capsys.readouterr().err
    s = man["summary"]
    assert s["series_failed"] == {"too few foreground tokens (0 < min_tokens 1)": 1}, s["series_failed"]
    w = " | ".join(s["volume_warnings"])
    for phrase in ("interpolated across a 6.0 mm gap (median 3.0 mm)", "series split into 2 volumes by pixel spacing",
                   "1 non-finite NIfTI voxel(s) set to the volume's minimum (0)"):
        assert phrase in w and phrase in err, (phrase, w)
    assert all(v["n_tokens"] >= 1 for v in man["volumes"])
    assert sum(len(v["warnings"]) > 0 for v in man["volumes"]) == 4, (s, [v["warnings"] for v in man["volumes"]])


# ----------------------------------------------------------------------------- item 14


def test_siemens_mosaic_fails_with_its_reason(tmp_path):
    import gzip
    import shutil
    src = os.path.join(os.path.dirname(nib.__file__), "nicom", "tests", "data")
    if not os.path.exists(os.path.join(src, "siemens_dwi_1000.dcm.gz")):
        pytest.skip("nibabel's test DICOMs are not installed")
    d = tmp_path / "in" / "mosaic"
    os.makedirs(d)
    with gzip.open(os.path.join(src, "siemens_dwi_1000.dcm.gz")) as f, open(d / "dwi1000.dcm", "wb") as g:
        shutil.copyfileobj(f, g)
    got = _outcomes(str(d))
    assert got == [("Siemens mosaic not supported (convert the series with dcm2niix)", "dwi1000.dcm")], got
    with pytest.raises(SystemExit, match="no volume was written"):
        preprocess.run(str(tmp_path / "in"), str(tmp_path / "out"), **RUN)
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["summary"]["series_failed"] == {"Siemens mosaic not supported (convert the series with dcm2niix)": 1}


# ----------------------------------------------------------------------------- header values that load silently wrong


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("tag,text", [("RescaleIntercept", "-1024,0"), ("RescaleIntercept", "NaN"),
                                      ("RescaleSlope", "1,5"), ("RescaleSlope", "inf")])
def test_unparsable_rescale_fails_the_series(tmp_path, tag, text, fast):
    """A RescaleSlope/Intercept that is present but not a finite number (a decimal comma, NaN)
    used to read as absent (slope 1, intercept 0): a CT then came out 1024 HU too bright with
    no word. pydicom cannot apply such a rescale either; the series fails naming the file."""
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, head_phantom((4, 16, 16)), shuffle=False)
    set_raw_text(paths[1], tag, text)
    assert _outcomes(d, fast) == [(f"invalid {tag} (not a finite number)", os.path.basename(paths[1]))]


def test_palette_colour_series_is_skipped(tmp_path):
    """PALETTE COLOR images have one sample per pixel (an index into the palette, not an
    intensity), so the "colour image" rule (SamplesPerPixel != 1) missed them and the indices
    were read as the image; they are skipped as colour images."""
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, np.clip(head_phantom((4, 16, 16)), 0, None), modality="MR", intercept=0.0,
                               photometric="PALETTE COLOR", shuffle=False)
    hs = [dicom.scan_dicom(d, f) for f in dicom.find_inputs(d)]
    groups, skipped = dicom.group_series(hs)
    assert groups == [] and skipped == [(hs[0]["series_uid"], 4, "colour image", os.path.basename(paths[0]))]


def test_mixed_monochrome1_and_2_mr_fails_the_series(tmp_path):
    """MONOCHROME1 MR is inverted once for the whole volume (nvfm/volume.py), from the series'
    first file: an MR series whose files mix MONOCHROME1 and MONOCHROME2 came out with every
    other slice inverted. It fails naming a file; a CT one loads as before (HU come from the
    rescale alone)."""
    vol = np.clip(head_phantom((4, 16, 16)) + 1000, 0, None)

    def invert_odd(ds, i):
        if i % 2:
            ds.PhotometricInterpretation = "MONOCHROME1"
    d = str(tmp_path / "mr")
    _, _, paths = write_series(d, vol, modality="MR", intercept=0.0, shuffle=False)
    mutate_series(d, invert_odd)
    assert _outcomes(d) == [("mixed MONOCHROME1 and MONOCHROME2 slices", os.path.basename(paths[1]))]
    d = str(tmp_path / "ct")
    write_series(d, vol - 1000, shuffle=False)
    mutate_series(d, invert_odd)
    assert _outcomes(d) == [("ok", None)]


def test_complex_nifti_fails(tmp_path):
    """A complex-valued NIfTI was cast to float32, keeping the real part (not the magnitude)
    with only numpy's ComplexWarning; it fails with its reason."""
    v = np.clip(head_phantom(SHAPE), 0, None).transpose(2, 1, 0)
    nib.save(nib.Nifti1Image((v * np.exp(1j * 2.0)).astype(np.complex64), np.diag([0.8, 0.9, 5.0, 1.0])),
             str(tmp_path / "c.nii.gz"))
    with pytest.raises(dicom.SeriesError, match=r"^complex-valued NIfTI \(need magnitude images\)$"):
        dicom.nifti_stack(str(tmp_path), "c.nii.gz")


def test_nifti_without_qform_or_sform_is_warned(tmp_path):
    """A NIfTI with qform_code = sform_code = 0 has no orientation (an ANALYZE-style header):
    nibabel assumes voxel axes L, A, S, SimpleITK L, P, S (an A/P flip apart). It loads as
    before, with nibabel's affine, and says so."""
    v = np.clip(head_phantom(SHAPE), 0, None).transpose(2, 1, 0).astype(np.float32)
    img = nib.Nifti1Image(v, np.diag([0.8, 0.9, 5.0, 1.0]))
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, str(tmp_path / "bare.nii"))
    A = nib.load(str(tmp_path / "bare.nii")).affine  # nibabel's default (from the voxel sizes)
    nib.save(nib.Nifti1Image(v, A), str(tmp_path / "same.nii"))  # the same affine, as an sform
    same, bare = dicom.nifti_stack(str(tmp_path), "same.nii"), dicom.nifti_stack(str(tmp_path), "bare.nii")
    assert same.warnings == []
    assert bare.warnings == ["NIfTI has no qform/sform: orientation unknown (nibabel's default axes L, A, S assumed)"]
    assert np.array_equal(bare.assemble(), same.assemble())  # loaded as before
    assert np.allclose(bare.native_affine(), same.native_affine())


@pytest.mark.parametrize("fast", [True, False])
def test_missing_pixel_representation_fails_the_series(tmp_path, fast):
    """Without PixelRepresentation the direct pixel read took 16-bit pixels as unsigned: a
    signed CT's air (-1000 HU) came out as +64536 (pydicom refuses such a file). The series
    fails naming the file."""
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, head_phantom((4, 16, 16)), intercept=0.0, shuffle=False)
    mutate_series(d, lambda ds, i: delattr(ds, "PixelRepresentation") if i == 2 else None)
    assert _outcomes(d, fast) == [("missing PixelRepresentation (signed or unsigned pixels unknown)",
                                   os.path.basename(paths[2]))]


def test_enhanced_frame_count_mismatch_fails_the_series(tmp_path):
    """An enhanced file whose per-frame functional groups describe fewer frames than
    NumberOfFrames: its compressed pixel data decodes to NumberOfFrames frames and the extra
    frame was dropped without a word (a lost slice). The series fails naming the file."""
    p = str(tmp_path / "e" / "mf.dcm")
    write_enhanced(p, np.clip(head_phantom((6, 16, 16)) + 1000, 0, None), ps=(1.0, 1.0))
    ds = pydicom.dcmread(p)
    ds.compress(pydicom.uid.RLELossless)
    del ds.PerFrameFunctionalGroupsSequence[-1]
    ds.save_as(p)
    assert _outcomes(str(tmp_path / "e")) == [
        ("frame count differs: NumberOfFrames 6, per-frame functional groups 5", "mf.dcm")]


def test_nifti_qform_sform_disagreement_is_warned(tmp_path):
    """With both codes set, nibabel (and so nifti_stack) takes the sform; SimpleITK, the
    neurovfm authors' reader, takes the qform when the qform is scanner-based and the sform
    aligned/template (here they are 90 degrees apart). It loads as before, with the sform,
    and says so; a file whose two transforms agree says nothing."""
    v = np.clip(head_phantom(SHAPE), 0, None).transpose(2, 1, 0).astype(np.float32)
    q = np.diag([0.8, 0.9, 5.0, 1.0])
    s = np.array([[0, 0.9, 0, 5.0], [0.8, 0, 0, 6.0], [0, 0, 5.0, 7.0], [0, 0, 0, 1]])
    for name, qform, sform in (("agree", q, q), ("differ", q, s)):
        img = nib.Nifti1Image(v, None)
        img.set_qform(qform, code=1)
        img.set_sform(sform, code=1 if name == "agree" else 2)
        nib.save(img, str(tmp_path / f"{name}.nii"))
    nib.save(nib.Nifti1Image(v, s), str(tmp_path / "sform.nii"))  # the sform alone
    agree, differ, ref = (dicom.nifti_stack(str(tmp_path), f"{n}.nii") for n in ("agree", "differ", "sform"))
    assert agree.warnings == [] and ref.warnings == []
    assert differ.warnings == ["NIfTI qform and sform disagree (sform used)"]
    assert np.array_equal(differ.assemble(), ref.assemble())  # loaded as before
    assert np.allclose(differ.native_affine(), ref.native_affine())


# ----------------------------------------------------------------------------- interleaved stacks


def _two_stacks(d, extra_a=None, extra_b=None, offset=0.5):
    """One series holding two 8-slice stacks 5 mm apart, the second `offset` mm above the
    first (z = -50, -45, ..., -15 and -49.5, ..., -14.5): two reconstructions exported as one.
    Returns (vol_a, vol_b) in HU as stored (integers)."""
    va, vb = head_phantom(SHAPE, 0), head_phantom(SHAPE, 1) + 50.0
    write_stacks(d, [(va, (-100.0, -110.0, -50.0), (0, 0, 5.0), extra_a),
                     (vb, (-100.0, -110.0, -50.0 + offset), (0, 0, 5.0), extra_b)], shuffle=False)
    return np.rint(va + 1024) - 1024, np.rint(vb + 1024) - 1024


def test_interleaved_stacks_without_a_distinguishing_tag_fail(tmp_path):
    """Nothing in the headers tells the two stacks apart: merged, the sorted gaps alternate
    0.5 / 4.5 mm and the volume was resampled as one (two acquisitions interleaved, loaded
    'ok' with only 'interpolated across a 4.5 mm gap (median 0.5 mm): slice(s) missing').
    The series fails, naming the first slice of the second stack."""
    _two_stacks(str(tmp_path / "s"))
    assert _outcomes(str(tmp_path / "s")) == [
        ("two interleaved slice stacks (gaps alternate 0.5 / 4.5 mm)", "S1_IM0000.dcm")]


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("tag,a,b,offset", [("ConvolutionKernel", "STANDARD", "BONE", 0.5),
                                            ("ConvolutionKernel", "STANDARD", "BONE", 2.5),
                                            ("ConvolutionKernel", "STANDARD", "BONE", 0.0),
                                            ("SliceThickness", 5.0, 1.25, 0.5), ("AcquisitionNumber", 1, 2, 0.5)])
def test_interleaved_stacks_split_by_the_tag_that_tells_them_apart(tmp_path, tag, a, b, offset, fast):
    """Two stacks of one series that differ in kernel, slice thickness or acquisition number
    load as two volumes, each exactly the stack written (5 mm apart, its own origin). Merged,
    offset 2.5 mm looked like one even 2.5 mm volume, and offset 0 failed as conflicting slices."""
    d = str(tmp_path / "s")
    va, vb = _two_stacks(d, {tag: a}, {tag: b}, offset)
    hs = scan_folder(d, fast)
    groups, _ = dicom.group_series(hs)
    assert [(g["part"], g["n_parts"], len(g["frames"])) for g in groups] == [(0, 2, 8), (1, 2, 8)]
    stacks = [dicom.dicom_stack(d, g).check(3) for g in groups]
    stacks.sort(key=lambda st: (st.o0[2], st.assemble().mean()))  # stack b is 50 HU brighter
    for st, v, z0 in zip(stacks, (va, vb), (-50.0, -50.0 + offset)):
        assert np.allclose(st.d, 5.0 * np.arange(8)) and st.uniform and abs(st.o0[2] - z0) < 1e-6
        assert np.array_equal(st.assemble(), v)
        assert st.warnings == [f"series split into 2 volumes by {tag} (interleaved slice stacks)"]


def test_series_whose_tags_vary_without_interleaving_load_as_one_volume(tmp_path):
    """What stays one volume, as before: AcquisitionNumber per slice or alternating on evenly
    spaced slices (scanners number slices, rotations or concatenations), a thin posterior-fossa
    block below a thick one (SliceThickness and kernel differ, positions do not interleave), and
    gaps that alternate only by the rounding of positions (2.5 / 2.6 mm)."""
    cases = {}
    d = str(tmp_path / "per_slice")
    write_series(d, head_phantom(SHAPE), shuffle=False)
    mutate_series(d, lambda ds, i: setattr(ds, "AcquisitionNumber", i + 1))
    cases["per_slice"] = 5.0 * np.arange(8)
    d = str(tmp_path / "alternating_acq")
    write_series(d, head_phantom(SHAPE), shuffle=False)
    mutate_series(d, lambda ds, i: setattr(ds, "AcquisitionNumber", 1 + i % 2))
    cases["alternating_acq"] = 5.0 * np.arange(8)
    d = str(tmp_path / "blocks")
    write_stacks(d, [(head_phantom((6, 48, 40)), (-100.0, -110.0, -50.0), (0, 0, 2.5),
                      {"SliceThickness": 2.5, "ConvolutionKernel": "H31s"}),
                     (head_phantom((6, 48, 40), 1), (-100.0, -110.0, -35.0), (0, 0, 5.0),
                      {"SliceThickness": 5.0, "ConvolutionKernel": "H41s"})], shuffle=False)
    cases["blocks"] = np.r_[2.5 * np.arange(6), 15.0 + 5.0 * np.arange(6)]
    d = str(tmp_path / "rounded")
    z = [0.0, 2.5, 5.1, 7.6, 10.2, 12.7, 15.3, 17.8]  # 2.55 mm written to 0.1 mm: gaps 2.5, 2.6, 2.5, ...
    write_series(d, head_phantom(SHAPE), shuffle=False, step=(0, 0, 2.55))
    mutate_series(d, lambda ds, i: setattr(ds, "ImagePositionPatient", [-100.0, -110.0, -50.0 + z[i]]))
    cases["rounded"] = np.array(z)
    for name, pos in cases.items():
        d = str(tmp_path / name)
        assert _outcomes(d) == [("ok", None)], name
        hs = [dicom.scan_dicom(d, f) for f in dicom.find_inputs(d)]
        (g,), _ = dicom.group_series(hs)
        st = dicom.dicom_stack(d, g).check(3)
        assert np.allclose(st.d, pos), (name, st.d)
        # (the thick block's 5 mm gaps are over 1.5 x the median 2.5 mm: warned as before)
        want = ["interpolated across a 5.0 mm gap (median 2.5 mm): slice(s) missing"] if name == "blocks" else []
        assert st.warnings == want, (name, st.warnings)


def test_series_cut_apart_by_pixel_spacing_loads_as_before(tmp_path):
    """Every third slice of a 3 mm series at another pixel spacing: the main part's gaps
    alternate 3 / 6 mm because the other part's slices are missing from it, not because it holds
    two stacks; both parts load with their warnings, as before."""
    d = str(tmp_path / "s")
    write_series(d, head_phantom((18, 48, 40)), shuffle=False, step=(0, 0, 3.0), ps=(1.0, 1.0))
    mutate_series(d, lambda ds, i: setattr(ds, "PixelSpacing", [0.5, 0.5]) if i % 3 == 2 else None)
    assert _outcomes(d) == [("ok", None), ("ok", None)]
    hs = [dicom.scan_dicom(d, f) for f in dicom.find_inputs(d)]
    main, other = (dicom.dicom_stack(d, g).check(3) for g in dicom.group_series(hs)[0])
    assert np.allclose(main.d, [k * 3.0 for k in range(18) if k % 3 != 2])
    assert np.allclose(other.d, 9.0 * np.arange(6))
    split = "series split into 2 volumes by pixel spacing / matrix size"
    assert main.warnings == [split, "interpolated across a 6.0 mm gap (median 3.0 mm): slice(s) missing"]
    assert other.warnings == [split]


def test_nifti_modality_sidecar_and_ambiguous_data(tmp_path):
    """A NIfTI header has no modality: a BIDS / dcm2niix sidecar's "Modality" decides it; without
    one, air in HU means CT. Data that look like skull-stripped CT in HU (no air, integer values
    around brain HU) are read as MR with a warning; MR-like data get none. A sidecar naming
    another modality, or one that cannot be read, fails the file with its reason."""
    rng = np.random.default_rng(3)
    head = head_phantom(SHAPE) > -500
    brain = np.where(head, np.round(32 + 4 * rng.standard_normal(SHAPE)), 0).astype(np.int16)  # HU, air zeroed
    mr = np.where(head, 300 + 40 * rng.standard_normal(SHAPE), 0).astype(np.float32)  # scanner units
    aff = np.diag([0.9, 0.9, 5.0, 1.0])
    for name, v in (("ct_air", head_phantom(SHAPE)), ("stripped", brain), ("mr", mr),
                    ("mr_int", np.round(mr).astype(np.int16)), ("pet", brain), ("broken", brain)):
        nib.save(nib.Nifti1Image(v.transpose(2, 1, 0), aff), str(tmp_path / f"{name}.nii.gz"))
    read = lambda n: dicom.nifti_stack(str(tmp_path), f"{n}.nii.gz")  # noqa: E731
    ambiguous = lambda st: [w for w in st.warnings if "skull-stripped" in w]  # noqa: E731
    assert read("ct_air").modality == "CT" and not ambiguous(read("ct_air"))
    for n in ("mr", "mr_int"):
        assert read(n).modality == "MR" and not ambiguous(read(n)), n
    st = read("stripped")
    assert st.modality == "MR" and len(ambiguous(st)) == 1
    json.dump({"Modality": "CT", "ConvolutionKernel": "H30s"}, open(tmp_path / "stripped.json", "w"))
    st = read("stripped")
    assert st.modality == "CT" and not ambiguous(st)
    json.dump({"Modality": "MR"}, open(tmp_path / "ct_air.json", "w"))
    assert read("ct_air").modality == "MR"  # the sidecar copies the DICOM tag: it wins over the data
    json.dump({"Modality": "PT"}, open(tmp_path / "pet.json", "w"))
    with pytest.raises(dicom.SeriesError, match=r"^unsupported modality PT \(from its sidecar\)$"):
        read("pet")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(dicom.SeriesError, match=r"^unreadable NIfTI sidecar \(JSONDecodeError\)$"):
        read("broken")  # the reason reaches the manifest's counts: no file name (it may name a patient)


def test_non_finite_nifti_voxels_take_the_background_value(tmp_path):
    """NaN / inf voxels of a NIfTI take the volume's minimum, its background: in a CT that is air,
    where 0 would be soft tissue (foreground islands in the air around the head)."""
    v = head_phantom(SHAPE).astype(np.float32)  # HU, air at the minimum
    for k, i, j in [(0, 0, 0), (1, 2, 3), (SHAPE[0] - 1, 5, 7)]:
        v[k, i, j] = np.nan if k else np.inf
    nib.save(nib.Nifti1Image(v.transpose(2, 1, 0), np.diag([0.9, 0.9, 5.0, 1.0])), str(tmp_path / "ct.nii.gz"))
    st = dicom.nifti_stack(str(tmp_path), "ct.nii.gz")
    assert st.modality == "CT"
    lo = float(np.nanmin(np.where(np.isfinite(v), v, np.nan)))
    assert lo < -900
    got = np.stack([st.loader(k) for k in range(SHAPE[0])])  # the 5 mm axis first: (k, j, i) of v
    np.testing.assert_array_equal(got, np.where(np.isfinite(v), v, lo).transpose(0, 2, 1))
    assert any(f"3 non-finite NIfTI voxel(s) set to the volume's minimum ({lo:g})" == w for w in st.warnings), st.warnings


# ----------------------------------------------------------------------------- inputs that vanished or loaded wrong


@pytest.mark.parametrize("keep_count", [True, False])
def test_enhanced_file_without_frames_fails_not_vanishes(tmp_path, keep_count):
    """An enhanced file whose PerFrameFunctionalGroupsSequence is present but empty had no frame
    records: it joined no series and was neither failed nor skipped (gone from the manifest's
    counts). It is a failed file with its reason, next to the good series of its study; a
    header without frames handed to group_series becomes a volume that fails, never nothing."""
    vol = np.clip(head_phantom((6, 16, 16)) + 1000, 0, None)
    d = str(tmp_path / "st")
    write_series(os.path.join(d, "t2"), vol, modality="MR", intercept=0.0, ps=(1.0, 1.0), shuffle=False)
    p = os.path.join(d, "flair", "mf.dcm")
    write_enhanced(p, vol, ps=(1.0, 1.0))
    ds = pydicom.dcmread(p)
    ds.PerFrameFunctionalGroupsSequence = pydicom.sequence.Sequence([])
    if not keep_count:
        del ds.NumberOfFrames
    ds.save_as(p)
    reason = "enhanced multi-frame object with no frames"
    assert sorted(_outcomes(d), key=str) == [(reason, os.path.join("flair", "mf.dcm")), ("ok", None)]
    h = dicom.scan_dicom(d, os.path.join("flair", "mf.dcm"))
    h = dict(h, frames=[])
    del h["error"]  # as a header reaching group_series without frames would be
    (g,), skipped = dicom.group_series([h])
    assert skipped == []
    with pytest.raises(dicom.SeriesError, match=f"^{reason}$") as e:
        dicom.dicom_stack(d, g)
    assert e.value.path == os.path.join("flair", "mf.dcm")


def _timing_series(d, blocks, **kw):
    """MR blocks of 8 slices (5 mm apart) written as ONE series: blocks is a list of (z0, extra
    tags, vol); returns the stored volumes (integers) in block order."""
    su, se = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    out = []
    for b, (z0, extra, vol) in enumerate(blocks):
        write_series(d, vol, modality="MR", intercept=0.0, study_uid=su, series_uid=se, seed=b, shuffle=False,
                     origin=(-100.0, -110.0, z0), names=[f"B{b}_{k}.dcm" for k in range(vol.shape[0])], extra=extra,
                     **kw)
        out.append(np.rint(vol))
    return out


@pytest.mark.parametrize("z2", [-47.5, -10.0, -50.0])  # interleaved, one block above the other, same positions
def test_acquisitions_with_other_timing_under_one_series_uid_are_split(tmp_path, z2):
    """A T1 (TE 12 / TR 500) and a T2 (TE 95 / TR 4000) exported under one SeriesInstanceUID,
    same matrix and orientation, loaded as ONE volume with no warning (slices alternating T1 / T2,
    or T2 stacked on top of T1), or failed as conflicting slices at the same positions. They
    load as two volumes, each exactly the series written, with a warning."""
    t1 = np.clip(head_phantom(SHAPE) + 1000, 0, None)
    t2 = np.where(t1 > 0, 3000.0 - 1.5 * t1, 0.0)
    d = str(tmp_path / "s")
    v1, v2 = _timing_series(d, [(-50.0, dict(EchoTime=12.0, RepetitionTime=500.0), t1),
                                (z2, dict(EchoTime=95.0, RepetitionTime=4000.0), t2)])
    hs = [dicom.scan_dicom(d, f) for f in dicom.find_inputs(d)]
    groups, _ = dicom.group_series(hs)
    assert len(groups) == 2
    for g, v, z0 in zip(sorted(groups, key=lambda g: g["info"]["te"]), (v1, v2), (-50.0, z2)):
        st = dicom.dicom_stack(d, g).check(3)
        assert np.allclose(st.d, 5.0 * np.arange(8)) and abs(st.o0[2] - z0) < 1e-6
        assert np.array_equal(st.assemble(), v)
        assert st.warnings == ["series split into 2 volumes by EchoTime, RepetitionTime (different acquisitions)"]


def test_dual_echo_and_timing_that_varies_within_one_acquisition(tmp_path):
    """A dual-echo series (TE 15 / 90 ms, one TR) without EchoNumbers: two volumes (echo 1, echo
    2), warned; with EchoNumbers: two volumes, split silently by echo as before. What stays one
    volume: TE reported to 0.2 ms jitter, and a triggered sequence's per-slice TR drifting
    800 -> 1100 ms (a continuous spread, no 25% jump)."""
    vol = np.clip(head_phantom(SHAPE) + 1000, 0, None)
    for name, numbers in (("no_numbers", False), ("numbers", True)):
        d = str(tmp_path / name)
        e1, e2 = _timing_series(d, [(-50.0, dict(EchoTime=15.0, RepetitionTime=2500.0), vol),
                                    (-50.0, dict(EchoTime=90.0, RepetitionTime=2500.0), vol * 0.5)])
        if numbers:
            mutate_series(d, lambda ds, i: setattr(ds, "EchoNumbers", 1 if float(ds.EchoTime) < 50 else 2))
        hs = [dicom.scan_dicom(d, f) for f in dicom.find_inputs(d)]
        groups, _ = dicom.group_series(hs)
        stacks = sorted((dicom.dicom_stack(d, g).check(3) for g in groups), key=lambda st: -st.assemble().mean())
        assert [np.array_equal(st.assemble(), v) for st, v in zip(stacks, (e1, e2))] == [True, True]
        want = [] if numbers else ["series split into 2 volumes by EchoTime (different acquisitions)"]
        assert [st.warnings for st in stacks] == [want, want], name
    d = str(tmp_path / "varies")
    write_series(d, vol, modality="MR", intercept=0.0, shuffle=False)
    mutate_series(d, lambda ds, i: (setattr(ds, "EchoTime", 90.0 + 0.2 * (i % 2)),
                                    setattr(ds, "RepetitionTime", 800.0 + 40.0 * i + 10.0 * (i % 3))))
    assert _outcomes(d) == [("ok", None)]
    (g,), _ = dicom.group_series([dicom.scan_dicom(d, f) for f in dicom.find_inputs(d)])
    st = dicom.dicom_stack(d, g).check(3)
    assert st.shape[0] == 8 and st.warnings == []


@pytest.mark.parametrize("fast", [True, False])
def test_ct_without_rescale_fails_the_series(tmp_path, fast):
    """RescaleSlope / RescaleIntercept are Type 1 in the CT Image module. A CT stored as unsigned
    HU + 1024 without them read as intercept 0: every voxel 1024 HU too bright (brain as bone,
    no air) with no warning. The series fails naming the file. As before: the same CT with the
    tags, and an enhanced CT (rescale in its functional groups, none at the top level), load as
    HU (hand-worked: stored - 1024), and an MR without them loads its stored values."""
    vol = head_phantom((4, 16, 16))
    d = str(tmp_path / "ct")
    _, _, paths = write_series(d, vol, shuffle=False)
    stored = np.stack([np.frombuffer(pydicom.dcmread(p).PixelData, np.int16).reshape(16, 16) for p in paths])
    e = str(tmp_path / "enhanced")
    write_enhanced(os.path.join(e, "mf.dcm"), vol, modality="CT", intercept=-1024.0)
    for where in (d, e):
        assert _outcomes(where, fast) == [("ok", None)]
        (g,), _ = dicom.group_series([dicom.scan_dicom(where, f) for f in dicom.find_inputs(where)])
        assert np.array_equal(dicom.dicom_stack(where, g).assemble(), stored.astype(np.float32) - 1024.0), where
    for tag in ("RescaleSlope", "RescaleIntercept"):  # slope only, then both
        mutate_series(d, lambda ds, i: delattr(ds, tag) if i == 2 else None)
        assert _outcomes(d, fast) == [(f"missing {tag} (CT Hounsfield units unknown)", os.path.basename(paths[2]))]
    d = str(tmp_path / "mr")
    write_series(d, np.clip(vol + 1000, 0, None), modality="MR", intercept=0.0, shuffle=False)
    mutate_series(d, lambda ds, i: (delattr(ds, "RescaleSlope"), delattr(ds, "RescaleIntercept")))
    assert _outcomes(d, fast) == [("ok", None)]


@pytest.mark.parametrize("fast", [True, False])
def test_missing_geometry_names_the_offending_file(tmp_path, fast):
    """One slice without ImagePositionPatient fails its series (as before), and the reason now
    names that file, not the series' first file."""
    d = str(tmp_path / "s")
    _, _, paths = write_series(d, head_phantom(SHAPE), shuffle=False)
    mutate_series(d, lambda ds, i: delattr(ds, "ImagePositionPatient") if i == 5 else None)
    assert _outcomes(d, fast) == [("missing geometry (ImagePositionPatient)", os.path.basename(paths[5]))]
