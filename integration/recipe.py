"""Train a model set from nothing with one recipe, and measure a model set on a data set.

``python -m integration train-models --recipe NAME|FILE --out DIR`` runs a recipe: a JSON plan
naming the data to generate, the folds, the cache grid and every stage's settings and budget
(the keys of :class:`integration.stages.StageSettings`)::

    {"name": "suite-default", "version": "1", "description": "...",
     "data": {"scans": 100, "seed": 1000, "size": "full"},
     "split": {"train": [0, 1, 2, 3, 4, 5, 6, 7], "val": [8], "test": [9]},
     "preprocess": {},                       # lungct.preprocess.PreprocessPlan fields
     "settings": {"unet_minutes": 40, ...},  # integration.stages.StageSettings
     "bootstrap": 1000, "workers": 2}

It writes ``DIR/data`` (the synthetic LUNA16 layout), ``DIR/cache``, ``DIR/models`` (the model
set: ``modelset.json``, ``MODEL_CARD.md``, sealed ``unet/`` and ``fpr/``, and the CT-GAN that
augmented the training folds in ``gan/``), ``DIR/heldout/`` (the test subset scored and
evaluated: a check on data like the training data, not the set's measured performance) and
``DIR/train_models.json`` (seconds per stage, the machine). Rerunning the same command resumes:
generated scans, cache entries and finished stages are kept, a stage cut short continues from
its checkpoints. Training uses a GPU when TensorFlow sees one.

:func:`evaluate_model_set` measures a set on any LUNA16-layout data set it never trained on
(candidates of every scan, MGI-CNN scores, the exact evaluation with a bootstrap interval).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from integration.modelset import MODEL_CARD_FILE, write_model_set
from integration.stages import (
    Split,
    StageClock,
    StagePaths,
    StageRun,
    StageSettings,
    fold_uids,
    read_json_or_empty,
    run_stages,
    write_series,
)
from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic
from lungct.modeldir import hardware
from lungct.plans import check_field_types

RECIPES_DIR = Path(__file__).resolve().parent / "data" / "recipes"
RECIPE_FILE = "recipe.json"
SYNTH_SIZES = ("small", "full")


@dataclass
class Recipe:
    """A model set's training, from data generation to the last stage.

    Args:
        name, version, description: what the trained set is called (its ``modelset.json``).
        data: ``{"scans": N, "seed": S, "size": "small"|"full"}``, the synthetic mini-LUNA
            to generate (``lungct synth``).
        split: ``{"train": [...], "val": [...], "test": [...]}`` LUNA16 subsets.
        background: ``{"scans": N, "seed": S}``: also N copies of a real scan with synthetic
            nodules in its lungs (``lungct synth --background``; the scan and its own LUNA16
            findings are given to :func:`train_models`, not named in the recipe). They join the
            training folds only.
        preprocess: :class:`lungct.preprocess.PreprocessPlan` fields of the cache (default:
            the 1 mm grid every stage uses).
        settings: :class:`integration.stages.StageSettings` keys (variants, plans, budgets).
        bootstrap: bootstrap resamples of the held-out check.
        workers: processes for data generation and cache preparation.
        report_fps_per_scan: choose the set's report threshold (``pipeline.json``) on the
            validation folds: the lowest score at which they have at most this many false
            positives per scan, and never below 0.5 (:func:`choose_report_threshold`).
            ``None``: 0.5.
        malignancy: ``{"scans": N, "seed": S, "nodules_per_scan": K, "minutes": M,
            "plan": {...}}``: also train the malignancy CNN (the set's ``malignancy/``) on N
            copies of the background scan with K rated synthetic nodules each, for at most M
            minutes a run; ``plan`` holds :class:`fp_reduction_3dcnn.malignancy.MalignancyPlan`
            fields to change. Needs the background part.
    """

    name: str
    version: str = ""
    description: str = ""
    data: dict[str, Any] = field(default_factory=lambda: {"scans": 20, "seed": 0})
    split: dict[str, list[int]] = field(
        default_factory=lambda: {"train": [0, 1, 2, 3, 4, 5, 6, 7], "val": [8], "test": [9]}
    )
    background: dict[str, Any] | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    bootstrap: int = 1000
    workers: int = 2
    report_fps_per_scan: float | None = None
    malignancy: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, values: Any, source: str | os.PathLike | None = None) -> Recipe:
        """A recipe from its JSON; unknown keys, wrong types and bad values are refused."""
        if not isinstance(values, dict):
            raise LungCTError(source, "a recipe must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LungCTError(source, f"unknown recipe keys {unknown}")
        if "name" not in values:
            raise LungCTError(source, "a recipe needs a name")
        check_field_types(cls, values, source)
        try:
            recipe = cls(**values)
        except TypeError as exc:
            raise LungCTError(source, f"bad recipe ({exc})") from None
        recipe.check(source)
        return recipe

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> Recipe:
        """A recipe shipped in ``integration/data/recipes`` (by name) or a JSON file."""
        path = Path(name_or_path)
        if not path.suffix and not path.is_file():
            path = RECIPES_DIR / f"{name_or_path}.json"
            if not path.is_file():
                known = sorted(p.stem for p in RECIPES_DIR.glob("*.json"))
                raise LungCTError(
                    None, f"no recipe named {name_or_path!r} (shipped: {', '.join(known)})"
                )
        return cls.from_dict(read_json(path, "recipe file not found"), source=path)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    def check(self, source: str | os.PathLike | None = None) -> None:
        """Refuse a recipe that could not run, before anything is generated or trained."""
        for key, kind in (("name", str), ("version", str), ("description", str)):
            if not isinstance(getattr(self, key), kind):
                raise LungCTError(source, f"recipe {key} must be a string")
        data = self.data
        if not isinstance(data, dict) or set(data) - {"scans", "seed", "size"}:
            raise LungCTError(source, "recipe data must be {scans, seed, size}")
        scans, seed = data.get("scans"), data.get("seed", 0)
        if isinstance(scans, bool) or not isinstance(scans, int) or scans < 1:
            raise LungCTError(source, f"data.scans must be a positive integer, got {scans!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise LungCTError(source, f"data.seed must be an integer, got {seed!r}")
        if data.get("size", "full") not in SYNTH_SIZES:
            raise LungCTError(source, f"data.size must be one of {SYNTH_SIZES}")
        bg = self.background
        if bg is not None:
            if not isinstance(bg, dict) or set(bg) != {"scans", "seed"}:
                raise LungCTError(source, "recipe background must be {scans, seed} or null")
            if any(isinstance(v, bool) or not isinstance(v, int) for v in bg.values()):
                raise LungCTError(source, "background scans and seed must be integers")
            if bg["scans"] < 1:
                raise LungCTError(source, "background.scans must be a positive integer")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int):
            raise LungCTError(source, "bootstrap must be an integer")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise LungCTError(source, "workers must be a positive integer")
        fps = self.report_fps_per_scan
        if fps is not None and (
            isinstance(fps, bool) or not isinstance(fps, int | float) or fps <= 0
        ):
            raise LungCTError(source, f"report_fps_per_scan must be a number > 0, got {fps!r}")
        self.malignancy_plan(source)
        if fps is not None and not self.split_().val:
            raise LungCTError(source, "report_fps_per_scan needs validation folds")
        self.split_()
        self.stage_settings(source)
        self.preprocess_plan(source)

    def malignancy_plan(self, source: str | os.PathLike | None = None) -> Any:
        """The malignancy part's plan (``None`` without one); its keys are checked."""
        part = self.malignancy
        if part is None:
            return None
        keys = {"scans", "seed", "nodules_per_scan", "minutes", "plan"}
        if not isinstance(part, dict) or set(part) - keys or not {"scans", "seed"} <= set(part):
            raise LungCTError(
                source, "recipe malignancy must be {scans, seed, nodules_per_scan, minutes, plan}"
            )
        for key in ("scans", "seed", "nodules_per_scan"):
            value = part.get(key, 1)
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or (key != "seed" and value < 1)
            ):
                raise LungCTError(source, f"malignancy.{key} must be a positive integer")
        minutes = part.get("minutes", 30.0)
        if isinstance(minutes, bool) or not isinstance(minutes, int | float) or minutes <= 0:
            raise LungCTError(source, "malignancy.minutes must be a number > 0")
        if self.background is None:
            raise LungCTError(source, "the malignancy part needs the background part's real scan")
        from fp_reduction_3dcnn.malignancy import MalignancyPlan

        changes = part.get("plan", {})
        if not isinstance(changes, dict):
            raise LungCTError(source, "malignancy.plan must be a JSON object")
        try:
            return MalignancyPlan.from_dict({**MalignancyPlan().to_dict(), **changes})
        except (TypeError, ValueError, LungCTError) as exc:
            raise LungCTError(source, f"bad malignancy.plan ({exc})") from None

    def split_(self) -> Split:
        """The folds as a :class:`Split`."""
        if not isinstance(self.split, dict) or set(self.split) != {"train", "val", "test"}:
            raise LungCTError(None, "recipe split must be {train, val, test}")
        return Split(tuple(self.split["train"]), tuple(self.split["val"]), self.split["test"])

    def stage_settings(self, source: str | os.PathLike | None = None) -> StageSettings:
        """The stage settings of the recipe."""
        return StageSettings.from_dict(
            self.settings, source=None if source is None else str(source)
        )

    def preprocess_plan(self, source: str | os.PathLike | None = None) -> Any:
        """The cache's preprocessing plan."""
        from lungct.preprocess import PreprocessPlan

        if not isinstance(self.preprocess, dict):
            raise LungCTError(source, "recipe preprocess must be a JSON object")
        return PreprocessPlan.from_dict(self.preprocess, source=source)


@dataclass(frozen=True)
class BackgroundScan:
    """The real scan of a recipe's background part, and where its own findings are listed.

    Args:
        scan: the real scan (any format ``lungct`` reads).
        annotations, excluded: LUNA16 tables holding its nodules and other findings.
        has_no_findings: the scan has none (instead of the two tables).
    """

    scan: str
    annotations: str | None = None
    excluded: str | None = None
    has_no_findings: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, paths resolved."""
        return {
            k: str(Path(v).resolve()) if isinstance(v, str) else v
            for k, v in dataclasses.asdict(self).items()
        }


def train_models(
    recipe: Recipe,
    out_dir: str | os.PathLike,
    progress: bool = True,
    background: BackgroundScan | None = None,
) -> dict[str, Any]:
    """Run a recipe into ``out_dir`` (resuming whatever an earlier run left); return a summary.

    Raises:
        LungCTError: a bad recipe, ``out_dir`` started with another recipe or background, a
            background part without its scan (or a scan without the part), a stage failing.
    """
    from integration.evaluation import write_outputs
    from integration.pipeline import PipelineConfig
    from integration.stages import evaluate_submission
    from lungct.synth import generate_dataset
    from lungct.synth.layout import merge_layouts

    out = Path(out_dir)
    saved = out / RECIPE_FILE
    if saved.is_file():
        previous = Recipe.from_dict(read_json(saved), source=saved)  # defaults filled in
        if previous.to_dict() != recipe.to_dict():
            raise LungCTError(
                saved,
                "this folder was started with another recipe; rerun that one to resume it, or "
                "use a new --out",
            )
    if (recipe.background is None) != (background is None):
        raise LungCTError(
            None,
            "the recipe has a background part: give its real scan (--background SCAN and its "
            "findings)"
            if background is None
            else "a background scan was given but the recipe has no background part",
        )
    used = out / "background.json"
    if background is not None and used.is_file() and read_json(used) != background.to_dict():
        raise LungCTError(used, "this folder was started with another background scan")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(saved, recipe.to_dict())
    data, cache, models = out / "data", out / "cache", out / "models"
    log = _stderr_log if progress else _quiet
    clock = StageClock(log=log, prefix="train-models")

    spec = recipe.data
    main_part = data if background is None else out / "parts" / "synthetic"
    clock.run(
        "synth",
        lambda: generate_dataset(
            main_part,
            spec["scans"],
            spec.get("seed", 0),
            spec.get("size", "full"),
            progress=progress,
            workers=recipe.workers,
        ),
    )
    if background is not None:
        write_json_atomic(used, background.to_dict())
        bg_part = out / "parts" / "background"
        bg = recipe.background or {}
        clock.run(
            "synth on the real background",
            lambda: _copies_of_background(
                bg_part, bg["scans"], bg["seed"], background, recipe.workers, progress
            ),
        )
        merge_layouts(data, [(main_part, None), (bg_part, list(recipe.split_().train))])
    clock.run("prepare", lambda: _prepare(recipe, data, cache, progress))
    # After the worker processes: the line imports TensorFlow to find its GPUs.
    log(f"[train-models] {recipe.name} {recipe.version}: {_devices_line()}")

    split = recipe.split_()
    settings = recipe.stage_settings()
    run = StageRun(
        data=data,
        cache=cache,
        split=split,
        settings=settings,
        paths=StagePaths.single_run(out / "heldout", models),
        clock=clock,
        workers=recipe.workers,
        progress=progress,
    )
    submission = run_stages(run).submission
    test_series = write_series(out / "heldout" / "seriesuids.csv", fold_uids(data, split.test))
    result = clock.run(
        "evaluate held-out subset",
        lambda: evaluate_submission(
            data, test_series, submission, bootstrap=recipe.bootstrap, label=recipe.name
        ),
    )
    metrics = write_outputs(result, out / "heldout" / "evaluation")
    operating = None
    if recipe.report_fps_per_scan is not None and settings.fpr:
        fps = float(recipe.report_fps_per_scan)
        operating = clock.run(
            "choose report threshold",
            lambda: choose_report_threshold(run, fps, out / "heldout" / "validation"),
        )
        log(
            f"[train-models] report threshold {operating['threshold']:.3f}: "
            f"{operating['false_positives_per_scan']:.2f} false positives per validation scan, "
            f"sensitivity {operating['sensitivity']:.2f} ({operating['scans']} scans)"
        )
    threshold = 0.5 if operating is None else operating["threshold"]
    PipelineConfig(threshold=threshold, tta=settings.tta).save(models)
    if recipe.malignancy is not None and background is not None:
        train_malignancy_part(recipe, out, background, clock, progress)
    model_set = write_model_set(
        models,
        name=recipe.name,
        version=recipe.version,
        description=recipe.description,
        performance=(
            f"Held-out subset {list(split.test)} of the training data's own generator run "
            f"(same seed, never trained on): CPM {result.cpm:.3f} on {result.nodules} nodules "
            f"in {result.scans} scans. This is a check, not the set's measured performance: "
            "see the results pages for fresh data sets."
        ),
        threshold_note=""
        if operating is None
        else (
            f"It was chosen on the validation subsets {operating['folds']} "
            f"({operating['scans']} scans, {operating['nodules']} nodules) as the lowest score "
            f"leaving at most {operating['fps_per_scan_asked']:g} false positive(s) per scan, "
            f"never below 0.5: there it gave {operating['false_positives_per_scan']:.2f} false "
            f"positives per scan at sensitivity {operating['sensitivity']:.2f}."
        ),
    )
    summary = {
        "recipe": recipe.to_dict(),
        "model_set": model_set.summary(),
        "heldout": {
            "cpm": metrics["cpm"],
            "cpm_ci95": metrics.get("cpm_ci95"),
            "nodules": metrics.get("nodules"),
            "detected": metrics.get("detected"),
        },
        "seconds": clock.seconds,
        "hardware": hardware(),
    }
    if operating is not None:
        summary["report_threshold"] = operating
    previous_seconds = read_json_or_empty(out / "train_models.json").get("runs", [])
    summary["runs"] = [*previous_seconds, clock.seconds]
    write_json_atomic(out / "train_models.json", summary)
    log(f"[train-models] model set: {models} ({MODEL_CARD_FILE} beside it)")
    return summary


def _copies_of_background(
    out: Path,
    scans: int,
    seed: int,
    background: BackgroundScan,
    workers: int,
    progress: bool,
    nodules_per_scan: int | None = None,
) -> dict[str, Any]:
    """``lungct synth --background``: copies of the real scan with synthetic nodules, its own
    findings carried into their tables."""
    from lungct.synth import generate_dataset

    return generate_dataset(
        out,
        scans,
        seed,
        background=background.scan,
        background_annotations=background.annotations,
        background_excluded=background.excluded,
        background_has_no_findings=background.has_no_findings,
        nodules_per_scan=nodules_per_scan,
        progress=progress,
        workers=workers,
    )


def _prepare(recipe: Recipe, data: Path, cache: Path, progress: bool) -> dict[str, Any]:
    """Prepare (or complete) the cache of ``data`` on the recipe's grid.

    Raises:
        LungCTError: a scan that could not be prepared.
    """
    from lungct.cache import prepare_dataset

    report = prepare_dataset(
        data, cache, recipe.preprocess_plan(), workers=recipe.workers, progress=progress
    )
    if report["failed"]:
        uid, problem = next(iter(report["failed"].items()))
        raise LungCTError(data, f"scan {uid} could not be prepared ({problem})")
    return report


def train_malignancy_part(
    recipe: Recipe, out: Path, background: BackgroundScan, clock: StageClock, progress: bool
) -> Path:
    """The recipe's malignancy part: its rated data (copies of the background scan), their
    cache and the malignancy CNN in ``out/models/malignancy``, skipped when sealed and resumed
    when started, as the other stages are."""
    from fp_reduction_3dcnn.malignancy import train_malignancy
    from lungct.training import training_state

    part = recipe.malignancy or {}
    plan = recipe.malignancy_plan()
    data, cache = out / "parts" / "malignancy", out / "malignancy-cache"
    folder = out / "models" / "malignancy"
    state = training_state(folder)
    if state == "done":
        return folder
    clock.run(
        "synth malignancy data",
        lambda: _copies_of_background(
            data,
            part["scans"],
            part["seed"],
            background,
            recipe.workers,
            progress,
            nodules_per_scan=part.get("nodules_per_scan"),
        ),
    )
    clock.run("prepare malignancy data", lambda: _prepare(recipe, data, cache, progress))
    clock.run(
        "train malignancy CNN",
        lambda: train_malignancy(
            plan,
            data,
            cache,
            folder,
            resume=state == "started",
            progress=progress,
            max_minutes=float(part.get("minutes", 30.0)),
        ),
    )
    return folder


def report_threshold(
    scores: np.ndarray, labels: np.ndarray, n_scans: int, fps_per_scan: float, floor: float = 0.5
) -> float:
    """The lowest threshold at which scored marks (``labels``: 1 hit, 0 false positive) leave
    at most ``fps_per_scan`` false positives per scan, and never below ``floor``.

    A mark counts at or above the threshold. With ``k = floor(fps_per_scan * n_scans)`` false
    positives allowed, the threshold lies just above the (k+1)-th highest false positive's
    score (``floor`` when there are no more than ``k``).
    """
    allowed = int(np.floor(fps_per_scan * n_scans + 1e-9))
    negatives = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 0])[::-1]
    if len(negatives) <= allowed:
        return float(floor)
    return float(max(floor, np.nextafter(negatives[allowed], np.inf)))


def choose_report_threshold(run: StageRun, fps_per_scan: float, out: Path) -> dict[str, Any]:
    """Score the validation folds' candidates with the run's trained stages and choose the
    report threshold (:func:`report_threshold`); marks on excluded findings are not counted.
    Returns the threshold and what it gives on those folds."""
    from fp_reduction_3dcnn.predict import predict as fpr_predict
    from unet_candidates.extract import extract_paths

    out.mkdir(parents=True, exist_ok=True)
    folds = list(run.split.val)
    candidates, scored = out / "candidates.csv", out / "submission.csv"
    extract_paths(
        run.paths.unet,
        candidates,
        data_dir=run.data,
        folds=folds,
        cache_dir=run.cache,
        progress=run.progress,
    )
    fpr_predict(
        run.paths.fpr,
        run.fpr_cache,
        candidates,
        scored,
        tta=run.settings.tta,
        progress=run.progress,
    )
    return threshold_on_submission(run.data, scored, fold_uids(run.data, folds), fps_per_scan) | {
        "folds": folds
    }


def threshold_on_submission(
    data_dir: str | os.PathLike, submission: str | os.PathLike, uids: list[str], fps_per_scan: float
) -> dict[str, Any]:
    """The report threshold (:func:`report_threshold`) of scored marks on the scans ``uids`` of
    ``data_dir``, by its tables (marks on excluded findings not counted); with what it gives
    there: false positives per scan and the sensitivity at or above it."""
    from integration.evaluation import label_candidates
    from lungct.tables import read_annotations, read_results

    data = Path(data_dir)
    table = read_results(submission)
    annotations = read_annotations(data / "annotations.csv")
    hit = label_candidates(annotations, table).astype(bool)
    excluded = data / "annotations_excluded.csv"
    ignored = np.zeros(len(table), dtype=bool)
    if excluded.is_file():
        ignored = (
            label_candidates(
                read_annotations(excluded, allow_negative_diameter=True), table
            ).astype(bool)
            & ~hit
        )
    keep = ~ignored
    mark_uid = np.asarray(table.uids, dtype=object)[table.series_index]
    in_scans = np.isin(mark_uid, np.asarray(uids, dtype=object))
    keep &= in_scans
    threshold = report_threshold(table.probability[keep], hit[keep], len(uids), fps_per_scan)
    above = (table.probability >= threshold) & in_scans
    found = total = 0
    for uid in uids:
        marks = table.coords[above & (mark_uid == uid)]
        for r in annotations.rows_in_series(uid):
            total += 1
            d2 = ((marks - annotations.coords[r]) ** 2).sum(axis=1)
            found += bool((d2 < (annotations.diameter_mm[r] / 2) ** 2).any())
    return {
        "threshold": threshold,
        "fps_per_scan_asked": fps_per_scan,
        "false_positives_per_scan": float((above & keep & ~hit).sum() / max(len(uids), 1)),
        "sensitivity": found / total if total else float("nan"),
        "nodules": total,
        "scans": len(uids),
    }


def evaluate_model_set(
    models_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    bootstrap: int = 1000,
    workers: int = 2,
    label: str | None = None,
    progress: bool = True,
    allow_unfinished: bool = False,
) -> Any:
    """Measure a model set on a data set it never trained on; return the evaluation result.

    Every scan of ``data_dir`` (all subsets) gets its candidates and the set's scores (each
    MGI-CNN's beside their mix, :func:`integration.pipeline.fuse_scores`); the exact
    LUNA16 evaluation then gives the FROC, the CPM and its bootstrap interval. A scan the set
    trained on is refused (the fold numbers of a fresh data set mean nothing to the models, so
    the check is by series UID). ``allow_unfinished`` accepts stages whose training has not
    ended.

    Raises:
        LungCTError: a broken set, a scan the set trained on, a failed extraction.
    """
    from fp_reduction_3dcnn.predict import predict as fpr_predict
    from integration.evaluation import write_outputs
    from integration.modelset import fpr_stages, read_model_set
    from integration.stages import evaluate_submission
    from lungct.cache import prepare_dataset
    from unet_candidates.extract import extract_paths

    model_set = read_model_set(models_dir, allow_unfinished=allow_unfinished)
    data, out = Path(data_dir), Path(out_dir)
    uids = fold_uids(data, list(range(10)))
    trained: set[str] = set()
    for manifest in model_set.manifests.values():
        trained |= set(manifest.get("train_series") or manifest.get("series") or [])
    seen = sorted(trained & set(uids))
    if seen:
        raise LungCTError(
            data, f"{len(seen)} scans were in the model set's training data (e.g. {seen[0]})"
        )
    report = prepare_dataset(data, cache_dir, workers=workers, progress=progress)
    if report["failed"]:
        uid, problem = next(iter(report["failed"].items()))
        raise LungCTError(data, f"scan {uid} could not be prepared ({problem})")
    out.mkdir(parents=True, exist_ok=True)
    candidates = out / "candidates.csv"
    summary = extract_paths(
        model_set.root / "unet",
        candidates,
        data_dir=data,
        folds=list(range(10)),
        cache_dir=cache_dir,
        progress=progress,
        allow_unfinished=allow_unfinished,
    )
    if summary["out"] is None or summary["failed"]:
        scan, problem = next(iter(summary["failed"].items()), ("?", "?"))
        raise LungCTError(data, f"candidate extraction failed on {scan}: {problem}")
    submission = candidates
    members = fpr_stages(model_set.stages)
    if members:
        from integration.pipeline import PipelineConfig

        submission = out / "submission.csv"
        weight = float(PipelineConfig.load(model_set.root).candidate_weight)
        direct = len(members) == 1 and weight == 0.0  # the one member's file is the score
        scored = [submission if direct else out / f"submission.{s}.csv" for s in members]
        for stage, target in zip(members, scored, strict=True):
            fpr_predict(
                model_set.root / stage,
                cache_dir,
                candidates,
                target,
                tta=model_set_tta(model_set.root),
                allow_train_folds=True,  # checked above by series UID
                progress=progress,
                allow_unfinished=allow_unfinished,
            )
        if not direct:  # the detector's score (integration.pipeline.fuse_scores)
            share = (1.0 - weight) / len(members)
            weighted_submissions(
                [candidates, *scored] if weight else scored,
                [weight, *[share] * len(members)] if weight else [share] * len(members),
                submission,
            )
    series = write_series(out / "seriesuids.csv", uids)
    result = evaluate_submission(
        data, series, submission, bootstrap=bootstrap, label=label or model_set.name
    )
    write_outputs(result, out / "evaluation")
    write_json_atomic(out / "evaluation" / "by_size.json", sensitivity_by_size(result))
    return result


def mean_submissions(paths: list[Path], out: Path) -> None:
    """Write the mean probability of submissions that score the same marks in the same order
    (an ensemble's members on one candidates file), atomically.

    Raises:
        LungCTError: the files do not list the same marks in the same order.
    """
    weighted_submissions(paths, [1.0 / len(paths)] * len(paths), out)


def weighted_submissions(paths: list[Path], weights: list[float], out: Path) -> None:
    """Write the weighted sum of the probabilities of submissions (or candidates files) that
    score the same marks in the same order, atomically: an ensemble's mean, or the U-Net's
    probability mixed with the MGI-CNNs' by a set's ``candidate_weight``.

    Raises:
        LungCTError: the files do not list the same marks in the same order.
    """
    import csv

    from lungct.tables import RESULT_COLUMNS, write_csv_atomic

    tables = []
    for path in paths:
        with Path(path).open(newline="") as handle:
            tables.append(list(csv.DictReader(handle)))
    keys = ("seriesuid", "coordX", "coordY", "coordZ")
    first = tables[0]
    for path, table in zip(paths[1:], tables[1:], strict=True):
        if len(table) != len(first) or any(
            tuple(a[k] for k in keys) != tuple(b[k] for k in keys)
            for a, b in zip(first, table, strict=True)
        ):
            raise LungCTError(path, f"does not score the marks of {paths[0]} in their order")
    rows = (
        [
            *(first[i][k] for k in keys),
            sum(w * float(t[i]["probability"]) for w, t in zip(weights, tables, strict=True)),
        ]
        for i in range(len(first))
    )
    write_csv_atomic(out, RESULT_COLUMNS, rows)


SIZE_BANDS_MM = ((0.0, 6.0), (6.0, 10.0), (10.0, float("inf")))
"""Diameter bands of :func:`sensitivity_by_size`: small nodules are the hard ones."""


def sensitivity_by_size(
    result: Any, bands: tuple[tuple[float, float], ...] = SIZE_BANDS_MM
) -> dict[str, Any]:
    """Sensitivity per nodule diameter band, at the FROC's operating points.

    For each rate of :data:`integration.evaluation.FP_RATES` the operating threshold is the
    lowest one at which the whole FROC stays at or below that many false positives per scan;
    a band's sensitivity there is the share of its nodules hit by a mark at or above it.
    ``any`` counts a nodule hit by any mark (the top of the FROC).
    """

    from integration.evaluation import FP_RATES

    table = result.nodule_table
    diameters = np.asarray(table.diameter_mm, dtype=float)
    detected = np.asarray(table.detected, dtype=bool)
    probability = np.where(detected, np.nan_to_num(np.asarray(table.probability, float)), -1.0)
    fps, thresholds = np.asarray(result.froc_fps), np.asarray(result.froc_thresholds)
    out: dict[str, Any] = {}
    for lo, hi in bands:
        name = f"{lo:g}-{hi:g} mm" if np.isfinite(hi) else f">= {lo:g} mm"
        in_band = (diameters >= lo) & (diameters < hi)
        n = int(in_band.sum())
        row: dict[str, Any] = {"nodules": n, "any": _share(detected & in_band, n)}
        for rate in FP_RATES:
            ok = fps <= rate
            threshold = float(thresholds[ok].min()) if ok.any() else float("inf")
            row[f"{rate:g}"] = _share((probability >= threshold) & detected & in_band, n)
        out[name] = row
    return out


def _share(mask: Any, n: int) -> float | None:
    return round(float(mask.sum()) / n, 4) if n else None


def model_set_tta(models_dir: Path) -> bool:
    """The set's own TTA setting (``pipeline.json``)."""
    from integration.pipeline import PipelineConfig

    return PipelineConfig.load(models_dir).tta


def _devices_line() -> str:
    info = hardware()
    gpus = info["gpus"]
    where = f"GPU {', '.join(gpus)}" if gpus else "no GPU found, training on the CPU"
    return f"{info['cpu_count']} CPU cores, {where}"


def _stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    pass
