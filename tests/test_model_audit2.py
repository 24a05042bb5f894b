"""Audit of nvfm/model.py and nvfm/official.py against independent computations: hand-worked
position codes, the spec's normalisation constants, the encoder and predictor re-implemented with
torch.nn.MultiheadAttention one volume at a time, FLOPs counted by torch's FlopCounterMode,
encode_study's token set brute-forced in numpy, and the authors' layout's configs."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nvfm import model as Mdl
from nvfm import official as O
from nvfm.loader import ArrayReader, synthetic_volume

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "neurovfm_official")


def perturbed(module, seed=0, scale=0.2):
    """Non-trivial LayerNorms, biases and attention logits (init leaves them flat)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module.eval()


# ---------------------------------------------------------------------------------------
# position code

def test_official_position_code_by_hand():
    """PositionalEncoding3D(30) at (z, y, x) = (2, 5, 11): per axis 10 channels [sin(p f0), cos(p f0),
    sin(p f1), ...], f_k = 10000^(-k/10) for k = 0, 2, 4, 6, 8, blocks [z | y | x] (SPEC.md section 2)."""
    z, y, x = 2, 5, 11
    want = []
    for p in (z, y, x):
        for k in (0, 2, 4, 6, 8):
            f = 10000.0 ** (-k / 10)
            want += [math.sin(p * f), math.cos(p * f)]
    got = Mdl.position_code(torch.tensor([[z, y, x]], dtype=torch.int32), 30, "official")[0]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=0, atol=2e-6)
    # channel 20 is sin(x * 1) and channel 1 cos(z * 1): the axis order is z, y, x
    assert abs(got[20].item() - math.sin(11)) < 1e-6 and abs(got[1].item() - math.cos(2)) < 1e-6


def test_official_position_code_truncated_by_hand():
    """pos_dim 20: 2 * ceil(20 / 6) = 8 channels per axis (f_k = 10000^(-k/8), k = 0, 2, 4, 6), 24
    in all, the first 20 kept: z and y whole, only x's first 4 (positional-encodings' truncation)."""
    coords = torch.tensor([[0, 0, 0], [7, 1, 3], [1, 30, 2]], dtype=torch.int32)
    got = Mdl.position_code(coords, 20, "official").double().numpy()
    for row, c in zip(got, coords.tolist()):
        full = []
        for p in c:
            for k in (0, 2, 4, 6):
                full += [math.sin(p * 10000.0 ** (-k / 8)), math.cos(p * 10000.0 ** (-k / 8))]
        np.testing.assert_allclose(row, full[:20], rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------
# intensity normalisation

# SPEC.md section 2, "(ref) Intensity normalisation after /255, order [MRI, CT-brain, CT-blood,
# CT-bone]": means [0.3141, 0.4139, 0.3184, 0.2719], stds [0.2623, 0.4059, 0.3605, 0.1875]
SPEC_MEAN = {"mr": 0.3141, "brain": 0.4139, "blood": 0.3184, "bone": 0.2719}
SPEC_STD = {"mr": 0.2623, "brain": 0.4059, "blood": 0.3605, "bone": 0.1875}


def test_normalize_tokens_is_the_spec_per_window():
    levels = np.arange(256)
    u8 = torch.from_numpy(np.tile(levels, (4, 4))[:, :1024].astype(np.uint8))  # every level, 4 rows
    for w in ("mr", "brain", "blood", "bone"):
        want = (levels / 255.0 - SPEC_MEAN[w]) / SPEC_STD[w]
        i = Mdl.WINDOWS.index(w)
        for idx in (i, torch.full((4,), i)):  # one index for all rows, or one per row
            got = Mdl.normalize_tokens(u8, idx)
            np.testing.assert_allclose(got[:, :256].double().numpy(), np.tile(want, (4, 1)), rtol=0, atol=2e-6)
    # a per-row index applies each row's own window
    mixed = Mdl.normalize_tokens(torch.full((4, 1024), 200, dtype=torch.uint8), torch.tensor([3, 0, 2, 1]))
    want = [(200 / 255 - SPEC_MEAN[w]) / SPEC_STD[w] for w in ("bone", "mr", "blood", "brain")]
    np.testing.assert_allclose(mixed[:, 0].double().numpy(), want, rtol=0, atol=2e-6)


# ---------------------------------------------------------------------------------------
# encoder and predictor, re-implemented with nn.MultiheadAttention one volume at a time

def ref_code(coords, pos_dim):
    """float64 numpy PositionalEncoding3D at integer positions (per axis [sin, cos] interleaved)."""
    ch = 2 * math.ceil(pos_dim / 6)
    f = 10000.0 ** (-np.arange(0, ch, 2) / ch)
    ang = np.asarray(coords, np.float64)[:, :, None] * f
    return torch.from_numpy(np.stack([np.sin(ang), np.cos(ang)], -1).reshape(len(ang), 3 * ch)[:, :pos_dim]).float()


def ref_stack(h, blocks, final_norm, heads):
    """One sequence (L, dim) through pre-norm blocks (LayerNorm eps 1e-6, tanh GELU, no proj bias:
    the authors' choices) with nn.MultiheadAttention holding the block's qkv / proj weights."""
    dim = h.shape[-1]
    for b in blocks:
        mha = nn.MultiheadAttention(dim, heads, bias=True, batch_first=True)
        with torch.no_grad():
            mha.in_proj_weight.copy_(b.qkv.weight)
            mha.in_proj_bias.copy_(b.qkv.bias)
            mha.out_proj.weight.copy_(b.proj.weight)
            mha.out_proj.bias.zero_()
        u = F.layer_norm(h, (dim,), b.norm1.weight, b.norm1.bias, 1e-6)[None]
        h = h + mha(u, u, u, need_weights=False)[0][0]
        u = F.layer_norm(h, (dim,), b.norm2.weight, b.norm2.bias, 1e-6)
        h = h + F.linear(F.gelu(F.linear(u, b.fc1.weight, b.fc1.bias), approximate="tanh"), b.fc2.weight, b.fc2.bias)
    return F.layer_norm(h, (dim,), final_norm.weight, final_norm.bias, 1e-6)


@pytest.mark.parametrize("impl", ["reference", "sdpa", "ours", "auto"])
def test_packed_encoder_equals_multihead_attention_per_volume(impl):
    """Volumes packed with cu_seqlens (an empty one among them, a 1-token one, max_seqlen above the
    longest) give each volume what nn.MultiheadAttention gives it alone: no attention across
    volumes, no padding attended."""
    torch.manual_seed(0)
    enc = perturbed(Mdl.Encoder(Mdl.EncoderConfig(dim=48, depth=2, heads=4)))
    enc.set_attention(impl)
    g = torch.Generator().manual_seed(1)
    lens = [6, 0, 1, 17, 9]
    x = torch.randn(sum(lens), 1024, generator=g)
    coords = torch.randint(0, 40, (sum(lens), 3), generator=g, dtype=torch.int32)
    cu = torch.tensor([0] + lens).cumsum(0).int()
    with torch.no_grad():
        got = enc(x, coords, cu, max(lens) + 5)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
            if e > s:
                emb = F.linear(x[s:e], enc.patch_embed.weight, enc.patch_embed.bias)
                h = torch.cat([emb, ref_code(coords[s:e], 30)], -1)
                want = ref_stack(h, enc.blocks.blocks, enc.blocks.norm, 4)
                torch.testing.assert_close(got[s:e], want, atol=3e-5, rtol=1e-4)


def test_predictor_equals_multihead_attention_per_volume():
    """Predictor: volume b's sequence is [embed(context latents) | code(context position)] followed by
    [mask token | code(target position)]; only the mask rows are read out through the head. Checked
    against nn.MultiheadAttention per volume, with a volume without targets and one without context."""
    torch.manual_seed(0)
    pcfg = Mdl.PredictorConfig(enc_dim=40, dim=54, depth=2, heads=3, pos_dim=24)
    pred = perturbed(Mdl.Predictor(pcfg))
    g = torch.Generator().manual_seed(2)
    n_ctx, n_tgt = [4, 3, 0, 7], [5, 0, 2, 1]
    ctx = torch.randn(sum(n_ctx), 40, generator=g)
    cc = torch.randint(0, 30, (sum(n_ctx), 3), generator=g, dtype=torch.int32)
    tc = torch.randint(0, 30, (sum(n_tgt), 3), generator=g, dtype=torch.int32)
    cu_c, cu_t = torch.tensor([0] + n_ctx).cumsum(0), torch.tensor([0] + n_tgt).cumsum(0)
    with torch.no_grad():
        got = pred(ctx, cc, tc, Mdl.predictor_layout(cu_c, cu_t))
        assert got.shape == (sum(n_tgt), 40)
        for b in range(4):
            cs, ts = slice(int(cu_c[b]), int(cu_c[b + 1])), slice(int(cu_t[b]), int(cu_t[b + 1]))
            if n_tgt[b] == 0:
                continue
            h_ctx = torch.cat([F.linear(ctx[cs], pred.embed.weight, pred.embed.bias), ref_code(cc[cs], 24)], -1)
            h_tgt = torch.cat([pred.mask_token.expand(n_tgt[b], -1), ref_code(tc[ts], 24)], -1)
            h = ref_stack(torch.cat([h_ctx, h_tgt]), pred.blocks.blocks, pred.blocks.norm, 3)
            want = F.linear(h[n_ctx[b]:], pred.head.weight, pred.head.bias)
            torch.testing.assert_close(got[ts], want, atol=3e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# FLOPs

def test_transformer_flops_by_hand_and_by_torch_counter():
    """dim 2, depth 1, MLP 4x, one sequence of 3 tokens, by hand: qkv 3*2*6*2 = 72, proj 3*2*2*2 = 24,
    fc1 3*2*8*2 = 96, fc2 96, Q K^T 3*3*2*2 = 36, P V 36: 360. Then a real stack under torch's
    FlopCounterMode (reference attention: its einsums are counted as bmm; sequences of >= 2 tokens,
    einsum turns a 1-token product into a multiply that the counter skips)."""
    from torch.utils.flop_counter import FlopCounterMode
    assert Mdl.transformer_flops(3, [3], 2, 1, 4.0) == 360
    t = Mdl.Transformer(48, 2, 3, 4.0)
    for b in t.blocks:
        b.attn_impl = "reference"
    lens = [5, 0, 13, 2]
    cu = torch.tensor([0] + lens).cumsum(0).int()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        t(torch.randn(sum(lens), 48), cu, 13)
    assert Mdl.transformer_flops(sum(lens), lens, 48, 2, 4.0) == fc.get_total_flops()


# ---------------------------------------------------------------------------------------
# encode_study

def brute_tokens(vol, mask, min_fg, crop):
    """numpy brute force: the (coords, tokens) encode_study should encode for one window. crop
    "pad": zero-pad each axis up to whole 4 x 16 x 16 patches; "centre": keep per axis
    [(n % p) // 2, + (n // p) * p). A cell is kept when its foreground voxel count (padding is
    background) is >= ceil(min_fg * 1024)."""
    P = (4, 16, 16)
    if crop == "centre":
        sl = tuple(slice((n % p) // 2, (n % p) // 2 + (n // p) * p) for n, p in zip(mask.shape, P))
        vol, mask = vol[sl], mask[sl]
    grid = [-(-n // p) for n, p in zip(mask.shape, P)]
    need = math.ceil(min_fg * 1024 - 1e-9)
    coords, toks = [], []
    for z in range(grid[0]):
        for y in range(grid[1]):
            for x in range(grid[2]):
                cell = np.zeros(P, np.float32)
                m = np.zeros(P, bool)
                v = vol[4 * z:4 * z + 4, 16 * y:16 * y + 16, 16 * x:16 * x + 16]
                cell[:v.shape[0], :v.shape[1], :v.shape[2]] = v
                mm = mask[4 * z:4 * z + 4, 16 * y:16 * y + 16, 16 * x:16 * x + 16]
                m[:mm.shape[0], :mm.shape[1], :mm.shape[2]] = mm != 0
                if m.sum() >= need:
                    coords.append((z, y, x))
                    toks.append(cell.reshape(-1))
    return np.array(coords, np.int64).reshape(-1, 3), np.array(toks, np.float32).reshape(-1, 1024)


@pytest.mark.parametrize("crop,min_fg", [("pad", 0.5), ("pad", 1.0), ("centre", 1.0), ("centre", 0.25)])
def test_encode_study_encodes_every_token_once_at_its_grid_position(crop, min_fg):
    """Each (volume, window) entry holds exactly the brute-force token set (MR once, CT once per
    window brain / blood / bone), its coords the grid positions of those voxels, and its features
    those of the encoder run on that volume's tokens alone, for every max_tokens (one forward, a
    few, one window per forward): chunking never splits a volume's attention context. A volume with
    no foreground and one smaller than a patch give empty entries."""
    rng = np.random.default_rng(7)
    items = [synthetic_volume(rng, "MR", (13, 110, 90), "mr-0"), synthetic_volume(rng, "CT", (22, 85, 101), "ct-0"),
             synthetic_volume(rng, "MR", (10, 40, 40), "mr-empty"), synthetic_volume(rng, "CT", (3, 40, 40), "ct-thin")]
    items[2][2][:] = 0
    reader = ArrayReader(items)
    torch.manual_seed(0)
    enc = perturbed(Mdl.Encoder(Mdl.EncoderConfig.preset("tiny")))
    enc.set_attention("reference")
    want = []
    for i in range(4):
        for w in Mdl.volume_windows(reader.volumes[i]):
            c, t = brute_tokens(np.asarray(reader.window(i, w)), items[i][2], min_fg, crop)
            e = torch.zeros(0, 96)
            if len(c):
                x = (torch.from_numpy(t) / 255.0 - SPEC_MEAN[w]) / SPEC_STD[w]   # SPEC.md section 2
                with torch.no_grad():
                    e = enc(x, torch.from_numpy(c).int(), torch.tensor([0, len(c)], dtype=torch.int32), len(c))
            want.append((reader.volumes[i]["volume_id"], w, c, e))
    assert sum(len(c) for *_, c, _ in want[:4]) > 20   # the check is not vacuous
    sizes = sorted(len(c) for *_, c, _ in want)
    for max_tokens in (10 ** 9, sizes[-1] + 1, 1):
        out = Mdl.encode_study(enc, reader, [0, 1, 2, 3], min_fg_fraction=min_fg, max_tokens=max_tokens, crop=crop)
        assert len(out) == len(want) == 8
        for o, (vid, w, c, e) in zip(out, want):
            assert (o["volume_id"], o["window"]) == (vid, w)
            np.testing.assert_array_equal(o["coords"].numpy(), c, err_msg=f"{vid} {w}")
            assert o["coords"].dtype == torch.int32 and o["emb"].shape == (len(c), 96)
            torch.testing.assert_close(o["emb"], e, atol=2e-5, rtol=1e-4)
    assert all(len(c) == 0 for vid, _, c, _ in want if vid in ("mr-empty", "ct-thin") and crop == "centre")


# ---------------------------------------------------------------------------------------
# the authors' layout

@pytest.fixture(scope="module")
def small():
    return torch.load(os.path.join(FIX, "official_small.pt"), weights_only=True)


def test_wrapped_config_contradicting_config_json_is_refused(small, tmp_path):
    """A {"state_dict", "config"} file carries its own config; a config.json beside it with another
    head count (or depth ...) was used silently: the weights loaded as a 1-head encoder, other
    features. Two configs that disagree are now refused naming both; agreeing ones load."""
    d = tmp_path / "rel"
    d.mkdir()
    torch.save({"state_dict": small["state_dict"], "config": small["config"]}, d / "pytorch_model.bin")
    other = json.loads(json.dumps(small["config"]))
    other["params"]["num_heads"] = 1
    (d / "config.json").write_text(json.dumps(other))
    with pytest.raises(O.ConversionError, match=r"config.json.*contradicts the config in .*pytorch_model.bin.*heads"):
        O.load_official(d)
    (d / "config.json").write_text(json.dumps(small["config"]))
    enc = O.load_official(d)
    assert enc.config.heads == 3
    with torch.no_grad():
        out = enc(small["tokens"], small["coords"], small["cu_seqlens"], int(small["max_seqlen"]))
    assert (out - small["output"]).abs().max() < 1e-5


def test_configless_hidden_size_of_any_ratio_loads(tmp_path):
    """Without config.json the MLP ratio is read off fc1's shape as hidden / dim; for a hidden size
    such as 230 at dim 224, int(224 * (230 / 224)) is 229, so a valid file was refused as
    'wrong shapes'. Every hidden size of a configless file now gives back its own."""
    torch.manual_seed(0)
    enc = Mdl.Encoder(Mdl.EncoderConfig(dim=224, depth=1, heads=4, mlp_ratio=1.03))
    assert enc.blocks.blocks[0].fc1.out_features == 230
    d = tmp_path / "bare"
    d.mkdir()
    torch.save(O.ours_to_official(enc.state_dict()), d / "pytorch_model.bin")
    back = O.load_official(d, heads=4)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), enc.state_dict().values()))
    O.save_official(back, tmp_path / "with_config")   # and through config.json, with its head count
    again = O.load_official(tmp_path / "with_config")
    assert again.config.heads == 4 and again.blocks.blocks[0].fc1.out_features == 230
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), enc.state_dict().values()))
    for dim, hidden in [(96, 384), (224, 230), (42, 51), (768, 3072), (1024, 2730)]:
        state = {"norm.weight": torch.zeros(dim), "token_embed.proj.weight": torch.zeros(dim - 30, 1024),
                 "blocks.0.mlp.fc1.weight": torch.zeros(hidden, dim)}
        cfg = O.infer_official_config(state, heads=1)
        assert int(cfg.dim * cfg.mlp_ratio) == hidden, (dim, hidden)


def test_encoder_and_predictor_flops_equal_torch_counter():
    """train_jepa.py's step count (the MFU and the supervised bound's budget) took the patch embedding as
    1024 -> dim (it is -> dim - pos_dim), and the predictor's context embedding and head as running on
    every predictor token (the embedding runs on the context, the head on the targets only): +5.7% for
    the tiny encoder and +1.7% for its predictor. Against FlopCounterMode on real forwards (reference
    attention, sequences of >= 2 tokens)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    ec = Mdl.EncoderConfig(dim=48, depth=2, heads=3, pos_dim=12)
    pc = Mdl.PredictorConfig(enc_dim=48, dim=36, depth=2, heads=2, pos_dim=12)
    enc, pred = Mdl.Encoder(ec), Mdl.Predictor(pc)
    enc.set_attention("reference")
    pred.set_attention("reference")
    lens = [5, 13, 2]
    coords = torch.cat([torch.stack(torch.meshgrid(torch.arange(n), torch.zeros(1, dtype=torch.long),
                                                    torch.zeros(1, dtype=torch.long), indexing="ij"), -1).reshape(-1, 3)
                        for n in lens])
    cu = torch.tensor([0] + lens).cumsum(0).int()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        enc(torch.randn(sum(lens), ec.patch_dim), coords, cu, max(lens))
    assert Mdl.encoder_flops(ec, lens) == fc.get_total_flops()
    n_ctx, n_tgt = [3, 7, 2], [4, 2, 6]
    cu_ctx, cu_tgt = (torch.tensor([0] + n).cumsum(0) for n in (n_ctx, n_tgt))
    layout = Mdl.predictor_layout(cu_ctx, cu_tgt)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        pred(torch.randn(sum(n_ctx), 48), torch.zeros(sum(n_ctx), 3, dtype=torch.long),
             torch.ones(sum(n_tgt), 3, dtype=torch.long), layout)
    seq = [c + t for c, t in zip(n_ctx, n_tgt)]
    assert layout[2].diff().tolist() == seq
    assert Mdl.predictor_flops(pc, n_ctx, seq) == fc.get_total_flops()
