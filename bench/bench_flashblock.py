"""FlashBlock vs UnfusedBlock: peak memory and speed of one ViT block over packed tokens.

    python bench/bench_flashblock.py                       # CPU (and GPU when CUDA is present)
    python bench/bench_flashblock.py --dim=768 --heads=12 --lens="(1000, 3000)"  # ViT-B block

Peak memory: on CPU the growth of the process's peak RSS during the call, each variant in a
fresh subprocess (CPU PyTorch keeps no allocator statistics); on GPU
torch.cuda.max_memory_allocated above the inputs. Inference = torch.no_grad forward;
training = forward + backward.
"""
import json
import resource
import subprocess
import sys
import time

import torch

from nvfm.flashblock import FlashBlock, UnfusedBlock

# config (nanoGPT style; override with --key=value)
dim = 384
heads = 6
lens = (500, 1500, 3000, 4000)  # tokens per volume of the packed batch
repeats = 3
child = ""                     # internal: "<variant>:<mode>" runs one measurement
device = "cpu"

from nvfm.configurator import configure  # noqa: E402

configure(globals(), verbose=False)
LENS = [int(n) for n in lens]


def make(variant, dev):
    torch.manual_seed(0)
    blk = (FlashBlock(dim, heads) if variant == "flash" else UnfusedBlock(dim, heads, attn_impl="sdpa")).to(dev)
    cu = torch.tensor([0] + LENS).cumsum(0).to(torch.int32).to(dev)
    x = torch.randn(int(cu[-1]), dim, device=dev)
    return blk, x, cu


def run_once(blk, x, cu, mode):
    if mode == "inference":
        with torch.no_grad():
            return blk(x, cu, max(LENS))
    y = blk(x.requires_grad_() if not x.requires_grad else x, cu, max(LENS))
    y.sum().backward()
    return y


def measure(variant, mode, dev):
    """(peak extra bytes, seconds per call)"""
    blk, x, cu = make(variant, dev)
    if dev == "cuda":
        run_once(blk, x, cu, mode)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(blk, x, cu, mode)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        run_once(blk, x, cu, mode)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    t = time.perf_counter()
    for _ in range(repeats):
        run_once(blk, x, cu, mode)
    if dev == "cuda":
        torch.cuda.synchronize()
    return peak, (time.perf_counter() - t) / repeats


if __name__ == "__main__":
    if child:
        variant, mode = child.split(":")
        print(json.dumps(measure(variant, mode, device)))
        sys.exit(0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"block dim {dim}, heads {heads}, packed lengths {LENS} ({sum(LENS)} tokens), fp32")
    for dev in devices:
        for mode in ("inference", "training"):
            res = {}
            for variant in ("unfused", "flash"):
                if dev == "cpu":  # fresh process: RSS high-water marks do not go down
                    out = subprocess.run([sys.executable, __file__, f"--child={variant}:{mode}", f"--dim={dim}",
                                          f"--heads={heads}", f"--lens={tuple(LENS)!r}", f"--repeats={repeats}"],
                                         capture_output=True, text=True, check=True)
                    res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
                else:
                    res[variant] = measure(variant, mode, dev)
            (pu, tu), (pf, tf) = res["unfused"], res["flash"]
            print(f"{dev} {mode:>9}: unfused {pu / 2**20:7.1f} MiB {tu * 1e3:7.1f} ms | flash {pf / 2**20:7.1f} MiB "
                  f"{tf * 1e3:7.1f} ms | peak memory {100 * (1 - pf / max(pu, 1)):.0f}% lower, "
                  f"speed-up {tu / tf:.2f}x")
