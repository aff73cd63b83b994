"""The in-memory CT scan: an int16 HU volume indexed ``[z, y, x]`` and its world geometry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lungct.geometry import Geometry

AIR_HU = -1024
"""Value that replaces scanner padding (-2048, -3024, ...) and anything else below air."""


@dataclass
class Scan:
    """A CT volume with its geometry.

    Args:
        array: int16 Hounsfield units, shape ``(z, y, x)``.
        geometry: where the grid sits in world space (``(x, y, z)`` sizes, spacing, origin).
        seriesuid: the series identifier (LUNA16: the file stem; DICOM: SeriesInstanceUID).
        hu_min: smallest stored value before padding was replaced by air.
        hu_max: largest stored value.
        source: the path the scan was read from, for messages.
    """

    array: np.ndarray
    geometry: Geometry
    seriesuid: str
    hu_min: int | None = None
    hu_max: int | None = None
    source: str | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"scan array must be 3-D (z, y, x), got shape {self.array.shape}")
        if tuple(self.array.shape) != self.geometry.shape_zyx:
            raise ValueError(
                f"array shape {self.array.shape} does not match geometry size {self.geometry.size}"
            )
        if self.hu_min is None:
            self.hu_min = int(self.array.min())
        if self.hu_max is None:
            self.hu_max = int(self.array.max())

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm, ``(x, y, z)``."""
        return self.geometry.spacing

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position of voxel ``(0, 0, 0)``, ``(x, y, z)`` mm."""
        return self.geometry.origin

    @property
    def direction(self) -> tuple[float, ...]:
        """Direction cosines, 9 numbers row-major."""
        return self.geometry.direction

    def world_to_voxel(self, world_xyz: Sequence[float] | np.ndarray) -> np.ndarray:
        """World ``(x, y, z)`` mm -> continuous voxel ``(z, y, x)``."""
        return self.geometry.world_to_voxel(world_xyz)

    def voxel_to_world(self, voxel_zyx: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous voxel ``(z, y, x)`` -> world ``(x, y, z)`` mm."""
        return self.geometry.voxel_to_world(voxel_zyx)

    def info(self) -> dict:
        """The summary printed by ``python -m lungct info``."""
        g = self.geometry
        return {
            "seriesuid": self.seriesuid,
            "size": list(g.size),
            "spacing": list(g.spacing),
            "origin": list(g.origin),
            "direction": list(g.direction),
            "hu_min": int(self.hu_min),
            "hu_max": int(self.hu_max),
        }
