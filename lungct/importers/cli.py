"""``python -m lungct import lidc|own``: the command-line verbs of the importers.

``lungct/__main__.py`` calls :func:`add_import_parser` on its sub-parsers. Each sub-verb prints
one JSON line of counts on stdout; notes on skipped scans and the progress bar go to stderr.
A bad input ends it with one ``error: <file>: <problem>`` line and exit status 2; with
``--keep-going`` the bad scans are reported, the others imported, and the status is 1.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lungct.cli import positive_float, positive_int

_LAYOUT = (
    "Writes the LUNA16 layout: OUT/subset0..9/<seriesuid>.mhd + .zraw (int16 HU), "
    "annotations.csv, annotations_excluded.csv, seriesuids.csv, import.json. Folds (subsets) "
    "go by patient: the DICOM PatientID, else the file. Resumable: a rerun keeps the scans "
    "already written."
)


def add_import_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``import`` (with ``lidc`` and ``own``) on the ``lungct`` sub-parsers."""
    p = subparsers.add_parser(
        "import",
        help="import LIDC-IDRI or your own scans into the LUNA16 layout",
        description="Import scans into the LUNA16 layout every other command reads. " + _LAYOUT,
    )
    verbs = p.add_subparsers(dest="importer", required=True)

    lidc = verbs.add_parser(
        "lidc",
        help="LIDC-IDRI as downloaded: DICOM series + reading XML -> LUNA16 layout",
        description=(
            "LIDC-IDRI DICOM series and their reading XML -> the LUNA16 layout. annotations.csv: "
            "nodules >= 3 mm outlined by at least 3 of the 4 readers, centre and diameter the "
            "mean over those readers (a reader's diameter: of the sphere of the volume the "
            "outlines enclose, outline pixels excluded). annotations_excluded.csv: every other "
            "mark (nodules of 1-2 readers, nodules < 3 mm, non-nodules), one row per reader's "
            "mark, diameter -1 when unknown. " + _LAYOUT
        ),
    )
    lidc.add_argument(
        "inputs",
        nargs="+",
        metavar="FOLDER",
        help="folder(s) searched for series, e.g. LIDC-IDRI or LIDC-IDRI/LIDC-IDRI-0001",
    )
    lidc.add_argument("--out", required=True, help="output folder (created; resumable)")
    lidc.add_argument(
        "--xml",
        action="append",
        default=[],
        metavar="FOLDER",
        help="folder of reading XMLs, for series whose folder holds none (repeatable)",
    )
    lidc.add_argument(
        "--min-readers",
        type=positive_int,
        default=3,
        help="readers who must outline a nodule for annotations.csv (default 3, as LUNA16)",
    )
    lidc.add_argument(
        "--max-slice-spacing",
        type=positive_float,
        metavar="MM",
        help="skip series whose slices are further apart (LUNA16 kept <= 2.5 mm)",
    )
    _common(lidc)
    lidc.set_defaults(func=_run_lidc)

    own = verbs.add_parser(
        "own",
        help="your own DICOM series / NIfTI / MetaImage scans (+ nodule CSV) -> LUNA16 layout",
        description=(
            "Your own scans -> the LUNA16 layout: every DICOM series folder, .nii, .nii.gz, "
            ".mhd and .mha file under the inputs. A DICOM series keeps its SeriesInstanceUID, "
            "a file its name. The nodule CSV is in world mm: seriesuid (or file),coordX,coordY,"
            "coordZ,diameter_mm; rows with a negative diameter go to annotations_excluded.csv. "
            + _LAYOUT
        ),
    )
    own.add_argument(
        "inputs", nargs="+", metavar="PATH", help="scan files and folders searched for scans"
    )
    own.add_argument("--out", required=True, help="output folder (created; resumable)")
    own.add_argument(
        "--nodules",
        metavar="CSV",
        help="nodule table in world mm: seriesuid (or file),coordX,coordY,coordZ,diameter_mm",
    )
    _common(own)
    own.set_defaults(func=_run_own)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="report a scan that cannot be imported and go on (exit status 1 at the end)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _report(summary: dict) -> int:
    keys = ("scans", "kept", "patients", "annotations", "excluded", "folds")
    line = {k: summary[k] for k in keys}
    line["skipped"] = len(summary["skipped"])
    line["failed"] = len(summary["failed"])
    print(json.dumps(line))
    return 1 if summary["failed"] else 0


def _run_lidc(args: argparse.Namespace) -> int:
    from lungct.importers.lidc import import_lidc

    summary = import_lidc(
        args.inputs,
        args.out,
        xml_folders=args.xml,
        min_readers=args.min_readers,
        max_slice_spacing=args.max_slice_spacing,
        keep_going=args.keep_going,
        progress=not args.no_progress,
    )
    return _report(summary)


def _run_own(args: argparse.Namespace) -> int:
    from lungct.importers.own import import_own

    summary = import_own(
        args.inputs,
        args.out,
        nodules=args.nodules,
        keep_going=args.keep_going,
        progress=not args.no_progress,
    )
    return _report(summary)
