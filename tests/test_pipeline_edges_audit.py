"""The downstream stages (train_probe.py, evaluate.py) on awkward cohorts: classes the probe could
not learn (no training positives, or only positives), checked against scikit-learn on the saved
probe's own logits; a rerun of evaluate.py killed while writing metrics.json, and --merge of a cut
one; a --names with a path separator; a labels.csv with a split spelt 'validation' or without a
modality column. One synthetic cache and probe (module fixture) serve every test."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from nvfm import features
from nvfm import probe as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["learned", "no_train_pos", "all_train_pos"]


def _run(script, args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """48 CT studies (train/train/val/test), one brain-window volume of 6 tokens each, in a synthetic
    cache; labels.csv with a learnable class, one without training positives and one whose training
    studies are all positive (both have positives and negatives on val and test). Returns the directory."""
    d = tmp_path_factory.mktemp("edges")
    rng = np.random.default_rng(0)
    rows = []
    with features.FeatureWriter(str(d / "cache"), "sha256:synthetic", 8) as w:
        for i in range(48):
            split = ("train", "train", "val", "test")[i % 4]
            y = [int(rng.random() < 0.5), 0 if split == "train" else int(rng.random() < 0.5),
                 1 if split == "train" else int(rng.random() < 0.5)]
            e = rng.normal(size=(6, 8))
            e[0, 0] += 3 * y[0]
            w.add(f"key{i:03d}", [dict(volume_id=f"v{i}", family="CT", window="brain", modality="CT",
                                       coords=np.zeros((6, 3)), emb=e)])
            rows.append([f"key{i:03d}", "CT", split] + y)
    with open(d / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["study_key", "modality", "split"] + CLASSES)
        wr.writerows(rows)
    r = _run("train_probe.py", [f"--features={d / 'cache'}", f"--labels={d / 'labels.csv'}", f"--out={d / 'p'}",
                                "--side_classes=False", "--threads=1", "--hidden=16", "--steps=8", "--eval_interval=4",
                                "--probe=mean_pool", f"--label_names={','.join(CLASSES)}"], d)
    assert r.returncode == 0, r.stdout + r.stderr
    r2 = _run("evaluate.py", [f"--probes={d / 'p' / 'probe.pt'}", f"--labels={d / 'labels.csv'}", f"--out={d / 'ev'}",
                              "--n_boot=200", "--plots=False", "--names=p", "--threads=1", "--laterality="], d)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    return d, rows, r.stdout, r2.stderr


def _logits(d, keys):
    """The saved probe's logits on keys (its forward pass; the figures are what is checked)."""
    ck = torch.load(d / "p" / "probe.pt", weights_only=True)
    m = P.make_probe(**ck["probe_args"])
    m.load_state_dict(ck["models"][0])
    cache = features.FeatureCache(str(d / "cache"))
    return ck, P.predict(m, lambda k: torch.from_numpy(np.asarray(cache.study_tokens(k)[0], np.float32)), keys)


def test_classes_the_probe_never_learned_are_undefined_in_selection_and_evaluation(cohort):
    """A class without training positives (or with only positives) is left out of the loss: its logit is
    an unfitted output. It still counted in the validation macro AUROC that chose the checkpoint, and
    evaluate.py scored it like a learned class (AUROC 0.94 for such a class on a 30-study phantom cohort,
    in the macro AUROC over 5 'defined' classes)."""
    d, rows, train_log, eval_err = cohort
    val = [r[0] for r in rows if r[2] == "val"]
    test = [r[0] for r in rows if r[2] == "test"]
    ck, lv = _logits(d, val)
    assert ck["trained_classes"] == [True, False, False]
    yv = np.array([r[3:] for r in rows if r[2] == "val"])
    assert 0 < yv[:, 1].sum() < len(val) and 0 < yv[:, 2].sum() < len(val)   # defined on val
    # the selection set's macro AUROC is the learned class's alone
    m = re.search(r"selection set \((\d+) studies\): macro AUROC (\S+) over (\d+) defined classes", train_log)
    assert m and int(m[1]) == len(val) and int(m[3]) == 1
    assert float(m[2]) == pytest.approx(roc_auc_score(yv[:, 0], lv[:, 0]), abs=1e-6)
    assert "2 classes have no training positives or no training negatives" in train_log
    # evaluate.py: the two unlearned classes are undefined in every figure, the macros the learned one's
    _, lt = _logits(d, test)
    yt = np.array([r[3:] for r in rows if r[2] == "test"])
    assert 0 < yt[:, 1].sum() < len(test) and 0 < yt[:, 2].sum() < len(test)   # defined on test
    res = json.load(open(d / "ev" / "metrics.json"))["results"]["p"]
    assert "2 classes had no training positives or no training negatives" in eval_err
    assert res["undefined_classes"] == CLASSES[1:]
    au = roc_auc_score(yt[:, 0], lt[:, 0])
    assert res["per_class"]["learned"]["auroc"] == pytest.approx(au, abs=1e-9)
    for n in CLASSES[1:]:
        r = res["per_class"][n]
        assert all(r[f] is None for f in ("auroc", "sensitivity", "specificity", "balanced_accuracy",
                                          "calibrated_f1", "auprc", "pr_lift")), r
        assert r["auroc_ci"] == [None, None] and r["auprc_ci"] == [None, None]
    mac = res["macro"]
    assert mac["auroc"]["n_classes"] == 1 and mac["auroc"]["mean"] == pytest.approx(au, abs=1e-9)
    assert mac["auroc"]["ci"] == pytest.approx(res["per_class"]["learned"]["auroc_ci"])
    assert mac["auprc"]["n_classes"] == 1 and mac["calibrated_f1"]["n_classes"] <= 1


def test_untrained_classes_of_older_probes_are_those_without_training_positives():
    assert P.untrained_classes({"n_train_pos": [3.0, 0.0, 5.0]}).tolist() == [False, True, False]
    assert P.untrained_classes({"n_train_pos": [3.0, 0.0], "trained_classes": [False, True]}).tolist() == [True, False]


def test_a_rerun_killed_while_writing_keeps_metrics_json_and_merge_reads_a_cut_one_in_one_line(cohort, tmp_path,
                                                                                               monkeypatch):
    """metrics.json was written in place: a rerun killed while writing it left it cut short (the previous
    run's figures lost), and --merge of such a file died with a JSONDecodeError traceback (exit status 2)."""
    d = cohort[0]
    sys.path.insert(0, ROOT)
    import evaluate
    from nvfm import metrics
    ev = tmp_path / "ev"
    ev.mkdir()
    old = (d / "ev" / "metrics.json").read_text()
    (ev / "metrics.json").write_text(old)
    for k, v in dict(probes=str(d / "p" / "probe.pt"), labels=str(d / "labels.csv"), out=str(ev), n_boot=0,
                     plots=False, names="p", findings="", features="", split="test", external=False, reports="",
                     merge="", laterality="", device="cpu").items():
        monkeypatch.setattr(evaluate, k, v)
    jsonable = metrics.jsonable

    def killed(x):   # the kill arrives while metrics.json is being written
        if isinstance(x, dict) and "paper_rows" in x:
            raise KeyboardInterrupt
        return jsonable(x)
    monkeypatch.setattr(metrics, "jsonable", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main()
    assert (ev / "metrics.json").read_text() == old
    (ev / "metrics.json").write_text(old[:len(old) // 2])   # a file cut short (an older evaluate.py, a full disk)
    r = _run("evaluate.py", [f"--merge={ev / 'metrics.json'}", f"--out={tmp_path / 'm'}"], tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"--merge: {ev / 'metrics.json'} is not readable JSON" in r.stderr


def test_a_probe_name_with_a_path_separator_is_refused_before_scoring(cohort, tmp_path):
    """--names=jepa/v1 scored the probe, then died at its first plot (roc_jepa/v1.png: no such folder)
    with nothing written and a message about a missing file."""
    d = cohort[0]
    r = _run("evaluate.py", [f"--probes={d / 'p' / 'probe.pt'}", f"--labels={d / 'labels.csv'}",
                             f"--out={tmp_path / 'ev'}", "--n_boot=0", "--names=jepa/v1", "--threads=1"], tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--names: 'jepa/v1' holds a path separator" in r.stderr and "==" not in r.stdout


def test_studies_of_a_split_the_protocol_does_not_read_are_counted(cohort, tmp_path):
    """A labels.csv that spells the validation split 'validation' (preprocess.py keeps it as given): its
    12 studies were dropped with only 'no validation studies' said."""
    d, rows = cohort[0], cohort[1]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["study_key", "modality", "split"] + CLASSES)
        wr.writerows([r[:2] + ["validation" if r[2] == "val" else r[2]] + r[3:] for r in rows])
    r = _run("train_probe.py", [f"--features={d / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", "--side_classes=False", "--threads=1", "--hidden=8",
                                "--steps=2", "--eval_interval=2", "--probe=mean_pool", "--label_names=learned"],
             tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    n = sum(r[2] == "val" for r in rows)
    assert f"warning: {n} CT studies are in splits this protocol does not read ('validation': {n})" in r.stdout


def test_a_labels_file_without_modalities_names_the_reason(cohort, tmp_path):
    """labels.csv without a modality column: the error read 'its studies are : --modality='."""
    d, rows = cohort[0], cohort[1]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["study_key", "split", "learned"])
        wr.writerows([[r[0], r[2], r[3]] for r in rows])
    r = _run("train_probe.py", [f"--features={d / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", "--side_classes=False", "--label_names=learned"], tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no CT studies in" in r.stderr and "no study has a modality (no modality column): --modality=all" in r.stderr


def test_a_failed_reports_part_keeps_the_probe_figures_and_exits_1(cohort, tmp_path):
    """--reports naming a study the ground truth lacks (a ValueError) stopped the run before metrics.json
    was written: the probe figures computed in the same run were lost. Now the probe figures are written,
    the failed part is one line and recorded in metrics.json, and the exit status is 1. The same holds
    for --anatomy (nvfm.anatomy raises ValueError when it has nothing to average)."""
    d, rows = cohort[0], cohort[1]
    with open(tmp_path / "findings.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"study_key": r[0], "split": r[2], "findings": [], "lesions": []}) + "\n")
    (tmp_path / "reports.jsonl").write_text(json.dumps({"study_key": "not-a-study", "findings": []}) + "\n")
    r = _run("evaluate.py", [f"--probes={d / 'p' / 'probe.pt'}", f"--labels={d / 'labels.csv'}",
                             f"--out={tmp_path / 'ev'}", "--n_boot=0", "--plots=False", "--names=p", "--threads=1",
                             "--laterality=", f"--findings={tmp_path / 'findings.jsonl'}",
                             f"--reports={tmp_path / 'reports.jsonl'}"], tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    err = [line for line in r.stderr.splitlines() if "error" in line]
    assert err[0].startswith("evaluate.py: error: --reports: ") and "not-a-study" in err[0], r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["results"]["p"]["per_class"]["learned"]["auroc"] is not None
    assert "not-a-study" in m["summary"]["reports"]["error"] and "reports" not in m["results"]


def test_test_studies_missing_from_the_cache_follow_the_probes_allow_missing(cohort, tmp_path):
    """A test study preprocess.py could not read stays in labels.csv but never reaches the cache. The
    probe could be trained past it (--allow_missing=True), yet evaluate.py refused to score that probe
    at all. Now it leaves such studies out for such a probe (a warning, n_missing), and stays an
    error for a probe trained without it."""
    d, rows = cohort[0], cohort[1]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["study_key", "modality", "split"] + CLASSES)
        wr.writerows(rows + [["unreadable", "CT", "test", 1, 0, 1]])
    r = _run("train_probe.py", [f"--features={d / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", "--side_classes=False", "--threads=1", "--hidden=8",
                                "--steps=2", "--eval_interval=2", "--probe=mean_pool", "--label_names=learned",
                                "--allow_missing=True"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    args = [f"--labels={tmp_path / 'labels.csv'}", "--n_boot=0", "--plots=False", "--threads=1", "--laterality="]
    r = _run("evaluate.py", [f"--probes={tmp_path / 'p' / 'probe.pt'}", f"--out={tmp_path / 'ev'}"] + args, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 test studies are not in the feature cache" in r.stderr and "left out" in r.stderr
    res = next(iter(json.loads((tmp_path / "ev" / "metrics.json").read_text())["results"].values()))
    assert res["n_missing"] == 1 and res["n_studies"] == sum(r[2] == "test" for r in rows)
    r = _run("evaluate.py", [f"--probes={d / 'p' / 'probe.pt'}", f"--out={tmp_path / 'ev2'}"] + args, tmp_path)
    assert r.returncode == 1 and "1 test studies are not in the feature cache" in r.stderr, r.stderr


def test_a_run_where_every_class_is_undefined_exits_1(cohort, tmp_path):
    """Test studies without a positive of any class: every figure is undefined ('0 defined classes'),
    yet evaluate.py exited 0 as if it had scored the probe."""
    d, rows = cohort[0], cohort[1]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["study_key", "modality", "split"] + CLASSES)
        wr.writerows([r[:3] + ([0, 0, 0] if r[2] == "test" else r[3:]) for r in rows])
    r = _run("evaluate.py", [f"--probes={d / 'p' / 'probe.pt'}", f"--labels={tmp_path / 'labels.csv'}",
                             f"--out={tmp_path / 'ev'}", "--n_boot=0", "--plots=False", "--names=p", "--threads=1",
                             "--laterality="], tmp_path)
    assert r.returncode == 1 and "no probe has a class with positives and negatives" in r.stderr, r.stderr
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["results"]["p"]["macro"]["auroc"]["n_classes"] == 0
