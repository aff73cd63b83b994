"""Solutions to the exercises of lab 2, U-Net candidates (``labs/02-unet-candidates.ipynb``).

Try the exercises first. ``tests/test_labs.py`` checks these functions against the suite
(``unet_candidates.candidates_from_probability``, ``integration.candidate_sensitivity``), so
they stay right as the suite changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from lungct.geometry import Geometry
from lungct.tables import AnnotationTable, PointTable
from unet_candidates.data import IGNORE


def foreground_fraction(y: np.ndarray) -> float:
    """Exercise 1: the share of nodule pixels (1) among the pixels the loss counts (not IGNORE).

    On the lab's data a batch of the sampler is about 1 % nodule, the lungs of the training
    scans about 0.02 % (as the check cell measures them: target spheres over lung volume), and
    a batch drawn evenly over the lungs usually holds no nodule pixel at all: the sampler shows
    the network about 40 to 50 times more nodule than the lungs hold. Without it, a network
    that marks nothing would be right on more than 99.9 % of the pixels and would have little
    reason to learn anything else.
    """
    y = np.asarray(y)
    counted = y != IGNORE
    if not counted.any():
        return 0.0
    return float(np.count_nonzero(y[counted] == 1) / np.count_nonzero(counted))


def group_candidates(
    probability: np.ndarray, geometry: Geometry, threshold: float, nms_radius_mm: float
) -> list[tuple[float, float, float, float]]:
    """Exercise 2: candidate marks ``(x, y, z, score)`` of a map, most probable first.

    Voxels strictly above ``threshold``, 26-connected components, each component's
    probability-weighted centre (continuous ``(z, y, x)``) turned into world ``(x, y, z)`` mm by
    the geometry (origin, spacing and direction), its score the component's highest value;
    then greedy non-maximum suppression: from the most probable mark down, a mark closer than
    ``nms_radius_mm`` to a kept one is dropped. It is the suite's
    ``candidates_from_probability`` without score smoothing and without a cap.
    """
    probability = np.asarray(probability)
    labels, n = ndimage.label(probability > threshold, structure=np.ones((3, 3, 3), bool))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    centres = np.array(ndimage.center_of_mass(probability, labels, index), dtype=np.float64)
    scores = np.asarray(ndimage.maximum(probability, labels, index), dtype=np.float64)
    world = geometry.voxel_to_world(centres.reshape(-1, 3)).reshape(-1, 3)
    kept: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        if all(np.linalg.norm(world[i] - world[j]) >= nms_radius_mm for j in kept):
            kept.append(int(i))
    return [(*(float(v) for v in world[i]), float(scores[i])) for i in kept]


def sensitivity_with_cap(
    annotations: AnnotationTable, candidates: PointTable, seriesuids: Sequence[str], cap: int
) -> float:
    """Exercise 3: the share of nodules found by each scan's ``cap`` most probable candidates.

    A nodule is found when a kept candidate of its scan is closer to its centre than its
    radius (LUNA16's hit rule). Ties in probability keep the earlier row.

    Which rule is higher at the same number of candidates per scan depends on the data. One
    threshold for all scans spends the marks where the network is most confident, so it wins
    when every scan is alike. A cap per scan gives every scan the same number of marks: it
    protects the nodules of a scan on which the network is unsure everywhere (another scanner,
    another reconstruction, an unusual patient), whose marks a common threshold would cut
    first, and it bounds the work of the next stage per scan. That is why ``extract`` caps.
    """
    probability = getattr(candidates, "probability", None)
    if probability is None:
        probability = np.ones(len(candidates))
    total = found = 0
    for uid in seriesuids:
        rows = annotations.rows_in_series(uid)
        total += len(rows)
        mine = candidates.rows_in_series(uid)
        mine = mine[np.argsort(-probability[mine], kind="stable")][: max(cap, 0)]
        marks = candidates.coords[mine]
        for i in rows:
            d2 = np.sum((marks - annotations.coords[i]) ** 2, axis=1)
            found += bool(np.any(d2 < (annotations.diameter_mm[i] / 2) ** 2))
    if total == 0:
        raise ValueError("no nodule in the listed scans: sensitivity is undefined")
    return found / total
