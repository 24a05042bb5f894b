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


def unencodable_shards(path, n=2):
    """A synthetic shard set whose every volume fails to encode (a modality no window exists for)."""
    import json

    from nvfm.loader import write_synthetic_shards
    shards = write_synthetic_shards(path, n=n, seed=0, shape=(8, 32, 32))
    man_path = os.path.join(shards, "manifest.json")
    with open(man_path) as f:
        man = json.load(f)
    for v in man["volumes"]:
        v["modality"] = "PET"
    with open(man_path, "w") as f:
        json.dump(man, f)
    return shards


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): its
    matmuls are tiny, so threading overhead dominates, and CI's 2 cores are shared."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
