"""train_jepa.py's optional speed features, checked on CPU: activation checkpointing gives the
same gradients as a plain backward, and torch.compile traces the encoder + predictor with
our attention kernel as ONE graph (no graph breaks) and matches eager outputs and gradients.
"""
import json

import pytest
import torch

from nvfm import ops
from nvfm.model import Encoder, EncoderConfig, Predictor, PredictorConfig, predictor_layout


def _packed(lens, seed=0, dim=1024):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    n = int(cu[-1])
    return torch.randn(n, dim, generator=g), torch.randint(0, 12, (n, 3), generator=g), cu


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("impl", ["sdpa", "ours"])
def test_activation_checkpointing_same_gradients(impl):
    if impl == "ours" and not ops.has_kernel("varlen_attn_fwd", "cpu"):
        pytest.skip("compiled extension not built")
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig(dim=96, depth=3, heads=3, pos_dim=30))
    enc.set_attention(impl)
    x, coords, cu = _packed([1, 40, 7, 120], seed=1)

    def loss():
        return enc(x, coords, cu, 120).square().mean()

    plain = _grads(enc, loss)
    enc.blocks.grad_checkpointing = True
    ckpt = _grads(enc, loss)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        # recomputation is the same arithmetic: equal up to float reassociation only
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_torch_compile_one_graph_and_matches_eager():
    if not ops.has_kernel("varlen_attn_fwd", "cpu"):
        pytest.skip("compiled extension not built (compile uses the fake impls of our ops)")
    torch.manual_seed(0)
    ecfg = EncoderConfig(dim=64, depth=2, heads=2, pos_dim=30)
    enc = Encoder(ecfg)
    pred = Predictor(PredictorConfig(enc_dim=64, dim=48, depth=1, heads=2, pos_dim=30))
    for m in (enc, pred):
        m.set_attention("ours")
    x, coords, cu = _packed([5, 33, 60], seed=2)
    # context = every other token, target = the rest, per volume
    ctx = torch.arange(0, x.shape[0], 2)
    tgt = torch.arange(1, x.shape[0], 2)
    vol = torch.repeat_interleave(torch.arange(3), cu.diff().long())
    cu_ctx = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(vol[ctx], minlength=3).cumsum(0)])
    cu_tgt = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(vol[tgt], minlength=3).cumsum(0)])
    layout = predictor_layout(cu_ctx, cu_tgt)
    max_ctx = int(cu_ctx.diff().max())

    def step(e, p):
        z = e(x[ctx], coords[ctx], cu_ctx.to(torch.int32), max_ctx)
        return p(z, coords[ctx], coords[tgt], layout)

    explained = torch._dynamo.explain(step)(enc, pred)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    eager = step(enc, pred)
    loss_e = eager.square().mean()
    params = list(enc.parameters()) + list(pred.parameters())
    g_e = torch.autograd.grad(loss_e, params)
    torch._dynamo.reset()
    compiled = torch.compile(step, dynamic=True)
    out = compiled(enc, pred)
    g_c = torch.autograd.grad(out.square().mean(), params)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_train_jepa_compile_and_checkpointing_end_to_end(tmp_path):
    """train_jepa.py --compile=True --grad_checkpointing=True trains the same model as the
    plain run (same losses, weights equal up to float reassociation)."""
    if not ops.has_kernel("varlen_attn_fwd", "cpu"):
        pytest.skip("compiled extension not built")
    from test_train_jepa import run, weights
    from nvfm.loader import write_synthetic_shards
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=4, seed=1, shape=(16, 64, 64))
    extra = ["--max_steps=3", "--log_interval=1"]
    run(extra, str(tmp_path / "plain"), shards)
    run(extra + ["--compile=True", "--grad_checkpointing=True"], str(tmp_path / "fast"), shards)
    a, b = weights(str(tmp_path / "plain" / "ckpt.pt")), weights(str(tmp_path / "fast" / "ckpt.pt"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    la = [json.loads(l) for l in open(tmp_path / "plain" / "log.jsonl")]
    lb = [json.loads(l) for l in open(tmp_path / "fast" / "log.jsonl")]
    la, lb = [r["loss"] for r in la if "loss" in r], [r["loss"] for r in lb if "loss" in r]
    assert len(la) == 3 and len(lb) == 3
    assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.parametrize("setting, named", [("--context_drop=1.0", "mask config: drop"),
                                            ("--context_ratio_mr=1.5", "mask config: ratio_mr"),
                                            ("--max_patches=0", "mask config: max_patches"),
                                            ("--seed=-1", "seed must be"), ("--global_batch=0", "global batch must be"),
                                            ("--predictor_dim=30", "predictor: pos_dim 30")])
def test_train_jepa_refuses_mask_settings_out_of_range(tmp_path, setting, named):
    """--context_drop=1.0 (one context token per volume), --context_ratio_mr=1.5 (one target token),
    --max_patches=0, --seed=-1 and --global_batch=0 (the batch stream), --predictor_dim=30 (no room beside
    the 30-d position code; these were tracebacks, exit 2): exit 1, one line on stderr naming the setting,
    nothing written."""
    import os
    import subprocess
    import sys

    from nvfm.loader import write_synthetic_shards
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=2, seed=0, shape=(16, 64, 64))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=root, NVFM_QUIET="1", OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "train_jepa.py", "config/jepa_tiny.py", f"--shards={shards}", f"--out_dir={out}",
                        "--max_steps=1", "--num_workers=0", "--global_batch=2", setting],  # the setting given last wins
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    err = p.stderr.strip()
    assert p.returncode == 1 and len(err.splitlines()) == 1, (p.returncode, err[-1500:])
    assert err.startswith(f"train_jepa.py: error: {named}"), err
    assert not out.exists()
