"""evaluate.py's scoring against independent computations: a mean-pool probe's logits worked out
in numpy from the embeddings written to the cache and the checkpoint's weights, matched to
labels.csv rows by study key, and scored with scikit-learn / scipy; studies without tokens."""
import csv
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import average_precision_score, f1_score, mean_absolute_error, mean_squared_error, roc_auc_score

from nvfm import features, metrics
from nvfm import probe as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402

CLASSES = ["intraparenchymal_hemorrhage", "cerebral_atrophy"]


def _cohort(d, n=48, seed=0, precision=None):
    """A cache of n studies written in key order (every 4th MR with an `mr` window, the rest CT with
    a `brain` window, 2-6 tokens each, float16) and a labels.csv with its rows in another order, the
    splits cycling test/train/val/test (so every MR study is a test study); precision: the cache's
    recorded one (None: not recorded). Returns (embeddings {key: (n_tok, 4) float64 as stored}, rows)."""
    rng = np.random.default_rng(seed)
    keys = [f"s{i:03d}" for i in range(n)]
    emb, rows = {}, []
    with features.FeatureWriter(str(d / "cache"), "sha256:tiny", 4, precision=precision) as w:
        for i, k in enumerate(keys):
            mr = i % 4 == 3
            e = rng.normal(size=(int(rng.integers(2, 7)), 4)).astype(np.float16)
            emb[k] = e.astype(np.float64)
            w.add(k, [dict(volume_id=k, family="MR" if mr else "CT", window="mr" if mr else "brain",
                           modality="MR" if mr else "CT", coords=np.zeros((len(e), 3)), emb=e)])
            rows.append(dict(study_key=k, modality="MR" if mr else "CT", split=("test", "train", "val", "test")[i % 4],
                             age=round(30 + 50 * rng.random(), 1), y=[int(v) for v in rng.random(2) < 0.4]))
    order = rng.permutation(n)   # labels.csv rows in another order than the cache
    with open(d / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["study_key", "modality", "split", "age"] + CLASSES)
        for j in order:
            r = rows[j]
            wr.writerow([r["study_key"], r["modality"], r["split"], r["age"]] + r["y"])
    return emb, {r["study_key"]: r for r in rows}


def _probe(d, name, n_models=1, K=2, task="classify", seed=1, **kw):
    """A mean-pool probe.pt with random (not default) LayerNorm and head weights; -> (path, state dicts)."""
    torch.manual_seed(seed)
    states = []
    for _ in range(n_models):
        m = P.make_probe("mean_pool", 4, K)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        states.append(m.state_dict())
    ck = dict(models=states, probe_args=dict(kind="mean_pool", dim=4, n_out=K, hidden=0, dropout=0.0), task=task,
              label_names=CLASSES[:K] if task == "classify" else ["age"], modality="CT", eval_modality="CT",
              encoder_hash="sha256:tiny", features=str(d / "cache"), windows="", protocol="train/val/test splits",
              thresholds=[0.3, -0.4][:K], platt_a=[1.7, 0.6][:K], platt_b=[-0.5, 0.8][:K], n_train_pos=[7.0, 20.0][:K],
              age_mu=55.0, age_sd=12.0)
    ck.update(kw)
    torch.save(ck, d / name)
    return str(d / name), states


def _numpy_logits(state, x):
    """MeanPool in numpy: mean over tokens of LayerNorm(x) (eps 1e-5, biased variance), then linear."""
    sd = {k: v.double().numpy() for k, v in state.items()}
    h = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5) * sd["norm.weight"] + sd["norm.bias"]
    return sd["head.weight"] @ h.mean(0) + sd["head.bias"]


def _settings(monkeypatch, d, **kw):
    for k, v in dict(dict(labels=str(d / "labels.csv"), out=str(d / "ev"), n_boot=0, plots=False, device="cpu",
                          findings="", names="p", split="test", external=False, reports="", merge="", features="",
                          laterality=""), **kw).items():
        monkeypatch.setattr(evaluate, k, v)


def _results(d):
    return json.load(open(d / "ev" / "metrics.json"))["results"]


def _check_classification(res, keys, rows, logits, thr, a, b, names):
    """Every per-class figure of `res` from sklearn / numpy on the given keys' labels and logits."""
    y = np.array([rows[k]["y"] for k in keys])[:, [CLASSES.index(n) for n in names]]
    assert res["n_studies"] == len(keys)
    for j, n in enumerate(names):
        r = res["per_class"][n]
        pred = logits[:, j] >= thr[j]
        assert r["n_pos"] == y[:, j].sum() and r["threshold"] == thr[j]
        assert r["auroc"] == pytest.approx(roc_auc_score(y[:, j], logits[:, j]), abs=1e-9)
        assert r["auprc"] == pytest.approx(average_precision_score(y[:, j], logits[:, j]), abs=1e-9)
        assert r["sensitivity"] == pytest.approx(pred[y[:, j] == 1].mean(), abs=1e-12)
        assert r["specificity"] == pytest.approx((~pred[y[:, j] == 0]).mean(), abs=1e-12)
        prob = 1 / (1 + np.exp(-(a[j] * logits[:, j] + b[j])))   # the stored Platt (a, b), not one fitted here
        assert r["calibrated_f1"] == pytest.approx(f1_score(y[:, j], prob >= 0.5), abs=1e-9)


def test_scores_line_up_with_label_rows_and_use_the_stored_thresholds_and_platt(tmp_path, monkeypatch):
    emb, rows = _cohort(tmp_path)
    pt, (st,) = _probe(tmp_path, "probe.pt")
    _settings(monkeypatch, tmp_path, probes=pt)
    evaluate.main()
    res = _results(tmp_path)["p"]
    keys = sorted(k for k, r in rows.items() if r["split"] == "test" and r["modality"] == "CT")
    assert len(keys) == 12
    lg = np.array([_numpy_logits(st, emb[k]) for k in keys])
    _check_classification(res, keys, rows, lg, [0.3, -0.4], [1.7, 0.6], [-0.5, 0.8], CLASSES)


@pytest.mark.parametrize("eval_modality,modality_of", [("CT", {"CT"}), ("MR", {"MR"}), ("all", {"CT", "MR"})])
def test_the_modality_filter_scores_exactly_the_test_studies_of_the_eval_modality(tmp_path, monkeypatch,
                                                                                  eval_modality, modality_of):
    emb, rows = _cohort(tmp_path)
    pt, (st,) = _probe(tmp_path, "probe.pt", eval_modality=eval_modality,
                       modality="CT" if eval_modality == "MR" else eval_modality)   # MR: a CT -> MR transfer probe
    _settings(monkeypatch, tmp_path, probes=pt)
    monkeypatch.setattr(evaluate, "plots", True)
    seen = {}
    real = evaluate.plot

    def spy(res, data):
        seen["keys"] = list(data["keys"])
        return real(res, data)
    monkeypatch.setattr(evaluate, "plot", spy)
    evaluate.main()
    want = {k for k, r in rows.items() if r["split"] == "test" and r["modality"] in modality_of}
    assert set(seen["keys"]) == want and len(seen["keys"]) == len(want)
    lg = np.array([_numpy_logits(st, emb[k]) for k in seen["keys"]])
    _check_classification(_results(tmp_path)["p"], seen["keys"], rows, lg, [0.3, -0.4], [1.7, 0.6], [-0.5, 0.8],
                          CLASSES)


def test_cv_ensemble_averages_the_fold_models_logits_on_its_held_out_keys(tmp_path, monkeypatch):
    emb, rows = _cohort(tmp_path)
    test_keys = ["s040", "s002", "s017", "s025", "s009", "s033", "s044", "s012", "s036", "s005", "s028", "s021",
                 "s000", "s013", "s046", "s001"]   # CT studies of every split, not in key order
    pt, states = _probe(tmp_path, "probe.pt", n_models=3, test_keys=test_keys, protocol="3-fold CV")
    _settings(monkeypatch, tmp_path, probes=pt)
    evaluate.main()
    # the mean of the models' logits (not of their probabilities), then the stored thresholds and Platt
    lg = np.mean([[_numpy_logits(s, emb[k]) for k in test_keys] for s in states], axis=0)
    res = _results(tmp_path)["p"]
    assert res["n_models"] == 3
    _check_classification(res, test_keys, rows, lg, [0.3, -0.4], [1.7, 0.6], [-0.5, 0.8], CLASSES)


def test_age_figures_and_cis_against_scipy_and_a_resampling_loop(tmp_path, monkeypatch):
    emb, rows = _cohort(tmp_path)
    pt, (st,) = _probe(tmp_path, "probe.pt", K=1, task="age")
    _settings(monkeypatch, tmp_path, probes=pt, n_boot=200, seed=4)
    evaluate.main()
    res = _results(tmp_path)["p"]
    with open(tmp_path / "labels.csv") as f:   # replicate r resamples the studies in labels.csv's row order
        keys = [r["study_key"] for r in csv.DictReader(f) if r["split"] == "test" and r["modality"] == "CT"]
    pred = np.array([_numpy_logits(st, emb[k])[0] * 12.0 + 55.0 for k in keys])   # standardised -> years
    age = np.array([rows[k]["age"] for k in keys])
    assert res["n"] == len(keys) == 12
    tol = dict(rel=0, abs=1e-4)   # the probe computes in float32
    assert res["mae"] == pytest.approx(mean_absolute_error(age, pred), **tol)
    assert res["rmse"] == pytest.approx(np.sqrt(mean_squared_error(age, pred)), **tol)
    assert res["pearson_r"] == pytest.approx(pearsonr(age, pred)[0], **tol)
    assert res["bias"] == pytest.approx((pred - age).mean(), **tol)
    # CIs: percentiles over the resampled cohorts (the resample counts of replicate r: column r)
    w = metrics.bootstrap_counts(len(keys), 200, seed=4).long().numpy()
    reps = {"mae": [], "rmse": [], "pearson_r": []}
    for r in range(200):
        idx = np.repeat(np.arange(len(keys)), w[:, r])
        reps["mae"].append(mean_absolute_error(age[idx], pred[idx]))
        reps["rmse"].append(np.sqrt(mean_squared_error(age[idx], pred[idx])))
        reps["pearson_r"].append(pearsonr(age[idx], pred[idx])[0])
    for m, v in reps.items():
        np.testing.assert_allclose(res[m + "_ci"], np.percentile(v, [2.5, 97.5]), rtol=0, atol=1e-4, err_msg=m)


def test_a_probe_class_missing_from_labels_is_refused_or_with_external_scored_on_the_others(tmp_path, monkeypatch):
    emb, rows = _cohort(tmp_path)
    pt, (st,) = _probe(tmp_path, "probe.pt")
    with open(tmp_path / "labels.csv") as f:   # intraparenchymal_hemorrhage's column dropped
        table = [r[:4] + r[5:] for r in csv.reader(f)]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(table)
    _settings(monkeypatch, tmp_path, probes=pt)
    with pytest.raises(SystemExit, match=r"probe label names \['intraparenchymal_hemorrhage'\] are not columns of "
                                         r".*labels.csv"):
        evaluate.main()
    _settings(monkeypatch, tmp_path, probes=pt, external=True)
    evaluate.main()
    res = _results(tmp_path)["p"]
    keys = sorted(k for k, r in rows.items() if r["modality"] == "CT")   # external: every CT study
    assert list(res["per_class"]) == ["cerebral_atrophy"]
    lg = np.array([_numpy_logits(st, emb[k]) for k in keys])[:, 1:]   # the probe's second output, its own threshold
    _check_classification(res, keys, rows, lg, [-0.4], [0.6], [0.8], ["cerebral_atrophy"])


def test_studies_without_tokens_are_left_out_and_counted(tmp_path, monkeypatch, capsys):
    """A probe of the brain window scored on --modality=all: the MR studies' bags are empty, and
    evaluate.py used to score them at the empty bag's constant logit (10 of 30 studies in the
    reproduction: AUROC 0.362 reported where the studies with tokens give 0.094)."""
    emb, rows = _cohort(tmp_path)
    pt, (st,) = _probe(tmp_path, "probe.pt", modality="all", eval_modality="all", windows="brain")
    full, _ = _probe(tmp_path, "probe_full.pt", modality="all", eval_modality="all")
    _settings(monkeypatch, tmp_path, probes=pt)
    evaluate.main()
    res = _results(tmp_path)["p"]
    keys = sorted(k for k, r in rows.items() if r["split"] == "test" and r["modality"] == "CT")
    n_mr = sum(r["split"] == "test" and r["modality"] == "MR" for r in rows.values())
    lg = np.array([_numpy_logits(st, emb[k]) for k in keys])
    _check_classification(res, keys, rows, lg, [0.3, -0.4], [1.7, 0.6], [-0.5, 0.8], CLASSES)
    assert n_mr == 12 and res["n_no_tokens"] == n_mr
    assert "12 of the 24 evaluated studies have no tokens in the windows brain" in capsys.readouterr().err
    assert "12 without tokens left out" in (tmp_path / "ev" / "table.txt").read_text()
    # beside a probe of every window, the comparison is flagged as unpaired
    _settings(monkeypatch, tmp_path, probes=f"{pt},{full}", names="brain,full")
    evaluate.main()
    assert "scored on different studies (brain 12, full 24; 12 in all)" in capsys.readouterr().err
    # no study with tokens at all: an error, no metrics.json
    os.remove(tmp_path / "ev" / "metrics.json")
    pt_bone, _ = _probe(tmp_path, "probe_bone.pt", modality="all", eval_modality="all", windows="bone")
    _settings(monkeypatch, tmp_path, probes=pt_bone)
    with pytest.raises(SystemExit, match=r"no studies in split 'test' of .*labels.csv with tokens in the windows bone"):
        evaluate.main()
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_a_labels_file_without_rows_is_a_one_line_error(tmp_path, monkeypatch):
    """A header-only labels.csv used to end in a StopIteration traceback (the column check read its first row)."""
    _cohort(tmp_path)
    pt, _ = _probe(tmp_path, "probe.pt")
    (tmp_path / "labels.csv").write_text("study_key,modality,split,age," + ",".join(CLASSES) + "\n")
    _settings(monkeypatch, tmp_path, probes=pt)
    with pytest.raises(SystemExit, match=r"no CT studies in split 'test' of .*labels.csv"):
        evaluate.main()


def _copy_cache(src, dst, precision, encoder_hash="sha256:tiny", noise=0.0, seed=0):
    """A copy of cache src said to be computed in `precision` (its tokens plus N(0, noise) as a GPU
    bf16-autocast encode would move them), under encoder_hash."""
    c = features.FeatureCache(src)
    rng = np.random.default_rng(seed)
    with features.FeatureWriter(dst, encoder_hash, c.dim, precision=precision) as w:
        for k in c.study_keys():
            w.add(k, [dict(e, emb=e["emb"].astype(np.float64) + noise * rng.normal(size=e["emb"].shape))
                      for e in c.study(k)])
    return dst


def test_a_cache_of_another_precision_encoder_or_token_rules_is_refused(tmp_path, monkeypatch, capsys):
    """A probe fitted on a CPU float32 cache was scored on a CUDA bf16-autocast cache of the same encoder
    (--features) without a word (exit 0, metrics.json written), though such features differ ~14x the
    float16 step. The precision comes from probe.pt's feature_precision when recorded, else from the
    probe's training cache; another encoder's or other token rules' cache stays refused."""
    emb, rows = _cohort(tmp_path, precision="float32")
    gpu = _copy_cache(str(tmp_path / "cache"), str(tmp_path / "gpu"), "bfloat16-autocast", noise=1e-2)
    pt, (st,) = _probe(tmp_path, "probe.pt")
    _settings(monkeypatch, tmp_path, probes=pt, features=gpu)
    with pytest.raises(SystemExit) as e:
        evaluate.main()
    assert ("probe.pt was fitted on float32 features" in str(e.value.code) and "gpu holds bfloat16-autocast"
            in str(e.value.code) and "\n" not in str(e.value.code))
    assert not (tmp_path / "ev" / "metrics.json").exists()
    # the probe's own record wins over its training cache's: fitted in bf16, refused on the float32 cache
    pt16, _ = _probe(tmp_path, "probe16.pt", feature_precision="bfloat16-autocast")
    _settings(monkeypatch, tmp_path, probes=pt16)
    with pytest.raises(SystemExit, match="fitted on bfloat16-autocast features .* holds float32 features"):
        evaluate.main()
    # the same precision elsewhere is scored (and matches numpy); a cache without a recorded precision is warned of
    same = _copy_cache(str(tmp_path / "cache"), str(tmp_path / "same"), "float32")
    for feats, warned in ((same, False), (_copy_cache(str(tmp_path / "cache"), str(tmp_path / "old"), None), True)):
        capsys.readouterr()
        _settings(monkeypatch, tmp_path, probes=pt, features=feats)
        evaluate.main()
        err = capsys.readouterr().err
        assert ("cannot check that" in err) == warned, err
        res = _results(tmp_path)["p"]
        assert res["feature_precision"] == (None if warned else "float32")
        keys = sorted(k for k, r in rows.items() if r["split"] == "test" and r["modality"] == "CT")
        lg = np.array([_numpy_logits(st, emb[k]) for k in keys])
        _check_classification(res, keys, rows, lg, [0.3, -0.4], [1.7, 0.6], [-0.5, 0.8], CLASSES)
    for h in ("sha256:other", "sha256:tiny+tokens:fg1,centre,float"):   # another encoder, the authors' token rules
        other = _copy_cache(str(tmp_path / "cache"), str(tmp_path / re.sub(r"\W", "_", h)), "float32", h)
        _settings(monkeypatch, tmp_path, probes=pt, features=other)
        with pytest.raises(SystemExit, match=f"made by encoder {re.escape(h)}, expected sha256:tiny"):
            evaluate.main()


def test_classes_without_a_fitted_threshold_get_no_operating_point_figures(tmp_path, monkeypatch, capsys):
    """A class without positives on the probe's selection split keeps train_probe.py's placeholders,
    threshold 0 and Platt a = 0 (the prior): evaluate.py reported its sensitivity 1.0, specificity 0.0
    and calibrated F1 0.0 as figures at a validation-chosen threshold, in the macro averages (macro
    sensitivity 0.5 over 2 classes where the one fitted class gives 0.0)."""
    emb, rows = _cohort(tmp_path)
    val = sorted(k for k, r in rows.items() if r["split"] == "val" and r["modality"] == "CT")
    ysel = np.array([rows[k]["y"] for k in val], np.float64)
    ysel[:, 0] = 0                                   # no intraparenchymal_hemorrhage on the selection split
    ssel = np.random.default_rng(0).normal(size=ysel.shape)
    thr, (a, b) = metrics.youden_thresholds(ysel, ssel), metrics.platt_fit(ssel, ysel)
    assert thr[0] == 0 and a[0] == 0                 # what train_probe.py stores for such a class
    thr[1] = 0.5
    sel = dict(sel_labels=torch.from_numpy(ysel.astype(np.uint8)), sel_logits=torch.from_numpy(ssel.astype(np.float32)))
    for extra in (sel, {}):                          # from the selection labels, or (older probes) the placeholders
        pt, (st,) = _probe(tmp_path, "probe.pt", thresholds=[float(v) for v in thr], platt_a=[float(v) for v in a],
                           platt_b=[float(v) for v in b], **extra)
        _settings(monkeypatch, tmp_path, probes=pt, n_boot=200, seed=3)
        evaluate.main()
        assert "1 classes have no threshold or calibration fitted" in capsys.readouterr().err
        res = _results(tmp_path)["p"]
        keys = sorted(k for k, r in rows.items() if r["split"] == "test" and r["modality"] == "CT")
        lg = np.array([_numpy_logits(st, emb[k]) for k in keys])
        y = np.array([rows[k]["y"] for k in keys])
        u, f = res["per_class"]["intraparenchymal_hemorrhage"], res["per_class"]["cerebral_atrophy"]
        assert u["n_pos"] > 0 and u["auroc"] == pytest.approx(roc_auc_score(y[:, 0], lg[:, 0]), abs=1e-9)
        assert not u["threshold_fitted"] and f["threshold_fitted"]
        assert u["sensitivity"] is u["specificity"] is u["balanced_accuracy"] is u["calibrated_f1"] is None
        assert u["sensitivity_ci"] == [None, None]
        pred = lg[:, 1] >= 0.5
        sens, spec = pred[y[:, 1] == 1].mean(), (~pred[y[:, 1] == 0]).mean()
        assert f["sensitivity"] == pytest.approx(sens) and f["specificity"] == pytest.approx(spec)
        # the macros are the fitted class's own figures (its CI: the same resampled cohorts)
        m = res["macro"]
        assert m["sensitivity"]["n_classes"] == 1 and m["sensitivity"]["mean"] == pytest.approx(sens)
        assert m["sensitivity"]["ci"] == pytest.approx(f["sensitivity_ci"])
        assert m["balanced_accuracy"]["mean"] == pytest.approx((sens + spec) / 2)
        prob = 1 / (1 + np.exp(-(a[1] * lg[:, 1] + b[1])))
        assert m["calibrated_f1"] == {"mean": pytest.approx(f1_score(y[:, 1], prob >= 0.5)), "n_classes": 1}
        assert m["auroc"]["n_classes"] == 2          # AUROC needs no threshold


def test_an_unreadable_probe_is_refused_with_its_own_reason(tmp_path, monkeypatch):
    """A probe.pt holding a numpy scalar (refused by torch.load(weights_only=True)) was reported as
    'truncated or not a torch checkpoint (CheckpointError)', hiding load_checkpoint's reason."""
    _cohort(tmp_path)
    pt, _ = _probe(tmp_path, "probe.pt", thresholds=[np.float64(0.3), -0.4])
    _settings(monkeypatch, tmp_path, probes=pt)
    with pytest.raises(SystemExit) as e:
        evaluate.main()
    msg = str(e.value.code)
    assert "probe.pt is not a readable probe.pt: holds a pickled Python object (numpy" in msg, msg
    assert "truncated" not in msg and "\n" not in msg


def test_test_studies_sharing_subjects_with_the_training_studies_are_flagged(tmp_path, monkeypatch, capsys):
    """labels.csv splits that are not subject-disjoint: every CT test study shared its subject with a train
    study (s000 / s001, s004 / s005, ...), and the test figures passed for held-out ones (no in_sample)."""
    emb, rows = _cohort(tmp_path)
    with open(tmp_path / "labels.csv") as f:
        table = list(csv.reader(f))
    subject = {r[0]: f"p{int(r[0][1:]) // 2}" for r in table[1:]}
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([table[0] + ["subject"]] + [r + [subject[r[0]]] for r in table[1:]])
    fit = [k for k, r in rows.items() if r["split"] in ("train", "val")]   # what train_probe.py records
    for seen_subjects, want in ((sorted({subject[k] for k in fit}), 12), ([], 0)):
        pt, _ = _probe(tmp_path, "probe.pt", seen_keys=fit, seen_subjects=seen_subjects)
        _settings(monkeypatch, tmp_path, probes=pt)
        evaluate.main()
        res = _results(tmp_path)["p"]
        test = [k for k, r in rows.items() if r["split"] == "test" and r["modality"] == "CT"]
        by_hand = sum(subject[k] in set(seen_subjects) for k in test)   # a test study is never in fit itself
        assert by_hand == want and res["n_studies"] == len(test) == 12
        if want:
            assert res["in_sample"] == "shared" and res["n_shared"] == by_hand
            assert f"{by_hand} of the 12 evaluated studies are, or share a subject with," in capsys.readouterr().err
            assert f"[in-sample: {by_hand} studies fitted or tuned" in (tmp_path / "ev" / "table.txt").read_text()
            assert "(in-sample: subjects shared with training)" in (tmp_path / "ev" / "paper_table.md").read_text()
        else:
            assert "in_sample" not in res and "share a subject" not in capsys.readouterr().err


def test_one_bootstrap_gives_the_figures_of_fitted_and_unfitted_classes(tmp_path, monkeypatch, capsys):
    """With a class whose threshold was never fitted, evaluate.py ran a second bootstrap over the fitted
    classes for the threshold macros: two resamplings of the same cohort where one serves every figure.
    One bootstrap now; its macro sensitivity / specificity CIs are the percentiles over hand-resampled
    cohorts (the same seed's study counts) of the fitted class's figures, in every replicate where
    it is defined, whether or not the unfitted class is."""
    emb, rows = _cohort(tmp_path)
    val = sorted(k for k, r in rows.items() if r["split"] == "val" and r["modality"] == "CT")
    ysel = np.array([rows[k]["y"] for k in val], np.uint8)
    ysel[:, 0] = 0                                   # intraparenchymal_hemorrhage: no threshold fitted
    pt, (st,) = _probe(tmp_path, "probe.pt", thresholds=[0.0, 0.5], platt_a=[0.0, 0.6], platt_b=[-1.0, 0.8],
                       sel_labels=torch.from_numpy(ysel))
    calls = []
    boot = metrics.bootstrap
    monkeypatch.setattr(metrics, "bootstrap", lambda *a, **kw: calls.append(np.shape(a[0])) or boot(*a, **kw))
    B, seed = 300, 4
    _settings(monkeypatch, tmp_path, probes=pt, n_boot=B, seed=seed)
    evaluate.main()
    keys = sorted(k for k, r in rows.items() if r["split"] == "test" and r["modality"] == "CT")
    assert calls == [(len(keys), 2)]
    res = _results(tmp_path)["p"]
    lg = np.array([_numpy_logits(st, emb[k]) for k in keys])
    y = np.array([rows[k]["y"] for k in keys])
    counts = metrics.bootstrap_counts(len(keys), B, seed=seed).long().numpy()
    sens, spec = [], []
    for c in counts.T:
        idx = np.repeat(np.arange(len(keys)), c)
        yy, pred = y[idx, 1], lg[idx, 1] >= 0.5
        if 0 < yy.sum() < len(yy):
            sens.append(pred[yy == 1].mean())
            spec.append((~pred[yy == 0]).mean())
    m = res["macro"]
    assert m["sensitivity"]["ci_n_valid"] == len(sens) and m["sensitivity"]["n_classes"] == 1
    assert m["sensitivity"]["ci"] == pytest.approx(np.percentile(sens, [2.5, 97.5]).tolist(), abs=1e-12)
    assert m["specificity"]["ci"] == pytest.approx(np.percentile(spec, [2.5, 97.5]).tolist(), abs=1e-12)
    u = res["per_class"]["intraparenchymal_hemorrhage"]
    assert u["sensitivity"] is None and u["ci_n_valid"]["sensitivity"] == 0 and u["auroc_ci"][0] is not None
