"""Varlen attention: the csrc kernels ("ours") and the SDPA path against the float64 reference.

Ground truth = attention_reference in float64 and its autograd gradients. CPU kernel: fp32
compute, so errors must be at fp32 level. GPU (skipped without CUDA): FlashAttention's rule,
error of the bf16/fp16 kernel <= a small multiple of PyTorch's own error in that dtype.
"""
import pytest
import torch

from nvfm.attention import (attention_reference, ours_available, resolve_impl, varlen_attention)

HAS_OURS_CPU = ours_available(torch.empty(1, 1, 64))
HAS_CUDA = torch.cuda.is_available()
needs_ours = pytest.mark.skipif(not HAS_OURS_CPU, reason="nvfm._C attention kernel not built")

# (query lengths, key lengths, heads, head_dim): length 0 and 1, non-multiples of the CPU tiles
# (64 queries x 256 keys) and the CUDA tiles (32 x 32), a 100x length spread, cu_q != cu_k.
CASES = [
    ([1], [1], 1, 32),
    ([5, 1, 7], [5, 1, 7], 2, 64),
    ([3, 300], [3, 300], 2, 32),                 # 100x spread
    ([257, 65, 2], [257, 65, 2], 3, 64),
    ([17, 0, 40], [60, 9, 1], 2, 128),           # cu_q != cu_k, an empty query sequence
    ([4, 12], [0, 33], 1, 64),                   # a sequence with queries but no keys
    ([700], [520], 1, 64),                       # several key tiles
]


def make_inputs(lens_q, lens_k, H, D, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q = torch.randn(int(cu_q[-1]), H, D, generator=g, dtype=torch.float64)
    k = torch.randn(int(cu_k[-1]), H, D, generator=g, dtype=torch.float64)
    v = torch.randn(int(cu_k[-1]), H, D, generator=g, dtype=torch.float64)
    do = torch.randn(int(cu_q[-1]), H, D, generator=g, dtype=torch.float64)
    move = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return move(q), move(k), move(v), move(do), cu_q.to(device), cu_k.to(device)


def reference_with_grads(q, k, v, do, cu_q, cu_k):
    q, k, v = (t.detach().double().cpu().requires_grad_() for t in (q, k, v))
    out = attention_reference(q, k, v, cu_q.cpu(), cu_k.cpu())
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do.double().cpu())
    return out.detach(), dq, dk, dv


def run_impl(impl, q, k, v, do, cu_q, cu_k, lens_q, lens_k):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = varlen_attention(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), impl=impl)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out, dq, dk, dv


def test_reference_matches_dense_softmax():
    q, k, v, _, cu_q, cu_k = make_inputs([6], [9], 2, 32)
    dense = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) * 32 ** -0.5, -1)
    assert torch.allclose(attention_reference(q, k, v, cu_q, cu_k), torch.einsum("hqk,khd->qhd", dense, v))


@needs_ours
@pytest.mark.parametrize("lens_q,lens_k,H,D", CASES)
def test_ours_cpu_forward_backward_fp32(lens_q, lens_k, H, D):
    q, k, v, do, cu_q, cu_k = make_inputs(lens_q, lens_k, H, D, dtype=torch.float32, seed=len(lens_q) + D)
    ref = reference_with_grads(q, k, v, do, cu_q, cu_k)
    got = run_impl("ours", q, k, v, do, cu_q, cu_k, lens_q, lens_k)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert g.dtype == torch.float32 and g.shape == r.shape
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max().item() if r.numel() else 0.0
        assert err < 2e-5 * max(1.0, r.abs().max().item()), f"{name}: max error {err:.2e}"


@needs_ours
def test_ours_cpu_lse_and_empty_rows():
    lens_q, lens_k = [3, 2], [4, 0]
    q, k, v, _, cu_q, cu_k = make_inputs(lens_q, lens_k, 2, 64, dtype=torch.float32)
    out, lse = torch.ops.nvfm.varlen_attn_fwd(q, k, v, cu_q, cu_k, 3, 4, 0.125)
    s = torch.einsum("qhd,khd->hqk", q[:3].double(), k[:4].double()) * 0.125
    assert torch.allclose(lse[:, :3].double(), torch.logsumexp(s, -1), atol=1e-5)
    assert torch.isneginf(lse[:, 3:]).all() and (out[3:] == 0).all()


@needs_ours
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ours_cpu_low_precision_inputs(dtype):
    """bf16/fp16 inputs are computed in fp32: error <= PyTorch's own error in that dtype."""
    lens = [37, 130, 1]
    q, k, v, do, cu_q, cu_k = make_inputs(lens, lens, 2, 64, dtype=dtype, seed=3)
    ref = reference_with_grads(q, k, v, do, cu_q, cu_k)
    got = run_impl("ours", q, k, v, do, cu_q, cu_k, lens, lens)
    pt = run_impl("sdpa", q, k, v, do, cu_q, cu_k, lens, lens)  # PyTorch in the same dtype
    for name, g, p, r in zip(("out", "dq", "dk", "dv"), got, pt, ref):
        assert g.dtype == dtype
        err, pt_err = (g.double() - r).abs().max().item(), (p.double() - r).abs().max().item()
        assert err <= 2 * pt_err + 1e-3, f"{name}: ours {err:.2e} vs pytorch {pt_err:.2e}"


@pytest.mark.parametrize("lens_q,lens_k,H,D", CASES[:5])
def test_sdpa_path_matches_reference(lens_q, lens_k, H, D):
    q, k, v, do, cu_q, cu_k = make_inputs(lens_q, lens_k, H, D)
    ref = reference_with_grads(q, k, v, do, cu_q, cu_k)
    got = run_impl("sdpa", q, k, v, do, cu_q, cu_k, lens_q, lens_k)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert torch.allclose(g, r, atol=1e-10), name


def test_sdpa_path_zero_for_sequences_without_keys():
    q, k, v, do, cu_q, cu_k = make_inputs([4, 12], [0, 33], 1, 64)
    out, dq, _, _ = run_impl("sdpa", q, k, v, do, cu_q, cu_k, [4, 12], [0, 33])
    assert (out[:4] == 0).all() and torch.isfinite(out).all() and torch.isfinite(dq).all()


@needs_ours
def test_opcheck_registration():
    """Schema, fake (meta) kernel and autograd registration are consistent (torch.compile needs them)."""
    q, k, v, _, cu_q, cu_k = make_inputs([5, 9], [7, 3], 2, 32, dtype=torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.nvfm.varlen_attn_fwd.default, (q, k, v, cu_q, cu_k, 9, 7, 0.2),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.nvfm.varlen_attn_bwd.default,
                          (q.detach(), q.detach(), k.detach(), v.detach(), q.detach(),
                           torch.zeros(2, 14), cu_q, cu_k, 9, 7, 0.2),
                          test_utils=("test_schema", "test_faketensor"))


@needs_ours
def test_strided_views_read_in_place():
    """q, k, v as views of one fused QKV output (row stride 3 * H * D) give the same result."""
    lens = [9, 30]
    cu = torch.tensor([0, 9, 39], dtype=torch.int32)
    qkv = torch.randn(39, 3, 2, 64)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    got = varlen_attention(q, k, v, cu, cu, 30, 30, impl="ours")
    want = varlen_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu, cu, 30, 30, impl="reference")
    assert torch.allclose(got, want, atol=1e-5)


@needs_ours
def test_ours_cpu_rejects_bad_input():
    q, k, v, _, cu_q, cu_k = make_inputs([5, 9], [7, 3], 2, 32, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="max_seqlen"):
        torch.ops.nvfm.varlen_attn_fwd(q, k, v, cu_q, cu_k, 5, 7, 0.2)  # true max_q is 9
    with pytest.raises(RuntimeError, match="cu_seqlens_q ends"):
        torch.ops.nvfm.varlen_attn_fwd(q[:-1], k, v, cu_q, cu_k, 9, 7, 0.2)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.nvfm.varlen_attn_fwd(q, k, v[:-1], cu_q, cu_k, 9, 7, 0.2)


def test_impl_selection():
    q = torch.zeros(3, 1, 64)
    assert resolve_impl("auto", q) == ("ours" if HAS_OURS_CPU else "sdpa")
    assert resolve_impl("sdpa", q) == "sdpa"
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("flash", q)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="torch_varlen"):
        varlen_attention(q, q, q, cu, cu, 3, 3, impl="torch_varlen")  # CPU tensors: a clear error


# ---- GPU (skipped without CUDA) -----------------------------------------------------------------

@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens_q,lens_k,H,D", [
    ([1], [1], 1, 64), ([5, 1, 7], [5, 1, 7], 2, 64), ([3, 300], [3, 300], 2, 128),
    ([257, 65, 2], [257, 65, 2], 3, 64), ([17, 0, 40], [60, 9, 1], 2, 128), ([4, 12], [0, 33], 1, 64),
    ([1000, 30, 2048], [1000, 30, 2048], 4, 64)])
def test_ours_cuda_flash_accuracy_rule(lens_q, lens_k, H, D, dtype):
    if not ours_available(torch.empty(1, 1, D, device="cuda", dtype=dtype)):
        pytest.skip("nvfm._C was built without CUDA kernels")
    q, k, v, do, cu_q, cu_k = make_inputs(lens_q, lens_k, H, D, dtype=dtype, device="cuda", seed=D)
    ref = reference_with_grads(q, k, v, do, cu_q, cu_k)
    got = run_impl("ours", q, k, v, do, cu_q, cu_k, lens_q, lens_k)
    pt = run_impl("sdpa", q, k, v, do, cu_q, cu_k, lens_q, lens_k)
    for name, g, p, r in zip(("out", "dq", "dk", "dv"), got, pt, ref):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        err = (g.double().cpu() - r).abs().max().item()
        pt_err = (p.double().cpu() - r).abs().max().item()
        assert err <= 2 * pt_err + 1e-3, f"{name}: ours {err:.2e} vs pytorch {dtype} {pt_err:.2e}"


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_ours_cuda_short_max_seqlen_gives_no_nan():
    """Issue 21 defect 4: max_seqlen_q below a real length left lse = -inf rows that the dK/dV
    kernel turned into NaN; they now contribute nothing (emulated: tests/test_simt.py)."""
    if not ours_available(torch.empty(1, 1, 64, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("nvfm._C was built without CUDA kernels")
    q, k, v, do, cu_q, cu_k = make_inputs([70], [20], 1, 64, dtype=torch.bfloat16, device="cuda")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = varlen_attention(q, k, v, cu_q, cu_k, 32, 20, impl="ours")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_ours_cuda_key_tile_whose_scores_overflow_gives_the_softmax_of_the_rest():
    """A first key tile (32 keys FMA, 64 tensor cores) whose scores all overflow float32 to -inf
    made exp(-inf + inf) = NaN rows (emulated: tests/test_simt.py); the rows are the attention over
    the other keys (float64 reference, where nothing overflows)."""
    if not ours_available(torch.empty(1, 1, 64, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("nvfm._C was built without CUDA kernels")
    q, k, v, do, cu_q, cu_k = make_inputs([5], [100], 1, 64, dtype=torch.bfloat16, device="cuda")
    q = q.abs() + 0.5
    k[:64] = -3e38                        # q . k < -1e40: -inf in float32
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = varlen_attention(q, k, v, cu_q, cu_k, 5, 100, impl="ours")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    rest = torch.tensor([0, 36], dtype=torch.int32, device="cuda")
    want = attention_reference(q.detach().double(), k.detach()[64:].double(), v.detach()[64:].double(), cu_q, rest)
    assert all(torch.isfinite(t).all() for t in (out, dq, dk, dv))
    assert (out.double() - want).abs().max() < 2e-2 and not dv[:64].any()


# ---- input validation and the lse gradient -------------------------------------------------------

def _fresh_seed():
    return int(torch.randint(0, 2**31, ()))


@pytest.mark.parametrize("impl", ["sdpa", "auto_no_ext"])
def test_sdpa_rejects_max_seqlen_below_the_longest_sequence(impl, monkeypatch):
    """The padded SDPA path trusted max_seqlen: a max_seqlen_k below the longest key sequence
    dropped keys silently (wrong output), a short max_seqlen_q gave a shape error."""
    import nvfm.attention as A
    if impl == "auto_no_ext":  # impl="auto" without the compiled extension takes the SDPA path
        monkeypatch.setattr(A, "ours_available", lambda q, head_dim=None: False)
        assert A.resolve_impl("auto", torch.zeros(1, 1, 8)) == "sdpa"
    lens_q, lens_k = [3, 6, 2], [4, 7, 1]
    q, k, v, _, cu_q, cu_k = make_inputs(lens_q, lens_k, 2, 16, seed=_fresh_seed())
    call = lambda mq, mk: varlen_attention(q, k, v, cu_q, cu_k, mq, mk, impl="auto" if impl != "sdpa" else "sdpa")  # noqa: E731
    with pytest.raises(ValueError, match=r"sequence 1 has 7 keys, more than max_seqlen_k=6"):
        call(6, 6)
    with pytest.raises(ValueError, match=r"sequence 1 has 6 queries, more than max_seqlen_q=5"):
        call(5, 7)
    ref = attention_reference(q, k, v, cu_q, cu_k)
    for mq, mk in ((6, 7), (9, 12)):  # a bound above the longest length is fine
        assert torch.allclose(call(mq, mk), ref, atol=1e-10)


def test_reference_validates_cu_seqlens():
    """attention_reference accepted a decreasing cu_seqlens (overlapping sequences, a silent
    answer); it now refuses bad offsets like the C++ op."""
    q = torch.randn(5, 1, 4, dtype=torch.float64)
    good = torch.tensor([0, 2, 5], dtype=torch.int32)
    for cu, msg in (([0, 4, 2, 5], "non-decreasing"), ([1, 5], "start at 0"), ([0, 4], "ends at 4 but q has 5"),
                    ([0, 2, 6], "ends at 6")):
        with pytest.raises(ValueError, match=msg):
            attention_reference(q, q, q, torch.tensor(cu, dtype=torch.int32), torch.tensor(cu, dtype=torch.int32))
    with pytest.raises(ValueError, match="entries"):
        attention_reference(q, q, q, good, torch.tensor([0, 5], dtype=torch.int32))
    assert torch.isfinite(attention_reference(q, q, q, good, good)).all()


def test_auto_float64_on_cpu_runs_and_matches_reference():
    """impl="auto" picked the compiled op for float64 on the CPU, which rejects float64."""
    lens_q, lens_k = [5, 9], [7, 3]
    q, k, v, do, cu_q, cu_k = make_inputs(lens_q, lens_k, 2, 32, seed=_fresh_seed())
    assert resolve_impl("auto", q) == "sdpa"
    ref = reference_with_grads(q, k, v, do, cu_q, cu_k)
    got = run_impl("auto", q, k, v, do, cu_q, cu_k, lens_q, lens_k)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert g.dtype == torch.float64 and torch.allclose(g, r, atol=1e-10), name
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_impl("auto", q.to(dtype)) == ("ours" if HAS_OURS_CPU else "sdpa")


def _reference_out_lse(q, k, v, cu_q, cu_k, scale):
    """float64 autograd ground truth: out and an explicit per-row logsumexp (H, total_q)."""
    lse, cq, ck = [], cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]]
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        lse.append(torch.logsumexp(s, -1) if ks.shape[0] else s.new_full((q.shape[1], qs.shape[0]), -torch.inf))
    return attention_reference(q, k, v, cu_q, cu_k, scale), torch.cat(lse, 1)


@needs_ours
@pytest.mark.parametrize("use_out", [True, False])
def test_ours_cpu_gradient_through_lse(use_out):
    """varlen_attn_fwd's autograd dropped the gradient flowing into lse (silently zero). The
    backward now folds it in: dS = P * (dP - (rowsum(dO * O) - dlse)); checked against float64
    autograd of an explicit logsumexp, with and without a loss on out."""
    lens_q, lens_k = [6, 0, 70, 4], [9, 3, 300, 0]  # cu_q != cu_k, no queries, several key tiles, no keys
    q, k, v, do, cu_q, cu_k = make_inputs(lens_q, lens_k, 2, 32, seed=_fresh_seed())
    dl = torch.randn(2, q.shape[0], dtype=torch.float64)
    scale = 0.3

    def loss(out, lse):
        lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # no-key rows: -inf constant
        return (lse * dl.to(lse.dtype)).sum() + ((out * do.to(out.dtype)).sum() if use_out else 0)

    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(loss(*_reference_out_lse(qd, kd, vd, cu_q, cu_k, scale)),
                               (qd, kd, vd), allow_unused=True)
    qf, kf, vf = (t.float().requires_grad_() for t in (q, k, v))
    out, lse = torch.ops.nvfm.varlen_attn_fwd(qf, kf, vf, cu_q, cu_k, max(lens_q), max(lens_k), scale)
    got = torch.autograd.grad(loss(out, lse), (qf, kf, vf), allow_unused=True)
    for name, x, g, w in zip(("dq", "dk", "dv"), (q, k, v), got, want):
        w = torch.zeros_like(x) if w is None else w
        g = torch.zeros_like(w) if g is None else g.double()
        assert w.abs().max() > 0 or name == "dv"
        err = (g - w).abs().max().item()
        assert err < 2e-5 * max(1.0, w.abs().max().item()), f"{name}: max error {err:.2e}"
