"""The 3D patch tokenizer: C++ CPU kernel (and CUDA when present) vs the PyTorch reference."""
import os

import numpy as np
import pytest
import torch

from nvfm import ops
from nvfm import tokenize as T

needs_ext = pytest.mark.skipif(not ops.extension_loaded() and os.environ.get("NVFM_REQUIRE_EXT") != "1",
                               reason="compiled extension not built")


def random_batch(gen, shapes, fg_prob):
    vols = [torch.randint(0, 256, s, dtype=torch.uint8, generator=gen) for s in shapes]
    masks = [(torch.rand(s, generator=gen) < fg_prob).to(torch.uint8) for s in shapes]
    return vols, masks


def test_extension_required_in_ci():
    if os.environ.get("NVFM_REQUIRE_EXT") == "1":
        assert ops.extension_loaded(), "CI requires the compiled extension"
        assert ops.backend("patchify", "cpu") == "cpp"


def test_reference_hand_example():
    vol = torch.arange(8 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(8, 16, 16)
    mask = torch.zeros(8, 16, 16, dtype=torch.uint8)
    mask[4:] = 1  # second patch along z fully foreground, first empty
    tokens, coords, cu = T.patchify_reference([vol], [mask], 0.5)
    assert coords.tolist() == [[1, 0, 0]] and cu.tolist() == [0, 1]
    assert torch.equal(tokens[0], vol[4:8].reshape(-1))


def test_padding_counts_as_background():
    # a 5x17x17 all-foreground volume: 2x2x2 grid; corner patch holds 1*1*1 real voxel of 1024
    vol = torch.full((5, 17, 17), 7, dtype=torch.uint8)
    mask = torch.ones_like(vol)
    counts = T.token_fg_count_reference(mask)
    assert counts.shape == (2, 2, 2)
    assert counts[0, 0, 0] == 1024 and counts[1, 1, 1] == 1 and counts[0, 1, 1] == 4
    tokens, coords, _ = T.patchify_reference([vol], [mask], 0.0)
    assert len(coords) == 8
    last = tokens[(coords == torch.tensor([1, 1, 1], dtype=torch.int32)).all(1)][0].reshape(4, 16, 16)
    assert last[0, 0, 0] == 7 and last.sum() == 7  # padded voxels are zero


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 1.0])
def test_threshold_rule(threshold):
    gen = torch.Generator().manual_seed(1)
    vols, masks = random_batch(gen, [(8, 32, 32)], 0.5)
    counts = T.token_fg_count_reference(masks[0])
    _, coords, _ = T.patchify_reference(vols, masks, threshold)
    need = T.min_fg_voxels(threshold)
    assert len(coords) == int((counts >= need).sum())


def test_min_fg_fraction_validated():
    with pytest.raises(ValueError, match="min_fg_fraction"):
        T.min_fg_voxels(1.5)


@needs_ext
@pytest.mark.parametrize("trial", range(6))
def test_cpu_kernel_matches_reference(trial):
    gen = torch.Generator().manual_seed(1000 + trial)
    n = int(torch.randint(1, 5, (1,), generator=gen))
    shapes = [tuple(int(torch.randint(1, hi, (1,), generator=gen)) for hi in (23, 70, 70)) for _ in range(n)]
    fg = float(torch.rand(1, generator=gen))
    thr = float(torch.rand(1, generator=gen))
    vols, masks = random_batch(gen, shapes, fg)
    got = T.patchify(vols, masks, thr, impl="kernel")
    ref = T.patchify_reference(vols, masks, thr)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype and torch.equal(g, r)


@needs_ext
def test_cpu_kernel_other_patch_size_and_roundtrip():
    gen = torch.Generator().manual_seed(7)
    vols, masks = random_batch(gen, [(10, 13, 27)], 0.7)
    patch = (3, 5, 4)
    got = T.patchify(vols, masks, 0.0, patch=patch, impl="kernel")
    ref = T.patchify_reference(vols, masks, 0.0, patch=patch)
    assert all(torch.equal(g, r) for g, r in zip(got, ref))
    tokens, coords, _ = got
    back = T.unpatchify(tokens, coords, vols[0].shape, patch=patch, impl="kernel")
    assert torch.equal(back, vols[0])  # threshold 0 keeps every patch: exact inverse
    assert torch.equal(back, T.unpatchify_reference(tokens, coords, vols[0].shape, patch=patch))


@needs_ext
def test_unpatchify_zeroes_dropped_tokens():
    gen = torch.Generator().manual_seed(3)
    vols, masks = random_batch(gen, [(9, 40, 33)], 0.5)
    tokens, coords, _ = T.patchify(vols, masks, 0.6, impl="kernel")
    got = T.unpatchify(tokens, coords, vols[0].shape, impl="kernel")
    assert torch.equal(got, T.unpatchify_reference(tokens, coords, vols[0].shape))
    keep = torch.zeros(T.token_grid(vols[0].shape), dtype=torch.bool)
    keep[tuple(coords.long().T)] = True
    expanded = keep.repeat_interleave(4, 0).repeat_interleave(16, 1).repeat_interleave(16, 2)[:9, :40, :33]
    assert torch.equal(got, torch.where(expanded, vols[0], torch.zeros_like(vols[0])))


@needs_ext
def test_kernel_rejects_bad_input():
    with pytest.raises(RuntimeError, match="differ"):
        torch.ops.nvfm.patchify([torch.zeros(4, 16, 16, dtype=torch.uint8)],
                                [torch.zeros(4, 16, 15, dtype=torch.uint8)], 1, [4, 16, 16])
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.nvfm.patchify([torch.zeros(4, 16, 16)], [torch.zeros(4, 16, 16, dtype=torch.uint8)], 1, [4, 16, 16])


def test_empty_batch_and_empty_volume():
    tokens, coords, cu = T.patchify_reference([torch.zeros(4, 16, 16, dtype=torch.uint8)],
                                              [torch.zeros(4, 16, 16, dtype=torch.uint8)], 0.5)
    assert tokens.shape == (0, 1024) and coords.shape == (0, 3) and cu.tolist() == [0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_matches_reference():
    if ops.backend("patchify", "cuda") != "cuda":
        pytest.skip("CUDA kernels not compiled")
    for trial in range(5):
        gen = torch.Generator().manual_seed(trial)
        vols, masks = random_batch(gen, [(9, 40, 70), (4, 16, 16), (1, 3, 5), (23, 65, 31)], 0.6)
        got = T.patchify([v.cuda() for v in vols], [m.cuda() for m in masks], 0.5, impl="kernel")
        ref = T.patchify_reference(vols, masks, 0.5)
        assert all(torch.equal(g.cpu(), r) for g, r in zip(got, ref))
        back = T.unpatchify(got[0][: int(ref[2][1])], got[1][: int(ref[2][1])], vols[0].shape, impl="kernel")
        assert torch.equal(back.cpu(), T.unpatchify_reference(ref[0][: int(ref[2][1])], ref[1][: int(ref[2][1])],
                                                              vols[0].shape))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@needs_ext
@pytest.mark.parametrize("device", DEVICES)
def test_unpatchify_validation_on_every_device(device):
    """Issue 21 defect 1: the CUDA entry point validated almost nothing; both now share
    check_unpatchify (csrc/patchify.cpp). The kernel itself drops negative coordinates:
    tests/test_simt.py::test_unpatchify_kernel_drops_negative_coordinates."""
    if ops.backend("unpatchify", device) == "reference":
        pytest.skip(f"no unpatchify kernel for {device}")
    tokens = torch.zeros(2, 4 * 16 * 16, dtype=torch.uint8, device=device)
    good = torch.tensor([[0, 0, 0], [1, 1, 1]], dtype=torch.int32, device=device)
    assert torch.ops.nvfm.unpatchify(tokens, good, [8, 20, 20], [4, 16, 16]).shape == (8, 20, 20)
    for bad in ([[0, 0, 0], [-1, 0, 0]], [[0, 0, 0], [0, 2, 0]], [[0, 0, -3], [0, 0, 0]]):
        with pytest.raises(RuntimeError, match="outside the token grid"):
            torch.ops.nvfm.unpatchify(tokens, torch.tensor(bad, dtype=torch.int32, device=device), [8, 20, 20],
                                      [4, 16, 16])
    with pytest.raises(RuntimeError, match="shape must be"):
        torch.ops.nvfm.unpatchify(tokens, good, [8, 20], [4, 16, 16])
    with pytest.raises(RuntimeError, match="tokens must be"):
        torch.ops.nvfm.unpatchify(tokens[:1], good, [8, 20, 20], [4, 16, 16])
    with pytest.raises(RuntimeError, match="coords must be"):
        torch.ops.nvfm.unpatchify(tokens, good[:, :2].contiguous(), [8, 20, 20], [4, 16, 16])


def test_empty_batch_under_every_impl():
    """patchify([], []) under impl="auto" reached the op, which has no tensor to dispatch on."""
    want = T.patchify_reference([], [])
    for impl in ("auto", "reference"):
        got = T.patchify([], [], impl=impl)
        assert [tuple(t.shape) for t in got] == [(0, 1024), (0, 3), (1,)]
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got, want))


@needs_ext
@pytest.mark.parametrize("mask_dtype,value", [(torch.float32, 0.5), (torch.int32, 256), (torch.int64, -512),
                                              (torch.bool, True)])
def test_kernel_counts_nonzero_mask_values(mask_dtype, value):
    """Masks were cast with .to(uint8): 0.5 and 256 became 0 and their foreground was dropped;
    the reference counts mask != 0."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    shape = (9, 40, 35)
    vol = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    mask = torch.where(torch.rand(shape, generator=gen) < 0.7, torch.tensor(value, dtype=mask_dtype),
                       torch.tensor(0, dtype=mask_dtype))
    got = T.patchify([vol], [mask], 0.5, impl="kernel")
    want = T.patchify_reference([vol], [mask], 0.5)
    assert want[0].shape[0] > 0
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@needs_ext
def test_unpatchify_int64_coords_do_not_wrap():
    """int64 coords were cast to int32 before the kernel's bounds check: 2**32 wrapped to 0 and
    the token was written at grid cell 0. Now an IndexError, as in the reference."""
    tok = torch.randint(1, 256, (2, 1024), dtype=torch.uint8)
    for bad in ([[0, 0, 0], [2**32, 0, 0]], [[0, 0, 0], [0, 2**32 + 1, 0]], [[-1, 0, 0], [0, 0, 0]]):
        c = torch.tensor(bad, dtype=torch.int64)
        if bad[1][0] == 2**32 or bad[1][1] == 2**32 + 1:
            with pytest.raises(IndexError):
                T.unpatchify_reference(tok, c, (8, 16, 16))
        with pytest.raises(IndexError, match="outside the token grid"):
            T.unpatchify(tok, c, (8, 16, 16), impl="kernel")
    good = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert torch.equal(T.unpatchify(tok, good, (8, 16, 16), impl="kernel"),
                       T.unpatchify_reference(tok, good, (8, 16, 16)))


def _numpy_patchify(vol, mask, fraction, patch=(4, 16, 16)):
    """Brute force: zero-pad to whole patches, walk the grid in (z, y, x) order, keep a patch when
    its foreground voxels / patch voxels >= fraction."""
    grid = [-(-s // p) for s, p in zip(vol.shape, patch)]
    pad = [(0, g * p - s) for g, p, s in zip(grid, patch, vol.shape)]
    v, m = np.pad(vol, pad), np.pad(mask != 0, pad)
    toks, coords = [], []
    for z in range(grid[0]):
        for y in range(grid[1]):
            for x in range(grid[2]):
                sl = tuple(slice(i * p, (i + 1) * p) for i, p in zip((z, y, x), patch))
                if m[sl].sum() >= fraction * np.prod(patch):
                    toks.append(v[sl].reshape(-1))
                    coords.append((z, y, x))
    return (np.array(toks, np.uint8).reshape(-1, int(np.prod(patch))), np.array(coords, np.int32).reshape(-1, 3))


def _numpy_unpatchify(tokens, coords, shape, patch=(4, 16, 16)):
    grid = [-(-s // p) for s, p in zip(shape, patch)]
    out = np.zeros([g * p for g, p in zip(grid, patch)], np.uint8)
    for t, (z, y, x) in zip(tokens, coords):
        out[z * patch[0]:(z + 1) * patch[0], y * patch[1]:(y + 1) * patch[1], x * patch[2]:(x + 1) * patch[2]] = \
            t.reshape(patch)
    return out[: shape[0], : shape[1], : shape[2]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 16, 16), (1, 1, 1), (5, 17, 33), (3, 15, 15), (9, 48, 31), (12, 7, 40)])
def test_every_window_against_a_numpy_brute_force(shape, device):
    """Each window of a CT study (brain 8-bit; blood, bone 4-bit nibbles expanded x17) and an MR
    one, shapes whole and not whole in patches: patchify (the kernel when built) and the reference
    give the brute force's tokens and coords, and unpatchify puts them back."""
    rng = np.random.default_rng(sum(shape))
    stored = rng.integers(0, 256, (2, *shape), dtype=np.uint8)   # CT channels as in the shards
    windows = {"brain": stored[0], "blood": (stored[1] // 16) * 17, "bone": (stored[1] % 16) * 17,
               "mr": rng.integers(0, 256, shape, dtype=np.uint8)}
    assert windows["blood"].max() <= 255 and set(np.unique(windows["bone"])) <= set(range(0, 256, 17))
    mask = rng.random(shape) < 0.6
    for fraction in (0.0, 0.3, 0.5, 1.0):
        vols = [torch.from_numpy(np.ascontiguousarray(w.astype(np.uint8))).to(device) for w in windows.values()]
        masks = [torch.from_numpy(mask.astype(np.uint8)).to(device)] * len(vols)
        for impl in ("auto", "reference"):
            tokens, coords, cu = (t.cpu() for t in T.patchify(vols, masks, fraction, impl=impl))
            assert cu[0] == 0 and cu.dtype == torch.int32 and len(cu) == len(vols) + 1
            for b, (name, w) in enumerate(windows.items()):
                want_t, want_c = _numpy_patchify(w, mask, fraction)
                lo, hi = int(cu[b]), int(cu[b + 1])
                np.testing.assert_array_equal(tokens[lo:hi].numpy(), want_t, err_msg=f"{name} {fraction} {impl}")
                np.testing.assert_array_equal(coords[lo:hi].numpy(), want_c, err_msg=f"{name} {fraction} {impl}")
                back = T.unpatchify(tokens[lo:hi].to(device), coords[lo:hi].to(device), shape, impl=impl).cpu().numpy()
                np.testing.assert_array_equal(back, _numpy_unpatchify(want_t, want_c, shape))
                if fraction == 0.0:   # every patch kept: the exact volume
                    np.testing.assert_array_equal(back, w)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_unpatchify_refuses_a_token_count_other_than_the_coords(impl):
    """unpatchify_reference broadcast 1 token into all 8 coords of an (8, 32, 32) volume (8 copies of block 0,
    where the kernel refuses): token count and width must equal the coords' and the patch's, on every backend."""
    if impl == "kernel" and ops.backend("unpatchify", "cpu") == "reference":
        pytest.skip("no unpatchify kernel")
    vol = torch.randint(0, 256, (8, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    tokens, coords, _ = T.patchify([vol], [torch.ones(8, 32, 32, dtype=torch.uint8)], impl="reference")
    assert len(coords) == 8
    for bad in (tokens[:1], tokens[:, :512].contiguous(), tokens.reshape(8, 4, 256)):
        with pytest.raises((ValueError, RuntimeError), match="tokens .*must be \\(n, 1024\\)"):
            T.unpatchify(bad, coords, (8, 32, 32), impl=impl)
    # the good case, against numpy's view of the same blocks (patch (4, 16, 16), row-major grid 2 x 2 x 2)
    blocks = vol.numpy().reshape(2, 4, 2, 16, 2, 16).transpose(0, 2, 4, 1, 3, 5).reshape(8, 1024)
    assert np.array_equal(tokens.numpy(), blocks)
    assert torch.equal(T.unpatchify(tokens, coords, (8, 32, 32), impl=impl), vol)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_unpatchify_refuses_two_tokens_on_one_cell(impl):
    """Two tokens at one grid cell: the reference kept the last, the CUDA kernel races (either may
    land). Refused on every path, naming both coordinates in the reference; distinct cells whose
    per-axis values repeat (0,1,0 and 1,0,0) are not duplicates."""
    if impl == "kernel" and ops.backend("unpatchify", torch.device("cpu")) == "reference":
        pytest.skip("no compiled unpatchify")
    tok = torch.randint(1, 256, (4, 1024), dtype=torch.uint8)
    ok = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 1]], dtype=torch.int32)
    vol = T.unpatchify(tok, ok, (8, 32, 32), impl=impl)
    assert torch.equal(vol[4:8, 0:16, 0:16].reshape(-1), tok[1])        # hand-worked: token 1 at cell (1, 0, 0)
    dup = torch.tensor([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.int32)
    with pytest.raises((ValueError, RuntimeError), match="one token per"):
        T.unpatchify(tok, dup, (8, 32, 32), impl=impl)
    if impl == "reference":
        with pytest.raises(ValueError, match=r"coordinates 1 and 3 are both \[1, 0, 0\]"):
            T.unpatchify_reference(tok, dup.long(), (8, 32, 32))
