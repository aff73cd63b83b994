"""Training of the candidate U-Net from the per-scan cache, resumable, with a time budget.

The model folder::

    OUT/plan.json              the resolved plan (written first; a resumed run must match it)
    OUT/manifest.json          data folder, cache, training/validation folds and series;
                               sealed (checksums, trained plan) when training ends: the
                               seal is the folder's done marker (:mod:`lungct.modeldir`)
    OUT/model.keras            the model after the last finished epoch, written atomically
                               (the validation loss of each epoch is in the log, its best in
                               the manifest); usable before the seal with --allow-unfinished
    OUT/train_log.csv          one row per epoch
    OUT/checkpoints/epoch_NNN.keras + state.json   model + optimiser after each epoch

``--resume`` reloads the newest checkpoint (optimiser state included) and continues with the
next epoch; the learning rate follows a cosine over the planned steps or ``--max-minutes``,
whichever ends first; epoch ``e`` always draws the same patches, so an
interrupted run continues the stream it would have seen.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lungct.cache import ScanCache, find_scans, prepare_dataset
from lungct.errors import LungCTError
from lungct.fileio import atomic_path, read_json, write_json_atomic, write_text_atomic
from lungct.modeldir import (
    MANIFEST_NAME,
    describe_plan_changes,
    keras_file_problem,
    load_keras_model,
    seal_model_dir,
)
from lungct.patches import prefetch
from unet_candidates.config import PLAN_FILE, UNetPlan
from unet_candidates.data import PatchSampler, ScanSamples, build_scan_samples
from unet_candidates.extract import MODEL_FILE, UNET_CLASSES, unet_architecture

LOG_FILE = "train_log.csv"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "state.json"
LOG_COLUMNS = (
    "epoch",
    "steps",
    "loss",
    "val_loss",
    "val_dice",
    "learning_rate",
    "epoch_seconds",
    "samples_per_s",
    "elapsed_s",
)
KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class CandidateNetwork:
    """What the training loop needs to know about one kind of candidate network.

    The loop (:func:`fit_candidate_network`: cache, patch stream, cosine schedule, time
    budget, checkpoints, ``--resume``, sealed model folder) is the same for the U-Net and the
    CenterNet heatmap detector (:mod:`unet_candidates.centernet`); these hooks are what differ.

    Attributes:
        stage: the stage name of the model folder's seal (``unet``, ``centernet``).
        plan_class: the plan dataclass (its ``load`` reads ``plan.json``).
        build: a freshly initialised, compiled model of a plan.
        keras_class: the registered Keras class a plan's ``model.keras`` holds.
        architecture: the constructor settings a plan gives the network (checked on resume).
        what: the network in words, for messages (``"a 3d U-Net"``).
        sampler: the patch sampler class (:class:`unet_candidates.data.PatchSampler` or a
            subclass), called as ``sampler(cache, samples, plan, augment=, seed=)``.
        scan_samples: one scan's sampling index, called as ``scan_samples(scan, nodules,
            plan, rng=, excluded=, reader_count=, excluded_reader_count=)`` (reader counts
            per row of the two tables, 0 = unknown).
        validate: ``(model, val_set, plan) -> (val_loss, val_metric)`` (``None`` without a
            validation set).
        metric: the log column of the second value ``validate`` returns.
    """

    stage: str
    plan_class: Any
    build: Callable[[Any], Any]
    keras_class: Callable[[Any], str]
    architecture: Callable[[Any], dict[str, Any]]
    what: Callable[[Any], str]
    sampler: Any
    scan_samples: Callable[..., ScanSamples]
    validate: Callable[[Any, Any, Any], tuple[float | None, float | None]]
    metric: str = "val_dice"

    @property
    def log_columns(self) -> tuple[str, ...]:
        """The columns of ``train_log.csv``."""
        return tuple(self.metric if c == "val_dice" else c for c in LOG_COLUMNS)


def compile_model(model: Any, plan: UNetPlan) -> Any:
    """Attach the plan's optimiser and Dice/Tversky loss (the learning rate is set per step)."""
    import keras

    from unet_candidates.model import DiceLoss

    if plan.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=plan.learning_rate)
    else:
        optimizer = keras.optimizers.SGD(
            learning_rate=plan.learning_rate, momentum=0.9, nesterov=True
        )
    model.compile(
        optimizer=optimizer,
        loss=DiceLoss(
            smooth=plan.dice_smooth,
            fn_weight=plan.fn_weight,
            bce_weight=plan.bce_weight,
            hard_negative_fraction=plan.hard_negative_fraction,
        ),
        # XLA does not pay on TensorFlow's CPU path; on JAX, False would run every step
        # eagerly (about 1 s per step on a GPU whatever the batch).
        jit_compile=keras.backend.backend() != "tensorflow",
    )
    return model


def cosine_learning_rate(plan: UNetPlan, progress: float) -> float:
    """Cosine decay from ``plan.learning_rate`` to 5 % of it as ``progress`` goes 0 -> 1."""
    progress = min(max(progress, 0.0), 1.0)
    return plan.learning_rate * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def dice_score(y_true: np.ndarray, y_pred: np.ndarray, smooth: float = 1.0) -> float:
    """Soft Dice of two arrays (pooled over everything; targets above 1 are left out)."""
    valid = y_true <= 1.0
    y_true, y_pred = y_true * valid, y_pred * valid
    inter = float(np.sum(y_true * y_pred))
    return (2.0 * inter + smooth) / (float(np.sum(y_true) + np.sum(y_pred)) + smooth)


def _save_model(model: Any, path: Path) -> None:
    with atomic_path(path, suffix=".keras", check=keras_file_problem) as tmp:
        model.save(tmp)


def _nodules_by_series(
    annotations_path: Path, uids: Iterable[str], excluded: bool = False
) -> dict[str, np.ndarray]:
    return _findings_by_series(annotations_path, uids, excluded)[0]


def _findings_by_series(
    annotations_path: Path, uids: Iterable[str], excluded: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per series: ``(N, 4)`` ``x, y, z, diameter_mm`` rows, and their ``(N,)`` reader
    counts (0 = unknown, all 0 when the table has no ``reader_count`` column)."""
    from lungct.tables import read_annotations

    table = read_annotations(annotations_path, allow_negative_diameter=excluded)
    readers = (
        np.zeros(len(table), np.int64)
        if table.reader_count is None
        else table.reader_count.astype(np.int64)
    )
    rows_out, readers_out = {}, {}
    for uid in uids:
        rows = table.rows_in_series(uid)
        rows_out[uid] = np.column_stack([table.coords[rows], table.diameter_mm[rows]]).reshape(
            -1, 4
        )
        readers_out[uid] = readers[rows]
    return rows_out, readers_out


def unet_scan_samples(
    scan: Any,
    nodules: np.ndarray,
    plan: UNetPlan,
    rng: np.random.Generator | None = None,
    excluded: np.ndarray | None = None,
    reader_count: np.ndarray | None = None,
    excluded_reader_count: np.ndarray | None = None,
) -> ScanSamples:
    """:func:`unet_candidates.data.build_scan_samples`, keeping the nodules' reader counts
    (the U-Net leaves every excluded finding out of its loss, whatever its count)."""
    samples = build_scan_samples(scan, nodules, plan, rng=rng, excluded=excluded)
    if reader_count is not None:
        samples.reader_count = np.asarray(reader_count, np.int64).reshape(-1)
    return samples


class _Logger:
    """``train_log.csv``, rewritten atomically after every epoch."""

    def __init__(self, path: Path, resume: bool, columns: tuple[str, ...] = LOG_COLUMNS) -> None:
        self.path = path
        self.columns = columns
        self.rows: list[dict] = []
        if resume and path.is_file():
            with path.open(newline="") as f:
                self.rows = list(csv.DictReader(f))

    def truncate(self, epochs: int) -> None:
        self.rows = [r for r in self.rows if int(r["epoch"]) <= epochs]

    def append(self, row: dict) -> None:
        self.rows.append({k: row.get(k, "") for k in self.columns})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text_atomic(self.path, buf.getvalue())


def _resolve_scans(
    data_dir: Path, cache: ScanCache, folds: list[int], val_folds: list[int], workers: int
) -> tuple[list[str], list[str], dict]:
    scans = find_scans(data_dir, folds + val_folds)
    empty = sorted(set(val_folds) - {s.fold for s in scans})
    if empty:
        raise LungCTError(
            data_dir,
            f"validation fold(s) {empty} hold no scan: name folds that hold scans, or pass "
            "--val-folds '' to train without validation",
        )
    missing = [s for s in scans if not cache.is_complete(s.seriesuid)]
    report: dict = {"failed": {}}
    if missing:
        print(f"preparing {len(missing)} scan(s) into the cache {cache.root}", file=sys.stderr)
        existing = cache.plan if (cache.root / "plan.json").is_file() else None
        report = prepare_dataset(
            data_dir, cache.root, existing, folds=folds + val_folds, workers=workers
        )
        for message in report["failed"].values():
            print(f"warning: skipped: {message}", file=sys.stderr)
    train_uids, val_uids = [], []
    for s in scans:
        if not cache.is_complete(s.seriesuid):
            continue
        (train_uids if s.fold in folds else val_uids).append(s.seriesuid)
    if not train_uids:
        raise LungCTError(data_dir, f"no usable training scan in folds {folds}")
    return train_uids, val_uids, report


def _samples(
    network: CandidateNetwork,
    cache: ScanCache,
    uids: list[str],
    nodules: dict[str, np.ndarray],
    excluded: dict[str, np.ndarray],
    readers: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
    plan: Any,
    seed: int,
    progress: bool,
    desc: str,
) -> list[ScanSamples]:
    rng = np.random.default_rng(seed)
    out = []
    for uid in tqdm(uids, desc=desc, unit="scan", disable=not progress, leave=False):
        scan = cache.open(uid)
        none = np.zeros((0, 4))
        out.append(
            network.scan_samples(
                scan,
                nodules.get(uid, none),
                plan,
                rng=rng,
                excluded=excluded.get(uid, none),
                reader_count=readers[0].get(uid, np.zeros(0, np.int64)),
                excluded_reader_count=readers[1].get(uid, np.zeros(0, np.int64)),
            )
        )
    return out


def train(
    plan: UNetPlan | None,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    folds: list[int],
    val_folds: list[int],
    out_dir: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    excluded: str | os.PathLike | None = None,
    resume: bool = False,
    max_minutes: float | None = None,
    progress: bool = True,
    prepare_workers: int = 2,
) -> dict:
    """Train (or resume training) a candidate network of ``network``'s kind into a model
    folder; return a summary dict. :func:`train` is this for the U-Net.

    Args:
        network: the kind of network (:data:`UNET_NETWORK`, or the CenterNet's).
        plan: the plan (``None`` with ``resume``: the saved one).
        data_dir: LUNA16-layout folder (``subsetN/*.mhd``, ``annotations.csv``).
        cache_dir: per-scan cache; missing entries of the folds are prepared first.
        folds: training subsets; val_folds: validation subsets (may be empty).
        out_dir: the model folder.
        annotations: nodule table (default ``data_dir/annotations.csv``).
        excluded: findings the loss ignores (default ``data_dir/annotations_excluded.csv``
            when it exists; ``""`` = none).
        resume: continue from the newest checkpoint in ``out_dir``.
        max_minutes: stop after the epoch during which this much wall time (all runs of this
            folder together) has passed; the stopped epoch is validated and checkpointed.
        progress: progress bars.
        prepare_workers: processes for preparing missing cache entries.

    Raises:
        LungCTError: bad folds, missing data, a folder holding another run, a plan mismatch.
    """
    return fit_candidate_network(
        UNET_NETWORK,
        plan,
        data_dir,
        cache_dir,
        folds,
        val_folds,
        out_dir,
        annotations=annotations,
        excluded=excluded,
        resume=resume,
        max_minutes=max_minutes,
        progress=progress,
        prepare_workers=prepare_workers,
    )


def fit_candidate_network(
    network: CandidateNetwork,
    plan: Any | None,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    folds: list[int],
    val_folds: list[int],
    out_dir: str | os.PathLike,
    *,
    annotations: str | os.PathLike | None = None,
    excluded: str | os.PathLike | None = None,
    resume: bool = False,
    max_minutes: float | None = None,
    progress: bool = True,
    prepare_workers: int = 2,
) -> dict:
    """Train (or resume training) a candidate network of ``network``'s kind into a model
    folder; return a summary dict. :func:`train` is this for the U-Net.

    Args:
        network: the kind of network (:data:`UNET_NETWORK`, or the CenterNet's).
        plan: the plan (``None`` with ``resume``: the saved one).
        data_dir: LUNA16-layout folder (``subsetN/*.mhd``, ``annotations.csv``).
        cache_dir: per-scan cache; missing entries of the folds are prepared first.
        folds: training subsets; val_folds: validation subsets (may be empty).
        out_dir: the model folder.
        annotations: nodule table (default ``data_dir/annotations.csv``).
        excluded: findings the loss ignores (default ``data_dir/annotations_excluded.csv``
            when it exists; ``""`` = none).
        resume: continue from the newest checkpoint in ``out_dir``.
        max_minutes: stop after the epoch during which this much wall time (all runs of this
            folder together) has passed; the stopped epoch is validated and checkpointed.
        progress: progress bars.
        prepare_workers: processes for preparing missing cache entries.

    Raises:
        LungCTError: bad folds, missing data, a folder holding another run, a plan mismatch.
    """
    if plan is not None and not isinstance(plan, network.plan_class):
        raise TypeError(
            f"{network.what(plan)} trains from a {network.plan_class.__name__}, "
            f"not a {type(plan).__name__}"
        )
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    state_path = ckpt_dir / STATE_FILE
    overlap = sorted(set(folds) & set(val_folds))
    if overlap:
        raise LungCTError(None, f"folds {overlap} are both training and validation folds")
    if resume:
        if not state_path.is_file():
            raise LungCTError(out_dir, "nothing to resume: no checkpoints/state.json")
        saved = network.plan_class.load(out_dir / PLAN_FILE)
        if plan is not None and plan != saved:
            raise LungCTError(
                out_dir / PLAN_FILE, "the saved plan differs from the requested one; not resuming"
            )
        plan = saved
        state = read_json(state_path)
        if not isinstance(state, dict) or not (
            isinstance(state.get("epoch"), int) and isinstance(state.get("checkpoint"), str)
        ):
            raise LungCTError(
                state_path, "broken training state (no epoch count or checkpoint): start anew"
            )
        trained = state.get("plan")
        if isinstance(trained, dict):  # the plan the checkpoints were trained with
            changes = describe_plan_changes(trained, plan.to_dict())
            if changes:
                raise LungCTError(
                    out_dir / PLAN_FILE,
                    f"edited since training started ({changes}): restore it to resume",
                )
    else:
        if plan is None:
            raise TypeError("plan is required for a new run")
        if state_path.is_file() or (out_dir / MODEL_FILE).is_file():
            raise LungCTError(
                out_dir, "already holds a training run; use --resume or another --out folder"
            )
        state = {"epoch": 0, "elapsed_s": 0.0, "best_val_loss": None, "best_epoch": None}
    annotations = Path(annotations) if annotations else data_dir / "annotations.csv"
    if not annotations.is_file():
        raise LungCTError(annotations, "annotation table not found (pass --annotations)")
    cache = ScanCache(cache_dir)
    # Prepare missing cache entries before TensorFlow starts its threads (the preparation
    # forks worker processes).
    train_uids, val_uids, _ = _resolve_scans(data_dir, cache, folds, val_folds, prepare_workers)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan.save(out_dir / PLAN_FILE)

    import keras

    import unet_candidates.model  # noqa: F401  (registers the custom classes)

    nodules, readers = _findings_by_series(annotations, train_uids + val_uids)
    if excluded is None and (data_dir / "annotations_excluded.csv").is_file():
        excluded = data_dir / "annotations_excluded.csv"
    ignored: dict[str, np.ndarray] = {}
    ignored_readers: dict[str, np.ndarray] = {}
    if excluded:
        excluded = Path(excluded)
        ignored, ignored_readers = _findings_by_series(
            excluded, train_uids + val_uids, excluded=True
        )
    counts = (readers, ignored_readers)
    manifest = {
        "plan": plan.name,
        "dims": plan.dims,
        "data_dir": str(data_dir.resolve()),
        "cache_dir": str(Path(cache_dir).resolve()),
        "annotations": str(annotations.resolve()),
        "excluded": str(excluded.resolve()) if excluded else None,
        "cache_plan": cache.plan.to_dict(),
        "train_folds": list(folds),
        "val_folds": list(val_folds),
        "train_series": train_uids,
        "val_series": val_uids,
        "train_nodules": int(sum(len(nodules[u]) for u in train_uids)),
        "val_nodules": int(sum(len(nodules[u]) for u in val_uids)),
        "versions": {
            "python": platform.python_version(),
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
        },
    }
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)

    train_samples = _samples(
        network, cache, train_uids, nodules, ignored, counts, plan, plan.seed, progress, "index"
    )
    sampler = network.sampler(cache, train_samples, plan, augment=True, seed=plan.seed)
    val_set = None
    if val_uids and plan.val_patches > 0:
        val_samples = _samples(
            network, cache, val_uids, nodules, ignored, counts, plan, plan.seed + 1, progress, "val"
        )
        if val_samples:
            val_sampler = network.sampler(
                cache, val_samples, plan, augment=False, seed=plan.seed + 1
            )
            val_set = val_sampler.fixed_set(plan.val_patches)

    keras.utils.set_random_seed(plan.seed + state["epoch"])
    if resume:
        ckpt = ckpt_dir / state["checkpoint"]
        model = load_keras_model(
            ckpt,
            classes=(network.keras_class(plan),),
            what=f"{network.what(plan)} checkpoint of this plan",
            architecture=network.architecture(plan),
            plan_path=out_dir / PLAN_FILE,
            compile=True,
        )
    else:
        model = network.build(plan)

    logger = _Logger(out_dir / LOG_FILE, resume, network.log_columns)
    logger.truncate(state["epoch"])
    t_start = time.perf_counter()
    elapsed0 = float(state["elapsed_s"])
    stopped_by_time = False
    first_step = True
    total_steps = plan.epochs * plan.steps_per_epoch
    lr = cosine_learning_rate(plan, state["epoch"] / plan.epochs)
    for epoch in range(state["epoch"], plan.epochs):
        t_epoch = time.perf_counter()
        bar = keras.utils.Progbar(plan.steps_per_epoch, verbose=1 if progress else 0)
        losses, steps, timed_samples, timed_seconds = [], 0, 0, 0.0
        for x, y in prefetch(sampler.batches(epoch), depth=plan.prefetch_batches):
            # The learning rate follows a cosine over the run's budget: the planned steps, or
            # --max-minutes when that ends first (a resumed run picks up where it was).
            done = (epoch * plan.steps_per_epoch + steps) / total_steps
            if max_minutes:
                elapsed = elapsed0 + time.perf_counter() - t_start
                done = max(done, elapsed / (60.0 * max_minutes))
            lr = cosine_learning_rate(plan, done)
            model.optimizer.learning_rate.assign(lr)
            t_step = time.perf_counter()
            logs = model.train_on_batch(x, y, return_dict=True)
            dt = time.perf_counter() - t_step
            if not first_step:  # the first step traces the graph
                timed_samples += len(x)
                timed_seconds += dt
            first_step = False
            losses.append(float(logs["loss"]))
            steps += 1
            bar.update(steps, values=[("loss", losses[-1])])
            if max_minutes and elapsed0 + time.perf_counter() - t_start > 60.0 * max_minutes:
                stopped_by_time = True
                break
        val_loss, val_metric = network.validate(model, val_set, plan)
        row = {
            "epoch": epoch + 1,
            "steps": steps,
            "loss": f"{np.mean(losses):.5f}" if losses else "",
            "val_loss": "" if val_loss is None else f"{val_loss:.5f}",
            network.metric: "" if val_metric is None else f"{val_metric:.5f}",
            "learning_rate": f"{lr:.3g}",
            "epoch_seconds": f"{time.perf_counter() - t_epoch:.1f}",
            "samples_per_s": f"{timed_samples / timed_seconds:.2f}" if timed_seconds else "",
            "elapsed_s": f"{elapsed0 + time.perf_counter() - t_start:.1f}",
        }
        logger.append(row)
        name = f"epoch_{epoch + 1:03d}.keras"
        _save_model(model, ckpt_dir / name)
        # The model is the last epoch's: the learning rate has decayed along a cosine to the
        # end of the budget, and on a few dozen validation patches the loss is too noisy to
        # pick an epoch by (picking by it cost 13 points of sensitivity in a 10-minute run).
        # The best validation epoch is recorded for the record.
        _save_model(model, out_dir / MODEL_FILE)
        best = state["best_val_loss"]
        improved = val_loss is not None and (best is None or val_loss < best)
        if improved:
            state.update(best_val_loss=val_loss, best_epoch=epoch + 1)
        state.update(
            epoch=epoch + 1,
            checkpoint=name,
            elapsed_s=round(elapsed0 + time.perf_counter() - t_start, 1),
            plan=plan.to_dict(),
        )
        write_json_atomic(state_path, state)
        for old in sorted(ckpt_dir.glob("epoch_*.keras"))[:-KEEP_CHECKPOINTS]:
            old.unlink()
        if progress:
            print(
                f"epoch {epoch + 1}/{plan.epochs}: loss {row['loss']} val_loss {row['val_loss']} "
                f"{network.metric} {row[network.metric]} ({row['samples_per_s']} samples/s)"
                + (" *" if improved else ""),
                file=sys.stderr,
            )
        if stopped_by_time:
            break
    summary = {
        "epochs_done": state["epoch"],
        "epochs_planned": plan.epochs,
        "stopped_by_time": stopped_by_time,
        "best_epoch": state["best_epoch"],
        "best_val_loss": state["best_val_loss"],
        "elapsed_s": state["elapsed_s"],
        "train_scans": len(train_samples),
        "train_nodules": manifest["train_nodules"],
        "model": str(out_dir / MODEL_FILE),
    }
    manifest["training"] = summary
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    plan.save(out_dir / PLAN_FILE)  # what was trained, should the file have been edited meanwhile
    seal_model_dir(  # last: the seal is the folder's done marker
        out_dir,
        network.stage,
        train_seconds=state["elapsed_s"],
        data_dir=data_dir,
        seeds={"plan": plan.seed},
        steps=state["epoch"] * plan.steps_per_epoch,
        extra={"epochs": state["epoch"], "stopped_by_time": stopped_by_time},
        plan=plan.to_dict(),
    )
    return summary


def _validate(model, val_set, plan: UNetPlan) -> tuple[float | None, float | None]:
    """``(1 - soft Dice, Dice of the thresholded map)`` on the validation patches."""
    if val_set is None:
        return None, None
    x, y = val_set
    pred = np.concatenate(
        [
            np.asarray(model.predict_on_batch(x[i : i + plan.batch_size]))
            for i in range(0, len(x), plan.batch_size)
        ]
    )
    soft = dice_score(y, pred, plan.dice_smooth)
    hard = dice_score(y, (pred > plan.threshold).astype(np.float32), plan.dice_smooth)
    return 1.0 - soft, hard


UNET_NETWORK = CandidateNetwork(
    stage="unet",
    plan_class=UNetPlan,
    build=lambda plan: compile_model(plan.build_model(), plan),
    keras_class=lambda plan: UNET_CLASSES[plan.dims],
    architecture=unet_architecture,
    what=lambda plan: f"a {plan.dims} U-Net",
    sampler=PatchSampler,
    scan_samples=unet_scan_samples,
    validate=_validate,
)
"""The U-Net's hooks of the training loop."""
