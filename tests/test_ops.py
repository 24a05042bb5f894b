"""Loading the compiled extension, and the fallback when it is missing."""
import os
import subprocess
import sys


def test_import_without_extension_falls_back(tmp_path):
    code = ("import warnings, torch\nwarnings.simplefilter('error')\n"
            "import nvfm.tokenize as T\n"
            "v=torch.ones(4,16,16,dtype=torch.uint8)\n"
            "print(T.patchify([v],[v],0.5)[0].shape, T.ops.backend('patchify','cpu'))\n")
    env = dict(os.environ, NVFM_OPS="reference", NVFM_QUIET="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 1024]) reference" in out.stdout
    assert "patchify" in out.stderr and "reference" in out.stderr  # the backend table is printed once


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
