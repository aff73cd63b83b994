"""Make ``docs/synthetic_vs_real.png``: a synthetic ``--size full`` scan beside a real CT.

Rows: an axial slice near the hilum, a coronal slice through the lungs, and close-ups of the
synthetic nodules beside the real LUNA16 nodule of LIDC-IDRI-0001. Both scans are shown in the
same lung window, in radiological orientation (patient's right on the image left), with the
real aspect ratio.

Usage::

    python scripts/figure_synthetic_vs_real.py [--seed 0 --index 25] [--out docs/synthetic_vs_real.png]
"""

from __future__ import annotations

import argparse
import glob
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lungct.fileio import atomic_path  # noqa: E402
from lungct.io import read_scan  # noqa: E402
from lungct.scan import Scan  # noqa: E402
from lungct.synth import synthesize_scan  # noqa: E402

WINDOW = (-1000, 400)
REAL_MHD = "/work/shared/data/real/mhd/*.mhd"
REAL_NODULE_DICOM = "/work/shared/data/real/lidc-idri-0001-dicom"
REAL_NODULE_WORLD = (56.208, 86.343, -115.868)  # LUNA16 annotation, 23.35 mm
REAL_NODULE_DIAMETER = 23.35


def canonical(scan: Scan, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The array (and mask) flipped so that index order = world order (radiological view)."""
    a = scan.array
    d = scan.direction
    for axis, sign in ((2, d[0]), (1, d[4]), (0, d[8])):
        if sign < 0:
            a = np.flip(a, axis)
            mask = None if mask is None else np.flip(mask, axis)
    return a, mask


def lung_levels(a: np.ndarray, mask: np.ndarray) -> tuple[int, int]:
    """An axial level ~42% down from the lung apex (hilum) and the coronal row of the trachea.

    The trachea is the air outside the lung mask near the midline, 15% below the apex; if it
    is not found the coronal row is the lungs' middle.
    """
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    ys = np.flatnonzero(mask.any(axis=(0, 2)))
    xs = np.flatnonzero(mask.any(axis=(0, 1)))
    z = int(zs.max() - 0.42 * (zs.max() - zs.min()))
    y = int(ys.min() + 0.55 * (ys.max() - ys.min()))
    zt = int(zs.max() - 0.15 * (zs.max() - zs.min()))
    # Air pockets not touching the image edge and outside the lungs: the trachea (nearest the
    # midline of the lungs) -- outside air and the lungs themselves are excluded.
    air = (a[zt] < -900) & (mask[zt] == 0)
    labels, n = ndimage.label(air)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    xc = 0.5 * (xs.min() + xs.max())
    best = None
    for k in range(1, n + 1):
        if k in edge:
            continue
        yy, xx = np.nonzero(labels == k)
        if yy.size < 10 or not ys.min() < yy.mean() < ys.max():
            continue
        dist = abs(float(xx.mean()) - xc)
        if dist > 0.15 * (xs.max() - xs.min()):
            continue
        if best is None or dist < best[0]:
            best = (dist, round(float(yy.mean())))
    if best is not None:
        y = best[1]
    return z, y


def crop(a: np.ndarray, centre_zyx, half_mm: float, spacing) -> np.ndarray:
    """Axial close-up (square, ``2 * half_mm``) around a voxel."""
    z, y, x = (round(float(c)) for c in centre_zyx)
    h = round(half_mm / spacing[0])
    pad = np.pad(a[z], h, constant_values=-1024)
    return pad[y : y + 2 * h, x : x + 2 * h]


def main(argv: list[str] | None = None) -> int:
    """Render the figure; prints where it went."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    # Index 25 of seed 0: 1.25 mm slices, identity direction, a -3024 padded reconstruction
    # circle -- like the real scan beside it.
    p.add_argument("--index", type=int, default=25)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "synthetic_vs_real.png")
    args = p.parse_args(argv)

    # Four nodules, to show the kinds side by side in the close-ups.
    case = synthesize_scan(args.seed, args.index, "full", n_nodules=4)
    syn, syn_mask = canonical(case.scan, case.lung_mask)
    real_scan = read_scan(sorted(glob.glob(REAL_MHD))[0])
    from lungct.lungmask import segment_lungs

    real, real_mask = canonical(real_scan, segment_lungs(real_scan))

    fig = plt.figure(figsize=(14, 17.5), facecolor="black")
    gs = fig.add_gridspec(3, 2, height_ratios=[1.0, 0.8, 0.42], hspace=0.08, wspace=0.03)
    style = dict(cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], interpolation="bilinear")
    for col, (a, m, s, title) in enumerate(
        [
            (
                syn,
                syn_mask,
                case.scan.spacing,
                f"synthetic (lungct synth --size full), {case.seriesuid[-8:]}",
            ),
            (real, real_mask, real_scan.spacing, "real: LIDC-IDRI-0002 (LUNA16)"),
        ]
    ):
        z, y = lung_levels(a, m)
        ax = fig.add_subplot(gs[0, col])
        ax.imshow(a[z], **style)
        ax.set_title(
            f"{title}\naxial {z}, {s[0]:.2f} x {s[1]:.2f} x {s[2]:.2f} mm",
            color="white",
            fontsize=10,
        )
        ax.axis("off")
        ax = fig.add_subplot(gs[1, col])
        ax.imshow(a[:, y, :], origin="lower", aspect=s[2] / s[0], **style)
        ax.set_title(f"coronal {y}", color="white", fontsize=10)
        ax.axis("off")

    # Close-ups: synthetic nodules (stored-orientation indices) and the real LIDC-0001 nodule.
    inner = gs[2, :].subgridspec(1, 5, wspace=0.03)
    shown = sorted(case.nodules, key=lambda n: -n.diameter_mm)[:4]
    for k, n in enumerate(shown):
        ax = fig.add_subplot(inner[0, k])
        half = max(12.0, 1.6 * n.diameter_mm)
        ax.imshow(crop(case.scan.array, n.voxel_zyx, half, case.scan.spacing), **style)
        ax.set_title(
            f"synthetic {n.category}\n{n.location}, {n.diameter_mm:.1f} mm",
            color="white",
            fontsize=9,
        )
        ax.axis("off")
    try:
        lidc = read_scan(REAL_NODULE_DICOM)
        ax = fig.add_subplot(inner[0, 4])
        v = lidc.world_to_voxel(REAL_NODULE_WORLD)
        ax.imshow(crop(lidc.array, v, 1.6 * REAL_NODULE_DIAMETER, lidc.spacing), **style)
        ax.set_title(
            f"real LUNA16 nodule\nLIDC-IDRI-0001, {REAL_NODULE_DIAMETER} mm",
            color="white",
            fontsize=9,
        )
        ax.axis("off")
    except Exception as exc:  # the DICOM reader is optional for this figure
        print(f"note: real nodule close-up skipped ({exc})", file=sys.stderr)
    fig.suptitle(f"Lung window [{WINDOW[0]}, {WINDOW[1]}] HU", color="white", fontsize=12, y=0.995)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=80, facecolor="black", bbox_inches="tight")
    args.out.chmod(0o644)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
