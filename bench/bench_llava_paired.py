"""Kept for tests/test_report_metrics.py: `python bench/bench_llava.py paired ...` is the command."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llava import paired, paired_bootstrap, per_study_rouge  # noqa: E402,F401

if __name__ == "__main__":
    paired(sys.argv[1:])
