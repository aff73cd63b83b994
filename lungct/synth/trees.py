"""Space-filling branching trees for pulmonary arteries, veins and airways.

The growth rule is the volume-filling algorithm used for lung airway and vessel models (Tawhai
et al., Ann Biomed Eng 28:793, 2000): a branch owns a cloud of points spread through its part of
the lung, grows a fraction of the way towards the cloud's centroid, then splits the cloud by a
plane through the centroid, and each half grows a child. The result fills the lung, branches
densely near the hilum and thins towards the pleura. Radii follow Murray's law with flow taken
proportional to the territory (number of points), ``r_child = r_parent * (n_child/n)^(1/3)``,
so vessels taper from ~5-6 mm radius at the hilum to sub-millimetre at the periphery; within a
segment the radius falls linearly to its thicker daughter's, so stems narrow smoothly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tree:
    """Segments of one tree (arrays of length n, body-frame mm).

    Attributes:
        p0, p1: ``(n, 3)`` segment start and end points.
        r0, r1: radius at start and end.
        parent: index of the parent segment (-1 for the root).
        n_children: number of child segments (2 at a branch point, 0 at a tip).
        kind: 'artery', 'vein' or 'airway'.
    """

    p0: np.ndarray
    p1: np.ndarray
    r0: np.ndarray
    r1: np.ndarray
    parent: np.ndarray
    n_children: np.ndarray
    kind: str

    def __len__(self) -> int:
        return int(self.p0.shape[0])

    def direction(self) -> np.ndarray:
        """Unit direction of every segment, ``(n, 3)``."""
        d = self.p1 - self.p0
        return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-9)

    def branch_points(self, min_radius: float = 0.0) -> np.ndarray:
        """End points where a segment splits (``(m, 3)``), for segments at least that thick."""
        sel = (self.n_children >= 2) & (self.r1 >= min_radius)
        return self.p1[sel]

    def samples(self, step: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Points along every segment: (points (m, 3), radius, direction (m, 3), segment id)."""
        length = np.linalg.norm(self.p1 - self.p0, axis=1)
        n = np.maximum(1, np.ceil(length / step).astype(int))
        seg = np.repeat(np.arange(len(self)), n)
        first = np.cumsum(n) - n
        t = (np.arange(seg.size) - first[seg] + 0.5) / n[seg]
        pts = self.p0[seg] + t[:, None] * (self.p1[seg] - self.p0[seg])
        rad = self.r0[seg] + t * (self.r1[seg] - self.r0[seg])
        return pts, rad, self.direction()[seg], seg


def grow_tree(
    rng: np.random.Generator,
    points: np.ndarray,
    root: np.ndarray,
    root_radius: float,
    kind: str,
    inside: Callable[[np.ndarray], bool] | None = None,
    min_radius: float = 0.3,
    fraction: float = 0.4,
    max_turn: float = 0.55,
    murray: float = 2.7,
    asymmetry: float = 0.0,
    major_turn: float | None = None,
    tip_taper: float = 0.97,
    groups: np.ndarray | None = None,
) -> Tree:
    """Grow one tree from ``root`` into the point cloud ``points`` (``(n, 3)`` body mm).

    Args:
        rng: randomness for the small jitter of split planes and lengths.
        points: attractor points sampled uniformly inside the territory (one lung).
        root: start of the tree (the hilum), body-frame mm.
        root_radius: radius of the first segment (mm).
        kind: a label stored with the tree.
        inside: optional test ``point (3,) -> bool`` keeping segment ends inside the lung.
        min_radius: branches thinner than this are not grown further.
        fraction: how far towards its territory's centroid a branch grows.
        max_turn: weight of the parent's direction in a child's (limits branching angles).
        murray: exponent of Murray's law ``r^k = r1^k + r2^k`` (3 ideal; ~2.7 measured in
            pulmonary vessels, which also keeps peripheral vessels thin).
        asymmetry: 0 splits every territory in halves (dichotomous branching); up to 0.4
            splits it unevenly (the minor side gets a fraction in ``[0.5 - asymmetry, 0.5]``),
            so a thick major daughter runs on while thinner side branches leave it, as in
            real bronchial and vascular trees.
        major_turn: ``max_turn`` of the major daughter (default ``max_turn``): larger keeps
            the main stem straighter.
        tip_taper: end radius / start radius of terminal segments (< 1 lets the last
            branches fade out in partial volume instead of ending as blunt stubs).
        groups: optional non-negative integer label per point (the lobe): a territory with
            several labels is split between them before any plane split, so every branch
            stays within one lobe and the fissures stay free of vessels.
    """
    p0s, p1s, r0s, r1s, parents, nchild = [], [], [], [], [], []
    n_total = points.shape[0]
    centroid = points.mean(axis=0)
    d0 = centroid - root
    d0 /= max(np.linalg.norm(d0), 1e-9)
    # Work list of (start point, parent direction, point indices, radius, parent id).
    turn_major = max_turn if major_turn is None else major_turn
    stack = [
        (np.asarray(root, dtype=np.float64), d0, np.arange(n_total), root_radius, -1, max_turn)
    ]
    while stack:
        start, pdir, idx, radius, parent, turn = stack.pop()
        pts = points[idx]
        c = pts.mean(axis=0)
        to_c = c - start
        dist = float(np.linalg.norm(to_c))
        terminal = idx.size <= 1 or radius < min_radius
        if dist < 1e-6:
            direction = pdir
        else:
            direction = to_c / dist
            # A child leaves its parent at a bounded angle, as in real bifurcations.
            direction = (1 - turn) * direction + turn * pdir
            direction /= max(np.linalg.norm(direction), 1e-9)
        frac = 0.9 if terminal else fraction * rng.uniform(0.8, 1.2)
        length = max(frac * dist, 2.2 * radius, 1.0)
        end = start + length * direction
        if inside is not None:
            for _ in range(3):  # shorten a branch that would leave the lung
                if inside(end):
                    break
                length *= 0.5
                end = start + length * direction
        sid = len(p0s)
        p0s.append(start)
        p1s.append(end)
        r0s.append(radius)
        r1s.append(radius * (tip_taper if terminal else 0.97))
        parents.append(parent)
        nchild.append(0)
        if parent >= 0:
            nchild[parent] += 1
        if terminal:
            continue
        if groups is not None:
            g = groups[idx]
            if g.min() != g.max():
                # A territory spanning several lobes first splits along a fissure: one lobe
                # against the rest, so no branch crosses from one lobe into another.
                first = g == np.bincount(g).argmax()
                left, right = idx[first], idx[~first]
                r_end = radius * 0.97
                for part in (left, right):
                    r_child = r_end * (part.size / idx.size) ** (1 / murray)
                    t = turn_major if 2 * part.size > idx.size else max_turn
                    stack.append((end, direction, part, r_child, sid, t))
                continue
        # Split plane through the centroid, normal to the cloud's widest spread across the
        # branch (so the two halves sit side by side, not one behind the other).
        rel = pts - c
        rel_perp = rel - np.outer(rel @ direction, direction)
        cov = rel_perp.T @ rel_perp
        _, vecs = np.linalg.eigh(cov)
        normal = vecs[:, -1]
        normal = normal + rng.normal(0, 0.15, 3)
        proj = rel @ normal
        cut = 0.0
        if asymmetry > 0 and idx.size > 3:
            cut = float(np.quantile(proj, rng.uniform(0.5 - asymmetry, 0.5)))
        left = idx[proj < cut]
        right = idx[proj >= cut]
        if left.size == 0 or right.size == 0:
            r1s[sid] = radius * tip_taper  # no children after all: a tip, so it tapers
            continue
        r_end = radius * 0.97
        for part in (left, right):
            r_child = r_end * (part.size / idx.size) ** (1 / murray)
            t = turn_major if 2 * part.size > idx.size else max_turn
            stack.append((end, direction, part, r_child, sid, t))
    parent_arr = np.asarray(parents, dtype=np.int64)
    r0_arr = np.asarray(r0s)
    r1_arr = np.asarray(r1s)
    # Smooth taper: a segment ends at the calibre of its thicker daughter, so a stem narrows
    # steadily from branch to branch instead of stepping down at each bifurcation.
    child = np.flatnonzero(parent_arr >= 0)
    if child.size:
        end_r = np.zeros_like(r1_arr)
        np.maximum.at(end_r, parent_arr[child], r0_arr[child])
        has = end_r > 0
        r1_arr[has] = end_r[has]
    return Tree(
        p0=np.asarray(p0s),
        p1=np.asarray(p1s),
        r0=r0_arr,
        r1=r1_arr,
        parent=parent_arr,
        n_children=np.asarray(nchild, dtype=np.int64),
        kind=kind,
    )


def sample_points_in(
    rng: np.random.Generator, mask: np.ndarray, grid_to_body: Callable, n: int
) -> np.ndarray:
    """``n`` points uniformly inside a boolean ``(z, y, x)`` mask, as body-frame mm."""
    vox = np.argwhere(mask)
    if vox.shape[0] == 0:
        return np.zeros((0, 3))
    pick = vox[rng.integers(vox.shape[0], size=n)] + rng.uniform(-0.5, 0.5, (n, 3))
    return grid_to_body(pick)


# === Post-processing of grown trees: curvature, bundles, subsets =================================


def _rebuild(tree: Tree, p0, p1, r0, r1, parent, kind: str | None = None) -> Tree:
    parent = np.asarray(parent, dtype=np.int64)
    n_children = np.bincount(parent[parent >= 0], minlength=parent.size).astype(np.int64)
    return Tree(
        p0=np.asarray(p0, dtype=np.float64),
        p1=np.asarray(p1, dtype=np.float64),
        r0=np.asarray(r0, dtype=np.float64),
        r1=np.asarray(r1, dtype=np.float64),
        parent=parent,
        n_children=n_children,
        kind=kind or tree.kind,
    )


def _random_perpendicular(rng: np.random.Generator, d: np.ndarray) -> np.ndarray:
    """A random unit vector perpendicular to each row of the unit vectors ``d`` (n, 3)."""
    v = rng.normal(size=d.shape)
    v -= (v * d).sum(1, keepdims=True) * d
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)


def curve_tree(
    tree: Tree,
    rng: np.random.Generator,
    piece: float = 3.0,
    bend: float = 0.05,
    wiggle: float = 0.02,
    max_pieces: int = 16,
) -> Tree:
    """Bend every straight segment into a smooth curve of short pieces (ends kept).

    A segment of length ``L`` becomes ``ceil(L / piece)`` pieces along
    ``p(t) = p0 + t (p1 - p0) + L (a sin(pi t) u + b sin(2 pi t) w)``, with ``u, w``
    perpendicular to it and ``a ~ N(0, bend)``, ``b ~ N(0, wiggle)``: a gentle bow plus an
    S-shaped wiggle, so vessels meander like real ones while every branch point stays put
    (children still start where their parent ends).
    """
    n = len(tree)
    if n == 0:
        return tree
    d = tree.p1 - tree.p0
    length = np.linalg.norm(d, axis=1)
    unit = d / np.maximum(length, 1e-9)[:, None]
    m = np.clip(np.ceil(length / piece).astype(np.int64), 1, max_pieces)
    u = _random_perpendicular(rng, unit)
    w = np.cross(unit, u)
    a = rng.normal(0.0, bend, n) * length
    b = rng.normal(0.0, wiggle, n) * length
    seg = np.repeat(np.arange(n), m)
    first = np.cumsum(m) - m
    k = np.arange(seg.size) - first[seg]

    def at(t: np.ndarray) -> np.ndarray:
        off = (a[seg] * np.sin(np.pi * t))[:, None] * u[seg]
        off += (b[seg] * np.sin(2 * np.pi * t))[:, None] * w[seg]
        return tree.p0[seg] + t[:, None] * d[seg] + off

    t0 = k / m[seg]
    t1 = (k + 1) / m[seg]
    dr = tree.r1 - tree.r0
    last = first + m - 1
    parent = np.where(k > 0, np.arange(seg.size) - 1, -1)
    root_piece = (k == 0) & (tree.parent[seg] >= 0)
    parent[root_piece] = last[tree.parent[seg[root_piece]]]
    return _rebuild(
        tree,
        at(t0),
        at(t1),
        tree.r0[seg] + t0 * dr[seg],
        tree.r0[seg] + t1 * dr[seg],
        parent,
    )


def depth_levels(parent: np.ndarray) -> list[np.ndarray]:
    """Segment ids grouped by depth (root = 0); needs parents listed before children."""
    depth = np.zeros(parent.size, dtype=np.int64)
    par = parent.tolist()
    dl = depth.tolist()
    for i, p in enumerate(par):
        if p >= 0:
            dl[i] = dl[p] + 1
    depth = np.asarray(dl, dtype=np.int64)
    order = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[order], np.arange(depth.max() + 2))
    return [order[bounds[i] : bounds[i + 1]] for i in range(depth.max() + 1)]


def companion_tree(
    tree: Tree,
    rng: np.random.Generator,
    gap: Callable[[np.ndarray], np.ndarray],
    kind: str,
    radius_scale: float = 1.0,
    root_start: np.ndarray | None = None,
    max_drift: float = 0.5,
) -> Tree:
    """A tree running beside ``tree`` (e.g. a pulmonary artery beside its bronchus).

    Every node is moved sideways by ``gap(radius)`` mm along a unit vector perpendicular to the
    local segment, carried down the tree (each child takes its parent's side vector, made
    perpendicular to itself), so the companion stays on one side of the path, as arteries
    hug their bronchi.

    The sideways offset changes by at most ``max_drift`` mm per mm of path, so where the path
    turns towards the companion's side, or the gap narrows faster than the path runs, the
    companion converges on its place over a few millimetres instead of doubling back (a
    thick vessel that doubles back leaves a blind, rounded stump beside its bronchus).

    Args:
        root_start: where the companion's root(s) start (e.g. the end of a mediastinal
            vessel); their side is then the one facing that point, and the companion runs
            from it towards its place beside the path. Default: ``gap`` beside the root.
        max_drift: the largest change of the offset per unit length of the path.
    """
    n = len(tree)
    if n == 0:
        return tree
    unit = tree.direction()
    length = np.linalg.norm(tree.p1 - tree.p0, axis=1)
    r0 = tree.r0 * radius_scale
    r1 = tree.r1 * radius_scale
    g1 = gap(r1)
    side = np.zeros((n, 3))
    offset = np.zeros((n, 3))  # sideways offset of each segment's end
    for ids in depth_levels(tree.parent):
        par = tree.parent[ids]
        has = par >= 0
        v = np.where(has[:, None], side[np.maximum(par, 0)], 0.0)
        fresh = ~has
        if fresh.any():
            v[fresh] = rng.normal(size=(int(fresh.sum()), 3))
            if root_start is not None:
                v[fresh] = np.asarray(root_start, dtype=np.float64) - tree.p0[ids[fresh]]
        v = v - (v * unit[ids]).sum(1, keepdims=True) * unit[ids]
        norm = np.linalg.norm(v, axis=1, keepdims=True)
        bad = norm[:, 0] < 1e-6
        if bad.any():
            v[bad] = _random_perpendicular(rng, unit[ids][bad])
            norm[bad] = 1.0
        side[ids] = v / np.maximum(norm, 1e-9)
        # Offset at the segment's start: its parent's end offset, or the root's.
        o_start = offset[np.maximum(par, 0)]
        if fresh.any():
            if root_start is not None:
                o_start[fresh] = np.asarray(root_start, dtype=np.float64) - tree.p0[ids[fresh]]
            else:
                o_start[fresh] = gap(r0[ids[fresh]])[:, None] * side[ids[fresh]]
        step = g1[ids][:, None] * side[ids] - o_start
        size = np.linalg.norm(step, axis=1)
        limit = max_drift * length[ids]
        scale = np.where(size > limit, limit / np.maximum(size, 1e-12), 1.0)
        offset[ids] = o_start + scale[:, None] * step
    end = tree.p1 + offset
    roots = tree.parent < 0
    if root_start is not None:
        first = np.broadcast_to(np.asarray(root_start, dtype=np.float64), tree.p0.shape)
    else:
        first = tree.p0 + gap(r0)[:, None] * side
    start = np.where(roots[:, None], first, end[np.maximum(tree.parent, 0)])
    return _rebuild(tree, start, end, r0, r1, tree.parent, kind=kind)


def subtree(tree: Tree, keep: np.ndarray, kind: str, radius_scale: float = 1.0) -> Tree:
    """The segments selected by ``keep`` (closed under parents), re-indexed, radii scaled."""
    keep = np.asarray(keep, dtype=bool)
    ids = np.flatnonzero(keep)
    new = np.full(len(tree), -1, dtype=np.int64)
    new[ids] = np.arange(ids.size)
    par = tree.parent[ids]
    parent = np.where(par >= 0, new[np.maximum(par, 0)], -1)
    return _rebuild(
        tree,
        tree.p0[ids],
        tree.p1[ids],
        tree.r0[ids] * radius_scale,
        tree.r1[ids] * radius_scale,
        parent,
        kind=kind,
    )
