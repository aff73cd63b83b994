"""unet_candidates.centernet: a CenterNet-style 3-D heatmap detector, the stage-1 alternative.

Instead of a U-Net's nodule probability map, the network predicts a heatmap whose peaks are
nodule centres (trained towards a Gaussian around each annotated centre, sigma from the
nodule's diameter) and a map of nodule diameters. A multi-scale residual backbone, a feature
pyramid neck back to full resolution, and two heads; a penalty-reduced focal loss whose
voxels are weighted by reader consensus (the optional ``reader_count`` column of the tables);
peaks by 3-D max-pool equality, volumetric NMS in world mm, optional flip TTA. Training and
extraction reuse the U-Net stage's machinery: cache-backed patch streaming, the resumable
training loop with its sealed model folder, sliding windows over the lungs.

Python API::

    from unet_candidates.centernet import centernet_preset_plan, load_centernet, train
    summary = train(centernet_preset_plan(), "data", "cache", [0, 1], [2], "models/centernet")
    model, plan = load_centernet("models/centernet")
    result = run_centernet_extraction(read_scan("scan.mhd"), model, plan)

Command line: ``python -m unet_candidates train --preset centernet ...``; ``extract --model``
reads a CenterNet folder like a U-Net's. In the stage settings of ``integration``:
``"candidates": "centernet"``.
"""

from unet_candidates.centernet.config import (
    CENTERNET_PRESETS,
    CenterNetPlan,
    centernet_preset_plan,
    is_centernet_plan,
)
from unet_candidates.centernet.decode import candidates_from_heatmap, find_peaks
from unet_candidates.centernet.extract import load_centernet, run_centernet_extraction
from unet_candidates.centernet.targets import heatmap_target
from unet_candidates.centernet.train import train

__all__ = [
    "CENTERNET_PRESETS",
    "CenterNetPlan",
    "candidates_from_heatmap",
    "centernet_preset_plan",
    "find_peaks",
    "heatmap_target",
    "is_centernet_plan",
    "load_centernet",
    "run_centernet_extraction",
    "train",
]
