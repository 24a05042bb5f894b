"""Vol-JEPA masking and the training stream: invariants, exact ratios, augmentation
correctness against a voxel-level reference, seeding across steps, slots, ranks, workers."""
import numpy as np
import pytest
import torch

from nvfm import masks as M
from nvfm.loader import ArrayReader, JepaBatches, make_loader, synthetic_volume, train_indices
from nvfm.tokenize import PATCH, patchify_reference


@pytest.fixture(scope="module")
def reader():
    rng = np.random.default_rng(0)
    items = [synthetic_volume(rng, "MR", (36, 180, 170), "mr-0"), synthetic_volume(rng, "CT", (30, 200, 190), "ct-0"),
             synthetic_volume(rng, "MR", (22, 100, 120), "mr-1"), synthetic_volume(rng, "CT", (41, 150, 150), "ct-1")]
    # a large volume (grid 27 x 24 x 22): the 20-patch crop must bite on every axis
    items.append(synthetic_volume(rng, "MR", (108, 384, 350), "mr-big"))
    return ArrayReader(items)


def undo(coords, perm, flips, extent):
    """Augmented crop coords -> original crop coords (inverse of permutation then flips)."""
    c = np.empty_like(coords)
    c[:, perm] = coords
    for a in range(3):
        if flips[a]:
            c[:, a] = extent[a] - 1 - c[:, a]
    return c


def test_sample_invariants(reader):
    cfg = M.MaskConfig()
    for i in range(len(reader)):
        tmask = reader.token_mask(i)
        for k in range(6):
            s = M.sample_volume(reader, i, np.random.default_rng([1, i, k]), cfg, config_multi=k % 2 == 0)
            n = len(s["coords"])
            ctx, tgt = s["ctx"], s["tgt"]
            # a partition of the crop's foreground tokens: disjoint, complete, no duplicates
            assert len(np.intersect1d(ctx, tgt)) == 0 and len(ctx) + len(tgt) == n
            assert np.array_equal(np.union1d(ctx, tgt), np.arange(n))
            # exact ratios: n_ctx = round(r n) before the 20% context dropout
            r = 0.20 if reader.volumes[i]["modality"] == "CT" else 0.25
            n_ctx = round(r * n)
            assert len(ctx) == n_ctx - round(0.2 * n_ctx)
            # crop: <= 20 tokens per axis, every token is foreground in the original grid
            lo, hi = s["crop"]
            assert np.all(hi - lo <= 20) and s["coords"].max(0).max() < 20
            orig = undo(s["coords"], s["perm"], s["flips"], hi - lo) + lo
            assert tmask[orig[:, 0], orig[:, 1], orig[:, 2]].all()
            assert n == tmask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].sum()  # all of the crop's foreground
            assert s["tokens"].shape == (n, 1024) and s["tokens"].dtype == np.uint8
    big = M.token_mask_of(reader, 4)
    assert min(big.shape) > 20


def test_tokens_match_voxel_reference(reader):
    """crop_tokens (one strided gather) == flip the voxel crop, patchify it, transpose the patch plane."""
    for i in (1, 4):
        data, _ = reader.volume(i)
        for k in range(8):
            rng = np.random.default_rng([2, i, k])
            window = M.choose_window(reader.volumes[i]["modality"], rng, M.MaskConfig(ct_window_probs=(0.2, 0.4, 0.4)))
            lo, hi = M.crop_box(reader.token_mask(i), 20, rng)
            coords = np.argwhere(reader.token_mask(i)[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]).astype(np.int32)
            perm, flips, swap = M.sample_augmentation(rng)
            tokens, fc = M.crop_tokens(data, reader.volumes[i]["modality"], window, lo, hi, coords, flips, swap)
            # reference at voxel level
            vox = np.asarray(reader.window(i, window))
            v0, v1 = lo * np.array(PATCH), hi * np.array(PATCH)
            full = np.zeros(tuple((hi - lo) * np.array(PATCH)), np.uint8)
            part = vox[v0[0]:v1[0], v0[1]:v1[1], v0[2]:v1[2]]
            full[:part.shape[0], :part.shape[1], :part.shape[2]] = part
            full = np.flip(full, axis=tuple(a for a in range(3) if flips[a])).copy()
            tok_ref, coords_ref, _ = patchify_reference([torch.from_numpy(full)], [torch.ones(full.shape, dtype=torch.uint8)], 0.0)
            grid = {tuple(c): t for c, t in zip(coords_ref.tolist(), tok_ref.numpy())}
            ref = np.stack([grid[tuple(c)] for c in fc.tolist()]).reshape(-1, 4, 16, 16)
            if swap:
                ref = ref.transpose(0, 1, 3, 2)
            assert np.array_equal(tokens.reshape(-1, 4, 16, 16), ref)
            # a flip of the token grid is consistent with the voxel flip
            np.testing.assert_array_equal(undo(fc, np.arange(3), flips, hi - lo), coords)


def test_configs_differ_in_shape():
    """Config B (one small context block) gives compact contexts, config A (context = what
    the target blocks leave) scattered ones: mean pairwise context distance is smaller in B."""
    rng = np.random.default_rng(3)
    grid = np.argwhere(np.ones((12, 16, 16), bool)).astype(np.int32)
    cfg = M.MaskConfig(drop=0.0)
    spread = {True: [], False: []}
    for k in range(20):
        for multi in (True, False):
            ctx, tgt = M.split_context_target(grid, 0.25, multi, rng, cfg)
            c = grid[ctx].astype(np.float32)
            spread[multi].append(np.abs(c[:, None] - c[None]).sum(-1).mean())
    assert np.mean(spread[False]) < 0.8 * np.mean(spread[True])


def test_ct_window_probabilities():
    rng = np.random.default_rng(4)
    cfg = M.MaskConfig()
    w = [M.choose_window("CT", rng, cfg) for _ in range(20000)]
    f = {k: w.count(k) / len(w) for k in ("brain", "blood", "bone")}
    assert abs(f["brain"] - 0.7) < 0.02 and abs(f["blood"] - 0.15) < 0.015 and abs(f["bone"] - 0.15) < 0.015
    assert M.choose_window("MR", rng, cfg) == "mr"
    with pytest.raises(ValueError):
        M.MaskConfig(ct_window_probs=(0.5, 0.2, 0.2))


def test_stream_seeding_ranks_and_equal_mix(reader):
    idx = train_indices(reader)
    assert idx == [0, 1, 2, 3, 4]
    one = JepaBatches(reader, idx, global_batch=4, seed=5)
    a, b = one[3], one[3]
    for k in a:  # deterministic under the seed
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k]
    assert not torch.equal(one[3]["tokens"][:100], one[4]["tokens"][:100])  # steps differ
    other_seed = JepaBatches(reader, idx, global_batch=4, seed=6)[3]
    assert not (torch.equal(other_seed["ctx_index"], a["ctx_index"]) and torch.equal(other_seed["tokens"], a["tokens"]))
    # two ranks with half the batch each see exactly the slots of the 1-rank batch, and differ from each other
    r0 = JepaBatches(reader, idx, global_batch=4, rank=0, world_size=2, seed=5)
    r1 = JepaBatches(reader, idx, global_batch=4, rank=1, world_size=2, seed=5)
    s_one = [one.sample(3, j) for j in range(4)]
    s_r = [r0.sample(3, j) for j in range(2)] + [r1.sample(3, 2 + j) for j in range(2)]
    for x, y in zip(s_one, s_r):
        assert np.array_equal(x["tokens"], y["tokens"]) and np.array_equal(x["ctx"], y["ctx"])
    b0, b1 = r0[3], r1[3]
    assert not torch.equal(b0["volumes"], b1["volumes"])
    # the same volume at two slots gets different masks
    s0, s1 = one.sample(0, 0), one.sample(1, 0)
    sa = M.sample_volume(reader, 0, np.random.default_rng([5, 0, 0]), one.cfg, True)
    sb = M.sample_volume(reader, 0, np.random.default_rng([5, 0, 2]), one.cfg, True)
    assert not np.array_equal(sa["coords"][sa["ctx"]], sb["coords"][sb["ctx"]])
    # equal mix of the two configurations in every batch (slot parity)
    assert [s["config"] for s in s_one] == ["multi", "single", "multi", "single"]
    # every volume is visited once per epoch
    seen = [one.volume_at(p) for p in range(10)]
    assert sorted(seen[:5]) == idx and sorted(seen[5:]) == idx and s0["volume"] == seen[0] and s1["volume"] == seen[4]


def test_collate_layout(reader):
    b = JepaBatches(reader, range(5), global_batch=4, seed=0)[0]
    cu = b["cu_seqlens"]
    N = int(cu[-1])
    assert b["tokens"].shape == (N, 1024) and b["coords"].shape == (N, 3) and b["window"].shape == (N,)
    assert b["max_seqlen"] == int((cu[1:] - cu[:-1]).max())
    ctx, tgt = b["ctx_index"], b["tgt_index"]
    assert len(ctx) == int(b["cu_ctx"][-1]) and len(tgt) == int(b["cu_tgt"][-1])
    assert sorted(torch.cat([ctx, tgt]).tolist()) == list(range(N))
    # each context / target index lies in its own volume's range
    vol_of = torch.repeat_interleave(torch.arange(4), (cu[1:] - cu[:-1]).long())
    assert torch.equal(vol_of[ctx], torch.repeat_interleave(torch.arange(4), b["cu_ctx"].diff().long()))
    assert torch.equal(vol_of[tgt], torch.repeat_interleave(torch.arange(4), b["cu_tgt"].diff().long()))
    from nvfm.model import predictor_layout
    cp, tp, pcu, pmax = predictor_layout(b["cu_ctx"], b["cu_tgt"])
    assert torch.equal(cp, b["pred_ctx_pos"]) and torch.equal(tp, b["pred_tgt_pos"])
    assert torch.equal(pcu, b["pred_cu"]) and pmax == b["pred_max"]


def test_workers_give_the_same_stream(reader):
    ds = JepaBatches(reader, range(5), global_batch=2, seed=1)
    plain = [b["tokens"].sum().item() for b in make_loader(ds, 2, 6, num_workers=0)]
    workers = [b["tokens"].sum().item() for b in make_loader(ds, 2, 6, num_workers=2)]
    assert plain == workers
    assert len(set(plain)) == len(plain)


def test_bad_input_errors():
    rec = dict(volume_id="empty", modality="MR", family="T1", split="train")
    r = ArrayReader([(rec, np.zeros((1, 8, 32, 32), np.uint8), np.zeros((8, 32, 32), np.uint8))])
    with pytest.raises(ValueError, match="empty"):
        M.sample_volume(r, 0, np.random.default_rng(0), M.MaskConfig(), True)
    assert train_indices(r) == []
    with pytest.raises(ValueError, match="no training volumes"):
        JepaBatches(r, [], 2)
    with pytest.raises(ValueError, match="divisible"):
        JepaBatches(r, [0], 3, world_size=2)


@pytest.mark.parametrize("gather", ["rows", "compiled"])
def test_gather_paths_match_numpy(gather):
    """Every patch-gather path of sample_volume gives the numpy crop_tokens outputs bit for bit
    (tokens, coords, masks), on fresh random volumes with odd shapes (partial patches, W not a
    multiple of 16), both modalities and every window; "compiled" without nvfm._C falls back."""
    from nvfm.ops import backend
    if gather == "compiled" and backend("gather_tokens", "cpu") != "cpp":
        pytest.skip("nvfm._C gather_tokens not built")
    rng = np.random.default_rng(123)
    items = []
    for j, shape in enumerate([(23, 77, 90), (40, 224, 224), (9, 48, 33), (90, 350, 340)]):
        rec, data, mask = synthetic_volume(rng, "CT" if j % 2 else "MR", shape, f"v{j}")
        data = rng.integers(0, 256, data.shape, dtype=np.uint8)  # random bytes: every bit counts
        items.append((rec, data, mask))
    reader = ArrayReader(items)
    cfg = M.MaskConfig(ct_window_probs=(0.34, 0.33, 0.33))
    seen = set()
    for k in range(60):
        i = k % len(reader)
        a = M.sample_volume(reader, i, np.random.default_rng([7, k]), cfg, k % 2 == 0, gather="numpy")
        b = M.sample_volume(reader, i, np.random.default_rng([7, k]), cfg, k % 2 == 0, gather=gather)
        seen.add((a["window"], tuple(a["perm"]), tuple(a["flips"])))
        for key in ("tokens", "coords", "ctx", "tgt"):
            assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (key, k)
        assert a["window"] == b["window"] and a["tokens"].flags.c_contiguous == b["tokens"].flags.c_contiguous
    assert len({w for w, _, _ in seen}) == 4 and len({p for _, p, _ in seen}) == 6  # all windows, all perms
    # read-only (memmap-like) volumes work too
    data = items[1][1].copy()
    data.setflags(write=False)
    ro = ArrayReader([items[1]])
    ro._data[0] = (data, ro._data[0][1])
    s = M.sample_volume(ro, 0, np.random.default_rng(1), cfg, True, gather=gather)
    assert np.array_equal(s["tokens"], M.sample_volume(ro, 0, np.random.default_rng(1), cfg, True, gather="numpy")["tokens"])


def test_control_shards_carry_the_grating_their_labels_name(tmp_path):
    """write_control_shards: every volume's in-plane spectrum peaks at the grating's frequency (8-voxel
    period) along the axis its label names (x for 0, y for 1), the splits are 2/3 train then val and
    test, and labels.csv holds each study's label."""
    import csv
    import os

    from nvfm.data import ShardReader
    from nvfm.loader import write_control_shards
    shards = write_control_shards(str(tmp_path / "control"), n=6, shape=(16, 64, 64))
    reader = ShardReader(shards)
    rows = {r["study_key"]: r for r in csv.DictReader(open(os.path.join(shards, "labels.csv")))}
    assert sorted(rows) == sorted(v["study_key"] for v in reader.volumes)
    splits = []
    for i, v in enumerate(reader.volumes):
        data, mask = reader.volume(i)
        img = data[0].astype(np.float64)
        box = img[:, 16:48, 16:48] * mask[:, 16:48, 16:48]  # inside the head on every slice
        box = box - box.mean(axis=(1, 2), keepdims=True)
        power = np.abs(np.fft.fft2(box)) ** 2  # axes (y, x) per slice
        along_x, along_y = power[:, 0, 32 // 8].sum(), power[:, 32 // 8, 0].sum()
        label = int(rows[v["study_key"]]["grating_y"])
        assert (along_y if label else along_x) > 5 * (along_x if label else along_y), (label, along_x, along_y)
        splits.append((int(v["volume_id"].split("-")[1]), v["split"], label))
    assert [s[1:] for s in sorted(splits)] == [("train", 0), ("train", 1), ("train", 0), ("train", 1),
                                                ("val", 0), ("test", 1)]
