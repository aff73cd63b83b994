"""Synthetic nodules in a real scan: ``python -m lungct synth --background SCAN``.

The real scan keeps its anatomy, geometry and direction; each output index gets its own set of
nodules (and excluded findings and candidates) inside the lungs found by
:func:`lungct.lungmask.segment_lungs`, and its own series UID. Vessels are whatever is bright in
the lung, so juxtavascular nodules and vessel candidates sit on real vessels.

Only the change is blurred: the drawn nodules are smoothed with a CT-like PSF and get noise of
the scan's own level, and the rest of the scan is left exactly as it was.
"""

from __future__ import annotations

import os
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from lungct.io import read_scan
from lungct.scan import Scan
from lungct.synth.case import Candidate, Finding, SyntheticCase, case_rngs, series_uid
from lungct.synth.nodules import PlannedFinding, render_finding
from lungct.synth.placement import LungMap, TubeSamples, plan_candidates, plan_findings
from lungct.synth.render import BodyGrid


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


def synthesize_on_background(
    background: str | os.PathLike, seed: int, index: int, n_nodules: int | None = None
) -> SyntheticCase:
    """Put scan ``index``'s synthetic nodules into the lungs of the real scan ``background``.

    Returns a :class:`SyntheticCase` with the background's geometry, a new series UID, and the
    segmented lung mask as ``lung_mask``. Nodules are placed in (and clipped to) the aerated
    lung. Diameters are equivalent-sphere diameters.
    """
    scan, mask, lungs = load_background(str(Path(background).resolve()))
    tag = zlib.crc32(scan.seriesuid.encode()) & 0x7FFFFFFF
    _, _, _, _, r_find, r_draw, r_cand, r_noise = case_rngs(seed, index, "full", tag=tag)
    geom = scan.geometry
    # A grid whose "body frame" is index x spacing: placement works in mm, the world position
    # of any point is then the scan's own voxel_to_world of its index (direction included).
    grid = BodyGrid.regular(np.zeros(3), geom.spacing, scan.array.shape)
    lung = LungMap.build(lungs, grid)
    hu = scan.array.astype(np.float32)
    vessels = _vessel_samples(hu, lungs, grid, r_find)
    airways = TubeSamples(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), np.zeros(0, np.int64))

    if n_nodules is None:
        n_nodules = int(r_find.choice([0, 1, 2, 3, 4], p=[0.08, 0.37, 0.3, 0.15, 0.1]))
    nodules, excluded = plan_findings(
        r_find, lung, vessels, airways, n_nodules, int(min(6, r_find.poisson(2.0)))
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
        noise *= _noise_level(scan.array) / max(float(noise.std()), 1e-6)
        hu[box] += d + weight * noise
    array = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    del hu, delta

    def findings(fs: list[PlannedFinding]) -> list[Finding]:
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
                )
            )
        return out

    n_neg = int(r_cand.integers(250, 601))
    thick = vessels.pts[vessels.radius >= 1.0]  # stand-ins for bifurcations
    cpos, ccls, csrc = plan_candidates(
        r_cand, lung, vessels, airways, thick, nodules, excluded, n_neg
    )
    cands = []
    if cpos.shape[0]:
        idx = grid.to_index(cpos)
        inside = geom.contains(idx)
        world = geom.voxel_to_world(idx)
        cands = [
            Candidate(tuple(float(v) for v in w), int(c), "vessel" if s.startswith("vessel") else s)
            for w, c, s, ok in zip(world, ccls, csrc, inside, strict=True)
            if ok
        ]
    uid = series_uid(seed, index, f"background:{scan.seriesuid}")
    return SyntheticCase(
        scan=Scan(array=array, geometry=geom, seriesuid=uid),
        nodules=findings(nodules),
        excluded=findings(excluded),
        candidates=cands,
        lung_mask=mask,
        seed=int(seed),
        index=int(index),
        size="background",
        info={"background": scan.seriesuid, "direction": "as background"},
    )
