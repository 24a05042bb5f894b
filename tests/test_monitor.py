"""Collapse monitors and frozen-feature probes (nvfm/monitor.py) against independent computations:
numpy eigenvalues, hand-worked spectra, scikit-learn, and a planted collapse of a real encoder."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from nvfm.model import Encoder, EncoderConfig
from nvfm.monitor import CollapseWatch, effective_rank, lesion_token_auroc, mean_std, relative_distance, study_cv_auroc


def rank_numpy(x):
    x = np.asarray(x, np.float64)
    ev = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 0, None)
    p = ev / ev.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_against_numpy_and_hand_cases():
    rng = np.random.default_rng(0)
    for shape in [(50, 7), (300, 40), (20, 64)]:  # incl. fewer rows than dimensions
        x = rng.normal(size=shape) @ rng.normal(size=(shape[1], shape[1]))
        assert effective_rank(torch.from_numpy(x)) == pytest.approx(rank_numpy(x), rel=1e-4)
    # k orthogonal directions with equal variance -> rank k, whatever the ambient dimension
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    for k in (1, 3, 10):
        z = rng.choice([-1.0, 1.0], size=(4000, k))  # exactly unit variance per direction, uncorrelated
        z -= z.mean(0)
        z = np.linalg.qr(z)[0] * np.sqrt(len(z))  # whiten exactly
        assert effective_rank(torch.from_numpy(z @ q[:k])) == pytest.approx(k, rel=1e-6)
    # a constant feature has no spread: rank is not larger than 1 numerically meaningful, std 0
    c = torch.ones(100, 16) * torch.arange(16.0)
    assert mean_std(c) == 0.0


def test_relative_distance_by_hand():
    a, b = [torch.tensor([3.0, 0.0]), torch.tensor([[0.0]])], [torch.tensor([0.0, 0.0]), torch.tensor([[4.0]])]
    assert relative_distance(a, b) == pytest.approx(5.0 / 4.0)
    assert relative_distance(b, b) == 0.0
    # as train_jepa passes them: .parameters() generators (the second was spent before ||b|| was summed)
    assert relative_distance(iter(a), iter(b)) == pytest.approx(5.0 / 4.0)


def test_planted_collapse_of_a_real_encoder_triggers_the_warning():
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.preset("tiny"))
    x, coords = torch.randn(300, 1024), torch.randint(0, 8, (300, 3), dtype=torch.int32)
    cu = torch.tensor([0, 150, 300], dtype=torch.int32)
    with torch.no_grad():
        r0 = effective_rank(enc(x, coords, cu, 150))
        watch = CollapseWatch(0.25)
        assert watch.update(r0) is None and r0 > 10
        assert watch.update(0.9 * r0) is None  # healthy: no warning
        # plant a collapse: the final LayerNorm scales every feature to 0 except one direction
        enc.blocks.norm.weight.zero_()
        enc.blocks.norm.weight[0] = 1.0
        r1 = effective_rank(enc(x, coords, cu, 150))
    assert r1 == pytest.approx(1.0, abs=1e-3)
    msg = watch.update(r1, 0.8)
    assert msg and "collapse" in msg and f"{r1:.1f}" in msg and "80% of their variance" in msg
    assert watch.update(r1) is None  # warned once per episode
    assert watch.update(r0) is None and watch.update(r1) is not None  # a new episode warns again


def test_lesion_token_probe_against_sklearn():
    rng = np.random.default_rng(1)
    entries, labels, split_of = {}, {}, {}
    for s in range(12):
        key = f"s{s}"
        split_of[key] = "train" if s < 8 else "val"
        y = (rng.random(400) < 0.2).astype(np.int8)
        y[:5] = -1  # partial tokens are left out
        emb = rng.normal(size=(400, 6)).astype(np.float32)
        emb[:, 0] += 1.5 * (y == 1)  # the lesion signal lives in one dimension
        entries[key] = [dict(volume_id=f"v{s}", window="mr", emb=emb)]
        labels[key, f"v{s}"] = y
    auc, ci, n, npos = lesion_token_auroc(entries, labels, split_of, n_boot=200)
    # independent check: on the scored studies, the planted dimension alone ranks almost as well
    ev_y = np.concatenate([labels[k, f"v{k[1:]}"] for k in entries if split_of[k] == "val"])
    ev_x = np.concatenate([entries[k][0]["emb"][:, 0] for k in entries if split_of[k] == "val"])
    kept = ev_y >= 0
    assert npos <= int((ev_y[kept] == 1).sum()) and n < kept.sum()  # negatives subsampled
    assert auc == pytest.approx(roc_auc_score(ev_y[kept], ev_x[kept]), abs=0.06)
    assert 0.8 < auc < 0.95 and ci[0] < auc < ci[1]
    assert np.isnan(lesion_token_auroc(entries, labels, split_of, min_positives=npos + 1)[0])  # too few to score
    for e in entries.values():  # no signal -> chance
        e[0]["emb"] = rng.normal(size=(400, 6)).astype(np.float32)
    assert abs(lesion_token_auroc(entries, labels, split_of)[0] - 0.5) < 0.08



def test_lesion_token_probe_with_position():
    """Lesions that sit in one corner of the grid, features that know nothing: the features-only
    probe is at chance, the position-aware one finds the corner; a planted feature signal is read
    by both (the position code adds to the features, it does not replace them)."""
    rng = np.random.default_rng(3)
    entries, labels, split_of = {}, {}, {}
    for s in range(12):
        key = f"s{s}"
        split_of[key] = "train" if s < 8 else "test"
        coords = rng.integers(0, 24, size=(600, 3)).astype(np.int32)
        corner = (coords[:, 0] < 8) & (coords[:, 1] < 8)
        y = (rng.random(600) < np.where(corner, 0.5, 0.02)).astype(np.int8)
        entries[key] = [dict(volume_id="v", window="brain", coords=coords,
                             emb=rng.normal(size=(600, 5)).astype(np.float32))]
        labels[key, "v"] = y
    # the oracle: the corner indicator itself, on the scored tokens
    ev = [k for k in entries if split_of[k] == "test"]
    ev_y = np.concatenate([labels[k, "v"] for k in ev])
    ev_c = np.concatenate([entries[k][0]["coords"] for k in ev])
    oracle = roc_auc_score(ev_y, (ev_c[:, 0] < 8) & (ev_c[:, 1] < 8))
    plain = lesion_token_auroc(entries, labels, split_of)[0]
    placed, ci, _, _ = lesion_token_auroc(entries, labels, split_of, with_position=True, n_boot=100)
    assert abs(plain - 0.5) < 0.08
    assert oracle - 0.08 < placed <= oracle + 0.02 and ci[0] < placed < ci[1]
    for k in entries:  # a feature signal outside the corner: read with or without the position
        e, y = entries[k][0], labels[k, "v"]
        e["emb"][:, 0] += 3.0 * ((y == 1) & ~((e["coords"][:, 0] < 8) & (e["coords"][:, 1] < 8)))
    assert lesion_token_auroc(entries, labels, split_of, with_position=True)[0] > placed + 0.02

def test_study_cv_auroc_planted_and_null():
    rng = np.random.default_rng(2)
    Y = (rng.random((60, 3)) < 0.3).astype(int)
    Y[:, 2] = 0
    Y[:2, 2] = 1  # too few positives: left out
    X = rng.normal(size=(60, 5))
    X[:, 0] += 3 * Y[:, 0]
    X[:, 1] += 3 * Y[:, 1]
    auc, n = study_cv_auroc(X, Y)
    assert n == 2 and auc > 0.9
    auc0, _ = study_cv_auroc(rng.normal(size=(60, 5)), Y)
    assert auc0 < 0.65  # no signal: nothing above chance (CV AUROC on null data is biased low)


def test_intensity_share_against_per_window_fits_and_hand_cases():
    from nvfm.monitor import intensity_share
    rng = np.random.default_rng(0)
    n = 3000
    m, w = rng.normal(size=n), rng.integers(0, 3, n)
    # exactly a per-window affine function of the brightness -> 1; unrelated noise -> ~0
    x = np.stack([2 * m + w, -m * (w + 1), np.where(w == 1, 5.0, 0.0)], 1)
    assert intensity_share(torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(w)) == pytest.approx(1.0, abs=1e-9)
    noise = rng.normal(size=(n, 8))
    assert intensity_share(torch.from_numpy(noise), torch.from_numpy(m), torch.from_numpy(w)) < 0.01
    # a mix against a separate least-squares line per window and dimension (numpy polyfit)
    x = np.concatenate([x, noise * 3 + m[:, None] * rng.normal(size=8)], 1)
    sse = sum(((x[w == v, d] - np.polyval(np.polyfit(m[w == v], x[w == v, d], 1), m[w == v])) ** 2).sum()
              for v in range(3) for d in range(x.shape[1]))
    expect = 1 - sse / ((x - x.mean(0)) ** 2).sum()
    assert 0.1 < expect < 0.9
    assert intensity_share(torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(w)) == pytest.approx(expect, rel=1e-9)
    # a window whose tokens all have one brightness (rank-deficient design) and constant features
    m2 = np.where(w == 2, 0.5, m)
    assert np.isfinite(intensity_share(torch.from_numpy(x), torch.from_numpy(m2), torch.from_numpy(w)))
    assert np.isnan(intensity_share(torch.ones(10, 4), torch.zeros(10), torch.zeros(10, dtype=torch.long)))


def test_content_loss_against_per_window_fits():
    from nvfm.monitor import content_loss
    rng = np.random.default_rng(1)
    n, d = 400, 5
    m, w = rng.normal(size=n), rng.integers(0, 2, n)
    target = rng.normal(size=(n, d))
    # a prediction wrong only by a per-window affine function of the brightness: no content error
    pred = target + np.stack([(1.5 + w) * m - w, np.where(w == 0, 2.0, -1.0) + 0 * m] * 2 + [0 * m], 1)
    assert content_loss(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(m),
                        torch.from_numpy(w)) == pytest.approx(0.0, abs=1e-12)
    # otherwise: smooth L1 (beta 1) of what a separate numpy line per window and dimension leaves
    pred = pred + rng.normal(size=(n, d)) * 2
    err = pred - target
    res = np.empty_like(err)
    for v in range(2):
        for j in range(d):
            k = w == v
            res[k, j] = err[k, j] - np.polyval(np.polyfit(m[k], err[k, j], 1), m[k])
    a = np.abs(res)
    expect = np.where(a < 1, 0.5 * a ** 2, a - 0.5).mean()
    assert expect > 0.3
    assert content_loss(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(m),
                        torch.from_numpy(w)) == pytest.approx(expect, rel=1e-9)


def test_probe_set_figures_name_what_score_returns(tmp_path):
    """`ProbeSet.figures()` lists exactly the figures `score` gives, with and without study labels:
    bench_jepa_curve.py rescores a stored result that lacks one of them."""
    import csv

    from nvfm.loader import write_synthetic_shards
    from nvfm.monitor import ProbeSet
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=12, seed=0, shape=(16, 64, 64))
    enc = Encoder(EncoderConfig.preset("tiny")).eval()
    figure_keys = {"rank", "lesion_auroc", "lesion_auroc_pos", "lesion_auroc_dx", "study_auroc"}
    plain = ProbeSet(shards)
    assert plain.figures() == ["rank"]
    assert figure_keys & set(plain(enc)) == {"rank"}
    keys = sorted({v["study_key"] for v in plain.reader.volumes})
    with open(tmp_path / "shards" / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_key", "split", "a", "b"])
        w.writerows([k, "train", i % 2, int(i % 3 == 0)] for i, k in enumerate(keys))
    labelled = ProbeSet(shards)
    assert labelled.figures() == ["rank", "study_auroc"]
    res = labelled(enc)
    assert figure_keys & set(res) == {"rank", "study_auroc"} and 0.0 <= res["study_auroc"] <= 1.0
    assert ProbeSet(shards, max_studies=8).figures() == ["rank"]  # under 10 labelled studies: no study figure
    tokens = ProbeSet(shards, token_task="a")  # every token labelled with its study's 'a'
    assert tokens.figures() == ["rank", "token_auroc", "study_auroc"]
    res = tokens(enc)
    assert (figure_keys | {"token_auroc"}) & set(res) == {"rank", "token_auroc", "study_auroc"}
    with pytest.raises(ValueError, match="no column 'nope'"):
        ProbeSet(shards, token_task="nope")


def test_token_statistics_against_numpy():
    from nvfm.monitor import token_statistics
    t = torch.randint(0, 256, (13, 1024), dtype=torch.uint8)
    got = token_statistics(t, chunk=5).numpy()  # 13 rows in chunks of 5: the last one short
    x = t.numpy().astype(np.float64)
    want = np.concatenate([x.mean(1, keepdims=True), x.std(1, ddof=1, keepdims=True),
                           np.percentile(x, [5, 25, 50, 75, 95], axis=1).T], 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    assert token_statistics(t[:0]).shape == (0, 7)


def test_tree_token_probe_reads_an_intensity_band_the_linear_one_cannot():
    """Lesion tokens whose mean intensity lies in a middle band, as blood does between CSF and
    bone: a linear readout of the mean cannot rank them, gradient-boosted trees can; the band
    indicator itself is the oracle."""
    rng = np.random.default_rng(5)
    entries, labels, split_of = {}, {}, {}
    for s in range(12):
        key = f"s{s}"
        split_of[key] = "train" if s < 8 else "val"
        m = rng.uniform(-2, 2, 500)
        y = (np.abs(m) < 0.4).astype(np.int8)
        emb = np.stack([m + 0.05 * rng.normal(size=500), rng.normal(size=500)], 1).astype(np.float32)
        entries[key] = [dict(volume_id="v", window="mr", emb=emb)]
        labels[key, "v"] = y
    linear = lesion_token_auroc(entries, labels, split_of, neg_keep=1.0)[0]
    tree, ci, _, _ = lesion_token_auroc(entries, labels, split_of, neg_keep=1.0, classifier="tree", n_boot=100)
    ev = [k for k in entries if split_of[k] == "val"]
    ev_y = np.concatenate([labels[k, "v"] for k in ev])
    ev_m = np.concatenate([entries[k][0]["emb"][:, 0] for k in ev])
    oracle = roc_auc_score(ev_y, -np.abs(ev_m))
    assert abs(linear - 0.5) < 0.1
    assert oracle - 0.03 < tree <= oracle + 0.01 and ci[0] < tree < ci[1]
    with pytest.raises(ValueError, match="choose 'linear' or 'tree'"):
        lesion_token_auroc(entries, labels, split_of, neg_keep=1.0, classifier="knn")


def test_token_statistics_stand_in_for_an_encoder(tmp_path):
    """`TokenStatistics` goes through encode_study (and so ProbeSet) like an encoder: each
    token's statistics of its normalised voxels, for every window, in patchify's order."""
    from nvfm.data import ShardReader
    from nvfm.loader import write_synthetic_shards
    from nvfm.model import WINDOWS, encode_study, normalize_tokens, volume_windows
    from nvfm.monitor import TokenStatistics
    from nvfm.tokenize import patchify
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=2, seed=0, shape=(16, 64, 64))
    reader = ShardReader(shards)
    ents = encode_study(TokenStatistics(), reader, [0, 1])
    n = 0
    for i in (0, 1):
        _, mask = reader.volume(i)
        for w in volume_windows(reader.volumes[i]):
            e = ents[n]
            tok, coords, _ = patchify([torch.from_numpy(np.array(reader.window(i, w)))],
                                      [torch.from_numpy(np.array(mask))])
            x = normalize_tokens(tok, WINDOWS.index(w)).double().numpy()
            assert e["window"] == w and np.array_equal(e["coords"].numpy(), coords.numpy())
            np.testing.assert_allclose(e["emb"][:, 0].numpy(), x.mean(1), atol=1e-4)
            np.testing.assert_allclose(e["emb"][:, 4].numpy(), np.median(x, 1), atol=1e-4)
            n += 1
    assert n == len(ents) > 0


def test_lesion_kind_auroc_one_direction_per_kind():
    """Two lesion kinds on opposite sides of normal tissue along one feature (dark ventricles,
    bright blood): the pooled linear probe cannot rank both, the per-kind probes can, and each
    kind's figure is that of its own direction on its own tokens; a kind with too few scored
    tokens is left out of the mean."""
    from nvfm.monitor import lesion_kind_auroc
    rng = np.random.default_rng(7)
    entries, labels, kinds, split_of = {}, {}, {}, {}
    for s in range(12):
        key = f"s{s}"
        split_of[key] = "train" if s < 8 else "val"
        kind = rng.choice(np.array(["", "dark", "bright", "rare"]), 600, p=[0.8, 0.095, 0.095, 0.01])
        y = (kind != "").astype(np.int8)
        y[(kind != "") & (rng.random(600) < 0.1)] = -1  # partial tokens
        emb = rng.normal(size=(600, 3)).astype(np.float32)
        emb[:, 0] += np.select([kind == "dark", kind == "bright"], [-1.5, 1.5], 0.0)
        entries[key] = [dict(volume_id="v", window="brain", emb=emb)]
        labels[key, "v"], kinds[key, "v"] = y, kind
    macro, per = lesion_kind_auroc(entries, labels, kinds, split_of)
    pooled = lesion_token_auroc(entries, labels, split_of, neg_keep=1.0)[0]
    assert set(per) == {"dark", "bright"}  # 'rare' has under 20 scored tokens
    ev = [k for k in entries if split_of[k] == "val"]
    for name, sign in (("dark", -1), ("bright", 1)):
        y = np.concatenate([labels[k, "v"] for k in ev])
        kd = np.concatenate([kinds[k, "v"] for k in ev])
        x = np.concatenate([entries[k][0]["emb"][:, 0] for k in ev])
        keep = ((y == 1) & (kd == name)) | (y == 0)
        oracle = roc_auc_score(y[keep], sign * x[keep])
        assert per[name] == pytest.approx(oracle, abs=0.05)
    assert macro == pytest.approx(np.mean(list(per.values()))) and macro > 0.8
    assert pooled < 0.7  # one direction cannot rank both kinds
    assert np.isnan(lesion_kind_auroc(entries, labels, kinds, split_of, min_positives=10 ** 6)[0])


def test_probe_set_lesion_kinds_name_the_lesion_that_covers_each_token(tmp_path):
    """On a small demo cohort, preprocessed: every lesion token is at least half inside the union
    of its study's lesion masks, its kind is the diagnosis whose lesions cover most of it (every
    voxel of its box looked up independently here), and lesion-free tokens have none."""
    import json
    import os
    import subprocess
    import sys

    import nibabel as nib

    from nvfm import phantom
    from nvfm.grounding import mask_lookup, to_world
    from nvfm.monitor import ProbeSet, TokenStatistics
    cohort, shards = str(tmp_path / "cohort"), str(tmp_path / "shards")
    phantom.generate_cohort(cohort, 4, seed=1, profile="tiny", workers=1, progress=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, os.path.join(root, "preprocess.py"), f"--input={cohort}/dicom",
                    f"--output={shards}", f"--labels={cohort}/labels.csv", f"--findings={cohort}/findings.jsonl",
                    "--workers=1"], check=True, capture_output=True, timeout=600)
    probes = ProbeSet(shards, cohort=cohort)
    entries = probes.embed(TokenStatistics())
    labels, kinds = probes.lesion_labels(entries), probes.token_kinds
    affine = {v["volume_id"]: v["affine"] for v in probes.reader.volumes}
    lesions = {r["study_key"]: r.get("lesions", []) for r in probes.findings}
    coords = {(k, e["volume_id"]): e["coords"] for k, ents in entries.items() for e in ents}
    n_pos = 0
    for (key, vid), y in labels.items():
        assert set(kinds[key, vid][y == 0]) <= {""}
        for j in np.nonzero(y == 1)[0]:
            box = np.stack(np.meshgrid(np.arange(4), np.arange(16), np.arange(16), indexing="ij"), -1).reshape(-1, 3)
            pts = to_world(coords[key, vid][j] * np.array([4, 16, 16]) + box, affine[vid])
            inside = {}   # diagnosis -> which of the box's 1024 voxels its lesions (their union) cover
            for les in lesions[key]:
                m = nib.load(os.path.join(cohort, les["mask"]))
                hit = mask_lookup(pts, np.asarray(m.dataobj), m.affine)
                inside[les["diagnosis"]] = inside.get(les["diagnosis"], False) | hit
            cover = {d: float(h.mean()) for d, h in inside.items()}
            assert float(np.any(list(inside.values()), 0).mean()) >= 0.5
            assert cover[kinds[key, vid][j]] == max(cover.values())
            n_pos += 1
    assert n_pos > 0, json.dumps({k: [les["diagnosis"] for les in v] for k, v in lesions.items()})


def test_probe_set_tokenises_with_the_shards_own_token_rule(tmp_path):
    """The online probe encodes the tokens training reads: shards written with another foreground
    rule (preprocess.py --preset=neurovfm: 1.0, all-foreground tokens) are tokenised with it, not with
    nvfm's 0.5. Reference: tokenize.token_foreground on each volume's mask."""
    import json
    import os

    from nvfm.loader import write_control_shards
    from nvfm.monitor import ProbeSet, TokenStatistics
    from nvfm.tokenize import token_foreground
    d = write_control_shards(str(tmp_path / "s"), n=4, shape=(16, 64, 64))
    path = os.path.join(d, "manifest.json")
    man = json.load(open(path))
    man["min_fg_fraction"] = 1.0
    json.dump(man, open(path, "w"))
    probes = ProbeSet(d)
    entries = probes.embed(TokenStatistics())
    vid = {v["volume_id"]: i for i, v in enumerate(probes.reader.volumes)}
    n_strict = n_loose = 0
    for ents in entries.values():
        for e in ents:
            _, mask = probes.reader.volume(vid[e["volume_id"]])
            m = np.array(mask)
            assert len(e["coords"]) == int(token_foreground(m, 1.0).sum())
            n_strict, n_loose = n_strict + len(e["coords"]), n_loose + int(token_foreground(m, 0.5).sum())
    assert 0 < n_strict < n_loose  # the rules differ on these volumes
