"""Reading real scans exactly, and a clear one-line error for every kind of broken input."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from conftest import DICOM_0001, MHD_0002, NODULE_0001, REPO
from lungct.__main__ import main
from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.io import read_scan, write_scan
from lungct.scan import AIR_HU, Scan

# --- real data -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dicom_scan(real_data) -> Scan:
    return read_scan(DICOM_0001)


@pytest.fixture(scope="module")
def mhd_scan(real_data) -> Scan:
    return read_scan(MHD_0002)


def test_dicom_series_geometry(dicom_scan: Scan) -> None:
    info = dicom_scan.info()
    assert info["seriesuid"] == "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    assert info["size"] == [512, 512, 133]
    np.testing.assert_allclose(info["spacing"], [0.703125, 0.703125, 2.5], atol=1e-6)
    np.testing.assert_allclose(info["origin"], [-166.0, -171.7, -340.0], atol=1e-3)
    assert info["direction"] == [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    assert (info["hu_min"], info["hu_max"]) == (-2048, 3071)
    assert dicom_scan.array.dtype == np.int16
    assert dicom_scan.array.min() == AIR_HU  # padding became air


def test_dicom_slices_ordered_by_position(dicom_scan: Scan) -> None:
    """Slice k of the array must be the file whose ImagePositionPatient z is origin + 2.5 k."""
    files = sorted(DICOM_0001.glob("*.dcm"))
    z_by_file = {}
    for f in files[:: len(files) // 6]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        z_by_file[f] = float(ds.ImagePositionPatient[2])
    for f, z in z_by_file.items():
        k = round((z - dicom_scan.origin[2]) / dicom_scan.spacing[2])
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        expected = np.maximum(hu, AIR_HU)
        np.testing.assert_array_equal(dicom_scan.array[k], expected)


def test_metaimage_geometry(mhd_scan: Scan) -> None:
    info = mhd_scan.info()
    assert info["seriesuid"] == MHD_0002.stem
    assert info["size"] == [512, 512, 261]
    np.testing.assert_allclose(info["spacing"], [0.681641, 0.681641, 1.25], atol=1e-6)
    np.testing.assert_allclose(info["origin"], [-175.5, -174.5, -334.5], atol=1e-6)
    assert (info["hu_min"], info["hu_max"]) == (-3024, 1752)


def test_lidc0001_nodule_centre_is_dense(dicom_scan: Scan) -> None:
    z, y, x = np.rint(dicom_scan.world_to_voxel(NODULE_0001)).astype(int)
    assert (x, y, z) == (316, 367, 90)
    assert dicom_scan.array[z, y, x] > -300


def test_info_cli_prints_one_json(real_data, capsys) -> None:
    assert main(["info", str(DICOM_0001)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and '"size": [512, 512, 133]' in out[0]


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".mhd", ".mha", ".nii.gz", ".nii"])
def test_write_read_round_trip(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 1000, size=(4, 5, 6)).astype(np.int16)
    direction = (1, 0, 0, 0, 1, 0, 0, 0, -1) if suffix != ".nii" else (1, 0, 0, 0, 1, 0, 0, 0, 1)
    geo = Geometry((6, 5, 4), (0.7, 0.8, 2.5), (-10.0, 20.0, 30.0), direction)
    path = tmp_path / f"1.2.3{suffix}"
    write_scan(Scan(arr, geo, "1.2.3"), path)
    back = read_scan(path)
    np.testing.assert_array_equal(back.array, arr)
    np.testing.assert_allclose(back.geometry.spacing, geo.spacing, atol=1e-5)
    np.testing.assert_allclose(back.geometry.origin, geo.origin, atol=1e-4)
    np.testing.assert_allclose(back.geometry.direction, geo.direction, atol=1e-6)
    assert back.seriesuid == "1.2.3"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_uncompressed_metaimage_and_padding(tmp_path: Path) -> None:
    arr = np.full((3, 4, 5), -3024, np.int16)
    arr[1, 2, 3] = 200
    write_scan(Scan(arr, Geometry((5, 4, 3), (1, 1, 1), (0, 0, 0)), "x"), tmp_path / "x.mhd", False)
    assert (tmp_path / "x.raw").stat().st_size == arr.nbytes
    s = read_scan(tmp_path / "x.mhd")
    assert (s.hu_min, s.hu_max) == (-3024, 200)
    assert s.array.min() == AIR_HU and s.array[1, 2, 3] == 200


def test_float_nifti_rounded(tmp_path: Path) -> None:
    img = sitk.GetImageFromArray(np.full((3, 4, 5), 10.6, np.float32))
    sitk.WriteImage(img, str(tmp_path / "f.nii.gz"))
    assert read_scan(tmp_path / "f.nii.gz").array[0, 0, 0] == 11


# --- bad inputs: each gives one line naming the file and the problem ---------------------------


def _small_mhd(tmp_path: Path, name: str = "s", compress: bool = False) -> Path:
    arr = np.zeros((4, 8, 8), np.int16)
    path = tmp_path / f"{name}.mhd"
    write_scan(Scan(arr, Geometry((8, 8, 4), (1, 1, 1), (0, 0, 0)), name), path, compress)
    return path


_BY_POSITION: list[Path] = []


def _copy_dicom(tmp_path: Path, n: int = 6, start: int = 40) -> Path:
    """Copy ``n`` real slices that are neighbours in space (file names are not in z order)."""
    if not _BY_POSITION:
        z = {
            f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
            for f in DICOM_0001.glob("*.dcm")
        }
        _BY_POSITION.extend(sorted(z, key=z.get))
    folder = tmp_path / "series"
    folder.mkdir()
    for f in _BY_POSITION[start : start + n]:
        shutil.copy(f, folder / f.name)
    return folder


def _bad_missing_raw(tmp_path: Path) -> tuple[Path, str]:
    p = _small_mhd(tmp_path)
    (tmp_path / "s.raw").unlink()
    return p, "pixel data file 's.raw' is missing"


def _bad_truncated_raw(tmp_path: Path) -> tuple[Path, str]:
    p = _small_mhd(tmp_path)
    raw = tmp_path / "s.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    return p, "truncated"


def _bad_size_mismatch(tmp_path: Path) -> tuple[Path, str]:
    p = _small_mhd(tmp_path)
    p.write_text(p.read_text().replace("DimSize = 8 8 4", "DimSize = 8 8 3"))
    return p, "size mismatch"


def _bad_corrupt_zraw(tmp_path: Path) -> tuple[Path, str]:
    p = _small_mhd(tmp_path, compress=True)
    zraw = tmp_path / "s.zraw"
    zraw.write_bytes(zraw.read_bytes()[: len(zraw.read_bytes()) // 2])
    return p, "compressed pixel data"


def _bad_2d_image(tmp_path: Path) -> tuple[Path, str]:
    p = tmp_path / "flat.mhd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.int16)), str(p))
    return p, "2-D image"


def _bad_unknown_format(tmp_path: Path) -> tuple[Path, str]:
    p = tmp_path / "scan.png"
    p.write_bytes(b"\x89PNG")
    return p, "unknown scan format"


def _bad_no_such_file(tmp_path: Path) -> tuple[Path, str]:
    return tmp_path / "absent.mhd", "no such file"


def _bad_empty_folder(tmp_path: Path) -> tuple[Path, str]:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a DICOM file")
    return folder, "contains no DICOM image files"


def _bad_two_series(tmp_path: Path) -> tuple[Path, str]:
    folder = _copy_dicom(tmp_path)
    f = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(f)
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.save_as(f)
    return folder, "contains 2 DICOM series"


def _bad_not_ct(tmp_path: Path) -> tuple[Path, str]:
    folder = _copy_dicom(tmp_path, n=3)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    return folder, "modality is MR, not CT"


def _bad_missing_slice(tmp_path: Path) -> tuple[Path, str]:
    folder = _copy_dicom(tmp_path, n=6)
    positions = {}
    for f in folder.iterdir():
        positions[f] = float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
    middle = sorted(positions, key=positions.get)[3]
    middle.unlink()
    return folder, "1 slice(s) missing"


BAD_INPUTS = {
    f.__name__[5:]: f
    for f in (
        _bad_missing_raw,
        _bad_truncated_raw,
        _bad_size_mismatch,
        _bad_corrupt_zraw,
        _bad_2d_image,
        _bad_unknown_format,
        _bad_no_such_file,
        _bad_empty_folder,
        _bad_two_series,
        _bad_not_ct,
        _bad_missing_slice,
    )
}
NEEDS_REAL = {"two_series", "not_ct", "missing_slice"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_scan_one_line_error(tmp_path: Path, case: str, capsys, request) -> None:
    if case in NEEDS_REAL:
        request.getfixturevalue("real_data")
    path, problem = BAD_INPUTS[case](tmp_path)
    with pytest.raises(LungCTError) as info:
        read_scan(path)
    assert str(path) in str(info.value) and problem in str(info.value)
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0]


def test_cli_exit_code_in_a_real_process(tmp_path: Path) -> None:
    path, _ = _bad_missing_raw(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "lungct", "info", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}: pixel data file 's.raw' is missing"
    assert "Traceback" not in proc.stderr


def test_gzip_is_not_mistaken_for_nifti(tmp_path: Path) -> None:
    p = tmp_path / "junk.nii.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"not an image at all")
    with pytest.raises(LungCTError, match="cannot be read as an image"):
        read_scan(p)
