"""PNG grids of middle slices: condition | generated | real, one row per cube."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lungct.fileio import atomic_path, new_figure
from lungct.preprocess import WINDOWS


def save_grid(
    path: str | os.PathLike,
    columns: Sequence[np.ndarray],
    titles: Sequence[str],
    window: tuple[float, float] = WINDOWS["lung"],
    suptitle: str | None = None,
    row_labels: Sequence[str] | None = None,
) -> None:
    """Write a grid of axial middle slices.

    Args:
        path: the PNG file (written atomically).
        columns: arrays ``(rows, z, y, x)`` in HU, one per column.
        titles: one title per column.
        window: HU display window (lung window by default).
        suptitle: figure title.
        row_labels: one label per row (left of the first column).
    """
    rows = min(len(c) for c in columns)
    fig = new_figure((2.0 * len(columns), 2.0 * rows))
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for r in range(rows):
        for col, (cubes, title) in enumerate(zip(columns, titles, strict=True)):
            ax = axes[r, col]
            cube = np.asarray(cubes[r])
            ax.imshow(
                cube[cube.shape[0] // 2],
                cmap="gray",
                vmin=window[0],
                vmax=window[1],
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if col == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[r], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
