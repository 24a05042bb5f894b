"""Varlen attention over packed sequences (FlashAttention varlen interface).

q: (total_q, heads, head_dim), k, v: (total_k, heads, head_dim); cu_seqlens_q/k int32 (B+1);
sequence b attends only within itself: queries cu_q[b]:cu_q[b+1] to keys cu_k[b]:cu_k[b+1].
Non-causal (a volume's tokens all see each other). Returns (total_q, heads, head_dim).

impl: "reference" (plain PyTorch, the specification), "sdpa" (pad to the longest sequence and
call scaled_dot_product_attention with a key-padding mask), "ours" (the csrc kernel, when
built), "torch_varlen" (torch.nn.attention.varlen when this torch has it), "auto".
"""
import torch
import torch.nn.functional as F

IMPLS = ("auto", "ours", "sdpa", "torch_varlen", "reference")


def attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=None):
    """Per-sequence softmax(q k^T * scale) v, computed in float32; the specification."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]]
        s = torch.einsum("qhd,khd->hqk", qs.float(), ks.float()) * scale
        p = torch.softmax(s, dim=-1) if ks.shape[0] > 0 else torch.zeros_like(s)
        out[cq[b]:cq[b + 1]] = torch.einsum("hqk,khd->qhd", p, vs.float()).to(q.dtype)
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
    """Pad every sequence to the batch maximum and run PyTorch SDPA with a key mask."""
    qp, vq = _pad(q, cu_seqlens_q, max_seqlen_q)
    kp, vk = _pad(k, cu_seqlens_k, max_seqlen_k)
    vp, _ = _pad(v, cu_seqlens_k, max_seqlen_k)
    mask = vk[:, None, None, :]  # (B, 1, 1, Lk): True = attend
    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)[vq]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, impl="auto", scale=None):
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)
    if impl in ("sdpa", "auto"):
        return attention_sdpa_padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    raise NotImplementedError(f"attention impl {impl!r} is not available yet")
