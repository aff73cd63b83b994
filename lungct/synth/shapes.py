"""The shipped nodule shape library (LIDC-IDRI outlines) and the LUNA16 diameter distribution.

Both live in ``lungct/data`` and were made once by ``scripts/extract_lidc_shapes.py``; see
``lungct/data/lidc_shapes.md`` for attribution (LIDC-IDRI, TCIA, CC BY 3.0). Nothing here reads
the LIDC database itself, so the generator runs without ``../shared``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from lungct.errors import LungCTError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SHAPES_PATH = DATA_DIR / "lidc_shapes.npz"
DIAMETERS_PATH = DATA_DIR / "luna16_diameters.npz"

SOLID, PART_SOLID, GROUND_GLASS = 0, 1, 2
CATEGORY_NAMES = ("solid", "part-solid", "ground-glass")


@dataclass(frozen=True)
class ShapeLibrary:
    """Binary nodule masks on ``grid^3`` isotropic cubes centred on each nodule's centroid.

    Attributes:
        masks_packed: ``(n, grid**3 // 8)`` bit-packed masks, (z, y, x) C order.
        grid: voxels per cube side.
        side_mm: physical side of each cube in the source scan.
        diameter_eq_mm: equivalent-sphere diameter of each outline.
        category: 0 solid, 1 part-solid, 2 ground-glass (from the LIDC texture rating).
        spiculation: LIDC spiculation rating 1-5.
    """

    masks_packed: np.ndarray
    grid: int
    side_mm: np.ndarray
    diameter_eq_mm: np.ndarray
    category: np.ndarray
    spiculation: np.ndarray

    def __len__(self) -> int:
        return int(self.masks_packed.shape[0])

    def mask(self, i: int) -> np.ndarray:
        """Shape ``i`` as a boolean ``(grid, grid, grid)`` array."""
        n = self.grid**3
        return np.unpackbits(self.masks_packed[i])[:n].reshape((self.grid,) * 3).astype(bool)

    def signed_distance(self, i: int) -> np.ndarray:
        """Shape ``i`` as a signed distance map in units of *its equivalent-sphere diameter*.

        Negative inside. Scaling by the target diameter gives millimetres, which lets the
        renderer draw a soft, partial-volume edge at any voxel size.
        """
        return _signed_distance(self, i)

    def pick(
        self, rng: np.random.Generator, category: int, diameter_mm: float | None = None
    ) -> int:
        """A random shape index of the given texture category (any category if none).

        With ``diameter_mm``, shapes whose own size is near it are favoured (log-normal weight,
        a factor of 1.35 per standard deviation): in LIDC a 25 mm mass and a 4 mm nodule differ
        in outline as much as in size, and their ratings (malignancy above all) follow size, so
        a nodule drawn at one size takes the outline, and the ratings, of a nodule of about
        that size.
        """
        idx = np.flatnonzero(self.category == category)
        if idx.size == 0:
            idx = np.arange(len(self))
        if diameter_mm is None:
            return int(idx[rng.integers(idx.size)])
        z = np.log(float(diameter_mm) / self.diameter_eq_mm[idx]) / np.log(SIZE_MATCH_FACTOR)
        z = np.abs(z) - np.abs(z).min()  # the nearest shape always keeps weight 1
        w = np.exp(-0.5 * z * z)
        return int(idx[rng.choice(idx.size, p=w / w.sum())])


SIZE_MATCH_FACTOR = 1.35
"""How far (as a ratio, one standard deviation) a picked shape's own size strays from the
nodule it is drawn for."""


@lru_cache(maxsize=4)
def shape_ratings(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The LIDC ratings of every library shape, ``(n, 9)`` int in
    :data:`lungct.tables.RATING_COLUMNS` order (those of the one reader whose outline it is),
    and the LIDC annotation id of each shape."""
    from lungct.tables import RATING_COLUMNS

    with np.load(path or SHAPES_PATH) as data:
        ratings = np.column_stack([data[name].astype(np.int64) for name in RATING_COLUMNS])
        ids = data["lidc_annotation_id"].astype(np.int64)
    return ratings, ids


@lru_cache(maxsize=512)
def _signed_distance_cached(path: str, i: int) -> np.ndarray:
    lib = load_shape_library(path)
    m = lib.mask(i)
    # A little smoothing first: LIDC outlines are drawn on a pixel grid and slices are thick,
    # so the raw masks are faceted; real nodule surfaces are not.
    smooth = ndimage.gaussian_filter(m.astype(np.float32), 1.1) > 0.5
    if not smooth.any():
        smooth = m
    step = float(lib.side_mm[i]) / lib.grid
    inside = ndimage.distance_transform_edt(smooth)
    outside = ndimage.distance_transform_edt(~smooth)
    sdf_mm = (outside - inside + np.where(smooth, 0.5, -0.5)) * step
    out = (sdf_mm / float(lib.diameter_eq_mm[i])).astype(np.float32)
    out.setflags(write=False)
    return out


def _signed_distance(lib: ShapeLibrary, i: int) -> np.ndarray:
    return _signed_distance_cached(str(SHAPES_PATH), i)


@lru_cache(maxsize=4)
def load_shape_library(path: str | Path = SHAPES_PATH) -> ShapeLibrary:
    """Load the shipped library (cached per process)."""
    path = Path(path)
    if not path.exists():
        raise LungCTError(
            path, "nodule shape library is missing (run scripts/extract_lidc_shapes.py)"
        )
    with np.load(path, allow_pickle=False) as d:
        return ShapeLibrary(
            masks_packed=d["masks_packed"].copy(),
            grid=int(d["grid"]),
            side_mm=d["side_mm"].astype(np.float64),
            diameter_eq_mm=d["diameter_eq_mm"].astype(np.float64),
            category=d["category"].astype(np.int64),
            spiculation=d["spiculation"].astype(np.int64),
        )


@lru_cache(maxsize=4)
def load_luna16_diameters(path: str | Path = DIAMETERS_PATH) -> np.ndarray:
    """The 1186 LUNA16 nodule diameters (mm), sorted (cached per process)."""
    path = Path(path)
    if not path.exists():
        raise LungCTError(
            path, "LUNA16 diameter table is missing (run scripts/extract_lidc_shapes.py)"
        )
    with np.load(path, allow_pickle=False) as d:
        out = d["diameter_mm"].astype(np.float64)
    out.setflags(write=False)
    return out


def sample_diameter(rng: np.random.Generator) -> float:
    """A nodule diameter (mm) drawn from the empirical LUNA16 distribution.

    A real diameter is drawn and jittered by a few per cent (kept >= 3 mm), so the synthetic
    sizes follow the real histogram without repeating its 1186 values exactly.
    """
    d = load_luna16_diameters()
    v = float(d[rng.integers(d.size)]) * float(np.exp(rng.normal(0.0, 0.04)))
    return max(3.05, v)
