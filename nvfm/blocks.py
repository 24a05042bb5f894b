"""Foreground-masked block sampling for Vol-JEPA (the NeuroVFM paper, Methods: Vol-JEPA): split each volume's
foreground tokens into context and target, for a whole batch packed with cu_seqlens.

The random draws stay in numpy (`draw_blocks`, from the loader worker's seeded Generator: cheap);
the deterministic rest is the operator `block_masks` (PyTorch reference here, C++ CPU kernel
csrc/blocks.cpp, CUDA kernel csrc/blocks_cuda.cu), so every backend gives the same indices.

Operator inputs, B volumes, N = sum n_b foreground tokens, M = sum K_b blocks:
  coords     (N, 3) int32   token grid coordinates of the foreground tokens, volume b at rows
                            cu_seqlens[b]:cu_seqlens[b+1] (any order; "index" below = row in
                            the volume, 0..n_b-1)
  cu_seqlens (B+1,) int32
  centres    (M, 3) int32   block centres (grid coordinates), volume b at rows cu_blocks[b]:cu_blocks[b+1]
  cu_blocks  (B+1,) int32   K_b >= 1 for every volume with n_b > 0
  aspects    (M, 3) float32 per-axis half-size scale of each block, finite and > 0
  keys       (2, N) int32   random keys: [0] breaks distance ties, [1] orders the context dropout
  counts     (B, 3) int32   n_sel (tokens taken by the blocks), sel_is_target (1: the blocks are
                            the target, config "multi"; 0: the blocks are the context, "single"),
                            n_drop (context tokens moved to the target)
Per volume:
  d_i  = min_k max_a float32(|coords_ia - centres_ka|) / aspects_ka   (box norm, IEEE float32 division)
  S    = the n_sel tokens first in the order (d_i, keys[0, i], i)     (blocks grow together)
  ctx0 = S if not sel_is_target else the rest; tgt0 = the complement
  D    = the n_drop tokens of ctx0 first in the order (keys[1, i], i)  (context dropout)
  ctx  = ctx0 - D, tgt = tgt0 + D, each ascending.
Outputs: ctx_index (Nc,) int64, cu_ctx (B+1,) int32, tgt_index (Nt,) int64, cu_tgt (B+1,) int32;
indices are rows of the packed coords (global), so ctx_index[cu_ctx[b]:cu_ctx[b+1]] lie in
[cu_seqlens[b], cu_seqlens[b+1]). Context and target partition each volume's tokens.
Because every order is total (ties broken by key, then index), the split is unique: the
reference and the kernels agree bit for bit, and a seeded draw gives the same masks anywhere.
"""
import numpy as np
import torch

from nvfm import ops

ops.register("block_masks")


def draw_blocks(rng, n, ratio, multi, n_blocks=(2, 4), aspect=2.0, drop=0.2):
    """The random part of one volume's masks (the NeuroVFM paper, Methods: Vol-JEPA), from a numpy Generator.

    n foreground tokens, context ratio `ratio` (0.25 MR / 0.20 CT): n_ctx = round(ratio n),
    clamped to [1, n - 1]; multi (config A): K = n_blocks[0]..n_blocks[1] target blocks holding
    n - n_ctx tokens; else (config B) one context block of n_ctx tokens. Aspects: each axis
    scaled by a log-uniform factor in [1/aspect, aspect]. Dropout: round(drop n_ctx) context
    tokens, at most n_ctx - 1. Returns dict(centre_index (K,) int64 (rows of the volume's
    coords), aspects (K, 3) float32, keys (2, n) int32, counts (3,) int32)."""
    if n < 2:
        raise ValueError(f"block masks need >= 2 foreground tokens, got {n}")
    n_ctx = min(max(int(round(ratio * n)), 1), n - 1)
    K = int(rng.integers(n_blocks[0], n_blocks[1] + 1)) if multi else 1
    centre_index = rng.integers(0, n, K)
    aspects = np.exp(rng.uniform(-np.log(aspect), np.log(aspect), (K, 3))).astype(np.float32)
    keys = rng.integers(0, 2**32, (2, n), dtype=np.uint32).view(np.int32)  # any int32 (uint32 draws are fastest)
    n_drop = min(int(round(drop * n_ctx)), n_ctx - 1)
    counts = np.array([n - n_ctx if multi else n_ctx, int(multi), n_drop], np.int32)
    return dict(centre_index=centre_index, aspects=aspects, keys=keys, counts=counts)


def check_inputs(coords, cu_seqlens, centres, cu_blocks, aspects, keys, counts):
    """Validate shapes, dtypes and counts; raises ValueError naming the volume and the reason."""
    def need(t, name, dtype, shape):
        if not torch.is_tensor(t) or t.dtype != dtype or t.dim() != len(shape) or any(
                s is not None and t.shape[i] != s for i, s in enumerate(shape)):
            raise ValueError(f"block_masks: {name} must be {dtype} of shape {shape}, got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
    B = len(cu_seqlens) - 1 if torch.is_tensor(cu_seqlens) and cu_seqlens.dim() == 1 else -1
    if B < 0:
        raise ValueError("block_masks: cu_seqlens must be a 1-D int32 tensor of B + 1 offsets")
    N = int(cu_seqlens[-1])
    need(coords, "coords", torch.int32, (N, 3))
    need(cu_seqlens, "cu_seqlens", torch.int32, (B + 1,))
    need(cu_blocks, "cu_blocks", torch.int32, (B + 1,))
    M = int(cu_blocks[-1])
    need(centres, "centres", torch.int32, (M, 3))
    need(aspects, "aspects", torch.float32, (M, 3))
    need(keys, "keys", torch.int32, (2, N))
    need(counts, "counts", torch.int32, (B, 3))
    cu, cb, cnt = cu_seqlens.cpu().tolist(), cu_blocks.cpu().tolist(), counts.cpu().tolist()
    if cu[0] != 0 or cb[0] != 0:
        raise ValueError("block_masks: cu_seqlens and cu_blocks must start at 0")
    if M and not bool(torch.isfinite(aspects).all() and (aspects > 0).all()):
        raise ValueError("block_masks: aspects must be finite and > 0")
    for b in range(B):
        n, K = cu[b + 1] - cu[b], cb[b + 1] - cb[b]
        n_sel, sel_target, n_drop = cnt[b]
        if n < 0 or K < 0:
            raise ValueError(f"block_masks: volume {b}: cu_seqlens / cu_blocks must be non-decreasing")
        if n > 0 and K < 1:
            raise ValueError(f"block_masks: volume {b}: {n} tokens but no block")
        if not 0 <= n_sel <= n or sel_target not in (0, 1):
            raise ValueError(f"block_masks: volume {b}: n_sel {n_sel} not in [0, {n}] or sel_is_target "
                             f"{sel_target} not 0/1")
        n_ctx0 = n - n_sel if sel_target else n_sel
        if not 0 <= n_drop <= n_ctx0:
            raise ValueError(f"block_masks: volume {b}: n_drop {n_drop} not in [0, {n_ctx0}] (context size)")


def _order(primary, key):
    """Permutation sorting by (primary, key, index): stable sorts, least significant first."""
    o = torch.sort(key, stable=True).indices
    return o[torch.sort(primary[o], stable=True).indices]


def block_masks_reference(coords, cu_seqlens, centres, cu_blocks, aspects, keys, counts):
    """The specification (module docstring). Returns (ctx_index, cu_ctx, tgt_index, cu_tgt)."""
    check_inputs(coords, cu_seqlens, centres, cu_blocks, aspects, keys, counts)
    dev = coords.device
    coords, centres, aspects, keys = coords.cpu().long(), centres.cpu().long(), aspects.cpu(), keys.cpu()
    cu, cb, cnt = cu_seqlens.cpu().tolist(), cu_blocks.cpu().tolist(), counts.cpu().tolist()
    ctx_all, tgt_all = [], []
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        n_sel, sel_target, n_drop = cnt[b]
        if e == s:
            ctx_all.append(torch.empty(0, dtype=torch.int64))
            tgt_all.append(torch.empty(0, dtype=torch.int64))
            continue
        c, ctr, asp = coords[s:e], centres[cb[b]:cb[b + 1]], aspects[cb[b]:cb[b + 1]]
        d = ((c[None] - ctr[:, None]).abs().float() / asp[:, None]).amax(-1).amin(0)  # (n,)
        sel = torch.zeros(e - s, dtype=torch.bool)
        sel[_order(d, keys[0, s:e])[:n_sel]] = True
        ctx0 = torch.nonzero(sel != bool(sel_target)).flatten()  # ascending
        dropped = ctx0[_order(keys[1, s:e][ctx0], torch.zeros_like(ctx0))[:n_drop]]
        is_ctx = sel != bool(sel_target)
        is_ctx[dropped] = False
        ctx_all.append(torch.nonzero(is_ctx).flatten() + s)
        tgt_all.append(torch.nonzero(~is_ctx).flatten() + s)
    cu_of = lambda xs: torch.tensor([0] + [len(x) for x in xs], dtype=torch.int64).cumsum(0).to(torch.int32)
    cat = lambda xs: torch.cat(xs) if xs else torch.empty(0, dtype=torch.int64)
    return cat(ctx_all).to(dev), cu_of(ctx_all).to(dev), cat(tgt_all).to(dev), cu_of(tgt_all).to(dev)


def block_masks(coords, cu_seqlens, centres, cu_blocks, aspects, keys, counts, impl="auto", check=True):
    """Same contract as block_masks_reference, with the compiled kernel of the inputs' device
    when built. impl: "auto", "kernel" (error if not built) or "reference". check=False skips
    the Python-side validation (the C++ entry points validate again, CPU and CUDA alike)."""
    have = ops.backend("block_masks", coords.device.type) != "reference"
    if impl == "kernel" and not have:
        raise RuntimeError(f"block_masks: no compiled kernel for device {coords.device}")
    if impl == "reference" or not have or (impl == "auto" and ops.auto_backend("block_masks", coords.device) == "reference"):
        return block_masks_reference(coords, cu_seqlens, centres, cu_blocks, aspects, keys, counts)
    if check:
        check_inputs(coords, cu_seqlens, centres, cu_blocks, aspects, keys, counts)
    # the kernels read raw pointers; the reference takes views (a column slice, a strided keys row) as well
    args = (coords, cu_seqlens, centres, cu_blocks, aspects, keys, counts)
    return tuple(torch.ops.nvfm.block_masks(*(t.contiguous() for t in args)))


def pack_draws(coords_list, draws):
    """Pack per-volume numpy coords (n_b, 3) and their draw_blocks dicts into the operator's
    tensors (coords, cu_seqlens, centres, cu_blocks, aspects, keys, counts)."""
    lens = [len(c) for c in coords_list]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    cents = [c[d["centre_index"]] for c, d in zip(coords_list, draws)]
    cb = np.concatenate([[0], np.cumsum([len(x) for x in cents])]).astype(np.int32)
    t = torch.from_numpy
    return (t(np.ascontiguousarray(np.concatenate(coords_list).reshape(-1, 3), np.int32)), t(cu),
            t(np.ascontiguousarray(np.concatenate(cents).reshape(-1, 3), np.int32)), t(cb),
            t(np.ascontiguousarray(np.concatenate([d["aspects"] for d in draws]).reshape(-1, 3), np.float32)),
            t(np.ascontiguousarray(np.concatenate([d["keys"] for d in draws], 1).reshape(2, -1), np.int32)),
            t(np.stack([d["counts"] for d in draws]).reshape(-1, 3).astype(np.int32)))


def sample_block_masks(token_masks, ratios, multi, rng, n_blocks=(2, 4), aspect=2.0, drop=0.2, impl="auto"):
    """Masks for a whole batch from token-level foreground masks (no crop or augmentation: the
    JEPA loader, nvfm/masks.py, does those first). token_masks: list of (gz, gy, gx) bool arrays;
    ratios, multi: per volume. Returns dict(coords (N, 3) int32 of the foreground tokens in
    raster order, cu_seqlens, ctx_index, cu_ctx, tgt_index, cu_tgt) as torch tensors."""
    coords_list = [np.argwhere(np.asarray(m, bool)).astype(np.int32) for m in token_masks]
    draws = [draw_blocks(rng, len(c), r, m, n_blocks, aspect, drop) for c, r, m in zip(coords_list, ratios, multi)]
    packed = pack_draws(coords_list, draws)
    ctx, cu_ctx, tgt, cu_tgt = block_masks(*packed, impl=impl)
    return dict(coords=packed[0], cu_seqlens=packed[1], ctx_index=ctx, cu_ctx=cu_ctx, tgt_index=tgt, cu_tgt=cu_tgt)
