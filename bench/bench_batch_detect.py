"""Benchmark of batch detection: scans per minute on a local Ray against the one-process loop.

Usage::

    python bench/bench_batch_detect.py [--scans 8] [--repeats 3] [--ray-cpus N] [--no-report]
                                       [--data DIR] [--out bench.json]

Writes ``--scans`` small synthetic scans (``lungct synth --size small``: 128x128 slices at about
2.5 mm; or uses the scans of ``--data``), then runs, alternately and ``--repeats`` times each,
the whole command as a user would, in a fresh process and into a fresh output folder:

    python -m integration detect --scans DIR --out OUT                       (one process)
    python -m integration detect --scans DIR --out OUT --ray --ray-cpus N    (local Ray)

Each run's wall time includes everything the command does (loading the models, starting Ray and
its workers, every scan with its report, the tables). Printed: the median scans per minute
each way and their ratio (Ray / one process), as one JSON object. Run it on a quiet machine and
quote the ratio, not the rates, across machines; with few scans the fixed costs (Ray's start,
each worker loading the models) weigh more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(REPO))


def run_once(scans: Path, out: Path, extra: list[str]) -> float:
    """Wall seconds of one ``integration detect --scans`` command; it must succeed."""
    argv = [sys.executable, "-m", "integration", "detect", "--scans", str(scans)]
    t0 = time.perf_counter()
    done = subprocess.run(
        [*argv, "--out", str(out), *extra], cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"detect failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scans", type=int, default=8, help="synthetic scans (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs each way (default 3)")
    parser.add_argument(
        "--ray-cpus", type=int, default=os.cpu_count() or 1, help="local Ray CPUs (all cores)"
    )
    parser.add_argument("--no-report", action="store_true", help="detect without the reports")
    parser.add_argument("--data", help="scans to use instead of synthetic ones")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if args.data:
            scans = Path(args.data)
        else:
            from lungct.synth import generate_dataset

            scans = tmp_path / "scans"
            generate_dataset(scans, args.scans, 9100, "small", progress=False, workers=1)
        from integration.batch import find_batch_scans

        n = len(find_batch_scans(scans))
        common = ["--no-report"] if args.no_report else []
        ray = [*common, "--ray", "--ray-cpus", str(args.ray_cpus)]
        times: dict[str, list[float]] = {"one_process": [], "ray": []}
        for k in range(args.repeats):
            times["one_process"].append(run_once(scans, tmp_path / f"one{k}", common))
            times["ray"].append(run_once(scans, tmp_path / f"ray{k}", ray))
            print(
                f"repeat {k + 1}/{args.repeats}: one process {times['one_process'][-1]:.1f} s, "
                f"ray {times['ray'][-1]:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    rate = {way: 60.0 * n / statistics.median(t) for way, t in times.items()}
    result = {
        "scans": n,
        "report": not args.no_report,
        "cpu_count": os.cpu_count(),
        "ray_cpus": args.ray_cpus,
        "repeats": args.repeats,
        "one_process_seconds": [round(t, 1) for t in times["one_process"]],
        "ray_seconds": [round(t, 1) for t in times["ray"]],
        "one_process_scans_per_minute": round(rate["one_process"], 2),
        "ray_scans_per_minute": round(rate["ray"], 2),
        "ratio_ray_over_one_process": round(rate["ray"] / rate["one_process"], 2),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
