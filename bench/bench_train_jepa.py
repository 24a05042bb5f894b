"""Vol-JEPA speed: (1) mask sampling in a loader worker, ms per volume; (2) training-step
throughput (tokens/s, volumes/s, TFLOP/s, MFU) of one model size with each attention
implementation, on real packed batches; peak GPU memory per batch size on CUDA.

    python bench/bench_train_jepa.py                                   # CPU: tiny, demo-like volumes
    python bench/bench_train_jepa.py --size=vitb --batch=32,64 --attn=ours,sdpa   # GPU
    python bench/bench_train_jepa.py --shards=SHARDS                   # real shards instead of synthetic
    python bench/bench_train_jepa.py --mask_only                       # (1) only: python path vs ops path

Exit status 1 when a requested (size, batch, attention) step could not be measured (its
reason is printed), so a failing kernel is never a silent gap in the table.

Synthetic volumes (nvfm.loader.synthetic_volume, 40 x 224 x 224 voxels, ~550 foreground
tokens each) stand in when no shards are given. The step is the one of train_jepa.py
(student on context, predictor, EMA teacher on all tokens, AdamW, bf16 autocast on GPU).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nvfm.loader import ArrayReader, JepaBatches, synthetic_volume, train_indices  # noqa: E402
from nvfm.model import (Encoder, EncoderConfig, Predictor, PredictorConfig, encoder_flops, normalize_tokens,  # noqa: E402
                        predictor_flops)

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def get_reader(args):
    if args.shards:
        from nvfm.data import ShardReader
        return ShardReader(args.shards)
    rng = np.random.default_rng(0)
    return ArrayReader([synthetic_volume(rng, "MR" if i % 2 == 0 else "CT", (40, 224, 224), f"v{i}") for i in range(16)])


def split_context_target_numpy(coords, ratio, config_multi, rng, cfg):
    """The previous all-numpy split of nvfm.masks (before the block_masks operator), kept here
    as the speed baseline: same distributions, its own draws (so different masks)."""
    from nvfm.masks import block_distance
    n = len(coords)
    n_ctx = min(max(int(round(ratio * n)), 1), n - 1)
    K = int(rng.integers(cfg.n_blocks[0], cfg.n_blocks[1] + 1)) if config_multi else 1
    centres = coords[rng.integers(0, n, K)]
    aspects = np.exp(rng.uniform(-np.log(cfg.aspect), np.log(cfg.aspect), (K, 3))).astype(np.float32)
    d = block_distance(coords, centres, aspects) + rng.uniform(0, 1e-3, n).astype(np.float32)  # random ties
    if config_multi:
        order = np.argpartition(d, n - n_ctx - 1)
        ctx, tgt = order[n - n_ctx:], order[:n - n_ctx]
    else:
        order = np.argpartition(d, n_ctx - 1)
        ctx, tgt = order[:n_ctx], order[n_ctx:]
    n_drop = min(int(round(cfg.drop * len(ctx))), len(ctx) - 1)
    if n_drop > 0:
        shuffled = rng.permutation(ctx)
        ctx, tgt = shuffled[n_drop:], np.concatenate([tgt, shuffled[:n_drop]])
    return np.sort(ctx), np.sort(tgt)


# mask paths: (patch gather nvfm.masks.GATHER, context/target split)
MASK_PATHS = {"numpy": ("numpy", "numpy"),      # plain strided gather + numpy split
              "python": ("rows", "numpy"),      # the previous default: row gather + numpy split
              "ops": ("compiled", "op")}        # uint8 gather kernel + block_masks operator (default now)


def bench_masks(reader, n=200, paths=("python", "ops"), repeats=3):
    """CPU time per volume of mask sampling + collate in one loader worker (1 torch thread),
    for each path of MASK_PATHS, interleaved, best of `repeats`; ratios vs "python"."""
    from nvfm import masks as M
    from nvfm.ops import backend
    idx = train_indices(reader, "train")
    ds = JepaBatches(reader, idx, global_batch=1, seed=0)
    for i in idx:  # decode the token masks once (a worker caches them)
        reader.token_mask(i)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run single-threaded torch
    split_op = M.split_context_target
    print(f"backends: gather_tokens {backend('gather_tokens', 'cpu')}, block_masks {backend('block_masks', 'cpu')}")
    best = {p: (float("inf"), 0.0) for p in paths}
    for _ in range(repeats):
        for p in paths:
            M.GATHER, split = MASK_PATHS[p]
            M.split_context_target = split_op if split == "op" else split_context_target_numpy
            ds[0]
            t, c = time.perf_counter(), time.process_time()
            toks = 0
            for s in range(n):
                toks += len(ds[s]["tokens"])
            dt, dc = time.perf_counter() - t, time.process_time() - c
            best[p] = min(best[p], (1e3 * dc / n, 1e3 * dt / n))
    M.GATHER, M.split_context_target = "compiled", split_op
    torch.set_num_threads(threads)
    for p, (c, w) in best.items():
        ratio = f", {best['python'][0] / c:.2f}x vs python" if "python" in best else ""
        print(f"mask sampling + collate [{p:<6}: gather {MASK_PATHS[p][0]:<8} split {MASK_PATHS[p][1]:<5}]: "
              f"{c:.2f} ms/volume CPU time ({w:.2f} ms wall){ratio}, {toks / n:.0f} tokens/volume (one loader worker)")


def bench_step(reader, size, batch, attn, steps, device):
    torch.manual_seed(0)
    dev = torch.device(device)
    ec = EncoderConfig.preset(size)
    pc = PredictorConfig(enc_dim=ec.dim, dim=ec.dim if size != "tiny" else 64, depth=ec.depth if size != "tiny" else 2,
                         heads=ec.heads if size != "tiny" else 2)
    student, teacher, pred = Encoder(ec).to(dev), Encoder(ec).to(dev), Predictor(pc).to(dev)
    teacher.requires_grad_(False)
    for m in (student, teacher, pred):
        m.set_attention(attn)
    params = list(student.parameters()) + list(pred.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    ds = JepaBatches(reader, train_indices(reader, "train"), global_batch=batch, seed=0)
    batches = [ds[s] for s in range(min(steps, 4))]
    amp = dev.type == "cuda"

    def one(b):
        b = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in b.items()}
        x = normalize_tokens(b["tokens"], b["window"])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            with torch.no_grad():
                h = teacher(x, b["coords"], b["cu_seqlens"], b["max_seqlen"])
                tgt = F.layer_norm(h.float(), (h.shape[-1],))[b["tgt_index"]]
            ctx = b["ctx_index"]
            z = student(x[ctx], b["coords"][ctx], b["cu_ctx"], b["max_ctx"])
            p = pred(z, b["coords"][ctx], b["coords"][b["tgt_index"]],
                     (b["pred_ctx_pos"], b["pred_tgt_pos"], b["pred_cu"], b["pred_max"]))
            loss = F.smooth_l1_loss(p.float(), tgt)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 0.006)

    def flops(b):  # train_jepa.py's step_flops
        lc = b["cu_ctx"].diff().tolist()
        pred = predictor_flops(pc, lc, b["pred_cu"].diff().tolist())
        return 3 * (encoder_flops(ec, lc) + pred) + encoder_flops(ec, b["cu_seqlens"].diff().tolist())

    one(batches[0])  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    tok = fl = 0
    for s in range(steps):
        b = batches[s % len(batches)]
        one(b)
        tok += int(b["cu_seqlens"][-1])
        fl += flops(b)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    peak = next((v for k, v in PEAK.items() if k in torch.cuda.get_device_name(dev)), None) if amp else None
    mem = f" peak mem {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB" if amp else ""
    mfu = f" MFU {100 * fl / dt / peak:.1f}%" if peak else ""
    print(f"{size} batch {batch} attn {attn:<9}: {steps / dt:.2f} steps/s {tok / dt:,.0f} tok/s "
          f"{batch * steps / dt:.1f} vol/s {fl / dt / 1e12:.3f} TFLOP/s{mfu}{mem}", flush=True)
    return steps / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    ap.add_argument("--size", default="vitb" if cuda else "tiny", help="model size(s), comma-separated")
    ap.add_argument("--batch", default="32,64" if cuda else "8")
    ap.add_argument("--attn", default="ours,sdpa" if cuda else "sdpa,reference")
    ap.add_argument("--steps", type=int, default=20 if cuda else 5)
    ap.add_argument("--shards", default="")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--mask_paths", default="python,ops", help="mask paths to time: " + ",".join(MASK_PATHS))
    ap.add_argument("--mask_only", action="store_true", help="only the mask-sampling benchmark")
    args = ap.parse_args()
    print(f"device {args.device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} CPU threads'}), "
          f"torch {torch.__version__}")
    reader = get_reader(args)
    bench_masks(reader, paths=args.mask_paths.split(","))
    if args.mask_only:
        return 0
    failed = []
    for size in args.size.split(","):
        for batch in [int(b) for b in args.batch.split(",")]:
            rates = {}
            for attn in args.attn.split(","):
                try:
                    rates[attn] = bench_step(reader, size, batch, attn, args.steps, args.device)
                except (NotImplementedError, RuntimeError) as e:
                    why = (str(e).splitlines() or [type(e).__name__])[0][:100]
                    print(f"{size} batch {batch} attn {attn}: FAILED ({why})", flush=True)
                    failed.append(f"{size}/{batch}/{attn}")
                    if args.device.startswith("cuda"):
                        torch.cuda.empty_cache()
            names = list(rates)
            if len(names) >= 2:
                print(f"  ratio {names[0]} / {names[1]}: {rates[names[0]] / rates[names[1]]:.2f}x steps/s")
    if failed:  # a requested measurement that did not happen is a failure, not a footnote
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
