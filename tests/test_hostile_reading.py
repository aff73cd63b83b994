"""Hostile and broken scan files: each is refused with one line, quickly, in bounded memory.

Every case of the corpus builds one broken input in its own folder, runs the real command line
(``python -m lungct info FILE``) in a subprocess and checks: exit status 2, stderr exactly one
line ``error: <path>: <problem>``, no traceback, and every file in the folder byte for byte as
it was. The controls read the same builders' files without the defect, so each refusal is the
defect's doing, and show that valid files read exactly as SimpleITK reads them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from conftest import REPO
from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.headers import DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV
from lungct.io import read_scan, write_scan
from lungct.scan import AIR_HU, Scan

SHAPE_ZYX = (4, 8, 8)
GEOMETRY = Geometry((8, 8, 4), (0.7, 0.8, 2.5), (-10.0, 20.0, 30.0))


def _volume() -> np.ndarray:
    """Varied int16 values, so that compressed data is more than a few bytes."""
    rng = np.random.default_rng(17)
    return rng.integers(-1000, 1500, size=SHAPE_ZYX).astype(np.int16)


# --- builders of valid files ----------------------------------------------------------------


def _metaimage(folder: Path, suffix: str = ".mhd", compress: bool = False) -> Path:
    path = folder / f"s{suffix}"
    write_scan(Scan(_volume(), GEOMETRY, "s"), path, compress=compress)
    return path


def _set_field(path: Path, key: str, value: str) -> None:
    """Replace a MetaImage header field, or add it before ElementDataFile."""
    text = path.read_text()
    line = f"{key} = {value}"
    if re.search(rf"^{key} = .*$", text, flags=re.M):
        text = re.sub(rf"^{key} = .*$", line, text, flags=re.M)
    else:
        text = text.replace("ElementDataFile", f"{line}\nElementDataFile")
    path.write_text(text)


def _nifti(folder: Path, gz: bool = False) -> Path:
    path = folder / ("s.nii.gz" if gz else "s.nii")
    write_scan(Scan(_volume(), GEOMETRY, "s"), path)
    return path


def _patch_nifti(path: Path, offset: int, fmt: str, *values: float) -> None:
    """Overwrite header bytes of a .nii or .nii.gz (recompressed as a valid gzip file)."""
    gz = path.name.endswith(".gz")
    data = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    struct.pack_into("<" + fmt, data, offset, *values)
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))


def _dicom_series(
    folder: Path,
    n: int = 5,
    edit: Callable[[int, Dataset], None] | None = None,
    shift_y_per_slice: float = 0.0,
) -> Path:
    """A small synthetic CT series: 16x16 int16 slices, 0.7 mm pixels, 2.5 mm apart."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ds.PatientID = "phantom"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-10.0, -20.0 + k * shift_y_per_slice, -30.0 + 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = 2.5
        ds.Rows = ds.Columns = 16
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = (np.arange(256, dtype=np.int16).reshape(16, 16) * 4 + 10 * k).tobytes()
        if edit is not None:
            edit(k, ds)
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return folder


def _patch_dicom_text(path: Path, tag: tuple[int, int], vr: str, value: bytes) -> None:
    """Write raw bytes into a text element of an explicit-VR little-endian file.

    pydicom refuses to write a malformed decimal string, which is exactly what is needed here.
    """
    data = path.read_bytes()
    key = struct.pack("<HH", *tag) + vr.encode()
    at = data.index(key)
    (length,) = struct.unpack("<H", data[at + 6 : at + 8])
    value += b" " * (len(value) % 2)
    path.write_bytes(
        data[: at + 6] + struct.pack("<H", len(value)) + value + data[at + 8 + length :]
    )


def _zlib_bomb(chunks: int) -> bytes:
    """A valid zlib stream of ``chunks`` x 16 MiB of zeros, about 16 KB per chunk.

    One chunk is deflated once and its byte-aligned output repeated; the Adler-32 of N zero
    bytes is ``(N mod 65521) << 16 | 1``.
    """
    zeros = bytes(1 << 24)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = ((chunks * len(zeros)) % 65521) << 16 | 1
    return b"\x78\xda" + block * chunks + b"\x03\x00" + struct.pack(">I", adler)


def _bomb_mhd(folder: Path) -> Path:
    """About 3 MB on disk, a valid stream of 3 GB of zeros, a header claiming 2048^3 int16."""
    path = _metaimage(folder, compress=True)
    zraw = folder / "s.zraw"
    zraw.write_bytes(_zlib_bomb(184))
    _set_field(path, "DimSize", "2048 2048 2048")
    _set_field(path, "CompressedDataSize", str(zraw.stat().st_size))
    return path


# --- the corpus: each builder returns (path given to the command, expected problem text) ----


def _zraw_corrupt(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder, compress=True)
    zraw = folder / "s.zraw"
    data = bytearray(zraw.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = b"\xa5" * 16
    zraw.write_bytes(bytes(data))
    return path, "compressed pixel data 's.zraw' is corrupt"


def _zraw_too_long(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder, compress=True)
    zraw = folder / "s.zraw"
    zraw.write_bytes(zlib.compress(np.tile(_volume(), (10, 1, 1)).tobytes()))
    _set_field(path, "CompressedDataSize", str(zraw.stat().st_size))
    return path, "holds more than the 512 bytes"


def _zraw_too_short(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder, compress=True)
    zraw = folder / "s.zraw"
    zraw.write_bytes(zlib.compress(_volume()[:2].tobytes()))
    _set_field(path, "CompressedDataSize", str(zraw.stat().st_size))
    return path, "holds 256 bytes but the header needs 512"


def _zraw_stream_cut(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder, compress=True)
    zraw = folder / "s.zraw"
    zraw.write_bytes(zraw.read_bytes()[:-40])
    _set_field(path, "CompressedDataSize", str(zraw.stat().st_size))
    return path, "compressed pixel data 's.zraw' is truncated"


def _zraw_trailing_bytes(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder, compress=True)
    zraw = folder / "s.zraw"
    zraw.write_bytes(zraw.read_bytes() + b"extra")
    _set_field(path, "CompressedDataSize", str(zraw.stat().st_size))
    return path, "has 5 bytes after its zlib stream"


def _compressed_size_8gib(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder, compress=True)
    _set_field(path, "CompressedDataSize", str(8 << 30))
    return path, "CompressedDataSize is 8589934592"


def _compressed_bomb_2048(folder: Path) -> tuple[Path, str]:
    return _bomb_mhd(folder), "2048x2048x2048 = 8,589,934,592 voxels, more than the limit"


def _mha_truncated(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder, suffix=".mha")
    path.write_bytes(path.read_bytes()[:-100])
    return path, "truncated file or wrong DimSize"


def _raw_too_short(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    raw = folder / "s.raw"
    raw.write_bytes(raw.read_bytes()[:300])
    return path, "pixel data file 's.raw' has 300 bytes but the header's DimSize"


def _raw_missing(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    (folder / "s.raw").unlink()
    return path, "pixel data file 's.raw' is missing"


def _dims_huge(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    _set_field(path, "DimSize", "100000 100000 100000")
    return path, "more than the limit of 1,073,741,824 (set LUNGCT_MAX_VOXELS"


def _element_type_unknown(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    _set_field(path, "ElementType", "MET_WHATEVER")
    return path, "unsupported ElementType 'MET_WHATEVER'"


def _ndims_4(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    _set_field(path, "NDims", "4")
    _set_field(path, "DimSize", "8 8 2 2")
    return path, "is a 4-D image"


def _dimsize_text(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    _set_field(path, "DimSize", "8 eight 4")
    return path, "DimSize '8 eight 4' is not whole numbers"


def _dimsize_zero_negative(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    _set_field(path, "DimSize", "8 0 -4")
    return path, "has size [8, 0, -4]; a 3-D CT scan needs >= 2 voxels per axis"


def _spacing_zero_negative(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    _set_field(path, "ElementSpacing", "0.7 0 -2.5")
    return path, "ElementSpacing [0.7, 0.0, -2.5] must be positive"


def _spacing_nan(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    _set_field(path, "ElementSpacing", "0.7 nan 2.5")
    return path, "ElementSpacing '0.7 nan 2.5' is not finite"


def _offset_nan(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder, compress=True)
    _set_field(path, "Offset", "nan 20 30")
    return path, "Offset 'nan 20 30' is not finite"


def _transform_nan(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    _set_field(path, "TransformMatrix", "1 0 0 0 nan 0 0 0 1")
    return path, "TransformMatrix '1 0 0 0 nan 0 0 0 1' is not finite"


def _transform_singular(folder: Path) -> tuple[Path, str]:
    path = _metaimage(folder)
    _set_field(path, "TransformMatrix", "1 0 0 1 0 0 0 0 1")
    return path, "TransformMatrix '1 0 0 1 0 0 0 0 1' is singular"


def _binary_named_mhd(folder: Path) -> tuple[Path, str]:
    path = folder / "s.mhd"
    path.write_bytes(b"\xff" * (2 << 20))
    return path, "malformed MetaImage header line"


def _nii_truncated(folder: Path) -> tuple[Path, str]:
    path = _nifti(folder)
    path.write_bytes(path.read_bytes()[:-100])
    return path, "has 764 bytes but its header (vox_offset 352"


def _niigz_truncated_content(folder: Path) -> tuple[Path, str]:
    path = _nifti(folder, gz=True)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    return path, "has 764 bytes but its header (vox_offset 352"


def _niigz_stream_cut(folder: Path) -> tuple[Path, str]:
    path = _nifti(folder, gz=True)
    path.write_bytes(path.read_bytes()[:-30])
    return path, "is truncated (its gzip stream ends"


def _nii_pixdim_zero(folder: Path) -> tuple[Path, str]:
    path = _nifti(folder)
    _patch_nifti(path, 80, "f", 0.0)  # pixdim[1]
    return path, "NIfTI pixdim (voxel size) [0, 0.8, 2.5] must be positive and finite"


def _nii_sform_nan(folder: Path) -> tuple[Path, str]:
    path = _nifti(folder, gz=True)
    _patch_nifti(path, 280 + 12, "f", float("nan"))  # srow_x[3], the x offset
    return path, "NIfTI sform (srow_x/y/z) is not finite"


def _nii_qform_nan(folder: Path) -> tuple[Path, str]:
    path = _nifti(folder)
    _patch_nifti(path, 268, "f", float("nan"))  # qoffset_x
    return path, "NIfTI qform (quaternion, offset or qfac) is not finite"


def _nii_bomb(folder: Path) -> tuple[Path, str]:
    path = _nifti(folder, gz=True)
    _patch_nifti(path, 40, "4h", 3, 2048, 2048, 2048)
    return path, "2048x2048x2048 = 8,589,934,592 voxels"


def _nii_4d(folder: Path) -> tuple[Path, str]:
    path = _nifti(folder)
    _patch_nifti(path, 40, "5h", 4, 8, 8, 2, 2)
    return path, "is a 4-D image"


def _dicom_tilted_positions(folder: Path) -> tuple[Path, str]:
    series = _dicom_series(folder / "series", shift_y_per_slice=0.44)  # 10 degrees
    return series, "gantry tilt of about 10.0 degrees"


def _dicom_tilt_tag(folder: Path) -> tuple[Path, str]:
    def tilt(k: int, ds: Dataset) -> None:
        ds.GantryDetectorTilt = 15

    return _dicom_series(folder / "series", edit=tilt), "gantry tilt of 15 degrees"


def _dicom_pixel_spacing_varies(folder: Path) -> tuple[Path, str]:
    def spacing(k: int, ds: Dataset) -> None:
        if k == 3:
            ds.PixelSpacing = [0.8, 0.8]

    return _dicom_series(folder / "series", edit=spacing), "slices have different PixelSpacing"


def _dicom_rows_vary(folder: Path) -> tuple[Path, str]:
    def rows(k: int, ds: Dataset) -> None:
        if k == 2:
            ds.Rows = 8
            ds.PixelData = ds.PixelData[: 8 * 16 * 2]

    return _dicom_series(folder / "series", edit=rows), "slices have different sizes"


def _dicom_position_text(folder: Path) -> tuple[Path, str]:
    series = _dicom_series(folder / "series")
    _patch_dicom_text(series / "002.dcm", (0x0020, 0x0032), "DS", b"abc\\1\\2")
    return series, "002.dcm: DICOM ImagePositionPatient 'abc\\1\\2' is not 3 numbers"


def _dicom_position_two_values(folder: Path) -> tuple[Path, str]:
    def two(k: int, ds: Dataset) -> None:
        if k == 1:
            ds.ImagePositionPatient = [-10.0, -20.0]

    series = _dicom_series(folder / "series", edit=two)
    return series, "001.dcm: DICOM ImagePositionPatient '-10.0\\-20.0' is not 3 numbers"


def _dicom_orientation_not_unit(folder: Path) -> tuple[Path, str]:
    def skew(k: int, ds: Dataset) -> None:
        ds.ImageOrientationPatient = [2, 0, 0, 0, 1, 0]

    series = _dicom_series(folder / "series", edit=skew)
    return series, "is not two perpendicular unit vectors"


def _dicom_huge_rows(folder: Path) -> tuple[Path, str]:
    def huge(k: int, ds: Dataset) -> None:
        ds.Rows = ds.Columns = 65535

    series = _dicom_series(folder / "series", edit=huge)
    return series, "65535x65535x5 = 21,474,181,125 voxels, more than the limit"


CORPUS: dict[str, Callable[[Path], tuple[Path, str]]] = {
    f.__name__[1:]: f
    for f in (
        _zraw_corrupt,
        _zraw_too_long,
        _zraw_too_short,
        _zraw_stream_cut,
        _zraw_trailing_bytes,
        _compressed_size_8gib,
        _compressed_bomb_2048,
        _mha_truncated,
        _raw_too_short,
        _raw_missing,
        _dims_huge,
        _element_type_unknown,
        _ndims_4,
        _dimsize_text,
        _dimsize_zero_negative,
        _spacing_zero_negative,
        _spacing_nan,
        _offset_nan,
        _transform_nan,
        _transform_singular,
        _binary_named_mhd,
        _nii_truncated,
        _niigz_truncated_content,
        _niigz_stream_cut,
        _nii_pixdim_zero,
        _nii_sform_nan,
        _nii_qform_nan,
        _nii_bomb,
        _nii_4d,
        _dicom_tilted_positions,
        _dicom_tilt_tag,
        _dicom_pixel_spacing_varies,
        _dicom_rows_vary,
        _dicom_position_text,
        _dicom_position_two_values,
        _dicom_orientation_not_unit,
        _dicom_huge_rows,
    )
}


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != MAX_VOXELS_ENV}
    env["PYTHONPATH"] = str(REPO)
    return env


def _run_info(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lungct", "info", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_cli_env(),
        timeout=120,
    )


@pytest.fixture(scope="module")
def corpus_runs(tmp_path_factory) -> dict[str, tuple]:
    """Build every case, run the command on each (two at a time), note whether files changed."""
    cases = {}
    for name, build in CORPUS.items():
        folder = tmp_path_factory.mktemp(name)
        path, problem = build(folder)
        cases[name] = (folder, path, problem, _hashes(folder))
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(cases, pool.map(_run_info, [c[1] for c in cases.values()]), strict=True))
    return {
        name: (path, problem, procs[name], _hashes(folder) == before)
        for name, (folder, path, problem, before) in cases.items()
    }


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_broken_input_is_refused_in_one_line(corpus_runs, case: str) -> None:
    path, problem, proc, unchanged = corpus_runs[case]
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {path}"), lines[0]
    assert problem in lines[0], lines[0]
    assert proc.stdout == ""
    assert unchanged, "a file of the input changed or appeared"


# --- controls: the same builders without a defect read, and read as SimpleITK reads them --------


@pytest.mark.parametrize(
    "build",
    [
        lambda d: _metaimage(d),
        lambda d: _metaimage(d, compress=True),
        lambda d: _metaimage(d, suffix=".mha"),
        lambda d: _metaimage(d, suffix=".mha", compress=True),
        lambda d: _nifti(d),
        lambda d: _nifti(d, gz=True),
    ],
    ids=["mhd", "mhd-zraw", "mha", "mha-compressed", "nii", "nii.gz"],
)
def test_valid_files_read_as_simpleitk_reads_them(tmp_path: Path, build) -> None:
    path = build(tmp_path)
    scan = read_scan(path)
    reference = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(scan.array, np.maximum(_volume(), AIR_HU))
    np.testing.assert_array_equal(scan.array, np.maximum(sitk.GetArrayFromImage(reference), AIR_HU))
    assert scan.geometry.size == reference.GetSize()
    np.testing.assert_allclose(scan.geometry.spacing, reference.GetSpacing())
    np.testing.assert_allclose(scan.geometry.origin, reference.GetOrigin())
    np.testing.assert_allclose(scan.geometry.direction, reference.GetDirection())


@pytest.mark.parametrize(
    ("element_type", "dtype"),
    [("MET_SHORT", ">i2"), ("MET_LONG", ">i4"), ("MET_FLOAT", ">f4"), ("MET_UCHAR", "u1")],
)
@pytest.mark.parametrize("compress", [False, True])
def test_big_endian_and_other_element_types(
    tmp_path: Path, element_type: str, dtype: str, compress: bool
) -> None:
    """Pixels decoded here, not by SimpleITK, must still match what SimpleITK decodes."""
    path = _metaimage(tmp_path, compress=compress)
    values = np.clip(_volume(), 0, 255) if dtype == "u1" else _volume()
    data = values.astype(dtype).tobytes()
    if compress:
        (tmp_path / "s.zraw").write_bytes(zlib.compress(data))
        _set_field(path, "CompressedDataSize", str((tmp_path / "s.zraw").stat().st_size))
    else:
        (tmp_path / "s.raw").write_bytes(data)
    _set_field(path, "ElementType", element_type)
    _set_field(path, "BinaryDataByteOrderMSB", "True")
    scan = read_scan(path)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(reference, values)
    np.testing.assert_array_equal(scan.array, np.maximum(values, AIR_HU))


def test_dicom_series_control(tmp_path: Path) -> None:
    scan = read_scan(_dicom_series(tmp_path / "series"))
    assert scan.geometry.size == (16, 16, 5)
    np.testing.assert_allclose(scan.geometry.spacing, (0.7, 0.7, 2.5))
    np.testing.assert_allclose(scan.geometry.origin, (-10.0, -20.0, -30.0))
    expected = np.arange(256).reshape(16, 16) * 4 + 10 * 3 - 1024
    np.testing.assert_array_equal(scan.array[3], np.maximum(expected, AIR_HU))


def test_dicom_tilt_below_a_tenth_of_a_pixel_is_accepted(tmp_path: Path) -> None:
    """Positions rounded in the file drift a little; that is not a tilted gantry."""
    scan = read_scan(_dicom_series(tmp_path / "series", shift_y_per_slice=0.01))
    assert scan.geometry.size == (16, 16, 5)


# --- the voxel limit -------------------------------------------------------------------------


def test_limit_argument_and_environment(tmp_path: Path, monkeypatch) -> None:
    path = _metaimage(tmp_path, compress=True)
    voxels = 8 * 8 * 4
    assert read_scan(path, max_voxels=voxels).array.shape == SHAPE_ZYX  # the limit is inclusive
    with pytest.raises(LungCTError, match=f"more than the limit of {voxels - 1}"):
        read_scan(path, max_voxels=voxels - 1)
    monkeypatch.setenv(MAX_VOXELS_ENV, str(voxels - 1))
    with pytest.raises(LungCTError, match=MAX_VOXELS_ENV):
        read_scan(path)
    assert read_scan(path, max_voxels=voxels).array.shape == SHAPE_ZYX  # the argument wins
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(LungCTError) as info:
        read_scan(path)
    assert info.value.path == MAX_VOXELS_ENV and "'lots'" in info.value.problem
    monkeypatch.delenv(MAX_VOXELS_ENV)
    assert DEFAULT_MAX_VOXELS == 1 << 30
    dicom = _dicom_series(tmp_path / "series")
    with pytest.raises(LungCTError, match="16x16x5 = 1,280 voxels"):
        read_scan(dicom, max_voxels=1279)


def test_limit_raised_in_the_environment_reaches_the_command(tmp_path: Path) -> None:
    path = _metaimage(tmp_path)
    env = _cli_env() | {MAX_VOXELS_ENV: "100"}
    proc = subprocess.run(
        [sys.executable, "-m", "lungct", "info", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {path}: header claims 8x8x4 = 256 voxels, more than the limit of 100 "
        f"(set {MAX_VOXELS_ENV} to read a larger scan)"
    ]


# --- the bomb: refused fast, in little memory, without TensorFlow -----------------------------

# Peak RSS of this process image. ru_maxrss is not used: on Linux it starts from the RSS the
# parent had when it forked (here, pytest with every earlier test's memory); VmHWM does not.
_MEASURE = """
import json, resource, sys, time

def peak_rss_mb():
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

t0 = time.perf_counter()
from lungct.__main__ import main
status = main(["info", sys.argv[1]])
t1 = time.perf_counter()
from lungct.errors import LungCTError
from lungct.io import read_scan
t2 = time.perf_counter()
try:
    read_scan(sys.argv[1])
    outcome = "read"
except LungCTError as exc:
    outcome = exc.problem
t3 = time.perf_counter()
print(json.dumps({
    "status": status,
    "outcome": outcome,
    "command_s": t1 - t0,
    "refuse_s": t3 - t2,
    "peak_rss_mb": peak_rss_mb(),
    "tensorflow": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")),
}))
"""


def test_compressed_bomb_refused_fast_in_little_memory(tmp_path: Path) -> None:
    """A 3 MB .zraw that inflates to 3 GB, under a header claiming 2048^3 int16 (16 GiB)."""
    path = _bomb_mhd(tmp_path)
    assert 2_900_000 < (tmp_path / "s.zraw").stat().st_size < 3_200_000
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_cli_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["status"] == 2
    assert "more than the limit" in result["outcome"]
    assert proc.stderr.splitlines() == [f"error: {path}: {result['outcome']}"]
    assert result["peak_rss_mb"] < 200, result
    assert result["refuse_s"] < 1.0, result
    assert result["tensorflow"] == []


def test_geometry_refuses_non_finite_origin_and_direction() -> None:
    """The last line of defence for every reader: a NaN never reaches ``info``'s JSON."""
    nan = float("nan")
    with pytest.raises(LungCTError, match="origin must be finite"):
        Geometry((2, 2, 2), (1, 1, 1), (nan, 0, 0))
    with pytest.raises(LungCTError, match="direction must be finite"):
        Geometry((2, 2, 2), (1, 1, 1), (0, 0, 0), (1, 0, 0, 0, nan, 0, 0, 0, 1))
    with pytest.raises(LungCTError, match="spacing must be positive and finite"):
        Geometry((2, 2, 2), (1, float("inf"), 1), (0, 0, 0))
