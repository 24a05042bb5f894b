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


# ---------------------------------------------------------------------------------------
# audit: the masks and crops against brute forces on small grids

def brute_split(coords, draw):
    """The split by hand: loops over tokens and blocks, float32 box distances, the n_sel tokens
    first in (d, key0, index) taken by the blocks, the n_drop context tokens first in (key1, index)
    moved to the target. -> (ctx, tgt) ascending index arrays."""
    n, cents = len(coords), coords[draw["centre_index"]]
    d = [min(max(np.float32(abs(int(coords[i][a]) - int(c[a]))) / asp[a] for a in range(3))
             for c, asp in zip(cents, draw["aspects"])) for i in range(n)]
    n_sel, sel_target, n_drop = draw["counts"].tolist()
    sel = set(sorted(range(n), key=lambda i: (d[i], int(draw["keys"][0, i]), i))[:n_sel])
    ctx0 = [i for i in range(n) if (i in sel) != bool(sel_target)]
    dropped = set(sorted(ctx0, key=lambda i: (int(draw["keys"][1, i]), i))[:n_drop])
    ctx = [i for i in ctx0 if i not in dropped]
    return np.array(ctx, np.int64), np.array(sorted(set(range(n)) - set(ctx)), np.int64)


@pytest.mark.parametrize("multi", [True, False])
def test_split_matches_a_brute_force_on_small_grids(multi):
    """split_context_target == the hand-made split on random small foregrounds (2..120 tokens),
    and the sizes are the documented ones: n_ctx = round(r n) clamped to [1, n - 1], then
    round(0.2 n_ctx) (at most n_ctx - 1) context tokens dropped to the target."""
    from nvfm.blocks import draw_blocks
    rng, cfg, tried = np.random.default_rng(11), M.MaskConfig(), 0
    for k in range(60):
        fg = rng.random(tuple(rng.integers(1, 6, 3))) < rng.uniform(0.1, 1.0)
        coords = np.argwhere(fg).astype(np.int32)
        if len(coords) < 2:
            continue
        tried += 1
        ratio = (0.25, 0.20)[k % 2]
        ctx, tgt = M.split_context_target(coords, ratio, multi, np.random.default_rng([11, k]), cfg)
        draw = draw_blocks(np.random.default_rng([11, k]), len(coords), ratio, multi, cfg.n_blocks, cfg.aspect, cfg.drop)
        bctx, btgt = brute_split(coords, draw)
        assert np.array_equal(ctx, bctx) and np.array_equal(tgt, btgt), (k, len(coords))
        n = len(coords)
        n_ctx = min(max(round(ratio * n), 1), n - 1)
        assert len(ctx) == n_ctx - min(round(0.2 * n_ctx), n_ctx - 1) >= 1 and len(tgt) >= 1
    assert tried > 40


def test_blocks_are_boxes_of_bounded_aspect():
    """Without dropout, the tokens the blocks take are exactly those nearest (box norm) to the
    blocks: every taken token's distance <= every other token's. K is 2..4 (multi) or 1, and every
    block's per-axis scale lies in [1/2, 2], log-uniform (mean log ~ 0, both ends reached)."""
    from nvfm.blocks import draw_blocks
    grid = np.argwhere(np.ones((7, 8, 9), bool)).astype(np.int32)
    cfg = M.MaskConfig(drop=0.0)
    ks, logs = set(), []
    for k in range(60):
        multi = k % 2 == 0
        ctx, tgt = M.split_context_target(grid, 0.25, multi, np.random.default_rng([12, k]), cfg)
        draw = draw_blocks(np.random.default_rng([12, k]), len(grid), 0.25, multi, cfg.n_blocks, cfg.aspect, 0.0)
        K = len(draw["centre_index"])
        assert (2 <= K <= 4) if multi else K == 1
        ks.add(K)
        logs.append(np.log(draw["aspects"]).ravel())
        diff = np.abs(grid[:, None, :].astype(np.float64) - grid[draw["centre_index"]][None].astype(np.float64))
        d = (diff / draw["aspects"][None].astype(np.float64)).max(-1).min(-1)  # (n,) in float64
        taken, rest = (tgt, ctx) if multi else (ctx, tgt)
        assert len(taken) == (len(grid) - round(0.25 * len(grid)) if multi else round(0.25 * len(grid)))
        assert d[taken].max() <= d[rest].min() + 1e-6
    logs = np.concatenate(logs)
    assert ks == {1, 2, 3, 4}
    assert np.abs(logs).max() <= np.log(2) + 1e-6 and np.abs(logs).max() > 0.95 * np.log(2)
    assert abs(logs.mean()) < 0.05 and abs(np.mean(np.abs(logs)) - np.log(2) / 2) < 0.03  # uniform in log


def _reader_of(tmask, volume_id="v"):
    """An ArrayReader whose token foreground is exactly tmask (gz, gy, gx) bool."""
    mask = np.kron(tmask.astype(np.uint8), np.ones(PATCH, np.uint8))
    data = (mask * 100)[None]
    rec = dict(volume_id=volume_id, modality="MR", family="T1", split="train")
    r = ArrayReader([(rec, data, mask)])
    assert np.array_equal(r.token_mask(0), tmask)
    return r


@pytest.mark.parametrize("n_tokens", [2, 3])
def test_tiny_volumes_more_blocks_than_tokens(n_tokens):
    """2 or 3 foreground tokens (fewer than the 2..4 blocks): every sample still has a non-empty
    context and target that partition the tokens; 1 token is a ValueError naming the volume."""
    tmask = np.zeros((3, 3, 3), bool)
    tmask[1, 1, :n_tokens] = True
    r = _reader_of(tmask, "tiny")
    for k in range(20):
        s = M.sample_volume(r, 0, np.random.default_rng([13, k]), M.MaskConfig(), config_multi=k % 2 == 0)
        assert len(s["coords"]) == n_tokens and len(s["ctx"]) >= 1 and len(s["tgt"]) >= 1
        assert sorted(np.concatenate([s["ctx"], s["tgt"]]).tolist()) == list(range(n_tokens))
    one = np.zeros((3, 3, 3), bool)
    one[0, 0, 0] = True
    with pytest.raises(ValueError, match="one: fewer than 2"):
        M.sample_volume(_reader_of(one, "one"), 0, np.random.default_rng(0), M.MaskConfig(), True)


def test_crop_box_is_uniform_inside_the_foreground_box():
    """A foreground spanning z 2..6 (5 tokens) with max_patches 2: the crop is 2 tokens along z at
    one of the 4 starts 2..5, each ~1/4; along y, x (1 token) it is the foreground exactly."""
    tmask = np.zeros((9, 4, 4), bool)
    tmask[2:7, 1, 2] = True
    rng = np.random.default_rng(14)
    starts = []
    for _ in range(4000):
        lo, hi = M.crop_box(tmask, 2, rng)
        assert hi[0] - lo[0] == 2 and list(lo[1:]) == [1, 2] and list(hi[1:]) == [2, 3]
        starts.append(int(lo[0]))
    freq = np.bincount(starts, minlength=9)[2:6] / len(starts)
    assert sorted(set(starts)) == [2, 3, 4, 5] and np.all(np.abs(freq - 0.25) < 0.03), freq


def test_scattered_foreground_gets_a_crop_with_two_tokens():
    """8 foreground tokens on a diagonal, 3 tokens apart (train_indices keeps the volume): random
    6-token crops catch < 2 of them 8 times in a row for most seeds, which was a ValueError that
    stopped training at that step on every resume. Now the crop is drawn among the placements that
    hold >= 2 tokens: uniform over them (checked against a loop over every placement), and only a
    volume that no crop can serve is the error."""
    tmask = np.zeros((24, 24, 24), bool)
    for k in range(8):
        tmask[3 * k, 3 * k, 3 * k] = True
    r = _reader_of(tmask, "scatter")
    assert train_indices(r) == [0]
    for k in range(40):
        s = M.sample_volume(r, 0, np.random.default_rng([15, k]), M.MaskConfig(max_patches=6), k % 2 == 0)
        lo, hi = s["crop"]
        assert len(s["coords"]) == tmask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].sum() >= 2
        assert np.all(hi - lo == 6) and np.all(lo >= 0) and np.all(hi <= 22)
    # crop_box_dense on a small random foreground: support and frequencies against a loop
    rng = np.random.default_rng(16)
    small = rng.random((4, 5, 6)) < 0.12
    f0 = [int(np.flatnonzero(small.any(axis=tuple(b for b in range(3) if b != a)))[0]) for a in range(3)]
    f1 = [int(np.flatnonzero(small.any(axis=tuple(b for b in range(3) if b != a)))[-1]) + 1 for a in range(3)]
    size = [min(2, f1[a] - f0[a]) for a in range(3)]
    valid = {(z, y, x) for z in range(f0[0], f1[0] - size[0] + 1) for y in range(f0[1], f1[1] - size[1] + 1)
             for x in range(f0[2], f1[2] - size[2] + 1)
             if small[z:z + size[0], y:y + size[1], x:x + size[2]].sum() >= 2}
    assert len(valid) >= 3
    draws = [M.crop_box_dense(small, 2, rng) for _ in range(300 * len(valid))]
    assert all(list(hi - lo) == size for lo, hi in draws)
    seen = np.unique(np.array([lo for lo, _ in draws]), axis=0, return_counts=True)
    assert {tuple(int(v) for v in p) for p in seen[0]} == valid
    assert np.all(np.abs(seen[1] / len(draws) - 1 / len(valid)) < 0.35 / len(valid))
    # two tokens farther apart than a crop: no crop serves the volume, a clear error
    far = np.zeros((12, 12, 12), bool)
    far[0, 0, 0] = far[10, 10, 10] = True
    assert M.crop_box_dense(far, 6, rng) is None
    with pytest.raises(ValueError, match="far: no crop of <= 6 tokens per axis holds >= 2"):
        M.sample_volume(_reader_of(far, "far"), 0, np.random.default_rng(0), M.MaskConfig(max_patches=6), True)


def test_shard_batches_hold_the_windowed_voxels_of_their_volume(tmp_path):
    """On a real shard set (ShardReader), every sample of a JepaBatches stream is the volume
    volume_at names, in a window of its modality, and each token is the voxel patch of its grid
    position: undo the permutation and flips, cut the windowed volume by hand, mirror and transpose."""
    from nvfm.data import ShardReader
    from nvfm.loader import write_synthetic_shards
    reader = ShardReader(write_synthetic_shards(str(tmp_path / "sh"), n=4, seed=2, shape=(22, 72, 90)))
    ds = JepaBatches(reader, train_indices(reader), global_batch=4, seed=3,
                     mask_config=M.MaskConfig(max_patches=4, ct_window_probs=(0.34, 0.33, 0.33)))
    names, windows = {v: k for k, v in M.WINDOW_INDEX.items()}, set()
    for step in range(4):
        b = ds[step]
        for slot in range(4):
            s = ds.sample(step, slot)
            i = s["volume"]
            assert i == ds.volume_at(step * 4 + slot) == int(b["volumes"][slot])
            assert (names[s["window"]] == "mr") == (reader.volumes[i]["modality"] == "MR")
            windows.add(s["window"])
            lo, hi = s["crop"]
            g = undo(s["coords"], s["perm"], s["flips"], hi - lo) + lo
            assert reader.token_mask(i)[g[:, 0], g[:, 1], g[:, 2]].all()
            w = np.asarray(reader.window(i, names[s["window"]]))
            pad = np.zeros(tuple(-(-n // p) * p for n, p in zip(w.shape, PATCH)), np.uint8)
            pad[:w.shape[0], :w.shape[1], :w.shape[2]] = w
            swap = np.argmax(s["perm"] == 1) > np.argmax(s["perm"] == 2)
            for tok, (z, y, x) in zip(s["tokens"], g):
                p = pad[4 * z:4 * z + 4, 16 * y:16 * y + 16, 16 * x:16 * x + 16]
                p = p[tuple(slice(None, None, -1 if f else 1) for f in s["flips"])]
                assert np.array_equal((p.transpose(0, 2, 1) if swap else p).ravel(), tok)
            rows = slice(int(b["cu_seqlens"][slot]), int(b["cu_seqlens"][slot + 1]))
            assert np.array_equal(b["tokens"][rows].numpy(), s["tokens"])
            assert np.all(b["window"][rows].numpy() == s["window"])
    assert len(windows) >= 3


def test_a_resumed_loader_draws_the_uninterrupted_batches(reader):
    """make_loader from step 3 (2 workers) yields batches 3..5 of a loader from step 0 (no workers),
    every key equal: a resumed run trains on the batches the uninterrupted one would have."""
    ds = JepaBatches(reader, range(5), global_batch=2, seed=4, mask_config=M.MaskConfig(max_patches=6))
    whole = list(make_loader(ds, 0, 6, num_workers=0))
    resumed = list(make_loader(ds, 3, 6, num_workers=2))
    assert len(resumed) == 3
    for a, b in zip(whole[3:], resumed):
        for k in a:
            assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k
    assert not torch.equal(whole[2]["tokens"][:50], whole[3]["tokens"][:50])


@pytest.mark.parametrize("bad, named", [(dict(ratio_mr=1.5), "ratio_mr"), (dict(ratio_ct=0.0), "ratio_ct"),
                                        (dict(drop=1.0), "drop"), (dict(drop=-0.1), "drop"),
                                        (dict(max_patches=0), "max_patches"), (dict(max_patches=1), "max_patches")])
def test_mask_settings_out_of_range_are_refused(bad, named):
    """A context ratio of 1.5 or a dropout of 1.0 used to train silently on clamped counts (one target
    token per volume / one context token per volume), max_patches 0 failed in a loader worker mid-run:
    now a ValueError naming the setting. In range, the split has the documented sizes."""
    with pytest.raises(ValueError, match=f"mask config: {named} "):
        M.MaskConfig(**bad)
    grid = np.argwhere(np.ones((4, 5, 6), bool)).astype(np.int32)
    n = len(grid)
    cfg = M.MaskConfig(ratio_mr=0.5, drop=0.5)
    ctx, tgt = M.split_context_target(grid, cfg.ratio_mr, True, np.random.default_rng(0), cfg)
    assert len(ctx) == round(0.5 * n) - round(0.5 * round(0.5 * n)) and len(ctx) + len(tgt) == n


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_leaves_the_global_torch_rng_alone(reader, workers):
    """Iterating make_loader draws nothing from the global torch RNG (it drew the workers' base seed
    from it: a run resumed from a checkpoint was one draw ahead of the uninterrupted run, so any
    later use of torch's RNG, dropout say, would not resume exactly)."""
    ds = JepaBatches(reader, range(5), global_batch=2, seed=4, mask_config=M.MaskConfig(max_patches=4))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    assert len(list(make_loader(ds, 0, 2, num_workers=workers))) == 2
    assert torch.equal(torch.get_rng_state(), before)


def test_train_indices_leaves_out_volumes_no_crop_can_serve():
    """A sparse foreground where no crop of max_patches tokens per axis holds 2 tokens passed
    train_indices (it knew only min_tokens) and then raised inside a data-loader worker, stopping
    train_jepa.py. With max_patches, train_indices keeps exactly the volumes a brute force over every
    crop placement in the grid finds servable, warns once per left-out volume by index and id, and
    sample_volume succeeds on every kept one."""
    rng = np.random.default_rng(21)
    masks = [rng.random((5, 6, 6)) < p for p in (0.02, 0.03, 0.05, 0.3)] * 3
    masks += [np.zeros((4, 4, 4), bool), np.eye(4, dtype=bool)[None]]  # 0 tokens; 4 on a diagonal
    one = np.zeros((3, 3, 3), bool)
    one[1, 1, 1] = True
    masks.append(one)
    items = []
    for k, tm in enumerate(masks):
        mask = np.kron(tm.astype(np.uint8), np.ones(PATCH, np.uint8))
        items.append((dict(volume_id=f"v{k}", modality="MR", family="T1", split="train"), (mask * 100)[None], mask))
    r = ArrayReader(items)

    def servable(tm, mp):  # any placement anywhere in the grid, window min(mp, extent) per axis
        if tm.sum() < 2:
            return False
        nz = np.argwhere(tm)
        size = np.minimum(mp, nz.max(0) - nz.min(0) + 1)
        return any(tm[z:z + size[0], y:y + size[1], x:x + size[2]].sum() >= 2 for z in range(tm.shape[0])
                   for y in range(tm.shape[1]) for x in range(tm.shape[2]))

    for mp in (2, 3):
        want = [k for k, tm in enumerate(masks) if servable(tm, mp)]
        lines = []
        got = train_indices(r, min_tokens=0, max_patches=mp, warn=lines.append)
        assert got == want and 0 < len(want) < len(masks), (mp, want)
        assert len(lines) == len(masks) - len(want)
        for line, k in zip(lines, sorted(set(range(len(masks))) - set(want))):
            assert line.startswith(f"warning: volume {k} (v{k}) left out of training: ") and "\n" not in line
        for k in got:
            s = M.sample_volume(r, k, np.random.default_rng(k), M.MaskConfig(max_patches=mp), k % 2 == 0)
            assert len(s["ctx"]) and len(s["tgt"])
    assert train_indices(r, min_tokens=0) == list(range(len(masks)))  # without max_patches: the count only
