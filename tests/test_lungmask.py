"""Lung segmentation on the real scans and on phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DICOM_0001, MHD_0002, NODULE_0001, phantom_hu
from lungct.__main__ import main
from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.io import read_scan
from lungct.lungmask import LungMaskParams, lung_volume_ml, segment_lungs
from lungct.scan import Scan
from lungct.testing import chest_phantom_hu


@pytest.mark.parametrize("path", [DICOM_0001, MHD_0002], ids=["lidc0001_dicom", "lidc0002_mhd"])
def test_real_lung_volume_plausible(real_data, path: Path) -> None:
    scan = read_scan(path)
    mask = segment_lungs(scan)
    assert mask.shape == scan.array.shape and mask.dtype == np.uint8
    volume = lung_volume_ml(mask, scan.geometry)
    assert 2500 <= volume <= 8000, volume
    # The lung is air: the median HU inside the mask is that of parenchyma, not soft tissue.
    assert np.median(scan.array[mask > 0]) < -600
    if path == DICOM_0001:
        z, y, x = scan.geometry.world_to_index(NODULE_0001)
        assert mask[z, y, x] == 1, "the 23 mm LIDC-IDRI-0001 nodule must be inside the lung mask"


def test_lungmask_cli_writes_mask_in_scan_geometry(real_data, tmp_path: Path, capsys) -> None:
    out = tmp_path / "mask.mhd"
    assert main(["lungmask", str(MHD_0002), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    mask = read_scan(out)
    scan_info = read_scan(MHD_0002).info()
    assert mask.info()["size"] == scan_info["size"]
    np.testing.assert_allclose(mask.info()["origin"], scan_info["origin"], atol=1e-4)
    assert printed["lung_volume_ml"] == pytest.approx(
        lung_volume_ml(mask.array, mask.geometry), abs=0.1
    )


def test_phantom_nodule_inside_and_body_outside() -> None:
    hu = phantom_hu(shape_zyx=(40, 80, 96), nodule_zyx=(20, 40, 29), radius_vox=3)
    scan = Scan(hu, Geometry((96, 80, 40), (4.0, 4.0, 5.0), (0, 0, 0)), "phantom")
    mask = segment_lungs(scan)
    assert mask[20, 40, 29] == 1  # the nodule is a hole the mask fills
    assert mask[20, 40, 48] == 0  # mediastinum between the lungs
    assert mask[20, 2, 2] == 0  # outside air is not lung
    lungs = hu < -500
    lungs[:, :2, :] = lungs[:, -2:, :] = False
    lungs[:, :, :2] = lungs[:, :, -2:] = False
    inside = lungs & (hu == -850)
    assert mask[inside].mean() > 0.98


def test_no_lungs_is_a_clear_error() -> None:
    solid = np.full((20, 32, 32), 40, np.int16)
    scan = Scan(solid, Geometry((32, 32, 20), (1, 1, 1), (0, 0, 0)), "water", source="water.mhd")
    with pytest.raises(LungCTError, match="water.mhd: no lungs found"):
        segment_lungs(scan)


def test_lungs_leaking_to_outside_air_are_still_found() -> None:
    """A wall thinned by resampling can open a channel from a lung to the air outside."""
    hu = chest_phantom_hu((40, 80, 96))
    geometry = Geometry((96, 80, 40), (2.0, 2.0, 2.0), (0, 0, 0))
    sealed = segment_lungs(Scan(hu.copy(), geometry, "sealed"))
    hu[18:20, 40, :16] = -1000.0  # left lung -> outside, 1 voxel wide, 2 slices
    hu[18:20, 40, 80:] = -1000.0  # right lung -> outside
    scan = Scan(hu, geometry, "leaky", source="leaky.mhd")
    with pytest.raises(LungCTError, match="leaky.mhd: no lungs found"):
        segment_lungs(scan, LungMaskParams(max_leak_erosion=0))
    mask = segment_lungs(scan)
    assert mask[20, 40, 29] == 1 and mask[20, 40, 67] == 1  # both lungs
    assert mask[:, :3, :].sum() == 0 and mask[:, :, :3].sum() == 0  # not the outside air
    assert np.logical_xor(mask, sealed).sum() < 0.02 * sealed.sum()  # as if it were sealed


@pytest.mark.parametrize(
    "radii", [(2.0, 4.0, 4.0), (1.5, 2.5, 3.7), (0.4, 1.0, 1.0), (3.0, 0.5, 2.0)]
)
def test_dilate_ellipsoid_equals_scipy_dilation(radii) -> None:
    """The OpenCV slice-by-slice dilation gives exactly scipy's 3-D dilation by the ellipsoid."""
    from scipy import ndimage

    from lungct.lungmask import dilate_ellipsoid

    rz, ry, rx = radii
    cz, cy, cx = (int(np.floor(r)) for r in radii)
    zz, yy, xx = np.mgrid[-cz : cz + 1, -cy : cy + 1, -cx : cx + 1]
    ellipsoid = (zz / rz) ** 2 + (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0 + 1e-9
    rng = np.random.default_rng(3)
    mask = rng.random((17, 40, 33)) > 0.985  # scattered voxels, many at the edges
    mask[5:9, 10:20, 12:25] = True
    expected = ndimage.binary_dilation(mask, structure=ellipsoid)
    got = dilate_ellipsoid(mask, radii)
    assert got.dtype == bool and got.shape == mask.shape
    np.testing.assert_array_equal(got, expected)


def test_slice_closing_and_hole_filling_are_scipy_s() -> None:
    """OpenCV's closing and the one-call hole labelling give scipy's slice-by-slice voxels."""
    from scipy import ndimage

    from lungct.lungmask import _disk, close_slices, small_holes

    rng = np.random.default_rng(0)
    for trial in range(4):
        mask = ndimage.binary_opening(rng.random((12, 60, 50)) > 0.4 + 0.05 * trial)
        for radius in (1.0, 2.5, 4.0):
            disk = _disk(radius)
            pad = int(np.ceil(radius)) + 1
            padded = np.pad(mask, ((0, 0), (pad, pad), (pad, pad)))
            expected = ndimage.binary_closing(padded, structure=disk[None])
            np.testing.assert_array_equal(close_slices(padded, disk), expected)
        for max_area in (0, 3, 25, 1e9):
            expected = mask.copy()
            for z in range(len(mask)):
                holes = ndimage.binary_fill_holes(mask[z]) & ~mask[z]
                labels, n = ndimage.label(holes)
                areas = np.bincount(labels.ravel(), minlength=n + 1)
                small = np.flatnonzero((areas <= max_area) & (np.arange(n + 1) > 0))
                expected[z] |= np.isin(labels, small)
            np.testing.assert_array_equal(mask | small_holes(mask, max_area), expected)


def test_mask_box_is_the_voxels_box_grown_inside_the_array() -> None:
    from lungct.lungmask import mask_box

    mask = np.zeros((10, 12, 14), bool)
    assert mask_box(mask) is None
    mask[2, 3:5, 13] = True
    assert mask_box(mask) == (slice(2, 3), slice(3, 5), slice(13, 14))
    assert mask_box(mask, (3, 1, 2)) == (slice(0, 6), slice(2, 6), slice(11, 14))
