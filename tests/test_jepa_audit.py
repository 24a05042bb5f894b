"""The Vol-JEPA step as train_jepa.py wires it, on a real loader batch, against a brute force that runs
every volume alone: each target's prediction and teacher target, the loss (smooth L1 over target
tokens only), its gradients, and that no target token reaches the student or the predictor."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nvfm import masks as M
from nvfm.loader import JepaBatches, synthetic_reader
from nvfm.model import Encoder, EncoderConfig, Predictor, PredictorConfig, normalize_tokens


@pytest.fixture(scope="module")
def setup():
    reader = synthetic_reader(n=6, seed=1, shape=(30, 150, 140))  # partial patches on every axis
    b = JepaBatches(reader, range(6), global_batch=4, seed=3, mask_config=M.MaskConfig(max_patches=5))[2]
    torch.manual_seed(0)
    cfg = EncoderConfig.preset("tiny")
    student, teacher = Encoder(cfg), Encoder(cfg)
    teacher.load_state_dict(student.state_dict())
    predictor = Predictor(PredictorConfig(enc_dim=cfg.dim, dim=64, depth=2, heads=2, pos_dim=cfg.pos_dim))
    return b, student, predictor, teacher


def packed_step(b, x, student, predictor, teacher):
    """train_jepa.py's forward: teacher on all tokens, parameter-free LayerNorm, targets at
    tgt_index; student on ctx_index; predictor on collate's layout; smooth L1 mean over targets."""
    ctx, tgt, coords = b["ctx_index"], b["tgt_index"], b["coords"]
    with torch.no_grad():
        h = teacher(x, coords, b["cu_seqlens"], b["max_seqlen"])
        target = F.layer_norm(h, (h.shape[-1],))[tgt]
    z = student(x[ctx], coords[ctx], b["cu_ctx"], b["max_ctx"])
    pred = predictor(z, coords[ctx], coords[tgt], (b["pred_ctx_pos"], b["pred_tgt_pos"], b["pred_cu"], b["pred_max"]))
    loss = F.smooth_l1_loss(pred, target, reduction="sum", beta=1.0) / target.shape[-1] / tgt.numel()
    return pred, target, z, loss


def one_volume(k, b, x, student, predictor, teacher):
    """Volume k alone: (prediction, target) rows of its target tokens, in tgt_index order."""
    s, e = int(b["cu_seqlens"][k]), int(b["cu_seqlens"][k + 1])
    ci = b["ctx_index"][b["cu_ctx"][k]:b["cu_ctx"][k + 1]] - s
    ti = b["tgt_index"][b["cu_tgt"][k]:b["cu_tgt"][k + 1]] - s
    xs, cs = x[s:e], b["coords"][s:e]
    with torch.no_grad():
        h = teacher(xs, cs, torch.tensor([0, e - s], dtype=torch.int32), e - s)
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    z = student(xs[ci], cs[ci], torch.tensor([0, len(ci)], dtype=torch.int32), len(ci))
    nc, nt = len(ci), len(ti)  # the predictor's sequence: [context, mask tokens]
    layout = (torch.arange(nc), torch.arange(nc, nc + nt), torch.tensor([0, nc + nt], dtype=torch.int32), nc + nt)
    return predictor(z, cs[ci], cs[ti], layout), h[ti]


def test_every_target_is_predicted_and_scored_against_its_own_token(setup):
    b, student, predictor, teacher = setup
    x = normalize_tokens(b["tokens"], b["window"])
    pred, target, _, loss = packed_step(b, x, student, predictor, teacher)
    B = len(b["cu_seqlens"]) - 1
    per_token = []
    for k in range(B):
        p, t = one_volume(k, b, x, student, predictor, teacher)
        rows = slice(int(b["cu_tgt"][k]), int(b["cu_tgt"][k + 1]))
        torch.testing.assert_close(pred[rows], p, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(target[rows], t, atol=1e-5, rtol=1e-4)
        d = (p - t).abs()
        per_token.append(torch.where(d < 1, 0.5 * d * d, d - 0.5).mean(-1))  # smooth L1, beta 1, by hand
    per_token = torch.cat(per_token)
    assert len(per_token) == len(b["tgt_index"])  # every target scored once, nothing else
    torch.testing.assert_close(loss, per_token.mean(), atol=1e-6, rtol=1e-5)
    # the gradients of the packed loss are those of the mean over all volumes' target tokens
    params = list(student.parameters()) + list(predictor.parameters())
    g_packed = torch.autograd.grad(loss, params)
    brute = sum(F.smooth_l1_loss(*one_volume(k, b, x, student, predictor, teacher), reduction="sum") for k in range(B))
    g_brute = torch.autograd.grad(brute / target.numel(), params)
    for a, c in zip(g_packed, g_brute):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-4)


def test_no_target_token_reaches_the_student_or_the_predictor(setup):
    b, student, predictor, teacher = setup
    x = normalize_tokens(b["tokens"], b["window"])
    with torch.no_grad():
        pred, target, z, _ = packed_step(b, x, student, predictor, teacher)
        noisy = x.clone()
        noisy[b["tgt_index"]] = 5 * torch.randn_like(noisy[b["tgt_index"]])
        pred2, target2, z2, _ = packed_step(b, noisy, student, predictor, teacher)
        assert torch.equal(z2, z) and torch.equal(pred2, pred)
        assert not torch.allclose(target2, target)  # the teacher does see them
        # the context does reach the predictor (the check above can fail)
        moved = x.clone()
        moved[b["ctx_index"]] += 1.0
        assert not torch.allclose(packed_step(b, moved, student, predictor, teacher)[0], pred)
        # nothing crosses volumes: rewriting volume 0 leaves every other volume's rows as they were
        s1 = int(b["cu_seqlens"][1])
        other = x.clone()
        other[:s1] = torch.randn_like(other[:s1])
        pred3, target3, _, _ = packed_step(b, other, student, predictor, teacher)
        t1 = int(b["cu_tgt"][1])
        assert torch.equal(pred3[t1:], pred[t1:]) and torch.equal(target3[t1:], target[t1:])
        assert not torch.allclose(pred3[:t1], pred[:t1])
