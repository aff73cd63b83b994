"""Placing and drawing nodules (and the look-alike 'irrelevant findings' LUNA16 excludes).

Diameters: every finding's ``diameter_mm`` is the **equivalent-sphere diameter** of the drawn
shape, ``(6 V / pi)^(1/3)``: the library shape is scaled so its volume matches a sphere of the
sampled LUNA16 diameter. (LIDC's own per-reader size is a largest in-plane caliper, which changes
with the random 3-D rotation applied here; the volume does not.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from lungct.synth.render import BodyGrid
from lungct.synth.shapes import (
    CATEGORY_NAMES,
    GROUND_GLASS,
    PART_SOLID,
    SOLID,
    load_shape_library,
)


@dataclass
class PlannedFinding:
    """A nodule or other finding to draw, in the body frame.

    Attributes:
        centre: body-frame ``(x, y, z)`` mm.
        diameter: equivalent-sphere diameter, mm.
        category: 'solid', 'part-solid', 'ground-glass', 'calcified' or 'scar'.
        location: 'isolated', 'juxtavascular' or 'juxtapleural'.
        table: 'annotations' or 'excluded'.
        reason: for excluded findings, why ('< 3 mm', 'one reader', 'non-nodule').
        listed_diameter: the diameter written to the CSV (-1 = unknown, like LUNA16).
        shape: library index (-1 for analytic shapes).
    """

    centre: np.ndarray
    diameter: float
    category: str
    location: str
    table: str = "annotations"
    reason: str = ""
    listed_diameter: float = 0.0
    shape: int = -1
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))


def random_rotation(rng: np.random.Generator, allow_mirror: bool = True) -> np.ndarray:
    """A uniformly random 3-D rotation (from a random unit quaternion), optionally mirrored."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    r = np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
    if allow_mirror and rng.random() < 0.5:
        r[:, 0] *= -1  # LIDC outlines are not chiral; a mirror doubles the variety.
    return r


TEXTURE_MIX: dict[str, tuple[float, float, float]] = {
    "nodule": (0.889, 0.035, 0.076),
    "one reader": (0.745, 0.089, 0.166),
}
"""Probabilities of solid, part-solid and ground-glass (``CATEGORY_NAMES`` order).

Measured in the LIDC-IDRI annotation database on the LUNA16 scans by
``scripts/lidc_texture_mix.py`` (median LIDC texture rating of each nodule's readers):
``"nodule"`` is the mix of the 1187 nodules 3-4 readers marked (LUNA16's ``annotations.csv``),
``"one reader"`` that of the 1100 only 1-2 readers marked (in ``annotations_excluded.csv``).
Ground glass is twice as common among the nodules readers disagreed on. Generator versions
<= 3 drew every nodule from (0.70, 0.14, 0.16).
"""


def pick_category(rng: np.random.Generator, readers: str = "nodule") -> str:
    """A texture drawn from :data:`TEXTURE_MIX` (``readers``: 'nodule' or 'one reader')."""
    return str(rng.choice(CATEGORY_NAMES, p=TEXTURE_MIX[readers]))


READER_COUNTS: dict[int, int] = {1: 686, 2: 414, 3: 413, 4: 774}
"""How many LIDC-IDRI nodules >= 3 mm on the LUNA16 scans 1, 2, 3 and 4 of the four readers
marked, measured in the LIDC annotation database by ``scripts/lidc_reader_counts.py`` (each
reader's outlines clustered into nodules as ``scripts/lidc_texture_mix.py`` does). LUNA16's
``annotations.csv`` holds the 3-4-reader nodules, ``annotations_excluded.csv`` the 1-2-reader
ones (among other findings)."""


def reader_count_mix(readers: str = "nodule") -> dict[int, float]:
    """The probability of each reader count among LUNA16's nodules (``readers="nodule"``: 3
    or 4, the annotations) or among the nodules it excluded for want of readers (``"one
    reader"``: 1 or 2), from :data:`READER_COUNTS`."""
    counts = (3, 4) if readers == "nodule" else (1, 2)
    total = sum(READER_COUNTS[k] for k in counts)
    return {k: READER_COUNTS[k] / total for k in counts}


def draw_reader_count(rng: np.random.Generator, table: str, reason: str = "") -> int:
    """How many readers marked a finding, drawn like LIDC's (0 = not a reader-counted finding).

    Annotated nodules (``table="annotations"``) get 3 or 4 readers, excluded nodules that
    readers disagreed on (``reason="one reader"``) 1 or 2, in LIDC's proportions
    (:func:`reader_count_mix`). Micronodules and non-nodules get 0: the LIDC annotation database
    outlines nodules >= 3 mm only, so their reader counts are unknown.
    """
    if table == "annotations":
        mix = reader_count_mix("nodule")
    elif reason == "one reader":
        mix = reader_count_mix("one reader")
    else:
        return 0
    keys = list(mix)
    return int(keys[int(rng.choice(len(keys), p=list(mix.values())))])


def render_finding(
    hu: np.ndarray, lungs: np.ndarray, grid: BodyGrid, f: PlannedFinding, rng: np.random.Generator
) -> None:
    """Draw one finding into the float32 HU volume (in place), clipped to the lungs.

    Solid nodules are +15..+70 HU with a soft edge, ground-glass ones -680..-480 with a wide,
    fuzzy edge and a mottled texture, part-solid ones are ground-glass with a solid core that
    follows the shape. Voxels are combined with ``max(background, nodule)`` so vessels running
    through a ground-glass nodule stay visible, as they do in real scans.
    """
    sx, sy, sz = grid.spacing
    v = max(sx, sy)
    if f.shape >= 0:
        lib = load_shape_library()
        sdf_t = lib.signed_distance(f.shape)
        g = lib.grid
        to_template = float(lib.diameter_eq_mm[f.shape]) * g / float(lib.side_mm[f.shape])
        reach = 0.5 * float(lib.side_mm[f.shape]) / float(lib.diameter_eq_mm[f.shape]) * f.diameter
        r_in = -float(sdf_t.min()) * f.diameter
    else:
        reach = f.diameter * (2.2 if f.category == "scar" else 0.6)
        r_in = 0.5 * f.diameter
    reach += 2.5 + v
    c = grid.to_index(f.centre)  # (z, y, x)
    half = np.array([reach / sz, reach / sy, reach / sx])
    lo = np.maximum(np.floor(c - half).astype(int), 0)
    hi = np.minimum(np.ceil(c + half).astype(int) + 1, np.array(hu.shape))
    if np.any(hi <= lo):
        return
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    zz, yy, xx = np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij")
    off = np.stack([(xx - c[2]) * sx, (yy - c[1]) * sy, (zz - c[0]) * sz], axis=-1)  # mm, (x, y, z)
    local = off @ f.rotation  # = R^T . offset, shape frame
    if f.shape >= 0:
        coords = local[..., ::-1] / f.diameter * to_template + (g - 1) / 2
        sdf = (
            ndimage.map_coordinates(
                sdf_t, np.moveaxis(coords, -1, 0), order=1, cval=1.0, prefilter=False
            )
            * f.diameter
        )
    elif f.category == "scar":
        # A flat, elongated band (linear scar / atelectasis): diameter = its length.
        semi = np.array([0.5 * f.diameter, 1.2, 0.9])
        sdf = (np.sqrt(((local / semi) ** 2).sum(-1)) - 1.0) * 1.1
    else:
        sdf = np.sqrt((local**2).sum(-1)) - 0.5 * f.diameter

    bg = hu[sl]
    # Keep the finding in the lung (plus a voxel): a juxtapleural nodule flattens against the
    # chest wall instead of bulging into muscle or mediastinal fat.
    lung_local = ndimage.binary_dilation(lungs[sl] > 0, iterations=1)
    lung_soft = np.clip(1.6 * ndimage.gaussian_filter(lung_local.astype(np.float32), 1.2), 0, 1)
    shape_noise = ndimage.gaussian_filter(rng.standard_normal(bg.shape).astype(np.float32), 1.0)
    shape_noise /= max(float(shape_noise.std()), 1e-6)

    def blend(alpha: np.ndarray, target: np.ndarray) -> None:
        alpha = alpha * lung_soft
        bg[...] = bg + alpha * (np.maximum(bg, target) - bg)

    if f.category in ("solid", "calcified"):
        base = rng.uniform(15, 70) if f.category == "solid" else rng.uniform(250, 650)
        width = np.hypot(v, 0.5)
        blend(np.clip(0.5 - sdf / width, 0, 1), base + 10.0 * shape_noise)
    elif f.category == "scar":
        blend(
            np.clip(0.5 - sdf / np.hypot(v, 0.8), 0, 1), rng.uniform(-350, -50) + 20 * shape_noise
        )
    else:
        ggo = rng.uniform(-680, -480)
        width = np.hypot(v, rng.uniform(1.2, 2.2))
        blend(np.clip(0.5 - sdf / width, 0, 1) * rng.uniform(0.85, 1.0), ggo + 40.0 * shape_noise)
        if f.category == "part-solid":
            core_frac = rng.uniform(0.3, 0.65)
            core = sdf + (1.0 - core_frac) * r_in
            blend(
                np.clip(0.5 - core / np.hypot(v, 0.6), 0, 1), rng.uniform(10, 60) + 10 * shape_noise
            )
    hu[sl] = bg


def category_code(name: str) -> int:
    """Library texture category for a nodule category name."""
    return {"solid": SOLID, "part-solid": PART_SOLID, "ground-glass": GROUND_GLASS}.get(name, SOLID)
