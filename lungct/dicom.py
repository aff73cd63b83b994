"""DICOM series folders: validate with pydicom, order by position, read pixels with SimpleITK.

The checks come first so a broken folder gets a one-line reason: no DICOM files, several
series, a non-CT modality, mixed orientations, sizes or pixel spacings, a tilted gantry,
duplicate or missing slices, malformed position/orientation/spacing values. Slices are sorted by
ImagePositionPatient projected on the slice normal, and the z spacing comes from the positions
(SliceThickness is not the spacing). SimpleITK's series reader applies RescaleSlope/Intercept.

A tilted gantry puts each slice's origin off the slice normal: the slices are parallelograms,
not a box, and reading them as a regular grid would shear every coordinate, so such a series is
refused rather than silently misplaced.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from lungct.errors import LungCTError
from lungct.headers import check_voxel_count, max_voxels_limit
from lungct.io import scan_from_image
from lungct.scan import Scan


@dataclass
class _Slice:
    path: Path
    series_uid: str
    modality: str
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: np.ndarray
    rows: int
    columns: int
    gantry_tilt: float
    localizer: bool


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    """An element's value as the text stored in the file, without pydicom's conversion.

    Decimal strings are parsed here so that a malformed one becomes a clear refusal naming the
    file, not a pydicom warning followed by a traceback.
    """
    elem = ds.get_item(keyword)
    if elem is None:
        return None
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("latin-1").strip(" \0")
    if isinstance(value, str):
        return value.strip()
    try:
        return "\\".join(str(v) for v in value)
    except TypeError:
        return str(value)


def _shown(text: str) -> str:
    """A header value quoted for a one-line message: control characters escaped, DICOM's
    backslash separators kept single."""
    return repr(text[:80]).replace("\\\\", "\\")


def _numbers(path: Path, ds: pydicom.Dataset, keyword: str, count: int) -> np.ndarray:
    text = _text(ds, keyword)
    if text is None:
        raise LungCTError(path, f"DICOM image has no {keyword}")
    try:
        values = [float(v) for v in text.split("\\")]
    except ValueError:
        values = []
    if len(values) != count:
        raise LungCTError(path, f"DICOM {keyword} {_shown(text)} is not {count} numbers")
    if not all(np.isfinite(values)):
        raise LungCTError(path, f"DICOM {keyword} {_shown(text)} is not finite")
    return np.asarray(values)


def _whole(path: Path, ds: pydicom.Dataset, keyword: str) -> int:
    try:
        value = int(ds[keyword].value)
    except Exception:  # a malformed element; refused below
        value = 0
    if value < 1:
        raise LungCTError(path, f"DICOM {keyword} is missing or not a positive whole number")
    return value


def _read_header(path: Path) -> _Slice | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        # Not DICOM, or too broken to be one (pydicom raises many kinds of error on hostile
        # bytes); the folder's other checks catch a slice missing from the series.
        return None
    try:
        return _slice_from(path, ds)
    except LungCTError:
        raise
    except Exception as exc:
        reason = " ".join(str(exc).split())[:120]
        raise LungCTError(path, f"DICOM header cannot be parsed ({reason})") from None


def _slice_from(path: Path, ds: pydicom.Dataset) -> _Slice | None:
    if "Rows" not in ds:
        return None  # DICOMDIR, structured reports and the like: not image slices
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise LungCTError(path, "DICOM image has no ImagePositionPatient/ImageOrientationPatient")
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    orientation = _numbers(path, ds, "ImageOrientationPatient", 6)
    row, col = orientation[:3], orientation[3:]
    if (
        abs(np.linalg.norm(row) - 1) > 1e-3
        or abs(np.linalg.norm(col) - 1) > 1e-3
        or abs(float(row @ col)) > 1e-3
    ):
        raise LungCTError(
            path,
            f"DICOM ImageOrientationPatient {orientation.tolist()} is not two perpendicular "
            "unit vectors",
        )
    spacing = _numbers(path, ds, "PixelSpacing", 2)
    if np.any(spacing <= 0):
        raise LungCTError(path, f"DICOM PixelSpacing {spacing.tolist()} must be positive")
    tilt_text = _text(ds, "GantryDetectorTilt")
    try:
        tilt = float(tilt_text) if tilt_text else 0.0
    except ValueError:
        raise LungCTError(
            path, f"DICOM GantryDetectorTilt {_shown(tilt_text)} is not a number"
        ) from None
    return _Slice(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        position=_numbers(path, ds, "ImagePositionPatient", 3),
        orientation=orientation,
        pixel_spacing=spacing,
        rows=_whole(path, ds, "Rows"),
        columns=_whole(path, ds, "Columns"),
        gantry_tilt=tilt,
        localizer="LOCALIZER" in image_type,
    )


def _check_same_grid(folder: Path, slices: list[_Slice]) -> None:
    """Every slice must have the first one's size, pixel spacing, orientation and no tilt."""
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise LungCTError(
                folder,
                f"slices have different sizes ({first.rows}x{first.columns} in {first.path.name}, "
                f"{s.rows}x{s.columns} in {s.path.name})",
            )
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, rtol=1e-4, atol=1e-6):
            raise LungCTError(
                folder,
                f"slices have different PixelSpacing ({first.pixel_spacing.tolist()} mm in "
                f"{first.path.name}, {s.pixel_spacing.tolist()} mm in {s.path.name})",
            )
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise LungCTError(
                folder, "slices have different ImageOrientationPatient (mixed series)"
            )
    tilted = next((s for s in slices if abs(s.gantry_tilt) > 1e-3), None)
    if tilted is not None:
        raise LungCTError(
            folder,
            f"gantry tilt of {tilted.gantry_tilt:g} degrees ({tilted.path.name}); a tilted "
            "series is not a regular grid (resample it to a box first)",
        )


def read_dicom_series(folder: str | Path, max_voxels: int | None = None) -> Scan:
    """Read one CT series from a folder of DICOM files (non-DICOM files are ignored).

    Args:
        folder: the series folder.
        max_voxels: largest Rows x Columns x slices to read; ``None``: ``LUNGCT_MAX_VOXELS`` or
            :data:`lungct.headers.DEFAULT_MAX_VOXELS` (see :func:`lungct.headers.max_voxels_limit`).

    Raises:
        LungCTError: empty folder, several series, not CT, inconsistent orientation, size or
            pixel spacing, gantry tilt, duplicate or missing slices, malformed geometry values,
            too many voxels, or unreadable pixel data.
    """
    folder = Path(folder)
    limit = max_voxels_limit(max_voxels)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    slices = [s for s in (_read_header(p) for p in files) if s is not None]
    slices = [s for s in slices if not s.localizer]
    if not slices:
        raise LungCTError(folder, "contains no DICOM image files")
    series = sorted({s.series_uid for s in slices})
    if len(series) > 1:
        raise LungCTError(
            folder, f"contains {len(series)} DICOM series ({', '.join(series[:3])}...); pass one"
        )
    modalities = sorted({s.modality for s in slices})
    if modalities != ["CT"]:
        raise LungCTError(folder, f"modality is {'/'.join(modalities) or 'missing'}, not CT")
    if len(slices) < 2:
        raise LungCTError(folder, "has a single slice; a CT series needs several")
    _check_same_grid(folder, slices)
    orient = slices[0].orientation
    normal = np.cross(orient[:3], orient[3:])
    heights = np.asarray([float(s.position @ normal) for s in slices])
    order = np.argsort(heights, kind="stable")
    heights = heights[order]
    # Each slice's origin must sit on the line through the first one along the normal.
    rel = np.asarray([slices[i].position for i in order]) - slices[order[0]].position
    sideways = rel - np.outer(rel @ normal, normal)
    drift = float(np.linalg.norm(sideways, axis=1).max())
    if drift > max(0.01, 0.1 * float(slices[0].pixel_spacing.min())):
        extent = float(heights[-1] - heights[0])
        angle = np.degrees(np.arctan2(drift, extent))
        raise LungCTError(
            folder,
            f"slice positions drift {drift:.2f} mm off the slice normal over {extent:.1f} mm "
            f"(gantry tilt of about {angle:.1f} degrees); a tilted series is not a regular grid "
            "(resample it to a box first)",
        )
    steps = np.diff(heights)
    if np.any(steps < 1e-3):
        dup = slices[order[int(np.argmin(steps)) + 1]].path.name
        raise LungCTError(folder, f"two slices share one position (duplicate slice {dup})")
    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > 1.5 * step)
    if gaps.size:
        at = heights[gaps[0]]
        missing = round(steps[gaps[0]] / step) - 1
        raise LungCTError(
            folder,
            f"{missing} slice(s) missing after position {at:.2f} mm along the slice normal "
            f"(spacing {step:.3f} mm, gap {steps[gaps[0]]:.3f} mm)",
        )
    if np.ptp(steps) > 0.05 * step + 1e-3:
        raise LungCTError(
            folder, f"slice spacing varies from {steps.min():.3f} to {steps.max():.3f} mm"
        )
    first = slices[0]
    check_voxel_count(folder, [first.columns, first.rows, len(slices)], limit)
    ordered = [str(slices[i].path) for i in order]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(ordered)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1][:160]
        raise LungCTError(folder, f"DICOM pixel data cannot be read ({msg})") from None
    if image.GetSize() != (first.columns, first.rows, len(slices)):
        raise LungCTError(
            folder,
            f"DICOM pixel data reads as size {list(image.GetSize())}, not the "
            f"{first.columns}x{first.rows}x{len(slices)} its headers describe",
        )
    # The series reader takes spacing from the first two slices; use the median of all of them.
    spacing = list(image.GetSpacing())
    spacing[2] = step
    image.SetSpacing(spacing)
    return scan_from_image(image, seriesuid=slices[0].series_uid, source=folder)


def series_uid_of_folder(folder: str | Path) -> str | None:
    """The SeriesInstanceUID :func:`read_dicom_series` would give ``folder``, from the header of
    its first image slice (sorted by name; localizers and files that are not DICOM skipped).

    Reads headers only, and stops at the first slice: a quick name for a series before it is
    read. ``None`` when no readable image slice is found (reading the folder then says why).
    """
    folder = Path(folder)
    try:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    except OSError:
        return None
    for path in files:
        try:
            found = _read_header(path)
        except LungCTError:
            continue
        if found is not None and not found.localizer and found.series_uid:
            return found.series_uid
    return None
