"""DICOM series folders: validate with pydicom, order by position, read pixels with SimpleITK.

The checks come first so a broken folder gets a one-line reason: no DICOM files, several
series, a non-CT modality, mixed orientations, duplicate or missing slices. Slices are sorted by
ImagePositionPatient projected on the slice normal, and the z spacing comes from the positions
(SliceThickness is not the spacing). SimpleITK's series reader applies RescaleSlope/Intercept.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from lungct.errors import LungCTError
from lungct.io import scan_from_image
from lungct.scan import Scan


@dataclass
class _Slice:
    path: Path
    series_uid: str
    modality: str
    position: np.ndarray
    orientation: np.ndarray
    localizer: bool


def _read_header(path: Path) -> _Slice | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return None
    if "Rows" not in ds:
        return None  # DICOMDIR, structured reports and the like: not image slices
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise LungCTError(path, "DICOM image has no ImagePositionPatient/ImageOrientationPatient")
    image_type = [str(v).upper() for v in ds.get("ImageType", [])]
    return _Slice(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        position=np.asarray([float(v) for v in ds.ImagePositionPatient]),
        orientation=np.asarray([float(v) for v in ds.ImageOrientationPatient]),
        localizer="LOCALIZER" in image_type,
    )


def read_dicom_series(folder: str | Path) -> Scan:
    """Read one CT series from a folder of DICOM files (non-DICOM files are ignored).

    Raises:
        LungCTError: empty folder, several series, not CT, inconsistent orientation,
            duplicate or missing slices, or unreadable pixel data.
    """
    folder = Path(folder)
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
    orient = slices[0].orientation
    if any(not np.allclose(s.orientation, orient, atol=1e-4) for s in slices):
        raise LungCTError(folder, "slices have different ImageOrientationPatient (mixed series)")
    normal = np.cross(orient[:3], orient[3:])
    heights = np.asarray([float(s.position @ normal) for s in slices])
    order = np.argsort(heights, kind="stable")
    heights = heights[order]
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
    ordered = [str(slices[i].path) for i in order]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(ordered)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        msg = str(exc).strip().splitlines()[-1][:160]
        raise LungCTError(folder, f"DICOM pixel data cannot be read ({msg})") from None
    # The series reader takes spacing from the first two slices; use the median of all of them.
    spacing = list(image.GetSpacing())
    spacing[2] = step
    image.SetSpacing(spacing)
    return scan_from_image(image, seriesuid=slices[0].series_uid, source=folder)
