"""Prediction: score candidates with a trained model folder and write a LUNA16 submission.

The submission is ``seriesuid,coordX,coordY,coordZ,probability`` (world mm), one row per
candidate, the file the LUNA16 evaluation reads. Candidates are scored scan by scan in batches,
so memory does not grow with the candidates file. The model folder's manifest is checked first:
series from its training folds are refused (see :mod:`fp_reduction_3dcnn.manifest`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from tqdm.auto import tqdm

from fp_reduction_3dcnn.config import FPRPlan
from fp_reduction_3dcnn.data import (
    PatchCutter,
    check_cache_has,
    read_unlabelled,
    rows_in_folds,
    series_folds,
)
from fp_reduction_3dcnn.manifest import FoldManifest
from fp_reduction_3dcnn.symmetries import AXIAL_SYMMETRIES, VOLUME_SYMMETRIES, tta_predict
from fp_reduction_3dcnn.train import latest_checkpoint, load_keras
from lungct.cache import ScanCache
from lungct.errors import LungCTError
from lungct.modeldir import is_sealed, verify_model_dir
from lungct.tables import RESULT_COLUMNS, CandidateTable, folds_from_layout, write_csv_atomic


@dataclass
class TrainedModel:
    """A model folder opened for prediction: the network, its plan and its manifest."""

    model: keras.Model
    plan: FPRPlan
    manifest: FoldManifest
    path: Path


def open_model(
    model_dir: str | os.PathLike, checkpoint: str | None = None, allow_unfinished: bool = False
) -> TrainedModel:
    """Open ``model.keras`` (or ``checkpoints/<checkpoint>``) of a model folder in safe mode.

    The folder's seal is checked first (training ended, files unchanged, ``plan.json`` still
    the trained plan), then the file's config against the plan. ``allow_unfinished`` accepts a
    folder whose training has not ended; with no ``model.keras`` yet (it is written at the end)
    its newest checkpoint is opened.

    Raises:
        LungCTError: no such folder, no manifest (folds unknown), no model file, an
            unfinished or changed folder, weights that do not fit the plan.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LungCTError(model_dir, "model folder not found")
    manifest = FoldManifest.load(model_dir)
    sealed = verify_model_dir(
        model_dir, check_files=not checkpoint, allow_unfinished=allow_unfinished, stage="fpr"
    )
    plan_path = model_dir / "plan.json"
    plan = FPRPlan.load(plan_path)
    if checkpoint:
        path = model_dir / "checkpoints" / checkpoint
        if not path.is_file():
            path = model_dir / "checkpoints" / f"{checkpoint}.keras"
    else:
        path = model_dir / "model.keras"
        newest = latest_checkpoint(model_dir)
        if not path.is_file() and not is_sealed(sealed) and newest is not None:
            path = newest[1]
    if not path.is_file():
        raise LungCTError(path, "model file not found (has training finished?)")
    model = load_keras(path, compile=False, plan=plan, plan_path=plan_path)
    return TrainedModel(model, plan, manifest, model_dir)


def score_rows(
    trained: TrainedModel,
    cutter: PatchCutter,
    table: CandidateTable,
    rows: np.ndarray,
    tta: bool = False,
    batch_size: int = 256,
    progress: bool = True,
    tta_z: bool = False,
) -> np.ndarray:
    """Probabilities for ``rows`` of ``table``, scan by scan, ``batch_size`` at a time.

    ``tta`` averages over the 8 axial symmetries, ``tta_z`` over those and their z flips (16).
    """
    symmetries = VOLUME_SYMMETRIES if tta_z else AXIAL_SYMMETRIES
    rows = np.asarray(rows, dtype=np.int64)
    order = rows[np.argsort(table.series_index[rows], kind="stable")]
    probs = np.empty(len(table), dtype=np.float64)
    model = trained.model

    def predict(inputs: list[np.ndarray]) -> np.ndarray:
        return np.asarray(model.predict_on_batch(inputs)).reshape(-1)

    bar = tqdm(total=len(order), desc="predict", unit="cand", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        inputs = cutter.cut_rows(table, chunk)
        probs[chunk] = tta_predict(predict, inputs, symmetries) if tta or tta_z else predict(inputs)
        bar.update(len(chunk))
    bar.close()
    return probs[rows]


def predict(
    model_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    candidates: str | os.PathLike,
    out_csv: str | os.PathLike,
    tta: bool = False,
    folds: Sequence[int] | None = None,
    data_dir: str | os.PathLike | None = None,
    allow_train_folds: bool = False,
    checkpoint: str | None = None,
    batch_size: int = 256,
    progress: bool = True,
    tta_z: bool = False,
    allow_unfinished: bool = False,
) -> dict:
    """Score a candidates file with a model folder and write the submission CSV.

    Args:
        model_dir: a folder written by :func:`fp_reduction_3dcnn.train.train`.
        cache_dir: the per-scan cache holding the candidates' scans.
        candidates: candidates CSV (any ``class`` column is ignored).
        out_csv: submission to write (atomically).
        tta: average over the eight axial symmetries (four rotations x flip).
        tta_z: average over those and their z flips (16 passes).
        folds: score only the candidates of these folds (default: all).
        data_dir: LUNA16-layout folder to take folds from (default: the cache's record).
        allow_train_folds: score series the model trained on (off by default).
        checkpoint: use ``checkpoints/<checkpoint>`` instead of ``model.keras``.
        batch_size: candidates per forward pass (at least 1).
        progress: show a progress bar.
        allow_unfinished: use a model folder whose training has not ended.

    Raises:
        LungCTError: a series from the model's training folds (the fold guard), a series missing
            from the cache, a bad candidates file or model folder, a batch size below 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LungCTError(None, f"batch_size must be a positive integer, got {batch_size!r}")
    trained = open_model(model_dir, checkpoint, allow_unfinished=allow_unfinished)
    cache = ScanCache(cache_dir)
    table = read_unlabelled(candidates)
    layout = folds_from_layout(data_dir) if data_dir is not None else None
    folds_of = series_folds(cache, table.uids, layout)
    rows = np.arange(len(table)) if folds is None else rows_in_folds(table, folds_of, folds)
    used = sorted({table.uids[int(k)] for k in np.unique(table.series_index[rows])})
    trained.manifest.check_prediction({u: folds_of[u] for u in used}, allow_train_folds)
    check_cache_has(cache, used)
    cutter = PatchCutter(trained.plan, cache)
    t0 = time.monotonic()
    probs = score_rows(trained, cutter, table, rows, tta, batch_size, progress, tta_z)
    seconds = time.monotonic() - t0
    uids = table.uids

    def result_rows():
        for r, p in zip(rows.tolist(), probs.tolist(), strict=True):
            x, y, z = table.coords[r].tolist()
            yield [uids[table.series_index[r]], x, y, z, p]

    write_csv_atomic(out_csv, RESULT_COLUMNS, result_rows())
    return {
        "out": str(out_csv),
        "candidates": len(rows),
        "series": len(used),
        "tta": 16 if tta_z else 8 if tta else 0,
        "seconds": round(seconds, 1),
        "candidates_per_s": round(len(rows) / seconds, 1) if seconds > 0 else None,
    }
