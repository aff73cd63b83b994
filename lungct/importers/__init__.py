"""Importers into the LUNA16 layout: LIDC-IDRI as downloaded, and your own scans.

``python -m lungct import lidc`` (:mod:`lungct.importers.lidc`) turns LIDC-IDRI DICOM series
and their reading XML into ``subsetN/<seriesuid>.mhd``, ``annotations.csv`` (nodules >= 3 mm
of at least 3 of 4 readers, merged as LUNA16 did), ``annotations_excluded.csv`` and
``seriesuids.csv``; the XML, the placing of the readers' marks and their merging are in
:mod:`lungct.importers.lidc_xml`. ``python -m lungct import own``
(:mod:`lungct.importers.own`) does the same for DICOM series, NIfTI and MetaImage files with an
optional nodule table in world millimetres. Folds by patient, resuming and the output folder are
in :mod:`lungct.importers.layout`.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Finding": "lidc_xml",
    "LidcReadings": "lidc_xml",
    "ReaderMark": "lidc_xml",
    "merge_readers": "lidc_xml",
    "parse_lidc_xml": "lidc_xml",
    "place_marks": "lidc_xml",
    "import_lidc": "lidc",
    "import_own": "own",
    "read_nodule_table": "own",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    # Imported on first use, so `python -m lungct --help` does not load pydicom and SciPy.
    if name not in _WHERE:
        raise AttributeError(f"module 'lungct.importers' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lungct.importers.{_WHERE[name]}"), name)
