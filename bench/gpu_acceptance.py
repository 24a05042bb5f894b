"""GPU acceptance run: everything about the CUDA kernels that needs a real GPU, in one command.

On a bare lent CUDA machine, from the repository root (CUDA torch already installed there):

    python3 -m pip install --no-build-isolation -e .   # or pass --build: NVFM_CUDA=1 NVFM_REQUIRE_EXT=1
    python3 bench/gpu_acceptance.py --out "$OUT"       # about 7-9 minutes, --budget_s caps it

Sections (each a subprocess with its own time limit; a failure or timeout is recorded and the
run goes on):
  build      (--build only) compile the extension with its CUDA kernels
  env        GPU name, torch/CUDA versions, which nvfm ops have CUDA kernels
  tests      every CUDA test: tests/test_{attention,patchify,gather,blocks}.py on the GPU, the
             kernels run with NVFM_CUDA_KERNELS=1 (our attention vs torch references included)
  tests_tc   tests/test_attention.py's CUDA tests with the tensor-core kernels (NVFM_ATTN_KERNEL=tc)
  learn      the Vol-JEPA positive control (tests/test_train_jepa.py) trained on the GPU: bf16
             autocast and the CUDA kernels must learn what the context predicts, as on the CPU
  attention  bench/bench_attention.py --gpu_only: TFLOP/s fwd and fwd+bwd of ours (FMA), torch
             varlen, padded SDPA and flex_attention on equal and realistic length mixes
  attention_tc  the same with ours = the tensor-core kernels (forward and backward)
  gather     bench/bench_gather.py: the gather kernel vs a device-to-device copy (bandwidth)
  train      bench/bench_train_jepa.py: ViT-B JEPA step (tokens/s, MFU, peak memory) per
             attention impl
Writes gpu_acceptance.md and gpu_acceptance.json under --out. Without CUDA every GPU section
is recorded as skipped (that path, argument handling and the report are tested in CI:
tests/test_gpu_acceptance.py). Record the report in BENCHMARKS.md, and add the ops that passed
to nvfm.ops.CUDA_VERIFIED.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("build", "env", "tests", "tests_tc", "learn", "attention", "attention_tc", "gather", "train")
CUDA_TESTS = ["tests/test_attention.py", "tests/test_patchify.py", "tests/test_gather.py", "tests/test_blocks.py"]
LEARN_TEST = "tests/test_train_jepa.py::test_the_tiny_recipe_learns_what_the_context_predicts"
ENV_PROBE = r"""
import json, torch
from nvfm import ops
d = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
     "capability": list(torch.cuda.get_device_capability(0)), "extension": ops.extension_loaded(),
     "cuda_compiled": ops.cuda_compiled(),
     "cuda_kernels": [n for n in ops.OPS if ops.has_kernel(n, "cuda")]}
print(json.dumps(d))
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_acceptance"),
                    help="report directory (default $OUT)")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all but build)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--build", action="store_true", help="run the build section first")
    ap.add_argument("--budget_s", type=float, default=540.0, help="wall-clock budget of the whole run (s)")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and sizes (a smoke run)")
    args = ap.parse_args(argv)
    only = [s for s in args.only.split(",") if s]
    skip = [s for s in args.skip.split(",") if s]
    for s in only + skip:
        if s not in SECTIONS:
            ap.error(f"unknown section {s!r}; sections: {', '.join(SECTIONS)}")
    args.sections = [s for s in (only or SECTIONS) if s not in skip and (s != "build" or args.build or "build" in only)]
    return args


def plan(args):
    """(section, command, env additions, time limit s) in run order."""
    py = sys.executable
    q = args.quick
    steps = [
        ("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "-e", "."],
         {"NVFM_CUDA": "1", "NVFM_REQUIRE_EXT": "1", "MAX_JOBS": str(os.cpu_count() or 4)}, 420),
        ("env", [py, "-c", ENV_PROBE], {}, 60),
        ("tests", [py, "-m", "pytest", "-q", "-rs", "-k", "cuda", *CUDA_TESTS], {"NVFM_CUDA_KERNELS": "1"}, 240),
        ("tests_tc", [py, "-m", "pytest", "-q", "-rs", "-k", "cuda", "tests/test_attention.py"],
         {"NVFM_CUDA_KERNELS": "1", "NVFM_ATTN_KERNEL": "tc"}, 120),
        ("learn", [py, "-m", "pytest", "-q", "-rs", LEARN_TEST], {"NVFM_CUDA_KERNELS": "1"}, 150),
        ("attention", [py, "bench/bench_attention.py", "--gpu_only=True", f"--gpu_repeats={3 if q else 10}"], {}, 150),
        ("attention_tc", [py, "bench/bench_attention.py", "--gpu_only=True", f"--gpu_repeats={3 if q else 10}"],
         {"NVFM_ATTN_KERNEL": "tc"}, 150),
        ("gather", [py, "bench/bench_gather.py", f"--repeats={2 if q else 5}"], {}, 90),
        ("train", [py, "bench/bench_train_jepa.py", "--size=vitb", f"--batch={'16' if q else '32'}",
                   "--attn=ours,torch_varlen,sdpa", f"--steps={5 if q else 20}", "--device=cuda"], {}, 240),
    ]
    return [s for s in steps if s[0] in args.sections]


def run_section(name, cmd, env_add, limit_s):
    env = dict(os.environ, NVFM_QUIET="1", **env_add)
    t0 = time.time()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s)
        rc, out = res.returncode, res.stdout + ("\n" + res.stderr if res.stderr.strip() else "")
        status = "passed" if rc == 0 else "failed"
    except subprocess.TimeoutExpired as e:
        rc, status = None, "timeout"
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    r = {"section": name, "status": status, "rc": rc, "seconds": round(time.time() - t0, 1),
         "command": " ".join(cmd), "output": out[-20000:]}
    if name == "env" and rc == 0:
        try:
            r["data"] = json.loads(out.strip().splitlines()[0])
        except (ValueError, IndexError):
            pass
    return r


def write_report(out_dir, results, meta):
    """gpu_acceptance.json (everything) and gpu_acceptance.md (summary + output tails)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gpu_acceptance.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    lines = ["# GPU acceptance run", "", f"- date: {meta['date']}", f"- host: {meta['host']}",
             f"- device: {meta.get('device', 'unknown')}", f"- total: {meta['seconds']} s", "",
             "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {r['section']} | {r['status']} | {r['seconds']} |" for r in results]
    for r in results:
        lines += ["", f"## {r['section']}: {r['status']}", "", f"`{r['command']}`", "", "```",
                  r["output"][-6000:].rstrip(), "```"]
    with open(os.path.join(out_dir, "gpu_acceptance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(out_dir, "gpu_acceptance.md")


def cuda_available():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    has_cuda = cuda_available()
    results = []
    for name, cmd, env_add, limit in plan(args):
        left = args.budget_s - (time.time() - t0)
        if name != "build" and not has_cuda:
            results.append({"section": name, "status": "skipped (no CUDA device)", "rc": None, "seconds": 0.0,
                            "command": " ".join(cmd), "output": ""})
            continue
        if left < 10:
            results.append({"section": name, "status": "skipped (budget spent)", "rc": None, "seconds": 0.0,
                            "command": " ".join(cmd), "output": ""})
            continue
        print(f"[gpu_acceptance] {name} (limit {min(limit, left):.0f} s)", flush=True)
        results.append(run_section(name, cmd, env_add, min(limit, left)))
        print(f"[gpu_acceptance] {name}: {results[-1]['status']} in {results[-1]['seconds']} s", flush=True)
    env = next((r.get("data") for r in results if r["section"] == "env" and r.get("data")), {})
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cuda": has_cuda,
            "device": env.get("gpu", "none" if not has_cuda else "unknown"), "seconds": round(time.time() - t0, 1),
            "argv": sys.argv[1:] if argv is None else list(argv)}
    path = write_report(args.out, results, meta)
    print(f"[gpu_acceptance] report: {path}")
    bad = [r for r in results if r["status"] in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
