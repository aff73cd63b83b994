"""One synthetic chest CT with its ground truth: :func:`synthesize_scan`.

Order of work (why it matters): anatomy -> vessel and airway trees -> nodules and other findings
-> CT blur (Gaussian PSF) -> correlated noise -> quantisation, so nodules get the same blur and
noise as everything around them. The volume is composed on a canonical identity-direction grid
and only then stored with its (possibly flipped) direction; every world coordinate in the ground
truth comes from the *final* geometry's ``voxel_to_world``, so flipped scans stay correct.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from lungct.geometry import Geometry
from lungct.scan import Scan
from lungct.synth.anatomy import TISSUE_HU, Anatomy, sample_anatomy
from lungct.synth.nodules import PlannedFinding, draw_reader_count, render_finding
from lungct.synth.placement import LungMap, TubeSamples, plan_candidates, plan_findings
from lungct.synth.render import BodyGrid, render_anatomy, splat_tubes
from lungct.synth.trees import (
    Tree,
    companion_tree,
    curve_tree,
    grow_tree,
    sample_points_in,
    subtree,
)

SIZES = ("small", "full")
UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1.6279.6001."
"""The LIDC-IDRI / LUNA16 series UID root; synthetic suffixes are hashed from (seed, index)."""
GENERATOR_VERSION = "8"
"""Bump when the output for a given seed changes, so resumed runs do not mix versions.
5: full-size spacing, slice spacing and z extent follow LUNA16's measured spread.
6: each nodule takes the outline (and ratings) of a LIDC nodule of about its own size.
7: denser, smoothly tapering lobe-bounded vessel trees, fissures, a less regular body outline,
a curving trachea, scars kept clear of other findings by their full length.
8: no blunt stumps on thick vessels: each pulmonary artery leaves the end of its mediastinal
artery and joins its bronchus gradually (no hairpin turns), and vessels of 2 mm calibre and up
run through the fissures' vessel-free band instead of being cut off there."""

DIRECTIONS = {
    "identity": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    "flip_z": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "flip_xy": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
}


@dataclass(frozen=True)
class Finding:
    """A ground-truth finding in world coordinates.

    Attributes:
        world: ``(x, y, z)`` mm (LPS, as in LUNA16 CSVs).
        diameter_mm: equivalent-sphere diameter of the drawn finding (mm).
        listed_diameter_mm: what the CSV says (= diameter_mm for annotations; may be -1 for
            excluded findings, "unknown", like LUNA16).
        category: 'solid', 'part-solid', 'ground-glass', 'calcified' or 'scar'.
        location: 'isolated', 'juxtavascular' or 'juxtapleural'.
        reason: for excluded findings: '< 3 mm', 'one reader' or 'non-nodule'.
        voxel_zyx: continuous voxel index in the stored array.
        readers: how many of LIDC's four readers "marked" it (3-4 for annotations, 1-2 for
            'one reader' findings, drawn like LIDC's; 0 = unknown: micronodules, non-nodules,
            a real background's own findings).
        shape: index of the LIDC outline in the shape library it was drawn from (its reader's
            ratings are the nodule's); -1 for analytic shapes and real findings.
    """

    world: tuple[float, float, float]
    diameter_mm: float
    listed_diameter_mm: float
    category: str
    location: str
    reason: str
    voxel_zyx: tuple[float, float, float]
    readers: int = 0
    shape: int = -1

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {
            "world": list(self.world),
            "diameter_mm": self.diameter_mm,
            "listed_diameter_mm": self.listed_diameter_mm,
            "category": self.category,
            "location": self.location,
            "reason": self.reason,
            "voxel_zyx": list(self.voxel_zyx),
            "readers": self.readers,
            "shape": self.shape,
        }


@dataclass(frozen=True)
class Candidate:
    """A candidate location for candidates.csv: world ``(x, y, z)`` mm, class, what it sits on."""

    world: tuple[float, float, float]
    label: int
    source: str


@dataclass
class SyntheticCase:
    """One synthetic scan and everything known about it.

    Attributes:
        scan: the CT (int16 HU, stored orientation and geometry).
        nodules: annotations.csv rows (diameter >= 3 mm).
        excluded: annotations_excluded.csv rows.
        candidates: candidates.csv rows.
        lung_mask: uint8 ``(z, y, x)`` aligned with ``scan.array``: 0 outside, 1 lung.
        seed, index, size: what made it.
        info: acquisition details (direction name, noise level, ...), JSON-friendly.
    """

    scan: Scan
    nodules: list[Finding]
    excluded: list[Finding]
    candidates: list[Candidate]
    lung_mask: np.ndarray
    seed: int
    index: int
    size: str
    info: dict = field(default_factory=dict)

    @property
    def seriesuid(self) -> str:
        """The scan's series UID (also its file stem)."""
        return self.scan.seriesuid

    def nodule_dicts(self) -> list[dict]:
        """The nodules as plain dicts (world mm, diameter, category, location)."""
        return [n.to_dict() for n in self.nodules]


def series_uid(seed: int, index: int, tag: str = "") -> str:
    """A DICOM-style UID under the LIDC root, unique per (seed, index, tag), 64 characters."""
    h = hashlib.sha256(f"lungct-synth:{tag}:{seed}:{index}".encode()).hexdigest()
    digits = str(int(h, 16))[:30]
    return UID_PREFIX + ("1" + digits[1:] if digits[0] == "0" else digits)


def case_rngs(
    seed: int, index: int, size: str, n: int = 8, tag: int = 0
) -> list[np.random.Generator]:
    """Independent generators for the parts of one scan, from (seed, index) only.

    Scans never share a stream, so any subset can be made in any order or process.
    """
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(index), SIZES.index(size), tag])
    return [np.random.default_rng(s) for s in ss.spawn(n)]


READER_STREAM = 7
"""Entropy word of the reader-count stream (:func:`reader_rng`)."""


def reader_rng(seed: int, index: int, size: str, tag: int = 0) -> np.random.Generator:
    """The generator the findings' reader counts are drawn from.

    A stream of its own, apart from :func:`case_rngs`: drawing the counts changes no voxel and
    no other table value of a scan made before the counts existed.
    """
    return np.random.default_rng(
        [int(seed) & 0xFFFFFFFF, int(index), SIZES.index(size), tag, READER_STREAM]
    )


# LUNA16's acquisitions, measured on its 888 scans by scripts/luna16_acquisition_mix.py (the
# LIDC-IDRI database: pixel spacing from `scans`, slice spacing and z extent from the slice
# positions in `zvals`). Full-size scans draw from them; tests re-measure and compare.
LUNA16_QUANTILE_LEVELS = tuple(round(0.05 * k, 2) for k in range(21))
LUNA16_PIXEL_SPACING_QUANTILES = (
    0.460938, 0.556641, 0.585938, 0.60166, 0.619922, 0.625, 0.644531, 0.662109, 0.664062,
    0.679981, 0.703125, 0.703125, 0.703125, 0.703125, 0.722656, 0.742188, 0.754297, 0.78125,
    0.78125, 0.832617, 0.976562,
)  # fmt: skip
"""In-plane pixel spacing (mm) at the quantile levels 0, 0.05, ..., 1."""
LUNA16_SLICE_SPACING_SCANS = {
    0.45: 2, 0.5: 9, 0.625: 128, 0.7: 30, 0.75: 5, 1.0: 108, 1.25: 220, 1.8: 67, 2.0: 35, 2.5: 284,
}  # fmt: skip
"""Number of LUNA16 scans with each slice spacing (mm): the step between slice positions."""
LUNA16_Z_EXTENT_QUANTILES = (
    165.0, 260.0, 274.0, 282.57, 290.0, 296.25, 299.0, 302.5, 306.2, 311.25, 315.0, 320.0,
    324.0, 329.55, 330.0, 333.75, 340.0, 345.98, 355.0, 367.0, 415.0,
)  # fmt: skip
"""First to last slice centre (mm) at the quantile levels 0, 0.05, ..., 1."""
MAX_SLICES_FULL = 700
"""Cap on a full-size scan's slices (LUNA16: 95-764), so memory stays under ~4 GB; only the
rare 0.45-0.5 mm scans with a long z extent reach it, and still cover the lungs."""
MIN_LUNG_MARGIN_MM = 8.0
"""Full-size scans extend at least this far above the lung apex and below the lung bases."""


@dataclass(frozen=True)
class Acquisition:
    """Scanner-side choices for one scan."""

    fov: float
    n_xy: int
    spacing: tuple[float, float, float]
    n_z: int
    margin_bottom: float
    origin: tuple[float, float, float]  # canonical (identity) grid origin, world mm
    body_centre_world: tuple[float, float, float]  # body-frame origin in world mm
    direction: str
    psf_mm: float
    noise_hu: float
    padding: int | None  # value outside the reconstruction circle, or None


def _draw_quantiles(rng: np.random.Generator, quantiles: tuple[float, ...]) -> float:
    """One draw from a distribution given by its quantiles at ``LUNA16_QUANTILE_LEVELS``
    (inverse CDF, linear between the levels)."""
    return float(np.interp(rng.random(), LUNA16_QUANTILE_LEVELS, quantiles))


def sample_field_of_view(rng: np.random.Generator, size: str) -> float:
    """Width (mm) of the reconstructed field of view; the pixel spacing is this / n_xy.

    Full-size scans (512^2) take their pixel spacing from LUNA16's measured spread (0.46-0.98
    mm, median 0.70), so the field of view is 236-500 mm.
    """
    if size == "small":
        return float(rng.uniform(285, 345))
    return 512 * _draw_quantiles(rng, LUNA16_PIXEL_SPACING_QUANTILES)


def sample_acquisition(
    rng: np.random.Generator, size: str, index: int, height: float, fov: float
) -> Acquisition:
    """Spacing, extent, origin, orientation, blur and noise of one scan.

    Full-size scans take their slice spacing and z extent from LUNA16's measured mix (the
    extent at least covers the lungs plus ``MIN_LUNG_MARGIN_MM`` above and below), so their
    slice count follows too, up to ``MAX_SLICES_FULL``.
    """
    small = size == "small"
    n_xy = 128 if small else 512
    sxy = fov / n_xy
    if small:
        sz = round(float(rng.uniform(2.0, 2.5)), 2)
        top, bottom = rng.uniform(6, 16), rng.uniform(6, 14)
        cover = height + top + bottom
        n_z = int(np.ceil(cover / sz)) + 1
    else:
        steps = list(LUNA16_SLICE_SPACING_SCANS)
        counts = np.array([LUNA16_SLICE_SPACING_SCANS[s] for s in steps], dtype=np.float64)
        sz = float(steps[int(rng.choice(len(steps), p=counts / counts.sum()))])
        extent = max(
            _draw_quantiles(rng, LUNA16_Z_EXTENT_QUANTILES), height + 2 * MIN_LUNG_MARGIN_MM
        )
        n_z = min(int(np.ceil(extent / sz)) + 1, MAX_SLICES_FULL)
        # What lies beyond the lungs and their margins (neck above, upper abdomen below) is
        # split at random; >= 0 even at the cap (699 x 0.45 mm > 268 + 2 x 8 mm).
        spare = (n_z - 1) * sz - height - 2 * MIN_LUNG_MARGIN_MM
        bottom = MIN_LUNG_MARGIN_MM + spare * float(rng.uniform(0.35, 0.65))
    body_c = (rng.uniform(-25, 25), rng.uniform(-40, 10))
    # The reconstruction circle is centred a little behind the body (the couch is there).
    fov_c = (body_c[0] + rng.uniform(-0.03, 0.03) * fov, body_c[1] + rng.uniform(0.0, 0.05) * fov)
    z0 = float(rng.uniform(-420, -80))
    origin = (fov_c[0] - fov / 2 + sxy / 2, fov_c[1] - fov / 2 + sxy / 2, z0)
    apex_world_z = z0 + bottom + height
    # Some scans are stored flipped; guaranteed for two of every ten indices so any 10
    # consecutive scans exercise both kinds of flip.
    if index % 10 == 3:
        direction = "flip_z"
    elif index % 10 == 7:
        direction = "flip_xy"
    else:
        direction = str(rng.choice(list(DIRECTIONS), p=[0.8, 0.1, 0.1]))
    return Acquisition(
        fov=fov,
        n_xy=n_xy,
        spacing=(sxy, sxy, sz),
        n_z=n_z,
        margin_bottom=bottom,
        origin=origin,
        body_centre_world=(body_c[0], body_c[1], apex_world_z),
        direction=direction,
        psf_mm=float(rng.uniform(0.4, 0.6)),
        noise_hu=float(rng.uniform(8, 15) if small else rng.uniform(14, 24)),
        padding=None if rng.random() < 0.55 else int(rng.choice([-2048, -3024])),
    )


def synthesize_scan(
    seed: int,
    index: int = 0,
    size: str = "small",
    n_nodules: int | None = None,
) -> SyntheticCase:
    """Make scan ``index`` of the synthetic data set with this ``seed``.

    Args:
        seed: data-set seed; with ``index`` it fixes every random choice, so the same call
            always gives the same volume and tables.
        index: scan number within the data set.
        size: 'small' (128^2 in-plane, 2.2-2.7 mm pixels, ~70-110 slices of 2.0-2.5 mm; about a
            second) or 'full' (512^2 with LUNA16's spread: 0.46-0.98 mm pixels, slices of
            0.45-2.5 mm, ~100-700 of them; half a minute to a minute).
        n_nodules: force the number of nodules (default: 0-4, mostly 1-2).

    Returns:
        The :class:`SyntheticCase`; nodule ``diameter_mm`` is the equivalent-sphere diameter.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    r_anat, r_acq, r_tree, r_tex, r_find, r_draw, r_cand, r_noise = case_rngs(seed, index, size)
    small = size == "small"
    fov = sample_field_of_view(r_acq, size)
    an = sample_anatomy(r_anat, size, fov)
    acq = sample_acquisition(r_acq, size, index, an.height, fov)

    # Canonical grid in the body frame (world minus the body centre).
    bc = np.asarray(acq.body_centre_world)
    start = np.asarray(acq.origin) - bc
    grid = BodyGrid.regular(start, acq.spacing, (acq.n_z, acq.n_xy, acq.n_xy))
    vol = render_anatomy(an, grid, r_tex)
    lung = LungMap.build(vol.lungs, grid)

    trees = _grow_trees(r_tree, an, lung, small)
    _draw_trees(vol.hu, grid, trees, small, an, vol.lungs)
    # Bifurcations only where the vessel is still visible at this voxel size: look-alikes.
    vessels, airways, branch_pts = _tree_samples(trees, max(0.5, 0.3 * acq.spacing[0]))

    if n_nodules is None:
        n_nodules = int(r_find.choice([0, 1, 2, 3, 4], p=[0.12, 0.38, 0.28, 0.14, 0.08]))
    n_excl = int(min(8, r_find.poisson(2.5)))
    nodules, excluded = plan_findings(r_find, lung, vessels, airways, n_nodules, n_excl)
    for f in [*nodules, *excluded]:
        render_finding(vol.hu, vol.lungs, grid, f, r_draw)

    n_neg = int(r_cand.integers(50, 151) if small else r_cand.integers(250, 601))
    cpos, ccls, csrc = plan_candidates(
        r_cand, lung, vessels, airways, branch_pts, nodules, excluded, n_neg
    )

    hu = _ct_blur_and_noise(vol.hu, acq, r_noise)  # in place: vol.hu is the blurred scan now
    array = _quantise(hu, grid, acq)
    del hu
    lungs = (vol.lungs > 0).astype(np.uint8)

    # Store in the acquisition's orientation; ground truth goes through the final geometry.
    canonical = Geometry(size=(acq.n_xy, acq.n_xy, acq.n_z), spacing=acq.spacing, origin=acq.origin)
    geometry, flip_axes = _orient(canonical, acq.direction)
    if flip_axes:
        array = np.ascontiguousarray(np.flip(array, axis=flip_axes))
        lungs = np.ascontiguousarray(np.flip(lungs, axis=flip_axes))
    shape = np.asarray(array.shape)

    def to_final_index(body_pts: np.ndarray) -> np.ndarray:
        idx = grid.to_index(np.atleast_2d(body_pts))
        for ax in flip_axes:
            idx[:, ax] = shape[ax] - 1 - idx[:, ax]
        return idx

    r_readers = reader_rng(seed, index, size)

    def findings(fs: list[PlannedFinding]) -> list[Finding]:
        out = []
        for f in fs:
            idx = to_final_index(f.centre)[0]
            w = geometry.voxel_to_world(idx)
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

    cands = []
    if cpos.shape[0]:
        idx = to_final_index(cpos)
        inside = geometry.contains(idx)
        world = geometry.voxel_to_world(idx)
        cands = [
            Candidate(tuple(float(v) for v in w), int(c), s)
            for w, c, s, ok in zip(world, ccls, csrc, inside, strict=True)
            if ok
        ]
    uid = series_uid(seed, index, size)
    scan = Scan(array=array, geometry=geometry, seriesuid=uid)
    return SyntheticCase(
        scan=scan,
        nodules=findings(nodules),
        excluded=findings(excluded),
        candidates=cands,
        lung_mask=lungs,
        seed=int(seed),
        index=int(index),
        size=size,
        info={
            "direction": acq.direction,
            "noise_hu": round(acq.noise_hu, 3),
            "psf_mm": round(acq.psf_mm, 3),
            "padding": acq.padding,
            "n_vessel_segments": int(sum(len(t) for t in trees if t.kind != "airway")),
            "n_airway_segments": int(sum(len(t) for t in trees if t.kind == "airway")),
        },
    )


def _orient(canonical: Geometry, direction: str) -> tuple[Geometry, tuple[int, ...]]:
    """The stored geometry for a direction name and the numpy axes to flip to get there."""
    d = DIRECTIONS[direction]
    signs = (d[0], d[4], d[8])  # x, y, z
    origin = list(canonical.origin)
    flip_axes = []
    for ax_xyz, sgn in enumerate(signs):
        if sgn < 0:
            n = canonical.size[ax_xyz]
            # The first stored voxel is the canonical last one along a flipped axis.
            origin[ax_xyz] += (n - 1) * canonical.spacing[ax_xyz]
            flip_axes.append(2 - ax_xyz)  # x -> numpy axis 2, z -> 0
    geom = Geometry(
        size=canonical.size, spacing=canonical.spacing, origin=tuple(origin), direction=d
    )
    return geom, tuple(sorted(flip_axes))


TREE_PARAMS = {
    size: {
        "points": points,
        "min_radius": min_radius,
        "min_lumen": min_lumen,
        "growth": {
            "fraction": 0.45,
            "murray": 3.4,
            "tip_taper": 0.5,
            "asymmetry": 0.22,
            "max_turn": 0.5,
            "major_turn": 0.7,
        },
    }
    for size, points, min_radius, min_lumen in (
        ("small", 1500, 0.6, 1.3),
        ("full", 8000, 0.3, 0.8),
    )
}
"""Tree growth per scan size: attractor points per tree, radius where growth stops, thinnest
drawn airway lumen, and :func:`grow_tree` options.

A Murray exponent above the ideal 3 keeps the calibre up towards the periphery: every attractor
point stands for a group of lobules, not one terminal vessel, and with 3 the vessels a CT still
shows (about 1 mm and up) would stop several centimetres short of the pleura instead of about
one. Lopsided splits with a straight major daughter make long conveying stems that give off
thinner side branches, as real pulmonary arteries and veins do."""


def _grow_trees(rng: np.random.Generator, an, lung: LungMap, small: bool) -> list[Tree]:
    """Bronchi with their arteries, and veins, for each lung, grown into its own territory.

    Per lung, one space-filling tree is grown from the end of the main bronchus: the bronchi
    are its thicker part (lumen ~0.8x the artery's calibre, as the broncho-arterial ratio), and
    the pulmonary artery is the whole tree shifted sideways, so each artery runs beside its
    bronchus down to the periphery; it starts at the end of the mediastinal pulmonary artery
    and reaches its place beside the bronchus gradually. Veins grow separately from the lower
    hilum (they run between the bronchoarterial bundles). Both are grown lobe by lobe (the
    attractor points carry their lobe), so each branch keeps to its lobe. Every segment is then
    bent into a smooth curve.
    """
    par = TREE_PARAMS["small" if small else "full"]
    n_pts = par["points"]
    trees: list[Tree] = []
    coarse = lung.lungs[:: lung.stride[0], :: lung.stride[1], :: lung.stride[2]]
    stride = np.asarray(lung.stride)
    min_vessel = par["min_radius"]  # thinner vessels are not grown further
    min_lumen = par["min_lumen"]

    def to_body(idx):
        return lung.grid.to_body(idx * stride)

    def inside_of(label):
        def inside(p):
            return lung.label_at_point(p) == label

        return inside

    for label, side in ((1, "right"), (2, "left")):
        mask = coarse == label
        if not mask.any():
            continue
        bronchus = next(t for t in an.tubes if t.name == f"bronchus_{side}")
        r_art = float(rng.uniform(5.0, 6.0))
        ratio = float(bronchus.radii[-1]) / r_art
        sgn = -1 if side == "right" else 1
        pts = sample_points_in(rng, mask, to_body, n_pts)
        base = grow_tree(
            rng,
            pts,
            bronchus.points[-1],
            r_art,
            "artery",
            inside=inside_of(label),
            min_radius=min_vessel,
            groups=an.lobe_of(sgn, pts),
            **par["growth"],
        )
        base = curve_tree(base, rng)
        trees.append(subtree(base, base.r0 * ratio >= 0.8 * min_lumen, "airway", ratio))

        def gap(r, ratio=ratio):
            # bronchial lumen + wall + artery radius + a thin sheath of connective tissue
            return r * ratio * 1.15 + 0.3 + r + 0.5

        # The artery leaves the end of its mediastinal pulmonary artery and runs from there to
        # its side of the bronchus, at the great vessel's calibre where the two meet.
        pa = next(t for t in an.tubes if t.name == f"artery_{side}")
        artery = companion_tree(base, rng, gap, "artery", root_start=pa.points[-1])
        r0 = artery.r0.copy()
        r0[artery.parent < 0] = float(pa.radii[-1])
        trees.append(replace(artery, r0=r0))
        pts = sample_points_in(rng, mask, to_body, n_pts)
        vein = grow_tree(
            rng,
            pts,
            an.hilum[f"vein_{side}"],
            float(rng.uniform(4.5, 5.5)),
            "vein",
            inside=inside_of(label),
            min_radius=min_vessel,
            groups=an.lobe_of(sgn, pts),
            **par["growth"],
        )
        trees.append(curve_tree(vein, rng))
    return trees


FISSURE_HU = 0.0
"""Density of the visceral pleura's two layers in a fissure (~0.5 mm of soft tissue): on CT a
faint line of about -600 to -300 HU once partial volume has thinned it."""
FISSURE_THICKNESS = 0.5
FISSURE_CLEAR = 1.2
"""Half-width (mm) of the vessel-free band on either side of a fissure (the subpleural rim of
each lobe, where only vessels below CT resolution run)."""
HILUM_REACH = 30.0
"""Within this distance (mm) of a hilum the fissures give way to the lobar vessels."""
FISSURE_THROUGH_RADIUS = 1.0
"""Vessels at least this thick (radius, mm) run on through a fissure's vessel-free band; the
band only clears the thinner ones (erasing a thick vessel there would cut it off bluntly)."""


def _fissure_maps(
    an: Anatomy, grid: BodyGrid, lungs: np.ndarray, k0: int, k1: int
) -> tuple[np.ndarray, np.ndarray]:
    """For slices ``k0:k1``: fissure occupancy (0..1) and vessel-keep factor (0..1) in the lungs.

    The fissure is a sheet ``FISSURE_THICKNESS`` thick, drawn with the voxel's extent across
    it, so a sheet thinner than a voxel keeps its integrated density (faint, not absent) and a
    fissure cut obliquely by thick slices blurs into a band, as on real scans.
    """
    sx, sy, sz = grid.spacing
    full = lungs[k0:k1]
    occ_full = np.zeros(full.shape, dtype=np.float32)
    keep_full = np.ones(full.shape, dtype=np.float32)
    rows = np.flatnonzero(full.any(axis=(0, 2)))
    cols = np.flatnonzero(full.any(axis=(0, 1)))
    if rows.size == 0:
        return occ_full, keep_full
    # Only the lungs' in-plane bounding box can hold a fissure.
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    z = grid.zs[k0:k1, None, None].astype(np.float32)
    y = grid.ys[None, box[1], None].astype(np.float32)
    x = grid.xs[None, None, box[2]].astype(np.float32)
    lab = full[box]
    occ = occ_full[box]
    keep = keep_full[box]
    for label, side in ((1, -1), (2, 1)):
        inside = lab == label
        if not inside.any():
            continue
        d_obl, d_h = an.fissure_sdf(side, x, y, z)
        d = np.minimum(np.abs(d_obl), np.where(d_obl > 0, np.abs(d_h), 1e3))
        # Voxel extent across the sheet (oblique fissure ~45 degrees, horizontal ~ level).
        w_obl = 0.7 * (sy + sz)
        w = np.where(np.abs(d_obl) <= d, w_obl, sz).astype(np.float32)
        half = 0.5 * FISSURE_THICKNESS
        sheet = np.clip(0.5 + (half - d) / w, 0.0, 1.0) * np.minimum(1.0, 2.0 * half / w)
        hil = an.hilum["left" if side > 0 else "right"]
        near_hilum = (x - hil[0]) ** 2 + (y - hil[1]) ** 2 + (z - hil[2]) ** 2 < HILUM_REACH**2
        clear = np.where(near_hilum, 1.0, np.clip((d - FISSURE_CLEAR) / max(sx, 0.5), 0.0, 1.0))
        occ[inside] = np.broadcast_to(sheet, lab.shape)[inside]
        keep[inside] = np.broadcast_to(clear, lab.shape)[inside]
    return occ_full, keep_full


def _draw_trees(
    hu: np.ndarray,
    grid: BodyGrid,
    trees: list[Tree],
    small: bool,
    an: Anatomy | None = None,
    lungs: np.ndarray | None = None,
    slab: int = 32,
) -> None:
    """Composite airway walls, airway lumens, blood vessels and (given ``an`` and ``lungs``)
    the interlobar fissures into ``hu``."""
    occ = np.zeros(hu.shape, dtype=np.float32)
    airways = [t for t in trees if t.kind == "airway"]
    vessels = [t for t in trees if t.kind != "airway"]
    if airways:
        p0 = np.concatenate([t.p0 for t in airways])
        p1 = np.concatenate([t.p1 for t in airways])
        r0 = np.concatenate([t.r0 for t in airways])
        r1 = np.concatenate([t.r1 for t in airways])
        # Bronchial wall ~ 15% of the lumen radius plus a floor: visible around big airways, lost
        # in partial volume for small ones; airways thinner than ~1-1.5 mm are invisible on CT.
        min_lumen = 1.5 if small else 0.9
        splat_tubes(occ, grid, p0, p1, r0 * 1.1 + 0.3, r1 * 1.1 + 0.3, min_radius=min_lumen)
        hu += occ * (30.0 - hu)
        occ[...] = 0
        splat_tubes(occ, grid, p0, p1, r0, r1, min_radius=min_lumen)
        hu += occ * (TISSUE_HU["air"] - hu)
        occ[...] = 0
    if not vessels:
        v_p0 = v_p1 = np.zeros((0, 3))
        v_r0 = v_r1 = np.zeros(0)
    else:
        v_p0 = np.concatenate([t.p0 for t in vessels])
        v_p1 = np.concatenate([t.p1 for t in vessels])
        v_r0 = np.concatenate([t.r0 for t in vessels])
        v_r1 = np.concatenate([t.r1 for t in vessels])
    # Vessels far below the voxel size would add < ~5% occupancy: not worth drawing.
    min_radius = 0.18 * max(grid.spacing[:2])
    if an is None or lungs is None or not an.oblique:
        splat_tubes(occ, grid, v_p0, v_p1, v_r0, v_r1, min_radius=min_radius)
        hu += occ * (TISSUE_HU["blood"] - hu)
        return
    # Only vessels below CT resolution give way to the fissures: a thick one cut there would
    # end in a blunt stump on either side of the fissure.
    thick = np.maximum(v_r0, v_r1) >= FISSURE_THROUGH_RADIUS
    thin = ~thick
    splat_tubes(occ, grid, v_p0[thin], v_p1[thin], v_r0[thin], v_r1[thin], min_radius=min_radius)
    sheets = []
    for k0 in range(0, hu.shape[0], slab):
        k1 = min(hu.shape[0], k0 + slab)
        sheet, keep = _fissure_maps(an, grid, lungs, k0, k1)
        occ[k0:k1] *= keep
        at = np.flatnonzero(sheet)
        sheets.append((k0, k1, at, sheet.reshape(-1)[at]))
    splat_tubes(
        occ, grid, v_p0[thick], v_p1[thick], v_r0[thick], v_r1[thick], min_radius=min_radius
    )
    for k0, k1, at, val in sheets:
        part = hu[k0:k1]
        part += occ[k0:k1] * (TISSUE_HU["blood"] - part)
        flat = part.reshape(-1)
        flat[at] += val * (FISSURE_HU - flat[at])


def _tree_samples(
    trees: list[Tree], min_branch_radius: float
) -> tuple[TubeSamples, TubeSamples, np.ndarray]:
    """Points along vessels and airways (for placement and candidates), and bifurcations."""
    parts = {0: [], 1: [], 2: []}
    code = {"artery": 0, "vein": 1, "airway": 2}
    for t in trees:
        pts, rad, dirs, _ = t.samples(step=1.0)
        parts[code[t.kind]].append((pts, rad, dirs))

    def pack(keys):
        items = [(k, p) for k in keys for p in parts[k]]
        if not items:
            z = np.zeros((0, 3))
            return TubeSamples(z, np.zeros(0), z, np.zeros(0, dtype=np.int64))
        return TubeSamples(
            np.concatenate([p[0] for _, p in items]),
            np.concatenate([p[1] for _, p in items]),
            np.concatenate([p[2] for _, p in items]),
            np.concatenate([np.full(p[0].shape[0], k) for k, p in items]),
        )

    branch = [t.branch_points(min_radius=min_branch_radius) for t in trees if t.kind != "airway"]
    bp = np.concatenate(branch) if branch else np.zeros((0, 3))
    return pack([0, 1]), pack([2]), bp


def _ct_blur_and_noise(
    hu: np.ndarray, acq: Acquisition, rng: np.random.Generator, slab: int = 16
) -> np.ndarray:
    """Gaussian PSF (in-plane FWHM ~1-1.6 mm, slice profile ~ slice spacing) + CT-like noise.

    CT noise is correlated in-plane (filtered back-projection gives a band-pass noise power
    spectrum: grainy, not white), and nearly independent between slices; a difference of two
    in-plane Gaussians of white noise mimics that. Its std is set on the final result.

    Works in place on ``hu`` (returned), and makes the noise ``slab`` slices at a time, so a
    700-slice scan needs two full-size float32 volumes, not five. The noise filters are
    in-plane and the generator fills slab after slab in order, so the values are exactly
    those of one whole-volume draw.
    """
    sx, sy, _ = acq.spacing
    # The slice profile is ~ one slice spacing wide whatever the spacing: a fixed sigma in voxels.
    sigma = (0.42, max(acq.psf_mm / sy, 0.45), max(acq.psf_mm / sx, 0.45))
    ndimage.gaussian_filter(hu, sigma, mode="nearest", output=hu)
    noise = np.empty_like(hu)
    for k0 in range(0, hu.shape[0], slab):
        white = rng.standard_normal((min(slab, hu.shape[0] - k0), *hu.shape[1:]), dtype=np.float32)
        # In-plane only: slices are reconstructed independently (a zero sigma skips that axis).
        fine = ndimage.gaussian_filter(white, (0.0, 0.8, 0.8))
        coarse = ndimage.gaussian_filter(white, (0.0, 2.0, 2.0))
        coarse *= 0.55
        fine -= coarse
        noise[k0 : k0 + fine.shape[0]] = fine
    noise *= acq.noise_hu / max(float(noise.std()), 1e-6)
    hu += noise
    return hu


def _quantise(hu: np.ndarray, grid: BodyGrid, acq: Acquisition) -> np.ndarray:
    """int16 HU clipped like a scanner, with padding outside the reconstruction circle.

    Rounds and clips ``hu`` in place (it is not needed afterwards): one float32 volume less.
    """
    np.rint(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    out = hu.astype(np.int16)
    if acq.padding is not None:
        # Reconstruction circle: centred on the field of view, diameter = FOV.
        n = acq.n_xy
        c = (n - 1) / 2
        yy, xx = np.ogrid[:n, :n]
        outside = (yy - c) ** 2 + (xx - c) ** 2 > (n / 2) ** 2
        out[:, outside] = acq.padding
    return out
