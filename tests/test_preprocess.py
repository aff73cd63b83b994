"""Resampling keeps world positions; windowing plans round-trip through JSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.preprocess import (
    PreprocessPlan,
    apply_window,
    resample_mask,
    resample_scan,
    world_aligned_geometry,
)
from lungct.scan import Scan

DIRS = {
    "identity": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "flip_z": (1, 0, 0, 0, 1, 0, 0, 0, -1),
    "flip_xy": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
}


def _blob_scan(direction) -> tuple[Scan, np.ndarray]:
    geo = Geometry((60, 50, 30), (0.7, 0.7, 2.5), (-20.0, 15.0, 100.0), direction)
    hu = np.full(geo.shape_zyx, -1000, np.int16)
    centre = np.array([12, 20, 33])
    z, y, x = np.ogrid[: geo.shape_zyx[0], : geo.shape_zyx[1], : geo.shape_zyx[2]]
    d2 = ((z - centre[0]) * 2.5) ** 2 + ((y - centre[1]) * 0.7) ** 2 + ((x - centre[2]) * 0.7) ** 2
    hu[d2 <= 5.0**2] = 100
    return Scan(hu, geo, "blob"), geo.voxel_to_world(centre)


@pytest.mark.parametrize("name", sorted(DIRS))
@pytest.mark.parametrize("align", [False, True])
def test_resample_keeps_world_position(name: str, align: bool) -> None:
    scan, world = _blob_scan(DIRS[name])
    out = resample_scan(scan, (1.0, 1.0, 1.0), align_to_world=align)
    assert out.spacing == (1.0, 1.0, 1.0)
    if align:
        assert out.direction == (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)
    bright = np.argwhere(out.array > 0).mean(axis=0)
    np.testing.assert_allclose(out.voxel_to_world(bright), world, atol=0.6)
    # The extent is kept: 60 x 0.7 = 42 mm -> 42 voxels at 1 mm.
    assert sorted(out.geometry.size) == sorted((42, 35, 75))


def test_world_aligned_grid_covers_the_source() -> None:
    g = Geometry((10, 10, 10), (1, 1, 1), (0, 0, 0), DIRS["flip_xy"])
    aligned = world_aligned_geometry(g, (1, 1, 1))
    assert aligned.size == (10, 10, 10)
    np.testing.assert_allclose(aligned.origin, (-9, -9, 0))


def test_mask_resampling_is_nearest() -> None:
    geo = Geometry((9, 9, 9), (1, 1, 1), (0, 0, 0))
    mask = np.zeros(geo.shape_zyx, np.uint8)
    mask[3:6, 3:6, 3:6] = 1
    out, g2 = resample_mask(mask, geo, (0.5, 0.5, 0.5))
    assert set(np.unique(out)) == {0, 1}
    assert g2.size == (18, 18, 18)
    assert out.sum() == 27 * 8


def test_window() -> None:
    out = apply_window(np.array([-2000, -1000, -300, 400, 3000]), (-1000, 400))
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    assert out.dtype == np.float32
    np.testing.assert_allclose(apply_window(np.array([-1024, 300]), (-1024, 300), (-1, 1)), [-1, 1])


def test_plan_json_round_trip_and_errors(tmp_path: Path) -> None:
    plan = PreprocessPlan(name="iso2", spacing=(2, 2, 2), hu_window=(-1200, 600))
    plan.save(tmp_path / "plan.json")
    assert PreprocessPlan.load(tmp_path / "plan.json") == plan
    (tmp_path / "bad.json").write_text('{"name": "x", "spacng": [1, 1, 1]}')
    with pytest.raises(
        LungCTError, match=r"bad.json: unknown preprocessing plan keys \['spacng'\]"
    ):
        PreprocessPlan.load(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(LungCTError, match="broken.json: is not valid JSON"):
        PreprocessPlan.load(tmp_path / "broken.json")
    with pytest.raises(LungCTError, match="empty HU window"):
        PreprocessPlan(hu_window=(400, -1000))


@pytest.mark.parametrize(
    "spacing", [(1.0, 1.0, 2.0), (2.0, 2.0, 2.0), (1.0, 1.0, 3.0), (1.0, 2.0, 1.0)]
)
def test_aligned_subsampling_is_what_the_resampler_computes(spacing) -> None:
    """Slicing the 1 mm grid gives SimpleITK's voxels: masks the same, CT within its rounding."""
    from lungct.preprocess import resample_array, subsample_aligned

    rng = np.random.default_rng(0)
    geo = Geometry((36, 30, 24), (1.0, 1.0, 1.0), (-17.5, 3.25, -300.0))
    hu = rng.integers(-1000, 400, geo.shape_zyx).astype(np.int16)
    mask = (rng.random(geo.shape_zyx) > 0.5).astype(np.uint8)
    fast, grid = subsample_aligned(hu, geo, spacing, "linear")
    slow, slow_grid = resample_array(hu.astype(np.float32), geo, spacing, "linear", -1000, True)
    assert grid == slow_grid and fast.dtype == np.float32
    np.testing.assert_allclose(fast, slow, atol=1e-3)
    fast_mask, _ = subsample_aligned(mask, geo, spacing, "nearest")
    slow_mask, _ = resample_mask(mask, geo, spacing, align_to_world=True)
    np.testing.assert_array_equal(fast_mask, slow_mask)
    # Where slicing is not the resampler's result, there is no shortcut.
    assert subsample_aligned(hu, geo, (1.5, 1.0, 1.0), "linear") is None  # not whole
    odd = replace_size(geo, 1)  # 23 slices: a factor of 2 or 3 along z leaves a remainder
    assert subsample_aligned(hu[:-1], odd, (2.0, 2.0, 2.0), "linear") is None
    flipped = Geometry(geo.size, geo.spacing, geo.origin, DIRS["flip_z"])
    assert subsample_aligned(hu, flipped, spacing, "linear") is None
    assert subsample_aligned(hu, geo, spacing, "bspline") is None


def replace_size(geo: Geometry, fewer_z: int) -> Geometry:
    """The grid with ``fewer_z`` slices less (sizes the factor may not divide)."""
    x, y, z = geo.size
    return Geometry((x, y, z - fewer_z), geo.spacing, geo.origin, geo.direction)


def test_nearest_by_indexing_is_the_resampler_s() -> None:
    """A mask onto a finer or shifted world-aligned grid: SimpleITK's nearest voxels (away
    from exact half-way points, which floating point decides either way)."""
    from lungct.preprocess import nearest_onto, resample_onto

    rng = np.random.default_rng(1)
    source = Geometry((30, 28, 20), (1.0, 1.0, 1.0), (-15.0, 4.0, -120.0))
    mask = (rng.random(source.shape_zyx) > 0.5).astype(np.uint8)
    targets = [
        Geometry((44, 41, 16), (0.683, 0.683, 1.25), (-15.3, 3.8, -120.4)),  # finer, inside
        Geometry((50, 20, 30), (0.9, 1.3, 0.8), (-30.13, -3.7, -126.2)),  # reaching outside
        Geometry((30, 28, 20), (1.0, 1.0, 1.0), (-14.6, 4.3, -119.7)),  # shifted
    ]
    for target in targets:
        fast = nearest_onto(mask, source, target, default_value=0)
        slow = resample_onto(mask, source, target, "nearest", 0)
        assert fast.shape == slow.shape == target.shape_zyx
        np.testing.assert_array_equal(fast, slow)
    flipped = Geometry(source.size, source.spacing, source.origin, DIRS["flip_xy"])
    np.testing.assert_array_equal(  # another direction: the resampler itself
        nearest_onto(mask, flipped, targets[0]),
        resample_onto(mask, flipped, targets[0], "nearest", 0),
    )
