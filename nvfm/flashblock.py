"""FlashBlock: the pre-norm ViT block over packed tokens with the operators fused where it pays.

    x = x + proj(attn(qkv(LN1 x)));  x = x + fc2(gelu(fc1(LN2 x)))      x: (N, dim) packed tokens

Same parameters (names and shapes) and the same architecture options (gelu_approximate, ln_eps,
proj_bias; see nvfm/model.py) as nvfm.model.Block, so a trained Block's state dict loads into a
FlashBlock built with the same options unchanged and the two are interchangeable. What is fused, and why:
  - one QKV GEMM; q, k, v are strided views of its (N, 3 * dim) output handed to varlen
    attention without copies (the CPU kernel reads any row stride);
  - output projection + residual as one addmm (bias + a W^T) and one in-place add, so no
    separate (N, dim) projection output stays alive beside the residual stream;
  - inference (no autograd): residual adds in place and the MLP runs over chunks of
    `mlp_chunk` tokens, so the (N, 4 * dim) hidden activation, the largest tensor of the
    block, never exists in full. This is where the paper's lower peak inference memory comes
    from; in training the hidden activations must be saved for the backward anyway.
  - LN + linear and GELU fuse under torch.compile (the module is compile-clean).
UnfusedBlock is the plain reference (separate ops, padded SDPA attention) used by the tests
and the benchmark.
"""
import torch
import torch.nn.functional as F

from nvfm.attention import varlen_attention
from nvfm.model import Block


class UnfusedBlock(Block):
    """The textbook block: every operator separate, attention via padded SDPA."""

    def __init__(self, dim, heads, mlp_ratio=4.0, attn_impl="sdpa", gelu_approximate="tanh", ln_eps=1e-6,
                 proj_bias=False):
        # the parameters are nvfm.model.Block's, by construction
        super().__init__(dim, heads, mlp_ratio, gelu_approximate, ln_eps, proj_bias)
        self.attn_impl = attn_impl

    def forward(self, x, cu_seqlens, max_seqlen):
        N, C = x.shape
        qkv = self.qkv(self.norm1(x)).view(N, 3, self.heads, C // self.heads)
        q, k, v = (qkv[:, i].contiguous() for i in range(3))
        a = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, impl=self.attn_impl)
        x = x + self.proj(a.reshape(N, C))
        h = self.fc1(self.norm2(x))
        h = F.gelu(h, approximate=self.gelu_approximate)
        return x + self.fc2(h)


class FlashBlock(UnfusedBlock):
    """Drop-in replacement for UnfusedBlock / nvfm.model.Block with fused operators."""

    def __init__(self, dim, heads, mlp_ratio=4.0, attn_impl="auto", mlp_chunk=4096, gelu_approximate="tanh",
                 ln_eps=1e-6, proj_bias=False):
        super().__init__(dim, heads, mlp_ratio, attn_impl, gelu_approximate, ln_eps, proj_bias)
        self.mlp_chunk = mlp_chunk

    def _attn(self, x, cu_seqlens, max_seqlen):
        N, C = x.shape
        qkv = F.linear(self.norm1(x), self.qkv.weight, self.qkv.bias).view(N, 3, self.heads, C // self.heads)
        q, k, v = qkv.unbind(1)  # strided views, no copies
        return varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                impl=self.attn_impl).reshape(N, C)

    def _mlp(self, h):
        h = F.gelu(F.linear(h, self.fc1.weight, self.fc1.bias), approximate=self.gelu_approximate)
        return F.linear(h, self.fc2.weight, self.fc2.bias)

    def forward(self, x, cu_seqlens, max_seqlen):
        a = self._attn(x, cu_seqlens, max_seqlen)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            if self.proj.bias is None:
                x = torch.addmm(x, a, self.proj.weight.t())  # proj + residual
            else:
                x = torch.addmm(self.proj.bias, a, self.proj.weight.t()).add_(x)
            return x + self._mlp(self.norm2(x))
        # inference: residual stream updated in place, MLP over token chunks
        x = torch.addmm(x, a, self.proj.weight.t())
        if self.proj.bias is not None:
            x.add_(self.proj.bias)
        del a
        for s in range(0, x.shape[0], self.mlp_chunk):
            xs = x[s:s + self.mlp_chunk]
            xs.add_(self._mlp(self.norm2(xs)))
        return x
