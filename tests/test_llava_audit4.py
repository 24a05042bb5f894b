"""Audit 4 of the report generator (train_llava.py, nvfm/llava.py): each test failed on the code before its fix."""
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nvfm import llava  # noqa: E402
from nvfm.report_metrics import evaluate_report_lists  # noqa: E402


def test_an_mr_cross_check_does_not_repeat_a_dated_subdural_hematoma_the_report_names():
    """In an MR study a subdural hematoma of any age is one finding (report_metrics scores the CT's dated names as
    the MR ontology's subdural_hematoma). The cross-check compared names without that fold: an MR probe's
    subdural_hematoma was appended to a report saying "Chronic right subdural hematoma", a repeat that turned a
    routine study urgent (triage accuracy 1 -> 0 by hand). By hand: nothing is appended in an MR study; in a CT
    study the chronic and the acute hematoma are two findings, so the acute one is appended."""
    rep = ["Chronic right subdural hematoma."]
    truth = {"modality": "MR", "findings": rep, "lesions": [], "triage": "routine"}
    found, missed = llava.cross_check(rep, {"subdural_hematoma": 0.9}, 0.5, modality="MR")
    assert missed == [] and found == rep
    assert evaluate_report_lists([found], [truth])["triage_accuracy"] == 1.0
    found, missed = llava.cross_check(rep, {"acute_subdural_hematoma": 0.9}, 0.5, modality="CT")
    assert missed == ["acute_subdural_hematoma"] and len(found) == 2


def test_the_reports_rule_fit_reads_mr_subdural_hematomas_as_one_finding():
    """fit_cross_check_thresholds counted an MR report "Acute left subdural hematoma" as omitting the MR probe's
    subdural_hematoma, and the study (which has it) as a true call among omissions. By hand, 2 such studies
    (score 0.9) and 2 unremarkable ones (score 0.8): among the reports that really omit it (the 2 unremarkable)
    there is no positive, so the cut is +inf (never appended); the fit gave 0.8 (a false finding appended to
    both unremarkable studies)."""
    sdh = {"modality": "MR", "findings": ["Acute left subdural hematoma."],
           "lesions": [{"diagnosis": "subdural_hematoma", "side": "left"}]}
    normal = {"modality": "MR", "findings": [], "lesions": []}
    reports = [["Acute left subdural hematoma."]] * 2 + [[]] * 2
    scores = [{"subdural_hematoma": 0.9}] * 2 + [{"subdural_hematoma": 0.8}] * 2
    th = llava.fit_cross_check_thresholds(reports, scores, [sdh, sdh, normal, normal], 0.5)
    assert math.isinf(th["subdural_hematoma"])


# ----------------------------------------------------------------------------- resume after a kill

import json  # noqa: E402

import pytest  # noqa: E402

from test_llava import _synthetic_cohort  # noqa: E402
from test_llava_audit import ENV, KILLER, _base, _sh, lm_dir  # noqa: E402,F401 (lm_dir: the tiny-LM fixture)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort4")
    fnd, feat = _synthetic_cohort(str(d))
    killer = d / "killer.py"
    killer.write_text(KILLER)
    return fnd, feat, str(killer)


def test_a_run_from_scratch_killed_before_its_first_checkpoint_does_not_resume_the_previous_run(
        tmp_path, lm_dir, cohort):
    """Run A finished at iteration 2 in OUT; run B from scratch in OUT (--max_iters=4, a setting a resume may
    change) removed A's log and reports but kept A's ckpt.pt, and was killed in iteration 1, before its first
    checkpoint. `--init_from=resume` of B then continued A from iteration 2 (exit 0), its log.jsonl holding B's
    iteration 0 and the resumed A's 2 and 3: two runs in one. By hand: B has no checkpoint to resume, a
    one-line error."""
    fnd, feat, killer = cohort
    out = str(tmp_path / "run")
    common = ["--eval_split=none", "--log_interval=1", "--eval_interval=0"]
    r = _sh(_base(fnd, feat, lm_dir, out, "--max_iters=2", *common))
    assert r.returncode == 0, r.stderr[-3000:]
    r = _sh([killer] + _base(fnd, feat, lm_dir, out, "--max_iters=4", *common), dict(ENV, KILL_AT="1"))
    assert r.returncode == 9, r.stderr[-3000:]
    r = _sh(_base(fnd, feat, lm_dir, out, "--max_iters=4", "--init_from=resume", *common))
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1 and "ckpt.pt" in err, (r.returncode, r.stderr[-3000:])


def test_a_resume_after_a_torn_log_line_keeps_the_log_of_the_checkpoint(tmp_path, lm_dir, cohort):
    """A machine that dies while log.jsonl is written (power loss, a full disk) leaves a torn last line, or NUL
    bytes where the file system had not written it yet. The resume that trims the log to its checkpoint read every
    line as JSON: a JSONDecodeError traceback (exit 2), the run unresumable. By hand: the rows before the
    checkpoint are kept, the torn line dropped, the iterations after it logged by the resume."""
    fnd, feat, _ = cohort
    out = str(tmp_path / "run")
    common = ["--eval_split=none", "--log_interval=1", "--eval_interval=0", "--ckpt_interval=2"]
    r = _sh(_base(fnd, feat, lm_dir, out, "--max_iters=2", *common))
    assert r.returncode == 0, r.stderr[-3000:]
    log = os.path.join(out, "log.jsonl")
    rows = [json.loads(line) for line in open(log)]
    assert [x["iter"] for x in rows] == [0, 1]
    with open(log, "ab") as f:
        f.write(b'{"iter": 2, "stage": 2, "lo' + b"\0" * 5)
    r = _sh(_base(fnd, feat, lm_dir, out, "--max_iters=3", "--init_from=resume", *common))
    assert r.returncode == 0, r.stderr[-3000:]
    again = [json.loads(line) for line in open(log)]
    assert [x["iter"] for x in again] == [0, 1, 2] and again[:2] == rows


@pytest.mark.parametrize("flag", ["--init_from=resume", "--init_connector"])
def test_an_unreadable_checkpoint_is_one_line_naming_it(tmp_path, lm_dir, cohort, flag):
    """A ckpt.pt cut short (a copy interrupted, a full disk) given to --init_from=resume or --init_connector was a
    CheckpointError traceback (exit 2); --probe's was already one line. By hand: exit 1, one line naming the file."""
    fnd, feat, _ = cohort
    out = tmp_path / "run"
    out.mkdir()
    bad = out / "ckpt.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    arg = flag if flag == "--init_from=resume" else f"--init_connector={bad}"
    r = _sh(_base(fnd, feat, lm_dir, str(out if flag == "--init_from=resume" else tmp_path / "other"),
                  "--max_iters=1", "--eval_split=none", arg))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and str(bad) in err[0], (r.returncode, r.stderr[-3000:])


@pytest.mark.parametrize("row, named", [
    ({"study_key": "k001", "scores": {"epidural_hematoma": None}}, "finite numbers"),
    ({"study_key": "k001", "scores": {"epidural_hematoma": 0.9}, "thresholds": "0.5"}, "'thresholds'"),
    (["k001", {"epidural_hematoma": 0.9}], "expected {study_key"),
    ({"study_key": "k009", "scores": {"epidural_hematoma": 0.9}}, "appears twice"),
])
def test_a_bad_probe_scores_row_is_refused_before_training(tmp_path, lm_dir, cohort, row, named):
    """--probe_scores was read after training: a null score was a TypeError traceback once the run had trained
    (exit 2, no metrics), a list row an AttributeError, a study twice silently the later row. By hand: exit 1,
    one line naming the file and line, and nothing trained (no ckpt.pt)."""
    fnd, feat, _ = cohort
    probe = tmp_path / "probe.jsonl"
    good = {"study_key": "k009", "scores": {"epidural_hematoma": 0.9}}
    probe.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    out = tmp_path / "run"
    r = _sh(_base(fnd, feat, lm_dir, str(out), "--max_iters=1", "--eval_split=test", "--max_new_tokens=4",
                  f"--probe_scores={probe}", "--probe_rule=youden"))
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1 and f"{probe}:2" in err[0] and named in err[0], r.stderr[-3000:]
    assert not (out / "ckpt.pt").exists()


def test_a_probe_scores_threshold_of_zero_is_used(tmp_path, lm_dir, cohort):
    """A row's threshold 0 (a logit cut) was read as "no threshold" (`or`) and replaced by --probe_threshold=0.5:
    a score of 0.3 was not called. By hand: 0.3 >= 0, the urgent EDH the untrained model's 4-token replies
    never name is appended to every test study's report; with no threshold given, 0.3 < 0.5 is not."""
    fnd, feat, _ = cohort
    keys = [json.loads(line)["study_key"] for line in open(fnd) if json.loads(line)["split"] == "test"]
    for th, want in ((0, ["epidural_hematoma"]), (None, [])):
        probe = tmp_path / f"probe{th}.jsonl"
        probe.write_text("".join(json.dumps({"study_key": k, "scores": {"epidural_hematoma": 0.3},
                                             **({} if th is None else {"thresholds": th})}) + "\n" for k in keys))
        out = tmp_path / f"run{th}"
        r = _sh(_base(fnd, feat, lm_dir, str(out), "--eval_only=True", "--eval_split=test", "--max_new_tokens=4",
                      f"--probe_scores={probe}", "--probe_rule=youden"))
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(line) for line in open(out / "reports_probe.jsonl")]
        assert len(rows) == len(keys) and all(x["probe_missed"] == want for x in rows), (th, rows)


def test_the_bench_cross_check_reads_each_studys_modality():
    """bench_llava.py's cross-fitted cross-check called llava.cross_check without the study's modality, so an
    MR report naming a chronic subdural hematoma got the MR probe's subdural_hematoma appended again. By hand:
    every MR study's report names its hematoma and the probe scores 0.9 (a cut of 0.5 from the Youden rule on
    the other folds, where half the studies have it): nothing is appended to an MR report that names it."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import load_bench
    bench = load_bench("bench_llava")
    recs, rows, scores = {}, [], []
    for i in range(20):
        has = i % 2 == 0
        fnd = ["Chronic right subdural hematoma."] if has else []
        recs[f"m{i:02d}"] = {"study_key": f"m{i:02d}", "modality": "MR", "findings": fnd, "triage": "routine",
                             "lesions": [{"diagnosis": "subdural_hematoma", "side": "right"}] if has else []}
        rows.append({"study_key": f"m{i:02d}", "findings": fnd})
        scores.append({"subdural_hematoma": 0.9 if has else 0.1})
    hyps, added = bench.cross_checked("youden", rows, recs, scores, [i % 5 for i in range(20)], 0.8)
    assert added == 0 and hyps == [r["findings"] for r in rows]
