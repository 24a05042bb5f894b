"""Audit of the Vol-JEPA data path against hand reads: shard bytes -> windowed, normalised tokens;
manifest records that disagree with their bytes; DDP sharding of the stream; masks on odd shapes."""
import json
import os
import base64
import shutil

import numpy as np
import pytest
import torch

from nvfm import data as D
from nvfm import masks as M
from nvfm.loader import ArrayReader, JepaBatches, train_indices, write_synthetic_shards
from nvfm.tokenize import PATCH

MEAN = dict(mr=0.3141, brain=0.4139, blood=0.3184, bone=0.2719)  # SPEC.md, order [MRI, CT-brain, -blood, -bone]
STD = dict(mr=0.2623, brain=0.4059, blood=0.3605, bone=0.1875)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("audit") / "sh"), n=4, seed=2, shape=(22, 72, 90))


def hand_read(root, v):
    """(data (C, D, H, W), mask (D, H, W)) of a volume record, read from its shard file with np.fromfile."""
    C, (d, h, w) = v["channels"], v["shape"]
    raw = np.fromfile(os.path.join(root, v["shard"]), np.uint8, count=(C + 1) * d * h * w, offset=v["offset"])
    return raw[:C * d * h * w].reshape(C, d, h, w), raw[C * d * h * w:].reshape(d, h, w)


def original_coords(s):
    """A sample's augmented crop coords -> token grid coords of the volume (undo permutation, flips, crop)."""
    lo, hi = s["crop"]
    c = np.empty_like(s["coords"])
    c[:, s["perm"]] = s["coords"]
    for a in range(3):
        if s["flips"][a]:
            c[:, a] = (hi - lo)[a] - 1 - c[:, a]
    return c + lo


def test_normalised_batches_equal_a_hand_read_of_the_shard_file(shard_dir):
    """Every token of a JepaBatches batch, after nvfm.model.normalize_tokens, equals the voxel patch read
    from the .bin file with np.fromfile, windowed by hand (CT nibbles: v // 16 and v % 16, times 17),
    / 255, minus the spec's window mean, over its std, mirrored and transposed as the sample says."""
    from nvfm.model import normalize_tokens
    r = D.ShardReader(shard_dir)
    names = {v: k for k, v in M.WINDOW_INDEX.items()}
    ds = JepaBatches(r, train_indices(r), 4, seed=1, mask_config=M.MaskConfig(max_patches=5, ct_window_probs=(0.34, 0.33, 0.33)))
    windows = set()
    for step in range(3):
        b = ds[step]
        x = normalize_tokens(b["tokens"], b["window"]).numpy()
        for slot in range(4):
            s = ds.sample(step, slot)
            v = r.volumes[s["volume"]]
            data, _ = hand_read(shard_dir, v)
            w = names[s["window"]]
            windows.add(w)
            assert (w == "mr") == (v["modality"] == "MR")
            vox = data[0] if w in ("mr", "brain") else (data[1] // 16) * 17 if w == "blood" else (data[1] % 16) * 17
            pad = np.zeros(tuple(-(-n // p) * p for n, p in zip(vox.shape, PATCH)))
            pad[:vox.shape[0], :vox.shape[1], :vox.shape[2]] = vox.astype(np.float64) / 255
            swap = np.argmax(s["perm"] == 1) > np.argmax(s["perm"] == 2)
            rows = x[int(b["cu_seqlens"][slot]):int(b["cu_seqlens"][slot + 1])]
            assert len(rows) == len(s["tokens"]) == len(s["ctx"]) + len(s["tgt"])
            for t, (z, y, xx) in zip(rows, original_coords(s)):
                p = pad[4 * z:4 * z + 4, 16 * y:16 * y + 16, 16 * xx:16 * xx + 16]
                p = p[tuple(slice(None, None, -1 if f else 1) for f in s["flips"])]
                ref = ((p.transpose(0, 2, 1) if swap else p).ravel() - MEAN[w]) / STD[w]
                np.testing.assert_allclose(t, ref, atol=1e-5)
    assert len(windows) >= 3


# ---------------------------------------------------------------------------------------
# manifest records that disagree with their bytes

def _cut_token_mask(m, root):  # a token mask string cut short: it decoded with zero padding, tokens lost
    m["volumes"][0]["token_mask"] = m["volumes"][0]["token_mask"][:8]


def _grid_off_shape(m, root):  # a token grid that is not the shape's: the mask's bits went to the wrong tokens
    m["volumes"][0]["token_grid"][2] -= 1


def _shape_past_nbytes(m, root):  # a shape larger than the bytes written: it read the next volume's bytes
    m["volumes"][1]["shape"][0] += 4


def _shape_short_of_nbytes(m, root):  # a smaller shape: part of the data was read as the voxel mask
    m["volumes"][0]["shape"][0] -= 4


def _channels_off(m, root):  # a CT record with 1 channel: its blood/bone channel was read as the voxel mask
    m["volumes"][1]["channels"] = 1


def _shard_cut_short(m, root):  # a shard cut short, the manifest without the shard sizes (no check on open)
    del m["shards"]
    path = os.path.join(root, m["volumes"][-1]["shard"])
    os.truncate(path, os.path.getsize(path) - 5000)


def _n_tokens_off(m, root):  # a record whose n_tokens is not its mask's count
    m["volumes"][2]["n_tokens"] += 3


@pytest.mark.parametrize("edit, bad, file, reason", [
    (_cut_token_mask, 0, "manifest.json", r"token mask of 6 bytes, a \[6, 5, 6\] token grid needs 23"),
    (_grid_off_shape, 0, "manifest.json", r"token grid \[6, 5, 5\] is not the \[6, 5, 6\] of its shape \[22, 72, 90\]"),
    (_shape_past_nbytes, 1, "manifest.json", r"its shape \[26, 72, 90\] x 2 channels needs 505440 bytes, its nbytes is 427680"),
    (_shape_short_of_nbytes, 0, "manifest.json", r"its shape \[18, 72, 90\] x 1 channels needs 233280 bytes, its nbytes is 285120"),
    (_channels_off, 1, "manifest.json", r"its shape \[22, 72, 90\] x 1 channels needs 285120 bytes, its nbytes is 427680"),
    (_shard_cut_short, 3, "train_0.bin", r"its bytes end at 1425632, past the file's end \(1420632 bytes: cut short\)"),
    (_n_tokens_off, 2, "manifest.json", r"n_tokens [0-9]+ but its token mask holds [0-9]+"),
])
def test_a_record_that_disagrees_with_its_bytes_is_a_clear_error(shard_dir, tmp_path, edit, bad, file, reason):
    """A manifest record that does not fit its bytes (a token mask cut short, a token grid, shape or
    channel count that is not the data's, a shard cut short where the manifest has no sizes) was read
    silently wrong (a partly empty token mask, tokens at other positions, the next volume's bytes or data
    bytes as the voxel mask) or failed with numpy's 'cannot reshape'. Now reading it is a one-line ValueError naming the file, the volume and the reason,
    the other volumes read as the file holds them, and train_indices leaves it out with a warning."""
    root = str(tmp_path / "sh")
    shutil.copytree(shard_dir, root)
    man = json.load(open(os.path.join(root, "manifest.json")))
    edit(man, root)
    open(os.path.join(root, "manifest.json"), "w").write(json.dumps(man))
    r = D.ShardReader(root)
    vid = r.volumes[bad]["volume_id"]
    with pytest.raises(ValueError, match=rf"{file}: volume {bad} \({vid}\): {reason}") as e:
        r.volume(bad), r.token_mask(bad)
    assert "\n" not in str(e.value) and os.path.join(root, file) in str(e.value)
    lines = []
    kept = train_indices(r, max_patches=4, warn=lines.append)
    assert kept == [i for i in range(4) if i != bad]
    assert len(lines) == 1 and lines[0].startswith(f"warning: volume {bad} ({vid}) left out of training: ")
    for i in kept:
        data, mask = hand_read(root, r.volumes[i])
        assert np.array_equal(r.volume(i)[0], data) and np.array_equal(r.volume(i)[1], mask)
        s = M.sample_volume(r, i, np.random.default_rng(i), M.MaskConfig(max_patches=4), True)
        assert len(s["ctx"]) and len(s["tgt"])


# ---------------------------------------------------------------------------------------
# DDP sharding and masks on odd shapes

@pytest.mark.parametrize("world, global_batch", [(2, 4), (3, 6), (4, 4)])
def test_ranks_together_see_every_volume_once_per_epoch(world, global_batch):
    """5 training volumes (not a multiple of the world size): the volumes of ranks 0..W-1, laid out in
    global slot order, cover the training set exactly once per epoch for 3 epochs, each rank gets its
    own local_batch slots, and the per-volume token counts match cu_seqlens."""
    from nvfm.loader import synthetic_reader
    r = synthetic_reader(n=7, seed=1, shape=(12, 64, 64))
    idx = [0, 2, 3, 5, 6]
    cfg = M.MaskConfig(max_patches=3)
    ranks = [JepaBatches(r, idx, global_batch, rank=k, world_size=world, seed=3, mask_config=cfg) for k in range(world)]
    local = global_batch // world
    order = []
    for step in range(-(-3 * len(idx) // global_batch)):
        for k, ds in enumerate(ranks):
            b = ds[step]
            assert len(b["volumes"]) == local and len(b["cu_seqlens"]) == local + 1
            lens = [len(ds.sample(step, k * local + j)["tokens"]) for j in range(local)]
            assert b["cu_seqlens"].tolist() == np.concatenate([[0], np.cumsum(lens)]).tolist()
            order += b["volumes"].tolist()
    for e in range(3):
        assert sorted(order[e * len(idx):(e + 1) * len(idx)]) == idx, (e, order)


@pytest.mark.parametrize("shape", [(4, 16, 32), (4, 16, 16 * 25), (3, 13, 16 * 5 - 5), (4 * 25, 16, 16), (4, 16 * 7, 16)])
def test_line_shaped_volumes_split_into_context_and_target(shape):
    """Volumes of 1 x 1 x N tokens (along each axis, partial patches too, N = 2..25) with the paper's
    crop of 20 and a crop of 2: context and target are non-empty, disjoint, cover the crop's
    foreground, have the documented sizes, and each token is its voxel patch (hand cut)."""
    rng = np.random.default_rng(5)
    mask = np.ones(shape, np.uint8)
    reader = ArrayReader([(dict(volume_id="line", modality="MR", family="T1", split="train"),
                           rng.integers(0, 256, (1,) + shape, dtype=np.uint8), mask)])
    tmask = reader.token_mask(0)
    vox = reader.volume(0)[0][0]
    pad = np.zeros(tuple(-(-n // p) * p for n, p in zip(shape, PATCH)), np.uint8)
    pad[:shape[0], :shape[1], :shape[2]] = vox
    for mp in (20, 2):
        for k in range(6):
            s = M.sample_volume(reader, 0, np.random.default_rng([5, k]), M.MaskConfig(max_patches=mp), k % 2 == 0)
            n = len(s["tokens"])
            lo, hi = s["crop"]
            assert n == tmask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].sum() == min(mp, tmask.sum()) >= 2
            assert np.intersect1d(s["ctx"], s["tgt"]).size == 0
            assert sorted(np.concatenate([s["ctx"], s["tgt"]]).tolist()) == list(range(n))
            n_ctx = min(max(round(0.25 * n), 1), n - 1)
            assert len(s["ctx"]) == n_ctx - min(round(0.2 * n_ctx), n_ctx - 1) >= 1 and len(s["tgt"]) >= 1
            swap = np.argmax(s["perm"] == 1) > np.argmax(s["perm"] == 2)
            for tok, (z, y, x) in zip(s["tokens"], original_coords(s)):
                p = pad[4 * z:4 * z + 4, 16 * y:16 * y + 16, 16 * x:16 * x + 16]
                p = p[tuple(slice(None, None, -1 if f else 1) for f in s["flips"])]
                assert np.array_equal((p.transpose(0, 2, 1) if swap else p).ravel(), tok)


def test_the_token_mask_cache_is_bounded(shard_dir, monkeypatch):
    """ShardReader kept every decoded token mask it was asked for: a loader worker that samples millions of
    volumes over a run (5.24M at the paper's scale, a few KB each) grew by one per volume it saw."""
    monkeypatch.setattr(D, "TOKEN_MASKS_KEPT", 2)
    r = D.ShardReader(shard_dir)
    for _ in range(2):
        for i in range(len(r)):
            v = r.volumes[i]
            want = np.unpackbits(np.frombuffer(base64.b64decode(v["token_mask"]), np.uint8),
                                 count=int(np.prod(v["token_grid"]))).reshape(v["token_grid"]).astype(bool)
            np.testing.assert_array_equal(r.token_mask(i), want)
            assert len(r._tmask) <= 2
