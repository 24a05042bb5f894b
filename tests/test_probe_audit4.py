"""Fourth audit of train_probe.py, nvfm/probe.py and nvfm/metrics.py: a constant prediction's Pearson r
read 0.0, NaN subject ids (pandas' blank cell) merged unrelated studies into one subject, labels.csv
rows with more cells than the header were read with their extra cells dropped, a UTF-8 byte-order mark
hid the study_key column, a latin-1 file failed without naming itself, a class named twice in
--label_names trained two outputs (and evaluate.py refused the probe afterwards), --task=age without
ages said "no studies", and the laterality CI held every replicate's weights at once. Checked against
scipy, hand-worked cases and brute-force resampled cohorts."""
import tracemalloc

import numpy as np
import pytest
from scipy.stats import pearsonr

from nvfm import metrics as M
from nvfm import probe as P
from test_probe_audit import COMMON, _cohort, _run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("c", [70.3, 1 / 3, 63.7])
def test_pearson_r_of_a_constant_prediction_is_undefined_as_in_scipy(c):
    """np.full(10, 70.3).mean() != 70.3, so the centred prediction was a tiny constant and r came out 0.0 (a
    number, with a null CI beside it) for an age probe that predicts one age for everyone; scipy says NaN."""
    y = np.arange(10.0) * 3 + 40
    pred = np.full(10, c)
    with pytest.warns(Warning):   # scipy's ConstantInputWarning
        ref = pearsonr(y, pred)[0]
    assert np.isnan(ref)
    assert np.isnan(M.pearson_r(y, pred)) and np.isnan(M.pearson_r(pred, y))
    rep = M.regression_report(y, pred, n_boot=200, seed=0)
    assert rep["pearson_r"] is None and rep["pearson_r_ci"] == [None, None]
    # a prediction that varies is still scipy's r
    p2 = pred + np.r_[1.0, np.zeros(9)]
    assert M.pearson_r(y, p2) == pytest.approx(pearsonr(y, p2)[0], abs=1e-12)


def test_nan_subject_ids_are_each_their_own_subject():
    """A blank subject read by pandas is np.nan, one object: as a dict key every such study joined one big
    subject, so the cluster bootstrap resampled them together and the stratification put them in one fold."""
    # hand-worked: studies 0 and 1 have no subject, 2 and 3 are subject "a"
    G, idx = M.group_index([np.nan, np.nan, "a", "a"])
    assert G == 3 and idx.tolist() == [0, 1, 2, 2]
    assert M.group_index([np.nan, float("nan"), "a", "b"]) is None   # all distinct: study-level
    assert M.group_index(np.array([np.nan, np.nan, 1.0, 2.0])) is None
    # 10 studies without subjects, two halves: 5 and 5 (one "subject" of 10 put all of them in one fold)
    y = np.zeros((10, 1))
    fold = P.grouped_stratification(y, [np.nan] * 10, [0.5, 0.5], seed=0)
    assert np.bincount(fold, minlength=2).tolist() == [5, 5]
    # a real subject still stays together
    fold = P.grouped_stratification(y, [np.nan] * 6 + ["s"] * 4, [0.5, 0.5], seed=0)
    assert len(set(fold[6:].tolist())) == 1


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_a_row_with_more_cells_than_the_header_is_an_error_naming_the_line(tmp_path):
    """The header lacks one name (sah): csv.DictReader filed the last cell under None and read the sah cell as
    edh, so study k2 was trained as edh-positive (it is sah-positive), without a word."""
    f = _write(tmp_path / "labels.csv", "study_key,modality,split,ich,edh\n"
                                        "k1,CT,train,0,0,0\nk2,CT,train,0,1,0\n")
    with pytest.raises(ValueError) as e:
        P.load_labels(f, use=["ich", "edh"])
    assert str(e.value).startswith(f"{f}:2: 6 cells for the 5 columns of the header")
    # a well-formed file of the same studies is read as written
    g = _write(tmp_path / "ok.csv", "study_key,modality,split,ich,sah,edh\nk1,CT,train,0,0,0\nk2,CT,train,0,1,0\n")
    rows, names = P.load_labels(g)
    assert names == ["ich", "sah", "edh"] and rows[1]["y"] == {"ich": 0, "sah": 1, "edh": 0}


def test_a_byte_order_mark_and_a_latin1_file(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark: the first name read "\\ufeffstudy_key" and the file was
    "no study_key column". A latin-1 file raised UnicodeDecodeError, whose message names no file."""
    text = "study_key,modality,split,ich\nk1,CT,train,1\nk2,CT,val,0\n"
    f = _write(tmp_path / "bom.csv", "\ufeff" + text)
    rows, names = P.load_labels(f)
    assert names == ["ich"] and [r["study_key"] for r in rows] == ["k1", "k2"] and rows[0]["y"] == {"ich": 1}
    g = _write(tmp_path / "latin1.csv", text.replace("k1", "k\u00e91"), "latin-1")
    with pytest.raises(ValueError) as e:
        P.load_labels(g)
    assert str(e.value).startswith(f"{g}: not UTF-8 text") and "\n" not in str(e.value)


def test_train_probe_refuses_a_latin1_labels_file_in_one_line(tmp_path):
    _cohort(tmp_path)
    lab = tmp_path / "labels.csv"
    lab.write_bytes(lab.read_bytes().replace(b"key001", b"key\xe901"))
    out = tmp_path / "p"
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={lab}", f"--out={out}", *COMMON],
             tmp_path)
    assert r.returncode == 1 and not out.exists(), r.stdout + r.stderr
    at = lab.read_bytes().index(b"\xe9")
    assert r.stderr.strip().splitlines() == [f"train_probe.py: error: {lab}: not UTF-8 text (invalid continuation "
                                             f"byte at byte {at}); save it as UTF-8 CSV"]


def test_a_class_named_twice_in_label_names_is_refused(tmp_path):
    """--label_names=ich,ich trained two outputs of one class (the log's macro AUROC counted it twice, "2
    classes") and saved a probe that evaluate.py then refused for its repeated names."""
    _cohort(tmp_path)
    out = tmp_path / "p"
    args = [a for a in COMMON if not a.startswith("--label_names")]
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={out}", *args,
                                "--label_names=intraparenchymal_hemorrhage, intraparenchymal_hemorrhage"], tmp_path)
    assert r.returncode == 1 and not out.exists(), r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        "train_probe.py: error: --label_names: 'intraparenchymal_hemorrhage' is named 2 times: name each class once"]


def test_an_age_task_without_ages_says_so(tmp_path):
    """labels.csv without ages (the cohort here has no age column) ended in "no CT studies with labels and
    features", though all 40 have both."""
    _cohort(tmp_path)
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", *COMMON, "--task=age"], tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"train_probe.py: error: --task=age: none of the 40 CT studies in {tmp_path / 'labels.csv'} has an age "
        "(its age column is missing or empty)")


def _laterality_case(n, seed=0):
    rng = np.random.default_rng(seed)
    yd = (rng.random(n) < 0.6).astype(int)
    yl = yd * (rng.random(n) < 0.5)
    yr = yd * ((rng.random(n) < 0.5) | (yl == 0))
    return yd, rng.normal(size=n) + yd, yl, yr, rng.normal(size=n) + yl, rng.normal(size=n) + yr


def test_laterality_ci_is_brute_force_and_does_not_hold_every_replicate_at_once():
    """All 10,000 replicates' weights were held at once, with (n, 10000) float64 products: ~0.5 GB of
    temporaries for 3000 studies, gigabytes for a larger test set. Now chunked; the same replicates."""
    yd, sd, yl, yr, sl, sr = _laterality_case(40)
    groups = [f"s{i // 3}" if i % 4 else "" for i in range(40)]
    B = 300
    rep = M.laterality_report(yd, sd, 0.2, yl, yr, sl, sr, n_boot=B, seed=5, groups=groups, chunk=7)
    w = M.bootstrap_weights(40, B, seed=5, groups=groups).numpy().astype(int)
    accs = []
    for b in range(B):   # the resampled cohort, study by study
        idx = np.repeat(np.arange(40), w[:, b])
        ok = [i for i in idx if yd[i] and sd[i] >= 0.2 and yl[i] != yr[i]]
        if ok:
            accs.append(np.mean([(sl[i] > sr[i]) if yl[i] else (sr[i] > sl[i]) for i in ok]))
    assert rep["ci_n_valid"] == len(accs)
    np.testing.assert_allclose(rep["accuracy_ci"], np.percentile(accs, [2.5, 97.5]), rtol=0, atol=1e-12)

    yd, sd, yl, yr, sl, sr = _laterality_case(3000, seed=1)
    tracemalloc.start()
    try:
        rep = M.laterality_report(yd, sd, 0.0, yl, yr, sl, sr, n_boot=10000, seed=0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rep["ci_n_valid"] == 10000 and peak < 100e6, peak


def test_a_diverged_grid_combination_is_never_chosen_and_stops_nothing(tmp_path):
    """--cv_grid=lr=1e3,1e-3 (1e3 a typo of 1e-3): the lr=1e3 folds' validation logits went NaN and the AUROC
    raised "scores contain NaN or inf": a traceback that threw away every fold trained so far. A checkpoint
    with non-finite validation outputs is now never chosen (each fold keeps its last finite best)."""
    import torch
    from sklearn.metrics import roc_auc_score
    _cohort(tmp_path)
    out = tmp_path / "p"
    args = [a for a in COMMON if not a.startswith(("--steps", "--eval_interval"))]
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={out}", *args, "--steps=40", "--eval_interval=10", "--cv_folds=2",
                                "--cv_grid=lr=1e3,1e-3"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (out / "log.txt").read_text()
    assert "validation outputs NaN or inf (diverged: lower the lr)" in log   # it did diverge
    ck = torch.load(out / "probe.pt", weights_only=True)
    y, s = ck["sel_labels"].numpy()[:, 0], ck["sel_logits"].numpy()[:, 0]
    assert np.isfinite(s).all()
    # each combination's logged out-of-fold AUROC is finite, and the chosen one is sklearn's on the stored logits
    got = {float(m[0]): float(m[1]) for m in
           __import__("re").findall(r"cv grid \{'lr': (\S+)\}: out-of-fold macro AUROC (\S+)", log)}
    assert set(got) == {1000.0, 0.001} and all(np.isfinite(list(got.values())))
    chosen = ck["cv_grid_choice"]["lr"]
    assert got[chosen] == max(got.values()) and got[chosen] == pytest.approx(roc_auc_score(y, s), abs=1e-4)
