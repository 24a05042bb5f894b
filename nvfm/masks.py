"""Vol-JEPA masking: crop, augment and split one volume's foreground tokens into context and
target; pack a batch. Runs in data-loader workers (nvfm/loader.py): numpy draws + compiled ops.

Per volume (the NeuroVFM paper, Methods "Vol-JEPA"; where the authors' public code differs we
follow the paper):
  1. window: MR -> "mr"; CT -> brain / blood / bone with probability 0.7 / 0.15 / 0.15.
  2. crop: at most `max_patches` = 20 tokens per axis; the crop window is placed uniformly
     among positions that stay inside the foreground's bounding box; a crop holding < 2
     foreground tokens is placed again (8 tries), then drawn among the placements that hold
     >= 2 (crop_box_dense; a volume with none is a ValueError naming it; train_jepa.py leaves
     such volumes out at start, nvfm.loader.train_indices).
  3. augmentation, shared by student and teacher (they see the same tokens): a random axis
     permutation of the token grid and a random flip of each axis. A flip also mirrors the
     voxels inside each patch. A permutation permutes the grid coordinates (patches are
     16 mm cubes, so the grid is isotropic); inside a patch the 4 x 16 x 16 voxel layout is
     kept (it cannot become 16 x 4 x 16 and stay one 1024-vector layout), except that the
     two in-plane patch axes are swapped when the permutation reverses their order.
  4. masks, on the foreground tokens of the crop only (n tokens), n_ctx = round(ratio * n),
     ratio 0.25 MR / 0.20 CT:
       config "multi" (A): K = 2..4 large blocks; target = their union, context = the rest;
       config "single" (B): one small block is the context, the complement is the target.
     A block is an axis-aligned box around a random foreground token with a random aspect
     (each axis side scaled by a log-uniform factor in [1/2, 2]). All blocks grow together
     until the union holds exactly n - n_ctx (A) or n_ctx (B) foreground tokens: token i
     gets the distance d_i = min_k max_a |c_ia - centre_ka| / aspect_ka (a box norm) and the
     tokens with the smallest d are taken (ties by a random key). So the ratios hold exactly
     for every volume and any grid size, with no rejection loop.
  5. context dropout: a random `drop` = 20% of the context tokens (those with the smallest
     random keys) move to the target.
     Expected visible fraction 0.8 x 0.25 = 20% (MR), 16% (CT); the paper observed medians
     18.8% / 15.1%. About 80-84% of tokens are targets.
  Steps 4-5 are the operator nvfm.blocks.block_masks (C++ / CUDA kernels, PyTorch reference);
  the random draws come from the worker's Generator (nvfm.blocks.draw_blocks). The token
  gather of step 2-3 is the compiled nvfm.gather kernel writing uint8 (see GATHER).
Each batch mixes configs A and B equally: the config follows the parity of the sample's
slot in the global batch.
"""
import os
import warnings

import numpy as np
import torch

from nvfm import ops
from nvfm.blocks import block_masks, draw_blocks
from nvfm.tokenize import PATCH

WINDOW_INDEX = {"mr": 0, "brain": 1, "blood": 2, "bone": 3}  # = nvfm.model.WINDOWS order
CT_WINDOW_NAMES = ("brain", "blood", "bone")


class MaskConfig:
    """Masking hyper-parameters (defaults = the paper)."""

    def __init__(self, ratio_mr=0.25, ratio_ct=0.20, drop=0.20, max_patches=20, ct_window_probs=(0.7, 0.15, 0.15),
                 n_blocks=(2, 4), aspect=2.0, permute=True, flip=True):
        self.ratio_mr, self.ratio_ct, self.drop, self.max_patches = ratio_mr, ratio_ct, drop, max_patches
        self.ct_window_probs = tuple(ct_window_probs)
        self.n_blocks, self.aspect, self.permute, self.flip = tuple(n_blocks), aspect, permute, flip
        if len(self.ct_window_probs) != 3 or not all(0 <= p <= 1 for p in self.ct_window_probs) \
                or abs(sum(self.ct_window_probs) - 1) > 1e-6:
            raise ValueError(f"mask config: ct_window_probs must be 3 probabilities (brain, blood, bone) summing to 1, "
                             f"got {ct_window_probs}")
        # these failed only in a data-loader worker, at the first draw (numpy's "low >= high", a block-less
        # volume in block_masks, an OverflowError for a non-positive aspect), or never (2.5 blocks)
        lo_k, hi_k = self.n_blocks if len(self.n_blocks) == 2 else (None, None)
        if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in (lo_k, hi_k)) \
                or not 1 <= lo_k <= hi_k:
            raise ValueError(f"mask config: n_blocks (the fewest and most target blocks) must be integers "
                             f"1 <= lo <= hi, got {n_blocks}")
        if not (np.isfinite(aspect) and aspect >= 1):
            raise ValueError(f"mask config: aspect (the largest side scale of a block) must be finite and >= 1, "
                             f"got {aspect}")
        # out of range, draw_blocks would clamp the counts silently (ratio 1.5: one target token; drop 1: one context token)
        for name, v in (("ratio_mr", ratio_mr), ("ratio_ct", ratio_ct)):
            if not 0 < v < 1:
                raise ValueError(f"mask config: {name} (the context's share of the tokens) must be in (0, 1), got {v}")
        if not 0 <= drop < 1:
            raise ValueError(f"mask config: drop (the context dropout) must be in [0, 1), got {drop}")
        if int(max_patches) != max_patches or max_patches < 2:  # a 1-token crop never holds the 2 tokens a split needs
            raise ValueError(f"mask config: max_patches (crop tokens per axis) must be an integer >= 2, got {max_patches}")


def token_mask_of(reader, i):
    """(gz, gy, gx) bool token foreground of volume i (precomputed in the shard manifest)."""
    if hasattr(reader, "token_mask"):
        return reader.token_mask(i)
    from nvfm.tokenize import token_foreground
    return token_foreground(torch.from_numpy(np.ascontiguousarray(reader.volume(i)[1]))).numpy()


def foreground_bounds(tmask):
    """Bounding box of the foreground tokens: tmask (gz, gy, gx) bool -> (f0 (3,), f1 (3,)) int64, f1 exclusive."""
    f0, f1 = np.zeros(3, np.int64), np.zeros(3, np.int64)
    for a in range(3):
        nz = np.flatnonzero(tmask.any(axis=tuple(b for b in range(3) if b != a)))
        f0[a], f1[a] = nz[0], nz[-1] + 1
    return f0, f1


def crop_box(tmask, max_patches, rng):
    """Crop start/stop per axis (token units): <= max_patches per axis, inside the foreground
    bounding box, position uniform. tmask (gz, gy, gx) bool -> (lo (3,), hi (3,))."""
    lo, hi = np.zeros(3, np.int64), np.zeros(3, np.int64)
    b0, b1 = foreground_bounds(tmask)
    for a in range(3):
        f0, f1 = int(b0[a]), int(b1[a])
        if f1 - f0 <= max_patches:
            lo[a] = f0
            hi[a] = f0 + min(max_patches, f1 - f0)
        else:
            lo[a] = f0 + int(rng.integers(0, f1 - f0 - max_patches + 1))
            hi[a] = lo[a] + max_patches
    return lo, hi


def crop_box_dense(tmask, max_patches, rng):
    """crop_box's fallback for a scattered foreground, where random placements keep missing it:
    a placement uniform among those crop_box can make (inside the foreground bounding box,
    min(max_patches, extent) per axis) that hold >= 2 foreground tokens, every
    placement counted at once with a summed-volume table. -> (lo (3,), hi (3,)), or None
    when none does."""
    f0, f1 = foreground_bounds(tmask)
    size = np.minimum(max_patches, f1 - f0)
    S = np.zeros(tuple(n + 1 for n in tmask.shape), np.int64)
    S[1:, 1:, 1:] = tmask.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    z0, y0, x0 = np.ix_(*(np.arange(f0[a], f1[a] - size[a] + 1) for a in range(3)))
    z1, y1, x1 = z0 + size[0], y0 + size[1], x0 + size[2]
    count = (S[z1, y1, x1] - S[z0, y1, x1] - S[z1, y0, x1] - S[z1, y1, x0]
             + S[z0, y0, x1] + S[z0, y1, x0] + S[z1, y0, x0] - S[z0, y0, x0])
    ok = np.flatnonzero(count >= 2)
    if len(ok) == 0:
        return None
    lo = f0 + np.array(np.unravel_index(ok[int(rng.integers(len(ok)))], count.shape), np.int64)
    return lo, lo + size


def crop_tokens(data, modality, window, lo, hi, coords, flips, swap_inplane):
    """Gather the foreground patches of a crop, flipped, in one copy.

    data (C, D, H, W) uint8 shard channels; lo, hi (3,) crop in token units; coords (n, 3)
    crop-relative token coords; flips (3,) bool: mirror the crop along z, y, x (the token
    grid and the voxels inside each patch); swap_inplane: transpose each patch's 16 x 16
    plane. -> tokens (n, 1024) uint8, coords (n, 3) int32 in the flipped crop grid.
    The window is expanded on the crop only (4-bit CT windows cost a pass over the voxels)."""
    from nvfm.data import expand_window
    pd, ph, pw = PATCH
    v0, v1 = lo * np.array(PATCH), hi * np.array(PATCH)
    crop = expand_window(data[:, v0[0]:v1[0], v0[1]:v1[1], v0[2]:v1[2]], modality, window)
    want = tuple(int(x) for x in (hi - lo) * np.array(PATCH))
    if crop.shape != want:  # partial patches at the far end: zero padding (background)
        padded = np.zeros(want, np.uint8)
        padded[:crop.shape[0], :crop.shape[1], :crop.shape[2]] = crop
        crop = padded
    extent = hi - lo
    coords = coords.copy()
    for a in range(3):
        if flips[a]:  # mirroring the whole patch-aligned crop mirrors grid and patch together
            coords[:, a] = extent[a] - 1 - coords[:, a]
    crop = crop[::-1 if flips[0] else 1, ::-1 if flips[1] else 1, ::-1 if flips[2] else 1]
    gz, gy, gx = extent.tolist()
    blocks = crop.reshape(gz, pd, gy, ph, gx, pw)
    if swap_inplane:
        blocks = blocks.swapaxes(3, 5)
    tokens = blocks[coords[:, 0], :, coords[:, 1], :, coords[:, 2], :]  # (n, pd, ph|pw, pw|ph)
    return tokens.reshape(len(coords), -1), coords


def crop_tokens_rows(data, modality, window, lo, hi, coords, flips, swap_inplane):
    """crop_tokens, bit for bit, ~1.5x faster: one np.take of 16-voxel x-rows (16 bytes each, 64
    per token) straight from the stored channel, then the x flip / plane transpose on the gathered
    tokens only (z and y flips are folded into the row order), and the 4-bit CT windows expanded
    on the tokens instead of the crop. Zero padding is level 0 in every window, so expanding after
    the gather changes nothing. Same arguments and returns. The plane transpose (half of the
    permutations) is the dominant remaining cost.
    No crop copy unless the crop runs past the volume or W is not a multiple of 16."""
    from nvfm.data import expand_window
    pd, ph, pw = PATCH
    expand_window(data[:, :0], modality, window)  # empty: only checks modality and window
    ch = data[0 if window in ("mr", "brain") else 1]
    v0, v1 = lo * np.array(PATCH), hi * np.array(PATCH)
    if (v1 <= ch.shape).all() and ch.shape[2] % pw == 0 and ch.flags.c_contiguous:
        src, org = ch, v0  # rows straight from the volume
    else:  # crop past the far end (zero padding) or unaligned rows: copy the crop once
        src, org = np.zeros(tuple(int(x) for x in v1 - v0), np.uint8), np.zeros(3, np.int64)
        part = ch[v0[0]:v1[0], v0[1]:v1[1], v0[2]:v1[2]]
        src[:part.shape[0], :part.shape[1], :part.shape[2]] = part
    D, H, W = src.shape
    c, nx = coords.astype(np.int64), W // pw
    dz, dy = np.arange(pd)[::-1 if flips[0] else 1], np.arange(ph)[::-1 if flips[1] else 1]
    off = ((dz[:, None] * H + dy[None, :]) * nx).reshape(-1)  # (pd * ph,) row offsets inside a token
    base = ((org[0] + c[:, 0] * pd) * H + org[1] + c[:, 1] * ph) * nx + (org[2] // pw + c[:, 2])  # (n,)
    rows = src.reshape(-1).view(np.complex128)  # 16-byte items: np.take copies them natively
    tok = np.take(rows, (base[:, None] + off[None, :]).reshape(-1)).view(np.uint8).reshape(len(c), pd, ph, pw)
    if swap_inplane:  # (n, pd, y, x) -> (n, pd, x, y), x mirrored when flips[2]
        tok = np.ascontiguousarray((tok[..., ::-1] if flips[2] else tok).swapaxes(2, 3))
    elif flips[2]:  # torch.flip is vectorised, numpy's reversed-stride copy is not
        tok = torch.from_numpy(tok).flip(-1).numpy()
    tokens = tok.reshape(len(c), -1)
    if window == "blood":
        tokens = (tokens >> 4) * np.uint8(17)
    elif window == "bone":
        tokens = (tokens & np.uint8(15)) * np.uint8(17)
    extent = hi - lo
    coords = coords.copy()
    for a in range(3):
        if flips[a]:
            coords[:, a] = extent[a] - 1 - coords[:, a]
    return tokens, coords


# Patch gather of sample_volume, all bit-identical: "compiled" (default: the C++ kernel
# torch.ops.nvfm.gather_tokens writing uint8 window levels in one pass; falls back to "rows"
# when nvfm._C is not built), "rows" (crop_tokens_rows, the fastest numpy path), "numpy"
# (crop_tokens, the plain strided gather; the reference).
GATHER = os.environ.get("NVFM_MASK_GATHER", "compiled")
_NO_TABLE = torch.empty(0)  # the uint8 gather needs no normalisation table


def use_compiled_gather():
    """True when crop_tokens_compiled can run (nvfm._C built with the CPU gather kernel).
    NVFM_OPS=reference forces the numpy path (see nvfm/ops.py; its kernel lookup is memoized,
    ~1 us per call)."""
    return ops.backend("gather_tokens", "cpu") == "cpp"


def crop_tokens_compiled(data, window, lo, hi, coords, flips, perm):
    """crop_tokens followed by coords[:, perm], in one pass of the compiled kernel
    (torch.ops.nvfm.gather_tokens, nvfm/gather.py: patch_perm = masks_patch_perm(perm)).
    Same arguments as crop_tokens (modality is implied by the window) plus perm (3,);
    returns tokens (n, 1024) uint8 (bit-identical to crop_tokens) and coords (n, 3) int32 in
    the augmented (flipped, then permuted) crop grid. lo, hi must lie in the token grid."""
    extent = (hi - lo).astype(np.int32)
    perm = np.asarray(perm)
    coords = coords[:, perm].astype(np.int32)  # flip then permute = permute then flip the permuted axes
    flip_out = np.asarray(flips, bool)[perm]
    coords = np.ascontiguousarray(np.where(flip_out, extent[perm] - 1 - coords, coords), np.int32)
    patch_perm = (0, 2, 1) if int(np.argmax(perm == 1)) > int(np.argmax(perm == 2)) else (0, 1, 2)  # masks_patch_perm
    # GatherSpec row: crop_start 3, crop_size 3, perm 3, flip per output axis 3, window, patch_perm 3
    params = np.concatenate([lo, extent, perm, flip_out, [WINDOW_INDEX[window]], patch_perm]).astype(np.int32)[None]
    if data.flags.writeable:
        vol = torch.from_numpy(data)
    else:  # read-only shard memmap: the kernel only reads it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            vol = torch.from_numpy(data)
    c, cu = torch.from_numpy(coords), torch.from_numpy(np.array([0, len(coords)], np.int32))
    out = torch.ops.nvfm.gather_tokens([vol.contiguous()], c, cu, torch.from_numpy(params), _NO_TABLE, list(PATCH),
                                       torch.uint8)
    return out.numpy(), coords


def sample_augmentation(rng, permute=True, flip=True):
    """Random axis permutation perm (new axis k = old axis perm[k]), flips (3,) bool of the
    old axes, and whether the patch plane must be transposed (the in-plane axes y, x swap
    order under perm)."""
    flips = rng.integers(0, 2, 3).astype(bool) if flip else np.zeros(3, bool)
    perm = rng.permutation(3) if permute else np.arange(3)
    swap = bool(np.argmax(perm == 1) > np.argmax(perm == 2))
    return perm, flips, swap


def block_distance(coords, centres, aspects):
    """Box-norm distance of every token to the nearest block: coords (n, 3), centres (K, 3),
    aspects (K, 3) -> (n,) float32 = min_k max_a |c_a - centre_ka| / aspect_ka."""
    d = np.abs(coords[None, :, :].astype(np.float32) - centres[:, None, :].astype(np.float32))
    return (d / aspects[:, None, :]).max(-1).min(0)


def split_context_target(coords, ratio, config_multi, rng, cfg):
    """Indices (ctx, tgt) into coords (n, 3), each ascending int64: see the module docstring,
    steps 4 and 5. The draws come from rng (nvfm.blocks.draw_blocks); the split is the
    operator nvfm.blocks.block_masks (C++ kernel when built, identical PyTorch reference else)."""
    n = len(coords)
    draw = draw_blocks(rng, n, ratio, config_multi, cfg.n_blocks, cfg.aspect, cfg.drop)
    c = np.ascontiguousarray(coords, np.int32)
    t = torch.from_numpy
    ctx, _, tgt, _ = block_masks(t(c), t(np.array([0, n], np.int32)), t(c[draw["centre_index"]]),
                                 t(np.array([0, len(draw["centre_index"])], np.int32)), t(draw["aspects"]),
                                 t(draw["keys"]), t(draw["counts"][None]), check=False)  # the kernel checks
    return ctx.numpy(), tgt.numpy()


def choose_window(modality, rng, cfg):
    """Training window: MR -> "mr"; CT -> brain / blood / bone with cfg.ct_window_probs."""
    if modality == "CT":
        u, p = rng.random(), cfg.ct_window_probs
        return "brain" if u < p[0] else "blood" if u < p[0] + p[1] else "bone"
    if modality == "MR":
        return "mr"
    raise ValueError(f"unknown modality {modality!r}")


def sample_volume(reader, i, rng, cfg, config_multi, gather=None):
    """One training sample of volume i (gather: patch gather implementation, see GATHER; all
    give identical outputs). Returns dict(tokens (n, 1024) uint8, coords (n, 3)
    int32 (augmented, crop-relative), ctx (n_ctx,) int64, tgt (n_tgt,) int64 indices into
    tokens, window int (WINDOW_INDEX), volume int, and for inspection config ("multi" |
    "single"), crop (lo, hi) in tokens, perm, flips)."""
    rec = reader.volumes[i]
    modality = rec["modality"]
    window = choose_window(modality, rng, cfg)
    ratio = cfg.ratio_ct if modality == "CT" else cfg.ratio_mr
    tmask = token_mask_of(reader, i)
    if tmask.sum() < 2:
        raise ValueError(f"volume {rec.get('volume_id')}: fewer than 2 foreground tokens, cannot mask")
    for _ in range(8):  # a crop of an oddly shaped foreground can catch < 2 tokens: place it again
        lo, hi = crop_box(tmask, cfg.max_patches, rng)
        coords = np.argwhere(tmask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]).astype(np.int32)
        if len(coords) >= 2:
            break
    else:  # a scattered foreground: pick among the placements that do hold 2 tokens (none: the error)
        box = crop_box_dense(tmask, cfg.max_patches, rng)
        if box is None:
            raise ValueError(f"volume {rec.get('volume_id')}: no crop of <= {cfg.max_patches} tokens per axis "
                             f"holds >= 2 foreground tokens")
        lo, hi = box
        coords = np.argwhere(tmask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]).astype(np.int32)
    data, _ = reader.volume(i)
    perm, flips, swap = sample_augmentation(rng, cfg.permute, cfg.flip)
    gather = gather or GATHER
    if gather == "compiled" and use_compiled_gather():
        tokens, coords = crop_tokens_compiled(data, window, lo, hi, coords, flips, perm)
    else:
        crop = crop_tokens if gather == "numpy" else crop_tokens_rows
        tokens, coords = crop(data, modality, window, lo, hi, coords, flips, swap)
        coords = np.ascontiguousarray(coords[:, perm])
    ctx, tgt = split_context_target(coords, ratio, config_multi, rng, cfg)
    return dict(tokens=tokens, coords=coords, ctx=ctx, tgt=tgt, window=WINDOW_INDEX[window], volume=i,
                config="multi" if config_multi else "single", crop=(lo, hi), perm=perm, flips=flips)


def collate(samples):
    """Pack samples into one batch of torch tensors (CPU):
      tokens (N, 1024) uint8, coords (N, 3) int32, cu_seqlens (B+1,) int32, max_seqlen int,
      window (N,) int64 (per token, for normalisation),
      ctx_index (Nc,) int64 / tgt_index (Nt,) int64 into the packed tokens,
      cu_ctx, cu_tgt (B+1,) int32, max_ctx, max_tgt,
      pred_ctx_pos, pred_tgt_pos, pred_cu, pred_max: the predictor's layout (see
      nvfm.model.predictor_layout), volumes (B,) int64.
    The student encodes tokens[ctx_index], the teacher all tokens; targets are
    teacher_out[tgt_index]."""
    lens = np.array([len(s["tokens"]) for s in samples], np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)])
    ctx_index = np.concatenate([s["ctx"] + o for s, o in zip(samples, starts)])
    tgt_index = np.concatenate([s["tgt"] + o for s, o in zip(samples, starts)])
    n_ctx = np.array([len(s["ctx"]) for s in samples], np.int64)
    n_tgt = np.array([len(s["tgt"]) for s in samples], np.int64)
    cu_pred = np.concatenate([[0], np.cumsum(n_ctx + n_tgt)])
    b_ctx, b_tgt = np.repeat(np.arange(len(samples)), n_ctx), np.repeat(np.arange(len(samples)), n_tgt)
    cu_ctx, cu_tgt = np.concatenate([[0], np.cumsum(n_ctx)]), np.concatenate([[0], np.cumsum(n_tgt)])
    pred_ctx_pos = cu_pred[b_ctx] + np.arange(len(b_ctx)) - cu_ctx[b_ctx]
    pred_tgt_pos = cu_pred[b_tgt] + n_ctx[b_tgt] + np.arange(len(b_tgt)) - cu_tgt[b_tgt]
    t = torch.from_numpy
    return dict(
        tokens=t(np.concatenate([s["tokens"] for s in samples])),
        coords=t(np.concatenate([s["coords"] for s in samples])),
        cu_seqlens=t(starts.astype(np.int32)), max_seqlen=int(lens.max()),
        window=t(np.repeat(np.array([s["window"] for s in samples], np.int64), lens)),
        ctx_index=t(ctx_index.astype(np.int64)), tgt_index=t(tgt_index.astype(np.int64)),
        cu_ctx=t(cu_ctx.astype(np.int32)), cu_tgt=t(cu_tgt.astype(np.int32)),
        max_ctx=int(n_ctx.max()), max_tgt=int(n_tgt.max()),
        pred_ctx_pos=t(pred_ctx_pos.astype(np.int64)), pred_tgt_pos=t(pred_tgt_pos.astype(np.int64)),
        pred_cu=t(cu_pred.astype(np.int32)), pred_max=int((n_ctx + n_tgt).max()),
        volumes=t(np.array([s["volume"] for s in samples], np.int64)),
    )
