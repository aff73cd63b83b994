"""Training data of the CenterNet detector: Gaussian heatmap and size targets, built on the fly.

Patches stream from the per-scan cache exactly as for the 3-D U-Net
(:class:`unet_candidates.data.PatchSampler`: nodule, vessel and lung centres, a bounded
shuffle buffer, flips and rotations); only the target differs. For every finding that reaches
a patch, computed in world mm on the patch's world-aligned grid:

* **heatmap**: a Gaussian of sigma ``sigma_fraction x diameter`` (clipped to
  ``[min_sigma_mm, max_sigma_mm]``) centred on the voxel nearest to the finding's centre, so
  that voxel holds exactly 1 (the one positive of the focal loss); cut to 0 beyond 3 sigma;
  the maximum where findings overlap;
* **weight**: around each finding (where its Gaussian is the largest) its reader-consensus
  weight (:meth:`CenterNetPlan.reader_weight`), 0 inside the excluded findings left out of the
  loss, 1 elsewhere;
* **size**: the finding's diameter (mm) in its core (Gaussian >= ``size_region``), with the
  size loss weighted there by the finding's weight (``size_mask``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lungct.cache import CachedScan
from lungct.patches import PatchRequest, sample_patch
from lungct.preprocess import apply_window
from lungct.scan import AIR_HU
from unet_candidates.centernet.config import CenterNetPlan
from unet_candidates.data import (
    UNKNOWN_EXCLUDED_DIAMETER_MM,
    PatchSampler,
    ScanSamples,
    build_scan_samples,
)

GAUSSIAN_REACH_SIGMAS = 3.0
"""A finding's Gaussian is cut to 0 beyond this many sigmas from its centre voxel."""


def gaussian_sigma_mm(diameter_mm: np.ndarray | float, plan: CenterNetPlan) -> np.ndarray:
    """The sigma (mm) of each finding's heatmap Gaussian."""
    d = np.asarray(diameter_mm, dtype=np.float64)
    return np.clip(plan.sigma_fraction * d, plan.min_sigma_mm, plan.max_sigma_mm)


def finding_weights(reader_count: np.ndarray, n: int, plan: CenterNetPlan) -> np.ndarray:
    """The loss weight of each of ``n`` nodules: its reader-consensus weight, 1 when its
    reader count is unknown (or the table has none, ``reader_count`` empty)."""
    readers = np.asarray(reader_count, np.int64).reshape(-1)
    out = np.ones(n, np.float64)
    for i in range(min(n, len(readers))):
        w = plan.reader_weight(int(readers[i]))
        if w is not None:
            out[i] = w
    return out


def heatmap_target(
    center_world: Sequence[float],
    size_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    findings: np.ndarray,
    sigma_mm: np.ndarray,
    weights: np.ndarray | None = None,
    ignored: np.ndarray | None = None,
    ignore_radii_mm: np.ndarray | None = None,
    size_region: float = 0.5,
) -> np.ndarray:
    """The ``(4, z, y, x)`` float32 target of one patch: heatmap, weight, size, size mask.

    The grid is the one :func:`lungct.patches.sample_patch` cuts: voxel ``i`` along an axis
    lies at ``center + (i - (n - 1) / 2) * spacing`` (world-aligned axes).

    Args:
        center_world: patch centre ``(x, y, z)`` mm.
        size_zyx: patch size in voxels.
        spacing_zyx: voxel size in mm.
        findings: ``(N, >=4)`` world ``x, y, z, diameter_mm`` of the findings to detect.
        sigma_mm: ``(N,)`` sigma of each finding's Gaussian.
        weights: ``(N,)`` loss weight of each finding (default 1).
        ignored: ``(E, >=3)`` world ``x, y, z`` of findings left out of the loss.
        ignore_radii_mm: ``(E,)`` radius of each left-out ball.
        size_region: the size is trained where a finding's Gaussian is at least this.

    Example:
        >>> t = heatmap_target((0, 0, 0), (5, 5, 5), (1, 1, 1), np.array([[1.0, 0, 0, 6]]), [1.5])
        >>> float(t[0, 2, 2, 3]), float(t[2, 2, 2, 3])  # the centre voxel: peak 1, size 6 mm
        (1.0, 6.0)
    """
    size = tuple(int(n) for n in size_zyx)
    spacing = np.asarray(spacing_zyx, np.float64)
    out = np.zeros((4, *size), np.float32)
    heat, weight, diameter, size_mask = out
    weight[...] = 1.0
    cx, cy, cz = (float(v) for v in center_world)
    centre = np.array([cz, cy, cx])
    half = (np.asarray(size) - 1) / 2.0
    axes = [(np.arange(n) - h) * s for n, h, s in zip(size, half, spacing, strict=True)]
    findings = np.asarray(findings, np.float64)
    findings = findings.reshape(len(findings), -1) if len(findings) else np.zeros((0, 4))
    sigma_mm = np.asarray(sigma_mm, np.float64).reshape(-1)
    weights = np.ones(len(findings)) if weights is None else np.asarray(weights, np.float64)
    owner = np.zeros(size, np.float32)  # the largest Gaussian so far at each voxel
    for (x, y, z, d), sigma, w in zip(findings[:, :4], sigma_mm, weights, strict=True):
        offset = (np.array([z, y, x]) - centre) / spacing  # continuous index - half
        peak = np.rint(offset + half)  # the centre voxel (may lie outside the patch)
        peak_mm = (peak - half) * spacing  # relative to the patch centre
        reach = GAUSSIAN_REACH_SIGMAS * sigma
        if np.any(np.abs(peak_mm) > half * spacing + reach + spacing):
            continue
        rz, ry, rx = (a - p for a, p in zip(axes, peak_mm, strict=True))
        r2 = rz[:, None, None] ** 2 + ry[None, :, None] ** 2 + rx[None, None, :] ** 2
        g = np.where(r2 <= reach * reach, np.exp(-r2 / (2.0 * sigma * sigma)), 0.0)
        g = g.astype(np.float32)
        mine = g > owner
        weight[mine] = w
        core = mine & (g >= size_region)
        diameter[core] = d
        size_mask[core] = w
        np.maximum(owner, g, out=owner)
    np.copyto(heat, owner)
    if ignored is not None and len(ignored):
        zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
        rel = np.asarray(ignored, np.float64)[:, :3] - np.array([cx, cy, cz])
        radii = np.asarray(ignore_radii_mm, np.float64).reshape(-1)
        for (x, y, z), r in zip(rel, radii, strict=True):
            inside = (zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= r * r
            weight[inside & (heat == 0)] = 0.0
    return out


def centernet_scan_samples(
    scan: CachedScan,
    nodules: np.ndarray,
    plan: CenterNetPlan,
    rng: np.random.Generator | None = None,
    excluded: np.ndarray | None = None,
    reader_count: np.ndarray | None = None,
    excluded_reader_count: np.ndarray | None = None,
) -> ScanSamples:
    """One scan's sampling index (:func:`unet_candidates.data.build_scan_samples`) for the
    CenterNet: an excluded finding with a reader count and a size, whose consensus weight is
    above 0, joins the nodules as a weak positive (LIDC's 1-2-reader nodules); the other
    excluded findings stay left out of the loss. Hard negatives keep clear of each nodule's
    Gaussian."""
    nodules = np.asarray(nodules, np.float64).reshape(-1, 4)
    excluded = np.zeros((0, 4)) if excluded is None else np.asarray(excluded, np.float64)
    excluded = excluded.reshape(-1, 4)
    readers = np.zeros(len(nodules), np.int64)
    if reader_count is not None and len(reader_count):
        readers = np.asarray(reader_count, np.int64).reshape(-1)
    ex_readers = np.zeros(len(excluded), np.int64)
    if excluded_reader_count is not None and len(excluded_reader_count):
        ex_readers = np.asarray(excluded_reader_count, np.int64).reshape(-1)
    promote = np.array(
        [
            d > 0 and (plan.reader_weight(int(r)) or 0.0) > 0
            for (_, _, _, d), r in zip(excluded, ex_readers, strict=True)
        ],
        dtype=bool,
    ).reshape(-1)
    nodules = np.concatenate([nodules, excluded[promote]])
    readers = np.concatenate([readers, ex_readers[promote]])
    reach = np.maximum(
        nodules[:, 3] / 2.0, GAUSSIAN_REACH_SIGMAS / 2.0 * gaussian_sigma_mm(nodules[:, 3], plan)
    )
    samples = build_scan_samples(
        scan, nodules, plan, rng=rng, excluded=excluded[~promote], radii_mm=reach
    )
    samples.reader_count = readers
    return samples


def ignore_radii_mm(excluded: np.ndarray, plan: CenterNetPlan) -> np.ndarray:
    """The radius of each left-out finding's ball (unknown size: 10 mm across)."""
    d = np.asarray(excluded, np.float64).reshape(-1, 4)[:, 3]
    d = np.where(d > 0, d, UNKNOWN_EXCLUDED_DIAMETER_MM)
    return np.maximum(d / 2.0 + plan.ignore_margin_mm, plan.min_ignore_radius_mm)


class HeatmapSampler(PatchSampler):
    """The U-Net's patch sampler with CenterNet targets (:func:`heatmap_target`).

    A patch is ``(5, z, y, x)``: the [0, 1] image, then the four target channels; the batches
    are ``x`` ``(B, z, y, x, 1)`` and ``y`` ``(B, z, y, x, 4)``
    (:data:`unet_candidates.centernet.loss.TARGET_CHANNELS`). The flips and rotations of
    :func:`unet_candidates.data.augment_patch` move every channel with the image; none of them
    changes a value (the diameter is the same from every side).

    Args:
        cache, samples, plan, augment, seed: as for
            :class:`unet_candidates.data.PatchSampler`.
    """

    def __init__(
        self, cache: Any, samples: Sequence[ScanSamples], plan: CenterNetPlan, **kwargs: Any
    ) -> None:
        super().__init__(cache, samples, plan, **kwargs)
        self._targets = {}
        for s in samples:
            weights = finding_weights(s.reader_count, len(s.nodules), plan)
            sigma = gaussian_sigma_mm(s.nodules[:, 3], plan) if len(s.nodules) else np.zeros(0)
            self._targets[s.seriesuid] = (sigma, weights, ignore_radii_mm(s.excluded, plan))

    def cut(self, scan: CachedScan, request: PatchRequest) -> np.ndarray:
        """Image channel followed by the four target channels, ``(5, z, y, x)`` float32."""
        plan = self.plan
        hu = sample_patch(
            scan.volume,
            scan.geometry,
            request.center_world,
            plan.patch_size,
            plan.spacing_zyx,
            order=1,
            fill=AIR_HU,
        )
        image = apply_window(hu, plan.hu_window, (0.0, 1.0)).astype(np.float32)
        samples = self.samples[request.seriesuid]
        sigma, weights, radii = self._targets[request.seriesuid]
        target = heatmap_target(
            request.center_world,
            plan.patch_size,
            plan.spacing_zyx,
            samples.nodules,
            sigma,
            weights,
            samples.excluded,
            radii,
            plan.size_region,
        )
        return np.concatenate([image[None], target], axis=0)

    def model_layout(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(B, 5, z, y, x)`` patches as ``x`` ``(B, z, y, x, 1)`` and ``y`` ``(B, z, y, x, 4)``."""
        x = batch[:, 0][..., None]
        y = np.moveaxis(batch[:, 1:], 1, -1)
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.float32)
