"""Varlen attention benchmark: our kernels against PyTorch's paths on the same packed problem.

    python bench/bench_attention.py                 # CPU part (always) + GPU part (when CUDA)
    python bench/bench_attention.py --gpu_only=True

CPU: milliseconds for forward and forward+backward, fp32, of "ours" (csrc kernel), PyTorch SDPA
math backend (per sequence and padded), and the padded-SDPA path of nvfm.attention (whatever
backend PyTorch picks). GPU (bf16, head_dim 64): TFLOP/s of ours, padded SDPA (flash backend),
torch.nn.attention.varlen and flex_attention with a document mask, on equal lengths 1k-16k and
on a realistic mix of 200-6,000 tokens per sequence with 64k-256k tokens per batch.
FLOPs count only real (unpadded) work: forward 4 * sum(lq * lk) * heads * head_dim, backward
2.5x that (FlashAttention's convention).
Exit status 1 when "ours" is missing or fails on a GPU problem, or --gpu_only finds no GPU.
"""
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nvfm.attention import _pad, attention_sdpa_padded, ours_available, varlen_attention

# config (nanoGPT style; override with --key=value)
cpu_heads = 6
cpu_head_dim = 64
cpu_repeats = 3
gpu_heads = 16
gpu_head_dim = 64
gpu_repeats = 10
gpu_only = False
seed = 0

from nvfm.configurator import configure  # noqa: E402

configure(globals())


def packed(lens, H, D, dtype, device, g):
    cu = torch.tensor([0] + list(lens)).cumsum(0).to(torch.int32).to(device)
    T = int(sum(lens))
    q, k, v = (torch.randn(T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    return q, k, v, cu


def flops_fwd(lens, H, D):
    return 4 * sum(n * n for n in lens) * H * D


def timed(fn, repeats, device):
    fn()  # warm-up (compilation, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def fwd_and_fwdbwd(attn, q, k, v, repeats, device):
    """Seconds of attn(q, k, v) forward, and forward + backward."""
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    def fwdbwd():
        attn(qg, kg, vg).sum().backward()
    return timed(fwd, repeats, device), timed(fwdbwd, repeats, device)


def sdpa_math_per_sequence(cu):
    bounds = cu.tolist()

    def attn(q, k, v):
        outs = []
        with sdpa_kernel(SDPBackend.MATH):
            for b in range(len(bounds) - 1):
                s = slice(bounds[b], bounds[b + 1])
                outs.append(F.scaled_dot_product_attention(*(t[s].transpose(0, 1)[None] for t in (q, k, v))))
        return torch.cat([o[0].transpose(0, 1) for o in outs])
    return attn


def cpu_part():
    g = torch.Generator().manual_seed(seed)
    H, D = cpu_heads, cpu_head_dim
    print(f"== CPU ({torch.get_num_threads()} threads), fp32, heads {H}, head_dim {D}; ms (fwd / fwd+bwd)")
    problems = {"equal 4 x 1024": [1024] * 4, "mix 200-3000": [200, 800, 1500, 3000], "equal 2 x 2048": [2048] * 2}
    for name, lens in problems.items():
        q, k, v, cu = packed(lens, H, D, torch.float32, "cpu", g)
        m = max(lens)
        impls = {"math per-seq": sdpa_math_per_sequence(cu)}

        def math_padded(q, k, v):
            with sdpa_kernel(SDPBackend.MATH):
                return attention_sdpa_padded(q, k, v, cu, cu, m, m)
        impls["math padded"] = math_padded
        impls["sdpa padded"] = lambda q, k, v: varlen_attention(q, k, v, cu, cu, m, m, impl="sdpa")
        if ours_available(q):
            impls["ours"] = lambda q, k, v: varlen_attention(q, k, v, cu, cu, m, m, impl="ours")
        res = {n: fwd_and_fwdbwd(f, q, k, v, cpu_repeats, "cpu") for n, f in impls.items()}
        gf = flops_fwd(lens, H, D) / 1e9
        line = ", ".join(f"{n} {a * 1e3:.0f}/{b * 1e3:.0f}" for n, (a, b) in res.items())
        print(f"{name:>16} ({gf:.1f} GFLOP fwd): {line}")
        if "ours" in res:
            for ref in ("math per-seq", "math padded", "sdpa padded"):
                print(f"{'':>16}  ours speed-up vs {ref}: fwd {res[ref][0] / res['ours'][0]:.2f}x, "
                      f"fwd+bwd {res[ref][1] / res['ours'][1]:.2f}x")


def gpu_impls(cu, lens, m):
    impls = {}
    if ours_available(torch.empty(1, 1, gpu_head_dim, device="cuda", dtype=torch.bfloat16)):
        impls["ours"] = lambda q, k, v: varlen_attention(q, k, v, cu, cu, m, m, impl="ours")

    def padded_flash(q, k, v):
        # the flash backend takes no mask: pad, attend over the padded keys too (a speed proxy:
        # its output is wrong for short sequences), unpad; FLOPs still count only real work
        (qp, valid), (kp, _), (vp, _) = (_pad(t, cu, m) for t in (q, k, v))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qp, kp, vp).transpose(1, 2)[valid]

    def padded_any(q, k, v):
        return attention_sdpa_padded(q, k, v, cu, cu, m, m)
    impls["sdpa padded (flash)"] = padded_flash
    impls["sdpa padded (auto)"] = padded_any
    try:
        from torch.nn.attention.varlen import varlen_attn
        impls["torch varlen"] = lambda q, k, v: varlen_attn(q, k, v, cu, cu, m, m)
    except ImportError:
        pass
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        doc = torch.repeat_interleave(torch.arange(len(lens), device="cuda"),
                                      torch.tensor(lens, device="cuda"))
        T = int(sum(lens))
        block_mask = create_block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], 1, None, T, T, device="cuda")
        flex = torch.compile(flex_attention, dynamic=False)
        impls["flex (doc mask)"] = lambda q, k, v: flex(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                                        block_mask=block_mask)[0].transpose(0, 1)
    except Exception as e:  # noqa: BLE001  (older torch, compile failure): report and go on
        print(f"  flex_attention unavailable: {type(e).__name__}: {e}")
    return impls


def measure(name, impls, q, k, v, fl, repeats, device):
    """TFLOP/s (fwd, fwd+bwd) of each impl on one problem, printed; and the failures that make
    the run fail: "ours" missing (kernel not built / inputs unsupported) or raising. The other
    impls may fail (padded batches out of memory, no flex_attention): printed, not failures."""
    results, failures = {}, []
    if "ours" not in impls:
        print(f"  {name}: ours UNAVAILABLE (nvfm._C has no kernel for these inputs)")
        failures.append(f"{name}: ours unavailable")
    for n, f in impls.items():
        try:
            a, b = fwd_and_fwdbwd(f, q, k, v, repeats, device)
            results[n] = (fl / a / 1e12, 3.5 * fl / b / 1e12)
        except Exception as e:  # noqa: BLE001  (e.g. out of memory for padded batches)
            print(f"  {name}: {n} failed: {type(e).__name__}: {str(e)[:120]}")
            if n == "ours":
                failures.append(f"{name}: ours {type(e).__name__}")
    print(f"{name:>26}: " + ", ".join(f"{n} {a:.1f}/{b:.1f}" for n, (a, b) in results.items()), flush=True)
    return results, failures


def gpu_part():
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    H, D = gpu_heads, gpu_head_dim
    print(f"== GPU {torch.cuda.get_device_name()}, bf16, heads {H}, head_dim {D}; TFLOP/s (fwd / fwd+bwd); "
          "sdpa padded (flash) = flash on the padded batch without a mask (upper bound of padding)")
    problems = {f"equal {L // 1024}k x {65536 // L}": [L] * (65536 // L) for L in (1024, 2048, 4096, 8192, 16384)}
    for total in (65536, 131072, 262144):
        lens = []
        while sum(lens) < total:
            lens.append(rng.randint(200, 6000))
        problems[f"mix 200-6000, {sum(lens) // 1024}k tok"] = lens
    failures = []
    for name, lens in problems.items():
        q, k, v, cu = packed(lens, H, D, torch.bfloat16, "cuda", g)
        results, failed = measure(name, gpu_impls(cu, lens, max(lens)), q, k, v, flops_fwd(lens, H, D), gpu_repeats,
                                  "cuda")
        failures += failed
        if "ours" in results:
            others = {n: r for n, r in results.items() if n != "ours"}
            for n, r in others.items():
                print(f"{'':>26}  ours / {n}: fwd {results['ours'][0] / r[0]:.2f}x, "
                      f"fwd+bwd {results['ours'][1] / r[1]:.2f}x")
        del q, k, v
        torch.cuda.empty_cache()
    return failures


if __name__ == "__main__":
    if not gpu_only:
        cpu_part()
    if torch.cuda.is_available():
        bad = gpu_part()
        if bad:
            sys.exit(f"ours did not run on {len(bad)} problem(s): {'; '.join(bad)}")
    elif gpu_only:
        sys.exit("--gpu_only=True but no CUDA device: nothing measured")
    else:
        print("(no CUDA: GPU part skipped)")
