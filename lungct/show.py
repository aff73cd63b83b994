"""Axial / coronal / sagittal views through annotated nodules, each nodule circled."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.patches import Circle

from lungct.fileio import atomic_path, new_figure
from lungct.geometry import IDENTITY
from lungct.preprocess import WINDOWS, resample_scan
from lungct.scan import Scan


def world_aligned(scan: Scan) -> Scan:
    """The scan on a world-aligned grid (unchanged if it already is one)."""
    if np.allclose(scan.geometry.direction, IDENTITY):
        return scan
    return resample_scan(scan, scan.spacing, align_to_world=True)


def show_scan(
    scan: Scan,
    out_png: str | os.PathLike,
    nodules: Sequence[tuple[float, float, float, float]] = (),
    window: tuple[float, float] = WINDOWS["lung"],
    title: str | None = None,
) -> None:
    """Write a PNG with one row per nodule (world x, y, z, diameter mm): axial, coronal, sagittal.

    Without nodules, one row through the volume's centre. Views use the radiological
    convention (patient's right on the image's left, anterior up, head up) with true aspect.
    """
    scan = world_aligned(scan)
    g = scan.geometry
    sx, sy, sz = g.spacing
    nz, ny, nx = scan.array.shape
    rows = list(nodules)
    if not rows:
        centre = g.voxel_to_world([(nz - 1) / 2, (ny - 1) / 2, (nx - 1) / 2])
        rows = [(float(centre[0]), float(centre[1]), float(centre[2]), 0.0)]
    fig = new_figure((12, 4.2 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    x0, y0, z0 = g.origin
    ext_x = (x0 - sx / 2, x0 + (nx - 0.5) * sx)
    ext_y = (y0 - sy / 2, y0 + (ny - 0.5) * sy)
    ext_z = (z0 - sz / 2, z0 + (nz - 0.5) * sz)
    for row, (wx, wy, wz, diameter) in enumerate(rows):
        iz, iy, ix = np.clip(
            np.rint(g.world_to_voxel([wx, wy, wz])).astype(int), 0, np.asarray([nz, ny, nx]) - 1
        )
        views = [
            ("axial", scan.array[iz], (*ext_x, ext_y[1], ext_y[0]), (wx, wy), "x (mm)", "y (mm)"),
            ("coronal", scan.array[:, iy, :], (*ext_x, *ext_z), (wx, wz), "x (mm)", "z (mm)"),
            ("sagittal", scan.array[:, :, ix], (*ext_y, *ext_z), (wy, wz), "y (mm)", "z (mm)"),
        ]
        for col, (name, image, extent, centre, xlabel, ylabel) in enumerate(views):
            ax = axes[row, col]
            origin = "upper" if name == "axial" else "lower"
            ax.imshow(
                image,
                cmap="gray",
                vmin=window[0],
                vmax=window[1],
                extent=extent,
                origin=origin,
                interpolation="bilinear",
            )
            if diameter > 0:
                radius = max(diameter / 2.0 + 3.0, 4.0)
                ax.add_patch(Circle(centre, radius, fill=False, ec="#ff3b30", lw=1.5))
                ax.set_title(f"{name}, nodule {row + 1}: {diameter:.1f} mm", fontsize=10)
            else:
                ax.set_title(name, fontsize=10)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(title or scan.seriesuid, fontsize=9)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
