"""Foreground-masked block sampling (nvfm/blocks.py): the C++ (and CUDA) kernels equal the
PyTorch reference bit for bit on fresh random inputs; the split obeys its invariants (exact
counts, disjoint, complete, foreground only, blocks grow together); statistics of the masks."""
import numpy as np
import pytest
import torch

from nvfm import ops
from nvfm.blocks import (block_masks, block_masks_reference, check_inputs, draw_blocks, pack_draws,
                         sample_block_masks)

HAS_CPP = ops.backend("block_masks", "cpu") == "cpp"
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="nvfm._C block_masks kernel not built")


def random_batch(rng, sizes, grid=20, ties=False, shuffle=True):
    """Op inputs for volumes of the given token counts with random coords (unique points of a
    grid^3 box, random order), random blocks and counts covering the edge cases."""
    coords, cents, asps, keys, counts = [], [], [], [], []
    for n in sizes:
        flat = rng.choice(grid ** 3, size=n, replace=False)
        if not shuffle:
            flat = np.sort(flat)
        c = np.stack(np.unravel_index(flat, (grid,) * 3), 1).astype(np.int32)
        K = int(rng.integers(1, 5)) if n else 0
        cents.append(rng.integers(-2, grid + 2, (K, 3)).astype(np.int32))  # centres need not be tokens
        a = np.ones((K, 3), np.float32) if ties else np.exp(rng.uniform(-1, 1, (K, 3))).astype(np.float32)
        asps.append(a)
        # few distinct keys force the index tie-break too
        keys.append(rng.integers(0, 3 if ties else 2**31 - 1, (2, n)).astype(np.int32))
        n_sel = int(rng.choice([0, n, rng.integers(0, n + 1)])) if n else 0
        sel_target = int(rng.integers(0, 2))
        n_ctx0 = n - n_sel if sel_target else n_sel
        n_drop = int(rng.choice([0, n_ctx0, rng.integers(0, n_ctx0 + 1)]))
        counts.append([n_sel, sel_target, n_drop])
        coords.append(c)
    t = torch.from_numpy
    cu = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int32)
    cb = np.concatenate([[0], np.cumsum([len(x) for x in cents])]).astype(np.int32)
    return (t(np.concatenate(coords).reshape(-1, 3)), t(cu), t(np.concatenate(cents).reshape(-1, 3)), t(cb),
            t(np.concatenate(asps).reshape(-1, 3)), t(np.concatenate(keys, 1).reshape(2, -1).copy()),
            t(np.array(counts, np.int32).reshape(-1, 3)))


SHAPES = [[1], [2], [1, 1, 3], [0, 5, 0], [8000], [30, 3000], [25, 2500, 40, 4000, 7], [64] * 12]


def check_split(inputs, out):
    """Invariants of one op output, checked from the definition (not from the reference)."""
    coords, cu, centres, cb, aspects, keys, counts = inputs
    ctx, cu_ctx, tgt, cu_tgt = out
    assert ctx.dtype == tgt.dtype == torch.int64 and cu_ctx.dtype == cu_tgt.dtype == torch.int32
    B = len(cu) - 1
    for b in range(B):
        s, e = int(cu[b]), int(cu[b + 1])
        n_sel, sel_target, n_drop = counts[b].tolist()
        c, t = ctx[cu_ctx[b]:cu_ctx[b + 1]], tgt[cu_tgt[b]:cu_tgt[b + 1]]
        # a partition of the volume's tokens, ascending, exact sizes
        assert torch.equal(torch.sort(torch.cat([c, t])).values, torch.arange(s, e))
        assert bool((c.diff() > 0).all()) and bool((t.diff() > 0).all())
        n_ctx0 = (e - s - n_sel) if sel_target else n_sel
        assert len(c) == n_ctx0 - n_drop
        if e == s or n_sel in (0, e - s):
            continue
        # the blocks grow together: every selected token is no farther than any unselected one
        x = coords[s:e].long()
        ctr, asp = centres[cb[b]:cb[b + 1]].long(), aspects[cb[b]:cb[b + 1]]
        d = ((x[None] - ctr[:, None]).abs().float() / asp[:, None]).amax(-1).amin(0)
        is_ctx = torch.zeros(e - s, dtype=torch.bool)
        is_ctx[c - s] = True
        if n_drop == 0:
            sel = ~is_ctx if sel_target else is_ctx
            assert d[sel].max() <= d[~sel].min()


@pytest.mark.parametrize("k", range(len(SHAPES)))
def test_reference_invariants(k):
    rng = np.random.default_rng(k)
    for ties in (False, True):
        inputs = random_batch(rng, SHAPES[k], ties=ties)
        check_split(inputs, block_masks_reference(*inputs))


@needs_cpp
@pytest.mark.parametrize("k", range(len(SHAPES)))
def test_cpp_matches_reference_bit_exact(k):
    rng = np.random.default_rng(100 + k)
    for ties in (False, True):
        for shuffle in (False, True):
            inputs = random_batch(rng, SHAPES[k], ties=ties, shuffle=shuffle)
            ref = block_masks_reference(*inputs)
            got = block_masks(*inputs, impl="kernel")
            for r, g in zip(ref, got):
                assert r.dtype == g.dtype and torch.equal(r, g)
            check_split(inputs, got)


def test_dropout_takes_smallest_keys():
    """Config B, no ties: the dropped context tokens are those with the smallest dropout keys."""
    rng = np.random.default_rng(5)
    m = np.ones((6, 7, 8), bool)
    r = sample_block_masks([m], [0.25], [False], rng, drop=0.0)
    base = set(r["ctx_index"].tolist())
    r2 = sample_block_masks([m], [0.25], [False], np.random.default_rng(5), drop=0.2)
    kept = set(r2["ctx_index"].tolist())
    assert kept < base and len(base) - len(kept) == round(0.2 * len(base))
    d = draw_blocks(np.random.default_rng(5), m.sum(), 0.25, False, drop=0.2)
    k1 = d["keys"][1]
    assert max(k1[list(base - kept)]) <= min(k1[list(kept)])


def test_ratios_and_foreground_statistics():
    """Visible fraction distribution, exact counts, foreground only, context and target disjoint,
    on random sparse masks of very different sizes (a batch whose volumes differ by ~100x)."""
    rng = np.random.default_rng(7)
    vis = {0.25: [], 0.20: []}
    for it in range(12):
        masks, ratios, multi = [], [], []
        for j, shape in enumerate([(4, 5, 5), (20, 20, 20), (12, 18, 16), (3, 3, 3)]):
            m = rng.random(shape) < rng.uniform(0.1, 1.0)
            m.flat[rng.integers(0, m.size, 2)] = True  # >= 2 foreground tokens
            masks.append(m)
            ratios.append(0.25 if j % 2 == 0 else 0.20)
            multi.append((it + j) % 2 == 0)
        r = sample_block_masks(masks, ratios, multi, rng)
        cu, coords = r["cu_seqlens"], r["coords"]
        for b, (m, ratio) in enumerate(zip(masks, ratios)):
            n = int(m.sum())
            assert int(cu[b + 1] - cu[b]) == n
            c = r["ctx_index"][r["cu_ctx"][b]:r["cu_ctx"][b + 1]]
            t = r["tgt_index"][r["cu_tgt"][b]:r["cu_tgt"][b + 1]]
            assert len(np.intersect1d(c, t)) == 0 and len(c) + len(t) == n
            for idx in (c, t):  # every context and target token is foreground of its own volume
                xyz = coords[idx].numpy()
                assert m[xyz[:, 0], xyz[:, 1], xyz[:, 2]].all()
                assert bool(((idx >= cu[b]) & (idx < cu[b + 1])).all())
            n_ctx = min(max(round(ratio * n), 1), n - 1)
            assert len(c) == n_ctx - min(round(0.2 * n_ctx), n_ctx - 1)
            if n >= 100:
                vis[ratio].append(len(c) / n)
    # expected visible fraction 0.8 x ratio (paper medians 18.8% MR, 15.1% CT)
    assert abs(np.median(vis[0.25]) - 0.20) < 0.01 and abs(np.median(vis[0.20]) - 0.16) < 0.01
    assert max(vis[0.25]) - min(vis[0.25]) < 0.02


def test_coverage_and_block_shape():
    """Over many draws every token is sometimes context and sometimes target (no dead zones,
    e.g. at the borders), and a single-block context is compact: its bounding box holds few
    non-context tokens compared with a config-A context."""
    m = np.ones((8, 10, 10), bool)
    n = m.sum()
    seen_ctx, seen_tgt = np.zeros(n, bool), np.zeros(n, bool)
    rng = np.random.default_rng(11)
    fill = {True: [], False: []}
    for it in range(120):
        multi = it % 2 == 0
        r = sample_block_masks([m], [0.25], [multi], rng, drop=0.0)
        c = r["ctx_index"].numpy()
        seen_ctx[c] = True
        seen_tgt[r["tgt_index"].numpy()] = True
        xyz = r["coords"][c].numpy()
        box = np.prod(xyz.max(0) - xyz.min(0) + 1)
        fill[multi].append(len(c) / box)
    assert seen_ctx.all() and seen_tgt.all()
    assert np.mean(fill[False]) > 0.5 > np.mean(fill[True])


def test_deterministic_under_seed():
    masks = [np.ones((5, 6, 7), bool), np.random.default_rng(0).random((9, 9, 9)) < 0.4]
    a = sample_block_masks(masks, [0.25, 0.2], [True, False], np.random.default_rng(3))
    b = sample_block_masks(masks, [0.25, 0.2], [True, False], np.random.default_rng(3))
    c = sample_block_masks(masks, [0.25, 0.2], [True, False], np.random.default_rng(4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["ctx_index"], c["ctx_index"])
    ref = sample_block_masks(masks, [0.25, 0.2], [True, False], np.random.default_rng(3), impl="reference")
    assert all(torch.equal(a[k], ref[k]) for k in a)


def test_bad_input_errors():
    rng = np.random.default_rng(0)
    good = random_batch(rng, [10, 6])
    check_inputs(*good)
    coords, cu, centres, cb, aspects, keys, counts = good
    bad_counts = counts.clone()
    bad_counts[1] = torch.tensor([6, 0, 7], dtype=torch.int32)  # drop more than the context
    no_block = torch.tensor([0, int(cb[1]), int(cb[1])], dtype=torch.int32)
    cases = [((coords, cu, centres, cb, aspects, keys, bad_counts), "n_drop"),
             ((coords, cu, centres[:int(cb[1])], no_block, aspects[:int(cb[1])], keys, counts), "no block"),
             ((coords, cu, centres, cb, -aspects, keys, counts), "aspects"),
             ((coords.long(), cu, centres, cb, aspects, keys, counts), "coords")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            block_masks_reference(*args)
        if HAS_CPP and msg != "coords":
            with pytest.raises(RuntimeError, match=msg):
                torch.ops.nvfm.block_masks(*args)
    with pytest.raises(ValueError, match=">= 2"):
        draw_blocks(rng, 1, 0.25, True)


def test_pack_draws_layout():
    rng = np.random.default_rng(2)
    cs = [np.argwhere(np.ones(shape, bool)).astype(np.int32) for shape in ((2, 3, 4), (1, 2, 2))]
    ds = [draw_blocks(rng, len(c), 0.25, j == 0) for j, c in enumerate(cs)]
    coords, cu, centres, cb, aspects, keys, counts = pack_draws(cs, ds)
    assert cu.tolist() == [0, 24, 28] and cb.tolist() == [0, len(ds[0]["centre_index"]), len(ds[0]["centre_index"]) + 1]
    assert torch.equal(centres[-1], torch.from_numpy(cs[1][ds[1]["centre_index"][0]]))
    assert keys.shape == (2, 28) and counts.tolist() == [ds[0]["counts"].tolist(), ds[1]["counts"].tolist()]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference_bit_exact():
    if ops.backend("block_masks", "cuda") != "cuda":
        pytest.skip("nvfm._C was built without CUDA kernels")
    rng = np.random.default_rng(9)
    for sizes in SHAPES + [[5000, 50, 1, 0, 3000] * 4]:
        for ties in (False, True):
            inputs = random_batch(rng, sizes, ties=ties)
            ref = block_masks_reference(*inputs)
            got = block_masks(*[x.cuda() for x in inputs], impl="kernel")
            for r, g in zip(ref, got):
                assert g.is_cuda and torch.equal(r, g.cpu())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("aspect", [float("nan"), float("inf"), 0.0, -1.0])
def test_entry_point_rejects_bad_aspects_on_every_device(device, aspect):
    """Issue 21 defect 3: the CUDA entry point did not check the aspects; both entry points now
    share the check in check_args (csrc/blocks.cpp)."""
    if ops.backend("block_masks", device) == "reference":
        pytest.skip(f"no block_masks kernel for {device}")
    inputs = list(random_batch(np.random.default_rng(3), [30, 40]))
    inputs[4] = inputs[4].clone()
    inputs[4][0, 1] = aspect
    with pytest.raises(RuntimeError, match="aspects must be finite and > 0"):
        torch.ops.nvfm.block_masks(*[x.to(device) for x in inputs])
