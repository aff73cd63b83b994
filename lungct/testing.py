"""Small synthetic volumes for tests and quick checks (nothing here is needed at run time)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from lungct.scan import Scan


def chest_phantom_hu(shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """A chest-like float32 HU volume: air outside, a soft-tissue body, two ellipsoid lungs.

    Tests add their own nodules (and noise) to it.
    """
    nz, ny, nx = shape_zyx
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    hu = np.full(shape_zyx, -1000.0, np.float32)
    body = ((y - ny / 2) / (0.45 * ny)) ** 2 + ((x - nx / 2) / (0.47 * nx)) ** 2 <= 1
    hu[body] = 40.0
    for cx in (0.3 * nx, 0.7 * nx):
        lung = (
            ((y - ny / 2) / (0.3 * ny)) ** 2
            + ((x - cx) / (0.15 * nx)) ** 2
            + ((z - nz / 2) / (0.45 * nz)) ** 2
        ) <= 1
        hu[lung] = -850.0
    return hu


def seal_hand_made_model(model_dir: str | os.PathLike, stage: str) -> dict:
    """Seal a model folder a test built by hand (an untrained model saved with ``save``).

    Trainers seal their folders themselves; a hand-made folder needs a manifest first, and
    its provenance says it was never trained.
    """
    from lungct.fileio import write_json_atomic
    from lungct.modeldir import MANIFEST_NAME, seal_model_dir

    manifest = Path(model_dir) / MANIFEST_NAME
    if not manifest.is_file():
        write_json_atomic(manifest, {"note": "built by a test, never trained"})
    return seal_model_dir(model_dir, stage, train_seconds=0.0)


def write_dicom_series(scan: Scan, folder: str | os.PathLike) -> Path:
    """Write a :class:`lungct.scan.Scan` as a DICOM CT series (one file per slice, identity
    direction only) into ``folder``; :func:`lungct.io.read_scan` reads it back with the same
    voxels, geometry and ``scan.seriesuid`` as its SeriesInstanceUID (which must be a valid
    UID: digits and dots)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    geometry = scan.geometry
    if not np.allclose(np.asarray(geometry.direction, float), np.eye(3).ravel()):
        raise ValueError("write_dicom_series writes scans of identity direction only")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study, frame = generate_uid(), generate_uid()
    sx, sy, sz = (float(v) for v in geometry.spacing)
    ox, oy, oz = (float(v) for v in geometry.origin)
    nz, ny, nx = scan.array.shape
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID, ds.StudyInstanceUID = scan.seriesuid, study
        ds.FrameOfReferenceUID = frame
        ds.PatientID = "phantom"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [ox, oy, oz + k * sz]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [sy, sx]  # row spacing (y), then column spacing (x)
        ds.SliceThickness = sz
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(scan.array[k], dtype="<i2").tobytes()
        ds.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)
    return folder
