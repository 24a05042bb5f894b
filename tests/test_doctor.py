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
