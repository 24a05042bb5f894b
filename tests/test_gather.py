"""Training-path token gather: reference semantics, and the C++/CUDA kernels bit-exact against it."""
import random

import pytest
import torch

from nvfm import ops
from nvfm.gather import (WINDOW_MEAN, WINDOW_STD, WINDOWS, GatherSpec, channel_table, gather_tokens,
                         masks_patch_perm,
                         normalization_table,
                         gather_tokens_reference)
from nvfm.tokenize import PATCH, patchify_reference, token_grid

HAS_CPP = ops.backend("gather_tokens", "cpu") == "cpp"
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="nvfm._C gather kernel not built")


def random_volume(g, shape, channels):
    return torch.randint(0, 256, (channels, *shape), generator=g, dtype=torch.uint8)


def random_case(rng, g):
    """A random volume (odd sizes: padding on every axis), spec and a random subset of coords."""
    shape = (rng.randint(3, 14), rng.randint(10, 70), rng.randint(10, 70))
    window = rng.choice(WINDOWS)
    vol = random_volume(g, shape, 1 if window == "mr" else 2)
    grid = token_grid(shape)
    size = tuple(rng.randint(1, n) for n in grid)
    start = tuple(rng.randint(0, n - s) for n, s in zip(grid, size))
    perm = tuple(rng.sample(range(3), 3))
    flip = tuple(rng.random() < 0.5 for _ in range(3))
    patch_perm = rng.choice([None, masks_patch_perm(perm), tuple(rng.sample(range(3), 3))])
    spec = GatherSpec(start, size, perm, flip, window, patch_perm)
    out_grid = spec.out_grid()
    allc = torch.stack(torch.meshgrid(*[torch.arange(n) for n in out_grid], indexing="ij"), -1).reshape(-1, 3)
    keep = torch.randperm(len(allc), generator=g)[: rng.randint(0, len(allc))]
    return vol, spec, allc[keep].to(torch.int32)


def test_constants_match_model():
    model = pytest.importorskip("nvfm.model")
    assert (WINDOWS, WINDOW_MEAN, WINDOW_STD) == (model.WINDOWS, model.WINDOW_MEAN, model.WINDOW_STD)
    u8 = torch.arange(256, dtype=torch.uint8)[None]
    for w in range(4):  # the kernels' table gives exactly what the model's normalisation gives
        assert torch.equal(model.normalize_tokens(u8, w)[0], normalization_table()[w])


def test_identity_spec_is_patchify_then_normalize():
    g = torch.Generator().manual_seed(0)
    vol = random_volume(g, (9, 40, 33), 1)
    grid = token_grid(vol.shape[1:])
    toks, coords, _ = patchify_reference([vol[0]], [torch.ones_like(vol[0])], min_fg_fraction=0.0)
    got = gather_tokens_reference([vol], [GatherSpec((0, 0, 0), grid, (0, 1, 2), (False,) * 3, "mr")], [coords])
    want = (toks.float() / 255.0 - WINDOW_MEAN[0]) / WINDOW_STD[0]
    assert torch.equal(got, want)


def test_permutation_and_flip_rule():
    """Token at output coords c = the original patch, its voxel block permuted then flipped."""
    g = torch.Generator().manual_seed(1)
    vol = random_volume(g, (16, 64, 48), 1)  # no padding: every patch is a full block
    spec = GatherSpec((1, 0, 1), (3, 4, 2), (2, 0, 1), (True, False, True), "mr")
    out_grid = spec.out_grid()
    assert out_grid == (2, 3, 4)
    coords = torch.tensor([[0, 0, 0], [1, 2, 3], [0, 1, 2]], dtype=torch.int32)
    got = gather_tokens_reference([vol], [spec], [coords])
    for c, row in zip(coords.tolist(), got):
        orig = [0, 0, 0]
        for k, a in enumerate(spec.perm):  # output axis k is crop axis a
            ck = out_grid[k] - 1 - c[k] if spec.flip[k] else c[k]
            orig[a] = spec.crop_start[a] + ck
        z, y, x = (o * p for o, p in zip(orig, PATCH))
        block = vol[0, z:z + 4, y:y + 16, x:x + 16].permute(*spec.perm)
        block = block.flip([k for k in range(3) if spec.flip[k]])
        assert block.shape == tuple(PATCH[a] for a in spec.perm)
        assert torch.equal(row, channel_table()[0][block.reshape(-1).long()])


def test_masks_rule_matches_jepa_loader_crop_tokens():
    """patch_perm=masks_patch_perm(perm) reproduces nvfm.masks.crop_tokens (+ normalisation) exactly."""
    masks = pytest.importorskip("nvfm.masks")
    np = pytest.importorskip("numpy")
    rng, g = random.Random(5), torch.Generator().manual_seed(5)
    for modality, window in (("CT", "blood"), ("MR", "mr"), ("CT", "brain")):
        vol = random_volume(g, (10, 50, 37), 2 if modality == "CT" else 1)
        grid = token_grid(vol.shape[1:])
        lo = np.array([rng.randint(0, n - 1) for n in grid])
        hi = np.array([rng.randint(a + 1, n) for a, n in zip(lo, grid)])
        coords = np.argwhere(np.ones(hi - lo, bool)).astype(np.int32)
        perm, flips, swap = masks.sample_augmentation(np.random.default_rng(rng.randint(0, 99)))
        tokens, c = masks.crop_tokens(vol.numpy(), modality, window, lo, hi, coords, flips, swap)
        c = np.ascontiguousarray(c[:, perm])
        spec = GatherSpec(tuple(lo.tolist()), tuple((hi - lo).tolist()), tuple(perm.tolist()),
                          tuple(bool(flips[p]) for p in perm), window, masks_patch_perm(perm))
        got = gather_tokens_reference([vol], [spec], [torch.from_numpy(c)])
        want = normalization_table()[WINDOWS.index(window)][torch.from_numpy(np.ascontiguousarray(tokens)).long()]
        assert torch.equal(got, want), (perm, flips, swap)


def test_ct_nibble_windows():
    vol = torch.zeros(2, 4, 16, 16, dtype=torch.uint8)
    vol[0] = 200
    vol[1] = 0xA5  # blood nibble 10 -> 170, bone nibble 5 -> 85
    c = torch.zeros(1, 3, dtype=torch.int32)
    spec = dict(crop_start=(0, 0, 0), crop_size=(1, 1, 1))
    for name, level in (("brain", 200), ("blood", 170), ("bone", 85)):
        w = WINDOWS.index(name)
        out = gather_tokens_reference([vol], [GatherSpec(**spec, window=name)], [c])
        want = (torch.tensor(level, dtype=torch.float32) / 255.0 - WINDOW_MEAN[w]) / WINDOW_STD[w]
        assert torch.equal(out, want.expand(1, 1024))


def test_bad_input_is_rejected():
    vol = torch.zeros(1, 8, 32, 32, dtype=torch.uint8)
    c = torch.zeros(1, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="outside token grid"):
        gather_tokens_reference([vol], [GatherSpec((0, 0, 0), (3, 2, 2))], [c])
    with pytest.raises(ValueError, match="needs 2 channels"):
        gather_tokens_reference([vol], [GatherSpec((0, 0, 0), (2, 2, 2), window="bone")], [c])
    with pytest.raises(ValueError, match="outside the output grid"):
        gather_tokens_reference([vol], [GatherSpec((0, 0, 0), (2, 2, 2))], [c + 2])


@needs_cpp
@pytest.mark.parametrize("seed", range(6))
def test_cpp_matches_reference_bit_exact(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    cases = [random_case(rng, g) for _ in range(rng.randint(1, 4))]
    vols, specs, coords = (list(x) for x in zip(*cases))
    ref = gather_tokens_reference(vols, specs, coords)
    got = gather_tokens(vols, specs, coords, dtype=torch.float32, impl="kernel")
    assert got.shape == ref.shape and torch.equal(got, ref)
    got16 = gather_tokens(vols, specs, coords, dtype=torch.bfloat16, impl="kernel")
    assert torch.equal(got16, ref.to(torch.bfloat16))
    ref8 = gather_tokens_reference(vols, specs, coords, dtype=torch.uint8)
    got8 = gather_tokens(vols, specs, coords, dtype=torch.uint8, impl="kernel")
    assert got8.dtype == torch.uint8 and torch.equal(got8, ref8)


def test_uint8_output_is_the_window_level():
    """dtype=uint8 gives the window levels that the normalisation table maps to the float output."""
    rng, g = random.Random(11), torch.Generator().manual_seed(11)
    for _ in range(4):
        vol, spec, c = random_case(rng, g)
        lev = gather_tokens_reference([vol], [spec], [c], dtype=torch.uint8)
        flt = gather_tokens_reference([vol], [spec], [c])
        assert lev.dtype == torch.uint8
        assert torch.equal(normalization_table()[WINDOWS.index(spec.window)][lev.long()], flt)
        if spec.window in ("blood", "bone"):
            assert bool((lev % 17 == 0).all())


@needs_cpp
def test_cpp_uint8_interior_and_edge_tokens():
    """The uint8 kernel's fast paths (interior tokens, 16 x 16 plane transpose) and its edge path
    (padding) against the reference, on a volume with tokens on every border, all flips and perms."""
    g = torch.Generator().manual_seed(3)
    vol = random_volume(g, (10, 50, 45), 2)  # grid (3, 4, 3): last token of every axis is partial
    grid = token_grid(vol.shape[1:])
    allc = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, 3)
    import itertools
    for perm in itertools.permutations(range(3)):
        for flip in itertools.product([False, True], repeat=3):
            spec = GatherSpec((0, 0, 0), grid, perm, flip, "bone", masks_patch_perm(perm))
            c = allc[:, list(perm)].to(torch.int32).contiguous()
            ref = gather_tokens_reference([vol], [spec], [c], dtype=torch.uint8)
            assert torch.equal(gather_tokens([vol], [spec], [c], dtype=torch.uint8, impl="kernel"), ref), (perm, flip)


@needs_cpp
def test_cpp_checks_coordinates():
    vol = torch.zeros(1, 8, 32, 32, dtype=torch.uint8)
    params = torch.tensor([[0, 0, 0, 2, 2, 2, 0, 1, 2, 0, 0, 0, 0, 0, 1, 2]], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="outside the output grid"):
        torch.ops.nvfm.gather_tokens([vol], torch.tensor([[0, 0, 2]], dtype=torch.int32),
                                     torch.tensor([0, 1], dtype=torch.int32), params, channel_table(),
                                     list(PATCH), torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_reference_bit_exact():
    if ops.backend("gather_tokens", "cuda") != "cuda":
        pytest.skip("nvfm._C was built without CUDA kernels")
    rng, g = random.Random(7), torch.Generator().manual_seed(7)
    cases = [random_case(rng, g) for _ in range(5)]
    vols, specs, coords = (list(x) for x in zip(*cases))
    ref = gather_tokens_reference(vols, specs, coords)
    vols_gpu = [v.cuda() for v in vols]
    got = gather_tokens(vols_gpu, specs, coords, dtype=torch.float32, impl="kernel")
    assert torch.equal(got.cpu(), ref)
    got16 = gather_tokens(vols_gpu, specs, coords, dtype=torch.bfloat16, impl="kernel")
    assert torch.equal(got16.cpu(), ref.to(torch.bfloat16))
    got8 = gather_tokens(vols_gpu, specs, coords, dtype=torch.uint8, impl="kernel")
    assert torch.equal(got8.cpu(), gather_tokens_reference(vols, specs, coords, dtype=torch.uint8))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_entry_point_validation_on_every_device(device):
    """Issue 21 defect 2: the CUDA entry point skipped the coordinate range, cu_seqlens and
    device checks; CPU and CUDA now share check_values (csrc/gather.cpp). The kernel itself
    never reads outside a volume: tests/test_simt.py::test_gather_kernel_never_reads_outside_the_volume."""
    if ops.backend("gather_tokens", device) == "reference":
        pytest.skip(f"no gather kernel for {device}")
    from nvfm.gather import _params
    vol = torch.randint(0, 256, (1, 8, 40, 40), dtype=torch.uint8).to(device)
    spec = GatherSpec((0, 0, 0), (2, 3, 3))
    params, table = _params([vol], [spec]).to(device), channel_table().to(device)
    op = torch.ops.nvfm.gather_tokens

    def run(coords, cu=(0, 2), p=params, t=table):
        return op([vol], torch.tensor(coords, dtype=torch.int32, device=device),
                  torch.tensor(cu, dtype=torch.int32, device=device), p, t, [4, 16, 16], torch.float32)

    assert run([[0, 0, 0], [1, 2, 2]]).shape == (2, 1024)
    for bad in ([[0, 0, 0], [-1, 0, 0]], [[0, 0, 0], [2, 0, 0]], [[0, 3, 0], [0, 0, 0]]):
        with pytest.raises(RuntimeError, match="outside the output grid"):
            run(bad)
    with pytest.raises(RuntimeError, match="cu_seqlens must run from 0 to N"):
        run([[0, 0, 0], [1, 2, 2]], cu=(0, 1))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="must be on the coords' device"):
            run([[0, 0, 0], [1, 2, 2]], p=params.cpu())
        with pytest.raises(RuntimeError, match="must be on the coords' device"):
            run([[0, 0, 0], [1, 2, 2]], t=table.cpu())


@needs_cpp
def test_cpp_reads_a_strided_cu_seqlens_by_value():
    """A non-contiguous cu_seqlens (a strided view) was read as if contiguous: tokens were
    assigned to the wrong volume, silently. The entry points now copy it contiguous."""
    from nvfm.gather import _params
    rng, g = random.Random(), torch.Generator().manual_seed(random.randrange(2**31))
    cases = [random_case(rng, g) for _ in range(3)]
    vols, specs, coords = (list(x) for x in zip(*cases))
    lens = [len(c) for c in coords]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    strided = torch.stack([cu, torch.full_like(cu, 10**6)], 1).reshape(-1)[::2]  # same values, stride 2
    assert not strided.is_contiguous() and torch.equal(strided, cu)
    packed = torch.cat(coords).to(torch.int32)
    for dtype in (torch.float32, torch.uint8):
        got = torch.ops.nvfm.gather_tokens(vols, packed, strided, _params(vols, specs), channel_table(),
                                           list(PATCH), dtype)
        assert torch.equal(got, gather_tokens_reference(vols, specs, coords, dtype=dtype))
    # the audit's case: read as contiguous, [0, n, n] with filler f looks like a valid [0, f, n]
    # (tokens f..n-1 moved to volume 1, same grid, other voxels), so a wrong answer came back silently
    shape = (rng.randint(8, 12), rng.randint(40, 60), rng.randint(40, 60))
    vols = [random_volume(g, shape, 1), random_volume(g, shape, 1)]
    grid = token_grid(shape)
    spec = GatherSpec((0, 0, 0), grid, tuple(rng.sample(range(3), 3)), tuple(rng.random() < 0.5 for _ in range(3)))
    allc = torch.stack(torch.meshgrid(*[torch.arange(m) for m in spec.out_grid()], indexing="ij"), -1).reshape(-1, 3)
    packed = allc[torch.randperm(len(allc), generator=g)[: rng.randint(2, len(allc))]].to(torch.int32)
    n = len(packed)
    strided = torch.tensor([0, rng.randint(1, n - 1), n, n, n], dtype=torch.int32)[::2]
    got = torch.ops.nvfm.gather_tokens(vols, packed, strided, _params(vols, [spec, spec]), channel_table(),
                                       list(PATCH), torch.float32)
    assert torch.equal(got, gather_tokens_reference(vols, [spec, spec], [packed, packed[:0]]))
