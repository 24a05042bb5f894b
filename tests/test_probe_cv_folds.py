"""CV probes whose folds did not all learn every class: a fold whose training part lacks a class's
positives leaves the class out of its loss, so its output for that class is noise. The ensemble
(nvfm.probe.predict, as evaluate.py and train_llava.py call it) averaged that noise into the class's
logit, and the fold's out-of-fold logits of the class chose its threshold and Platt calibration.
Checked against the fold models' logits averaged by hand with numpy, sklearn and scipy."""
import csv
import re
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.metrics import roc_auc_score, roc_curve

from nvfm import features
from nvfm import probe as P
from test_probe_audit import ROOT, _run

sys.path.insert(0, ROOT)
import evaluate  # noqa: E402  (configure() reads no argv when imported)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["ich", "rare", "absent"]   # learned by every fold, by all folds but one, by none
RARE = "key007"                     # the only positive of `rare`


@pytest.fixture(scope="module")
def cv(tmp_path_factory):
    """45 synthetic CT studies (feature 0 of token 0 carries ich, feature 1 of token 1 the one rare positive), a
    3-fold CV probe trained on them. -> dict(ck, path, labels {key: (K,)}, bag)."""
    d = tmp_path_factory.mktemp("cv")
    rng = np.random.default_rng(0)
    labels = {}
    with features.FeatureWriter(str(d / "cache"), "sha256:synthetic", 8) as w:
        for i in range(45):
            k = f"key{i:03d}"
            y = np.array([rng.random() < 0.5, k == RARE, 0], np.float64)
            e = rng.normal(size=(6, 8))
            e[0, 0] += 4 * y[0]   # one feature: LayerNorm would remove a shift of all of them
            e[1, 1] += 4 * y[1]
            w.add(k, [dict(volume_id=k, family="CT", window="brain", modality="CT", coords=np.zeros((6, 3)), emb=e)])
            labels[k] = y
    with open(d / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows([["study_key", "modality", "split", *NAMES]]
                                + [[k, "CT", "train", *map(int, y)] for k, y in labels.items()])
    r = _run("train_probe.py", [f"--features={d / 'cache'}", f"--labels={d / 'labels.csv'}", f"--out={d / 'p'}",
                                "--side_classes=False", "--threads=1", "--hidden=16", "--steps=30", "--lr=1e-2",
                                "--eval_interval=10", f"--label_names={','.join(NAMES)}", "--cv_folds=3"], d)
    assert r.returncode == 0, r.stdout + r.stderr
    cache = features.FeatureCache(str(d / "cache"))
    path = str(d / "p" / "probe.pt")
    return dict(ck=torch.load(path, weights_only=True), path=path, labels=labels, log=r.stdout,
                bag=lambda k: torch.from_numpy(np.asarray(cache.study_tokens(k)[0], np.float32)))


def _folds(cv, models):
    """By hand: the fold of each out-of-fold study (the one model whose logits are its sel_logits row)
    and which classes each fold's training part (the other folds) had positives and negatives of."""
    ck, rest = cv["ck"], cv["ck"]["seen_keys"]
    each = np.stack([P.predict(m, cv["bag"], rest) for m in models])           # (k, n, K)
    err = np.abs(each - ck["sel_logits"].numpy()[None]).max(2)                 # (k, n)
    fold = err.argmin(0)
    assert err.min(0).max() < 1e-6 and np.sort(err, 0)[1].min() > 1e-4       # one model each, unambiguous
    y = np.stack([cv["labels"][k] for k in rest])
    learned = np.array([[len(np.unique(y[fold != f, c])) == 2 for c in range(len(NAMES))]
                        for f in range(len(models))])
    return fold, learned, y


def test_each_class_is_averaged_over_the_folds_that_learned_it(cv, monkeypatch, capsys):
    """The reproduction: `rare`'s ensemble logit on the test set was the mean over all 3 folds (0.033 away
    from the mean over the 2 that learned it), and +100 on the output of the fold that never learned it
    moved the ensemble's `rare` logit by 33.3. Models loaded as evaluate.py loads them (strictly)."""
    monkeypatch.setattr(evaluate, "device", "cpu")
    ck, (_, models) = cv["ck"], evaluate.load_probe(cv["path"])
    assert RARE in ck["seen_keys"] and len(models) == 3 and "warning" not in capsys.readouterr().out
    fold, learned, _ = _folds(cv, models)
    assert learned[:, 0].all() and learned[:, 1].sum() == 2 and not learned[:, 2].any()
    test = ck["test_keys"]
    each = np.stack([P.predict(m, cv["bag"], test) for m in models])             # (k, n, K)
    # numpy: each class over the folds that learned it; one no fold learned (untrained): over all
    want = np.stack([each[learned[:, c] if learned[:, c].any() else slice(None), :, c].mean(0)
                     for c in range(len(NAMES))], 1)
    np.testing.assert_allclose(P.predict(models, cv["bag"], test), want, rtol=0, atol=1e-6)
    assert ck["fold_trained"] == learned.tolist() and ck["trained_classes"] == [True, True, False]
    # maps too: alpha and contributions of each class averaged over the same folds
    _, maps = P.predict(models, cv["bag"], test[:4], return_maps=True)
    per = [P.predict(m, cv["bag"], test[:4], return_maps=True)[1] for m in models]
    for b, (a, c) in enumerate(maps):
        for j in range(len(NAMES)):
            use = [f for f in range(3) if learned[f, j]] or [0, 1, 2]
            np.testing.assert_allclose(a[:, j], np.mean([per[f][b][0][:, j] for f in use], 0), atol=1e-6)
            np.testing.assert_allclose(c[:, j], np.mean([per[f][b][1][:, j] for f in use], 0), atol=1e-6)
    # an output shifted by 100 (attentive MIL: alpha sums to 1, so the bag logit moves by 100)
    u, t = int(np.nonzero(~learned[:, 1])[0][0]), int(np.nonzero(learned[:, 1])[0][0])
    base = P.predict(models, cv["bag"], test)
    with torch.no_grad():
        models[u].instance[3].bias[1] += 100.0   # the fold that never learned `rare`: no say in its logit
        np.testing.assert_allclose(P.predict(models, cv["bag"], test), base, rtol=0, atol=1e-5)
        models[t].instance[3].bias[1] += 100.0   # a fold that learned it: 1 of the 2 that count
        np.testing.assert_allclose(P.predict(models, cv["bag"], test)[:, 1], base[:, 1] + 50.0, rtol=0, atol=1e-4)


def test_out_of_fold_logits_of_a_fold_that_did_not_learn_the_class_choose_nothing(cv):
    """`rare`'s lone positive was scored out of fold by the one fold that never learned the class: its
    threshold was that noise logit (-0.179) and its Platt slope -0.91 was fitted on noise. Those entries
    are now left out (sel_mask), which leaves `rare` no positive: unfitted, threshold 0, Platt a = 0; ich,
    learned everywhere, is fitted on all of its out-of-fold logits as before (sklearn's Youden and AUROC)."""
    ck = cv["ck"]
    models = [P.make_probe(**ck["probe_args"]).eval() for _ in ck["models"]]
    for m, st in zip(models, ck["models"]):
        m.load_state_dict(st, strict=True)
    fold, learned, y = _folds(cv, models)
    assert ck["thresholds"][1] == 0.0 and ck["platt_a"][1] == 0.0
    assert P.unfitted_classes(ck).tolist() == [False, True, True]
    mask = ck["sel_mask"].numpy()
    np.testing.assert_array_equal(mask, learned[fold])
    assert mask[:, 0].all() and not mask[:, 2].any() and not mask[y[:, 1] == 1, 1].any()
    s = ck["sel_logits"].numpy().astype(np.float64)[:, 0]
    fpr, tpr, cut = roc_curve(y[:, 0], s, drop_intermediate=False)
    assert ck["thresholds"][0] == pytest.approx(cut[np.argmax(tpr - fpr)], abs=1e-6)
    got = re.search(r"selection set \(\d+ studies\): macro AUROC (\S+) over (\d+) defined classes", cv["log"])
    assert float(got[1]) == pytest.approx(roc_auc_score(y[:, 0], s), abs=1e-9) and got[2] == "1"
    assert "1 classes were learned by some folds only" in cv["log"] and "['rare']" in cv["log"]


def _platt_by_scipy(s, y):
    """Platt's smoothed-target cross-entropy minimised by scipy: (a, b) of p = sigmoid(a s + b)."""
    t = np.where(y > 0, (y.sum() + 1) / (y.sum() + 2), 1 / ((1 - y).sum() + 2))

    def nll(ab):
        z = ab[0] * s + ab[1]
        return np.sum(np.logaddexp(0, z) - t * z)
    return minimize(nll, [0.0, 0.0], method="BFGS", options=dict(gtol=1e-10)).x


def test_fit_selection_fits_each_class_on_its_marked_entries_only():
    """Per class: Youden threshold, Platt (a, b) and AUROC from the entries ok marks, as sklearn and scipy
    compute them on those entries alone; a class whose marked entries lack positives: the placeholders."""
    rng = np.random.default_rng(1)
    n = 60
    y = (rng.random((n, 3)) < 0.4).astype(np.float64)
    s = rng.normal(size=(n, 3)) + 1.5 * y
    ok = np.ones((n, 3), bool)
    ok[:20, 1] = False
    ok[y[:, 2] == 1, 2] = False
    thr, a, b, au = P.fit_selection(y, s, ok)
    for k in (0, 1):
        r = ok[:, k]
        fpr, tpr, cut = roc_curve(y[r, k], s[r, k], drop_intermediate=False)
        assert thr[k] == pytest.approx(cut[np.argmax(tpr - fpr)])
        assert au[k] == pytest.approx(roc_auc_score(y[r, k], s[r, k]), abs=1e-12)
        np.testing.assert_allclose([a[k], b[k]], _platt_by_scipy(s[r, k], y[r, k]), atol=1e-5)
    nneg = (~y[:, 2].astype(bool)).sum()
    assert thr[2] == 0.0 and a[2] == 0.0 and np.isnan(au[2]) and b[2] == pytest.approx(np.log(1 / (nneg + 1)))
    # an unmarked entry's score does not matter
    s2 = s.copy()
    s2[:20, 1] = 1e3
    np.testing.assert_array_equal(np.stack(P.fit_selection(y, s2, ok)), np.stack((thr, a, b, au)))


def test_probes_without_fold_masks_load_and_score_as_before(tmp_path, monkeypatch, capsys):
    """A probe.pt from before the fold masks (no trained_mask in probe_args, no `trained` key in its
    state dicts, no fold_trained / sel_mask) loads strictly and its ensemble is the plain mean of its
    models, every class, with a warning that says so; the masks do not weaken strict loading either way."""
    torch.manual_seed(0)
    K, bags = 3, [torch.randn(n, 4) for n in (3, 9, 1, 5)]
    olds = [P.make_probe("attentive_mil", 4, K, hidden=8) for _ in range(3)]
    ck = dict(models=[m.state_dict() for m in olds], probe_args=dict(kind="attentive_mil", dim=4, n_out=K, hidden=8,
                                                                     dropout=0.1))
    torch.save(ck, tmp_path / "old.pt")
    monkeypatch.setattr(evaluate, "device", "cpu")
    _, models = evaluate.load_probe(str(tmp_path / "old.pt"))
    assert all(not hasattr(m, "trained") for m in models)
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "old.pt" in warned[0] and "3-model ensemble" in warned[0] and "retrain" in warned[0]
    one = dict(ck, models=ck["models"][:1])   # one model (the split protocol): nothing is averaged
    assert len(P.load_models(one, "one.pt")) == 1 and "warning" not in capsys.readouterr().out
    want = np.mean([P.predict(m, bags.__getitem__, range(4)) for m in olds], 0)
    np.testing.assert_allclose(P.predict(models, bags.__getitem__, range(4)), want, rtol=0, atol=1e-6)
    new = P.make_probe("attentive_mil", 4, K, hidden=8, trained_mask=True)
    assert new.state_dict()["trained"].dtype == torch.bool and new.trained.all()
    from nvfm.checkpoint import load_state_strict
    with pytest.raises(RuntimeError, match=r"missing \[trained\]"):
        load_state_strict(new, ck["models"][0])
    with pytest.raises(RuntimeError, match=r"unexpected \[trained\]"):
        load_state_strict(P.make_probe("attentive_mil", 4, K, hidden=8), new.state_dict())
    # masks all set: the same plain mean
    for m in models:
        m.register_buffer("trained", torch.ones(K, dtype=torch.bool))
    np.testing.assert_allclose(P.predict(models, bags.__getitem__, range(4)), want, rtol=0, atol=1e-6)


def _brute_precision_cut(y, s, target, min_tp=2):
    """The lowest distinct score whose cut (score >= it) has precision >= target and >= min_tp positives."""
    best = np.inf
    for t in np.unique(s):
        call = s >= t
        tp = int((call & (y > 0)).sum())
        if tp >= min_tp and tp >= target * call.sum() - 1e-12:
            best = min(best, t)
    return best


def test_precision_cuts_fit_each_class_on_the_entries_of_models_that_learned_it():
    # train_llava.py --probe_rule=precision: entries of a fold that never learned a class must not set its cut
    rng = np.random.default_rng(3)
    y = (rng.random((40, 2)) < 0.4).astype(np.uint8)
    s = rng.normal(size=(40, 2)) + 2.0 * y
    ok = np.ones((40, 2), bool)
    ok[:10, 1] = False
    y[:10, 1], s[:10, 1] = 1, 9.0 + np.arange(10)   # that fold's noise: high "scores" on its positives
    ck = dict(sel_labels=torch.from_numpy(y), sel_logits=torch.from_numpy(s.astype(np.float32)),
              sel_mask=torch.from_numpy(ok))
    got = P.precision_cuts(ck, 0.8)
    s32 = s.astype(np.float32).astype(np.float64)
    assert got[0] == _brute_precision_cut(y[:, 0], s32[:, 0], 0.8)
    assert got[1] == _brute_precision_cut(y[10:, 1], s32[10:, 1], 0.8)
    assert got[1] != _brute_precision_cut(y[:, 1], s32[:, 1], 0.8)   # all entries would give another cut
    del ck["sel_mask"]   # an older probe: every entry
    assert P.precision_cuts(ck, 0.8)[1] == _brute_precision_cut(y[:, 1], s32[:, 1], 0.8)
