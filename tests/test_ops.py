"""Loading the compiled extension, and the fallback when it is missing."""
import os
import subprocess
import sys


def test_import_without_extension_falls_back(tmp_path):
    code = ("import warnings, torch\nwarnings.simplefilter('error')\n"
            "import nvfm.tokenize as T\n"
            "v=torch.ones(4,16,16,dtype=torch.uint8)\n"
            "print(T.patchify([v],[v],0.5)[0].shape, T.ops.backend('patchify','cpu'))\n")
    env = dict(os.environ, NVFM_OPS="reference", NVFM_QUIET="0", NVFM_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 1024]) reference" in out.stdout
    assert out.stderr.count("operator backends") == 1  # NVFM_VERBOSE=1: the backend table, printed once
    assert "patchify" in out.stderr and "reference" in out.stderr


def test_missing_extension_warns_and_uses_reference():
    code = ("import sys, warnings\nsys.modules['nvfm._C'] = None  # simulate a missing build\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import nvfm.tokenize as T\n"
            "print(any('not available' in str(x.message) for x in w), T.ops.backend('patchify', 'cpu'))\n")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NVFM_QUIET="1"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True reference"


def _run(code, **env_add):
    env = {k: v for k, v in os.environ.items() if k not in ("NVFM_QUIET", "NVFM_VERBOSE", "NVFM_OPS")}
    return subprocess.run([sys.executable, "-c", code], env=dict(env, **env_add), capture_output=True, text=True,
                          timeout=120)


def test_import_is_quiet_by_default():
    out = _run("import nvfm")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    from nvfm import ops
    if ops.extension_loaded() and ops._problem() is None:
        assert out.stderr == ""  # a working build says nothing on import
    assert "operator backends" not in out.stderr


def test_verbose_prints_the_table_and_quiet_still_wins():
    out = _run("import nvfm", NVFM_VERBOSE="1")
    assert out.returncode == 0 and "operator backends" in out.stderr and "patchify" in out.stderr
    out = _run("import nvfm", NVFM_VERBOSE="1", NVFM_QUIET="1")  # NVFM_QUIET is still accepted
    assert out.returncode == 0 and "operator backends" not in out.stderr


def test_python_m_nvfm_ops_prints_the_table():
    env = {k: v for k, v in os.environ.items() if k not in ("NVFM_QUIET", "NVFM_VERBOSE")}
    out = subprocess.run([sys.executable, "-m", "nvfm.ops"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("operator backends") == 1
    from nvfm import ops
    assert all(name in out.stdout for name in ops.OPS)
    assert "found in sys.modules" not in out.stderr  # runpy's notice is not shown to the user


def test_missing_extension_warns_in_one_line():
    out = _run("import sys\nsys.modules['nvfm._C'] = None\nimport nvfm")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and "nvfm._C not available" in lines[0] and "pip install" in lines[0], out.stderr


def test_stale_extension_is_named(monkeypatch):
    from nvfm import ops
    if not ops.extension_loaded():
        import pytest
        pytest.skip("extension not built")
    assert ops._problem() is None
    monkeypatch.setattr(ops, "OPS", ops.OPS + ("no_such_op",))
    problem = ops._problem()
    assert "stale" in problem and "no_such_op" in problem and "\n" not in problem
