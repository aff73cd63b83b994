"""Resampling and HU windowing, recorded as a named JSON plan.

A :class:`PreprocessPlan` says everything that shapes the voxels a model sees (target spacing,
interpolation, HU window and output range). It is saved next to every cache and model, so a
prediction can check it uses the same preprocessing as the training did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic
from lungct.geometry import IDENTITY, Geometry
from lungct.io import image_from_array
from lungct.plans import check_field_types
from lungct.scan import AIR_HU, Scan

WINDOWS: dict[str, tuple[float, float]] = {
    "mgicnn": (-1000.0, 400.0),  # MGI-CNN paper, keras.io
    "monai": (-1024.0, 300.0),
    "grt123": (-1200.0, 600.0),
    "lung": (-1350.0, 150.0),  # radiologists' lung window (W 1500, L -600)
}


@dataclass(frozen=True)
class PreprocessPlan:
    """How scans are turned into model input.

    Args:
        name: a label that shows up in caches and model folders.
        spacing: target voxel size ``(x, y, z)`` mm (default 1 mm isotropic).
        hu_window: HU values mapped to the ends of ``output_range`` (clipped outside).
        output_range: the float range the window maps to.
        image_interpolation: 'linear' (or 'bspline') for CT values; masks are always nearest.
        align_to_world: resample onto an identity-direction grid, so array axes follow world
            x, y, z for every scan (flipped and oblique ones included).
    """

    name: str = "iso1mm_mgicnn"
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    hu_window: tuple[float, float] = WINDOWS["mgicnn"]
    output_range: tuple[float, float] = (0.0, 1.0)
    image_interpolation: str = "linear"
    align_to_world: bool = True
    version: int = field(default=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "hu_window", tuple(float(v) for v in self.hu_window))
        object.__setattr__(self, "output_range", tuple(float(v) for v in self.output_range))
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise LungCTError(None, f"plan {self.name!r}: spacing must be 3 positive numbers")
        if self.hu_window[0] >= self.hu_window[1]:
            raise LungCTError(None, f"plan {self.name!r}: empty HU window {self.hu_window}")
        if self.image_interpolation not in _INTERPOLATORS:
            raise LungCTError(
                None, f"plan {self.name!r}: unknown interpolation {self.image_interpolation!r}"
            )

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict, source: str | Path | None = None) -> PreprocessPlan:
        """Inverse of :meth:`to_dict`; unknown keys and wrong types are errors (a typo must not
        pass silently)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise LungCTError(source, f"unknown preprocessing plan keys {unknown}")
        check_field_types(cls, d, source)
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON (atomically)."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PreprocessPlan:
        """Read a plan written by :meth:`save`."""
        return cls.from_dict(read_json(path, "preprocessing plan file is missing"), source=path)


_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "nearest": sitk.sitkNearestNeighbor,
}


def world_aligned_geometry(geometry: Geometry, spacing: Sequence[float]) -> Geometry:
    """The identity-direction grid at ``spacing`` that covers ``geometry``'s whole extent.

    Flipped or oblique scans resampled onto it have array axes that follow world x, y, z, so a
    patch cut from any scan has the same orientation.
    """
    spacing = np.asarray([float(s) for s in spacing])
    size = np.asarray(geometry.size, dtype=np.float64)
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    # Voxel-edge corners of the source grid (index -0.5 .. size-0.5), in world mm.
    idx = corners * size - 0.5
    world = np.asarray(geometry.origin) + idx @ geometry.index_to_world_matrix.T
    lo, hi = world.min(axis=0), world.max(axis=0)
    new_size = np.maximum(1, np.round((hi - lo) / spacing - 1e-6).astype(int))
    origin = lo + 0.5 * spacing
    return Geometry(tuple(new_size), tuple(spacing), tuple(origin))


def resample_array(
    array: np.ndarray,
    geometry: Geometry,
    spacing: Sequence[float],
    interpolation: str = "linear",
    default_value: float = AIR_HU,
    align_to_world: bool = False,
) -> tuple[np.ndarray, Geometry]:
    """Resample a ``(z, y, x)`` volume to ``spacing`` (x, y, z) mm over the same extent.

    By default origin-side edge and direction are kept. With ``align_to_world`` the result lies
    on the identity-direction grid of :func:`world_aligned_geometry`. Either way the returned
    geometry places it exactly in the world, so world coordinates need no correction.
    Use ``interpolation='nearest'`` for label masks.
    """
    if interpolation not in _INTERPOLATORS:
        raise LungCTError(None, f"unknown interpolation {interpolation!r}")
    if align_to_world:
        target = world_aligned_geometry(geometry, spacing)
    else:
        target = geometry.with_spacing(spacing)
        # Shift so the resampled grid covers the same physical extent (voxel edges line up).
        offset_idx = 0.5 * (np.asarray(target.spacing) / np.asarray(geometry.spacing) - 1.0)
        origin = np.asarray(geometry.origin) + geometry.index_to_world_matrix @ offset_idx
        target = Geometry(target.size, target.spacing, tuple(origin), geometry.direction)
    return resample_onto(array, geometry, target, interpolation, default_value), target


def resample_scan(
    scan: Scan,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    interpolation: str = "linear",
    align_to_world: bool = False,
) -> Scan:
    """A new :class:`Scan` at ``spacing`` (default 1 mm isotropic), int16 HU kept."""
    array, geometry = resample_array(
        scan.array, scan.geometry, spacing, interpolation, align_to_world=align_to_world
    )
    return Scan(
        array=array.astype(np.int16, copy=False),
        geometry=geometry,
        seriesuid=scan.seriesuid,
        hu_min=scan.hu_min,
        hu_max=scan.hu_max,
        source=scan.source,
    )


def resample_onto(
    array: np.ndarray,
    geometry: Geometry,
    target: Geometry,
    interpolation: str = "nearest",
    default_value: float = 0.0,
) -> np.ndarray:
    """A ``(z, y, x)`` volume on ``geometry`` resampled onto the grid ``target`` (world mm).

    Voxels of ``target`` outside ``geometry``'s extent get ``default_value``; nearest
    neighbour (the default) keeps a label mask's labels.
    """
    if interpolation not in _INTERPOLATORS:
        raise LungCTError(None, f"unknown interpolation {interpolation!r}")
    image = image_from_array(array, geometry)
    ref = sitk.Image(list(target.size), image.GetPixelID())
    ref.SetSpacing(target.spacing)
    ref.SetOrigin(target.origin)
    ref.SetDirection(target.direction)
    out = sitk.Resample(
        image,
        ref,
        sitk.Transform(),
        _INTERPOLATORS[interpolation],
        float(default_value),
        image.GetPixelID(),
    )
    return sitk.GetArrayFromImage(out)


def nearest_onto(
    array: np.ndarray, geometry: Geometry, target: Geometry, default_value: float = 0
) -> np.ndarray:
    """:func:`resample_onto` with nearest neighbour, by indexing where both grids are
    world-aligned (identity direction): each target axis takes the source voxel whose centre
    is nearest (a half-way point goes to the upper one), ``default_value`` outside the source.

    Several times faster than the resampler for a mask shown on a scan's finer grid; other
    grids go through :func:`resample_onto`.
    """
    if not (np.allclose(geometry.direction, IDENTITY) and np.allclose(target.direction, IDENTITY)):
        return resample_onto(array, geometry, target, "nearest", default_value)
    out = np.asarray(array)
    inside = []
    for axis_xyz in range(3):
        axis = 2 - axis_xyz
        centres = target.origin[axis_xyz] + target.spacing[axis_xyz] * np.arange(
            target.size[axis_xyz]
        )
        index = (centres - geometry.origin[axis_xyz]) / geometry.spacing[axis_xyz]
        n = geometry.size[axis_xyz]
        inside.append((index >= -0.5) & (index < n - 0.5))
        out = np.take(out, np.clip(np.floor(index + 0.5).astype(np.int64), 0, n - 1), axis=axis)
    ix, iy, iz = inside
    if not (ix.all() and iy.all() and iz.all()):
        out = out.copy()
        out[~iz] = default_value
        out[:, ~iy] = default_value
        out[:, :, ~ix] = default_value
    return np.ascontiguousarray(out)


def resample_mask(
    mask: np.ndarray, geometry: Geometry, spacing: Sequence[float], align_to_world: bool = False
) -> tuple[np.ndarray, Geometry]:
    """Nearest-neighbour resampling of a label mask (same grid rule as :func:`resample_array`)."""
    return resample_array(
        mask.astype(np.uint8, copy=False),
        geometry,
        spacing,
        "nearest",
        default_value=0,
        align_to_world=align_to_world,
    )


def subsample_aligned(
    array: np.ndarray, geometry: Geometry, spacing: Sequence[float], interpolation: str
) -> tuple[np.ndarray, Geometry] | None:
    """:func:`resample_array` (``align_to_world``) by slicing, where that is what it computes.

    On a world-aligned grid whose spacing divides ``spacing`` a whole number of times per axis
    (and whose size that factor divides), every voxel of the coarser grid lies on a voxel of
    ``geometry`` (odd factor) or halfway between two (even factor): linear interpolation is
    that voxel or the mean of the two, nearest neighbour that voxel or the upper one. Linear
    results are float32 and exact (:func:`resample_array` returns the input's type, which
    truncates the half HU of a mean); masks are the same voxels. Returns ``None`` where the
    grids do not fit so (then resample).
    """
    if interpolation not in ("linear", "nearest") or not np.allclose(geometry.direction, IDENTITY):
        return None
    source = np.asarray(geometry.spacing, float)
    factors = np.asarray([float(s) for s in spacing]) / source
    whole = np.rint(factors).astype(int)
    sizes = np.asarray(geometry.size)
    if np.any(whole < 1) or not np.allclose(factors, whole, atol=1e-9) or np.any(sizes % whole):
        return None
    target = world_aligned_geometry(geometry, spacing)
    if not np.array_equal(np.asarray(target.size), sizes // whole):
        return None
    out = array
    for axis_xyz, f in enumerate(whole):
        if f == 1:
            continue
        axis = 2 - axis_xyz
        take = [slice(None)] * 3
        if f % 2 or interpolation == "nearest":
            take[axis] = slice(f // 2, None, f)
            out = out[tuple(take)]
        else:
            take[axis] = slice(f // 2 - 1, None, f)
            low = out[tuple(take)].astype(np.float32)
            take[axis] = slice(f // 2, None, f)
            out = (low + out[tuple(take)]) * np.float32(0.5)
    if interpolation == "linear":
        out = out.astype(np.float32, copy=False)
    return np.ascontiguousarray(out), target


def apply_window(
    hu: np.ndarray,
    window: tuple[float, float] = WINDOWS["mgicnn"],
    output_range: tuple[float, float] = (0.0, 1.0),
) -> np.ndarray:
    """Clip HU to ``window`` and map it linearly to ``output_range`` as float32."""
    lo, hi = float(window[0]), float(window[1])
    a, b = float(output_range[0]), float(output_range[1])
    x = np.clip(np.asarray(hu, dtype=np.float32), lo, hi)  # a new array: work in place
    x -= np.float32(lo)
    x *= np.float32((b - a) / (hi - lo))
    x += np.float32(a)
    return x


def normalize(hu: np.ndarray, plan: PreprocessPlan) -> np.ndarray:
    """Window and scale HU as ``plan`` says."""
    return apply_window(hu, plan.hu_window, plan.output_range)
