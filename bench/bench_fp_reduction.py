"""MGI-CNN benchmarks on this machine: training / prediction speed and the 750k-row memory check.

Usage::

    python bench/bench_fp_reduction.py                 # everything, default settings
    python bench/bench_fp_reduction.py --only speed --plans default default_3d --steps 5
    python bench/bench_fp_reduction.py --only memory --rows 750000

Speed: samples per second of ``train_on_batch`` and ``predict_on_batch`` at batch 128 on random
inputs (the network alone), timed batch by batch after warm-up steps (graph tracing is excluded,
see docs/performance.md), for each plan and for each Keras backend that is installed
(``tensorflow``, ``torch``); each backend runs in its own process. Also the patch pipeline alone:
training batches cut per second from a per-scan cache.

Memory: a child process writes a fake cache and a 750,000-row candidates CSV (LUNA16
candidates_V2 size), then reads it, builds the balanced sampler, draws batches and trains on a
few of them; its peak RSS (``resource.getrusage``) must stay under 2 GB. The ``pipeline`` run
does the same without Keras (the data side alone) and reports batches cut per second.

Results print as JSON lines; ``--out FILE`` also writes them as one JSON document.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIMIT_GB = 2.0


def _quiet_env(backend: str) -> dict:
    env = dict(os.environ)
    env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


# ----------------------------------------------------------------------------------------------
# Child: network speed
# ----------------------------------------------------------------------------------------------


def child_speed(plans: list[str], steps: int, warmup: int, batch: int) -> list[dict]:
    import keras
    import numpy as np

    from fp_reduction_3dcnn.config import get_plan
    from fp_reduction_3dcnn.model import compile_model
    from fp_reduction_3dcnn.networks import build_network

    results = []
    rng = np.random.default_rng(0)
    for name in plans:
        plan = get_plan(name).replace(batch_size=batch)
        model = compile_model(build_network(plan), plan)
        x = [rng.random((batch, *plan.input_shape), dtype=np.float32) for _ in model.inputs]
        y = (rng.random((batch, 1)) < 0.15).astype("float32")
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            model.train_on_batch(x, y)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        ptimes = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            np.asarray(model.predict_on_batch(x))
            if i >= warmup:
                ptimes.append(time.perf_counter() - t0)
        results.append(
            {
                "bench": "speed",
                "backend": keras.backend.backend(),
                "plan": name,
                "network": plan.network,
                "conv": plan.conv,
                "variant": plan.variant,
                "params": int(model.count_params()),
                "batch": batch,
                "train_samples_per_s": round(batch / float(np.median(times)), 1),
                "predict_samples_per_s": round(batch / float(np.median(ptimes)), 1),
                "timed_steps": steps,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# Child: patch pipeline speed and the 750k-row memory check
# ----------------------------------------------------------------------------------------------


def _fake_cache(root: Path, n_scans: int, shape_zyx: tuple[int, int, int]):
    import numpy as np

    from fp_reduction_3dcnn.testing import write_cache_entry
    from lungct.geometry import Geometry

    rng = np.random.default_rng(0)
    uids, lo, hi = [], [], []
    nz, ny, nx = shape_zyx
    for i in range(n_scans):
        uid = f"1.3.6.1.4.1.88888.{i}"
        geometry = Geometry((nx, ny, nz), (1.0, 1.0, 1.0), (-150.0, -150.0, -300.0 + i))
        volume = rng.integers(-1000, 200, shape_zyx, dtype=np.int16)
        write_cache_entry(root, uid, volume, geometry, i % 10)
        uids.append(uid)
        lo.append(np.asarray(geometry.origin) + 10)
        hi.append(np.asarray(geometry.origin) + np.asarray([nx, ny, nz]) - 10)
    return uids, (np.asarray(lo), np.asarray(hi))


def _rss_mb() -> tuple[float, float]:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux
    with open("/proc/self/statm") as handle:
        current = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return current, peak


def child_memory(rows: int, n_scans: int, batches: int, train_steps: int) -> dict:

    from fp_reduction_3dcnn.config import get_plan
    from fp_reduction_3dcnn.data import PatchCutter, load_candidates, rows_in_folds, series_folds
    from fp_reduction_3dcnn.sampler import BalancedBatchSampler
    from fp_reduction_3dcnn.testing import write_large_candidates
    from lungct.cache import ScanCache

    result: dict = {"bench": "memory", "rows": rows, "scans": n_scans}
    with tempfile.TemporaryDirectory(prefix="fpr_mem_") as tmp:
        root = Path(tmp)
        uids, box = _fake_cache(root / "cache", n_scans, (160, 256, 256))
        csv_path = root / "candidates.csv"
        write_large_candidates(csv_path, uids, rows, box, positive_fraction=0.002)
        result["csv_mb"] = round(csv_path.stat().st_size / 2**20, 1)
        plan = get_plan("default")
        if train_steps:
            import keras

            from fp_reduction_3dcnn.model import MGICNN, compile_model

            model = compile_model(MGICNN.from_plan(plan), plan)
            result["keras_backend"] = keras.backend.backend()
        result["rss_after_imports_mb"] = round(_rss_mb()[0], 1)
        t0 = time.perf_counter()
        table = load_candidates(csv_path)
        result["read_seconds"] = round(time.perf_counter() - t0, 1)
        cache = ScanCache(root / "cache")
        folds = series_folds(cache, table.uids)
        train_rows = rows_in_folds(table, folds, range(8))
        cutter = PatchCutter(plan, cache)
        sampler = BalancedBatchSampler(plan, cutter, table, train_rows)
        result["train_rows"] = len(train_rows)
        result["rss_after_sampler_mb"] = round(_rss_mb()[0], 1)
        t0 = time.perf_counter()
        n = 0
        for inputs, labels in sampler.epoch(0):
            if n < train_steps:
                model.train_on_batch(inputs, labels)
            n += 1
            if n >= batches:
                break
        elapsed = time.perf_counter() - t0
        result["batches_drawn"] = n
        result["trained_steps"] = min(train_steps, n)
        current, peak = _rss_mb()
        result["rss_end_mb"] = round(current, 1)
        result["peak_rss_mb"] = round(peak, 1)
        result["under_2gb"] = peak < LIMIT_GB * 1024
        if not train_steps:
            result["pipeline_batches_per_s"] = round(n / elapsed, 2)
            result["pipeline_samples_per_s"] = round(n * plan.batch_size / elapsed, 1)
    print(json.dumps(result), flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------


def _run_child(args: list[str], backend: str) -> list[dict]:
    cmd = [sys.executable, "-X", "faulthandler", __file__, "--child", *args]
    proc = subprocess.run(cmd, env=_quiet_env(backend), capture_output=True, text=True)
    out = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    if proc.returncode:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        out.append({"bench": "error", "backend": backend, "args": args, "stderr": tail})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["speed", "memory", "pipeline"], help="one benchmark")
    parser.add_argument("--plans", nargs="+", default=["default", "default_3d", "paper"])
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "torch"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rows", type=int, default=750_000, help="candidates for the memory check")
    parser.add_argument("--scans", type=int, default=40, help="fake scans for the memory check")
    parser.add_argument("--out", help="also write all results to this JSON file")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child is not None:
        kind, *rest = args.child
        if kind == "speed":
            child_speed(rest[3:], steps=int(rest[0]), warmup=int(rest[1]), batch=int(rest[2]))
        elif kind == "memory":
            child_memory(*(int(v) for v in rest))
        return 0

    results: list[dict] = []

    def emit(items: list[dict]) -> None:
        for item in items:
            if item.get("bench") == "error":
                print(json.dumps(item), flush=True)
        results.extend(items)

    if args.only in (None, "speed"):
        for backend in args.backends:
            module = "tensorflow" if backend == "tensorflow" else backend
            if importlib.util.find_spec(module) is None:
                item = {"bench": "speed", "backend": backend, "skipped": "not installed"}
                print(json.dumps(item), flush=True)
                results.append(item)
                continue
            child = ["speed", str(args.steps), str(args.warmup), str(args.batch), *args.plans]
            items = _run_child(child, backend)
            for item in items:
                if item.get("bench") == "speed":
                    print(json.dumps(item), flush=True)
            emit(items)
    if args.only in (None, "pipeline"):
        items = _run_child(["memory", str(args.rows), str(args.scans), "20", "0"], "tensorflow")
        for item in items:
            item["bench"] = "pipeline" if item.get("bench") == "memory" else item["bench"]
            print(json.dumps(item), flush=True)
        emit(items)
    if args.only in (None, "memory"):
        items = _run_child(["memory", str(args.rows), str(args.scans), "30", "5"], "tensorflow")
        for item in items:
            print(json.dumps(item), flush=True)
        emit(items)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    failed = [r for r in results if r.get("bench") == "error" or r.get("under_2gb") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
