"""The per-scan detection report: an HTML page with crops of each detection and an overview.

Everything a reader needs sits next to the page: ``report.html``, ``overview.png`` (maximum
intensity projections of the lungs with every mark) and one ``detection_NN.png`` per detection
above the report threshold (axial, coronal and sagittal crops with the mark circled).
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Circle
from scipy import ndimage

from lungct.fileio import atomic_path, write_text_atomic
from lungct.geometry import Geometry
from lungct.patches import crop_patch
from lungct.preprocess import WINDOWS, resample_onto
from lungct.scan import AIR_HU, Scan
from lungct.show import world_aligned


@dataclass(frozen=True)
class Detection:
    """One mark of the detector, in world millimetres."""

    x: float
    y: float
    z: float
    probability: float
    diameter_mm: float


def suspicion_score(detections: Sequence[Detection]) -> float:
    """Scan-level suspicion: the most probable nodule (0 when there is none)."""
    return max((d.probability for d in detections), default=0.0)


def _save(fig: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def _crop_views(scan: Scan, det: Detection, half_mm: float, path: Path, title: str) -> None:
    sx, sy, sz = scan.geometry.spacing
    hx, hy, hz = (int(np.ceil(half_mm / s)) for s in (sx, sy, sz))
    size = (2 * hz + 1, 2 * hy + 1, 2 * hx + 1)
    block = crop_patch(scan.array, scan.geometry, (det.x, det.y, det.z), size)
    ext_xy = (-hx * sx, hx * sx, hy * sy, -hy * sy)
    ext_xz = (-hx * sx, hx * sx, -hz * sz, hz * sz)
    ext_yz = (-hy * sy, hy * sy, -hz * sz, hz * sz)
    views = [
        ("axial", block[hz], ext_xy, "upper"),
        ("coronal", block[:, hy, :], ext_xz, "lower"),
        ("sagittal", block[:, :, hx], ext_yz, "lower"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    radius = max(det.diameter_mm / 2 + 2.0, 4.0)
    for ax, (name, image, extent, origin) in zip(axes, views, strict=True):
        ax.imshow(
            image,
            cmap="gray",
            vmin=WINDOWS["lung"][0],
            vmax=WINDOWS["lung"][1],
            extent=extent,
            origin=origin,
            interpolation="bilinear",
        )
        ax.add_patch(Circle((0, 0), radius, fill=False, ec="#ff9f0a", lw=1.4))
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def lung_on_grid(lung: np.ndarray | None, geometry: Geometry, shown: Scan) -> np.ndarray | None:
    """The lung mask (on ``geometry``) on the grid of the scan shown, or ``None``."""
    if lung is None:
        return None
    if lung.shape != geometry.shape_zyx:
        raise ValueError(f"lung mask shape {lung.shape} does not fit its grid {geometry.shape_zyx}")
    if geometry == shown.geometry:
        return lung
    return resample_onto(lung.astype(np.uint8, copy=False), geometry, shown.geometry)


def overview_volume(scan: Scan, lung: np.ndarray | None) -> np.ndarray:
    """The HU volume the overview projects: air outside the (eroded) lungs, if a mask is given."""
    if lung is None:
        return scan.array
    # The mask is dilated into the chest wall; erode it so ribs do not fill the projection.
    steps = max(1, round(4.0 / min(scan.geometry.spacing)))
    inner = ndimage.binary_erosion(lung > 0, iterations=steps)
    return np.where(inner, scan.array, AIR_HU)


def _overview(
    scan: Scan, lung: np.ndarray | None, detections: Sequence[Detection], path: Path
) -> None:
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    axes[0].imshow(
        axial_mip, cmap="gray", vmin=-1000, vmax=300, extent=(*ext_x, ext_y[1], ext_y[0])
    )
    axes[1].imshow(
        coronal_mip, cmap="gray", vmin=-1000, vmax=300, extent=(*ext_x, *ext_z), origin="lower"
    )
    for k, d in enumerate(detections, start=1):
        colour = plt.cm.autumn(1.0 - d.probability)
        r = max(d.diameter_mm / 2 + 3, 5)
        for ax, centre in ((axes[0], (d.x, d.y)), (axes[1], (d.x, d.z))):
            ax.add_patch(Circle(centre, r, fill=False, ec=colour, lw=1.3))
            ax.annotate(
                str(k),
                centre,
                xytext=(r + 2, r + 2),
                textcoords="offset points",
                color=colour,
                fontsize=8,
            )
    axes[0].set_title("axial maximum-intensity projection (lungs)", fontsize=9)
    axes[1].set_title("coronal maximum-intensity projection (lungs)", fontsize=9)
    for ax in axes:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    _save(fig, path)


def _banner(warning: str | None) -> str:
    if not warning:
        return ""
    return f'<p class="banner" role="alert">{html.escape(warning)}</p>\n'


def _model_line(model_set: dict | None) -> str:
    if not model_set:
        return ""
    version = f" {model_set['version']}" if model_set.get("version") else ""
    return (
        f'<p class="note">Models: <b>{html.escape(str(model_set["name"]) + version)}</b> '
        f"({html.escape(', '.join(model_set['stages']))}), trained "
        f"{model_set['train_hours']:g} h on {html.escape(model_set['trained_on'])}. "
        "Research and teaching software, not a medical device.</p>\n"
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
) -> Path:
    """Write ``report.html`` and its figures into ``out_dir``; return the page's path.

    Detections are shown most probable first; crops are drawn for those at or above
    ``threshold`` (at most ``max_crops``), and every detection is listed in the table.
    ``lung`` is the lung mask that limits the overview's projections, on ``lung_geometry``'s
    grid (default: the scan's); it is resampled onto the grid shown.
    ``model_set`` (:meth:`integration.modelset.ModelSet.summary`) names the models that made
    the marks; ``warning`` is shown as a banner at the top (a demo-grade model set).

    Raises:
        ValueError: a lung mask whose shape does not fit its grid.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shown = world_aligned(scan)
    ranked = sorted(detections, key=lambda d: -d.probability)
    _overview(
        shown,
        lung_on_grid(lung, lung_geometry or scan.geometry, shown),
        ranked,
        out / "overview.png",
    )
    rows, crops = [], []
    for k, d in enumerate(ranked, start=1):
        rows.append(
            f"<tr><td>{k}</td><td>{d.x:.1f}</td><td>{d.y:.1f}</td><td>{d.z:.1f}</td>"
            f"<td>{d.diameter_mm:.1f}</td><td>{d.probability:.3f}</td></tr>"
        )
        if d.probability >= threshold and len(crops) < max_crops:
            name = f"detection_{k:02d}.png"
            title = f"#{k}: p = {d.probability:.3f}, ~{d.diameter_mm:.1f} mm"
            _crop_views(shown, d, 24.0, out / name, title)
            crops.append(
                f'<figure><img src="{name}" alt="{html.escape(title)}"><figcaption>'
                f"{html.escape(title)} at ({d.x:.1f}, {d.y:.1f}, {d.z:.1f}) mm"
                "</figcaption></figure>"
            )
    timing_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.1f} s</td></tr>" for k, v in (timings or {}).items()
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Nodule detection report: {html.escape(scan.seriesuid)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
.score {{ font-size: 1.4em; }}
figure {{ margin: 1em 0; }} img {{ max-width: 100%; }}
.note {{ color: #666; font-size: 0.9em; }}
.banner {{ background: #fde2e1; border: 2px solid #c0392b; color: #7b241c; padding: 0.8em 1em;
  font-weight: bold; }}
</style></head><body>
{_banner(warning)}<h1>Nodule detection report</h1>
{_model_line(model_set)}<p>Series <code>{html.escape(scan.seriesuid)}</code>; size {list(scan.geometry.size)} voxels,
spacing {[round(s, 3) for s in scan.spacing]} mm.</p>
<p class="score">Scan-level suspicion (most probable nodule):
<b>{suspicion_score(ranked):.3f}</b></p>
<p>{len(ranked)} detections; {len(crops)} at or above the threshold {threshold:g} shown below.
Coordinates are world millimetres (x, y, z) in the scan's patient (LPS) frame.</p>
<h2>Overview</h2>
<img src="overview.png" alt="maximum-intensity projections with the marks">
<h2>Detections above the threshold</h2>
{"".join(crops) or "<p>None.</p>"}
<h2>All detections</h2>
<table><tr><th>#</th><th>x (mm)</th><th>y (mm)</th><th>z (mm)</th><th>diameter (mm)</th>
<th>probability</th></tr>
{"".join(rows)}
</table>
<h2>Timing</h2><table>{timing_rows}</table>
<p class="note">Research software: not a medical device. Detections need a radiologist's review.</p>
</body></html>
"""
    target = out / "report.html"
    write_text_atomic(target, page)
    return target
