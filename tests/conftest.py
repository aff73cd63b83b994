"""Shared fixtures: the real LIDC-IDRI data in ../shared, and tiny phantom scans."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from lungct.testing import chest_phantom_hu

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "data" / "real"
DICOM_0001 = REAL / "lidc-idri-0001-dicom"
MHD_0002 = REAL / "mhd" / "1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919.mhd"
NODULE_0001 = (56.208, 86.343, -115.868)
LUNA_CSV = REAL / "luna16-csv"


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The real-data folder; skip (with the reason) where ../shared is absent."""
    if not REAL.is_dir():
        pytest.skip(f"real LIDC-IDRI test data not found at {REAL} (../shared is absent)")
    return REAL


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (the maintainer scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def phantom_hu(shape_zyx=(24, 40, 48), nodule_zyx=(12, 20, 14), radius_vox=3.0) -> np.ndarray:
    """A small chest-like phantom: air outside, soft-tissue body, two lungs, one solid nodule."""
    nz, ny, nx = shape_zyx
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    hu = chest_phantom_hu(shape_zyx)
    dz, dy, dx = (z - nodule_zyx[0]), (y - nodule_zyx[1]), (x - nodule_zyx[2])
    hu[dz**2 + dy**2 + dx**2 <= radius_vox**2] = 30.0
    return hu.astype(np.int16)
