"""bench/gpu_acceptance.py without a GPU: argument handling, the section plan, the no-CUDA path
and the report it writes (the GPU sections themselves run on a lent GPU)."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("gpu_acceptance", os.path.join(ROOT, "bench", "gpu_acceptance.py"))
GA = importlib.util.module_from_spec(spec)
spec.loader.exec_module(GA)


def test_arguments_and_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    a = GA.parse_args([])
    assert a.out == str(tmp_path) and a.sections == [s for s in GA.SECTIONS if s != "build"]
    assert [s[0] for s in GA.plan(GA.parse_args(["--build"]))] == list(GA.SECTIONS)
    a = GA.parse_args(["--only=tests,attention", "--skip=attention", "--quick"])
    assert a.sections == ["tests"]
    (name, cmd, env, limit), = GA.plan(a)
    assert env["NVFM_CUDA_KERNELS"] == "1" and "-k" in cmd and limit > 0
    assert all(os.path.exists(os.path.join(ROOT, f)) for f in GA.CUDA_TESTS)
    path, name = GA.LEARN_TEST.split("::")
    assert f"def {name}(" in open(os.path.join(ROOT, path)).read()
    for _, cmd, _, _ in GA.plan(GA.parse_args([])):
        scripts = [c for c in cmd if c.startswith("bench/")]
        assert all(os.path.exists(os.path.join(ROOT, s)) for s in scripts)
    with pytest.raises(SystemExit):
        GA.parse_args(["--only=warp"])


def test_without_cuda_every_gpu_section_is_skipped_and_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(GA, "cuda_available", lambda: False)
    assert GA.main(["--out", str(tmp_path)]) == 0
    rep = json.load(open(tmp_path / "gpu_acceptance.json"))
    assert [r["section"] for r in rep["results"]] == [s for s in GA.SECTIONS if s != "build"]
    assert all(r["status"].startswith("skipped") for r in rep["results"]) and rep["meta"]["cuda"] is False
    md = open(tmp_path / "gpu_acceptance.md").read()
    assert "| tests | skipped (no CUDA device) |" in md


def test_section_runner_records_failure_and_timeout(tmp_path):
    import sys
    ok = GA.run_section("env", [sys.executable, "-c", "print('{\"gpu\": \"X\"}')"], {}, 30)
    assert ok["status"] == "passed" and ok["data"] == {"gpu": "X"}
    bad = GA.run_section("tests", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], {}, 30)
    assert bad["status"] == "failed" and bad["rc"] == 3 and "boom" in bad["output"]
    slow = GA.run_section("train", [sys.executable, "-c", "import time; time.sleep(5)"], {}, 0.5)
    assert slow["status"] == "timeout"
    path = GA.write_report(str(tmp_path), [ok, bad, slow], {"date": "d", "host": "h", "seconds": 1.0})
    md = open(path).read()
    assert "| tests | failed |" in md and "| train | timeout |" in md and "boom" in md
