"""Nothing silently wrong in the probe and grounding stage: tokens grounded where they were
encoded (the authors' centre crop), one pointing-game trial per study and class, lesions smaller
than the box sampling found, the flip test re-encoding with the cache's token rules and the
authors' encoder files, and train_probe / encode.py refusing or accounting for what they used to
take silently (a study on two label rows, empty bags, a one-combination --cv_grid, a run where
every study failed)."""
import csv
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from nvfm import features, grounding, model
from nvfm import probe as P
from test_grounding import AttendFeature0  # the stub probe the grounding tests use

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH = np.array([4, 16, 16])


pytestmark = pytest.mark.usefixtures("one_thread")


class MaxEncoder(torch.nn.Module):
    """Stub encoder: feature 0 = the token's brightest normalised voxel, feature 1 = 1."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Linear(1, 1)
        self.config = type("Cfg", (), {"dim": 2})()

    def forward(self, x, coords, cu, max_len):
        return torch.stack([x.max(1).values, torch.ones(len(x))], 1)




class OneVolumeReader:
    """One MR volume whose voxels are world mm (identity affine), bright where `bright` is set."""

    def __init__(self, shape, bright):
        self.data = np.zeros((1,) + shape, np.uint8)
        self.data[(0,) + bright] = 255
        self.mask = np.ones(shape, np.uint8)
        self.volumes = [dict(volume_id="vol0", study_key="k1", modality="MR", family="T1", shape=list(shape),
                             affine=np.eye(4).tolist(), orientation="RAS")]

    def volume(self, i):
        return self.data, self.mask

    def window(self, i, name):
        return self.data[0]


def _pointing_game(tmp_path, shape, bright, lesion_boxes, crop):
    """Encode the reader's volume with the stub encoder under `crop` into a cache, write one lesion
    mask per box (all of diagnosis brain_metastasis), run the pointing game. -> (result, entry)."""
    reader = OneVolumeReader(shape, bright)
    fg = 1.0 if crop == "centre" else 0.5
    ents = model.encode_study(MaxEncoder(), reader, [0], device="cpu", min_fg_fraction=fg, crop=crop)
    rules = dict(min_fg_fraction=fg, crop=crop, full_precision=False)
    cdir = str(tmp_path / "cache")
    with features.FeatureWriter(cdir, "sha256:stub" + features.rules_suffix(rules), 2) as w:
        w.add("k1", ents)
    les = []
    for j, box in enumerate(lesion_boxes):
        m = np.zeros(shape, np.uint8)
        m[box] = 1
        nib.save(nib.Nifti1Image(m, np.eye(4)), str(tmp_path / f"lesion_{j}.nii.gz"))
        les.append({"diagnosis": "brain_metastasis", "side": "right", "mask": f"lesion_{j}.nii.gz"})
    fj = tmp_path / "findings.jsonl"
    fj.write_text(json.dumps({"study_key": "k1", "study": "demo-0001", "lesions": les}) + "\n")
    data = dict(keys=["k1"], y=np.array([[1.0]]), ck={"label_names": ["brain_metastasis"]},
                models=[AttendFeature0()], cache=features.FeatureCache(cdir), wins=None)
    res = grounding.pointing_game_eval(data, reader, str(tmp_path), str(fj), overlay_dir=str(tmp_path / "ov"),
                                       n_overlays=1)
    return res, ents[0]


def _boxes_overlapping(coords, origin, voxels):
    """Brute force: for every token, does its voxel box [o + c p, o + (c + 1) p) hold one of `voxels`?"""
    out = []
    for c in np.asarray(coords):
        lo = np.asarray(origin) + c * PATCH
        out.append(any(np.all((v >= lo) & (v < lo + PATCH)) for v in voxels))
    return np.array(out)


def test_centre_crop_tokens_are_grounded_where_they_were_encoded(tmp_path):
    """encode.py --preset=neurovfm crops each volume to whole patches, centred, and token coords index
    the cropped grid; grounding placed token (z, y, x) at voxels (4z, 16y, 16x) of the uncropped
    volume. Shape (10, 40, 40): the crop starts at voxel (1, 4, 4), so the token holding the bright
    lesion at (4, 16..19, 16..19) was drawn at (0..3, 0..15, 0..15): a miss, chance 1/8 -> 1/8 of the wrong
    tokens, and the attention overlay a token away from the lesion."""
    shape, lesion = (10, 40, 40), (slice(4, 5), slice(16, 20), slice(16, 20))
    res, ent = _pointing_game(tmp_path, shape, (4, 17, 17), [lesion], "centre")
    origin = (1, 4, 4)                                     # (n % p) // 2, as model.centre_crop_to_patches
    vox = np.argwhere(np.ones(shape, bool)[lesion]) + [4, 16, 16]
    want = _boxes_overlapping(ent["coords"].numpy(), origin, vox)
    assert res["n"] == 1 and res["accuracy"] == 1.0
    assert res["chance"] == pytest.approx(want.mean()) and want.sum() == 1
    att = np.asarray(nib.load([p for p in res["overlays"] if "_attention_" in p][0]).dataobj)
    assert att.shape == shape and att[4, 17, 17] == att.max() > 0.9
    assert grounding.token_origin(shape, "centre") == origin and grounding.token_origin(shape, "pad") == (0, 0, 0)
    # the token map: each token's value on its own box of the uncropped grid, zero outside the crop
    vals = np.arange(1, len(ent["coords"]) + 1, dtype=np.float32)
    tm = grounding.token_map_to_volume(vals, ent["coords"].numpy(), shape, origin=origin)
    ref = np.zeros(shape, np.float32)
    for v, c in zip(vals, ent["coords"].numpy()):
        lo = np.asarray(origin) + c * PATCH
        ref[lo[0]:lo[0] + 4, lo[1]:lo[1] + 16, lo[2]:lo[2] + 16] = v
    np.testing.assert_array_equal(tm, ref)


def test_pointing_game_is_one_trial_per_study_and_class(tmp_path):
    """Two metastases of one study (one mask each): the one top token was scored once per lesion, so a
    probe pointing exactly at one of them scored 1 of 2 (and no pointer can hit both)."""
    shape = (8, 64, 64)
    a = (slice(1, 3), slice(18, 24), slice(18, 24))       # token (0, 1, 1)
    b = (slice(5, 7), slice(40, 46), slice(50, 56))       # token (1, 2, 3)
    res, ent = _pointing_game(tmp_path, shape, (2, 20, 20), [a, b], "pad")
    vox = np.concatenate([np.argwhere(np.ones(shape, bool)[s]) + [s[0].start, s[1].start, s[2].start] for s in (a, b)])
    want = _boxes_overlapping(ent["coords"].numpy(), (0, 0, 0), vox)
    assert res["n"] == 1 and res["hits"] == 1 and res["per_class"] == {"brain_metastasis": [1, 1]}
    assert res["chance"] == pytest.approx(want.mean()) and want.sum() == 2
    les = np.asarray(nib.load([p for p in res["overlays"] if "_lesion_brain_metastasis" in p][0]).dataobj)
    assert les[a].all() and les[b].all() and les.sum() == 2 * 2 * 6 * 6   # both lesions in the overlay


def test_lesion_smaller_than_the_box_sampling_is_found(tmp_path):
    """The box was sampled at 4 x 4 x 4 points (every 5 voxels in-plane): a 1-voxel lesion at (5, 18, 18)
    fell between them, so the probe pointing at its token scored a miss, at chance 0."""
    shape = (8, 64, 64)
    res, ent = _pointing_game(tmp_path, shape, (5, 18, 18), [(slice(5, 6), slice(18, 19), slice(18, 19))], "pad")
    assert res["n"] == 1 and res["accuracy"] == 1.0
    assert res["chance"] == pytest.approx(1 / len(ent["coords"]))


def test_mask_token_hits_against_brute_force():
    """Random small lesions in a 1 mm world mask, 4 mm canonical slices: every token whose box holds the
    centre of a lesion voxel is flagged, and no token farther than one voxel from every lesion voxel."""
    aff = np.array([[0, 0, 1, -32], [0, 1, 0, -32], [4, 0, 0, 0], [0, 0, 0, 1]], np.float64)   # d -> z (4 mm)
    maff = np.eye(4)
    maff[:3, 3] = [-32, -32, 0]
    coords = np.argwhere(np.ones((3, 4, 4), bool))
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = np.zeros((64, 64, 12), np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            i, j, k = rng.integers(0, [63, 63, 11])
            mask[i:i + int(rng.integers(1, 3)), j:j + int(rng.integers(1, 3)), k:k + int(rng.integers(1, 3))] = 1
        got = grounding.mask_token_hits(coords, aff, mask, maff)
        cen = np.argwhere(mask) @ maff[:3, :3].T + maff[:3, 3]                     # lesion voxel centres, mm
        can = (cen - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T                   # canonical voxel coords
        must, may = [], []
        for c in coords:
            lo = c * PATCH - 0.5                                                 # voxel i spans i +- 0.5
            must.append(np.any(np.all((can >= lo) & (can < lo + PATCH), 1)))
            may.append(np.any(np.all((can >= lo - 1) & (can < lo + PATCH + 1), 1)))
        assert np.all(got[np.array(must)]) and not np.any(got[~np.array(may)])


def _flip_shards(tmp_path):
    """Synthetic shards (one MR, one CT study) with world geometry: w runs left -> right."""
    from nvfm.loader import write_synthetic_shards
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=2, seed=0, shape=(18, 70, 90))
    path = os.path.join(shards, "manifest.json")
    with open(path) as f:
        man = json.load(f)
    for v in man["volumes"]:
        v["affine"] = [[0, 0, 1, -45], [0, 1, 0, -35], [4, 0, 0, 0], [0, 0, 0, 1]]
        v["orientation"] = "SAR"
    with open(path, "w") as f:
        json.dump(man, f)
    return shards


class RecordingProbe(torch.nn.Module):
    """Stub ensemble member: logits (left, right) = mean of features 0 and 1; records every bag."""

    def __init__(self):
        super().__init__()
        self.bags = []

    def forward(self, x, cu, return_maps=False):
        self.bags += [x[cu[b]:cu[b + 1]].clone() for b in range(len(cu) - 1)]
        return P.segment_mean(x[:, :2], P.bag_ids(cu, x.shape[0]), len(cu) - 1)


def test_flip_test_re_encodes_with_the_caches_token_rules(tmp_path):
    """A cache made with other token rules (encode.py --preset=neurovfm: all-foreground tokens, centre
    crop) has the rules in its encoder hash: the flip test crashed on it (int('0+tokens')), and
    re-encoded the mirrored volumes with nvfm's rules besides. The mirrored bags must be what the
    encoder gives on the mirrored volumes with the cache's rules (computed here by hand)."""
    from nvfm.data import ShardReader
    reader = ShardReader(_flip_shards(tmp_path))
    torch.manual_seed(0)
    enc = model.Encoder(model.EncoderConfig.preset("tiny")).eval()
    rules = dict(min_fg_fraction=1.0, crop="centre", full_precision=True)
    h = "random:tiny:seed0" + features.rules_suffix(rules)
    keys = [v["study_key"] for v in reader.volumes]
    with features.FeatureWriter(str(tmp_path / "cache"), h, enc.config.dim) as w:
        for i, k in enumerate(keys):
            w.add(k, model.encode_study(enc, reader, [i], device="cpu", **rules))

    class Mirrored:   # the volumes mirrored by hand along w, the left-right axis of the affine above
        volumes = reader.volumes

        def volume(self, i):
            d, m = reader.volume(i)
            return np.ascontiguousarray(d[..., ::-1]), np.ascontiguousarray(m[..., ::-1])

        def window_float(self, i, name):
            return np.ascontiguousarray(reader.window_float(i, name)[..., ::-1])

    want = [torch.cat([e["emb"] for e in model.encode_study(enc, Mirrored(), [i], device="cpu", **rules)])
            .half().float() for i in range(len(keys))]
    probe = RecordingProbe()
    data = dict(keys=keys, ck={"label_names": ["lesion_left", "lesion_right"], "encoder_hash": h,
                               "thresholds": [0.0, 0.0]}, models=[probe], cache=features.FeatureCache(str(tmp_path / "cache")),
                wins=None)
    res = grounding.flip_test_eval(data, reader, {keys[0]: {"left"}, keys[1]: {"right"}})
    assert res["n"] == 2 and res["n_left"] == 1
    flipped = probe.bags[:2]                                  # flip_test_eval scores the mirrored bags first
    for got, ref in zip(flipped, want):
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-3)


def test_flip_test_opens_the_authors_encoder_directory(tmp_path):
    """A cache encoded from the authors' directory (config.json + pytorch_model.bin) records the
    directory as its encoder: the flip test hashed the directory itself (IsADirectoryError)."""
    from nvfm import official
    torch.manual_seed(1)
    enc = model.Encoder(model.EncoderConfig.preset("tiny")).eval()
    official.save_official(enc, str(tmp_path / "rel"))
    h = features.file_hash(str(tmp_path / "rel" / "pytorch_model.bin"))
    got = grounding.open_encoder_from_hash(str(tmp_path / "rel"), h + "+tokens:fg1,centre,float", "cpu")
    ref = enc.state_dict()
    assert set(got.state_dict()) == set(ref)
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, ref[k], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="probe's features came from sha256:other"):
        grounding.open_encoder_from_hash(str(tmp_path / "rel"), "sha256:other", "cpu")


def test_token_rules_read_back_what_encode_writes():
    for rules, suffix in [(features.DEFAULT_RULES, ""),
                          (dict(min_fg_fraction=1.0, crop="centre", full_precision=True), "+tokens:fg1,centre,float"),
                          (dict(min_fg_fraction=0.25, crop="pad", full_precision=False), "+tokens:fg0.25,pad")]:
        assert features.rules_suffix(rules) == suffix
        assert features.token_rules("sha256:ab" + suffix) == ("sha256:ab", dict(rules))
    with pytest.raises(ValueError, match="unreadable token rules"):
        features.token_rules("sha256:ab+tokens:fg1,sideways")


# ----------------------------------------------------------------------------- train_probe.py, encode.py


def _run(script, args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script)] + args, cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _cohort(d, n=40, empty=(), mr=()):
    """A synthetic cache (one CT brain-window volume per study, studies in `empty` with no tokens, those
    in `mr` MR studies with one mr-window volume) and labels.csv (train/train/val/test). Returns the label rows."""
    rng = np.random.default_rng(0)
    rows = []
    with features.FeatureWriter(str(d / "cache"), "sha256:synthetic", 8) as w:
        for i in range(n):
            y = int(rng.random() < 0.5)
            e = rng.normal(size=(0 if i in empty else 6, 8))
            if len(e):
                e[0] += 4 * y
            mod, win = ("MR", "mr") if i in mr else ("CT", "brain")
            w.add(f"key{i:03d}", [dict(volume_id=f"v{i}", family=mod, window=win, modality=mod,
                                       coords=np.zeros((len(e), 3)), emb=e)])
            rows.append([f"key{i:03d}", mod, ["train", "train", "val", "test"][i % 4], y])
    with open(d / "labels.csv", "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(["study_key", "modality", "split", "intraparenchymal_hemorrhage"])
        wr.writerows(rows)
    return rows


COMMON = ["--side_classes=False", "--threads=1", "--hidden=16", "--steps=6", "--eval_interval=3",
          "--label_names=intraparenchymal_hemorrhage"]


def test_a_study_on_two_label_rows_is_refused(tmp_path):
    """A study_key on a train row and a val row was trained on and then chose the checkpoint and the
    thresholds (the val study leaked into training), without a word."""
    rows = _cohort(tmp_path)
    dup = list(rows[2])
    assert dup[2] == "val"
    dup[2] = "train"
    with open(tmp_path / "labels.csv", "a", newline="") as f:
        csv.writer(f).writerow(dup)
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", *COMMON], tmp_path)
    assert r.returncode == 1 and f"labels.csv: study_key 'key002' is on 2 rows: one row per study" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "p").exists()


def test_studies_without_tokens_are_left_out_and_counted(tmp_path):
    """A study without tokens (in --windows) is an empty bag with a constant logit: it was trained on and
    took part in checkpoint and threshold selection. It is left out, with a warning that counts it."""
    empty = {2, 6, 9, 13}
    rows = _cohort(tmp_path, empty=empty)
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", *COMMON], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: 4 of 40 CT studies have no tokens" in r.stdout and "'key002'" in r.stdout
    ck = torch.load(tmp_path / "p" / "probe.pt", weights_only=True)
    val = [row for i, row in enumerate(rows) if row[2] == "val" and i not in empty]
    np.testing.assert_array_equal(ck["sel_labels"].numpy()[:, 0], [row[3] for row in val])
    train = [row for i, row in enumerate(rows) if row[2] == "train" and i not in empty]
    assert ck["n_train_pos"] == [float(sum(row[3] for row in train))]
    # every bag empty in the chosen windows: nothing to train on
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'q'}", "--windows=bone", *COMMON], tmp_path)
    assert r.returncode == 1 and "no CT studies with labels and features" in r.stderr
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'q2'}", "--windows=brian", *COMMON], tmp_path)
    assert r.returncode == 1 and "unknown window 'brian'" in r.stderr and not (tmp_path / "q2").exists()


def test_a_one_combination_cv_grid_is_what_the_checkpoint_says(tmp_path):
    """--cv_grid=hidden=8 (one combination): the fold models were built with hidden 8 but probe_args kept
    hidden 16, so the probe could not be rebuilt from its own checkpoint; without CV the grid was
    ignored and the probe trained with hidden 16."""
    _cohort(tmp_path)
    common = [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}", *COMMON]
    r = _run("train_probe.py", [*common, f"--out={tmp_path / 'cv'}", "--cv_folds=2", "--cv_grid=hidden=8"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ck = torch.load(tmp_path / "cv" / "probe.pt", weights_only=True)
    assert ck["probe_args"]["hidden"] == 8
    for st in ck["models"]:   # the checkpoint rebuilds its models strictly
        P.make_probe(**ck["probe_args"]).load_state_dict(st, strict=True)
    r = _run("train_probe.py", [*common, f"--out={tmp_path / 'split'}", "--cv_grid=hidden=8"], tmp_path)
    assert r.returncode == 1 and "--cv_grid needs the CV protocol" in r.stderr and not (tmp_path / "split").exists()


def test_encode_exits_nonzero_when_nothing_was_encoded(tmp_path):
    """Every study failing (here: a modality no window exists for) printed 'wrote 0 studies' and exited 0;
    --min_fg_fraction=2 made every study fail the same way, after creating the cache."""
    from conftest import unencodable_shards
    shards = unencodable_shards(str(tmp_path / "shards"))
    r = _run("encode.py", [f"--shards={shards}", "--encoder=random:tiny", f"--out={tmp_path / 'f1'}",
                           "--min_fg_fraction=2", "--device=cpu"], tmp_path)
    assert r.returncode == 1 and "--min_fg_fraction=2.0: a fraction in [0, 1]" in r.stderr
    assert not (tmp_path / "f1").exists()
    r = _run("encode.py", [f"--shards={shards}", "--encoder=random:tiny", f"--out={tmp_path / 'f2'}",
                           "--device=cpu"], tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "every one of the 2 studies to encode failed" in r.stderr and r.stdout.count("failed and was skipped") == 2


def test_a_state_dict_without_config_is_keyed_by_its_head_count(tmp_path):
    """The authors' bare state dict does not give the head count (encode.py --heads): --heads=3 and then
    --heads=1 into one --out resumed the first cache ('resuming, 2 studies already'), the features of two
    encoders under one hash; the flip test rebuilt the encoder with the default head count."""
    from nvfm import official
    from nvfm.loader import write_synthetic_shards
    torch.manual_seed(2)
    enc = model.Encoder(model.EncoderConfig.preset("tiny")).eval()
    official.save_official(enc, str(tmp_path / "rel"))
    bare = str(tmp_path / "rel" / "pytorch_model.bin")
    os.unlink(tmp_path / "rel" / "config.json")
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=2, seed=0, shape=(8, 32, 32))
    args = [f"--shards={shards}", f"--encoder={bare}", f"--out={tmp_path / 'f'}", "--device=cpu"]
    r = _run("encode.py", [*args, "--heads=3"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    h = features.FeatureCache(str(tmp_path / "f")).encoder_hash
    assert h == features.file_hash(bare) + "+heads:3"
    r = _run("encode.py", [*args, "--heads=1"], tmp_path)
    assert r.returncode == 1 and "cache was made by encoder" in r.stderr and "resuming" not in r.stdout
    got = grounding.open_encoder_from_hash(bare, h, "cpu")
    assert got.config.heads == 3
    x, c = torch.randn(5, 1024), torch.tensor([[0, 0, i] for i in range(5)], dtype=torch.int32)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(got(x, c, cu, 5), official.load_official(bare, heads=3)(x, c, cu, 5))
        assert not torch.allclose(got(x, c, cu, 5), official.load_official(bare, heads=1)(x, c, cu, 5))


def test_a_rerun_never_keeps_a_study_without_volumes_selected_now(tmp_path):
    """A study with a CT and an MR volume, encoded with --modality=CT and then again with --modality=all
    into the same --out: the study was 'already in' the cache and skipped, its MR volume never encoded."""
    from nvfm.loader import write_synthetic_shards
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=3, seed=0, shape=(8, 32, 32))
    path = os.path.join(shards, "manifest.json")
    with open(path) as f:
        man = json.load(f)
    man["volumes"][1]["study_key"] = man["volumes"][0]["study_key"]     # MR synthetic-0 + CT synthetic-1
    with open(path, "w") as f:
        json.dump(man, f)
    args = [f"--shards={shards}", "--encoder=random:tiny", f"--out={tmp_path / 'f'}", "--device=cpu"]
    assert _run("encode.py", [*args, "--modality=CT"], tmp_path).returncode == 0
    r = _run("encode.py", [*args, "--modality=all"], tmp_path)
    assert r.returncode == 1 and "1 studies are cached without volumes selected now (first: study-synthetic-0" in r.stderr
    r = _run("encode.py", [*args, "--modality=all", "--overwrite=True"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    cache = features.FeatureCache(str(tmp_path / "f"))
    assert {e["volume_id"] for e in cache.study("study-synthetic-0")} == {"synthetic-0", "synthetic-1"}
    r = _run("encode.py", [*args, "--modality=MR"], tmp_path)   # a subset of what is cached: a plain resume
    assert r.returncode == 0 and "resuming, 2 studies already" in r.stdout, r.stdout + r.stderr


def test_side_labels_of_studies_missing_from_the_findings_are_an_error(tmp_path):
    """lesion_left / lesion_right come from findings.jsonl; a study without a record there got 0 for both
    without a word (a partial findings file makes lateral lesions negatives); evaluate.py refuses it."""
    _cohort(tmp_path)
    recs = [{"study_key": f"key{i:03d}", "lesions": [{"diagnosis": "meningioma", "side": "left"}]} for i in range(30)]
    (tmp_path / "findings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", *COMMON[1:-1], "--side_classes=True",
                                "--label_names=intraparenchymal_hemorrhage,lesion_left,lesion_right"], tmp_path)
    assert r.returncode == 1 and "10 of the 40 CT studies are not in" in r.stderr, r.stdout + r.stderr
    assert "(first: ['key030', 'key031', 'key032']): side classes need every study's record" in r.stderr
    with open(tmp_path / "findings.jsonl", "a") as f:   # every study recorded: trains
        f.write("".join(json.dumps({"study_key": f"key{i:03d}", "lesions": []}) + "\n" for i in range(30, 40)))
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", *COMMON[1:-1], "--side_classes=True",
                                "--label_names=intraparenchymal_hemorrhage,lesion_left,lesion_right"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    ck = torch.load(tmp_path / "p" / "probe.pt", weights_only=True)
    assert ck["n_train_pos"][1:] == [float(sum(i % 4 < 2 for i in range(30))), 0.0]   # train rows: i % 4 in (0, 1)


def test_anatomy_token_centres_follow_the_centre_crop():
    """Hand-worked: a (10, 40, 40) volume under the authors' centre crop starts its token grid at
    voxel (1, 4, 4), so token (0, 0, 0)'s box centre is voxel (2.5, 11.5, 11.5) and token (1, 1, 0)'s
    (6.5, 27.5, 11.5); under nvfm's padding, (1.5, 7.5, 7.5). Affine: 2 mm voxels shifted by 10 mm."""
    from nvfm.anatomy import token_centers
    from nvfm.grounding import token_origin
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = 10.0
    o = token_origin((10, 40, 40), "centre")
    assert o == (1, 4, 4)
    got = token_centers([[0, 0, 0], [1, 1, 0]], aff, origin=o)
    np.testing.assert_allclose(got, 10.0 + 2.0 * np.array([[2.5, 11.5, 11.5], [6.5, 27.5, 11.5]]))
    np.testing.assert_allclose(token_centers([[0, 0, 0]], aff), 10.0 + 2.0 * np.array([[1.5, 7.5, 7.5]]))


def test_a_transfer_target_without_tokens_in_the_windows_is_refused(tmp_path):
    """--modality=CT --windows=brain --transfer_to=MR: MR studies have no brain-window tokens, so the
    probe could never be scored on them (evaluate.py would find only empty bags). Refused at training
    time, before anything is written; with every window the same run trains."""
    _cohort(tmp_path, n=48, mr=set(range(3, 48, 4)))   # every test row an MR study
    common = [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}", "--transfer_to=MR", *COMMON]
    r = _run("train_probe.py", [*common, f"--out={tmp_path / 'p'}", "--windows=brain"], tmp_path)
    assert r.returncode == 1 and "--transfer_to=MR: none of its 12 studies has tokens in the windows brain" in r.stderr, \
        r.stdout + r.stderr
    assert not (tmp_path / "p").exists()
    r = _run("train_probe.py", [*common, f"--out={tmp_path / 'q'}"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- train_probe.py: selection and CV


def _edit_labels(d, edit):
    """Rewrite d/labels.csv: edit(i, row dict) changes (or adds) a row's cells in place."""
    rows = list(csv.DictReader(open(d / "labels.csv", newline="")))
    for i, r in enumerate(rows):
        edit(i, r)
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_a_probe_without_validation_split_has_no_operating_point(tmp_path):
    """Without val studies the probe stored thresholds 0 and Platt a = 1, b = 0 and no sel_labels: evaluate.py
    took them for fitted and reported sensitivity 0.0 / specificity 1.0 / calibrated F1 0.0 at a cut that was
    chosen on nothing. Now the selection split is stored empty, (0, K), and the placeholders are those of
    an unfitted class (threshold 0, Platt a = 0), so every consumer reads 'not fitted'."""
    _cohort(tmp_path)
    _edit_labels(tmp_path, lambda i, r: r.update(split="train" if r["split"] == "val" else r["split"]))
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", *COMMON], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no validation studies" in r.stdout
    ck = torch.load(tmp_path / "p" / "probe.pt", weights_only=True)
    assert tuple(ck["sel_labels"].shape) == tuple(ck["sel_logits"].shape) == (0, 1)
    assert ck["thresholds"] == [0.0] and ck["platt_a"] == [0.0]
    r = _run("evaluate.py", [f"--probes={tmp_path / 'p' / 'probe.pt'}", f"--labels={tmp_path / 'labels.csv'}",
                             f"--out={tmp_path / 'ev'}", "--n_boot=0", "--plots=False", "--threads=1"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    row = json.load(open(tmp_path / "ev" / "metrics.json"))["results"]["p"]["per_class"]["intraparenchymal_hemorrhage"]
    assert row["threshold_fitted"] is False and row["auroc"] is not None
    assert row["sensitivity"] is None and row["specificity"] is None and row["calibrated_f1"] is None


def test_a_non_finite_age_is_refused(tmp_path):
    """--task=age with an age cell 'nan': every validation MAE was NaN, no step ever beat step 0, and the
    untrained model was saved (age_mu from the other studies) without a word."""
    _cohort(tmp_path)
    _edit_labels(tmp_path, lambda i, r: r.update(age="nan" if i == 6 else str(40 + i)))
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", "--task=age", *COMMON[:-1]], tmp_path)
    assert r.returncode == 1 and "study 'key006' has age nan (1 such studies)" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "p" / "probe.pt").exists()


def test_validation_studies_of_training_subjects_are_counted(tmp_path):
    """labels.csv whose split column puts a subject's studies in train and in val: the checkpoint, thresholds
    and Platt were chosen on subjects the probe was fitted on, silently. The log now counts them."""
    rows = _cohort(tmp_path)
    # splits cycle train, train, val, test; subject of study i: i // 2, so a val study (4j + 2) shares only with
    # a test study; subject 'x' puts train studies 0, 1 and val studies 6, 10 together
    _edit_labels(tmp_path, lambda i, r: r.update(subject="x" if i in (0, 1, 6, 10) else f"s{i // 2}"))
    r = _run("train_probe.py", [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}",
                                f"--out={tmp_path / 'p'}", *COMMON], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    n_val = sum(row[2] == "val" for row in rows)
    assert f"warning: 2 of the {n_val} validation studies share a subject with training studies" in r.stdout
    assert "'key006', 'key010'" in r.stdout


def test_cv_grid_scores_and_models_do_not_depend_on_the_grid_order(tmp_path):
    """Each grid combination's fold models were initialised from the global RNG wherever the previous
    combinations had left it: a combination's out-of-fold score depended on its place in --cv_grid (the
    reproduction: 'lr=1e-3,3e-3' chose 3e-3 at 0.5901, 'lr=3e-3,1e-3' chose 1e-3 at 0.5901, the second
    place's score), and the chosen probe was not the one that CV with those settings alone trains."""
    _cohort(tmp_path)
    common = [f"--features={tmp_path / 'cache'}", f"--labels={tmp_path / 'labels.csv'}", *COMMON, "--cv_folds=2"]
    scores, alone = {}, {}
    for order in ("1e-3,3e-3", "3e-3,1e-3"):
        out = tmp_path / f"grid{order}"
        r = _run("train_probe.py", [*common, f"--out={out}", f"--cv_grid=lr={order}"], tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        scores[order] = sorted(ln for ln in r.stdout.splitlines() if ln.startswith("cv grid {"))   # hp: score
        ck = torch.load(out / "probe.pt", weights_only=True)
        lr = ck["cv_grid_choice"]["lr"]
        if lr not in alone:   # CV with the chosen settings and no grid
            r = _run("train_probe.py", [*common, f"--out={tmp_path / f'lr{lr}'}", f"--lr={lr}"], tmp_path)
            assert r.returncode == 0, r.stdout + r.stderr
            alone[lr] = torch.load(tmp_path / f"lr{lr}" / "probe.pt", weights_only=True)
        for st, ref in zip(ck["models"], alone[lr]["models"], strict=True):
            assert all(torch.equal(st[k], ref[k]) for k in ref)
        np.testing.assert_array_equal(ck["sel_logits"].numpy(), alone[lr]["sel_logits"].numpy())
    assert scores["1e-3,3e-3"] == scores["3e-3,1e-3"] and len(scores["1e-3,3e-3"]) == 2


@pytest.mark.parametrize("kind", sorted(P.PROBES))
def test_a_bags_logit_alone_equals_its_logit_among_other_bags(kind):
    """Packed bags have no padding to mask: a study's logit scored alone (batch 1) equals its logit in a
    batch of bags of other lengths (1 to 300 tokens) and the per-bag brute force (torch.softmax / mean over
    that bag's tokens only); predict() runs in eval mode, so dropout 0.5 changes nothing between calls."""
    torch.manual_seed(0)
    m = P.make_probe(kind, 8, 3, hidden=16, dropout=0.5)
    bags = [torch.randn(n, 8) * 3 for n in (1, 300, 7, 2, 40)]
    alone = P.predict(m, lambda i: bags[i], list(range(5)), batch=1)
    batched = P.predict(m, lambda i: bags[i], list(range(5)), batch=16)
    assert not m.training
    with torch.no_grad():
        ref = []
        for b in bags:
            h = m.norm(b)
            if kind == "attentive_mil":
                ref.append((torch.softmax(m.attention(h), 0) * m.instance(h)).sum(0))
            elif kind == "abmil":
                a = torch.softmax(m.w(torch.tanh(m.v(h)) * torch.sigmoid(m.u(h))), 0)
                ref.append(m.head((a * h).sum(0)))
            else:
                ref.append(m.head(h.mean(0)))
    np.testing.assert_allclose(batched, alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(alone, torch.stack(ref).numpy(), rtol=0, atol=1e-5)


def test_unfitted_classes_reads_the_selection_split_or_the_placeholders_of_older_probes():
    """A class is unfitted where the selection split has no positives or no negatives; older probes
    (no sel_labels) are read from their placeholders, whose Platt slope the fit left at ~1e-26, not 0
    (that class then counted as fitted: train_llava's youden rule called it at threshold 0)."""
    old = dict(thresholds=[0.0, 0.3, 0.0], platt_a=[-3.07e-26, 1.2, 0.8])
    assert P.unfitted_classes(old).tolist() == [True, False, False]
    none = dict(old, sel_labels=torch.zeros((0, 3), dtype=torch.uint8))
    assert P.unfitted_classes(none).tolist() == [True, True, True]
    some = dict(old, sel_labels=torch.tensor([[1, 0, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.uint8))
    assert P.unfitted_classes(some).tolist() == [True, False, False]
