"""evaluate.py's output folder after a rerun: only the current run's per-probe figures and tables,
nothing of the previous complete run lost by a run that fails midway, table files whole or old."""
import builtins
import json
import os
import sys

import pytest
import torch

from test_evaluate import _settings, _tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402

FIGS = ("roc_{}.png", "pr_{}.png", "label_efficiency_{}.png")   # a classification probe's figures


def _snapshot(d):
    return {f: (d / f).read_bytes() for f in sorted(os.listdir(d)) if (d / f).is_file()}


def _flipped(pt, dst):
    """The probe with its head negated: every AUROC becomes 1 - AUROC (other figures, other PNG bytes)."""
    ck = torch.load(pt, weights_only=True)
    st = {k: -v if k.startswith("head.") else v for k, v in ck["models"][0].items()}
    torch.save(dict(ck, models=[st]), dst)
    return str(dst)


def test_a_rerun_with_other_probes_leaves_only_the_figures_of_its_own_probes(tmp_path, monkeypatch, capsys):
    """A rerun into the same --out with other --names used to leave roc_x.png, pr_x.png, ... of the
    previous run's probes beside a metrics.json without them."""
    pt, _, _ = _tiny_run(tmp_path)
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "roc_mine.png").write_bytes(b"the user's own")   # not written by evaluate.py: never touched
    (ev / "notes.txt").write_text("keep")
    _settings(monkeypatch, tmp_path, probes=f"{pt},{pt}", names="x,y", plots=True)
    evaluate.main()
    assert {f.format(n) for f in FIGS for n in "xy"} <= set(os.listdir(ev))
    capsys.readouterr()
    _settings(monkeypatch, tmp_path, probes=pt, names="z", plots=True)
    evaluate.main()
    err = capsys.readouterr().err
    assert set(json.load(open(ev / "metrics.json"))["results"]) == {"z"}
    own = ["metrics.json", "paper_table.md", "table.txt", "roc_mine.png", "notes.txt"]
    assert sorted(os.listdir(ev)) == sorted([f.format("z") for f in FIGS] + own)
    assert (ev / "roc_mine.png").read_bytes() == b"the user's own"
    line = [ln for ln in err.splitlines() if "removed" in ln]
    assert len(line) == 1 and all(f.format(n) in line[0] for f in FIGS for n in "xy")

    # the same name as an age probe: its classification figures go, age_z.png comes
    d2 = tmp_path / "age"
    d2.mkdir()
    pa, _, _ = _tiny_run(d2, names=("age",), task="age")
    _settings(monkeypatch, d2, probes=pa, names="z", plots=True, out=str(ev))
    evaluate.main()
    assert {f for f in os.listdir(ev) if f.endswith(".png")} == {"age_z.png", "roc_mine.png"}
    # --plots=False: no figure of an earlier run beside figures it did not make
    _settings(monkeypatch, d2, probes=pa, names="z", plots=False, out=str(ev))
    evaluate.main()
    assert {f for f in os.listdir(ev) if f.endswith(".png")} == {"roc_mine.png"}


def test_a_run_without_paper_rows_removes_the_previous_paper_table(tmp_path, monkeypatch):
    """A reports-only rerun used to leave the previous run's paper_table.md and figures beside a
    metrics.json holding only the reports."""
    pt, _, _ = _tiny_run(tmp_path)
    _settings(monkeypatch, tmp_path, probes=pt, names="x", plots=True)
    evaluate.main()
    ev = tmp_path / "ev"
    assert (ev / "paper_table.md").exists()
    truth = [{"study_key": "a", "split": "test", "findings": ["Acute left subdural hematoma."], "triage": "urgent",
              "lesions": []}]
    (tmp_path / "f.jsonl").write_text(json.dumps(truth[0]) + "\n")
    (tmp_path / "r.jsonl").write_text(json.dumps({"study_key": "a", "findings": truth[0]["findings"]}) + "\n")
    _settings(monkeypatch, tmp_path, probes="", labels="", names="", reports=str(tmp_path / "r.jsonl"),
              findings=str(tmp_path / "f.jsonl"))
    evaluate.main()
    assert set(json.load(open(ev / "metrics.json"))["results"]) == {"reports"}
    assert sorted(os.listdir(ev)) == ["metrics.json", "table.txt"]


def test_a_run_that_fails_while_scoring_changes_nothing_in_out(tmp_path, monkeypatch):
    """A run whose second probe failed used to have drawn the first probe's figures already:
    roc_x.png showed the new probe's curves beside the previous run's metrics.json."""
    pt, _, _ = _tiny_run(tmp_path)
    _settings(monkeypatch, tmp_path, probes=pt, names="x", plots=True)
    evaluate.main()
    before = _snapshot(tmp_path / "ev")
    other = _flipped(pt, tmp_path / "other.pt")
    bad = tmp_path / "bad.pt"   # held-out test studies not in labels.csv: refused while scoring
    torch.save(dict(torch.load(pt, weights_only=True), test_keys=["nope"]), bad)
    _settings(monkeypatch, tmp_path, probes=f"{other},{bad}", names="x,w", plots=True)
    with pytest.raises(SystemExit, match="held-out test studies are not in"):
        evaluate.main()
    assert _snapshot(tmp_path / "ev") == before


class _Cut:
    """A file whose first write stores half its data, then fails as a full disk (or a kill) would."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _cut_writes_of(monkeypatch, name):
    """Every open for writing of `name` (or of its atomic temp file .name.tmp-*) gets a _Cut file."""
    real = builtins.open

    def cutting_open(file, mode="r", *a, **kw):
        f = real(file, mode, *a, **kw)
        base = os.path.basename(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
        return _Cut(f) if any(c in mode for c in "wax+") and base.lstrip(".").startswith(name) else f
    monkeypatch.setattr(builtins, "open", cutting_open)


@pytest.mark.parametrize("name, rerun", [("table.txt", "z"), ("paper_table.md", "z"), ("roc_x.png", "x")])
def test_an_interrupted_write_leaves_the_previous_file_whole(tmp_path, monkeypatch, name, rerun):
    """table.txt and paper_table.md were written with a plain open(): a write cut short (kill, full
    disk) left a truncated file in place of the previous run's; likewise a figure (savefig). The
    previous run's figures stay until the rerun is complete."""
    pt, _, _ = _tiny_run(tmp_path)
    _settings(monkeypatch, tmp_path, probes=pt, names="x", plots=True)
    evaluate.main()
    before = _snapshot(tmp_path / "ev")
    _settings(monkeypatch, tmp_path, probes=_flipped(pt, tmp_path / "other.pt"), names=rerun, plots=True)
    with monkeypatch.context() as m:
        _cut_writes_of(m, name)
        with pytest.raises(OSError, match="No space left"):
            evaluate.main()
    after = _snapshot(tmp_path / "ev")
    assert after[name] == before[name]
    assert after["metrics.json"] == before["metrics.json"]   # the record of the last complete run
    assert all(after.get(f.format("x")) == before[f.format("x")] for f in FIGS)
    assert not [f for f in os.listdir(tmp_path / "ev") if ".tmp-" in f]


def test_an_interrupted_merge_leaves_the_previous_paper_table_whole(tmp_path, monkeypatch):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"paper_rows": [["t: macro AUROC", {"p": "0.900 [0.800, 0.950]"}]]}))
    b.write_text(json.dumps({"paper_rows": [["t: macro AUROC", {"q": "0.550 [0.450, 0.650]"}]]}))
    monkeypatch.setattr(evaluate, "out", str(tmp_path / "m"))
    monkeypatch.setattr(evaluate, "merge", str(a))
    evaluate.merge_tables()
    old = (tmp_path / "m" / "paper_table.md").read_text()
    assert "| t: macro AUROC | 0.900 [0.800, 0.950] |" in old
    monkeypatch.setattr(evaluate, "merge", f"{a},{b}")
    with monkeypatch.context() as m:
        _cut_writes_of(m, "paper_table.md")
        with pytest.raises(OSError, match="No space left"):
            evaluate.merge_tables()
    assert (tmp_path / "m" / "paper_table.md").read_text() == old


def test_a_rerun_without_grounding_removes_the_previous_runs_overlays_only(tmp_path, monkeypatch, capsys):
    """Overlays are named by study and class, not probe: a rerun without --cohort (or with another first
    probe) used to leave the previous run's overlays in grounding/ beside a metrics.json without them."""
    pt, _, _ = _tiny_run(tmp_path)
    _settings(monkeypatch, tmp_path, probes=pt, names="x", plots=False)
    evaluate.main()
    ev = tmp_path / "ev"
    # the record a run with --cohort leaves: its overlays listed under its first probe's grounding
    (ev / "grounding").mkdir()
    listed = ["demo-0001_CT_ab12cd34_image.nii.gz", "demo-0001_CT_ab12cd34_attention_ich.nii.gz"]
    for f in listed + ["my_segmentation.nii.gz"]:
        (ev / "grounding" / f).write_bytes(b"x")
    m = json.load(open(ev / "metrics.json"))
    m["results"]["x"]["grounding"] = {"overlays": [str(ev / "grounding" / f) for f in listed]}
    (ev / "metrics.json").write_text(json.dumps(m))
    capsys.readouterr()
    evaluate.main()
    assert os.listdir(ev / "grounding") == ["my_segmentation.nii.gz"]   # not evaluate.py's: kept
    err = [ln for ln in capsys.readouterr().err.splitlines() if "removed" in ln]
    assert len(err) == 1 and all(f in err[0] for f in listed)
