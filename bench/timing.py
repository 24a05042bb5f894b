"""Shared timing helper of the bench/ scripts (run them as `python bench/<name>.py`)."""
import time

import torch


def timeit(fn, repeats, device="cpu"):
    """Mean seconds per call of fn() over `repeats` calls, after one warm-up call;
    synchronizes CUDA around the timed region so GPU work is counted."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats
