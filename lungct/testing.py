"""Small synthetic volumes for tests and quick checks (nothing here is needed at run time)."""

from __future__ import annotations

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
