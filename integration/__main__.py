"""Command line of the integration package: ``python -m integration <verb> ...``.

Verbs:
    evaluate   the exact LUNA16 evaluation of a results CSV (FROC, CPM, bootstrap interval).
    compare    two or more results CSVs on the same scans: paired CPM differences, one figure.
    detect     the whole detector on one scan: detections CSV and an HTML report; or on many
               scans (--scans DIR|LIST.csv), in one process or on Ray (--ray).
    demo       the shipped set measured on fresh synthetic scans, then every stage trained briefly.
    crossval   every stage per test subset, then the pooled folds evaluated once.
    ablate     named configurations (a grid JSON): one CPM table and one FROC figure.
    export     the U-Net and MGI-CNN of a models folder as SavedModel or ONNX.
    modelset   describe a folder of trained stages as a model set (modelset.json, card).
    train-models     train a model set from nothing with one recipe (data, folds, budgets).
    evaluate-models  measure a model set on a data set it never trained on (FROC, CPM, CI).

Bad input ends with one line ``error: <message>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lungct.cli import fraction, non_negative_int, positive_float, positive_int, run_command
from lungct.fileio import read_json
from unet_candidates.runtime import RUNTIMES

if TYPE_CHECKING:
    from integration.stages import StageSettings
    from lungct.raypool import RayOptions

_ALLOW_UNFINISHED = (
    "use stages whose training has not ended (their last saved weights; the MGI-CNN's newest "
    "checkpoint when it has no model.keras yet)"
)


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
    p.add_argument(
        "--excluded",
        default=None,
        help="annotations_excluded.csv: marks on these findings are neither hits nor false "
        "positives (LUNA16's rule; without it every mark off a nodule is a false positive)",
    )
    p.add_argument("--seriesuids", required=True, help="seriesuids.csv (no header)")
    p.add_argument("--results", required=True, help="results CSV to evaluate")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=1000,
        help="bootstrap resamples of scans (default 1000; 0 = none)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap seed (default 0)")
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


def _add_compare(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="paired comparison of results CSVs on the same scans (CPM differences, p-values)",
        description=(
            "Evaluate two or more submissions on the same scans with the LUNA16 rules and "
            "compare each with the reference (the first, or --reference) by a paired "
            "bootstrap: every system is scored on the same resampled scans in every round. "
            "Writes comparison.json, differences.csv and froc_compare.png into --out, prints a "
            "table, and the comparison JSON as the last line of stdout."
        ),
    )
    p.add_argument("--annotations", required=True, help="annotations.csv")
    p.add_argument(
        "--excluded",
        default=None,
        help="annotations_excluded.csv: marks on these findings are neither hits nor false "
        "positives (LUNA16's rule; without it every mark off a nodule is a false positive)",
    )
    p.add_argument("--seriesuids", required=True, help="seriesuids.csv (no header)")
    p.add_argument(
        "--results", required=True, nargs="+", metavar="CSV", help="two or more results CSVs"
    )
    p.add_argument(
        "--labels", nargs="+", default=None, help="one name per results CSV (default: file stems)"
    )
    p.add_argument(
        "--reference",
        default=None,
        help="label of the reference the others are compared with (default: the first)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--bootstrap",
        type=positive_int,
        default=1000,
        help="bootstrap resamples of scans, shared by all systems (default 1000)",
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="bootstrap seed (default 0)")
    p.add_argument(
        "--confidence", type=fraction, default=0.95, help="level of the intervals (default 0.95)"
    )
    p.add_argument("--no-cap", action="store_true", help="keep every mark (no 100-per-scan cap)")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from integration.compare import compare_files, write_comparison
    from integration.evaluation import metrics_line
    from lungct.errors import LungCTError

    labels = args.labels
    if labels is None:
        labels = [Path(r).stem for r in args.results]
        if len(set(labels)) != len(labels):
            labels = list(args.results)
    if len(labels) != len(args.results):
        raise LungCTError(None, f"--labels: {len(labels)} names for {len(args.results)} results")
    reference = 0
    if args.reference is not None:
        if args.reference not in labels:
            raise LungCTError(
                None, f"--reference {args.reference!r} is none of the labels {labels}"
            )
        reference = labels.index(args.reference)
    comparison = compare_files(
        args.annotations,
        args.excluded,
        args.seriesuids,
        args.results,
        labels=labels,
        reference=reference,
        cap=not args.no_cap,
        bootstrap=args.bootstrap,
        seed=args.seed,
        confidence=args.confidence,
    )
    data = write_comparison(comparison, args.out)
    print(comparison.table())
    for d in comparison.differences:
        verdict = (
            "excludes 0: a difference at this level"
            if d.excludes_zero
            else "contains 0: no difference shown at this level"
        )
        print(f"{d.label} vs {d.reference}: the paired interval {verdict}")
    print(f"outputs in {args.out}")
    print(metrics_line(data))
    return 0


def _run_detect(args: argparse.Namespace) -> int:
    from lungct.errors import LungCTError
    from lungct.raypool import ray_options_from_args

    ray = ray_options_from_args(args)
    if args.scans is not None:
        return _run_detect_batch(args, ray)
    if ray is not None or args.retry_failed:
        raise LungCTError(None, "--ray and --retry-failed go with --scans (many scans)")
    from integration.pipeline import Detector, detect

    detector = Detector.load(
        args.models, runtime=args.runtime, allow_unfinished=args.allow_unfinished
    )
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
        view3d=args.view_3d,
    )
    warning = detector.model_set.warning() if detector.model_set else None
    if warning:  # after the run, so a bad input still ends in exactly one line
        print(f"warning: {warning}", file=sys.stderr)
    patient = ""
    if result.patient is not None:
        patient = f"patient malignancy score {result.patient['score']:.3f}; "
    print(
        f"{result.seriesuid}: {len(result.detections)} detections from {result.candidates} "
        f"candidates; suspicion {result.suspicion:.3f}; {patient}"
        f"{sum(result.timings.values()):.1f} s, peak {result.peak_rss_mb:.0f} MB; outputs in {args.out}"
    )
    return 0


def _run_detect_batch(args: argparse.Namespace, ray: RayOptions | None) -> int:
    from pathlib import Path

    from integration.batch import (
        DETECTIONS_FILE,
        FAILURES_FILE,
        SCANS_DIR,
        BatchOptions,
        run_batch,
    )

    options = BatchOptions(
        models=args.models,
        runtime=args.runtime,
        threshold=args.threshold,
        tta=args.tta,
        report=not args.no_report,
        view3d=args.view_3d,
        allow_training_scans=args.allow_training_scans,
        allow_unfinished=args.allow_unfinished,
        retry_failed=args.retry_failed,
    )
    result = run_batch(args.scans, args.out, options, ray=ray)
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    done = len(result.done_now) + len(result.done_before)
    failed = len(result.failed) + len(result.failed_before)
    print(
        f"{result.scans} scans: {done} done ({len(result.done_now)} now, "
        f"{len(result.done_before)} earlier), {failed} failed; {result.detections} detections "
        f"in {DETECTIONS_FILE}; {result.seconds:.1f} s"
    )
    out = Path(args.out)
    print(f"detections: {out / DETECTIONS_FILE}")
    print(f"failures: {out / FAILURES_FILE}")
    print(f"per scan: {out / SCANS_DIR}")
    return result.exit_status


def _add_detect(subparsers: argparse._SubParsersAction) -> None:
    from lungct.raypool import add_ray_arguments

    p = subparsers.add_parser(
        "detect",
        help="run the whole detector on one scan, or on many (--scans)",
        description=(
            "Preprocess -> lung mask -> U-Net candidates -> MGI-CNN scores. With --scan: writes "
            "detections.csv (seriesuid,coordX,coordY,coordZ,probability,diameter_mm; world mm), "
            "summary.json and report.html with its figures into --out. With --scans (a folder "
            "of scans, or a CSV listing them): each scan's outputs go to OUT/scans/<seriesuid>/, "
            "all detections to OUT/detections.csv (LUNA16 submission format), the scans that "
            "failed to OUT/failures.csv with their reasons; a re-run skips finished scans. "
            "Exit status with --scans: 0 every scan done, 1 some failed, 2 bad input."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--scan", help=".mhd/.mha/.nii(.gz) or a DICOM series folder")
    source.add_argument(
        "--scans",
        help="many scans: a folder (searched with its subfolders; each folder of DICOM files "
        "is one series) or a CSV of scan paths",
    )
    p.add_argument(
        "--models",
        help="model set folder (modelset.json, unet/, fpr/, pipeline.json); default: the set "
        "shipped with the suite",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=fraction, help="report crops at or above this probability")
    p.add_argument("--tta", action="store_true", help="test-time augmentation of the scores")
    p.add_argument("--no-report", action="store_true", help="only detections.csv + summary.json")
    p.add_argument(
        "--view-3d",
        action="store_true",
        help="add the lungs in 3-D with the marks to the report (view3d.png, about 0.2 s)",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="where the U-Net runs: onnx (ONNX Runtime, float32), int8 (the set's 8-bit copy "
        "of the U-Net, the fastest on a CPU), keras, or auto (int8 where the set has one, else "
        "onnx, on a CPU; keras on a GPU; default, or the LUNGCT_RUNTIME variable)",
    )
    p.add_argument(
        "--allow-training-scans",
        action="store_true",
        help="run on a scan the MGI-CNN was trained on (its scores are then optimistic)",
    )
    p.add_argument("--allow-unfinished", action="store_true", help=_ALLOW_UNFINISHED)
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --scans: run the scans of OUT/failures.csv again (a re-run skips them)",
    )
    add_ray_arguments(p, "with --scans: detect each scan")
    p.set_defaults(func=_run_detect)


def _run_demo(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from integration.demo import DemoConfig, run_demo

    config = DemoConfig(
        eval_scans=args.eval_scans,
        eval_nodules_per_scan=args.eval_nodules_per_scan,
        eval_seed=args.eval_seed,
        short_run=not args.no_short_run,
        scans=args.scans,
        seed=args.seed,
        unet_minutes=args.unet_minutes,
        gan=not args.no_gan,
        gan_minutes=args.gan_minutes,
        fpr_minutes=args.fpr_minutes,
        tta=args.tta,
    )
    summary = run_demo(args.out, config, models_dir=args.models)
    for part in ("shipped", "short_run"):
        if part in summary:
            s = summary[part]
            ci = s.get("cpm_ci95") or [float("nan")] * 2
            print(
                f"{part}: CPM {s['cpm']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}), "
                f"{s['detected']}/{s['nodules']} nodules in {s['scans']} scans: {s['what']}"
            )
    if "report" in summary:
        print(f"report: {summary['report']['html']}")
    print(f"summary: {Path(args.out) / 'summary.json'}")
    brief = {
        part: {k: summary[part][k] for k in ("cpm", "cpm_ci95", "nodules", "detected")}
        for part in ("shipped", "short_run")
        if part in summary
    }
    print(json.dumps({**brief, "total_seconds": summary["total_seconds"]}))
    return 0


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the shipped detector measured on fresh synthetic scans, then every stage trained",
        description=(
            "Three parts, about 10 minutes on 2 CPU cores. (1) The shipped model set measured "
            "on a freshly generated full-size synthetic test set (--eval-scans scans with "
            "--eval-nodules-per-scan nodules each): CPM with its bootstrap interval, "
            "shipped/evaluation/froc.png. (2) The shipped detector's report on one of those "
            "scans: report/report.html. (3) A short training of every stage (U-Net, CT-GAN, "
            "augmentation, MGI-CNN) on --scans small synthetic scans, tested on their subsets "
            "8-9: short_run/ (its models/ is usable with `detect --models`); its number is "
            "a short run's, reported apart. summary.json has both. Rerunning the same --out "
            "reuses its data and models."
        ),
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--models", default=None, help="model set to measure in parts 1-2 (default: the shipped)"
    )
    p.add_argument(
        "--eval-scans",
        type=non_negative_int,
        default=10,
        help="full-size test scans for the shipped set (default 10; 0 skips parts 1-2)",
    )
    p.add_argument(
        "--eval-nodules-per-scan",
        type=non_negative_int,
        default=15,
        help="nodules in each test scan (default 15)",
    )
    p.add_argument(
        "--eval-seed",
        type=non_negative_int,
        default=5000,
        help="test set's random seed (default 5000)",
    )
    p.add_argument("--no-short-run", action="store_true", help="skip part 3 (the trainings)")
    p.add_argument(
        "--scans", type=positive_int, default=20, help="short run: small scans (default 20)"
    )
    p.add_argument(
        "--seed", type=non_negative_int, default=0, help="short run: data seed (default 0)"
    )
    p.add_argument(
        "--unet-minutes", type=positive_float, default=1.0, help="short run: U-Net budget (1.0)"
    )
    p.add_argument(
        "--gan-minutes", type=positive_float, default=0.75, help="short run: CT-GAN budget (0.75)"
    )
    p.add_argument(
        "--fpr-minutes", type=positive_float, default=1.25, help="short run: MGI-CNN budget (1.25)"
    )
    p.add_argument("--no-gan", action="store_true", help="short run: no CT-GAN augmentation")
    p.add_argument("--tta", action="store_true", help="short run: test-time augmentation")
    p.set_defaults(func=_run_demo)


def _settings_from_args(args: argparse.Namespace) -> StageSettings:
    """Stage settings: ``--settings FILE`` (JSON), then the explicit flags on top."""

    from integration.stages import StageSettings

    values: dict = {}
    if args.settings:
        values = read_json(args.settings, "settings file not found")
    settings = StageSettings.from_dict(values, source=args.settings)
    return settings.replace(
        unet_preset=args.unet_preset,
        unet_minutes=args.unet_minutes,
        gan_minutes=args.gan_minutes,
        fpr_minutes=args.fpr_minutes,
        fpr_plan=args.fpr_plan,
        gan=False if args.no_gan else None,
        tta=True if args.tta else None,
    )


def _add_stage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--settings",
        help="JSON file of stage settings (the keys of an ablation config, e.g. "
        '{"unet_minutes": 1, "fpr_overrides": {"epochs": 2}}); the flags below override it',
    )
    p.add_argument(
        "--unet-preset", choices=("2d", "2d-original", "3d"), help="U-Net preset (default 2d)"
    )
    p.add_argument("--unet-minutes", type=positive_float, help="U-Net budget per fold (3)")
    p.add_argument("--gan-minutes", type=positive_float, help="CT-GAN budget per fold (2)")
    p.add_argument("--fpr-minutes", type=positive_float, help="MGI-CNN budget per fold (4)")
    p.add_argument("--no-gan", action="store_true", help="skip the CT-GAN augmentation")
    p.add_argument(
        "--fpr-plan", help="MGI-CNN plan: default, default_adam, default_3d, paper, code or a JSON"
    )
    p.add_argument("--tta", action="store_true", help="test-time augmentation of the scores")


def _run_crossval(args: argparse.Namespace) -> int:
    from integration.crossval import CrossvalConfig, run_crossval
    from lungct.tables import parse_folds

    folds = tuple(parse_folds(args.folds)) if args.folds else None
    config = CrossvalConfig(
        folds=folds,
        settings=_settings_from_args(args),
        bootstrap=args.bootstrap,
        workers=args.workers,
        progress=not args.quiet,
    )
    summary = run_crossval(args.data, args.cache, args.out, config)
    ci = summary["cpm_ci95"]
    print(
        f"cross-validated CPM {summary['cpm']:.4f}"
        + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")
        + f" over {len(summary['folds'])} folds, {summary['scans']} scans, "
        f"{summary['detected']}/{summary['nodules']} nodules detected"
    )
    print(f"summary: {args.out}/summary.json; FROC: {summary['figures']['froc']}")
    return 0


def _add_crossval(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "crossval",
        help="cross-validate every stage over the LUNA16 subsets; pooled FROC/CPM",
        description=(
            "For each test fold k: train the U-Net and the MGI-CNN on the other subsets but one "
            "(the validation fold: the subset before k, k-1 mod 10), the CT-GAN on the training "
            "subsets only; extract and score the candidates of subset k (OUT/fold<k>/"
            "submission.csv, manifest.json with the train/val/test series). Then the folds are "
            "pooled and evaluated once: OUT/evaluation (metrics.json, froc.png), per_fold.csv, "
            "summary.json. Rerunning the same --out resumes: finished folds are skipped, a "
            "half-done fold continues from its checkpoints."
        ),
    )
    p.add_argument("--data", required=True, help="LUNA16-layout folder (subsetK/*.mhd + tables)")
    p.add_argument("--cache", required=True, help="per-scan cache (prepared when missing)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--folds", help="test folds to run, e.g. 0-9 or 3,7 (default: every subset with scans)"
    )
    _add_stage_options(p)
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=1000,
        help="bootstrap resamples of the pooled evaluation (default 1000)",
    )
    p.add_argument(
        "--workers", type=positive_int, default=2, help="processes for cache preparation (2)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_crossval)


def _run_ablate(args: argparse.Namespace) -> int:
    from integration.ablate import run_ablation
    from integration.stages import Split
    from lungct.tables import parse_folds

    split = Split(
        tuple(parse_folds(args.train_folds)),
        tuple(parse_folds(args.val_folds)) if args.val_folds else (),
        tuple(parse_folds(args.test_folds)),
    )
    only = [n.strip() for n in args.configs.split(",") if n.strip()] if args.configs else None
    results = run_ablation(
        args.data,
        args.out,
        args.grid,
        cache_dir=args.cache,
        split=split,
        bootstrap=args.bootstrap,
        only=only,
        workers=args.workers,
        progress=not args.quiet,
        seeds=args.seeds,
    )
    for r in results:
        ci = r["metrics"].get("cpm_ci95")
        print(
            f"{r['name']}: CPM {r['metrics']['cpm']:.4f}"
            + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")
        )
    print(
        f"table: {args.out}/ablation.md, {args.out}/ablation.csv; FROC: {args.out}/ablation_froc.png"
    )
    return 0


def _add_ablate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ablate",
        help="run the named configurations of a grid; CPM table and one FROC figure",
        description=(
            'A grid JSON {"base": {...}, "configs": {"name": {overrides}}} names configurations '
            "(keys: unet_preset, gan, fpr, fpr_plan, fpr_variant, merge, tta, "
            "unet_minutes, gan_minutes, fpr_minutes, ...). All use the same folds; trained "
            "stages are shared between configs that agree on their settings (OUT/stages). "
            "Writes OUT/ablation.md and .csv (CPM, 95% CI, the paired difference to the first "
            "config, the spread over training seeds, sensitivity at 1/8..8 FPs/scan, the "
            "stage-1 network's own sensitivity at 10..100 candidates/scan), OUT/comparison/, "
            "OUT/ablation_froc.png and OUT/convergence.png (validation loss per epoch of "
            "every trained stage). Rerunning resumes: evaluated configs are skipped; "
            "the table holds every config of the grid found evaluated in OUT/configs."
        ),
    )
    p.add_argument("--data", required=True, help="LUNA16-layout folder (subsetK/*.mhd + tables)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--grid",
        default="default",
        help="grid JSON, or a grid shipped in integration/data: default (every ablation, the "
        "default), quick (5 configs, ~10 min on the 20-scan synthetic set) or rank (every "
        "ablation, each training a fixed number of epochs, so that runs resumed over several "
        "sittings train alike; hours per seed on 2 CPU cores)",
    )
    p.add_argument("--cache", help="per-scan cache (default OUT/cache; prepared when missing)")
    p.add_argument("--configs", help="run only these configs (comma-separated names)")
    p.add_argument("--train-folds", default="0-6", help="training folds (default 0-6)")
    p.add_argument("--val-folds", default="7", help="validation folds (default 7)")
    p.add_argument("--test-folds", default="8-9", help="test folds (default 8-9)")
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=1000,
        help="bootstrap resamples per config (default 1000)",
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help="train every config with random seeds 0 .. N-1 and report the spread over them "
        "(default: the grid's 'seeds': 3 in default and rank, 1 in quick)",
    )
    p.add_argument(
        "--workers", type=positive_int, default=2, help="processes for cache preparation (2)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_ablate)


def _run_export(args: argparse.Namespace) -> int:
    from integration.export import export_models

    manifest = export_models(args.models, args.out, args.format)
    for name, info in manifest["models"].items():
        shapes = ", ".join(f"{i['name']} {i['shape']}" for i in info["inputs"])
        print(f"{name}: {args.out}/{info['path']} (inputs: {shapes})")
    print(f"manifest: {args.out}/export_manifest.json")
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    from integration.export import FORMATS

    p = subparsers.add_parser(
        "export",
        help="export the networks of a models folder (SavedModel or ONNX)",
        description=(
            "Load MODELS/unet, MODELS/fpr (and an ensemble's fpr2/ ..., whose scores are to be "
            "averaged) and MODELS/malignancy (Keras safe mode) and export their forward passes "
            "for deployment: TensorFlow SavedModel (OUT/unet/saved_model, OUT/fpr/saved_model) "
            "or ONNX (OUT/unet/model.onnx, ...; needs the tf2onnx and onnx packages). The plan "
            "JSONs are copied beside them and OUT/export_manifest.json lists every model's "
            "input and output names and shapes."
        ),
    )
    p.add_argument("--models", required=True, help="models folder (unet/, fpr/ ..., pipeline.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--format", choices=FORMATS, default="saved_model", help="saved_model (default) or onnx"
    )
    p.set_defaults(func=_run_export)


def _run_modelset(args: argparse.Namespace) -> int:
    from integration.modelset import MODEL_CARD_FILE, MODELSET_FILE, write_model_set

    def text(path: str | None) -> str:
        if path is None:
            return ""
        from pathlib import Path

        try:
            return Path(path).read_text()
        except OSError as exc:
            from lungct.errors import LungCTError

            raise LungCTError(path, f"cannot be read ({exc.strerror})") from None

    model_set = write_model_set(
        args.models,
        name=args.name,
        version=args.version,
        description=args.description,
        performance=text(args.performance),
        limitations=text(args.limitations),
    )
    print(
        f"{model_set.name}: stages {', '.join(model_set.stages)}; trained "
        f"{model_set.train_seconds / 3600:.2f} h on {model_set.trained_on}"
        + ("; demo-grade" if model_set.demo_grade else "")
    )
    print(f"wrote {args.models}/{MODELSET_FILE} and {args.models}/{MODEL_CARD_FILE}")
    return 0


def _add_modelset(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "modelset",
        help="describe a folder of trained stages as a model set for `detect --models`",
        description=(
            "Check the sealed stage folders in --models (unet/ required, fpr/ and malignancy/ "
            "optional, fpr2/ .. fpr9/ further MGI-CNNs whose mean is the score: each trained to "
            "its end, so its manifest holds a sha256 per file) and write "
            "modelset.json and MODEL_CARD.md (intended use, training data and time from the "
            "manifests, the measured numbers you pass with --performance)."
        ),
    )
    p.add_argument("--models", required=True, help="folder holding unet/ (and fpr/, malignancy/)")
    p.add_argument("--name", required=True, help="name of the set")
    p.add_argument("--version", default="", help="version of the set")
    p.add_argument("--description", default="", help="one paragraph for the card")
    p.add_argument("--performance", help="Markdown file of measured numbers for the card")
    p.add_argument("--limitations", help="Markdown file of known limitations for the card")
    p.set_defaults(func=_run_modelset)


def _run_train_models(args: argparse.Namespace) -> int:
    import json

    from integration.recipe import BackgroundScan, Recipe, train_models

    background = None
    if args.background:
        background = BackgroundScan(
            args.background,
            args.background_annotations,
            args.background_excluded,
            args.background_has_no_findings,
        )
    summary = train_models(
        Recipe.load(args.recipe), args.out, progress=not args.quiet, background=background
    )
    held = summary["heldout"]
    print(
        f"model set: {args.out}/models ({summary['model_set']['name']}, trained "
        f"{summary['model_set']['train_hours']:g} h); held-out subset check: CPM "
        f"{held['cpm']:.3f} on {held['nodules']} nodules"
    )
    print(json.dumps({"seconds": summary["seconds"], "heldout": held}))
    return 0


def _add_train_models(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-models",
        help="train a model set from nothing with one recipe",
        description=(
            "Generate the recipe's synthetic data, prepare its cache, train the U-Net, the "
            "CT-GAN (training folds), augment the training folds, train the MGI-CNN, check the "
            "set on the recipe's held-out subset and write OUT/models as a model set "
            "(modelset.json, MODEL_CARD.md, sealed stage folders). Rerunning the same command "
            "resumes where it stopped. Uses a GPU when TensorFlow sees one."
        ),
    )
    p.add_argument(
        "--recipe",
        default="suite-default",
        help="a recipe shipped in integration/data/recipes (suite-default) or a JSON file",
    )
    p.add_argument("--out", required=True, help="output folder (data, cache, models, heldout)")
    p.add_argument(
        "--background",
        metavar="SCAN",
        help="the real scan of the recipe's background part (its copies join the training folds)",
    )
    p.add_argument("--background-annotations", metavar="CSV", help="LUNA16 annotations.csv")
    p.add_argument("--background-excluded", metavar="CSV", help="LUNA16 annotations_excluded.csv")
    p.add_argument(
        "--background-has-no-findings",
        action="store_true",
        help="the background scan has no finding (instead of the two tables)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train_models)


def _run_evaluate_models(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from integration.evaluation import metrics_line
    from integration.modelset import SHIPPED_MODELS
    from integration.recipe import evaluate_model_set

    result = evaluate_model_set(
        args.models or SHIPPED_MODELS,
        args.data,
        args.cache,
        args.out,
        bootstrap=args.bootstrap,
        workers=args.workers,
        progress=not args.quiet,
        allow_unfinished=args.allow_unfinished,
    )
    ci = result.bootstrap.cpm_ci if result.bootstrap is not None else None
    print(
        f"{result.label}: CPM {result.cpm:.4f}"
        + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci is not None else "")
        + f", {result.detected}/{result.nodules} nodules detected in {result.scans} scans"
    )
    small = json.loads((Path(args.out) / "evaluation" / "by_size.json").read_text())
    for band, row in small.items():
        if row["nodules"]:
            print(
                f"  {band}: {row['nodules']} nodules, sensitivity {row['1']:.3f} at 1 FP/scan, "
                f"{row['4']:.3f} at 4, {row['any']:.3f} with any mark"
            )
    print(metrics_line(result.to_json()))
    if args.report_threshold is not None:
        from integration.modelset import fpr_stages, read_model_set
        from integration.recipe import threshold_on_submission
        from integration.stages import fold_uids
        from lungct.fileio import write_json_atomic

        out = Path(args.out)
        stages = read_model_set(args.models or SHIPPED_MODELS).stages
        # The file evaluate_model_set scored: the candidates of a set without an MGI-CNN.
        submission = out / ("submission.csv" if fpr_stages(stages) else "candidates.csv")
        uids = fold_uids(Path(args.data), list(range(10)))
        operating = threshold_on_submission(args.data, submission, uids, args.report_threshold)
        write_json_atomic(out / "report_threshold.json", operating)
        print(
            f"report threshold {operating['threshold']:.4f}: "
            f"{operating['false_positives_per_scan']:.2f} false positives per scan, "
            f"sensitivity {operating['sensitivity']:.3f} on {operating['nodules']} nodules "
            f"in {operating['scans']} scans"
        )
    return 0


def _add_evaluate_models(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate-models",
        help="measure a model set on a data set it never trained on",
        description=(
            "Candidates and the set's scores (MGI-CNN, mixed with the U-Net's probability where "
            "its pipeline.json says so) for every scan of --data (all subsets), then the "
            "exact LUNA16 evaluation: OUT/candidates.csv, OUT/submission.csv, "
            "OUT/evaluation (metrics.json with the CPM's bootstrap interval, froc.png). A scan "
            "the set trained on is refused."
        ),
    )
    p.add_argument("--models", default=None, help="model set folder (default: the shipped set)")
    p.add_argument("--data", required=True, help="LUNA16-layout folder to measure on")
    p.add_argument("--cache", required=True, help="its per-scan cache (prepared when missing)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--bootstrap", type=non_negative_int, default=1000, help="bootstrap resamples (1000)"
    )
    p.add_argument("--allow-unfinished", action="store_true", help=_ALLOW_UNFINISHED)
    p.add_argument(
        "--report-threshold",
        type=positive_float,
        default=None,
        metavar="FPS",
        help="also choose a report threshold on these scans: the lowest score leaving at most "
        "FPS false positives per scan (marks on excluded findings not counted), never below "
        "0.5; written to OUT/report_threshold.json (e.g. 1 on validation scans, then put it "
        "in the set's pipeline.json)",
    )
    p.add_argument(
        "--workers", type=positive_int, default=2, help="processes for cache preparation (2)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_evaluate_models)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per verb."""
    parser = argparse.ArgumentParser(
        prog="python -m integration", description="Lung-nodule suite: integration commands."
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    _add_evaluate(subparsers)
    _add_compare(subparsers)
    _add_detect(subparsers)
    _add_demo(subparsers)
    _add_crossval(subparsers)
    _add_ablate(subparsers)
    _add_export(subparsers)
    _add_modelset(subparsers)
    _add_train_models(subparsers)
    _add_evaluate_models(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
