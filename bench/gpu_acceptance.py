"""GPU acceptance run: everything about the CUDA kernels that needs a real GPU, in one command.

On a bare lent CUDA machine, from the repository root (CUDA torch already installed there):

    python3 -m pip install --no-build-isolation -e .   # or pass --build: NVFM_CUDA=1 NVFM_REQUIRE_EXT=1
    python3 bench/gpu_acceptance.py --out "$OUT"       # at most --budget_s (450 s) + a few seconds

Sections (each a subprocess with its own time limit; a failure or timeout is recorded and the
run goes on):
  build      (--build only) compile the extension with its CUDA kernels
  env        GPU name, torch/CUDA versions, which nvfm ops have CUDA kernels; fails, saying why,
             when nvfm._C did not load, has no CUDA part, or lacks a kernel of CUDA_KERNELS
  tests      every CUDA test: tests/test_{attention,patchify,gather,blocks}.py on the GPU, the
             kernels run with NVFM_CUDA_KERNELS=1 (our attention vs torch references included)
  tests_tc   tests/test_attention.py's CUDA tests with the tensor-core kernels (NVFM_ATTN_KERNEL=tc)
  learn      the Vol-JEPA positive control (tests/test_train_jepa.py) trained on the GPU: bf16
             autocast and the CUDA kernels must learn what the context predicts, as on the CPU
  train      bench/bench_train_jepa.py: ViT-B and ViT-L JEPA steps (tokens/s, MFU, peak memory) per
             attention impl (before the attention benchmarks: a required number, they are extras)
  attention  bench/bench_attention.py --gpu_only: TFLOP/s fwd and fwd+bwd of ours (FMA), torch
             varlen, padded SDPA and flex_attention on equal and realistic length mixes
  attention_tc  the same with ours = the tensor-core kernels (forward and backward)
  gather     bench/bench_gather.py: the gather kernel vs a device-to-device copy (bandwidth)
Writes gpu_acceptance.md and gpu_acceptance.json under --out, rewritten after every section
(a run killed from outside keeps what finished; the section it was in shows "interrupted").
What counts as failed: a non-zero exit, a timeout, env finding the extension not loaded or a
kernel of CUDA_KERNELS missing (it says why), and a pytest section with any skipped test (a
CUDA test that skips ran no kernel: "failed (N skipped)"). Time: each section gets at most its
own limit, and no more than leaves every later section a quarter of its limit, >= 30 s (a hung section
cannot starve the rest; the build, a prerequisite, is exempt), within --budget_s (default 450 s,
so the whole call fits 8 minutes). A timed-out section's whole process group is killed (nvcc,
compile workers) and its output up to then is kept (children run unbuffered, stderr merged).
Without CUDA every GPU section is recorded as skipped (that path, argument handling and the
report are tested in CI: tests/test_gpu_acceptance*.py). Record the report in BENCHMARKS.md, and add the ops that passed
to nvfm.ops.CUDA_VERIFIED.
"""
import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("build", "env", "tests", "tests_tc", "learn", "train", "attention", "attention_tc", "gather")
CUDA_TESTS = ["tests/test_attention.py", "tests/test_patchify.py", "tests/test_gather.py", "tests/test_blocks.py"]
LEARN_TEST = "tests/test_train_jepa.py::test_the_tiny_recipe_learns_what_the_context_predicts"
# every op with a CUDA kernel (TORCH_LIBRARY_IMPL(nvfm, CUDA, ...) in csrc/) -> the file of CUDA_TESTS
# whose `-k cuda` tests compare it with its PyTorch reference; env fails when one is missing
CUDA_KERNELS = {"patchify": "tests/test_patchify.py", "unpatchify": "tests/test_patchify.py",
                "varlen_attn_fwd": "tests/test_attention.py", "varlen_attn_bwd": "tests/test_attention.py",
                "gather_tokens": "tests/test_gather.py", "block_masks": "tests/test_blocks.py"}
RESERVE = 0.25  # share of each later section's own limit that an earlier section may not use
FLOOR_S = 30.0  # ... but a section is never cut below this (or its own limit) while that much is left
ENV_PROBE = r"""
import json, sys, torch
from nvfm import ops
d = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0),
     "capability": list(torch.cuda.get_device_capability(0)), "extension": ops.extension_loaded(),
     "cuda_compiled": ops.cuda_compiled(),
     "cuda_kernels": [n for n in ops.OPS if ops.has_kernel(n, "cuda")]}
print(json.dumps(d), flush=True)
if not ops.extension_loaded():
    sys.exit(f"FAIL: {ops._problem() or 'nvfm._C not loaded'}")
if not ops.cuda_compiled():
    sys.exit("FAIL: nvfm._C was built without its CUDA kernels (NVFM_CUDA=1 pip install --no-build-isolation -e ., "
             "or gpu_acceptance.py --build)")
missing = [n for n in sys.argv[1:] if not ops.has_kernel(n, "cuda")]
if missing:
    sys.exit(f"FAIL: nvfm._C has no CUDA kernel for {', '.join(missing)} (stale build?)")
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_acceptance"),
                    help="report directory (default $OUT)")
    ap.add_argument("--only", default="", help="comma-separated sections to run (default: all but build)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip")
    ap.add_argument("--build", action="store_true", help="run the build section first")
    ap.add_argument("--budget_s", type=float, default=450.0, help="wall-clock budget of the whole run (s)")
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
        ("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
         {"NVFM_CUDA": "1", "NVFM_REQUIRE_EXT": "1", "MAX_JOBS": str(os.cpu_count() or 4)}, 300),
        ("env", [py, "-c", ENV_PROBE, *CUDA_KERNELS], {}, 60),
        ("tests", [py, "-m", "pytest", "-q", "-rs", "-k", "cuda", *CUDA_TESTS], {"NVFM_CUDA_KERNELS": "1"}, 240),
        ("tests_tc", [py, "-m", "pytest", "-q", "-rs", "-k", "cuda", "tests/test_attention.py"],
         {"NVFM_CUDA_KERNELS": "1", "NVFM_ATTN_KERNEL": "tc"}, 120),
        ("learn", [py, "-m", "pytest", "-q", "-rs", LEARN_TEST], {"NVFM_CUDA_KERNELS": "1"}, 150),
        ("train", [py, "bench/bench_train_jepa.py", "--size=vitb,vitl", f"--batch={'16' if q else '32'}",
                   "--attn=ours,torch_varlen,sdpa", f"--steps={5 if q else 20}", "--device=cuda", "--mask_paths=ops"],
         {}, 240),
        ("attention", [py, "bench/bench_attention.py", "--gpu_only=True", f"--gpu_repeats={3 if q else 10}"], {}, 150),
        ("attention_tc", [py, "bench/bench_attention.py", "--gpu_only=True", f"--gpu_repeats={3 if q else 10}"],
         {"NVFM_ATTN_KERNEL": "tc"}, 150),
        ("gather", [py, "bench/bench_gather.py", f"--repeats={2 if q else 5}"], {}, 90),
    ]
    return [s for s in steps if s[0] in args.sections]


def _kill_group(proc):
    """SIGKILL the section's whole process group (pip's nvcc jobs, torch.compile workers), not
    only its first process: a survivor would hold the GPU or the CPUs during the next sections."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass


def _decode(b):
    return (b or b"").decode(errors="replace") if isinstance(b, bytes) else (b or "")


def pytest_skips(out):
    """Number of skipped tests on pytest's summary line ("3 passed, 2 skipped in 4.1s"), 0 if none."""
    for line in reversed(out.splitlines()):
        if re.search(r"\b\d+ (passed|failed|skipped|errors?|deselected)\b.* in [\d.]+s", line):
            m = re.search(r"\b(\d+) skipped\b", line)
            return int(m.group(1)) if m else 0
    return 0


def run_section(name, cmd, env_add, limit_s):
    """Run one section in its own process group with a time limit; its result record.

    stdout and stderr are merged (their order kept) and the child runs unbuffered, so a
    section killed at its limit still shows what it printed up to then. A pytest section with
    skipped tests is failed: on the GPU every selected CUDA test must run its kernel."""
    env = dict(os.environ, NVFM_QUIET="1", PYTHONUNBUFFERED="1", **env_add)
    t0 = time.time()
    r = not_run(name, cmd, "failed")
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except OSError as e:
        r.update(output=f"could not start: {type(e).__name__}: {e}", seconds=round(time.time() - t0, 1))
        return r
    try:
        try:
            out, _ = proc.communicate(timeout=limit_s)
            rc, status = proc.returncode, ("passed" if proc.returncode == 0 else "failed")
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "timeout"
            try:
                out, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired as e:  # a process that left the group holds the pipe
                out = e.output
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): leave no orphan behind
        _kill_group(proc)
        raise
    out = _decode(out)
    if status == "passed" and cmd[1:3] == ["-m", "pytest"] and pytest_skips(out):
        status = f"failed ({pytest_skips(out)} skipped)"
    r.update(status=status, rc=rc, seconds=round(time.time() - t0, 1), output=out[-20000:])
    if name == "env":
        line = next((x for x in out.splitlines() if x.startswith("{")), "")
        try:
            r["data"] = json.loads(line)
        except ValueError:
            pass
    return r


def not_run(name, cmd, status, output=""):
    """The record of a section that ran no command to its end (skipped, interrupted, not started)."""
    return {"section": name, "status": status, "rc": None, "seconds": 0.0, "command": " ".join(cmd), "output": output}


def failed(r):
    return r["status"].startswith(("failed", "timeout", "interrupted"))


def section_limit(name, limit, left, later_limits):
    """Seconds section `name` may run: at most its own limit and what is left, and no more than
    leaves each later section RESERVE of its own limit (at least FLOOR_S, at most its limit),
    so a hung section cannot starve the rest (the build is exempt: without it nothing later
    means anything). Never under FLOOR_S while that much is left: a section cut shorter
    measures nothing."""
    if name == "build" or not later_limits:
        return min(limit, left)
    reserve = sum(max(RESERVE * x, min(FLOOR_S, x)) for x in later_limits)
    return min(limit, left, max(left - reserve, FLOOR_S))


def write_report(out_dir, results, meta):
    """gpu_acceptance.json (everything) and gpu_acceptance.md (summary + output tails), each
    written to a temporary file and renamed, so a run killed mid-write keeps the previous one."""
    os.makedirs(out_dir, exist_ok=True)

    def put(fname, text):
        tmp = os.path.join(out_dir, fname + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, fname))
    put("gpu_acceptance.json", json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["# GPU acceptance run", "", f"- date: {meta['date']}", f"- host: {meta['host']}",
             f"- device: {meta.get('device', 'unknown')}", f"- total: {meta['seconds']} s", "",
             "| section | status | seconds |", "|---|---|---|"]
    if not meta.get("finished", True):
        lines[6:6] = ["- **incomplete**: the run was stopped before its end (this report is its last state)", ""]
    lines += [f"| {r['section']} | {r['status']} | {r['seconds']} |" for r in results]
    for r in results:
        lines += ["", f"## {r['section']}: {r['status']}", "", f"`{r['command']}`", "", "```",
                  r["output"][-6000:].rstrip(), "```"]
    put("gpu_acceptance.md", "\n".join(lines) + "\n")
    return os.path.join(out_dir, "gpu_acceptance.md")


def cuda_available():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds run_section (kills the section's group), keeps the report


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    has_cuda = cuda_available()
    if not has_cuda:
        print("[gpu_acceptance] no CUDA device visible to torch (torch.cuda.is_available() is False): "
              "every GPU section is skipped", flush=True)
    steps = plan(args)
    results = []
    argv_rec = sys.argv[1:] if argv is None else list(argv)

    def meta(finished):
        env = next((r.get("data") for r in results if r["section"] == "env" and r.get("data")), {})
        return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cuda": has_cuda,
                "device": env.get("gpu", "none" if not has_cuda else "unknown"),
                "seconds": round(time.time() - t0, 1), "finished": finished, "argv": argv_rec}

    def record(i, finished=False):
        """The report as it stands: sections done, section i interrupted, the rest not reached."""
        rest = [not_run(n, c, "interrupted" if j == i else "not reached") for j, (n, c, _, _) in enumerate(steps)
                if j >= i]
        return write_report(args.out, results + rest, meta(finished))

    old = signal.signal(signal.SIGTERM, _sigterm) if argv is None else None
    try:
        for i, (name, cmd, env_add, limit) in enumerate(steps):
            record(i)
            left = args.budget_s - (time.time() - t0)
            lim = section_limit(name, limit, left, [s[3] for s in steps[i + 1:]])
            if name != "build" and not has_cuda:
                results.append(not_run(name, cmd, "skipped (no CUDA device)"))
                continue
            if lim < 10:
                results.append(not_run(name, cmd, "skipped (budget spent)"))
                continue
            print(f"[gpu_acceptance] {name} (limit {lim:.0f} s)", flush=True)
            try:
                results.append(run_section(name, cmd, env_add, lim))
            except Exception:  # noqa: BLE001  (a bug here must not lose the other sections)
                results.append(not_run(name, cmd, "failed", traceback.format_exc()))
            print(f"[gpu_acceptance] {name}: {results[-1]['status']} in {results[-1]['seconds']} s", flush=True)
        path = write_report(args.out, results, meta(True))
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
    print(f"[gpu_acceptance] report: {path}")
    bad = [r for r in results if failed(r)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
