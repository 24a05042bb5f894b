"""The authors' released NeuroVFM encoder <-> nvfm's encoder file, both ways, strictly.

    python -m nvfm.official convert neurovfm-encoder/ out/neurovfm.safetensors   # theirs -> ours
    python -m nvfm.official convert out/jepa/encoder.safetensors out/theirs/       # ours -> theirs
    python encode.py --shards=... --encoder=neurovfm-encoder/ --out=...            # format detected

Their layout (MLNeurosurg/neurovfm `get_vit_backbone`, released as `mlinslab/neurovfm-encoder`):
`config.json` ({"which": "vit", "params": {...}}, possibly wrapped as {"model": ...}) and
`pytorch_model.bin`, a state dict without prefix; also accepted: a {"state_dict": ..., "config": ...}
wrapper (its config must agree with a config.json beside it) and
a prefixed state dict such as the findings model's `vision_encoder.pt` (`vision_encoder.*`).
Keys (ours on the right):
    token_embed.proj.{weight,bias}          patch_embed.{weight,bias}
    blocks.{i}.norm1.{weight,bias}          blocks.blocks.{i}.norm1.{weight,bias}
    blocks.{i}.mixer.qkv.{weight,bias}      blocks.blocks.{i}.qkv.{weight,bias}   (3, heads, head_dim) both
    blocks.{i}.mixer.proj.weight            blocks.blocks.{i}.proj.weight         (no bias in either)
    blocks.{i}.norm2.{weight,bias}          blocks.blocks.{i}.norm2.{weight,bias}
    blocks.{i}.mlp.fc{1,2}.{weight,bias}    blocks.blocks.{i}.fc{1,2}.{weight,bias}
    norm.{weight,bias}                      blocks.norm.{weight,bias}
Their qkv / proj tensors are bfloat16 in the release, the rest float32; reading upcasts to
float32 (lossless; integer weights or float64 values float32 would round are refused). Writing
keeps float32 everywhere (their load_state_dict casts into their bf16 modules), so ours ->
theirs -> ours is bit-identical. Only an encoder with the authors' architecture options
(EncoderConfig defaults: pos_code "official", tanh GELU, LayerNorm eps 1e-6, no proj bias) can
be written in their layout.
Files are read with torch.load(weights_only=True): no code in a checkpoint is ever run.
Every refusal is a ConversionError of one line naming the file (weights or config.json) and the reason.
"""
import json
import math
import os
import re
import sys
from dataclasses import asdict

import torch

from nvfm.checkpoint import load_failure, names
from nvfm.data import atomic_path
from nvfm.model import PATCH_DIM, Encoder, EncoderConfig, as_float32_exactly, load_encoder, save_encoder

PATCH = (4, 16, 16)  # their patch_d_size, patch_hw_size, patch_hw_size
_OURS_OF = {  # their key (block part after "blocks.{i}.") -> ours
    "norm1": "norm1", "mixer.qkv": "qkv", "mixer.proj": "proj", "norm2": "norm2", "mlp.fc1": "fc1", "mlp.fc2": "fc2",
}
_THEIRS_OF = {v: k for k, v in _OURS_OF.items()}
_PARAMS = {"embed_dim", "depth", "num_heads", "prefix_len", "token_dim", "mlp_ratio", "qkv_bias", "drop_rate",
           "attn_drop_rate", "drop_path_rate", "embed_layer_cf", "init_std", "pos_emb_cf"}
# the arguments of their PatchEmbed and PositionalEncoding3DWrapper (the nested "params" objects): any
# other key is a model their code would not build, so it is refused rather than ignored
_EMBED_PARAMS = {"patch_hw_size", "patch_d_size", "in_chans", "embed_dim", "norm_layer", "bias", "fused_bias_fc"}
_PE_PARAMS = {"in_dim", "d", "d_size", "hw_size", "pe_factor", "concat"}
# the released ViT-B's positional table extent (their code cannot index beyond it; ours can)
RELEASE_PE_EXTENT = dict(d_size=128, hw_size=192)


class ConversionError(ValueError):
    """A file that does not match the layout it claims; the message names the offending keys."""


# ---------------------------------------------------------------------------------------
# config

def config_from_official(cfg):
    """Their config.json content -> EncoderConfig (the authors' architecture options)."""
    if isinstance(cfg, dict) and "model" in cfg and "which" not in cfg:  # their pipeline's {"model": {...}, ...}
        cfg = cfg["model"]
    if not isinstance(cfg, dict) or cfg.get("which") != "vit":
        got = cfg.get("which") if isinstance(cfg, dict) else type(cfg).__name__
        raise ConversionError(f"official config: 'which' must be 'vit' (with explicit params), got {got!r}")
    p = cfg.get("params", {})
    emb = p.get("embed_layer_cf") if isinstance(p, dict) else None
    pe = p.get("pos_emb_cf") if isinstance(p, dict) else None
    if not (isinstance(emb, dict) and isinstance(pe, dict) and isinstance(emb.get("params"), dict)
            and isinstance(pe.get("params"), dict)):  # a hand-edited file: one line, not an AttributeError
        raise ConversionError("official config: params, params.embed_layer_cf and params.pos_emb_cf must each be "
                              "an object with its own 'params' object")
    ep, pp = emb["params"], pe["params"]
    for where, got, known in (("params", p, _PARAMS), ("params.embed_layer_cf.params", ep, _EMBED_PARAMS),
                              ("params.pos_emb_cf.params", pp, _PE_PARAMS)):
        unknown = set(got) - known
        if unknown:
            raise ConversionError(f"official config: unknown {where} {names(unknown)}")
    dim, depth, heads = (_integer(p, k, f"params.{k}") for k in ("embed_dim", "depth", "num_heads"))
    pos_dim = _integer(pp, "d", "params.pos_emb_cf.params.d")
    emb_dim = _integer(ep, "embed_dim", "params.embed_layer_cf.params.embed_dim")
    mlp_ratio = p.get("mlp_ratio", 4.0)
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
        raise ConversionError(f"official config: params.mlp_ratio must be a positive number, got {mlp_ratio!r}")
    problems = []
    if p.get("prefix_len", 0) != 0:
        problems.append(f"prefix_len {p['prefix_len']} (class/register tokens are not supported)")
    if not p.get("qkv_bias", True):
        problems.append("qkv_bias false")
    if emb.get("which") != "voxel":
        problems.append(f"embed_layer_cf.which {emb.get('which')!r} (want 'voxel')")
    if (ep.get("patch_d_size"), ep.get("patch_hw_size"), ep.get("in_chans", 1)) != (PATCH[0], PATCH[1], 1):
        problems.append(f"patch {ep.get('patch_d_size')} x {ep.get('patch_hw_size')}^2, {ep.get('in_chans')} "
                        f"channel(s) (want {PATCH[0]} x {PATCH[1]}^2, 1)")
    if not ep.get("bias", True):
        problems.append("embed_layer_cf bias false")
    if pe.get("which") != "pe3d" or pp.get("concat", True) is not True:  # their wrapper's default: concat
        problems.append(f"pos_emb_cf {pe.get('which')!r} concat={pp.get('concat')} (want 'pe3d', concat true)")
    # their wrapper multiplies the positional code by pe_factor; ours is the unscaled code
    pe_factor = pp.get("pe_factor", 1)
    if isinstance(pe_factor, bool) or pe_factor != 1:
        problems.append(f"pos_emb_cf pe_factor {pe_factor!r} (the positional code scaled; want 1)")
    if ep.get("norm_layer") is not None:
        problems.append(f"embed_layer_cf norm_layer {ep['norm_layer']!r} (a norm after the patch embedding; want none)")
    if emb_dim != dim - pos_dim:
        problems.append(f"patch embedding dim {emb_dim} != embed_dim {dim} - pos d {pos_dim}")
    if int(p.get("token_dim", PATCH_DIM)) != PATCH_DIM:
        problems.append(f"token_dim {p.get('token_dim')} (want {PATCH_DIM})")
    if problems:
        raise ConversionError("official config not supported: " + "; ".join(problems))
    return EncoderConfig(dim=dim, depth=depth, heads=heads, mlp_ratio=float(mlp_ratio),
                         pos_dim=pos_dim, patch_dim=PATCH_DIM)


def _integer(params, key, where):
    """params[key] as an int; a missing, fractional, boolean or string value is a ConversionError
    naming `where` (int() would turn num_heads 3.7 into 3 and load a different encoder)."""
    if key not in params:
        raise ConversionError(f"official config: missing {where}")
    v = params[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ConversionError(f"official config: {where} must be an integer, got {v!r}")
    return int(v)


def config_to_official(config):
    """EncoderConfig -> their config.json content (the released file's form)."""
    arch = (config.pos_code, config.gelu_approximate, config.ln_eps, config.proj_bias)
    if arch != ("official", "tanh", 1e-6, False):
        raise ConversionError(f"encoder architecture (pos_code, gelu_approximate, ln_eps, proj_bias) = {arch} "
                              "is not the authors' ('official', 'tanh', 1e-06, False); it has no official layout")
    if config.patch_dim != PATCH_DIM:
        raise ConversionError(f"patch_dim {config.patch_dim} (their voxel embedding takes {PATCH_DIM})")
    params = dict(embed_dim=config.dim, depth=config.depth, num_heads=config.heads, prefix_len=0,
                  token_dim=PATCH_DIM,
                  embed_layer_cf=dict(which="voxel", params=dict(
                      in_chans=1, embed_dim=config.dim - config.pos_dim, bias=True, fused_bias_fc=True,
                      patch_hw_size=PATCH[1], patch_d_size=PATCH[0])),
                  pos_emb_cf=dict(which="pe3d", params=dict(d=config.pos_dim, **RELEASE_PE_EXTENT, concat=True)))
    if config.mlp_ratio != 4.0:
        params["mlp_ratio"] = config.mlp_ratio
    return {"which": "vit", "params": params}


def infer_official_config(state, heads=None):
    """EncoderConfig from a bare official state dict's shapes (no config.json); the head count
    is not in the shapes: `heads`, else dim // 64 (ViT convention, 12 for ViT-B)."""
    def shape(key, ndim):
        v = state.get(key)
        if v is None:
            raise ConversionError(f"official state dict without config.json: missing key {key!r}")
        if not torch.is_tensor(v) or v.dim() != ndim:
            got = f"shape {tuple(v.shape)}" if torch.is_tensor(v) else f"a {type(v).__name__}"
            raise ConversionError(f"official state dict: {key} must be a {ndim}-D tensor, got {got}")
        return v.shape
    (dim,), (emb_out, patch_dim), (hidden, _) = (shape("norm.weight", 1), shape("token_embed.proj.weight", 2),
                                                 shape("blocks.0.mlp.fc1.weight", 2))
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    ratio = hidden / dim
    if int(dim * ratio) != hidden:  # the MLP is int(dim * ratio) wide: 224 * (230 / 224) rounds to 229.99..
        ratio = math.nextafter(ratio, math.inf)
    return EncoderConfig(dim=dim, depth=depth, heads=heads or max(dim // 64, 1), mlp_ratio=ratio,
                         pos_dim=dim - emb_out, patch_dim=patch_dim)


# ---------------------------------------------------------------------------------------
# state dicts

def _strip_prefix(state):
    """Remove the one prefix in front of every key (e.g. 'vision_encoder.', 'model.'); a file
    whose keys do not all share the prefix of its token embedding is an error."""
    anchors = [k for k in state if k.endswith("token_embed.proj.weight")]
    if len(anchors) != 1:
        raise ConversionError(f"official state dict: expected one '*token_embed.proj.weight' key, found "
                              f"{len(anchors)} ({names(anchors)}); keys: {names(state)}")
    prefix = anchors[0][:-len("token_embed.proj.weight")]
    if not prefix:
        return state, ""
    outside = [k for k in state if not k.startswith(prefix)]
    if outside:
        raise ConversionError(f"official state dict: keys outside the encoder prefix {prefix!r}: {names(outside)}")
    return {k[len(prefix):]: v for k, v in state.items()}, prefix


def official_to_ours(state, config):
    """Their state dict (no prefix) -> ours for `config`; every key used, every shape checked,
    float32 out."""
    ours = {}
    for k, v in state.items():
        if not torch.is_tensor(v):
            raise ConversionError(f"official state dict: {k} is a {type(v).__name__}, not a tensor")
        if k.startswith("token_embed.proj."):
            new = "patch_embed." + k[len("token_embed.proj."):]
        elif k.startswith("norm."):
            new = "blocks." + k
        else:
            m = re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|mixer\.qkv|mixer\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", k)
            new = f"blocks.blocks.{m.group(1)}.{_OURS_OF[m.group(2)]}.{m.group(3)}" if m else "?" + k
        ours[new] = v
    with torch.device("meta"):  # names and shapes only, no allocation
        want = Encoder(config).state_dict()
    unexpected = sorted(_official_name(k) for k in set(ours) - set(want))
    missing = sorted(_official_name(k) for k in set(want) - set(ours))
    bad = sorted(f"{_official_name(k)} {tuple(ours[k].shape)} (want {tuple(want[k].shape)})"
                 for k in set(want) & set(ours) if ours[k].shape != want[k].shape)
    if unexpected or missing or bad:
        raise ConversionError(f"official weights do not match the config {config}: unexpected keys [{names(unexpected)}]; "
                              f"missing keys [{names(missing)}]; wrong shapes [{names(bad)}]")
    try:
        ours = as_float32_exactly({_official_name(k): v for k, v in ours.items()}, "official state dict")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return {k: ours[_official_name(k)] for k in want}


def _official_name(ours_key):
    if ours_key.startswith("?"):
        return ours_key[1:]
    if ours_key.startswith("patch_embed."):
        return "token_embed.proj." + ours_key[len("patch_embed."):]
    if ours_key.startswith("blocks.norm."):
        return ours_key[len("blocks."):]
    m = re.fullmatch(r"blocks\.blocks\.(\d+)\.(\w+)\.(weight|bias)", ours_key)
    if m and m.group(2) in _THEIRS_OF:
        return f"blocks.{m.group(1)}.{_THEIRS_OF[m.group(2)]}.{m.group(3)}"
    return ours_key


def ours_to_official(state):
    """Our encoder state dict -> theirs (no prefix), tensors unchanged (float32)."""
    return {_official_name(k): v.detach().contiguous() for k, v in state.items()}


# ---------------------------------------------------------------------------------------
# files

def find_official_files(path):
    """-> (weights path, config.json path or None) for a directory or a .bin/.pt/.pth file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("pytorch_model.bin", "vision_encoder.pt", "model.pt"):
            if os.path.exists(os.path.join(path, name)):
                weights = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no pytorch_model.bin (or vision_encoder.pt) in the directory")
    elif os.path.isfile(path):
        weights = path
    else:
        raise FileNotFoundError(f"encoder not found: {path}")
    cfg = os.path.join(os.path.dirname(weights), "config.json")
    return weights, (cfg if os.path.exists(cfg) else None)


def _read_config(cfg_path):
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{cfg_path}: not a readable JSON config ({type(e).__name__}: {e})") from None


def load_official(path, heads=None, device="cpu"):
    """The authors' encoder files -> nvfm Encoder (eval mode), strictly. Any refusal is a
    one-line ConversionError naming the weights file or config.json."""
    weights, cfg_path = find_official_files(path)
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code, or not a torch file
        raise ConversionError(load_failure(weights, e)) from None
    cfg_obj, cfg_src = None, weights
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        extra = set(obj) - {"state_dict", "config"}
        if extra:
            raise ConversionError(f"{weights}: state_dict wrapper with unexpected entries {names(map(str, extra))}")
        cfg_obj = obj.get("config")
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{weights}: expected a state dict, got {type(obj).__name__}")
    wrapped = cfg_obj  # the weights file's own config, checked against a config.json beside it below
    if cfg_path is not None:
        cfg_obj, cfg_src = _read_config(cfg_path), cfg_path
    try:
        state, _ = _strip_prefix({str(k): v for k, v in obj.items()})
    except ConversionError as e:
        raise ConversionError(f"{weights}: {e}") from None
    try:
        if cfg_obj is not None:
            config = config_from_official(cfg_obj)
            if heads is not None and heads != config.heads:
                raise ConversionError(f"heads={heads} contradicts the config's num_heads {config.heads}")
        else:  # the shapes give everything but the head count
            config = infer_official_config(state, heads)
        enc = Encoder(config)  # a head count that does not divide dim is refused here
    except (ConversionError, ValueError) as e:
        raise ConversionError(f"{cfg_src}: {e}") from None
    if wrapped is not None and cfg_src != weights:  # two configs: another head count gives other features
        try:
            own = config_from_official(wrapped)
        except ConversionError as e:
            raise ConversionError(f"{weights}: {e}") from None
        diff = [f"{k} {v} vs {getattr(own, k)}" for k, v in asdict(config).items() if v != getattr(own, k)]
        if diff:
            raise ConversionError(f"{cfg_src} contradicts the config in {weights}: {', '.join(diff)}")
    try:
        enc.load_state_dict(official_to_ours(state, config), strict=True)
    except ConversionError as e:
        raise ConversionError(f"{weights}: {e}" + (f" (config from {cfg_src})" if cfg_src != weights else "")) from None
    return enc.to(device).eval()


def save_official(encoder, out_dir):
    """Write `encoder` in their layout: out_dir/config.json + out_dir/pytorch_model.bin. Both are
    written to temp files first and renamed only when both are complete, so a failed or killed
    write leaves the previous pair intact (a new bin beside an old config.json would load with
    the old head count, silently)."""
    cfg = config_to_official(encoder.config)
    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.cpu() for k, v in ours_to_official(encoder.state_dict()).items()}
    with atomic_path(os.path.join(out_dir, "pytorch_model.bin")) as weights_tmp, \
            atomic_path(os.path.join(out_dir, "config.json")) as config_tmp:
        torch.save(state, weights_tmp)
        with open(config_tmp, "w") as f:
            f.write(json.dumps(cfg, indent=1))


def is_nvfm_file(path):
    return os.fspath(path).endswith(".safetensors")


def open_any_encoder(path, device="cpu", heads=None):
    """An nvfm .safetensors file, or the authors' directory / .bin / .pt -> Encoder (eval)."""
    if is_nvfm_file(path):
        return load_encoder(path, device)
    return load_official(path, heads=heads, device=device)


def convert(src, dst, heads=None):
    """theirs -> ours when dst ends with .safetensors, ours -> theirs (a directory) otherwise."""
    if is_nvfm_file(dst):
        if is_nvfm_file(src):
            raise ConversionError(f"{src} is already an nvfm encoder file")
        enc = load_official(src, heads=heads)
        save_encoder(enc, dst)
    else:
        if not is_nvfm_file(src):
            raise ConversionError(f"{src}: ours -> theirs needs an nvfm .safetensors encoder file")
        enc = load_encoder(src)
        save_official(enc, dst)
    return enc


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(prog="python -m nvfm.official", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="theirs (dir/.bin/.pt) -> ours (.safetensors), or ours -> theirs (dir)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--heads", type=int, default=None, help="head count when there is no config.json")
    a = ap.parse_args(argv)
    try:
        enc = convert(a.src, a.dst, a.heads)
    except (ValueError, RuntimeError, OSError) as e:  # ConversionError, load_encoder's refusals, an unwritable dst
        print(f"nvfm.official: {e}", file=sys.stderr)
        return 2
    cfg = enc.config
    print(f"nvfm.official: wrote {a.dst} (dim {cfg.dim}, depth {cfg.depth}, heads {cfg.heads}, "
          f"{sum(p.numel() for p in enc.parameters())} parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
