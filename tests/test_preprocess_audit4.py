"""preprocess.py audit 4: run settings checked before anything is written, labels / findings files
in the encodings spreadsheet tools write, splits of studies committed by an unfinished run, an output
inside the input reached by another path. Inputs are small synthetic NIfTI studies; expectations come
from the documented rules and from listing the input folders, never from preprocess.py itself."""
import csv
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import preprocess  # noqa: E402
from nvfm import dicom  # noqa: E402
from test_preprocess_audit3 import RUN, _nifti_study  # noqa: E402  (one small CT NIfTI study per folder)


def _key(folder):
    """A NIfTI study's key as documented: salted hash of "nifti:" + its folder (the default salt)."""
    return dicom.nifti_study_key(folder, dicom.DEFAULT_SALT)


@pytest.mark.parametrize("option, value, said", [("cfg_min_fg", 50.0, "--min_fg_fraction=50"),
                                                 ("cfg_min_fg", float("nan"), "--min_fg_fraction=nan"),
                                                 ("cfg_min_fg", 1.5, "--min_fg_fraction=1.5"),
                                                 ("cfg_min_slices", 1, "--min_slices=1")])
def test_a_setting_no_series_can_meet_is_refused_before_anything_is_written(tmp_path, monkeypatch, option, value,
                                                                           said):
    """--min_fg_fraction=50 (a percentage) failed every series alike after decoding it ("error
    (ValueError)"), then recorded 50 in the output, which refused the corrected rerun; --min_slices=1 failed
    every single-slice series the same way. Now one line naming the option, and no output folder."""
    monkeypatch.delenv("NVFM_SALT", raising=False)
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    _nifti_study(inp, "a", 0)
    with pytest.raises(SystemExit, match=said):
        preprocess.run(inp, out, **{option: value}, **RUN)
    assert not os.path.exists(out)
    man = preprocess.run(inp, out, **RUN)  # the same output with the default settings
    assert [v["study_key"] for v in man["volumes"]] == [_key("a")]


def test_labels_and_findings_with_a_byte_order_mark_are_read(tmp_path, monkeypatch):
    """Excel's "CSV UTF-8" starts the file with a byte-order mark: the first column was read as
    '\\ufeffstudy_uid' ("no study_uid column"), and a findings file's first line was "not JSON"."""
    monkeypatch.delenv("NVFM_SALT", raising=False)
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    for i, name in enumerate(("a", "b")):
        _nifti_study(inp, name, i)
    lab, fin = tmp_path / "labels.csv", tmp_path / "findings.jsonl"
    lab.write_bytes("\ufeffstudy_uid,split,age\r\nnifti:a,test,71\r\nnifti:b,val,40\r\n".encode("utf-8"))
    fin.write_bytes(("\ufeff" + json.dumps({"study_uid": "nifti:a", "findings": "normal"}) + "\n").encode("utf-8"))
    man = preprocess.run(inp, out, labels_path=str(lab), findings_path=str(fin), **RUN)
    assert {v["study_key"]: v["split"] for v in man["volumes"]} == {_key("a"): "test", _key("b"): "val"}
    with open(os.path.join(out, "labels.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["study_key"], r["split"], r["age"]) for r in rows] == [(_key("a"), "test", "71"),
                                                                      (_key("b"), "val", "40")]
    with open(os.path.join(out, "findings.jsonl")) as f:
        assert [json.loads(x) for x in f] == [{"study_key": _key("a"), "findings": "normal"}]


@pytest.mark.parametrize("which", ["labels", "findings"])
def test_labels_or_findings_not_in_utf8_fail_in_one_line_naming_the_line(tmp_path, which):
    """A Windows-1252 export (a dropped name column with an umlaut) was a raw UnicodeDecodeError
    traceback; now one line naming the file and its first line that is not UTF-8 (line 3 here)."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    _nifti_study(inp, "a", 0)
    if which == "labels":
        path = tmp_path / "labels.csv"
        path.write_bytes("study_uid,name\nnifti:a,Smith\nnifti:b,M\u00fcller\n".encode("cp1252"))
        kw = dict(labels_path=str(path))
    else:
        path = tmp_path / "findings.jsonl"
        path.write_bytes("".join(json.dumps({"study_uid": u, "findings": t}, ensure_ascii=False) + "\n"
                                 for u, t in (("nifti:a", "ok"), ("nifti:b", "ok"), ("nifti:c", "\u00f6dem")))
                         .encode("cp1252"))
        kw = dict(findings_path=str(path))
    with pytest.raises(SystemExit, match=rf"{path}:3: not UTF-8 text"):
        preprocess.run(inp, out, **kw, **RUN)
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_a_labels_cell_over_the_csv_field_limit_fails_in_one_line(tmp_path):
    """A cell longer than the csv module's field size limit (a pasted report) was a raw _csv.Error."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    _nifti_study(inp, "a", 0)
    path = tmp_path / "labels.csv"
    path.write_text("study_uid,notes\nnifti:a,short\nnifti:b," + "x" * (csv.field_size_limit() + 10) + "\n")
    with pytest.raises(SystemExit, match=rf"{path}:3: unreadable CSV \(field larger than field limit"):
        preprocess.run(inp, out, labels_path=str(path), **RUN)


def _job_of(folder, n=2):
    return int(_key(folder), 16) % n


@pytest.mark.parametrize("later", ["other split", "no split column"])
def test_labels_cannot_move_a_study_committed_by_an_unfinished_run(tmp_path, monkeypatch, later):
    """Array job 0 commits its studies to parts/ (split 'test' from the labels) and waits; job 1 runs
    with labels that put one of them in another split, or carry no split column. The check against
    moved studies read only manifest.json: job 1 merged the study in 'test' but wrote another split
    to labels.csv (train_probe reads it there). Now a moved study is refused as for a merged
    output, and without a split column the re-keyed labels keep the split it was committed in."""
    monkeypatch.delenv("NVFM_SALT", raising=False)
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    names = [f"s{i}" for i in range(6)]
    for i, name in enumerate(names):
        _nifti_study(inp, name, i)
    a = next(n for n in names if _job_of(n) == 0 and preprocess.hash_split(_key(n)) != "test")
    assert any(_job_of(n) == 1 for n in names)
    lab = tmp_path / "labels.csv"
    lab.write_text("study_uid,split\n" + "".join(f"nifti:{n},{'test' if n == a else 'train'}\n" for n in names))
    assert preprocess.run(inp, out, labels_path=str(lab), shard_spec="0/2", **RUN) is None  # waits for job 1
    if later == "other split":
        lab.write_text("study_uid,split\n" + "".join(f"nifti:{n},train\n" for n in names))
        with pytest.raises(SystemExit, match=rf"study {_key(a)} is in split 'train' there, but its volumes in "
                                             rf".*parts \(committed, not merged yet\) are in split 'test'"):
            preprocess.run(inp, out, labels_path=str(lab), shard_spec="1/2", **RUN)
        return
    lab.write_text("study_uid,age\n" + "".join(f"nifti:{n},50\n" for n in names))
    man = preprocess.run(inp, out, labels_path=str(lab), shard_spec="1/2", **RUN)
    assert {v["split"] for v in man["volumes"] if v["study_key"] == _key(a)} == {"test"}
    with open(os.path.join(out, "labels.csv"), newline="") as f:
        assert [r["split"] for r in csv.DictReader(f) if r["study_key"] == _key(a)] == ["test"]


def test_an_output_inside_the_input_reached_by_another_path_is_not_ingested(tmp_path, capsys):
    """--input through a symlinked folder (a cluster home linked to /mnt/...) and --output by the
    real path inside it: the output's own files were read as input (preprocess.log, then the
    manifest and shards as "not a DICOM file"), and every rerun warned of a changed file count.
    Now the input is its 2 NIfTI files, on the first run and the rerun; an input inside the output
    (--output=proj --input=proj/dicom) is still read whole."""
    real = tmp_path / "real"
    for i, name in enumerate(("a", "b")):
        _nifti_study(str(real / "in"), name, i)
    os.symlink(str(real), str(tmp_path / "link"))
    inp, out = str(tmp_path / "link" / "in"), str(real / "in" / "shards")
    for _ in range(2):
        man = preprocess.run(inp, out, **RUN)
        assert man["summary"]["files_input"] == 2 and man["summary"]["files_failed"] == {}
    assert "WARNING" not in capsys.readouterr().err
    man = preprocess.run(str(tmp_path / "link" / "in" / "a"), str(real / "in"), **RUN)  # input inside the output
    assert man["summary"]["files_input"] == 1 and len(man["volumes"]) == 1


@pytest.mark.parametrize("log_paths", [False, True])
def test_log_paths_off_keeps_an_unforeseen_errors_text_off_the_console(tmp_path, monkeypatch, capsys, log_paths):
    """An unforeseen error fails its series with "error (<type>)"; its raw message (an OSError quotes
    the full path, other errors header values) was printed as a "detail" line even under
    --log_paths=False, which promises hashed keys only. Now it is shown only with --log_paths
    (never in the log file)."""
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    _nifti_study(inp, "DOE_JOHN", 0)
    _nifti_study(inp, "b", 1)
    real = dicom.nifti_stack

    def failing(root, rel):
        if "DOE" in rel:
            raise OSError(2, "No such file or directory", os.path.join(root, rel))
        return real(root, rel)
    monkeypatch.setattr(dicom, "nifti_stack", failing)
    man = preprocess.run(inp, out, **dict(RUN, cfg_log_paths=log_paths))
    assert man["summary"]["series_failed"] == {"error (FileNotFoundError)": 1} and len(man["volumes"]) == 1
    err = capsys.readouterr().err
    assert ("DOE" in err) == log_paths
    with open(os.path.join(out, "preprocess.log")) as f:
        assert "DOE" not in f.read()


def test_adding_studies_to_an_output_whose_shard_was_cut_short_is_one_line(tmp_path, monkeypatch):
    """A finished output whose shard file was cut short (a copy interrupted), then a rerun with a new study:
    the merge refused the short source with a ValueError traceback (exit 2). Now one line naming the shard,
    and the old manifest stays as it was."""
    monkeypatch.delenv("NVFM_SALT", raising=False)
    inp, out = str(tmp_path / "in"), str(tmp_path / "out")
    _nifti_study(inp, "a", 0)
    man = preprocess.run(inp, out, **RUN)
    shard = os.path.join(out, man["volumes"][0]["shard"])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    with open(os.path.join(out, "manifest.json"), "rb") as f:
        before = f.read()
    _nifti_study(inp, "b", 1)
    with pytest.raises(SystemExit, match=r"^preprocess: .*" + os.path.basename(shard) + r".*cut short"):
        preprocess.run(inp, out, **RUN)
    with open(os.path.join(out, "manifest.json"), "rb") as f:
        assert f.read() == before
