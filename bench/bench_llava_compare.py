"""Kept for demo.sh and tests/test_report_metrics.py: `python bench/bench_llava.py compare ...` is the command."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_llava import compare, lookup_reports, lookup_row, rows  # noqa: E402,F401

if __name__ == "__main__":
    compare(sys.argv[1:])
