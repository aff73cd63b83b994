"""A procedural chest: body, fat, muscle, ribs, spine, sternum, heart, mediastinum and lungs.

Everything is defined analytically in a *body frame* (millimetres): ``x`` towards the patient's
left (image right), ``y`` towards the back (image down), ``z`` towards the head, with ``x = y = 0``
at the centre of the body outline and ``z = 0`` at the lung apex (the lungs reach down to
``z = -height``). This is the LPS world frame shifted, so a scan with identity direction shows
the usual radiological view.

Each structure is a (approximate) signed distance in mm, negative inside. Soft partial-volume
edges come from clipping ``0.5 - sdf / voxel`` to [0, 1], which keeps coarse test scans from
looking like staircases. The same functions give the ground-truth lung mask on any grid, e.g. a
coarse one for placing nodules and growing vessel trees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TISSUE_HU = {
    "air": -1000.0,
    "fat": -100.0,
    "muscle": 45.0,
    "blood": 40.0,
    "liver": 58.0,
    "bone_cortex": 900.0,
    "bone_marrow": 230.0,
    "cartilage": 125.0,
    "disc": 85.0,
    "csf": 15.0,
    "table_shell": 180.0,
    "foam": -930.0,
}
"""Typical unenhanced CT values (HU) of the tissues drawn here."""


@dataclass(frozen=True)
class Rib:
    """One rib as a curve around the chest wall.

    The rib follows the inner chest-wall ellipse of its slice, offset outwards, from polar angle
    ``theta_post`` (beside the spine) to ``theta_ant``; polar angle 0 is lateral, +pi/2
    posterior. Its centre drops ``drop`` mm from back to front, as real ribs slope down.
    """

    side: int  # -1 patient right, +1 patient left
    z_post: float
    drop: float
    theta_post: float
    theta_ant: float
    theta_cartilage: float  # anterior of this angle the rib is costal cartilage
    half_height: float  # vertical half-size (mm)
    half_width: float  # radial half-size (mm)
    shape_var: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    """Relative change of height and width along the rib: (amp_h, phase_h, amp_w, phase_w)."""

    def size_at(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Half-height and half-width (mm) at polar angles ``theta``: ribs are flatter and
        taller in front, rounder at the back, and no two alike."""
        ah, ph, aw, pw = self.shape_var
        front = np.clip((self.theta_post - theta) / (self.theta_post + 1.42), 0.0, 1.0)
        hh = self.half_height * (0.85 + 0.3 * front + ah * np.sin(2.5 * theta + ph))
        hw = self.half_width * (1.1 - 0.25 * front + aw * np.sin(3.0 * theta + pw))
        return hh, hw


@dataclass(frozen=True)
class Tube:
    """A polyline tube (aorta, trachea, ...): points (n, 3) body-frame mm and radii (n,)."""

    name: str
    points: np.ndarray
    radii: np.ndarray


@dataclass(frozen=True)
class Anatomy:
    """All parameters of one synthetic chest (body frame, mm). Made by :func:`sample_anatomy`."""

    height: float  # lung apex to deepest costophrenic recess
    body_a: float  # body half-width
    body_b: float  # body half-depth (anterior-posterior)
    fat: float  # subcutaneous fat thickness
    muscle: float  # chest-wall muscle thickness (outside the ribs)
    cav_a: float  # half-width of the pleural cavity (both lungs) at full size
    cav_b: float  # half-depth of the pleural cavity
    cav_cy: float  # cavity centre y
    apex_x: float  # |x| of each lung apex
    apex_y: float
    apex_radius: float  # curvature radius of the apical dome
    med_x: float  # mediastinum centre line
    med_w: float  # mediastinum half-width between the lungs
    med_bulge: float  # extra half-width at the level of the great vessels
    dome_top: tuple[float, float]  # diaphragm dome height above the base, (right, left)
    heart_c: tuple[float, float, float]
    heart_r: tuple[float, float, float]
    heart_angle: float  # in-plane rotation of the heart's long axis (rad)
    heart_tilt: float  # downward tilt of the long axis towards the apex (rad)
    pericardial_fat: float
    spine_y: float  # vertebral body centre y
    spine_r: tuple[float, float]  # vertebral body half-axes (x, y)
    vertebra_period: float
    vertebra_phase: float
    ribs: tuple[Rib, ...]
    tubes: tuple[Tube, ...]  # great vessels, trachea, main bronchi, oesophagus
    hilum: dict[str, np.ndarray] = field(default_factory=dict)
    lung_hu: float = -860.0
    lung_gradient: float = 45.0  # HU denser at the back (gravity-dependent lung)
    fat_hu: float = -100.0
    muscle_hu: float = 45.0
    table_gap: float = 8.0
    has_table: bool = True
    skin_harmonics: tuple[tuple[int, float, float], ...] = ()  # (order, mm, phase)
    muscle_harmonics: tuple[tuple[int, float, float], ...] = ()
    # Heart chambers as ellipsoids in the heart's own frame, in units of ``heart_r``:
    # ((cu, cv, cw), (ru, rv, rw)) each; merged smoothly into one lobulated outline.
    heart_lobes: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = ()
    # Bulges of the body outline: (polar angle of the centre, angular width, mm, z where it is
    # full, z where it has faded out); the angle is that of the body ellipse, -pi/2 in front.
    body_bumps: tuple[tuple[float, float, float, float, float], ...] = ()
    back_flatness: float = 2.7  # superellipse exponent of the back half of the outline
    # Oblique fissure of each lung (right, left): (z at the back, z at the front, lateral tilt
    # mm per mm of |x|, bow mm); horizontal fissure of the right lung: (z, dz/dy, dz/dx).
    oblique: tuple[tuple[float, float, float, float], ...] = ()
    horizontal: tuple[float, float, float] = (0.0, 0.0, 0.0)

    # === Shape functions (vectorised over broadcastable x, y, z arrays) ===

    def taper(self, z: np.ndarray) -> np.ndarray:
        """Cavity scale (0..1) with height: small near the apex, full from mid-lung down."""
        t = np.clip(-z / self.height, 0.0, 1.3)
        return (0.4 + 0.6 * np.clip(t / 0.6, 0.0, 1.0) ** 0.5).astype(np.float32)

    def cavity(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pleural cavity ellipse (centre y, half-width, half-depth) at height(s) ``z``."""
        w = self.taper(z)
        cy = self.cav_cy + (1.0 - w) * 0.25 * self.cav_b
        return cy, self.cav_a * w, self.cav_b * (0.35 + 0.65 * w)

    def diaphragm_z(self, side: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Height of the diaphragm dome under the lung on ``side`` (-1 right, +1 left)."""
        top = self.dome_top[0] if side < 0 else self.dome_top[1]
        xd = side * 0.45 * self.cav_a
        yd = self.cav_cy - 0.1 * self.cav_b
        q = ((x - xd) / (0.62 * self.cav_a)) ** 2 + ((y - yd) / (0.85 * self.cav_b)) ** 2
        dome = np.clip(1.0 - q, 0.0, 1.0) ** 0.55
        return (-self.height + top * dome).astype(np.float32)

    def mediastinum_halfwidth(self, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Half-width of the mediastinum: narrow at the apices, wide around the great vessels."""
        t = -z / self.height
        window = np.clip((t - 0.08) / 0.1, 0.0, 1.0) * np.clip((0.66 - t) / 0.12, 0.0, 1.0)
        y_gv = self.cav_cy - 0.22 * self.cav_b
        bulge = self.med_bulge * window * np.exp(-(((y - y_gv) / (0.42 * self.cav_b)) ** 2))
        # Below the carina the lungs are kept apart behind the heart by the posterior
        # mediastinum (oesophagus, descending aorta, azygos, lymph nodes), not a thin line.
        y_pm = self.spine_y - self.spine_r[1] - 18.0
        low = np.clip((t - 0.4) / 0.08, 0.0, 1.0)
        post = 0.11 * self.cav_a * low * np.exp(-(((y - y_pm) / (0.3 * self.cav_b)) ** 2))
        return (self.med_w + bulge + post).astype(np.float32)

    def heart_sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Signed distance to the heart, mm: its chambers (rotated ellipsoids) merged smoothly.

        Only the heart's bounding box is computed when the inputs are axis-aligned coordinate
        vectors (as on a grid); elsewhere the distance is a large positive number.
        """
        reach = 1.6 * max(self.heart_r) + 10.0
        return _boxed(self._heart_sdf, self.heart_c, reach, x, y, z)

    def _heart_sdf(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        cx, cy, cz = self.heart_c
        c, s = np.cos(self.heart_angle), np.sin(self.heart_angle)
        u = (x - cx) * c + (y - cy) * s
        v = -(x - cx) * s + (y - cy) * c
        # The long axis also points down towards the apex (tilted in the coronal plane).
        ct, st = np.cos(self.heart_tilt), np.sin(self.heart_tilt)
        w = z - cz
        uu, ww = u * ct - w * st, u * st + w * ct
        ra, rb, rc = self.heart_r
        lobes = self.heart_lobes or (((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),)
        out = None
        for (pu, pv, pw), (su, sv, sw) in lobes:
            d = ellipsoid_sdf(uu - pu * ra, v - pv * rb, ww - pw * rc, su * ra, sv * rb, sw * rc)
            out = d if out is None else _smooth_union(out, d, 7.0)
        return out

    def spine_sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed distance to the vertebral bodies (a vertical elliptic column), mm."""
        return ellipse_sdf(x, y, 0.0, self.spine_y, *self.spine_r)

    def lung_sdf(
        self, x: np.ndarray, y: np.ndarray, z: np.ndarray, heart: np.ndarray | None = None
    ) -> tuple[np.ndarray, ...]:
        """Signed distances (mm) to the right and left lung, each negative inside.

        ``heart``: :meth:`heart_sdf` at the same points, if already computed.
        """
        cy, a, b = self.cavity(z)
        cav = ellipse_sdf(x, y, 0.0, cy, a, b)
        if heart is None:
            heart = self.heart_sdf(x, y, z)
        heart = -(heart - self.pericardial_fat - 2.0)
        spine = -(self.spine_sdf(x, y) - 5.0)
        top = z.astype(np.float32) + 0 * x
        half = self.mediastinum_halfwidth(y, z)
        out = []
        for side in (-1, 1):
            band = half - side * (x - self.med_x)
            dz = self.diaphragm_z(side, x, y) - z
            # The apex is a dome: at depth h below it the lung is a disc of radius
            # sqrt(2 R h), so the top of each lung is round, not cut flat.
            h = np.maximum(-z, 0.0)
            r_apex = np.sqrt(2.0 * self.apex_radius * h)
            apex = np.hypot(x - side * self.apex_x, y - self.apex_y) - r_apex
            sdf = np.maximum.reduce(
                [
                    np.broadcast_to(v, np.broadcast_shapes(cav.shape, band.shape, dz.shape))
                    for v in (cav, band, dz, heart, spine, apex, top)
                ]
            )
            out.append(sdf.astype(np.float32))
        return tuple(out)

    def fissure_sdf(
        self, side: int, x: np.ndarray, y: np.ndarray, z: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Signed distances (mm) to the oblique and horizontal fissure of one lung.

        The oblique (major) fissure runs from high at the back (about the level of the fourth
        vertebra) down and forwards to the front of the diaphragm, bowed slightly; positive is
        the upper-lobe side (above and in front). The horizontal (minor) fissure of the right
        lung is nearly level at about the fourth costal cartilage, positive above it; the left
        lung has none (its distance is a large positive number).
        """
        cy, b = self.cav_cy, self.cav_b
        z_post, z_front, tilt, bow = self.oblique[0 if side < 0 else 1]
        s = np.clip((y - (cy - b)) / (2.0 * b), -0.2, 1.2)
        slope = (z_post - z_front) / (2.0 * b)
        z_obl = z_front + (z_post - z_front) * s + bow * 4.0 * s * (1.0 - s) + tilt * np.abs(x)
        d_obl = (z - z_obl) / np.sqrt(1.0 + slope * slope)
        if side > 0:
            return d_obl.astype(np.float32), np.full_like(d_obl, 1e3, dtype=np.float32)
        zh, gy, gx = self.horizontal
        d_h = (z - (zh + gy * (y - cy) + gx * (np.abs(x) - 0.5 * self.cav_a))) / np.sqrt(
            1.0 + gy * gy + gx * gx
        )
        return d_obl.astype(np.float32), d_h.astype(np.float32)

    def lobe_of(self, side: int, pts: np.ndarray) -> np.ndarray:
        """Lobe index of body-frame points ``(n, 3)`` in one lung: 0 lower, 1 upper, 2 middle."""
        d_obl, d_h = self.fissure_sdf(side, pts[:, 0], pts[:, 1], pts[:, 2])
        lobe = np.where(d_obl < 0, 0, 1)
        return np.where((lobe == 1) & (d_h < 0), 2, lobe).astype(np.int64)

    def fissure_distance(self, side: int, x: np.ndarray, y: np.ndarray, z: np.ndarray):
        """Unsigned distance (mm) to the nearest fissure sheet of one lung."""
        d_obl, d_h = self.fissure_sdf(side, x, y, z)
        # The horizontal fissure ends where it meets the oblique one, in front of it.
        d_h = np.where(d_obl > 0, np.abs(d_h), 1e3)
        return np.minimum(np.abs(d_obl), d_h)

    def lung_labels(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Ground-truth lungs on a grid: 0 outside, 1 right lung, 2 left lung (uint8)."""
        right, left = self.lung_sdf(x, y, z)
        lab = np.zeros(right.shape, dtype=np.uint8)
        lab[right < 0] = 1
        lab[left < 0] = 2
        return lab


# === Signed-distance helpers =====================================================================


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (union with a fillet of size ``k`` mm)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return (b + (a - b) * h - k * h * (1.0 - h)).astype(np.float32)


def _boxed(fn, centre, reach: float, x, y, z, far: float = 1e3) -> np.ndarray:
    """``fn(x, y, z)`` evaluated only within ``reach`` mm of ``centre`` (``far`` elsewhere).

    Works on coordinate arrays that each vary along at most one axis (grid vectors set up for
    broadcasting); anything else is evaluated everywhere.
    """
    arrs = [np.asarray(a, dtype=np.float32) for a in (x, y, z)]
    shape = np.broadcast_shapes(*(a.shape for a in arrs))
    nd = len(shape)
    arrs = [a.reshape((1,) * (nd - a.ndim) + a.shape) for a in arrs]
    box = [slice(None)] * nd
    for a, c in zip(arrs, centre, strict=True):
        axes = [i for i, n in enumerate(a.shape) if n > 1]
        if len(axes) > 1:
            return fn(*arrs)
        v = a.reshape(-1)
        ok = np.flatnonzero(np.abs(v - c) <= reach)
        if ok.size == 0:
            return np.full(shape, far, dtype=np.float32)
        if axes:
            box[axes[0]] = slice(int(ok[0]), int(ok[-1]) + 1)
    subs = [a[tuple(box[i] if a.shape[i] > 1 else slice(None) for i in range(nd))] for a in arrs]
    out = np.full(shape, far, dtype=np.float32)
    out[tuple(box)] = fn(*subs)
    return out


def ellipse_sdf(x, y, cx, cy, a, b) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipse; exact on the boundary.

    ``(rho - 1) / |grad rho|`` with ``rho`` the normalised radius: first-order accurate near the
    edge, where soft edges and small margins need it, and of the right sign everywhere.
    """
    u = (x - cx) / a
    v = (y - cy) / b
    rho = np.sqrt(u * u + v * v)
    grad = np.sqrt((u / a) ** 2 + (v / b) ** 2) / np.maximum(rho, 1e-6)
    return ((rho - 1.0) / np.maximum(grad, 1e-6)).astype(np.float32)


def ellipsoid_sdf(u, v, w, a, b, c) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid centred at 0."""
    p, q, r = u / a, v / b, w / c
    rho = np.sqrt(p * p + q * q + r * r)
    grad = np.sqrt((p / a) ** 2 + (q / b) ** 2 + (r / c) ** 2) / np.maximum(rho, 1e-6)
    return ((rho - 1.0) / np.maximum(grad, 1e-6)).astype(np.float32)


def superellipse_sdf(x, y, cx, cy, a, b, p) -> np.ndarray:
    """Approximate signed distance to ``|u|^p + |v|^p = 1`` (p > 2 is boxier), mm."""
    u = np.abs((x - cx) / a) + 1e-9
    v = np.abs((y - cy) / b) + 1e-9
    rho = (u**p + v**p) ** (1.0 / p)
    du = (u / rho) ** (p - 1) / a
    dv = (v / rho) ** (p - 1) / b
    return ((rho - 1.0) / np.maximum(np.sqrt(du * du + dv * dv), 1e-6)).astype(np.float32)


def soft(sdf: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume occupancy (0..1) of a voxel of size ``width`` mm from a signed distance."""
    return np.clip(0.5 - sdf / width, 0.0, 1.0).astype(np.float32)


# === Sampling ====================================================================================


FOV_CENTRE_OFFSET = 0.0583
"""Largest distance, as a fraction of the field of view, between the reconstruction centre and
the pleural cavity's centre (``sample_acquisition`` puts the centre up to 0.03 FOV sideways and
0.05 FOV behind the body centre: sqrt(0.03^2 + 0.05^2))."""
SMALL_ADULT_HALF_WIDTH = 135.0
"""A full-size body is shrunk to fit its field of view only down to this half-width (mm); in a
smaller field of view it is cropped at the edges, as on real small-FOV reconstructions."""


def sample_anatomy(rng: np.random.Generator, size: str, fov_mm: float) -> Anatomy:
    """Draw one plausible adult chest for a reconstruction field of view of ``fov_mm``.

    The body fits inside the field of view where an adult can (half-width <= 0.455 FOV). On
    full-size scans with a small field of view (LUNA16 has them down to ~236 mm) the body is
    cropped at the edges instead of shrunk to a child's, but the lungs always stay inside the
    reconstruction circle with 5 mm to spare, wherever ``sample_acquisition`` puts its centre.
    """
    small = size == "small"
    height = rng.uniform(165, 205) if small else rng.uniform(220, 268)
    body_a = rng.uniform(148, 178) if not small else rng.uniform(135, 162)
    fits = 0.455 * fov_mm
    body_a = min(body_a, fits if small else max(fits, SMALL_ADULT_HALF_WIDTH))
    depth_ratio = rng.uniform(0.64, 0.74)
    fat_per_165 = rng.uniform(5, 22)
    muscle = rng.uniform(5, 10)
    if not small:
        # cav_a = body_a * (1 - fat_per_165 / 165) - muscle - 11 (below) must not exceed this.
        max_cav_a = (0.5 - FOV_CENTRE_OFFSET) * fov_mm - 5.0
        body_a = min(body_a, (max_cav_a + muscle + 11.0) / (1.0 - fat_per_165 / 165))
    body_b = body_a * depth_ratio
    fat = fat_per_165 * (body_a / 165)
    wall = fat + muscle + 11.0  # ribs and intercostal muscle
    cav_a = body_a - wall
    cav_b = body_b - wall + 2.0
    cav_cy = 0.09 * cav_b
    med_x = rng.uniform(-3, 7)
    med_w = rng.uniform(1.5, 3.0)  # a thin junction line where nothing else separates the lungs
    # Long axis pointing forward and to the left; a flattened ellipsoid, not a ball.
    heart_r = (rng.uniform(0.5, 0.56) * cav_a, rng.uniform(0.5, 0.58) * cav_b, height * 0.17)
    heart_c = (
        med_x + rng.uniform(0.14, 0.22) * cav_a,
        cav_cy - 0.38 * cav_b,
        -height * rng.uniform(0.70, 0.76),
    )
    spine_r = (rng.uniform(16, 20), rng.uniform(13, 16))
    # The vertebral bodies bulge into the back of the chest; the lungs wrap round them into the
    # paravertebral gutters.
    spine_y = cav_cy + cav_b * 0.74
    an = dict(
        height=height,
        body_a=body_a,
        body_b=body_b,
        fat=fat,
        muscle=muscle,
        cav_a=cav_a,
        cav_b=cav_b,
        cav_cy=cav_cy,
        apex_x=0.42 * cav_a,
        apex_y=cav_cy + 0.18 * cav_b,
        apex_radius=rng.uniform(32, 42),
        med_x=med_x,
        med_w=med_w,
        med_bulge=rng.uniform(0, 6),
        dome_top=(height * rng.uniform(0.19, 0.25), height * rng.uniform(0.15, 0.2)),
        heart_c=heart_c,
        heart_r=heart_r,
        heart_angle=np.deg2rad(rng.uniform(-42, -30)),
        heart_tilt=np.deg2rad(rng.uniform(20, 35)),
        pericardial_fat=rng.uniform(2.5, 6.0),
        spine_y=spine_y,
        spine_r=spine_r,
        vertebra_period=height / rng.uniform(9.5, 10.5),
        vertebra_phase=rng.uniform(0, 1),
        lung_hu=rng.uniform(-880, -835),
        lung_gradient=rng.uniform(25, 60),
        fat_hu=rng.uniform(-110, -90),
        muscle_hu=rng.uniform(38, 52),
        table_gap=rng.uniform(3, 14),
        has_table=bool(rng.random() < 0.85),
        skin_harmonics=tuple(
            (k, float(rng.uniform(0, 5.0) / k**0.5), float(rng.uniform(0, 2 * np.pi)))
            for k in range(2, 7)
        ),
        muscle_harmonics=tuple(
            (k, float(rng.uniform(0, 0.4) * fat / k**0.3), float(rng.uniform(0, 2 * np.pi)))
            for k in range(2, 6)
        ),
    )
    ribs = _sample_ribs(rng, height)
    tubes, hilum = _great_vessels_and_airways(rng, an)
    tubes += _clavicles(rng, an)
    an["heart_lobes"] = _heart_lobes(rng)
    an["body_bumps"] = _body_bumps(rng, height)
    an["back_flatness"] = float(rng.uniform(2.9, 3.8))
    an["skin_harmonics"] = an["skin_harmonics"] + tuple(
        (k, float(rng.uniform(0, 1.2)), float(rng.uniform(0, 2 * np.pi))) for k in range(7, 13)
    )
    an["oblique"] = tuple(
        (
            -height * float(rng.uniform(0.2, 0.3)),
            -height * float(rng.uniform(0.85, 0.98)),
            float(rng.uniform(-0.15, 0.1)),
            float(rng.uniform(-12.0, 12.0)),
        )
        for _ in range(2)
    )
    an["horizontal"] = (
        -height * float(rng.uniform(0.42, 0.52)),
        float(rng.uniform(-0.12, 0.12)),
        float(rng.uniform(-0.1, 0.1)),
    )
    return Anatomy(ribs=tuple(ribs), tubes=tuple(tubes), hilum=hilum, **an)


def _body_bumps(rng: np.random.Generator, height: float) -> tuple:
    """Muscle and shoulder bulges of the body outline, strongest in the upper chest.

    Pectoral muscles bulge in front on either side of the sternum, the shoulders and axillary
    folds widen the outline at the top, the scapulae and their muscles round the upper back,
    and the paraspinal muscles make two low ridges beside a midline groove at every level.
    Sizes and positions differ per scan and a little between sides.
    """
    bumps = []
    top, never = 80.0, -1e4
    for side in (-1, 1):
        # Angle on the body ellipse: 0 lateral on the patient's left (image right), -pi/2 front.
        def at(angle: float, side: int = side) -> float:
            return angle if side > 0 else float(np.pi - angle)

        pect = float(rng.uniform(3.0, 11.0))
        bumps.append(
            (
                at(-rng.uniform(0.55, 0.85)),
                float(rng.uniform(0.28, 0.4)),
                pect,
                -height * 0.15,
                -height * rng.uniform(0.55, 0.7),
            )
        )
        bumps.append(
            (
                at(rng.uniform(-0.15, 0.1)),
                float(rng.uniform(0.3, 0.45)),
                float(rng.uniform(6.0, 18.0)),
                -height * 0.02,
                -height * rng.uniform(0.22, 0.32),
            )
        )
        bumps.append(
            (
                at(rng.uniform(0.75, 1.05)),
                float(rng.uniform(0.25, 0.35)),
                float(rng.uniform(2.0, 7.0)),
                -height * 0.2,
                -height * rng.uniform(0.5, 0.65),
            )
        )
        bumps.append((at(rng.uniform(1.25, 1.38)), 0.12, float(rng.uniform(2.0, 5.0)), top, never))
    # The midline groove of the back between the paraspinal ridges.
    bumps.append((float(np.pi / 2), 0.07, -float(rng.uniform(1.0, 3.5)), top, never))
    return tuple(tuple(float(v) for v in b) for b in bumps)


def _heart_lobes(rng: np.random.Generator) -> tuple:
    """Chambers in the heart frame (u: long axis to the apex, v: posterior, w: up).

    Ventricles make the bulk, the left one forming the rounded apex; the right atrium bulges to
    the patient's right, the left atrium sits high at the back. Jittered per scan, so no two
    hearts have the same outline.
    """

    def j(scale: float = 0.06) -> float:
        return float(rng.normal(0.0, scale))

    lobes = [
        ((0.0, 0.0, 0.0), (0.8 + j(), 0.82 + j(), 0.85 + j())),  # ventricles
        ((0.25 + j(), 0.1 + j(), -0.08 + j()), (0.66 + j(), 0.64 + j(), 0.7 + j())),  # LV apex
        ((-0.05 + j(), -0.36 + j(), 0.05 + j()), (0.66 + j(), 0.44 + j(), 0.66 + j())),  # RV
        ((-0.58 + j(), 0.05 + j(), 0.25 + j()), (0.4 + j(), 0.5 + j(), 0.5 + j())),  # RA
        ((-0.3 + j(), 0.72 + j(), 0.4 + j()), (0.5 + j(), 0.36 + j(), 0.42 + j())),  # LA
    ]
    return tuple(
        (tuple(float(v) for v in c), tuple(float(max(v, 0.2)) for v in r)) for c, r in lobes
    )


def _clavicles(rng: np.random.Generator, an: dict) -> list[Tube]:
    """Collar bones: from the top of the sternum out and back over the lung apices."""
    H, a, b, cy = an["height"], an["cav_a"], an["cav_b"], an["cav_cy"]
    z0 = -0.13 * H + rng.uniform(2, 8)
    out = []
    for side in (-1, 1):
        pts = [
            [side * 14.0, cy - 0.72 * b - 12, z0],
            [side * 0.45 * a, cy - 0.78 * b - 10, z0 + 10],
            [side * 0.85 * a, cy - 0.45 * b, z0 + 22],
            [side * 1.05 * a, cy - 0.1 * b, z0 + 24],
        ]
        r = rng.uniform(5.5, 7.0)
        out.append(Tube(f"clavicle_{side}", np.asarray(pts), np.array([r * 1.1, r, r * 0.9, r])))
    return out


def _sample_ribs(rng: np.random.Generator, height: float) -> list[Rib]:
    ribs = []
    gap = height * rng.uniform(0.088, 0.096)
    z0 = -rng.uniform(2, 10)
    for k in range(12):
        for side in (-1, 1):
            z_post = z0 - k * gap + rng.normal(0, 1.0)
            # Upper ribs are short and flat, middle ribs long and steep, the last two float.
            drop = (0.55 + 0.45 * min(k, 5) / 5) * rng.uniform(60, 78)
            if k <= 6:
                theta_ant, theta_cart = -1.42, -1.0 + 0.05 * k
            elif k <= 9:
                theta_ant, theta_cart = -1.05 + 0.1 * (k - 7), -0.75
            else:
                theta_ant, theta_cart = -0.35, -1.5
            ribs.append(
                Rib(
                    side=side,
                    z_post=z_post,
                    drop=drop,
                    theta_post=1.32,
                    theta_ant=theta_ant,
                    theta_cartilage=theta_cart,
                    half_height=rng.uniform(5.0, 6.5) * (0.8 if k == 0 else 1.0),
                    half_width=rng.uniform(3.4, 4.4),
                    shape_var=(
                        float(rng.uniform(0.0, 0.15)),
                        float(rng.uniform(0, 2 * np.pi)),
                        float(rng.uniform(0.0, 0.15)),
                        float(rng.uniform(0, 2 * np.pi)),
                    ),
                )
            )
    return ribs


def _great_vessels_and_airways(
    rng: np.random.Generator, an: dict
) -> tuple[list[Tube], dict[str, np.ndarray]]:
    """Aorta, pulmonary trunk and arteries, veins to the left atrium, SVC, trachea, bronchi."""
    H = an["height"]
    b = an["cav_b"]
    cy = an["cav_cy"]
    mx = an["med_x"]
    hx, hy, hz = an["heart_c"]
    ha, hb, hc = an["heart_r"]
    sy = an["spine_y"]
    sr = an["spine_r"][1]
    top = 60.0  # above the apex: tubes run off the top of any scan
    bottom = -H - 60.0
    carina_z = -H * rng.uniform(0.36, 0.42)
    tr_y = sy - sr - rng.uniform(22, 28)
    # Adult tracheal lumen: 13-25 mm across (narrower in women), a little oval.
    tr_r = rng.uniform(6.8, 10.0)
    tr_dx = rng.uniform(0.5, 6.0)  # the arch pushes the trachea a little to the right
    # Going down it runs backwards from the thoracic inlet, and wanders a few mm sideways.
    tr_back = rng.uniform(6.0, 16.0)
    tr_wx = rng.normal(0.0, 2.5, 2)

    def tube(name, pts, radii):
        return Tube(name, np.asarray(pts, dtype=np.float64), np.asarray(radii, dtype=np.float64))

    hilum = {
        # Main bronchi run out and down in about the trachea's coronal plane (the right one
        # short and steep, the left longer and flatter); arteries and veins meet them there.
        "right": np.array([mx - rng.uniform(30, 36), tr_y + 2.0, carina_z - 30.0]),
        "left": np.array([mx + rng.uniform(38, 46), tr_y + 4.0, carina_z - 36.0]),
        # The right pulmonary artery runs in front of its bronchus, the left one arches over.
        "artery_right": np.array([mx - rng.uniform(30, 36), tr_y - 14.0, carina_z - 24.0]),
        "artery_left": np.array([mx + rng.uniform(38, 46), tr_y - 2.0, carina_z - 22.0]),
        "vein_right": np.array([mx - rng.uniform(26, 32), cy - 0.05 * b, carina_z - 58.0]),
        "vein_left": np.array([mx + rng.uniform(30, 36), cy + 0.0 * b, carina_z - 52.0]),
    }
    asc_r = rng.uniform(13, 16)
    desc_r = asc_r * rng.uniform(0.78, 0.88)
    desc_x = mx + rng.uniform(16, 22)
    desc_y = sy - sr * 0.6
    arch_z = -H * rng.uniform(0.17, 0.22)
    la = np.array([hx - 0.2 * ha, hy + 0.65 * hb, hz + 0.25 * hc])
    tubes = [
        tube(
            "trachea",
            [
                [mx + tr_wx[0], tr_y - tr_back, top],
                [mx + 0.5 * tr_wx[1], tr_y - 0.75 * tr_back, 0.3 * top],
                [mx - 0.5 * tr_dx + tr_wx[1], tr_y - 0.5 * tr_back, 0.5 * arch_z],
                [mx - 1.2 * tr_dx, tr_y - 0.22 * tr_back, arch_z],
                [mx - 0.9 * tr_dx, tr_y - 0.08 * tr_back, 0.5 * (arch_z + carina_z)],
                [mx - 0.3 * tr_dx, tr_y, carina_z],
            ],
            # Slightly narrowed where the arch indents it, widening towards the carina.
            [tr_r, tr_r, tr_r * 0.97, tr_r * 0.9, tr_r * 0.96, tr_r],
        ),
        tube(
            "bronchus_right",
            [
                [mx - 0.3 * tr_dx, tr_y, carina_z],
                [mx - 12, tr_y + 1, carina_z - 14],
                [mx - 20, tr_y + 1.5 + rng.normal(0, 2), carina_z - 23 + rng.normal(0, 2)],
                hilum["right"],
            ],
            [tr_r * 0.75, tr_r * 0.7, tr_r * 0.66, tr_r * 0.62],
        ),
        tube(
            "bronchus_left",
            [
                [mx - 0.3 * tr_dx, tr_y, carina_z],
                [mx + 16, tr_y + 2, carina_z - 12],
                [mx + 28, tr_y + 3 + rng.normal(0, 2), carina_z - 22 + rng.normal(0, 2)],
                hilum["left"],
            ],
            [tr_r * 0.7, tr_r * 0.64, tr_r * 0.6, tr_r * 0.56],
        ),
        tube(
            "aorta",
            [
                [hx - 0.35 * ha, hy + 0.1 * hb, hz + 0.55 * hc],
                [mx - 2, cy - 0.28 * b, carina_z + 5],
                [mx + 2, cy - 0.05 * b, arch_z],
                [desc_x - 4, desc_y - 20, arch_z - 4],
                [desc_x, desc_y, carina_z - 5],
                [desc_x - 3, desc_y - 4, bottom],
            ],
            [asc_r, asc_r, asc_r * 0.95, desc_r, desc_r, desc_r * 0.95],
        ),
        tube(
            "pulmonary_trunk",
            [
                [hx + 0.05 * ha, hy - 0.55 * hb, hz + 0.5 * hc],
                [mx + 16, cy - 0.25 * b, carina_z - 22],
                [mx + 10, cy - 0.05 * b, carina_z - 16],
            ],
            [asc_r * 0.95, asc_r * 0.95, asc_r * 0.85],
        ),
        tube(
            "artery_right",
            [[mx + 10, cy - 0.05 * b, carina_z - 16], hilum["artery_right"]],
            [asc_r * 0.58, asc_r * 0.42],
        ),
        tube(
            "artery_left",
            [
                [mx + 10, cy - 0.05 * b, carina_z - 16],
                [mx + 20, cy, carina_z - 8],
                hilum["artery_left"],
            ],
            [asc_r * 0.56, asc_r * 0.5, asc_r * 0.42],
        ),
        # Branches of the arch and the veins of the thoracic inlet.
        tube(
            "brachiocephalic_artery",
            [
                [mx + 0, cy - 0.12 * b, arch_z + 4],
                [mx - 12, cy - 0.22 * b, -30],
                [mx - 22, cy - 0.2 * b, top],
            ],
            [6.5, 6.0, 5.5],
        ),
        tube(
            "left_carotid",
            [[mx + 6, cy - 0.02 * b, arch_z + 6], [mx + 12, cy - 0.12 * b, top]],
            [4.5, 4.2],
        ),
        tube(
            "left_subclavian",
            [
                [mx + 12, cy + 0.08 * b, arch_z + 4],
                [mx + 24, cy + 0.1 * b, -18],
                [mx + 55, cy - 0.05 * b, 5],
                [mx + 110, cy - 0.1 * b, 20],
            ],
            [5.0, 5.0, 4.8, 4.8],
        ),
        tube(
            "left_brachiocephalic_vein",
            [
                [mx + 60, cy - 0.3 * b, 0],
                [mx + 20, cy - 0.42 * b, arch_z + 14],
                [mx - 22, cy - 0.2 * b, arch_z + 4],
            ],
            [6.0, 5.5, 6.5],
        ),
        tube(
            "azygos",
            [
                [mx - 6, sy - sr - 1, bottom],
                [mx - 7, sy - sr, carina_z + 2],
                [mx - 14, tr_y, carina_z + 10],
                [mx - 24, cy - 0.12 * b, carina_z + 8],
            ],
            [3.5, 4.0, 4.5, 5.0],
        ),
        tube("vein_right", [la, hilum["vein_right"]], [6.5, 4.8]),
        tube("vein_left", [la, hilum["vein_left"]], [6.5, 4.8]),
        tube(
            "svc",
            [[mx - 24, cy - 0.12 * b, top], [mx - 26, cy - 0.15 * b, hz + 0.45 * hc]],
            [rng.uniform(8, 11)] * 2,
        ),
        tube(
            "oesophagus",
            # Midline behind the trachea, then to the left and forwards towards the stomach.
            [
                [mx + 2, sy - sr - 7 - 0.6 * tr_back, top],
                [mx + 4, sy - sr - 8, carina_z + 10],
                [mx + 2, sy - sr - 9, carina_z - 0.2 * H],
                [mx + 14, sy - sr - 16, -0.9 * H],
                [mx + 30, sy - sr - 30, bottom],
            ],
            [6.0, 6.5, 7.5, 8.0, 9.0],
        ),
    ]
    return tubes, hilum
