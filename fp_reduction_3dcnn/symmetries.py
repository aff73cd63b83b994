"""Axial symmetries of a patch batch: training rotations and test-time augmentation (TTA).

Network inputs are ``(N, y, x, z)``; the axial plane is axes 1 and 2. The eight symmetries of
the square (four 90-degree rotations, each with and without a left-right flip) leave a CT patch
a plausible CT patch, since the cache is world-aligned and in-plane resolution is isotropic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

AXIAL_SYMMETRIES: tuple[tuple[int, bool], ...] = tuple(
    (k, flip) for flip in (False, True) for k in range(4)
)
"""``(quarter_turns, flip_x)`` for the eight axial symmetries; the first is the identity."""

VOLUME_SYMMETRIES: tuple[tuple[int, bool, bool], ...] = tuple(
    (k, flip, flip_z) for flip_z in (False, True) for flip in (False, True) for k in range(4)
)
"""The axial symmetries with and without a z (head-feet) flip: 16 ``(k, flip_x, flip_z)``."""


def rotate_axial(x: np.ndarray, k: int) -> np.ndarray:
    """Rotate ``(N, y, x, z)`` patches by ``k`` quarter turns in the axial plane."""
    return np.rot90(x, k, axes=(1, 2))


def apply_symmetry(x: np.ndarray, k: int, flip: bool, flip_z: bool = False) -> np.ndarray:
    """Flip left-right (if ``flip``) and along z (if ``flip_z``), then rotate ``k`` quarter
    turns; returns a new array."""
    if flip:
        x = x[:, :, ::-1]
    if flip_z:
        x = x[..., ::-1]
    return np.ascontiguousarray(rotate_axial(x, k))


def augment_batch(
    x: np.ndarray, rotations: np.ndarray | None = None, flips: np.ndarray | None = None
) -> np.ndarray:
    """Per-sample training augmentation of ``(N, y, x, z)`` patches, in place where possible.

    Args:
        x: the patches (one scale).
        rotations: ``(N,)`` quarter turns in the axial plane (0-3), or ``None``.
        flips: ``(N, 2)`` booleans ``(flip_x, flip_z)`` applied before the rotation, or ``None``.
    """
    if flips is not None:
        flips = np.asarray(flips, dtype=bool).reshape(-1, 2)
        if flips[:, 0].any():
            x[flips[:, 0]] = x[flips[:, 0]][:, :, ::-1]
        if flips[:, 1].any():
            x[flips[:, 1]] = x[flips[:, 1]][..., ::-1]
    if rotations is not None:
        for k in (1, 2, 3):
            sel = rotations == k
            if sel.any():
                x[sel] = rotate_axial(x[sel], k)
    return x


def tta_predict(
    predict: Callable[[list[np.ndarray]], np.ndarray],
    inputs: Sequence[np.ndarray],
    symmetries: Sequence[tuple] = AXIAL_SYMMETRIES,
) -> np.ndarray:
    """Average ``predict`` over the axial symmetries applied to every scale alike.

    Args:
        predict: maps ``[scale_1, scale_2, scale_3]`` to ``(N, 1)`` (or ``(N,)``) probabilities.
        inputs: the ``(N, y, x, z)`` scales (three for the MGI-CNN, one patch for the others).
        symmetries: ``(k, flip_x)`` or ``(k, flip_x, flip_z)`` tuples to average over
            (default: the eight axial symmetries; :data:`VOLUME_SYMMETRIES` adds z flips).

    Returns:
        ``(N,)`` float64 mean probability.

    Example:
        >>> x = np.random.rand(2, 4, 4, 3)
        >>> p = tta_predict(lambda s: s[0].mean(axis=(1, 2, 3)), [x, x, x])
        >>> bool(np.allclose(p, x.mean(axis=(1, 2, 3))))
        True
    """
    total = None
    for symmetry in symmetries:
        p = np.asarray(predict([apply_symmetry(s, *symmetry) for s in inputs]), dtype=np.float64)
        p = p.reshape(len(inputs[0]))
        total = p if total is None else total + p
    return total / len(symmetries)
