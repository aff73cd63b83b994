"""Training of the false-positive reducers: balanced streamed batches, ``model.fit`` on the
suite's training contract, resume, and the fold guard.

Model folder layout (:mod:`lungct.training`)::

    OUT/plan.json                    the plan (FPRPlan) the model was trained with
    OUT/manifest.json                folds and series trained / validated / held out; sealed
                                     (checksums, trained plan) when training ends: the seal
                                     is the folder's done marker (:mod:`lungct.modeldir`)
    OUT/checkpoints/epoch_NNN.keras  model + optimiser state after epoch NNN
    OUT/checkpoints/backup/          the state ``--resume`` continues from
    OUT/logs/train_log.csv           one row per epoch (loss, accuracy, learning rate,
                                     validation loss / AUC / accuracy, seconds, samples/s)
    OUT/logs/train/                  TensorBoard event files
    OUT/model.keras                  the final model (what ``predict`` loads), written
                                     atomically

The learning rate is decayed each epoch (2.5 % in the paper's plan); validation AUC is
computed over the validation candidates after each epoch.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from fp_reduction_3dcnn.config import RENAMED_FIELDS, FPRPlan
from fp_reduction_3dcnn.data import (
    PatchCutter,
    check_cache_has,
    excluded_rows,
    load_candidates,
    rows_in_folds,
    series_folds,
)
from fp_reduction_3dcnn.manifest import FoldManifest, check_split
from fp_reduction_3dcnn.model import compile_model
from fp_reduction_3dcnn.networks import (
    NETWORK_CLASSES,
    build_network,
    mgicnn_architecture,  # noqa: F401  (imported from here by earlier callers)
    network_architecture,
    network_classes,
    network_description,
)
from fp_reduction_3dcnn.sampler import BalancedBatchSampler, validation_rows
from lungct.cache import ScanCache
from lungct.errors import LungCTError
from lungct.modeldir import MANIFEST_NAME, file_sha256, load_keras_model, seal_model_dir
from lungct.tables import CandidateTable, folds_from_layout
from lungct.training import (
    fit_callbacks,
    fit_epochs,
    from_chief,
    has_training_state,
    is_chief,
    latest_checkpoint,
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

__all__ = ["latest_checkpoint", "load_keras", "save_model_atomic", "train"]

MGICNN_CLASS = NETWORK_CLASSES["mgicnn"]
"""The registered Keras class an MGI-CNN model file must hold."""


def load_keras(
    path: str | os.PathLike,
    compile: bool = True,
    plan: FPRPlan | None = None,
    plan_path: str | os.PathLike | None = None,
) -> keras.Model:
    """Load a false-positive reducer's ``.keras`` file in safe mode (no arbitrary code), with a
    one-line error.

    The file's config is checked first (:func:`lungct.modeldir.load_keras_model`): foreign
    classes, Lambda layers and other networks are refused, and with ``plan`` so are a network
    other than the plan's and weights whose architecture is not the plan's (a file of an
    earlier version, whose config says ``integration`` for ``merge``, is compared under the new
    name). Without ``plan`` any of the suite's networks (:data:`NETWORK_CLASSES`) is accepted.
    """
    return load_keras_model(
        path,
        classes=network_classes(plan),
        what=network_description(plan),
        architecture=None if plan is None else network_architecture(plan),
        plan_path=plan_path,
        compile=compile,
        renamed_keys=RENAMED_FIELDS,
    )


def binary_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Cross-entropy, ROC AUC (NaN with one class) and accuracy at 0.5."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.clip(np.asarray(probs, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else math.nan
    auc = math.nan
    if 0 < y.sum() < len(y):
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(y, p))
    acc = float(np.mean((p >= 0.5) == (y > 0.5))) if len(y) else math.nan
    return {"val_loss": loss, "val_auc": auc, "val_accuracy": acc}


def _fmt(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


Predictor = Callable[[Sequence[np.ndarray]], np.ndarray]


def local_predictor(model: keras.Model, distributed: bool) -> Predictor:
    """``model.predict_on_batch``, or with ``distributed`` (a model built under a
    ``tf.distribute`` strategy) :func:`lungct.training.local_call`: a strategy's own
    ``predict_on_batch`` returns one copy of the output per replica."""
    if not distributed:
        return model.predict_on_batch
    predict = local_call(model)
    return lambda inputs: predict(list(inputs))


def predict_inputs(
    model: keras.Model,
    inputs: Sequence[np.ndarray],
    batch: int = 256,
    predict: Predictor | None = None,
) -> np.ndarray:
    """Probabilities ``(N,)`` for in-memory inputs, in batches (with ``predict``, else
    ``model.predict_on_batch``)."""
    predict = predict or model.predict_on_batch
    n = len(inputs[0])
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, batch):
        chunk = [x[start : start + batch] for x in inputs]
        out[start : start + batch] = np.asarray(predict(chunk)).reshape(-1)
    return out


VALIDATION_MEMORY_MB = 512
"""Validation patches up to this size are cut once and kept; larger sets (the single-patch
networks' 48 mm cubes cost 15 times the MGI-CNN's three scales) are cut anew at every epoch."""


class ValidationSet:
    """The validation rows and their patches: held in memory when they fit
    :data:`VALIDATION_MEMORY_MB`, else cut from the cache batch by batch at every epoch."""

    def __init__(self, cutter: PatchCutter, table: CandidateTable, rows: np.ndarray) -> None:
        self.cutter, self.table, self.rows = cutter, table, rows
        self.labels = table.label[rows]
        plan = cutter.plan
        mb = len(rows) * plan.scales * math.prod(plan.input_shape) * 4 / 2**20
        self.inputs = cutter.cut_rows(table, rows) if mb <= VALIDATION_MEMORY_MB else None

    def __len__(self) -> int:
        return len(self.rows)

    def predict(
        self, model: keras.Model, batch: int = 256, predict: Predictor | None = None
    ) -> np.ndarray:
        """The model's probabilities ``(N,)`` for the validation rows (with ``predict``,
        else ``model.predict_on_batch``)."""
        if self.inputs is not None:
            return predict_inputs(model, self.inputs, batch, predict)
        predict = predict or model.predict_on_batch
        out = np.empty(len(self.rows), dtype=np.float64)
        for start in range(0, len(self.rows), batch):
            inputs = self.cutter.cut_rows(self.table, self.rows[start : start + batch])
            out[start : start + batch] = np.asarray(predict(inputs)).reshape(-1)
        return out


def prepare_split(
    plan: FPRPlan,
    cache: ScanCache,
    table: CandidateTable,
    folds: Sequence[int],
    val_folds: Sequence[int],
    layout: dict[str, int] | None,
) -> tuple[np.ndarray, np.ndarray, dict[str, int | None]]:
    """Training and validation rows, with every series checked to be in its fold."""
    folds_of = series_folds(cache, table.uids, layout)
    train_rows = rows_in_folds(table, folds_of, folds)
    val_rows = rows_in_folds(table, folds_of, val_folds)
    # Defensive double check: not one training row may come from outside the training folds.
    train_set = {int(f) for f in folds}
    for k in np.unique(table.series_index[train_rows]):
        fold = folds_of[table.uids[int(k)]]
        if fold is None or fold not in train_set:  # pragma: no cover - rows_in_folds ensures it
            raise LungCTError(None, f"series {table.uids[int(k)]} is not in a training fold")
    if not len(train_rows):
        raise LungCTError(
            table.path,
            f"no candidates of the training folds {sorted(train_set)} (is the cache or --data "
            "the right one?)",
        )
    if val_folds and not len(val_rows):
        raise LungCTError(
            table.path,
            f"no candidates of the validation folds {sorted(int(f) for f in val_folds)}: "
            "name folds that hold scans, or leave --val-folds out to train without validation",
        )
    used = {table.uids[int(k)] for k in np.unique(table.series_index[train_rows])}
    used |= {table.uids[int(k)] for k in np.unique(table.series_index[val_rows])}
    check_cache_has(cache, sorted(used))
    return train_rows, val_rows, folds_of


def _batches_class() -> type:
    class EpochBatches(keras.utils.PyDataset):
        """The sampler's batches of one epoch as a ``keras.utils.PyDataset``: batch ``i`` of
        epoch ``e`` is the same whatever cuts it or in which order (the epoch's plan is drawn
        once, its patches are cut on demand by ``workers`` threads, ``queue`` batches ahead)."""

        def __init__(
            self, sampler: BalancedBatchSampler, epoch: int, workers: int, queue: int
        ) -> None:
            super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=queue)
            self.sampler = sampler
            self.epoch = epoch
            self._plans = list(sampler.epoch_plan(epoch))

        def __len__(self) -> int:
            return len(self.sampler)

        def __getitem__(self, i: int):
            inputs, labels = self.sampler.cut(self._plans[i])
            return (inputs[0] if len(inputs) == 1 else tuple(inputs)), labels

        def set_epoch(self, epoch: int) -> None:
            """The epoch that begins (:func:`lungct.training.fit_callbacks` calls it)."""
            if epoch != self.epoch:
                self.epoch = epoch
                self._plans = list(self.sampler.epoch_plan(epoch))

    return EpochBatches


def _validation_callback(
    validation: ValidationSet | None, distributed: bool = False, chief: bool = True
) -> keras.callbacks.Callback:
    class Validation(keras.callbacks.Callback):
        """Cross-entropy, ROC AUC and accuracy on the validation candidates, into each
        epoch's logs (Keras' own validation would need the whole set as one dataset and has
        no AUC over the epoch). Under a strategy the model predicts on this process alone
        (:func:`local_predictor`); on a cluster only the chief, whose log is kept, validates
        (the others log NaN)."""

        def __init__(self) -> None:
            super().__init__()
            self._predict: Predictor | None = None

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            metrics = {"val_loss": math.nan, "val_auc": math.nan, "val_accuracy": math.nan}
            if validation is not None and chief:
                if self._predict is None:
                    self._predict = local_predictor(self.model, distributed)
                predicted = validation.predict(self.model, predict=self._predict)
                metrics = binary_metrics(validation.labels, predicted)
            if logs is not None:
                logs.update(metrics)

    return Validation()


def _learning_rate(plan: FPRPlan) -> Callable[[int], float]:
    def rate(epoch: int, current: float | None = None) -> float:
        return float(plan.learning_rate * (1.0 - plan.lr_decay_per_epoch) ** epoch)

    return rate


def train(
    plan: FPRPlan,
    cache_dir: str | os.PathLike,
    candidates: str | os.PathLike,
    folds: Sequence[int],
    val_folds: Sequence[int],
    out_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    test_folds: Sequence[int] = (),
    annotations: str | os.PathLike | None = None,
    excluded: str | os.PathLike | None = None,
    resume: bool = False,
    max_minutes: float | None = None,
    keep_checkpoints: int = 0,
    progress: bool = True,
    provenance: dict | None = None,
    strategy: str = "none",
    mixed_precision: bool = False,
    workers: int = 2,
) -> dict:
    """Train the plan's network on the candidates of ``folds``; monitor on ``val_folds``.

    The network is the MGI-CNN or another classifier (``plan.network``): they share the
    sampler, the training, the checkpoints and the sealed model folder. Training is
    ``model.fit`` on the suite's contract (:mod:`lungct.training`): ``BackupAndRestore``,
    epoch checkpoints, ``CSVLogger``, TensorBoard, the learning rate decayed each epoch, the
    run's time budget.

    Args:
        plan: the training plan.
        cache_dir: per-scan cache (``python -m lungct prepare``).
        candidates: candidates CSV (``class`` column, or labelled by ``annotations``).
        folds: training folds (LUNA16 subsets).
        val_folds: validation folds (disjoint from ``folds``).
        out_dir: the model folder.
        data_dir: LUNA16-layout folder; its ``subsetK`` folders define the folds (else the
            folds the cache recorded).
        test_folds: folds declared held out; must not meet ``folds`` or ``val_folds``.
        annotations: label the candidates by the hit rule against this table.
        excluded: ``annotations_excluded.csv``; negatives on these irrelevant findings are left
            out of training and validation (the evaluation ignores them too).
        resume: continue the folder's training to the plan's last epoch.
        max_minutes: this run's time budget: it stops after the batch under way once this
            much wall time is spent, ends the epoch and seals the folder.
        keep_checkpoints: keep only the newest N epoch checkpoints (0 = all).
        progress: one line per epoch on stderr.
        provenance: what the caller knows of the training data, sealed into the manifest
            (e.g. ``{"data": lungct.modeldir.describe_data(folder)}`` when the cache holds a
            data set plus its augmented copies).
        strategy: ``none``, ``mirrored`` or ``multiworker``
            (:func:`lungct.training.make_strategy`; made first, before any other TensorFlow
            op). Under ``multiworker`` every worker runs this function with the same
            arguments; the chief writes ``out_dir``, the others a temporary copy that is
            removed (:func:`lungct.training.worker_dir`).
        mixed_precision: compute in float16 (GPUs).
        workers: threads cutting patches ahead of the training step.

    Returns:
        A summary dict (epochs, final validation metrics, timings).

    Raises:
        LungCTError: overlapping folds, an existing model folder without ``resume``, a resume
            with other folds or candidates, missing cache entries, unlabelled candidates; a
            bad ``TF_CONFIG`` or a worker of the cluster that stopped.
    """
    # First: MultiWorkerMirroredStrategy must be made before any other TensorFlow op.
    dist = make_strategy(strategy)
    with worker_dir(out_dir, dist) as folder:
        return _train(
            plan,
            cache_dir,
            candidates,
            folds,
            val_folds,
            Path(out_dir),
            folder,
            dist,
            data_dir=data_dir,
            test_folds=test_folds,
            annotations=annotations,
            excluded=excluded,
            resume=resume,
            max_minutes=max_minutes,
            keep_checkpoints=keep_checkpoints,
            progress=progress,
            provenance=provenance,
            strategy=strategy,
            mixed_precision=mixed_precision,
            threads=workers,
        )


def _train(
    plan: FPRPlan,
    cache_dir: str | os.PathLike,
    candidates: str | os.PathLike,
    folds: Sequence[int],
    val_folds: Sequence[int],
    model_dir: Path,
    out: Path,
    dist: Any,
    *,
    data_dir: str | os.PathLike | None,
    test_folds: Sequence[int],
    annotations: str | os.PathLike | None,
    excluded: str | os.PathLike | None,
    resume: bool,
    max_minutes: float | None,
    keep_checkpoints: int,
    progress: bool,
    provenance: dict | None,
    strategy: str,
    mixed_precision: bool,
    threads: int,
) -> dict:
    """:func:`train` once its strategy is made: ``model_dir`` is the model folder, ``out``
    the folder this worker writes (the model folder on the chief)."""
    folds, val_folds, test_folds = list(folds), list(val_folds), list(test_folds)
    check_split(folds, val_folds, test_folds)
    chief = is_chief(dist)
    cache = ScanCache(cache_dir)
    layout = folds_from_layout(data_dir) if data_dir is not None else None
    table = load_candidates(candidates, annotations)
    train_rows, val_rows, _ = prepare_split(plan, cache, table, folds, val_folds, layout)
    n_ignored = 0
    if excluded is not None:
        ignore = excluded_rows(table, excluded)
        n_ignored = int(ignore[train_rows].sum())
        train_rows = train_rows[~ignore[train_rows]]
        val_rows = val_rows[~ignore[val_rows]]
    uid_of = table.uids
    manifest = FoldManifest(
        train_folds=sorted(folds),
        val_folds=sorted(val_folds),
        test_folds=sorted(test_folds),
        train_series=sorted({uid_of[int(k)] for k in np.unique(table.series_index[train_rows])}),
        val_series=sorted({uid_of[int(k)] for k in np.unique(table.series_index[val_rows])}),
        candidates=str(Path(candidates).resolve()),
        candidates_sha256=file_sha256(candidates),
        annotations=None if annotations is None else str(Path(annotations).resolve()),
        excluded=None if excluded is None else str(Path(excluded).resolve()),
        ignored_negatives=n_ignored,
        data=None if data_dir is None else str(Path(data_dir).resolve()),
        cache=str(Path(cache_dir).resolve()),
        plan=plan.name,
        positives=int((table.label[train_rows] == 1).sum()),
        negatives=int((table.label[train_rows] == 0).sum()),
    )

    # The chief alone reads the model folder; the other workers follow it (from_chief below).
    if chief and ((out / MANIFEST_NAME).is_file() or has_training_state(out)):
        if not resume:
            raise LungCTError(
                out, "already holds a model; pass --resume to continue it, or use a new --out"
            )
        previous = FoldManifest.load(out)
        previous.check_same_training(manifest)
        saved_plan = FPRPlan.load(out / "plan.json")
        if saved_plan.replace(epochs=plan.epochs) != plan.replace(epochs=plan.epochs):
            raise LungCTError(out, "cannot resume with another plan (only epochs may change)")
        manifest.created = previous.created
    elif chief and resume:
        raise LungCTError(out, "nothing to resume: no model folder here")
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")

    # Where this run starts: Keras' backup (weights, optimiser, epoch) or, in a folder of an
    # earlier version of the suite, its newest epoch checkpoint.
    start_epoch = restored_epoch(out)
    legacy = None if start_epoch else latest_checkpoint(out)
    if legacy is not None and worker_count(dist) > 1:
        raise LungCTError(
            legacy[1],
            "a folder of an earlier version resumes on one machine only: resume it once "
            "without --strategy multiworker",
        )
    (start_epoch,) = from_chief(dist, [start_epoch])
    with strategy_scope(strategy, mixed_precision, strategy=dist) as scope:
        if legacy is not None:
            start_epoch = legacy[0]
            model = load_keras(legacy[1], compile=True, plan=plan, plan_path=out / "plan.json")
        else:
            keras.utils.set_random_seed(plan.seed)
            model = compile_model(build_network(plan), plan)
    prepare_model(model, scope)
    manifest.epochs_done = start_epoch
    manifest.save(out)

    cutter = PatchCutter(plan, cache)
    sampler = BalancedBatchSampler(plan, cutter, table, train_rows)
    val_rows = validation_rows(table, val_rows, plan.val_max_negatives, plan.seed)
    validation = ValidationSet(cutter, table, val_rows) if len(val_rows) else None
    batches = _batches_class()(sampler, start_epoch, workers=max(1, threads), queue=3)
    label = plan.network_label if chief else f"{plan.network_label} {task_name(dist)}"
    callbacks, budget = fit_callbacks(
        out,
        label=label,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        max_minutes=max_minutes,
        resume=resume,
        shown=("loss", "val_loss", "val_auc"),
        keep_checkpoints=keep_checkpoints,
        progress=progress,
        seed=plan.seed,
        data=batches,
        strategy=scope,
        mixed_precision=mixed_precision,
        before=(
            keras.callbacks.LearningRateScheduler(_learning_rate(plan)),
            _validation_callback(validation, distributed=scope is not None, chief=chief),
        ),
    )
    if progress:
        print(
            f"[{label}] {manifest.positives} positive and {manifest.negatives} "
            f"negative training candidates, {len(val_rows)} validation; epochs "
            f"{start_epoch + 1}-{plan.epochs} of {len(sampler)} steps"
            + (f" on {replicas(scope)} replicas" if scope is not None else "")
            + (f" of {worker_count(scope)} workers" if worker_count(scope) > 1 else ""),
            file=sys.stderr,
            flush=True,
        )
    t_start = time.monotonic()
    fit_epochs(
        model,
        batches,
        epochs=plan.epochs,
        start_epoch=start_epoch,
        callbacks=callbacks,
        strategy=scope,
    )
    log = read_log(out)
    manifest.epochs_done = int(log_float(log[-1], "epoch")) + 1 if log else start_epoch
    stopped_early = bool(budget.stopped)
    if progress and stopped_early:
        print(f"time budget of {max_minutes} min reached; stopping", file=sys.stderr, flush=True)
    save_model_atomic(model, out / "model.keras")
    manifest.save(out)
    plan.save(out / "plan.json")  # what was trained, should the file have been edited meanwhile
    seal_model_dir(  # last: the seal is the folder's done marker
        out,
        "fpr",
        train_seconds=sum(log_float(r, "seconds") for r in log if r.get("seconds")),
        data_dir=data_dir,
        seeds={"plan": plan.seed},
        steps=int(sum(log_float(r, "steps") for r in log if r.get("steps"))),
        extra={
            "epochs": manifest.epochs_done,
            "stopped_by_time": stopped_early,
            "strategy": strategy,
            "replicas": replicas(scope),
            "workers": worker_count(scope),
            **(provenance or {}),
        },
        plan=plan.to_dict(),
    )
    last = log[-1] if log else {}
    return {
        "out": str(model_dir),
        "epochs_done": manifest.epochs_done,
        "stopped_early": stopped_early,
        "minutes": round((time.monotonic() - t_start) / 60.0, 2),
        "train_positives": manifest.positives,
        "train_negatives": manifest.negatives,
        "val_candidates": len(val_rows),
        "network": plan.network,
        "params": int(model.count_params()),
        "replicas": replicas(scope),
        "workers": worker_count(scope),
        "chief": chief,
        **{k: _fmt(log_float(last, k)) for k in ("val_loss", "val_auc") if last},
    }
