"""A 3-D view of the lungs with the detector's marks: a shaded surface rendering from three sides.

The lung mask (on the 1 mm world-aligned grid the detector works on) is taken at 2 mm, turned
about the patient's long axis for each view (front, the patient's left side, and halfway), and
its surface is found along the line of sight (the first lung voxel). The surface is shaded by
the angle its normal makes with a light from the viewer's upper left, so the lungs read as a
solid; the marks are drawn over it (all of them: the lungs are treated as glass), numbered by
rank, red at or above the report threshold, yellow below. Everything is numpy and OpenCV, off
screen, about half a second for a chest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lungct.fileio import new_figure, write_figure_atomic
from lungct.geometry import Geometry

VIEWS = (("front (anterior)", 0.0), ("halfway", 45.0), ("left side", 90.0))
"""Title and azimuth (degrees about the patient's long axis, from the front towards the
patient's left) of each view."""
STEP_MM = 2.0
"""The mask's voxel size in the rendering."""
ABOVE_COLOUR = "#ff3b30"
BELOW_COLOUR = "#ffd60a"


def _turn(shape_zyx: tuple[int, ...], azimuth_deg: float) -> tuple[np.ndarray, int]:
    """The 2 x 3 affine map of an axial slice's ``(x, y)`` voxel to a view's ``(u, depth)``,
    and the side of the square it lands in.

    Turned by ``azimuth_deg`` about the slice's centre, so that at 0 the patient's anterior
    faces the viewer and at 90 the patient's left does (LPS: x to the left, y to the back).
    """
    import cv2

    ny, nx = shape_zyx[1:]
    side = int(np.ceil(np.hypot(ny, nx))) + 2
    centre = (nx / 2.0, ny / 2.0)
    turn = cv2.getRotationMatrix2D(centre, azimuth_deg, 1.0)
    turn[:, 2] += (side / 2.0 - centre[0], side / 2.0 - centre[1])
    return turn, side


def surface_depth(mask: np.ndarray, azimuth_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """The mask ``(z, y, x)`` (isotropic voxels, world-aligned) turned by ``azimuth_deg`` about
    z (:func:`_turn`) and seen from the front: the depth of the first mask voxel along each
    line of sight ``(z, u)``, and where there is one.

    Rotating about z keeps every axial slice a slice: each is turned with OpenCV.
    """
    import cv2

    turn, side = _turn(mask.shape, azimuth_deg)
    depth = np.full((mask.shape[0], side), np.inf, np.float32)
    for z in range(mask.shape[0]):
        if not mask[z].any():
            continue
        turned = cv2.warpAffine(
            mask[z].astype(np.uint8), turn, (side, side), flags=cv2.INTER_NEAREST
        )
        hit = turned.any(axis=0)
        first = np.argmax(turned > 0, axis=0).astype(np.float32)
        depth[z] = np.where(hit, first, np.inf)
    return depth, np.isfinite(depth)


def shade(depth: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Grey levels (0-1) of a depth map lit from the viewer's upper left; 0 where nothing."""
    from scipy import ndimage

    filled = np.where(hit, depth, np.nanmax(np.where(hit, depth, np.nan)) if hit.any() else 0)
    # Smoothed a little: the mask's voxel steps would otherwise show as terraces.
    dz, du = np.gradient(ndimage.gaussian_filter(filled.astype(np.float64), 1.2))
    normal = np.stack([-du, dz, np.ones_like(du)])  # (u, z up, towards the viewer)
    normal /= np.linalg.norm(normal, axis=0)
    light = np.array([-0.4, 0.5, 0.77])
    light /= np.linalg.norm(light)
    lit = 0.25 + 0.75 * np.clip(np.tensordot(light, normal, axes=1), 0.0, 1.0)
    return np.where(hit, lit, 0.0)


def projected(world: np.ndarray, grid: Geometry, azimuth_deg: float) -> np.ndarray:
    """World points ``(N, 3)`` to ``(z, u, depth)`` in a view of a mask on ``grid``
    (world-aligned), as :func:`surface_depth` turns it."""
    index = (np.asarray(world, float).reshape(-1, 3) - np.asarray(grid.origin)) / np.asarray(
        grid.spacing
    )
    turn, _ = _turn(grid.shape_zyx, azimuth_deg)
    flat = np.column_stack([index[:, 0], index[:, 1], np.ones(len(index))])
    u, depth = (flat @ turn.T).T
    return np.column_stack([index[:, 2], u, depth])


def render_view3d(
    lung: np.ndarray,
    geometry: Geometry,
    detections: Sequence[Any],
    path: str | os.PathLike,
    threshold: float = 0.5,
    top: int = 10,
) -> Path:
    """Write the 3-D view (PNG) of ``lung`` (on ``geometry``, world-aligned) with the marks.

    ``detections`` have ``x, y, z`` (world mm), ``probability`` and ``diameter_mm``, most
    probable first; those at or above ``threshold`` and at least the ``top`` most probable are
    drawn.

    Raises:
        ValueError: a mask on a grid that is not world-aligned, or that does not fit it.
        lungct.fileio.WriteError: the file cannot be written whole.
    """
    if not np.allclose(geometry.direction, (1, 0, 0, 0, 1, 0, 0, 0, 1)):
        raise ValueError("the 3-D view needs the lung mask on a world-aligned grid")
    if lung.shape != geometry.shape_zyx:
        raise ValueError(f"lung mask shape {lung.shape} does not fit its grid")
    steps = [max(1, round(STEP_MM / s)) for s in geometry.spacing[::-1]]  # z, y, x
    mask = np.ascontiguousarray(lung[:: steps[0], :: steps[1], :: steps[2]] > 0)
    grid = Geometry(
        mask.shape[::-1],
        tuple(s * k for s, k in zip(geometry.spacing, steps[::-1], strict=True)),
        geometry.origin,
    )
    marks = [d for i, d in enumerate(detections) if i < top or d.probability >= threshold]
    world = np.array([[d.x, d.y, d.z] for d in marks], float).reshape(-1, 3)
    fig = new_figure((13.5, 5.2))
    axes = fig.subplots(1, len(VIEWS))
    for ax, (title, azimuth) in zip(axes, VIEWS, strict=True):
        depth, hit = surface_depth(mask, azimuth)
        image = shade(depth, hit)
        ax.set_facecolor("black")
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, origin="lower", aspect="auto")
        rows = np.flatnonzero(hit.any(axis=1))
        cols = np.flatnonzero(hit.any(axis=0))
        if len(rows):
            ax.set_xlim(cols[0] - 5, cols[-1] + 5)
            ax.set_ylim(rows[0] - 5, rows[-1] + 5)
        ax.set_aspect(grid.spacing[2] / grid.spacing[0])
        points = projected(world, grid, azimuth)
        for rank in range(len(marks), 0, -1):  # the most probable on top
            d, (z, u, _) = marks[rank - 1], points[rank - 1]
            colour = ABOVE_COLOUR if d.probability >= threshold else BELOW_COLOUR
            radius = max(d.diameter_mm / 2 + 3.0, 4.0) / grid.spacing[0]
            ax.add_patch(_circle((u, z), radius, colour, d.probability >= threshold))
            ax.text(u + radius, z + radius, str(rank), color=colour, fontsize=9,
                    fontweight="bold")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        left, right = ("R", "L") if azimuth < 67.5 else ("A", "P")
        for text, x in ((left, 0.03), (right, 0.97)):
            ax.text(x, 0.5, text, transform=ax.transAxes, color="white", fontsize=11,
                    fontweight="bold", ha="center", va="center")  # fmt: skip
        ax.text(0.5, 0.97, "S", transform=ax.transAxes, color="white", fontsize=11,
                fontweight="bold", ha="center", va="top")  # fmt: skip
    fig.suptitle(
        f"Lungs in 3-D with the {len(marks)} most probable marks (numbered by rank; red: p >= "
        f"{threshold:g}); the lungs are drawn as glass: every mark shows",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.88, wspace=0.04)
    target = Path(path)
    write_figure_atomic(fig, target, dpi=90, format="png", pil_kwargs={"compress_level": 1})
    return target


def _circle(centre: tuple[float, float], radius: float, colour: str, above: bool) -> Any:
    from matplotlib.patches import Circle

    return Circle(centre, radius, fill=False, ec=colour, lw=1.6, ls="-" if above else "--")
