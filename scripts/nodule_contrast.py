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
import json
from pathlib import Path

import numpy as np

from lungct.cache import find_scans
from lungct.io import read_scan
from lungct.tables import parse_folds, read_annotations

BANDS = (150.0, 250.0)


def nodule_contrast(array: np.ndarray, centre_zyx: np.ndarray, spacing_zyx, diameter: float):
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
        rec = json.loads(path.read_text())
        for row in rec.get("annotations", []):
            out[(rec["seriesuid"], round(float(row[0]), 2))] = (str(row[4]), str(row[5]))
    return out


def _misses(eval_dirs: list[Path]) -> dict[tuple[str, float], list[int]]:
    out: dict[tuple[str, float], list[int]] = {}
    for d in eval_dirs:
        with open(d / "nodules.csv", newline="") as f:
            for r in csv.DictReader(f):
                key = (r["seriesuid"], round(float(r["coordX"]), 2))
                out.setdefault(key, []).append(int(r["detected"] == "0"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="LUNA16-layout folder")
    ap.add_argument("--folds", default="8,9", help="subsets to measure, e.g. 8,9")
    ap.add_argument("--eval", type=Path, nargs="*", default=[], help="integration evaluate outputs")
    ap.add_argument("--lowest", type=int, default=15, help="list this many least visible")
    args = ap.parse_args(argv)

    table = read_annotations(args.data / "annotations.csv")
    labels = _labels(args.data)
    misses = _misses(args.eval)
    rows = []
    for s in find_scans(args.data, parse_folds(args.folds)):
        if s.seriesuid not in table.uids:
            continue
        scan = read_scan(s.path)
        spacing_zyx = np.asarray(scan.geometry.spacing)[::-1]
        for i in table.rows_in_series(s.seriesuid):
            world = table.coords[i]
            d = float(table.diameter_mm[i])
            con = nodule_contrast(scan.array, scan.world_to_voxel(world), spacing_zyx, d)
            key = (s.seriesuid, round(float(world[0]), 2))
            cat, loc = labels.get(key, ("?", "?"))
            rows.append((con, d, cat, loc, misses.get(key, [])))
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


if __name__ == "__main__":
    raise SystemExit(main())
