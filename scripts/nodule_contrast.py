"""How visible is each nodule, and which ones does a candidate list miss?

For every nodule of ``annotations.csv`` in the chosen subsets, the contrast is the mean HU of
the voxels inside its sphere minus the median HU of the lung around it (a shell 2-6 mm outside
its edge, voxels below -500 HU). On the small synthetic preset (2.3 mm voxels) a 4-5 mm
ground-glass nodule keeps 70-150 HU of that contrast, about what a vessel seen end-on has.

Each ``--eval`` folder is the output of ``python -m integration evaluate`` (its
``nodules.csv`` says which nodules a list detected); the table counts, per contrast band, how
often the lists missed. Category and location come from the generator's records
(``.synth/scan_*.json``) when the data are synthetic.

    python scripts/nodule_contrast.py --data DATA --folds 8,9 --eval EV9/eval EV8/eval
"""

from __future__ import annotations

import argparse
import csv
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lungct.cache import find_scans
from lungct.cli import run_command
from lungct.errors import LungCTError
from lungct.fileio import read_json
from lungct.io import read_scan
from lungct.tables import parse_folds, read_annotations

NODULE_COLUMNS = ("seriesuid", "coordX", "detected")

BANDS = (150.0, 250.0)


def nodule_contrast(
    array: np.ndarray, centre_zyx: np.ndarray, spacing_zyx: Sequence[float], diameter: float
) -> float:
    """Mean HU inside the sphere minus the median HU of the lung shell 2-6 mm outside it."""
    radius = 0.5 * diameter
    reach = np.ceil((radius + 6.0) / np.asarray(spacing_zyx)).astype(int)
    c = np.rint(centre_zyx).astype(int)
    lo = np.maximum(c - reach, 0)
    hi = np.minimum(c + reach + 1, array.shape)
    box = array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))].astype(np.float32)
    grids = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij")
    dist = np.sqrt(
        sum(((g - v) * s) ** 2 for g, v, s in zip(grids, centre_zyx, spacing_zyx, strict=True))
    )
    ball = dist <= max(radius, float(dist.min()))  # at least the nearest voxel
    shell = (dist > radius + 2.0) & (dist < radius + 6.0) & (box < -500)
    if not ball.any() or not shell.any():
        return float("nan")
    return float(box[ball].mean() - np.median(box[shell]))


def _labels(data: Path) -> dict[tuple[str, float], tuple[str, str]]:
    out = {}
    for path in sorted((data / ".synth").glob("scan_*.json")):
        rec = read_json(path)
        try:
            for row in rec.get("annotations", []):
                out[(rec["seriesuid"], round(float(row[0]), 2))] = (str(row[4]), str(row[5]))
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            raise LungCTError(path, "is not a generator record (seriesuid, annotations)") from None
    return out


def read_detections(eval_dir: Path) -> dict[tuple[str, float], int]:
    """``{(seriesuid, coordX): 1 if missed else 0}`` from an evaluation's ``nodules.csv``."""
    path = eval_dir / "nodules.csv"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            lacking = [c for c in NODULE_COLUMNS if c not in (reader.fieldnames or [])]
            if lacking:
                raise LungCTError(path, f"lacks the columns {lacking}: not an evaluation's table")
            out = {}
            for line, r in enumerate(reader, start=2):
                if r["detected"] not in ("0", "1"):
                    raise LungCTError(path, f"line {line}: detected must be 0 or 1")
                try:
                    out[(r["seriesuid"], round(float(r["coordX"]), 2))] = int(r["detected"] == "0")
                except ValueError:
                    raise LungCTError(path, f"line {line}: coordX is not a number") from None
    except FileNotFoundError:
        raise LungCTError(
            path, "file not found (give the folder `integration evaluate` wrote)"
        ) from None
    return out


def run(args: argparse.Namespace) -> int:
    table = read_annotations(args.data / "annotations.csv")
    labels = _labels(args.data)
    evaluations = [(d, read_detections(d)) for d in args.eval]
    scans = [s for s in find_scans(args.data, parse_folds(args.folds)) if s.seriesuid in table.uids]
    measured = {
        (s.seriesuid, round(float(table.coords[i][0]), 2))
        for s in scans
        for i in table.rows_in_series(s.seriesuid)
    }
    for d, found in evaluations:
        if not measured & found.keys():
            raise LungCTError(
                d / "nodules.csv", f"none of its nodules is in {args.data} subsets {args.folds}"
            )
    rows = []
    for s in tqdm(scans, desc="contrast", unit="scan", disable=args.quiet):
        scan = read_scan(s.path)
        spacing_zyx = np.asarray(scan.geometry.spacing)[::-1]
        for i in table.rows_in_series(s.seriesuid):
            world = table.coords[i]
            d = float(table.diameter_mm[i])
            con = nodule_contrast(scan.array, scan.world_to_voxel(world), spacing_zyx, d)
            key = (s.seriesuid, round(float(world[0]), 2))
            cat, loc = labels.get(key, ("?", "?"))
            misses = [found[key] for _, found in evaluations if key in found]
            rows.append((con, d, cat, loc, misses))
    rows.sort(key=lambda r: (np.isnan(r[0]), r[0]))
    print(f"{len(rows)} nodules; least visible first (misses / lists):")
    for con, d, cat, loc, ms in rows[: args.lowest]:
        print(f"  {con:6.0f} HU  {d:4.1f} mm  {cat:12s} {loc:13s} missed {sum(ms)}/{len(ms)}")
    edges = (-np.inf, *BANDS, np.inf)
    for lo, hi in itertools.pairwise(edges):
        sel = [r for r in rows if lo <= r[0] < hi]
        n_miss = sum(sum(r[4]) for r in sel)
        n_eval = sum(len(r[4]) for r in sel)
        print(
            f"contrast {lo:>5.0f} to {hi:<5.0f} HU: {len(sel):3d} nodules, missed {n_miss}/{n_eval}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="LUNA16-layout folder")
    ap.add_argument("--folds", default="8,9", help="subsets to measure, e.g. 8,9")
    ap.add_argument("--eval", type=Path, nargs="*", default=[], help="integration evaluate outputs")
    ap.add_argument("--lowest", type=int, default=15, help="list this many least visible")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.set_defaults(func=run)
    return run_command(ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
