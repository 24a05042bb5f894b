import os

import pytest

os.environ.setdefault("NVFM_QUIET", "1")  # no backend table in test output, even with NVFM_VERBOSE=1 set
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_bench(name):
    """Import bench/NAME.py as a module (tests that exercise a bench script's functions)."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): its
    matmuls are tiny, so threading overhead dominates, and CI's 2 cores are shared."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
