"""Audit of the public benchmarks (nvfm/benchmarks.py, bench/bench_public.py), each against a
hand-worked small copy: a rerun of bench_public.py after the user's copy of the dataset changed (a
corrected label file, images added) skipped the adapter and kept the labels of the earlier copy; an
OpenBHB session cell written n/a (BIDS's missing value) was read as a session called "n/a", so the
row found no image."""
import csv
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import bench_fakes  # noqa: E402

from nvfm import benchmarks as B  # noqa: E402
from nvfm import dicom  # noqa: E402

SALT = "audit4-salt"


def _labels(path):
    with open(path, newline="") as f:
        return {r["subject"]: r for r in csv.DictReader(f)}


def _bench(root, out, tmp_path):
    """bench_public.py up to the adapter (preprocess stops at an unknown option: fast)."""
    args = [sys.executable, os.path.join(ROOT, "bench", "bench_public.py"), "--dataset=abide", f"--root={root}",
            f"--out={out}", "--encoders=random:tiny", f"--salt={SALT}", "--preprocess_args=--no_such_option=1"]
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1")
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 1 and "stage preprocess_nvfm failed" in r.stderr, r.stdout + r.stderr
    return r.stdout


def test_bench_public_reruns_the_adapter_when_the_dataset_copy_changed(tmp_path):
    root, out = tmp_path / "abide", tmp_path / "o"
    expect = bench_fakes.abide(str(root))   # {SUB_ID: autism}: 50002 1, 50003 0, 51456 1
    _bench(root, out, tmp_path)
    subj = {dicom.subject_key(s, SALT, "abide"): s for s in expect}
    assert {subj[k]: int(r["autism"]) for k, r in _labels(out / "labels_autism.csv").items()} == expect
    # nothing changed: the adapter is skipped
    assert "[adapter] done earlier, skipped" in _bench(root, out, tmp_path)
    # a corrected phenotypic file: subject 50003 is DX_GROUP 1 now (by hand: autism 1)
    p = root / "Phenotypic_V1_0b_preprocessed1.csv"
    p.write_text(p.read_text().replace("50003,PITT,2", "50003,PITT,1"))
    stdout = _bench(root, out, tmp_path)
    assert "[adapter] done earlier, skipped" not in stdout
    assert {subj[k]: int(r["autism"]) for k, r in _labels(out / "labels_autism.csv").items()} == dict(expect, **{
        "50003": 1})
    # the image of the label row without one is downloaded: a study more (51457, DX_GROUP 2)
    bench_fakes.write_nifti(str(root / "Caltech" / "0051457" / "session_1" / "anat_1" / "mprage.nii.gz"), 4)
    assert "[adapter] done earlier, skipped" not in _bench(root, out, tmp_path)
    subj[dicom.subject_key("51457", SALT, "abide")] = "51457"
    assert {subj[k]: int(r["autism"]) for k, r in _labels(out / "labels_autism.csv").items()} == dict(expect, **{
        "50003": 1, "51457": 0})


def test_bench_public_out_inside_root_does_not_rerun_the_adapter_each_time(tmp_path):
    # OUT under ROOT: its own files (and its creation) are no change of the dataset
    root = tmp_path / "abide"
    bench_fakes.abide(str(root))
    out = root / "bench" / "abide"
    assert "[adapter] done earlier, skipped" not in _bench(root, out, tmp_path)
    assert "[adapter] done earlier, skipped" in _bench(root, out, tmp_path)


def test_openbhb_session_cell_written_na_is_no_session(tmp_path):
    root = str(tmp_path)
    rows = [("sub-1", "20", "1"), ("sub-2", "30", "n/a"), ("sub-3", "40", ""), ("sub-4", "50", "NA")]
    bench_fakes.write_csv(os.path.join(root, "participants.tsv"), ["participant_id", "age", "session"], rows, "\t")
    for pid in (1, 2, 3, 4):
        bench_fakes.write_nifti(os.path.join(root, f"sub-{pid}", "ses-1", "anat",
                                             f"sub-{pid}_ses-1_preproc-quasiraw_T1w.nii.gz"), seed=pid)
    studies, tally, _ = B.openbhb(root)
    # by hand: each participant has one T1w (ses-1); a missing session matches it as no session column would
    assert {st.subject: (st.age, os.path.basename(st.image)) for st in studies} == {
        str(p): (10.0 + 10 * p, f"sub-{p}_ses-1_preproc-quasiraw_T1w.nii.gz") for p in (1, 2, 3, 4)}
    assert tally["rows labelled"] == 4 and tally["rows without an image (left out)"] == 0
