"""Encoder / predictor / encoder file format / encode_study (tiny models, CPU)."""
import json

import numpy as np
import pytest
import torch

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


def test_position_code_axis_permutation_and_any_size():
    coords = torch.tensor([[0, 0, 0], [3, 7, 11], [40, 2, 95], [200, 150, 5]], dtype=torch.int32)
    p = Mdl.position_code(coords)
    assert p.shape == (4, 30) and torch.isfinite(p).all()
    blocks = p.reshape(4, 3, 10)
    perm = [2, 0, 1]
    # permuting the grid axes permutes the per-axis blocks of the code: same scale on every axis
    torch.testing.assert_close(Mdl.position_code(coords[:, perm]).reshape(4, 3, 10), blocks[:, perm])
    # distinct positions within a large grid get distinct codes
    grid = torch.stack(torch.meshgrid(*(torch.arange(48),) * 3, indexing="ij"), -1).reshape(-1, 3)
    codes = Mdl.position_code(grid.to(torch.int32))
    d = torch.cdist(codes[:2000], codes[:2000])
    d.fill_diagonal_(1.0)
    assert d.min() > 1e-3
    with pytest.raises(ValueError):
        Mdl.position_code(coords, pos_dim=32)


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
