"""CT-GAN pasting: exact cubes at any spacing, border sites, inject/remove round trip, sites.

The generator is replaced by small functions with a known output (a ball, or parenchyma), so
these tests check the geometry and blending exactly, without a trained model.
"""

from __future__ import annotations

import numpy as np
import pytest

from ct_gan_augment.config import GANPlan
from ct_gan_augment.inject import CubeTamperer
from ct_gan_augment.normaliser import CubeNormaliser
from ct_gan_augment.paste import cube_region, cut_cube, fix_hu_overflow
from ct_gan_augment.sites import choose_sites
from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.lungmask import segment_lungs
from lungct.scan import Scan

PLAN = GANPlan(cube_size=32, hole_size=16)
IDENTITY = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
FLIP_XZ = (-1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)
LUNG_HU, TISSUE_HU = -850.0, 40.0


def world_phantom(
    spacing: tuple[float, float, float],
    extent_mm: tuple[float, float, float] = (120.0, 96.0, 72.0),
    direction: tuple[float, ...] = IDENTITY,
    nodule: tuple[float, float, float, float] | None = None,
    noise: float = 15.0,
    seed: int = 0,
) -> Scan:
    """A chest phantom defined in world mm (so every spacing shows the same anatomy).

    Body ellipse, two lungs of -850 HU, an optional ball nodule ``(x, y, z, diameter)``.
    The volume is centred on the world origin.
    """
    size = tuple(round(e / s) for e, s in zip(extent_mm, spacing, strict=True))
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    centre_index = (np.asarray(size) - 1) / 2.0
    origin = -(d * np.asarray(spacing)) @ centre_index
    geo = Geometry(size, spacing, tuple(origin), direction)
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in geo.shape_zyx), indexing="ij"), -1)
    w = geo.voxel_to_world(idx.reshape(-1, 3).astype(float)).reshape(*geo.shape_zyx, 3)
    x, y, z = w[..., 0], w[..., 1], w[..., 2]
    hu = np.full(geo.shape_zyx, -1000.0)
    hu[(x / 58) ** 2 + (y / 46) ** 2 <= 1] = TISSUE_HU
    for cx in (-28.0, 28.0):
        hu[((x - cx) / 24) ** 2 + (y / 34) ** 2 + (z / 34) ** 2 <= 1] = LUNG_HU
    if nodule is not None:
        nx, ny, nz, diam = nodule
        hu[(x - nx) ** 2 + (y - ny) ** 2 + (z - nz) ** 2 <= (diam / 2) ** 2] = TISSUE_HU
    hu += np.random.default_rng(seed).normal(0, noise, hu.shape)
    return Scan(np.clip(np.rint(hu), -1024, 3000).astype(np.int16), geo, "1.2.3")


@pytest.fixture(scope="module")
def normaliser() -> CubeNormaliser:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(LUNG_HU, 20, 50000), rng.normal(TISSUE_HU, 20, 5000)])
    return CubeNormaliser.fit(values, bins=1000)


def ball_generator(normaliser: CubeNormaliser, diameter_vox: float = 8.0):
    """A stand-in injector: the condition with a solid ball in the middle of the hole."""
    c = PLAN.cube_size
    r2 = np.sum((np.indices((c, c, c)) - (c - 1) / 2.0) ** 2, axis=0)
    ball = r2 <= (diameter_vox / 2) ** 2
    inside, outside = normaliser.transform(np.array([TISSUE_HU, LUNG_HU]))
    hole = PLAN.hole_slice

    def generate(condition: np.ndarray) -> np.ndarray:
        out = condition.copy()
        out[0, hole, hole, hole, 0] = outside
        out[0, ..., 0][ball] = inside
        return out

    return generate


def parenchyma_generator(normaliser: CubeNormaliser):
    """A stand-in remover: fills the hole with smooth parenchyma."""
    value = normaliser.transform(np.array([LUNG_HU]))[0]
    hole = PLAN.hole_slice

    def generate(condition: np.ndarray) -> np.ndarray:
        out = condition.copy()
        out[0, hole, hole, hole, 0] = value
        return out

    return generate


SPACINGS = [
    (0.5, 0.5, 0.5),
    (0.7, 0.7, 0.7),
    (1.25, 1.25, 1.25),
    (2.5, 2.5, 2.5),
    (0.7, 0.7, 2.5),  # typical LIDC: fine in-plane, thick slices
    (0.68, 0.68, 1.25),
    (0.9, 0.55, 1.7),
]


@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: "x".join(f"{v:g}" for v in s))
@pytest.mark.parametrize("direction", [IDENTITY, FLIP_XZ], ids=["identity", "flipped"])
def test_cube_is_exact_at_every_spacing(spacing, direction) -> None:
    scan = world_phantom(spacing, (80.0, 72.0, 64.0), direction, nodule=(-27.3, 3.1, 2.45, 8.0))
    for site in [(-27.3, 3.1, 2.45), (0.13, 0.77, -0.31), (-39.9, -35.9, 31.9)]:
        cube = cut_cube(scan.array, scan.geometry, site, 32)
        assert cube.shape == (32, 32, 32) and cube.dtype == np.float32
    # The nodule is at the cube's centre whatever the spacing and direction.
    cube = cut_cube(scan.array, scan.geometry, (-27.3, 3.1, 2.45), 32)
    assert cube[15:17, 15:17, 15:17].mean() > -200
    # Axes follow world z, y, x: the lung centre (x = -28) is 0.7 mm towards +x of the site.
    region = cube_region(scan.geometry, (-27.3, 3.1, 2.45), 32)
    assert region.cube_coords.shape[0] == 3 and region.radius_mm.shape == region.face_mm.shape
    assert region.face_mm.max() <= 15.5 + 1e-9


@pytest.mark.parametrize("spacing", SPACINGS, ids=lambda s: "x".join(f"{v:g}" for v in s))
def test_injection_lands_at_the_world_site(spacing, normaliser) -> None:
    scan = world_phantom(spacing, (80.0, 72.0, 64.0), FLIP_XZ, noise=10.0)
    tamperer = CubeTamperer(ball_generator(normaliser), normaliser, PLAN, seed=1)
    site = (-27.0, 2.0, 3.0)
    new, nodule = tamperer.inject(scan, site)
    assert new.array.shape == scan.array.shape and new.array.dtype == np.int16
    z, y, x = scan.geometry.world_to_index(site)
    assert new.array[z, y, x] > -200 > scan.array[z, y, x]
    assert nodule.diameter_mm == pytest.approx(8.0, rel=0.25)
    assert np.linalg.norm(np.subtract(nodule.center, site)) < 1.0
    # Nothing changes outside the cube's extent.
    region = cube_region(scan.geometry, site, 32)
    outside = np.ones(scan.array.shape, bool)
    outside[region.slices] = False
    np.testing.assert_array_equal(new.array[outside], scan.array[outside])
    # Injection never darkens a voxel (max(result, original)).
    assert np.all(new.array >= scan.array)


@pytest.mark.parametrize("site", [(-59.0, 0.0, 0.0), (0.0, 47.5, -35.5), (59.5, -47.5, 35.5)])
def test_injection_next_to_the_volume_border(site, normaliser) -> None:
    scan = world_phantom((0.7, 0.7, 1.25), (120.0, 96.0, 72.0))
    tamperer = CubeTamperer(ball_generator(normaliser), normaliser, PLAN)
    new, nodule = tamperer.inject(scan, site)
    assert new.array.shape == scan.array.shape
    assert nodule.diameter_mm > 0
    z, y, x = np.clip(scan.geometry.world_to_index(site), 0, np.asarray(scan.array.shape) - 1)
    assert new.array[z, y, x] > -200


def test_site_outside_the_scan_is_refused(normaliser) -> None:
    scan = world_phantom((2.5, 2.5, 2.5), (60.0, 60.0, 60.0))
    tamperer = CubeTamperer(ball_generator(normaliser), normaliser, PLAN)
    with pytest.raises(LungCTError, match="outside the scan"):
        tamperer.inject(scan, (500.0, 0.0, 0.0))


def test_inject_then_remove_round_trip(normaliser) -> None:
    scan = world_phantom((0.7, 0.7, 1.25), noise=20.0)
    site = (-28.0, 0.0, 0.0)
    injector = CubeTamperer(ball_generator(normaliser, 10.0), normaliser, PLAN, "injector", 1)
    remover = CubeTamperer(parenchyma_generator(normaliser), normaliser, PLAN, "remover", 2)
    injected, nodule = injector.inject(scan, site)
    assert nodule.diameter_mm == pytest.approx(10.0, rel=0.2)
    restored = remover.remove(injected, site)
    ball = cut_cube(scan.array, scan.geometry, site, 32)[12:20, 12:20, 12:20]
    before = cut_cube(injected.array, injected.geometry, site, 32)[12:20, 12:20, 12:20]
    after = cut_cube(restored.array, restored.geometry, site, 32)[12:20, 12:20, 12:20]
    assert before.mean() > -300
    assert abs(after.mean() - ball.mean()) < 25.0, "the nodule is gone, parenchyma is back"
    # The noise touch-up gives the removed region the scan's own texture (not a flat fill).
    z, y, x = scan.geometry.world_to_index(site)
    patch = restored.array[z - 1 : z + 2, y - 5 : y + 6, x - 5 : x + 6].astype(float)
    assert 5.0 < patch.std() < 60.0
    with pytest.raises(LungCTError, match="needs a remover"):
        injector.remove(scan, site)
    with pytest.raises(LungCTError, match="needs a injector|needs an injector"):
        remover.inject(scan, site)


def test_hu_overflow_fix() -> None:
    cube = np.full((8, 8, 8), 50.0, np.float32)
    cube[4, 4, 4] = 5000.0
    cube[0, 0, 0] = -3000.0
    fixed = fix_hu_overflow(cube, 2000.0, -1000.0)
    assert fixed[4, 4, 4] == pytest.approx(50.0)
    assert fixed[0, 0, 0] == -1000.0


def test_automatic_sites_follow_the_rules() -> None:
    nodule = (-28.0, 5.0, 4.0, 8.0)
    scan = world_phantom((1.0, 1.0, 1.5), nodule=nodule)
    lung = segment_lungs(scan)
    rng = np.random.default_rng(0)
    avoid = np.asarray([nodule])
    plan = PLAN.replace(site_min_separation_mm=20.0)
    sites = choose_sites(scan.array, lung, scan.geometry, 4, plan, rng, avoid=avoid)
    assert 1 <= len(sites) <= 4
    for p in sites:
        z, y, x = scan.geometry.world_to_index(p)
        assert scan.array[z, y, x] < -600, "a site lies in parenchyma"
        assert np.linalg.norm(p - avoid[0, :3]) >= 4.0 + plan.site_nodule_margin_mm - 1e-6
        # >= 8 mm from the pleura: the lungs are ellipsoids centred at x = +-28.
        cx = -28.0 if p[0] < 0 else 28.0
        assert ((p[0] - cx) / 24) ** 2 + (p[1] / 34) ** 2 + (p[2] / 34) ** 2 < 1.0
    for i in range(len(sites)):
        for j in range(i):
            assert np.linalg.norm(sites[i] - sites[j]) >= 20.0 - 1e-6
    juxta = choose_sites(scan.array, lung, scan.geometry, 3, plan, rng, juxtapleural=True)
    assert len(juxta) >= 1
    for p in juxta:
        idx = scan.geometry.world_to_index(p)
        lo = np.maximum(idx - 6, 0)
        near = scan.array[lo[0] : idx[0] + 7, lo[1] : idx[1] + 7, lo[2] : idx[2] + 7]
        assert near.max() > -300, "a juxtapleural site has chest wall within ~6 mm"


def test_injection_into_the_real_lidc_scan(real_data, normaliser) -> None:
    """The real LIDC-IDRI-0002 MetaImage (0.68 x 0.68 x 1.25 mm, 512 x 512 x 261)."""
    from conftest import MHD_0002
    from lungct.io import read_scan

    scan = read_scan(MHD_0002)
    site = (-80.0, -20.0, -180.0)  # right lung
    z, y, x = scan.geometry.world_to_index(site)
    assert scan.array[z, y, x] < -600
    new, nodule = CubeTamperer(ball_generator(normaliser), normaliser, PLAN).inject(scan, site)
    assert new.array[z, y, x] > -300
    assert nodule.diameter_mm == pytest.approx(8.0, rel=0.3)
    region = cube_region(scan.geometry, site, 32)
    changed = np.argwhere(new.array != scan.array)
    lo = [s.start for s in region.slices]
    hi = [s.stop for s in region.slices]
    assert np.all(changed >= lo) and np.all(changed < hi)


def size_generator(normaliser: CubeNormaliser):
    """A stand-in sized injector: paints the condition's size ball as a solid nodule."""
    inside, outside = normaliser.transform(np.array([TISSUE_HU, LUNG_HU]))
    hole = PLAN.hole_slice

    def generate(condition: np.ndarray) -> np.ndarray:
        assert condition.shape[-1] == 2, "a sized injector gets the size ball as channel 2"
        out = condition[..., :1].copy()
        out[0, hole, hole, hole, 0] = outside
        out[0, ..., 0][condition[0, ..., 1] > 0.5] = inside
        return out

    return generate


@pytest.mark.parametrize("diameter", [6.0, 12.0])
def test_sized_injection_has_the_asked_diameter(diameter, normaliser) -> None:
    scan = world_phantom((0.7, 0.7, 1.25), noise=10.0)
    tamperer = CubeTamperer(size_generator(normaliser), normaliser, PLAN, "injector", 0)
    assert tamperer.sized
    _, nodule = tamperer.inject(scan, (-28.0, 0.0, 0.0), diameter)
    # Measured at half the added HU on a 1.25 mm slice grid: partial volume shrinks it a little.
    assert nodule.diameter_mm == pytest.approx(diameter, rel=0.25)
    # Without a size, one of the training sizes is drawn.
    drawn = CubeTamperer(size_generator(normaliser), normaliser, PLAN, "injector", 0, [7.0])
    assert drawn.inject(scan, (-28.0, 0.0, 0.0))[1].diameter_mm == pytest.approx(7.0, rel=0.2)
    with pytest.raises(LungCTError, match="outside"):
        tamperer.inject(scan, (-28.0, 0.0, 0.0), 40.0)
    unsized = CubeTamperer(
        ball_generator(normaliser), normaliser, PLAN.replace(size_channel=False), "injector"
    )
    with pytest.raises(LungCTError, match="no size channel"):
        unsized.inject(scan, (-28.0, 0.0, 0.0), diameter)
