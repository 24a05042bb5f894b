"""Every CUDA kernel in csrc/ run on the CPU under the SIMT emulator (csrc/simt/simt.h) against
its PyTorch reference, under several thread schedules; the emulator's own rules; planted
mutations (a removed barrier, an off-by-one) that these comparisons must catch; one
AddressSanitizer run. No GPU needed: this is what CI knows about the kernels' logic.
Timing and the hardware memory model still need a GPU (bench/gpu_acceptance.py).
"""
import ctypes
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import simt_kernels as S
from nvfm.attention import attention_reference, attention_sdpa_padded
from nvfm.blocks import block_masks_reference
from nvfm.gather import _params, channel_table, gather_tokens_reference
from nvfm.tokenize import patchify_reference, unpatchify_reference

pytestmark = pytest.mark.skipif(shutil.which(S.CXX) is None, reason="no C++ compiler for the emulator")
SCHEDULES = ["forward", "reverse", "random:1", "random:2"]
ASAN_RUN = os.environ.get("NVFM_SIMT_ASAN") == "1"  # set by test_asan_run for its subprocess


def lib(op, source=None):
    return S.load(op, source, asan=ASAN_RUN)


# ---- the emulator itself -----------------------------------------------------------------------

def test_emulator_collectives():
    out = torch.zeros(64 * 8, dtype=torch.int32)
    assert lib("selftest").lib.simt_selftest_collectives(S._ptr(out)) == 0
    o = out.reshape(64, 8).numpy()
    lane = np.arange(64) % 32
    assert (o[:, 0] == (31 - lane) * 10).all() and (o[:, 1] == lane ^ 1).all()
    assert (o[:, 2] == np.where(lane >= 2, lane - 2, lane)).all()
    assert (o[:, 3] == np.where(lane < 30, lane + 2, lane)).all()
    assert (o[:, 4].astype(np.uint32) == sum(1 << i for i in range(0, 32, 3))).all()
    assert (o[:, 5] == 1).all() and (o[:, 6] == 0).all()
    assert (o[:, 7] == np.where(lane < 16, 15 - lane, 16)).all()


@pytest.mark.parametrize("which,message", [
    (0, "divergent __syncthreads"), (1, "exited while"), (2, "which exited"), (3, "past the partial warp"),
    (4, "deadlock"), (5, "not in the mask")])
def test_emulator_reports_broken_kernels(which, message):
    L = lib("selftest").lib
    L.simt_message.restype = ctypes.c_char_p
    L.simt_configure(0, 0)
    out = torch.zeros(64, dtype=torch.int32)
    assert L.simt_selftest_broken(which, S._ptr(out)) != 0
    assert message in L.simt_message().decode()


def test_emulator_launch_limits_and_nan_shared_memory():
    L = lib("selftest").lib
    L.simt_message.restype = ctypes.c_char_p
    out = torch.zeros(32)
    L.simt_configure(0, 0)
    assert L.simt_selftest_smem(S._ptr(out), 128, -1, 1) == 0 and torch.isnan(out).all()
    assert L.simt_selftest_smem(S._ptr(out), 64 * 1024, -1, 1) != 0
    assert "no cudaFuncSetAttribute" in L.simt_message().decode()
    L.simt_configure(0, 0)
    assert L.simt_selftest_smem(S._ptr(out), 64 * 1024, 64 * 1024, 1) == 0
    L.simt_configure(0, 0)
    assert L.simt_selftest_smem(S._ptr(out), 128, -1, 70000) != 0 and "grid dims" in L.simt_message().decode()


def test_emulator_half_and_bfloat16_round_to_nearest_even():
    L = lib("selftest").lib
    x = torch.cat([torch.randn(20000) * 10.0 ** torch.randint(-9, 6, (20000,)),
                   torch.tensor([0.0, -0.0, 65504.0, 65519.9, 65520.0, 2.0 ** -24, 2.0 ** -25, 1.5 * 2.0 ** -25,
                                 float("inf"), -float("inf"), 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 6e-8, 1e-30]),
                   # ties: halfway between two bf16 / fp16 neighbours
                   (torch.arange(1, 200, dtype=torch.float32) * 2 ** -8 + 2 ** -16) + 1])
    n = ctypes.c_int64(len(x))
    h, b = torch.empty(len(x), dtype=torch.int16), torch.empty(len(x), dtype=torch.int16)
    L.simt_to_half(S._ptr(x), S._ptr(h), n)
    L.simt_to_bf16(S._ptr(x), S._ptr(b), n)
    assert torch.equal(h.view(torch.float16), x.half())
    assert torch.equal(b.view(torch.bfloat16), x.bfloat16())
    back = torch.empty(len(x))
    L.simt_from_half(S._ptr(h), S._ptr(back), n)
    assert torch.equal(back, x.half().float())
    nan = torch.tensor([float("nan")])
    L.simt_to_bf16(S._ptr(nan), S._ptr(b), ctypes.c_int64(1))
    assert torch.isnan(b[:1].view(torch.bfloat16)).all()


# ---- patchify_cuda.cu ------------------------------------------------------------------------------

def patchify_case(seed, shape=(9, 37, 21), patch=(4, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    vol = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    mask = (torch.rand(shape, generator=g) < 0.6).to(torch.uint8)
    return vol, mask, patch


def check_patchify(L, seed, schedule, patch=(4, 16, 16)):
    vol, mask, patch = patchify_case(seed, patch=patch)
    tokens, coords, _ = patchify_reference([vol], [mask], 0.3, patch)
    grid = [-(-s // p) for s, p in zip(vol.shape, patch)]
    counts = L.token_fg_count(mask, patch, schedule)
    want = torch.nn.functional.pad(mask.int(), [0, grid[2] * patch[2] - vol.shape[2], 0,
                                                grid[1] * patch[1] - vol.shape[1], 0, grid[0] * patch[0] - vol.shape[0]])
    want = want.reshape(grid[0], patch[0], grid[1], patch[1], grid[2], patch[2]).sum((1, 3, 5)).int()
    assert torch.equal(counts, want), "token_fg_count"
    assert torch.equal(L.patch_gather(vol, coords, patch, schedule), tokens), "patch_gather"
    got, intact = L.patch_scatter(tokens, coords, vol.shape, patch, schedule)
    assert intact and torch.equal(got, unpatchify_reference(tokens, coords, vol.shape, patch)), "patch_scatter"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_patchify_kernels_match_reference(schedule):
    check_patchify(lib("patchify"), 0, schedule)
    check_patchify(lib("patchify"), 1, schedule, patch=(3, 5, 7))  # 105-voxel patches: a ragged reduction


def test_unpatchify_kernel_drops_negative_coordinates():
    """Defect 1: the scatter kernel's `inside` test checked upper bounds only."""
    vol, mask, patch = patchify_case(2)
    tokens, coords, _ = patchify_reference([vol], [mask], 0.3, patch)
    bad = coords.clone()
    bad[0] = torch.tensor([-1, 0, 0])
    bad[-1] = torch.tensor([0, -1, 1])
    got, intact = lib("patchify").patch_scatter(tokens, bad, vol.shape, patch)
    keep = torch.ones(len(coords), dtype=torch.bool)
    keep[[0, -1]] = False
    want = unpatchify_reference(tokens[keep], coords[keep], vol.shape, patch)
    assert intact, "wrote outside the volume"
    # the dropped tokens' in-volume parts would land in the volume's first rows: compare where they cannot
    assert torch.equal(got[want != 0], want[want != 0])


# ---- attention_cuda.cu ----------------------------------------------------------------------------

ATTN_CASES = [  # (query lengths, key lengths, heads)
    ([5, 1, 7], [5, 1, 7], 2),
    ([17, 0, 40], [60, 9, 1], 2),   # cu_q != cu_k, an empty query sequence, ragged tiles
    ([4, 12], [0, 33], 1),          # a sequence with queries but no keys
    ([70], [100], 1),               # several tiles on both sides
]


def attn_inputs(lens_q, lens_k, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    q, k, v, do = (torch.randn(int(cu[-1]), H, D, generator=g).to(dtype) for cu in (cu_q, cu_k, cu_k, cu_q))
    return q, k, v, do, cu_q, cu_k


def attn_grads(fn, q, k, v, do, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out,) + torch.autograd.grad(out, (q, k, v), do.to(dtype))


def check_attention(L, lens_q, lens_k, H, D, dtype, schedule, seed=0, tensor_cores=False):
    q, k, v, do, cu_q, cu_k = attn_inputs(lens_q, lens_k, H, D, dtype, seed)
    mq, mk, scale = max(lens_q), max(lens_k), D ** -0.5
    out, lse = L.attn_fwd(q, k, v, cu_q, cu_k, mq, mk, scale, schedule, tensor_cores)
    dq, dk, dv = L.attn_bwd(do, q, k, v, out, lse, cu_q, cu_k, mq, mk, scale, schedule, tensor_cores)
    ref = attn_grads(lambda a, b, c: attention_reference(a, b, c, cu_q, cu_k), q, k, v, do, torch.float64)
    pt = attn_grads(lambda a, b, c: attention_sdpa_padded(a, b, c, cu_q, cu_k, mq, mk), q, k, v, do, dtype)
    for name, g, p, r in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), pt, ref):
        assert torch.isfinite(g).all(), name
        err = (g.double() - r).abs().max().item() if r.numel() else 0.0
        pt_err = (p.double() - r).abs().max().item() if r.numel() else 0.0
        assert err <= 2 * pt_err + 1e-3, f"{name}: emulated kernel {err:.2e} vs pytorch {dtype} {pt_err:.2e}"
    s = [torch.logsumexp(torch.einsum("qhd,khd->hqk", q[cu_q[b]:cu_q[b + 1]].double(),
                                      k[cu_k[b]:cu_k[b + 1]].double()) * scale, -1) for b in range(len(lens_q))]
    assert torch.allclose(lse.double(), torch.cat(s, 1), atol=1e-4), "lse"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(ATTN_CASES)))
def test_attention_kernels_match_reference(case, D, dtype):
    lens_q, lens_k, H = ATTN_CASES[case]
    schedule = SCHEDULES[(case + D // 64) % len(SCHEDULES)]  # every schedule, spread over the cases
    check_attention(lib("attention"), lens_q, lens_k, H, D, dtype, schedule, seed=case)


TC_CASES = ATTN_CASES + [([150, 3], [130, 64], 1)]  # the tensor-core tiles are 64 x 64: 3 key tiles


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("case", range(len(TC_CASES)))
def test_attention_tensor_core_forward_backward_match_reference(case, D, dtype):
    """The tensor-core kernels (mma.sync / ldmatrix / cp.async, csrc/tensor_core.h) emulated with
    the PTX fragment layouts: forward, and backward from its lse."""
    lens_q, lens_k, H = TC_CASES[case]
    schedule = SCHEDULES[(case + D // 64 + 1) % len(SCHEDULES)]
    check_attention(lib("attention"), lens_q, lens_k, H, D, dtype, schedule, seed=case, tensor_cores=True)


@pytest.mark.parametrize("tc,rows", [(False, 32), (True, 64)], ids=["fma", "tensor_cores"])
def test_attention_dkdv_with_short_max_seqlen_q(tc, rows):
    """Defect 4: with max_seqlen_q below a real length, the forward skips rows (lse = -inf) and the
    dK/dV kernel turned exp(s - lse) into inf -> NaN. Skipped rows must contribute nothing."""
    q, k, v, do, cu_q, cu_k = attn_inputs([150], [20], 1, 64, torch.bfloat16, 0)
    L = lib("attention")
    out, lse = L.attn_fwd(q, k, v, cu_q, cu_k, rows, 20, 0.125, tensor_cores=tc)  # rows `rows`.. skipped
    assert torch.isneginf(lse[:, rows:]).all() and torch.isfinite(lse[:, :rows]).all()
    dq, dk, dv = L.attn_bwd(do, q, k, v, out, lse, cu_q, cu_k, rows, 20, 0.125, tensor_cores=tc)
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
    cq = torch.tensor([0, rows], dtype=torch.int32)  # the same as attention over the first `rows` queries
    _, dk_r, dv_r = L.attn_bwd(do[:rows], q[:rows], k, v, out[:rows], lse[:, :rows].contiguous(), cq, cu_k, rows, 20,
                               0.125, tensor_cores=tc)
    assert torch.equal(dk, dk_r) and torch.equal(dv, dv_r)


@pytest.mark.parametrize("tc", [False, True], ids=["fma", "tensor_cores"])
def test_attention_key_tile_whose_scores_all_overflow_to_minus_inf(tc):
    """Finite inputs whose scores overflow float32 to -inf over a whole first key tile (32 keys for
    the FMA kernel, 64 for the tensor cores) made exp(-inf + inf) = NaN in every output. The rows
    must equal attention over the other keys (float64 reference, where nothing overflows)."""
    q, k, v, do, cu_q, cu_k = attn_inputs([5], [100], 1, 64, torch.bfloat16, 0)
    k[:64] = -3e38                        # q . k ~ -1e40 for every query: -inf in float32
    q = q.abs() + 0.5                     # every q . k of those keys is below -3e38 * 0.5 * 64
    L = lib("attention")
    out, lse = L.attn_fwd(q, k, v, cu_q, cu_k, 5, 100, 0.125, tensor_cores=tc)
    rest = torch.tensor([0, 36], dtype=torch.int32)
    want = attention_reference(q.double(), k[64:].double(), v[64:].double(), cu_q, rest, scale=0.125)
    lse_want = torch.logsumexp(torch.einsum("qhd,khd->hqk", q.double(), k[64:].double()) * 0.125, -1)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert (out.double() - want).abs().max() < 2e-2 and torch.allclose(lse.double(), lse_want, atol=1e-3)
    dq, dk, dv = L.attn_bwd(do, q, k, v, out, lse, cu_q, cu_k, 5, 100, 0.125, tensor_cores=tc)
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert not dv[:64].any()              # keys of probability 0 get no gradient


# ---- gather_cuda.cu ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(3))
def test_gather_kernel_matches_reference_bit_exact(seed):
    from test_gather import random_case
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    cases = [random_case(rng, g) for _ in range(rng.randint(1, 4))]
    vols, specs, coords = (list(x) for x in zip(*cases))
    cu = torch.tensor([0] + [len(c) for c in coords]).cumsum(0).to(torch.int32)
    packed, params = torch.cat(coords).to(torch.int32), _params(vols, specs)
    L = lib("gather")
    for dtype, schedule in ((torch.float32, "forward"), (torch.bfloat16, "reverse"), (torch.uint8, "random:1")):
        got = L.gather_tokens(vols, packed, cu, params, channel_table(), (4, 16, 16), dtype, schedule)
        assert torch.equal(got, gather_tokens_reference(vols, specs, coords, dtype)), dtype


def test_gather_kernel_never_reads_outside_the_volume():
    """Defect 2: the kernel tested vox < dims only; a negative coordinate read before the volume.
    The volume sits after 0x77 bytes: such a read shows up as level 0x77 instead of padding 0."""
    from nvfm.gather import GatherSpec
    guard = 64 * 64 * 16
    buf = torch.full((guard + 8 * 40 * 40,), 0x77, dtype=torch.uint8)
    buf[guard:] = torch.randint(0, 256, (8 * 40 * 40,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    vol = buf[guard:].view(1, 8, 40, 40)
    spec = GatherSpec((0, 0, 0), (2, 3, 3), window="mr")
    coords = torch.tensor([[-1, 0, 0], [0, -1, 2], [1, 2, 2]], dtype=torch.int32)
    got = lib("gather").gather_tokens([vol], coords, torch.tensor([0, 3], dtype=torch.int32), _params([vol], [spec]),
                                      channel_table(), (4, 16, 16), torch.uint8)
    assert (got[:2] == 0).all(), "a token outside the grid must read as padding"
    want = gather_tokens_reference([vol.clone()], [spec], [coords[2:]], torch.uint8)
    assert torch.equal(got[2:], want)


def test_static_asserts_guard_launch_shapes():
    """Defect 5: launch-shape assumptions are compile-time checks (a 256-wide power-of-two
    reduction, kRows == kCols in the attention tile loader)."""
    for op, old, new in (("patchify", "kFgThreads = 256;", "kFgThreads = 200;"),
                         ("attention", "kRows = 32;", "kRows = 64;")):
        with pytest.raises(RuntimeError, match="static assert"):
            S.build(op, S.mutate(op, old, new))


# ---- blocks_cuda.cu ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", range(8))
def test_block_masks_kernel_matches_reference_bit_exact(k):
    from test_blocks import SHAPES, check_split, random_batch
    rng = np.random.default_rng(100 + k)
    inputs = random_batch(rng, SHAPES[k], ties=k % 2 == 1, shuffle=k % 3 != 0)
    got = lib("blocks").block_masks(*inputs, schedule=SCHEDULES[k % len(SCHEDULES)])
    for r, g in zip(block_masks_reference(*inputs), got):
        assert torch.equal(r, g)
    check_split(inputs, got)


# ---- mutations: each must make the comparisons above fail ----------------------------------------

MUTATIONS = {
    "patchify: reduction barrier removed": ("patchify", "    __syncthreads();\n  }", "  }", 1),
    "patchify: off-by-one in the reduction loop": ("patchify", "s > 0; s >>= 1", "s > 1; s >>= 1", 1),
    "attention fwd: loop-head barrier removed": ("attention", "    __syncthreads();  // the previous K/V tile", "//", 1),
    "attention fwd: off-by-one in the P V loop": ("attention", "for (int j = 0; j < nc; ++j)", "for (int j = 1; j < nc; ++j)", 1),
    "attention dq: barrier after the tile load removed": ("attention", "    __syncthreads();\n#pragma unroll", "\n", 2),
    "attention dkdv: off-by-one tile tail": ("attention", "const int nc = min(kCols, lq - c0);",
                                             "const int nc = min(kCols, lq - c0 + 1);", 1),
    # in tc_stream_pair, the tile step all three tensor-core kernels share: one mutant covers them all. The
    # barrier after the wait is caught by the reverse schedule: its top warp runs ahead to the ldmatrix
    # and reads rows the lower warps have not copied yet
    "attention tc: cp.async wait removed": ("attention", "tc::cp_async_wait<1>();", "", 1),
    "attention tc: barrier after the tile load removed": ("attention",
                                                          "__syncthreads();  // every thread's copies of tile t have landed",
                                                          "//", 1),
    "attention tc: buffer-reuse barrier removed": ("attention", "__syncthreads();  // buffer `buf` is free", "//", 1),
    "attention tc: off-by-one in the key mask": ("attention", "nt * 8 + 2 * c + (e & 1) < nc", "nt * 8 + 2 * c + (e & 1) <= nc", 1),
    "attention tc: wrong ldmatrix row for V": ("attention", "(j * 16 + lane % 8 + (lane / 8) % 2 * 8) * LD", "(j * 16 + lane % 8) * LD", 1),
    "attention tc dkdv: buffer-reuse barrier removed": ("attention", "__syncthreads();  // buffer `buf` is free", "//", 3),
    "attention tc dq: row statistic of the wrong fragment row": ("attention", "(dp[nt][e] - drow[e >> 1])",
                                                                 "(dp[nt][e] - drow[0])", 1),
    "gather: flip off by one": ("gather", "pj[j] - 1 - ej[j]", "pj[j] - ej[j]", 1),
    "blocks: barrier after the distances removed": ("blocks", "  __syncthreads();\n  for (int i = threadIdx.x", "  for (int i = threadIdx.x", 1),
    "blocks: compaction barrier removed": ("blocks", "    __syncthreads();\n    int before", "    int before", 1),
}


def run_mutant(name):
    op, old, new, count = MUTATIONS[name]
    L = lib(op, S.mutate(op, old, new, count))
    if op == "patchify":
        for schedule in SCHEDULES:
            check_patchify(L, 0, schedule)
            check_patchify(L, 0, schedule, patch=(3, 5, 7))
    elif op == "attention":
        for schedule in SCHEDULES:
            check_attention(L, [40, 17], [70, 33], 1, 64, torch.bfloat16, schedule,
                            tensor_cores=" tc" in name)
            if " tc" in name:
                check_attention(L, [150, 3], [130, 64], 1, 64, torch.bfloat16, schedule, tensor_cores=True)
    elif op == "gather":
        from test_gather import random_case
        rng, g = random.Random(5), torch.Generator().manual_seed(5)
        vols, specs, coords = (list(x) for x in zip(*[random_case(rng, g) for _ in range(3)]))
        cu = torch.tensor([0] + [len(c) for c in coords]).cumsum(0).to(torch.int32)
        got = L.gather_tokens(vols, torch.cat(coords).int(), cu, _params(vols, specs), channel_table(), (4, 16, 16),
                              torch.float32)
        assert torch.equal(got, gather_tokens_reference(vols, specs, coords, torch.float32))
    else:
        from test_blocks import random_batch
        for seed, schedule in enumerate(SCHEDULES):  # several seeds: some volumes with nontrivial counts
            inputs = random_batch(np.random.default_rng(seed), [300, 40, 700, 90, 500])
            for r, g in zip(block_masks_reference(*inputs), L.block_masks(*inputs, schedule=schedule)):
                assert torch.equal(r, g)


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_is_caught(name):
    with pytest.raises((AssertionError, S.SimtError)):
        run_mutant(name)


# ---- AddressSanitizer ----------------------------------------------------------------------------

def test_asan_run():
    """The kernel comparisons above, rebuilt with -fsanitize=address, in a subprocess with libasan
    preloaded: an out-of-bounds read or write in any kernel fails here."""
    if ASAN_RUN:
        pytest.skip("already inside the ASan run")
    libasan = subprocess.run([S.CXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(libasan) or not os.path.exists(libasan):
        pytest.skip("libasan not found")
    env = dict(os.environ, NVFM_SIMT_ASAN="1", LD_PRELOAD=libasan, NVFM_QUIET="1",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:exitcode=23")
    ids = ["test_patchify_kernels_match_reference[random:1]", "test_unpatchify_kernel_drops_negative_coordinates",
           "test_attention_kernels_match_reference[1-64-bf16]",
           "test_attention_dkdv_with_short_max_seqlen_q[tensor_cores]",
           "test_attention_tensor_core_forward_backward_match_reference[1-128-fp16]", "test_gather_kernel_matches_reference_bit_exact[0]",
           "test_gather_kernel_never_reads_outside_the_volume"] + [
           f"test_block_masks_kernel_matches_reference_bit_exact[{k}]" for k in (2, 3, 5)]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"] +
                         [f"{__file__}::{i}" for i in ids], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"ASan run failed (rc {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
