"""Cutting a world-aligned cube out of a scan and pasting a generated one back, at any spacing.

The original resamples the whole scan to 1 mm, cuts ``round(...)``-sized blocks (31 or 33
voxels for some spacings, which crashes its reshape), and rescales the whole scan back. Here the
scan is never resampled:

* :func:`cut_cube` samples the cube's 1 mm grid from the scan (``lungct.patches.sample_patch``),
  so it is exactly ``cube_size``^3 for every spacing, direction and position, borders included;
* :func:`cube_region` maps every scan voxel inside the cube's extent to continuous cube
  coordinates, so the generated cube is resampled onto the scan's own voxels (trilinear);
* :func:`blend_weight` and :func:`matched_noise` give the seamless blend and the noise touch-up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from lungct.geometry import Geometry
from lungct.patches import sample_patch
from lungct.scan import AIR_HU


def cut_cube(
    volume: np.ndarray,
    geometry: Geometry,
    center_world: Sequence[float],
    cube_size: int,
    spacing_mm: float = 1.0,
) -> np.ndarray:
    """The ``cube_size``^3 float32 HU cube at ``spacing_mm`` centred on a world point.

    Trilinear, world-aligned (array axes follow world z, y, x), air outside the volume.
    """
    return sample_patch(
        volume,
        geometry,
        center_world,
        (cube_size,) * 3,
        (spacing_mm,) * 3,
        order=1,
        fill=AIR_HU,
    )


@dataclass(frozen=True)
class CubeRegion:
    """The scan voxels a pasted cube covers.

    Attributes:
        slices: ``(z, y, x)`` slices of the scan's bounding box of the cube.
        cube_coords: ``(3, nz, ny, nx)`` continuous cube indices ``(z, y, x)`` of those voxels.
        radius_mm: distance of every voxel from the cube's centre.
        face_mm: distance of every voxel inside the cube from its nearest face (< 0 outside).
    """

    slices: tuple[slice, slice, slice]
    cube_coords: np.ndarray
    radius_mm: np.ndarray
    face_mm: np.ndarray

    @property
    def empty(self) -> bool:
        """True when the cube lies entirely outside the scan."""
        return self.radius_mm.size == 0


def cube_region(
    geometry: Geometry, center_world: Sequence[float], cube_size: int, spacing_mm: float = 1.0
) -> CubeRegion:
    """Which scan voxels lie in the cube around ``center_world``, and where in the cube.

    Works for any spacing (0.5 to 2.5 mm, anisotropic) and any direction (flipped, oblique):
    the cube's 8 corners bound the scan's index box, and every voxel of the box is placed in
    the cube by its world position.
    """
    center = np.asarray(center_world, dtype=np.float64)
    half = (cube_size - 1) / 2.0 * spacing_mm
    corners = np.array(
        [[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64
    )
    vox = geometry.world_to_voxel(center + corners * (half + spacing_mm))
    shape = np.asarray(geometry.shape_zyx)
    lo = np.clip(np.floor(vox.min(axis=0)).astype(int), 0, shape)
    hi = np.clip(np.ceil(vox.max(axis=0)).astype(int) + 1, 0, shape)
    slices = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    if np.any(hi <= lo):
        empty = np.zeros((0, 0, 0))
        return CubeRegion(slices, np.zeros((3, 0, 0, 0)), empty, empty)
    grids = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij")
    index = np.stack(grids, axis=-1).reshape(-1, 3).astype(np.float64)
    offset = geometry.voxel_to_world(index) - center  # (N, 3) world x, y, z mm
    box = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))
    cube_coords = (offset[:, ::-1] / spacing_mm + (cube_size - 1) / 2.0).T.reshape((3, *box))
    radius = np.sqrt(np.sum(offset**2, axis=1)).reshape(box)
    face = (half - np.abs(offset).max(axis=1)).reshape(box)
    return CubeRegion(slices, cube_coords, radius, face)


def resample_cube(cube: np.ndarray, region: CubeRegion) -> np.ndarray:
    """Values of a generated cube at the region's scan voxels (trilinear, edge values outside)."""
    return ndimage.map_coordinates(
        np.asarray(cube, dtype=np.float32), region.cube_coords, order=1, mode="nearest"
    ).astype(np.float32)


def blend_weight(
    radius_mm: np.ndarray,
    face_mm: np.ndarray,
    flat_mm: float,
    sigma_mm: float,
    taper_mm: float = 2.0,
) -> np.ndarray:
    """1 inside ``flat_mm``, a Gaussian fall-off beyond it, forced to 0 at the cube's faces."""
    excess = np.maximum(radius_mm - flat_mm, 0.0)
    weight = np.exp(-0.5 * (excess / sigma_mm) ** 2)
    return (weight * np.clip(face_mm / taper_mm, 0.0, 1.0)).astype(np.float32)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function (float32)."""
    return (1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))).astype(np.float32)


def _high_pass_std(values: np.ndarray, mask: np.ndarray) -> float:
    residual = values - ndimage.gaussian_filter(values, 1.0, mode="nearest")
    return float(residual[mask].std()) if mask.sum() >= 32 else float("nan")


def matched_noise(
    original: np.ndarray, rng: np.random.Generator, scale: float = 1.0, parenchyma_hu: float = -600
) -> np.ndarray:
    """Noise whose fine-scale texture matches the scan's own, for the touch-up.

    The generated cube is smoother than CT (it was made at 1 mm and interpolated); adding noise
    with the same high-pass standard deviation as the original's lung parenchyma (times
    ``scale``) hides the difference.
    """
    original = np.asarray(original, dtype=np.float32)
    target = _high_pass_std(original, original < parenchyma_hu)
    if not np.isfinite(target):
        target = 20.0
    noise = ndimage.gaussian_filter(
        rng.standard_normal(original.shape).astype(np.float32), 0.5, mode="wrap"
    )
    have = _high_pass_std(noise, np.ones(noise.shape, bool))
    if not np.isfinite(have) or have <= 0:
        return np.zeros_like(original)
    return (noise * (scale * target / have)).astype(np.float32)


def fix_hu_overflow(
    cube: np.ndarray, overflow: float = 2000.0, floor: float = -1000.0, despeckle: float = 0.0
) -> np.ndarray:
    """The code's overflow fix: values above ``overflow`` become the mean of their 5^3
    neighbourhood's valid values; values below ``floor`` become ``floor``. With ``despeckle``,
    voxels further than that from their 3^3 median first take the median (isolated dots)."""
    cube = np.asarray(cube, dtype=np.float32).copy()
    if despeckle > 0:
        median = ndimage.median_filter(cube, size=3, mode="nearest")
        speckle = np.abs(cube - median) > despeckle
        cube[speckle] = median[speckle]
    bad = cube > overflow
    if bad.any():
        valid = (~bad).astype(np.float32)
        total = ndimage.uniform_filter(np.where(bad, 0.0, cube), 5, mode="nearest")
        count = ndimage.uniform_filter(valid, 5, mode="nearest")
        fill = np.where(count > 1e-6, total / np.maximum(count, 1e-6), overflow)
        cube[bad] = np.minimum(fill[bad], overflow)
    np.maximum(cube, floor, out=cube)
    return cube


def to_int16_hu(values: np.ndarray) -> np.ndarray:
    """Round and clip to the int16 HU range the scan is stored in (never wraps around)."""
    return np.clip(np.rint(values), AIR_HU, np.iinfo(np.int16).max).astype(np.int16)
