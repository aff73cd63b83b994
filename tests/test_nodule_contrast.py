"""scripts/nodule_contrast.py: the contrast it measures, and its errors on bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_script
from lungct.errors import LungCTError


@pytest.fixture(scope="module")
def nc():
    return load_script("nodule_contrast")


def test_contrast_is_ball_mean_minus_lung_shell_median(nc) -> None:
    spacing = (2.0, 1.0, 1.0)  # (z, y, x) mm
    z, y, x = np.mgrid[:20, :40, :40]
    centre = np.array([10.0, 20.0, 20.0])
    r_mm = np.sqrt(((z - 10) * 2.0) ** 2 + (y - 20.0) ** 2 + (x - 20.0) ** 2)
    hu = np.where(r_mm <= 3.0, -550, -850).astype(np.int16)
    hu[:, :, 35:] = 40  # a chest wall: not lung, left out of the shell
    assert nc.nodule_contrast(hu, centre, spacing, 6.0) == pytest.approx(300.0)
    # A nodule smaller than a voxel, 1.22 mm from the nearest voxel centre, still gets that
    # voxel, not NaN.
    assert np.isfinite(nc.nodule_contrast(hu, centre + 0.5, spacing, 0.5))


def test_detections_table_is_checked(nc, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "nodules.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm,detected,probability,marks\n"
        "s1,-76.124975,17.1,-249.2,5.6,0,,0\ns1,10.0,1.0,2.0,8.0,1,0.9,1\n"
    )
    assert nc.read_detections(good) == {("s1", -76.12): 1, ("s1", 10.0): 0}
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "nodules.csv").write_text("seriesuid,coordX,detected\ns1,1.0,yes\n")
    with pytest.raises(LungCTError, match="line 2: detected must be 0 or 1"):
        nc.read_detections(bad)
    with pytest.raises(LungCTError, match="nodules.csv: file not found"):
        nc.read_detections(tmp_path / "missing")


def test_a_missing_table_is_one_line_and_status_2(nc, tmp_path: Path, capsys) -> None:
    assert nc.main(["--data", str(tmp_path), "--quiet"]) == 2
    assert (
        capsys.readouterr().err.strip() == f"error: {tmp_path / 'annotations.csv'}: file not found"
    )
