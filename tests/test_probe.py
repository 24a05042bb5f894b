"""Probes on synthetic bags: segment softmax, packing invariance, learning a sparse signal;
iterative stratification; train_probe.py + evaluate.py end to end on a synthetic cache."""
import csv
import os

import numpy as np
import pytest
import torch

from nvfm import metrics, probe
from nvfm.metrics import auroc


pytestmark = pytest.mark.usefixtures("one_thread")


def _bags(n_bags=120, dim=16, K=3, seed=0):
    """Bags of 10..30 noise tokens; class k positive bags carry 2 tokens with a
    class-specific direction. Returns list of (n, dim) tensors, labels (B, K), signal masks."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(K, dim, generator=g) * 2.5
    bags, ys, sig = [], [], []
    for _ in range(n_bags):
        n = int(torch.randint(10, 31, (1,), generator=g))
        x = torch.randn(n, dim, generator=g)
        y = (torch.rand(K, generator=g) < 0.4).float()
        s = torch.zeros(n, K, dtype=torch.bool)
        for k in torch.nonzero(y).flatten().tolist():
            idx = torch.randperm(n, generator=g)[:2]
            x[idx] += dirs[k]
            s[idx, k] = True
        bags.append(x)
        ys.append(y)
        sig.append(s)
    return bags, torch.stack(ys), sig


def test_segment_softmax_sums_to_one_and_matches_loop():
    torch.manual_seed(0)
    lens = [3, 1, 7, 4]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    s = torch.randn(sum(lens), 5) * 30  # large scores: stability
    seg = probe.bag_ids(cu)
    a = probe.segment_softmax(s, seg, len(lens))
    assert torch.isfinite(a).all()
    sums = probe.segment_sum(a, seg, len(lens))
    torch.testing.assert_close(sums, torch.ones(len(lens), 5))
    for b in range(len(lens)):
        ref = torch.softmax(s[cu[b]:cu[b + 1]], 0)
        torch.testing.assert_close(a[cu[b]:cu[b + 1]], ref)


@pytest.mark.parametrize("kind", sorted(probe.PROBES))
def test_invariant_to_packing_order(kind):
    bags, y, _ = _bags(n_bags=10)
    m = probe.make_probe(kind, 16, 3).eval()
    x, cu = probe.pack_bags(bags)
    out = m(x, cu)
    perm = torch.randperm(10)
    x2, cu2 = probe.pack_bags([bags[i] for i in perm])
    torch.testing.assert_close(m(x2, cu2), out[perm], rtol=1e-5, atol=1e-5)
    # and to the order of tokens inside a bag
    x3, cu3 = probe.pack_bags([b[torch.randperm(len(b))] for b in bags])
    torch.testing.assert_close(m(x3, cu3), out, rtol=1e-5, atol=1e-5)


def test_contributions_sum_to_bag_logit():
    bags, _, _ = _bags(n_bags=6)
    m = probe.AttentiveMIL(16, 3).eval()
    x, cu = probe.pack_bags(bags)
    logits, alpha, inst = m(x, cu, return_maps=True)
    seg = probe.bag_ids(cu)
    torch.testing.assert_close(probe.segment_sum(alpha * inst, seg, 6), logits)
    torch.testing.assert_close(probe.segment_sum(alpha, seg, 6), torch.ones(6, 3))


def _train(kind, bags, y, steps=150, seed=0):
    torch.manual_seed(seed)
    m = probe.make_probe(kind, 16, y.shape[1], hidden=32, dropout=0.0)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-3)
    pw, usable = probe.class_weights(y)
    x, cu = probe.pack_bags(bags)
    for _ in range(steps):
        loss = probe.bce_loss(m(x, cu), y, pw, usable)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def test_attentive_mil_learns_sparse_signal_and_points_at_it():
    bags, y, sig = _bags(n_bags=140)
    m = _train("attentive_mil", bags[:100], y[:100])
    test_bags, ty, tsig = bags[100:], y[100:], sig[100:]
    x, cu = probe.pack_bags(test_bags)
    with torch.no_grad():
        logits, alpha, _ = m(x, cu, return_maps=True)
    au = auroc(ty.numpy(), logits.numpy())
    assert au.min() > 0.9, au
    # pointing game on positive test bags: the max-attention token of class k is a signal token
    hits = tot = 0
    for b in range(len(test_bags)):
        a = alpha[cu[b]:cu[b + 1]]
        for k in torch.nonzero(ty[b]).flatten().tolist():
            hits += bool(tsig[b][a[:, k].argmax(), k])
            tot += 1
    assert hits / tot > 0.8, (hits, tot)
    # mean pooling dilutes 2 tokens in 10..30: clearly worse than the attentive probe
    mp = _train("mean_pool", bags[:100], y[:100])
    with torch.no_grad():
        au_mp = auroc(ty.numpy(), mp(x, cu).numpy())
    assert au.mean() > au_mp.mean()


def test_class_weights_and_masked_loss():
    y = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]], dtype=torch.float32)
    pw, usable = probe.class_weights(y)
    assert usable.tolist() == [True, False, False]
    assert pw[0].item() == pytest.approx(3.0)
    logits = torch.zeros(4, 3, requires_grad=True)
    probe.bce_loss(logits, y, pw, usable).backward()
    assert (logits.grad[:, 1:] == 0).all() and (logits.grad[:, 0] != 0).all()


def test_regression_head_learns_age_with_l1():
    torch.manual_seed(0)
    bags = [torch.randn(int(n), 8) for n in torch.randint(5, 15, (60,))]
    age = torch.rand(60) * 60 + 20
    for b, a in zip(bags, age):
        b[:, 0] += (a - 50) / 15       # age shifts one feature of every token
    m = probe.make_probe("attentive_mil", 8, 1, hidden=16, dropout=0.0)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-2)
    x, cu = probe.pack_bags(bags)
    for _ in range(150):
        loss = torch.nn.functional.l1_loss(m(x, cu)[:, 0] * 20 + 50, age)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 6.0   # vs ~15 years for predicting the mean


def test_unknown_probe_kind():
    with pytest.raises(ValueError, match="unknown probe"):
        probe.make_probe("transformer", 8, 2)


def test_iterative_stratification_spreads_rare_labels():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 6)) < [0.3, 0.1, 0.05, 0.02, 0.01, 0.0]).astype(int)
    folds = probe.iterative_stratification(y, [1] * 8, seed=0)
    assert folds.min() == 0 and folds.max() == 7 and (folds >= 0).all()
    sizes = np.bincount(folds, minlength=8)
    assert sizes.max() - sizes.min() <= 2
    for k in range(5):
        per = np.array([y[folds == f, k].sum() for f in range(8)])
        assert per.max() - per.min() <= 1, (k, per)   # positives spread as evenly as possible
    test = probe.iterative_stratification(y, [0.2, 0.8], seed=1)
    assert abs((test == 0).mean() - 0.2) < 0.01
    assert y[test == 0, 4].sum() in (0, 1) and y[test == 0, 0].sum() == pytest.approx(0.2 * y[:, 0].sum(), abs=1)


def _write_synthetic_cohort(d, n=90, seed=0):
    import csv
    from nvfm import features
    rng = np.random.default_rng(seed)
    names = ["intraparenchymal_hemorrhage", "cerebral_atrophy", "pineal_tumor"]
    dirs = rng.normal(size=(3, 8)) * 4
    rows = []
    with features.FeatureWriter(str(d / "cache"), "sha256:synthetic", 8) as w:
        for i in range(n):
            y = (rng.random(3) < [0.4, 0.4, 0.0]).astype(int)
            e = rng.normal(size=(int(rng.integers(5, 12)), 8))
            for k in np.nonzero(y)[0]:
                e[int(rng.integers(0, len(e)))] += dirs[k]
            w.add(f"key{i:03d}", [dict(volume_id=f"v{i}", family="CT", window="brain", modality="CT",
                                       coords=np.zeros((len(e), 3)), emb=e)])
            rows.append([f"key{i:03d}", f"demo-{i:04d}", "CT", ["train", "train", "val", "test"][i % 4], 50] + list(y))
    with open(d / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["study_key", "study", "modality", "split", "age"] + names)
        wr.writerows(rows)
        wr.writerow(["missing_key", "demo-9999", "MR", "test", 50, 0, 0, 0])   # an MR study without features


def _run(args, cwd):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, NVFM_QUIET="1")
    return subprocess.run([sys.executable, os.path.join(root, args[0])] + args[1:], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_train_probe_and_evaluate_scripts(tmp_path):
    import json
    _write_synthetic_cohort(tmp_path)
    common = [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}", "--side_classes=False",
              "--threads=1", "--hidden=32"]
    r = _run(["train_probe.py", *common, f"--out={tmp_path / 'p'}", "--steps=80", "--eval_interval=20", "--lr=3e-3"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no training positives" in r.stdout and "pineal_tumor" in r.stdout
    ck = torch.load(tmp_path / "p" / "probe.pt", weights_only=True)
    ysel, ssel = ck["sel_labels"].numpy(), ck["sel_logits"].numpy().astype(np.float64)
    assert ysel.shape == ssel.shape == (sum(r["split"] == "val" for r in csv.DictReader(open(tmp_path / "labels.csv"))),
                                        len(ck["label_names"]))
    # each saved cut reaches the largest Youden J of the ROC curve of its selection scores (sklearn),
    # and is one of those scores; a class without selection positives keeps the default cut 0
    from sklearn.metrics import roc_curve
    for k in range(ysel.shape[1]):
        yk, sk, t = ysel[:, k], ssel[:, k], ck["thresholds"][k]
        if not 0 < yk.sum() < len(yk):
            assert t == 0.0
            continue
        fpr, tpr, _ = roc_curve(yk, sk)
        pred = sk >= t - 1e-6 * max(1.0, abs(t))          # the cut was saved from float32 logits
        j = pred[yk == 1].mean() - pred[yk == 0].mean()
        assert j == pytest.approx(np.max(tpr - fpr), abs=1e-12) and np.min(np.abs(sk - t)) <= 1e-6 * max(1.0, abs(t))
    r = _run(["evaluate.py", f"--probes={tmp_path / 'p' / 'probe.pt'}", f"--labels={tmp_path / 'labels.csv'}",
              f"--out={tmp_path / 'ev'}", "--n_boot=300", "--threads=1"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]
    assert res["undefined_classes"] == ["pineal_tumor"] and res["per_class"]["pineal_tumor"]["auroc"] is None
    assert res["macro"]["auroc"]["n_classes"] == 2 and res["macro"]["auroc"]["mean"] > 0.7
    assert os.path.exists(tmp_path / "ev" / "roc_p.png") and "undefined" in open(tmp_path / "ev" / "table.txt").read()
    # the external-benchmark protocol: held-out stratified test + 2-fold CV, logit-averaged ensemble
    r = _run(["train_probe.py", *common, f"--out={tmp_path / 'cv'}", "--steps=20", "--cv_folds=2"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = _run(["evaluate.py", f"--probes={tmp_path / 'cv' / 'probe.pt'}", f"--labels={tmp_path / 'labels.csv'}",
              f"--out={tmp_path / 'evcv'}", "--n_boot=0", "--plots=False"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(tmp_path / "evcv" / "metrics.json"))["results"]["cv"]
    assert res["n_models"] == 2 and res["protocol"] == "2-fold CV" and abs(res["n_studies"] - 18) <= 1  # 20% of 90
    # bad input: unknown label name; a study missing from the cache; a cache from another encoder
    r = _run(["train_probe.py", *common, f"--out={tmp_path / 'q'}", "--label_names=not_a_label"], tmp_path)
    assert r.returncode != 0 and "unknown label names ['not_a_label']" in r.stderr
    r = _run(["train_probe.py", *common, f"--out={tmp_path / 'q'}", "--modality=MR"], tmp_path)
    assert r.returncode != 0 and "not in the feature cache" in r.stderr
    from nvfm import features
    with features.FeatureWriter(str(tmp_path / "other"), "sha256:another", 8) as w:
        w.add("key000", [])
    r = _run(["evaluate.py", f"--probes={tmp_path / 'p' / 'probe.pt'}", f"--labels={tmp_path / 'labels.csv'}",
              f"--features={tmp_path / 'other'}", f"--out={tmp_path / 'ev2'}", "--n_boot=0"], tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]   # a user error: one line, exit 1
    assert r.returncode == 1 and len(lines) == 1 and "sha256:another" in lines[0] and "encode.py" in lines[0]


def test_repeated_label_column_is_an_error_naming_file_and_column(tmp_path):
    """labels.csv with the header 'ich' twice: csv.DictReader kept the last cell under the one name,
    load_labels listed the name twice, so one column's labels replaced the other's unseen."""
    p = tmp_path / "labels.csv"
    with open(p, "w", newline="") as f:
        csv.writer(f).writerows([["study_key", "split", "ich", "sdh", "ich"], ["a", "test", 0, 1, 1],
                                 ["b", "test", 1, 0, 0]])
    with pytest.raises(ValueError, match=rf"^{tmp_path}/labels.csv: column 'ich' appears 2 times in the header"):
        probe.load_labels(str(p))
    with open(p, "w", newline="") as f:                              # distinct headers: read as written
        csv.writer(f).writerows([["study_key", "split", "ich", "sdh", "edh"], ["a", "test", 0, 1, 1]])
    rows, names = probe.load_labels(str(p))
    assert names == ["ich", "sdh", "edh"] and rows[0]["y"] == {"ich": 0, "sdh": 1, "edh": 1}


def test_duplicate_study_in_findings_is_an_error_not_a_lost_lesion(tmp_path):
    """load_sides kept the last record of a study key that appears twice in findings.jsonl (its
    left lesion silently lost: lesion_left 0), where evaluate_reports refuses the same file."""
    import json
    p = tmp_path / "findings.jsonl"
    recs = [{"study_key": "k0", "lesions": [{"diagnosis": "meningioma", "side": "right"}]},
            {"study_key": "k1", "lesions": [{"diagnosis": "meningioma", "side": "left"}]}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert probe.load_sides(str(p)) == {"k0": {"right"}, "k1": {"left"}}
    p.write_text("".join(json.dumps(r) + "\n" for r in recs + [{"study_key": "k1", "lesions": []}]))
    with pytest.raises(ValueError, match=rf"^{p}:3: study 'k1' appears twice in the ground truth \(line 2 too\)"):
        probe.load_sides(str(p))


def test_cv_with_transfer_to_is_refused_before_anything_is_written(tmp_path):
    """--cv_folds with --transfer_to kept only --modality rows, so the held-out test keys were CT
    studies that evaluate.py then reported as 'CT -> MR' transfer figures."""
    _write_synthetic_cohort(tmp_path, n=20)
    common = [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}", "--side_classes=False",
              "--threads=1", "--modality=CT", "--transfer_to=MR"]
    for cv in ("--cv_folds=2", "--protocol=paper"):
        r = _run(["train_probe.py", *common, f"--out={tmp_path / 'p'}", cv], tmp_path)
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stderr.strip().splitlines() == [
            "train_probe.py: error: --transfer_to=MR needs the split protocol: the CV protocol (--cv_folds, "
            "--protocol=paper) holds out CT studies, so its test figures would not be MR figures"]
        assert not (tmp_path / "p").exists()
