"""``python -m lungct <verb>``: info, lungmask, prepare, synth, show, import.

Every verb has ``--help``. A bad input prints one line ``error: <file>: <problem>`` on stderr
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lungct.cli import positive_int, run_command
from lungct.errors import LungCTError
from lungct.raypool import add_ray_arguments


def _info(args: argparse.Namespace) -> int:
    from lungct.io import read_scan

    print(json.dumps(read_scan(args.scan).info()))
    return 0


def _lungmask(args: argparse.Namespace) -> int:
    from lungct.io import read_scan, scan_suffix, write_image
    from lungct.lungmask import lung_volume_ml, segment_lungs

    if not scan_suffix(args.out):
        raise LungCTError(args.out, "output must end in .mhd, .mha, .nii or .nii.gz")
    scan = read_scan(args.scan)
    mask = segment_lungs(scan)
    write_image(mask, scan.geometry, args.out)
    print(json.dumps({"lung_volume_ml": round(lung_volume_ml(mask, scan.geometry), 1)}))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from lungct.cache import prepare_dataset
    from lungct.preprocess import PreprocessPlan
    from lungct.raypool import ray_options_from_args
    from lungct.tables import parse_folds

    ray = ray_options_from_args(args)
    plan = PreprocessPlan.load(args.plan) if args.plan else PreprocessPlan()
    folds = parse_folds(args.folds) if args.folds else None
    report = prepare_dataset(
        args.data, args.cache, plan, folds=folds, workers=args.workers, ray=ray
    )
    for _uid, message in sorted(report["failed"].items()):
        print(f"error: {message}", file=sys.stderr)
    summary = {k: len(v) for k, v in report.items()}
    print(json.dumps(summary))
    return 1 if report["failed"] else 0


def _show(args: argparse.Namespace) -> int:
    from lungct.io import read_scan
    from lungct.show import show_scan

    scan = read_scan(args.scan)
    nodules = []
    if args.annotations:
        from lungct.tables import read_annotations

        table = read_annotations(args.annotations, allow_negative_diameter=True)
        for row in table.rows_in_series(scan.seriesuid):
            x, y, z = (float(v) for v in table.coords[row])
            diameter = float(table.diameter_mm[row])
            nodules.append((x, y, z, diameter if diameter > 0 else 10.0))
        if not nodules:
            print(f"note: no annotation of {scan.seriesuid} in {args.annotations}", file=sys.stderr)
    show_scan(scan, args.out, nodules)
    print(json.dumps({"out": str(args.out), "nodules": len(nodules)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="python -m lungct", description="Shared CT core: read, inspect, prepare, synthesise."
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("info", help="print a scan's geometry and HU range as JSON")
    p.add_argument("scan", help=".mhd/.mha/.nii(.gz) file or DICOM series folder")
    p.set_defaults(func=_info)

    p = sub.add_parser("lungmask", help="segment the lungs; write the mask in the scan's geometry")
    p.add_argument("scan", help=".mhd/.mha/.nii(.gz) file or DICOM series folder")
    p.add_argument("--out", required=True, help="mask file (.mhd, .nii.gz, ...)")
    p.set_defaults(func=_lungmask)

    p = sub.add_parser(
        "prepare",
        help="build the per-scan cache of a LUNA16-layout folder",
        description="Build (or complete: finished entries are skipped) the per-scan cache of a "
        "LUNA16-layout folder, --workers local processes at a time, or one Ray task per scan "
        "with --ray. A scan that fails is named on stderr and the others go on; exit status "
        "0 every scan prepared, 1 some failed, 2 bad input.",
    )
    p.add_argument("--data", required=True, help="folder with subset0..9/*.mhd")
    p.add_argument("--cache", required=True, help="cache folder (created; resumable)")
    p.add_argument("--folds", help="only these subsets, e.g. 0-7 or 0,3,9")
    p.add_argument("--plan", help="preprocessing plan JSON (default: 1 mm isotropic)")
    p.add_argument(
        "--workers",
        type=positive_int,
        default=2,
        help="scans prepared in parallel, in local processes (without --ray)",
    )
    add_ray_arguments(p, "prepare each scan")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("show", help="PNG of axial/coronal/sagittal views through each nodule")
    p.add_argument("scan", help=".mhd/.mha/.nii(.gz) file or DICOM series folder")
    p.add_argument("--annotations", help="annotations.csv (world mm) to circle")
    p.add_argument("--out", required=True, help="output PNG")
    p.set_defaults(func=_show)

    from lungct.synth.cli import add_synth_parser

    add_synth_parser(sub)

    from lungct.importers.cli import add_import_parser

    add_import_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
