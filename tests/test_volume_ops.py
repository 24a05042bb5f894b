"""The preprocessing kernels of csrc/volume.cpp against their references in nvfm/volume.py
(and scipy), on fresh random inputs."""
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from nvfm import ops, volume

needs_cpp = pytest.mark.skipif(ops.backend("fill_holes_slices", "cpu") != "cpp",
                               reason="nvfm._C preprocessing kernels not built")


def _masks(rng, n):
    """Random (D, H, W) uint8 masks: blobs with holes and concavities, noise, empty and full
    slices, foreground on the border, 1-pixel-wide slices."""
    for t in range(n):
        D, H, W = int(rng.integers(1, 6)), int(rng.integers(1, 45)), int(rng.integers(1, 45))
        kind = t % 4
        if kind == 0:
            m = ndi.gaussian_filter(rng.random((D, H, W)), (0, 2, 2)) > rng.uniform(0.45, 0.55)
        elif kind == 1:
            m = rng.random((D, H, W)) < rng.random()
        elif kind == 2:  # rings: a hole inside, open or closed
            yy, xx = np.mgrid[:H, :W]
            r = np.hypot(yy - H / 2, xx - W / 2)
            m = np.broadcast_to((r > min(H, W) / 6) & (r < min(H, W) / 3), (D, H, W)).copy()
            if rng.random() < 0.5:
                m[:, H // 2, :W // 2] = False  # a channel from the hole to the outside
        else:
            m = ndi.gaussian_filter(rng.random((D, H, W)), (0, 1, 1)) > 0.45
            m[0] = 0
            if D > 1:
                m[1] = 1
        yield m.astype(np.uint8)


@needs_cpp
def test_fill_holes_kernel_matches_reference_and_scipy():
    rng = np.random.default_rng()  # fresh inputs every run
    for t, m in enumerate(_masks(rng, 400)):
        scipy_ref = np.stack([ndi.binary_fill_holes(x) for x in m]).astype(np.uint8)
        ref = volume.fill_holes_slices_reference(m.copy())
        out = m.copy()
        torch.ops.nvfm.fill_holes_slices(torch.from_numpy(out))  # in place
        assert np.array_equal(ref, scipy_ref), t
        assert np.array_equal(out, ref), (t, m.shape)
        # the public function: the kernel, in place, also for bool masks
        mb = m.astype(bool)
        assert volume.fill_holes_slices(mb) is mb and np.array_equal(mb, ref.astype(bool)), t


@needs_cpp
def test_fill_holes_kernel_nonbinary_and_fallbacks():
    rng = np.random.default_rng()
    m = (rng.random((3, 30, 30)) < 0.6).astype(np.uint8) * rng.integers(1, 255, (3, 30, 30)).astype(np.uint8)
    ref = np.stack([ndi.binary_fill_holes(x) for x in m]).astype(np.uint8)
    assert np.array_equal(volume.fill_holes_slices(m.copy()), ref)  # any nonzero is foreground -> 0/1
    f = np.asfortranarray(m)  # not C-contiguous: the reference path, same answer
    assert np.array_equal(volume.fill_holes_slices(f), ref)
    # the reference on other dtypes and on a chunk with no background: any nonzero is foreground, output 0/1
    # (0.5 and int16 512 became 0 through astype(uint8); an all-255 chunk came back as 255)
    ring = np.zeros((1, 5, 5))
    ring[0, 1:4, 1:4], ring[0, 2, 2] = 1, 0
    for v, dtype in ((0.5, np.float32), (512, np.int16)):
        got = volume.fill_holes_slices((ring * v).astype(dtype))
        assert got.dtype == np.uint8 and np.array_equal(got, ndi.binary_fill_holes(ring[0])[None].astype(np.uint8))
    full = np.full((6, 1, 5), 255, np.uint8)
    assert np.array_equal(volume.fill_holes_slices_reference(full.copy()), np.ones_like(full))
    assert np.array_equal(volume.fill_holes_slices(full.copy()), np.ones_like(full))
    with pytest.raises(RuntimeError, match="uint8 or bool"):
        torch.ops.nvfm.fill_holes_slices(torch.zeros(2, 3, 3))
    with pytest.raises(RuntimeError, match=r"\(D, H, W\)"):
        torch.ops.nvfm.fill_holes_slices(torch.zeros(3, 3, dtype=torch.uint8))


@needs_cpp
def test_u16_histogram_matches_reference():
    rng = np.random.default_rng()
    for t in range(20):
        shape = tuple(int(x) for x in rng.integers(1, 30, 3))
        x = (rng.standard_normal(shape) * 10 ** rng.uniform(-3, 4)).astype(np.float16)
        x.ravel()[rng.random(x.size) < 0.01] = np.float16(np.inf)  # odd bit patterns count too
        ref = volume.f16_raw_hist_reference(x, chunk=int(rng.integers(1, 9)))
        assert np.array_equal(volume.f16_raw_hist(x), ref), t
        assert ref.sum() == x.size
    u = rng.integers(0, 65536, 10007).astype(np.uint16)
    h = torch.ops.nvfm.u16_histogram(torch.from_numpy(u.view(np.int16))).numpy()
    assert h.dtype == np.int64 and np.array_equal(h, np.bincount(u, minlength=65536))
    with pytest.raises(RuntimeError, match="16-bit"):
        torch.ops.nvfm.u16_histogram(torch.zeros(4))


@needs_cpp
def test_u16_lookup_matches_reference():
    rng = np.random.default_rng()
    lut = rng.integers(0, 256, 65536).astype(np.uint8)
    for t in range(10):
        shape = tuple(int(x) for x in rng.integers(1, 30, 3))
        x = (rng.standard_normal(shape) * 10 ** rng.uniform(-3, 4)).astype(np.float16)
        want = volume.u16_lookup_reference(x, lut, np.empty(shape, np.uint8))
        assert np.array_equal(want, lut[x.view(np.uint16)])
        out = np.zeros(shape, np.uint8)
        torch.ops.nvfm.u16_lookup(torch.from_numpy(x.view(np.int16)), torch.from_numpy(lut), torch.from_numpy(out))
        assert np.array_equal(out, want), t
        out2 = np.zeros(shape, np.uint8)
        assert volume.u16_lookup(x, lut, out2) is out2 and np.array_equal(out2, want)
    with pytest.raises(RuntimeError, match="65536"):
        torch.ops.nvfm.u16_lookup(torch.zeros(4, dtype=torch.int16), torch.zeros(10, dtype=torch.uint8),
                                  torch.zeros(4, dtype=torch.uint8))


def test_percentiles_from_histogram_match_numpy():
    rng = np.random.default_rng()
    x = (rng.standard_normal((7, 20, 20)) * 300).astype(np.float16)
    got = volume.percentiles_f16(x, (0.5, 99.5), volume.f16_raw_hist(x))
    want = np.percentile(x.astype(np.float64), (0.5, 99.5))
    assert np.allclose(got, want, rtol=0, atol=1e-9)
