"""Audit 3 of the compiled operators: every C++ CPU kernel (csrc/*.cpp) on fresh random inputs and
edge shapes against an independent computation (the float64 PyTorch reference, scipy, or a numpy
brute force written here), and the CUDA kernels' logic under the SIMT emulator on the edge cases
tests/test_simt.py leaves out (max_seqlen above the longest sequence, one long sequence among
many short ones, NaN inputs, duplicate coordinates, negative keys, infinite block distances,
empty volume axes).

Tolerances. float32 attention (CPU kernel): 2e-5 relative to max(1, max|reference|). The kernel
sums <= 1500 products per output in float32 BLAS blocks (unit roundoff 6e-8; blocked summation
error ~ sqrt(n) u ~ 2e-6 for n = 1500, measured <= 2e-6), so 2e-5 keeps a 10x margin and still
fails on any indexing or tiling error (those are O(1)). bfloat16 / float16: the output is the
float32 result rounded once (unit roundoff 2^-8 / 2^-11 relative) plus the float32 error; the
gradients are held to PyTorch's own SDPA in the same dtype (its error is the yardstick, as in
tests/test_attention.py). Everything integer or table-driven (gather, block masks, patchify,
fill holes) is compared bit for bit.
"""
import itertools
import math
import random
import shutil

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

import simt_kernels as S
from nvfm import ops
from nvfm import tokenize as T
from nvfm import volume as V
from nvfm.attention import attention_reference, ours_available, varlen_attention
from nvfm.blocks import block_masks, block_masks_reference
from nvfm.gather import (WINDOW_CHANNEL, WINDOWS, GatherSpec, _params, channel_table, gather_tokens,
                         gather_tokens_reference, level_table, masks_patch_perm)

HAS_ATTN = ours_available(torch.empty(1, 1, 8))
needs_attn = pytest.mark.skipif(not HAS_ATTN, reason="nvfm._C attention kernel not built")
needs_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension not built")
HEAD_DIMS = (32, 64)  # tiny: 96 / 3 heads; vits, vitm, vitb, vitl: 64 (nvfm/model.py SIZES)
FP32_TOL = 2e-5


def cu_of(lens):
    return torch.tensor([0] + list(lens)).cumsum(0).to(torch.int32)


def rel_err(got, want):
    """max |got - want| over max(1, max |want|); 0 for empty tensors."""
    if want.numel() == 0:
        return 0.0
    return (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())


def lse_reference(q, k, cu_q, cu_k, scale):
    """(H, total_q) float64 log-sum-exp of each query's scores; -inf for a sequence without keys."""
    parts = []
    for b in range(len(cu_q) - 1):
        s = torch.einsum("qhd,khd->hqk", q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]]) * scale
        parts.append(torch.logsumexp(s, -1) if s.shape[-1] else torch.full(s.shape[:2], -math.inf, dtype=s.dtype))
    return torch.cat(parts, 1) if parts else torch.empty(q.shape[1], 0, dtype=q.dtype)


def ours_and_reference(q, k, v, cu_q, cu_k, do, w_lse, dtype, max_q, max_k):
    """(out, lse, dq, dk, dv) of the CPU kernel in `dtype` and of the float64 reference, for the
    loss sum(out * do) + sum(lse * w_lse) (w_lse None: no lse term)."""
    scale = q.shape[-1] ** -0.5
    a = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = torch.ops.nvfm.varlen_attn_fwd(*a, cu_q, cu_k, max_q, max_k, scale)
    r = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]  # the same rounded inputs
    ref, lse_ref = attention_reference(*r, cu_q, cu_k, scale), lse_reference(r[0], r[1], cu_q, cu_k, scale)
    got, want = [out, lse], [ref, lse_ref]
    if out.numel():
        loss = (out.double() * do).sum()
        loss_ref = (ref * do).sum()
        if w_lse is not None:  # rows without keys have lse = -inf and no gradient: leave them out
            fin = torch.isfinite(lse_ref)
            loss = loss + (lse.double()[fin] * w_lse[fin]).sum()
            loss_ref = loss_ref + (lse_ref[fin] * w_lse[fin]).sum()
        got += list(torch.autograd.grad(loss, a))
        want += list(torch.autograd.grad(loss_ref, r))
    return got, want


# ---- varlen attention, CPU kernel ----------------------------------------------------------------

@needs_attn
@pytest.mark.parametrize("seed", range(8))
def test_attention_cpu_random_packings_fp32(seed):
    """Random packings with sequences of 0 and 1 tokens on either side, cu_q != cu_k, several key
    tiles (256) and query tiles (64 / 128), max_seqlen above the longest sequence, the config head
    dims, and a gradient through the log-sum-exp on half the seeds: out, lse, dq, dk, dv."""
    rng = random.Random(seed)
    B = rng.randint(1, 6)
    lens_q = [rng.choice([0, 1, 1, 2, 17, 64, 65, 129, 257]) for _ in range(B)]
    lens_k = lens_q if seed % 2 else [rng.choice([0, 1, 2, 5, 255, 256, 257, 513]) for _ in range(B)]
    H, D = rng.choice([1, 3, 6]), HEAD_DIMS[seed % 2]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(n), H, D, generator=g, dtype=torch.float64) for n in (lens_q, lens_k, lens_k))
    do = torch.randn(q.shape, generator=g, dtype=torch.float64)
    w = torch.randn(H, q.shape[0], generator=g, dtype=torch.float64) if seed % 4 < 2 else None
    max_q, max_k = max(lens_q) + rng.randint(0, 100), max(lens_k) + rng.randint(1, 100)
    got, want = ours_and_reference(q, k, v, cu_of(lens_q), cu_of(lens_k), do, w, torch.float32, max_q, max_k)
    out, lse = got[:2]
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (H, q.shape[0])
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want[1])), "lse = -inf exactly for rows without keys"
    fin = torch.isfinite(want[1])
    assert rel_err(lse[fin], want[1][fin]) < FP32_TOL
    for name, a, r in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], want[:1] + want[2:]):
        assert a.shape == r.shape and torch.isfinite(a).all(), name
        assert rel_err(a, r) < FP32_TOL, f"{name}: {rel_err(a, r):.2e} (lens {lens_q} / {lens_k})"


@needs_attn
@pytest.mark.parametrize("H,D", [(3, 32), (12, 64)])
def test_attention_cpu_one_long_and_many_short_sequences(H, D):
    """One 1500-token sequence among 1- and 2-token ones and empty ones (the longest-first work
    order and the per-thread scratch are sized by the long one): forward and backward."""
    lens = [1] * 9 + [0, 1500 if H == 3 else 300, 2, 0, 1, 3]
    g = torch.Generator().manual_seed(H)
    q, k, v, do = (torch.randn(sum(lens), H, D, generator=g, dtype=torch.float64) for _ in range(4))
    got, want = ours_and_reference(q, k, v, cu_of(lens), cu_of(lens), do, None, torch.float32, 4096, 4096)
    for name, a, r in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert rel_err(a, r) < FP32_TOL, f"{name}: {rel_err(a, r):.2e}"


@needs_attn
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_attention_cpu_low_precision_forward_and_backward(dtype):
    """bf16/fp16 in, float32 compute: the output is within one rounding of the float64 result on the
    same rounded inputs; the gradients within 2x PyTorch's own SDPA error in that dtype."""
    lens = [0, 2, 129, 65, 1, 257]
    H, D = 3, 64
    g = torch.Generator().manual_seed(7)
    q, k, v, do = (torch.randn(sum(lens), H, D, generator=g).to(dtype).double() for _ in range(4))
    cu = cu_of(lens)
    got, want = ours_and_reference(q, k, v, cu, cu, do, None, dtype, 300, 300)
    half_ulp = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]  # unit roundoff: 8 / 11 bits
    assert got[0].dtype == dtype
    assert ((got[0].double() - want[0]).abs() <= half_ulp * want[0].abs() + FP32_TOL).all()
    a = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    pt = torch.autograd.grad(varlen_attention(*a, cu, cu, 300, 300, impl="sdpa"), a, do.to(dtype))
    for name, x, p, r in zip(("dq", "dk", "dv"), got[2:], pt, want[2:]):
        assert x.dtype == dtype
        err, pt_err = rel_err(x, r), rel_err(p, r)
        assert err <= 2 * pt_err + 1e-4, f"{name}: ours {err:.2e} vs sdpa {pt_err:.2e}"


@needs_attn
def test_attention_cpu_noncontiguous_inputs_forward_and_backward():
    """Strided inputs read in place: heads broadcast with stride 0 (a shared key per head), every
    row the same key (row stride 0), a head-dim stride of 2 (copied), a flipped copy, bf16 views of
    one fused QKV buffer; gradients against the float64 reference on contiguous copies."""
    cu = torch.tensor([0, 3, 40, 41], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    k0 = torch.randn(41, 1, 32, generator=g)
    q = torch.randn(41, 4, 32, generator=g)
    cases = {
        "expanded heads": (q, k0.expand(41, 4, 32), k0.expand(41, 4, 32)),
        "row stride 0": (q, k0[:1].expand(41, 4, 32), k0.expand(41, 4, 32)),
        "head_dim stride 2": (torch.randn(41, 4, 64, generator=g)[:, :, ::2], q, q.flip(0)),
        "bf16 fused qkv": tuple(torch.randn(41, 3, 4, 32, generator=g).bfloat16().unbind(1)),
    }
    do = torch.randn(41, 4, 32, generator=g, dtype=torch.float64)
    for name, qkv in cases.items():
        a = [t.detach().requires_grad_() for t in qkv]
        assert not all(t.is_contiguous() for t in a), name
        r = [t.detach().double().requires_grad_() for t in qkv]
        out = varlen_attention(*a, cu, cu, 37, 37, impl="ours")
        ref = attention_reference(*r, cu, cu)
        tol = FP32_TOL if a[0].dtype == torch.float32 else 2.0 ** -8
        assert rel_err(out, ref) < tol, name
        gots = torch.autograd.grad(out, a, do.to(out.dtype))
        wants = torch.autograd.grad(ref, r, do)
        for x, w in zip(gots, wants):
            assert x.shape == w.shape and rel_err(x, w) < (FP32_TOL if tol == FP32_TOL else 2e-2), name


@needs_attn
@pytest.mark.parametrize("seed", range(3))
def test_attention_cpu_nan_and_inf_reach_exactly_the_reference_outputs(seed):
    """NaN, +inf, -inf planted in q, k, v (single elements and whole head vectors): the forward is
    NaN / inf exactly where the float64 reference is (never a silent 0 or finite value), equal
    elsewhere; in the backward (also with inf / NaN in dout) every gradient the reference has
    non-finite is non-finite here and the finite ones agree."""
    rng = random.Random(seed)
    for trial in range(40):
        lens = [rng.choice([1, 2, 5, 40, 300]) for _ in range(rng.randint(1, 3))]
        H, D = rng.choice([1, 2]), rng.choice([4, 32])
        g = torch.Generator().manual_seed(1000 * seed + trial)
        cu, n = cu_of(lens), sum(lens)
        x = {c: torch.randn(n, H, D, generator=g, dtype=torch.float64) for c in "qkvd"}
        for _ in range(rng.randint(1, 2)):
            c, val = rng.choice("qkvd"), rng.choice([math.nan, math.inf, -math.inf])
            idx = (rng.randrange(n), rng.randrange(H)) + (() if rng.random() < 0.3 else (rng.randrange(D),))
            x[c][idx] = val
        a = [x[c].float().requires_grad_() for c in "qkv"]
        r = [x[c].clone().requires_grad_() for c in "qkv"]
        out = varlen_attention(*a, cu, cu, max(lens), max(lens), impl="ours")
        ref = attention_reference(*r, cu, cu)
        o = out.double()
        assert torch.equal(o.isnan(), ref.isnan()) and torch.equal(o.isinf(), ref.isinf()), (trial, lens)
        ok = torch.isfinite(ref)
        assert rel_err(o[ok], ref[ok]) < FP32_TOL
        gots = torch.autograd.grad(out, a, x["d"].float())
        wants = torch.autograd.grad(ref, r, x["d"])
        for name, gg, w in zip(("dq", "dk", "dv"), gots, wants):
            assert torch.equal(torch.isfinite(gg), torch.isfinite(w)), (trial, name, lens)
            fin = torch.isfinite(w)
            assert rel_err(gg[fin], w[fin]) < FP32_TOL, (trial, name)


# ---- gather_tokens, CPU kernel ---------------------------------------------------------------------

def gather_brute_force(vol, spec, coords, patch=T.PATCH):
    """Scalar numpy reading of the gather rule (nvfm/gather.py docstring): output token at c (output
    frame); within-token index j = (j0, j1, j2) is voxel axis patch_perm[k] at j_k; a flip of output
    axis k mirrors crop axis perm[k] on the token grid and inside the patch. Returns window levels."""
    w = WINDOWS.index(spec.window)
    x = vol[WINDOW_CHANNEL[w]].numpy()
    lev = level_table()[w].numpy()
    within = spec.within()
    out = np.zeros((len(coords), math.prod(patch)), np.uint8)
    for t, c in enumerate(coords.tolist()):
        tok, flipped = [0, 0, 0], [False, False, False]
        for k, a in enumerate(spec.perm):
            flipped[a] = bool(spec.flip[k])
            tok[a] = spec.crop_start[a] + (spec.crop_size[a] - 1 - c[k] if flipped[a] else c[k])
        for n, j in enumerate(itertools.product(*[range(patch[a]) for a in within])):
            e = [0, 0, 0]
            for k, a in enumerate(within):
                e[a] = j[k]
            vox = [tok[a] * patch[a] + (patch[a] - 1 - e[a] if flipped[a] else e[a]) for a in range(3)]
            inside = all(vox[a] < x.shape[a] for a in range(3))
            out[t, n] = lev[x[tuple(vox)]] if inside else 0
    return torch.from_numpy(out)


def random_gather_batch(rng, g, max_shape=(14, 70, 70), n_choices=(0, 1, 5, 40)):
    vols, specs, coords = [], [], []
    for _ in range(rng.randint(0, 4)):
        shape = tuple(rng.randint(1, m) for m in max_shape)
        window = rng.choice(WINDOWS)
        vol = torch.randint(0, 256, (1 if window == "mr" else 2, *shape), generator=g, dtype=torch.uint8)
        grid = T.token_grid(shape)
        size = tuple(rng.randint(1, n) for n in grid)
        start = tuple(rng.randint(0, n - s) for n, s in zip(grid, size))
        perm = tuple(rng.sample(range(3), 3))
        spec = GatherSpec(start, size, perm, tuple(rng.random() < 0.5 for _ in range(3)), window,
                          rng.choice([None, masks_patch_perm(perm), tuple(rng.sample(range(3), 3))]))
        n = rng.choice(n_choices)
        c = torch.stack([torch.randint(0, s, (n,), generator=g) for s in spec.out_grid()], 1).to(torch.int32)
        if n:
            c = torch.cat([c, c[:1], c[:1]])  # duplicates: the same token gathered three times
        vols.append(vol)
        specs.append(spec)
        coords.append(c)
    return vols, specs, coords


@needs_ext
@pytest.mark.parametrize("seed", range(6))
def test_gather_cpu_duplicates_empty_lists_every_dtype(seed):
    """Batches of 0 to 4 volumes (odd shapes, padding on every axis), some with no coordinates,
    duplicated coordinates: float32 / bf16 / fp16 / uint8 bit-exact against the reference, and the
    uint8 levels against a scalar numpy brute force of the rule."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    vols, specs, coords = random_gather_batch(rng, g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.uint8):
        want = gather_tokens_reference(vols, specs, coords, dtype)
        got = gather_tokens(vols, specs, coords, dtype, impl="kernel")
        assert got.dtype == want.dtype and torch.equal(got, want), dtype
        if dtype == torch.uint8:
            brute = [gather_brute_force(v, s, c) for v, s, c in zip(vols, specs, coords)]
            assert torch.equal(got, torch.cat(brute) if brute else torch.empty(0, 1024, dtype=torch.uint8))
            for a, b in zip(coords, itertools.accumulate([0] + [len(c) for c in coords])):
                if len(a):  # the duplicates are the same row
                    assert torch.equal(got[b + len(a) - 1], got[b]) and torch.equal(got[b + len(a) - 2], got[b])


@needs_ext
def test_gather_cpu_refuses_a_coordinate_outside_its_permuted_axis():
    """A coordinate valid on crop axis a but not on output axis k = position of a in perm (the grid
    is permuted) must be refused by the kernel's own check (checks on, and bypassing the wrapper)."""
    vol = torch.randint(0, 256, (1, 12, 64, 32), dtype=torch.uint8)
    spec = GatherSpec((0, 0, 0), (3, 4, 2), perm=(2, 0, 1))  # output grid (2, 3, 4)
    assert spec.out_grid() == (2, 3, 4)
    ok = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    assert torch.equal(gather_tokens([vol], [spec], [ok], torch.uint8, impl="kernel"),
                       gather_brute_force(vol, spec, ok))
    op = torch.ops.nvfm.gather_tokens
    for bad in ([[2, 0, 0]], [[0, 3, 0]], [[0, 0, 4]], [[0, 0, -1]]):
        with pytest.raises(ValueError, match="outside the output grid"):
            gather_tokens([vol], [spec], [torch.tensor(bad, dtype=torch.int32)], impl="kernel")
        with pytest.raises(RuntimeError, match="outside the output grid"):
            op([vol], torch.tensor(bad, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
               _params([vol], [spec]), channel_table(), [4, 16, 16], torch.float32)


# ---- block_masks, CPU kernel -----------------------------------------------------------------------

def block_masks_brute_force(coords, cu, centres, cb, aspects, keys, counts):
    """The split of nvfm/blocks.py's docstring with Python sorts on tuples (numpy arrays in)."""
    ctx, tgt = [], []
    for b in range(len(cu) - 1):
        s, n = int(cu[b]), int(cu[b + 1] - cu[b])
        c = coords[s:s + n].astype(np.int64)
        d = np.full(n, np.inf, np.float32)
        for k in range(int(cb[b]), int(cb[b + 1])):
            with np.errstate(over="ignore"):  # aspect 1e-45: an infinite distance, as in float32 division
                d = np.minimum(d, (np.abs(c - centres[k].astype(np.int64)).astype(np.float32) / aspects[k]).max(1))
        n_sel, sel_target, n_drop = (int(x) for x in counts[b])
        order = sorted(range(n), key=lambda i: (d[i], keys[0, s + i], i))
        is_ctx = np.full(n, bool(sel_target))
        is_ctx[order[:n_sel]] = not sel_target
        for i in sorted(np.flatnonzero(is_ctx), key=lambda i: (keys[1, s + i], i))[:n_drop]:
            is_ctx[i] = False
        ctx += [s + i for i in range(n) if is_ctx[i]]
        tgt += [s + i for i in range(n) if not is_ctx[i]]
    return np.array(ctx, np.int64), np.array(tgt, np.int64)


def random_block_inputs(rng, nrng):
    """Duplicate coordinates (a volume all at one point: the order is the keys'), negative and
    full-range int32 keys, extreme aspects (1e-45 makes distances inf, 3e38 makes them 0: all
    ties), counts at their limits."""
    lens = [rng.choice([0, 1, 2, 3, 50, 200]) for _ in range(rng.randint(1, 5))]
    coords = [nrng.integers(0, rng.choice([1, 2, 5, 40]), (n, 3)).astype(np.int32) for n in lens]  # 1: all tied
    Ks = [rng.randint(1, 5) if n else 0 for n in lens]
    centres = [nrng.integers(-3, 45, (K, 3)).astype(np.int32) for K in Ks]
    aspects = [np.exp(nrng.uniform(-1, 1, (K, 3))).astype(np.float32) if rng.random() < 0.6 else
               np.full((K, 3), rng.choice([0.5, 1.0, 1e-45, 3e38]), np.float32) for K in Ks]
    lo, hi = (-3, 3) if rng.random() < 0.5 else (-2**31, 2**31 - 1)
    keys = nrng.integers(lo, hi, (2, sum(lens)), endpoint=True).astype(np.int32)
    counts = []
    for n in lens:
        n_sel, sel_target = rng.choice([0, n, rng.randint(0, n), rng.randint(0, n)]), rng.randint(0, 1)
        n_ctx0 = n - n_sel if sel_target else n_sel
        counts.append([n_sel, sel_target, rng.choice([0, n_ctx0, rng.randint(0, n_ctx0)])])
    cat = lambda xs: np.ascontiguousarray(np.concatenate(xs).reshape(-1, 3))  # noqa: E731
    return [cat(coords), np.concatenate([[0], np.cumsum(lens)]).astype(np.int32), cat(centres),
            np.concatenate([[0], np.cumsum(Ks)]).astype(np.int32), cat(aspects), keys,
            np.array(counts, np.int32).reshape(-1, 3)]


@needs_ext
@pytest.mark.parametrize("seed", range(4))
def test_block_masks_cpu_against_a_brute_force(seed):
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    for _ in range(15):
        args = random_block_inputs(rng, nrng)
        t = [torch.from_numpy(a) for a in args]
        got = block_masks(*t, impl="kernel")
        ctx, tgt = block_masks_brute_force(*args)
        assert np.array_equal(got[0].numpy(), ctx) and np.array_equal(got[2].numpy(), tgt)
        assert all(torch.equal(a, b) for a, b in zip(got, block_masks_reference(*t)))


# ---- patchify / unpatchify, CPU kernel --------------------------------------------------------------

def patchify_brute_force(vols, masks, need, patch):
    """Tokens and coords by looping over the grid in raster order with numpy slices."""
    P = math.prod(patch)
    toks, coords = [], []
    for vol, mask in zip(vols, masks):
        m, x = mask.numpy() != 0, vol.numpy()
        for z in itertools.product(*[range(n) for n in T.token_grid(vol.shape, patch)]):
            sl = tuple(slice(i * p, (i + 1) * p) for i, p in zip(z, patch))
            if m[sl].sum() >= need:
                blk = np.zeros(patch, x.dtype)
                src = x[sl]
                blk[:src.shape[0], :src.shape[1], :src.shape[2]] = src
                toks.append(blk.reshape(-1))
                coords.append(z)
    return (torch.from_numpy(np.array(toks, np.uint8).reshape(-1, P)),
            torch.tensor(coords, dtype=torch.int32).reshape(-1, 3))


@needs_ext
@pytest.mark.parametrize("seed", range(5))
def test_patchify_cpu_odd_shapes_and_mask_dtypes_against_a_brute_force(seed):
    """Odd shapes (an empty axis now and then), patch shapes other than (4, 16, 16), masks as
    uint8 0/1, uint8 0/200, bool and float (0.5 and -2 are foreground): tokens, coords, cu_seqlens;
    then unpatchify of the result against the reference (the volume where a token was kept)."""
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    for _ in range(8):
        patch = rng.choice([(4, 16, 16), (3, 5, 7), (1, 1, 1), (2, 3, 2)])
        shape = tuple(rng.randint(0 if rng.random() < 0.05 else 1, 3 * p + 2) for p in patch)
        vols, masks = [], []
        for _ in range(rng.randint(1, 3)):
            vols.append(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8))
            m = torch.rand(shape, generator=g) < rng.random()
            u8 = m.to(torch.uint8)
            masks.append(rng.choice([u8, u8 * 200, m, m.float() * rng.choice([0.5, -2.0])]))
        frac = rng.choice([0.0, 0.5, 1.0, rng.randint(0, math.prod(patch)) / math.prod(patch), rng.random()])
        tok, coords, cu = T.patchify(vols, masks, frac, patch, impl="kernel")
        bt, bc = patchify_brute_force(vols, masks, T.min_fg_voxels(frac, patch), patch)
        assert torch.equal(tok, bt) and torch.equal(coords, bc), (shape, patch, frac)
        lens = [0] + [int((patchify_brute_force([v], [m], T.min_fg_voxels(frac, patch), patch)[1]).shape[0])
                      for v, m in zip(vols, masks)]
        assert torch.equal(cu, torch.tensor(lens).cumsum(0).to(torch.int32))
        n0 = int(cu[1])
        back = T.unpatchify(tok[:n0], coords[:n0], shape, patch, impl="kernel")
        assert torch.equal(back, T.unpatchify_reference(tok[:n0], coords[:n0], shape, patch))


@needs_ext
@pytest.mark.parametrize("frac", [1 / 1024, 0.25, 0.3, 0.5, 0.7, 1.0])
def test_patchify_cpu_threshold_exactly_at_the_boundary(frac):
    """Patches with need - 1, need and need + 1 foreground voxels (need = ceil(frac * 1024)): the
    first is dropped, the others kept (>=), by the kernel as by the hand-worked count."""
    need = math.ceil(frac * 1024 - 1e-9)
    assert T.min_fg_voxels(frac) == need
    vol = torch.randint(0, 256, (12, 16, 20), dtype=torch.uint8)  # x is padded: 16 + 4 of 32
    mask = torch.zeros(12, 16, 20, dtype=torch.uint8)
    counts = (need - 1, need, min(need + 1, 1024))
    for z, c in enumerate(counts):
        block = mask[4 * z:4 * z + 4, :, :16]
        flat = torch.zeros(1024, dtype=torch.uint8)
        flat[torch.randperm(1024)[:c]] = 1
        block.copy_(flat.reshape(4, 16, 16))
    mask[:, :, 16:] = 1  # the second x column of tokens: 4 * 16 * 4 = 256 voxels, padding is background
    tok, coords, _ = T.patchify([vol], [mask], frac, impl="kernel")
    want = [(z, 0) for z, c in enumerate(counts) if c >= need] + [(z, 1) for z in range(3) if 256 >= need]
    assert sorted(map(tuple, coords[:, [0, 2]].tolist())) == sorted(want)
    assert torch.equal(tok, patchify_brute_force([vol], [mask], need, T.PATCH)[0])


# ---- fill_holes_slices, CPU kernel ----------------------------------------------------------------

def rings(rng, D, H, W):
    """Nested filled / hollow rectangles, some cut by the border (their 'holes' touch it)."""
    m = np.zeros((D, H, W), np.uint8)
    for _ in range(rng.randint(1, 6)):
        r0, c0 = rng.randint(-3, H), rng.randint(-3, W)
        r1, c1, th, val = r0 + rng.randint(2, H + 3), c0 + rng.randint(2, W + 3), rng.randint(1, 3), rng.random() < 0.8
        m[:, max(r0, 0):max(r1, 0), max(c0, 0):max(c1, 0)] = val
        m[:, max(r0 + th, 0):max(r1 - th, 0), max(c0 + th, 0):max(c1 - th, 0)] = 1 - val
    return m


def spiral(n):
    """A one-pixel wall spiralling inward: the background inside is one long corridor to the border."""
    m = np.zeros((n, n), np.uint8)
    r0, c0, r1, c1 = 0, 0, n - 1, n - 1
    while r0 <= r1 and c0 <= c1:
        m[r0, c0:c1 + 1] = m[r0:r1 + 1, c1] = m[r1, c0:c1 + 1] = 1
        m[r0 + 2:r1 + 1, c0] = 1
        if r0 + 2 <= r1:
            m[r0 + 2, c0:c1 - 1] = 1
        r0, c0, r1, c1 = r0 + 4, c0 + 4, r1 - 4, c1 - 4
    return m


@needs_ext
@pytest.mark.parametrize("seed", range(4))
def test_fill_holes_cpu_against_scipy_per_slice(seed):
    """Random noise, nested rings with holes touching the border, 1-pixel rows / columns, values
    other than 1, bool masks, more slices than the reference's chunk: kernel (C-contiguous) and
    reference (Fortran order takes it) both equal scipy.ndimage.binary_fill_holes slice by slice."""
    assert ops.backend("fill_holes_slices", "cpu") == "cpp"
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    for _ in range(60):
        D, H, W = rng.randint(1, 9), rng.choice([1, 2, 3, 5, 17, 40]), rng.choice([1, 2, 3, 5, 17, 40])
        m = (nrng.random((D, H, W)) < rng.random()).astype(np.uint8) if rng.random() < 0.4 else rings(rng, D, H, W)
        if rng.random() < 0.3:
            m = m * np.uint8(rng.choice([7, 255]))
        want = np.stack([ndi.binary_fill_holes(x != 0) for x in m])
        for arr in (m.copy(), m.astype(bool), np.asfortranarray(m)):
            out = V.fill_holes_slices(arr)
            assert out.dtype == arr.dtype and np.array_equal(out != 0, want)
            if arr.flags.c_contiguous:  # the kernel writes 0/1 (the reference leaves a slab without background as is)
                assert set(np.unique(out)) <= {0, 1}
    for n in (7, 31, 101):
        s = spiral(n)[None].copy()
        assert np.array_equal(V.fill_holes_slices(s)[0], ndi.binary_fill_holes(spiral(n)).astype(np.uint8))


# ---- FlashBlock (strided q/k/v into the CPU attention kernel) --------------------------------------

@needs_attn
@pytest.mark.parametrize("dim,heads", [(96, 3), (384, 6), (30, 5)])
def test_flashblock_matches_the_float64_unfused_block(dim, heads):
    """FlashBlock (fused QKV views into the kernel, addmm residual, chunked inference MLP) against
    UnfusedBlock with the float64 reference attention: output, input and parameter gradients,
    and the inference path with chunks smaller than a sequence."""
    from nvfm.flashblock import FlashBlock, UnfusedBlock
    torch.manual_seed(dim)
    for proj_bias, gelu, chunk in ((True, "none", 7), (False, "tanh", 1)):
        ref = UnfusedBlock(dim, heads, attn_impl="reference", gelu_approximate=gelu, proj_bias=proj_bias).double()
        fused = FlashBlock(dim, heads, attn_impl="ours", mlp_chunk=chunk, gelu_approximate=gelu, proj_bias=proj_bias)
        fused.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        lens = [17, 0, 1, 130]
        cu = cu_of(lens)
        x = torch.randn(sum(lens), dim, dtype=torch.float64)
        with torch.no_grad():
            assert rel_err(fused(x.float(), cu, 130), ref(x, cu, 130)) < FP32_TOL
        xr, xf = x.clone().requires_grad_(), x.float().requires_grad_()
        yr, yf = ref(xr, cu, 130), fused(xf, cu, 130)
        w = torch.randn_like(yr)
        (yr * w).sum().backward()
        (yf.double() * w).sum().backward()
        assert rel_err(yf, yr) < FP32_TOL and rel_err(xf.grad, xr.grad) < FP32_TOL
        for (name, pf), pr in zip(fused.named_parameters(), ref.parameters()):
            assert rel_err(pf.grad, pr.grad) < 1e-4, name  # sums over 148 tokens x dim terms


# ---- the CUDA kernels under the SIMT emulator: edge cases test_simt.py leaves out ------------------

needs_cxx = pytest.mark.skipif(shutil.which(S.CXX) is None, reason="no C++ compiler for the emulator")


def simt(op):
    return S.load(op)


def simt_attention(lens_q, lens_k, H, max_q, max_k, tc, schedule, nan=None, seed=0):
    """Emulated bf16 forward + backward (head_dim 64) and the float64 reference on the same inputs."""
    D, g = 64, torch.Generator().manual_seed(seed)
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    q, k, v, do = (torch.randn(int(c[-1]), H, D, generator=g).bfloat16() for c in (cu_q, cu_k, cu_k, cu_q))
    if nan is not None:
        dict(q=q, k=k, v=v)[nan[0]][nan[1]] = math.nan
    L = simt("attention")
    out, lse = L.attn_fwd(q, k, v, cu_q, cu_k, max_q, max_k, D ** -0.5, schedule, tc)
    dq, dk, dv = L.attn_bwd(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, D ** -0.5, schedule, tc)
    r = [t.double().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*r, cu_q, cu_k)
    want = [ref] + list(torch.autograd.grad(ref, r, do.double()))
    return [out, dq, dk, dv], want, lse, lse_reference(r[0].detach(), r[1].detach(), cu_q, cu_k, D ** -0.5)


@needs_cxx
@pytest.mark.parametrize("tc", [False, True], ids=["fma", "tensor_cores"])
def test_simt_attention_max_seqlen_above_the_longest_and_one_long_sequence(tc):
    """The CUDA grid is sized by max_seqlen: blocks past every sequence must write nothing; one long
    sequence among 1- and 0-token ones. bf16 tolerance: 2^-8 relative plus 2e-2 absolute on the
    gradients (bf16 inputs and outputs; tests/test_simt.py measures PyTorch's own bf16 error ~1e-2)."""
    for lens_q, lens_k, max_q, max_k, sched in (([5, 1, 0, 7], [5, 1, 3, 7], 200, 300, "random:3"),
                                                ([150] + [1] * 6 + [2, 0], [150] + [1] * 6 + [3, 2], 150, 150,
                                                 "reverse")):
        got, want, lse, lse_want = simt_attention(lens_q, lens_k, 3, max_q, max_k, tc, sched)
        for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
            assert torch.isfinite(a).all(), name
            assert ((a.double() - r).abs() <= 2.0 ** -8 * r.abs() + 2e-2).all(), name
        assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_want))
        fin = torch.isfinite(lse_want)
        assert (lse.double()[fin] - lse_want[fin]).abs().max() < 1e-3


@needs_cxx
@pytest.mark.parametrize("tc", [False, True], ids=["fma", "tensor_cores"])
@pytest.mark.parametrize("nan", [("q", (1, 0, 0)), ("k", (6, 1, 2)), ("v", (3, 0, 5))], ids=["q", "k", "v"])
def test_simt_attention_nan_reaches_exactly_the_reference_outputs(tc, nan):
    """A NaN in q, k or v makes exactly the outputs and gradients NaN that it makes NaN in the
    float64 reference (never a silent finite value), the rest unchanged."""
    got, want, _, _ = simt_attention([5, 4], [5, 4], 2, 5, 4, tc, "forward", nan)
    for name, a, r in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a.isnan(), r.isnan()), name
        ok = ~r.isnan()
        assert ((a.double()[ok] - r[ok]).abs() <= 2.0 ** -8 * r[ok].abs() + 2e-2).all(), name


@needs_cxx
@pytest.mark.parametrize("seed", range(3))
def test_simt_gather_duplicates_and_empty_lists(seed):
    rng, g = random.Random(100 + seed), torch.Generator().manual_seed(100 + seed)
    vols, specs, coords = random_gather_batch(rng, g, (10, 40, 40), (0, 1, 6))
    cu = cu_of([len(c) for c in coords])
    packed = torch.cat(coords) if coords else torch.empty(0, 3, dtype=torch.int32)
    for dtype, sched in ((torch.float32, "forward"), (torch.bfloat16, "random:2"), (torch.float16, "reverse"),
                         (torch.uint8, "random:5")):
        got = simt("gather").gather_tokens(vols, packed, cu, _params(vols, specs), channel_table(), (4, 16, 16),
                                           dtype, sched)
        assert torch.equal(got, gather_tokens_reference(vols, specs, coords, dtype)), dtype


@needs_cxx
@pytest.mark.parametrize("seed", range(3))
def test_simt_block_masks_negative_keys_duplicate_coords_infinite_distances(seed):
    rng, nrng = random.Random(200 + seed), np.random.default_rng(200 + seed)
    for k in range(10):
        args = random_block_inputs(rng, nrng)
        t = [torch.from_numpy(a) for a in args]
        got = simt("blocks").block_masks(*t, schedule=("forward", "reverse", "random:4")[k % 3])
        ctx, tgt = block_masks_brute_force(*args)
        assert np.array_equal(got[0].numpy(), ctx) and np.array_equal(got[2].numpy(), tgt)


@needs_cxx
def test_simt_block_masks_distances_of_coordinates_2_31_apart():
    """The CUDA kernel took |coordinate - centre| in int32: x = 2^31 - 1 against a centre at -2^31 overflowed
    and made the far token the nearest (token 0 chosen; the CPU kernel and the reference choose token 1)."""
    args = [np.array([[0, 0, 2**31 - 1], [0, 0, 5]], np.int32), np.array([0, 2], np.int32),
            np.array([[0, 0, -2**31]], np.int32), np.array([0, 1], np.int32), np.ones((1, 3), np.float32),
            np.zeros((2, 2), np.int32), np.array([[1, 0, 0]], np.int32)]
    ctx, tgt = block_masks_brute_force(*args)
    assert ctx.tolist() == [1] and tgt.tolist() == [0]   # the one nearest the centre (x = 5) is selected
    got = simt("blocks").block_masks(*[torch.from_numpy(a) for a in args], schedule="forward")
    assert np.array_equal(got[0].numpy(), ctx) and np.array_equal(got[2].numpy(), tgt)


@needs_cxx
@pytest.mark.parametrize("seed", range(2))
def test_simt_patchify_odd_and_empty_shapes(seed):
    """token_fg_count against a numpy count (mask values 1 and 255, an empty axis now and then,
    patch (1, 1, 1)), patch_gather with a duplicated coordinate, patch_scatter against the reference."""
    rng, g = random.Random(300 + seed), torch.Generator().manual_seed(300 + seed)
    L = simt("patchify")
    for _ in range(12):
        patch = rng.choice([(4, 16, 16), (3, 5, 7), (1, 1, 1), (2, 3, 2)])
        shape = tuple(rng.randint(0 if rng.random() < 0.1 else 1, 2 * p + 2) for p in patch)
        vol = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        mask = (torch.rand(shape, generator=g) < rng.random()).to(torch.uint8) * rng.choice([1, 255])
        m = mask.numpy() != 0
        want = np.zeros(T.token_grid(shape, patch), np.int32)
        for z in itertools.product(*[range(n) for n in want.shape]):
            want[z] = m[tuple(slice(i * p, (i + 1) * p) for i, p in zip(z, patch))].sum()
        assert torch.equal(L.token_fg_count(mask, patch, "random:5"), torch.from_numpy(want)), (shape, patch)
        tok, coords = patchify_brute_force([vol], [mask], 0, patch)
        if len(coords):
            dup = torch.cat([coords, coords[:1]])
            assert torch.equal(L.patch_gather(vol, dup, patch, "reverse"), torch.cat([tok, tok[:1]]))
            back, intact = L.patch_scatter(tok, coords, shape, patch, "random:1")
            assert intact and torch.equal(back, T.unpatchify_reference(tok, coords, shape, patch))
