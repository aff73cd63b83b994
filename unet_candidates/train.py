"""Training of the candidate networks (the U-Net and the CenterNet) from the per-scan cache,
on the suite's training contract (:mod:`lungct.training`).

The model folder::

    OUT/plan.json                    the resolved plan (written first; a resumed run must
                                     match it)
    OUT/manifest.json                data folder, cache, training/validation folds and series;
                                     sealed (checksums, trained plan) when training ends: the
                                     seal is the folder's done marker (:mod:`lungct.modeldir`)
    OUT/model.keras                  the model after the last finished epoch, written
                                     atomically (the validation loss of each epoch is in the
                                     log, its best in the manifest); usable before the seal
                                     with --allow-unfinished
    OUT/checkpoints/epoch_NNN.keras  model + optimiser after each epoch (the newest two kept)
    OUT/checkpoints/backup/          the state ``--resume`` continues from
    OUT/logs/train_log.csv           one row per epoch (epochs counted from 0)
    OUT/logs/train/                  TensorBoard event files

Training is ``model.fit`` on a ``keras.utils.PyDataset`` of the sampler's batches: epoch ``e``
always draws the same patches, so a resumed run continues the stream an uninterrupted one
would have seen. The learning rate follows a cosine over the plan's steps, or over this run's
``--max-minutes`` where that ends first; ``--resume`` continues to the plan's last epoch.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lungct.cache import ScanCache, find_scans, prepare_dataset
from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic
from lungct.modeldir import (
    MANIFEST_NAME,
    describe_plan_changes,
    load_keras_model,
    seal_model_dir,
)
from lungct.patches import prefetch
from lungct.training import (
    chief_floats,
    fit_callbacks,
    fit_epochs,
    from_chief,
    has_training_state,
    is_chief,
    local_call,
    log_float,
    make_strategy,
    prepare_model,
    read_log,
    replicas,
    restored_epoch,
    save_model_atomic,
    strategy_scope,
    task_name,
    worker_count,
    worker_dir,
)
from unet_candidates.config import PLAN_FILE, UNetPlan
from unet_candidates.data import PatchSampler, ScanSamples, build_scan_samples
from unet_candidates.extract import MODEL_FILE, UNET_CLASSES, unet_architecture

CHECKPOINT_DIR = "checkpoints"
LEGACY_STATE_FILE = "state.json"
"""``checkpoints/state.json``: the resume state of folders written by the former loop."""
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
    strategy: str = "none",
    mixed_precision: bool = False,
) -> dict:
    """Train (or resume training) a U-Net into a model folder; return a summary dict
    (:func:`fit_candidate_network` with :data:`UNET_NETWORK`).

    Args:
        plan: the plan (``None`` with ``resume``: the saved one).
        data_dir: LUNA16-layout folder (``subsetN/*.mhd``, ``annotations.csv``).
        cache_dir: per-scan cache; missing entries of the folds are prepared first.
        folds: training subsets; val_folds: validation subsets (may be empty).
        out_dir: the model folder.
        annotations: nodule table (default ``data_dir/annotations.csv``).
        excluded: findings the loss ignores (default ``data_dir/annotations_excluded.csv``
            when it exists; ``""`` = none).
        resume: continue the folder's training to the plan's last epoch.
        max_minutes: this run's time budget: once spent, the run stops after the batch under
            way, ends its epoch (validation, checkpoint, log row) and seals the folder.
        progress: one line per epoch on stderr.
        prepare_workers: processes for preparing missing cache entries.
        strategy: ``none``, ``mirrored`` or ``multiworker``
            (:func:`lungct.training.make_strategy`; made first, before any other TensorFlow
            op). Under ``multiworker`` every worker runs this with the same arguments (a
            resumed run names its plan on every worker); the chief writes ``out_dir``, the
            others a temporary copy that is removed (:func:`lungct.training.worker_dir`).
        mixed_precision: compute in float16 (GPUs).

    Raises:
        LungCTError: bad folds, missing data, a folder holding another run, a plan mismatch;
            a bad ``TF_CONFIG`` or a worker of the cluster that stopped.
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
        strategy=strategy,
        mixed_precision=mixed_precision,
    )


def _candidate_batches_class() -> type:
    import keras

    class CandidateBatches(keras.utils.PyDataset):
        """The sampler's batches of one epoch as a ``keras.utils.PyDataset``.

        The sampler streams an epoch's patches through its bounded shuffle buffer (the scans
        are read in groups, never all at once), so batch ``i`` follows batch ``i - 1``: the
        batches are made in order by one background thread, up to ``depth`` batches ahead
        of the step (the plan's ``prefetch_batches``; 0 cuts each batch when it is asked
        for), so cutting overlaps training and memory stays bounded by ``depth`` batches.
        The first two batches are held for the epoch (Keras reads them once to learn the
        shapes, then again to train); a batch asked for out of order restarts the epoch's
        stream, which gives the same batches again (epoch ``e`` is a function of the seed
        and ``e``). :meth:`close` stops the background thread.
        """

        HELD = 2

        def __init__(self, sampler: Any, epoch: int, steps: int, depth: int = 0) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.sampler, self.epoch, self.steps, self.depth = sampler, epoch, steps, depth
            self._lock = threading.Lock()
            self._stream: Any = None
            self._restart()

        def _restart(self) -> None:
            self._stop_stream()
            self._stream = prefetch(self.sampler.batches(self.epoch, self.steps), self.depth)
            self._next = 0
            self._held: dict[int, Any] = {}

        def _stop_stream(self) -> None:
            if self._stream is not None:
                self._stream.close()  # ends the background thread of an unfinished epoch
                self._stream = None

        def close(self) -> None:
            """Stop making batches (the end of training)."""
            with self._lock:
                self._stop_stream()

        def __len__(self) -> int:
            return self.steps

        def __getitem__(self, i: int) -> Any:
            with self._lock:
                if i in self._held:
                    return self._held[i]
                if i < self._next:
                    self._restart()
                batch = None
                while self._next <= i:
                    batch = next(self._stream)
                    if self._next < self.HELD:
                        self._held[self._next] = batch
                    self._next += 1
                return batch

        def set_epoch(self, epoch: int) -> None:
            """The epoch that begins (:func:`lungct.training.fit_callbacks` calls it)."""
            with self._lock:
                if epoch != self.epoch:
                    self.epoch = epoch
                    self._restart()

    return CandidateBatches


def _schedule_callback(plan: Any, max_minutes: float | None, strategy: Any = None) -> Any:
    import keras

    class CosineSchedule(keras.callbacks.Callback):
        """The learning rate of every step: a cosine over the plan's steps, or over this
        run's ``--max-minutes`` where that ends first (a short run ends annealed, not at the
        top of its schedule). A resumed run follows the plan's steps again from where it is.
        On several workers the budget's share spent is the chief's, so every worker steps
        with the same rate."""

        def __init__(self) -> None:
            super().__init__()
            self.rate = cosine_learning_rate(plan, 0.0)
            self._epoch = 0
            self._start = time.monotonic()

        def on_train_begin(self, logs: dict | None = None) -> None:
            self._start = time.monotonic()

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._epoch = epoch

        def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
            done = (self._epoch * plan.steps_per_epoch + batch) / (
                plan.epochs * plan.steps_per_epoch
            )
            if max_minutes:
                spent = (time.monotonic() - self._start) / (60.0 * max_minutes)
                if worker_count(strategy) > 1:
                    (spent,) = chief_floats(strategy, [spent])
                done = max(done, spent)
            self.rate = cosine_learning_rate(plan, done)
            self.model.optimizer.learning_rate.assign(self.rate)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            if logs is not None:
                logs["learning_rate"] = float(self.rate)

    return CosineSchedule()


class _LocalModel:
    """A model's ``predict_on_batch`` on this process's copy of it
    (:func:`lungct.training.local_call`), for the networks' ``validate`` hooks."""

    def __init__(self, model: Any) -> None:
        self.predict_on_batch = local_call(model)


def _stage_callback(
    network: CandidateNetwork,
    plan: Any,
    val_set: Any,
    out_dir: Path,
    distributed: bool,
    chief: bool = True,
) -> Any:
    import keras

    class Validation(keras.callbacks.Callback):
        """At the end of every epoch: the validation loss and the network's metric into the
        epoch's logs, and ``model.keras`` refreshed (atomically) with the epoch's weights, so
        a folder in training is usable with ``--allow-unfinished``. Under a strategy the
        model predicts on this process alone (:func:`lungct.training.local_call`); on a
        cluster only the chief, whose log is kept, validates (the others log NaN)."""

        def __init__(self) -> None:
            super().__init__()
            self._local: Any = None

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            model = self.model
            if distributed:
                self._local = self._local or _LocalModel(self.model)
                model = self._local
            val_loss, metric = network.validate(model, val_set, plan) if chief else (None, None)
            if logs is not None:
                logs["val_loss"] = math.nan if val_loss is None else float(val_loss)
                logs[network.metric] = math.nan if metric is None else float(metric)
            save_model_atomic(self.model, out_dir / MODEL_FILE)

    return Validation()


def _read_manifest(out_dir: Path) -> dict | None:
    try:
        value = read_json(out_dir / MANIFEST_NAME)
    except LungCTError:
        return None
    return value if isinstance(value, dict) else None


def _legacy_state(out_dir: Path) -> dict | None:
    """``checkpoints/state.json`` of a folder written by the suite's former training loop."""
    path = out_dir / CHECKPOINT_DIR / LEGACY_STATE_FILE
    if not path.is_file():
        return None
    state = read_json(path)
    if not isinstance(state, dict) or not (
        isinstance(state.get("epoch"), int) and isinstance(state.get("checkpoint"), str)
    ):
        raise LungCTError(path, "broken training state (no epoch count or checkpoint): start anew")
    return state


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
    strategy: str = "none",
    mixed_precision: bool = False,
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
        resume: continue the folder's training to the plan's last epoch.
        max_minutes: this run's time budget: once spent, the run stops after the batch under
            way, ends its epoch (validation, checkpoint, log row) and seals the folder.
        progress: one line per epoch on stderr.
        prepare_workers: processes for preparing missing cache entries.
        strategy: ``none``, ``mirrored`` or ``multiworker``
            (:func:`lungct.training.make_strategy`; made first, before any other TensorFlow
            op). Under ``multiworker`` every worker runs this with the same arguments (a
            resumed run names its plan on every worker); the chief writes ``out_dir``, the
            others a temporary copy that is removed (:func:`lungct.training.worker_dir`).
        mixed_precision: compute in float16 (GPUs).

    Raises:
        LungCTError: bad folds, missing data, a folder holding another run, a plan mismatch;
            a bad ``TF_CONFIG`` or a worker of the cluster that stopped.
    """
    if plan is not None and not isinstance(plan, network.plan_class):
        raise TypeError(
            f"{network.what(plan)} trains from a {network.plan_class.__name__}, "
            f"not a {type(plan).__name__}"
        )
    overlap = sorted(set(folds) & set(val_folds))
    if overlap:
        raise LungCTError(None, f"folds {overlap} are both training and validation folds")
    # First: MultiWorkerMirroredStrategy must be made before any other TensorFlow op.
    dist = make_strategy(strategy)
    with worker_dir(out_dir, dist) as folder:
        return _fit(
            network,
            plan,
            Path(data_dir),
            cache_dir,
            folds,
            val_folds,
            Path(out_dir),
            folder,
            dist,
            annotations=annotations,
            excluded=excluded,
            resume=resume,
            max_minutes=max_minutes,
            progress=progress,
            prepare_workers=prepare_workers,
            strategy=strategy,
            mixed_precision=mixed_precision,
        )


def _fit(
    network: CandidateNetwork,
    plan: Any | None,
    data_dir: Path,
    cache_dir: str | os.PathLike,
    folds: list[int],
    val_folds: list[int],
    model_dir: Path,
    out_dir: Path,
    dist: Any,
    *,
    annotations: str | os.PathLike | None,
    excluded: str | os.PathLike | None,
    resume: bool,
    max_minutes: float | None,
    progress: bool,
    prepare_workers: int,
    strategy: str,
    mixed_precision: bool,
) -> dict:
    """:func:`fit_candidate_network` once its strategy is made: ``model_dir`` is the model
    folder, ``out_dir`` the folder this worker writes (the model folder on the chief)."""
    chief = is_chief(dist)
    legacy = _legacy_state(out_dir)
    started = has_training_state(out_dir) or (out_dir / MODEL_FILE).is_file()
    if legacy is not None and worker_count(dist) > 1:
        raise LungCTError(
            out_dir / CHECKPOINT_DIR / LEGACY_STATE_FILE,
            "a folder of an earlier version resumes on one machine only: resume it once "
            "without --strategy multiworker",
        )
    if resume and not chief:
        # The chief alone reads the model folder; this worker trains the plan it was given.
        if plan is None:
            raise LungCTError(
                model_dir,
                "--strategy multiworker --resume needs the plan on every worker (--plan or "
                "--preset): only the chief reads --out",
            )
    elif resume:
        # A folder killed before its first checkpoint holds only its plan: it starts over.
        if not has_training_state(out_dir) and not (out_dir / PLAN_FILE).is_file():
            raise LungCTError(out_dir, "nothing to resume: no training run in this folder")
        saved = network.plan_class.load(out_dir / PLAN_FILE)
        if plan is not None and plan != saved:
            raise LungCTError(
                out_dir / PLAN_FILE, "the saved plan differs from the requested one; not resuming"
            )
        plan = saved
        previous = _read_manifest(out_dir)
        trained = None
        if isinstance(previous, dict):
            trained = previous.get("training_plan") or previous.get("trained_plan")
        if trained is None and legacy is not None:
            trained = legacy.get("plan")
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
        if started:
            raise LungCTError(
                out_dir, "already holds a training run; use --resume or another --out folder"
            )
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
        "training_plan": plan.to_dict(),
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
    if val_uids and plan.val_patches > 0 and chief:  # the chief alone validates
        val_samples = _samples(
            network, cache, val_uids, nodules, ignored, counts, plan, plan.seed + 1, progress, "val"
        )
        if val_samples:
            val_sampler = network.sampler(
                cache, val_samples, plan, augment=False, seed=plan.seed + 1
            )
            val_set = val_sampler.fixed_set(plan.val_patches)

    # Where this run starts: Keras' backup (weights, optimiser, epoch), or the newest
    # checkpoint of a folder written by the suite's former loop.
    (start_epoch,) = from_chief(dist, [restored_epoch(out_dir)])
    with strategy_scope(strategy, mixed_precision, strategy=dist) as scope:
        if not start_epoch and legacy is not None:
            start_epoch = int(legacy["epoch"])
            model = load_keras_model(
                out_dir / CHECKPOINT_DIR / legacy["checkpoint"],
                classes=(network.keras_class(plan),),
                what=f"{network.what(plan)} checkpoint of this plan",
                architecture=network.architecture(plan),
                plan_path=out_dir / PLAN_FILE,
                compile=True,
            )
        else:
            keras.utils.set_random_seed(plan.seed)
            model = network.build(plan)
    prepare_model(model, scope)
    # Every worker streams the whole global batch; the strategy gives each its share.
    batches = _candidate_batches_class()(
        sampler, start_epoch, plan.steps_per_epoch, plan.prefetch_batches
    )
    label = network.stage if chief else f"{network.stage} {task_name(dist)}"
    callbacks, budget = fit_callbacks(
        out_dir,
        label=label,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        max_minutes=max_minutes,
        resume=resume,
        shown=("loss", "val_loss", network.metric),
        keep_checkpoints=KEEP_CHECKPOINTS,
        progress=progress,
        seed=plan.seed,
        data=batches,
        strategy=scope,
        mixed_precision=mixed_precision,
        before=(
            _schedule_callback(plan, max_minutes, scope),
            _stage_callback(network, plan, val_set, out_dir, scope is not None, chief),
        ),
    )
    if progress:
        print(
            f"[{label}] {len(train_samples)} training scans, "
            f"{manifest['train_nodules']} nodules; epochs {start_epoch + 1}-{plan.epochs} of "
            f"{plan.steps_per_epoch} steps"
            + (f" on {replicas(scope)} replicas" if scope is not None else "")
            + (f" of {worker_count(scope)} workers" if worker_count(scope) > 1 else ""),
            file=sys.stderr,
            flush=True,
        )
    fit_epochs(
        model,
        batches,
        epochs=plan.epochs,
        start_epoch=start_epoch,
        callbacks=callbacks,
        strategy=scope,
    )
    log = read_log(out_dir)
    epochs_done = int(log_float(log[-1], "epoch")) + 1 if log else start_epoch
    stopped_by_time = bool(budget.stopped)
    if progress and stopped_by_time:
        print(f"time budget of {max_minutes} min reached; stopping", file=sys.stderr, flush=True)
    val_losses = [(log_float(r, "val_loss"), int(log_float(r, "epoch")) + 1) for r in log]
    val_losses = [(v, e) for v, e in val_losses if math.isfinite(v)]
    best_val_loss, best_epoch = min(val_losses) if val_losses else (None, None)
    elapsed = sum(log_float(r, "seconds") for r in log if r.get("seconds"))
    elapsed += float(legacy.get("elapsed_s", 0.0)) if legacy else 0.0
    steps = int(sum(log_float(r, "steps") for r in log if r.get("steps")))
    if legacy:
        steps += int(legacy["epoch"]) * plan.steps_per_epoch
    # The model is the last epoch's: the learning rate has decayed along a cosine to the
    # end of the budget, and on a few dozen validation patches the loss is too noisy to
    # pick an epoch by (picking by it cost 13 points of sensitivity in a 10-minute run).
    # The best validation epoch is recorded for the record.
    save_model_atomic(model, out_dir / MODEL_FILE)
    summary = {
        "epochs_done": epochs_done,
        "epochs_planned": plan.epochs,
        "stopped_by_time": stopped_by_time,
        "best_epoch": best_epoch,
        "best_val_loss": best_val_loss,
        "elapsed_s": round(elapsed, 1),
        "train_scans": len(train_samples),
        "train_nodules": manifest["train_nodules"],
        "replicas": replicas(scope),
        "workers": worker_count(scope),
        "chief": chief,
        "model": str(model_dir / MODEL_FILE),
    }
    manifest["training"] = summary
    write_json_atomic(out_dir / MANIFEST_NAME, manifest)
    plan.save(out_dir / PLAN_FILE)  # what was trained, should the file have been edited meanwhile
    seal_model_dir(  # last: the seal is the folder's done marker
        out_dir,
        network.stage,
        train_seconds=round(elapsed, 1),
        data_dir=data_dir,
        seeds={"plan": plan.seed},
        steps=steps,
        extra={
            "epochs": epochs_done,
            "stopped_by_time": stopped_by_time,
            "strategy": strategy,
            "replicas": replicas(scope),
            "workers": worker_count(scope),
        },
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
