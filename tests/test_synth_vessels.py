"""The synthetic vessel trees have no blunt ends: thick vessels continue, branch or join the
mediastinum (a thick vessel ending in a rounded stump looks like a nodule to a detector)."""

from __future__ import annotations

import numpy as np
import pytest

from lungct.synth import case as synth_case
from lungct.synth.anatomy import Anatomy
from lungct.synth.placement import LungMap
from lungct.synth.render import BodyGrid, render_anatomy, tube_kind
from lungct.synth.trees import Tree

THICK = 1.0
"""Radius (mm) above which a vessel may not end: thinner ones fade out in partial volume."""


def _small_case(seed: int) -> tuple[Anatomy, BodyGrid, np.ndarray, np.ndarray, LungMap, list]:
    """A small case's anatomy, grid, HU and lungs before the trees, lung map and rngs."""
    r_anat, r_acq, r_tree, r_tex, *_ = synth_case.case_rngs(seed, 0, "small")
    fov = synth_case.sample_field_of_view(r_acq, "small")
    an = synth_case.sample_anatomy(r_anat, "small", fov)
    acq = synth_case.sample_acquisition(r_acq, "small", 0, an.height, fov)
    start = np.asarray(acq.origin) - np.asarray(acq.body_centre_world)
    grid = BodyGrid.regular(start, acq.spacing, (acq.n_z, acq.n_xy, acq.n_xy))
    vol = render_anatomy(an, grid, r_tex)
    return an, grid, vol.hu, vol.lungs, LungMap.build(vol.lungs, grid), [r_tree]


@pytest.fixture(scope="module")
def cases() -> dict[str, tuple]:
    """Trees of two small cases, grown with the small and with the full-size settings (full-size
    trees on a small case's ~2 mm lung map: the same growth, without a 512^2 render)."""
    out = {}
    for seed, size in ((3, "small"), (5, "full")):
        an, grid, hu, lungs, lung, (r_tree,) = _small_case(seed)
        trees = synth_case._grow_trees(r_tree, an, lung, size == "small")
        out[size] = (an, grid, hu, lungs, trees)
    return out


def _segment_distance(q: np.ndarray, p0: np.ndarray, p1: np.ndarray):
    d = p1 - p0
    t = np.clip(((q - p0) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-12), 0.0, 1.0)
    return np.linalg.norm(q - (p0 + t[:, None] * d), axis=-1), t


def _blind_ends(tree: Tree) -> np.ndarray:
    """Segments thicker than ``THICK`` at their end whose rounded tip no child covers: a
    terminal thick segment, or one whose continuation doubles back (a stump beside the turn)."""
    tip = tree.p1 + tree.r1[:, None] * tree.direction()
    child = np.flatnonzero(tree.parent >= 0)
    par = tree.parent[child]
    dist, t = _segment_distance(tip[par], tree.p0[child], tree.p1[child])
    radius = tree.r0[child] + t * (tree.r1[child] - tree.r0[child])
    covered = np.zeros(len(tree), dtype=bool)
    np.logical_or.at(covered, par, dist < radius)
    return np.flatnonzero((tree.r1 > THICK) & ~covered)


@pytest.mark.parametrize("size", ["small", "full"])
def test_no_thick_vessel_ends_bluntly(cases, size):
    _, _, _, _, trees = cases[size]
    for tree in trees:
        if tree.kind == "airway":
            continue
        tips = tree.n_children == 0
        assert tips.any()
        assert tree.r1[tips].max() <= THICK, tree.kind
        blind = _blind_ends(tree)
        assert blind.size == 0, (tree.kind, blind[:5], tree.r1[blind[:5]])


@pytest.mark.parametrize("size", ["small", "full"])
def test_thick_vessel_roots_start_in_the_mediastinal_vessels(cases, size):
    an, _, _, _, trees = cases[size]
    tubes = [t for t in an.tubes if tube_kind(t) == "blood"]
    for tree in trees:
        if tree.kind == "airway":
            continue
        for root in np.flatnonzero(tree.parent < 0):
            p = tree.p0[root]
            inside = [
                (_segment_distance(p[None], t.points[:-1], t.points[1:])[0] < t.radii[1:]).any()
                for t in tubes
            ]
            assert any(inside), (tree.kind, p)


def test_thick_vessels_run_through_the_fissure_band(cases):
    """The fissures' vessel-free band takes only vessels below CT resolution: a thick vessel
    erased there would end in a blunt stump on either side."""
    an, grid, hu, lungs, trees = cases["small"]
    keep = np.concatenate(
        [
            synth_case._fissure_maps(an, grid, lungs, k0, min(k0 + 32, hu.shape[0]))[1]
            for k0 in range(0, hu.shape[0], 32)
        ]
    )
    drawn = hu.copy()
    synth_case._draw_trees(drawn, grid, trees, True, an, lungs)
    shape = np.asarray(hu.shape)
    checked = 0
    for tree in trees:
        if tree.kind == "airway":
            continue
        pts, rad, _, _ = tree.samples(step=0.5)
        idx = np.rint(grid.to_index(pts)).astype(int)
        ok = np.all((idx >= 0) & (idx < shape), axis=1) & (rad >= 2.0)
        idx = idx[ok]
        at = tuple(idx.T)
        band = (keep[at] < 0.5) & (lungs[at] > 0)
        checked += int(band.sum())
        # Blood over lung: well above the parenchyma wherever a thick vessel's axis runs.
        assert np.all(drawn[at][band] > -400.0), tree.kind
    assert checked > 0  # the case has thick vessels crossing a fissure band
