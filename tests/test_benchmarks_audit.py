"""Audit of the public benchmarks (nvfm/benchmarks.py, bench/bench_public.py): ADNI's pMCI / sMCI
labels under the older ADNIMERGE DX coding and rows without a month, stage records that must not
vouch for a killed stage's output or for inputs that changed in an earlier killed invocation, the
salt kept out of command lines and records, no subject id or UID in error messages."""
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

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
