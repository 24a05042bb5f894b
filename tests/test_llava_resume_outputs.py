"""train_llava.py: OUT/metrics.json and OUT/reports*.jsonl always score the model ckpt.pt holds. A resume that
trains on moves the older evaluation to OUT/stale-iter<N>/, an evaluation killed while scoring leaves the previous
one whole, an evaluation without a probe cross-check leaves no older reports_probe.jsonl beside it, and
--reuse_reports never re-scores an older model's reports as a newer one's."""
import json
import os

import pytest
import torch

from test_llava import _synthetic_cohort
from test_llava_audit import ENV, _base, _refused, _sh, lm_dir  # noqa: F401 (lm_dir: the module's tiny-LM fixture)

OUTPUTS = ("metrics.json", "reports.jsonl", "reports_probe.jsonl")
# runs train_llava.py and dies (os._exit, like SIGKILL) the first time a reports file is scored
KILL_WHILE_SCORING = """import os, runpy, sys
import nvfm.report_metrics
def dying(*a, **k):
    os._exit(9)
nvfm.report_metrics.evaluate_reports = dying
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture
def cohort(tmp_path):
    fnd, feat = _synthetic_cohort(str(tmp_path))
    probe = tmp_path / "probe.jsonl"   # every study: an urgent EDH call, appended to every report
    probe.write_text("".join(json.dumps({"study_key": f"k{i:03d}", "scores": {"epidural_hematoma": 0.9}}) + "\n"
                             for i in range(12)))
    return fnd, feat, ["--eval_split=test", "--max_new_tokens=4"], [f"--probe_scores={probe}", "--probe_rule=youden"]


def _ok(cmd, env=ENV):
    r = _sh(cmd, env)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _files(d):
    """{name: bytes} of the evaluation files in d."""
    return {f: open(os.path.join(d, f), "rb").read() for f in OUTPUTS if os.path.exists(os.path.join(d, f))}


def _ckpt_iter(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"]


def test_resume_without_evaluation_sets_the_older_evaluation_aside(tmp_path, lm_dir, cohort):
    """Run to iteration 2 with evaluation, resumed to 3 with --eval_split=none: ckpt.pt (3) sat beside the
    metrics.json (iter_num 2) and reports of the iteration-2 model, whose LM directory the resume had removed;
    nothing was said. A folder left so (by that older train_llava.py) is tidied on its next resume."""
    fnd, feat, ev, pr = cohort
    out = str(tmp_path / "run")
    _ok(_base(fnd, feat, lm_dir, out, "--max_iters=2", *ev, *pr))
    before = _files(out)
    assert sorted(before) == sorted(OUTPUTS) and json.loads(before["metrics.json"])["iter_num"] == 2 == _ckpt_iter(out)
    r = _ok(_base(fnd, feat, lm_dir, out, "--max_iters=3", "--eval_split=none", "--init_from=resume"))
    assert _ckpt_iter(out) == 3 and not os.path.isdir(os.path.join(out, "llm-0000002"))   # the model they scored
    stale = os.path.join(out, "stale-iter2")
    assert _files(out) == {} and _files(stale) == before   # moved unchanged, not lost
    warn = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and all(s in warn[0] for s in ("reports.jsonl", "reports_probe.jsonl", "metrics.json",
                                                         "iteration 2", "iteration 3", stale))
    # an out_dir left as the older train_llava.py left it: tidied on the next resume, even one that trains nothing;
    # the earlier stale-iter2 is not overwritten
    for f, b in before.items():
        open(os.path.join(out, f), "wb").write(b)
    r = _ok(_base(fnd, feat, lm_dir, out, "--max_iters=3", "--eval_split=none", "--init_from=resume"))
    assert _files(out) == {} and _files(stale) == _files(stale + ".2") == before and "moved to" in r.stdout


def test_an_evaluation_without_probe_leaves_no_older_probe_reports(tmp_path, lm_dir, cohort):
    """Resumed from 2 to 3 with evaluation but no --probe_scores: metrics.json (3) and reports.jsonl were
    replaced, and the iteration-2 model's reports_probe.jsonl stayed beside them (metrics.json had no
    reports_probe entry). Re-scored at 3 without the probe, the reports_probe.jsonl of 3 stayed too."""
    fnd, feat, ev, pr = cohort
    out = str(tmp_path / "run")
    _ok(_base(fnd, feat, lm_dir, out, "--max_iters=2", *ev, *pr))
    before = _files(out)
    _ok(_base(fnd, feat, lm_dir, out, "--max_iters=3", *ev, "--init_from=resume"))
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["iter_num"] == 3 == _ckpt_iter(out) and "reports_probe" not in m
    assert sorted(_files(out)) == ["metrics.json", "reports.jsonl"]
    assert _files(os.path.join(out, "stale-iter2")) == before
    again = ["--max_iters=3", *ev, "--init_from=resume", "--eval_only=True", "--reuse_reports=True"]
    _ok(_base(fnd, feat, lm_dir, out, *again, *pr))
    assert sorted(_files(out)) == sorted(OUTPUTS)
    r = _ok(_base(fnd, feat, lm_dir, out, *again))
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert sorted(_files(out)) == ["metrics.json", "reports.jsonl"] and "reports_probe" not in m
    assert "removed reports_probe.jsonl" in r.stdout


def test_an_evaluation_killed_while_scoring_leaves_the_previous_one_whole(tmp_path, lm_dir, cohort):
    """Killed while scoring, an evaluation had written its reports.jsonl only: beside the previous
    evaluation's metrics.json (which scored other reports) at the same iteration; after a resume to 3,
    beside metrics.json and reports_probe.jsonl of the iteration-2 model, and --reuse_reports then said
    the new reports were decoded at iteration 2."""
    fnd, feat, ev, pr = cohort
    killer = tmp_path / "killer.py"
    killer.write_text(KILL_WHILE_SCORING)
    out = str(tmp_path / "run")
    _ok(_base(fnd, feat, lm_dir, out, "--max_iters=2", *ev, *pr))
    before = _files(out)
    # the same model decoded with other settings (8 new tokens, not 4): its replies differ
    r = _sh([str(killer)] + _base(fnd, feat, lm_dir, out, "--max_iters=2", "--init_from=resume", "--eval_only=True",
                                  *pr, "--eval_split=test", "--max_new_tokens=8"))
    assert r.returncode == 9 and "generate: 100%" in r.stderr   # it did decode
    assert _files(out) == before
    r = _sh([str(killer)] + _base(fnd, feat, lm_dir, out, "--max_iters=3", "--init_from=resume", *ev, *pr))
    assert r.returncode == 9 and _ckpt_iter(out) == 3
    assert _files(out) == {} and _files(os.path.join(out, "stale-iter2")) == before
    _refused(_base(fnd, feat, lm_dir, out, "--max_iters=3", "--init_from=resume", "--eval_only=True",
                   "--reuse_reports=True", *ev, *pr), "reports.jsonl does not exist")


def test_reuse_reports_without_eval_only_is_refused(tmp_path, lm_dir, cohort):
    """--reuse_reports=True on a resume without --eval_only trained from 2 to 3, then re-scored the iteration-2
    reports and wrote their figures beside ckpt.pt (3) as its metrics.json (iter_num null)."""
    fnd, feat, ev, _ = cohort
    out = str(tmp_path / "run")
    _ok(_base(fnd, feat, lm_dir, out, "--max_iters=2", *ev))
    before = _files(out)
    _refused(_base(fnd, feat, lm_dir, out, "--max_iters=3", "--init_from=resume", "--reuse_reports=True", *ev),
             "--reuse_reports", "add --eval_only=True")
    assert _ckpt_iter(out) == 2 and _files(out) == before   # nothing trained, nothing replaced


def test_a_run_from_scratch_removes_the_previous_runs_stale_evaluations(tmp_path, lm_dir, cohort):
    """A run from scratch into an out_dir removed the previous run's log and evaluation files but left its
    stale-iter<N>/ folders: evaluations of a model of another run, beside this run's ckpt.pt."""
    fnd, feat, ev, pr = cohort
    out = str(tmp_path / "run")
    _ok(_base(fnd, feat, lm_dir, out, "--max_iters=2", *ev, *pr))
    _ok(_base(fnd, feat, lm_dir, out, "--max_iters=3", "--eval_split=none", "--init_from=resume"))
    assert os.path.isdir(os.path.join(out, "stale-iter2"))
    keep = os.path.join(out, "stale-notes")   # a folder of the user's whose name is not ours: never touched
    os.makedirs(keep)
    r = _ok(_base(fnd, feat, lm_dir, out, "--max_iters=1", "--eval_split=none"))
    assert sorted(os.listdir(out)) == sorted(["ckpt.pt", "log.jsonl", "stale-notes"] +
                                             [f for f in os.listdir(out) if f.startswith("llm")])
    warn = [line for line in r.stdout.splitlines() if line.startswith("warning:")]
    assert len(warn) == 1 and "stale-iter2/" in warn[0] and "stale-notes" not in warn[0]
