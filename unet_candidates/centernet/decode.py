"""Heatmap -> candidate marks: 3-D peak extraction, world millimetres, volumetric NMS.

A peak is a voxel above the threshold that equals the maximum of the ``kernel``^3 block around
it (CenterNet's max-pool equality, in 3-D). Each peak becomes a mark at its voxel's world
``(x, y, z)`` (through the map's :class:`lungct.Geometry`: origin, spacing and direction) with
the heatmap value as its probability and the size map's value as its diameter; marks closer
than ``nms_radius_mm`` merge into the most probable one
(:func:`unet_candidates.postprocess.non_maximum_suppression`, the U-Net stage's NMS).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from lungct.geometry import Geometry
from unet_candidates.postprocess import Candidate, non_maximum_suppression


def find_peaks(heatmap: np.ndarray, threshold: float, kernel: int = 3) -> np.ndarray:
    """``(N, 3)`` ``(z, y, x)`` indices of the local maxima above ``threshold``, highest first.

    Plateaus give one index per voxel of the plateau (NMS merges them); ties keep C order.
    """
    if heatmap.ndim != 3:
        raise ValueError(f"expected a (z, y, x) heatmap, got shape {heatmap.shape}")
    pooled = ndimage.maximum_filter(heatmap, size=int(kernel), mode="constant", cval=-np.inf)
    idx = np.argwhere((heatmap == pooled) & (heatmap > threshold))
    order = np.argsort(-heatmap[tuple(idx.T)], kind="stable")
    return idx[order]


def candidates_from_heatmap(
    heatmap: np.ndarray,
    geometry: Geometry,
    seriesuid: str,
    size: np.ndarray | None = None,
    threshold: float = 0.05,
    kernel: int = 3,
    nms_radius_mm: float = 8.0,
    max_candidates: int = 0,
) -> list[Candidate]:
    """Candidate marks of one scan's heatmap, most probable first.

    Args:
        heatmap: ``(z, y, x)`` map on ``geometry``'s grid.
        geometry: the map's placement in the world.
        seriesuid: written in every row.
        size: ``(z, y, x)`` diameter map (mm) on the same grid; ``None`` writes 0.
        threshold: peaks strictly above it count.
        kernel: the max-pool window of the peak test (odd).
        nms_radius_mm: marks closer than this merge into the most probable (0 = none).
        max_candidates: keep at most this many (0 = all).

    Example:
        >>> geo = Geometry((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        >>> h = np.zeros((8, 8, 8), np.float32); h[2, 3, 4] = 0.9
        >>> candidates_from_heatmap(h, geo, "s")[0][1:5]
        (4.0, 3.0, 2.0, 0.8999999761581421)
    """
    if heatmap.shape != geometry.shape_zyx:
        raise ValueError(
            f"heatmap shape {heatmap.shape} does not match geometry {geometry.shape_zyx}"
        )
    idx = find_peaks(heatmap, threshold, kernel)
    if len(idx) == 0:
        return []
    scores = heatmap[tuple(idx.T)].astype(np.float64)
    world = geometry.voxel_to_world(idx.astype(np.float64)).reshape(-1, 3)
    keep = non_maximum_suppression(world, scores, nms_radius_mm)
    if max_candidates > 0:
        keep = keep[:max_candidates]
    diameters = (
        np.zeros(len(idx)) if size is None else np.maximum(size[tuple(idx.T)], 0.0)
    ).astype(np.float64)
    return [
        Candidate(
            seriesuid,
            float(world[i, 0]),
            float(world[i, 1]),
            float(world[i, 2]),
            float(scores[i]),
            float(round(diameters[i], 2)),
        )
        for i in keep
    ]
