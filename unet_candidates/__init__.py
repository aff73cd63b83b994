"""unet_candidates: stage one of the nodule detector - U-Net candidate extraction.

A 2-D U-Net on axial slices (the original code's design) or a 3-D U-Net on cubic blocks, trained from
the per-scan cache of :mod:`lungct` with sphere / disk targets around the annotated nodules,
applied by sliding windows over the lungs; the probability map becomes candidate marks in
world millimetres (threshold, 3-D components, weighted centres, volumetric NMS).
:mod:`unet_candidates.centernet` is the alternative stage-1 network: a CenterNet-style 3-D
heatmap detector trained and applied with the same machinery.

Python API::

    from unet_candidates import extract_candidates, load_unet
    model, plan = load_unet("models/unet2d")
    rows = extract_candidates(read_scan("scan.mhd"), model, plan)

Command line: ``python -m unet_candidates train|extract --help``.
"""

from unet_candidates.config import PRESETS, UNetPlan, preset_plan
from unet_candidates.extract import (
    ExtractionResult,
    extract_candidates,
    load_unet,
    run_extraction,
    write_probability_map,
)
from unet_candidates.postprocess import (
    CANDIDATE_COLUMNS,
    Candidate,
    candidates_from_probability,
    write_candidates_csv,
)

__all__ = [
    "CANDIDATE_COLUMNS",
    "PRESETS",
    "Candidate",
    "ExtractionResult",
    "UNetPlan",
    "candidates_from_probability",
    "extract_candidates",
    "load_unet",
    "preset_plan",
    "run_extraction",
    "write_candidates_csv",
    "write_probability_map",
]
