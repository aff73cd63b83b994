"""The stages every integration command runs, as one flat list (:data:`STAGES`).

One run of the detector on one split of the LUNA16 subsets::

    candidate network (U-Net or CenterNet; train folds, validated on the val folds)
    -> candidates (test folds)
    [-> hard negatives (the network's own candidates of the train and val folds, labelled)]
    [-> CT-GAN (train folds only) -> augmentation (train folds, prepared into the cache)]
    -> FP reducer (MGI-CNN or another network; train folds + their augmented copies
       [+ the hard negatives])
    -> scores (the test candidates: the submission)

``integration demo`` runs the list once, ``integration crossval`` once per test fold,
``integration ablate`` once per configuration (the trained stages shared between the
configurations that agree on them) and ``integration train-models`` once. Everything a stage
needs to know is in :class:`StageSettings` (a JSON-ready dataclass: the keys of an ablation
grid) and :class:`Split`; where each stage writes is :class:`StagePaths`, so the callers choose
the layout (one models folder for the demo, one per fold, one per stage key).

Resuming: a stage that trains asks its model folder (:func:`lungct.training.training_state`):
a sealed folder is trained and skipped, a started one is resumed with ``--resume``'s meaning
(to the plan's end, with the stage's budget again), an empty one trains; with ``reuse`` a
candidates or submission CSV newer than the model that made it is kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungct.errors import LungCTError
from lungct.fileio import write_json_atomic, write_text_atomic
from lungct.tables import FOLD_COUNT, write_csv_atomic

DONE_MARKER = "integration_done.json"
"""Written into a stage's model folder when its training function has returned: the summary
the trainer returned (what is trained is the seal's to say, :func:`stage_done`)."""


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """A bookkeeping JSON file of an earlier run (manifest, result, config), or ``{}`` when it is
    missing, unreadable, broken or not a JSON object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------


@dataclass
class StageSettings:
    """Everything that shapes the trained stages of one run (the keys of an ablation config).

    Args:
        unet_preset: a named U-Net plan, ``2d``, ``2d-original`` or ``3d``
            (:data:`unet_candidates.PRESETS`; ``unet_variant`` in settings of earlier versions).
        unet_minutes: U-Net training budget in minutes (of each run: a resumed run goes on
            for up to this long again).
        unet_overrides: U-Net plan fields to change (e.g. ``{"epochs": 5}``).
        candidates: the stage-1 network: ``unet`` (the U-Net of ``unet_preset``) or a named
            CenterNet plan, ``centernet`` or ``centernet-no-consensus``
            (:data:`unet_candidates.centernet.CENTERNET_PRESETS`: the 3-D heatmap detector;
            then the ``unet_*`` settings are not read).
        centernet_minutes: CenterNet training budget in minutes (of each run, as
            ``unet_minutes``).
        centernet_overrides: CenterNet plan fields to change.
        gan: augment the training folds with CT-GAN-injected nodules.
        gan_minutes: CT-GAN training budget in minutes (per run).
        gan_per_scan: nodules injected into each augmented copy.
        gan_plan: named CT-GAN plan or ``plan.json`` path.
        gan_overrides: CT-GAN plan fields to change.
        fpr: score the candidates with the MGI-CNN (or the network of ``fpr_plan``); ``False``
            submits the U-Net's own probabilities (the candidate stage alone).
        fpr_plan: named false-positive-reduction plan (:data:`fp_reduction_3dcnn.config.PLANS`)
            or a path. The plan names the network: ``resnet3d`` and ``cnn3d`` train a 3-D ResNet
            or the small 3-D CNN instead of the MGI-CNN, trained as ``default`` trains it.
        fpr_variant: ``mgi``, ``zoom_in``, ``zoom_out``, ``ri`` or ``lr`` (``None``: the plan's;
            MGI-CNN ablations: the other networks take ``mgi`` only).
        merge: how the MGI-CNN merges its streams, ``sum``, ``concat`` or ``conv1x1``
            (``None``: the plan's; ``integration`` in settings of earlier versions).
        fpr_minutes: MGI-CNN (or other network's) training budget in minutes.
        fpr_overrides: plan fields of the MGI-CNN (or other network) to change.
        tta: average the MGI-CNN's (or other network's) scores over the 8 axial symmetries.
        quantize: once a 2-D U-Net is trained, write its 8-bit copy for CPUs
            (:mod:`unet_candidates.quantize`), calibrated on the validation folds (the
            training folds where there are none); the test folds' candidates then come from
            it on a CPU, as ``detect``'s would.
        hard_negatives: also train the FP reducer on the stage-1 network's own candidates of
            the training and validation folds, labelled by the evaluation's hit rule (those on
            an excluded finding left out): the false positives it will be asked to reject,
            beside the look-alikes of the data's ``candidates.csv``.
    """

    unet_preset: str = "2d"
    unet_minutes: float = 3.0
    unet_overrides: dict[str, Any] = field(default_factory=dict)
    candidates: str = "unet"
    centernet_minutes: float = 3.0
    centernet_overrides: dict[str, Any] = field(default_factory=dict)
    gan: bool = True
    gan_minutes: float = 2.0
    gan_per_scan: int = 2
    gan_plan: str = "default"
    gan_overrides: dict[str, Any] = field(default_factory=dict)
    fpr: bool = True
    fpr_plan: str = "default"
    fpr_variant: str | None = None
    merge: str | None = None
    fpr_minutes: float = 4.0
    fpr_overrides: dict[str, Any] = field(default_factory=dict)
    tta: bool = False
    quantize: bool = False
    hard_negatives: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str | None = None) -> StageSettings:
        """Settings from JSON values; an unknown key or a wrong type is a :class:`LungCTError`."""
        if not isinstance(values, dict):
            raise LungCTError(source, "settings must be a JSON object")
        if "unet_variant" in values:  # the name of ``unet_preset`` in earlier versions
            values = dict(values)
            legacy = values.pop("unet_variant")
            if values.setdefault("unet_preset", legacy) != legacy:
                raise LungCTError(source, "settings give both unet_preset and unet_variant")
        if "integration" in values:  # the name of ``merge`` in earlier versions
            values = dict(values)
            legacy = values.pop("integration")
            if values.setdefault("merge", legacy) != legacy:
                raise LungCTError(source, "settings give both merge and integration")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise LungCTError(
                source, f"unknown settings {unknown} (known: {', '.join(sorted(known))})"
            )
        defaults = cls()
        clean: dict[str, Any] = {}
        for key, value in values.items():
            default = getattr(defaults, key)
            if value is None and default is None:  # optional names: the plan's own
                clean[key] = None
                continue
            expected = str if default is None else type(default)
            is_bool = isinstance(value, bool)
            if expected is float and isinstance(value, int | float) and not is_bool:
                value = float(value)  # 3 and 3.0 are one budget (and one stage key)
            elif not isinstance(value, expected) or (is_bool and expected is not bool):
                raise LungCTError(
                    source, f"setting {key!r} must be a {expected.__name__}, not {value!r}"
                )
            clean[key] = value
        settings = cls(**{**dataclasses.asdict(defaults), **clean})
        settings.check(source)
        return settings

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> StageSettings:
        """A copy with some settings changed (``None`` values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return StageSettings.from_dict({**self.to_dict(), **changes})

    def check(self, source: str | None = None) -> None:
        """Refuse impossible budgets and names that no plan knows (before any training)."""
        for key in ("unet_minutes", "centernet_minutes", "gan_minutes", "fpr_minutes"):
            if getattr(self, key) <= 0:
                raise LungCTError(source, f"setting {key!r} must be > 0")
        if self.gan_per_scan < 1:
            raise LungCTError(source, "setting 'gan_per_scan' must be >= 1")
        self.candidate_plan()
        if self.fpr:
            self.fpr_plan_resolved()

    def unet_plan(self) -> Any:
        """The U-Net plan of these settings."""
        from unet_candidates.config import preset_plan

        try:
            return preset_plan(self.unet_preset, **self.unet_overrides)
        except TypeError as exc:
            raise LungCTError(None, f"bad unet_overrides ({exc})") from None

    def candidate_plan(self) -> Any:
        """The stage-1 plan of these settings: the U-Net's, or the CenterNet's."""
        if self.candidates == "unet":
            return self.unet_plan()
        from unet_candidates.centernet.config import CENTERNET_PRESETS, centernet_preset_plan

        if self.candidates not in CENTERNET_PRESETS:
            known = ", ".join(["unet", *CENTERNET_PRESETS])
            raise LungCTError(None, f"setting 'candidates' must be one of {known}")
        return centernet_preset_plan(self.candidates, **self.centernet_overrides)

    @property
    def candidate_minutes(self) -> float:
        """The stage-1 training budget (minutes): the U-Net's or the CenterNet's."""
        return self.unet_minutes if self.candidates == "unet" else self.centernet_minutes

    def gan_plan_resolved(self) -> Any:
        """The CT-GAN plan of these settings (imports Keras)."""
        from ct_gan_augment.config import get_plan

        return get_plan(self.gan_plan, **self.gan_overrides)

    def fpr_plan_resolved(self) -> Any:
        """The false-positive-reduction plan of these settings (MGI-CNN or another network)."""
        from fp_reduction_3dcnn.config import get_plan

        changes = dict(self.fpr_overrides)
        if self.fpr_variant is not None:
            changes["variant"] = self.fpr_variant
        if self.merge is not None:
            changes["merge"] = self.merge
        return get_plan(self.fpr_plan, **changes)


@dataclass(frozen=True)
class Split:
    """Which LUNA16 subsets train, validate and test one run.

    The CT-GAN, the U-Net and the MGI-CNN fit only the ``train`` folds; ``val`` only monitors
    the U-Net and the MGI-CNN; ``test`` is scored and evaluated, nothing else.
    """

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        for role in ("train", "val", "test"):
            object.__setattr__(self, role, tuple(int(f) for f in getattr(self, role)))
        if not self.train or not self.test:
            raise LungCTError(None, "a split needs at least one training and one test fold")
        roles = {"training": self.train, "validation": self.val, "test": self.test}
        names = list(roles)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                both = sorted(set(roles[a]) & set(roles[b]))
                if both:
                    raise LungCTError(None, f"folds {both} are both {a} and {b} folds")
        bad = [f for f in self.train + self.val + self.test if not 0 <= f < FOLD_COUNT]
        if bad:
            raise LungCTError(None, f"folds {bad} are outside 0..{FOLD_COUNT - 1}")

    def to_dict(self) -> dict[str, list[int]]:
        """Plain-JSON form."""
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


# ----------------------------------------------------------------------------------------------
# Where each stage writes
# ----------------------------------------------------------------------------------------------


@dataclass
class StagePaths:
    """Output locations of one run's stages.

    Args:
        unet: U-Net model folder.
        test_candidates: U-Net candidates of the test folds (CSV).
        gan: CT-GAN injector folder.
        augmented: augmented copies of the training folds (LUNA16 layout).
        fpr_cache: the cache the MGI-CNN reads: the dataset's own cache, or an overlay of it
            holding this run's augmented scans (:func:`overlay_cache`), so two runs whose
            CT-GANs differ never share an augmented scan of the same name.
        train_candidates: labelled candidates the MGI-CNN trains on (CSV).
        fpr: MGI-CNN model folder.
        submission: scored test candidates (LUNA16 results CSV).
    """

    unet: Path
    test_candidates: Path
    gan: Path
    augmented: Path
    fpr_cache: Path | None
    train_candidates: Path
    fpr: Path
    submission: Path

    @property
    def hard_negatives(self) -> Path:
        """The stage-1 network's labelled candidates of the training and validation folds."""
        return self.train_candidates.with_name("candidates_hard_negatives.csv")

    @classmethod
    def single_run(cls, out: Path, models: Path, fpr_cache: Path | None = None) -> StagePaths:
        """The demo's layout: ``models/{unet,gan,fpr}`` and the tables in ``out``."""
        return cls(
            unet=models / "unet",
            test_candidates=out / "candidates_test.csv",
            gan=models / "gan",
            augmented=out / "augmented",
            fpr_cache=fpr_cache,
            train_candidates=out / "candidates_train.csv",
            fpr=models / "fpr",
            submission=out / "submission.csv",
        )


@dataclass
class StageClock:
    """Seconds per stage, printed as they finish."""

    seconds: dict[str, float] = field(default_factory=dict)
    log: Callable[[str], None] = print
    prefix: str = "demo"

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one stage, timing it."""
        self.log(f"[{self.prefix}] {name} ...")
        t0 = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.log(f"[{self.prefix}] {name}: {self.seconds[name]:.1f} s")
        return result


@dataclass
class StageRun:
    """One run: the data, the split, the settings and where the stages write.

    Args:
        data: LUNA16-layout folder (``subsetK/*.mhd``, ``annotations.csv``,
            ``annotations_excluded.csv``, ``candidates.csv``).
        cache: its per-scan cache (prepared with :func:`prepare_cache`).
        split: the folds.
        settings: the stage settings.
        paths: the output locations.
        clock: times and logs the stages.
        candidates: labelled candidates the MGI-CNN trains on (default ``data/candidates.csv``).
        workers: processes for cache preparation.
        progress: progress bars.
        reuse: keep a candidates / submission CSV that is newer than its model.
    """

    data: Path
    cache: Path
    split: Split
    settings: StageSettings
    paths: StagePaths
    clock: StageClock = field(default_factory=StageClock)
    candidates: Path | None = None
    workers: int = 2
    progress: bool = True
    reuse: bool = True

    @property
    def fpr_cache(self) -> Path:
        """The cache the MGI-CNN trains and predicts from."""
        return self.paths.fpr_cache or self.cache


@dataclass
class StageOutputs:
    """What one run produced."""

    test_candidates: Path
    submission: Path
    test_series: list[str]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def fold_uids(data_dir: str | os.PathLike, folds: Sequence[int]) -> list[str]:
    """Series UIDs of the scans in the given subsets of a dataset, in file order."""
    from lungct.cache import find_scans

    return [s.seriesuid for s in find_scans(data_dir, folds)]


def write_series(path: str | os.PathLike, uids: Sequence[str]) -> Path:
    """Write a series list (one UID a line, no header), atomically."""
    write_text_atomic(path, "".join(f"{u}\n" for u in uids))
    return Path(path)


def merge_candidates(paths: Sequence[Path], out: Path) -> Path:
    """One labelled candidates table from several (same columns), atomically."""
    from lungct.tables import read_candidates

    rows: list[list[Any]] = []
    for path in paths:
        table = read_candidates(path)
        for i in range(len(table)):
            rows.append([table.uid_of(i), *table.coords[i].tolist(), int(table.label[i])])
    write_csv_atomic(out, ("seriesuid", "coordX", "coordY", "coordZ", "class"), rows)
    return out


def merge_results(paths: Sequence[Path], out: Path) -> Path:
    """One LUNA16 results table (``seriesuid,coordX,coordY,coordZ,probability``) from several."""
    from lungct.tables import RESULT_COLUMNS, read_results

    rows: list[list[Any]] = []
    for path in paths:
        table = read_results(path)
        for i in range(len(table)):
            uid = table.uids[table.series_index[i]]
            rows.append([uid, *table.coords[i].tolist(), float(table.probability[i])])
    write_csv_atomic(out, RESULT_COLUMNS, rows)
    return out


def prepare_cache(
    data: str | os.PathLike, cache: str | os.PathLike, workers: int = 2, progress: bool = True
) -> dict:
    """Prepare (or complete) the cache of a dataset; an existing cache keeps its own plan.

    Raises:
        LungCTError: missing data folder, no scans, or scans that could not be prepared.
    """
    from lungct.cache import ScanCache, prepare_dataset

    data, cache = Path(data), Path(cache)
    if not data.is_dir():
        raise LungCTError(data, "dataset folder does not exist")
    plan = ScanCache(cache).plan if (cache / "plan.json").is_file() else None
    report = prepare_dataset(data, cache, plan, workers=workers, progress=progress)
    if report["failed"]:
        uid, problem = next(iter(report["failed"].items()))
        raise LungCTError(
            cache, f"{len(report['failed'])} scans could not be prepared (e.g. {uid}: {problem})"
        )
    return report


def overlay_cache(base: str | os.PathLike, overlay: str | os.PathLike) -> Path:
    """A cache folder that shows every complete entry of ``base`` (symbolic links) and can take
    entries of its own (augmented scans) without touching ``base``.

    Raises:
        LungCTError: ``base`` has no plan, or the links cannot be made.
    """
    base, overlay = Path(base).resolve(), Path(overlay)
    plan = base / "plan.json"
    if not plan.is_file():
        raise LungCTError(base, "not a prepared cache (no plan.json)")
    overlay.mkdir(parents=True, exist_ok=True)
    if not (overlay / "plan.json").is_file():
        write_text_atomic(overlay / "plan.json", plan.read_text())
    for meta in sorted(base.glob("*/meta.json")):
        link = overlay / meta.parent.name
        if link.is_symlink() or link.exists():
            continue
        try:
            link.symlink_to(meta.parent, target_is_directory=True)
        except OSError as exc:
            raise LungCTError(
                link, f"cannot link the cache entry ({exc.strerror or exc})"
            ) from None
    return overlay


def _mark_done(model_dir: Path, summary: Any) -> None:
    write_json_atomic(model_dir / DONE_MARKER, {"summary": _jsonable(summary)})


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def _fresh(output: Path, model_dir: Path) -> bool:
    """``output`` exists and is at least as new as the model it was made with."""
    model = model_dir / "model.keras"
    return output.is_file() and model.is_file() and output.stat().st_mtime >= model.stat().st_mtime


def excluded_table(data: Path) -> Path | None:
    """``data/annotations_excluded.csv`` when it exists."""
    path = data / "annotations_excluded.csv"
    return path if path.is_file() else None


def evaluate_submission(
    data: Path,
    series: Path,
    submission: Path,
    bootstrap: int = 1000,
    label: str | None = None,
    cap: bool = True,
) -> Any:
    """The exact LUNA16 evaluation of a submission on the listed series (seed 0)."""
    from integration.evaluation import evaluate_files

    return evaluate_files(
        data / "annotations.csv",
        excluded_table(data),
        series,
        submission,
        cap=cap,
        bootstrap=bootstrap,
        seed=0,
        label=label,
    )


# ----------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One step of a run, in :data:`STAGES`.

    Args:
        name: what the clock and the messages call it.
        applies: whether the run's settings include it.
        run: does it; it reads what earlier stages wrote from ``run.paths``.
        model_dir: for a stage that trains, its model folder; the folder's state
            (:func:`lungct.training.training_state`) says whether it is trained (skipped),
            started (resumed) or new.
        budget: for a stage that trains, its budget in minutes of each run (``--max-minutes``
            of its trainer): the one place the settings' budgets are read.
    """

    name: str
    applies: Callable[[StageSettings], bool]
    run: Callable[[StageRun], Any]
    model_dir: Callable[[StagePaths], Path] | None = None
    budget: Callable[[StageSettings], float] | None = None


def stage_done(model_dir: Path) -> bool:
    """Whether a stage's training has ended in this folder: its manifest is sealed (every
    trainer seals its folder last) and the files the seal lists are there."""
    from lungct.training import training_state

    return training_state(model_dir) == "done"


def _train(run: StageRun, stage: Stage, label: str, train: Callable[..., Any]) -> Path:
    """Run a trainer into the stage's folder, unless it is trained: resumed where a training
    was started, with the stage's budget; ``train(resume=, max_minutes=)`` does the rest."""
    from lungct.training import training_state

    assert stage.model_dir is not None and stage.budget is not None
    folder = stage.model_dir(run.paths)
    if stage_done(folder):
        return folder
    resume = training_state(folder) == "started"
    minutes = stage.budget(run.settings)
    summary = run.clock.run(label, lambda: train(resume=resume, max_minutes=minutes))
    _mark_done(folder, summary)
    return folder


def train_candidate_network(run: StageRun) -> None:
    """Train (or resume, or skip) the run's stage-1 network: the U-Net, or the CenterNet when
    ``settings.candidates`` names one; then, where the settings ask, the U-Net's 8-bit copy."""
    from unet_candidates.centernet.train import train as centernet_train
    from unet_candidates.train import train as unet_train

    centernet = run.settings.candidates != "unet"
    train = centernet_train if centernet else unet_train
    folder = _train(
        run,
        STAGE["candidate network"],
        "train CenterNet" if centernet else "train U-Net",
        lambda **budget: train(
            run.settings.candidate_plan(),
            run.data,
            run.cache,
            list(run.split.train),
            list(run.split.val),
            run.paths.unet,
            progress=run.progress,
            **budget,
        ),
    )
    if run.settings.quantize and not centernet:
        quantize_unet_stage(run, folder)


def extract_candidates(run: StageRun) -> None:
    """The stage-1 network's candidates of the test folds (the same columns from a U-Net or
    a CenterNet), unless a file newer than the model is there and ``run.reuse``.

    Raises:
        LungCTError: every test scan failed in extraction (nothing to score).
    """
    from unet_candidates.extract import extract_paths

    unet_dir, out = run.paths.unet, run.paths.test_candidates
    if run.reuse and _fresh(out, unet_dir):
        return
    summary = run.clock.run(
        "extract candidates",
        lambda: extract_paths(
            unet_dir,
            out,
            data_dir=run.data,
            folds=list(run.split.test),
            cache_dir=run.cache,
            progress=run.progress,
        ),
    )
    if summary["out"] is None:
        scan, problem = next(iter(summary["failed"].items()), ("?", "?"))
        raise LungCTError(
            unet_dir, f"candidate extraction failed on every test scan (e.g. {scan}: {problem})"
        )


def mine_hard_negatives(run: StageRun) -> None:
    """The stage-1 network's candidates of the training and validation folds, labelled for the
    FP reducer: class 1 where they hit a nodule (the evaluation's rule), 0 elsewhere, and left
    out where they hit an excluded finding (the evaluation ignores those marks, and a real
    finding must never be taught as a negative). Kept when newer than the model and
    ``run.reuse``.

    Raises:
        LungCTError: every scan failed in extraction.
    """
    from unet_candidates.extract import extract_paths

    unet_dir, out = run.paths.unet, run.paths.hard_negatives
    if run.reuse and _fresh(out, unet_dir):
        return
    raw = out.with_name(out.stem + "_raw.csv")
    folds = sorted({*run.split.train, *run.split.val})
    summary = run.clock.run(
        "extract training candidates",
        lambda: extract_paths(
            unet_dir,
            raw,
            data_dir=run.data,
            folds=folds,
            cache_dir=run.cache,
            progress=run.progress,
        ),
    )
    if summary["out"] is None:
        scan, problem = next(iter(summary["failed"].items()), ("?", "?"))
        raise LungCTError(
            unet_dir, f"candidate extraction failed on every training scan (e.g. {scan}: {problem})"
        )
    label_detector_candidates(raw, run.data, out)


def label_detector_candidates(candidates: Path, data: Path, out: Path) -> int:
    """Label a detector's candidates of a dataset for training: class 1 where a candidate hits
    a nodule of ``data/annotations.csv`` (the evaluation's rule), 0 elsewhere; candidates on a
    finding of ``data/annotations_excluded.csv`` are left out. Writes ``out`` atomically and
    returns its number of rows."""
    from fp_reduction_3dcnn.data import excluded_rows, hit_labels
    from lungct.tables import read_annotations, read_candidates

    table = read_candidates(candidates, require_class=False)
    table.label = hit_labels(table, read_annotations(data / "annotations.csv"))
    keep = np.ones(len(table), dtype=bool)
    excluded = excluded_table(data)
    if excluded is not None:
        keep &= ~excluded_rows(table, excluded)
    rows = [
        [table.uid_of(i), *table.coords[i].tolist(), int(table.label[i])]
        for i in np.flatnonzero(keep)
    ]
    write_csv_atomic(out, ("seriesuid", "coordX", "coordY", "coordZ", "class"), rows)
    return len(rows)


def quantize_unet_stage(run: StageRun, unet_dir: Path) -> None:
    """Write the trained 2-D U-Net's 8-bit copy, calibrated on the validation folds (else the
    training folds), unless a copy of these weights is there."""
    from lungct.cache import ScanCache, find_scans
    from unet_candidates.config import UNetPlan
    from unet_candidates.quantize import quantize_model_dir
    from unet_candidates.runtime import int8_problem

    if int8_problem(unet_dir) is None or UNetPlan.load(unet_dir / "plan.json").dims != "2d":
        return
    cache = ScanCache(run.cache)
    files = find_scans(run.data, list(run.split.val) or list(run.split.train))
    loaders = [lambda uid=f.seriesuid: cache.open(uid) for f in files]
    log = None if run.progress else (lambda message: None)
    run.clock.run(
        "quantize U-Net", lambda: quantize_model_dir(unet_dir, loaders, len(loaders), log=log)
    )


def train_gan(run: StageRun) -> None:
    """Train (or resume, or skip) the CT-GAN injector on the training folds only."""
    from ct_gan_augment.train import train_gan as gan_train

    plan = run.settings.gan_plan_resolved()
    _train(
        run,
        STAGE["CT-GAN"],
        "train CT-GAN",
        lambda **budget: gan_train(
            run.data,
            run.cache,
            run.split.train,
            "injector",
            run.paths.gan,
            plan=plan,
            progress=run.progress,
            **budget,
        ),
    )


def augment_training_folds(run: StageRun) -> None:
    """Augment the training folds with the run's CT-GAN and prepare the new scans into the
    FP reducer's cache (their labelled candidates: ``paths.augmented/candidates.csv``)."""
    from ct_gan_augment.augment import augment_dataset
    from lungct.cache import ScanCache, prepare_dataset

    augmented = run.paths.augmented
    run.clock.run(
        "augment training folds",
        lambda: augment_dataset(
            run.data,
            run.paths.gan,
            augmented,
            run.split.train,
            run.settings.gan_per_scan,
            cache_dir=run.cache,
            progress=run.progress,
        ),
    )
    if run.paths.fpr_cache is not None:
        overlay_cache(run.cache, run.paths.fpr_cache)
    plan = ScanCache(run.cache).plan
    report = run.clock.run(
        "prepare augmented",
        lambda: prepare_dataset(
            augmented, run.fpr_cache, plan, workers=run.workers, progress=run.progress
        ),
    )
    if report["failed"]:
        uid, problem = next(iter(report["failed"].items()))
        raise LungCTError(augmented, f"augmented scan {uid} could not be prepared ({problem})")


def train_fp_reducer(run: StageRun) -> None:
    """Train (or resume, or skip) the FP reducer (the MGI-CNN or the network of the plan) on
    the training folds' candidates, and those of their augmented copies where the CT-GAN ran.
    """
    from fp_reduction_3dcnn.train import train as fpr_train
    from lungct.modeldir import describe_data

    if stage_done(run.paths.fpr):
        return
    candidates = run.candidates or run.data / "candidates.csv"
    if not candidates.is_file():
        raise LungCTError(
            candidates, "labelled training candidates not found (the MGI-CNN trains on them)"
        )
    sources = [candidates]
    if run.settings.gan:
        sources.append(run.paths.augmented / "candidates.csv")
    if run.settings.hard_negatives:
        sources.append(run.paths.hard_negatives)
    if run.paths.fpr_cache is not None:
        overlay_cache(run.cache, run.paths.fpr_cache)
    train_candidates = merge_candidates(sources, run.paths.train_candidates)
    plan = run.settings.fpr_plan_resolved()
    _train(
        run,
        STAGE["FP reducer"],
        f"train {plan.network_label}",
        lambda **budget: fpr_train(
            plan,
            run.fpr_cache,
            train_candidates,
            list(run.split.train),
            list(run.split.val),
            run.paths.fpr,
            test_folds=list(run.split.test),
            progress=run.progress,
            provenance={
                "data": describe_data(run.data),
                "ct_gan_copies_per_scan": run.settings.gan_per_scan if run.settings.gan else 0,
            },
            **budget,
        ),
    )


def score_candidates(run: StageRun) -> None:
    """Score the test candidates with the FP reducer (the submission), unless a submission
    newer than the model and the candidates is there and ``run.reuse``."""
    from fp_reduction_3dcnn.predict import predict as fpr_predict

    fpr_dir, out, test_candidates = run.paths.fpr, run.paths.submission, run.paths.test_candidates
    if run.paths.fpr_cache is not None:
        overlay_cache(run.cache, run.paths.fpr_cache)
    if (
        run.reuse
        and _fresh(out, fpr_dir)
        and out.stat().st_mtime >= test_candidates.stat().st_mtime
    ):
        return
    run.clock.run(
        "score candidates",
        lambda: fpr_predict(
            fpr_dir,
            run.fpr_cache,
            test_candidates,
            out,
            tta=run.settings.tta,
            progress=run.progress,
        ),
    )


def _always(settings: StageSettings) -> bool:
    return True


def _augmenting(settings: StageSettings) -> bool:
    return settings.fpr and settings.gan


def _reducing(settings: StageSettings) -> bool:
    return settings.fpr


def _mining(settings: StageSettings) -> bool:
    return settings.fpr and settings.hard_negatives


STAGES: tuple[Stage, ...] = (
    Stage(
        "candidate network",
        _always,
        train_candidate_network,
        model_dir=lambda paths: paths.unet,
        budget=lambda settings: settings.candidate_minutes,
    ),
    Stage("candidates", _always, extract_candidates),
    Stage("hard negatives", _mining, mine_hard_negatives),
    Stage(
        "CT-GAN",
        _augmenting,
        train_gan,
        model_dir=lambda paths: paths.gan,
        budget=lambda settings: settings.gan_minutes,
    ),
    Stage("augmentation", _augmenting, augment_training_folds),
    Stage(
        "FP reducer",
        _reducing,
        train_fp_reducer,
        model_dir=lambda paths: paths.fpr,
        budget=lambda settings: settings.fpr_minutes,
    ),
    Stage("scores", _reducing, score_candidates),
)
"""Every stage of a run, in order: ``demo``, ``crossval``, ``ablate`` and ``train-models``
run this list. Stages that train ask their folder whether they are done; none calls another."""

STAGE = {stage.name: stage for stage in STAGES}


def run_stages(
    run: StageRun,
    only: Sequence[str] | None = None,
    after: Callable[[Stage], None] | None = None,
) -> StageOutputs:
    """Run the stages of :data:`STAGES` that the settings include, in order; return the test
    candidates, the submission and the test series. Without the FP reducer the submission is
    the candidates file itself.

    Args:
        run: the run.
        only: the names of the stages to run (default: all); the others' outputs must be
            in place.
        after: called after each stage that ran (e.g. to evaluate the candidates).
    """
    unknown = sorted(set(only or ()) - set(STAGE))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known: {list(STAGE)}")
    for stage in STAGES:
        if not stage.applies(run.settings) or (only is not None and stage.name not in only):
            continue
        stage.run(run)
        if after is not None:
            after(stage)
    submission = run.paths.submission if run.settings.fpr else run.paths.test_candidates
    return StageOutputs(run.paths.test_candidates, submission, fold_uids(run.data, run.split.test))
