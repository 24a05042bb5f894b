"""Edge cases of the compiled CPU operators against their references (and, where the reference
itself was wrong, against an independent computation): empty and single-token sequences, odd
head dims, views with strides and storage offsets, overflowing scores, NaN, other offset and
output dtypes, thread counts; and invalid input that must raise instead of being cast."""
import random

import numpy as np
import pytest
import torch

from nvfm import ops
from nvfm import tokenize as T
from nvfm.attention import attention_reference, ours_available, varlen_attention
from nvfm.blocks import block_masks, block_masks_reference
from nvfm.gather import (WINDOW_MEAN, WINDOW_STD, WINDOWS, GatherSpec, gather_tokens, gather_tokens_reference,
                         masks_patch_perm)

HAS_ATTN = ours_available(torch.empty(1, 1, 8))
needs_attn = pytest.mark.skipif(not HAS_ATTN, reason="nvfm._C attention kernel not built")
needs_ext = pytest.mark.skipif(not ops.extension_loaded(), reason="compiled extension not built")


def cu_of(lens):
    return torch.tensor([0] + list(lens)).cumsum(0).to(torch.int32)


def packed(lens_q, lens_k, H, D, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(n), H, D, generator=g, dtype=torch.float64) for n in (lens_q, lens_k, lens_k))
    return q, k, v, cu_of(lens_q), cu_of(lens_k)


def same_nan_and_close(got, want, tol):
    """NaN exactly where want has NaN, elsewhere within tol (relative to want's largest finite value)."""
    got, want = got.double(), want.double()
    assert torch.equal(got.isnan(), want.isnan()), "NaN positions differ"
    ok = ~want.isnan()
    if ok.any():
        err = (got[ok] - want[ok]).abs().max().item()
        assert err < tol * max(1.0, want[ok].abs().max().item()), f"max error {err:.2e}"


def attn_with_grads(impl, q, k, v, cu_q, cu_k, do, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    lq, lk = (cu[1:] - cu[:-1] for cu in (cu_q, cu_k))
    out = varlen_attention(q, k, v, cu_q, cu_k, int(lq.max()) if len(lq) else 0, int(lk.max()) if len(lk) else 0,
                           impl=impl)
    if out.numel() == 0:
        return (out,) + tuple(torch.zeros_like(t) for t in (q, k, v))
    return (out,) + torch.autograd.grad(out, (q, k, v), do.to(dtype))


# ---- varlen attention -----------------------------------------------------------------------------

@needs_attn
def test_attention_key_tile_whose_scores_all_overflow_to_minus_inf():
    """The forward's online softmax shifted a row by its running max; when a whole 256-key tile
    scored -inf (float32 overflow of q.k, here -1e40) the max was -inf and exp(-inf + inf) = NaN
    poisoned the row for good, though the remaining keys give an ordinary softmax. Ground truth:
    float64 (no overflow: those keys get weight exp(-1e40) = 0)."""
    lens_q, lens_k = [5, 3], [300, 600]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, 2, 8, seed=int(torch.randint(0, 2**31, ())))
    q[:, :, 0] = 1e20
    k[:, :, 0] = 0.0
    k[:256, :, 0] = -1e20          # sequence 0: its whole first key tile
    k[300:300 + 512, :, 0] = -1e20  # sequence 1: its first two key tiles
    do = torch.randn_like(q)
    ref = attn_with_grads("reference", q, k, v, cu_q, cu_k, do, torch.float64)
    assert all(torch.isfinite(r).all() for r in ref)
    # the float64 truth is the softmax over the other keys alone (an independent dense computation)
    keep = torch.ones(k.shape[0], dtype=torch.bool)
    keep[:256] = keep[300:812] = False
    for b, (qs, ks) in enumerate(((slice(0, 5), slice(0, 300)), (slice(5, 8), slice(300, 900)))):
        kk = keep[ks]
        p = torch.softmax(torch.einsum("qhd,khd->hqk", q[qs], k[ks][kk]) * 8 ** -0.5, -1)
        assert torch.allclose(ref[0][qs], torch.einsum("hqk,khd->qhd", p, v[ks][kk]), atol=1e-12)
    got = attn_with_grads("ours", q, k, v, cu_q, cu_k, do, torch.float32)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max().item()
        assert err < 2e-5 * max(1.0, r.abs().max().item()), f"{name}: max error {err:.2e}"


@needs_attn
@pytest.mark.parametrize("lens_q,lens_k,H,D", [
    ([0, 5, 3], [0, 5, 3], 2, 16),     # first sequence empty
    ([5, 3, 0], [5, 3, 0], 2, 7),      # last sequence empty, head_dim not a multiple of the SIMD width
    ([0, 0], [0, 0], 2, 16),           # every sequence empty
    ([], [], 1, 8),                    # no sequence at all
    ([1], [1], 1, 1),                  # a single token, head_dim 1
    ([0, 5, 3], [4, 5, 3], 1, 33),     # keys without queries
    ([70, 130], [300, 3], 3, 17),      # several tiles, odd head_dim
])
def test_attention_degenerate_shapes_forward_backward(lens_q, lens_k, H, D):
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, H, D, seed=D + len(lens_q))
    do = torch.randn_like(q)
    ref = attn_with_grads("reference", q, k, v, cu_q, cu_k, do, torch.float64)
    got = attn_with_grads("ours", q, k, v, cu_q, cu_k, do, torch.float32)
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == torch.float32
        same_nan_and_close(g, r, 2e-5)


@needs_attn
def test_attention_views_with_offsets_and_a_larger_max_seqlen():
    """q, k, v as strided slices with a storage offset (row, head and dim windows of one buffer),
    transposed heads (head_dim stride != 1), int64 and strided offsets, max_seqlen far above need."""
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(50, 4, 3, 40, generator=g)
    q, k, v = (buf[5:44, i, :, 3:35] for i in (1, 2, 3))
    assert q.storage_offset() > 0 and not q.is_contiguous()
    cu = torch.tensor([0, 9, 39], dtype=torch.int32)
    want = attention_reference(q.double(), k.double(), v.double(), cu, cu)
    same_nan_and_close(varlen_attention(q, k, v, cu, cu, 1000, 1000, impl="ours"), want, 2e-5)
    strided_cu = torch.stack([cu, torch.full_like(cu, 7)], 1).reshape(-1)[::2]
    same_nan_and_close(varlen_attention(q, k, v, cu.long(), strided_cu, 30, 30, impl="ours"), want, 2e-5)
    qt = torch.randn(39, 32, 3, generator=g).transpose(1, 2)
    same_nan_and_close(varlen_attention(qt, qt, qt, cu, cu, 30, 30, impl="ours"),
                       attention_reference(qt.double(), qt.double(), qt.double(), cu, cu), 2e-5)


@needs_attn
def test_attention_rejects_float_and_wrapping_offsets():
    """impl="ours" cast cu_seqlens to int32 unchecked: float offsets were truncated (9.7 -> 9) and
    int64 2**32 + 9 wrapped to 9, both answered silently; the reference refuses them."""
    q = torch.randn(39, 2, 16)
    cu = torch.tensor([0, 9, 39], dtype=torch.int32)
    for bad in (torch.tensor([0.0, 9.7, 39.0]), torch.tensor([0, 9 + 2**32, 39]), torch.tensor([0, 9 - 2**32, 39])):
        with pytest.raises(ValueError):
            attention_reference(q, q, q, bad, bad)
        with pytest.raises(ValueError, match="cu_seqlens"):
            varlen_attention(q, q, q, bad, cu, 30, 30, impl="ours")
        with pytest.raises(ValueError, match="cu_seqlens"):
            varlen_attention(q, q, q, cu, bad, 30, 30, impl="ours")


@needs_attn
def test_attention_scores_near_overflow_and_nan_propagation():
    """Scores ~1e4 (exp would overflow without the max shift) match; a NaN in q, k or v reaches
    exactly the outputs it reaches in the reference; a row whose every score is -inf is NaN in both."""
    lens = [7, 300]
    q, k, v, cu, _ = packed(lens, lens, 2, 16, seed=5)
    big = [(q * 300).float(), (k * 30).float(), v.float()]  # scores ~1e4: fp32 conditioning, not the kernel, limits
    want = attention_reference(*(t.double() for t in big), cu, cu)
    err = {impl: (varlen_attention(*big, cu, cu, 300, 300, impl=impl).double() - want).abs().max().item()
           for impl in ("ours", "sdpa")}
    assert err["ours"] <= 2 * err["sdpa"] + 1e-6  # PyTorch's own float32 error as the yardstick
    for which, idx in (("q", (2, 0, 0)), ("k", (9, 1, 3)), ("v", (2, 0, 0))):
        x = dict(q=q.clone(), k=k.clone(), v=v.clone())
        x[which][idx] = float("nan")
        ref = attention_reference(x["q"], x["k"], x["v"], cu, cu)
        assert ref.isnan().any()
        same_nan_and_close(varlen_attention(*(x[n].float() for n in "qkv"), cu, cu, 300, 300, impl="ours"), ref, 2e-5)
    qi, ki = q.clone(), k.clone()
    qi[:7, 0, 0], ki[:7, 0, 0] = 1.0, -float("inf")  # sequence 0, head 0: every score -inf
    ref = attention_reference(qi, ki, v, cu, cu)
    assert ref[:7, 0].isnan().all() and not ref[:7, 1].isnan().any()
    same_nan_and_close(varlen_attention(qi.float(), ki.float(), v.float(), cu, cu, 300, 300, impl="ours"), ref, 2e-5)


@needs_attn
def test_attention_bit_identical_across_thread_counts():
    lens_q, lens_k = [300, 1, 70, 0, 129], [600, 3, 70, 5, 1]
    q, k, v, cu_q, cu_k = packed(lens_q, lens_k, 3, 40, seed=2)
    do = torch.randn_like(q)
    n = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(attn_with_grads("ours", q, k, v, cu_q, cu_k, do, torch.float32))
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_attention_reference_gradcheck_float64():
    """The specification's own gradients (the ground truth of every gradient test) against finite
    differences, with empty sequences on both sides."""
    q, k, v, cu_q, cu_k = packed([2, 0, 3], [3, 2, 0], 2, 3, seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: attention_reference(a, b, c, cu_q, cu_k, 0.7), (q, k, v))


# ---- patchify / unpatchify --------------------------------------------------------------------------

def test_unpatchify_rejects_negative_and_float_coords():
    """unpatchify_reference scattered a token at coordinate -1 into the LAST grid cell (Python
    indexing), silently, while the kernel refused it; float coords were truncated by both."""
    tok = torch.randint(1, 256, (2, 1024), dtype=torch.uint8)
    impls = ["reference"] + (["kernel"] if ops.backend("unpatchify", "cpu") != "reference" else [])
    for bad in ([[0, 0, 0], [-1, 0, 0]], [[0, 0, 0], [0, 0, -1]]):
        for impl in impls:
            for dtype in (torch.int32, torch.int64):  # int32 reaches the C++ check (a RuntimeError)
                with pytest.raises(IndexError if impl == "reference" or dtype == torch.int64 else RuntimeError,
                                   match="outside the token grid"):
                    T.unpatchify(tok, torch.tensor(bad, dtype=dtype), (8, 16, 16), impl=impl)
    for impl in impls:
        with pytest.raises(ValueError, match="integer"):
            T.unpatchify(tok, torch.tensor([[0, 0, 0], [1.7, 0, 0]]), (8, 16, 16), impl=impl)
    # in range, any integer dtype: the volume is the two patches stacked along z (hand-worked)
    for impl in impls:
        back = T.unpatchify(tok, torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.int16), (8, 16, 16), impl=impl)
        assert torch.equal(back, torch.cat([tok[1], tok[0]]).reshape(8, 16, 16))


@needs_ext
def test_patchify_views_and_empty_volumes():
    g = torch.Generator().manual_seed(4)
    vol = torch.randint(0, 256, (12, 50, 45), dtype=torch.uint8, generator=g)
    mask = (torch.rand(12, 50, 45, generator=g) < 0.6).to(torch.uint8)
    cases = [([vol[1:10, 2:, 3:]], [mask[1:10, 2:, 3:]]),              # storage offset, strided
             ([vol.transpose(1, 2)], [mask.transpose(1, 2)]),          # transposed
             ([vol[:, :, :0], vol[:0], vol], [mask[:, :, :0], mask[:0], mask])]  # empty volumes first
    for vols, masks in cases:
        for thr in (0.0, 0.5, 1.0):
            got, want = T.patchify(vols, masks, thr, impl="kernel"), T.patchify_reference(vols, masks, thr)
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))


# ---- gather -------------------------------------------------------------------------------------------

def test_gather_rejects_float_coords():
    """Float coords were truncated (1.7 -> 1) by the reference and the kernel path alike."""
    vol = torch.randint(0, 256, (1, 8, 32, 32), dtype=torch.uint8)
    spec = GatherSpec((0, 0, 0), (2, 2, 2))
    c = torch.tensor([[0.0, 1.7, 0.0]])
    with pytest.raises(ValueError, match="integers"):
        gather_tokens_reference([vol], [spec], [c])
    for impl in ("auto", "reference"):
        with pytest.raises(ValueError, match="integers"):
            gather_tokens([vol], [spec], [c], impl=impl)


def test_gather_float64_output_is_the_float32_normalisation():
    """gather_tokens(dtype=float64) raised in the kernel (it writes float32/16, bf16, uint8) while
    the reference returns the float32 values widened; now every backend does the latter."""
    g = torch.Generator().manual_seed(6)
    vol = torch.randint(0, 256, (1, 9, 40, 33), dtype=torch.uint8, generator=g)
    grid = T.token_grid(vol.shape[1:])
    toks, coords, _ = T.patchify_reference([vol[0]], [torch.ones_like(vol[0])], 0.0)
    want = ((toks.float() / 255.0 - WINDOW_MEAN[0]) / WINDOW_STD[0]).double()
    spec = GatherSpec((0, 0, 0), grid, (0, 1, 2), (False,) * 3, "mr")
    for impl in ("auto", "reference"):
        got = gather_tokens([vol], [spec], [coords], dtype=torch.float64, impl=impl)
        assert got.dtype == torch.float64 and torch.equal(got, want)


@needs_ext
@pytest.mark.parametrize("patch", [(2, 8, 8), (4, 16, 8), (4, 8, 16), (1, 16, 16), (5, 16, 16), (1, 1, 1),
                                   (2, 3, 16)])
def test_gather_kernel_other_patch_sizes(patch):
    """The uint8 kernel's fast paths assume 16-wide rows and a 16 x 16 plane; other patch shapes
    take the general paths, checked here against the reference bit for bit."""
    rng, g = random.Random(sum(patch)), torch.Generator().manual_seed(sum(patch))
    for _ in range(6):
        shape = tuple(rng.randint(1, 3 * p + 3) for p in patch)
        window = rng.choice(WINDOWS)
        vol = torch.randint(0, 256, (1 if window == "mr" else 2, *shape), generator=g, dtype=torch.uint8)
        grid = T.token_grid(shape, patch)
        size = tuple(rng.randint(1, n) for n in grid)
        start = tuple(rng.randint(0, n - s) for n, s in zip(grid, size))
        perm = tuple(rng.sample(range(3), 3))
        spec = GatherSpec(start, size, perm, tuple(rng.random() < 0.5 for _ in range(3)), window,
                          rng.choice([None, masks_patch_perm(perm), (0, 2, 1), tuple(rng.sample(range(3), 3))]))
        allc = torch.stack(torch.meshgrid(*[torch.arange(n) for n in spec.out_grid()], indexing="ij"), -1)
        c = allc.reshape(-1, 3).to(torch.int32)
        for dtype in (torch.float32, torch.uint8, torch.bfloat16):
            want = gather_tokens_reference([vol], [spec], [c], dtype, patch)
            assert torch.equal(gather_tokens([vol], [spec], [c], dtype, patch, impl="kernel"), want), (spec, dtype)


# ---- block masks ----------------------------------------------------------------------------------------

@needs_ext
def test_block_masks_accept_views_like_the_reference():
    """block_masks(impl="auto") passed views straight to the kernel, which refused them (it reads
    raw pointers) while the reference takes them: a column slice of coords, a strided keys row."""
    from test_blocks import random_batch
    inputs = list(random_batch(np.random.default_rng(0), [10, 0, 60, 7]))
    want = block_masks_reference(*inputs)
    views = list(inputs)
    views[0] = torch.cat([inputs[0], inputs[0]], 1)[:, :3]                   # coords: row stride 6
    views[1] = torch.stack([inputs[1], inputs[1]], 1).reshape(-1)[::2]        # cu_seqlens: stride 2
    views[5] = torch.stack([inputs[5], inputs[5]], 2).reshape(2, -1)[:, ::2]  # keys: column stride 2
    views[4] = inputs[4].t().contiguous().t()                                 # aspects: column-major
    assert not any(views[i].is_contiguous() for i in (0, 1, 4, 5))
    assert all(torch.equal(a, b) for a, b in zip(views, inputs))
    for impl in ("auto", "kernel"):
        got = block_masks(*views, impl=impl)
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))
