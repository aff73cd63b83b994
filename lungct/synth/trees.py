"""Space-filling branching trees for pulmonary arteries, veins and airways.

The growth rule is the volume-filling algorithm used for lung airway and vessel models (Tawhai
et al., Ann Biomed Eng 28:793, 2000): a branch owns a cloud of points spread through its part of
the lung, grows a fraction of the way towards the cloud's centroid, then splits the cloud by a
plane through the centroid, and each half grows a child. The result fills the lung, branches
densely near the hilum and thins towards the pleura. Radii follow Murray's law with flow taken
proportional to the territory (number of points), ``r_child = r_parent * (n_child/n)^(1/3)``,
so vessels taper from ~6 mm at the hilum to sub-millimetre at the periphery.
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
    """
    p0s, p1s, r0s, r1s, parents, nchild = [], [], [], [], [], []
    n_total = points.shape[0]
    centroid = points.mean(axis=0)
    d0 = centroid - root
    d0 /= max(np.linalg.norm(d0), 1e-9)
    # Work list of (start point, parent direction, point indices, radius, parent id).
    stack = [(np.asarray(root, dtype=np.float64), d0, np.arange(n_total), root_radius, -1)]
    while stack:
        start, pdir, idx, radius, parent = stack.pop()
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
            direction = (1 - max_turn) * direction + max_turn * pdir
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
        r1s.append(radius * 0.97)
        parents.append(parent)
        nchild.append(0)
        if parent >= 0:
            nchild[parent] += 1
        if terminal:
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
        left = idx[proj < 0]
        right = idx[proj >= 0]
        if left.size == 0 or right.size == 0:
            continue
        r_end = radius * 0.97
        for part in (left, right):
            r_child = r_end * (part.size / idx.size) ** (1 / murray)
            stack.append((end, direction, part, r_child, sid))
    return Tree(
        p0=np.asarray(p0s),
        p1=np.asarray(p1s),
        r0=np.asarray(r0s),
        r1=np.asarray(r1s),
        parent=np.asarray(parents, dtype=np.int64),
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
