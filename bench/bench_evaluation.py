"""Benchmark of the LUNA16 evaluation (not a test).

Builds simulated submissions of 888 scans x 100 marks over the real LUNA16 tables (or
synthetic tables when ``../shared`` is absent), with continuous probabilities (the worst case:
one FROC point per mark), and prints medians of several runs:

- ``evaluate`` without bootstrap, from tables already in memory and from the CSV files;
- ``evaluate`` with 1000 bootstrap resamples;
- reading a 754,975-row candidates table (``--candidates``).

``--figure PATH`` also draws the README's example figure: two simulated systems overlaid,
with their bootstrap bands.

Usage: ``python bench/bench_evaluation.py [--runs 5] [--candidates] [--figure docs/x.png]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from integration.evaluation import evaluate, evaluate_files, plot_froc
from lungct.tables import (
    AnnotationTable,
    ResultTable,
    read_annotations,
    read_candidates,
    read_seriesuids,
)

LUNA_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "luna16-csv"


def load_tables() -> tuple[list[str], AnnotationTable, AnnotationTable, str]:
    """The real tables when present, else synthetic ones of the same size."""
    if LUNA_CSV.is_dir():
        uids = read_seriesuids(LUNA_CSV / "seriesuids.csv")
        ann = read_annotations(LUNA_CSV / "annotations.csv")
        exc = read_annotations(LUNA_CSV / "annotations_excluded.csv", allow_negative_diameter=True)
        return uids, ann, exc, "real LUNA16 tables"
    rng = np.random.default_rng(0)
    uids = [f"1.2.840.0.{i}" for i in range(888)]
    ann = AnnotationTable.from_rows(
        (uids[int(rng.integers(601))], *rng.normal(0, 80, 3), float(rng.uniform(3, 30)))
        for _ in range(1186)
    )
    exc = AnnotationTable.from_rows(
        (uids[int(rng.integers(888))], *rng.normal(0, 80, 3), -1.0) for _ in range(35192)
    )
    return uids, ann, exc, "synthetic tables"


def simulate(
    uids: list[str],
    ann: AnnotationTable,
    marks_per_scan: int = 100,
    hit_rate: float = 0.9,
    strength: float = 6.0,
    seed: int = 0,
) -> ResultTable:
    """A simulated CAD: most nodules marked with high scores, the rest false positives."""
    rng = np.random.default_rng(seed)
    scan_of = {u: i for i, u in enumerate(uids)}
    n = len(uids)
    rows_uid: list[str] = []
    coords: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    on_nodule = np.zeros(n, dtype=int)
    for i in range(len(ann)):
        if rng.random() < hit_rate:
            uid = ann.uid_of(i)
            on_nodule[scan_of[uid]] += 1
            rows_uid.append(uid)
            coords.append(ann.coords[i] + rng.normal(0, ann.diameter_mm[i] / 8, 3))
            probs.append(np.array([rng.beta(strength, 1.5)]))
    for s, uid in enumerate(uids):
        k = max(marks_per_scan - on_nodule[s], 0)
        rows_uid.extend([uid] * k)
        coords.append(rng.normal(0, 120, (k, 3)))
        probs.append(rng.beta(1.0, strength, k))
    xyz = np.vstack([np.atleast_2d(c) for c in coords])
    return ResultTable.from_arrays(rows_uid, xyz, np.concatenate(probs))


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per timing (median)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples (default 1000)")
    parser.add_argument("--candidates", action="store_true", help="also time a 754,975-row read")
    parser.add_argument("--figure", type=Path, default=None, help="write the example figure")
    args = parser.parse_args()

    uids, ann, exc, source = load_tables()
    results = simulate(uids, ann)
    print(f"{source}: {len(uids)} scans, {len(ann)} nodules, {len(exc)} excluded findings")
    print(f"submission: {len(results)} marks ({len(results) / len(uids):.0f} per scan)")

    first = evaluate(ann, exc, uids, results)
    print(f"CPM {first.cpm:.4f}, {len(first.froc_fps)} FROC points")
    t = median_time(lambda: evaluate(ann, exc, uids, results), args.runs)
    print(f"evaluate, no bootstrap (tables in memory): median {t:.3f} s over {args.runs} runs")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "results.csv"
        results.to_csv(path)
        files = (
            [LUNA_CSV / "annotations.csv", LUNA_CSV / "annotations_excluded.csv"]
            if LUNA_CSV.is_dir()
            else None
        )
        if files is not None:
            t = median_time(
                lambda: evaluate_files(
                    files[0], files[1], LUNA_CSV / "seriesuids.csv", path, bootstrap=0
                ),
                args.runs,
            )
            print(f"evaluate_files, no bootstrap (CSV parsing included): median {t:.3f} s")

    runs_bs = max(1, min(args.runs, 3))
    t = median_time(
        lambda: evaluate(ann, exc, uids, results, bootstrap=args.bootstrap, seed=0), runs_bs
    )
    print(f"evaluate, {args.bootstrap} bootstrap resamples: median {t:.3f} s over {runs_bs} runs")

    if args.candidates:
        rng = np.random.default_rng(1)
        n = 754975
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "candidates.csv"
            idx = rng.integers(len(uids), size=n)
            xyz = rng.normal(0, 100, (n, 3))
            with path.open("w") as f:
                f.write("seriesuid,coordX,coordY,coordZ,class\n")
                for i in range(n):
                    x, y, z = xyz[i]
                    f.write(f"{uids[idx[i]]},{x:.8f},{y:.8f},{z:.8f},{int(i % 500 == 0)}\n")
            known = set(uids)
            t = median_time(lambda: read_candidates(path, known), max(1, min(args.runs, 3)))
            print(f"read_candidates, {n} rows: median {t:.3f} s")

    if args.figure is not None:
        good = evaluate(ann, exc, uids, results, bootstrap=args.bootstrap, seed=0)
        good.label = "simulated system A"
        weak = evaluate(
            ann,
            exc,
            uids,
            simulate(uids, ann, hit_rate=0.85, strength=4.0, seed=1),
            bootstrap=args.bootstrap,
            seed=0,
        )
        weak.label = "simulated system B"
        plot_froc(
            [good, weak],
            args.figure,
            title=f"LUNA16 FROC, {len(uids)} scans (simulated submissions)",
        )
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
