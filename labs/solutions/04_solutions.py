"""Solutions to the exercises of lab 4, CT-GAN (``labs/04-ct-gan.ipynb``).

Try the exercises first. ``tests/test_labs.py`` checks these functions against the suite
(``ct_gan_augment.inject.make_condition`` and ``integration.crossval.check_no_leakage``), so they
stay right as the suite changes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence

import numpy as np

from lungct import Scan

AUGMENTED_COPY = re.compile(r"\.ctgan\d+$")
"""The end of an augmented copy's series UID: ``<uid>.ctgan<k>``."""


def condition_by_hand(
    normalised: np.ndarray, hole_size: int, diameters_mm: Sequence[float] | None = None
) -> np.ndarray:
    """Exercise 1: the generator's input for normalised cubes ``(n, c, c, c)`` at 1 mm.

    Channel 0 is each cube with a centred ``hole_size``^3 hole set to 0 (the mean after
    normalisation); with ``diameters_mm``, channel 1 is a ball of each diameter: 1 where a
    voxel's centre lies within the radius of the cube's centre, 0 elsewhere.

    The centre of a cube of ``c`` voxels, indexed ``0 .. c - 1``, is at ``(c - 1) / 2`` on every
    axis: for ``c = 32`` it lies between voxels 15 and 16, and the 16-voxel hole ``8 .. 23`` is
    symmetric about it. Measuring from ``c / 2`` would put every ball half a voxel off centre.
    """
    cubes = np.asarray(normalised, dtype=np.float32)
    c = cubes.shape[1]
    start = (c - hole_size) // 2
    hole = slice(start, start + hole_size)
    masked = cubes.copy()
    masked[:, hole, hole, hole] = 0.0
    channels = [masked]
    if diameters_mm is not None:
        g = np.arange(c, dtype=np.float64) - (c - 1) / 2.0
        dist2 = g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2
        balls = [dist2 <= (float(d) / 2.0) ** 2 for d in diameters_mm]
        channels.append(np.stack(balls).astype(np.float32))
    return np.stack(channels, axis=-1)


def leaked_series(training_uids: Iterable[str], test_uids: Iterable[str]) -> list[str]:
    """Exercise 2: the test series found among the training series, as themselves or as an
    augmented copy ``<uid>.ctgan<k>`` (sorted).

    Only the exact suffix is removed, so ``1.2.30`` is not taken for ``1.2.3``: comparing
    prefixes (``startswith``) would flag it.
    """
    sources = {AUGMENTED_COPY.sub("", uid) for uid in training_uids}
    return sorted(set(test_uids) & sources)


def scan_fingerprint(scan: Scan) -> str:
    """Exercise 3: SHA-256 hex digest of everything that decides what a scan shows.

    The voxels (their bytes in C order, with the type and shape, so that the same bytes read
    as another type or shape differ) and the geometry. The geometry belongs in it because an
    attacker can move a nodule to another place in the patient, or mirror it to the other
    lung, by editing the origin or the direction alone, without touching a voxel. A
    fingerprint helps only if it is recorded when the scan is made and kept where the
    attacker cannot change it too (signed, or in a separate system): one stored next to the
    scan is rewritten with it.
    """
    array = np.ascontiguousarray(scan.array)
    g = scan.geometry
    header = {
        "dtype": array.dtype.str,
        "shape": list(array.shape),
        "size": list(g.size),
        "spacing": [float(v) for v in g.spacing],
        "origin": [float(v) for v in g.origin],
        "direction": [float(v) for v in g.direction],
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
    digest.update(array.tobytes())
    return digest.hexdigest()
