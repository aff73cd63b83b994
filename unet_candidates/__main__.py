"""``python -m unet_candidates <verb>``: train, extract, quantize.

``train --preset centernet`` (or a CenterNet ``--plan``) trains the CenterNet heatmap
detector (:mod:`unet_candidates.centernet`) instead of a U-Net; ``extract`` reads either kind
of model folder.

Every verb has ``--help``. A bad input prints one line ``error: <file>: <problem>`` on stderr
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from lungct.cli import (
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
)
from lungct.errors import LungCTError
from lungct.training import add_device_arguments
from unet_candidates.centernet.config import CENTERNET_PRESETS
from unet_candidates.config import PRESETS


def _plan_from_args(args: argparse.Namespace):
    from unet_candidates.centernet.config import (
        CenterNetPlan,
        centernet_preset_plan,
        is_centernet_plan,
    )
    from unet_candidates.config import UNetPlan, preset_plan

    centernet = args.preset in CENTERNET_PRESETS or (args.plan and is_centernet_plan(args.plan))
    if centernet:
        if args.plan and not is_centernet_plan(args.plan):
            raise LungCTError(args.plan, f"plan is a U-Net's, not preset {args.preset!r}")
        if args.plan and args.preset and args.preset not in CENTERNET_PRESETS:
            raise LungCTError(args.plan, f"plan is a CenterNet's, not preset {args.preset!r}")
        plan = CenterNetPlan.load(args.plan) if args.plan else centernet_preset_plan(args.preset)
    elif args.plan:
        plan = UNetPlan.load(args.plan)
        if args.preset and preset_plan(args.preset).dims != plan.dims:
            raise LungCTError(
                args.plan, f"plan is a {plan.dims} network, not preset {args.preset!r}"
            )
    else:
        plan = preset_plan(args.preset or "2d")
    overrides = {
        "epochs": args.epochs,
        "steps_per_epoch": args.steps_per_epoch,
        "seed": args.seed,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        plan = type(plan).from_dict({**plan.to_dict(), **overrides})
    return plan


def _train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lungct.tables import parse_folds
    from unet_candidates.centernet.config import CenterNetPlan, is_centernet_plan
    from unet_candidates.centernet.train import train as train_centernet
    from unet_candidates.train import train as train_unet

    folds = parse_folds(args.folds)
    val_folds = parse_folds(args.val_folds) if args.val_folds.strip() else []
    explicit = args.plan or args.preset or args.epochs or args.steps_per_epoch or args.seed
    if args.resume and not explicit and args.strategy == "multiworker":
        raise LungCTError(
            args.out,
            "--strategy multiworker --resume needs the plan on every worker (--plan or "
            "--preset): only the chief reads --out",
        )
    plan = None if (args.resume and not explicit) else _plan_from_args(args)
    if plan is None:  # resuming: the folder's plan says which network it trains
        centernet = is_centernet_plan(Path(args.out))
    else:
        centernet = isinstance(plan, CenterNetPlan)
    train = train_centernet if centernet else train_unet
    summary = train(
        plan,
        args.data,
        args.cache,
        folds,
        val_folds,
        args.out,
        annotations=args.annotations,
        excluded=args.excluded,
        resume=args.resume,
        max_minutes=args.max_minutes,
        progress=not args.quiet,
        prepare_workers=args.workers,
        strategy=args.strategy,
        mixed_precision=args.mixed_precision,
    )
    print(json.dumps(summary))
    return 0


def _extract(args: argparse.Namespace) -> int:
    from unet_candidates.extract import extract_paths

    if bool(args.scan) == bool(args.data):
        raise LungCTError(None, "give either --data DIR --folds F or --scan PATH")
    if args.data and not args.folds:
        raise LungCTError(args.data, "--data needs --folds (e.g. --folds 9)")
    summary = extract_paths(
        model_dir=args.model,
        out_csv=args.out,
        data_dir=args.data,
        folds=args.folds,
        scans=args.scan,
        cache_dir=args.cache,
        prob_map_dir=args.prob_maps,
        threshold=args.threshold,
        max_candidates=args.max_candidates,
        nms_radius_mm=args.nms_radius,
        test_time_flips=args.test_time_flips,
        runtime=args.runtime,
        progress=not args.quiet,
        allow_unfinished=args.allow_unfinished,
    )
    for message in summary["failed"].values():
        print(f"error: {message}", file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "scans"}))
    if summary["failed"]:
        return 2 if not summary["scans"] else 1
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from lungct.cache import ScanCache, find_scans
    from lungct.io import read_scan
    from unet_candidates.quantize import quantize_model_dir

    if bool(args.scan) == bool(args.data):
        raise LungCTError(None, "give either --data DIR --folds F or --scan PATH")
    if args.data and not args.folds:
        raise LungCTError(args.data, "--data needs --folds (e.g. --folds 8, the validation fold)")
    loaders = []
    if args.data:
        from lungct.tables import parse_folds

        cache = ScanCache(args.cache) if args.cache else None
        for f in find_scans(args.data, parse_folds(args.folds)):
            if cache is not None and cache.is_complete(f.seriesuid):
                loaders.append(lambda uid=f.seriesuid: cache.open(uid))
            else:
                loaders.append(lambda p=f.path: read_scan(p))
        if not loaders:
            raise LungCTError(args.data, f"no scans in folds {args.folds}")
    for path in args.scan or ():
        loaders.append(lambda p=path: read_scan(p))
    record = quantize_model_dir(
        args.model,
        loaders,
        len(loaders),
        batches=args.batches,
        seed=args.seed,
        allow_unfinished=args.allow_unfinished,
    )
    print(json.dumps(record))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="python -m unet_candidates",
        description="Stage 1 of the nodule detector: U-Net (or CenterNet) candidate extraction.",
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser(
        "train",
        help="train a 2-D or 3-D U-Net (or the CenterNet detector) from the per-scan cache",
        description="Train a candidate U-Net, or the CenterNet heatmap detector (--preset "
        "centernet). Writes OUT/plan.json, manifest.json, model.keras, checkpoints/ (one per "
        "epoch; --resume continues) and logs/ (train_log.csv, TensorBoard).",
    )
    p.add_argument(
        "--data", required=True, help="LUNA16-layout folder (subset0..9, annotations.csv)"
    )
    p.add_argument("--cache", required=True, help="per-scan cache (missing entries are prepared)")
    p.add_argument("--folds", default="0-7", help="training subsets (default 0-7)")
    p.add_argument("--val-folds", default="8", help="validation subsets (default 8; '' = none)")
    p.add_argument("--out", required=True, help="model folder")
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS) + sorted(CENTERNET_PRESETS),
        help="named plan (default 2d; centernet* train the CenterNet heatmap detector)",
    )
    p.add_argument("--plan", help="plan JSON (a preset's defaults + any overridden fields)")
    p.add_argument("--annotations", help="nodule table (default DATA/annotations.csv)")
    p.add_argument(
        "--excluded",
        help="findings the loss ignores (default DATA/annotations_excluded.csv; '' = none)",
    )
    p.add_argument("--epochs", type=positive_int, help="override the plan's epochs")
    p.add_argument(
        "--steps-per-epoch", type=positive_int, help="override the plan's steps per epoch"
    )
    p.add_argument("--seed", type=non_negative_int, help="override the plan's seed")
    p.add_argument(
        "--max-minutes",
        type=positive_float,
        help="this run's time budget: stop after this much training wall time (the epoch under "
        "way ends and is checkpointed)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue the folder's training to the plan's end"
    )
    p.add_argument("--workers", type=positive_int, default=2, help="processes preparing the cache")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_device_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "extract",
        help="write nodule candidates (CSV, world mm) of scans",
        description="Extract candidates: seriesuid,coordX,coordY,coordZ,probability,diameter_mm. "
        "Also writes OUT's resolved plan (<out>.plan.json) and a per-scan summary "
        "(<out>.summary.json).",
    )
    p.add_argument("--data", help="LUNA16-layout folder (with --folds)")
    p.add_argument("--folds", help="subsets of --data to process, e.g. 9 or 8-9")
    p.add_argument("--cache", help="per-scan cache to read prepared scans from (optional)")
    p.add_argument(
        "--scan", action="append", help=".mhd/.nii(.gz) file or DICOM folder (repeatable)"
    )
    p.add_argument(
        "--model", required=True, help="model folder (plan.json + model.keras; U-Net or CenterNet)"
    )
    p.add_argument("--out", required=True, help="candidates CSV")
    p.add_argument("--prob-maps", help="folder for <seriesuid>_prob.mhd probability maps")
    p.add_argument("--threshold", type=fraction, help="override the plan's probability threshold")
    p.add_argument(
        "--max-candidates", type=non_negative_int, help="override the per-scan cap (0 = none)"
    )
    p.add_argument(
        "--nms-radius", type=non_negative_float, help="override the NMS merge radius (mm)"
    )
    p.add_argument(
        "--test-time-flips",
        type=int,
        choices=(0, 1, 2, 3),
        help="override the plan's in-plane flips averaged at extraction (each one more pass)",
    )
    p.add_argument(
        "--runtime",
        choices=("auto", "keras", "onnx", "int8"),
        help="where the U-Net runs: onnx (ONNX Runtime, float32), int8 (the folder's 8-bit "
        "copy in ONNX Runtime, the fastest on a CPU), keras, or auto (int8 where the folder "
        "has a fitting copy, else onnx, on a CPU; keras on a GPU and for a CenterNet; default, "
        "or the LUNGCT_RUNTIME variable)",
    )
    p.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="use a model folder whose training has not ended (its last saved weights)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_extract)

    p = sub.add_parser(
        "quantize",
        help="write an 8-bit copy of a 2-D U-Net for CPUs, calibrated on scans",
        description="Write MODEL/model.int8.onnx and MODEL/model.int8.json: the 2-D U-Net "
        "quantized to 8 bits (ONNX Runtime, static), its ranges measured on the extraction's "
        "inputs from the scans given. Calibrate on the training data's validation fold, never "
        "on a test set. Extraction on a CPU then uses it (runtime auto or int8).",
    )
    p.add_argument("--model", required=True, help="a trained 2-D U-Net model folder")
    p.add_argument("--data", help="LUNA16-layout folder (with --folds)")
    p.add_argument("--folds", help="subsets of --data to calibrate on, e.g. 8")
    p.add_argument("--cache", help="per-scan cache to read prepared scans from (optional)")
    p.add_argument(
        "--scan", action="append", help=".mhd/.nii(.gz) file or DICOM folder (repeatable)"
    )
    p.add_argument(
        "--batches", type=positive_int, default=24, help="batches to calibrate on (default 24)"
    )
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="use a model folder whose training has not ended (its last saved weights)",
    )
    p.set_defaults(func=_quantize)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
