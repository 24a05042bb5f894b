"""Training-path gather benchmark: tokens per second and effective bandwidth.

    python bench/bench_gather.py

A batch of `volumes` random CT volumes (2 channels, 40 x 320 x 320 voxels), random crops of
up to 20 tokens per axis, random axis permutations, flips and windows, 25% of the crop's
tokens gathered (a JEPA context). Reports ms per batch of the kernel and of the PyTorch
reference, and the kernel's bandwidth (bytes read + written) against a plain copy of the
same number of output bytes (CPU: memcpy; GPU: device-to-device copy, the issue's target is
>= 60% of it). Output float32 / bfloat16 (normalised) and uint8 (window levels, the loader's).
"""
import random

import torch
from timing import timeit

from nvfm import ops
from nvfm.gather import WINDOWS, GatherSpec, gather_tokens, gather_tokens_reference
from nvfm.tokenize import token_grid

# config (nanoGPT style; override with --key=value)
volumes = 16
shape = (40, 320, 320)
context_fraction = 0.25
repeats = 5
seed = 0

from nvfm.configurator import configure  # noqa: E402

configure(globals())


def make_batch(device):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    vols, specs, coords = [], [], []
    grid = token_grid(shape)
    for _ in range(volumes):
        vols.append(torch.randint(0, 256, (2, *shape), generator=g, dtype=torch.uint8).to(device))
        size = tuple(min(20, n) for n in grid)
        start = tuple(rng.randint(0, n - s) for n, s in zip(grid, size))
        spec = GatherSpec(start, size, tuple(rng.sample(range(3), 3)), tuple(rng.random() < 0.5 for _ in range(3)),
                          rng.choice(WINDOWS[1:]))
        out = spec.out_grid()
        n_all = out[0] * out[1] * out[2]
        idx = torch.randperm(n_all, generator=g)[: int(context_fraction * n_all)]
        coords.append(torch.stack([idx // (out[1] * out[2]), (idx // out[2]) % out[1], idx % out[2]], 1).int())
        specs.append(spec)
    return vols, specs, coords


def timed(fn, device):
    return timeit(fn, repeats, device)


def run(device, dtype):
    vols, specs, coords = make_batch(device)
    n = sum(len(c) for c in coords)
    out_bytes = n * 1024 * torch.tensor([], dtype=dtype).element_size()
    moved = out_bytes + n * 1024  # written output + the uint8 voxels read
    res = {}
    if ops.backend("gather_tokens", device) != "reference":
        res["kernel"] = timed(lambda: gather_tokens(vols, specs, coords, dtype=dtype, impl="kernel"), device)
    res["reference"] = timed(lambda: gather_tokens(vols, specs, coords, dtype=dtype, impl="reference",
                                                   device=device), device)
    src = torch.empty(out_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), device)
    print(f"{device} {dtype}: {n} tokens from {volumes} volumes; copy of the output bytes {copy * 1e3:.2f} ms "
          f"({2 * out_bytes / copy / 1e9:.1f} GB/s)")
    for name, t in res.items():
        print(f"  {name:>9}: {t * 1e3:8.2f} ms/batch, {n / t / 1e6:6.2f} M tokens/s, "
              f"{moved / t / 1e9:6.2f} GB/s = {100 * (moved / t) / (2 * out_bytes / copy):.0f}% of copy bandwidth")
    if "kernel" in res:
        print(f"  kernel speed-up over reference: {res['reference'] / res['kernel']:.1f}x")


if __name__ == "__main__":
    run("cpu", torch.float32)
    run("cpu", torch.uint8)  # window levels, the JEPA loader's format (nvfm/masks.py)
    if torch.cuda.is_available():
        run("cuda", torch.bfloat16)
        run("cuda", torch.uint8)
