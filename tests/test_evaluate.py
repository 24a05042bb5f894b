"""evaluate.py: ROC bands against resampled sklearn curves, the table's columns, probe names,
a reports-only run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from nvfm import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402  (configure() reads no argv when imported)


def test_roc_band_equals_percentiles_of_resampled_sklearn_curves():
    rng = np.random.default_rng(0)
    y = (rng.random(70) < 0.3).astype(int)
    s = np.round(y * 1.2 + rng.normal(size=70), 1)                # ties
    grid = np.linspace(0, 1, 21)
    g, lo, hi, nv = metrics.roc_band(y, s, n_boot=150, seed=3, fpr_grid=grid, chunk=40)
    w = metrics.bootstrap_counts(70, 150, seed=3).long().numpy()
    curves = []
    for r in range(150):
        idx = np.repeat(np.arange(70), w[:, r])
        if 0 < y[idx].sum() < len(idx):
            fpr, tpr, _ = roc_curve(y[idx], s[idx], drop_intermediate=False)
            curves.append([tpr[fpr <= x].max() for x in grid])   # best sensitivity at FPR <= x
    ref_lo, ref_hi = np.percentile(np.array(curves), [2.5, 97.5], axis=0)
    assert nv == len(curves) and np.array_equal(g, grid)
    np.testing.assert_allclose(lo, ref_lo, rtol=0, atol=1e-12)
    np.testing.assert_allclose(hi, ref_hi, rtol=0, atol=1e-12)
    assert (lo <= hi).all() and hi[-1] == 1.0


def _result(n_boot=200):
    rng = np.random.default_rng(1)
    y = (rng.random((150, 4)) < [0.3, 0.2, 0.0, 0.5]).astype(int)   # class 2: no test positives
    s = y * 1.5 + rng.normal(size=(150, 4))
    thr = np.zeros(4)
    names = ["intraparenchymal_hemorrhage", "meningioma", "pineal_tumor", "cerebral_atrophy"]
    res = metrics.classification_report(y, s, thr, names, n_boot=n_boot, seed=0)
    metrics.add_calibrated_f1(res, y, 1 / (1 + np.exp(-s)), [40, 30, 5, 60])
    res.update(display="p", kind="attentive_mil", protocol="train/val/test", modality="CT", eval_modality="CT",
               n_studies=150, n_models=1, task="diagnosis")
    return res, dict(y=y, logits=s, ck={"label_names": names, "n_train_pos": [40, 30, 5, 60]}), thr


def test_table_shows_sens_spec_cis_and_keeps_columns_aligned():
    res, _, _ = _result()
    lines = evaluate.table(res).splitlines()
    rows = lines[1:6]                                   # header + 4 classes
    assert len({len(r) for r in rows}) == 1, rows       # "undefined" cells keep the widths
    row = {r.split()[0]: r for r in rows[1:]}
    assert row["pineal_tumor"].count("undefined") == 5  # AUROC, sens, spec, bacc, calibrated F1
    for n in ("intraparenchymal_hemorrhage", "meningioma"):
        pc = res["per_class"][n]
        for m in ("sensitivity", "specificity"):
            lo, hi = pc[m + "_ci"]
            assert f"{pc[m]:.2f} [{lo:.2f}, {hi:.2f}]" in row[n]
    for m in ("sensitivity", "specificity"):
        mac = res["macro"][m]
        assert f"{m} {mac['mean']:.2f} [{mac['ci'][0]:.2f}, {mac['ci'][1]:.2f}]" in lines[6]
    assert "calibrated F1 " in lines[6] and "over 3 defined classes; 1 undefined" in lines[6]


def test_roc_plot_writes_bands_and_operating_points(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    res, data, thr = _result()
    monkeypatch.setattr(evaluate, "out", str(tmp_path))
    monkeypatch.setattr(evaluate, "n_boot", 200)
    saved = {}
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: saved.setdefault(len(saved), fig))
    paths = evaluate.plot(res, data)
    monkeypatch.setattr(plt, "close", real_close)
    assert paths == [str(tmp_path / "roc_p.png"), str(tmp_path / "label_efficiency_p.png")]
    assert all(os.path.getsize(p) > 0 for p in paths)
    ax = saved[0].axes[0]
    assert len(ax.collections) == 3                     # one CI band per defined class
    dots = [ln for ln in ax.lines if ln.get_marker() == "o"]
    got = sorted((float(d.get_xdata()[0]), float(d.get_ydata()[0])) for d in dots)
    y, s = data["y"], data["logits"]
    ref = sorted((1 - (~(s[:, k] >= thr[k]) & (y[:, k] == 0)).sum() / (y[:, k] == 0).sum(),   # 1 - specificity
                  ((s[:, k] >= thr[k]) & (y[:, k] == 1)).sum() / y[:, k].sum()) for k in (0, 1, 3))
    np.testing.assert_allclose(got, ref, atol=1e-12)
    for f in saved.values():
        real_close(f)


def test_probe_display_names_never_collide():
    paths = ["out/a/probe/probe.pt", "out/b/probe/probe.pt", "out/c/other/probe.pt"]
    assert evaluate.display_names(paths, "") == ["probe", "probe-2", "other"]
    assert evaluate.display_names(paths, "x,y,z") == ["x", "y", "z"]
    with pytest.raises(SystemExit, match="repeats \\['x'\\]"):
        evaluate.display_names(paths, "x,y,x")
    with pytest.raises(SystemExit, match="2 names for 3 probes"):
        evaluate.display_names(paths, "x,y")


def _run(args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py")] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_reports_only_run_writes_its_table_and_claims_no_plots(tmp_path):
    truth = [{"study_key": "a", "split": "test", "findings": ["Acute left subdural hematoma."], "triage": "urgent",
              "lesions": []},
             {"study_key": "b", "split": "test", "findings": [], "triage": "unremarkable", "lesions": []}]
    (tmp_path / "findings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in truth))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps({"study_key": r["study_key"], "findings": r["findings"]}) + "\n"
                                              for r in truth))
    r = _run([f"--reports={tmp_path / 'r.jsonl'}", f"--findings={tmp_path / 'findings.jsonl'}",
              f"--out={tmp_path / 'ev'}"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    table = (tmp_path / "ev" / "table.txt").read_text()
    assert "BLEU-2 1.000" in table and "triage accuracy 1.000" in table and "1 with both reports empty" in table
    assert "PNG" not in r.stdout and not list((tmp_path / "ev").glob("*.png"))
    m = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["reports"]
    assert m["n_both_empty"] == 1 and m["bleu2"] == pytest.approx(1.0)
    r = _run([f"--reports={tmp_path / 'r.jsonl'}", f"--findings={tmp_path / 'findings.jsonl'}",
              f"--out={tmp_path / 'ev2'}", "--n_boot=50"], tmp_path)
    assert r.returncode != 0 and "at least 100 replicates" in r.stderr


def test_merge_refuses_two_runs_with_the_same_row_and_column(tmp_path, monkeypatch, capsys):
    """Two datasets' runs both named after SHARDS/labels.csv ("labels") used to share every row,
    and the second run's figures silently replaced the first's in paper_table.md."""
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps({"paper_rows": [["labels: macro AUROC", {"pretrained": "0.900 [0.800, 0.950]"}]]}))
    b.write_text(json.dumps({"paper_rows": [["labels: macro AUROC", {"pretrained": "0.600 [0.500, 0.700]"}]]}))
    c.write_text(json.dumps({"paper_rows": [["labels: macro AUROC", {"random_init": "0.550 [0.450, 0.650]"}]]}))
    monkeypatch.setattr(evaluate, "out", str(tmp_path / "m"))
    for pair in ((a, b), (a, a)):
        monkeypatch.setattr(evaluate, "merge", f"{pair[0]},{pair[1]}")
        with pytest.raises(SystemExit, match=rf"{pair[1]} and {pair[0]} both hold .*'labels: macro AUROC'.*"
                                             r"'pretrained'.*--task_name"):
            evaluate.merge_tables()
        assert not (tmp_path / "m" / "paper_table.md").exists()
    monkeypatch.setattr(evaluate, "merge", f"{a},{c}")             # another encoder: one row, two columns
    evaluate.merge_tables()
    assert "| labels: macro AUROC | 0.900 [0.800, 0.950] | 0.550 [0.450, 0.650] |" in (tmp_path / "m" / "paper_table.md").read_text()


def _tiny_run(d, names=("intraparenchymal_hemorrhage", "cerebral_atrophy"), n=30, eval_modality="CT", task="classify"):
    """A random-weight mean-pool probe over a synthetic 4-d feature cache of n studies (CT, split
    test; with every 5th study MR), its labels.csv (0/1 columns, age) and findings.jsonl (the odd
    studies have a left lesion). Returns (probe.pt path, labels.csv rows as lists, header)."""
    import csv
    import torch
    from nvfm import features
    from nvfm import probe as P
    rng = np.random.default_rng(0)
    cols = [c for c in names if c not in P.SIDE_CLASSES and c != "age"]
    keys = [f"k{i:02d}" for i in range(n)]
    with features.FeatureWriter(str(d / "cache"), "sha256:tiny", 4) as w:
        for k in keys:
            w.add(k, [dict(volume_id=k, family="CT", window="brain", modality="CT", coords=np.zeros((3, 3)),
                           emb=rng.normal(size=(3, 4)))])
    header = ["study_key", "modality", "split", "age"] + cols
    rows = [[k, "MR" if i % 5 == 4 else "CT", "test", 40 + i] + [int(v) for v in rng.random(len(cols)) < 0.5]
            for i, k in enumerate(keys)]
    with open(d / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    with open(d / "findings.jsonl", "w") as f:
        for i, k in enumerate(keys):
            f.write(json.dumps({"study_key": k, "findings": [], "lesions": [{"diagnosis": "meningioma", "side": "left"}]
                                if i % 2 else []}) + "\n")
    K = len(names)
    torch.manual_seed(0)
    m = P.make_probe("mean_pool", 4, K)
    ck = dict(models=[m.state_dict()], probe_args=dict(kind="mean_pool", dim=4, n_out=K, hidden=0, dropout=0.0),
              task=task, label_names=list(names), modality=eval_modality, eval_modality=eval_modality,
              encoder_hash="sha256:tiny", features=str(d / "cache"), windows="", protocol="train/val/test splits",
              thresholds=[0.0] * K, platt_a=[1.0] * K, platt_b=[0.0] * K, n_train_pos=[5.0] * K, age_mu=60.0, age_sd=10.0)
    torch.save(ck, d / f"probe_{eval_modality}.pt")
    return str(d / f"probe_{eval_modality}.pt"), rows, header


def _settings(monkeypatch, d, **kw):
    for k, v in dict(dict(labels=str(d / "labels.csv"), out=str(d / "ev"), n_boot=0, plots=False, device="cpu",
                          findings="", names="p", split="test", external=False, reports="", merge=""), **kw).items():
        monkeypatch.setattr(evaluate, k, v)


def _write_labels(d, header, rows):
    import csv
    with open(d / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)


def test_duplicate_study_keys_in_labels_are_an_error(tmp_path, monkeypatch):
    """A study key on two rows of labels.csv used to keep only the last row's labels (and split)."""
    pt, rows, header = _tiny_run(tmp_path)
    _settings(monkeypatch, tmp_path, probes=pt)
    evaluate.main()
    n = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]["n_studies"]
    assert n == 24                                                  # the CT studies of split test
    dup = rows + [rows[0][:4] + [1 - v for v in rows[0][4:]]]        # k00 again, labels flipped
    _write_labels(tmp_path, header, dup)
    with pytest.raises(SystemExit, match=r"labels.csv: study_key 'k00' is on 2 rows"):
        evaluate.main()


def test_side_classes_without_their_findings_are_an_error_not_all_negative(tmp_path, monkeypatch):
    """lesion_left / lesion_right come from findings.jsonl; without it (or a study) they used to
    be all 0, so the classes were reported undefined (or a left lesion counted as a negative)."""
    pt, rows, header = _tiny_run(tmp_path, names=("intraparenchymal_hemorrhage", "lesion_left", "lesion_right"))
    _settings(monkeypatch, tmp_path, probes=pt)
    evaluate.main()
    res = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]
    assert res["per_class"]["lesion_left"]["n_pos"] == 12 and res["per_class"]["lesion_left"]["auroc"] is not None
    lines = (tmp_path / "findings.jsonl").read_text().splitlines()
    (tmp_path / "findings.jsonl").write_text("\n".join(lines[:-3]) + "\n")   # k27 (left lesion), k28, k29 (MR) lost
    with pytest.raises(SystemExit, match=r"2 of the 24 evaluated studies are not in .*findings.jsonl.*'k27', 'k28'"):
        evaluate.main()
    os.remove(tmp_path / "findings.jsonl")
    with pytest.raises(SystemExit, match=r"side classes \['lesion_left', 'lesion_right'\] need .*findings.jsonl"):
        evaluate.main()


def test_non_finite_age_is_an_error_naming_the_labels_file(tmp_path, monkeypatch):
    pt, rows, header = _tiny_run(tmp_path, names=("age",), task="age")
    _settings(monkeypatch, tmp_path, probes=pt)
    evaluate.main()
    res = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]
    assert res["n"] == 24 and res["mae"] > 0
    rows[3][3] = "nan"
    _write_labels(tmp_path, header, rows)
    with pytest.raises(SystemExit, match=r"labels.csv: study 'k03' has age nan"):
        evaluate.main()


def test_probes_scored_on_different_studies_are_flagged(tmp_path, monkeypatch, capsys):
    """A CT probe (24 studies) and an all-modality probe (30) used to share paper-table rows and the
    summary with nothing saying their figures come from different cohorts."""
    import torch
    pt, rows, header = _tiny_run(tmp_path)
    ck = torch.load(pt, weights_only=True)
    torch.save(dict(ck, eval_modality="all"), tmp_path / "probe_all.pt")
    _settings(monkeypatch, tmp_path, probes=f"{pt},{pt}", names="a,b")
    evaluate.main()
    assert "different studies" not in capsys.readouterr().err
    assert "studies_differ" not in json.load(open(tmp_path / "ev" / "metrics.json"))["summary"]
    _settings(monkeypatch, tmp_path, probes=f"{pt},{tmp_path / 'probe_all.pt'}", names="a,b")
    evaluate.main()
    err = capsys.readouterr().err
    assert "warning: the classification probes are scored on different studies (a 24, b 30; 24 in all)" in err
    assert json.load(open(tmp_path / "ev" / "metrics.json"))["summary"]["studies_differ"] == {"a": 24, "b": 30}
    assert "different studies (a 24, b 30; 24 in all)" in (tmp_path / "ev" / "paper_table.md").read_text()


def test_evaluating_the_selection_split_is_flagged(tmp_path, monkeypatch, capsys):
    """--split=val scores a split-protocol probe where its thresholds and calibration were chosen:
    optimistic sensitivity / specificity, used to be reported like held-out figures."""
    pt, rows, header = _tiny_run(tmp_path)
    _settings(monkeypatch, tmp_path, probes=pt)
    evaluate.main()
    assert "in_sample" not in json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]
    _write_labels(tmp_path, header, [r[:2] + ["val"] + r[3:] for r in rows])
    _settings(monkeypatch, tmp_path, probes=pt, split="val")
    evaluate.main()
    assert "p: split 'val' is where the probe's checkpoint, thresholds and calibration were chosen" in capsys.readouterr().err
    assert json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]["in_sample"] == "val"
    assert "in-sample" in (tmp_path / "ev" / "table.txt").read_text()


def test_external_run_on_the_probes_own_dataset_is_flagged(tmp_path, monkeypatch, capsys):
    """--external=True scores every study of --labels; given the CV probe's own labels that is its
    training and selection studies too (its held-out test keys are among them), used to be silent."""
    import torch
    pt, rows, header = _tiny_run(tmp_path)
    torch.save(dict(torch.load(pt, weights_only=True), test_keys=["k00", "k01", "k02"], protocol="2-fold CV"), pt)
    _settings(monkeypatch, tmp_path, probes=pt, external=True)
    evaluate.main()
    assert "3 of its 24 studies share a study or subject with the probe's own dataset" in capsys.readouterr().err
    res = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]
    assert res["in_sample"] == "external" and res["n_studies"] == 24
    assert "[in-sample: --labels is the probe's own dataset]" in (tmp_path / "ev" / "table.txt").read_text()
    _settings(monkeypatch, tmp_path, probes=pt)                   # its own held-out studies: not in-sample
    evaluate.main()
    assert "in_sample" not in json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]


def test_report_table_says_undefined_for_a_nan_rate():
    """evaluate_reports returns NaN for a rate with no denominator (null in metrics.json); the
    table printed 'laterality error nan' where every other table says 'undefined'."""
    from nvfm import report_metrics as rm
    m = rm.evaluate_report_lists([[]], [{"study_key": "a", "findings": [], "triage": "unremarkable"}])
    text = evaluate.report_table(m)
    assert "laterality error undefined" in text and "nan" not in text


def test_reports_are_scored_on_the_chosen_split_only(tmp_path, monkeypatch, capsys):
    """--reports scored every study of the reports file whatever --split said: val reports (perfect)
    and test reports (all missed) blended into omission 0.5 labelled only '8 studies'."""
    truth = [{"study_key": f"{sp[0]}{i}", "split": sp, "findings": ["Left acute subdural hematoma."],
              "lesions": [{"diagnosis": "acute_subdural_hematoma", "side": "left"}]}
             for sp in ("val", "test") for i in range(4)]
    reps = [{"study_key": t["study_key"], "findings": t["findings"] if t["split"] == "val" else []} for t in truth]
    (tmp_path / "findings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in truth))
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reps))
    _settings(monkeypatch, tmp_path, probes="", names="", labels="", reports=str(tmp_path / "r.jsonl"),
              findings=str(tmp_path / "findings.jsonl"))
    evaluate.main()
    m = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["reports"]
    # hand-worked: the 4 test studies, each with its one (urgent) positive omitted
    assert (m["n_studies"], m["omission_rate"], m["urgent_omission_rate"], m["split"]) == (4, 1.0, 1.0, "test")
    table = (tmp_path / "ev" / "table.txt").read_text()
    assert "== reports  (split test, 4 studies, judge rules; 4 reports of other splits not scored)" in table
    monkeypatch.setattr(evaluate, "split", "val,test")
    evaluate.main()
    m = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["reports"]
    assert (m["n_studies"], m["omission_rate"], m["split"]) == (8, 0.5, "test/val")
    # a test study without a report: refused, as studies missing from the feature cache are for probes
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reps[:-1]))
    monkeypatch.setattr(evaluate, "split", "test")
    with pytest.raises(SystemExit, match=r"r.jsonl: 1 of the 4 test studies of .*findings.jsonl have no report "
                                         r"\(first: \['t3'\]\)"):
        evaluate.main()


def test_held_out_studies_of_another_modality_than_the_eval_modality_are_refused(tmp_path, monkeypatch):
    """A CV probe trained on CT with --transfer_to=MR held out CT studies; evaluate.py scored them and
    printed the figures as 'CT -> MR' (eval_modality MR) transfer figures."""
    import torch
    pt, rows, header = _tiny_run(tmp_path)                        # k04, k09, ... are MR; the rest CT
    ck = torch.load(pt, weights_only=True)
    torch.save(dict(ck, test_keys=["k00", "k01", "k02", "k03"], protocol="2-fold CV"), pt)
    _settings(monkeypatch, tmp_path, probes=pt)
    evaluate.main()                                               # CT probe, CT held-out studies: scored
    assert json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]["n_studies"] == 4
    torch.save(dict(ck, test_keys=["k00", "k01", "k02", "k03"], protocol="2-fold CV", modality="CT",
                    eval_modality="MR"), pt)
    os.remove(tmp_path / "ev" / "metrics.json")
    with pytest.raises(SystemExit, match=r"4 of the probe's 4 held-out test studies are not MR studies in .*labels.csv "
                                         r"\(first: 'k00', CT\), but the probe is scored as CT -> MR"):
        evaluate.main()
    assert not (tmp_path / "ev" / "metrics.json").exists()
    torch.save(dict(ck, test_keys=["k04", "k09"], protocol="2-fold CV", modality="CT", eval_modality="MR"), pt)
    with pytest.raises(SystemExit, match="no probe has a class with positives and negatives"):
        evaluate.main()                                           # MR held-out studies of a CT -> MR probe: scored,
    res = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]   # two studies: no class defined
    assert res["n_studies"] == 2 and res["eval_modality"] == "MR"


def test_paper_table_marks_in_sample_rows_and_merge_keeps_the_mark(tmp_path, monkeypatch):
    """--split=val: table.txt and metrics.json said in-sample, paper_table.md printed the same figures
    under 'bootstrap of the held-out test set' with no mark (and so did --merge)."""
    pt, rows, header = _tiny_run(tmp_path)
    _settings(monkeypatch, tmp_path, probes=pt, task_name="held")
    evaluate.main()                                               # split test: held out, no mark
    held = (tmp_path / "ev" / "paper_table.md").read_text()
    assert "in-sample" not in held and held.startswith("95% CIs: study-level bootstrap of the held-out test set")
    os.rename(tmp_path / "ev" / "metrics.json", tmp_path / "held.json")
    _write_labels(tmp_path, header, [r[:2] + ["val"] + r[3:] for r in rows])
    _settings(monkeypatch, tmp_path, probes=pt, split="val", task_name="val")
    evaluate.main()
    text = (tmp_path / "ev" / "paper_table.md").read_text()
    body = [ln for ln in text.splitlines() if ln.startswith("| val: ")]
    assert len(body) == 7 and all(ln.split(" | ")[0].endswith("(in-sample: val)") for ln in body)   # macro, 2 x 3
    assert "| val: macro AUROC (in-sample: val) |" in text
    assert "except in rows marked in-sample" in text.splitlines()[0]
    merged = tmp_path / "m"
    _settings(monkeypatch, tmp_path, out=str(merged),
              merge=f"{tmp_path / 'held.json'},{tmp_path / 'ev' / 'metrics.json'}")
    evaluate.main()
    text = (merged / "paper_table.md").read_text()
    assert "| val: macro AUROC (in-sample: val) |" in text and "| held: macro AUROC |" in text
    assert "except in rows marked in-sample" in text.splitlines()[0]
    # --external on the probe's own dataset: marked too
    import torch
    torch.save(dict(torch.load(pt, weights_only=True), test_keys=["k00", "k01"], protocol="2-fold CV"), pt)
    _settings(monkeypatch, tmp_path, probes=pt, external=True, task_name="ext")
    evaluate.main()
    text = (tmp_path / "ev" / "paper_table.md").read_text()
    assert "| ext: macro AUROC (external; in-sample: the probe's own dataset) |" in text


def test_external_run_sharing_training_studies_or_subjects_is_flagged(tmp_path, monkeypatch, capsys):
    """A split-protocol probe has no test keys: --external=True on the labels it was trained on (or
    on a dataset sharing its subjects) used to pass for an external run. train_probe.py records
    seen_keys / seen_subjects; studies matching either are counted (by hand below)."""
    import torch
    pt, rows, header = _tiny_run(tmp_path)
    ck = torch.load(pt, weights_only=True)
    _write_labels(tmp_path, ["subject"] + header, [[f"s{i // 2}"] + r for i, r in enumerate(rows)])
    # CT studies are scored (k04, k09, ... are MR); subject s<i // 2>: s0 = k00 k01, s2 = k04 k05
    for seen, subjects, want in ((["k00", "k04"], [], 1),           # k04 is MR: not scored
                                 ([], ["s0", "s2"], 3),             # k00 k01 k05
                                 (["k01"], ["s0"], 2),              # k00 k01, each once
                                 ([], [], 0)):
        torch.save(dict(ck, seen_keys=seen, seen_subjects=subjects), pt)
        _settings(monkeypatch, tmp_path, probes=pt, external=True)
        evaluate.main()
        res = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]
        err = capsys.readouterr().err
        if want:
            assert f"{want} of its 24 studies share a study or subject" in err and res["in_sample"] == "external"
        else:
            assert "share a study or subject" not in err and "in_sample" not in res


def test_studies_sharing_subjects_get_a_subject_level_bootstrap(tmp_path, monkeypatch):
    """labels.csv's subject column gives several test studies to one subject (as RSNA's): every CI
    resamples subjects (a cluster bootstrap), metrics.json / table.txt say so, paper_table.md's first
    line too (and after --merge), and the intervals differ from the study-level ones, which stay
    exactly as before when no subject has two evaluated studies."""
    pt, rows, header = _tiny_run(tmp_path, names=("intraparenchymal_hemorrhage", "cerebral_atrophy"))
    _settings(monkeypatch, tmp_path, probes=pt, n_boot=300, task_name="rsna")

    def run(subjects):
        _write_labels(tmp_path, header + ["subject"], [r + [subjects(i)] for i, r in enumerate(rows)])
        evaluate.main()
        m = json.load(open(tmp_path / "ev" / "metrics.json"))
        return (m, (tmp_path / "ev" / "table.txt").read_text(), (tmp_path / "ev" / "paper_table.md").read_text())

    _write_labels(tmp_path, header, rows)                              # no subject column
    evaluate.main()
    plain = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]
    study, study_table, study_paper = run(lambda i: f"s{i}")           # one study a subject
    assert study["results"]["p"] == plain and plain["ci_unit"] == "study"
    assert "CI bootstrap unit: study)" in study_table
    assert study_paper.startswith("95% CIs: study-level bootstrap of the held-out test set")
    subj, subj_table, subj_paper = run(lambda i: f"s{i // 6}")         # 5 subjects, 4-5 CT test studies each
    r = subj["results"]["p"]
    assert r["ci_unit"] == "subject (5 subjects of 24 studies)" and subj["paper_ci_units"] == {"rsna": ["subject"]}
    assert "CI bootstrap unit: subject (5 subjects of 24 studies))" in subj_table
    assert subj_paper.startswith("95% CIs: subject-level (cluster) bootstrap")
    assert "study-level" not in subj_paper.splitlines()[0]
    # the same point estimates, other intervals: those of the cluster bootstrap over the same studies
    n = "intraparenchymal_hemorrhage"
    assert r["per_class"][n]["auroc"] == plain["per_class"][n]["auroc"]
    for m in ("auroc_ci", "sensitivity_ci", "specificity_ci", "auprc_ci", "pr_lift_ci"):
        assert r["per_class"][n][m] != plain["per_class"][n][m], m
    assert r["macro"]["auroc"]["ci"] != plain["macro"]["auroc"]["ci"]
    # every CI helper got the evaluated studies' subjects, in the order of their rows (the CT test studies)
    seen = {}
    for f in ("classification_report", "pr_report", "laterality_report", "roc_band", "pr_band"):
        def spy(*a, _f=getattr(metrics, f), _name=f, **kw):
            seen.setdefault(_name, []).append(list(kw.get("groups") or []))
            return _f(*a, **kw)
        monkeypatch.setattr(metrics, f, spy)
    monkeypatch.setattr(evaluate, "plots", True)
    monkeypatch.setattr(evaluate, "laterality", "intraparenchymal_hemorrhage:cerebral_atrophy:cerebral_atrophy")
    run(lambda i: f"s{i // 6}")
    want = [f"s{i // 6}" for i, row in enumerate(rows) if row[1] == "CT"]
    assert set(seen) == {"classification_report", "pr_report", "laterality_report", "roc_band", "pr_band"}
    assert all(g == want for calls in seen.values() for g in calls)
    monkeypatch.undo()
    # --merge keeps the unit in the first line; a study-level run beside it makes it say both
    _settings(monkeypatch, tmp_path, probes=pt, n_boot=300, task_name="rsna")
    run(lambda i: f"s{i // 6}")
    os.rename(tmp_path / "ev" / "metrics.json", tmp_path / "subj.json")
    _settings(monkeypatch, tmp_path, probes=pt, n_boot=300, task_name="other")
    run(lambda i: "")
    os.rename(tmp_path / "ev" / "metrics.json", tmp_path / "study.json")
    _settings(monkeypatch, tmp_path, out=str(tmp_path / "m"), merge=f"{tmp_path / 'subj.json'}")
    evaluate.main()
    assert (tmp_path / "m" / "paper_table.md").read_text().startswith("95% CIs: subject-level (cluster) bootstrap")
    _settings(monkeypatch, tmp_path, out=str(tmp_path / "m"), merge=f"{tmp_path / 'subj.json'},{tmp_path / 'study.json'}")
    evaluate.main()
    head = (tmp_path / "m" / "paper_table.md").read_text().splitlines()[0]
    assert head.startswith("95% CIs: subject-level (cluster) bootstrap in rsna") and "study-level bootstrap elsewhere" in head


def test_a_cut_feature_cache_is_a_one_line_error(tmp_path, monkeypatch):
    """A cache whose data file is shorter than its index used to reach the probe as a traceback
    (or, before the reader checked sizes, as zeros)."""
    pt, rows, header = _tiny_run(tmp_path)
    _settings(monkeypatch, tmp_path, probes=pt)
    size = os.path.getsize(tmp_path / "cache" / "emb.f16")
    with open(tmp_path / "cache" / "emb.f16", "r+b") as f:
        f.truncate(size - 2)
    with pytest.raises(SystemExit, match=rf"emb.f16 is {size - 2} bytes") as e:
        evaluate.main()
    assert "\n" not in str(e.value.code)


def test_report_text_metrics_read_words_of_any_script_and_decomposed_accents():
    """--reports' METEOR tokens were ASCII letter runs, every other letter a token of its own: Cyrillic
    "Гематома слева." against "Гематома справа." scored 0.686 as matched single letters, where the words
    (hand-worked: 2 of 3 tokens matched in 2 chunks, F = 2/3, penalty 0.5) give 1/3. A decomposed accent
    ('e' + U+0301) against the composed letter split a word for BLEU-2 and METEOR, not for ROUGE-L."""
    from nvfm import report_metrics as rm
    if rm.wordnet_missing() is not None:
        pytest.skip(rm.wordnet_missing())
    m = rm.text_metrics([["Гематома слева."]], [["Гематома справа."]])
    assert m["meteor"] == pytest.approx(1 / 3, abs=1e-12)
    # the same text composed and decomposed: identical reports, 3 tokens in 1 chunk (penalty 0.5 / 27)
    m = rm.text_metrics([["H\u00e9matome gauche."]], [["He\u0301matome gauche."]])
    assert m["bleu2"] == pytest.approx(1.0) and m["rougeL"] == pytest.approx(1.0)
    assert m["meteor"] == pytest.approx(1 - 0.5 / 27, abs=1e-12)
    assert rm.meteor_tokens("left-sided 9mm SDH_x, (ICH)") == ["left", "-", "sided", "9mm", "sdh", "_", "x", ",", "(",
                                                              "ich", ")"]


def test_a_finding_stated_bilaterally_has_a_side():
    """"Subdural hematomas bilaterally." named the hematoma without a side ('bilaterally' was no side
    word), so a report calling a left-sided hematoma bilateral stated no side: laterality error rate
    NaN over 0 sided mentions instead of 1 error in 1 (bilateral is not left)."""
    from nvfm import report_metrics as rm
    assert rm.extract_diagnoses("SDHs bilaterally.") == [("subdural_hematoma", "bilateral")]
    m = rm.evaluate_report_lists([["Subdural hematomas bilaterally."], ["Right subdural hematoma."]],
                                 [dict(findings=["Left subdural hematoma."]), dict(findings=["Right subdural hematoma."])])
    assert (m["n_sided"], m["laterality_error_rate"]) == (2, 0.5)


def test_report_text_metrics_keep_the_vowel_signs_of_indic_words():
    """ROUGE-L and METEOR tokens split words at combining marks (re's \\w has none), the vowel signs and
    virama of Devanagari: "रक्तस्राव बाएं" (hemorrhage, left) against "रक्तस्राव दाएं" (hemorrhage, right) were
    6 tokens each, 5 shared: ROUGE-L 0.833, METEOR 0.905. As the two words each they are (hand-worked,
    1 of 2 words matched): ROUGE-L F 1/2, METEOR F 1/2 x (1 - 0.5 (1/1)^3) = 1/4."""
    from nvfm import report_metrics as rm
    h, r = "रक्तस्राव बाएं", "रक्तस्राव दाएं"
    assert rm.RougeTokenizer().tokenize(h) == rm.meteor_tokens(h) == h.split()
    m = rm.text_metrics([[h]], [[r]])
    assert m["rougeL"] == pytest.approx(0.5, abs=1e-12)
    if rm.wordnet_missing() is None:
        assert m["meteor"] == pytest.approx(0.25, abs=1e-12)
