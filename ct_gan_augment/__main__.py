"""``python -m ct_gan_augment <verb>``: train, inject, remove, augment.

Every verb has ``--help``. A bad input prints one line ``error: <file>: <problem>`` on stderr
and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lungct.cli import (
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
    run_command,
)
from lungct.errors import LungCTError
from lungct.training import add_device_arguments

_ALLOW_UNFINISHED = "use an injector or remover whose training has not ended (its last checkpoint)"


def _folds(text: str) -> list[int]:
    from lungct.tables import parse_folds

    return parse_folds(text)


def _plan(args: argparse.Namespace):
    from ct_gan_augment.config import get_plan, parse_plan_overrides

    changes = parse_plan_overrides(args.set)
    if args.plan is None and not changes:
        return None
    return get_plan(args.plan or "default", **changes)


def _train(args: argparse.Namespace) -> int:
    from ct_gan_augment.train import train_gan

    plan = _plan(args)
    if args.resume and plan is None and args.strategy == "multiworker":
        raise LungCTError(
            args.out,
            "--strategy multiworker --resume needs the plan on every worker (--plan): only "
            "the chief reads --out",
        )
    summary = train_gan(
        args.data,
        args.cache,
        _folds(args.folds),
        args.kind,
        args.out,
        plan=plan,
        annotations=args.annotations,
        excluded=args.excluded,
        resume=args.resume,
        steps=args.steps,
        max_minutes=args.max_minutes,
        progress=not args.quiet,
        strategy=args.strategy,
        mixed_precision=args.mixed_precision,
    )
    print(json.dumps(summary))
    return 0


def _check_out(path: str) -> None:
    from lungct.io import scan_suffix

    if not scan_suffix(path):
        raise LungCTError(path, "output must end in .mhd, .mha, .nii or .nii.gz")


def _inject(args: argparse.Namespace) -> int:
    import numpy as np

    from ct_gan_augment.inject import CubeTamperer
    from ct_gan_augment.sites import choose_sites
    from lungct.io import read_scan, write_scan
    from lungct.lungmask import segment_lungs
    from lungct.tables import ANNOTATION_COLUMNS, read_annotations, write_csv_atomic

    _check_out(args.out)
    tamperer = CubeTamperer.from_dir(
        args.model, seed=args.seed, allow_unfinished=args.allow_unfinished
    )
    scan = read_scan(args.scan)
    if args.world is not None:
        sites = np.asarray([args.world], dtype=np.float64)
    else:
        avoid = np.zeros((0, 4))
        for table_path, negative in ((args.annotations, False), (args.excluded, True)):
            if table_path:
                table = read_annotations(table_path, allow_negative_diameter=negative)
                rows = table.rows_in_series(scan.seriesuid)
                avoid = np.concatenate(
                    [avoid, np.column_stack([table.coords[rows], table.diameter_mm[rows]])]
                )
        rng = np.random.default_rng(args.seed)
        sites = choose_sites(
            scan.array, segment_lungs(scan), scan.geometry, args.auto, tamperer.plan, rng,
            avoid=avoid, juxtapleural=args.juxtapleural,
        )  # fmt: skip
        if len(sites) < args.auto:
            print(f"note: room for only {len(sites)} of {args.auto} sites", file=sys.stderr)
    rows = []
    for site in sites:
        scan, nodule = tamperer.inject(scan, site, args.diameter)
        if nodule.diameter_mm > 0:
            rows.append([scan.seriesuid, *nodule.center, nodule.diameter_mm])
        else:
            where = [round(float(v), 1) for v in site]
            print(
                f"note: no nodule formed at {where} (generator output too faint)", file=sys.stderr
            )
    write_scan(scan, args.out)
    rows_out = args.rows_out or str(Path(args.out).with_suffix("")) + "_annotations.csv"
    write_csv_atomic(rows_out, ANNOTATION_COLUMNS, rows)
    print(json.dumps({"out": args.out, "annotations": rows_out, "injected": rows}))
    return 0


def _remove(args: argparse.Namespace) -> int:
    from ct_gan_augment.inject import CubeTamperer
    from lungct.io import read_scan, write_scan

    _check_out(args.out)
    tamperer = CubeTamperer.from_dir(
        args.model, seed=args.seed, allow_unfinished=args.allow_unfinished
    )
    scan = read_scan(args.scan)
    for site in args.world:
        scan = tamperer.remove(scan, site)
    write_scan(scan, args.out)
    print(json.dumps({"out": args.out, "removed": [list(w) for w in args.world]}))
    return 0


def _augment(args: argparse.Namespace) -> int:
    from ct_gan_augment.augment import augment_dataset

    report = augment_dataset(
        args.data,
        args.model,
        args.out,
        _folds(args.folds),
        args.per_scan,
        cache_dir=args.cache,
        copies=args.copies,
        juxtapleural_fraction=args.juxtapleural_fraction,
        seed=args.seed,
        write_patches=args.write_patches,
        link_originals=args.link_originals,
        progress=not args.quiet,
        allow_unfinished=args.allow_unfinished,
    )
    print(json.dumps(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (exposed for tests and documentation)."""
    parser = argparse.ArgumentParser(
        prog="python -m ct_gan_augment",
        description="CT-GAN: train nodule injectors/removers, tamper scans, augment training folds.",
    )
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train an injector or a remover on the training folds")
    p.add_argument("--data", required=True, help="LUNA16-layout folder (annotations.csv ...)")
    p.add_argument("--cache", required=True, help="per-scan cache (python -m lungct prepare)")
    p.add_argument("--folds", required=True, help="training folds, e.g. 0-7")
    p.add_argument(
        "--kind",
        required=True,
        choices=("injector", "remover"),
        help="injector (learns nodule cubes) or remover (learns healthy lung cubes)",
    )
    p.add_argument("--out", required=True, help="model folder (GAN_DIR)")
    p.add_argument("--plan", help="named plan (default, paper, code, code-gf40) or plan.json")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a plan value")
    p.add_argument(
        "--steps",
        type=positive_int,
        help="training steps (overrides the plan; rounded up to whole epochs of the plan's "
        "checkpoint_every steps)",
    )
    p.add_argument(
        "--max-minutes",
        type=positive_float,
        help="this run's budget: stop after the batch under way, end the epoch and seal",
    )
    p.add_argument("--annotations", help="nodule table (default DATA/annotations.csv)")
    p.add_argument("--excluded", help="excluded findings (default DATA/annotations_excluded.csv)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the folder's training to the plan's last epoch (after a kill, from the "
        "epoch under way; after --max-minutes, from where it stopped)",
    )
    add_device_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_train)

    p = sub.add_parser("inject", help="inject nodules into a scan at given or automatic sites")
    p.add_argument("--scan", required=True, help=".mhd/.mha/.nii(.gz) or DICOM folder")
    p.add_argument("--model", required=True, help="injector folder (GAN_DIR)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--world", nargs=3, type=float, metavar=("X", "Y", "Z"), help="site, mm")
    where.add_argument("--auto", type=positive_int, metavar="N", help="choose N sites in the lung")
    p.add_argument("--juxtapleural", action="store_true", help="automatic sites at the pleura")
    p.add_argument(
        "--diameter",
        type=positive_float,
        metavar="MM",
        help="size of the injected nodule(s) (models with a size channel; default: drawn from "
        "the training nodules' sizes)",
    )
    p.add_argument("--annotations", help="nodules to stay away from (--auto)")
    p.add_argument("--excluded", help="excluded findings to stay away from (--auto)")
    p.add_argument("--out", required=True, help="tampered scan (.mhd ...)")
    p.add_argument("--rows-out", help="annotation rows (default OUT_annotations.csv)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds sites and noise")
    p.add_argument("--allow-unfinished", action="store_true", help=_ALLOW_UNFINISHED)
    p.set_defaults(func=_inject)

    p = sub.add_parser("remove", help="remove what lies at world sites (a nodule) from a scan")
    p.add_argument("--scan", required=True, help=".mhd/.mha/.nii(.gz) or DICOM folder")
    p.add_argument("--model", required=True, help="remover folder (GAN_DIR)")
    p.add_argument(
        "--world", nargs=3, type=float, action="append", required=True, metavar=("X", "Y", "Z"),
        help="site in mm (repeat for several)",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="tampered scan (.mhd ...)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds the noise touch-up")
    p.add_argument("--allow-unfinished", action="store_true", help=_ALLOW_UNFINISHED)
    p.set_defaults(func=_remove)

    p = sub.add_parser(
        "augment", help="write injected copies of TRAINING-fold scans (LUNA16 layout)"
    )
    p.add_argument("--data", required=True, help="LUNA16-layout folder")
    p.add_argument("--cache", help="per-scan cache with lung masks (else segmented here)")
    p.add_argument("--folds", required=True, help="folds to augment (all must be training folds)")
    p.add_argument("--model", required=True, help="injector folder (GAN_DIR)")
    p.add_argument("--per-scan", type=positive_int, required=True, help="nodules injected per copy")
    p.add_argument("--copies", type=positive_int, default=1, help="augmented copies of each scan")
    p.add_argument(
        "--juxtapleural-fraction", type=fraction, default=0.0, help="share of sites at the pleura"
    )
    p.add_argument("--out", required=True, help="output folder (LUNA16 layout)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds sites and noise")
    p.add_argument("--write-patches", action="store_true", help="also save 1 mm cubes (.npy)")
    p.add_argument("--link-originals", action="store_true", help="link the source scans in too")
    p.add_argument("--allow-unfinished", action="store_true", help=_ALLOW_UNFINISHED)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_augment)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return run_command(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
