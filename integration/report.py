"""The per-scan detection report: an HTML page with an overview, a table of marks and crops.

Everything a reader needs sits next to the page: ``report.html``, ``overview.png`` (maximum
intensity projections of the lungs with the numbered marks) and one ``detection_NN.png`` per
cropped mark (axial, coronal and sagittal slices through it, with orientation letters, a scale
bar, the slice index and the HU window).

What is drawn where:

* every mark is a row of the table (rank, probability, world mm, voxel index and slice number
  in the scan as read, the U-Net blob's diameter); rows at or above the report threshold are
  highlighted;
* the overview numbers the marks at or above the threshold and, at least, the
  :data:`OVERVIEW_TOP` most probable ones (ranks 1..K, as the table);
* crops are drawn for the marks at or above the threshold (at most ``max_crops``) and, when
  fewer than :data:`MIN_CROPS` are, for the most probable ones below it.

Views follow the radiological convention (patient's right on the image's left, anterior up in
axial views, head up); the letters at the edges are computed from the direction cosines of the
grid drawn, so a scan stored flipped is labelled as what it shows.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.patheffects as path_effects
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle

from integration.modelset import FPR_STAGE, stage_title
from lungct.fileio import WriteError, new_figure, write_figure_atomic, write_text_atomic
from lungct.geometry import Geometry
from lungct.lungmask import dilate_ellipsoid, mask_box
from lungct.patches import crop_patch
from lungct.preprocess import WINDOWS, nearest_onto
from lungct.scan import AIR_HU, Scan
from lungct.show import world_aligned

OVERVIEW_TOP = 10
"""The overview numbers at least this many marks (the most probable), plus any above the
threshold."""
MIN_CROPS = 3
"""Crops are drawn for at least this many marks (the most probable) when fewer pass the
threshold."""
CROP_WINDOW = "lung"
"""The HU window of the crops (a key of :data:`lungct.preprocess.WINDOWS`)."""
OVERVIEW_WINDOW = (-1000.0, 300.0)
"""The HU window of the overview's projections."""
SCALE_BAR_MM = 10.0
INNER_MM = (8.0, 4.0, 4.0)
"""The overview projects the lung mask eroded by this ellipsoid (z, y, x radii in mm): more
along z, where the mask reaches into the diaphragm and the apex's soft tissue."""
PNG_COMPRESSION = 1
"""zlib level of the report's PNGs: the fastest (level 6 takes three times as long for files a
fifth smaller)."""
ABOVE_COLOUR = "#ff3b30"
BELOW_COLOUR = "#ffd60a"

_OUTLINE = [path_effects.withStroke(linewidth=2.5, foreground="black")]


@dataclass(frozen=True)
class Detection:
    """One mark of the detector, in world millimetres."""

    x: float
    y: float
    z: float
    probability: float
    diameter_mm: float
    malignancy: float | None = None
    """Probability that the nodule is malignant (median rating >= 4), where it was scored."""
    malignancy_rating: float | None = None
    """The predicted 1-5 malignancy rating, where it was scored."""


def suspicion_score(detections: Sequence[Detection]) -> float:
    """Scan-level suspicion: the most probable nodule (0 when there is none)."""
    return max((d.probability for d in detections), default=0.0)


# ----------------------------------------------------------------------------------------------
# Orientation
# ----------------------------------------------------------------------------------------------

_LPS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))


def orientation_letters(vector: Sequence[float], secondary: float = 0.3) -> str:
    """Patient-direction letters of the end a world (LPS) vector points to.

    ``(1, 0, 0)`` is ``"L"``, ``(0, -1, 0)`` is ``"A"``; an oblique vector gets its main letter
    first and then each other axis whose share is at least ``secondary`` (``"LA"``), as DICOM
    viewers label oblique edges.
    """
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.linalg.norm(v))
    if v.shape != (3,) or norm == 0.0:
        raise ValueError(f"an orientation needs a non-zero 3-vector, got {vector!r}")
    v = v / norm
    order = np.argsort(-np.abs(v), kind="stable")
    letters = ""
    for rank, axis in enumerate(order):
        if rank == 0 or abs(v[axis]) >= secondary:
            letters += _LPS_LETTERS[axis][0 if v[axis] > 0 else 1]
    return letters


def view_letters(right: Sequence[float], down: Sequence[float]) -> dict[str, str]:
    """The letters at a view's four edges, from the world vectors of its screen axes.

    ``right`` is the world direction of increasing screen x, ``down`` of increasing screen y.
    """
    r = np.asarray(right, dtype=np.float64)
    d = np.asarray(down, dtype=np.float64)
    return {
        "left": orientation_letters(-r),
        "right": orientation_letters(r),
        "top": orientation_letters(-d),
        "bottom": orientation_letters(d),
    }


def _axis_words(geometry: Geometry) -> str:
    """``+i -> L, +j -> P, +k -> S``: where the scan's index axes point."""
    columns = geometry.direction_matrix.T
    return ", ".join(
        f"+{name} &rarr; {orientation_letters(c)}" for name, c in zip("ijk", columns, strict=True)
    )


def _draw_letters(ax: Axes, letters: dict[str, str], size: float = 10) -> None:
    style = {"color": "white", "fontsize": size, "fontweight": "bold", "path_effects": _OUTLINE}
    places = {
        "left": (0.02, 0.5, "left", "center"),
        "right": (0.98, 0.5, "right", "center"),
        "top": (0.5, 0.98, "center", "top"),
        "bottom": (0.5, 0.02, "center", "bottom"),
    }
    for edge, (x, y, ha, va) in places.items():
        ax.text(x, y, letters[edge], transform=ax.transAxes, ha=ha, va=va, **style)


def _scale_bar(ax: Axes, length_mm: float) -> None:
    """A white bar of ``length_mm`` on a dark box at the lower left of a view drawn in mm."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    bar = AnchoredSizeBar(
        ax.transData,
        length_mm,
        f"{length_mm:g} mm",
        "lower left",
        pad=0.3,
        borderpad=0.6,
        sep=3,
        color="white",
        frameon=True,
        size_vertical=0.6,
        fontproperties=FontProperties(size=8),
    )
    bar.patch.set_facecolor("black")
    bar.patch.set_alpha(0.55)
    bar.patch.set_edgecolor("none")
    ax.add_artist(bar)


# ----------------------------------------------------------------------------------------------
# Marks in the scan as read
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mark:
    """A detection with its rank and where it is in the scan as read."""

    rank: int
    detection: Detection
    ijk: tuple[int, int, int]
    """Nearest voxel index along the scan's own x, y, z axes (0-based)."""
    above: bool
    """At or above the report threshold."""

    @property
    def slice_number(self) -> int:
        """The slice as viewers count it: ``k + 1``."""
        return self.ijk[2] + 1


def rank_marks(scan: Scan, detections: Sequence[Detection], threshold: float) -> list[Mark]:
    """Detections most probable first, with their voxel index in ``scan`` (its own grid)."""
    ranked = sorted(detections, key=lambda d: -d.probability)
    if not ranked:
        return []
    world = np.asarray([[d.x, d.y, d.z] for d in ranked], dtype=np.float64)
    kji = scan.geometry.world_to_index(world).reshape(-1, 3)
    return [
        Mark(rank, d, (int(k[2]), int(k[1]), int(k[0])), d.probability >= threshold)
        for rank, (d, k) in enumerate(zip(ranked, kji, strict=True), start=1)
    ]


def numbered_count(marks: Sequence[Mark], top: int = OVERVIEW_TOP) -> int:
    """How many marks the overview numbers: all above the threshold, and at least ``top``."""
    return min(len(marks), max(top, sum(m.above for m in marks)))


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------


def _save(fig: Figure, path: Path, dpi: int = 90) -> None:
    write_figure_atomic(
        fig, path, dpi=dpi, format="png", pil_kwargs={"compress_level": PNG_COMPRESSION}
    )


def _slice_words(geometry: Geometry, ijk: tuple[int, int, int], world_axis: int) -> str:
    """The index in the scan as read of the slice across ``world_axis`` (0 x, 1 y, 2 z)."""
    axis = int(np.argmax(np.abs(geometry.direction_matrix[world_axis])))
    value, n = ijk[axis], geometry.size[axis]
    if axis == 2:
        return f"slice {value + 1} of {n} (k = {value})"
    return f"{'ij'[axis]} = {value} (of 0..{n - 1})"


def _crop_views(scan: Scan, original: Scan, mark: Mark, half_mm: float, path: Path) -> None:
    """Axial, coronal and sagittal slices of ``scan`` (world-aligned) through one mark."""
    det = mark.detection
    g = scan.geometry
    sx, sy, sz = g.spacing
    hx, hy, hz = (int(np.ceil(half_mm / s)) for s in (sx, sy, sz))
    size = (2 * hz + 1, 2 * hy + 1, 2 * hx + 1)
    block = crop_patch(scan.array, g, (det.x, det.y, det.z), size)
    # The block is centred on the nearest voxel; the circle goes where the mark is.
    axes_world = g.direction_matrix  # columns: the grid's i, j, k axes in the world
    centre = g.voxel_to_world(np.rint(g.world_to_voxel([det.x, det.y, det.z])))
    ox, oy, oz = np.linalg.solve(axes_world, np.asarray([det.x, det.y, det.z]) - centre)
    ci, cj, ck = axes_world.T
    ext_xy = (-(hx + 0.5) * sx, (hx + 0.5) * sx, (hy + 0.5) * sy, -(hy + 0.5) * sy)
    ext_xz = (-(hx + 0.5) * sx, (hx + 0.5) * sx, -(hz + 0.5) * sz, (hz + 0.5) * sz)
    ext_yz = (-(hy + 0.5) * sy, (hy + 0.5) * sy, -(hz + 0.5) * sz, (hz + 0.5) * sz)
    i, j, k = mark.ijk
    og = original.geometry
    views = [
        (f"axial: {_slice_words(og, mark.ijk, 2)}", block[hz], ext_xy, "upper", (ox, oy),
         view_letters(ci, cj)),
        (f"coronal: {_slice_words(og, mark.ijk, 1)}", block[:, hy, :], ext_xz, "lower",
         (ox, oz), view_letters(ci, -ck)),
        (f"sagittal: {_slice_words(og, mark.ijk, 0)}", block[:, :, hx], ext_yz, "lower",
         (oy, oz), view_letters(cj, -ck)),
    ]  # fmt: skip
    lo, hi = WINDOWS[CROP_WINDOW]
    fig = new_figure((10.5, 4.1))
    axes = fig.subplots(1, 3)
    radius = max(det.diameter_mm / 2 + 4.0, 5.0)
    colour = ABOVE_COLOUR if mark.above else BELOW_COLOUR
    for ax, (name, image, extent, origin, circle_at, letters) in zip(axes, views, strict=True):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=hi, extent=extent, origin=origin,
                  interpolation="bilinear")  # fmt: skip
        ax.add_patch(Circle(circle_at, radius, fill=False, ec=colour, lw=1.6,
                            ls="-" if mark.above else "--"))  # fmt: skip
        _draw_letters(ax, letters)
        _scale_bar(ax, SCALE_BAR_MM)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    state = "at or above the threshold" if mark.above else "below the threshold"
    fig.suptitle(
        f"#{mark.rank}   p = {det.probability:.3f} ({state})   world ({det.x:.1f}, {det.y:.1f}, "
        f"{det.z:.1f}) mm   voxel (i, j, k) = ({i}, {j}, {k})",
        fontsize=10,
    )
    fig.text(
        0.5,
        0.015,
        f"window: {CROP_WINDOW}, W {hi - lo:g} / L {(hi + lo) / 2:g} HU ({lo:g} to {hi:g} HU)   "
        f"field {2 * half_mm:g} mm   circle: U-Net blob diameter + 8 mm",
        ha="center",
        va="bottom",
        fontsize=8.5,
    )
    # The margins tight_layout finds for this layout, fixed: it costs a third of the drawing.
    fig.subplots_adjust(left=0.014, right=0.986, bottom=0.087, top=0.842, wspace=0.045)
    _save(fig, path)


def lung_on_grid(lung: np.ndarray | None, geometry: Geometry, shown: Scan) -> np.ndarray | None:
    """The lung mask (on ``geometry``) on the grid of the scan shown, or ``None``."""
    if lung is None:
        return None
    if lung.shape != geometry.shape_zyx:
        raise ValueError(f"lung mask shape {lung.shape} does not fit its grid {geometry.shape_zyx}")
    if geometry == shown.geometry:
        return lung
    return nearest_onto(lung.astype(np.uint8, copy=False), geometry, shown.geometry)


def inner_lung(lung: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The lung mask eroded by the ellipsoid :data:`INNER_MM` on its own grid.

    The mask reaches into the chest wall; its inner part keeps the ribs out of the overview's
    projections. Eroded before it is resampled onto the scan's finer grid, where the same
    erosion would cost several times more, and only inside the mask's bounding box (the edge
    of the scan is not an edge of the lung).
    """
    mask = lung > 0
    inner = np.zeros(mask.shape, bool)
    radii = tuple(r / s for r, s in zip(INNER_MM, geometry.spacing[::-1], strict=True))
    box = mask_box(mask, [int(np.ceil(r)) for r in radii])  # grown by the radius
    if box is None:
        return inner
    inner[box] = ~dilate_ellipsoid(~mask[box], radii)
    return inner


def overview_volume(scan: Scan, lung: np.ndarray | None) -> np.ndarray:
    """The HU volume the overview projects: air outside ``lung`` (the inner lung mask on the
    scan's grid, :func:`inner_lung`), if a mask is given."""
    if lung is None:
        return scan.array
    return np.where(lung > 0, scan.array, AIR_HU)


def _mark_style(mark: Mark) -> dict[str, Any]:
    if mark.above:
        return {"color": ABOVE_COLOUR, "lw": 1.8, "ls": "-"}
    return {"color": BELOW_COLOUR, "lw": 1.2, "ls": "--"}


def _overview_radius(d: Detection) -> float:
    return max(d.diameter_mm / 2 + 4, 6)


_LABEL_GAPS_PX = (2.0, 10.0, 22.0, 36.0)
"""How far from its circle a label may sit, nearest first (pixels at the figure's dpi)."""
_LABEL_ANGLES = np.deg2rad([45, 135, -45, -135, 90, -90, 0, 180, 22, 158, -22, -158, 68, 112])


def _label_marks(ax: Axes, items: Sequence[tuple[tuple[float, float], Mark]]) -> None:
    """Number the circles of ``items`` so that labels do not cover each other.

    Most probable first, each label takes the first spot around its circle (diagonals first,
    then farther out, with a leader line) whose box meets no label placed before it and no
    circle's centre, inside the axes; failing that, the least crowded spot. Works in display
    pixels, so call it once the figure's layout is final.
    """
    fontsize = 11.0
    px_per_pt = ax.figure.dpi / 72.0
    to_px = ax.transData.transform
    to_data = ax.transData.inverted().transform
    limits = ax.get_xlim(), ax.get_ylim()
    frame = ax.get_window_extent()
    centres = np.asarray([to_px(c) for c, _ in items], dtype=np.float64).reshape(-1, 2)
    placed: list[tuple[float, float, float, float]] = []

    def crowding(box: tuple[float, float, float, float]) -> float:
        x0, y0, x1, y1 = box
        if x0 < frame.x0 or x1 > frame.x1 or y0 < frame.y0 or y1 > frame.y1:
            return 1e9
        area = 0.0
        for a0, b0, a1, b1 in placed:
            w, h = min(x1, a1) - max(x0, a0), min(y1, b1) - max(y0, b0)
            area += w * h if w > 0 and h > 0 else 0.0
        inside = (centres[:, 0] > x0) & (centres[:, 0] < x1)
        inside &= (centres[:, 1] > y0) & (centres[:, 1] < y1)
        return area + 50.0 * float(inside.sum())

    for (centre, mark), c_px in zip(items, centres, strict=True):
        text = str(mark.rank)
        w = 0.62 * fontsize * px_per_pt * len(text) + 2.0
        h = 0.95 * fontsize * px_per_pt
        edge = to_px((centre[0] + _overview_radius(mark.detection), centre[1]))
        r_px = float(np.hypot(*(edge - c_px)))
        best: tuple[float, tuple[float, float, float, float], float, float, float] | None = None
        for ring, gap in enumerate(_LABEL_GAPS_PX):
            for angle in _LABEL_ANGLES:
                ux, uy = float(np.cos(angle)), float(np.sin(angle))
                px, py = c_px[0] + (r_px + gap) * ux, c_px[1] + (r_px + gap) * uy
                # The box grows away from the circle.
                bx = px - (0.0 if ux > 0.3 else w if ux < -0.3 else w / 2)
                by = py - (0.0 if uy > 0.3 else h if uy < -0.3 else h / 2)
                box = (bx, by, bx + w, by + h)
                score = crowding(box) + 0.5 * ring
                if best is None or score < best[0]:
                    best = (score, box, gap, ux, uy)
            if best[0] <= 0.5 * ring:  # a free spot on this ring
                break
        _, box, gap, ux, uy = best
        placed.append(box)
        colour = _mark_style(mark)["color"]
        tx, ty = to_data(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
        ax.text(tx, ty, text, color=colour, fontsize=fontsize, fontweight="bold",
                ha="center", va="center", path_effects=_OUTLINE)  # fmt: skip
        if gap > _LABEL_GAPS_PX[0]:  # a leader from the circle's edge to the label
            ends = [c_px + np.asarray([ux, uy]) * (r_px + t) for t in (0.0, gap - 1.0)]
            (sx, sy), (ex, ey) = to_data(ends[0]), to_data(ends[1])
            ax.plot([sx, ex], [sy, ey], color=colour, lw=0.9)
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])


def _box_of(
    inside: np.ndarray,
    geometry: Geometry,
    points: Sequence[tuple[float, float, float]],
    margin_mm: float,
) -> list[tuple[float, float]]:
    """World ``(x, y, z)`` ranges of the voxels ``inside`` (a world-aligned grid) and of
    ``points``, widened by ``margin_mm`` and clipped to the grid's extent."""
    sx, sy, sz = geometry.spacing
    origin = np.asarray(geometry.origin)
    spacing = np.asarray([sx, sy, sz])
    shape_xyz = np.asarray(inside.shape[::-1])
    lo_grid = origin - spacing / 2
    hi_grid = origin + (shape_xyz - 0.5) * spacing
    ranges = []
    for axis_xyz, reduce_axes in ((0, (0, 1)), (1, (0, 2)), (2, (1, 2))):
        hit = np.flatnonzero(inside.any(axis=reduce_axes))
        lo = origin[axis_xyz] + (hit[0] - 0.5) * spacing[axis_xyz]
        hi = origin[axis_xyz] + (hit[-1] + 0.5) * spacing[axis_xyz]
        for p in points:
            lo, hi = min(lo, p[axis_xyz]), max(hi, p[axis_xyz])
        ranges.append(
            (
                max(lo - margin_mm, lo_grid[axis_xyz]),
                min(hi + margin_mm, hi_grid[axis_xyz]),
            )
        )
    return ranges


def _overview(
    scan: Scan, lung: np.ndarray | None, marks: Sequence[Mark], threshold: float, path: Path
) -> None:
    """Axial and coronal maximum-intensity projections of ``scan`` (world-aligned)."""
    g = scan.geometry
    vol = overview_volume(scan, lung)
    axial_mip = vol.max(axis=0)
    coronal_mip = vol.max(axis=1)
    sx, sy, sz = g.spacing
    nz, ny, nx = vol.shape
    x0, y0, z0 = g.origin
    ext_x = (x0 - sx / 2, x0 + (nx - 0.5) * sx)
    ext_y = (y0 - sy / 2, y0 + (ny - 0.5) * sy)
    ext_z = (z0 - sz / 2, z0 + (nz - 0.5) * sz)
    ci, cj, ck = g.direction_matrix.T
    fig = new_figure((12, 5.6))
    axes = fig.subplots(1, 2)
    what = "lungs" if lung is not None else "whole scan"
    lo, hi = OVERVIEW_WINDOW
    axes[0].imshow(axial_mip, cmap="gray", vmin=lo, vmax=hi, extent=(*ext_x, ext_y[1], ext_y[0]))
    axes[1].imshow(coronal_mip, cmap="gray", vmin=lo, vmax=hi, extent=(*ext_x, *ext_z),
                   origin="lower")  # fmt: skip
    if lung is not None and (vol > AIR_HU).any():
        # Zoom onto the lungs (and every mark), 10 mm around.
        box = _box_of(vol > AIR_HU, g, [(m.detection.x, m.detection.y, m.detection.z)
                                          for m in marks], margin_mm=10.0)  # fmt: skip
        (xa, xb), (ya, yb), (za, zb) = box
        for ax in axes:
            ax.set_xlim(xa, xb)
        axes[0].set_ylim(yb, ya)
        axes[1].set_ylim(za, zb)
    _draw_letters(axes[0], view_letters(ci, cj), size=12)
    _draw_letters(axes[1], view_letters(ci, -ck), size=12)
    for m in reversed(marks):  # the most probable on top
        d = m.detection
        style = _mark_style(m)
        r = _overview_radius(d)
        for ax, centre in ((axes[0], (d.x, d.y)), (axes[1], (d.x, d.z))):
            ax.add_patch(Circle(centre, r, fill=False, **style))
    axes[0].set_title(f"axial maximum-intensity projection ({what})", fontsize=10)
    axes[1].set_title(f"coronal maximum-intensity projection ({what})", fontsize=10)
    axes[0].set(xlabel="x (mm)", ylabel="y (mm)")
    axes[1].set(xlabel="x (mm)", ylabel="z (mm)")
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.xaxis.label.set_size(8)
        ax.yaxis.label.set_size(8)
    handles = []
    if any(m.above for m in marks):
        handles.append(Line2D([], [], label=f"p >= {threshold:g} (report threshold)",
                              **_mark_style(Mark(0, marks[0].detection, (0, 0, 0), True))))  # fmt: skip
    if not all(m.above for m in marks):
        handles.append(Line2D([], [], label=f"p < {threshold:g}",
                              **_mark_style(Mark(0, marks[0].detection, (0, 0, 0), False))))  # fmt: skip
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=9, frameon=False)
    # The top 4 % keeps the taller panel's title inside the figure once aspects are applied.
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    fig.canvas.draw()  # the axes' final boxes (equal aspect), for placing the labels
    _label_marks(axes[0], [((m.detection.x, m.detection.y), m) for m in marks])
    _label_marks(axes[1], [((m.detection.x, m.detection.z), m) for m in marks])
    _save(fig, path, dpi=100)


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------


def model_set_facts(model_set: Any) -> dict[str, Any]:
    """What the report says of a :class:`integration.modelset.ModelSet`: its summary, its
    description and each stage's training."""
    facts = dict(model_set.summary())
    facts["description"] = model_set.description
    stages = []
    for stage in model_set.stages:
        manifest = model_set.manifests.get(stage) or {}
        prov = manifest.get("provenance") or {}
        hardware = prov.get("hardware") or {}
        stages.append(
            {
                "stage": stage,
                "name": stage_title(stage),
                "train_minutes": round((prov.get("train_seconds") or 0.0) / 60.0, 1),
                "steps": prov.get("steps"),
                "cpu_count": hardware.get("cpu_count"),
                "gpus": list(hardware.get("gpus") or []),
                "sealed": prov.get("sealed"),
            }
        )
    facts["stage_training"] = stages
    return facts


def _banner(warning: str | None) -> str:
    if not warning:
        return ""
    return f'<p class="banner" role="alert">{html.escape(warning)}</p>\n'


def _provenance(
    model_set: dict | None, threshold: float, tta: bool | None, candidate_weight: float = 0.0
) -> str:
    if not model_set:
        return "<p>The model set is not known (the marks were written without one).</p>\n"
    esc = html.escape
    version = f" {model_set['version']}" if model_set.get("version") else ""
    rows = [
        ("model set", f"<b>{esc(str(model_set['name']) + version)}</b>"),
        ("stages", esc(", ".join(stage_title(s) for s in model_set.get("stages", [])))),
    ]
    if model_set.get("description"):
        rows.append(("description", esc(model_set["description"])))
    rows.append(("trained on", esc(str(model_set.get("trained_on", "")))))
    hours = model_set.get("train_hours")
    training = f"{hours:g} h in all" if hours is not None else "not recorded"
    parts = []
    for s in model_set.get("stage_training") or []:
        where = f"{s['cpu_count']} CPU cores" if s.get("cpu_count") else "unknown hardware"
        where += ", " + (", ".join(s["gpus"]) if s.get("gpus") else "no GPU")
        steps = f", {s['steps']} steps" if s.get("steps") is not None else ""
        sealed = f", sealed {str(s['sealed'])[:10]}" if s.get("sealed") else ""
        parts.append(f"{s['name']}: {s['train_minutes']:g} min{steps} ({where}{sealed})")
    if parts:
        training += "; " + "; ".join(parts)
    rows.append(("training time", esc(training)))
    if model_set.get("demo_grade"):
        rows.append(("grade", "<b>demo-grade</b> (minutes of training or small synthetic data)"))
    tta_words = "" if tta is None else f"; test-time augmentation {'on' if tta else 'off'}"
    rows.append(("report threshold", f"{threshold:g}{tta_words}"))
    if candidate_weight > 0:
        rows.append(("score", f"{candidate_weight:g} x U-Net + {1 - candidate_weight:g} x MGI-CNN"))
    if model_set.get("path"):
        rows.append(("folder", _folder_words(Path(model_set["path"]))))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="facts">{body}</table>\n'


def _folder_words(path: Path) -> str:
    from integration.modelset import SHIPPED_MODELS

    try:
        shipped = path.resolve() == SHIPPED_MODELS.resolve()
    except OSError:
        shipped = False
    if shipped:
        return "the set shipped with the suite (<code>integration/shipped_models</code>)"
    return f"<code>{html.escape(str(path))}</code>"


def _score_explained(
    model_set: dict | None, threshold: float, candidate_weight: float = 0.0
) -> str:
    stages = (model_set or {}).get("stages") or ["unet", "fpr"]
    members = sum(1 for s in stages if FPR_STAGE.match(s))
    found = "Each mark is a candidate found by the U-Net (a blob of its voxel-wise nodule map); "
    patches = (
        "how much the three patches around the point, cut at three scales, look like the "
        "nodules {they} trained on rather than like the other candidates {they} shown"
    )
    if not members:
        what = (
            found + "this model set has no MGI-CNN stage, so its <b>probability</b> is the "
            "U-Net's (smoothed) peak nodule probability in the blob."
        )
    else:
        if members > 1:
            network = (
                f"the mean output of {members} MGI-CNN false-positive-reduction networks "
                f"trained apart: {patches.format(they='they were')}"
            )
        else:
            network = (
                "the output of the MGI-CNN false-positive-reduction network for that candidate: "
                + patches.format(they="it was")
            )
        if candidate_weight > 0:
            what = (
                found + f"its <b>probability</b> is {candidate_weight:g} times the U-Net's own "
                f"(smoothed) peak probability in the blob plus {1 - candidate_weight:g} times "
                f"{network}."
            )
        else:
            what = found + f"its <b>probability</b> is {network}."
    data = " (see Models below)" if model_set else ""
    return (
        f'<p class="explain">{what} The scan-level suspicion is the highest of these. '
        "It is <b>not a probability of malignancy</b>, and it is <b>not calibrated to clinical "
        "risk</b>: it reflects the data the models were trained on"
        f"{data}, and the same value means different rates of real nodules on other "
        f"scanners and populations. The report threshold ({threshold:g}) only decides "
        "which marks are highlighted and cropped. This is research and teaching software, "
        "<b>not a medical device</b>: every mark needs a radiologist's review, and a nodule "
        "without a mark is not ruled out.</p>\n"
    )


def _table(marks: Sequence[Mark], n_slices: int, crops: dict[int, str]) -> str:
    scored = any(m.detection.malignancy is not None for m in marks)
    rows = []
    for m in marks:
        d = m.detection
        i, j, k = m.ijk
        rank = f'<a href="#{crops[m.rank]}">{m.rank}</a>' if m.rank in crops else str(m.rank)
        malignancy = ""
        if scored:
            malignancy = (
                "<td>&ndash;</td><td>&ndash;</td>"
                if d.malignancy is None
                else f"<td>{d.malignancy:.3f}</td><td>{d.malignancy_rating or 0:.1f}</td>"
            )
        rows.append(
            f'<tr class="{"above" if m.above else "below"}"><td>{rank}</td>'
            f"<td>{d.probability:.3f}</td>{malignancy}<td>{d.x:.1f}</td><td>{d.y:.1f}</td>"
            f"<td>{d.z:.1f}</td><td>{i}</td><td>{j}</td><td>{k}</td>"
            f"<td>{m.slice_number} / {n_slices}</td><td>{d.diameter_mm:.1f}</td></tr>"
        )
    malignancy_head = (
        '<th rowspan="2">malignancy<br>probability&#8225;</th>'
        '<th rowspan="2">malignancy<br>rating (1-5)&#8225;</th>'
        if scored
        else ""
    )
    return (
        '<table class="marks" id="marks"><thead>'
        f'<tr><th rowspan="2">rank</th><th rowspan="2">probability</th>{malignancy_head}'
        '<th colspan="3">world (mm, LPS)</th><th colspan="3">voxel index in the scan</th>'
        '<th rowspan="2">slice<br>(k + 1)</th>'
        '<th rowspan="2">U-Net blob<br>diameter (mm)&#8224;</th></tr>'
        "<tr><th>x</th><th>y</th><th>z</th><th>i (x)</th><th>j (y)</th><th>k (z)</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>\n"
    )


def _patient_section(patient: dict | None) -> str:
    """The patient-level score and what it is (empty without a malignancy stage)."""
    if not patient:
        return ""
    note = f" {html.escape(patient['note'])}" if patient.get("note") else ""
    return (
        f'<p class="score">Patient-level malignancy score: <b>{patient["score"]:.3f}</b>'
        f" (over {patient['nodules']} marks at or above {patient['threshold']:g}).{note}</p>\n"
        '<p class="explain">&#8225; Each mark at or above the report threshold is scored by the '
        "malignancy CNN: the probability that readers would rate it malignant (median LIDC "
        "rating 4-5 against 1-2) and the rating it predicts. The patient-level score is the "
        "highest of these probabilities, as in the PyTorch-book LUNA project; 0 when no mark "
        "reaches the threshold. The network learned from synthetic nodules labelled with the "
        "ratings of LIDC readers (see Models): it is <b>not a diagnosis</b> and not a "
        "calibrated cancer risk.</p>\n"
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1150px; }
table { border-collapse: collapse; margin: 0.6em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
table.facts th { text-align: left; background: #f4f4f4; vertical-align: top; }
table.facts td { text-align: left; }
table.marks th { background: #f4f4f4; text-align: center; }
tr.above td { background: #ffe3e0; font-weight: 600; }
.score { font-size: 1.4em; margin: 0.4em 0; }
figure { margin: 1em 0; } img { max-width: 100%; }
figcaption, .note { color: #555; font-size: 0.9em; }
.explain { background: #f6f8fa; border-left: 4px solid #888; padding: 0.6em 1em; }
.banner { background: #fde2e1; border: 2px solid #c0392b; color: #7b241c; padding: 0.8em 1em;
  font-weight: bold; }
"""


def _overview_caption(
    n_marks: int, n_numbered: int, n_above: int, threshold: float, masked: bool
) -> str:
    if not n_marks:
        return "No marks."
    if n_above == n_numbered:
        which = f"every mark at or above the report threshold {threshold:g} (red, solid)"
    elif n_above == 0:
        which = (
            f"the {n_numbered} most probable, none of which reaches the report threshold "
            f"{threshold:g} (yellow, dashed)"
        )
    else:
        which = (
            f"the {n_above} at or above the report threshold {threshold:g} (red, solid) and the "
            f"next {n_numbered - n_above} most probable below it (yellow, dashed)"
        )
    rest = n_marks - n_numbered
    projected = (
        "only voxels inside the lung mask (eroded 4 mm) are projected"
        if masked
        else "no lung mask was given, so the whole scan is projected"
    )
    return (
        f"Marks 1&ndash;{n_numbered} (ranks as in the table) are drawn and numbered: {which}. "
        f"The overview numbers every mark at or above the threshold and at least the "
        f"{OVERVIEW_TOP} most probable"
        + (f"; the other {rest} are listed in the table only" if rest else "")
        + f". Circles: U-Net blob diameter + 8 mm. Window {OVERVIEW_WINDOW[0]:g} to "
        f"{OVERVIEW_WINDOW[1]:g} HU; {projected}."
    )


def write_report(
    scan: Scan,
    detections: Sequence[Detection],
    out_dir: str | os.PathLike,
    lung: np.ndarray | None = None,
    threshold: float = 0.5,
    max_crops: int = 20,
    timings: dict[str, float] | None = None,
    model_set: dict | None = None,
    warning: str | None = None,
    lung_geometry: Geometry | None = None,
    tta: bool | None = None,
    view3d: bool = False,
    patient: dict | None = None,
    candidate_weight: float = 0.0,
) -> Path:
    """Write ``report.html`` and its figures into ``out_dir``; return the page's path.

    Marks are ranked most probable first. Every mark is a row of the table; the overview
    numbers those at or above ``threshold`` and at least the :data:`OVERVIEW_TOP` most
    probable; crops are drawn for those at or above ``threshold`` (at most ``max_crops``),
    or the :data:`MIN_CROPS` most probable when fewer pass. ``lung`` is the lung mask that
    limits the overview's projections, on ``lung_geometry``'s grid (default: the scan's); it
    is resampled onto the grid shown. ``model_set`` (:func:`model_set_facts` or
    :meth:`integration.modelset.ModelSet.summary`) names the models that made the marks;
    ``warning`` is shown as a banner at the top (a demo-grade model set); ``tta`` says whether
    the scores were test-time augmented (``None``: not said). ``view3d`` adds ``view3d.png``,
    the lungs in 3-D with the marks (:mod:`integration.view3d`; needs ``lung`` on a
    world-aligned grid). ``patient`` (:func:`integration.pipeline.patient_summary`) adds the
    patient-level malignancy score; marks with a ``malignancy`` get it in the table.
    ``candidate_weight`` is the set's share of the U-Net's probability in the score
    (:class:`integration.pipeline.PipelineConfig`), which the page explains.

    Raises:
        ValueError: a lung mask whose shape does not fit its grid.
        lungct.fileio.WriteError: the folder or a file in it cannot be written whole.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(out, f"cannot create the output folder ({exc.strerror or exc})") from None
    shown = world_aligned(scan)
    marks = rank_marks(scan, detections, threshold)
    n_numbered = numbered_count(marks)
    n_above = sum(m.above for m in marks)
    grid = lung_geometry or scan.geometry
    inner = inner_lung(lung, grid) if lung is not None else None
    lung_shown = lung_on_grid(inner, grid, shown)
    _overview(shown, lung_shown, marks[:n_numbered], threshold, out / "overview.png")

    cropped = [m for m in marks if m.above][:max_crops]
    if len(cropped) < MIN_CROPS:
        cropped = marks[: max(len(cropped), min(MIN_CROPS, max_crops))]
    crops, crop_ids = [], {}
    lo, hi = WINDOWS[CROP_WINDOW]
    window = f"{CROP_WINDOW} window, W {hi - lo:g} / L {(hi + lo) / 2:g} HU"
    for m in cropped:
        name = f"detection_{m.rank:02d}.png"
        crop_ids[m.rank] = f"mark-{m.rank}"
        _crop_views(shown, scan, m, max(24.0, m.detection.diameter_mm), out / name)
        d = m.detection
        i, j, k = m.ijk
        state = "" if m.above else " (below the threshold)"
        alt = f"mark {m.rank}: axial, coronal and sagittal slices"
        crops.append(
            f'<figure id="mark-{m.rank}"><img src="{name}" alt="{alt}"><figcaption>'
            f"<b>#{m.rank}</b>{state}: p = {d.probability:.3f}, world ({d.x:.1f}, {d.y:.1f}, "
            f"{d.z:.1f}) mm, voxel (i, j, k) = ({i}, {j}, {k}), slice {m.slice_number}, "
            f"U-Net blob diameter {d.diameter_mm:.1f} mm; {window}.</figcaption></figure>"
        )
    if not n_above:
        crop_words = (
            f"No mark reaches the threshold {threshold:g}; the {len(cropped)} most probable "
            "are shown"
        )
    elif n_above < len(cropped):
        crop_words = (
            f"The {n_above} marks at or above the threshold {threshold:g} and the next "
            f"{len(cropped) - n_above} most probable below it"
        )
    elif n_above > len(cropped):
        crop_words = (
            f"The {len(cropped)} most probable of the {n_above} marks at or above the "
            f"threshold {threshold:g}"
        )
    else:
        crop_words = f"The {n_above} marks at or above the threshold {threshold:g}"
    view_section = ""
    if view3d and lung is not None:
        from integration.view3d import render_view3d

        ranked = [m.detection for m in marks]
        render_view3d(lung, grid, ranked, out / "view3d.png", threshold, top=numbered_count(marks))
        view_section = (
            '<h2>3-D view</h2><figure><img src="view3d.png" alt="the lungs in 3-D with the '
            'numbered marks"><figcaption>The lung mask as a shaded surface from the front, '
            "halfway and the patient's left, with the numbered marks of the overview (the lungs "
            "drawn as glass: every mark shows, wherever it lies).</figcaption></figure>\n"
        )
    overview_caption = _overview_caption(
        len(marks), n_numbered, n_above, threshold, lung_shown is not None
    )
    g = scan.geometry
    timing_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in (timings or {}).items()
    )
    esc_uid = html.escape(scan.seriesuid)
    source = (
        f"; read from <code>{html.escape(Path(scan.source).name)}</code>" if scan.source else ""
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Nodule detection report: {esc_uid}</title>
<style>{_STYLE}</style></head><body>
{_banner(warning)}<h1>Nodule detection report</h1>
<p>Series <code>{esc_uid}</code>{source}. Size (i, j, k) {list(g.size)} voxels, spacing
{[round(s, 3) for s in g.spacing]} mm, index axes {_axis_words(g)}.</p>
<p class="score">Scan-level suspicion (most probable mark): <b>{suspicion_score(detections):.3f}</b></p>
<p>{len(marks)} marks; <b>{n_above}</b> at or above the report threshold {threshold:g}.</p>
{_patient_section(patient)}<h2>What the score is</h2>
{_score_explained(model_set, threshold, candidate_weight)}<h2>Models</h2>
{_provenance(model_set, threshold, tta, candidate_weight)}<h2>Overview</h2>
<figure><img src="overview.png" alt="maximum-intensity projections with the numbered marks">
<figcaption>{overview_caption} Letters: R/L right/left, A/P anterior/posterior, S/I
superior/inferior of the patient.</figcaption></figure>
{view_section}<h2>Marks</h2>
<p class="note">All {len(marks)} marks, most probable first; highlighted rows are at or above the
report threshold {threshold:g}. World coordinates are millimetres in the patient (LPS) frame,
as LUNA16 tables; the voxel index (i, j, k) is the nearest voxel of the scan as read, 0-based
along its own x, y, z axes; the slice is k + 1 of {g.size[2]}, counted from the scan's first
slice (k = 0, at the origin). &#8224; The U-Net blob diameter is the diameter of the sphere with
the volume of the U-Net's thresholded blob on its 1 mm grid: a rough size of the candidate,
not a measured nodule diameter. A rank links to its crop.</p>
{_table(marks, g.size[2], crop_ids) if marks else "<p>None.</p>"}
<h2>Crops</h2>
<p class="note">{crop_words}: axial, coronal and sagittal slices through the mark (radiological
view: the patient's right on the image's left), {SCALE_BAR_MM:g} mm scale bar, slice index in the
scan as read, HU window under each row.</p>
{"".join(crops) or "<p>None.</p>"}
<h2>Timing</h2><table>{timing_rows}</table>
<p class="note">Research and teaching software, not a medical device. Marks need a
radiologist's review.</p>
</body></html>
"""
    target = out / "report.html"
    write_text_atomic(target, page)
    return target
