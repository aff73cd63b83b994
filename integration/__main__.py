"""Command line of the integration package: ``python -m integration <verb> ...``.

Verbs:
    evaluate   the exact LUNA16 evaluation of a results CSV (FROC, CPM, bootstrap interval).
    detect     the whole detector on one scan: detections CSV and an HTML report.
    demo       every stage on a synthetic mini-LUNA it generates; summary.json and figures.

Bad input ends with one line ``error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lungct.errors import LungCTError


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="LUNA16 FROC/CPM of a results CSV, exactly as the official script",
        description=(
            "Evaluate a submission (seriesuid,coordX,coordY,coordZ,probability in world mm) "
            "with the official LUNA16 rules. Writes metrics.json, froc.csv, froc.png, "
            "nodules.csv (and froc_bootstrap.csv; candidates.csv/.png with --no-cap) into "
            "--out and prints the metrics JSON as the last line of stdout."
        ),
    )
    p.add_argument("--annotations", required=True, help="annotations.csv")
    p.add_argument("--excluded", required=True, help="annotations_excluded.csv")
    p.add_argument("--seriesuids", required=True, help="seriesuids.csv (no header)")
    p.add_argument("--results", required=True, help="results CSV to evaluate")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--bootstrap",
        type=_non_negative_int,
        default=1000,
        help="bootstrap resamples of scans (default 1000; 0 = none)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument(
        "--no-cap",
        action="store_true",
        help="candidate-stage mode: keep every mark (no 100-per-scan cap) and also report "
        "sensitivity against candidates per scan",
    )
    p.add_argument("--label", default=None, help="system name for the figure (default: file stem)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from integration.evaluation import evaluate_files, metrics_line, write_outputs

    result = evaluate_files(
        args.annotations,
        args.excluded,
        args.seriesuids,
        args.results,
        cap=not args.no_cap,
        bootstrap=args.bootstrap,
        seed=args.seed,
        label=args.label,
    )
    metrics = write_outputs(result, args.out)
    print(
        f"{result.label}: CPM {result.cpm:.4f}"
        + (
            f" (95% CI {result.bootstrap.cpm_ci[0]:.4f}-{result.bootstrap.cpm_ci[1]:.4f})"
            if result.bootstrap is not None
            else ""
        )
        + f", {result.detected}/{result.nodules} nodules detected in {result.scans} scans"
    )
    print("sensitivity at " + ", ".join(f"{k}: {v:.4f}" for k, v in metrics["sensitivity"].items()))
    if result.unknown_series_rows:
        print(
            f"note: {result.unknown_series_rows} results rows of {result.unknown_series} series "
            "not in the series list were left out"
        )
    if result.candidate_stage is not None:
        cs = result.candidate_stage
        print(
            f"candidate stage: sensitivity {cs.sensitivity:.4f} at "
            f"{cs.candidates_per_scan:.1f} candidates per scan"
        )
    print(f"outputs in {args.out}")
    print(metrics_line(metrics))
    return 0


def _quiet_tensorflow() -> None:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _run_detect(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    from integration.pipeline import Detector, detect

    detector = Detector.load(args.models)
    if args.threshold is not None:
        detector.config.threshold = args.threshold
    if args.tta:
        detector.config.tta = True
    result = detect(
        args.scan,
        detector,
        args.out,
        report=not args.no_report,
        allow_training_scans=args.allow_training_scans,
    )
    print(
        f"{result.seriesuid}: {len(result.detections)} detections from {result.candidates} "
        f"candidates; suspicion {result.suspicion:.3f}; "
        f"{sum(result.timings.values()):.1f} s, peak {result.peak_rss_mb:.0f} MB; outputs in {args.out}"
    )
    return 0


def _add_detect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "detect",
        help="run the whole detector on one scan",
        description=(
            "Preprocess -> lung mask -> U-Net candidates -> MGI-CNN scores. Writes "
            "detections.csv (seriesuid,coordX,coordY,coordZ,probability,diameter_mm; world mm), "
            "summary.json and report.html with its figures into --out."
        ),
    )
    p.add_argument("--scan", required=True, help=".mhd/.mha/.nii(.gz) or a DICOM series folder")
    p.add_argument("--models", required=True, help="models folder (unet/, fpr/, pipeline.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, help="report crops at or above this probability")
    p.add_argument("--tta", action="store_true", help="test-time augmentation of the scores")
    p.add_argument("--no-report", action="store_true", help="only detections.csv + summary.json")
    p.add_argument(
        "--allow-training-scans",
        action="store_true",
        help="run on a scan the MGI-CNN was trained on (its scores are then optimistic)",
    )
    p.set_defaults(func=_run_detect)


def _run_demo(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    import json

    from integration.demo import DemoConfig, run_demo

    config = DemoConfig(
        scans=args.scans,
        seed=args.seed,
        unet_minutes=args.unet_minutes,
        gan=not args.no_gan,
        gan_minutes=args.gan_minutes,
        fpr_minutes=args.fpr_minutes,
        tta=args.tta,
    )
    summary = run_demo(args.out, config)
    print(f"summary: {args.out}/summary.json; FROC: {summary['figures']['froc']}")
    print(
        json.dumps(
            {
                k: summary[k]
                for k in (
                    "cpm",
                    "sensitivity",
                    "cpm_ci95",
                    "candidate_sensitivity",
                    "candidates_per_scan",
                    "total_seconds",
                )
            }
        )
    )
    return 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="every stage on a synthetic mini-LUNA it generates",
        description=(
            "Generate a synthetic mini-LUNA, then prepare, train the U-Net, extract candidates, "
            "train CT-GAN, augment the training folds, train the MGI-CNN, score the held-out "
            "candidates, evaluate and write a detect report. Outputs: summary.json, "
            "evaluation/froc.png, report/report.html, models/ (usable with `detect --models`). "
            "Rerunning the same --out resumes: finished stages are skipped."
        ),
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scans", type=int, default=20, help="synthetic scans (default 20)")
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--unet-minutes", type=float, default=3.0, help="U-Net training budget")
    p.add_argument("--gan-minutes", type=float, default=2.0, help="CT-GAN training budget")
    p.add_argument("--fpr-minutes", type=float, default=4.0, help="MGI-CNN training budget")
    p.add_argument("--no-gan", action="store_true", help="skip the CT-GAN augmentation")
    p.add_argument("--tta", action="store_true", help="test-time augmentation of the scores")
    p.set_defaults(func=_run_demo)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per verb."""
    parser = argparse.ArgumentParser(
        prog="python -m integration", description="Lung-nodule suite: integration commands."
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    _add_evaluate(subparsers)
    _add_detect(subparsers)
    _add_demo(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except LungCTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
