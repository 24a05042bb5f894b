"""Benchmark the demo cohort generator: studies/s, CPU s/study and cohort size.

    python bench/bench_phantom.py --studies=40 --workers=2 [--resolution=demo] [--out=/tmp/nvfm_bench]

Prints wall time, studies/s, CPU seconds per study (all processes; the figure that matters
on a busy machine), MB per study, and the projection for the issue's target (200 studies
< 5 min on 2 cores, < 1 GB), next to the reference: the label-only planner on the same
studies (no anatomy, no rendering), measured in the same run.
"""
import os
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NVFM_QUIET", "1")

# config (nanoGPT style: module globals, overridable with --key=value)
studies = 40
workers = 2
resolution = "demo"
seed = 0
out = "/tmp/nvfm_bench_phantom"
keep = False
from nvfm.configurator import configure  # noqa: E402
configure(globals())

from nvfm import phantom as ph  # noqa: E402
from nvfm import phantom_anatomy as pa  # noqa: E402


def cpu_seconds():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def main():
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    pa.load_anatomy()
    t_anat = time.time() - t
    t = time.time()
    ph.plan_cohort(studies, seed, resolution)
    t_plan = time.time() - t
    c0, t0 = cpu_seconds(), time.time()
    recs = ph.generate_cohort(out, studies, seed, resolution, workers, progress=False)
    wall, cpu = time.time() - t0, cpu_seconds() - c0
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(out) for f in fs)
    n_series = sum(1 for r in recs for s in r["series"] if s["gt"])
    n_vox = sum(int(__import__("numpy").prod(s["shape"])) for r in recs for s in r["series"] if s["gt"])
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at the end")
    print(f"anatomy load (cached): {t_anat:.2f} s; label-only planning (reference): "
          f"{studies / t_plan:.0f} studies/s")
    print(f"generate {studies} studies ({resolution}, {workers} workers): {wall:.1f} s wall = "
          f"{studies / wall:.2f} studies/s; CPU {cpu / studies:.2f} s/study; {n_series} image series, "
          f"{n_vox / 1e6:.1f} M voxels ({n_vox / cpu / 1e6:.2f} M voxels per CPU-second)")
    print(f"size: {size / 1e6:.1f} MB = {size / studies / 1e6:.2f} MB/study")
    print(f"projection for 200 studies on 2 dedicated cores: {200 * cpu / studies / 2 / 60:.1f} min "
          f"(target < 5), {200 * size / studies / 1e9:.2f} GB (target < 1)")
    print(f"rendering is {(studies / t_plan) / (studies / wall):.0f}x slower than label-only planning")
    if not keep:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
