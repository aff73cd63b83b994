"""Reading and writing CT scans: MetaImage (.mhd/.mha, plain or compressed), NIfTI, DICOM series.

Every reader returns a :class:`lungct.scan.Scan` with an int16 HU array indexed ``[z, y, x]``.
Problems with the input raise :class:`lungct.errors.LungCTError` naming the file and the problem,
before SimpleITK or pydicom can fail with a library traceback.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.scan import AIR_HU, Scan

METAIMAGE_TYPES = {
    "MET_CHAR": 1,
    "MET_UCHAR": 1,
    "MET_SHORT": 2,
    "MET_USHORT": 2,
    "MET_INT": 4,
    "MET_UINT": 4,
    "MET_LONG": 8,
    "MET_ULONG": 8,
    "MET_FLOAT": 4,
    "MET_DOUBLE": 8,
}


def scan_suffix(path: str | os.PathLike) -> str:
    """The lower-case format suffix of a scan path: '.mhd', '.mha', '.nii', '.nii.gz' or ''."""
    name = Path(path).name.lower()
    for suffix in (".nii.gz", ".mhd", ".mha", ".nii"):
        if name.endswith(suffix):
            return suffix
    return ""


def series_uid_from_path(path: str | os.PathLike) -> str:
    """LUNA16 names each MetaImage after its series UID: the file name without its suffix."""
    name = Path(path).name
    suffix = scan_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


def read_scan(path: str | os.PathLike) -> Scan:
    """Read a CT scan from a MetaImage, NIfTI file or DICOM series folder.

    Padding outside the field of view (and any value below air) becomes ``AIR_HU``; the stored
    range is kept in ``scan.hu_min`` / ``scan.hu_max``.

    Raises:
        LungCTError: the path is missing, of an unknown kind, or its content is broken.
    """
    path = Path(path)
    if not path.exists():
        raise LungCTError(path, "no such file or folder")
    if path.is_dir():
        from lungct.dicom import read_dicom_series

        return read_dicom_series(path)
    suffix = scan_suffix(path)
    if suffix in (".mhd", ".mha"):
        _check_metaimage(path)
    elif suffix not in (".nii", ".nii.gz"):
        raise LungCTError(
            path, "unknown scan format (expected .mhd, .mha, .nii, .nii.gz or a DICOM folder)"
        )
    try:
        image = _sitk_read(path)
    except LungCTError:
        if suffix == ".mhd":
            _diagnose_compressed(path)
        raise
    return scan_from_image(image, seriesuid=series_uid_from_path(path), source=path)


def _sitk_read(path: Path) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()
        hint = next((line for line in detail if "rror" in line or "xception" in line), "")
        raise LungCTError(path, f"cannot be read as an image ({hint.strip()[:160]})") from None


def scan_from_image(image: sitk.Image, seriesuid: str, source: str | os.PathLike | None) -> Scan:
    """Turn a SimpleITK image into a :class:`Scan` (int16 HU, padding -> air)."""
    dim = image.GetDimension()
    if dim != 3:
        raise LungCTError(source, f"is a {dim}-D image; a CT scan must be 3-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise LungCTError(source, "has vector pixels; a CT scan has one value per voxel")
    size = image.GetSize()
    if min(size) < 2:
        raise LungCTError(
            source, f"has size {list(size)}; a 3-D CT scan needs >= 2 voxels per axis"
        )
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise LungCTError(source, "contains NaN or infinite voxel values")
        array = np.rint(array)
    hu_min = int(array.min())
    hu_max = int(array.max())
    if array.dtype == np.int16:
        hu = array.copy()
    else:
        hu = np.clip(array, AIR_HU, np.iinfo(np.int16).max).astype(np.int16)
    # Padding (-2048, -3024, ...) and anything below air becomes air; int16 in place is fast.
    np.maximum(hu, np.int16(AIR_HU), out=hu)
    try:
        geometry = Geometry(
            size=size,
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=image.GetDirection(),
        )
    except LungCTError as exc:
        raise LungCTError(source, exc.problem) from None
    return Scan(
        array=hu,
        geometry=geometry,
        seriesuid=seriesuid,
        hu_min=hu_min,
        hu_max=hu_max,
        source=None if source is None else str(source),
    )


def parse_metaimage_header(path: str | os.PathLike) -> dict[str, str]:
    """The ``Key = Value`` fields of a MetaImage header (for .mha, the text part only)."""
    path = Path(path)
    fields: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.decode("latin-1").strip()
                if not line or "=" not in line:
                    if line:
                        raise LungCTError(path, f"malformed MetaImage header line {line[:60]!r}")
                    continue
                key, value = (part.strip() for part in line.split("=", 1))
                fields[key] = value
                if key == "ElementDataFile":
                    break
    except OSError as exc:
        raise LungCTError(path, f"cannot be opened ({exc.strerror})") from None
    return fields


def _check_metaimage(path: Path) -> None:
    """Catch the common broken-MetaImage cases with a message a person can act on."""
    fields = parse_metaimage_header(path)
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in fields:
            raise LungCTError(path, f"MetaImage header has no {key} field")
    try:
        ndims = int(fields["NDims"])
        dims = [int(v) for v in fields["DimSize"].split()]
    except ValueError:
        raise LungCTError(path, "MetaImage NDims/DimSize are not integers") from None
    if ndims != 3 or len(dims) != 3:
        raise LungCTError(path, f"is a {ndims}-D image (DimSize {dims}); a CT scan must be 3-D")
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    etype = fields["ElementType"]
    if etype not in METAIMAGE_TYPES:
        raise LungCTError(path, f"unsupported ElementType {etype}")
    data_file = fields["ElementDataFile"]
    if data_file == "LOCAL" or data_file.startswith("LIST") or "%" in data_file:
        return  # .mha with embedded data, or file lists: leave to SimpleITK
    raw = path.parent / data_file
    if not raw.exists():
        raise LungCTError(path, f"pixel data file '{data_file}' is missing")
    expected = int(np.prod(dims)) * METAIMAGE_TYPES[etype] * channels
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if compressed:
        # Decompressing to count bytes costs as much as reading; done only when SimpleITK fails.
        return
    actual = raw.stat().st_size
    if actual < expected:
        raise LungCTError(
            path,
            f"pixel data file '{data_file}' has {actual} bytes but the header's DimSize {dims} "
            f"x {etype} needs {expected} (truncated file or wrong DimSize)",
        )
    if actual > expected:
        raise LungCTError(
            path,
            f"pixel data file '{data_file}' has {actual} bytes but the header's DimSize {dims} "
            f"x {etype} needs only {expected} (header/array size mismatch)",
        )


def _diagnose_compressed(path: Path) -> None:
    """After a failed read of a compressed MetaImage, say what is wrong with its data file."""
    fields = parse_metaimage_header(path)
    if fields.get("CompressedData", "False").lower() != "true":
        return
    dims = [int(v) for v in fields["DimSize"].split()]
    channels = int(fields.get("ElementNumberOfChannels", "1"))
    expected = int(np.prod(dims)) * METAIMAGE_TYPES[fields["ElementType"]] * channels
    _check_zlib_length(path, path.parent / fields["ElementDataFile"], expected)


def _check_zlib_length(path: Path, raw: Path, expected: int) -> None:
    """Stream-decompress a .zraw to count its bytes without holding the volume twice."""
    d = zlib.decompressobj()
    total = 0
    try:
        with open(raw, "rb") as f:
            while chunk := f.read(1 << 22):
                total += len(d.decompress(chunk))
            total += len(d.flush())
    except zlib.error as exc:
        raise LungCTError(path, f"compressed pixel data '{raw.name}' is corrupt ({exc})") from None
    if not d.eof:
        raise LungCTError(path, f"compressed pixel data '{raw.name}' is truncated")
    if total != expected:
        raise LungCTError(
            path,
            f"compressed pixel data '{raw.name}' holds {total} bytes but the header needs "
            f"{expected} (header/array size mismatch)",
        )


def image_from_array(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A SimpleITK image of a ``(z, y, x)`` array placed on ``geometry``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    return image


def write_image(
    array: np.ndarray, geometry: Geometry, path: str | os.PathLike, compress: bool = True
) -> None:
    """Write a volume (scan, mask, probability map) in the given geometry, atomically.

    For MetaImage the pixel file is written first and the header last, both from a temporary
    folder, so a reader never sees a header without its data and an old file is never lost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = image_from_array(array, geometry)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp_target = tmpdir / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sitk.WriteImage(image, str(tmp_target), useCompression=compress)
        suffix = scan_suffix(path)
        if suffix == ".mhd":
            for sibling in sorted(tmpdir.iterdir()):
                if sibling.name != path.name:
                    os.replace(sibling, path.parent / sibling.name)
        os.replace(tmp_target, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_scan(scan: Scan, path: str | os.PathLike, compress: bool = True) -> None:
    """Write a scan (int16 HU) to ``.mhd``/``.mha``/``.nii(.gz)``, atomically."""
    if not scan_suffix(path):
        raise LungCTError(path, "unknown output format (use .mhd, .mha, .nii or .nii.gz)")
    write_image(scan.array.astype(np.int16, copy=False), scan.geometry, path, compress=compress)
