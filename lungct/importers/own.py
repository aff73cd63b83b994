"""``lungct import own``: your own scans (DICOM series, NIfTI, MetaImage) -> the LUNA16 layout.

Every DICOM series folder (one series per folder), ``.nii``/``.nii.gz`` and ``.mhd``/``.mha``
file under the inputs becomes ``subsetN/<seriesuid>.mhd`` (int16 HU). A DICOM series keeps its
SeriesInstanceUID; a file is named after its file name (characters other than letters, digits,
``.``, ``_`` and ``-`` become ``_``; two files of the same name get their path below the input
folder instead). Folds go by patient: the DICOM PatientID, and for a file (which has none) the
file itself (:mod:`lungct.importers.layout`).

The optional nodule table is a CSV in **world millimetres** (the scan's patient frame, as
``lungct show`` and LUNA16 use them) with a header naming its columns:

- the scan: ``seriesuid`` (or ``file`` / ``scan``): the series UID, the file or folder name, or
  its path below the input folder;
- the centre: ``coordX,coordY,coordZ`` (or ``x,y,z``);
- the size: ``diameter_mm`` (or ``diameter``).

A row with a positive diameter goes to ``annotations.csv``; a row with a negative one (-1:
size unknown, a finding that is not a nodule to find) to ``annotations_excluded.csv``. A row
naming no imported scan, or a centre outside its scan, is an error naming the table and line.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.importers.layout import (
    IMPORTER_VERSION,
    ScanSource,
    find_sources,
    fold_counts,
    folds_by,
    import_scans,
    write_tables,
)
from lungct.io import read_scan
from lungct.scan import Scan

_SCAN_COLUMNS = ("seriesuid", "file", "scan", "filename", "file_name")
_AXIS_COLUMNS = (("coordx", "x"), ("coordy", "y"), ("coordz", "z"))
_DIAMETER_COLUMNS = ("diameter_mm", "diameter")


@dataclass(frozen=True)
class NoduleRow:
    """One row of a nodule table: the scan it names, world ``(x, y, z)`` mm and diameter."""

    line: int
    scan: str
    world: tuple[float, float, float]
    diameter_mm: float


def read_nodule_table(path: str | os.PathLike) -> list[NoduleRow]:
    """Read a nodule table (see the module's notes for its columns).

    Raises:
        LungCTError: missing file, a missing column, an empty scan name, a value that is not a
            finite number, a zero diameter; the message names the file and the line.
    """
    path = Path(path)
    try:
        handle = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise LungCTError(path, "nodule table not found") from None
    except OSError as exc:
        raise LungCTError(path, f"cannot be read ({exc.strerror or exc})") from None
    rows = []
    with handle:
        try:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise LungCTError(path, "is empty (a header line is needed)")
            names = [h.strip().lower() for h in header]
            scan_col = _column(path, names, _SCAN_COLUMNS)
            axis_cols = [_column(path, names, options) for options in _AXIS_COLUMNS]
            size_col = _column(path, names, _DIAMETER_COLUMNS)
            for line, row in enumerate(reader, start=2):
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) < len(names):
                    raise LungCTError(
                        path, f"line {line}: {len(row)} fields, the header has {len(names)}"
                    )
                scan = row[scan_col].strip()
                if not scan:
                    raise LungCTError(path, f"line {line}: no scan named")
                x, y, z, d = (
                    _number(path, line, header[c], row[c]) for c in (*axis_cols, size_col)
                )
                if d == 0:
                    raise LungCTError(
                        path,
                        f"line {line}: diameter 0 (give the size in mm, or -1 for an excluded "
                        "finding of unknown size)",
                    )
                rows.append(NoduleRow(line, scan, (x, y, z), d))
        except UnicodeDecodeError as exc:
            raise LungCTError(path, f"is not a UTF-8 text file ({exc.reason})") from None
        except csv.Error as exc:
            raise LungCTError(path, f"is not a readable CSV ({exc})") from None
    return rows


def _column(path: Path, names: list[str], options: Sequence[str]) -> int:
    for option in options:
        if option in names:
            return names.index(option)
    raise LungCTError(
        path,
        f"has no column {' / '.join(options)} (the header needs seriesuid (or file), "
        "coordX, coordY, coordZ, diameter_mm)",
    )


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LungCTError(path, f"line {line}: {column} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise LungCTError(path, f"line {line}: {column} {text.strip()!r} is not finite")
    return value


def resolve_rows(
    path: str | os.PathLike, rows: Sequence[NoduleRow], sources: Sequence[ScanSource]
) -> dict[int, str]:
    """Line -> series UID of each row, by series UID, file or folder name, or relative path.

    Raises:
        LungCTError: a row naming no scan, or a name that fits several scans.
    """
    names: dict[str, set[str]] = {}
    for s in sources:
        for name in (s.seriesuid, *s.names):
            names.setdefault(name, set()).add(s.seriesuid)
    resolved = {}
    for row in rows:
        key = row.scan
        uids = names.get(key) or names.get(Path(key).as_posix()) or set()
        if not uids:
            raise LungCTError(
                path,
                f"line {row.line}: scan {key!r} is not among the {len(sources)} scans found in "
                "the inputs (give a series UID, a file or folder name, or a path below the "
                "input folder)",
            )
        if len(uids) > 1:
            raise LungCTError(
                path,
                f"line {row.line}: {key!r} names {len(uids)} scans; give its path below the "
                "input folder",
            )
        resolved[row.line] = next(iter(uids))
    return resolved


def _outside(geometry: Geometry, world: tuple[float, float, float]) -> bool:
    return not bool(geometry.contains(geometry.world_to_voxel(np.asarray(world))))


def convert_own_scan(source: ScanSource) -> tuple[Scan, dict[str, Any]]:
    """Read one scan (DICOM series folder or file)."""
    return read_scan(source.path), {}


def import_own(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    nodules: str | os.PathLike | None = None,
    keep_going: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Import your own scans (and their nodules) into a LUNA16-layout folder.

    Args:
        inputs: files and folders searched for scans (DICOM series folders, ``.nii``,
            ``.nii.gz``, ``.mhd``, ``.mha``).
        out: the output folder (created; resumable, see :mod:`lungct.importers.layout`).
        nodules: the nodule table (see the module's notes), checked against the scans found
            before any scan is read.
        keep_going: report a scan that cannot be imported and go on with the others (its
            nodules are left out).
        progress: a progress bar on stderr (on a terminal).

    Returns:
        The summary written to ``import.json``.

    Raises:
        LungCTError: no scan found, a bad nodule table, a scan that cannot be read (unless
            ``keep_going``).
    """
    out = Path(out)
    found = find_sources(inputs, out, files=True)
    sources = []
    skipped: dict[str, str] = {}
    for s in found:
        if s.modality and s.modality != "CT":
            skipped[str(s.path)] = f"modality {s.modality}, not CT"
            print(f"note: {s.path}: skipped (modality {s.modality}, not CT)", file=sys.stderr)
        else:
            sources.append(s)
    if not sources:
        where = ", ".join(str(p) for p in inputs)
        raise LungCTError(
            where, "no scans found (DICOM series folders, .mhd, .mha, .nii or .nii.gz files)"
        )
    rows = read_nodule_table(nodules) if nodules is not None else []
    row_uids = resolve_rows(nodules, rows, sources) if nodules is not None else {}
    result = import_scans(
        out, "own", sources, convert_own_scan, keep_going=keep_going, progress=progress
    )
    records = result["records"]
    by_uid = {r["seriesuid"]: r for r in records}
    annotations, excluded = [], []
    dropped = 0
    for row in rows:
        uid = row_uids[row.line]
        record = by_uid.get(uid)
        if record is None:
            dropped += 1  # its scan failed (keep_going) and was reported
            continue
        if _outside(Geometry.from_dict(record["geometry"]), row.world):
            x, y, z = row.world
            raise LungCTError(
                nodules,
                f"line {row.line}: centre ({x:g}, {y:g}, {z:g}) mm lies outside scan {uid} "
                "(are the coordinates world millimetres, x y z?)",
            )
        target = annotations if row.diameter_mm > 0 else excluded
        target.append([uid, *row.world, row.diameter_mm])
    summary = {
        "importer": "own",
        "version": IMPORTER_VERSION,
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "nodules": None if nodules is None else str(Path(nodules).resolve()),
        "scans": len(records),
        "kept": result["kept"],
        "removed": result["removed"],
        "patients": len({s.patient for s in sources if s.seriesuid in by_uid}),
        "annotations": len(annotations),
        "excluded": len(excluded),
        "rows_of_failed_scans": dropped,
        "folds": fold_counts(records),
        "folds_by": folds_by(records),
        "skipped": {**skipped, **result["skipped"]},
        "failed": result["failed"],
    }
    write_tables(out, records, annotations, excluded, summary)
    return summary
