"""Encoder / predictor / encoder file format / encode_study (tiny models, CPU)."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nvfm import model as Mdl
from nvfm.loader import ArrayReader, synthetic_reader, synthetic_volume
from nvfm.tokenize import patchify


def tiny_encoder(seed=0, **kw):
    torch.manual_seed(seed)
    return Mdl.Encoder(Mdl.EncoderConfig.preset("tiny", **kw))


def random_packed(gen, lens, grid=(6, 8, 8)):
    coords = []
    for n in lens:
        all_pos = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, 3)
        coords.append(all_pos[torch.randperm(len(all_pos), generator=gen)[:n]])
    x = torch.randn(sum(lens), 1024, generator=gen)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return x, torch.cat(coords).to(torch.int32), cu


def test_presets_and_shapes():
    for size, (dim, depth, heads) in {"tiny": (96, 4, 3), "vits": (384, 12, 6), "vitm": (512, 12, 8),
                                      "vitb": (768, 12, 12), "vitl": (1024, 24, 16)}.items():
        cfg = Mdl.EncoderConfig.preset(size)
        assert (cfg.dim, cfg.depth, cfg.heads, cfg.pos_dim) == (dim, depth, heads, 30)
    with pytest.raises(ValueError, match="unknown model size"):
        Mdl.EncoderConfig.preset("vitz")
    enc = tiny_encoder()
    assert enc.patch_embed.out_features == 96 - 30
    g = torch.Generator().manual_seed(0)
    x, c, cu = random_packed(g, [5, 17, 9])
    out = enc(x, c, cu, 17)
    assert out.shape == (31, 96) and torch.isfinite(out).all()


def test_packing_equals_separate_sequences():
    """A packed batch must give each volume exactly what it gets alone: no cross-volume attention."""
    enc = tiny_encoder().eval()
    g = torch.Generator().manual_seed(1)
    lens = [7, 30, 1, 12]
    x, c, cu = random_packed(g, lens)
    packed = enc(x, c, cu, max(lens))
    for b in range(len(lens)):
        s, e = int(cu[b]), int(cu[b + 1])
        alone = enc(x[s:e], c[s:e], torch.tensor([0, e - s], dtype=torch.int32), e - s)
        torch.testing.assert_close(packed[s:e], alone, atol=2e-5, rtol=1e-4)
    # and the attention implementations agree
    enc.set_attention("reference")
    torch.testing.assert_close(enc(x, c, cu, max(lens)), packed, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["official", "nvfm-v1"])
def test_position_code_axis_permutation_and_any_size(layout):
    coords = torch.tensor([[0, 0, 0], [3, 7, 11], [40, 2, 95], [200, 150, 5]], dtype=torch.int32)
    p = Mdl.position_code(coords, layout=layout)
    assert p.shape == (4, 30) and torch.isfinite(p).all()
    blocks = p.reshape(4, 3, 10)
    perm = [2, 0, 1]
    # permuting the grid axes permutes the per-axis blocks of the code: same scale on every axis
    torch.testing.assert_close(Mdl.position_code(coords[:, perm], layout=layout).reshape(4, 3, 10), blocks[:, perm])
    # distinct positions within a large grid get distinct codes
    grid = torch.stack(torch.meshgrid(*(torch.arange(48),) * 3, indexing="ij"), -1).reshape(-1, 3)
    codes = Mdl.position_code(grid.to(torch.int32), layout=layout)
    d = torch.cdist(codes[:2000], codes[:2000])
    d.fill_diagonal_(1.0)
    assert d.min() > 1e-3
    if layout == "nvfm-v1":
        with pytest.raises(ValueError):
            Mdl.position_code(coords, pos_dim=32, layout=layout)
    with pytest.raises(ValueError, match="layout"):
        Mdl.position_code(coords, layout="rope")


def _pe3d_table(channels, shape):
    """positional-encodings 6.0.3 PositionalEncoding3D, transcribed as written there: a dense
    (X, Y, Z, channels) table (the authors' encoder indexes it at the token-grid positions)."""
    ch = int(np.ceil(channels / 6) * 2)
    if ch % 2:
        ch += 1
    inv_freq = 1.0 / (10000 ** (torch.arange(0, ch, 2).float() / ch))
    X, Y, Z = shape

    def get_emb(sin_inp):
        return torch.flatten(torch.stack((sin_inp.sin(), sin_inp.cos()), dim=-1), -2, -1)

    ex = get_emb(torch.einsum("i,j->ij", torch.arange(X, dtype=inv_freq.dtype), inv_freq))[:, None, None, :]
    ey = get_emb(torch.einsum("i,j->ij", torch.arange(Y, dtype=inv_freq.dtype), inv_freq))[:, None, :]
    ez = get_emb(torch.einsum("i,j->ij", torch.arange(Z, dtype=inv_freq.dtype), inv_freq))
    emb = torch.zeros((X, Y, Z, ch * 3))
    emb[:, :, :, :ch] = ex
    emb[:, :, :, ch:2 * ch] = ey
    emb[:, :, :, 2 * ch:] = ez
    return emb[..., :channels]


@pytest.mark.parametrize("pos_dim", [30, 24, 20])
def test_official_position_code_equals_the_package_table(pos_dim):
    """The closed form is bit-equal to PositionalEncoding3D's table read at the grid index."""
    table = _pe3d_table(pos_dim, (9, 40, 33))
    g = torch.Generator().manual_seed(0)
    coords = torch.stack([torch.randint(0, n, (500,), generator=g) for n in (9, 40, 33)], 1).to(torch.int32)
    want = table[coords[:, 0].long(), coords[:, 1].long(), coords[:, 2].long()]
    torch.testing.assert_close(Mdl.position_code(coords, pos_dim), want, atol=0, rtol=0)


def test_architecture_options_defaults_and_legacy():
    cfg = Mdl.EncoderConfig()
    assert (cfg.pos_code, cfg.gelu_approximate, cfg.ln_eps, cfg.proj_bias) == ("official", "tanh", 1e-6, False)
    pcfg = Mdl.PredictorConfig()
    assert (pcfg.pos_code, pcfg.gelu_approximate, pcfg.ln_eps, pcfg.proj_bias) == ("official", "tanh", 1e-6, False)
    enc = tiny_encoder()
    blk = enc.blocks.blocks[0]
    assert blk.proj.bias is None and blk.norm1.eps == 1e-6 and enc.blocks.norm.eps == 1e-6
    # a config written before the options existed means the old architecture
    old = Mdl.EncoderConfig.from_dict(dict(dim=96, depth=4, heads=3, mlp_ratio=4.0, pos_dim=30, patch_dim=1024))
    assert (old.pos_code, old.gelu_approximate, old.ln_eps, old.proj_bias) == ("nvfm-v1", "none", 1e-5, True)
    eo = Mdl.Encoder(old)
    assert eo.blocks.blocks[0].proj.bias is not None and eo.blocks.blocks[0].norm2.eps == 1e-5
    assert Mdl.PredictorConfig.from_dict(dict(enc_dim=96, dim=64, depth=1, heads=2)).pos_code == "nvfm-v1"
    with pytest.raises(ValueError, match="pos_code"):
        Mdl.EncoderConfig(pos_code="learned")
    with pytest.raises(ValueError, match="gelu_approximate"):
        Mdl.EncoderConfig(gelu_approximate="erf")


def _legacy_forward(enc, x, coords, cu, max_seqlen):
    """The first nvfm encoder's forward written out with its constants (exact GELU, eps 1e-5,
    proj bias, the nvfm-v1 code), independent of the options plumbing."""
    from nvfm.attention import varlen_attention
    h = torch.cat([enc.patch_embed(x), Mdl.position_code(coords, 30, "nvfm-v1")], -1)
    N, C = h.shape
    for b in enc.blocks.blocks:
        ln = lambda t, m: F.layer_norm(t, (C,), m.weight, m.bias, 1e-5)  # noqa: E731
        q, k, v = F.linear(ln(h, b.norm1), b.qkv.weight, b.qkv.bias).view(N, 3, b.heads, -1).unbind(1)
        a = varlen_attention(q, k, v, cu, cu, max_seqlen, max_seqlen, impl="reference").reshape(N, C)
        h = h + F.linear(a, b.proj.weight, b.proj.bias)
        h = h + F.linear(F.gelu(F.linear(ln(h, b.norm2), b.fc1.weight, b.fc1.bias)), b.fc2.weight, b.fc2.bias)
    n = enc.blocks.norm
    return F.layer_norm(h, (C,), n.weight, n.bias, 1e-5)


def test_legacy_v1_file_loads_with_the_old_architecture(tmp_path):
    """An encoder file saved before the options existed (config without them) loads strictly and
    computes what the old code computed."""
    from safetensors.torch import save_file
    torch.manual_seed(5)
    old_cfg = dict(dim=96, depth=2, heads=3, mlp_ratio=4.0, pos_dim=30, patch_dim=1024)
    enc = Mdl.Encoder(Mdl.EncoderConfig.from_dict(old_cfg)).eval()
    for p in enc.parameters():  # non-trivial LayerNorm / bias values
        p.data.add_(0.05 * torch.randn_like(p))
    state = {k: v.contiguous() for k, v in enc.state_dict().items()}
    assert "blocks.blocks.0.proj.bias" in state
    path = tmp_path / "old.safetensors"
    save_file(state, path, metadata={"nvfm_encoder_config": json.dumps(old_cfg), "format": "nvfm-encoder-v1"})
    loaded = Mdl.load_encoder(path)
    assert loaded.config.pos_code == "nvfm-v1" and loaded.config.proj_bias
    g = torch.Generator().manual_seed(6)
    x, c, cu = random_packed(g, [11, 6])
    loaded.set_attention("reference")
    torch.testing.assert_close(loaded(x, c, cu, 11), _legacy_forward(enc, x, c, cu, 11), atol=1e-6, rtol=1e-5)
    # the same weights read as a new-style config are refused (the proj bias is unexpected)
    save_file(state, tmp_path / "mislabelled.safetensors",
              metadata={"nvfm_encoder_config": json.dumps(Mdl.asdict(Mdl.EncoderConfig(**old_cfg)))})
    with pytest.raises(RuntimeError, match="unexpected.*proj.bias"):
        Mdl.load_encoder(tmp_path / "mislabelled.safetensors")


def test_predictor_layout_and_packing():
    cu_ctx = torch.tensor([0, 2, 5], dtype=torch.int32)
    cu_tgt = torch.tensor([0, 3, 4], dtype=torch.int32)
    ctx_pos, tgt_pos, cu, L = Mdl.predictor_layout(cu_ctx, cu_tgt)
    assert ctx_pos.tolist() == [0, 1, 5, 6, 7] and tgt_pos.tolist() == [2, 3, 4, 8]
    assert cu.tolist() == [0, 5, 9] and L == 5
    torch.manual_seed(0)
    pred = Mdl.Predictor(Mdl.PredictorConfig(enc_dim=96, dim=64, depth=2, heads=2)).eval()
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(5, 96, generator=g)
    cc = torch.randint(0, 8, (5, 3), generator=g, dtype=torch.int32)
    tc = torch.randint(0, 8, (4, 3), generator=g, dtype=torch.int32)
    out = pred(ctx, cc, tc, Mdl.predictor_layout(cu_ctx, cu_tgt))
    assert out.shape == (4, 96)
    # volume 1 alone gives the same predictions
    one = pred(ctx[2:], cc[2:], tc[3:], Mdl.predictor_layout(torch.tensor([0, 3]), torch.tensor([0, 1])))
    torch.testing.assert_close(out[3:], one, atol=2e-5, rtol=1e-4)
    # predictions depend on the target position (mask tokens carry the position code)
    moved = tc.clone()
    moved[3] = (moved[3] + 3) % 8
    assert not torch.allclose(pred(ctx, cc, moved, Mdl.predictor_layout(cu_ctx, cu_tgt))[3], out[3])


def test_save_load_roundtrip_and_strict(tmp_path):
    enc = tiny_encoder(seed=3).eval()
    path = tmp_path / "enc" / "encoder.safetensors"
    Mdl.save_encoder(enc, path)
    side = json.loads((tmp_path / "enc" / "encoder.json").read_text())
    assert side["config"]["dim"] == 96
    enc2 = Mdl.load_encoder(path, "cpu")
    assert not enc2.training
    g = torch.Generator().manual_seed(4)
    x, c, cu = random_packed(g, [9, 4])
    torch.testing.assert_close(enc2(x, c, cu, 9), enc(x, c, cu, 9), atol=0, rtol=0)
    # a file whose weights do not match its config is refused, naming the file
    from safetensors.torch import load_file, save_file
    state = load_file(path)
    state.pop("blocks.norm.weight")
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad, metadata={"nvfm_encoder_config": json.dumps(side["config"])})
    with pytest.raises(RuntimeError, match="bad.safetensors.*missing.*blocks.norm.weight"):
        Mdl.load_encoder(bad)
    with pytest.raises(FileNotFoundError):
        Mdl.load_encoder(tmp_path / "nope.safetensors")


def test_encode_study_windows_and_whole_volume():
    rng = np.random.default_rng(0)
    reader = ArrayReader([synthetic_volume(rng, "MR", (18, 100, 90), "mr-0"),
                          synthetic_volume(rng, "CT", (30, 96, 112), "ct-0")])
    enc = tiny_encoder().eval()
    out = Mdl.encode_study(enc, reader, [0, 1], max_tokens=100)  # small max_tokens: several forwards
    assert [(o["volume_id"], o["window"]) for o in out] == [("mr-0", "mr"), ("ct-0", "brain"),
                                                            ("ct-0", "blood"), ("ct-0", "bone")]
    for o, i in zip(out, [0, 1, 1, 1]):
        vol = torch.from_numpy(np.ascontiguousarray(reader.window(i, o["window"])))
        tokens, coords, _ = patchify([vol], [torch.from_numpy(reader.volume(i)[1])])
        assert torch.equal(o["coords"], coords)  # every foreground token, whole volume, no crop
        assert o["emb"].shape == (len(coords), 96) and o["emb"].dtype == torch.float32
        x = Mdl.normalize_tokens(tokens, Mdl.WINDOWS.index(o["window"]))
        ref = enc(x, coords, torch.tensor([0, len(coords)], dtype=torch.int32), len(coords))
        torch.testing.assert_close(o["emb"], ref, atol=2e-5, rtol=1e-4)
    assert out[0]["family"] in ("T1", "T2", "FLAIR") and out[1]["family"] == "CT"
    assert not torch.allclose(out[1]["emb"], out[3]["emb"])  # windows differ


def test_normalization_constants():
    t = torch.full((2, 1024), 255, dtype=torch.uint8)
    x = Mdl.normalize_tokens(t, torch.tensor([0, 3]))
    assert abs(x[0, 0].item() - (1 - 0.3141) / 0.2623) < 1e-5
    assert abs(x[1, 0].item() - (1 - 0.2719) / 0.1875) < 1e-5


def test_synthetic_reader_windows():
    r = synthetic_reader(n=2)
    assert r.window(1, "blood").max() <= 255 and r.window(1, "bone").dtype == np.uint8
    with pytest.raises(ValueError):
        r.window(0, "brain")


@pytest.mark.parametrize("opts", [dict(gelu_approximate="tanh", ln_eps=1e-6, proj_bias=False),
                                  dict(gelu_approximate="none", ln_eps=1e-5, proj_bias=True)])
def test_flashblock_follows_the_architecture_options(opts):
    from nvfm.flashblock import FlashBlock
    torch.manual_seed(0)
    blk = Mdl.Block(48, 3, **opts)
    for p in blk.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    fused = FlashBlock(48, 3, mlp_chunk=5, **opts)
    fused.load_state_dict(blk.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 48, generator=g)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    want = blk(x, cu, 13)
    torch.testing.assert_close(fused(x, cu, 13), want, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fused(x.clone(), cu, 13), want, atol=2e-5, rtol=1e-4)
    # the option matters: the other GELU gives a different block
    other = Mdl.Block(48, 3, **{**opts, "gelu_approximate": "none" if opts["gelu_approximate"] == "tanh" else "tanh"})
    other.load_state_dict(blk.state_dict())
    assert not torch.allclose(other(x, cu, 13), want, atol=1e-6)


def _numpy_forward(sd, cfg, x, coords, lens):
    """The encoder written out in float64 numpy from the module docstring: patch embedding | fixed
    position code, pre-norm blocks with per-volume softmax attention, final LayerNorm."""
    P = {k: v.double().numpy() for k, v in sd.items()}
    c = coords.astype(np.float64)
    if cfg.pos_code == "official":  # per axis [sin f0, cos f0, sin f1, ...], f_j = 10000^(-2j / C)
        ch = 2 * int(np.ceil(cfg.pos_dim / 6))
        code = np.zeros((len(c), 3, ch))
        code[:, :, 0::2] = np.sin(c[:, :, None] * 10000.0 ** (-np.arange(0, ch, 2) / ch))
        code[:, :, 1::2] = np.cos(c[:, :, None] * 10000.0 ** (-np.arange(0, ch, 2) / ch))
        code = code.reshape(len(c), 3 * ch)[:, :cfg.pos_dim]
    else:  # [sin z, cos z, sin y, cos y, sin x, cos x], wavelengths 3 .. 96 patches
        f = cfg.pos_dim // 6
        ang = c[:, :, None] * 2 * np.pi / (3.0 * 32.0 ** (np.arange(f) / (f - 1)))
        code = np.concatenate([np.sin(ang), np.cos(ang)], -1).reshape(len(c), cfg.pos_dim)

    def ln(t, name):
        m, v = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
        return (t - m) / np.sqrt(v + cfg.ln_eps) * P[name + ".weight"] + P[name + ".bias"]

    def gelu(t):
        if cfg.gelu_approximate == "tanh":
            return 0.5 * t * (1 + np.tanh(np.sqrt(2 / np.pi) * (t + 0.044715 * t ** 3)))
        from scipy.special import erf
        return 0.5 * t * (1 + erf(t / np.sqrt(2)))

    h = np.concatenate([x @ P["patch_embed.weight"].T + P["patch_embed.bias"], code], 1)
    H, hd = cfg.heads, cfg.dim // cfg.heads
    cu = np.cumsum([0] + lens)
    for i in range(cfg.depth):
        b = f"blocks.blocks.{i}."
        qkv = (ln(h, b + "norm1") @ P[b + "qkv.weight"].T + P[b + "qkv.bias"]).reshape(len(h), 3, H, hd)
        a = np.zeros((len(h), H, hd))
        for s, e in zip(cu[:-1], cu[1:]):
            for j in range(H) if e > s else []:
                sc = qkv[s:e, 0, j] @ qkv[s:e, 1, j].T / np.sqrt(hd)
                w = np.exp(sc - sc.max(1, keepdims=True))
                a[s:e, j] = (w / w.sum(1, keepdims=True)) @ qkv[s:e, 2, j]
        h = h + a.reshape(len(h), cfg.dim) @ P[b + "proj.weight"].T + (P[b + "proj.bias"] if cfg.proj_bias else 0)
        h = h + gelu(ln(h, b + "norm2") @ P[b + "fc1.weight"].T + P[b + "fc1.bias"]) @ P[b + "fc2.weight"].T \
            + P[b + "fc2.bias"]
    return ln(h, "blocks.norm")


@pytest.mark.parametrize("arch", [dict(pos_dim=30), dict(pos_dim=20), dict(Mdl.LEGACY_ARCH, pos_dim=18)])
def test_forward_equals_a_numpy_reimplementation(arch):
    """Both architectures (the authors' options and nvfm-v1), packed volumes one of them empty,
    every attention implementation, against float64 numpy."""
    cfg = Mdl.EncoderConfig(dim=48, depth=2, heads=3, **arch)
    torch.manual_seed(0)
    enc = Mdl.Encoder(cfg).eval()
    with torch.no_grad():
        for p in enc.parameters():  # non-trivial LayerNorms, biases, attention logits
            p.add_(0.2 * torch.randn_like(p))
    rng = np.random.default_rng(0)
    lens = [5, 0, 13, 1]
    x, coords = rng.normal(size=(sum(lens), 1024)), rng.integers(0, 40, size=(sum(lens), 3))
    want = _numpy_forward(enc.state_dict(), cfg, x, coords, lens)
    cu = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32)
    for impl in ("reference", "sdpa", "auto"):
        enc.set_attention(impl)
        with torch.no_grad():
            got = enc(torch.from_numpy(x).float(), torch.from_numpy(coords).int(), cu, max(lens))
        np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=2e-5, err_msg=impl)


@pytest.mark.parametrize("crop", ["pad", "centre"])
def test_encode_study_packing_gives_each_window_what_it_gets_alone(crop):
    """Volumes and windows packed into shared forwards (a volume without any token, odd shapes,
    max_tokens from everything-in-one to one-window-per-forward) get the embeddings each window
    gets encoded alone, on the coords of its own (cropped or padded) token grid."""
    from nvfm.tokenize import patchify_reference
    rng = np.random.default_rng(3)
    items = [synthetic_volume(rng, "MR", (18, 100, 90), "mr-0"), synthetic_volume(rng, "CT", (9, 33, 47), "ct-empty"),
             synthetic_volume(rng, "CT", (30, 96, 112), "ct-0"), synthetic_volume(rng, "MR", (6, 40, 33), "mr-1")]
    items[1][2][:] = 0
    reader = ArrayReader(items)
    enc = tiny_encoder().eval()
    for max_tokens in (10 ** 9, 150, 1):
        out = Mdl.encode_study(enc, reader, [0, 1, 2, 3], max_tokens=max_tokens, crop=crop)
        want = [(i, w) for i in range(4) for w in Mdl.volume_windows(reader.volumes[i])]
        assert [(o["volume_id"], o["window"]) for o in out] == [(reader.volumes[i]["volume_id"], w) for i, w in want]
        for o, (i, w) in zip(out, want):
            vol, mask = reader.window(i, w), reader.volume(i)[1]
            if crop == "centre":  # per axis start (n % p) // 2, whole patches
                sl = tuple(slice((n % p) // 2, (n % p) // 2 + n // p * p) for n, p in zip(mask.shape, (4, 16, 16)))
                vol, mask = vol[sl], mask[sl]
            tok, coords, _ = patchify_reference([torch.from_numpy(np.ascontiguousarray(vol))],
                                                [torch.from_numpy(np.ascontiguousarray(mask))])
            assert torch.equal(o["coords"], coords) and o["emb"].shape == (len(coords), 96)
            if len(coords):
                enc.set_attention("reference")
                alone = enc(Mdl.normalize_tokens(tok, Mdl.WINDOWS.index(w)), coords,
                            torch.tensor([0, len(coords)], dtype=torch.int32), len(coords))
                enc.set_attention("auto")
                torch.testing.assert_close(o["emb"], alone, atol=2e-5, rtol=1e-4)
        assert sum(len(o["coords"]) for o in out[1:4]) == 0 and len(out[0]["coords"]) and len(out[7]["coords"])


def _dense_block_diagonal_forward(enc, x, coords, cu):
    """The encoder in float64 with plain dense attention over all N tokens and an explicit
    block-diagonal mask (token i sees token j iff they lie in the same cu_seqlens segment)."""
    cfg, P = enc.config, {k: v.double() for k, v in enc.state_dict().items()}
    N, H = x.shape[0], cfg.heads
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    mask = seg[:, None] == seg[None, :]
    code = Mdl.position_code(coords, cfg.pos_dim, cfg.pos_code).double()
    h = torch.cat([x.double() @ P["patch_embed.weight"].T + P["patch_embed.bias"], code], -1)

    def ln(t, n):
        return F.layer_norm(t, (cfg.dim,), P[n + ".weight"], P[n + ".bias"], cfg.ln_eps)
    for i in range(cfg.depth):
        b = f"blocks.blocks.{i}."
        q, k, v = (ln(h, b + "norm1") @ P[b + "qkv.weight"].T + P[b + "qkv.bias"]).view(N, 3, H, cfg.dim // H).unbind(1)
        s = torch.einsum("qhd,khd->hqk", q, k) / (cfg.dim // H) ** 0.5
        a = torch.einsum("hqk,khd->qhd", s.masked_fill(~mask, float("-inf")).softmax(-1), v).reshape(N, cfg.dim)
        h = h + a @ P[b + "proj.weight"].T
        h = h + F.gelu(ln(h, b + "norm2") @ P[b + "fc1.weight"].T + P[b + "fc1.bias"],
                       approximate=cfg.gelu_approximate) @ P[b + "fc2.weight"].T + P[b + "fc2.bias"]
    return ln(h, "blocks.norm")


@pytest.mark.parametrize("dim,heads", [(48, 3), (64, 1), (96, 12)])
def test_encoder_edge_inputs_match_a_dense_block_diagonal_attention(dim, heads):
    """A single token, one window's tokens only, positions at and beyond the released grid's edge,
    empty volumes first / between / last in a varlen batch, an all-empty batch and a max_seqlen
    larger than needed: every attention implementation against the dense masked computation."""
    torch.manual_seed(0)
    enc = Mdl.Encoder(Mdl.EncoderConfig(dim=dim, depth=2, heads=heads)).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.2 * torch.randn_like(p))
    edge = torch.tensor([[0, 0, 0], [127, 191, 191], [31, 47, 47], [0, 191, 0], [1000, 5000, 5000]])
    cases = {"single token": [1], "one window": [4], "empty first": [0, 5], "empty last": [5, 0],
             "empty between": [3, 0, 0, 7, 0], "single beside long": [1, 40], "all empty": [0, 0]}
    for name, lens in cases.items():
        n = sum(lens)
        x, coords = torch.randn(n, 1024), edge[torch.arange(n) % len(edge)].int()
        cu = torch.tensor([0] + lens).cumsum(0).int()
        want = _dense_block_diagonal_forward(enc, x, coords, cu)
        for impl in ("reference", "sdpa", "ours", "auto"):
            enc.set_attention(impl)
            for max_seqlen in (max(lens), max(lens) + 7):
                with torch.no_grad():
                    got = enc(x, coords, cu, max_seqlen)
                assert got.shape == (n, dim), (name, impl)
                np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=0, atol=5e-5,
                                           err_msg=f"{name} {impl} max_seqlen={max_seqlen}")


def test_save_encoder_failure_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    """A failed write (disk full in safetensors, or the destination a directory) left
    `<path>.tmp` behind, a whole encoder's size per failed try."""
    import safetensors.torch as st
    path = tmp_path / "enc.safetensors"
    Mdl.save_encoder(tiny_encoder(seed=1), path)
    old = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    real = st.save_file

    def full(state, filename, metadata=None):
        real(state, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(st, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        Mdl.save_encoder(tiny_encoder(seed=2), path)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == old
    (tmp_path / "sub" / "dir.safetensors").mkdir(parents=True)
    with pytest.raises(OSError):
        Mdl.save_encoder(tiny_encoder(seed=2), tmp_path / "sub" / "dir.safetensors")
    assert os.listdir(tmp_path / "sub") == ["dir.safetensors"]


def test_encoder_file_of_an_unknown_format_is_refused(tmp_path):
    """A file tagged with a format this code does not know (a later nvfm's, whose config fields
    may mean something else, as v2 changed v1's) loaded as if it were v2."""
    from safetensors.torch import save_file
    enc = tiny_encoder()
    state = {k: v.contiguous() for k, v in enc.state_dict().items()}
    path = tmp_path / "later.safetensors"
    save_file(state, path, metadata={"nvfm_encoder_config": json.dumps(Mdl.asdict(enc.config)),
                                     "format": "nvfm-encoder-v9"})
    with pytest.raises(ValueError, match=r"later.safetensors: encoder format 'nvfm-encoder-v9' is not one"):
        Mdl.load_encoder(path)
    save_file(state, path, metadata={"nvfm_encoder_config": json.dumps(Mdl.asdict(enc.config)), "format": "pt"})
    assert Mdl.load_encoder(path).config == enc.config   # safetensors' generic tag is not ours: read as before
