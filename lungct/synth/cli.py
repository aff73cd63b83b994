"""``python -m lungct synth``: the command-line verb of the synthetic data generator.

The lead's ``lungct/__main__.py`` calls :func:`add_synth_parser` on its sub-parsers; the verb
then runs :func:`run_synth`.
"""

from __future__ import annotations

import argparse
import json
import os


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
    p.add_argument("--scans", type=int, required=True, help="number of scans")
    p.add_argument("--seed", type=int, default=0, help="data-set seed (default 0)")
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
        help="put the synthetic nodules into the lungs of this real scan instead",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"worker processes (default min(2, cpu count) = {min(2, os.cpu_count() or 1)})",
    )
    p.add_argument(
        "--lung-masks", action="store_true", help="also write ground-truth lung masks (seg-lungs/)"
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
    )
    summary.pop("scans", None)
    print(json.dumps(summary))
    return 0
