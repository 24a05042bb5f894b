"""Varlen attention over packed sequences (FlashAttention varlen interface).

q: (total_q, heads, head_dim), k, v: (total_k, heads, head_dim); cu_seqlens_q/k int32 (B+1);
sequence b attends only within itself: queries cu_q[b]:cu_q[b+1] to keys cu_k[b]:cu_k[b+1].
Non-causal (a volume's tokens all see each other). Returns (total_q, heads, head_dim).
A query whose sequence has no keys gets a zero output row. The predictor packs queries and
keys differently (cu_seqlens_q != cu_seqlens_k); the encoder passes the same offsets twice.

impl:
  "reference"     plain PyTorch loop over sequences (the specification; float64 in -> float64)
  "sdpa"          pad to the longest sequence, scaled_dot_product_attention with a key mask
  "ours"          the csrc kernels via torch.ops.nvfm.varlen_attn_fwd/bwd (CPU: fp32 compute,
                  fp32/fp16/bf16 in; CUDA: fp16/bf16, head_dim 64/128), differentiable; on CUDA
                  NVFM_ATTN_KERNEL=tc runs the tensor-core kernels (mma.sync, sm_80+) instead
                  of the FMA ones (both checked in CI under the SIMT emulator: tests/test_simt.py)
  "torch_varlen"  torch.nn.attention.varlen.varlen_attn (CUDA only, torch >= 2.10)
  "auto"          "ours" when its kernel exists for these inputs and, on CUDA, is trusted by
                  nvfm.ops' rule (verified on a GPU); else "torch_varlen" on CUDA, "sdpa" on CPU
Training code can always pick "sdpa" or "reference", so an unverified kernel never blocks it.

Ops (see nvfm/ops.py for the pattern):
  varlen_attn_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> (out, lse (heads, total_q) fp32)
  varlen_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, dlse=None) -> (dq, dk, dv)
    dlse (heads, total_q): gradient flowing into lse (CPU; the CUDA kernels refuse a nonzero one)
"""
import torch
import torch.nn.functional as F

from nvfm import ops

IMPLS = ("auto", "ours", "sdpa", "torch_varlen", "reference")
CUDA_HEAD_DIMS = (64, 128)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q=None, max_seqlen_k=None):
    """Validate the offsets as the C++ op does (csrc/attention.cpp read_seqs); ValueError if bad.
    Returns the offsets as Python lists. max_seqlen_q/k, when given, must bound every length."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dim() != 1 or cu.numel() < 1 or cu.dtype.is_floating_point or cu.dtype.is_complex:
            raise ValueError(f"{name} must be a 1D integer tensor of B + 1 offsets, got {cu.dtype} "
                             f"{tuple(cu.shape)}")
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    if len(cq) != len(ck):
        raise ValueError(f"cu_seqlens_q has {len(cq)} entries but cu_seqlens_k has {len(ck)}")
    if cq[0] != 0 or ck[0] != 0:
        raise ValueError("cu_seqlens must start at 0")
    if cq[-1] != total_q:
        raise ValueError(f"cu_seqlens_q ends at {cq[-1]} but q has {total_q} rows")
    if ck[-1] != total_k:
        raise ValueError(f"cu_seqlens_k ends at {ck[-1]} but k has {total_k} rows")
    for b in range(len(cq) - 1):
        if cq[b + 1] < cq[b] or ck[b + 1] < ck[b]:
            raise ValueError(f"cu_seqlens must be non-decreasing (sequence {b})")
    for name, cu, m, what in (("max_seqlen_q", cq, max_seqlen_q, "queries"), ("max_seqlen_k", ck, max_seqlen_k, "keys")):
        if m is None or len(cu) < 2:
            continue
        lens = [cu[b + 1] - cu[b] for b in range(len(cu) - 1)]
        longest = max(lens)
        if longest > int(m):
            raise ValueError(f"sequence {lens.index(longest)} has {longest} {what}, more than {name}={int(m)} "
                             f"(max_seqlen must bound the longest sequence)")
    return cq, ck


def attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None):
    """Per-sequence softmax(q k^T * scale) v; computed in float64 for float64 inputs, else in
    float32. Differentiable (the tests take its float64 gradients as ground truth)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(q)
    cq, ck = check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        if qs.shape[0] == 0 or ks.shape[0] == 0:
            continue  # no keys: the output rows stay 0
        s = torch.einsum("qhd,khd->hqk", qs.to(ct), ks.to(ct)) * scale
        out[cq[b]:cq[b + 1]] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), vs.to(ct)).to(q.dtype)
    return out


def _pad(x, cu, max_len):
    """Packed (total, H, D) -> padded (B, H, max_len, D) and the validity mask (B, max_len)."""
    B = cu.numel() - 1
    lens = (cu[1:] - cu[:-1]).long()
    idx = torch.arange(max_len, device=x.device)
    valid = idx[None, :] < lens[:, None]
    pos = (cu[:-1].long()[:, None] + idx[None, :])[valid]
    out = x.new_zeros(B, max_len, *x.shape[1:])
    out[valid] = x[pos]
    return out.transpose(1, 2), valid


def attention_sdpa_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None):
    """Pad every sequence to the batch maximum and run PyTorch SDPA with a key mask.
    max_seqlen_q/k must bound every sequence (ValueError otherwise: padding to a shorter length
    would drop tokens)."""
    check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    qp, vq = _pad(q, cu_seqlens_q, max_seqlen_q)
    kp, vk = _pad(k, cu_seqlens_k, max_seqlen_k)
    vp, _ = _pad(v, cu_seqlens_k, max_seqlen_k)
    mask = vk[:, None, None, :]  # (B, 1, 1, Lk): True = attend
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
    o = o.transpose(1, 2)[vq]
    empty_k = (cu_seqlens_k[1:] == cu_seqlens_k[:-1]).repeat_interleave(
        (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long(), output_size=q.shape[0])
    return o.masked_fill(empty_k[:, None, None], 0.0)  # an all-masked row is NaN in SDPA; spec says 0


# ---- the csrc kernels: fake (meta) implementations and autograd -------------------------------

def _ops_defined():
    try:
        torch.ops.nvfm.varlen_attn_fwd  # noqa: B018
        torch.ops.nvfm.varlen_attn_bwd  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


_OPS_DEFINED = _ops_defined()  # a constant, so torch.compile does not break the graph on it

if _OPS_DEFINED:
    ops.register("varlen_attn_fwd")
    ops.register("varlen_attn_bwd")

    @torch.library.register_fake("nvfm::varlen_attn_fwd")
    def _fwd_fake(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("nvfm::varlen_attn_bwd")
    def _bwd_fake(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, dlse=None):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def _setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale)
        ctx.set_materialize_grads(False)  # dlse stays None when lse is unused (the usual case)

    def _backward(ctx, dout, dlse):
        # A gradient into lse is folded into the softmax backward (d lse_i / d s_ij = p_ij): the CPU
        # kernel supports it; the CUDA kernels refuse a nonzero one with a clear error.
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale = ctx.args
        if dout is None and dlse is None:
            return None, None, None, None, None, None, None, None
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = torch.ops.nvfm.varlen_attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k,
                                                    max_q, max_k, scale, dlse)
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd("nvfm::varlen_attn_fwd", _backward, setup_context=_setup_context)


def ours_available(q, head_dim=None):
    """True when the compiled kernel can run these inputs (device, dtype, head dim)."""
    if not _OPS_DEFINED or not ops.has_kernel("varlen_attn_fwd", q.device.type):
        return False
    if q.device.type == "cuda":
        return q.dtype in CUDA_DTYPES and (head_dim or q.shape[-1]) in CUDA_HEAD_DIMS
    return q.dtype in CPU_DTYPES  # csrc/attention.cpp check_qkv: float64 is not supported


def attention_ours(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None):
    """The csrc kernel; differentiable with respect to q, k, v."""
    if not ours_available(q):
        why = ("the compiled extension nvfm._C is not loaded" if not _OPS_DEFINED else
               f"no kernel for device {q.device}, dtype {q.dtype}, head_dim {q.shape[-1]} "
               f"(CPU needs {CPU_DTYPES}; CUDA needs {CUDA_DTYPES} and head_dim in {CUDA_HEAD_DIMS})")
        raise RuntimeError(f"varlen attention impl='ours' unavailable: {why}; use impl='sdpa'")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if cu_seqlens_q.dtype != torch.int32 or cu_seqlens_k.dtype != torch.int32:
        # validate before the int32 cast: float offsets would truncate and 2**32 + n wrap to n
        check_cu_seqlens(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    if q.device.type == "cuda":  # the CPU kernel reads strided rows in place (e.g. views of a QKV GEMM)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, _ = torch.ops.nvfm.varlen_attn_fwd(q, k, v,
                                            cu_seqlens_q.to(torch.int32).contiguous(),
                                            cu_seqlens_k.to(torch.int32).contiguous(),
                                            int(max_seqlen_q), int(max_seqlen_k), scale)
    return out


def attention_torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=None):
    """torch.nn.attention.varlen.varlen_attn (PyTorch's FlashAttention varlen, CUDA only)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise RuntimeError(f"impl='torch_varlen' needs torch.nn.attention.varlen (torch >= 2.10); "
                           f"this torch {torch.__version__} lacks it ({e}); use impl='sdpa'") from e
    if q.device.type != "cuda":
        raise RuntimeError(f"impl='torch_varlen' runs on CUDA only (got {q.device}); use impl='ours' or 'sdpa'")
    return varlen_attn(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32),
                       int(max_seqlen_q), int(max_seqlen_k), scale=scale)


def torch_varlen_available(q):
    """True when torch.nn.attention.varlen can run these inputs (CUDA, fp16/bf16)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def resolve_impl(impl, q):
    """The implementation "auto" (or an explicit impl) resolves to for tensors like q."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        # nvfm.ops' rule: our CUDA kernel runs under "auto" only once verified on a GPU
        # (ops.CUDA_VERIFIED); until then PyTorch's varlen path (or padded SDPA) on CUDA.
        if q.is_cuda and not ops.cuda_kernel_trusted("varlen_attn_fwd"):
            return "torch_varlen" if torch_varlen_available(q) else "sdpa"
        return "ours" if ours_available(q) else "sdpa"
    return impl


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, impl="auto", scale=None):
    """Attention within each packed sequence; see the module docstring for shapes and impls."""
    impl = resolve_impl(impl, q)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k)
    if impl == "reference":
        return attention_reference(*args, scale)
    if impl == "ours":
        return attention_ours(*args, max_seqlen_q, max_seqlen_k, scale)
    if impl == "torch_varlen":
        return attention_torch_varlen(*args, max_seqlen_q, max_seqlen_k, scale)
    return attention_sdpa_padded(*args, max_seqlen_q, max_seqlen_k, scale)
