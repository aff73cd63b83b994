"""Probability map -> candidates: world centres (any direction), NMS, CSV; sliding windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungct.geometry import Geometry
from lungct.tables import read_results
from unet_candidates.config import preset_plan
from unet_candidates.extract import (
    ModelInput,
    gaussian_weights,
    predict_probability_map,
    window_starts,
)
from unet_candidates.postprocess import (
    CANDIDATE_COLUMNS,
    candidates_from_probability,
    non_maximum_suppression,
    write_candidates_csv,
)

DIRECTIONS = {
    "identity": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "flip_z": (1, 0, 0, 0, 1, 0, 0, 0, -1),
    "flip_xy": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
}


def _blob(shape, centre_zyx, radius_vox, peak) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=np.float64)
    d2 = (z - centre_zyx[0]) ** 2 + (y - centre_zyx[1]) ** 2 + (x - centre_zyx[2]) ** 2
    return (peak * np.exp(-d2 / (2 * (radius_vox / 2) ** 2)) * (d2 <= radius_vox**2)).astype(
        np.float32
    )


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_blob_centres_in_world_mm(name: str) -> None:
    geo = Geometry((40, 30, 20), (0.8, 0.8, 2.0), (-50.0, 20.0, -300.0), DIRECTIONS[name])
    centres = [(5.3, 10.0, 12.6), (14.0, 22.4, 30.0)]
    prob = np.maximum(
        _blob(geo.shape_zyx, centres[0], 3, 0.9), _blob(geo.shape_zyx, centres[1], 4, 0.7)
    )
    rows = candidates_from_probability(prob, geo, "s1", threshold=0.3, nms_radius_mm=5)
    assert [r.seriesuid for r in rows] == ["s1", "s1"]
    assert rows[0].probability > rows[1].probability  # most probable first
    for row, centre in zip(rows, centres, strict=True):
        expected = geo.voxel_to_world(centre)
        np.testing.assert_allclose(row[1:4], expected, atol=0.5)
        assert row.diameter_mm > 0


def test_flip_moves_world_centre_as_geometry_says() -> None:
    # The same array under two directions gives mirrored world centres about the origin.
    shape = (10, 12, 14)
    prob = _blob(shape, (3, 4, 9), 2, 0.8)
    plain = Geometry(shape[::-1], (1, 1, 1), (0, 0, 0))
    flipped = Geometry(shape[::-1], (1, 1, 1), (0, 0, 0), DIRECTIONS["flip_xy"])
    (a,) = candidates_from_probability(prob, plain, "s")
    (b,) = candidates_from_probability(prob, flipped, "s")
    np.testing.assert_allclose(a[1:4], (9, 4, 3), atol=1e-6)
    np.testing.assert_allclose(b[1:4], (-9, -4, 3), atol=1e-6)


def test_nms_merges_close_marks_keeps_far_ones() -> None:
    geo = Geometry((40, 20, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    prob = np.zeros(geo.shape_zyx, np.float32)
    prob[5, 10, 5] = 0.6  # x=5
    prob[5, 10, 9] = 0.9  # x=9: 4 mm away -> merged into this one
    prob[5, 10, 30] = 0.7  # 21 mm away -> kept
    rows = candidates_from_probability(
        prob, geo, "s", threshold=0.5, nms_radius_mm=6, score_sigma_voxels=0
    )
    assert [r.coordX for r in rows] == [9.0, 30.0]
    assert [r.probability for r in rows] == pytest.approx([0.9, 0.7])
    rows = candidates_from_probability(
        prob, geo, "s", threshold=0.5, nms_radius_mm=0, score_sigma_voxels=0
    )
    assert len(rows) == 3
    rows = candidates_from_probability(
        prob, geo, "s", threshold=0.5, nms_radius_mm=0, max_candidates=2, score_sigma_voxels=0
    )
    assert [r.probability for r in rows] == pytest.approx([0.9, 0.7])


def test_nms_order_and_ties() -> None:
    pts = np.array([[0, 0, 0], [1, 0, 0], [10, 0, 0]], float)
    assert non_maximum_suppression(pts, np.array([0.5, 0.5, 0.9]), 2.0).tolist() == [2, 0]


def test_small_components_dropped_and_diameter_estimate() -> None:
    geo = Geometry((40, 40, 40), (0.5, 0.5, 0.5), (0, 0, 0))
    z, y, x = np.indices(geo.shape_zyx)
    prob = np.zeros(geo.shape_zyx, np.float32)
    prob[(z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 10**2] = 0.8  # 10 mm sphere
    prob[3, 3, 3] = 0.9  # one voxel
    rows = candidates_from_probability(prob, geo, "s", min_component_voxels=2)
    assert len(rows) == 1
    assert rows[0].diameter_mm == pytest.approx(10.0, rel=0.05)


def test_empty_map_gives_header_only_csv(tmp_path: Path) -> None:
    geo = Geometry((8, 8, 8), (1, 1, 1), (0, 0, 0))
    rows = candidates_from_probability(np.zeros(geo.shape_zyx, np.float32), geo, "s")
    assert rows == []
    out = tmp_path / "candidates.csv"
    assert write_candidates_csv(rows, out) == 0
    assert out.read_text() == ",".join(CANDIDATE_COLUMNS) + "\n"
    assert len(read_results(out)) == 0


def test_csv_round_trip(tmp_path: Path) -> None:
    geo = Geometry((8, 8, 8), (1, 1, 1), (10, 20, 30))
    prob = np.zeros(geo.shape_zyx, np.float32)
    prob[1, 2, 3] = 0.75
    rows = candidates_from_probability(prob, geo, "1.2.3", score_sigma_voxels=0)
    write_candidates_csv(rows, tmp_path / "c.csv")
    table = read_results(tmp_path / "c.csv")
    assert table.uids == ["1.2.3"]
    np.testing.assert_allclose(table.coords[0], (13, 22, 31))
    assert table.probability[0] == pytest.approx(0.75)


def test_map_shape_must_match_geometry() -> None:
    with pytest.raises(ValueError, match="does not match"):
        candidates_from_probability(
            np.zeros((2, 2, 2)), Geometry((3, 3, 3), (1, 1, 1), (0, 0, 0)), "s"
        )


# ----------------------------------------------------------------------------------------------
# Sliding windows (with a fake model, no TensorFlow)
# ----------------------------------------------------------------------------------------------


def test_window_starts_cover_with_overlap() -> None:
    for length, window, overlap in [(100, 32, 0.25), (64, 64, 0.5), (65, 64, 0.0), (33, 8, 0.5)]:
        starts = window_starts(length, window, overlap)
        assert starts[0] == 0 and starts[-1] == length - window
        assert np.all(np.diff(starts) <= max(1, int(window * (1 - overlap))))
    assert window_starts(10, 32, 0.25).tolist() == [0]


def test_gaussian_weights_peak_in_the_middle() -> None:
    w = gaussian_weights((9, 16))
    assert w.shape == (9, 16) and w.max() == pytest.approx(1.0) and w.min() >= 1e-3
    assert w[4, 7] == w[4, 8] and w[4, 7] > w[0, 0]


class _EchoModel:
    """Returns its (centre-slice) input as the probability: blending must reproduce the image."""

    def __init__(self, dims: str) -> None:
        self.dims = dims
        self.calls = 0

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.dims == "2d":
            return x[..., x.shape[-1] // 2 : x.shape[-1] // 2 + 1]
        return x


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_sliding_window_blending_reproduces_input(dims: str) -> None:
    sizes = (3, 16, 16) if dims == "2d" else (8, 8, 8)
    plan = preset_plan(
        dims,
        filters=(4, 8),
        patch_size=sizes,
        window_size=sizes,
        lung_dilation_mm=0.0,
        window_batch=3,
    )
    rng = np.random.default_rng(0)
    shape = (14, 30, 37)
    image = rng.random(shape, dtype=np.float32)
    lung = np.zeros(shape, np.uint8)
    lung[2:12, 3:25, 5:33] = 1
    geo = Geometry(shape[::-1], (2, 2, 2), (0, 0, 0))
    data = ModelInput("s", image, lung, geo, None, "s")
    model = _EchoModel(dims)
    prob = predict_probability_map(model, data, plan)
    np.testing.assert_allclose(prob[lung > 0], image[lung > 0], rtol=1e-5, atol=1e-6)
    assert np.all(prob[lung == 0] == 0)
    assert model.calls > 1


def test_diameter_from_dense_tissue_ignores_attached_wall() -> None:
    geo = Geometry((40, 40, 40), (1.0, 1.0, 1.0), (0, 0, 0))
    z, y, x = np.indices(geo.shape_zyx)
    dense = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 6**2  # a 12 mm nodule
    dense |= x >= 26  # touching a wall of solid tissue
    prob = np.zeros(geo.shape_zyx, np.float32)
    prob[18:23, 18:23, 18:23] = 0.9  # a capped 5 mm target blob
    (plain,) = candidates_from_probability(prob, geo, "s")
    (row,) = candidates_from_probability(prob, geo, "s", dense=dense)
    assert plain.diameter_mm == pytest.approx(6.2, abs=0.1)  # the blob's own size
    assert row.diameter_mm == pytest.approx(12.0, abs=1.5)
    # A ground-glass centre (not dense) keeps the component estimate.
    (faint,) = candidates_from_probability(prob, geo, "s", dense=np.zeros_like(dense))
    assert faint.diameter_mm == plain.diameter_mm


def test_score_prefers_solid_blob_over_one_voxel_spike() -> None:
    geo = Geometry((30, 10, 10), (1.0, 1.0, 1.0), (0, 0, 0))
    prob = np.zeros(geo.shape_zyx, np.float32)
    prob[5, 5, 5] = 1.0  # a spike
    prob[4:7, 4:7, 19:22] = 0.95  # a solid blob
    rows = candidates_from_probability(prob, geo, "s", nms_radius_mm=0)
    assert [r.coordX for r in rows] == [20.0, 5.0]
    raw = candidates_from_probability(prob, geo, "s", nms_radius_mm=0, score_sigma_voxels=0)
    assert [r.coordX for r in raw] == [5.0, 20.0]


def _whole_map_marks(probability, geometry, threshold, min_voxels, sigma):
    """Reference: the same marks from reductions over the whole map at once."""
    from scipy import ndimage

    mask = probability > threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    index = np.arange(1, n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    index, counts = index[counts >= min_voxels], counts[counts >= min_voxels]
    weights = np.where(mask, probability, 0.0).astype(np.float64)
    centres = np.asarray(ndimage.center_of_mass(weights, labels, index), np.float64)
    scored = ndimage.gaussian_filter(probability, sigma) if sigma > 0 else probability
    peaks = np.asarray(ndimage.maximum(scored, labels, index), np.float64)
    return geometry.voxel_to_world(centres.reshape(-1, 3)), peaks, counts


@pytest.mark.parametrize("sigma", [0.0, 1.0, 1.5])
def test_component_marks_equal_whole_map_reductions(sigma: float) -> None:
    """Per-component boxes give the whole-map numbers, components on the map's edges included."""
    from scipy import ndimage

    from unet_candidates.postprocess import components_to_marks

    rng = np.random.default_rng(7)
    shape = (23, 41, 37)
    prob = np.zeros(shape, np.float32)
    for _ in range(40):
        c, r = rng.integers(0, shape), rng.integers(0, 4)  # many touch an edge
        box = tuple(slice(max(a - r, 0), a + r + 1) for a in c)
        prob[box] = np.maximum(prob[box], rng.uniform(0.3, 1.0))
    prob = ndimage.gaussian_filter(prob, 0.7)
    geo = Geometry(shape[::-1], (0.7, 0.8, 1.25), (1.0, -2.0, 3.0))
    world, peaks, diameters = components_to_marks(prob, geo, 0.45, 2, sigma)
    ref_world, ref_peaks, ref_counts = _whole_map_marks(prob, geo, 0.45, 2, sigma)
    assert len(peaks) == len(ref_peaks) > 10
    np.testing.assert_array_equal(peaks, ref_peaks)
    np.testing.assert_allclose(world, ref_world, rtol=0, atol=1e-9)
    expected = np.cbrt(6.0 * ref_counts * np.prod(geo.spacing) / np.pi)
    np.testing.assert_allclose(diameters, expected, rtol=1e-12)


def test_crops_cover_each_lung_once_with_sizes_the_unet_accepts() -> None:
    from unet_candidates.extract import _crops

    mask = np.zeros((100, 160), bool)
    mask[20:70, 10:60] = True  # right lung
    mask[25:80, 100:150] = True  # left lung
    crops = _crops(mask, margin=4, multiple=16)
    assert len(crops) == 2  # two boxes are smaller than one over both
    covered = np.zeros(mask.shape, int)
    for crop, pixels in crops:
        assert all((c.stop - c.start) % 16 == 0 for c in crop)
        inside = np.zeros(mask.shape, bool)
        inside[tuple(slice(max(c.start, 0), c.stop) for c in crop)] = True
        assert not (pixels & ~inside).any()  # a crop fills only pixels it saw
        covered += pixels
    grown = np.zeros(mask.shape, bool)
    grown[16:74, 6:64] = grown[21:84, 96:154] = True
    np.testing.assert_array_equal(covered, grown.astype(int))  # each grown pixel once
    near = np.zeros((100, 160), bool)
    near[40:50, 40:50] = near[40:50, 60:70] = True  # close: one crop beats two
    ((crop, pixels),) = _crops(near, margin=4, multiple=16)
    assert pixels.sum() == 2 * 18 * 18
    assert [c.stop - c.start for c in crop] == [32, 48]
    assert _crops(np.zeros((10, 10), bool), 2, 8) == []


class _CountingEcho(_EchoModel):
    """An echo model that counts the pixels it was shown, per pass."""

    def __init__(self) -> None:
        super().__init__("2d")
        self.pixels = 0

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        self.pixels += x.shape[0] * x.shape[1] * x.shape[2]
        return super().predict_on_batch(x)


def test_flips_only_around_uncertain_pixels() -> None:
    """Flips run near pixels above ``flip_threshold`` only; everywhere when it is 0."""
    sizes = (3, 16, 16)
    shape = (8, 96, 96)
    image = np.full(shape, 0.01, np.float32)
    image[3:5, 40:44, 40:44] = 0.9  # one bright spot: the only uncertain pixels
    lung = np.zeros(shape, np.uint8)
    lung[:, 8:88, 8:88] = 1
    data = ModelInput("s", image, lung, Geometry(shape[::-1], (2, 2, 2), (0, 0, 0)), None, "s")
    counts = {}
    for flip_threshold in (0.0, 0.05):
        plan = preset_plan(
            "2d",
            filters=(4, 8),
            patch_size=sizes,
            window_size=sizes,
            lung_dilation_mm=0.0,
            window_batch=8,
            test_time_flips=1,
            flip_threshold=flip_threshold,
        )
        model = _CountingEcho()
        prob = predict_probability_map(model, data, plan)
        np.testing.assert_allclose(prob[lung > 0], image[lung > 0], rtol=1e-6)
        counts[flip_threshold] = model.pixels
    plain = 8 * 96 * 96  # the lung box plus 16 pixels of context, within the slice
    assert counts[0.0] == 2 * plain
    assert counts[0.05] == plain + 8 * 68 * 68  # the spot plus 32 pixels of context
