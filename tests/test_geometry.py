"""World <-> voxel with origin, spacing and direction: exact round trips, SimpleITK agreement."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from lungct.errors import LungCTError
from lungct.geometry import Geometry


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


DIRECTIONS = {
    "identity": np.eye(3),
    "flip_z": np.diag([1.0, 1.0, -1.0]),
    "flip_xy": np.diag([-1.0, -1.0, 1.0]),
    "oblique": _rotation(0.2, -0.35, 0.6),
    "oblique_flipped": _rotation(0.1, 0.3, -0.4) @ np.diag([1.0, -1.0, 1.0]),
}


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_matches_simpleitk(name: str) -> None:
    d = DIRECTIONS[name]
    g = Geometry((50, 60, 70), (0.7, 0.8, 2.5), (-160.0, 12.5, -340.0), tuple(d.ravel()))
    img = sitk.Image(list(g.size), sitk.sitkInt16)
    img.SetSpacing(g.spacing)
    img.SetOrigin(g.origin)
    img.SetDirection(g.direction)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx_xyz = rng.uniform(-5, 80, 3)
        expected = np.asarray(img.TransformContinuousIndexToPhysicalPoint(idx_xyz.tolist()))
        got = g.voxel_to_world(idx_xyz[::-1])
        np.testing.assert_allclose(got, expected, atol=1e-9)
        back = g.world_to_voxel(expected)
        np.testing.assert_allclose(back, idx_xyz[::-1], atol=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
    flips=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3),
    spacing=st.tuples(*[st.floats(0.3, 5.0)] * 3),
    origin=st.tuples(*[st.floats(-500, 500)] * 3),
)
def test_round_trip_any_direction(angles, flips, spacing, origin) -> None:
    d = _rotation(*angles) @ np.diag(flips)
    g = Geometry((64, 64, 64), spacing, origin, tuple(d.ravel()))
    pts = np.random.default_rng(1).uniform(-10, 70, size=(16, 3))
    np.testing.assert_allclose(g.world_to_voxel(g.voxel_to_world(pts)), pts, atol=1e-8)


def test_flip_is_not_hidden() -> None:
    """abs(world - origin) / spacing would give the same index for both; direction must not."""
    plain = Geometry((10, 10, 10), (1, 1, 2), (0, 0, 0))
    flipped = Geometry((10, 10, 10), (1, 1, 2), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, -1))
    world = plain.voxel_to_world([3, 0, 0])
    assert world[2] == pytest.approx(6.0)
    assert flipped.world_to_voxel(world)[0] == pytest.approx(-3.0)
    assert flipped.voxel_to_world([3, 0, 0])[2] == pytest.approx(-6.0)


def test_vectorised_shapes_and_axis_order() -> None:
    g = Geometry((5, 6, 7), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0))
    assert g.shape_zyx == (7, 6, 5)
    np.testing.assert_allclose(g.voxel_to_world([1, 2, 3]), [13.0, 24.0, 33.0])
    many = g.world_to_voxel(np.zeros((4, 2, 3)))
    assert many.shape == (4, 2, 3)


def test_json_round_trip_and_validation() -> None:
    g = Geometry((5, 6, 7), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert Geometry.from_dict(g.to_dict()) == g
    with pytest.raises(LungCTError, match="spacing"):
        Geometry((5, 6, 7), (1.0, 0.0, 3.0), (0, 0, 0))
    with pytest.raises(LungCTError, match="singular"):
        Geometry((5, 6, 7), (1.0, 1.0, 1.0), (0, 0, 0), (1, 0, 0, 1, 0, 0, 0, 0, 1))
    with pytest.raises(LungCTError, match="missing 'origin'"):
        Geometry.from_dict({"size": [1, 1, 1], "spacing": [1, 1, 1]})
