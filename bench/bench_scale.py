"""Scale test: prepare and batch-detect a LUNA16-layout set of many small scans on a local Ray.

Usage::

    python bench/bench_scale.py --work DIR [--scans 888] [--mark 100] [--ray-cpus N]
                                [--seed 8880] [--no-report] [--out scale.json]
                                [--figure scale.png]

Writes ``--scans`` small synthetic scans (``lungct synth --size small``: 128x128 slices at about
2.5 mm) in the LUNA16 layout under ``DIR/data`` (kept: a rerun with the same settings reuses
them), then runs the two commands as a user would, each in a fresh process:

    python -m lungct prepare --data DIR/data --cache DIR/cache --ray --ray-cpus N
    python -m integration detect --scans DIR/data --out DIR/detect --ray --ray-cpus N

While each runs, every ``SAMPLE_S`` seconds it reads the resident memory (RSS) of every process
of the command's tree: the driver (the command's own process), the Ray workers (``ray::``
processes, one scan at a time each) and Ray's own services (GCS, raylet, agents), and counts the
scans finished (cache entries with their ``meta.json``; detection folders with their
``summary.json``). Printed as one JSON object per command: wall time, scans per minute, and the
peak RSS of the driver, of the largest worker and of the services, over the first ``--mark``
scans and over the whole run, so that memory growing with the number of scans would show as a
whole-run peak above the first one. ``--figure`` plots RSS against scans finished.

Both commands must start from nothing: ``DIR/cache`` and ``DIR/detect`` are removed first.
Run it alone on the machine; it takes about an hour for 888 scans on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(REPO))

SAMPLE_S = 0.5
"""Seconds between two memory samples."""

MB = 1024 * 1024


@dataclass
class Sample:
    """Memory of the command's processes at one moment, and its progress."""

    seconds: float
    done: int
    driver_mb: float
    workers_mb: list[float]
    services_mb: float


@dataclass
class Trace:
    """Samples of one command, taken by :func:`watch`."""

    samples: list[Sample] = field(default_factory=list)
    done_at: dict[int, float] = field(default_factory=dict)


def classify(root: psutil.Process) -> tuple[float, list[float], float]:
    """RSS in MB of the driver, of each Ray worker and of Ray's services (summed)."""
    driver = 0.0
    workers: list[float] = []
    services = 0.0
    try:
        driver = root.memory_info().rss / MB
        children = root.children(recursive=True)
    except psutil.Error:
        return 0.0, [], 0.0
    for child in children:
        try:
            rss = child.memory_info().rss / MB
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if cmd.startswith("ray::"):
            workers.append(rss)
        else:
            services += rss
    return driver, workers, services


def watch(proc: subprocess.Popen, count_done, trace: Trace, stop: threading.Event) -> None:
    """Sample ``proc``'s tree into ``trace`` until ``stop`` is set."""
    root = psutil.Process(proc.pid)
    t0 = time.perf_counter()
    while not stop.is_set():
        done = count_done()
        driver, workers, services = classify(root)
        now = time.perf_counter() - t0
        trace.samples.append(Sample(now, done, driver, workers, services))
        for k in range(len(trace.done_at) + 1, done + 1):
            trace.done_at.setdefault(k, now)
        stop.wait(SAMPLE_S)


def run_watched(argv: list[str], count_done, log: Path) -> tuple[float, int, Trace]:
    """Run one command, sampling its memory; wall seconds, exit status and the trace."""
    trace = Trace()
    stop = threading.Event()
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
        thread = threading.Thread(target=watch, args=(proc, count_done, trace, stop))
        thread.start()
        code = proc.wait()
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    return seconds, code, trace


def count_entries(root: Path, pattern: str) -> int:
    """Files matching ``pattern`` under ``root`` (0 while it does not exist)."""
    return sum(1 for _ in root.glob(pattern)) if root.is_dir() else 0


def peaks(samples: list[Sample]) -> dict:
    """Peak RSS (MB) of the driver, of the largest worker and of the services, and the most
    workers seen at once."""
    if not samples:
        return {}
    return {
        "driver_peak_mb": round(max(s.driver_mb for s in samples), 1),
        "worker_peak_mb": round(max(max(s.workers_mb, default=0.0) for s in samples), 1),
        "ray_services_peak_mb": round(max(s.services_mb for s in samples), 1),
        "workers_at_once": max(len(s.workers_mb) for s in samples),
    }


def summarise(name: str, seconds: float, code: int, trace: Trace, scans: int, mark: int) -> dict:
    """The figures of one command."""
    first = [s for s in trace.samples if s.done < mark]
    result = {
        "command": name,
        "exit_status": code,
        "scans": scans,
        "wall_s": round(seconds, 1),
        "scans_per_minute": round(60.0 * scans / seconds, 1),
        f"first_{mark}_scans_s": round(trace.done_at.get(mark, float("nan")), 1),
        f"peaks_first_{mark}_scans": peaks(first),
        "peaks_whole_run": peaks(trace.samples),
    }
    return result


def figure(traces: dict[str, Trace], path: Path, mark: int) -> None:
    """RSS against scans finished, per command: driver, largest worker, services."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False)
    for ax, (name, trace) in zip(axes[0], traces.items(), strict=True):
        done = [s.done for s in trace.samples]
        ax.plot(done, [s.driver_mb for s in trace.samples], label="driver")
        ax.plot(
            done, [max(s.workers_mb, default=0.0) for s in trace.samples], label="largest worker"
        )
        ax.plot(done, [s.services_mb for s in trace.samples], label="Ray services (sum)")
        ax.axvline(mark, color="grey", linestyle=":", linewidth=1)
        ax.set_title(name)
        ax.set_xlabel("scans finished")
        ax.set_ylabel("resident memory (MB)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def du_mb(root: Path) -> float:
    """Disk used by the files under ``root``, in MB."""
    return round(sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file()) / MB, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, help="folder for the scans, cache and outputs")
    parser.add_argument("--scans", type=int, default=888, help="synthetic scans (default 888)")
    parser.add_argument("--mark", type=int, default=100, help="first figures after N scans")
    parser.add_argument("--seed", type=int, default=8880, help="data-set seed (default 8880)")
    parser.add_argument(
        "--ray-cpus", type=int, default=os.cpu_count() or 1, help="local Ray CPUs (all cores)"
    )
    parser.add_argument("--no-report", action="store_true", help="detect without the reports")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--figure", help="plot memory against scans finished (PNG)")
    args = parser.parse_args()

    work = Path(args.work)
    data, cache, detect = work / "data", work / "cache", work / "detect"
    t0 = time.perf_counter()
    from lungct.synth import generate_dataset

    generate_dataset(data, args.scans, args.seed, "small", progress=True, workers=2)
    synth_s = time.perf_counter() - t0
    print(f"synthetic scans ready ({synth_s:.0f} s)", file=sys.stderr, flush=True)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(detect, ignore_errors=True)
    ray = ["--ray", "--ray-cpus", str(args.ray_cpus)]
    runs = {
        "lungct prepare --ray": (
            [sys.executable, "-m", "lungct", "prepare", "--data", str(data), "--cache", str(cache)],
            lambda: count_entries(cache, "*/meta.json"),
        ),
        "integration detect --scans --ray": (
            [sys.executable, "-m", "integration", "detect", "--scans", str(data)]
            + ["--out", str(detect)]
            + (["--no-report"] if args.no_report else []),
            lambda: count_entries(detect / "scans", "*/summary.json"),
        ),
    }
    results, traces = [], {}
    for name, (argv, count_done) in runs.items():
        log = work / (name.split()[1] + ".log")
        print(f"running {name} ...", file=sys.stderr, flush=True)
        seconds, code, trace = run_watched([*argv, *ray], count_done, log)
        result = summarise(name, seconds, code, trace, count_done(), args.mark)
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
        traces[name] = trace
    report = {
        "scans": args.scans,
        "seed": args.seed,
        "size": "small",
        "cpu_count": os.cpu_count(),
        "ray_cpus": args.ray_cpus,
        "report": not args.no_report,
        "synth_s": round(synth_s, 1),
        "disk_mb": {"scans": du_mb(data), "cache": du_mb(cache), "detect": du_mb(detect)},
        "runs": results,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.figure:
        figure(traces, Path(args.figure), args.mark)
    return 0 if all(r["exit_status"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
