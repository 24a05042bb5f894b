"""Operator registry: which implementation each custom operator runs on.

Pattern (every kernel in csrc/ follows it; see csrc/README.md):
  (a) a plain PyTorch reference in nvfm/ (the specification, used in tests and as fallback),
  (b) a C++ CPU kernel and (c) a CUDA kernel in csrc/, both registered with `torch.library`
      (`TORCH_LIBRARY_FRAGMENT(nvfm, m)` + `TORCH_LIBRARY_IMPL(nvfm, CPU|CUDA, m)`), so they
      appear as `torch.ops.nvfm.<name>` and PyTorch dispatches on the device of the inputs.
The .cu files include no torch headers: they take raw pointers, sizes and a cudaStream_t;
tensor checks and allocation live in the .cpp file that registers the op.

`backend(name, device)` answers "cuda", "cpp" or "reference": what exists for that device.

Dispatch policy, one rule for every operator (`auto_backend`, what impl="auto" uses):
  a compiled kernel runs automatically when it exists for the device and, on CUDA, when it has
  passed its tests on a real GPU (the op is in CUDA_VERIFIED, filled from a recorded
  bench/gpu_acceptance.py run). Until then CUDA tensors take the PyTorch path (the reference,
  or PyTorch's own kernel for attention), and the CUDA kernel runs only when asked for
  (impl="kernel" / impl="ours"), or everywhere with NVFM_CUDA_KERNELS=1 (acceptance runs).
  The CUDA kernels' logic is checked on the CPU in CI (tests/test_simt.py); timing and the
  hardware memory model are not, hence the rule.
The environment variable NVFM_OPS=reference forces the references everywhere (debugging,
bisecting a kernel bug).
"""
import os
import sys
import warnings

import torch

OPS = ("patchify", "unpatchify", "varlen_attn_fwd", "varlen_attn_bwd", "gather_tokens", "block_masks", "bootstrap_stats",
       "fill_holes_slices", "u16_histogram", "u16_lookup")  # later kernels append their names here via register()

_C = None
_EXT_ERROR = None
if os.environ.get("NVFM_OPS", "") != "reference":
    try:
        from nvfm import _C  # noqa: F401  (loading the library registers torch.ops.nvfm.*)
    except Exception as e:  # not built, or built against another torch: fall back, loudly
        _EXT_ERROR = e


def register(name):
    """Declare an operator name so it appears in the backend report."""
    global OPS
    if name not in OPS:
        OPS = OPS + (name,)
    for device_type in ("cpu", "cuda"):
        has_kernel(name, device_type)


def extension_loaded():
    return _C is not None


def cuda_compiled():
    return _C is not None and bool(_C.cuda_compiled())


_HAS_KERNEL = {}  # (name, device_type) -> bool; filled eagerly so torch.compile sees constants


def _query_kernel(name, device_type):
    if _C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"nvfm::{name}", key))
    except RuntimeError:
        return False


def has_kernel(name, device_type):
    """True when the compiled extension has a kernel of op `name` for device_type ('cpu'/'cuda').

    Memoized (the registrations never change after import), and for every name in OPS
    computed at import: inside a torch.compile'd model the answer is then a plain dict lookup,
    not a call into the dispatcher that would break the graph."""
    k = (name, device_type)
    if k not in _HAS_KERNEL:
        _HAS_KERNEL[k] = _query_kernel(name, device_type)
    return _HAS_KERNEL[k]


def backend(name, device="cpu"):
    device_type = torch.device(device).type
    if has_kernel(name, device_type):
        return "cuda" if device_type == "cuda" else "cpp"
    return "reference"


# Ops whose CUDA kernel passed bench/gpu_acceptance.py on a GPU (none yet: no GPU lent so far).
CUDA_VERIFIED = frozenset()


def cuda_kernel_trusted(name):
    """True when impl="auto" may run op `name`'s CUDA kernel (see the policy above)."""
    return name in CUDA_VERIFIED or os.environ.get("NVFM_CUDA_KERNELS", "") == "1"


def auto_backend(name, device="cpu"):
    """The backend impl="auto" uses: backend() with the CUDA rule above applied."""
    b = backend(name, device)
    return "reference" if b == "cuda" and not cuda_kernel_trusted(name) else b


def report():
    """One line per operator: its CPU and CUDA backends."""
    lines = []
    for name in OPS:
        cuda = backend(name, "cuda") if cuda_compiled() else "reference (CUDA not compiled)"
        if cuda == "cuda" and not cuda_kernel_trusted(name):
            cuda = "reference (kernel unverified on GPU; impl='kernel' runs it)"
        lines.append(f"  {name:<22} cpu: {backend(name, 'cpu'):<10} cuda: {cuda}")
    return "\n".join(lines)


for _name in OPS:
    for _dt in ("cpu", "cuda"):
        has_kernel(_name, _dt)


def _problem():
    """One line saying why the compiled operators are not (all) in use, or None.

    Missing: the import failed (not built, or built against another torch). Stale: it loaded but
    lacks a CPU kernel of an operator this version declares (built from older sources)."""
    if _C is None:
        if _EXT_ERROR is None:
            return None  # NVFM_OPS=reference: asked for, nothing to warn about
        why = (str(_EXT_ERROR).strip().splitlines() or [type(_EXT_ERROR).__name__])[0]
        return f"compiled extension nvfm._C not available ({why}); every operator uses its PyTorch reference (slow)"
    missing = [n for n in OPS if not has_kernel(n, "cpu")]
    if missing:
        return (f"compiled extension nvfm._C is stale (no kernel for {', '.join(missing)}); "
                "those use their PyTorch reference (slow)")
    return None


def verbose():
    """True when the backend table is printed on import: NVFM_VERBOSE=1 (NVFM_QUIET=1 wins)."""
    on = lambda k: os.environ.get(k, "") not in ("", "0")  # noqa: E731
    return on("NVFM_VERBOSE") and not on("NVFM_QUIET")


def banner():
    """The backend table: one line per operator, under a heading saying whether _C loaded."""
    state = "loaded" if _C is not None else "not loaded"
    return f"nvfm: extension {state}; operator backends:\n{report()}"


def _announce():
    """Quiet by default: a missing or stale extension warns in one line (a warning with no
    source line under it); the backend table prints only with NVFM_VERBOSE=1 (or
    `python -m nvfm.ops`). NVFM_QUIET=1 is still accepted and keeps the table off."""
    problem = _problem()
    if problem is not None:
        warnings.warn_explicit(f"nvfm: {problem}. Build it with `pip install --no-build-isolation -e .`",
                               RuntimeWarning, __file__, 0, module=__name__)
    if verbose():
        print(banner(), file=sys.stderr)


if __name__ == "__main__":  # python -m nvfm.ops: the table, always (this copy runs as __main__)
    from nvfm import ops as _ops  # the instance every other module uses (already announced)
    print(_ops.banner())
    sys.exit(0)
_announce()
