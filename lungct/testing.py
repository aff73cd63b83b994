"""Small synthetic volumes for tests and quick checks (nothing here is needed at run time)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def chest_phantom_hu(shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """A chest-like float32 HU volume: air outside, a soft-tissue body, two ellipsoid lungs.

    Tests add their own nodules (and noise) to it.
    """
    nz, ny, nx = shape_zyx
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    hu = np.full(shape_zyx, -1000.0, np.float32)
    body = ((y - ny / 2) / (0.45 * ny)) ** 2 + ((x - nx / 2) / (0.47 * nx)) ** 2 <= 1
    hu[body] = 40.0
    for cx in (0.3 * nx, 0.7 * nx):
        lung = (
            ((y - ny / 2) / (0.3 * ny)) ** 2
            + ((x - cx) / (0.15 * nx)) ** 2
            + ((z - nz / 2) / (0.45 * nz)) ** 2
        ) <= 1
        hu[lung] = -850.0
    return hu


def seal_hand_made_model(model_dir: str | os.PathLike, stage: str) -> dict:
    """Seal a model folder a test built by hand (an untrained model saved with ``save``).

    Trainers seal their folders themselves; a hand-made folder needs a manifest first, and
    its provenance says it was never trained.
    """
    from lungct.fileio import write_json_atomic
    from lungct.modeldir import MANIFEST_NAME, seal_model_dir

    manifest = Path(model_dir) / MANIFEST_NAME
    if not manifest.is_file():
        write_json_atomic(manifest, {"note": "built by a test, never trained"})
    return seal_model_dir(model_dir, stage, train_seconds=0.0)
