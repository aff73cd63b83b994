"""Synthetic nodules in a real scan: ``python -m lungct synth --background SCAN``.

Each output index gets its own framing of the real scan and its own set of nodules (and
excluded findings and candidates) inside the lungs found by
:func:`lungct.lungmask.segment_lungs`, and its own series UID. The framing is a left-right
mirror (half of the indices) and a crop along z (at most 30 % of the slices, at most 10 % of the
lungs' extent at each end): the voxels are moved, the geometry's spacing and direction are
kept, and the origin follows the crop, so the anatomy really moves in world space and every
world coordinate is recomputed through :class:`lungct.geometry.Geometry`. Vessels are whatever
is bright in the lung, so juxtavascular nodules and vessel candidates sit on real vessels.

The real scan's own LUNA16 findings (:class:`BackgroundFindings`) go into the output tables at
their moved positions (a crop never cuts one in half; one cropped away is dropped and listed in
``info``), real nodules get class-1 candidates, and nothing synthetic (nodule, excluded finding,
class-0 candidate) is put on or within 5 mm of a real finding: a real nodule is never taught as
a negative.

Only the change is blurred: the drawn nodules are smoothed with a CT-like PSF and get noise of
the scan's own level, and the rest of the scan is left exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from lungct.geometry import Geometry
from lungct.io import read_scan, series_uid_from_path
from lungct.scan import Scan
from lungct.synth.case import (
    Candidate,
    Finding,
    SyntheticCase,
    case_rngs,
    reader_rng,
    series_uid,
)
from lungct.synth.nodules import PlannedFinding, draw_reader_count, render_finding
from lungct.synth.placement import (
    KeepOut,
    LungMap,
    TubeSamples,
    plan_candidates,
    plan_findings,
)
from lungct.synth.render import BodyGrid

UNKNOWN_DIAMETER_MM = 10.0
"""Size assumed for a finding listed with diameter -1 (what the LUNA16 evaluation assumes)."""
MAX_CROP_FRACTION = 0.3
"""A z crop removes at most this fraction of the background's slices ..."""
MAX_LUNG_CROP_FRACTION = 0.1
"""... and at most this fraction of the lungs' z extent at each end."""


@dataclass(frozen=True)
class BackgroundFindings:
    """The background scan's own LUNA16 rows: ``(x, y, z, diameter_mm)``, world mm in the
    background's frame; an excluded finding's diameter may be -1 (unknown), as in LUNA16.

    ``BackgroundFindings()`` says the scan has none; :func:`read_background_findings` reads
    them from the LUNA16 tables.
    """

    nodules: tuple[tuple[float, float, float, float], ...] = ()
    excluded: tuple[tuple[float, float, float, float], ...] = ()

    def digest(self) -> str:
        """A short content key: generated scans are redone when the findings change."""
        text = json.dumps([[list(r) for r in self.nodules], [list(r) for r in self.excluded]])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def background_seriesuid(path: str | os.PathLike) -> str:
    """The series UID the background's rows carry: LUNA16 names each MetaImage after it; a
    DICOM folder has to be read for it."""
    path = Path(path)
    if path.is_dir():
        return read_scan(path).seriesuid
    return series_uid_from_path(path)


def read_background_findings(
    background: str | os.PathLike,
    annotations: str | os.PathLike,
    excluded: str | os.PathLike,
) -> BackgroundFindings:
    """The rows of ``annotations.csv`` and ``annotations_excluded.csv`` (LUNA16 format) that
    belong to the background scan's series."""
    from lungct.tables import read_annotations

    uid = background_seriesuid(background)
    tables = (
        read_annotations(annotations),
        read_annotations(excluded, allow_negative_diameter=True),
    )
    rows = []
    for table in tables:
        pick = table.rows_in_series(uid)
        rows.append(
            tuple((*(float(v) for v in table.coords[r]), float(table.diameter_mm[r])) for r in pick)
        )
    return BackgroundFindings(nodules=rows[0], excluded=rows[1])


@lru_cache(maxsize=2)
def load_background(path: str) -> tuple[Scan, np.ndarray, np.ndarray]:
    """The background scan, its lung mask and its aerated lung (cached per worker process).

    The segmentation is deliberately generous (closed, dilated) so it keeps juxtapleural
    nodules; placing new ones needs the aerated lung itself: mask voxels below -400 HU, with
    the vessels inside (holes of each axial slice) filled back in.
    """
    from lungct.lungmask import segment_lungs

    scan = read_scan(path)
    mask = (np.asarray(segment_lungs(scan)) > 0).astype(np.uint8)
    smooth = ndimage.gaussian_filter(scan.array.astype(np.float32), (0.0, 1.0, 1.0))
    aerated = (mask > 0) & (smooth < -400)
    del smooth
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    aerated = ndimage.binary_fill_holes(aerated, structure=in_plane)
    return scan, mask, aerated.astype(np.uint8)


def _noise_level(hu: np.ndarray) -> float:
    """The scan's noise (HU std) estimated in the air in front of the patient.

    The median absolute deviation of a first difference in air, scaled to a Gaussian std and by
    1/sqrt(2) for the difference; bounded to a sane range in case the corner holds a table.
    """
    corner = hu[:, : hu.shape[1] // 8, : hu.shape[2] // 4].astype(np.float32)
    air = corner > -1020  # padding has been clipped to -1024
    d = np.diff(corner, axis=2)[air[:, :, 1:] & air[:, :, :-1]]
    if d.size < 1000:
        return 15.0
    mad = float(np.median(np.abs(d - np.median(d))))
    return float(np.clip(1.4826 * mad / np.sqrt(2.0), 5.0, 40.0))


def _vessel_samples(hu: np.ndarray, lungs: np.ndarray, grid: BodyGrid, rng) -> TubeSamples:
    """Bright lung voxels (> -500 HU) as vessel samples, radius from their distance map.

    Worked out on the lungs' bounding box at ~1.2 mm in-plane (a full 512^2 x 300 distance
    transform would need gigabytes), which is plenty for choosing where nodules touch vessels.
    """
    sx, sy, sz = grid.spacing
    empty = TubeSamples(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), np.zeros(0, np.int64))
    where = np.argwhere(lungs[:, ::4, ::4] > 0)
    if where.shape[0] == 0:
        return empty
    stride = np.array([1, max(1, round(1.2 / sy)), max(1, round(1.2 / sx))])
    lo = np.maximum(where.min(0) * [1, 4, 4] - 4, 0)
    hi = np.minimum(where.max(0) * [1, 4, 4] + 8, np.array(hu.shape))
    box = tuple(slice(a, b, s) for a, b, s in zip(lo, hi, stride, strict=True))
    inside = ndimage.binary_erosion(lungs[box] > 0, iterations=2)
    vessel = (hu[box] > -500) & inside
    if not vessel.any():
        return empty
    edt = ndimage.distance_transform_edt(vessel, sampling=(sz, sy * stride[1], sx * stride[2]))
    idx = np.argwhere(vessel)
    if idx.shape[0] > 150_000:
        idx = idx[np.sort(rng.choice(idx.shape[0], 150_000, replace=False))]
    radius = edt[idx[:, 0], idx[:, 1], idx[:, 2]]
    full_idx = idx * stride + lo
    direction = rng.normal(size=idx.shape)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return TubeSamples(
        grid.to_body(full_idx.astype(np.float64)),
        radius.astype(np.float64),
        direction,
        np.zeros(idx.shape[0], dtype=np.int64),
    )


@dataclass(frozen=True)
class Framing:
    """How one output index changes the background: a mirror along the image x axis, then
    the slices ``z0 <= k < z1`` (indices of the background's array) kept."""

    mirror_x: bool
    z0: int
    z1: int

    def geometry(self, geom: Geometry) -> Geometry:
        """The output's geometry: spacing and direction kept, the origin moved to slice z0.

        The mirror keeps the geometry, so mirrored anatomy sits elsewhere in world space.
        """
        return Geometry(
            size=(geom.size[0], geom.size[1], self.z1 - self.z0),
            spacing=geom.spacing,
            origin=tuple(geom.voxel_to_world((float(self.z0), 0.0, 0.0))),
            direction=geom.direction,
        )

    def apply(self, array: np.ndarray) -> np.ndarray:
        """The same change on a ``(z, y, x)`` volume of the background's grid (a view)."""
        out = array[self.z0 : self.z1]
        return out[:, :, ::-1] if self.mirror_x else out

    def voxel(self, voxel_zyx: np.ndarray, n_x: int) -> np.ndarray:
        """Continuous background voxel ``(z, y, x)`` -> the output's voxel."""
        out = np.array(voxel_zyx, dtype=np.float64, ndmin=2)
        out[:, 0] -= self.z0
        if self.mirror_x:
            out[:, 2] = (n_x - 1) - out[:, 2]
        return out

    def world(self, world_xyz: np.ndarray, geom: Geometry) -> np.ndarray:
        """World ``(x, y, z)`` mm of a background point -> where that tissue is in the output."""
        voxel = self.voxel(geom.world_to_voxel(np.array(world_xyz, ndmin=2)), geom.size[0])
        return self.geometry(geom).voxel_to_world(voxel)


def choose_framing(
    rng: np.random.Generator,
    mask: np.ndarray,
    geometry: Geometry,
    findings_world: np.ndarray,
    findings_radius: np.ndarray,
) -> Framing:
    """A mirror (probability 0.5) and a z crop for one output index.

    The crop takes at most ``MAX_CROP_FRACTION`` of the slices and, at each end, at most
    ``MAX_LUNG_CROP_FRACTION`` of the lungs' z extent (``mask``, on the background's
    ``geometry``), so the scan still looks like a chest CT; a boundary that would run through
    a finding (``(N, 3)`` world mm centres, radii in mm) is moved out past it, so each finding
    is either kept whole or cropped away.
    """
    nz = mask.shape[0]
    finding_z = geometry.world_to_voxel(np.reshape(findings_world, (-1, 3)))[:, 0]
    finding_half_z = np.asarray(findings_radius) / geometry.spacing[2]
    mirror = bool(rng.random() < 0.5)
    rows = np.flatnonzero(mask.any(axis=(1, 2)))
    lung_lo, lung_hi = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, nz)
    into_lung = int(MAX_LUNG_CROP_FRACTION * (lung_hi - lung_lo))
    budget = int(MAX_CROP_FRACTION * nz)
    cut_lo = int(rng.integers(0, min(lung_lo + into_lung, budget) + 1))
    cut_hi = int(rng.integers(0, min(nz - lung_hi + into_lung, budget - cut_lo) + 1))
    z0, z1 = cut_lo, nz - cut_hi
    lo, hi = finding_z - finding_half_z, finding_z + finding_half_z
    moved = True
    while moved:  # each move only widens the range, so this ends
        moved = False
        for a, b in zip(lo, hi, strict=True):
            if a < z0 - 0.5 < b:
                z0, moved = max(0, int(np.floor(a + 0.5))), True
            if a < z1 - 0.5 < b:
                z1, moved = min(nz, int(np.ceil(b + 0.5))), True
    return Framing(mirror, z0, z1)


def synthesize_on_background(
    background: str | os.PathLike,
    seed: int,
    index: int,
    findings: BackgroundFindings,
    n_nodules: int | None = None,
) -> SyntheticCase:
    """Put scan ``index``'s synthetic nodules into a mirrored / cropped copy of ``background``.

    Args:
        background: the real scan.
        seed, index: as for :func:`lungct.synth.synthesize_scan`; they fix every choice.
        findings: the background's own LUNA16 findings (``BackgroundFindings()`` if it has
            none); they are carried into the tables and kept clear of anything synthetic.
        n_nodules: force the number of synthetic nodules.

    Returns:
        A :class:`SyntheticCase` with the framing's geometry, a new series UID, and the
        segmented lung mask as ``lung_mask``. Synthetic nodules are placed in (and clipped to)
        the aerated lung; their diameters are equivalent-sphere diameters. Real rows keep
        their listed diameters (-1 stays -1). ``info`` records the mirror, the crop and any real
        finding the crop removed.
    """
    scan, full_mask, full_lungs = load_background(str(Path(background).resolve()))
    tag = zlib.crc32(scan.seriesuid.encode()) & 0x7FFFFFFF
    _, r_vary, _, _, r_find, r_draw, r_cand, r_noise = case_rngs(seed, index, "full", tag=tag)
    bg_geom = scan.geometry

    real = [(row, "annotations") for row in findings.nodules]
    real += [(row, "excluded") for row in findings.excluded]
    real_world = np.array([r[:3] for r, _ in real], dtype=np.float64).reshape(-1, 3)
    real_radius = np.array(
        [0.5 * (r[3] if r[3] > 0 else UNKNOWN_DIAMETER_MM) for r, _ in real], dtype=np.float64
    )
    real_voxel = bg_geom.world_to_voxel(real_world).reshape(-1, 3)
    framing = choose_framing(r_vary, full_mask, bg_geom, real_world, real_radius)
    geom = framing.geometry(bg_geom)
    mask = np.ascontiguousarray(framing.apply(full_mask))
    lungs = np.ascontiguousarray(framing.apply(full_lungs))
    bg_array = framing.apply(scan.array)

    # A grid whose "body frame" is index x spacing: placement works in mm, the world position
    # of any point is then the output's own voxel_to_world of its index (direction included).
    grid = BodyGrid.regular(np.zeros(3), geom.spacing, bg_array.shape)
    real_out_voxel = framing.voxel(real_voxel, bg_geom.size[0])
    real_out_world = geom.voxel_to_world(real_out_voxel).reshape(-1, 3)
    keep_out = KeepOut(grid.to_body(real_out_voxel).reshape(-1, 3), real_radius)
    lung = LungMap.build(lungs, grid)
    hu = bg_array.astype(np.float32)
    vessels = _vessel_samples(hu, lungs, grid, r_find)
    airways = TubeSamples(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), np.zeros(0, np.int64))

    if n_nodules is None:
        n_nodules = int(r_find.choice([0, 1, 2, 3, 4], p=[0.08, 0.37, 0.3, 0.15, 0.1]))
    nodules, excluded = plan_findings(
        r_find, lung, vessels, airways, n_nodules, int(min(6, r_find.poisson(2.0))), keep_out
    )
    drawn = hu.copy()
    for f in [*nodules, *excluded]:
        render_finding(drawn, lungs, grid, f, r_draw)
    delta = drawn - hu
    del drawn
    changed = np.abs(delta) > 1.0
    if changed.any():
        lo = np.maximum(np.argwhere(changed).min(0) - 4, 0)
        hi = np.argwhere(changed).max(0) + 5
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        psf = 0.7
        sigma = (0.42, psf / geom.spacing[1], psf / geom.spacing[0])
        d = ndimage.gaussian_filter(delta[box], sigma)
        weight = np.clip(np.abs(d) / 150.0, 0.0, 1.0)
        noise = ndimage.gaussian_filter(
            r_noise.standard_normal(d.shape, dtype=np.float32), (0.0, 0.8, 0.8)
        )
        noise *= _noise_level(bg_array) / max(float(noise.std()), 1e-6)
        hu[box] += d + weight * noise
    array = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    del hu, delta

    r_readers = reader_rng(seed, index, "full", tag=tag)

    def synthetic(fs: list[PlannedFinding]) -> list[Finding]:
        out = []
        for f in fs:
            idx = grid.to_index(f.centre)
            w = geom.voxel_to_world(idx)
            out.append(
                Finding(
                    world=tuple(float(v) for v in w),
                    diameter_mm=float(f.diameter),
                    listed_diameter_mm=float(f.listed_diameter),
                    category=f.category,
                    location=f.location,
                    reason=f.reason,
                    voxel_zyx=tuple(float(v) for v in idx),
                    readers=draw_reader_count(r_readers, f.table, f.reason),
                    shape=int(f.shape),
                )
            )
        return out

    kept = geom.contains(real_out_voxel)
    real_found = {"annotations": [], "excluded": []}
    cropped_away = []
    for (row, table), world, voxel, inside in zip(
        real, real_out_world, real_out_voxel, kept, strict=True
    ):
        if not inside:
            cropped_away.append({"table": table, "world": list(row[:3]), "diameter_mm": row[3]})
            continue
        real_found[table].append(
            Finding(
                world=tuple(float(v) for v in world),
                diameter_mm=float(row[3]),
                listed_diameter_mm=float(row[3]),
                category="real",
                location="background",
                reason="background",
                voxel_zyx=tuple(float(v) for v in voxel),
            )
        )

    n_neg = int(r_cand.integers(250, 601))
    thick = vessels.pts[vessels.radius >= 1.0]  # stand-ins for bifurcations
    cpos, ccls, csrc = plan_candidates(
        r_cand, lung, vessels, airways, thick, nodules, excluded, n_neg, keep_out
    )
    csrc = ["vessel" if s.startswith("vessel") else s for s in csrc]
    # LUNA16's candidates mark its own nodules as class 1: so do the real ones here, 1-4 per
    # nodule within half a radius of its centre, like the synthetic ones.
    real_pos = []
    for f in real_found["annotations"]:
        centre = grid.to_body(np.asarray(f.voxel_zyx))
        for _ in range(int(min(4, 1 + r_cand.poisson(0.7)))):
            u = r_cand.normal(size=3)
            u /= max(np.linalg.norm(u), 1e-9)
            real_pos.append(centre + u * r_cand.uniform(0, 0.5) * 0.5 * f.diameter_mm)
    if real_pos:
        cpos = np.concatenate([cpos.reshape(-1, 3), np.asarray(real_pos)])
        ccls = np.concatenate([ccls, np.ones(len(real_pos), dtype=np.int64)])
        csrc = [*csrc, *(["real-nodule"] * len(real_pos))]
    cands = []
    if cpos.shape[0]:
        idx = grid.to_index(cpos)
        inside = geom.contains(idx)
        world = geom.voxel_to_world(idx)
        cands = [
            Candidate(tuple(float(v) for v in w), int(c), s)
            for w, c, s, ok in zip(world, ccls, csrc, inside, strict=True)
            if ok
        ]
    uid = series_uid(seed, index, f"background:{scan.seriesuid}")
    return SyntheticCase(
        scan=Scan(array=array, geometry=geom, seriesuid=uid),
        nodules=[*synthetic(nodules), *real_found["annotations"]],
        excluded=[*synthetic(excluded), *real_found["excluded"]],
        candidates=cands,
        lung_mask=mask,
        seed=int(seed),
        index=int(index),
        size="background",
        info={
            "background": scan.seriesuid,
            "direction": "as background",
            "mirror_x": framing.mirror_x,
            "crop_z": [framing.z0, framing.z1],
            "background_slices": int(scan.array.shape[0]),
            "real_nodules": len(real_found["annotations"]),
            "real_excluded": len(real_found["excluded"]),
            "real_cropped_away": cropped_away,
        },
    )
