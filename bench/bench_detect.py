"""Benchmark of ``integration detect``: seconds per stage and peak memory on one real scan.

Usage::

    python bench/bench_detect.py [SCAN] [--models DIR] [--repeats 3] [--out bench.json]

Without SCAN (as ``make bench`` runs it), one full-resolution synthetic scan is generated in a
temporary folder first (``lungct synth --size full``, random seed 0).

In one process: the floor first (SimpleITK reads the scan and resamples it to the 1 mm grid the
stages work on, median of ``--repeats``), then the model set is loaded (default: the shipped
set), one untimed ``detect`` traces the networks, and ``--repeats`` timed runs follow. Printed:
the median seconds of each stage and of the whole run, the process's peak resident memory
(ru_maxrss, which includes the warm-up), and the ratio detect / (read + resample). Run it on a
quiet machine; quote the ratio, not the seconds, across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def read_and_resample_seconds(scan_path: str, repeats: int) -> float:
    """Median seconds to read the scan and resample it to 1 mm with SimpleITK alone."""
    from lungct.io import read_scan
    from lungct.preprocess import PreprocessPlan, resample_array

    plan = PreprocessPlan()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scan = read_scan(scan_path)
        resample_array(scan.array, scan.geometry, plan.spacing, plan.image_interpolation)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "scan",
        nargs="?",
        help="a real scan (.mhd/.mha/.nii(.gz) or a DICOM folder); default: one full-resolution "
        "synthetic scan made for the run",
    )
    parser.add_argument("--models", help="model set (default: the shipped set)")
    parser.add_argument(
        "--runtime",
        choices=("auto", "keras", "onnx", "int8"),
        default="auto",
        help="where the U-Net runs (default auto: ONNX Runtime on a CPU, the 8-bit copy where "
        "the set has one)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (default 3)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as made:
        if args.scan is None:
            from lungct.synth import generate_dataset

            generate_dataset(made, 1, 0, "full", progress=False, workers=1)
            args.scan = str(next(Path(made).glob("subset*/*.mhd")))
        return run(args)


def run(args: argparse.Namespace) -> int:
    """Time ``detect`` on ``args.scan`` and print the JSON result."""
    from integration.pipeline import Detector, detect
    from unet_candidates.runtime import runtime_of

    floor = read_and_resample_seconds(args.scan, args.repeats)
    detector = Detector.load(args.models, runtime=args.runtime)
    quiet = lambda message: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        detect(args.scan, detector, tmp, log=quiet, allow_training_scans=True)  # warm-up
        runs = [
            detect(args.scan, detector, tmp, log=quiet, allow_training_scans=True)
            for _ in range(args.repeats)
        ]
    stages = {
        name: round(statistics.median(r.timings.get(name, 0.0) for r in runs), 2)
        for name in runs[0].timings
    }
    total = statistics.median(sum(r.timings.values()) for r in runs)
    result = {
        "scan": Path(args.scan).name,
        "model_set": detector.model_set.summary() if detector.model_set else None,
        "runtime": runtime_of(detector.unet_model),
        "read_resample_s": round(floor, 2),
        "detect_median_s": round(total, 2),
        "ratio": round(total / floor, 1),
        "stages_median_s": stages,
        "candidates": runs[-1].candidates,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
