"""Probability map -> candidate marks in world millimetres (the part the original code lacked).

threshold -> 3-D connected components (26-neighbourhood) -> probability-weighted centre of each
component -> world ``(x, y, z)`` mm through the map's :class:`lungct.Geometry` (origin, spacing
*and* direction) -> volumetric non-maximum suppression (marks closer than a radius merge into the
most probable one) -> at most ``max_candidates`` marks, most probable first.

Each mark carries the component's peak of the (lightly smoothed) probability and an estimated
diameter: twice the radius
of the largest ball of dense tissue around the centre when the image is given (see
:func:`estimate_diameters`), else the diameter of the sphere with the component's volume.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from lungct.geometry import Geometry
from lungct.lungmask import mask_box
from lungct.tables import write_csv_atomic

CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability", "diameter_mm")
"""Columns of the candidates CSV: the LUNA16 submission columns plus an estimated diameter."""


class Candidate(NamedTuple):
    """One candidate mark (world mm, LPS frame, as in LUNA16 tables)."""

    seriesuid: str
    coordX: float
    coordY: float
    coordZ: float
    probability: float
    diameter_mm: float


def components_to_marks(
    probability: np.ndarray,
    geometry: Geometry,
    threshold: float = 0.5,
    min_component_voxels: int = 1,
    score_sigma_voxels: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components of ``probability > threshold`` as marks.

    Args:
        probability: ``(z, y, x)`` map on ``geometry``'s grid.
        geometry: where the map lies in the world (any direction).
        threshold: voxels strictly above it form components.
        min_component_voxels: smaller components are dropped.
        score_sigma_voxels: each mark's score is the component's peak of the map smoothed by
            a Gaussian of this sigma (0 = the raw peak). A Dice-trained network saturates at
            1.0 on many blobs; smoothing ranks a solid blob above a one-voxel spike and
            breaks the ties, which matters when the list is cut to the most probable marks.

    Returns:
        ``(world_xyz (N, 3), score (N,), diameter_mm (N,))``, unsorted.
    """
    if probability.shape != geometry.shape_zyx:
        raise ValueError(
            f"probability map shape {probability.shape} does not match geometry "
            f"{geometry.shape_zyx}"
        )
    mask = probability > threshold
    # Components are labelled inside the box of the voxels above the threshold (a small part
    # of the map), and each is measured inside its own box (plus the smoothing's reach,
    # clipped to the map: at a clipped side the box's edge is the map's, so the filter's
    # reflection there is the same): the same numbers as whole-map reductions, at a fraction
    # of the work.
    where = mask_box(mask)
    if where is None:
        return np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    labels, _ = ndimage.label(mask[where], structure=np.ones((3, 3, 3), bool))
    corner = np.array([w.start for w in where])
    reach = int(4.0 * score_sigma_voxels + 0.5) if score_sigma_voxels > 0 else 0
    shape = np.asarray(probability.shape)
    centres, peaks, sizes = [], [], []
    for k, part in enumerate(ndimage.find_objects(labels), start=1):
        if part is None:
            continue
        own = labels[part] == k
        count = int(np.count_nonzero(own))
        if count < min_component_voxels:
            continue
        lo = np.array([b.start for b in part]) + corner
        hi = np.array([b.stop for b in part]) + corner
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        weights = np.where(own, probability[box], 0.0).astype(np.float64)
        centres.append(np.asarray(ndimage.center_of_mass(weights), np.float64) + lo)
        if reach:
            plo, phi = np.maximum(lo - reach, 0), np.minimum(hi + reach, shape)
            outer = tuple(slice(a, b) for a, b in zip(plo, phi, strict=True))
            smooth = ndimage.gaussian_filter(
                probability[outer].astype(np.float32), score_sigma_voxels
            )
            inner = tuple(slice(a, b) for a, b in zip(lo - plo, hi - plo, strict=True))
            peaks.append(float(smooth[inner][own].max()))
        else:
            peaks.append(float(probability[box][own].max()))
        sizes.append(count)
    if not centres:
        return np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    world = geometry.voxel_to_world(np.asarray(centres).reshape(-1, 3)).reshape(-1, 3)
    voxel_mm3 = float(np.prod(geometry.spacing))
    diameters = np.cbrt(6.0 * np.asarray(sizes, np.float64) * voxel_mm3 / np.pi)
    peaks = np.asarray(peaks, dtype=np.float64)
    return world, peaks, diameters


def non_maximum_suppression(
    world_xyz: np.ndarray, probability: np.ndarray, radius_mm: float
) -> np.ndarray:
    """Indices of the marks kept by greedy volumetric NMS, most probable first.

    A mark is dropped when a more probable kept mark lies closer than ``radius_mm`` (world
    distance). Ties keep the earlier mark.
    """
    order = np.argsort(-np.asarray(probability), kind="stable")
    if radius_mm <= 0 or len(order) < 2:
        return order
    tree = cKDTree(np.asarray(world_xyz, dtype=np.float64))
    suppressed = np.zeros(len(order), bool)
    kept = []
    for i in order:
        if suppressed[i]:
            continue
        kept.append(i)
        for j in tree.query_ball_point(world_xyz[i], r=radius_mm - 1e-9):
            suppressed[j] = True
    return np.asarray(kept, dtype=np.int64)


def estimate_diameters(
    dense: np.ndarray,
    geometry: Geometry,
    world_xyz: np.ndarray,
    fallback_mm: np.ndarray,
    max_radius_mm: float = 20.0,
) -> np.ndarray:
    """Nodule diameters from the image: twice the largest ball of dense tissue at each centre.

    ``dense`` is a boolean map of tissue denser than lung (e.g. > -600 HU) on ``geometry``'s
    grid. The Euclidean distance from the centre voxel (or its densest neighbour) to the
    nearest non-dense voxel is the radius of the largest ball around it; a nodule touching a
    vessel or the pleura keeps its own radius because the lung air on its free side is
    closest. Where the centre is not dense (ground glass), ``fallback_mm`` is kept.
    """
    out = np.asarray(fallback_mm, dtype=np.float64).copy()
    if len(out) == 0:
        return out
    spacing = np.asarray(geometry.spacing, dtype=np.float64)[::-1]  # z, y, x
    reach = np.ceil(max_radius_mm / spacing).astype(int) + 1
    shape = np.asarray(dense.shape)
    centres = np.rint(geometry.world_to_voxel(np.asarray(world_xyz).reshape(-1, 3))).astype(int)
    for i, c in enumerate(centres):
        if np.any(c < 0) or np.any(c >= shape):
            continue
        lo, hi = np.maximum(c - reach, 0), np.minimum(c + reach + 1, shape)
        block = dense[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        if not block.any():
            continue
        # Pad with background so a block edge inside solid tissue still bounds the distance.
        edt = ndimage.distance_transform_edt(np.pad(block, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
        k = c - lo
        near = edt[
            max(k[0] - 1, 0) : k[0] + 2, max(k[1] - 1, 0) : k[1] + 2, max(k[2] - 1, 0) : k[2] + 2
        ]
        radius = float(near.max())
        if radius > 0:
            out[i] = min(2.0 * radius, 2.0 * max_radius_mm)
    return out


def candidates_from_probability(
    probability: np.ndarray,
    geometry: Geometry,
    seriesuid: str,
    threshold: float = 0.5,
    min_component_voxels: int = 1,
    nms_radius_mm: float = 8.0,
    max_candidates: int = 0,
    dense: np.ndarray | None = None,
    score_sigma_voxels: float = 1.0,
) -> list[Candidate]:
    """Candidate marks of one scan's probability map, most probable first.

    Args:
        probability: ``(z, y, x)`` float map on ``geometry``'s grid.
        geometry: the map's placement in the world (origin, spacing, direction).
        seriesuid: written in every row.
        threshold: voxels strictly above it form components.
        min_component_voxels: smaller components are dropped.
        nms_radius_mm: marks closer than this merge into the most probable one.
        max_candidates: keep at most this many (0 = all).
        score_sigma_voxels: smoothing of the map before each component's peak is taken as
            its probability (see :func:`components_to_marks`; 0 = raw peak).
        dense: optional boolean map of dense tissue on the same grid; when given, diameters
            come from :func:`estimate_diameters` instead of the component volume (the
            training targets are capped spheres, so component size saturates).

    Example:
        >>> geo = Geometry((8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        >>> p = np.zeros((8, 8, 8), np.float32); p[2, 3, 4] = 0.9
        >>> candidates_from_probability(p, geo, "s", score_sigma_voxels=0)[0][1:5]
        (4.0, 3.0, 2.0, 0.8999999761581421)
    """
    world, peaks, diameters = components_to_marks(
        probability, geometry, threshold, min_component_voxels, score_sigma_voxels
    )
    keep = non_maximum_suppression(world, peaks, nms_radius_mm)
    if max_candidates > 0:
        keep = keep[:max_candidates]
    if dense is not None:
        diameters = diameters.copy()
        diameters[keep] = estimate_diameters(dense, geometry, world[keep], diameters[keep])
    return [
        Candidate(
            seriesuid,
            float(world[i, 0]),
            float(world[i, 1]),
            float(world[i, 2]),
            float(peaks[i]),
            float(round(diameters[i], 2)),
        )
        for i in keep
    ]


def write_candidates_csv(rows: Iterable[Sequence], path: str | os.PathLike) -> int:
    """Write ``seriesuid,coordX,coordY,coordZ,probability,diameter_mm`` atomically.

    An empty list still gives a valid CSV: the header line alone. Returns the row count.
    """
    rows = list(rows)
    write_csv_atomic(
        path,
        CANDIDATE_COLUMNS,
        ([r[0], float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5])] for r in rows),
    )
    return len(rows)
