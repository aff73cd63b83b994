"""Small fixtures for tests and benchmarks: tiny plans, phantom chests, a tiny LUNA16 folder.

Nothing here is needed at run time; it lives in the package (as KerasHub keeps its test case)
so the tests, the bench and a user's own checks build the same inputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lungct.geometry import Geometry
from lungct.io import write_scan
from lungct.scan import Scan
from lungct.testing import chest_phantom_hu
from unet_candidates.config import UNetPlan, preset_plan


def tiny_plan(dims: str = "2d", **overrides: Any) -> UNetPlan:
    """A plan with a 2-level, 4/8-filter U-Net on a 4 mm grid: builds and trains in seconds."""
    base: dict[str, Any] = {
        "name": f"tiny{dims}",
        "spacing": (4.0, 4.0, 4.0),
        "filters": (4, 8),
        "bottleneck_filters": 8,
        "batch_size": 2,
        "epochs": 2,
        "steps_per_epoch": 2,
        "val_patches": 4,
        "buffer_size": 8,
        "window_batch": 4,
        "min_target_radius_mm": 4.0,
    }
    if dims == "2d":
        base.update(patch_size=(3, 16, 16), window_size=(3, 32, 32))
    else:
        base.update(patch_size=(16, 16, 16), window_size=(16, 16, 16))
    base.update(overrides)
    return preset_plan(dims, **base)


def tiny_centernet_plan(**overrides: Any) -> Any:
    """A CenterNet plan with a 2-level 4/8-filter backbone on a 4 mm grid: trains in seconds."""
    from unet_candidates.centernet.config import centernet_preset_plan

    base: dict[str, Any] = {
        "name": "tinycenternet",
        "spacing": (4.0, 4.0, 4.0),
        "backbone_filters": (4, 8),
        "neck_filters": 8,
        "head_filters": 8,
        "patch_size": (16, 16, 16),
        "window_size": (32, 32, 32),
        "window_batch": 4,
        "batch_size": 4,
        "epochs": 2,
        "steps_per_epoch": 2,
        "val_patches": 4,
        "buffer_size": 16,
        # On a 4 mm grid a 2 mm sigma would be a single voxel.
        "min_sigma_mm": 4.0,
        "max_sigma_mm": 8.0,
        "threshold": 0.005,
    }
    base.update(overrides)
    return centernet_preset_plan("centernet", **base)


def phantom_chest(
    shape_zyx: tuple[int, int, int] = (40, 80, 96),
    nodules_zyx: tuple[tuple[float, float, float], ...] = ((20, 40, 29),),
    radius_vox: float = 2.0,
    spacing: tuple[float, float, float] = (4.0, 4.0, 5.0),
    origin: tuple[float, float, float] = (-190.0, -160.0, -300.0),
    seriesuid: str = "phantom",
    seed: int = 0,
) -> tuple[Scan, np.ndarray]:
    """A chest-like scan (air, body, two lungs, solid nodules, a little noise).

    Returns:
        ``(scan, nodules)`` with ``nodules`` an ``(N, 4)`` array of world ``x, y, z, diameter``.
    """
    nz, ny, nx = shape_zyx
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    hu = chest_phantom_hu(shape_zyx)
    geometry = Geometry(shape_zyx[::-1], spacing, origin)
    rows = []
    for cz, cy, cx in nodules_zyx:
        ball = (z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= radius_vox**2
        hu[ball] = 30.0
        world = geometry.voxel_to_world((cz, cy, cx))
        rows.append([*world, 2.0 * radius_vox * min(spacing)])
    hu += np.random.default_rng(seed).normal(0.0, 10.0, hu.shape).astype(np.float32)
    scan = Scan(np.rint(hu).astype(np.int16), geometry, seriesuid)
    return scan, np.asarray(rows, np.float64).reshape(-1, 4)


def write_tiny_luna(root: str | os.PathLike, scans_per_fold: int = 1, folds: int = 2) -> Path:
    """A LUNA16-layout folder of phantom chests: ``subsetK/<uid>.mhd`` + ``annotations.csv``."""
    root = Path(root)
    lines = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    rng = np.random.default_rng(0)
    for fold in range(folds):
        for i in range(scans_per_fold):
            uid = f"1.2.3.{fold}.{i}"
            cz, cy = rng.uniform(15, 25), rng.uniform(35, 45)
            cx = rng.choice([rng.uniform(24, 32), rng.uniform(64, 72)])
            scan, nodules = phantom_chest(nodules_zyx=((cz, cy, cx),), seriesuid=uid, seed=fold)
            write_scan(scan, root / f"subset{fold}" / f"{uid}.mhd")
            for x, y, z, d in nodules:
                lines.append(f"{uid},{x:.3f},{y:.3f},{z:.3f},{d:.2f}")
    (root / "annotations.csv").write_text("\n".join(lines) + "\n")
    return root
