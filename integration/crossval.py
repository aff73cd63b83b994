"""``python -m integration crossval``: the whole detector cross-validated over the LUNA16 subsets.

For each test fold ``k`` (``--folds``, default every subset that holds scans):

* validation fold: the subset before ``k`` (``k - 1`` modulo 10, skipping subsets without
  scans), so every subset validates exactly once when all ten are run;
* training folds: every other subset with scans;
* the U-Net and the MGI-CNN fit the training folds and are monitored on the validation fold;
  the CT-GAN fits the training folds only, and only the training folds are augmented (into a
  per-fold overlay of the cache, so two folds' augmented scans never mix);
* the U-Net's candidates of subset ``k`` are scored by the MGI-CNN: ``fold<k>/submission.csv``.

Then the per-fold submissions are pooled and evaluated ONCE (CPM, sensitivities at the seven
operating points, bootstrap interval, FROC figure), as the LUNA16 papers report a
cross-validated system. Each fold also gets its own numbers (no bootstrap) in
``per_fold.csv``.

Leakage is auditable: ``fold<k>/manifest.json`` lists the train, validation and test series and
the series each trained model recorded (U-Net, CT-GAN, MGI-CNN manifests); a fold stops with an
error if a test series appears anywhere else (:func:`check_no_leakage`).

Resuming: a fold whose submission exists (and whose manifest says complete) is skipped; a
half-done fold continues from the checkpoints of its stages, and its finished stages are kept. ``OUT/crossval_config.json`` records the settings, and a rerun with
other settings is refused (use another ``--out``).

Layout::

    OUT/crossval_config.json       settings of the run
    OUT/fold<k>/models/{unet,gan,fpr}  the fold's models (a models folder for `detect`)
    OUT/fold<k>/manifest.json      train / val / test series and what each model trained on
    OUT/fold<k>/candidates_test.csv, submission.csv, seriesuids_test.csv
    OUT/pooled/submission.csv, seriesuids.csv   the pooled folds
    OUT/evaluation/                metrics.json, froc.png, froc.csv, ... of the pooled folds
    OUT/per_fold.csv               each fold's CPM and sensitivities
    OUT/summary.json               headline numbers, per-fold numbers, seconds
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from integration.stages import (
    Split,
    StageClock,
    StagePaths,
    StageRun,
    StageSettings,
    evaluate_submission,
    fold_uids,
    merge_results,
    prepare_cache,
    read_json_or_empty,
    run_stages,
    write_series,
)
from lungct.errors import LungCTError
from lungct.fileio import write_json_atomic
from lungct.modeldir import MANIFEST_NAME
from lungct.tables import FOLD_COUNT, folds_from_layout, write_csv_atomic

_AUGMENTED_SUFFIX = re.compile(r"\.ctgan\d+$")


@dataclass
class CrossvalConfig:
    """What a cross-validation run does.

    Args:
        folds: test folds to run (each is one run of every stage); ``None`` = every subset
            with scans.
        settings: the stage settings (budgets are per fold).
        bootstrap: bootstrap resamples of the pooled evaluation.
        workers: processes for cache preparation.
        progress: progress bars of the stages.
    """

    folds: tuple[int, ...] | None = None
    settings: StageSettings = field(default_factory=StageSettings)
    bootstrap: int = 1000
    workers: int = 2
    progress: bool = True


def validation_fold(test_fold: int, present: Iterable[int]) -> int:
    """The validation fold of a test fold: the nearest subset with scans before it, cyclically
    (``k - 1`` modulo 10 when all ten subsets are there).

    Raises:
        LungCTError: the test fold has no scans, or no other subset has.
    """
    present = set(present)
    if test_fold not in present:
        raise LungCTError(
            None, f"fold {test_fold} has no scans (subsets with scans: {sorted(present)})"
        )
    for step in range(1, FOLD_COUNT):
        fold = (test_fold - step) % FOLD_COUNT
        if fold in present:
            return fold
    raise LungCTError(None, "cross-validation needs scans in at least three subsets")


def fold_split(test_fold: int, present: Iterable[int]) -> Split:
    """Train / validation / test folds of one cross-validation fold (see the module docstring).

    Raises:
        LungCTError: fewer than three subsets with scans.
    """
    present = sorted(set(present))
    val = validation_fold(test_fold, present)
    train = [f for f in present if f not in (test_fold, val)]
    if not train:
        raise LungCTError(None, "cross-validation needs scans in at least three subsets")
    return Split(tuple(train), (val,), (test_fold,))


def source_series(uid: str) -> str:
    """The original series of an augmented copy (``<uid>.ctgan<k>`` -> ``<uid>``)."""
    return _AUGMENTED_SUFFIX.sub("", uid)


def check_no_leakage(manifest: dict[str, Any], where: str | os.PathLike | None = None) -> None:
    """Refuse a fold whose test series appear among its training or validation series, or in
    anything its models recorded as trained on (augmented copies count as their source).

    Raises:
        LungCTError: naming a leaked series and where it was found.
    """
    test = set(manifest["test_series"])
    if not test:
        raise LungCTError(where, "the fold has no test series")
    places: dict[str, Iterable[str]] = {
        "training series": manifest.get("train_series", []),
        "validation series": manifest.get("val_series", []),
    }
    for model, roles in (manifest.get("trained_on") or {}).items():
        for role, uids in roles.items():
            places[f"{model} {role} series"] = uids
    for name, uids in places.items():
        leaked = sorted(test & {source_series(u) for u in uids})
        if leaked:
            raise LungCTError(
                where,
                f"test series {leaked[0]} (and {len(leaked) - 1} more) also among the {name}: "
                "the fold would be evaluated on data it trained on",
            )


def trained_series(paths: StagePaths) -> dict[str, dict[str, list[str]]]:
    """The series each trained model of a run recorded in its own manifest."""
    out: dict[str, dict[str, list[str]]] = {}
    unet = read_json_or_empty(paths.unet / MANIFEST_NAME)
    if unet:
        out["U-Net"] = {"train": unet.get("train_series", []), "val": unet.get("val_series", [])}
    gan = read_json_or_empty(paths.gan / MANIFEST_NAME)
    if gan:
        out["CT-GAN"] = {"train": gan.get("series", [])}
    fpr = read_json_or_empty(paths.fpr / MANIFEST_NAME)
    if fpr:
        out["MGI-CNN"] = {"train": fpr.get("train_series", []), "val": fpr.get("val_series", [])}
    return out


def fold_paths(fold_dir: Path, gan: bool) -> StagePaths:
    """The layout of one fold (the augmented scans get a cache overlay of their own)."""
    paths = StagePaths.single_run(fold_dir, fold_dir / "models")
    if gan:
        paths.fpr_cache = fold_dir / "cache_augmented"
    return paths


def _check_config(out: Path, record: dict[str, Any]) -> None:
    path = out / "crossval_config.json"
    if path.is_file():
        previous = read_json_or_empty(path)
        for key in ("settings", "data"):
            if previous.get(key) != record[key]:
                raise LungCTError(
                    path,
                    f"this folder holds a cross-validation with other {key}; rerun with the same "
                    "ones to resume, or use another --out",
                )
    write_json_atomic(path, record)


def _fold_metrics(data: Path, series: Path, submission: Path, label: str) -> dict[str, Any]:
    try:
        metrics = evaluate_submission(data, series, submission, bootstrap=0, label=label).to_json()
    except LungCTError as exc:  # e.g. no nodule in the fold's scans
        return {"cpm": None, "note": str(exc)}
    return metrics


def run_fold(
    data: Path,
    cache: Path,
    out: Path,
    split: Split,
    config: CrossvalConfig,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every stage of one cross-validation fold; returns the fold's manifest.

    Raises:
        LungCTError: leakage (see :func:`check_no_leakage`), or any stage's error.
    """
    (test_fold,) = split.test
    fold_dir = out / f"fold{test_fold}"
    paths = fold_paths(fold_dir, config.settings.gan)
    manifest: dict[str, Any] = {
        "test_fold": test_fold,
        "split": split.to_dict(),
        "train_series": fold_uids(data, split.train),
        "val_series": fold_uids(data, split.val),
        "test_series": fold_uids(data, split.test),
        "trained_on": {},
        "settings": config.settings.to_dict(),
        "complete": False,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    manifest_path = fold_dir / "manifest.json"
    check_no_leakage(manifest, manifest_path)
    write_json_atomic(manifest_path, manifest)
    write_series(fold_dir / "seriesuids_test.csv", manifest["test_series"])
    clock = StageClock(log=log, prefix=f"fold {test_fold}")
    run = StageRun(
        data=data,
        cache=cache,
        split=split,
        settings=config.settings,
        paths=paths,
        clock=clock,
        workers=config.workers,
        progress=config.progress,
    )
    outputs = run_stages(run)
    manifest["trained_on"] = trained_series(paths)
    try:
        check_no_leakage(manifest, manifest_path)
    except LungCTError:
        outputs.submission.unlink(missing_ok=True)  # never leave a leaked fold looking done
        write_json_atomic(manifest_path, manifest)
        raise
    from integration.pipeline import PipelineConfig

    PipelineConfig(tta=config.settings.tta).save(fold_dir / "models")
    manifest.update(complete=True, seconds=clock.seconds)
    write_json_atomic(manifest_path, manifest)
    return manifest


def run_crossval(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: CrossvalConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Cross-validate the detector fold by fold, then evaluate the pooled folds once.

    Returns:
        The summary written to ``OUT/summary.json``.

    Raises:
        LungCTError: a missing data folder, folds without scans, fewer than three subsets with
            scans, other settings than a previous run in ``out_dir``, leakage, a stage's error.
    """
    from integration.evaluation import write_outputs

    config = config or CrossvalConfig()
    data, cache, out = Path(data_dir), Path(cache_dir), Path(out_dir)
    if not data.is_dir():
        raise LungCTError(data, "dataset folder does not exist")
    layout = folds_from_layout(data)
    present = sorted(set(layout.values()))
    folds = list(config.folds) if config.folds is not None else present
    splits = [fold_split(k, present) for k in folds]  # refuses absent folds before any work
    config.settings.check()
    out.mkdir(parents=True, exist_ok=True)
    _check_config(
        out,
        {
            "settings": config.settings.to_dict(),
            "data": str(data.resolve()),
            "cache": str(cache.resolve()),
            "folds_present": present,
            "validation_rule": "test fold k is validated on the nearest subset with scans "
            "before it (k-1 mod 10)",
        },
    )
    log(f"[crossval] preparing the cache of {len(layout)} scans in {len(present)} subsets")
    prepare_cache(data, cache, workers=config.workers, progress=config.progress)

    t_all = time.perf_counter()
    fold_seconds: dict[str, float] = {}
    for i, split in enumerate(splits, start=1):
        (k,) = split.test
        fold_dir = out / f"fold{k}"
        head = f"[crossval] fold {k} ({i}/{len(splits)})"
        if (fold_dir / "submission.csv").is_file() and read_json_or_empty(
            fold_dir / "manifest.json"
        ).get("complete"):
            log(f"{head}: submission exists, skipped")
            continue
        log(
            f"{head}: test subset{k} ({len(fold_uids(data, split.test))} scans), "
            f"validation subset{split.val[0]}, training subsets "
            f"{','.join(str(f) for f in split.train)}"
        )
        t0 = time.perf_counter()
        run_fold(data, cache, out, split, config, log)
        fold_seconds[str(k)] = round(time.perf_counter() - t0, 1)
        log(f"{head}: done in {fold_seconds[str(k)]:.0f} s")

    # Pool the folds and evaluate once.
    pooled = out / "pooled"
    series: list[str] = []
    per_fold: list[dict[str, Any]] = []
    for split in splits:
        (k,) = split.test
        fold_dir = out / f"fold{k}"
        uids = fold_uids(data, split.test)
        series += uids
        metrics = _fold_metrics(
            data, fold_dir / "seriesuids_test.csv", fold_dir / "submission.csv", f"fold {k}"
        )
        per_fold.append({"fold": k, "scans": len(uids), **metrics})
    series_file = write_series(pooled / "seriesuids.csv", series)
    pooled_submission = merge_results(
        [out / f"fold{s.test[0]}" / "submission.csv" for s in splits], pooled / "submission.csv"
    )
    log(f"[crossval] evaluating {len(splits)} pooled folds ({len(series)} scans)")
    result = evaluate_submission(
        data,
        series_file,
        pooled_submission,
        bootstrap=config.bootstrap,
        label=f"cross-validated, {len(splits)} folds",
    )
    metrics = write_outputs(result, out / "evaluation")
    from integration.evaluation import FP_RATE_KEYS

    write_csv_atomic(
        out / "per_fold.csv",
        ("fold", "scans", "nodules", "detected", "cpm", *(f"sens_{k}" for k in FP_RATE_KEYS)),
        (
            [
                row["fold"],
                row["scans"],
                row.get("nodules", ""),
                row.get("detected", ""),
                "" if row["cpm"] is None else row["cpm"],
                *(row.get("sensitivity", {}).get(k, "") for k in FP_RATE_KEYS),
            ]
            for row in per_fold
        ),
    )
    summary = {
        "cpm": metrics["cpm"],
        "cpm_ci95": metrics.get("cpm_ci95"),
        "sensitivity": metrics["sensitivity"],
        "sensitivity_ci95": metrics.get("sensitivity_ci95"),
        "nodules": metrics["nodules"],
        "detected": metrics["detected"],
        "scans": metrics["scans"],
        "folds": [s.test[0] for s in splits],
        "per_fold": [
            {k: row.get(k) for k in ("fold", "scans", "cpm", "nodules", "detected", "note")}
            for row in per_fold
        ],
        "fold_seconds_this_run": fold_seconds,
        "total_seconds_this_run": round(time.perf_counter() - t_all, 1),
        "settings": config.settings.to_dict(),
        "figures": {"froc": str(out / "evaluation" / "froc.png")},
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
