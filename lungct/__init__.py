"""lungct: the shared core of the lung-nodule suite.

CT reading (MetaImage, NIfTI, DICOM series), world <-> voxel geometry with direction,
resampling and HU windowing plans, lung segmentation, LUNA16 tables and folds, per-scan caches
with patch sampling, and a synthetic mini-LUNA generator in the real on-disk layout.

Coordinates are world millimetres ``(x, y, z)`` at every interface; numpy arrays are ``[z, y, x]``.
"""

from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.io import read_scan, write_scan
from lungct.scan import Scan

__all__ = ["Geometry", "LungCTError", "Scan", "read_scan", "write_scan"]
__version__ = "0.1.0"
