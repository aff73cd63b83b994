"""Candidate extraction: scan -> model grid -> probability map -> candidates.

Steps for one scan:

1. resample the scan (or a cached 1 mm volume) to the plan's spacing on a world-aligned grid,
   window the HU to [0, 1], and get the lung mask (segmented, or resampled from the cache);
2. predict the probability map over the lungs: a 2-D U-Net sees each batch of slices cut to
   the bounding boxes of their lungs, whole (it is fully convolutional, so no in-plane tiles);
   a 3-D U-Net slides over the lung bounding box in windows that overlap by
   ``window_overlap``, blended with Gaussian weights (centre voxels count most, as in
   nnU-Net); the forward pass runs in Keras or ONNX Runtime (:mod:`unet_candidates.runtime`);
3. keep the probability inside the lung mask dilated by ``lung_dilation_mm``;
4. :func:`unet_candidates.postprocess.candidates_from_probability` turns the map into marks.

Optionally the probability map is written as ``.mhd`` on the scan's own grid (its original
spacing and direction), so it overlays the CT in any viewer.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm.auto import tqdm

from lungct.cache import CachedScan
from lungct.errors import LungCTError
from lungct.fileio import write_json_atomic
from lungct.geometry import IDENTITY, Geometry
from lungct.io import image_from_array, write_image
from lungct.lungmask import dilate_ellipsoid, mask_box, segment_lungs
from lungct.modeldir import (
    check_architecture,
    check_keras_config,
    keras_load_safe,
    model_class,
    read_keras_config,
    verify_model_dir,
)
from lungct.preprocess import apply_window, resample_array, resample_mask, subsample_aligned
from lungct.scan import AIR_HU, Scan
from unet_candidates.config import PLAN_FILE, UNetPlan
from unet_candidates.postprocess import Candidate, candidates_from_probability

MODEL_FILE = "model.keras"
DENSE_HU = -500.0
"""Tissue above this counts as dense when nodule diameters are estimated from the image."""


# ----------------------------------------------------------------------------------------------
# Model folder
# ----------------------------------------------------------------------------------------------


UNET_CLASSES = {"2d": "unet_candidates>UNet2D", "3d": "unet_candidates>UNet3D"}
"""The registered Keras class of each U-Net kind (what ``model.keras`` must hold)."""


def unet_architecture(plan: UNetPlan) -> dict[str, Any]:
    """The settings the plan gives the U-Net's constructor (:meth:`UNetPlan.build_model`), as
    the model's config spells them: weights saved with other settings do not fit the plan."""
    return {
        "filters": list(plan.filters),
        "bottleneck_filters": plan.bottleneck_filters,
        "input_channels": plan.input_channels,
        "convs_per_block": plan.convs_per_block,
        "batch_norm": plan.batch_norm,
        "dropout": plan.dropout,
        "output_prior": plan.output_prior,
    }


def load_unet(model_dir: str | os.PathLike, allow_unfinished: bool = False) -> tuple[Any, UNetPlan]:
    """Load ``model.keras`` (``safe_mode=True``) and ``plan.json`` from a model folder.

    The folder's seal is checked first (:func:`lungct.modeldir.verify_model_dir`: training
    ended, files unchanged, ``plan.json`` still the trained plan); then the file's config is
    checked against the plan before Keras builds anything. ``allow_unfinished`` accepts a
    folder whose training has not ended (its last epoch's weights).

    Raises:
        LungCTError: the folder, its plan or its weights are missing, unfinished, changed or
            unreadable, or the weights do not fit the plan.
    """
    import unet_candidates.model  # noqa: F401  (registers the custom classes)

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LungCTError(model_dir, "model folder does not exist")
    plan_path = model_dir / PLAN_FILE
    if not plan_path.is_file():
        raise LungCTError(
            model_dir,
            f"no {PLAN_FILE} in the model folder (train one with `python -m unet_candidates "
            "train`)",
        )
    weights = model_dir / MODEL_FILE
    if not weights.is_file():
        hint = ""
        if any((model_dir / "checkpoints").glob("*.keras")):
            hint = "; training did not finish: continue it with `train --resume`"
        raise LungCTError(model_dir, f"no {MODEL_FILE} (the trained weights) in the folder{hint}")
    verify_model_dir(model_dir, allow_unfinished=allow_unfinished, stage="unet")
    plan = UNetPlan.load(plan_path)
    config = read_keras_config(weights)
    check_keras_config(weights, config, tuple(UNET_CLASSES.values()), "a U-Net of this suite")
    if model_class(config) != UNET_CLASSES[plan.dims]:
        raise LungCTError(
            weights,
            f"holds a {model_class(config).split('>')[-1]}, which does not fit the plan's "
            f"{plan.dims} network ({PLAN_FILE})",
        )
    check_architecture(weights, config, unet_architecture(plan), plan_path)
    model = keras_load_safe(weights)
    shape = tuple(model.inputs[0].shape)
    if shape[-1] != plan.input_channels or len(shape) != (4 if plan.dims == "2d" else 5):
        raise LungCTError(
            weights,
            f"model input {shape} does not fit the plan's {plan.dims} network with "
            f"{plan.input_channels} channel(s)",
        )
    return model, plan


# ----------------------------------------------------------------------------------------------
# Model input
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelInput:
    """A scan on the model grid.

    Attributes:
        seriesuid: the series.
        image: ``(z, y, x)`` float32 intensities in [0, 1] (the plan's HU window).
        lung: ``(z, y, x)`` uint8 lung mask on the same grid.
        geometry: the model grid (world-aligned, the plan's spacing).
        source_geometry: the scan's own grid (for writing the probability map), if known.
        source: path or name of the scan, for messages.
    """

    seriesuid: str
    image: np.ndarray
    lung: np.ndarray
    geometry: Geometry
    source_geometry: Geometry | None
    source: str


def _on_model_grid(geometry: Geometry, plan: UNetPlan) -> bool:
    return np.allclose(geometry.spacing, plan.spacing) and np.allclose(geometry.direction, IDENTITY)


def prepare_input(source: Scan | CachedScan, plan: UNetPlan) -> ModelInput:
    """Resample a scan (own lung segmentation) or a cached scan (its mask) to the model grid.

    Raises:
        LungCTError: no lungs found.
    """
    if isinstance(source, CachedScan):
        name = str(source.meta.get("source") or source.seriesuid)
        if _on_model_grid(source.geometry, plan):
            hu, geometry = np.asarray(source.volume), source.geometry
            lung = np.asarray(source.lung)
        elif fast := subsample_aligned(source.volume, source.geometry, plan.spacing, "linear"):
            # The 1 mm cache grid to a plan spacing of whole millimetres: slicing, no resampler.
            hu, geometry = fast
            lung = subsample_aligned(source.lung, source.geometry, plan.spacing, "nearest")[0]
        else:
            hu, geometry = resample_array(
                source.volume, source.geometry, plan.spacing, "linear", AIR_HU, True
            )
            lung, _ = resample_mask(source.lung, source.geometry, plan.spacing, True)
        if not lung.any():
            # The cache's mask was segmented on the 1 mm grid; segmentation on the model grid
            # samples the air gaps differently and sometimes succeeds where that one failed.
            lung = segment_lungs(Scan(hu.astype(np.int16, copy=False), geometry, name, source=name))
        source_geo = source.meta.get("source_geometry")
        native = Geometry.from_dict(source_geo) if source_geo else source.geometry
        image = apply_window(hu, plan.hu_window, (0.0, 1.0))
        return ModelInput(source.seriesuid, image, lung.astype(np.uint8), geometry, native, name)
    if not isinstance(source, Scan):
        raise TypeError(f"expected a lungct Scan or CachedScan, got {type(source).__name__}")
    name = source.source or source.seriesuid
    if _on_model_grid(source.geometry, plan):
        hu, geometry = source.array, source.geometry
    else:
        hu, geometry = resample_array(
            source.array, source.geometry, plan.spacing, "linear", AIR_HU, True
        )
    model_scan = Scan(hu.astype(np.int16, copy=False), geometry, source.seriesuid, source=name)
    lung = segment_lungs(model_scan)  # raises LungCTError "no lungs found"
    image = apply_window(hu, plan.hu_window, (0.0, 1.0))
    return ModelInput(source.seriesuid, image, lung, geometry, source.geometry, name)


# ----------------------------------------------------------------------------------------------
# Sliding windows
# ----------------------------------------------------------------------------------------------


def window_starts(length: int, window: int, overlap: float) -> np.ndarray:
    """Start indices of windows covering ``[0, length)``, evenly spread, overlapping >= ``overlap``."""
    if length <= window:
        return np.zeros(1, np.int64)
    step = max(1, int(window * (1.0 - overlap)))
    n = int(np.ceil((length - window) / step)) + 1
    return np.unique(np.round(np.linspace(0, length - window, n)).astype(np.int64))


def gaussian_weights(size: tuple[int, ...], sigma_fraction: float = 0.125) -> np.ndarray:
    """Separable Gaussian importance map (1 at the centre, >= 1e-3 at the edges)."""
    w = np.ones((), np.float32)
    for n in size:
        x = (np.arange(n) - (n - 1) / 2.0) / max(n * sigma_fraction, 1e-6)
        w = np.multiply.outer(w, np.exp(-0.5 * x * x).astype(np.float32))
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def search_region(data: ModelInput, plan: UNetPlan) -> tuple[np.ndarray, tuple[slice, ...]]:
    """The dilated lung mask and its bounding box grown to at least one window per axis.

    Raises:
        LungCTError: the scan is smaller than one window of the model.
    """
    shape = np.asarray(data.image.shape)
    if plan.dims == "2d":
        window = np.array([1, *plan.window_size[1:]])
    else:
        window = np.asarray(plan.window_size)
    if np.any(shape < window):
        mm = shape * np.asarray(plan.spacing_zyx)
        need = window * np.asarray(plan.spacing_zyx)
        raise LungCTError(
            data.source,
            f"scan is smaller than one window of the model: {shape.tolist()} voxels (z, y, x) "
            f"= {np.round(mm).astype(int).tolist()} mm at the plan's spacing, window "
            f"{window.tolist()} voxels = {np.round(need).astype(int).tolist()} mm",
        )
    lung = data.lung > 0
    if plan.lung_dilation_mm > 0:
        lung = dilate_ellipsoid(lung, tuple(plan.lung_dilation_mm / np.asarray(plan.spacing_zyx)))
    box = mask_box(lung)  # prepare_input found lungs: never empty
    lo = np.array([b.start for b in box])
    hi = np.array([b.stop for b in box])
    # Grow to at least one window, centred on the lungs, kept inside the volume.
    size = np.maximum(hi - lo, window)
    lo = np.clip((lo + hi) // 2 - size // 2, 0, shape - size)
    hi = lo + size
    return lung, tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def predict_probability_map(
    model: Any,
    data: ModelInput,
    plan: UNetPlan,
    progress: bool = False,
) -> np.ndarray:
    """The U-Net's ``(z, y, x)`` float32 probability map over the lungs (0 outside them).

    2-D: slices predicted whole over their lungs' bounding boxes; 3-D: overlapping windows
    blended with Gaussian weights (see the module's steps).
    """
    lung, region = search_region(data, plan)
    if plan.dims == "2d":
        out = _predict_2d(model, data.image, lung, region, plan, progress, data.seriesuid)
    else:
        out = np.zeros(data.image.shape, np.float32)
        out[region] = _predict_3d(model, data.image[region], plan, progress, data.seriesuid)
    release = getattr(model, "release_memory", None)
    if release is not None:  # ONNX Runtime: the arena's growth is not needed until next scan
        release()
    out *= lung
    return out


def _run_batches(model, windows, make_input, plan, progress, desc, total):
    """Yield (window, prediction) for windows, predicting ``window_batch`` at a time."""
    batch = plan.window_batch
    bar = tqdm(total=total, desc=desc, unit="win", disable=not progress, leave=False)
    it = iter(windows)
    while True:
        chunk = list(itertools.islice(it, batch))
        if not chunk:
            break
        x = np.stack([make_input(w) for w in chunk])
        if len(chunk) < batch:  # a fixed batch shape avoids retracing the predict function
            x = np.concatenate([x, np.zeros((batch - len(chunk), *x.shape[1:]), x.dtype)])
        y = _predict_flipped(model, x, plan.test_time_flips)
        yield from zip(chunk, y[: len(chunk)], strict=True)
        bar.update(len(chunk))
    bar.close()


IN_PLANE_FLIPS = ((), (-2,), (-3,), (-3, -2))
"""Flips of a channels-last batch along x, y, both (the axial plane, for 2-D and 3-D input)."""


def _predict_flipped(model: Any, x: np.ndarray, flips: int) -> np.ndarray:
    """Mean prediction (channel 0) over the batch and its first ``flips`` in-plane flips."""
    total = None
    for axes in IN_PLANE_FLIPS[: flips + 1]:
        xf = np.flip(x, axis=axes) if axes else x
        y = np.asarray(model.predict_on_batch(np.ascontiguousarray(xf)))[..., 0]
        # The prediction has lost the channel axis: image axis a < -1 is axis a + 1 there.
        y = np.flip(y, axis=tuple(a + 1 for a in axes)) if axes else y
        total = y if total is None else total + y
    return total / (flips + 1)


def _predict_3d(model, image, plan, progress, desc):
    window = tuple(plan.window_size)
    weights = gaussian_weights(window)
    starts = [
        window_starts(n, w, plan.window_overlap) for n, w in zip(image.shape, window, strict=True)
    ]
    acc = np.zeros(image.shape, np.float32)
    wsum = np.zeros(image.shape, np.float32)
    positions = list(itertools.product(*starts))

    def make_input(p):
        sl = tuple(slice(a, a + w) for a, w in zip(p, window, strict=True))
        return image[sl][..., None]

    for p, y in _run_batches(model, positions, make_input, plan, progress, desc, len(positions)):
        sl = tuple(slice(a, a + w) for a, w in zip(p, window, strict=True))
        acc[sl] += y * weights
        wsum[sl] += weights
    return acc / np.maximum(wsum, 1e-12)


def _aligned_crop(lo: Sequence[int], hi: Sequence[int], multiple: int) -> list[slice]:
    """Slices around ``[lo, hi)``, centred, grown to sizes divisible by ``multiple``."""
    out = []
    for a, b in zip(lo, hi, strict=True):
        size = int(np.ceil((b - a) / multiple) * multiple)
        start = int(a - (size - (b - a)) // 2)
        out.append(slice(start, start + size))
    return out


def _crops(mask: np.ndarray, margin: int, multiple: int) -> list[tuple[list[slice], np.ndarray]]:
    """Crops that cover a 2-D mask with ``margin`` pixels of context: ``(crop, pixels)`` pairs.

    The mask grown by ``margin`` is split into its connected parts (the two lungs, or the
    separate uncertain spots of a map), each cut as its own crop, unless one crop over all of
    them is smaller. ``pixels`` is the part of the grown mask that the crop's prediction fills.
    """
    if margin > 0:
        grown = ndimage.maximum_filter(mask.astype(np.uint8), size=2 * margin + 1) > 0
    else:
        grown = mask.astype(bool)
    labels, n = ndimage.label(grown, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    boxes = ndimage.find_objects(labels)
    crops = [_aligned_crop([s.start for s in b], [s.stop for s in b], multiple) for b in boxes]
    whole = _aligned_crop(
        [min(b[i].start for b in boxes) for i in (0, 1)],
        [max(b[i].stop for b in boxes) for i in (0, 1)],
        multiple,
    )

    def area(crop: list[slice]) -> int:
        return (crop[0].stop - crop[0].start) * (crop[1].stop - crop[1].start)

    if n == 1 or sum(area(c) for c in crops) >= area(whole):
        return [(whole, grown)]
    return [(crop, labels == k) for k, crop in enumerate(crops, start=1)]


FLIP_MARGIN = 32
"""Pixels of context around the uncertain pixels that the flipped passes of a 2-D map see."""

CONTEXT_MARGIN = 16
"""Pixels of image around the (dilated) lung that the 2-D network sees on every slice."""


def _predict_2d(model, volume, lung, region, plan, progress, desc):
    """Slices in batches, each batch over its own lungs' bounding boxes in one pass (no tiles).

    A fully convolutional network needs no sliding windows in-plane: each batch of
    ``window_batch`` consecutive slices is cut to the bounding box of each of their (dilated)
    lungs plus :data:`CONTEXT_MARGIN` pixels, padded with air to a size the U-Net accepts, and
    predicted whole, so each lung pixel is predicted once and the slices near the apex and
    base cost little. The test-time flips are averaged in only around lung pixels whose plain
    prediction exceeds ``plan.flip_threshold`` (with :data:`FLIP_MARGIN` pixels of context;
    0 = everywhere): the flips decide between near-threshold marks, and a clear background
    pixel would need a flipped prediction far above the threshold to become a candidate.
    """
    channels = plan.window_size[0]
    half = channels // 2
    multiple = 2 ** len(plan.filters)
    air = float(apply_window(np.float32(AIR_HU), plan.hu_window, (0.0, 1.0)))
    nz, ny, nx = volume.shape
    z_first, z_stop = region[0].start, region[0].stop
    out = np.zeros(volume.shape, np.float32)
    batch = plan.window_batch
    chunks = range(z_first, z_stop, batch)
    bar = tqdm(total=len(chunks), desc=desc, unit="batch", disable=not progress, leave=False)

    def cut(zs: list[int], crop: list[slice]) -> np.ndarray:
        """The batch's input, channels last: slices z - half .. z + half of each z over the
        crop, air outside the volume; ``batch`` rows whatever ``len(zs)`` (a fixed batch size
        keeps the compiled shapes few)."""
        (ya, yb), (xa, xb) = (crop[0].start, crop[0].stop), (crop[1].start, crop[1].stop)
        x = np.full((batch, yb - ya, xb - xa, channels), air, np.float32)
        y0, y1, x0, x1 = max(ya, 0), min(yb, ny), max(xa, 0), min(xb, nx)
        for i, z in enumerate(zs):
            for c in range(channels):
                if 0 <= z - half + c < nz:
                    x[i, y0 - ya : y1 - ya, x0 - xa : x1 - xa, c] = volume[
                        z - half + c, y0:y1, x0:x1
                    ]
        return x

    def predict(zs: list[int], crop: list[slice], axes: tuple[int, ...]) -> np.ndarray:
        x = cut(zs, crop)
        if axes:
            x = np.flip(x, axis=axes)
        y = np.asarray(model.predict_on_batch(np.ascontiguousarray(x)))[: len(zs), ..., 0]
        return np.flip(y, axis=tuple(a + 1 for a in axes)) if axes else y

    def overlap(crop: list[slice], shape: tuple[int, ...]) -> tuple[tuple, tuple]:
        """Index of the crop's part inside the volume: in the crop, and in the volume."""
        src, dst = [], []
        for c, n in zip(crop, shape, strict=True):
            a, b = max(c.start, 0), min(c.stop, n)
            src.append(slice(a - c.start, b - c.start))
            dst.append(slice(a, b))
        return (slice(None), *src), (slice(None), *dst)

    def paste(block: np.ndarray, y: np.ndarray, crop: list[slice], pixels: np.ndarray) -> None:
        """Where ``pixels`` is set, the crop's prediction ``y`` replaces ``block``."""
        src, dst = overlap(crop, block.shape[1:])
        np.copyto(block[dst], y[src], where=pixels[dst[1:]][None])

    for z0 in chunks:
        zs = list(range(z0, min(z0 + batch, z_stop)))
        bar.update(1)
        near = lung[zs[0] : zs[-1] + 1] > 0
        block = out[zs[0] : zs[-1] + 1]
        for crop, pixels in _crops(near.any(axis=0), CONTEXT_MARGIN, multiple):
            paste(block, predict(zs, crop, ()), crop, pixels)
        if plan.test_time_flips == 0:
            continue
        uncertain = ((block > plan.flip_threshold) & near).any(axis=0)
        flips = IN_PLANE_FLIPS[1 : plan.test_time_flips + 1]
        for crop, pixels in _crops(uncertain, FLIP_MARGIN, multiple):
            src, dst = overlap(crop, block.shape[1:])
            total = np.zeros((len(zs), *(c.stop - c.start for c in crop)), np.float32)
            total[src] = block[dst]  # the plain prediction (0 outside the volume)
            for axes in flips:
                total += predict(zs, crop, axes)
            paste(block, total / (len(flips) + 1), crop, pixels)
    bar.close()
    return out


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@dataclass
class ExtractionResult:
    """Candidates of one scan, with the probability map they came from.

    Attributes:
        candidates: marks, most probable first.
        probability: ``(z, y, x)`` float32 map on ``geometry``'s grid.
        geometry: the model grid (world-aligned, the plan's spacing).
        source_geometry: the scan's own grid, if known.
        seconds: wall time of the extraction (preprocessing included).
        timings: seconds per step (``prepare``: resampling and lung mask, ``predict``: the
            network, ``postprocess``: components and NMS).
    """

    candidates: list[Candidate]
    probability: np.ndarray
    geometry: Geometry
    source_geometry: Geometry | None
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def _as_scan(volume_or_scan, geometry, seriesuid) -> Scan | CachedScan:
    if isinstance(volume_or_scan, Scan | CachedScan):
        return volume_or_scan
    if isinstance(volume_or_scan, np.ndarray):
        if geometry is None:
            raise TypeError("a bare HU array needs geometry=")
        return Scan(
            np.asarray(volume_or_scan).astype(np.int16, copy=False),
            geometry,
            seriesuid or "scan",
        )
    raise TypeError(
        f"expected a Scan, CachedScan or (z, y, x) HU array, got {type(volume_or_scan).__name__}"
    )


def run_extraction(
    volume_or_scan: Scan | CachedScan | np.ndarray,
    model: Any,
    plan: UNetPlan | None = None,
    *,
    geometry: Geometry | None = None,
    seriesuid: str | None = None,
    progress: bool = False,
) -> ExtractionResult:
    """Like :func:`extract_candidates`, also returning the probability map and timing."""
    t0 = time.perf_counter()
    if isinstance(model, str | os.PathLike):
        model, saved_plan = load_unet(model)
        plan = plan or saved_plan
    if plan is None:
        raise TypeError("pass the plan the model was trained with (or a model folder)")
    source = _as_scan(volume_or_scan, geometry, seriesuid)
    data = prepare_input(source, plan)
    t1 = time.perf_counter()
    prob = predict_probability_map(model, data, plan, progress=progress)
    t2 = time.perf_counter()
    candidates = candidates_from_probability(
        prob,
        data.geometry,
        seriesuid or data.seriesuid,
        threshold=plan.threshold,
        min_component_voxels=plan.min_component_voxels,
        nms_radius_mm=plan.nms_radius_mm,
        max_candidates=plan.max_candidates,
        score_sigma_voxels=plan.score_sigma_voxels,
        dense=data.image > float(apply_window(np.float32(DENSE_HU), plan.hu_window, (0.0, 1.0))),
    )
    t3 = time.perf_counter()
    timings = {"prepare": t1 - t0, "predict": t2 - t1, "postprocess": t3 - t2}
    return ExtractionResult(candidates, prob, data.geometry, data.source_geometry, t3 - t0, timings)


def extract_candidates(
    volume_or_scan: Scan | CachedScan | np.ndarray,
    model: Any,
    plan: UNetPlan | None = None,
    *,
    geometry: Geometry | None = None,
    seriesuid: str | None = None,
    progress: bool = False,
) -> list[Candidate]:
    """Nodule candidates of one scan, most probable first (world mm).

    Args:
        volume_or_scan: a :class:`lungct.Scan` (any spacing/direction; lungs are segmented
            here), a :class:`lungct.cache.CachedScan` (its lung mask is used), or a
            ``(z, y, x)`` HU array with ``geometry``.
        model: the Keras U-Net (or its :func:`unet_candidates.runtime.predictor`), or a
            model folder (then ``plan`` defaults to its plan).
        plan: the plan the model was trained with (post-processing fields may be changed).
        geometry: placement of a bare HU array.
        seriesuid: name written in the rows (default: the scan's).
        progress: show a progress bar over the batches.

    Returns:
        :class:`unet_candidates.postprocess.Candidate` rows
        ``(seriesuid, coordX, coordY, coordZ, probability, diameter_mm)``.

    Raises:
        LungCTError: no lungs found, or the scan is smaller than one window.

    Example:
        >>> from lungct import read_scan
        >>> model, plan = load_unet("models/unet2d")  # doctest: +SKIP
        >>> rows = extract_candidates(read_scan("scan.mhd"), model, plan)  # doctest: +SKIP
    """
    return run_extraction(
        volume_or_scan, model, plan, geometry=geometry, seriesuid=seriesuid, progress=progress
    ).candidates


def write_probability_map(result: ExtractionResult, path: str | os.PathLike) -> None:
    """Write the map as float32 ``.mhd`` on the scan's own grid (or the model grid if unknown)."""
    target = result.source_geometry or result.geometry
    if target == result.geometry:
        write_image(result.probability, result.geometry, path)
        return
    image = image_from_array(result.probability, result.geometry)
    ref = sitk.Image(list(target.size), sitk.sitkFloat32)
    ref.SetSpacing(target.spacing)
    ref.SetOrigin(target.origin)
    ref.SetDirection(target.direction)
    out = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    write_image(sitk.GetArrayViewFromImage(out), target, path)


def with_overrides(plan: UNetPlan, **overrides: Any) -> UNetPlan:
    """The plan with post-processing fields changed (``None`` values are ignored)."""
    values = {k: v for k, v in overrides.items() if v is not None}
    return replace(plan, **values) if values else plan


def extract_paths(
    model_dir: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    folds: str | Sequence[int] | None = None,
    scans: Sequence[str | os.PathLike] | None = None,
    cache_dir: str | os.PathLike | None = None,
    prob_map_dir: str | os.PathLike | None = None,
    threshold: float | None = None,
    max_candidates: int | None = None,
    nms_radius_mm: float | None = None,
    test_time_flips: int | None = None,
    runtime: str | None = None,
    progress: bool = True,
    allow_unfinished: bool = False,
) -> dict:
    """Extract candidates of a dataset's folds or of scan files into one CSV (the CLI's work).

    Writes ``out_csv`` (header-only when nothing is found), the resolved plan beside it as
    ``<stem>.plan.json`` and a per-scan summary ``<stem>.summary.json``. A scan that fails
    (no lungs, smaller than a window, unreadable) is reported in ``summary["failed"]`` and the
    others go on; when every scan fails, no CSV is written. ``runtime`` chooses where the
    network runs (:func:`unet_candidates.runtime.predictor`; default ``LUNGCT_RUNTIME`` or
    ``auto``). ``allow_unfinished`` accepts a model folder whose training has not ended.
    A CenterNet model folder (:mod:`unet_candidates.centernet`; its plan says
    ``"detector": "centernet"``) is read and run the same way (``auto`` runs it in Keras:
    ONNX Runtime predicted its windows 1.2-1.7 times slower on a 2-core CPU).

    Raises:
        LungCTError: bad model folder, data folder or folds, or an unusable runtime.
    """
    from lungct.cache import ScanCache, find_scans
    from lungct.io import read_scan
    from unet_candidates.centernet.config import is_centernet_plan
    from unet_candidates.runtime import default_runtime, predictor

    run: Any = run_extraction
    runtime = runtime or default_runtime()
    if is_centernet_plan(model_dir):
        from unet_candidates.centernet.extract import load_centernet, run_centernet_extraction

        model, plan = load_centernet(model_dir, allow_unfinished=allow_unfinished)
        run = run_centernet_extraction
        if runtime == "auto":  # ONNX Runtime ran its windows slower than Keras on a CPU
            runtime = "keras"
    else:
        model, plan = load_unet(model_dir, allow_unfinished=allow_unfinished)
    plan = with_overrides(
        plan,
        threshold=threshold,
        max_candidates=max_candidates,
        nms_radius_mm=nms_radius_mm,
        test_time_flips=test_time_flips,
    )
    plan.validate()
    model = predictor(model, runtime, model_dir=model_dir)
    jobs: list[tuple[str, Any]] = []
    if data_dir is not None:
        if isinstance(folds, str):
            from lungct.tables import parse_folds

            folds = parse_folds(folds)
        cache = ScanCache(cache_dir) if cache_dir else None
        for f in find_scans(data_dir, folds):
            if cache is not None and cache.is_complete(f.seriesuid):
                jobs.append((str(f.path), lambda uid=f.seriesuid: cache.open(uid)))
            else:
                jobs.append((str(f.path), lambda p=f.path: read_scan(p)))
    for path in scans or ():
        jobs.append((str(path), lambda p=path: read_scan(p)))

    rows: list[Candidate] = []
    per_scan: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for name, load in tqdm(jobs, desc="extract", unit="scan", disable=not progress):
        try:
            result = run(load(), model, plan, progress=progress)
        except LungCTError as exc:
            failed[name] = str(exc)
            continue
        uid = result.candidates[0].seriesuid if result.candidates else _uid_of(name)
        rows.extend(result.candidates)
        per_scan[uid] = {
            "source": name,
            "candidates": len(result.candidates),
            "seconds": round(result.seconds, 2),
        }
        if prob_map_dir is not None:
            write_probability_map(result, Path(prob_map_dir) / f"{uid}_prob.mhd")
    out_csv = Path(out_csv)
    if per_scan:
        from unet_candidates.postprocess import write_candidates_csv

        write_candidates_csv(rows, out_csv)
        stem = out_csv.with_suffix("")
        plan.save(f"{stem}.plan.json")
    summary = {
        "out": str(out_csv) if per_scan else None,
        "model": str(model_dir),
        "scans_done": len(per_scan),
        "candidates": len(rows),
        "candidates_per_scan": round(len(rows) / len(per_scan), 2) if per_scan else 0.0,
        "seconds_per_scan": (
            round(float(np.mean([s["seconds"] for s in per_scan.values()])), 2) if per_scan else 0.0
        ),
        "failed": failed,
        "scans": per_scan,
    }
    if per_scan:
        write_json_atomic(f"{out_csv.with_suffix('')}.summary.json", summary)
    return summary


def _uid_of(name: str) -> str:
    from lungct.io import series_uid_from_path

    return series_uid_from_path(name)
