"""Benchmark: 3D patch tokenizer, compiled kernel vs the PyTorch reference, same run.

    python bench/bench_patchify.py [--volumes 16] [--repeats 5] [--device cpu|cuda]

Volumes are realistic preprocessed sizes (D x H x W at 4 x 1 x 1 mm: 36-48 x 200-240 x
200-240) with a head-shaped (ellipsoid) foreground. Prints volumes/s and GB/s (input voxel
bytes read per second) for each path and the speed-up.
"""
import argparse

import torch
from timing import timeit

from nvfm import ops
from nvfm import tokenize as T


def head_volumes(n, gen, device):
    vols, masks = [], []
    for _ in range(n):
        D, H, W = (int(torch.randint(36, 49, (1,), generator=gen)), int(torch.randint(200, 241, (1,), generator=gen)),
                   int(torch.randint(200, 241, (1,), generator=gen)))
        z, y, x = torch.meshgrid(torch.linspace(-1.2, 1.2, D), torch.linspace(-1.2, 1.2, H),
                                 torch.linspace(-1.2, 1.2, W), indexing="ij")
        masks.append(((z ** 2 + y ** 2 + x ** 2) < 1).to(torch.uint8).to(device))
        vols.append(torch.randint(0, 256, (D, H, W), dtype=torch.uint8, generator=gen).to(device))
    return vols, masks


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--volumes", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    vols, masks = head_volumes(a.volumes, torch.Generator().manual_seed(0), a.device)
    nbytes = sum(v.numel() for v in vols) * 2  # volume + mask
    ref = timeit(lambda: T.patchify_reference(vols, masks), a.repeats, a.device)
    n_tok = int(T.patchify_reference(vols, masks)[2][-1])
    print(f"device {a.device}, threads {torch.get_num_threads()}, {a.volumes} volumes, {n_tok} tokens, "
          f"{nbytes / 1e6:.0f} MB in")
    print(f"reference (PyTorch): {a.volumes / ref:8.1f} volumes/s  {nbytes / ref / 1e9:6.2f} GB/s")
    if ops.backend("patchify", a.device) == "reference":
        print("compiled kernel: not built for this device")
        return
    ker = timeit(lambda: T.patchify(vols, masks, impl="kernel"), a.repeats, a.device)
    print(f"kernel ({ops.backend('patchify', a.device)}):       {a.volumes / ker:8.1f} volumes/s  "
          f"{nbytes / ker / 1e9:6.2f} GB/s")
    print(f"speed-up kernel / reference: {ref / ker:.2f}x")


if __name__ == "__main__":
    main()
