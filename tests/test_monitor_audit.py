"""Audit of the figures behind BENCHMARKS.md "Vol-JEPA" (nvfm/monitor.py and bench/bench_jepa_curve.py):
each against an independent brute force (numpy / scikit-learn written here from the documented
definition) on small synthetic inputs, and the bench's bookkeeping on a real (tiny) train_jepa.py run."""
import json
import os
import sys
import zlib

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from nvfm.model import WINDOWS
from nvfm.monitor import (CollapseWatch, brightness_residual, content_loss, effective_rank, intensity_share, lesion_kind_auroc,
                          lesion_token_auroc, pooled_study, study_cv_auroc, token_statistics)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- brute forces

def rank_numpy(x):
    """exp(entropy) of the normalised eigenvalues of the (centred) covariance."""
    ev = np.clip(np.linalg.eigvalsh(np.cov(np.asarray(x, np.float64), rowvar=False)), 0, None)
    p = ev / ev.sum()
    p = p[p > 1e-15]
    return float(np.exp(-(p * np.log(p)).sum()))


def position_code_numpy(c):
    """The documented 30-d 'nvfm-v1' code: [sin z (5), cos z (5), sin y, cos y, sin x, cos x],
    wavelengths 3 * 32^(j/4) patches."""
    wl = 3.0 * 32.0 ** (np.arange(5) / 4)
    ang = np.asarray(c, np.float64)[:, :, None] * (2 * np.pi / wl)
    return np.concatenate([np.sin(ang), np.cos(ang)], -1).reshape(len(c), 30)


def kept_negatives(key, vid, window, n, neg_keep, seed=0):
    """The documented negative subsample: a seeded hash of (study, volume, window, seed)."""
    return np.random.default_rng(zlib.crc32(f"{key}/{vid}/{window}/{seed}".encode())).random(n) < neg_keep


def token_probe_brute(entries, labels, split_of, neg_keep=1.0, with_position=False):
    """-> (AUROC, eval labels, eval scores, eval study per token): a scikit-learn pipeline fit on the
    'train' studies' tokens only (features, window one-hot, optional position code)."""
    part = {True: ([], [], []), False: ([], [], [])}
    for key, ents in entries.items():
        for e in ents:
            y = labels.get((key, e["volume_id"]))
            if y is None:
                continue
            keep = (y == 1) | ((y == 0) & kept_negatives(key, e["volume_id"], e["window"], len(y), neg_keep))
            onehot = np.eye(len(WINDOWS))[[WINDOWS.index(e["window"])] * keep.sum()]
            cols = [np.asarray(e["emb"], np.float64)[keep], onehot]
            if with_position:
                cols.append(position_code_numpy(e["coords"][keep]))
            X, Y, S = part[split_of[key] == "train"]
            X.append(np.concatenate(cols, 1))
            Y.append(y[keep])
            S += [key] * int(keep.sum())
    (Xf, yf, _), (Xe, ye, se) = [(np.concatenate(X), np.concatenate(Y), np.array(S))
                                 for X, Y, S in (part[True], part[False])]
    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000)).fit(Xf, yf)
    score = model.decision_function(Xe)
    return roc_auc_score(ye, score), ye, score, se


def synthetic_tokens(seed, n_studies=14, n=240, study_effect=0.0):
    """Studies of one CT volume (brain + blood windows: the same labels, different features) and one
    MR volume; lesion kinds 'dark' and 'bright' on opposite sides of feature 0, partial tokens, a
    per-study strength of the lesion signal (1 +- study_effect), and grid coords whose corner holds
    more lesions."""
    rng = np.random.default_rng(seed)
    entries, labels, kinds, split_of = {}, {}, {}, {}
    for s in range(n_studies):
        key = f"study{s:02d}"
        split_of[key] = "train" if s < n_studies // 2 else ("val" if s % 2 else "test")
        ents, gain = [], 1 + study_effect * rng.uniform(-1, 1)
        for vid, windows in (("ct", ("brain", "blood")), ("mr", ("mr",))):
            coords = rng.integers(0, 16, (n, 3))
            corner = (coords[:, 1] < 6) & (coords[:, 2] < 6)
            kind = np.where(rng.random(n) < np.where(corner, 0.45, 0.08),
                            rng.choice(np.array(["dark", "bright"]), n), "")
            y = (kind != "").astype(np.int8)
            y[rng.random(n) < 0.06] = -1
            labels[key, vid], kinds[key, vid] = y, kind
            for w in windows:
                emb = rng.normal(size=(n, 5)).astype(np.float32)
                emb[:, 0] += gain * np.select([kind == "dark", kind == "bright"], [-1.2, 1.2], 0.0)
                emb[:, 1] += gain * 0.8 * (kind != "") + 0.3 * WINDOWS.index(w)
                ents.append(dict(volume_id=vid, window=w, coords=coords, emb=emb))
        entries[key] = ents
    return entries, labels, kinds, split_of


# ----------------------------------------------------------------------------- collapse monitors

def test_effective_rank_is_the_entropy_of_the_covariance_spectrum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12)) @ rng.normal(size=(12, 12)) + 50.0  # a large common offset: centring matters
    assert effective_rank(torch.from_numpy(x)) == pytest.approx(rank_numpy(x), rel=1e-4)
    # max_rows keeps evenly spaced rows: with N - 1 a multiple of max_rows - 1 they are every k-th row
    k, m = 7, 60
    x = rng.normal(size=((m - 1) * k + 1, 12)) * np.linspace(0.2, 2, 12)
    assert effective_rank(torch.from_numpy(x), max_rows=m) == pytest.approx(rank_numpy(x[::k]), rel=1e-4)
    # ... and on rows ordered in blocks (study after study, each its own mean), the subsample's rank is
    # the full set's within sampling error
    blocks = [rng.normal(size=(int(rng.integers(300, 700)), 24)) * np.linspace(0.2, 1, 24) + rng.normal(size=24)
              for _ in range(60)]
    x = np.concatenate(blocks)
    full = rank_numpy(x)
    assert effective_rank(torch.from_numpy(x), max_rows=4096) == pytest.approx(full, rel=0.01)
    assert np.isnan(effective_rank(torch.ones(1, 4)))


def test_intensity_share_and_brightness_residual_against_an_explicit_design():
    rng = np.random.default_rng(1)
    n = 900
    m, w = rng.normal(size=n), rng.choice([0, 2, 3], n)
    x = rng.normal(size=(n, 6)) + m[:, None] * rng.normal(size=6) * (1 + w[:, None]) + 2.0 * w[:, None]
    design = np.concatenate([(w[:, None] == v) * np.stack([np.ones(n), m], 1) for v in (0, 2, 3)], 1)
    resid = x - design @ np.linalg.lstsq(design, x, rcond=None)[0]
    got = brightness_residual(torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(got, resid, atol=1e-9)
    r2 = 1 - (resid ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert 0.2 < r2 < 0.95
    assert intensity_share(torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(w)) == pytest.approx(r2, rel=1e-9)
    # the max_rows path: the same on the evenly spaced rows (N - 1 = 4 * (max_rows - 1))
    keep = np.arange(0, 897, 4)
    d2 = design[keep][:, np.abs(design[keep]).sum(0) > 0]
    res2 = x[keep] - d2 @ np.linalg.lstsq(d2, x[keep], rcond=None)[0]
    r2s = 1 - (res2 ** 2).sum() / ((x[keep] - x[keep].mean(0)) ** 2).sum()
    assert intensity_share(torch.from_numpy(x[:897]), torch.from_numpy(m[:897]), torch.from_numpy(w[:897]),
                           max_rows=225) == pytest.approx(r2s, rel=1e-9)


def test_content_loss_is_smooth_l1_of_the_error_beyond_brightness():
    rng = np.random.default_rng(2)
    n, d = 300, 4
    m, w = rng.normal(size=n), rng.integers(0, 3, n)
    target, pred = rng.normal(size=(n, d)), rng.normal(size=(n, d)) * 1.5 + 2 * m[:, None] + w[:, None]
    err = pred - target
    design = np.concatenate([(w[:, None] == v) * np.stack([np.ones(n), m], 1) for v in range(3)], 1)
    a = np.abs(err - design @ np.linalg.lstsq(design, err, rcond=None)[0])
    expect = np.where(a < 1, 0.5 * a ** 2, a - 0.5).mean()
    got = content_loss(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(m), torch.from_numpy(w))
    assert got == pytest.approx(expect, rel=1e-9)
    # the full loss is larger: brightness explains part of this error
    full = np.where(np.abs(err) < 1, 0.5 * err ** 2, np.abs(err) - 0.5).mean()
    assert full > expect * 1.2


def test_token_statistics_on_float_tokens_against_numpy():
    rng = np.random.default_rng(3)
    t = np.round(rng.normal(size=(9, 1024)), 1).astype(np.float32)  # ties, as quantised voxels have
    want = np.concatenate([t.mean(1, keepdims=True), t.std(1, ddof=1, keepdims=True),
                           np.percentile(t.astype(np.float64), [5, 25, 50, 75, 95], axis=1).T], 1)
    np.testing.assert_allclose(token_statistics(torch.from_numpy(t), chunk=4).numpy(), want, atol=1e-5)


# ----------------------------------------------------------------------------- token probes

@pytest.mark.parametrize("with_position", [False, True])
def test_lesion_token_auroc_equals_a_scikit_learn_brute_force(with_position):
    """Fit on the train studies only, scored on val + test, the window one-hot and (when asked) the
    position code beside the features, standardised on the fit part: the same AUROC and counts."""
    entries, labels, _, split_of = synthetic_tokens(4)
    want, ye, _, _ = token_probe_brute(entries, labels, split_of, neg_keep=1.0, with_position=with_position)
    auc, ci, n, npos = lesion_token_auroc(entries, labels, split_of, neg_keep=1.0, with_position=with_position)
    assert auc == pytest.approx(want, abs=2e-4) and 0.6 < auc < 0.95
    assert (n, npos) == (len(ye), int(ye.sum())) and ci is None
    # the scored studies never enter the fit or the standardisation: shifting all their features by one
    # constant moves every score alike and leaves the AUROC as it was
    moved = {k: [dict(e, emb=e["emb"] + (0.0 if split_of[k] == "train" else 10.0)) for e in v]
             for k, v in entries.items()}
    assert lesion_token_auroc(moved, labels, split_of, neg_keep=1.0, with_position=with_position)[0] == \
        pytest.approx(auc, abs=1e-4)


def test_lesion_token_auroc_subsamples_negatives_per_study_volume_and_window():
    entries, labels, _, split_of = synthetic_tokens(5)
    want, ye, _, _ = token_probe_brute(entries, labels, split_of, neg_keep=0.1)
    auc, _, n, npos = lesion_token_auroc(entries, labels, split_of)
    assert auc == pytest.approx(want, abs=2e-4) and (n, npos) == (len(ye), int(ye.sum()))
    # about 1 in 10 negatives, the same whatever order the studies come in
    n_neg = sum(int((labels[k, e["volume_id"]] == 0).sum()) for k, v in entries.items() if split_of[k] != "train"
                for e in v)
    assert 0.07 < (n - npos) / n_neg < 0.13
    assert lesion_token_auroc(dict(reversed(list(entries.items()))), labels, split_of) == (auc, None, n, npos)


def test_lesion_token_auroc_ci_resamples_studies():
    """With a lesion signal whose strength varies by study, the study bootstrap is far wider than a token bootstrap; its
    percentiles match a brute-force study bootstrap of the brute-force scores."""
    entries, labels, _, split_of = synthetic_tokens(6, n_studies=24, n=120, study_effect=0.9)
    auc, ye, score, se = token_probe_brute(entries, labels, split_of)
    got, ci, _, _ = lesion_token_auroc(entries, labels, split_of, neg_keep=1.0, n_boot=1000)
    assert got == pytest.approx(auc, abs=2e-4)
    rng, studies = np.random.default_rng(123), np.unique(se)
    idx = {s: np.nonzero(se == s)[0] for s in studies}
    boots, tokens = [], []
    for _ in range(1000):
        pick = np.concatenate([idx[s] for s in rng.choice(studies, len(studies))])
        boots.append(roc_auc_score(ye[pick], score[pick]))
        t = rng.integers(0, len(ye), len(ye))
        tokens.append(roc_auc_score(ye[t], score[t]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    tlo, thi = np.percentile(tokens, [2.5, 97.5])
    assert (hi - lo) > 2 * (thi - tlo)  # the two resamplings are told apart
    assert ci[0] == pytest.approx(lo, abs=0.02) and ci[1] == pytest.approx(hi, abs=0.02)


def test_lesion_token_auroc_nan_rules():
    entries, labels, _, split_of = synthetic_tokens(7)
    _, _, n, npos = lesion_token_auroc(entries, labels, split_of)
    assert np.isnan(lesion_token_auroc(entries, labels, split_of, min_positives=npos + 1)[0])
    assert not np.isnan(lesion_token_auroc(entries, labels, split_of, min_positives=npos)[0])
    no_train_pos = {k: np.where(split_of[k[0]] == "train", np.minimum(y, 0), y).astype(np.int8)
                    for k, y in labels.items()}
    assert np.isnan(lesion_token_auroc(entries, no_train_pos, split_of)[0])
    empty = lesion_token_auroc({}, {}, {})
    assert np.isnan(empty[0]) and empty[1:] == (None, 0, 0)


def test_lesion_token_auroc_refuses_labels_of_another_token_grid():
    """A label array of another length (another token rule or crop) used to drop its volume from
    the figure silently; now it is an error that names the volume."""
    entries, labels, _, split_of = synthetic_tokens(8)
    labels["study10", "mr"] = labels["study10", "mr"][:-1]
    with pytest.raises(ValueError, match="study10, volume mr .*239 token labels for 240 tokens"):
        lesion_token_auroc(entries, labels, split_of)
    del labels["study10", "mr"]  # a volume without labels is left out
    assert np.isfinite(lesion_token_auroc(entries, labels, split_of)[0])


def test_lesion_kind_auroc_against_per_kind_brute_forces():
    """Each kind's tokens against the lesion-free ones only (the other kind's lesion tokens are not
    negatives), the same negative subsample, kinds under the minimum left out, macro mean."""
    entries, labels, kinds, split_of = synthetic_tokens(9, n_studies=20)
    macro, per = lesion_kind_auroc(entries, labels, kinds, split_of)
    want = {}
    for d in ("dark", "bright"):
        lab = {k: np.where((y == 1) & (kinds[k] == d), 1, np.where(y == 0, 0, -1)).astype(np.int8)
               for k, y in labels.items()}
        want[d] = token_probe_brute(entries, lab, split_of, neg_keep=0.1)[0]
    assert set(per) == {"dark", "bright"}
    for d in want:
        assert per[d] == pytest.approx(want[d], abs=2e-4)
    assert macro == pytest.approx(np.mean(list(want.values())))
    # counting the other kind's lesion tokens as negatives gives another figure: the match above tells them apart
    wrong = {k: np.where((y == 1) & (kinds[k] == "dark"), 1, np.where(y >= 0, 0, -1)).astype(np.int8)
             for k, y in labels.items()}
    assert abs(lesion_token_auroc(entries, wrong, split_of)[0] - per["dark"]) > 2e-3
    # a kind scored on fewer tokens than the minimum is left out of the mean
    n_bright = sum(int(((labels[k, e["volume_id"]] == 1) & (kinds[k, e["volume_id"]] == "bright")).sum())
                   for k, v in entries.items() if split_of[k] != "train" for e in v)
    n_dark = sum(int(((labels[k, e["volume_id"]] == 1) & (kinds[k, e["volume_id"]] == "dark")).sum())
                 for k, v in entries.items() if split_of[k] != "train" for e in v)
    cut = min(n_bright, n_dark) + 1
    if cut <= max(n_bright, n_dark):
        macro2, per2 = lesion_kind_auroc(entries, labels, kinds, split_of, min_positives=cut)
        assert set(per2) == {"bright" if n_bright >= cut else "dark"}
        assert macro2 == pytest.approx(list(per2.values())[0])


# ----------------------------------------------------------------------------- study probe

def test_pooled_study_is_per_window_mean_and_std():
    rng = np.random.default_rng(10)
    ents = [dict(window="brain", emb=rng.normal(size=(7, 3))), dict(window="mr", emb=rng.normal(size=(4, 3))),
            dict(window="brain", emb=rng.normal(size=(5, 3)))]
    brain = np.concatenate([ents[0]["emb"], ents[2]["emb"]])
    want = {"brain": [brain.mean(0), brain.std(0)], "mr": [ents[1]["emb"].mean(0), ents[1]["emb"].std(0)]}
    expect = np.concatenate([v for w in WINDOWS for v in want.get(w, [np.zeros(3), np.zeros(3)])])
    np.testing.assert_allclose(pooled_study(ents, 3), expect, rtol=1e-6, atol=1e-6)


def test_study_cv_auroc_equals_repeated_stratified_cv_with_scikit_learn():
    """5-fold stratified CV repeated with 3 shuffles, standardised on each training part, C = 0.1,
    AUROC of the out-of-fold scores per repeat, averaged; classes with < 5 positives or negatives out."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(70, 10)) * np.r_[1, 1, 1, 100, np.ones(6)]
    Y = (rng.random((70, 4)) < [0.3, 0.08, 0.5, 0.95]).astype(int)
    Y[:, 1] = 0
    Y[:4, 1] = 1  # 4 positives: out
    X[:, 0] += Y[:, 0]
    X[:, 1] += 0.6 * Y[:, 2]
    aucs = []
    for j in range(Y.shape[1]):
        y = Y[:, j]
        if min(y.sum(), len(y) - y.sum()) < 5:
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
        aucs.append(np.mean([roc_auc_score(y, cross_val_predict(model, X, y, method="decision_function",
                                                               cv=StratifiedKFold(5, shuffle=True, random_state=r)))
                             for r in range(3)]))
    got, n = study_cv_auroc(X, Y)
    assert n == len(aucs) == (2 + (min(Y[:, 3].sum(), 70 - Y[:, 3].sum()) >= 5))
    assert got == pytest.approx(np.mean(aucs), abs=1e-6)


def test_control_token_auroc_labels_every_token_with_its_volume_latent(tmp_path):
    """--control=True's token figure: every token of a volume labelled with the volume's latent,
    no negative subsample, fit on the train volumes; against the brute force on the same entries."""
    import csv

    from nvfm.loader import write_control_shards
    from nvfm.monitor import ProbeSet, TokenStatistics
    shards = write_control_shards(str(tmp_path / "s"), n=18, shape=(16, 96, 96))
    probes = ProbeSet(shards, token_task="grating_y")
    entries = probes.embed(TokenStatistics())
    got = probes.score(entries)
    latent = {r["study_key"]: int(r["grating_y"]) for r in csv.DictReader(open(os.path.join(shards, "labels.csv")))}
    labels = {(k, e["volume_id"]): np.full(len(e["emb"]), latent[k], np.int8) for k, v in entries.items() for e in v}
    want = token_probe_brute(entries, labels, probes.split_of)[0]
    assert got["token_auroc"] == pytest.approx(want, abs=2e-4)
    assert got["rank"] == pytest.approx(rank_numpy(np.concatenate([e["emb"] for v in entries.values() for e in v])),
                                        rel=1e-3)


# ----------------------------------------------------------------------------- bench_jepa_curve.py

@pytest.fixture
def curve(monkeypatch):
    """bench/bench_jepa_curve.py as a module: its settings read from argv (none here)."""
    from conftest import load_bench
    monkeypatch.setattr(sys, "argv", ["bench_jepa_curve.py"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # configure() installs its own: restored after
    return load_bench("bench_jepa_curve")


def test_curve_summary_is_the_seed_mean_and_half_range(curve):
    res = {f"seed{s}/teacher/250": {"lesion_auroc": v, "rank": r}
           for s, v, r in ((0, 0.81, 9.0), (1, 0.85, 7.0), (2, 0.80, 8.6))}
    m, h, n = curve.summary(res, "teacher", 250, [0, 1, 2], "lesion_auroc")
    assert (m, h, n) == (pytest.approx((0.81 + 0.85 + 0.80) / 3), pytest.approx(0.025), 3)
    m, h, n = curve.summary(res, "teacher", 250, [0, 1, 2, 3], "rank")  # a missing seed is not counted
    assert (m, h, n) == (pytest.approx(24.6 / 3), pytest.approx(1.0), 3)


def test_curve_pretrain_flops_sums_the_logged_intervals(curve, tmp_path):
    """Hand-worked: each record's TFLOP/s x its interval's seconds (steps x batch / volumes per s);
    a step logged twice (a resumed run) counts once, its last record; records past `upto` do not count."""
    from nvfm.checkpoint import save_atomic
    save_atomic({"config": {"global_batch": 4}, "step": 40}, tmp_path / "ckpt.pt")
    recs = [dict(step=1, loss=1.0, tflops=0.5, volumes_per_s=2.0),    # 1 step: 2 s -> 1.0 TFLOP
            dict(step=10, loss=1.0, tflops=1.0, volumes_per_s=4.0),   # 9 steps: 9 s -> 9.0
            dict(step=10, probe={}),                                  # a probe record: no timing
            dict(step=20, loss=1.0, tflops=9.9, volumes_per_s=1.0),   # superseded by the resumed run's
            dict(step=20, loss=1.0, tflops=2.0, volumes_per_s=8.0),   # 10 steps: 5 s -> 10.0
            dict(step=40, loss=1.0, tflops=3.0, volumes_per_s=8.0)]   # 20 steps: 10 s -> 30.0
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert curve.pretrain_flops(str(tmp_path), 20) == pytest.approx(20.0e12)
    assert curve.pretrain_flops(str(tmp_path), 40) == pytest.approx(50.0e12)


def test_curve_snapshots_random_init_and_exported_encoder(curve, tmp_path):
    """On a real tiny run: the step-0 reference is the run's own init (step 1 at lr 0 leaves both
    encoders there), each snapshot's 'student' / 'teacher' are the checkpoint's student / teacher,
    and a budget below the checkpoint's step, with no snapshot of its own, is refused (it used to get
    the later step's encoders under its own step)."""
    from nvfm.checkpoint import load_checkpoint
    from nvfm.loader import write_synthetic_shards
    from nvfm.model import load_encoder
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=4, seed=0, shape=(16, 64, 64))
    curve.cohort = str(tmp_path / "curve")
    curve.extra = ("--global_batch=2 --num_workers=0 --predictor_depth=1 --lr_start=0.0 --warmup_frac=0.5 "
                   "--log_interval=1")   # a 1-step warm-up: step 1 runs at lr_start
    snaps, run = curve.pretrain(shards, 3, [0, 1, 3])
    assert sorted(snaps) == [1, 3]
    init = curve.random_init(load_encoder(os.path.join(snaps[1], "teacher.safetensors")), 3).state_dict()
    for name in ("student", "teacher"):
        got = load_encoder(os.path.join(snaps[1], f"{name}.safetensors")).state_dict()
        assert all(torch.equal(got[k], init[k]) for k in init), name
    ck = load_checkpoint(os.path.join(run, "ckpt.pt"))
    assert ck["step"] == 3
    for name in ("student", "teacher"):
        got = load_encoder(os.path.join(snaps[3], f"{name}.safetensors")).state_dict()
        assert all(torch.equal(got[k], ck[name][k]) for k in got), name
    assert not torch.equal(ck["student"]["patch_embed.weight"], ck["teacher"]["patch_embed.weight"])
    assert curve.pretrain_flops(run, 3) > curve.pretrain_flops(run, 1) > 0
    with pytest.raises(SystemExit, match="at step 3, past the budget 2"):
        curve.pretrain(shards, 3, [0, 1, 2, 3])
    assert not os.path.exists(os.path.join(run, "step2", "teacher.safetensors"))


# ----------------------------------------------------------------------------- bench_linear_probe.py

def test_linear_probe_bench_labels_each_cache_on_its_own_tokens(tmp_path, capsys):
    """Two feature caches of one demo cohort with different token rules: each is scored on labels
    of its own tokens, so a cache's line does not depend on which cache comes first (the second
    cache used to get the first's labels, which fit none of its volumes: 0 scored tokens)."""
    import subprocess

    from nvfm import phantom
    from conftest import load_bench
    d = tmp_path / "demo"
    cohort, shards = str(d / "cohort"), str(d / "shards")
    phantom.generate_cohort(cohort, 6, seed=1, profile="tiny", workers=1, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(ROOT, "preprocess.py"), f"--input={cohort}/dicom",
                    f"--output={shards}", f"--labels={cohort}/labels.csv", f"--findings={cohort}/findings.jsonl",
                    "--workers=1"],
                   check=True, capture_output=True, env=env, timeout=600)
    for name, extra in (("features", []), ("features_strict", ["--min_fg_fraction=1.0"])):
        subprocess.run([sys.executable, os.path.join(ROOT, "encode.py"), f"--shards={shards}", "--encoder=random:tiny",
                        f"--out={d / name}", "--device=cpu"] + extra,
                       check=True, capture_output=True, env=env, timeout=600)
    bench = load_bench("bench_linear_probe")
    lines = {}
    for names in (["features_strict"], ["features", "features_strict"]):
        bench.main(str(d), names)
        out = capsys.readouterr().out
        lines[len(names)] = [ln for ln in out.splitlines() if ln.startswith("features_strict:")][0]
    assert lines[1] == lines[2]
    assert "(0 val+test tokens" not in lines[2]


# ----------------------------------------------------------------------------- subjects, label columns, NaN ranks

def grouped_cv_brute(X, y, subjects, repeats=3):
    """scikit-learn's StratifiedGroupKFold (5 folds, 3 shuffles), standardised on each training part, C = 0.1."""
    from sklearn.model_selection import StratifiedGroupKFold
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    return np.mean([roc_auc_score(y, cross_val_predict(model, X, y, groups=subjects, method="decision_function",
                                                       cv=StratifiedGroupKFold(5, shuffle=True, random_state=r)))
                    for r in range(repeats)])


def subject_twins(seed, n_subjects=24, per=3, dim=200):
    """Studies of a subject share their features (the subject's own vector + a little noise); the
    labels are drawn per subject and carry no signal beyond who the subject is."""
    rng = np.random.default_rng(seed)
    subj = np.repeat(np.arange(n_subjects), per)
    X = rng.normal(size=(n_subjects, dim))[subj] + 0.3 * rng.normal(size=(n_subjects * per, dim))
    Y = (rng.random((n_subjects, 2)) < 0.45).astype(int)[subj]
    return X, Y, subj


def test_study_cv_auroc_keeps_a_subjects_studies_in_one_fold():
    """With a subject's studies on both sides of a fold, labels without signal scored ~1.0 (the
    probe recognises the subject); grouped, the figure is scikit-learn's StratifiedGroupKFold's."""
    X, Y, subj = subject_twins(0)
    assert study_cv_auroc(X, Y)[0] > 0.95  # what ungrouped folds score: memory of the subject
    got, n = study_cv_auroc(X, Y, groups=[f"s{s:03d}" for s in subj])  # names sort as the numbers do
    want = [grouped_cv_brute(X, Y[:, j], subj) for j in range(2)]
    assert n == 2 and got == pytest.approx(np.mean(want), abs=1e-6)
    assert abs(got - 0.5) < 0.2
    # a class needs >= 5 subjects on each side: 6 positive studies of 2 subjects are too few
    y = (subj < 2).astype(int)
    assert study_cv_auroc(X, y[:, None])[1] == 1 and study_cv_auroc(X, y[:, None], groups=subj) == (
        pytest.approx(np.nan, nan_ok=True), 0)


def test_probe_set_reads_only_diagnosis_columns_and_groups_by_subject(tmp_path):
    """preprocess.py keeps `sex` and `subject` in labels.csv: they are not classes (ProbeSet failed on
    int('M'), and counted a 0/1 sex as a diagnosis), and the study CV keeps a subject's studies in one
    fold; against the grouped scikit-learn brute force on per-window mean/std pooled by hand."""
    import csv

    from nvfm.loader import write_synthetic_shards
    from nvfm.model import Encoder, EncoderConfig
    from nvfm.monitor import ProbeSet
    shards = write_synthetic_shards(str(tmp_path / "s"), n=24, seed=0, shape=(8, 48, 48))
    keys = sorted({v["study_key"] for v in ProbeSet(shards).reader.volumes})
    subject = {k: (f"{i // 2:08x}" if i < 20 else "") for i, k in enumerate(keys)}  # the last 4: no subject given
    a = {k: (i // 2) % 2 for i, k in enumerate(keys)}
    with open(tmp_path / "s" / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_key", "study", "split", "age", "sex", "subject", "a"])
        w.writerows([k, f"demo-{i}", "train", 50 + i, "MF"[i % 2], subject[k], a[k]] for i, k in enumerate(keys))
    probes = ProbeSet(shards)
    assert probes.Y.shape == (24, 1)
    torch.manual_seed(0)
    entries = probes.embed(Encoder(EncoderConfig.preset("tiny")).eval())
    got = probes.score(entries)
    X, e_dim = [], 96
    for k in probes.labelled:
        feats = []
        for win in WINDOWS:
            e = [x["emb"] for x in entries[k] if x["window"] == win]
            v = np.concatenate(e).astype(np.float64) if e else np.zeros((1, e_dim))
            feats += [v.mean(0), v.std(0)]
        X.append(np.concatenate(feats))
    groups = [subject[k] or k for k in probes.labelled]
    want = grouped_cv_brute(np.array(X), np.array([a[k] for k in probes.labelled]), groups)
    assert got["study_classes"] == 1 and got["study_auroc"] == pytest.approx(want, abs=1e-4)


def test_effective_rank_and_collapse_watch_on_non_finite_features():
    """A diverged run's NaN features: the rank is NaN (linalg.svdvals raised LinAlgError, a traceback
    at the log step), and a NaN rank neither becomes the watch's reference (a NaN step-1 rank
    silenced the warning for the whole run) nor ends an episode."""
    x = torch.randn(50, 8)
    x[3, 2] = float("nan")
    assert np.isnan(effective_rank(x))
    watch = CollapseWatch(0.25)
    out = [watch.update(r) for r in (float("nan"), 20.0, 6.0, 4.0, float("nan"), 3.0, 6.0, 2.0)]
    assert watch.initial == 20.0
    assert [o is not None for o in out] == [False, False, False, True, False, False, False, True]
    assert "0.20x its initial 20.0" in out[3]
    resumed = CollapseWatch(0.25, initial=float("nan"))  # a checkpoint that stored a NaN reference
    assert resumed.update(12.0) is None and resumed.update(2.0) is not None


def labelled_synthetic_shards(path, n=24, split_column=True, splits=("train", "val", "test")):
    """Synthetic shards (splits in the manifest: `splits` by fours, in turn) whose labels.csv has
    preprocess.py's meta columns (study, split unless not split_column, age, sex coded 0/1, subject
    as a salted hash) beside one diagnosis 'a'; subjects of two studies (the last four without one).
    -> (shards, keys in study-key order, {key: subject}, {key: a})."""
    import csv

    from nvfm.loader import synthetic_volume, write_shards
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        rec, data, mask = synthetic_volume(rng, "MR" if i % 2 == 0 else "CT", (8, 48, 48), f"synthetic-{i:02d}")
        rec["split"] = splits[i // 4 % len(splits)]
        items.append((rec, data, mask))
    shards = write_shards(str(path), items)
    keys = [rec["study_key"] for rec, _, _ in items]
    assert keys == sorted(keys)
    subject = {k: (f"{zlib.crc32(str(i // 2).encode()):08x}" if i < n - 4 else "") for i, k in enumerate(keys)}
    a = {k: (i // 2) % 2 for i, k in enumerate(keys)}
    with open(os.path.join(shards, "labels.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_key", "study"] + ["split"] * split_column + ["age", "sex", "subject", "a"])
        w.writerows([k, f"demo-{i}"] + [rec["split"]] * split_column + [50 + i, i % 2, subject[k], a[k]]
                    for i, (k, (rec, _, _)) in enumerate(zip(keys, items)))
    open(os.path.join(shards, "findings.jsonl"), "w").close()
    return shards, keys, subject, a


def test_linear_probe_bench_reads_only_diagnosis_columns_and_groups_by_subject(tmp_path, capsys):
    """bench_linear_probe.py on labels.csv with `sex` / `subject` columns: it failed on the subject
    hash (int('f4db...')). A cache whose studies of one subject share their features and whose
    labels carry nothing else: the 5-fold CV figure is the subject-grouped scikit-learn brute force
    (~0.5), not the ungrouped folds' memory of the subject."""
    from conftest import load_bench
    from nvfm.features import FeatureWriter
    shards, keys, subject, a = labelled_synthetic_shards(tmp_path / "shards")
    rng = np.random.default_rng(3)
    person = rng.normal(size=(len(keys) // 2, 96))
    X = []
    with FeatureWriter(str(tmp_path / "features"), "test", 96) as w:
        for i, k in enumerate(keys):
            study = person[i // 2] + 0.3 * rng.normal(size=96)
            emb = (study + 0.01 * rng.normal(size=(6, 96))).astype(np.float16)
            w.add(k, [dict(volume_id=f"v{i}", window="brain", modality="CT", coords=np.zeros((6, 3)), emb=emb)])
            e = emb.astype(np.float64)
            X.append(np.concatenate([v for win in WINDOWS for v in ((e.mean(0), e.std(0)) if win == "brain"
                                                                    else (np.zeros(96), np.zeros(96)))]))
    y = np.array([a[k] for k in keys])
    assert study_cv_auroc(np.array(X), y[:, None])[0] > 0.9  # ungrouped folds: the subject recognised
    want = grouped_cv_brute(np.array(X), y, [subject[k] or k for k in keys])
    load_bench("bench_linear_probe").main(str(tmp_path), ["features"])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("features:")][0]
    assert f"5-fold CV {want:.3f} (1 classes)" in line and abs(want - 0.5) < 0.25


def test_curve_supervised_bound_trains_on_diagnosis_columns_only(curve, tmp_path, monkeypatch):
    """The study-label bound's targets are the diagnosis columns: it failed on the subject hash, and
    a 0/1 `sex` column was a class it trained on."""
    from nvfm.model import Encoder, EncoderConfig
    shards, _, _, _ = labelled_synthetic_shards(tmp_path / "shards")
    targets = []
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def spy(logits, target, **kw):
        targets.append(target.shape)
        return bce(logits, target, **kw)
    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", spy)
    curve.supervised_bound(shards, Encoder(EncoderConfig.preset("tiny")), flops=1.0, batch=4)
    assert targets == [(4, 1)]


def _pooled_cache(path, keys, a, shift, seed):
    """A feature cache of one 4-token brain volume per study, shifted by `shift` x its label a[k];
    -> (S, 16) each study's token mean and std, as the bench pools them, by hand."""
    from nvfm.features import FeatureWriter
    rng = np.random.default_rng(seed)
    X = []
    with FeatureWriter(str(path), "test", 8) as w:
        for i, k in enumerate(keys):
            emb = (rng.normal(size=(4, 8)) + shift * a[k]).astype(np.float16)
            w.add(k, [dict(volume_id=f"v{i}", window="brain", modality="CT", coords=np.zeros((4, 3)), emb=emb)])
            e = emb.astype(np.float64)
            X.append(np.concatenate([e.mean(0), e.std(0)]))
    return np.array(X)


def test_linear_probe_bench_scores_a_cohort_without_test_studies(tmp_path, capsys):
    """A split without studies (a small cohort with no 'test' study) is a NaN figure of 0 classes, not
    a traceback (yev.min() of an empty split); the val figure is scikit-learn's fit on train."""
    import csv

    from conftest import load_bench
    shards, keys, _, a = labelled_synthetic_shards(tmp_path / "shards", splits=("train", "val"))
    rows = list(csv.DictReader(open(os.path.join(shards, "labels.csv"))))
    X = _pooled_cache(tmp_path / "features", keys, a, 0.3, seed=0)
    y = np.array([a[k] for k in keys])
    split = np.array([r["split"] for r in rows])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    want = roc_auc_score(y[split == "val"], model.fit(X[split == "train"], y[split == "train"]).decision_function(
        X[split == "val"]))
    load_bench("bench_linear_probe").main(str(tmp_path), ["features"])
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("features:")][0]
    assert f"study macro AUROC val {want:.3f} (1) test nan (0)" in line


def test_linear_probe_bench_takes_the_splits_from_the_shards(tmp_path, capsys):
    """preprocess.py draws the splits from the study key when labels.csv has no split column, and then
    writes none: the bench read splits from labels.csv, found no train study and printed
    'val nan (0) test nan (0)'. Against scikit-learn fit on the manifest's train studies."""
    from conftest import load_bench
    from nvfm.data import ShardReader
    shards, keys, _, a = labelled_synthetic_shards(tmp_path / "shards", split_column=False)
    split_of = {v["study_key"]: v["split"] for v in ShardReader(shards).volumes}
    X = _pooled_cache(tmp_path / "features", keys, a, 0.5, seed=1)
    y, split = np.array([a[k] for k in keys]), np.array([split_of[k] for k in keys])
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000)).fit(X[split == "train"],
                                                                                         y[split == "train"])
    want = {ev: roc_auc_score(y[split == ev], model.decision_function(X[split == ev])) for ev in ("val", "test")}
    load_bench("bench_linear_probe").main(str(tmp_path), ["features"])
    out = capsys.readouterr().out
    assert "24 studies (8 train)" in out
    assert f"study macro AUROC val {want['val']:.3f} (1) test {want['test']:.3f} (1)" in out
