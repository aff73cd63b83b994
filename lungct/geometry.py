"""World millimetres <-> voxel indices, with origin, spacing AND direction.

Conventions (as in SimpleITK and LUNA16):

* world points are ``(x, y, z)`` millimetres in the ITK/DICOM patient (LPS) frame;
* :class:`Geometry` stores ``size``, ``spacing`` and ``origin`` in ``(x, y, z)`` order and the
  direction cosines as a row-major 3x3 matrix whose *columns* are the image axes in world space;
* numpy volumes are indexed ``[z, y, x]``; :meth:`Geometry.world_to_voxel` therefore returns
  ``(z, y, x)`` continuous indices, ready for array code.

``world = origin + direction @ (spacing * index_xyz)``, so the inverse uses the direction's
inverse (its transpose for an orthonormal matrix; we solve the general case to stay exact for
oblique and flipped acquisitions alike).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lungct.errors import LungCTError

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid sits in the world.

    Args:
        size: number of voxels along ``(x, y, z)``.
        spacing: voxel size in mm along ``(x, y, z)``.
        origin: world position (mm) of the centre of voxel ``(0, 0, 0)``.
        direction: 9 numbers, row-major 3x3; column ``i`` is image axis ``i`` in world space.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = field(default=IDENTITY)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(int(v) for v in self.size))
        object.__setattr__(self, "spacing", tuple(float(v) for v in self.spacing))
        object.__setattr__(self, "origin", tuple(float(v) for v in self.origin))
        object.__setattr__(self, "direction", tuple(float(v) for v in self.direction))
        if len(self.size) != 3 or len(self.spacing) != 3 or len(self.origin) != 3:
            raise LungCTError(None, "geometry needs 3 sizes, spacings and origin values")
        if len(self.direction) != 9:
            raise LungCTError(None, f"direction needs 9 numbers, got {len(self.direction)}")
        if min(self.spacing) <= 0 or not np.all(np.isfinite(self.spacing)):
            raise LungCTError(None, f"spacing must be positive and finite, got {self.spacing}")
        if not np.all(np.isfinite(self.origin)):
            raise LungCTError(None, f"origin must be finite, got {self.origin}")
        if not np.all(np.isfinite(self.direction)):
            raise LungCTError(None, f"direction must be finite, got {self.direction}")
        if abs(np.linalg.det(self.direction_matrix)) < 1e-6:
            raise LungCTError(None, f"direction matrix is singular: {self.direction}")

    @property
    def direction_matrix(self) -> np.ndarray:
        """The direction cosines as a 3x3 float64 array (columns = image axes)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """The numpy shape ``(z, y, x)`` of a volume on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        """3x3 matrix M with ``world = origin + M @ index_xyz``."""
        return self.direction_matrix * np.asarray(self.spacing)[None, :]

    def voxel_to_world(self, voxel_zyx: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous ``(z, y, x)`` index (or an ``(N, 3)`` array of them) -> world ``(x, y, z)`` mm."""
        v = np.asarray(voxel_zyx, dtype=np.float64)
        xyz = v[..., ::-1]
        return np.asarray(self.origin) + xyz @ self.index_to_world_matrix.T

    def world_to_voxel(self, world_xyz: Sequence[float] | np.ndarray) -> np.ndarray:
        """World ``(x, y, z)`` mm (or an ``(N, 3)`` array) -> continuous ``(z, y, x)`` index."""
        w = np.asarray(world_xyz, dtype=np.float64)
        rel = w - np.asarray(self.origin)
        xyz = np.linalg.solve(self.index_to_world_matrix, rel.reshape(-1, 3).T).T.reshape(rel.shape)
        return xyz[..., ::-1]

    def world_to_index(self, world_xyz: Sequence[float] | np.ndarray) -> np.ndarray:
        """Like :meth:`world_to_voxel`, rounded to the nearest integer voxel ``(z, y, x)``."""
        return np.rint(self.world_to_voxel(world_xyz)).astype(np.int64)

    def contains(self, voxel_zyx: Sequence[float] | np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Whether continuous voxel positions lie inside the grid (centres at 0..n-1)."""
        v = np.asarray(voxel_zyx, dtype=np.float64)
        upper = np.asarray(self.shape_zyx, dtype=np.float64) - 1 + 0.5
        return np.all((v >= -0.5 - margin) & (v <= upper + margin), axis=-1)

    def with_spacing(self, spacing: Sequence[float]) -> Geometry:
        """The grid covering the same extent at a new spacing, same origin and direction."""
        spacing = tuple(float(s) for s in spacing)
        extent = np.asarray(self.size) * np.asarray(self.spacing)
        size = tuple(max(1, round(e / s)) for e, s in zip(extent, spacing, strict=True))
        return Geometry(size=size, spacing=spacing, origin=self.origin, direction=self.direction)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                size=d["size"],
                spacing=d["spacing"],
                origin=d["origin"],
                direction=d.get("direction", IDENTITY),
            )
        except KeyError as exc:
            raise LungCTError(None, f"geometry is missing {exc.args[0]!r}") from None

    def to_json(self) -> str:
        """JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict())
