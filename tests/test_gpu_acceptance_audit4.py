"""Audit of bench/gpu_acceptance.py and the bench scripts it runs, on the CPU: a section whose
CUDA tests all skip, an env probe that finds no CUDA kernels, output lost at a timeout, processes
left running after one, a report written only at the end, one hung section starving the rest, a
failed measurement reported as a pass."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_acceptance_a4", os.path.join(ROOT, "bench", "gpu_acceptance.py"))
GA = importlib.util.module_from_spec(spec)
spec.loader.exec_module(GA)
PY = sys.executable


def test_pytest_section_whose_tests_skip_is_failed(tmp_path):
    """On the GPU a CUDA test that skips (kernels not compiled) ran nothing: pytest exits 0, the
    section must still fail. A hand-written file: 1 test passes, 2 skip."""
    f = tmp_path / "test_fake_cuda.py"
    f.write_text("import pytest\n\ndef test_a_cuda():\n    pass\n\n"
                 "@pytest.mark.parametrize('i', [0, 1])\ndef test_b_cuda(i):\n    pytest.skip('no CUDA kernel')\n")
    r = GA.run_section("tests", [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(f)], {}, 120)
    assert r["rc"] == 0 and "1 passed, 2 skipped" in r["output"]
    assert r["status"] == "failed (2 skipped)" and GA.failed(r)
    ok = GA.run_section("tests", [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{f}::test_a_cuda"], {}, 120)
    assert ok["status"] == "passed"


@pytest.mark.parametrize("line,n", [("31 skipped, 105 deselected in 2.56s", 31), ("3 passed in 0.1s", 0),
                                    ("===== 2 failed, 1 passed, 4 skipped in 10.02s =====", 4)])
def test_skip_count_of_pytest_summary(line, n):
    assert GA.pytest_skips("SKIPPED [3] tests/x.py:5: reason\n" + line + "\n") == n


def test_env_probe_fails_when_the_extension_has_no_cuda_kernels():
    """This CPU machine's nvfm._C has no CUDA part (or did not load): the probe, with the GPU
    queries faked, must exit non-zero and say why, and its JSON still lands in data."""
    import torch
    from nvfm import ops
    assert not ops.cuda_compiled() and not any(ops.has_kernel(n, "cuda") for n in GA.CUDA_KERNELS)
    fake = ("import torch\ntorch.cuda.get_device_name = lambda i=0: 'Fake GPU'\n"
            "torch.cuda.get_device_capability = lambda i=0: (9, 0)\n")
    cmd = [PY, "-c", fake + GA.ENV_PROBE, *GA.CUDA_KERNELS]
    r = GA.run_section("env", cmd, {"PYTHONPATH": ROOT}, 120)
    assert r["status"] == "failed" and r["rc"] == 1, r["output"]
    assert "FAIL: " in r["output"] and r["data"]["gpu"] == "Fake GPU" and r["data"]["cuda_kernels"] == []
    assert torch.__version__ == r["data"]["torch"]


def test_cuda_kernels_list_is_every_cuda_registration_in_csrc():
    """CUDA_KERNELS (what env requires) against the sources: every op registered in a
    TORCH_LIBRARY_IMPL(nvfm, CUDA, m) block, and each maps to a file the tests section runs."""
    import re
    found = set()
    for name in os.listdir(os.path.join(ROOT, "csrc")):
        if name.endswith(".cpp"):
            src = open(os.path.join(ROOT, "csrc", name)).read()
            for block in re.findall(r"TORCH_LIBRARY_IMPL\(nvfm,\s*CUDA,\s*m\)\s*\{(.*?)\n?\}", src, re.S):
                found |= set(re.findall(r'm\.impl\("(\w+)"', block))
    assert found == set(GA.CUDA_KERNELS)
    assert set(GA.CUDA_KERNELS.values()) <= set(GA.CUDA_TESTS)


def test_timeout_keeps_what_the_section_printed(monkeypatch):
    """A child writing to a pipe is block-buffered: killed at its limit, everything it printed was
    lost (and its stderr was dropped). Both streams must be kept."""
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    code = "import sys, time; print('step 1 done'); print('warn', file=sys.stderr); time.sleep(60)"
    t = time.time()
    r = GA.run_section("train", [PY, "-c", code], {}, 2)
    assert r["status"] == "timeout" and time.time() - t < 30
    assert "step 1 done" in r["output"] and "warn" in r["output"]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "\nState:\tZ" not in open(f"/proc/{pid}/status").read()
    except OSError:
        return False


def test_timeout_kills_the_sections_children(tmp_path):
    """pip's nvcc jobs or torch.compile workers outlived the killed section and kept the CPUs/GPU."""
    pidfile = tmp_path / "pid"
    code = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
            f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    r = GA.run_section("build", [PY, "-c", code], {}, 2)
    assert r["status"] == "timeout"
    pid = int(pidfile.read_text())
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    alive = _alive(pid)
    if alive:
        os.kill(pid, 9)
    assert not alive


class FakeTime:
    """time.time() advanced by the fake sections; strftime as usual."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    def strftime(self, fmt):
        return time.strftime(fmt)


def test_report_is_on_disk_after_each_section_and_marks_an_interruption(tmp_path, monkeypatch):
    """Results were written only at the end: a run killed in section 3 lost sections 1-2."""
    monkeypatch.setattr(GA, "cuda_available", lambda: True)
    seen = []

    def fake(name, cmd, env, limit):
        if len(seen) == 2:
            rep = json.load(open(tmp_path / "gpu_acceptance.json"))
            seen.append([(r["section"], r["status"]) for r in rep["results"]])
            raise KeyboardInterrupt  # the outer timeout's kill
        seen.append(name)
        return {"section": name, "status": "passed", "rc": 0, "seconds": 1.0, "command": "c", "output": "ok"}
    monkeypatch.setattr(GA, "run_section", fake)
    with pytest.raises(KeyboardInterrupt):
        GA.main(["--out", str(tmp_path), "--only=env,tests,learn,train"])
    assert seen[2] == [("env", "passed"), ("tests", "passed"), ("learn", "interrupted"), ("train", "not reached")]
    rep = json.load(open(tmp_path / "gpu_acceptance.json"))
    assert rep["meta"]["finished"] is False and rep["results"][1]["status"] == "passed"
    assert "incomplete" in open(tmp_path / "gpu_acceptance.md").read()


def test_a_section_that_raises_is_failed_and_the_rest_still_run(tmp_path, monkeypatch):
    monkeypatch.setattr(GA, "cuda_available", lambda: True)

    def fake(name, cmd, env, limit):
        if name == "tests":
            raise OSError("disk full")
        return {"section": name, "status": "passed", "rc": 0, "seconds": 1.0, "command": "c", "output": ""}
    monkeypatch.setattr(GA, "run_section", fake)
    assert GA.main(["--out", str(tmp_path), "--only=env,tests,train"]) == 1
    rep = json.load(open(tmp_path / "gpu_acceptance.json"))
    assert [(r["section"], r["status"]) for r in rep["results"]] == [("env", "passed"), ("tests", "failed"),
                                                                      ("train", "passed")]
    assert "disk full" in rep["results"][1]["output"] and rep["meta"]["finished"] is True


def fake_sections(monkeypatch, spend, status):
    """A CUDA machine on a fake clock whose sections each take spend(limit) seconds and end with `status`;
    -> {section: the limit it was given}, filled as main() runs them."""
    clock, limits = FakeTime(), {}
    monkeypatch.setattr(GA, "time", clock)
    monkeypatch.setattr(GA, "cuda_available", lambda: True)

    def section(name, cmd, env, limit):
        limits[name] = limit
        clock.now += spend(limit)
        return {"section": name, "status": status, "rc": 0 if status == "passed" else None,
                "seconds": spend(limit), "command": "c", "output": ""}
    monkeypatch.setattr(GA, "run_section", section)
    return limits


def test_hung_sections_cannot_starve_the_later_ones_and_the_run_fits_8_minutes(tmp_path, monkeypatch):
    """Every section hangs until its limit. Before: env 60 + tests 240 + tests_tc 120 + learn 120
    spent the 540 s default budget (over the 8-minute call) and every later section (the
    training speed and memory included) was skipped. Now each runs >= 30 s and the total fits."""
    limits = fake_sections(monkeypatch, lambda limit: limit, "timeout")
    assert GA.main(["--out", str(tmp_path)]) == 1
    assert set(limits) == set(GA.SECTIONS) - {"build"}
    assert all(v >= 30 for v in limits.values()), limits
    assert sum(limits.values()) <= 480 - 20, limits  # 8 minutes, less python start and the report
    assert limits["env"] == 60  # nothing hung yet: its own limit


def test_sections_that_finish_early_pass_their_time_on(tmp_path, monkeypatch):
    """Hand-worked: budget 450, every section done in 5 s: each gets its own limit, except
    tests: 450 - 5 (env) - reserves of the later ones (a quarter of their limits, at least 30 s:
    tests_tc 30, learn 37.5, train 60, attention 37.5, attention_tc 37.5, gather 30) = 212.5 < 240."""
    limits = fake_sections(monkeypatch, lambda limit: 5, "passed")
    assert GA.main(["--out", str(tmp_path)]) == 0
    want = {s[0]: s[3] for s in GA.plan(GA.parse_args([]))}
    want["tests"] = 212.5
    assert limits == pytest.approx(want)


def test_train_bench_exits_nonzero_when_a_requested_attention_fails():
    """bench_train_jepa.py printed "unavailable" for an attention impl that raised (a CUDA error
    in our kernel, out of memory) and exited 0: the train section read as passed. torch_varlen on
    the CPU raises the same way."""
    env = dict(os.environ, OMP_NUM_THREADS="1", NVFM_QUIET="1")
    p = subprocess.run([PY, "bench/bench_train_jepa.py", "--size=tiny", "--batch=2", "--steps=1",
                        "--attn=torch_varlen,sdpa", "--mask_paths=ops", "--device=cpu"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "attn torch_varlen: FAILED" in p.stdout and "attn sdpa" in p.stdout  # the others still measured


def test_attention_bench_gpu_only_without_a_gpu_is_not_a_pass():
    p = subprocess.run([PY, "bench/bench_attention.py", "--gpu_only=True"], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1", NVFM_QUIET="1"), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "nothing measured" in p.stderr


def test_attention_bench_counts_ours_missing_or_failing(monkeypatch):
    """The GPU part printed "ours failed" (or left ours out when the kernel was not built) and
    exited 0. measure() on CPU tensors: the other impls may fail, ours may not."""
    import torch
    monkeypatch.setattr(sys, "argv", ["bench_attention.py"])
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        s = importlib.util.spec_from_file_location("bench_attention_a4", os.path.join(ROOT, "bench",
                                                                                       "bench_attention.py"))
        BA = importlib.util.module_from_spec(s)
        s.loader.exec_module(BA)
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    q = k = v = torch.randn(8, 1, 4)

    def ok(q, k, v):
        return q * 1.0

    def boom(q, k, v):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    res, bad = BA.measure("p", {"ours": ok, "flex": boom}, q, k, v, 1e6, 1, "cpu")
    assert bad == [] and set(res) == {"ours"}
    res, bad = BA.measure("p", {"ours": boom, "sdpa": ok}, q, k, v, 1e6, 1, "cpu")
    assert bad == ["p: ours RuntimeError"] and set(res) == {"sdpa"}
    res, bad = BA.measure("p", {"sdpa": ok}, q, k, v, 1e6, 1, "cpu")
    assert bad == ["p: ours unavailable"]


def test_train_section_measures_every_vit_size_it_names():
    """The brief: step speed and memory for the ViT configs (ViT-B and ViT-L), each a model size
    bench_train_jepa.py accepts."""
    from nvfm.model import SIZES
    (_, cmd, _, _), = GA.plan(GA.parse_args(["--only=train"]))
    sizes = next(c for c in cmd if c.startswith("--size=")).split("=")[1].split(",")
    assert sizes == ["vitb", "vitl"] and all(s in SIZES for s in sizes)
