"""`python -m nvfm.doctor`: the first-run check prints its lines and exits 0."""
import importlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPICS = ("nvfm", "python", "torch", "gpu", "extension", "packages present", "packages missing",
          "mricron-data", "dcm2niix", "wordnet")


def _doctor(pre=""):
    """Run the doctor in a fresh interpreter; `pre` runs first (e.g. hides a package)."""
    code = pre + "import runpy\nrunpy.run_module('nvfm.doctor', run_name='__main__')\n"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("NVFM_VERBOSE", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    return lines, r


def test_doctor_module_runs_and_reports_every_topic():
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "nvfm.doctor"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert set(TOPICS) <= set(lines), r.stdout
    assert len(r.stdout.splitlines()) <= 12  # a few lines
    assert lines["python"].startswith(sys.version.split()[0])
    import torch
    assert lines["torch"].startswith(torch.__version__)
    assert lines["gpu"].split()[0] == str(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    from nvfm import ops
    assert lines["extension"].startswith("built" if ops.extension_loaded() else "not built"), lines["extension"]


def test_doctor_present_packages_are_importable():
    from nvfm import doctor
    lines, _ = _doctor()
    import_name = {dist: mod for mod, dist, _ in doctor.OPTIONAL}
    present = [p.split()[0] for p in lines["packages present"].split(", ") if p != "none"]
    for dist in present:
        importlib.import_module(import_name[dist])  # reported present -> importable here too
    missing = lines["packages missing"]
    for mod, dist, _ in doctor.OPTIONAL:
        assert (dist in present) != (missing.startswith(dist + " ") or f"; {dist} (" in missing), dist


def test_doctor_reports_a_hidden_package_missing_and_a_missing_extension():
    pre = "import sys\nsys.modules['sacrebleu'] = None\nsys.modules['nvfm._C'] = None\n"
    lines, r = _doctor(pre)
    assert "sacrebleu (report metrics: BLEU)" in lines["packages missing"]
    assert "sacrebleu" not in lines["packages present"]
    assert lines["extension"].startswith("not built"), lines["extension"]
    assert "nvfm._C" in lines["extension"]


def test_doctor_reports_missing_debian_data(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", NVFM_MRICRON_DIR=str(tmp_path),
               NVFM_WORDNET_DIR=str(tmp_path), PATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "nvfm.doctor"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.splitlines())
    assert lines["mricron-data"].startswith("missing") and "mricron-data" in lines["mricron-data"]
    assert lines["dcm2niix"].startswith("not on PATH")
    assert lines["wordnet"].startswith(("missing", "not checked"))


def test_newer_sources_lists_exactly_the_sources_changed_after_the_build(tmp_path):
    from nvfm import doctor
    (tmp_path / "csrc").mkdir()
    built = tmp_path / "_C.so"
    built.write_text("")
    os.utime(built, (1000, 1000))
    for name, t in (("a.cpp", 999), ("b.cu", 1001), ("c.h", 2000), ("README.md", 3000), ("d.cpp", 1000)):
        (tmp_path / "csrc" / name).write_text("")
        os.utime(tmp_path / "csrc" / name, (t, t))
    assert doctor.newer_sources(str(built), root=str(tmp_path)) == ["csrc/b.cu", "csrc/c.h"]
    assert doctor.newer_sources(str(built), root=str(tmp_path / "no_checkout")) == []


def test_doctor_says_stale_when_a_source_changed_after_the_build(tmp_path, monkeypatch):
    """An edited (or pulled) kernel source that was not rebuilt: the doctor said 'built' and nothing more."""
    from nvfm import doctor, ops
    if not ops.extension_loaded():
        import pytest
        pytest.skip("the extension is not built here")
    (tmp_path / "csrc").mkdir()
    src = tmp_path / "csrc" / "attention.cpp"
    src.write_text("")
    later = os.path.getmtime(ops._C.__file__) + 10
    os.utime(src, (later, later))
    real = doctor.newer_sources
    monkeypatch.setattr(doctor, "newer_sources", lambda built: real(built, root=str(tmp_path)))
    line = doctor.extension_line()
    assert line.startswith("extension: built") and "stale: csrc/attention.cpp changed after the build" in line, line


def test_doctor_does_not_claim_cuda_kernels_that_auto_does_not_run(monkeypatch):
    """CUDA kernels compiled but not verified on a GPU: impl='auto' runs the reference (ops.auto_backend);
    the doctor said 'cuda kernels for 10/10 ops' as if they were in use."""
    from nvfm import doctor, ops
    if not ops.extension_loaded():
        import pytest
        pytest.skip("the extension is not built here")
    monkeypatch.delenv("NVFM_CUDA_KERNELS", raising=False)
    monkeypatch.setattr(ops, "cuda_compiled", lambda: True)
    monkeypatch.setattr(ops, "_HAS_KERNEL", {**ops._HAS_KERNEL, **{(n, "cuda"): True for n in ops.OPS}})
    on_reference = sum(ops.auto_backend(n, "cuda") == "reference" for n in ops.OPS)
    line = doctor.extension_line()
    assert f"cuda kernels for {len(ops.OPS)}/{len(ops.OPS)} ops" in line
    assert f"{on_reference} not yet verified on a GPU so impl='auto' runs their PyTorch reference" in line, line
    monkeypatch.setenv("NVFM_CUDA_KERNELS", "1")
    assert "not yet verified" not in doctor.extension_line()


def test_doctor_says_why_a_cuda_torch_sees_no_gpu(monkeypatch):
    import torch
    from nvfm import doctor
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    lines = doctor.torch_lines()
    assert lines[0].endswith("(built for CUDA 12.4)")
    assert lines[1] == "gpu: 0 (torch built for CUDA 12.4 sees none: no NVIDIA driver or device, " \
                       "or CUDA_VISIBLE_DEVICES='' hides them)", lines
