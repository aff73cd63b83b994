"""Training cubes: nodule cubes for the injector, healthy lung cubes for the remover.

Cubes are cut from the per-scan cache (``lungct.cache``) by world coordinates with
``lungct.patches.sample_patch`` at ``cut_spacing_mm`` (1 mm), so every cube has the same scale
and orientation whatever the scan's spacing. Each source point gives one *base* cube, larger
than the training cube so a shift of ``max_shift_vox`` and any rotation about z stay inside;
:meth:`TrainingCubes.sample` draws augmented training cubes from them on the fly (random
rotation about z, an integer shift for a ``shift_probability`` share, flips), instead of the
original's 67 stored copies per nodule.
Only the base cubes (int16) are held in memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from ct_gan_augment.config import KINDS, GANPlan
from ct_gan_augment.sites import choose_sites
from lungct.cache import ScanCache
from lungct.errors import LungCTError
from lungct.patches import sample_patch
from lungct.scan import AIR_HU
from lungct.tables import AnnotationTable, read_annotations


def base_shape(plan: GANPlan) -> tuple[int, int, int]:
    """``(z, y, x)`` size of a base cube: room for the shift, and in-plane for any rotation."""
    c, s = plan.cube_size, plan.max_shift_vox
    in_plane = math.ceil(c * math.sqrt(2.0)) if plan.rotate else c
    return (c + 2 * s + 2, in_plane + 2 * s + 2, in_plane + 2 * s + 2)


@dataclass(frozen=True)
class CubeSource:
    """Where a base cube came from (a row of the training-set table)."""

    seriesuid: str
    fold: int | None
    x: float
    y: float
    z: float
    diameter_mm: float


def _table_points(table: AnnotationTable | None, uid: str) -> np.ndarray:
    if table is None:
        return np.zeros((0, 4))
    rows = table.rows_in_series(uid)
    return np.column_stack([table.coords[rows], table.diameter_mm[rows]]).reshape(-1, 4)


class TrainingCubes:
    """Base cubes (int16 HU) and an augmenting sampler of training cubes.

    Args:
        base: ``(N, *base_shape(plan))`` int16 HU cubes at ``plan.cut_spacing_mm``.
        sources: one :class:`CubeSource` per cube.
        plan: cube size and augmentation settings.

    Example:
        >>> cubes = TrainingCubes.from_cache("cache", "data", [0, 1], "injector", plan)  # doctest: +SKIP
        >>> batch = cubes.sample(np.random.default_rng(0), 8)  # (8, 32, 32, 32) HU  # doctest: +SKIP
    """

    def __init__(self, base: np.ndarray, sources: list[CubeSource], plan: GANPlan) -> None:
        if base.ndim != 4 or tuple(base.shape[1:]) != base_shape(plan):
            raise ValueError(f"base cubes must be (N, {base_shape(plan)}), got {base.shape}")
        if len(base) != len(sources):
            raise ValueError("one source per base cube")
        self.base = base
        self.sources = sources
        self.plan = plan
        c = plan.cube_size
        offsets = np.arange(c, dtype=np.float32) - (c - 1) / 2.0
        self._grid = np.meshgrid(offsets, offsets, offsets, indexing="ij")

    def __len__(self) -> int:
        return len(self.base)

    @property
    def series(self) -> list[str]:
        """Series UIDs the cubes came from (sorted, unique)."""
        return sorted({s.seriesuid for s in self.sources})

    @property
    def folds(self) -> list[int]:
        """Folds the cubes came from."""
        return sorted({s.fold for s in self.sources if s.fold is not None})

    def central(self, indices: Iterable[int] | None = None) -> np.ndarray:
        """Unaugmented ``cube_size``^3 centre crops (float32 HU) of some or all base cubes."""
        idx = np.arange(len(self)) if indices is None else np.asarray(list(indices), dtype=int)
        c = self.plan.cube_size
        starts = [(b - c) // 2 for b in self.base.shape[1:]]
        return np.asarray(
            self.base[
                idx, starts[0] : starts[0] + c, starts[1] : starts[1] + c, starts[2] : starts[2] + c
            ],
            dtype=np.float32,
        )

    def augment(self, index: int, rng: np.random.Generator) -> np.ndarray:
        """One augmented training cube (float32 HU) from base cube ``index``."""
        return self._augment(index, rng)[0]

    def _augment(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """An augmented cube and where its source point (the nodule) went: ``(z, y, x)``
        voxels from the cube's centre."""
        plan = self.plan
        zz, yy, xx = self._grid
        angle = rng.uniform(0.0, 2.0 * np.pi) if plan.rotate else 0.0
        cos, sin = np.cos(angle), np.sin(angle)
        shift = rng.integers(-plan.max_shift_vox, plan.max_shift_vox + 1, size=3)
        if rng.random() >= plan.shift_probability:
            shift[:] = 0
        centre = (np.asarray(self.base.shape[1:], dtype=np.float32) - 1) / 2.0
        coords = np.stack(
            [
                zz + shift[0] + centre[0],
                cos * yy - sin * xx + shift[1] + centre[1],
                sin * yy + cos * xx + shift[2] + centre[2],
            ]
        )
        cube = ndimage.map_coordinates(
            self.base[index].astype(np.float32), coords, order=1, mode="nearest"
        )
        # The output voxel that samples the base centre: rotate the shift back.
        point = np.array(
            [-shift[0], -cos * shift[1] - sin * shift[2], sin * shift[1] - cos * shift[2]],
            dtype=np.float64,
        )
        for axis in plan.flip_axes:
            if rng.random() < 0.5:
                cube = np.flip(cube, axis)
                point[axis] = -point[axis]
        return np.ascontiguousarray(cube, dtype=np.float32), point

    def sample(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """``(count, c, c, c)`` augmented cubes from base cubes drawn with replacement."""
        return self.sample_sized(rng, count)[0]

    def sample_sized(
        self, rng: np.random.Generator, count: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`sample`, with each cube's source diameter (mm; 0 if unknown) and source
        point (``(count, 3)`` ``z, y, x`` voxels from the centre) for the size channel."""
        picks = rng.integers(0, len(self), size=count)
        out = [self._augment(int(i), rng) for i in picks]
        diameters = np.array(
            [getattr(self.sources[int(i)], "diameter_mm", 0.0) for i in picks], np.float64
        )
        return np.stack([c for c, _ in out]), diameters, np.stack([p for _, p in out])

    def diameters(self) -> list[float]:
        """Diameters (mm) of the source nodules, as the size channel was trained on."""
        return [round(float(getattr(s, "diameter_mm", 0.0)), 2) for s in self.sources]

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def from_cache(
        cls,
        cache_dir: str | os.PathLike,
        data_dir: str | os.PathLike | None,
        folds: Iterable[int],
        kind: str,
        plan: GANPlan,
        annotations: str | os.PathLike | None = None,
        excluded: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> TrainingCubes:
        """Cut the training set of ``kind`` from the cached scans of ``folds``.

        Args:
            cache_dir: the per-scan cache (``python -m lungct prepare``).
            data_dir: dataset folder, where ``annotations.csv`` and
                ``annotations_excluded.csv`` are looked for by default.
            folds: training folds; only cached scans of these folds are used.
            kind: ``injector`` (cubes at annotated nodules with a diameter in the plan's range)
                or ``remover`` (``healthy_per_scan`` cubes per scan centred in lung parenchyma,
                from the pleura inwards - so the remover also learns to in-paint a chest wall
                edge, as removing a juxtapleural nodule needs - away from nodules and findings).
            plan: sizes and distances.
            annotations: nodule table (default ``DATA/annotations.csv``).
            excluded: excluded findings (default ``DATA/annotations_excluded.csv`` if present).
            progress: show a progress bar.

        Raises:
            LungCTError: unknown kind, missing tables, no cached scan of the folds, no cube.
        """
        if kind not in KINDS:
            raise LungCTError(None, f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        folds = sorted(set(int(f) for f in folds))
        cache = ScanCache(cache_dir)
        uids = []
        for uid in cache.seriesuids():
            meta_fold = cache.open(uid).fold
            if meta_fold is not None and meta_fold in folds:
                uids.append((uid, meta_fold))
        if not uids:
            raise LungCTError(
                cache_dir, f"no cached scan of folds {folds} (run `python -m lungct prepare`)"
            )
        data_dir = Path(data_dir) if data_dir is not None else None
        if annotations is None and data_dir is not None:
            annotations = data_dir / "annotations.csv"
        if (
            excluded is None
            and data_dir is not None
            and (data_dir / "annotations_excluded.csv").is_file()
        ):
            excluded = data_dir / "annotations_excluded.csv"
        if annotations is None:
            raise LungCTError(None, "an annotation table is needed (--annotations or --data)")
        nodules = read_annotations(annotations)
        findings = read_annotations(excluded, allow_negative_diameter=True) if excluded else None

        rng = np.random.default_rng(plan.seed)
        shape = base_shape(plan)
        spacing = (plan.cut_spacing_mm,) * 3
        base: list[np.ndarray] = []
        sources: list[CubeSource] = []
        for uid, fold in tqdm(uids, desc=f"{kind} cubes", unit="scan", disable=not progress):
            scan = cache.open(uid)
            points = _table_points(nodules, uid)
            if kind == "injector":
                keep = (points[:, 3] >= plan.min_nodule_diameter_mm) & (
                    points[:, 3] <= plan.max_diameter_mm
                )
                sites = points[keep]
            else:
                avoid = np.concatenate([points, _table_points(findings, uid)])
                # The whole cube must be free of nodules: margin = half the cube's diagonal.
                world = choose_sites(
                    scan.volume,
                    scan.lung,
                    scan.geometry,
                    plan.healthy_per_scan,
                    plan,
                    rng,
                    avoid=avoid,
                    pleura_mm=(plan.juxtapleural_pleura_mm[0], 1e9),
                    vessel_margin_mm=0.0,
                    nodule_margin_mm=plan.cube_mm * math.sqrt(3.0) / 2.0,
                    min_separation_mm=plan.cube_mm / 2.0,
                )
                sites = np.column_stack([world, np.zeros(len(world))]).reshape(-1, 4)
            for x, y, z, d in sites:
                cube = sample_patch(
                    scan.volume, scan.geometry, (x, y, z), shape, spacing, 1, AIR_HU
                )
                base.append(np.clip(np.rint(cube), -32768, 32767).astype(np.int16))
                sources.append(CubeSource(uid, fold, float(x), float(y), float(z), float(d)))
            del scan
        if not base:
            what = (
                f"no annotated nodule of {plan.min_nodule_diameter_mm:g}-{plan.max_diameter_mm:g} mm"
                if kind == "injector"
                else "no healthy lung site"
            )
            raise LungCTError(cache_dir, f"{what} in the cached scans of folds {folds}")
        return cls(np.stack(base), sources, plan)


def size_ball(
    diameters_mm: np.ndarray, centres_vox: np.ndarray | None, plan: GANPlan
) -> np.ndarray:
    """The size channel: ``(n, c, c, c)`` float32, 1 inside a ball of each diameter.

    Args:
        diameters_mm: ``(n,)`` nodule diameters.
        centres_vox: ``(n, 3)`` ball centres, ``(z, y, x)`` voxels from the cube's centre
            (``None`` = the centre).
        plan: cube size and voxel size.
    """
    d = np.asarray(diameters_mm, np.float64).reshape(-1)
    centres = np.zeros((len(d), 3)) if centres_vox is None else np.asarray(centres_vox, float)
    c = plan.cube_size
    g = np.arange(c, dtype=np.float64) - (c - 1) / 2.0
    radius = d / 2.0 / plan.cut_spacing_mm
    out = np.zeros((len(d), c, c, c), np.float32)
    for i, ((z, y, x), r) in enumerate(zip(centres, radius, strict=True)):
        dist2 = (
            (g[:, None, None] - z) ** 2 + (g[None, :, None] - y) ** 2 + (g[None, None, :] - x) ** 2
        )
        out[i][dist2 <= r * r] = 1.0
    return out
