"""Run a Python snippet in fresh processes; report median wall time and peak RSS."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

_WRAPPER = """
import json, resource, sys, time
t0 = time.perf_counter()
exec(compile(sys.argv[1], "<bench>", "exec"))
dt = time.perf_counter() - t0
print("BENCH" + json.dumps({"seconds": dt,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(code: str, repeats: int = 3, setup: str | None = None) -> dict:
    """Median seconds (timed inside the child, imports excluded) and max peak RSS in MB.

    ``setup`` runs before every repeat, untimed, in its own process (e.g. to clear a cache).
    """
    times, peaks = [], []
    for _ in range(repeats):
        if setup:
            subprocess.run([sys.executable, "-c", setup], check=True)
        out = subprocess.run(
            [sys.executable, "-c", _WRAPPER, code], check=True, capture_output=True, text=True
        ).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("BENCH"))
        result = json.loads(line[5:])
        times.append(result["seconds"])
        peaks.append(result["peak_rss_mb"])
    return {
        "median_s": round(statistics.median(times), 3),
        "min_s": round(min(times), 3),
        "peak_rss_mb": round(max(peaks), 1),
        "repeats": repeats,
    }


def report(name: str, result: dict) -> None:
    """Print one result line (human-readable and grep-able JSON)."""
    print(f"{name:<48s} {json.dumps(result)}", flush=True)


def wall(fn, repeats: int = 3) -> float:
    """Median wall time of ``fn()`` in this process."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
