"""``python -m fp_reduction_3dcnn <verb>``: train, predict, gradcam, params, plan,
malignancy-train, malignancy-evaluate.

Every verb has ``--help``. A bad input prints one line ``error: <file>: <problem>`` on stderr
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from lungct.cli import non_negative_int, positive_float, positive_int, run_command
from lungct.errors import LungCTError
from lungct.training import add_device_arguments

PAPER_PARAMS = 9_472_000
_ALLOW_UNFINISHED = (
    "use a model folder whose training has not ended (its newest checkpoint when it has no "
    "model.keras yet)"
)


def _plan(args: argparse.Namespace):
    from fp_reduction_3dcnn.config import get_plan

    return get_plan(
        args.plan,
        variant=getattr(args, "variant", None),
        merge=getattr(args, "merge", None),
        conv=getattr(args, "conv", None),
        resize=getattr(args, "resize", None),
        epochs=getattr(args, "epochs", None),
        steps_per_epoch=getattr(args, "steps_per_epoch", None),
        batch_size=getattr(args, "batch_size", None),
        seed=getattr(args, "seed", None),
    )


def _train(args: argparse.Namespace) -> int:
    from lungct.tables import parse_folds

    plan = _plan(args)
    from fp_reduction_3dcnn.train import train

    summary = train(
        plan,
        cache_dir=args.cache,
        candidates=args.candidates,
        folds=parse_folds(args.folds),
        val_folds=parse_folds(args.val_folds) if args.val_folds else [],
        test_folds=parse_folds(args.test_folds) if args.test_folds else [],
        out_dir=args.out,
        data_dir=args.data,
        annotations=args.annotations,
        excluded=args.excluded,
        resume=args.resume,
        max_minutes=args.max_minutes,
        keep_checkpoints=args.keep_checkpoints,
        progress=not args.quiet,
        strategy=args.strategy,
        mixed_precision=args.mixed_precision,
    )
    print(json.dumps(summary))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fp_reduction_3dcnn.predict import predict
    from lungct.tables import parse_folds

    summary = predict(
        args.model,
        args.cache,
        args.candidates,
        args.out,
        tta=args.tta,
        tta_z=args.tta_z,
        folds=parse_folds(args.folds) if args.folds else None,
        data_dir=args.data,
        allow_train_folds=args.allow_train_folds,
        checkpoint=args.checkpoint,
        batch_size=args.batch_size,
        progress=not args.quiet,
        allow_unfinished=args.allow_unfinished,
    )
    print(json.dumps(summary))
    return 0


def _gradcam(args: argparse.Namespace) -> int:
    from fp_reduction_3dcnn.gradcam import gradcam_figure, open_scan_for_cam
    from fp_reduction_3dcnn.predict import open_model

    trained = open_model(args.model, args.checkpoint, allow_unfinished=args.allow_unfinished)
    if not os.path.exists(args.scan):
        raise LungCTError(args.scan, "scan not found")
    scan = open_scan_for_cam(args.scan, trained.plan.cut_spacing)
    print(json.dumps(gradcam_figure(trained, scan, args.world, args.out)))
    return 0


def _params(args: argparse.Namespace) -> int:
    from fp_reduction_3dcnn.config import VARIANTS
    from fp_reduction_3dcnn.networks import build_network

    base = _plan(args)
    if base.network != "mgicnn":  # no variants: one network
        count = build_network(base).count_params()
        print(json.dumps({"plan": base.name, "network": base.network, "params": count}))
        return 0
    rows = []
    for variant in VARIANTS if args.variant is None else [args.variant]:
        plan = base.replace(variant=variant)
        count = build_network(plan).count_params()
        rows.append(
            {
                "plan": plan.name,
                "network": plan.network,
                "variant": variant,
                "merge": plan.merge,
                "conv": plan.conv,
                "params": count,
                "vs_paper": round(count / PAPER_PARAMS, 3),
            }
        )
    for row in rows:
        print(json.dumps(row))
    return 0


def _show_plan(args: argparse.Namespace) -> int:
    print(json.dumps(_plan(args).to_dict(), indent=2))
    return 0


def _malignancy_plan(args: argparse.Namespace):
    from fp_reduction_3dcnn.malignancy import MalignancyPlan
    from lungct.tables import parse_folds

    plan = MalignancyPlan.load(args.plan) if args.plan else MalignancyPlan()
    changes = {
        name: value
        for name, value in (("epochs", args.epochs), ("seed", args.seed))
        if value is not None
    }
    for name in ("train_folds", "val_folds", "test_folds"):
        text = getattr(args, name)
        if text is not None:
            changes[name] = tuple(parse_folds(text)) if text else ()
    return plan.replace(**changes) if changes else plan


def _malignancy_train(args: argparse.Namespace) -> int:
    from fp_reduction_3dcnn.malignancy import train_malignancy

    summary = train_malignancy(
        _malignancy_plan(args),
        data_dir=args.data,
        cache_dir=args.cache,
        out_dir=args.out,
        resume=args.resume,
        progress=not args.quiet,
        max_minutes=args.max_minutes,
        strategy=args.strategy,
        mixed_precision=args.mixed_precision,
    )
    print(json.dumps(summary))
    return 0


def _malignancy_evaluate(args: argparse.Namespace) -> int:
    from fp_reduction_3dcnn.malignancy import evaluate_malignancy

    metrics = evaluate_malignancy(
        args.model, args.data, args.cache, args.out, rounds=args.rounds, progress=not args.quiet
    )
    keys = ("labelled_nodules", "malignant", "benign", "cnn_auc", "cnn_auc_ci95")
    keys += ("baseline_auc", "baseline_auc_ci95", "auc_difference", "auc_difference_ci95")
    print(json.dumps({k: metrics[k] for k in (*keys, "auc_difference_p", "rating_mae")}))
    return 0


def _add_malignancy_parsers(sub) -> None:
    p = sub.add_parser(
        "malignancy-train",
        help="train the malignancy CNN on the rated nodules of nodule_attributes.csv",
        description=(
            "Train the malignancy CNN (median rating >= 4 against <= 2, 3 left out; the rating "
            "regressed too) on nodule-centred patches of the plan's training folds. A killed "
            "run continues from its last finished epoch with --resume."
        ),
    )
    p.add_argument("--data", required=True, help="LUNA16-layout folder with nodule_attributes.csv")
    p.add_argument("--cache", required=True, help="per-scan cache (python -m lungct prepare)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--plan", help="plan JSON (default: the built-in plan)")
    p.add_argument("--epochs", type=positive_int, help="epochs (plan default 30)")
    p.add_argument("--seed", type=non_negative_int, help="seed for weights and sampling")
    p.add_argument("--train-folds", help="training folds (plan default 0-5)")
    p.add_argument("--val-folds", help="validation folds (plan default 6; '' for none)")
    p.add_argument("--test-folds", help="held-out folds (plan default 7-9)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the folder's training to the plan's last epoch",
    )
    p.add_argument(
        "--max-minutes",
        type=positive_float,
        help="this run's budget: stop after the batch under way, end the epoch and seal",
    )
    add_device_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_malignancy_train)

    p = sub.add_parser(
        "malignancy-evaluate",
        help="held-out AUC of the malignancy CNN against the shape-only baseline",
        description=(
            "Score the rated nodules of the model's held-out folds; fit the shape-only "
            "baseline (logistic regression on size, sphericity, spiculation) on its training "
            "folds; write predictions.csv, metrics.json (AUCs with bootstrap intervals, the "
            "paired difference) and calibration.png."
        ),
    )
    p.add_argument("--model", required=True, help="model folder written by malignancy-train")
    p.add_argument("--data", required=True, help="LUNA16-layout folder with nodule_attributes.csv")
    p.add_argument("--cache", required=True, help="per-scan cache holding its scans")
    p.add_argument("--out", required=True, help="folder to write the results into")
    p.add_argument("--rounds", type=positive_int, default=2000, help="bootstrap rounds")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_malignancy_evaluate)


def _add_plan_args(p: argparse.ArgumentParser, training: bool = False) -> None:
    from fp_reduction_3dcnn.config import CONV_MODES, MERGES, PLANS, RESIZE_MODES, VARIANTS

    p.add_argument(
        "--plan",
        default="default",
        help=f"named plan ({', '.join(PLANS)}; resnet3d and cnn3d train the other networks) "
        "or JSON",
    )
    p.add_argument("--variant", choices=VARIANTS, help="MGI-CNN variant (default: the plan's)")
    p.add_argument(
        "--merge", choices=MERGES, help="how the two streams are merged (default: the plan's)"
    )
    p.add_argument("--conv", choices=CONV_MODES, help="2.5d (slices as channels) or 3d")
    if training:
        p.add_argument("--resize", choices=RESIZE_MODES, help="nearest (paper) or cubic (code)")
        p.add_argument("--epochs", type=positive_int, help="epochs (plan default 40)")
        p.add_argument(
            "--steps-per-epoch", type=non_negative_int, help="steps per epoch (0 = all negatives)"
        )
        p.add_argument("--batch-size", type=positive_int, help="batch size (plan default 128)")
        p.add_argument("--seed", type=non_negative_int, help="seed for weights and sampling")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="python -m fp_reduction_3dcnn",
        description="False-positive reduction with the MGI-CNN (or, by plan, a 3-D ResNet or a "
        "small 3-D CNN): train, predict, Grad-CAM.",
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train on some folds, monitor on others")
    p.add_argument("--data", help="LUNA16-layout folder (subset0..9); defines the folds")
    p.add_argument("--cache", required=True, help="per-scan cache (python -m lungct prepare)")
    p.add_argument(
        "--candidates", required=True, help="candidates CSV (with class, or see --annotations)"
    )
    p.add_argument("--annotations", help="label candidates by the hit rule against this table")
    p.add_argument(
        "--excluded",
        help="annotations_excluded.csv: leave negatives on irrelevant findings out of training",
    )
    p.add_argument("--folds", required=True, help="training folds, e.g. 0-7")
    p.add_argument("--val-folds", help="validation folds, e.g. 8")
    p.add_argument("--test-folds", help="folds declared held out (checked, recorded)")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the folder's training to the plan's last epoch (after a kill, from the "
        "epoch under way; after --max-minutes, from where it stopped)",
    )
    p.add_argument(
        "--max-minutes",
        type=positive_float,
        help="this run's budget: stop after the batch under way, end the epoch and seal",
    )
    p.add_argument(
        "--keep-checkpoints", type=non_negative_int, default=0, help="keep the newest N (0 = all)"
    )
    add_device_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_plan_args(p, training=True)
    p.set_defaults(func=_train)

    p = sub.add_parser("predict", help="score candidates; write a LUNA16 submission CSV")
    p.add_argument("--cache", required=True, help="per-scan cache holding the scans")
    p.add_argument("--candidates", required=True, help="candidates CSV")
    p.add_argument("--model", required=True, help="model folder written by train")
    p.add_argument("--out", required=True, help="submission CSV to write")
    p.add_argument("--tta", action="store_true", help="average over 4 rotations x flip (8)")
    p.add_argument("--tta-z", action="store_true", help="also over z flips (16 passes)")
    p.add_argument("--folds", help="score only these folds, e.g. 9")
    p.add_argument("--data", help="LUNA16-layout folder to take folds from (default: cache)")
    p.add_argument(
        "--allow-train-folds", action="store_true", help="score the model's own training folds"
    )
    p.add_argument("--checkpoint", help="checkpoint name (e.g. epoch_010) instead of model.keras")
    p.add_argument(
        "--batch-size", type=positive_int, default=256, help="candidates per forward pass"
    )
    p.add_argument("--allow-unfinished", action="store_true", help=_ALLOW_UNFINISHED)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)

    p = sub.add_parser("gradcam", help="PNG of the Grad-CAM heat map of one candidate")
    p.add_argument("--scan", required=True, help="scan file (.mhd, ...) or a cache entry folder")
    p.add_argument(
        "--world", required=True, type=float, nargs=3, metavar=("X", "Y", "Z"), help="world mm"
    )
    p.add_argument("--model", required=True, help="model folder written by train")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--checkpoint", help="checkpoint name instead of model.keras")
    p.add_argument("--allow-unfinished", action="store_true", help=_ALLOW_UNFINISHED)
    p.set_defaults(func=_gradcam)

    p = sub.add_parser(
        "params",
        help="parameter count of each MGI-CNN variant (vs the paper's 9,472,000), or of the "
        "plan's other network",
    )
    _add_plan_args(p)
    p.set_defaults(func=_params)

    p = sub.add_parser("plan", help="print a plan as JSON (to edit and pass with --plan)")
    _add_plan_args(p, training=True)
    p.set_defaults(func=_show_plan)
    _add_malignancy_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
