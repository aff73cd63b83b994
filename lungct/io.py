"""Reading and writing CT scans: MetaImage (.mhd/.mha, plain or compressed), NIfTI, DICOM series.

Every reader returns a :class:`lungct.scan.Scan` with an int16 HU array indexed ``[z, y, x]``.
Problems with the input raise :class:`lungct.errors.LungCTError` naming the file and the problem,
before SimpleITK or pydicom can fail with a library traceback.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from lungct.errors import LungCTError
from lungct.fileio import image_problem, write_via_library
from lungct.geometry import Geometry
from lungct.headers import (
    max_voxels_limit,
    metaimage_fields,
    read_metaimage_header,
    read_metaimage_pixels,
    read_nifti_header,
)
from lungct.scan import AIR_HU, Scan


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


def read_scan(path: str | os.PathLike, max_voxels: int | None = None) -> Scan:
    """Read a CT scan from a MetaImage, NIfTI file or DICOM series folder.

    Padding outside the field of view (and any value below air) becomes ``AIR_HU``; the stored
    range is kept in ``scan.hu_min`` / ``scan.hu_max``.

    The header is read and checked by this suite before any pixel is (:mod:`lungct.headers`),
    because image libraries trust it: a claimed size above ``max_voxels`` (default
    :data:`lungct.headers.DEFAULT_MAX_VOXELS`, 2^30; or the ``LUNGCT_MAX_VOXELS`` environment
    variable) is refused before anything of that size is allocated, and so are non-finite or
    zero spacing, origin and direction, and pixel data whose length (decoded length, for
    compressed data) differs from the header's. Compressed MetaImage data is decoded here, not
    by SimpleITK, whose reader returns zeros for a corrupt stream.

    Args:
        path: ``.mhd``/``.mha``/``.nii``/``.nii.gz`` file or DICOM series folder.
        max_voxels: largest voxel count to accept; ``None``: ``LUNGCT_MAX_VOXELS`` or the
            default.

    Raises:
        LungCTError: the path is missing, of an unknown kind, or its content is broken.
    """
    path = Path(path)
    if not path.exists():
        raise LungCTError(path, "no such file or folder")
    limit = max_voxels_limit(max_voxels)
    if path.is_dir():
        from lungct.dicom import read_dicom_series

        return read_dicom_series(path, max_voxels=limit)
    suffix = scan_suffix(path)
    uid = series_uid_from_path(path)
    if suffix in (".mhd", ".mha"):
        header = read_metaimage_header(path, limit)
        info = _sitk_info(path)
        _check_same_size(path, info.GetSize(), header.size)
        if info.GetNumberOfComponents() != 1:
            raise LungCTError(path, "has vector pixels; a CT scan has one value per voxel")
        array = read_metaimage_pixels(header)
        return scan_from_array(
            array,
            info.GetSpacing(),
            info.GetOrigin(),
            info.GetDirection(),
            seriesuid=uid,
            source=path,
            owned=True,
        )
    if suffix not in (".nii", ".nii.gz"):
        raise LungCTError(
            path, "unknown scan format (expected .mhd, .mha, .nii, .nii.gz or a DICOM folder)"
        )
    nifti = read_nifti_header(path, limit)
    image = _sitk_read(path)
    _check_same_size(path, image.GetSize(), nifti.size)
    return scan_from_image(image, seriesuid=uid, source=path)


def _check_same_size(path: Path, read: Sequence[int], header: Sequence[int]) -> None:
    """The image library must see the size this suite checked; anything else is refused."""
    if tuple(read) != tuple(header):
        raise LungCTError(path, f"is read as size {list(read)} but its header says {list(header)}")


def _sitk_reader(path: Path) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    return reader


def _library_error(path: Path, exc: RuntimeError) -> LungCTError:
    detail = str(exc).strip().splitlines()
    hint = next((line for line in detail if "rror" in line or "xception" in line), "")
    return LungCTError(path, f"cannot be read as an image ({hint.strip()[:160]})")


def _sitk_info(path: Path) -> sitk.ImageFileReader:
    """The header as SimpleITK understands it (geometry only; no pixel is read)."""
    reader = _sitk_reader(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _library_error(path, exc) from None
    return reader


def _sitk_read(path: Path) -> sitk.Image:
    try:
        return _sitk_reader(path).Execute()
    except RuntimeError as exc:
        raise _library_error(path, exc) from None


def scan_from_image(image: sitk.Image, seriesuid: str, source: str | os.PathLike | None) -> Scan:
    """Turn a SimpleITK image into a :class:`Scan` (int16 HU, padding -> air)."""
    dim = image.GetDimension()
    if dim != 3:
        raise LungCTError(source, f"is a {dim}-D image; a CT scan must be 3-D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise LungCTError(source, "has vector pixels; a CT scan has one value per voxel")
    return scan_from_array(
        sitk.GetArrayViewFromImage(image),
        image.GetSpacing(),
        image.GetOrigin(),
        image.GetDirection(),
        seriesuid=seriesuid,
        source=source,
    )


def scan_from_array(
    array: np.ndarray,
    spacing: Sequence[float],
    origin: Sequence[float],
    direction: Sequence[float],
    seriesuid: str,
    source: str | os.PathLike | None,
    owned: bool = False,
) -> Scan:
    """Turn a ``(z, y, x)`` array of stored values into a :class:`Scan` (int16 HU, padding -> air).

    Args:
        array: the voxels as stored (any integer or float type).
        spacing, origin, direction: the geometry, ``(x, y, z)`` order, direction row-major.
        seriesuid: the series identifier.
        source: the path, for messages.
        owned: ``array`` belongs to the caller alone and may be reused for the result, which
            saves a copy of the whole volume when it is already int16.
    """
    size = tuple(int(n) for n in array.shape[::-1])
    if min(size) < 2:
        raise LungCTError(
            source, f"has size {list(size)}; a 3-D CT scan needs >= 2 voxels per axis"
        )
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise LungCTError(source, "contains NaN or infinite voxel values")
        array = np.rint(array, out=array) if owned else np.rint(array)
    hu_min = int(array.min())
    hu_max = int(array.max())
    if array.dtype == np.int16:
        hu = array if owned else array.copy()
    else:
        hu = np.clip(array, AIR_HU, np.iinfo(np.int16).max).astype(np.int16)
    # Padding (-2048, -3024, ...) and anything below air becomes air; int16 in place is fast.
    np.maximum(hu, np.int16(AIR_HU), out=hu)
    try:
        geometry = Geometry(size=size, spacing=spacing, origin=origin, direction=direction)
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
    return metaimage_fields(path)[0]


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

    SimpleITK writes into a temporary folder; the header is read back and the pixel data must
    have the byte count it says (:func:`lungct.fileio.image_problem`) before anything is
    replaced. For MetaImage the pixel file is moved first and the header last, so a reader
    never sees a header without its data. A failed write (full disk, read-only folder) is a
    :class:`lungct.fileio.WriteError` naming ``path``, and an old file is never lost.
    """
    path = Path(path)
    image = image_from_array(array, geometry)
    data_bytes = (
        image.GetNumberOfPixels()
        * image.GetNumberOfComponentsPerPixel()
        * image.GetSizeOfPixelComponent()
    )

    def write(tmp_target: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sitk.WriteImage(image, str(tmp_target), useCompression=compress)

    write_via_library(
        path,
        write,
        lambda tmp_target: image_problem(tmp_target, image.GetSize(), data_bytes),
        companions=scan_suffix(path) == ".mhd",
    )


def write_scan(scan: Scan, path: str | os.PathLike, compress: bool = True) -> None:
    """Write a scan (int16 HU) to ``.mhd``/``.mha``/``.nii(.gz)``, atomically."""
    if not scan_suffix(path):
        raise LungCTError(path, "unknown output format (use .mhd, .mha, .nii or .nii.gz)")
    write_image(scan.array.astype(np.int16, copy=False), scan.geometry, path, compress=compress)
