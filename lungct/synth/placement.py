"""Where findings and candidates go: inside the lungs, against vessels, against the pleura.

All positions are body-frame millimetres. The lung map is a :class:`LungMap`: the ground-truth
labels on the scan grid plus a (possibly coarser) signed distance to the lungs' surface, enough
to say "this point is in the lung, this far from the chest wall".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from lungct.synth.nodules import PlannedFinding, category_code, pick_category, random_rotation
from lungct.synth.render import BodyGrid
from lungct.synth.shapes import load_shape_library, sample_diameter


@dataclass
class LungMap:
    """Lung labels on the scan grid and a signed distance (mm) to the pleura.

    The distance is measured to the lung's surface, which lies halfway between a lung voxel
    and its non-lung neighbour, not to the neighbour's centre: on 2.3 mm voxels the
    difference is over a millimetre, more than half the radius of a 4 mm nodule. ``sdf`` holds it
    on a grid strided to about 2 mm (positive inside the lungs, negative outside, near the
    surface); between its samples it is interpolated linearly, which is exact for a flat wall.
    """

    lungs: np.ndarray  # uint8 (z, y, x) on ``grid``
    grid: BodyGrid
    sdf: np.ndarray  # float32 on the strided grid below
    stride: tuple[int, int, int]

    @classmethod
    def build(cls, lungs: np.ndarray, grid: BodyGrid, target_mm: float = 2.0) -> LungMap:
        """Distance map on a grid strided to about ``target_mm`` (a full-size EDT is slow)."""
        sx, sy, sz = grid.spacing
        stride = tuple(max(1, round(target_mm / s)) for s in (sz, sy, sx))
        sub = lungs[:: stride[0], :: stride[1], :: stride[2]] > 0
        sampling = (sz * stride[0], sy * stride[1], sx * stride[2])
        half = 0.5 * float(np.mean(sampling))
        sdf = np.full(sub.shape, -1e3, dtype=np.float32)
        nz = np.argwhere(sub)
        if nz.shape[0]:
            # Only the lungs' bounding box (+2 voxels of background) needs the transforms.
            lo = np.maximum(nz.min(0) - 2, 0)
            hi = np.minimum(nz.max(0) + 3, np.array(sub.shape))
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            inside = ndimage.distance_transform_edt(sub[box], sampling=sampling)
            outside = ndimage.distance_transform_edt(~sub[box], sampling=sampling)
            # A voxel centre's distance to the nearest voxel across the surface, less half a
            # voxel: zero on the surface, halfway between the two centres.
            sdf[box] = np.where(sub[box], inside - half, half - outside)
        return cls(lungs=lungs, grid=grid, sdf=sdf, stride=stride)

    def __post_init__(self) -> None:
        # Lung voxels of the strided grid sorted by pleural distance: a distance band is then
        # a contiguous range, found by binary search instead of a full-volume scan per query.
        flat = np.flatnonzero(self.sdf.reshape(-1) > 0)
        order = np.argsort(self.sdf.reshape(-1)[flat], kind="stable")
        self._by_dist = flat[order]
        self._dist_sorted = self.sdf.reshape(-1)[self._by_dist]
        sx, sy, sz = self.grid.spacing
        step = np.array([sz, sy, sx]) * np.array(self.stride)
        # How far the surface distance can change within half a strided voxel.
        self._slack = 0.5 * float(np.linalg.norm(step))

    def _index(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.rint(self.grid.to_index(np.atleast_2d(pts))).astype(np.int64)
        ok = np.all((idx >= 0) & (idx < np.array(self.lungs.shape)), axis=1)
        return np.clip(idx, 0, np.array(self.lungs.shape) - 1), ok

    def label_at_point(self, p: np.ndarray) -> int:
        """Lung label at one body-frame point (a fast scalar path for tree growth)."""
        g = self.grid
        i = round(float((p[0] - g.xs[0]) / g.spacing[0]))
        j = round(float((p[1] - g.ys[0]) / g.spacing[1]))
        k = round(float((p[2] - g.zs[0]) / g.spacing[2]))
        nz, ny, nx = self.lungs.shape
        if 0 <= i < nx and 0 <= j < ny and 0 <= k < nz:
            return int(self.lungs[k, j, i])
        return 0

    def label_at(self, pts: np.ndarray) -> np.ndarray:
        """Lung label (0 outside) at body-frame points."""
        idx, ok = self._index(pts)
        return np.where(ok, self.lungs[idx[:, 0], idx[:, 1], idx[:, 2]], 0)

    def surface_distance(self, pts: np.ndarray) -> np.ndarray:
        """Signed distance (mm) from body-frame points to the lung surface (+ inside)."""
        idx = self.grid.to_index(np.atleast_2d(pts)) / np.array(self.stride)
        return ndimage.map_coordinates(self.sdf, idx.T, order=1, mode="nearest")

    def dist_at(self, pts: np.ndarray) -> np.ndarray:
        """Distance (mm) to the pleura at body-frame points (0 outside the lungs)."""
        d = np.maximum(self.surface_distance(pts), 0.0)
        return np.where(self.label_at(pts) > 0, d, 0.0)

    def random_points(self, rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
        """Up to ``n`` random lung points whose pleural distance is in ``[lo, hi]`` mm."""
        if n <= 0:
            return np.zeros((0, 3))
        # Voxels whose centre is within reach of the band, then points anywhere in them,
        # kept when their own (interpolated) distance is in the band.
        a = int(np.searchsorted(self._dist_sorted, lo - self._slack, side="left"))
        b = int(np.searchsorted(self._dist_sorted, hi + self._slack, side="right"))
        if b <= a:
            return np.zeros((0, 3))
        found: list[np.ndarray] = []
        count = 0
        for _ in range(12):
            flat = self._by_dist[a + rng.integers(b - a, size=4 * n)]
            pick = np.stack(np.unravel_index(flat, self.sdf.shape), axis=1)
            idx = (pick + rng.uniform(-0.5, 0.5, pick.shape)) * np.array(self.stride)
            pts = self.grid.to_body(idx)
            d = self.surface_distance(pts)
            pts = pts[(d >= lo) & (d <= hi) & (self.label_at(pts) > 0)]
            found.append(pts[: n - count])
            count += found[-1].shape[0]
            if count >= n:
                break
        return np.concatenate(found)


@dataclass
class TubeSamples:
    """Points along vessel or airway trees, with radius and direction, for queries."""

    pts: np.ndarray
    radius: np.ndarray
    direction: np.ndarray
    kind: np.ndarray  # 0 artery, 1 vein, 2 airway

    def __post_init__(self) -> None:
        self.kd = cKDTree(self.pts) if self.pts.shape[0] else None

    def clearance(
        self, pts: np.ndarray, min_radius: float = 0.0, reach: float = 25.0
    ) -> np.ndarray:
        """Distance from each point to the nearest tube *surface* (radius >= min_radius)."""
        out = np.full(pts.shape[0], np.inf)
        if self.kd is None:
            return out
        for i, nb in enumerate(self.kd.query_ball_point(pts, reach)):
            nb = np.asarray(nb, dtype=np.int64)
            nb = nb[self.radius[nb] >= min_radius]
            if nb.size:
                d = np.linalg.norm(self.pts[nb] - pts[i], axis=1) - self.radius[nb]
                out[i] = d.min()
        return out


@dataclass(frozen=True)
class KeepOut:
    """Balls that nothing new may be put on or near: a real scan's own findings.

    A synthetic nodule there would overlap a real one, and a class-0 candidate there would
    teach a real finding as a negative.

    Attributes:
        centres: ``(N, 3)`` body-frame mm.
        radii: ``(N,)`` mm.
        margin: clearance (mm) between a ball and anything new.
    """

    centres: np.ndarray
    radii: np.ndarray
    margin: float = 5.0

    def clear_of(self, point: np.ndarray, radius: float = 0.0) -> bool:
        """Whether a ball of ``radius`` at ``point`` keeps ``margin`` mm from every ball."""
        if len(self.radii) == 0:
            return True
        d = np.linalg.norm(np.asarray(self.centres) - point, axis=1)
        return bool(np.all(d >= np.asarray(self.radii) + radius + self.margin))


def plan_findings(
    rng: np.random.Generator,
    lung: LungMap,
    vessels: TubeSamples,
    airways: TubeSamples,
    n_nodules: int,
    n_excluded: int,
    keep_out: KeepOut | None = None,
) -> tuple[list[PlannedFinding], list[PlannedFinding]]:
    """Choose the nodules (for annotations.csv) and the excluded findings of one scan.

    Nodules are isolated (away from vessels > 1 mm and from the pleura), juxtavascular (touching
    a 1-4 mm vessel) or juxtapleural (centre 0.6-0.85 radii from the pleura, so the nodule abuts
    the chest wall). Excluded findings are micronodules < 3 mm, nodules 'one reader saw', and
    non-nodules (calcified granulomas, linear scars), as in LUNA16's annotations_excluded.csv.
    None of them is put within ``keep_out``'s margin of its balls.
    """
    lib = load_shape_library()
    placed: list[PlannedFinding] = []

    def far_from_others(c: np.ndarray, r: float) -> bool:
        if keep_out is not None and not keep_out.clear_of(c, r):
            return False
        return all(np.linalg.norm(c - p.centre) > r + 0.5 * p.diameter + 6.0 for p in placed)

    def place(d: float, location: str, extent: float | None = None) -> np.ndarray | None:
        """A centre for a finding of diameter ``d`` (``extent``: its full size, if larger)."""
        r = 0.5 * d
        r_out = 0.5 * max(d, extent or 0.0)
        for _ in range(60):
            c = _propose(rng, lung, vessels, location, r)
            if c is None or not far_from_others(c, r_out):
                continue
            if lung.label_at(c[None])[0] == 0:
                continue
            clear = airways.clearance(c[None], min_radius=0.8)[0]
            if clear < r + 1.0:
                continue
            if location == "isolated":
                if vessels.clearance(c[None], min_radius=1.0)[0] < r + 1.0:
                    continue
            return c
        return None

    nodules: list[PlannedFinding] = []
    for _ in range(n_nodules):
        d = sample_diameter(rng)
        location = str(
            rng.choice(["isolated", "juxtavascular", "juxtapleural"], p=[0.5, 0.25, 0.25])
        )
        c = place(d, location)
        if c is None and location != "isolated":
            location = "isolated"
            c = place(d, location)
        if c is None:
            continue
        cat = pick_category(rng)
        f = PlannedFinding(
            centre=c,
            diameter=d,
            category=cat,
            location=location,
            listed_diameter=d,
            shape=lib.pick(rng, category_code(cat), d),
            rotation=random_rotation(rng),
        )
        placed.append(f)
        nodules.append(f)

    excluded: list[PlannedFinding] = []
    for _ in range(n_excluded):
        kind = str(
            rng.choice(["small", "one reader", "calcified", "scar"], p=[0.45, 0.25, 0.15, 0.15])
        )
        if kind == "small":
            d = rng.uniform(1.6, 2.95)
            cat, reason = "solid", "< 3 mm"
            listed = round(d, 6) if rng.random() < 0.5 else -1.0
        elif kind == "one reader":
            d = min(sample_diameter(rng), 12.0)
            cat, reason, listed = pick_category(rng, "one reader"), "one reader", d
        elif kind == "calcified":
            d = rng.uniform(2.0, 5.0)
            cat, reason, listed = "calcified", "non-nodule", -1.0
        else:
            d = rng.uniform(8.0, 22.0)
            cat, reason, listed = "scar", "non-nodule", -1.0
        location = str(rng.choice(["isolated", "juxtavascular", "juxtapleural"], p=[0.6, 0.2, 0.2]))
        if cat == "scar":
            location = "juxtapleural"  # scars and atelectasis usually abut the pleura
        # A scar is placed by its thickness against the pleura but kept clear of other
        # findings by its full length.
        c = place(d if cat != "scar" else 6.0, location, extent=d)
        if c is None:
            c = place(d, "isolated")
        if c is None:
            continue
        use_shape = cat in ("solid", "part-solid", "ground-glass") and d >= 3.0
        f = PlannedFinding(
            centre=c,
            diameter=d,
            category=cat,
            location=location,
            table="excluded",
            reason=reason,
            listed_diameter=listed,
            shape=lib.pick(rng, category_code(cat), d) if use_shape else -1,
            rotation=random_rotation(rng),
        )
        placed.append(f)
        excluded.append(f)
    return nodules, excluded


def _propose(
    rng: np.random.Generator, lung: LungMap, vessels: TubeSamples, location: str, r: float
) -> np.ndarray | None:
    if location == "juxtapleural":
        lo = max(0.6 * r, 1.5)
        pts = lung.random_points(rng, 1, lo, max(0.85 * r, lo + 1.0))
        return pts[0] if pts.shape[0] else None
    if location == "juxtavascular":
        ok = np.flatnonzero((vessels.radius >= 1.0) & (vessels.radius <= 4.0))
        if ok.size == 0:
            return None
        i = ok[rng.integers(ok.size)]
        u = _perpendicular(rng, vessels.direction[i])
        c = vessels.pts[i] + u * (vessels.radius[i] + 0.8 * r)
        if lung.dist_at(c[None])[0] < r + 2.0:
            return None
        return c
    pts = lung.random_points(rng, 1, r + 4.0, 1e9)
    return pts[0] if pts.shape[0] else None


def _perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to ``d``."""
    v = rng.normal(size=3)
    v -= (v @ d) * d
    return v / max(np.linalg.norm(v), 1e-9)


# === Candidates ==================================================================================

CANDIDATE_SOURCES = (
    "vessel-branch",
    "vessel-end-on",
    "vessel-crossing",
    "airway-wall",
    "pleura",
    "parenchyma",
    "excluded-finding",
)


def plan_candidates(
    rng: np.random.Generator,
    lung: LungMap,
    vessels: TubeSamples,
    airways: TubeSamples,
    branch_points: np.ndarray,
    nodules: list[PlannedFinding],
    excluded: list[PlannedFinding],
    n_negative: int,
    keep_out: KeepOut | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Candidate positions (body mm), classes and sources for candidates.csv.

    Class 1: 1-4 per nodule, jittered within 0.5 radii of its centre. Class 0: real look-alikes
    -- vessel bifurcations, vessels running through the slice (round in axial view), vessels
    crossing each other, airway walls, the pleura, plain parenchyma and the excluded findings --
    never within a nodule's radius (+1 mm), nor within ``keep_out``'s margin of its balls.
    """
    pos, cls, src = [], [], []
    for f in nodules:
        k = int(min(4, 1 + rng.poisson(0.7)))
        for _ in range(k):
            u = rng.normal(size=3)
            u /= max(np.linalg.norm(u), 1e-9)
            pos.append(f.centre + u * rng.uniform(0, 0.5) * 0.5 * f.diameter)
            cls.append(1)
            src.append("nodule")

    weights = np.array([0.30, 0.18, 0.10, 0.10, 0.12, 0.12, 0.08])
    # Draw a third more than asked: some fall inside nodules or have no source (a scan without
    # artery-vein crossings); the surplus is dropped below so the count is what was asked.
    counts = rng.multinomial(int(1.35 * n_negative) + 5, weights / weights.sum())
    neg: list[tuple[np.ndarray, str]] = []

    in_lung_vessel = (
        np.flatnonzero(
            (vessels.kind < 2) & (vessels.radius >= 0.6) & (lung.label_at(vessels.pts) > 0)
        )
        if vessels.pts.shape[0]
        else np.zeros(0, dtype=np.int64)
    )

    # Bifurcations.
    bp = (
        branch_points[lung.label_at(branch_points) > 0] if branch_points.shape[0] else branch_points
    )
    if bp.shape[0]:
        pick = bp[rng.integers(bp.shape[0], size=counts[0])]
        neg += [(p + rng.normal(0, 0.6, 3), "vessel-branch") for p in pick]
    # Vessels running along z look like round blobs in axial slices.
    if in_lung_vessel.size:
        along_z = in_lung_vessel[np.abs(vessels.direction[in_lung_vessel, 2]) > 0.7]
        pool = along_z if along_z.size else in_lung_vessel
        for i in pool[rng.integers(pool.size, size=counts[1])]:
            neg.append((vessels.pts[i] + rng.normal(0, 0.4, 3), "vessel-end-on"))
        # Crossings: an artery passing close to a vein.
        art = in_lung_vessel[vessels.kind[in_lung_vessel] == 0]
        vei = in_lung_vessel[vessels.kind[in_lung_vessel] == 1]
        if art.size and vei.size:
            kd = cKDTree(vessels.pts[vei])
            d, j = kd.query(vessels.pts[art], distance_upper_bound=6.0)
            close = np.flatnonzero(
                np.isfinite(d)
                & (d < vessels.radius[art] + 2.5 + vessels.radius[vei[np.minimum(j, vei.size - 1)]])
            )
            if close.size:
                for c in close[rng.integers(close.size, size=counts[2])]:
                    mid = 0.5 * (vessels.pts[art[c]] + vessels.pts[vei[j[c]]])
                    neg.append((mid, "vessel-crossing"))
    # Airway walls.
    aw = (
        np.flatnonzero((airways.radius >= 0.8) & (lung.label_at(airways.pts) > 0))
        if airways.pts.shape[0]
        else np.zeros(0, np.int64)
    )
    if aw.size:
        for i in aw[rng.integers(aw.size, size=counts[3])]:
            u = _perpendicular(rng, airways.direction[i])
            wall = 0.2 * airways.radius[i] + 0.4
            neg.append((airways.pts[i] + u * (airways.radius[i] + 0.5 * wall), "airway-wall"))
    # Pleura and parenchyma.
    for p in lung.random_points(rng, counts[4], 0.3, 3.5):
        neg.append((p, "pleura"))
    for p in lung.random_points(rng, counts[5], 3.0, 1e9):
        neg.append((p, "parenchyma"))
    # Findings that do not count (LUNA16 lists candidates on them as class 0).
    if excluded:
        for _ in range(counts[6]):
            f = excluded[rng.integers(len(excluded))]
            neg.append(
                (f.centre + rng.normal(0, 0.3 * max(f.diameter, 1.0), 3) * 0.3, "excluded-finding")
            )

    kept = [
        (p, s)
        for p, s in neg
        if all(np.linalg.norm(p - f.centre) >= 0.5 * f.diameter + 1.0 for f in nodules)
        and (keep_out is None or keep_out.clear_of(p))
    ]
    for i in np.sort(rng.permutation(len(kept))[:n_negative]):
        pos.append(kept[i][0])
        cls.append(0)
        src.append(kept[i][1])
    if not pos:
        return np.zeros((0, 3)), np.zeros(0, dtype=np.int64), []
    order = rng.permutation(len(pos))
    return (
        np.asarray(pos)[order],
        np.asarray(cls, dtype=np.int64)[order],
        [src[i] for i in order],
    )
