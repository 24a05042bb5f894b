"""The csrc/*.cu kernels built for the SIMT emulator (csrc/simt/simt.h) and called through ctypes
with CPU tensors, mirroring the .cpp entry points (pre-zeroed outputs, lse filled with -inf).

    lib = load("attention")                 # g++ build of csrc/attention_cuda.cu, cached
    out, lse = lib.attn_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, schedule="random:3")

Builds are cached under build/simt/ by a hash of the sources and flags (NVFM_SIMT_CACHE moves
it). `load(op, source=...)` builds a modified copy of a kernel (mutation tests); `asan=True`
builds with AddressSanitizer (the process must have libasan preloaded: see tests/test_simt.py).
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CACHE = os.environ.get("NVFM_SIMT_CACHE", os.path.join(ROOT, "build", "simt"))
OPS = ("patchify", "attention", "gather", "blocks", "selftest")
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare",
         "-Werror", "-DNVFM_SIMT"]
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer"]
_SCHEDULES = {"forward": 0, "reverse": 1, "random": 2}


class SimtError(RuntimeError):
    """The emulator rejected a launch or found a barrier/warp error (divergence, deadlock...)."""


def _cu(op):
    return os.path.join(CSRC, "simt", "selftest.cu") if op == "selftest" else os.path.join(CSRC, f"{op}_cuda.cu")


def _inputs(op):
    files = [_cu(op), os.path.join(CSRC, "cuda_compat.h"), os.path.join(CSRC, "tensor_core.h"), os.path.join(CSRC, "simt", "simt.h"),
             os.path.join(CSRC, "simt", "capi.cpp")]
    return files + ([os.path.join(CSRC, f"{op}.h")] if op != "selftest" else [])


def build(op, source=None, asan=False):
    """Path of lib<op>.so built from csrc/<op>_cuda.cu, or from the text `source` in its place."""
    assert op in OPS, op
    flags = FLAGS + (ASAN_FLAGS if asan else []) + [f"-DSIMT_OP_{op.upper()}"]
    h = hashlib.sha256(" ".join([CXX] + flags).encode())
    for f in _inputs(op):
        with open(f, "rb") as fh:
            h.update(fh.read())
    if source is not None:
        h.update(source.encode())
    out_dir = os.path.join(CACHE, h.hexdigest()[:16])
    lib = os.path.join(out_dir, f"lib{op}.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(CACHE, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=CACHE)
    cu = _cu(op)
    if source is not None:
        cu = os.path.join(tmp, f"{op}_cuda.cu")
        with open(cu, "w") as fh:
            fh.write(source)
    cmd = (["nice", "-n", "19", CXX] + flags + ["-I", os.path.join(CSRC, "simt", "shim"), "-I", CSRC, "-x", "c++", cu,
           os.path.join(CSRC, "simt", "capi.cpp"), "-o", os.path.join(tmp, f"lib{op}.so")])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"emulator build of {op} failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
    try:
        os.rename(tmp, out_dir)  # atomic: a concurrent build of the same hash keeps the first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return lib


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def _ints(xs, ctype=ctypes.c_int):
    return (ctype * len(xs))(*xs)


class Kernels:
    """ctypes view of one lib<op>.so; every call takes schedule="forward"|"reverse"|"random:<seed>"."""

    def __init__(self, path):
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.simt_message.restype = ctypes.c_char_p
        self.lib.simt_configure.argtypes = [ctypes.c_int, ctypes.c_uint64]
        for name in ("simt_patch_gather", "simt_patch_scatter", "simt_gather_tokens", "simt_block_masks"):
            if hasattr(self.lib, name):
                getattr(self.lib, name).restype = ctypes.c_int
        if hasattr(self.lib, "simt_attn_fwd"):
            self.lib.simt_attn_fwd.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_float, ctypes.c_void_p,
                                                                       ctypes.c_void_p]
            self.lib.simt_attn_fwd_tc.argtypes = self.lib.simt_attn_fwd.argtypes
            self.lib.simt_attn_bwd.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_float] + [ctypes.c_void_p] * 7
            self.lib.simt_attn_bwd_tc.argtypes = self.lib.simt_attn_bwd.argtypes

    def _call(self, name, schedule, *args):
        kind, _, seed = schedule.partition(":")
        self.lib.simt_configure(_SCHEDULES[kind], int(seed or 0))
        rc = getattr(self.lib, name)(*args)
        if rc != 0:
            raise SimtError(f"{name} [{schedule}]: cudaError {rc}: {self.lib.simt_message().decode()}")

    # ---- patchify_cuda.cu
    def token_fg_count(self, mask, patch, schedule="forward"):
        D, H, W = mask.shape
        grid = [-(-s // p) for s, p in zip(mask.shape, patch)]
        counts = torch.full(grid, -7, dtype=torch.int32)
        self._call("simt_token_fg_count", schedule, _ptr(mask.contiguous()), _ints([D, H, W, *patch]), _ptr(counts))
        return counts

    def patch_gather(self, vol, coords, patch, schedule="forward"):
        n, P = coords.shape[0], patch[0] * patch[1] * patch[2]
        out = torch.full((n, P), 0xAB, dtype=torch.uint8)
        self._call("simt_patch_gather", schedule, _ptr(vol.contiguous()), _ints([*vol.shape, *patch]),
                   _ptr(coords.contiguous()), ctypes.c_int64(n), _ptr(out))
        return out

    def patch_scatter(self, tokens, coords, shape, patch, schedule="forward", guard=4096):
        """vol (zeros, like unpatchify) and whether the `guard` bytes either side stayed untouched."""
        size = shape[0] * shape[1] * shape[2]
        buf = torch.full((guard + size + guard,), 0xCD, dtype=torch.uint8)
        buf[guard:guard + size] = 0
        vol = buf[guard:guard + size]
        self._call("simt_patch_scatter", schedule, _ptr(tokens.contiguous()), _ints([*shape, *patch]),
                   _ptr(coords.contiguous()), ctypes.c_int64(coords.shape[0]), _ptr(vol))
        intact = bool((buf[:guard] == 0xCD).all() and (buf[guard + size:] == 0xCD).all())
        return vol.reshape(shape).clone(), intact

    # ---- attention_cuda.cu
    _DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

    def _attn_ints(self, q, cu_q, max_q, max_k):
        return _ints([cu_q.numel() - 1, q.shape[1], q.shape[2], max_q, max_k, self._DT[q.dtype]])

    def attn_fwd(self, q, k, v, cu_q, cu_k, max_q, max_k, scale, schedule="forward", tensor_cores=False):
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"))
        self._call("simt_attn_fwd_tc" if tensor_cores else "simt_attn_fwd", schedule, _ptr(q), _ptr(k), _ptr(v), _ptr(cu_q), _ptr(cu_k),
                   self._attn_ints(q, cu_q, max_q, max_k), _ints([q.shape[0], k.shape[0]], ctypes.c_int64),
                   ctypes.c_float(scale), _ptr(out), _ptr(lse))
        return out, lse

    def attn_bwd(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, schedule="forward",
                 tensor_cores=False):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dvec = torch.full((q.shape[1], q.shape[0]), float("nan"))
        self._call("simt_attn_bwd_tc" if tensor_cores else "simt_attn_bwd", schedule, _ptr(q), _ptr(k), _ptr(v), _ptr(cu_q), _ptr(cu_k),
                   self._attn_ints(q, cu_q, max_q, max_k), _ints([q.shape[0], k.shape[0]], ctypes.c_int64),
                   ctypes.c_float(scale), _ptr(dout), _ptr(out), _ptr(lse), _ptr(dvec), _ptr(dq), _ptr(dk),
                   _ptr(dv))
        return dq, dk, dv

    # ---- gather_cuda.cu
    _GT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.uint8: 3}

    def gather_tokens(self, volumes, coords, cu, params, table, patch, dtype, schedule="forward"):
        B = len(volumes)
        vols = [v.contiguous() for v in volumes]
        datas = (ctypes.c_void_p * max(B, 1))(*[v.data_ptr() for v in vols])
        dims = _ints([d for v in vols for d in v.shape] or [0])
        n = coords.shape[0]
        out = torch.empty((n, patch[0] * patch[1] * patch[2]), dtype=dtype)
        out.view(torch.uint8).fill_(0xAB)
        self._call("simt_gather_tokens", schedule, datas, dims, _ptr(params.contiguous()), _ptr(cu.contiguous()),
                   ctypes.c_int(B), _ptr(coords.contiguous()), ctypes.c_int64(n),
                   _ptr(table.contiguous() if dtype != torch.uint8 else None), ctypes.c_int(patch[0]),
                   ctypes.c_int(patch[1]), ctypes.c_int(patch[2]), _ptr(out), ctypes.c_int(self._GT[dtype]))
        return out

    # ---- blocks_cuda.cu
    def block_masks(self, coords, cu, centres, cu_blocks, aspects, keys, counts, schedule="forward"):
        B, N = cu.numel() - 1, coords.shape[0]
        n = (cu[1:] - cu[:-1]).long()
        n_sel, sel_t, n_drop = counts[:, 0].long(), counts[:, 1].long(), counts[:, 2].long()
        n_ctx = torch.where(sel_t != 0, n - n_sel, n_sel) - n_drop
        cu_ctx = torch.cat([torch.zeros(1, dtype=torch.long), n_ctx.cumsum(0)]).to(torch.int32)
        cu_tgt = torch.cat([torch.zeros(1, dtype=torch.long), (n - n_ctx).cumsum(0)]).to(torch.int32)
        g = N + 64  # guard elements either side: a wrong index lands there, not in the heap
        n_ctx_all = int(cu_ctx[-1])
        ctx_buf = torch.full((g + n_ctx_all + g,), -5, dtype=torch.int64)
        tgt_buf = torch.full((g + N - n_ctx_all + g,), -5, dtype=torch.int64)
        ctx, tgt = ctx_buf[g:g + n_ctx_all], tgt_buf[g:g + N - n_ctx_all]
        dist, flag = torch.full((N,), float("nan")), torch.full((N,), 0xEE, dtype=torch.uint8)
        self._call("simt_block_masks", schedule, _ptr(coords), _ptr(cu), ctypes.c_int(B), _ptr(centres),
                   _ptr(cu_blocks), _ptr(aspects), _ptr(keys), ctypes.c_int64(N), _ptr(counts), _ptr(cu_ctx),
                   _ptr(cu_tgt), _ptr(dist), _ptr(flag), _ptr(ctx), _ptr(tgt))
        for buf in (ctx_buf, tgt_buf):
            if not ((buf[:g] == -5).all() and (buf[len(buf) - g:] == -5).all()):
                raise AssertionError("block_masks wrote outside its index lists")
        return ctx.clone(), cu_ctx, tgt.clone(), cu_tgt


_LOADED = {}


def load(op, source=None, asan=False):
    key = (op, source, asan)
    if key not in _LOADED:
        _LOADED[key] = Kernels(build(op, source, asan))
    return _LOADED[key]


def mutate(op, old, new, count=1):
    """The source of csrc/<op>_cuda.cu with its `count`-th occurrence of `old` replaced by `new`."""
    with open(os.path.join(CSRC, f"{op}_cuda.cu")) as fh:
        src = fh.read()
    at = -1
    for _ in range(count):
        at = src.find(old, at + 1)
        assert at >= 0, f"mutation target {old!r} not found in {op}_cuda.cu"
    return src[:at] + new + src[at + len(old):]
