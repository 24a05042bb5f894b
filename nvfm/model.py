"""Vol-JEPA networks: a 3D ViT encoder over packed variable-length token sequences, and the
predictor. Also the encoder's file format (safetensors + json config) and `encode_study`.

Batch format (see nvfm/tokenize.py): x (N, 1024) float tokens of 4 x 16 x 16 voxels, packed
volume after volume; coords (N, 3) int32 token-grid positions (z, y, x); cu_seqlens int32
(B + 1,); max_seqlen = the longest volume in tokens. One attention sequence per volume,
no padding, no truncation, no CLS or register tokens.

Architecture options (EncoderConfig / PredictorConfig). The defaults are the authors' released
NeuroVFM encoder's choices, so a new nvfm encoder and the released one are interchangeable
(nvfm/official.py converts between the file layouts):
  pos_code "official": the `positional-encodings` PositionalEncoding3D(pos_dim) table read at the
      integer token-grid index: per axis 2 * ceil(pos_dim / 6) channels, inverse frequencies
      10000^(-k / channels) for k = 0, 2, 4, ..., sin and cos interleaved, axis blocks [z | y | x],
      truncated to pos_dim (30 -> exactly 10 per axis);
  gelu_approximate "tanh": tanh-approximate GELU in the MLP (flash-attn FusedMLP's default);
  ln_eps 1e-6; proj_bias False (the attention output projection has no bias).
The choices of nvfm's first encoders (files saved before these options existed carry none of
these fields and load with them, see LEGACY_ARCH): pos_code "nvfm-v1" (sin and cos of the integer
grid index at 5 frequencies per axis whose wavelengths run geometrically from 3 to 96 patches,
layout [sin z (5), cos z (5), sin y, cos y, sin x, cos x]), exact GELU, ln_eps 1e-5, proj bias.
Both codes are fixed (not learned), use the same frequencies on every axis (the 16 mm token grid
is isotropic, so an axis permutation of the volume permutes the three blocks of the code) and
use absolute integer positions (defined for any grid size, no interpolation at inference).
The patch embedding is a linear map 1024 -> dim - pos_dim concatenated with the code
(so ViT-B: 738 + 30 = 768), as in the reference implementation.

Intensity normalisation (done before the encoder, see `normalize_tokens`): uint8 / 255, then
(x - mean) / std with the train-set statistics of the window, order [MR, CT-brain,
CT-blood, CT-bone].
"""
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nvfm.attention import varlen_attention
from nvfm.data import atomic_path, write_atomic

PATCH_DIM = 4 * 16 * 16
WINDOWS = ("mr", "brain", "blood", "bone")  # index = normalisation slot
WINDOW_MEAN = (0.3141, 0.4139, 0.3184, 0.2719)
WINDOW_STD = (0.2623, 0.4059, 0.3605, 0.1875)
CT_WINDOWS = ("brain", "blood", "bone")

# Encoder presets. Predictor presets: `predictor_dim`/`predictor_depth` default to the
# encoder's (the reference predictor is as large as its encoder); tiny is for CPU demos.
SIZES = {
    "tiny": dict(dim=96, depth=4, heads=3),
    "vits": dict(dim=384, depth=12, heads=6),
    "vitm": dict(dim=512, depth=12, heads=8),
    "vitb": dict(dim=768, depth=12, heads=12),
    "vitl": dict(dim=1024, depth=24, heads=16),
}


POS_CODES = ("official", "nvfm-v1")
GELU_APPROXIMATE = ("tanh", "none")  # F.gelu's `approximate`
# What a config saved before the architecture options existed means (nvfm-encoder-v1 files,
# train_jepa checkpoints): fields missing from such a config take these values, not the defaults.
LEGACY_ARCH = dict(pos_code="nvfm-v1", gelu_approximate="none", ln_eps=1e-5, proj_bias=True)


def _check_arch(cfg):
    if cfg.pos_code not in POS_CODES:
        raise ValueError(f"pos_code {cfg.pos_code!r}: choose one of {POS_CODES}")
    if cfg.gelu_approximate not in GELU_APPROXIMATE:
        raise ValueError(f"gelu_approximate {cfg.gelu_approximate!r}: choose one of {GELU_APPROXIMATE}")


@dataclass
class ArchOptions:
    """The architecture choices shared by the encoder and the predictor (defaults: the authors')."""
    pos_code: str = "official"        # see the module docstring; LEGACY_ARCH for old files
    gelu_approximate: str = "tanh"
    ln_eps: float = 1e-6
    proj_bias: bool = False

    def __post_init__(self):
        _check_arch(self)

    @classmethod
    def from_dict(cls, cfg):
        """A config read from a file: fields of LEGACY_ARCH it lacks take the legacy values
        (it was written before the options existed); unknown fields are an error (TypeError)."""
        return cls(**{**LEGACY_ARCH, **cfg})


@dataclass
class EncoderConfig(ArchOptions):
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pos_dim: int = 30
    patch_dim: int = PATCH_DIM

    @classmethod
    def preset(cls, size, **overrides):
        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
        return cls(**{**SIZES[size], **overrides})


def position_code(coords, pos_dim=30, layout="official"):
    """Fixed 3D sinusoidal code: coords (N, 3) int grid (z, y, x) -> (N, pos_dim) float32.

    layout "official": positional-encodings' PositionalEncoding3D(pos_dim) at the integer
    positions, closed form (same float32 ops, so bit-equal to the package's table): per axis
    C = 2 * ceil(pos_dim / 6) channels [sin f0, cos f0, sin f1, ...] with f_j = 10000^(-2j / C),
    axis blocks [z | y | x], the first pos_dim values kept.
    layout "nvfm-v1": [sin z (F), cos z (F), sin y, cos y, sin x, cos x], F = pos_dim // 6,
    wavelengths 3 .. 96 patches (see the module docstring)."""
    if layout == "official":
        ch = 2 * math.ceil(pos_dim / 6)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, ch, 2, device=coords.device).float() / ch))
        ang = coords.to(torch.float32)[:, :, None] * inv_freq  # (N, 3, C/2)
        code = torch.stack([ang.sin(), ang.cos()], dim=-1).reshape(coords.shape[0], 3 * ch)
        return code[:, :pos_dim]
    if layout != "nvfm-v1":
        raise ValueError(f"position code layout {layout!r}: choose one of {POS_CODES}")
    if pos_dim % 6 != 0:
        raise ValueError(f"pos_dim must be a multiple of 6 (3 axes x sin/cos), got {pos_dim}")
    nf = pos_dim // 6
    wavelength = 3.0 * 32.0 ** (torch.arange(nf, dtype=torch.float32, device=coords.device) / max(nf - 1, 1))
    ang = coords.to(torch.float32)[:, :, None] * (2 * math.pi / wavelength)  # (N, 3, F)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).reshape(coords.shape[0], pos_dim)


def normalize_tokens(tokens, window_index):
    """uint8 tokens (N, 1024) -> float32 normalised; window_index (N,) or int in 0..3 (WINDOWS)."""
    mean = torch.tensor(WINDOW_MEAN, device=tokens.device)[window_index]
    std = torch.tensor(WINDOW_STD, device=tokens.device)[window_index]
    if mean.dim() == 1:
        mean, std = mean[:, None], std[:, None]
    return (tokens.to(torch.float32) / 255.0 - mean) / std


class Block(nn.Module):
    """Pre-norm transformer block over packed sequences: x + Attn(LN x); x + MLP(LN x)."""

    def __init__(self, dim, heads, mlp_ratio=4.0, gelu_approximate="tanh", ln_eps=1e-6, proj_bias=False):
        super().__init__()
        if heads < 1:  # a negative count passed the divisibility check and failed every forward
            raise ValueError(f"heads {heads}: the head count must be positive")
        if dim % heads != 0:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if gelu_approximate not in GELU_APPROXIMATE:
            raise ValueError(f"gelu_approximate {gelu_approximate!r}: choose one of {GELU_APPROXIMATE}")
        self.heads = heads
        self.gelu_approximate = gelu_approximate
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.attn_impl = "auto"

    def forward(self, x, cu_seqlens, max_seqlen):
        N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(N, 3, self.heads, C // self.heads).unbind(1)
        a = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, impl=self.attn_impl)
        x = x + self.proj(a.reshape(N, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate=self.gelu_approximate))


class Transformer(nn.Module):
    """A stack of Blocks with a final LayerNorm; optional activation checkpointing."""

    def __init__(self, dim, depth, heads, mlp_ratio, gelu_approximate="tanh", ln_eps=1e-6, proj_bias=False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, gelu_approximate, ln_eps, proj_bias)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=ln_eps)
        self.grad_checkpointing = False

    def forward(self, x, cu_seqlens, max_seqlen):
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = blk(x, cu_seqlens, max_seqlen)
        return self.norm(x)


def _init_weights(module, depth):
    """trunc-normal(0.02) linears, zero biases; residual projections scaled by 1/sqrt(2 layer)
    (as in I-JEPA) so the residual stream does not grow with depth at init."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for i, blk in enumerate(module.blocks.blocks, start=1):
        blk.proj.weight.data.div_(math.sqrt(2.0 * i))
        blk.fc2.weight.data.div_(math.sqrt(2.0 * i))


class Encoder(nn.Module):
    """3D ViT: forward(x (N,1024) float, coords (N,3) int, cu_seqlens int32 (B+1), max_seqlen)
    -> (N, dim). Each volume's tokens attend only to each other."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        if not 0 < config.pos_dim < config.dim:
            raise ValueError(f"pos_dim {config.pos_dim} must be in (0, dim={config.dim})")
        self.patch_embed = nn.Linear(config.patch_dim, config.dim - config.pos_dim)
        self.blocks = Transformer(config.dim, config.depth, config.heads, config.mlp_ratio,
                                  config.gelu_approximate, config.ln_eps, config.proj_bias)
        _init_weights(self, config.depth)

    @property
    def dim(self):
        return self.config.dim

    def set_attention(self, impl):
        for blk in self.blocks.blocks:
            blk.attn_impl = impl

    def forward(self, x, coords, cu_seqlens, max_seqlen):
        if x.shape[-1] != self.config.patch_dim or coords.dim() != 2 or coords.shape[1] != 3 \
                or x.shape[0] != coords.shape[0]:
            raise ValueError(f"Encoder: x {tuple(x.shape)} and coords {tuple(coords.shape)} do not match "
                             f"(N, {self.config.patch_dim}) / (N, 3)")
        code = position_code(coords, self.config.pos_dim, self.config.pos_code)
        h = torch.cat([self.patch_embed(x), code.to(x.dtype)], dim=-1)
        return self.blocks(h, cu_seqlens, int(max_seqlen))


@dataclass
class PredictorConfig(ArchOptions):
    enc_dim: int = 768
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    pos_dim: int = 30


def predictor_layout(cu_ctx, cu_tgt):
    """Where context and target tokens sit in the predictor's packed sequences.

    Volume b's predictor sequence is [its context tokens, its target (mask) tokens].
    cu_ctx, cu_tgt: int (B+1,) CPU tensors. Returns (ctx_pos (Nc,), tgt_pos (Nt,)) int64 and
    cu (B+1,) int32, max_seqlen int."""
    cu_ctx, cu_tgt = cu_ctx.long().cpu(), cu_tgt.long().cpu()
    n_ctx, n_tgt = cu_ctx.diff(), cu_tgt.diff()
    lens = n_ctx + n_tgt
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
    b_ctx = torch.repeat_interleave(torch.arange(len(lens)), n_ctx)
    b_tgt = torch.repeat_interleave(torch.arange(len(lens)), n_tgt)
    ctx_pos = cu[b_ctx] + torch.arange(int(cu_ctx[-1])) - cu_ctx[b_ctx]
    tgt_pos = cu[b_tgt] + n_ctx[b_tgt] + torch.arange(int(cu_tgt[-1])) - cu_tgt[b_tgt]
    return ctx_pos, tgt_pos, cu.to(torch.int32), int(lens.max()) if len(lens) else 0


class Predictor(nn.Module):
    """Context latents + mask tokens at the target positions -> predicted target latents.

    Context latents are mapped enc_dim -> dim - pos_dim, mask tokens are one learned vector
    (dim - pos_dim); both get the fixed position code of their grid position concatenated.
    Each volume's context + mask tokens form one attention sequence."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        if not 0 < config.pos_dim < config.dim:  # dim == pos_dim: every token its position code alone
            raise ValueError(f"predictor: pos_dim {config.pos_dim} must be in (0, dim={config.dim})")
        self.embed = nn.Linear(config.enc_dim, config.dim - config.pos_dim)
        self.mask_token = nn.Parameter(torch.zeros(config.dim - config.pos_dim))
        self.blocks = Transformer(config.dim, config.depth, config.heads, config.mlp_ratio,
                                  config.gelu_approximate, config.ln_eps, config.proj_bias)
        self.head = nn.Linear(config.dim, config.enc_dim)
        _init_weights(self, config.depth)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def set_attention(self, impl):
        for blk in self.blocks.blocks:
            blk.attn_impl = impl

    def forward(self, ctx, ctx_coords, tgt_coords, layout):
        """ctx (Nc, enc_dim), ctx_coords (Nc, 3), tgt_coords (Nt, 3), layout from
        `predictor_layout` (positions on ctx's device) -> (Nt, enc_dim)."""
        ctx_pos, tgt_pos, cu, max_seqlen = layout
        p, layout_ = self.config.pos_dim, self.config.pos_code
        h_ctx = torch.cat([self.embed(ctx), position_code(ctx_coords, p, layout_).to(ctx.dtype)], dim=-1)
        m = self.mask_token.to(h_ctx.dtype).expand(tgt_coords.shape[0], -1)
        h_tgt = torch.cat([m, position_code(tgt_coords, p, layout_).to(h_ctx.dtype)], dim=-1)
        h = h_ctx.new_empty(ctx_pos.numel() + tgt_pos.numel(), self.config.dim)
        h = h.index_copy(0, ctx_pos, h_ctx).index_copy(0, tgt_pos, h_tgt)
        h = self.blocks(h, cu, max_seqlen)
        return self.head(h.index_select(0, tgt_pos))


def transformer_flops(n_tokens, seqlens, dim, depth, mlp_ratio=4.0):
    """Forward FLOPs of `depth` blocks over packed sequences with the given real lengths:
    matmuls 2 * (4 d^2 + 2 d h) per token per layer with h = int(d * mlp_ratio) the MLP width a Block
    has, attention 4 * L * d per token (Q K^T and P V), summed over sequences with sum(L^2)."""
    dense = 2 * (4 * dim + 2 * int(dim * mlp_ratio)) * dim * n_tokens
    attn = 4 * dim * sum(int(L) ** 2 for L in seqlens)
    return depth * (dense + attn)


def encoder_flops(cfg, seqlens):
    """Forward FLOPs of an Encoder (EncoderConfig cfg) on packed volumes of these token counts: the
    patch embedding (patch_dim -> dim - pos_dim) and the blocks."""
    n = sum(seqlens)
    return transformer_flops(n, seqlens, cfg.dim, cfg.depth, cfg.mlp_ratio) + 2 * cfg.patch_dim * (cfg.dim - cfg.pos_dim) * n


def predictor_flops(cfg, ctx_lens, seqlens):
    """Forward FLOPs of a Predictor (PredictorConfig cfg): per volume ctx_lens[b] context latents embedded
    (enc_dim -> dim - pos_dim), the blocks over its [context, targets] sequence of seqlens[b] tokens, the
    head (dim -> enc_dim) on its target tokens."""
    nc, n = sum(ctx_lens), sum(seqlens)
    return (transformer_flops(n, seqlens, cfg.dim, cfg.depth, cfg.mlp_ratio)
            + 2 * cfg.enc_dim * (cfg.dim - cfg.pos_dim) * nc + 2 * cfg.dim * cfg.enc_dim * (n - nc))


# ---------------------------------------------------------------------------------------
# the released encoder file: <name>.safetensors (weights + config in the metadata) and a
# <name>.json beside it with the same config, for people and for tools without safetensors.

# v2: the config carries the architecture options; a v1 config (none of them) means LEGACY_ARCH.
ENCODER_FORMAT = "nvfm-encoder-v2"
ENCODER_FORMATS = ("nvfm-encoder-v1", ENCODER_FORMAT)


def as_float32_exactly(state, where):
    """state dict -> the same tensors in float32, refusing any that float32 does not hold exactly
    (integer or bool weights, float64 values it would round): no weight is changed silently.
    float16 / bfloat16 / float32 always pass. Raises ValueError naming `where` and the keys."""
    from nvfm.checkpoint import names
    out, bad = {}, []
    for k, v in state.items():
        f = v.to(torch.float32) if v.is_floating_point() else None
        # every float type but float64 is narrower than float32: no value check needed (meta tensors too)
        if f is None or (v.dtype == torch.float64 and not torch.equal(f.to(v.dtype), v)):
            bad.append(f"{k} {str(v.dtype).replace('torch.', '')}")
        else:
            out[k] = f.contiguous()
    if bad:
        raise ValueError(f"{where}: weights that float32 does not hold exactly (integer/bool, or float64 "
                         f"values it would round): {names(bad)}")
    return out


def save_encoder(encoder, path):
    """Write the encoder weights to `path` (.safetensors) and its config to path's .json,
    atomically (nvfm.data.atomic_path): a failed or killed write leaves the old file and
    no temp file."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    cfg = asdict(encoder.config)
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"nvfm_encoder_config": json.dumps(cfg), "format": ENCODER_FORMAT})
    write_atomic(os.path.splitext(path)[0] + ".json",
                 json.dumps({"format": ENCODER_FORMAT, "config": cfg}, indent=1))


def load_encoder(path, device="cpu"):
    """Read an encoder written by save_encoder; every key and shape must match (strict), and
    every weight must be float32 exactly (float16 / bfloat16 files upcast losslessly).
    A config without the architecture options (nvfm-encoder-v1) loads with LEGACY_ARCH.
    A file that is not readable is a ValueError naming it; a key mismatch a RuntimeError."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"encoder file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path)
    except Exception as e:  # truncated, empty, not safetensors
        raise ValueError(f"{path}: not a readable safetensors file (truncated or another format): {e}") from None
    side = os.path.splitext(path)[0] + ".json"
    try:
        if "nvfm_encoder_config" in meta:
            cfg, fmt = json.loads(meta["nvfm_encoder_config"]), meta.get("format")
        else:
            if not os.path.exists(side):
                raise ValueError(f"{path}: no encoder config in the file metadata and no {side}")
            with open(side) as f:
                obj = json.load(f)
            cfg, fmt = obj["config"], obj.get("format")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable encoder config (metadata or {side}): {type(e).__name__}: {e}") from None
    # a later format may give the same config fields another meaning (as v2 did to v1's)
    if isinstance(fmt, str) and fmt.startswith("nvfm-encoder-") and fmt not in ENCODER_FORMATS:
        raise ValueError(f"{path}: encoder format {fmt!r} is not one this nvfm reads ({', '.join(ENCODER_FORMATS)})")
    try:
        encoder = Encoder(EncoderConfig.from_dict(cfg))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad encoder config {cfg}: {e}") from None
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise RuntimeError(f"{path}: weights do not match the encoder config: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]}, wrong shape {bad[:8]}")
    encoder.load_state_dict(as_float32_exactly(state, path), strict=True)
    return encoder.to(device).eval()


def sidecar_config_tag(path):
    """"" for an encoder file that carries its config (save_encoder's), else "+config:<sha256 of
    the sidecar .json's config>": the sidecar is not part of the file's hash, and an edited one
    makes other features from the same weights (encode.py keys its cache by both)."""
    from safetensors import safe_open
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            if "nvfm_encoder_config" in (f.metadata() or {}):
                return ""
        with open(os.path.splitext(os.fspath(path))[0] + ".json") as f:
            cfg = json.load(f)["config"]
    except Exception as e:  # load_encoder has read both already; a change since is named here
        raise ValueError(f"{path}: unreadable encoder config (metadata or sidecar .json): {type(e).__name__}: {e}") from None
    return "+config:" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# inference: whole volumes, every window

def volume_windows(record):
    """The windows a volume is encoded with at inference: MR -> ["mr"], CT -> brain, blood, bone."""
    if record["modality"] == "CT":
        return list(CT_WINDOWS)
    if record["modality"] == "MR":
        return ["mr"]
    raise ValueError(f"volume {record.get('volume_id')}: unknown modality {record['modality']!r}")


@torch.no_grad()
def encode_study(encoder, reader, volume_indices, device=None, min_fg_fraction=None, max_tokens=32768,
                 amp_dtype=torch.bfloat16, crop="pad", full_precision=False):
    """Encode whole volumes (no truncation) with a frozen encoder.

    crop "pad": the volume is zero-padded up to whole patches (nvfm's rule, nothing is lost);
    "centre": cropped to whole patches, centred, as the authors' preprocessing does (per axis
    start (n % p) // 2, length (n // p) * p; token coords index the cropped grid).
    full_precision: feed the authors' float windows (ShardReader.window_float, exact for shards
    that store the resampled values, format 2) instead of the uint8 windows; tokens are then
    float32 on the 0..255 scale that normalize_tokens expects.

    reader: nvfm.data.ShardReader; volume_indices: indices into reader.volumes.
    Returns a list with one dict per (volume, window): volume_id, family, modality, window,
    coords (n, 3) int32 CPU, emb (n, dim) float32 CPU, in the order of volume_indices (CT
    windows brain, blood, bone). Windows are packed together up to max_tokens per forward; a
    window is never split (attention is per volume), so one larger than max_tokens is a forward of its own.
    bf16 autocast on CUDA; float32 on CPU.
    """
    from nvfm.tokenize import DEFAULT_MIN_FG_FRACTION, patchify
    if crop not in ("pad", "centre"):
        raise ValueError(f"crop {crop!r}: choose 'pad' or 'centre'")
    min_fg = DEFAULT_MIN_FG_FRACTION if min_fg_fraction is None else min_fg_fraction
    device = torch.device(device) if device is not None else next(encoder.parameters(), torch.empty(0)).device
    was_training = encoder.training
    encoder.eval()
    items = []  # (meta, tokens uint8, coords)
    for i in volume_indices:
        rec = reader.volumes[i]
        _, mask = reader.volume(i)
        mask = centre_crop_to_patches(_as_array(mask)) if crop == "centre" else _as_array(mask)
        for w in volume_windows(rec):
            vol = reader.window_float(i, w) * 255.0 if full_precision else _as_array(reader.window(i, w))
            vol = torch.from_numpy(centre_crop_to_patches(vol) if crop == "centre" else vol)
            # the compiled patchify takes uint8 only
            tokens, coords, _ = patchify([vol], [torch.from_numpy(mask)], min_fg,
                                         impl="reference" if full_precision else "auto")
            meta = dict(volume_id=rec["volume_id"], family=rec.get("family"), modality=rec["modality"], window=w)
            items.append((meta, tokens, coords))
    out = [None] * len(items)
    groups, cur, cur_n = [], [], 0
    for j, (_, t, _) in enumerate(items):  # pack windows/volumes into forwards of <= max_tokens
        if cur and cur_n + len(t) > max_tokens:
            groups.append(cur)
            cur, cur_n = [], 0
        cur.append(j)
        cur_n += len(t)
    if cur:
        groups.append(cur)
    use_amp = device.type == "cuda" and amp_dtype is not None
    for g in groups:
        lens = [len(items[j][1]) for j in g]
        if sum(lens) > 0:
            x = torch.cat([normalize_tokens(items[j][1], WINDOWS.index(items[j][0]["window"])) for j in g]).to(device)
            c = torch.cat([items[j][2] for j in g]).to(device)
            cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                emb = encoder(x, c, cu, max(lens)).float().cpu()
        start = 0
        for j, n in zip(g, lens):
            meta, _, coords = items[j]
            e = emb[start:start + n] if n else torch.zeros(0, encoder.config.dim)
            out[j] = dict(meta, coords=coords.to(torch.int32), emb=e)
            start += n
    encoder.train(was_training)
    return out


def centre_crop_to_patches(a, patch=(4, 16, 16)):
    """(D, H, W) array -> its centred crop to whole patches (the authors' preprocessing rule:
    per axis start (n % p) // 2, length (n // p) * p); C-contiguous copy."""
    import numpy as np
    sl = tuple(slice((n % p) // 2, (n % p) // 2 + (n // p) * p) for n, p in zip(a.shape, patch))
    return np.ascontiguousarray(a[sl])


def _as_array(a):
    """A C-contiguous writable numpy array for torch.from_numpy (shard memmaps are read-only)."""
    import numpy as np
    a = np.asarray(a)
    return a if a.flags.writeable and a.flags.c_contiguous else np.array(a, order="C", copy=True)
