"""Automatic injection sites: inside the lung, away from nodules, findings and large vessels.

The original CT-GAN needs every location typed in by hand. Here sites are drawn at random from
the voxels of a coarse (2 mm) copy of the scan that satisfy, with distances in millimetres:

* in the lung parenchyma (lung mask and below ``site_vessel_hu``), where the parenchyma is the
  air part of the lung with the holes that vessels and nodules make in it filled, slice by slice
  (so the lung mask's safety dilation does not count as lung);
* at a distance from the pleura in ``site_pleura_mm`` (or ``juxtapleural_pleura_mm``, a nodule
  touching the chest wall);
* at least ``site_vessel_margin_mm`` from a large vessel (dense lung tissue that survives an
  opening with a ball of ``site_large_vessel_mm``);
* at least ``site_nodule_margin_mm`` from the edge of every nodule and excluded finding
  (unknown diameters count as 10 mm, as in the LUNA16 evaluation);
* at least ``site_min_separation_mm`` from every other site chosen in the same scan.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from ct_gan_augment.config import GANPlan
from lungct.geometry import Geometry
from lungct.preprocess import resample_array
from lungct.scan import AIR_HU

EXCLUDED_DEFAULT_DIAMETER_MM = 10.0
"""Diameter given to findings of unknown size (LUNA16 evaluation convention)."""


def _ball(radii_zyx: Sequence[float]) -> np.ndarray:
    r = [max(float(v), 1e-6) for v in radii_zyx]
    half = [int(np.floor(v)) for v in r]
    zz, yy, xx = np.mgrid[
        -half[0] : half[0] + 1, -half[1] : half[1] + 1, -half[2] : half[2] + 1
    ].astype(np.float64)
    return (zz / r[0]) ** 2 + (yy / r[1]) ** 2 + (xx / r[2]) ** 2 <= 1.0 + 1e-9


def site_maps(
    hu: np.ndarray, lung: np.ndarray, geometry: Geometry, plan: GANPlan
) -> tuple[np.ndarray, np.ndarray, np.ndarray, Geometry]:
    """The coarse maps sites are chosen from.

    Returns:
        ``(parenchyma_air, pleura_distance_mm, vessel_distance_mm, coarse_geometry)``: a boolean
        map of air-like lung voxels, the distance of every voxel from the pleura (0 outside
        the lung) and from the nearest large vessel, on the coarse grid.
    """
    spacing = tuple(max(s, plan.site_grid_mm) for s in geometry.spacing)
    coarse_hu, coarse = resample_array(np.asarray(hu), geometry, spacing, "linear", AIR_HU)
    coarse_lung, _ = resample_array(
        np.asarray(lung, dtype=np.uint8), geometry, spacing, "nearest", 0
    )
    sampling = np.asarray(coarse.spacing[::-1], dtype=np.float64)
    in_mask = coarse_lung > 0
    air = in_mask & (coarse_hu < plan.site_vessel_hu)
    inner = np.zeros_like(air)
    for z in range(air.shape[0]):
        inner[z] = ndimage.binary_fill_holes(air[z])
    pleura = ndimage.distance_transform_edt(inner, sampling=sampling)
    dense = inner & ~air
    radius = 0.5 * plan.site_large_vessel_mm / sampling
    if np.all(radius >= 0.5):
        large = ndimage.binary_opening(dense, structure=_ball(radius))
    else:
        large = dense
    if large.any():
        vessel = ndimage.distance_transform_edt(~large, sampling=sampling)
    else:
        vessel = np.full(large.shape, np.inf)
    return air & inner, pleura, vessel, coarse


def choose_sites(
    hu: np.ndarray,
    lung: np.ndarray,
    geometry: Geometry,
    count: int,
    plan: GANPlan,
    rng: np.random.Generator,
    avoid: np.ndarray | None = None,
    juxtapleural: bool = False,
    pleura_mm: tuple[float, float] | None = None,
    vessel_margin_mm: float | None = None,
    nodule_margin_mm: float | None = None,
    min_separation_mm: float | None = None,
) -> np.ndarray:
    """Up to ``count`` random world points ``(x, y, z)`` mm that satisfy the module's rules.

    Args:
        hu: the scan's HU volume ``(z, y, x)`` (any spacing and direction).
        lung: its lung mask on the same grid (``lungct`` mask: dilated, holes filled).
        geometry: the grid of both.
        count: sites wanted; fewer come back when the lung has no room for more.
        plan: distances (``site_*`` fields).
        rng: random source.
        avoid: ``(m, 4)`` rows ``x, y, z, diameter_mm`` of nodules and findings to stay away
            from (diameter < 0: unknown, counted as 10 mm).
        juxtapleural: use ``juxtapleural_pleura_mm`` instead of ``site_pleura_mm``.
        pleura_mm, vessel_margin_mm, nodule_margin_mm, min_separation_mm: override the plan.

    Returns:
        ``(k, 3)`` float64 world points, ``k <= count``.
    """
    if count <= 0:
        return np.zeros((0, 3))
    air, pleura, vessel, coarse = site_maps(hu, lung, geometry, plan)
    lo, hi = pleura_mm or (plan.juxtapleural_pleura_mm if juxtapleural else plan.site_pleura_mm)
    margin = plan.site_vessel_margin_mm if vessel_margin_mm is None else vessel_margin_mm
    ok = air & (pleura >= lo) & (pleura <= hi) & (vessel >= margin)
    index = np.argwhere(ok)
    if len(index) == 0:
        return np.zeros((0, 3))
    world = coarse.voxel_to_world(index.astype(np.float64))
    if avoid is not None and len(avoid):
        avoid = np.asarray(avoid, dtype=np.float64).reshape(-1, 4)
        nmargin = plan.site_nodule_margin_mm if nodule_margin_mm is None else nodule_margin_mm
        diam = np.where(avoid[:, 3] > 0, avoid[:, 3], EXCLUDED_DEFAULT_DIAMETER_MM)
        keep = np.ones(len(world), bool)
        for point, d in zip(avoid[:, :3], diam, strict=True):
            keep &= np.sum((world - point) ** 2, axis=1) >= (d / 2 + nmargin) ** 2
        world = world[keep]
    separation = plan.site_min_separation_mm if min_separation_mm is None else min_separation_mm
    chosen: list[np.ndarray] = []
    for i in rng.permutation(len(world)):
        p = world[i]
        if all(np.sum((p - q) ** 2) >= separation**2 for q in chosen):
            chosen.append(p)
            if len(chosen) == count:
                break
    return np.asarray(chosen, dtype=np.float64).reshape(-1, 3)
