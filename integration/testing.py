"""Small fixtures for tests and quick checks of the integration commands.

Nothing here is needed at run time. :func:`tiny_settings` gives stage settings whose networks
build and train in seconds (a 2-level 4/8-filter U-Net on a 4 mm grid, and a CenterNet of the
same size for ``"candidates": "centernet"``, a 4-filter CT-GAN on 16-voxel cubes, a 4-filter
MGI-CNN, one or two steps each), so ``crossval`` and ``ablate`` run
start to finish on a few synthetic scans in a test. Their numbers mean nothing.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

TINY_SETTINGS: dict[str, Any] = {
    "unet_preset": "2d",
    "unet_minutes": 1.0,
    "unet_overrides": {
        "name": "tiny2d",
        "spacing": [4.0, 4.0, 4.0],
        "filters": [4, 8],
        "bottleneck_filters": 8,
        "batch_size": 2,
        "epochs": 1,
        "steps_per_epoch": 2,
        "val_patches": 4,
        "buffer_size": 8,
        "window_batch": 16,
        "min_target_radius_mm": 4.0,
        "patch_size": [3, 16, 16],
        "window_size": [3, 32, 32],
        # An untrained-looking map must still leave candidates for the MGI-CNN to score.
        "threshold": 0.001,
        "max_candidates": 10,
    },
    "centernet_minutes": 1.0,
    "centernet_overrides": {
        "name": "tinycenternet",
        "spacing": [4.0, 4.0, 4.0],
        "backbone_filters": [4, 8],
        "neck_filters": 8,
        "head_filters": 8,
        "patch_size": [16, 16, 16],
        "window_size": [32, 32, 32],
        "window_batch": 4,
        "batch_size": 2,
        "epochs": 1,
        "steps_per_epoch": 2,
        "val_patches": 4,
        "buffer_size": 8,
        "min_sigma_mm": 4.0,
        "max_sigma_mm": 8.0,
        "threshold": 0.001,
        "max_candidates": 10,
    },
    "gan": True,
    "gan_minutes": 1.0,
    "gan_per_scan": 1,
    "gan_overrides": {
        "cube_size": 16,
        "hole_size": 8,
        "gf": 4,
        "df": 4,
        "discriminator_levels": 3,
        "batch_size": 2,
        "steps": 2,
        "checkpoint_every": 2,
        "grid_every": 2,
        "log_every": 1,
        "hist_bins": 256,
        "max_nodule_diameter_mm": 30,
        "site_min_separation_mm": 16,
        "site_pleura_mm": [4, 1000],
    },
    "fpr": True,
    "fpr_minutes": 1.0,
    "fpr_overrides": {
        "stream_filters": [4, 4, 4],
        "stream_top_filters": 4,
        "head_filters": 4,
        "dense_units": [8],
        "batch_size": 8,
        "steps_per_epoch": 2,
        "epochs": 1,
        "val_max_negatives": 20,
    },
    "tta": False,
}
"""Stage settings (JSON-ready) that train every stage in seconds."""


def tiny_settings(**changes: Any) -> dict[str, Any]:
    """A deep copy of :data:`TINY_SETTINGS` with some keys changed."""
    settings = copy.deepcopy(TINY_SETTINGS)
    settings.update(changes)
    return settings


def tiny_dataset(root: Path) -> dict[str, Path]:
    """Four small synthetic scans (subsets 0-3) in ``root/data`` and their cache on a 2 mm grid
    in ``root/cache``."""
    from lungct.cache import prepare_dataset
    from lungct.preprocess import PreprocessPlan
    from lungct.synth import generate_dataset

    data = root / "data"
    generate_dataset(data, 4, 0, "small", progress=False, workers=1)
    plan = PreprocessPlan(name="test2mm", spacing=(2.0, 2.0, 2.0))
    prepare_dataset(data, root / "cache", plan, workers=1, progress=False)
    return {"root": root, "data": data, "cache": root / "cache"}
