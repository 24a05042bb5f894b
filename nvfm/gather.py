"""Training-path token gather: uint8 shard volumes -> packed, normalised, augmented tokens.

One pass from the shard bytes to the model input: window extraction (CT nibbles expanded),
crop, axis permutation, flips, 4x16x16 patching and intensity normalisation.

Per volume b:
  volume  uint8 (C, D, H, W) as stored in the shards (DESIGN.md section 2): MR C=1; CT C=2 with
          [0] brain, [1] blood (high nibble) | bone (low nibble). Zero-copy views are fine.
  spec    GatherSpec(crop_start, crop_size, perm, flip, window, patch_perm):
          crop_start, crop_size  (z, y, x) in tokens of the volume's own token grid
                                 (tokenize.token_grid), start + size <= grid;
          perm   output grid axis k is crop axis perm[k] (as torch.permute);
          flip   per OUTPUT axis k, applied after the permutation (as torch.flip). Flipping
                 mirrors the whole patch-aligned crop: the grid AND the voxels in each patch;
          window "mr" | "brain" | "blood" | "bone";
          patch_perm  layout of the 1024 values: within-token axis j is voxel axis
                 patch_perm[j], row-major. None (default) = perm.
  coords  (n_b, 3) int32 token coordinates in the OUTPUT frame (after crop, permutation, flips),
          each in [0, crop_size[perm[k]]).

The augmentation rule. Default (patch_perm=None): the voxel box of the crop is permuted and
flipped as a whole, then cut into patches whose shape is permuted with it, (4, 16, 16) ->
(P[perm[0]], P[perm[1]], P[perm[2]]); this equals `tokenize.patchify` of the permuted,
flipped voxel box with the permuted patch shape. A token always covers the same 16 x 16 x 16
mm block of anatomy as an unaugmented token (the 4-voxel side stays on the 4 mm axis), the
output token grid is the crop's grid permuted and flipped (foreground and block masks map
over with the same permute/flip), and the values are that block's voxels in the augmented
frame. The JEPA loader (nvfm/masks.py crop_tokens) instead keeps the (4, 16, 16) in-token
layout and only swaps the two in-plane patch axes when perm reverses their order: that is
patch_perm = (0, 2, 1) or (0, 1, 2), see `masks_patch_perm`; the kernels do both, and the
tests check the gather against crop_tokens bit for bit.
Padding beyond the volume (far end of each original axis) is voxel value 0 before
normalisation, as in tokenize.py.

Output dtype uint8 (the JEPA loader's format, nvfm/masks.py): the window level of each voxel,
nvfm.data.expand_window (mr / brain: the stored byte; CT blood / bone: the high / low nibble
x 17), padding 0; no normalisation table.

Normalisation: value = (u8 / 255 - mean[w]) / std[w] in float32 (nvfm.model.normalize_tokens),
order [MR, CT-brain, CT-blood, CT-bone]; implemented with a 256-entry table per window built
here and passed to the kernels, so every backend gives bit-identical float32 (bfloat16 output
is the round-to-nearest-even of that float32).
"""
import math
from dataclasses import dataclass

import torch

from nvfm import ops
from nvfm.tokenize import PATCH, token_grid

WINDOWS = ("mr", "brain", "blood", "bone")  # index = normalisation slot (nvfm.model.WINDOWS)
WINDOW_MEAN = (0.3141, 0.4139, 0.3184, 0.2719)
WINDOW_STD = (0.2623, 0.4059, 0.3605, 0.1875)
WINDOW_CHANNEL = (0, 0, 1, 1)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)  # what csrc/gather.cpp writes


@dataclass(frozen=True)
class GatherSpec:
    crop_start: tuple = (0, 0, 0)
    crop_size: tuple = (20, 20, 20)
    perm: tuple = (0, 1, 2)
    flip: tuple = (False, False, False)
    window: str = "mr"
    patch_perm: tuple = None

    def out_grid(self):
        """Token grid of the output frame: the crop size permuted."""
        return tuple(int(self.crop_size[p]) for p in self.perm)

    def within(self):
        """Voxel axis of each within-token axis."""
        return tuple(self.perm if self.patch_perm is None else self.patch_perm)


def masks_patch_perm(perm):
    """patch_perm reproducing nvfm/masks.py: (4, 16, 16) kept, in-plane axes swapped when perm
    puts x before y."""
    perm = list(perm)
    return (0, 2, 1) if perm.index(1) > perm.index(2) else (0, 1, 2)


def normalization_table():
    """(4, 256) float32: value of each uint8 level in each window, as normalize_tokens computes it."""
    mean = torch.tensor(WINDOW_MEAN, dtype=torch.float32)[:, None]
    std = torch.tensor(WINDOW_STD, dtype=torch.float32)[:, None]
    return (torch.arange(256, dtype=torch.float32)[None, :] / 255.0 - mean) / std


def level_table():
    """(4, 256) uint8: window level of each stored channel byte (nvfm.data.expand_window)."""
    byte = torch.arange(256)
    return torch.stack([byte, byte, (byte >> 4) * 17, (byte & 15) * 17]).to(torch.uint8)


def channel_table():
    """(4, 256) float32: normalised value indexed by the stored channel byte (nibbles expanded)."""
    byte = torch.arange(256)
    level = torch.stack([byte, byte, (byte >> 4) * 17, (byte & 15) * 17])
    return torch.gather(normalization_table(), 1, level)


def check_spec(volume, spec, coords, patch=PATCH, where=""):
    """Validate one volume's spec and coords; raises ValueError naming the volume and the reason."""
    if volume.dtype != torch.uint8 or volume.dim() != 4:
        raise ValueError(f"gather{where}: volume must be uint8 (C, D, H, W), got {volume.dtype} {tuple(volume.shape)}")
    if spec.window not in WINDOWS:
        raise ValueError(f"gather{where}: window must be one of {WINDOWS}, got {spec.window!r}")
    if volume.shape[0] <= WINDOW_CHANNEL[WINDOWS.index(spec.window)]:
        raise ValueError(f"gather{where}: window {spec.window!r} needs 2 channels (CT), volume has {volume.shape[0]}")
    if sorted(spec.perm) != [0, 1, 2] or sorted(spec.within()) != [0, 1, 2] or len(spec.flip) != 3:
        raise ValueError(f"gather{where}: perm and patch_perm must be permutations of (0, 1, 2) and flip 3 "
                         f"bools, got {spec}")
    grid = token_grid(volume.shape[1:], patch)
    for a in range(3):
        if spec.crop_start[a] < 0 or spec.crop_size[a] < 1 or spec.crop_start[a] + spec.crop_size[a] > grid[a]:
            raise ValueError(f"gather{where}: crop start {spec.crop_start} size {spec.crop_size} outside token grid {grid}")
    if coords.dim() != 2 or coords.shape[1] != 3:
        raise ValueError(f"gather{where}: coords must be (n, 3), got {tuple(coords.shape)}")
    if coords.dtype.is_floating_point or coords.dtype.is_complex or coords.dtype == torch.bool:
        raise ValueError(f"gather{where}: coords must be integers, got {coords.dtype}")  # a cast would truncate
    if len(coords) and ((coords < 0).any() or (coords >= torch.tensor(spec.out_grid(), device=coords.device)).any()):
        raise ValueError(f"gather{where}: coords outside the output grid {spec.out_grid()}")


def gather_tokens_reference(volumes, specs, coords, dtype=torch.float32, patch=PATCH):
    """The specification. volumes: list of uint8 (C, D, H, W); specs: list of GatherSpec;
    coords: list of (n_b, 3) int tensors (output frame). Returns (sum n_b, prod(patch)) dtype:
    normalised values, or window levels when dtype is torch.uint8."""
    table = level_table() if dtype == torch.uint8 else channel_table()
    out = []
    for b, (vol, spec, c) in enumerate(zip(volumes, specs, coords, strict=True)):
        c = torch.as_tensor(c)
        check_spec(vol, spec, c, patch, f" (volume {b})")
        c = c.long().cpu()
        w = WINDOWS.index(spec.window)
        x = vol[WINDOW_CHANNEL[w]].cpu()
        D, H, W = x.shape
        pad = [g * p for g, p in zip(token_grid(x.shape, patch), patch)]
        x = torch.nn.functional.pad(x, (0, pad[2] - W, 0, pad[1] - H, 0, pad[0] - D))
        gz, gy, gx = (n // p for n, p in zip(pad, patch))
        blocks = x.reshape(gz, patch[0], gy, patch[1], gx, patch[2]).permute(0, 2, 4, 1, 3, 5)
        tok = torch.zeros_like(c)  # original grid coordinates of each output token
        flip_voxel_axes = []
        for k, a in enumerate(spec.perm):
            tok[:, a] = spec.crop_start[a] + (spec.crop_size[a] - 1 - c[:, k] if spec.flip[k] else c[:, k])
            if spec.flip[k]:
                flip_voxel_axes.append(1 + a)
        tb = blocks[tok[:, 0], tok[:, 1], tok[:, 2]]  # (n, pd, ph, pw) original voxel order
        tb = tb.flip(flip_voxel_axes) if flip_voxel_axes else tb
        tb = tb.permute(0, *(1 + a for a in spec.within())).reshape(len(c), math.prod(patch))
        out.append(table[w][tb.long()])
    res = torch.cat(out) if out else torch.empty(0, math.prod(patch), dtype=table.dtype)
    return res.to(dtype)


def _params(volumes, specs):
    """(B, 16) int32: crop_start 3, crop_size 3, perm 3, flip 3, window, patch_perm 3."""
    rows = [list(s.crop_start) + list(s.crop_size) + list(s.perm) + [int(bool(f)) for f in s.flip] +
            [WINDOWS.index(s.window)] + list(s.within()) for s in specs]
    return torch.tensor(rows, dtype=torch.int32).reshape(len(specs), 16)


def gather_tokens(volumes, specs, coords, dtype=None, patch=PATCH, impl="auto", device=None):
    """Same contract as gather_tokens_reference, with the compiled kernel when built.

    dtype defaults to bfloat16 on CUDA and float32 on CPU; torch.uint8 gives window levels (the
    loader's format: 4x fewer bytes than float32, normalised later on the device). On CUDA the volumes must already be
    on the device (copying uint8 there is half the bytes of the bf16 tokens). impl: "auto",
    "kernel" (error if not built) or "reference".
    """
    device = torch.device(device) if device is not None else (volumes[0].device if volumes else torch.device("cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    have = ops.backend("gather_tokens", device) != "reference"
    if impl == "kernel" and not have:
        raise RuntimeError(f"gather_tokens: no compiled kernel for device {device}")
    if impl == "reference" or not have or (impl == "auto" and ops.auto_backend("gather_tokens", device) == "reference"):
        return gather_tokens_reference(volumes, specs, coords, dtype, patch).to(device)
    coords = [torch.as_tensor(c) for c in coords]
    for b, (vol, spec, c) in enumerate(zip(volumes, specs, coords, strict=True)):
        check_spec(vol, spec, c, patch, f" (volume {b})")
    lens = torch.tensor([0] + [len(c) for c in coords], dtype=torch.int64).cumsum(0).to(torch.int32)
    packed = torch.cat(coords).to(torch.int32) if coords else torch.empty(0, 3, dtype=torch.int32)
    # the kernels write float32/float16/bfloat16/uint8; any other dtype is the float32 values cast, as in the reference
    kdt = dtype if dtype in KERNEL_DTYPES else torch.float32
    out = torch.ops.nvfm.gather_tokens([v.contiguous() for v in volumes], packed.to(device).contiguous(),
                                       lens.to(device), _params(volumes, specs).to(device),
                                       channel_table().to(device), list(patch), kdt)
    return out if kdt == dtype else out.to(dtype)
