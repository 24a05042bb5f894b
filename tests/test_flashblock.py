"""FlashBlock (fused) against UnfusedBlock and nvfm.model.Block: same outputs and gradients."""
import pytest
import torch

from nvfm.flashblock import FlashBlock, UnfusedBlock


def packed_batch(lens, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return torch.randn(int(cu[-1]), dim, generator=g), cu, max(lens)


def twin_blocks(dim=96, heads=3, impl="auto", seed=0):
    torch.manual_seed(seed)
    ref = UnfusedBlock(dim, heads, attn_impl="sdpa")
    for p in ref.parameters():  # LayerNorm starts at identity: perturb so every parameter matters
        p.data.add_(0.05 * torch.randn_like(p))
    fused = FlashBlock(dim, heads, attn_impl=impl, mlp_chunk=7)
    fused.load_state_dict(ref.state_dict())
    return ref, fused


@pytest.mark.parametrize("impl", ["auto", "sdpa", "reference"])
def test_outputs_and_gradients_match_unfused(impl):
    ref, fused = twin_blocks(impl=impl)
    x, cu, m = packed_batch([5, 1, 40, 17], 96)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr, cu, m), fused(xf, cu, m)
    assert torch.allclose(yf, yr, atol=2e-5, rtol=1e-5)
    w = torch.randn_like(yr)
    (yr * w).sum().backward()
    (yf * w).sum().backward()
    assert torch.allclose(xf.grad, xr.grad, atol=2e-5, rtol=1e-4)
    for (n, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        assert torch.allclose(pf.grad, pr.grad, atol=5e-5, rtol=1e-4), n


def test_inference_path_chunked_mlp_matches():
    ref, fused = twin_blocks()
    x, cu, m = packed_batch([30, 3, 9], 96, seed=1)
    with torch.no_grad():
        yr = ref(x, cu, m)
        yf = fused(x, cu, m)
    assert torch.allclose(yf, yr, atol=2e-5, rtol=1e-5)
    assert not torch.equal(x, yf)  # the input is not modified in place


def test_state_dict_interchangeable_with_model_block():
    model = pytest.importorskip("nvfm.model")
    blk = model.Block(64, 2)
    fused = FlashBlock(64, 2)
    fused.load_state_dict(blk.state_dict())  # strict: same names and shapes
    x, cu, m = packed_batch([12, 20], 64, seed=2)
    with torch.no_grad():
        assert torch.allclose(fused(x, cu, m), blk(x, cu, m), atol=2e-5, rtol=1e-5)


def test_bad_heads():
    with pytest.raises(ValueError, match="divisible"):
        FlashBlock(100, 3)
