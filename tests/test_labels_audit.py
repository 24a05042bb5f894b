"""labels.csv columns a run does not use: a hospital sheet annotates some diagnoses for only some
studies (blank or "NA" cells). load_labels refused the whole file for any such cell, so
train_probe.py --label_names=a,b and evaluate.py refused a file whose columns a and b were complete
because of a column c neither read. Now only the columns a run uses must hold 0 or 1 (the same
one-line error otherwise); the others are left out of each row's y. One synthetic cache (module
fixture) serves every test."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from nvfm import features
from nvfm import probe as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
A, B = "acute_subdural_hematoma", "epidural_hematoma"   # CT ontology classes, annotated for every study
MR_ONLY = "subdural_hematoma"                            # an MR ontology class: not a CT probe's class
HEADER = ["study_key", "modality", "split", A, B, MR_ONLY, "c"]


def _run(script, args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(header)
        wr.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """48 CT studies (train/train/val/test), 6 brain-window tokens each, in a synthetic cache.
    labels.csv: A (learnable) and B complete; MR_ONLY and c annotated for the first 7 studies only
    (then blank or "NA"); full.csv: the same with every cell 0/1. Returns (dir, rows of labels.csv)."""
    d = tmp_path_factory.mktemp("labels")
    rng = np.random.default_rng(0)
    rows, full = [], []
    with features.FeatureWriter(str(d / "cache"), "sha256:synthetic", 8) as w:
        for i in range(48):
            split = ("train", "train", "val", "test")[i % 4]
            ya, yb, yc = int(rng.random() < 0.5), int(rng.random() < 0.5), int(rng.random() < 0.5)
            e = rng.normal(size=(6, 8))
            e[0, 0] += 3 * ya
            w.add(f"key{i:03d}", [dict(volume_id=f"v{i}", family="CT", window="brain", modality="CT",
                                       coords=np.zeros((6, 3)), emb=e)])
            sparse = str(yc) if i < 7 else ("", "NA", "0")[i % 3]
            rows.append([f"key{i:03d}", "CT", split, str(ya), str(yb), sparse, sparse])
            full.append([f"key{i:03d}", "CT", split, str(ya), str(yb), str(yc), str(yc)])
    _write(d / "labels.csv", HEADER, rows)
    _write(d / "full.csv", HEADER, full)
    return d, rows


def _train(d, out, labels, *extra):
    return _run("train_probe.py", [f"--features={d / 'cache'}", f"--labels={labels}", f"--out={out}",
                                   "--side_classes=False", "--threads=1", "--hidden=8", "--steps=4",
                                   "--eval_interval=2", "--probe=mean_pool", *extra], d)


def _evaluate(d, probe_pt, labels, out):
    return _run("evaluate.py", [f"--probes={probe_pt}", f"--labels={labels}", f"--out={out}", "--n_boot=0",
                                "--plots=False", "--names=p", "--threads=1", "--laterality="], d)


def _first_bad(path, rows, col):
    """The one-line error due for the first cell of `col` that is not 0/1 (header = line 1)."""
    j = HEADER.index(col)
    i = next(i for i, r in enumerate(rows) if r[j] not in ("0", "1"))
    return f"{path}:{i + 2}: column {col!r} must be 0 or 1, got {rows[i][j]!r}"


def test_load_labels_validates_and_keeps_only_the_used_columns(cohort):
    d, rows = cohort
    path = str(d / "labels.csv")
    got, names = P.load_labels(path, use=[A, B, "lesion_left"])   # a side class is not a column: left to the caller
    assert names == HEADER[3:]                                       # every label column, in file order
    with open(path, newline="") as f:   # independent read of the cells
        ref = list(csv.reader(f))[1:]
    assert [r["study_key"] for r in got] == [r[0] for r in ref]
    assert [r["y"] for r in got] == [{A: int(r[3]), B: int(r[4])} for r in ref]
    # every column (use=None, the default, as before) and a used sparse column are still refused
    for use in (None, ["c", A]):
        with pytest.raises(ValueError) as e:
            P.load_labels(path, use=use)
        assert str(e.value) == _first_bad(path, rows, MR_ONLY if use is None else "c")
    assert [r["y"] for r in P.load_labels(path, use=())[0]] == [{}] * len(rows)


def test_train_probe_reads_only_the_label_names_it_learns(cohort, tmp_path):
    """--label_names=A,B on a file whose column c has blanks: refused with "column 'c' must be 0 or 1"."""
    d, rows = cohort
    r = _train(d, tmp_path / "p", d / "labels.csv", f"--label_names={A},{B}")
    assert r.returncode == 0, r.stdout + r.stderr
    ck = torch.load(tmp_path / "p" / "probe.pt", weights_only=True)
    assert ck["label_names"] == [A, B]
    train = [x for x in rows if x[2] == "train"]
    assert ck["n_train_pos"] == [sum(int(x[3]) for x in train), sum(int(x[4]) for x in train)]


def test_train_probe_with_the_ontology_classes_ignores_other_sparse_columns(cohort, tmp_path):
    """The default classes (the CT ontology columns): the MR-only class and the non-ontology column c
    are not read, and c is still named as ignored."""
    d = cohort[0]
    r = _train(d, tmp_path / "p", d / "labels.csv", "--modality=CT")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ignoring label columns not in the ontology: ['c']" in r.stdout
    assert torch.load(tmp_path / "p" / "probe.pt", weights_only=True)["label_names"] == [A, B]


@pytest.mark.parametrize("args", [[f"--label_names={A},c"], ["--protocol=paper"]])
def test_train_probe_still_refuses_a_used_column_that_is_not_0_or_1(cohort, tmp_path, args):
    """--protocol=paper uses every column: the first sparse one (MR_ONLY) is refused."""
    d, rows = cohort
    r = _train(d, tmp_path / "p", d / "labels.csv", *args)
    bad = "c" if args[0].endswith(",c") else MR_ONLY
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr
    assert _first_bad(d / "labels.csv", rows, bad) in r.stderr
    assert not (tmp_path / "p" / "probe.pt").exists()


def test_evaluate_scores_a_probe_on_a_file_whose_unused_columns_are_sparse(cohort, tmp_path):
    """A probe of A, B scored on labels.csv (c blank for most studies): refused before."""
    d, rows = cohort
    clean = _write(tmp_path / "clean.csv", HEADER[:5], [x[:5] for x in rows])
    r = _train(d, tmp_path / "p", clean, f"--label_names={A},{B}")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _evaluate(d, tmp_path / "p" / "probe.pt", d / "labels.csv", tmp_path / "ev")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]
    test = [x for x in rows if x[2] == "test"]
    ck = torch.load(tmp_path / "p" / "probe.pt", weights_only=True)
    m = P.make_probe(**ck["probe_args"])
    m.load_state_dict(ck["models"][0])
    cache = features.FeatureCache(str(d / "cache"))
    lg = P.predict(m, lambda k: torch.from_numpy(np.asarray(cache.study_tokens(k)[0], np.float32)),
                   [x[0] for x in test])
    for j, n in enumerate((A, B)):
        y = [int(x[3 + j]) for x in test]
        assert res["per_class"][n]["auroc"] == pytest.approx(roc_auc_score(y, lg[:, j]), abs=1e-9)


def test_evaluate_still_refuses_a_scored_column_that_is_not_0_or_1_or_absent(cohort, tmp_path):
    d, rows = cohort
    r = _train(d, tmp_path / "p", d / "full.csv", f"--label_names={A},c")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _evaluate(d, tmp_path / "p" / "probe.pt", d / "labels.csv", tmp_path / "ev")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stdout + r.stderr
    assert _first_bad(d / "labels.csv", rows, "c") in r.stderr
    no_c = _write(tmp_path / "no_c.csv", HEADER[:6], [x[:6] for x in rows])
    r = _evaluate(d, tmp_path / "p" / "probe.pt", no_c, tmp_path / "ev2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"probe label names ['c'] are not columns of {no_c}" in r.stderr + r.stdout
