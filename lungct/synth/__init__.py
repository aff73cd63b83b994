"""Synthetic chest CT with ground truth, in the real LUNA16 layout.

A procedural chest (body, fat, muscle, ribs, spine, sternum, scapulae, heart, mediastinum with
great vessels, trachea and bronchi, lungs with parenchymal texture) with space-filling,
tapering vessel and airway trees, nodules shaped from real LIDC-IDRI radiologist outlines
(solid, part-solid, ground-glass; isolated, juxtavascular, juxtapleural) with diameters drawn
from the LUNA16 distribution, then CT blur and correlated noise; varied spacing, origins and
some flipped directions. Example::

    from lungct.synth import generate_dataset, synthesize_scan

    case = synthesize_scan(seed=0, index=3, size="small")   # one scan, in memory
    case.scan, case.nodules, case.excluded, case.candidates, case.lung_mask
    generate_dataset("out/synth", n_scans=20, seed=0)       # subset0..9, CSVs

or ``python -m lungct synth --out DIR --scans N --seed S [--size small|full]
[--background SCAN --background-annotations CSV --background-excluded CSV]``.

Full-size scans follow LUNA16's measured spread of pixel spacing, slice spacing and z extent.
On a real background each scan is a mirrored and/or z-cropped copy of it that keeps the real
scan's own findings in its tables (:mod:`lungct.synth.background`).

Nodule ``diameter_mm`` is the equivalent-sphere diameter of the drawn nodule. The shape library
(``lungct/data/lidc_shapes.npz``) is derived from LIDC-IDRI (TCIA, CC BY 3.0); see
``lungct/data/lidc_shapes.md`` for attribution.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lungct.synth.background import BackgroundFindings, synthesize_on_background
    from lungct.synth.case import Candidate, Finding, SyntheticCase, series_uid, synthesize_scan
    from lungct.synth.layout import generate_dataset

# Imported on first use: the generator needs SciPy, and ``python -m lungct`` builds its parser
# (``lungct.synth.cli``) for every verb.
_EXPORTS = {
    "BackgroundFindings": "lungct.synth.background",
    "Candidate": "lungct.synth.case",
    "Finding": "lungct.synth.case",
    "SyntheticCase": "lungct.synth.case",
    "generate_dataset": "lungct.synth.layout",
    "series_uid": "lungct.synth.case",
    "synthesize_on_background": "lungct.synth.background",
    "synthesize_scan": "lungct.synth.case",
}

__all__ = [
    "BackgroundFindings",
    "Candidate",
    "Finding",
    "SyntheticCase",
    "generate_dataset",
    "series_uid",
    "synthesize_on_background",
    "synthesize_scan",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
