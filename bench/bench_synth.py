"""Benchmark the synthetic data generator: time and peak memory for 20 small scans.

Two measurements:

1. in this process, one scan after the other (``synthesize_scan`` + writing the .mhd): the
   median / max seconds per scan, then (second, traced pass) the median / max peak memory per
   scan (:mod:`tracemalloc`, which numpy reports its arrays to), plus the process's peak RSS;
2. ``generate_dataset`` end to end (tables, records, worker processes) for the same 20 scans:
   wall-clock seconds.

Usage::

    python bench/bench_synth.py [--scans 20] [--size small] [--workers 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lungct.io import write_scan
from lungct.synth import generate_dataset, synthesize_scan


def bench_in_process(n: int, size: str, seed: int, tmp: Path) -> dict:
    """Per-scan time, then per-scan traced peak memory, one scan after the other.

    Two passes because tracing every allocation slows the tree growth (many small arrays) by
    a factor of several: the times come from the untraced pass.
    """
    synthesize_scan(seed + 1000, 0, size)  # warm-up: imports, shape library, caches
    seconds, cpu = [], []
    for i in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        case = synthesize_scan(seed, i, size)
        write_scan(case.scan, tmp / f"{case.seriesuid}.mhd")
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # robust to other jobs sharing the cores
        del case
    peaks = []
    for i in range(n):
        tracemalloc.start()
        case = synthesize_scan(seed, i, size)
        write_scan(case.scan, tmp / f"{case.seriesuid}.mhd")
        peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
        del case
    return {
        "scans": n,
        "median_s_per_scan": round(statistics.median(seconds), 3),
        "max_s_per_scan": round(max(seconds), 3),
        "median_cpu_s_per_scan": round(statistics.median(cpu), 3),
        "total_s": round(sum(seconds), 2),
        "median_peak_traced_mib": round(statistics.median(peaks), 1),
        "max_peak_traced_mib": round(max(peaks), 1),
        # ru_maxrss is in KiB on Linux.
        "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def bench_dataset(n: int, size: str, seed: int, workers: int, tmp: Path) -> dict:
    """``generate_dataset`` wall time (worker start-up, writing, tables included)."""
    t0 = time.perf_counter()
    summary = generate_dataset(tmp / "ds", n, seed, size=size, progress=False, workers=workers)
    wall = time.perf_counter() - t0
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest child
    return {
        "workers": workers,
        "wall_s": round(wall, 2),
        "s_per_scan": round(wall / n, 3),
        "largest_worker_peak_rss_mib": round(children, 1),
        "candidates": summary["n_candidates"],
        "annotations": summary["n_annotations"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print them as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scans", type=int, default=20)
    p.add_argument("--size", choices=("small", "full"), default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_synth_") as tmp:
        tmp = Path(tmp)
        result = {
            "in_process": bench_in_process(args.scans, args.size, args.seed, tmp),
            "generate_dataset": bench_dataset(args.scans, args.size, args.seed, args.workers, tmp),
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
