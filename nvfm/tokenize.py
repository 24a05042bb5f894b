"""3D patch tokenization: volumes -> packed token sequences, and back.

A patch is PATCH = (4, 16, 16) voxels along (D, H, W) = 1024 values; D is the 4 mm
acquisition axis, so a patch covers 16 x 16 x 16 mm. Volumes whose sides are not multiples
of the patch are zero-padded at the far end of each axis (index D, H, W upward); padded
voxels are background. The token grid of a (D, H, W) volume is
(ceil(D/4), ceil(H/16), ceil(W/16)).

A patch becomes a token when its foreground fraction (foreground voxels / 1024, padding
counted as background) is >= min_fg_fraction. Default 0.5: the authors' code keeps only
fully-foreground patches (1.0), which drops the whole outer rim of the head, where skull
fractures, scalp swelling and extra-axial blood are seen; 0.5 keeps those while still
dropping patches that are mostly air. Pass 1.0 to reproduce the reference rule.

Batch format (FlashAttention varlen): tokens (N, 1024) uint8 packed volume after volume,
coords (N, 3) int32 grid (z, y, x) in row-major order within each volume, and cu_seqlens
int32 (B + 1,) with cu_seqlens[0] = 0 and cu_seqlens[b + 1] - cu_seqlens[b] = tokens of
volume b.

The reference functions below are the specification; `patchify` and `unpatchify` dispatch
to the C++/CUDA kernels in csrc/patchify* when they are built (see nvfm/ops.py).
"""
import math

import torch

from nvfm import ops

PATCH = (4, 16, 16)
DEFAULT_MIN_FG_FRACTION = 0.5


def token_grid(shape, patch=PATCH):
    """(D, H, W) -> number of patches per axis, padding partial patches."""
    return tuple(-(-int(s) // p) for s, p in zip(shape, patch))


def min_fg_voxels(min_fg_fraction, patch=PATCH):
    """The integer voxel count a patch needs; one rounding rule shared by every backend."""
    if not 0.0 <= min_fg_fraction <= 1.0:
        raise ValueError(f"min_fg_fraction must be in [0, 1], got {min_fg_fraction}")
    return int(math.ceil(min_fg_fraction * math.prod(patch) - 1e-9))


def _pad_to_grid(x, patch):
    D, H, W = x.shape
    gz, gy, gx = token_grid(x.shape, patch)
    pad = (0, gx * patch[2] - W, 0, gy * patch[1] - H, 0, gz * patch[0] - D)
    return torch.nn.functional.pad(x, pad), (gz, gy, gx)


def _blocks(x, patch):
    """(D, H, W) padded -> (gz, gy, gx, pd*ph*pw) view-reshape of the patches."""
    pd, ph, pw = patch
    gz, gy, gx = x.shape[0] // pd, x.shape[1] // ph, x.shape[2] // pw
    return x.reshape(gz, pd, gy, ph, gx, pw).permute(0, 2, 4, 1, 3, 5).reshape(gz, gy, gx, pd * ph * pw)


def token_fg_count_reference(mask, patch=PATCH):
    """Foreground voxels per patch: mask (D, H, W) bool/uint8 -> (gz, gy, gx) int32."""
    m, _ = _pad_to_grid((mask != 0).to(torch.int32), patch)
    return _blocks(m, patch).sum(-1, dtype=torch.int32)


def token_foreground(mask, min_fg_fraction=DEFAULT_MIN_FG_FRACTION, patch=PATCH):
    """Token-level foreground mask (gz, gy, gx) bool of a voxel mask (D, H, W)."""
    mask = torch.as_tensor(mask)
    return token_fg_count_reference(mask, patch) >= min_fg_voxels(min_fg_fraction, patch)


def patchify_reference(volumes, masks, min_fg_fraction=DEFAULT_MIN_FG_FRACTION, patch=PATCH):
    """Pack the foreground tokens of a list of volumes.

    volumes: list of (D_b, H_b, W_b) uint8 tensors; masks: same shapes, bool/uint8 (nonzero =
    foreground). Returns tokens (N, prod(patch)) uint8, coords (N, 3) int32, cu_seqlens int32.
    """
    need = min_fg_voxels(min_fg_fraction, patch)
    toks, coords, lens = [], [], [0]
    for vol, mask in zip(volumes, masks, strict=True):
        if vol.shape != mask.shape or vol.dim() != 3:
            raise ValueError(f"volume {tuple(vol.shape)} and mask {tuple(mask.shape)} must be equal 3D shapes")
        keep = token_fg_count_reference(mask, patch) >= need
        zyx = keep.nonzero().to(torch.int32)
        v, _ = _pad_to_grid(vol, patch)
        toks.append(_blocks(v, patch)[keep])
        coords.append(zyx)
        lens.append(len(zyx))
    cu = torch.tensor(lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    n = math.prod(patch)
    tokens = torch.cat(toks) if toks else torch.empty(0, n, dtype=torch.uint8)
    return tokens, (torch.cat(coords) if coords else torch.empty(0, 3, dtype=torch.int32)), cu


def check_unpatchify_coords(coords, shape, patch=PATCH):
    """Raise unless coords (n, 3) are integers inside the token grid of `shape`, one per grid cell:
    ValueError for a float/bool dtype (it would truncate) or two coordinates on one cell (which
    token lands there is undefined), IndexError naming the first coordinate outside."""
    if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
        raise ValueError(f"unpatchify: coords must be an integer tensor, got {coords.dtype}")
    if coords.dim() != 2 or coords.shape[-1] != 3 or not coords.numel():
        return  # shape errors are the caller's indexing / the kernel's check
    grid = torch.tensor(token_grid(shape, patch), device=coords.device)
    bad = ((coords < 0) | (coords >= grid)).any(-1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"unpatchify: coordinate {i} {coords[i].tolist()} outside the token grid "
                         f"{tuple(grid.tolist())}")
    # two tokens at one cell: which one lands there is undefined (the last here, a race on CUDA)
    cell = (coords[:, 0].long() * int(grid[1]) + coords[:, 1].long()) * int(grid[2]) + coords[:, 2].long()
    _, inv, counts = torch.unique(cell, return_inverse=True, return_counts=True)
    shared = (counts[inv] > 1).nonzero()[:, 0]   # ascending: the first token on a shared cell, then the others
    if len(shared):
        i = int(shared[0])
        j = int(shared[1:][inv[shared[1:]] == inv[i]][0])
        raise ValueError(f"unpatchify: coordinates {i} and {j} are both {coords[i].tolist()}: one token per grid cell")


def unpatchify_reference(tokens, coords, shape, patch=PATCH):
    """Inverse of patchify for one volume: scatter tokens (n, P) at coords (n, 3) into a
    zero volume of `shape` (D, H, W); padding beyond `shape` is cropped away."""
    check_unpatchify_coords(coords, shape, patch)  # a negative index would wrap to the far end
    gz, gy, gx = token_grid(shape, patch)
    pd, ph, pw = patch
    if tuple(tokens.shape) != (len(coords), pd * ph * pw):  # one token would broadcast to every coord
        raise ValueError(f"unpatchify: tokens {tuple(tokens.shape)} must be (n, {pd * ph * pw}) "
                         f"for {len(coords)} coords")
    grid = torch.zeros(gz, gy, gx, pd * ph * pw, dtype=tokens.dtype, device=tokens.device)
    c = coords.long()
    grid[c[:, 0], c[:, 1], c[:, 2]] = tokens
    vol = grid.reshape(gz, gy, gx, pd, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(gz * pd, gy * ph, gx * pw)
    return vol[: shape[0], : shape[1], : shape[2]].contiguous()


def patchify(volumes, masks, min_fg_fraction=DEFAULT_MIN_FG_FRACTION, patch=PATCH, impl="auto"):
    """Same contract as patchify_reference; uses the compiled kernel when available.

    impl: "auto" (kernel if built, else reference), "kernel" (error if not built), "reference".
    """
    volumes = [torch.as_tensor(v) for v in volumes]
    masks = [torch.as_tensor(m) for m in masks]
    # nonzero = foreground, as the reference counts it (a plain uint8 cast maps 0.5 or 256 to 0)
    masks = [m if m.dtype == torch.uint8 else (m != 0).to(torch.uint8) for m in masks]
    if not volumes:  # an empty batch: the op has no tensor to dispatch on; the result is fixed
        return patchify_reference(volumes, masks, min_fg_fraction, patch)
    device = volumes[0].device
    use_kernel = impl == "kernel" or (impl == "auto" and ops.auto_backend("patchify", device) != "reference")
    if use_kernel:
        if ops.backend("patchify", device) == "reference":
            raise RuntimeError(f"patchify: no compiled kernel for device {device}")
        return torch.ops.nvfm.patchify([v.contiguous() for v in volumes], [m.contiguous() for m in masks],
                                       min_fg_voxels(min_fg_fraction, patch), list(patch))
    return patchify_reference(volumes, masks, min_fg_fraction, patch)


def unpatchify(tokens, coords, shape, patch=PATCH, impl="auto"):
    """Same contract as unpatchify_reference; uses the compiled kernel when available."""
    use_kernel = impl == "kernel" or (impl == "auto" and ops.auto_backend("unpatchify", tokens.device) != "reference")
    if use_kernel:
        if coords.dtype != torch.int32:
            # check before the int32 cast: 2**32 would wrap to 0 and pass the kernel's bounds check
            check_unpatchify_coords(coords, shape, patch)
        return torch.ops.nvfm.unpatchify(tokens.contiguous(), coords.to(torch.int32).contiguous(),
                                         list(shape), list(patch))
    return unpatchify_reference(tokens, coords, shape, patch)
