"""Training: balanced streamed batches, per-epoch checkpoints, resume, and the fold guard.

Model folder layout::

    OUT/plan.json                    the plan (FPRPlan) the model was trained with
    OUT/manifest.json                folds and series trained / validated / held out; sealed
                                     (checksums, trained plan) when training ends: the seal
                                     is the folder's done marker (:mod:`lungct.modeldir`)
    OUT/checkpoints/epoch_NNN.keras  model + optimiser state after epoch NNN
    OUT/train_log.csv                one row per epoch (loss, accuracy, validation AUC, speed)
    OUT/model.keras                  the final model (what ``predict`` loads), written
                                     atomically

A manual loop of ``train_on_batch`` (rather than ``fit``) keeps the time per batch measurable,
sets the learning rate each epoch (decayed 2.5 %), and stops cleanly at a time budget.
"""

from __future__ import annotations

import csv
import io
import math
import os
import queue
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

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
from lungct.fileio import atomic_path, write_text_atomic
from lungct.modeldir import (
    MANIFEST_NAME,
    file_sha256,
    keras_file_problem,
    load_keras_model,
    seal_model_dir,
)
from lungct.tables import CandidateTable, folds_from_layout

LOG_COLUMNS = (
    "epoch",
    "steps",
    "learning_rate",
    "loss",
    "binary_accuracy",
    "val_loss",
    "val_auc",
    "val_accuracy",
    "seconds",
    "train_samples_per_s",
)

_CHECKPOINT = re.compile(r"^epoch_(\d+)\.keras$")


def save_model_atomic(model: keras.Model, path: str | os.PathLike) -> None:
    """``model.save`` to a temporary ``.keras`` file, check it, then rename (never a
    half-written model)."""
    with atomic_path(path, suffix=".keras", check=keras_file_problem) as tmp:
        model.save(tmp)


def latest_checkpoint(model_dir: str | os.PathLike) -> tuple[int, Path] | None:
    """``(epoch, path)`` of the newest ``checkpoints/epoch_NNN.keras``, or ``None``."""
    folder = Path(model_dir) / "checkpoints"
    found = []
    for p in folder.glob("epoch_*.keras") if folder.is_dir() else ():
        m = _CHECKPOINT.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found) if found else None


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


def prefetch(iterator: Iterator, depth: int = 3) -> Iterator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead (patch cutting overlaps
    the training step). An exception in the producer is raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)
            return
        q.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


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


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return [r for r in csv.DictReader(handle) if int(r["epoch"]) <= upto_epoch]


def _write_log(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LOG_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def _fmt(v: float) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"


def predict_inputs(
    model: keras.Model, inputs: Sequence[np.ndarray], batch: int = 256
) -> np.ndarray:
    """Probabilities ``(N,)`` for in-memory inputs, in batches."""
    n = len(inputs[0])
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, batch):
        chunk = [x[start : start + batch] for x in inputs]
        out[start : start + batch] = np.asarray(model.predict_on_batch(chunk)).reshape(-1)
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

    def predict(self, model: keras.Model, batch: int = 256) -> np.ndarray:
        """The model's probabilities ``(N,)`` for the validation rows."""
        if self.inputs is not None:
            return predict_inputs(model, self.inputs, batch)
        out = np.empty(len(self.rows), dtype=np.float64)
        for start in range(0, len(self.rows), batch):
            inputs = self.cutter.cut_rows(self.table, self.rows[start : start + batch])
            out[start : start + batch] = np.asarray(model.predict_on_batch(inputs)).reshape(-1)
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
) -> dict:
    """Train the plan's network on the candidates of ``folds``; monitor on ``val_folds``.

    The network is the MGI-CNN or another classifier (``plan.network``): they share the
    sampler, the loop, the checkpoints and the sealed model folder.

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
        resume: continue from the newest checkpoint of ``out_dir``.
        max_minutes: stop (and save) once this much wall time is spent.
        keep_checkpoints: keep only the newest N epoch checkpoints (0 = all).
        progress: show a progress bar.
        provenance: what the caller knows of the training data, sealed into the manifest
            (e.g. ``{"data": lungct.modeldir.describe_data(folder)}`` when the cache holds a
            data set plus its augmented copies).

    Returns:
        A summary dict (epochs, final validation metrics, timings).

    Raises:
        LungCTError: overlapping folds, an existing model folder without ``resume``, a resume
            with other folds or candidates, missing cache entries, unlabelled candidates.
    """
    folds, val_folds, test_folds = list(folds), list(val_folds), list(test_folds)
    check_split(folds, val_folds, test_folds)
    out = Path(out_dir)
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

    start_epoch = 0
    checkpoint = latest_checkpoint(out)
    if (out / MANIFEST_NAME).is_file() or checkpoint is not None:
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
    elif resume:
        raise LungCTError(out, "nothing to resume: no model folder here")
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")

    if checkpoint is not None:
        start_epoch, path = checkpoint
        model = load_keras(path, compile=True, plan=plan, plan_path=out / "plan.json")
    else:
        keras.utils.set_random_seed(plan.seed)
        model = compile_model(build_network(plan), plan)
    manifest.epochs_done = start_epoch
    manifest.save(out)

    cutter = PatchCutter(plan, cache)
    sampler = BalancedBatchSampler(plan, cutter, table, train_rows)
    val_rows = validation_rows(table, val_rows, plan.val_max_negatives, plan.seed)
    validation = ValidationSet(cutter, table, val_rows) if len(val_rows) else None

    log_path = out / "train_log.csv"
    log = _read_log(log_path, start_epoch)
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    stopped_early = False
    t_start = time.monotonic()
    epoch = start_epoch
    for epoch in range(start_epoch, plan.epochs):
        lr = plan.learning_rate * (1.0 - plan.lr_decay_per_epoch) ** epoch
        model.optimizer.learning_rate = lr
        bar = keras.utils.Progbar(len(sampler), verbose=1 if progress else 0, unit_name="step")
        if progress:
            print(f"epoch {epoch + 1}/{plan.epochs} (lr {lr:.5g})", flush=True)
        t0 = time.monotonic()
        step_time = 0.0
        steps = 0
        sums = {"loss": 0.0, "binary_accuracy": 0.0}
        for inputs, labels in prefetch(sampler.epoch(epoch)):
            ts = time.monotonic()
            logs = model.train_on_batch(inputs, labels, return_dict=True)
            step_time += time.monotonic() - ts if steps else 0.0  # first step traces
            steps += 1
            for k in sums:
                sums[k] += float(logs.get(k, math.nan))
            bar.update(steps, [(k, float(logs.get(k, math.nan))) for k in sums])
            if deadline is not None and time.monotonic() > deadline:
                stopped_early = True
                break
        metrics = {"val_loss": math.nan, "val_auc": math.nan, "val_accuracy": math.nan}
        if validation is not None:
            metrics = binary_metrics(validation.labels, validation.predict(model))
        timed = max(steps - 1, 1)
        row = {
            "epoch": epoch + 1,
            "steps": steps,
            "learning_rate": _fmt(lr),
            "loss": _fmt(sums["loss"] / max(steps, 1)),
            "binary_accuracy": _fmt(sums["binary_accuracy"] / max(steps, 1)),
            **{k: _fmt(v) for k, v in metrics.items()},
            "seconds": f"{time.monotonic() - t0:.1f}",
            "train_samples_per_s": _fmt(timed * plan.batch_size / step_time) if step_time else "",
        }
        log.append(row)
        if progress:
            print(
                "  " + ", ".join(f"{k} {row[k]}" for k in ("loss", "val_loss", "val_auc")),
                flush=True,
            )
        save_model_atomic(model, out / "checkpoints" / f"epoch_{epoch + 1:03d}.keras")
        _prune_checkpoints(out, keep_checkpoints)
        _write_log(log_path, log)
        manifest.epochs_done = epoch + 1
        manifest.save(out)
        if stopped_early:
            if progress:
                print(f"time budget of {max_minutes} min reached; stopping", flush=True)
            break
    save_model_atomic(model, out / "model.keras")
    manifest.save(out)
    plan.save(out / "plan.json")  # what was trained, should the file have been edited meanwhile
    seal_model_dir(  # last: the seal is the folder's done marker
        out,
        "fpr",
        train_seconds=sum(float(r.get("seconds") or 0.0) for r in log),
        data_dir=data_dir,
        seeds={"plan": plan.seed},
        steps=sum(int(r.get("steps") or 0) for r in log),
        extra={
            "epochs": manifest.epochs_done,
            "stopped_by_time": stopped_early,
            **(provenance or {}),
        },
        plan=plan.to_dict(),
    )
    return {
        "out": str(out),
        "epochs_done": manifest.epochs_done,
        "stopped_early": stopped_early,
        "minutes": round((time.monotonic() - t_start) / 60.0, 2),
        "train_positives": manifest.positives,
        "train_negatives": manifest.negatives,
        "val_candidates": len(val_rows),
        "network": plan.network,
        "params": int(model.count_params()),
        **({k: log[-1][k] for k in ("val_loss", "val_auc")} if log else {}),
    }


def _prune_checkpoints(out: Path, keep: int) -> None:
    if keep <= 0:
        return
    found = sorted((out / "checkpoints").glob("epoch_*.keras"))
    for path in found[:-keep]:
        path.unlink(missing_ok=True)
