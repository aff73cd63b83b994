"""``python -m lungct synth``: the command-line verb of the synthetic data generator.

The lead's ``lungct/__main__.py`` calls :func:`add_synth_parser` on its sub-parsers; the verb
then runs :func:`run_synth`.
"""

from __future__ import annotations

import argparse
import json
import sys

from lungct.cli import non_negative_int, positive_int


def add_synth_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``synth`` on an ``argparse`` sub-parser collection; returns its parser."""
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic chest-CT data set in the LUNA16 layout",
        description=(
            "Synthetic chest CT with ground truth, in the real LUNA16 layout: subset0..9/*.mhd, "
            "annotations.csv, annotations_excluded.csv, candidates.csv, seriesuids.csv. Scan i "
            "depends only on (seed, i): same seed, same bytes."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (created; resumable)")
    p.add_argument("--scans", type=positive_int, required=True, help="number of scans")
    p.add_argument("--seed", type=non_negative_int, default=0, help="data-set seed (default 0)")
    p.add_argument(
        "--size",
        choices=("small", "full"),
        default="small",
        help=(
            "small: 128^2 at ~2.5 mm, ~1 s a scan (tests, demo); full: 512^2 with LUNA16's "
            "spread of pixel spacing (0.46-0.98 mm) and slice spacing (0.45-2.5 mm, up to 700 "
            "slices), 0.5-1.5 min and up to 2.6 GB a scan (ignored with --background)"
        ),
    )
    p.add_argument(
        "--background",
        metavar="SCAN",
        help=(
            "put the synthetic nodules into the lungs of this real scan instead; each output "
            "scan is a copy of it, mirrored left-right (half of them) and cropped along z "
            "(up to 30%% of the slices), with its own nodules; needs the scan's own findings "
            "(the two tables below) or --background-has-no-findings"
        ),
    )
    p.add_argument(
        "--background-annotations",
        metavar="CSV",
        help=(
            "LUNA16 annotations.csv holding the background's nodules: its rows for the "
            "background's series go into the output annotations.csv (and class-1 candidates), "
            "moved with the mirror and crop; nothing synthetic is put within 5 mm of them"
        ),
    )
    p.add_argument(
        "--background-excluded",
        metavar="CSV",
        help=(
            "LUNA16 annotations_excluded.csv holding the background's other findings; its rows "
            "go into the output annotations_excluded.csv (diameter -1 stays -1), moved likewise"
        ),
    )
    p.add_argument(
        "--background-has-no-findings",
        action="store_true",
        help="the background has no nodule or other finding (instead of the two tables)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="worker processes (default 2, or 1 on a one-core machine)",
    )
    p.add_argument(
        "--lung-masks", action="store_true", help="also write ground-truth lung masks (seg-lungs/)"
    )
    p.add_argument(
        "--nodules-per-scan",
        type=non_negative_int,
        default=None,
        metavar="N",
        help=(
            "this many nodules in every scan (0-30) instead of LUNA16's 0-4: a dense test set "
            "measures more nodules per scan generated"
        ),
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_synth)
    return p


def run_synth(args: argparse.Namespace) -> int:
    """Run the verb; prints the summary as JSON and returns the exit status."""
    from lungct.synth.layout import generate_dataset

    summary = generate_dataset(
        args.out,
        n_scans=args.scans,
        seed=args.seed,
        size=args.size,
        background=args.background,
        progress=not args.quiet,
        workers=args.workers,
        lung_masks=args.lung_masks,
        background_annotations=args.background_annotations,
        background_excluded=args.background_excluded,
        background_has_no_findings=args.background_has_no_findings,
        nodules_per_scan=args.nodules_per_scan,
    )
    found = summary.get("background_findings")
    if args.background_annotations and found and not found["nodules"] + found["excluded"]:
        # A renamed file or a scan from another data set: its findings would go untaught.
        print(
            f"note: the background's series has no row in {args.background_annotations} or "
            f"{args.background_excluded}",
            file=sys.stderr,
        )
    summary.pop("scans", None)
    print(json.dumps(summary))
    return 0
