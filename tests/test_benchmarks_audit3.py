"""Audit of the public benchmarks' labels and accounting (nvfm/benchmarks.py), each against the
dataset's own rule applied by hand to small copies in the distributed layouts: ADNI4's five-digit
RIDs (their image folders were not found, nor counted), ADNIMERGE's NA / NaN diagnosis cells,
OASIS-1 CDR values off the CDR scale (a missing-value code was a control), AIBL's image accounting
(one image under two reasons), and two rows whose DICOM folders hold one study (an error naming
both subject ids; now both left out, counted)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pydicom
import pytest
from pydicom.uid import generate_uid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import bench_fakes  # noqa: E402
from dicom_synth import head_phantom, write_series  # noqa: E402

from nvfm import benchmarks as B  # noqa: E402


def _nifti_files(base):
    """Every NIfTI file under base, counted by a plain walk (the adapters' accounting is checked against it)."""
    return sum(f.endswith((".nii", ".nii.gz")) for _, _, fs in os.walk(base) for f in fs)


def _adni(root, subjects):
    """ADNIMERGE.csv + one MPRAGE image per subject. subjects: {PTID: (DX_bl, [(VISCODE, M, DX)], image)},
    image "nii", ("dicom", study uid or None) or None. Returns {PTID: StudyInstanceUID} of the DICOM ones."""
    rows, uids = [], {}
    for k, (ptid, (dx_bl, visits, image)) in enumerate(subjects.items()):
        for vis, m, dx in visits:
            rows.append([k + 1, ptid, vis, "2006-01-05", dx_bl, dx, 70.0 + k, m])
        d = os.path.join(root, "ADNI", ptid, "MPRAGE", "2006-01-10_10_20_30.0", f"I{k + 1}00")
        if image == "nii":
            bench_fakes.write_nifti(os.path.join(d, f"ADNI_{ptid}_MR_MPRAGE_br_raw_S1_I{k + 1}00.nii"), seed=k)
        elif image:
            uids[ptid], _, _ = write_series(d, head_phantom(bench_fakes.SHAPE, k), modality="MR", intercept=0.0,
                                            phi=False, shuffle=False, study_uid=image[1])
    bench_fakes.write_csv(os.path.join(root, "ADNIMERGE.csv"), bench_fakes.ADNI_HEADER, rows)
    return uids


def test_adni_finds_and_counts_the_images_of_five_digit_rids(tmp_path):
    # ADNI4's RIDs run past 9999 (PTID 941_S_10012): before, their image folders matched no PTID, the
    # row was "without a baseline image" and the image was counted nowhere (1 of 4 files accounted for)
    subjects = {"002_S_0001": ("CN", [("bl", 0, "CN")], "nii"),
                "941_S_10012": ("AD", [("bl", 0, "Dementia")], "nii"),
                "035_S_10068": ("LMCI", [("bl", 0, "MCI"), ("m12", 12, "Dementia")], "nii"),
                "035_S_10070": ("SMC", [("bl", 0, "CN")], "nii")}                 # SMC: left out
    _adni(str(tmp_path), subjects)
    studies, tally, _ = B.adni(str(tmp_path))
    # by hand: DX_bl AD 1, CN 0; LMCI with dementia at m12 <= 36: pMCI 1; SMC in no task
    assert {st.subject: st.tasks for st in studies} == {
        "002_S_0001": {"dementia": {"dementia": 0}}, "941_S_10012": {"dementia": {"dementia": 1}},
        "035_S_10068": {"pmci": {"pmci": 1}}}
    for st in studies:
        assert f"/ADNI/{st.subject}/MPRAGE/" in st.image
    assert tally["baseline rows without a baseline image (left out)"] == 0
    # every image file is staged or counted: the SMC subject's image is the one not used
    counted = tally["images not used (other visits or subjects)"] + tally[
        "image folders of other series (not matching adni_series)"]
    assert len(studies) + counted == _nifti_files(str(tmp_path)) == 4


def test_adni_diagnosis_cells_written_na_or_nan_are_no_diagnosis(tmp_path):
    # ADNIMERGE written by R (NA) or pandas (NaN): before, a follow-up DX of NA stopped the adapter
    # ("DX must be CN, ..."), though the module reads NA / NaN as missing everywhere else
    subjects = {"002_S_0001": ("LMCI", [("bl", 0, "MCI"), ("m06", 6, "NA"), ("m12", 12, "Dementia")], "nii"),
                "002_S_0002": ("EMCI", [("bl", 0, "MCI"), ("m24", 24, "MCI"), ("m36", 36, "NaN"),
                                        ("m48", 48, "MCI")], "nii"),
                "002_S_0003": ("LMCI", [("bl", 0, "MCI"), ("m12", 12, "MCI"), ("m36", 36, "NA")], "nii"),
                "002_S_0004": ("NA", [("bl", 0, "NA")], "nii")}
    _adni(str(tmp_path), subjects)
    studies, tally, _ = B.adni(str(tmp_path))
    # by hand (horizon 36): 0001 dementia at 12 -> 1; 0002 no dementia, MCI at 48 >= 36 -> 0;
    # 0003 last diagnosis at 12 (36 is no diagnosis): short follow-up, left out; 0004 no diagnosis
    assert {st.subject: st.tasks["pmci"]["pmci"] for st in studies} == {"002_S_0001": 1, "002_S_0002": 0}
    assert tally["baseline MCI: late conversion or follow-up < horizon (left out)"] == 1
    assert tally["baseline no diagnosis (left out)"] == 1


def test_oasis1_cdr_off_the_scale_is_an_error_never_a_control(tmp_path):
    # OAS1_0001_MR1 (line 2, CDR 0) re-coded: before, -1 (a missing-value code) and 0.25 were labelled
    # dementia 0 (not 0.5, not >= 1) and 1.5 dementia 1; CDR 3 (severe) is on the scale: dementia 1
    root = str(tmp_path / "oasis")
    expect, _ = bench_fakes.oasis1(root)
    path = os.path.join(root, "oasis_cross-sectional.csv")
    rows = list(csv.reader(open(path, newline="")))
    for value in ("-1", "0.25", "1.5", "4"):
        rows[1][rows[0].index("CDR")] = value
        bench_fakes.write_csv(path, rows[0], rows[1:])
        with pytest.raises(B.BenchmarkError, match=r"cross-sectional\.csv:2: CDR must be one of 0, 0\.5, 1, 2, 3"):
            B.oasis1(root)
    rows[1][rows[0].index("CDR")] = "3"
    bench_fakes.write_csv(path, rows[0], rows[1:])
    studies, _, _ = B.oasis1(root)
    assert {st.subject: st.tasks["dementia"]["dementia"] for st in studies} == {
        **{s[:9]: y for s, y in expect.items()}, "OAS1_0001": 1}


def test_aibl_counts_each_image_under_one_reason(tmp_path, capsys):
    # I777 (bl, RID 99) has no collection row, I888 (bl, RID 16) two rows of different visits: before,
    # each was counted both as "not used (other visits or subjects)" and under its own reason
    root = str(tmp_path / "aibl")
    expect, _ = bench_fakes.aibl(root)
    for rid, iid in (("99", 777), ("16", 888)):
        d = os.path.join(root, "AIBL", rid, "MPRAGE", "2008-03-04_11_22_33.0", f"I{iid}")
        bench_fakes.write_nifti(os.path.join(d, f"AIBL_{rid}_MR_MPRAGE_I{iid}.nii"), seed=1)
    with open(os.path.join(root, "AIBL_T1_baseline_6_01_2026.csv"), "a", newline="") as f:
        for visit in ("bl", "m18"):
            csv.writer(f).writerow(["I888", "16", "", "F", 65.0, visit, "MRI", "MPRAGE", "Original", "2008-03-04",
                                    "NiFTI", ""])
    studies, tally, _ = B.aibl(root)
    assert {st.subject: st.tasks["dementia"]["dementia"] for st in studies} == expect
    # T1 image units by a plain walk: NIfTI files outside the Field_Mapping series, and RID 23's DICOM folder
    t1 = _nifti_files(root) - _nifti_files(os.path.join(root, "AIBL", "54")) + 1
    by_reason = {k: v for k, v in tally.items() if k.startswith("T1 images")}
    assert by_reason == {"T1 images not used (other visits or subjects)": 3,   # RIDs 50, 51 (bl), 53 (m18)
                         "T1 images without a collection row (not used)": 1,
                         "T1 images whose collection rows conflict (not used)": 1}
    assert len(studies) + sum(by_reason.values()) == t1 == 11
    assert "I888" not in capsys.readouterr().err   # the warning names the csv lines and fields, not the image id


def test_two_rows_whose_dicom_folders_hold_one_study_are_left_out_and_not_named(tmp_path):
    # 002_S_0001 and 002_S_0002: DICOM folders of one StudyInstanceUID (a study filed under two subjects).
    # Before, the adapter stopped with "adni:002_S_0001 and adni:002_S_0002 give the same
    # StudyInstanceUID": both subject ids on the console, and nothing labelled
    root = str(tmp_path / "adni")
    uid = generate_uid()
    _adni(root, {"002_S_0001": ("CN", [("bl", 0, "CN")], ("dicom", uid)),
                 "002_S_0002": ("AD", [("bl", 0, "Dementia")], ("dicom", uid)),
                 "002_S_0003": ("AD", [("bl", 0, "Dementia")], "nii")})
    out = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "-m", "nvfm.benchmarks", "--dataset=adni", f"--root={root}", f"--out={out}"],
                       capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, NVFM_SALT="s"))
    assert r.returncode == 0, r.stderr
    rep = json.load(open(os.path.join(out, "adapter_report.json")))
    assert rep["n_studies"] == 1
    assert rep["input"][SHARED] == 2
    rows = list(csv.DictReader(open(os.path.join(out, "labels_dementia.csv"))))
    assert [row["dementia"] for row in rows] == ["1"]   # 002_S_0003, the NIfTI subject, alone
    written = r.stdout + r.stderr + "".join(open(os.path.join(d, f)).read() for d, _, fs in os.walk(out)
                                            for f in fs if f.endswith((".json", ".csv")))
    for secret in ("002_S_000", uid):
        assert secret not in written
    # CQ500: reads CQ500-CT-0 and CQ500-CT-2 whose folders hold one study: both left out, CQ500-CT-1 labelled
    root = str(tmp_path / "cq500")
    expect, reads = bench_fakes.cq500(root)
    first = next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "CQ500CT0 CQ500CT0")) for f in fs)
    uid0 = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    shutil.rmtree(os.path.join(root, "CQ500CT2 CQ500CT2"))
    write_series(os.path.join(root, "CQ500CT2 CQ500CT2", "Unknown Study", "CT PLAIN THIN"),
                 head_phantom((3, 32, 32), 2), study_uid=uid0, phi=False)
    rep = B.run("cq500", root, str(tmp_path / "cq_out"), "s")
    assert rep["n_studies"] == 1 and rep["input"][SHARED] == 2
    rows = list(csv.DictReader(open(os.path.join(tmp_path, "cq_out", "labels_ich.csv"))))
    assert [int(rows[0][c]) for c in B.CQ500_READS.values()] == list((reads["CQ500-CT-1"].sum(0) >= 2).astype(int))


SHARED = "labelled rows whose DICOM folder's StudyInstanceUID another row's folder also has (left out: ambiguous)"
