"""Turning the analytic chest (:mod:`lungct.synth.anatomy`) into an HU volume, slab by slab.

The volume is computed in slabs of a few slices so a 512x512x700 scan never needs more than
one full-size float32 array plus slab-sized temporaries. Thin tubular structures with thousands
of segments (vessel and airway trees) are drawn separately by :func:`splat_tubes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lungct.synth.anatomy import (
    TISSUE_HU,
    Anatomy,
    Tube,
    ellipse_sdf,
    soft,
    superellipse_sdf,
)


@dataclass(frozen=True)
class BodyGrid:
    """Voxel-centre coordinates of a canonical (identity-direction) grid, in the body frame.

    Args:
        xs, ys, zs: 1-D body-frame coordinates (mm) of the voxel centres along each axis.
        spacing: ``(x, y, z)`` voxel size in mm.
    """

    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray
    spacing: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The numpy ``(z, y, x)`` shape."""
        return (self.zs.size, self.ys.size, self.xs.size)

    @property
    def start(self) -> np.ndarray:
        """Body-frame ``(x, y, z)`` of voxel (0, 0, 0)."""
        return np.array([self.xs[0], self.ys[0], self.zs[0]])

    def to_index(self, pts_xyz: np.ndarray) -> np.ndarray:
        """Body-frame ``(x, y, z)`` mm -> continuous ``(z, y, x)`` index."""
        ijk = (np.asarray(pts_xyz, dtype=np.float64) - self.start) / np.asarray(self.spacing)
        return ijk[..., ::-1]

    def to_body(self, idx_zyx: np.ndarray) -> np.ndarray:
        """Continuous ``(z, y, x)`` index -> body-frame ``(x, y, z)`` mm."""
        ijk = np.asarray(idx_zyx, dtype=np.float64)[..., ::-1]
        return self.start + ijk * np.asarray(self.spacing)

    @classmethod
    def regular(cls, start_xyz, spacing, shape_zyx) -> BodyGrid:
        """A grid of ``shape_zyx`` voxels from ``start_xyz`` with ``spacing`` (x, y, z)."""
        nz, ny, nx = shape_zyx
        sx, sy, sz = (float(s) for s in spacing)
        return cls(
            xs=start_xyz[0] + sx * np.arange(nx),
            ys=start_xyz[1] + sy * np.arange(ny),
            zs=start_xyz[2] + sz * np.arange(nz),
            spacing=(sx, sy, sz),
        )


class CoarseField:
    """A smooth random field (unit std) on a coarse grid, linearly upsampled on demand.

    Tissue texture is low-frequency, so it is drawn on a coarse grid (``step`` mm) and
    interpolated separably (gathers and weights, no BLAS: the machines this runs on are shared).
    """

    def __init__(self, rng: np.random.Generator, grid: BodyGrid, step: float = 4.0):
        from scipy import ndimage

        self.grid = grid
        pad = 2 * step
        lo = np.array([grid.xs[0], grid.ys[0], grid.zs[0]]) - pad
        hi = np.array([grid.xs[-1], grid.ys[-1], grid.zs[-1]]) + pad
        n = np.ceil((hi - lo) / step).astype(int) + 1
        white = rng.standard_normal((n[2], n[1], n[0]), dtype=np.float32)
        field = ndimage.gaussian_filter(white, 1.0, mode="wrap")
        field /= max(float(field.std()), 1e-6)
        self.field = field
        self.lo, self.step = lo, step
        self.kx, self.wx = _interp_weights(grid.xs, lo[0], step, n[0])
        self.ky, self.wy = _interp_weights(grid.ys, lo[1], step, n[1])
        self._cache: dict[int, np.ndarray] = {}

    def _plane(self, k: int) -> np.ndarray:
        if k not in self._cache:
            if len(self._cache) > 8:
                self._cache.pop(min(self._cache))
            f = self.field[min(max(k, 0), self.field.shape[0] - 1)]
            rows = f[self.ky] * (1 - self.wy)[:, None] + f[self.ky + 1] * self.wy[:, None]
            plane = rows[:, self.kx] * (1 - self.wx) + rows[:, self.kx + 1] * self.wx
            self._cache[k] = plane.astype(np.float32)
        return self._cache[k]

    def slab(self, zs: np.ndarray) -> np.ndarray:
        """The field at the grid's in-plane points for the given slice heights."""
        f = (zs - self.lo[2]) / self.step
        k0 = np.floor(f).astype(int)
        w = (f - k0).astype(np.float32)
        return np.stack(
            [
                (1 - wi) * self._plane(k) + wi * self._plane(k + 1)
                for k, wi in zip(k0, w, strict=True)
            ]
        )


def _interp_weights(coords: np.ndarray, lo: float, step: float, n: int) -> tuple:
    """Left neighbour index and weight of each coordinate on a regular coarse axis."""
    f = (coords - lo) / step
    k = np.clip(np.floor(f).astype(int), 0, n - 2)
    return k, (f - k).astype(np.float32)


# === Tubes with few segments (great vessels, trachea, bones): exact capsule distances ===========


def tube_kind(tube: Tube) -> str:
    """What a named tube is made of: 'air' (lumen with a wall), 'bone', 'soft' or 'blood'."""
    if tube.name.startswith(("trachea", "bronchus")):
        return "air"
    if tube.name.startswith("clavicle"):
        return "bone"
    if tube.name.startswith("oesophagus"):
        return "soft"
    return "blood"


def tube_sdf_slab(
    tubes: list[Tube], grid: BodyGrid, k0: int, k1: int, margin: float = 4.0
) -> np.ndarray:
    """Min over ``tubes`` of (distance to the axis - radius), mm, for slices ``k0:k1``.

    Only each segment's bounding box is computed; voxels far from every tube get +1e3.
    """
    shape = (k1 - k0, grid.ys.size, grid.xs.size)
    out = np.full(shape, 1e3, dtype=np.float32)
    zs = grid.zs[k0:k1]
    for tube in tubes:
        for p0, p1, r0, r1 in zip(
            tube.points[:-1], tube.points[1:], tube.radii[:-1], tube.radii[1:], strict=True
        ):
            reach = max(r0, r1) + margin
            lo = np.minimum(p0, p1) - reach
            hi = np.maximum(p0, p1) + reach
            iz = np.flatnonzero((zs >= lo[2]) & (zs <= hi[2]))
            iy = np.flatnonzero((grid.ys >= lo[1]) & (grid.ys <= hi[1]))
            ix = np.flatnonzero((grid.xs >= lo[0]) & (grid.xs <= hi[0]))
            if iz.size == 0 or iy.size == 0 or ix.size == 0:
                continue
            sl = (
                slice(iz[0], iz[-1] + 1),
                slice(iy[0], iy[-1] + 1),
                slice(ix[0], ix[-1] + 1),
            )
            px = grid.xs[sl[2]][None, None, :] - p0[0]
            py = grid.ys[sl[1]][None, :, None] - p0[1]
            pz = zs[sl[0]][:, None, None] - p0[2]
            d = p1 - p0
            dd = max(float(d @ d), 1e-9)
            t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
            dist = np.sqrt((px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2)
            sdf = (dist - (r0 + t * (r1 - r0))).astype(np.float32)
            np.minimum(out[sl], sdf, out=out[sl])
    return out


# === The chest, slab by slab =====================================================================


@dataclass
class AnatomyVolume:
    """The rendered chest before vessels, nodules, blur and noise.

    Attributes:
        hu: float32 HU, ``(z, y, x)``.
        lungs: uint8 ground-truth lungs, 0 outside, 1 right, 2 left.
    """

    hu: np.ndarray
    lungs: np.ndarray


def render_anatomy(
    an: Anatomy, grid: BodyGrid, rng: np.random.Generator, slab: int = 8
) -> AnatomyVolume:
    """Draw the chest of ``an`` on ``grid`` (float32 HU and the lung labels)."""
    nz, ny, nx = grid.shape
    hu = np.empty(grid.shape, dtype=np.float32)
    lungs = np.zeros(grid.shape, dtype=np.uint8)
    sx, sy, sz = grid.spacing
    texture = CoarseField(rng, grid, step=4.0)
    # Fine parenchymal texture only where voxels are small enough to show it.
    fine = CoarseField(rng, grid, step=1.6) if max(sx, sy) < 1.2 else None
    v = max(sx, sy)  # in-plane partial-volume width
    X = grid.xs[None, None, :].astype(np.float32)
    Y = grid.ys[None, :, None].astype(np.float32)

    # z-independent in-plane structures, computed once.
    # Flatter at the back (the patient lies on it), rounder in front.
    p_body = np.where(Y > 0, an.back_flatness, 2.1).astype(np.float32)
    # Bodies are not ellipses: a few low-order harmonics bend the skin and, independently, the
    # muscle boundary (so the fat layer is thicker in some places than others).
    phi = np.arctan2(Y / an.body_b, X / an.body_a)
    skin = sum(amp * np.cos(k * phi + ph) for k, amp, ph in an.skin_harmonics)
    muscle = sum(amp * np.cos(k * phi + ph) for k, amp, ph in an.muscle_harmonics)
    # Muscle bulges move skin and muscle boundary together (the fat over them keeps its
    # thickness); those that fade with height are added slice by slice below.
    static = [b for b in an.body_bumps if b[4] < -1e3]
    graded = [b for b in an.body_bumps if b[4] >= -1e3]

    def bump_shape(c: float, w: float) -> np.ndarray:
        d = np.angle(np.exp(1j * (phi - c)))
        return np.exp(-0.5 * (d / w) ** 2).astype(np.float32)

    skin = skin + sum(amp * bump_shape(c, w) for c, w, amp, _, _ in static)
    graded_shapes = [bump_shape(c, w) for c, w, _, _, _ in graded]
    body_sdf = superellipse_sdf(X, Y, 0.0, 0.0, an.body_a, an.body_b, p_body) - skin
    inner = superellipse_sdf(X, Y, 0.0, 0.0, an.body_a - an.fat, an.body_b - an.fat, p_body)
    inner = inner - skin - muscle
    body_m2, inner_m2 = soft(body_sdf, v), soft(inner, v)
    table = _table(an, X, Y, v) if an.has_table else None
    spine2d = _spine_maps(an, X, Y, v)

    blood_tubes = [t for t in an.tubes if tube_kind(t) == "blood"]
    air_tubes = [t for t in an.tubes if tube_kind(t) == "air"]
    bone_tubes = [t for t in an.tubes if tube_kind(t) == "bone"]
    soft_tubes = [t for t in an.tubes if tube_kind(t) == "soft"]

    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        Z = grid.zs[k0:k1, None, None].astype(np.float32)
        tex = texture.slab(grid.zs[k0:k1])
        zk = grid.zs[k0:k1]
        bump = None
        for (_, _, amp, z_full, z_none), g in zip(graded, graded_shapes, strict=True):
            f = np.clip((zk - z_none) / (z_full - z_none), 0.0, 1.0).astype(np.float32)
            if f.max() > 0:
                term = (amp * f)[:, None, None] * g
                bump = term if bump is None else bump + term
        if bump is None:
            body_m, inner_m = body_m2, inner_m2
        else:
            body_m, inner_m = soft(body_sdf - bump, v), soft(inner - bump, v)
        h = np.full((k1 - k0, ny, nx), TISSUE_HU["air"], dtype=np.float32)
        h += (body_m * (an.fat_hu + 6.0 * tex - TISSUE_HU["air"])).astype(np.float32)
        _over(h, inner_m, an.muscle_hu + 4.0 * tex)

        cy, a, b = an.cavity(Z)
        cav = ellipse_sdf(X, Y, 0.0, cy, a, b)
        # A thin fat plane between the outer chest-wall muscles and the rib cage, broken at the
        # back where the paraspinal muscles sit on the spine.
        plane = np.abs(ellipse_sdf(X, Y, 0.0, cy, a + 19.0, b + 19.0)) - 1.1
        back = soft(-(np.abs(X) - 48.0), 6.0) * soft(-(Y - an.spine_y + 5.0), 6.0)
        low = soft(Z + 0.22 * an.height, 15.0)  # not around the apices (shoulder girdle there)
        _over(h, soft(plane, v) * inner_m * (1 - back) * low * 0.8, an.fat_hu)
        cav_m = soft(cav, v)
        # Diaphragm per side; below it the cavity holds liver (right) and spleen/stomach (left).
        dz = np.where(X < an.med_x, an.diaphragm_z(-1, X, Y), an.diaphragm_z(1, X, Y))
        below = soft(Z - dz, sz) * cav_m
        above = cav_m - below
        # Great vessels, oesophagus and airways, and around them the mediastinum: their fat,
        # merged smoothly so its outline is lobulated like a real one, not a union of circles.
        vessels = tube_sdf_slab(blood_tubes, grid, k0, k1, margin=12.0)
        oes = tube_sdf_slab(soft_tubes, grid, k0, k1, margin=10.0)
        air = tube_sdf_slab(air_tubes, grid, k0, k1, margin=10.0)
        envelope = smooth_min(smooth_min(vessels - 6.5, air - 2.0, 8.0), oes - 4.0, 8.0)
        # Mediastinal fat: the envelope and a strip along the midline; beside the lung apices
        # the cavity outline is chest-wall muscle, and the inlet above them muscle and glands.
        inlet = soft(-(Z + 12.0), 8.0)
        near_mid = soft(np.abs(X - an.med_x) - an.mediastinum_halfwidth(Y, Z) - 6.0, 6.0)
        # (the envelope is not clipped to the cavity: great vessels leaving the chest keep their
        # fat, and the superior mediastinum gets a lobulated, not elliptical, outline).
        fat_m = np.maximum(above * inlet * near_mid, soft(envelope, v) * inner_m)
        _over(h, fat_m, an.fat_hu + 8.0 + 5.0 * tex)
        _over(h, below, np.where(X < an.med_x, TISSUE_HU["liver"], 48.0) + 4.0 * tex)

        # Heart in its pericardial fat.
        heart = an.heart_sdf(X, Y, Z)
        _over(h, soft(heart - an.pericardial_fat, v) * above, an.fat_hu + 5.0 * tex)
        _over(h, soft(heart, v), TISSUE_HU["blood"] + 3.0 * tex)
        _over(h, soft(vessels, v), TISSUE_HU["blood"] + 3.0 * tex)
        _over(h, soft(oes, v), an.muscle_hu)
        _over(h, soft(oes + 4.5, v) * 0.7, TISSUE_HU["air"])  # collapsed lumen, a little air

        # Spine, then sternum (both in the wall/mediastinum, never in the lungs).
        _draw_spine(h, an, spine2d, grid.zs[k0:k1], tex, v)
        _draw_sternum(h, an, X, Y, Z, cy, b, v)

        # Lungs: carved out of everything above, except the mediastinal envelope.
        right, left = an.lung_sdf(X, Y, Z, heart=heart)
        right = np.maximum(right, -envelope)
        left = np.maximum(left, -envelope)
        lung_m = np.maximum(soft(right, v), soft(left, v))
        rel_y = np.clip((Y - cy) / b, -1.2, 1.2)
        lung_hu = an.lung_hu + 0.5 * an.lung_gradient * rel_y + 14.0 * tex
        if fine is not None:
            lung_hu = lung_hu + 9.0 * fine.slab(grid.zs[k0:k1])
        _over(h, lung_m, lung_hu)
        lungs[k0:k1][right < 0] = 1
        lungs[k0:k1][left < 0] = 2

        # Trachea and main bronchi: wall, then air lumen.
        _over(h, soft(air - 1.3, v), 30.0)
        _over(h, soft(air, v), TISSUE_HU["air"] + 15.0)

        _draw_ribs(h, an, X, Y, Z, cy, a, b, v)
        _draw_scapulae(h, an, X, Y, Z, cy, a, b, v)
        bones = tube_sdf_slab(bone_tubes, grid, k0, k1)
        _over(h, soft(bones, v), TISSUE_HU["bone_cortex"] * 0.8)
        _over(h, soft(bones + 1.6, v), TISSUE_HU["bone_marrow"])
        if table is not None:
            tm, thu = table
            _over(h, tm, thu)
        hu[k0:k1] = h
    return AnatomyVolume(hu=hu, lungs=lungs)


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum of two distance fields (union with a fillet of size ``k``)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return (b + (a - b) * h - k * h * (1.0 - h)).astype(np.float32)


def _over(h: np.ndarray, m: np.ndarray, value) -> None:
    """Composite ``value`` over ``h`` with occupancy ``m`` (in place)."""
    h += m * (value - h)


def _table(an: Anatomy, X: np.ndarray, Y: np.ndarray, v: float) -> tuple[np.ndarray, np.ndarray]:
    """The CT couch: two curved carbon shells with foam between, under the patient's back."""
    y0 = an.body_b + an.table_gap + 0.0005 * X**2
    half = 1.35 * an.body_a
    lateral = soft(np.abs(X) - half, v)
    top = soft(np.abs(Y - y0) - 1.2, v)
    bottom = soft(np.abs(Y - (y0 + 22.0)) - 1.5, v)
    foam = soft(np.abs(Y - (y0 + 11.0)) - 9.5, v)
    m = np.clip(np.maximum(np.maximum(top, bottom), foam), 0, 1) * lateral
    hu = np.where(np.maximum(top, bottom) > foam * 0.5, TISSUE_HU["table_shell"], TISSUE_HU["foam"])
    return m.astype(np.float32), hu.astype(np.float32)


def _spine_maps(an: Anatomy, X: np.ndarray, Y: np.ndarray, v: float) -> dict[str, np.ndarray]:
    """In-plane occupancy maps of a thoracic vertebra: body, canal, pedicles, laminae, processes."""
    ra, rb = an.spine_r
    sy = an.spine_y
    # Vertebral bodies are rounded boxes, a little flattened at the back.
    body = superellipse_sdf(X, Y, 0.0, sy, ra, rb, np.where(Y > sy, 2.8, 2.2))
    canal_y = sy + rb + 7.5
    canal = ellipse_sdf(X, Y, 0.0, canal_y, 7.5, 6.5)
    parts = [
        ellipse_sdf(X, Y, -9.5, sy + rb + 3.0, 3.5, 6.0),  # pedicles
        ellipse_sdf(X, Y, 9.5, sy + rb + 3.0, 3.5, 6.0),
        _rot_ellipse(X, Y, -6.5, canal_y + 8.0, 9.0, 2.4, np.deg2rad(-38)),  # laminae
        _rot_ellipse(X, Y, 6.5, canal_y + 8.0, 9.0, 2.4, np.deg2rad(38)),
        _rot_ellipse(X, Y, 0.0, canal_y + 22.0, 2.8, 12.0, 0.0),  # spinous process
        _rot_ellipse(X, Y, -21.0, canal_y + 3.0, 12.5, 3.6, np.deg2rad(28)),  # transverse
        _rot_ellipse(X, Y, 21.0, canal_y + 3.0, 12.5, 3.6, np.deg2rad(-28)),
    ]
    posterior = np.minimum.reduce(parts)
    return {
        "body": soft(body, v),
        "body_core": soft(body + 1.2, v),
        "posterior": soft(posterior, v) * (1 - soft(canal, v)),
        "posterior_core": soft(posterior + 1.0, v) * (1 - soft(canal - 1.0, v)),
        "canal": soft(canal, v),
    }


def _rot_ellipse(X, Y, cx, cy, a, b, ang) -> np.ndarray:
    c, s = np.cos(ang), np.sin(ang)
    u = (X - cx) * c + (Y - cy) * s
    w = -(X - cx) * s + (Y - cy) * c
    return ellipse_sdf(u, w, 0.0, 0.0, a, b)


def _draw_spine(h, an: Anatomy, m: dict, zs: np.ndarray, tex: np.ndarray, v: float) -> None:
    """Vertebral bodies (cortex + cancellous bone) with discs between, and posterior elements."""
    phase = ((zs - an.vertebra_phase * an.vertebra_period) / an.vertebra_period) % 1.0
    disc = (np.abs(phase - 0.5) < 0.11).astype(np.float32)[:, None, None]
    _over(h, m["body"] * (1 - disc), TISSUE_HU["bone_cortex"] * 0.75)
    _over(h, m["body_core"] * (1 - disc), TISSUE_HU["bone_marrow"] + tex * 45.0)
    _over(h, m["body"] * disc, TISSUE_HU["disc"])
    # Posterior arch and processes belong to the vertebra, absent at disc level.
    arch = (np.abs(phase - 0.5) > 0.2).astype(np.float32)[:, None, None]
    _over(h, m["posterior"] * arch, TISSUE_HU["bone_cortex"] * 0.7)
    _over(h, m["posterior_core"] * arch, TISSUE_HU["bone_marrow"] + 40)
    _over(h, m["canal"], TISSUE_HU["csf"])


def _draw_sternum(h, an: Anatomy, X, Y, Z, cy, b, v: float) -> None:
    """Manubrium and sternal body along the front of the chest."""
    z_top = -0.13 * an.height
    z_bot = -0.72 * an.height
    zc = Z[:, 0, 0]
    inside = (zc < z_top) & (zc > z_bot)
    if not inside.any():
        return
    manubrium = (zc > z_top - 45.0)[:, None, None]
    half_w = np.where(manubrium, 22.0, 14.0)
    half_d = np.where(manubrium, 7.0, 5.5)
    ys = cy - b - 8.0
    sdf = ellipse_sdf(X, Y, an.med_x * 0.3, ys, half_w, half_d)
    sdf = np.where(inside[:, None, None], sdf, 1e3)
    _over(h, soft(sdf, v), TISSUE_HU["bone_cortex"] * 0.55)
    _over(h, soft(sdf + 1.1, v), TISSUE_HU["bone_marrow"] - 20)


def _draw_ribs(h, an: Anatomy, X, Y, Z, cy, a, b, v: float) -> None:
    """All rib cross-sections in this slab (cortex, marrow, costal cartilage in front)."""
    d_r = 8.0
    ring = ellipse_sdf(X, Y, 0.0, cy, a + d_r, b + d_r)
    near = np.abs(ring) < 8.0
    if not near.any():
        return
    zz, yy, xx = np.nonzero(near)
    r = ring[zz, yy, xx]
    Xn, Yn, Zn = X[0, 0, xx], Y[0, yy, 0], Z[zz, 0, 0]
    cyn = np.broadcast_to(cy, Z.shape)[zz, 0, 0]
    an_ = np.broadcast_to(a, Z.shape)[zz, 0, 0] + d_r
    bn = np.broadcast_to(b, Z.shape)[zz, 0, 0] + d_r
    theta = np.arctan2((Yn - cyn) / bn, np.abs(Xn) / an_)
    side = np.where(Xn < 0, -1, 1)
    zmin, zmax = float(Zn.min()), float(Zn.max())
    occ = np.zeros(r.shape, dtype=np.float32)
    val = np.zeros(r.shape, dtype=np.float32)
    for rib in an.ribs:
        reach = 1.4 * rib.half_height
        if rib.z_post + reach < zmin or rib.z_post - rib.drop - reach > zmax:
            continue
        sel = (side == rib.side) & (theta <= rib.theta_post + 0.05) & (theta >= rib.theta_ant)
        if not sel.any():
            continue
        th = theta[sel]
        frac = np.clip((rib.theta_post - th) / (rib.theta_post + 1.42), 0, 1)
        zc = rib.z_post - rib.drop * frac
        hh, hw = rib.size_at(th)
        q = np.sqrt((r[sel] / hw) ** 2 + ((Zn[sel] - zc) / hh) ** 2)
        o = np.clip(0.5 - (q - 1.0) * hw / v, 0.0, 1.0)
        cart = th < rib.theta_cartilage
        core = np.clip(0.5 - (q - 0.62) * hw / v, 0.0, 1.0)
        value = np.where(
            cart,
            TISSUE_HU["cartilage"],
            TISSUE_HU["bone_marrow"] + core * 0 + (1 - core) * (TISSUE_HU["bone_cortex"] - 250.0),
        )
        idx = np.flatnonzero(sel)
        better = o > occ[idx]
        occ[idx[better]] = o[better]
        val[idx[better]] = value[better]
    hit = occ > 0
    if hit.any():
        sl = (zz[hit], yy[hit], xx[hit])
        h[sl] += occ[hit] * (val[hit] - h[sl])


def _draw_scapulae(h, an: Anatomy, X, Y, Z, cy, a, b, v: float) -> None:
    """Shoulder blades: thin curved plates behind the upper ribs, outside the chest wall."""
    zc = Z[:, 0, 0]
    z_top, z_bot = -0.02 * an.height, -0.48 * an.height
    live = (zc < z_top) & (zc > z_bot)
    if not live.any():
        return
    # Plate = band of the rib ellipse pushed out by ~22 mm, limited in angle; shorter near
    # its lower tip.
    off = 21.0
    ring = ellipse_sdf(X, Y, 0.0, cy, a + off, b + off)
    theta = np.arctan2((Y - cy) / (b + off), np.abs(X) / (a + off))
    frac = np.clip((zc - z_bot) / (z_top - z_bot), 0, 1)[:, None, None]
    lo = 0.25 + 0.55 * (1 - frac) ** 0.5
    hi = 1.05
    ang = np.maximum(lo - theta, theta - hi) * (a + off)
    sdf = np.maximum(np.abs(ring) - 2.2, ang)
    sdf = np.where(live[:, None, None], sdf, 1e3)
    _over(h, soft(sdf, v), TISSUE_HU["bone_cortex"] * 0.6)


# === Many-segment trees (vessels, airways): vectorised splatting ================================


def splat_tubes(
    out: np.ndarray,
    grid: BodyGrid,
    p0: np.ndarray,
    p1: np.ndarray,
    r0: np.ndarray,
    r1: np.ndarray,
    extra: float = 0.0,
    min_radius: float = 0.0,
    chunk: int = 400_000,
) -> None:
    """Draw tapered tube segments as partial-volume occupancy (max-combined into ``out``).

    Each segment is sampled densely along its axis and every sample paints the voxels of a
    small stencil around it with ``amp * clip(0.5 + (R - d) / w, 0, 1)``: ``d`` the distance to
    the sample, ``R = max(r, half a voxel)``. Tubes thinner than a voxel are drawn at that
    minimum size but with amplitude ``(r / R)^2``, which keeps their integrated density -- the
    partial-volume effect that makes tiny vessels faint rather than absent or fat.

    Args:
        out: float32 ``(z, y, x)`` occupancy, updated in place with ``max``.
        grid: the canonical grid of ``out``.
        p0, p1: ``(n, 3)`` segment ends, body-frame mm.
        r0, r1: radii at the ends (mm).
        extra: added to every radius (e.g. the airway wall thickness).
        min_radius: segments thinner than this (before ``extra``) are skipped.
    """
    sx, sy, sz = grid.spacing
    vin = max(sx, sy)
    keep = np.maximum(r0, r1) >= min_radius
    p0, p1, r0, r1 = p0[keep], p1[keep], r0[keep] + extra, r1[keep] + extra
    if p0.shape[0] == 0:
        return
    length = np.linalg.norm(p1 - p0, axis=1)
    rmin = np.minimum(r0, r1)
    reff_min = np.maximum(rmin, 0.5 * vin)
    step = np.maximum(0.5 * reff_min, 0.35 * vin)
    nsamp = np.maximum(1, np.ceil(length / step).astype(int) + 1)
    seg = np.repeat(np.arange(p0.shape[0]), nsamp)
    first = np.cumsum(nsamp) - nsamp
    t = (np.arange(seg.size) - first[seg]) / np.maximum(nsamp[seg] - 1, 1)
    pts = p0[seg] + t[:, None] * (p1[seg] - p0[seg])
    rad = r0[seg] + t * (r1[seg] - r0[seg])
    reff = np.maximum(rad, 0.5 * vin)
    amp = np.minimum(1.0, (rad / reff) ** 2)
    idx = grid.to_index(pts)  # (z, y, x) continuous
    kz = np.ceil(reff / sz + 0.5).astype(int)
    kxy = np.ceil(reff / min(sx, sy) + 0.5).astype(int)
    shape = np.array(out.shape)
    strides = np.array([shape[1] * shape[2], shape[2], 1])
    flat = out.reshape(-1)
    spacing_zyx = np.array([sz, sy, sx], dtype=np.float32)
    for key in np.unique(kz * 1000 + kxy):
        g = np.flatnonzero(kz * 1000 + kxy == key)
        a, c = int(key // 1000), int(key % 1000)
        oz, oy, ox = np.meshgrid(
            np.arange(-a, a + 1), np.arange(-c, c + 1), np.arange(-c, c + 1), indexing="ij"
        )
        offs = np.stack([oz.ravel(), oy.ravel(), ox.ravel()], axis=1)
        offs_mm = offs.astype(np.float32) * spacing_zyx
        offs_lin = offs @ strides
        reach = np.array([a, c, c])
        per = max(1, chunk // offs.shape[0])
        for s in range(0, g.size, per):
            gg = g[s : s + per]
            base = np.rint(idx[gg]).astype(np.int64)
            frac_mm = ((idx[gg] - base) * spacing_zyx).astype(np.float32)
            d2 = (offs_mm[None, :, 0] - frac_mm[:, 0:1]) ** 2
            d2 += (offs_mm[None, :, 1] - frac_mm[:, 1:2]) ** 2
            d2 += (offs_mm[None, :, 2] - frac_mm[:, 2:3]) ** 2
            r_s = reff[gg].astype(np.float32)[:, None]
            val = amp[gg].astype(np.float32)[:, None] * np.clip(
                0.5 + (r_s - np.sqrt(d2)) / vin, 0.0, 1.0
            )
            ok = val > 0.004
            if np.any(base - reach < 0) or np.any(base + reach >= shape):
                for ax in range(3):
                    pos = base[:, ax : ax + 1] + offs[None, :, ax]
                    ok &= (pos >= 0) & (pos < shape[ax])
            lin = (base @ strides)[:, None] + offs_lin[None, :]
            np.maximum.at(flat, lin[ok], val[ok])
