"""CenterNet candidate extraction: scan -> model grid -> heatmap and size maps -> candidates.

The same steps as the 3-D U-Net's (:mod:`unet_candidates.extract`): resample the scan to the
plan's grid and window it, get the lung mask, slide overlapping windows over the lung bounding
box (Gaussian-weighted blending; optional in-plane flips averaged in), keep the maps inside the
dilated lung mask; then :func:`unet_candidates.centernet.decode.candidates_from_heatmap` turns
the heatmap's peaks into marks in world millimetres.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lungct.cache import CachedScan
from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.modeldir import (
    check_architecture,
    check_keras_config,
    keras_load_safe,
    model_class,
    read_keras_config,
    verify_model_dir,
)
from lungct.scan import Scan
from unet_candidates.centernet.config import CenterNetPlan
from unet_candidates.centernet.decode import candidates_from_heatmap
from unet_candidates.config import PLAN_FILE
from unet_candidates.extract import (
    IN_PLANE_FLIPS,
    MODEL_FILE,
    ExtractionResult,
    ModelInput,
    _as_scan,
    gaussian_weights,
    prepare_input,
    search_region,
    window_starts,
)

CENTERNET_CLASS = "unet_candidates>CenterNet3D"
"""The registered Keras class a CenterNet model folder's ``model.keras`` holds."""


def load_centernet(
    model_dir: str | os.PathLike, allow_unfinished: bool = False
) -> tuple[Any, CenterNetPlan]:
    """Load ``model.keras`` (``safe_mode=True``) and ``plan.json`` of a CenterNet model folder.

    As :func:`unet_candidates.extract.load_unet`: the seal is checked first, then the file's
    config against the plan, before Keras builds anything.

    Raises:
        LungCTError: the folder, its plan or its weights are missing, unfinished, changed,
            another stage's or unreadable, or the weights do not fit the plan.
    """
    # Importing them registers the CenterNet's classes with Keras.
    import unet_candidates.centernet.loss
    import unet_candidates.centernet.model  # noqa: F401

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LungCTError(model_dir, "model folder does not exist")
    plan_path = model_dir / PLAN_FILE
    if not plan_path.is_file():
        raise LungCTError(model_dir, f"no {PLAN_FILE} in the model folder")
    weights = model_dir / MODEL_FILE
    if not weights.is_file():
        hint = ""
        if any((model_dir / "checkpoints").glob("*.keras")):
            hint = "; training did not finish: continue it with `train --resume`"
        raise LungCTError(model_dir, f"no {MODEL_FILE} (the trained weights) in the folder{hint}")
    verify_model_dir(model_dir, allow_unfinished=allow_unfinished, stage="centernet")
    plan = CenterNetPlan.load(plan_path)
    config = read_keras_config(weights)
    check_keras_config(weights, config, (CENTERNET_CLASS,), "a CenterNet of this suite")
    if model_class(config) != CENTERNET_CLASS:  # pragma: no cover - checked just above
        raise LungCTError(weights, "does not hold a CenterNet")
    check_architecture(weights, config, plan.architecture(), plan_path)
    return keras_load_safe(weights), plan


def predict_maps(
    model: Any, data: ModelInput, plan: CenterNetPlan, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The ``(z, y, x)`` float32 heatmap and diameter map over the lungs (0 outside them)."""
    lung, region = search_region(data, plan)
    block = data.image[region]
    window = tuple(plan.window_size)
    weights = gaussian_weights(window)
    starts = [
        window_starts(n, w, plan.window_overlap) for n, w in zip(block.shape, window, strict=True)
    ]
    positions = list(itertools.product(*starts))
    acc = np.zeros((*block.shape, 2), np.float32)
    wsum = np.zeros(block.shape, np.float32)
    batch = plan.window_batch
    bar = tqdm(
        total=len(positions), desc=data.seriesuid, unit="win", disable=not progress, leave=False
    )
    for first in range(0, len(positions), batch):
        chunk = positions[first : first + batch]
        slices = [tuple(slice(a, a + w) for a, w in zip(p, window, strict=True)) for p in chunk]
        x = np.stack([block[sl][..., None] for sl in slices])
        if len(chunk) < batch:  # a fixed batch shape avoids retracing the predict function
            x = np.concatenate([x, np.zeros((batch - len(chunk), *x.shape[1:]), x.dtype)])
        y = _predict_flipped(model, x, plan.test_time_flips)
        for sl, maps in zip(slices, y, strict=False):
            acc[sl] += maps * weights[..., None]
            wsum[sl] += weights
        bar.update(len(chunk))
    bar.close()
    maps = acc / np.maximum(wsum, 1e-12)[..., None]
    heat = np.zeros(data.image.shape, np.float32)
    size = np.zeros(data.image.shape, np.float32)
    heat[region], size[region] = maps[..., 0], maps[..., 1]
    heat *= lung
    size *= lung
    return heat, size


def _predict_flipped(model: Any, x: np.ndarray, flips: int) -> np.ndarray:
    """Mean output (both channels) over the batch and its first ``flips`` in-plane flips."""
    total = None
    for axes in IN_PLANE_FLIPS[: flips + 1]:
        xf = np.flip(x, axis=axes) if axes else x
        y = np.asarray(model.predict_on_batch(np.ascontiguousarray(xf)), np.float32)
        y = np.flip(y, axis=axes) if axes else y  # the output keeps the channel axis
        total = y if total is None else total + y
    return total / (flips + 1)


def run_centernet_extraction(
    volume_or_scan: Scan | CachedScan | np.ndarray,
    model: Any,
    plan: CenterNetPlan | None = None,
    *,
    geometry: Geometry | None = None,
    seriesuid: str | None = None,
    progress: bool = False,
) -> ExtractionResult:
    """Candidates of one scan with the heatmap they came from (``probability``) and timings.

    Args:
        volume_or_scan: a :class:`lungct.Scan` (lungs segmented here), a
            :class:`lungct.cache.CachedScan` (its lung mask) or a ``(z, y, x)`` HU array with
            ``geometry``.
        model: the Keras CenterNet (or its :func:`unet_candidates.runtime.predictor`), or a
            model folder (then ``plan`` defaults to its plan).
        plan: the plan the model was trained with (candidate fields may be changed).
        geometry: placement of a bare HU array.
        seriesuid: name written in the rows (default: the scan's).
        progress: a progress bar over the windows.

    Raises:
        LungCTError: no lungs found, or the scan is smaller than one window.
    """
    t0 = time.perf_counter()
    if isinstance(model, str | os.PathLike):
        model, saved_plan = load_centernet(model)
        plan = plan or saved_plan
    if plan is None:
        raise TypeError("pass the plan the model was trained with (or a model folder)")
    data = prepare_input(_as_scan(volume_or_scan, geometry, seriesuid), plan)
    t1 = time.perf_counter()
    heat, size = predict_maps(model, data, plan, progress=progress)
    t2 = time.perf_counter()
    candidates = candidates_from_heatmap(
        heat,
        data.geometry,
        seriesuid or data.seriesuid,
        size=size,
        threshold=plan.threshold,
        kernel=plan.peak_kernel,
        nms_radius_mm=plan.nms_radius_mm,
        max_candidates=plan.max_candidates,
    )
    t3 = time.perf_counter()
    timings = {"prepare": t1 - t0, "predict": t2 - t1, "postprocess": t3 - t2}
    return ExtractionResult(candidates, heat, data.geometry, data.source_geometry, t3 - t0, timings)
