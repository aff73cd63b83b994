"""fp_reduction_3dcnn: stage two of the suite, MGI-CNN false-positive reduction.

Scores each candidate of a candidates CSV (LUNA16 ``candidates.csv`` / ``candidates_V2.csv`` or
the U-Net stage's output) with a multi-scale gradual integration CNN (Kim et al., Neural
Networks 2019), from patches streamed out of the per-scan cache, and writes a LUNA16 submission.
Two single-patch classifiers train, save and score through the same code for the ablations to
compare with it: a 3-D ResNet and the small 3-D CNN of "Deep Learning with PyTorch" (plans
``resnet3d`` and ``cnn3d``).

Modules: ``config`` (plan <-> JSON), ``model`` (:class:`MGICNN`), ``resnet3d``
(:class:`ResNet3D`), ``cnn3d`` (:class:`CNN3D`), ``networks`` (which network a plan builds and
a model file must hold), ``stream_integration``
(:class:`StreamIntegration`, the layer that merges the streams), ``data`` (labels, folds,
:class:`PatchCutter`), ``sampler`` (:class:`BalancedBatchSampler`), ``symmetries`` (axial
symmetries: training rotations, TTA), ``manifest`` (the fold guard), ``train``, ``predict``,
``gradcam``, ``__main__`` (CLI). Public names are imported lazily so that
``python -m fp_reduction_3dcnn --help`` does not start Keras.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FPRPlan": "fp_reduction_3dcnn.config",
    "PLANS": "fp_reduction_3dcnn.config",
    "get_plan": "fp_reduction_3dcnn.config",
    "MGICNN": "fp_reduction_3dcnn.model",
    "ResNet3D": "fp_reduction_3dcnn.resnet3d",
    "CNN3D": "fp_reduction_3dcnn.cnn3d",
    "NETWORKS": "fp_reduction_3dcnn.config",
    "build_network": "fp_reduction_3dcnn.networks",
    "StreamIntegration": "fp_reduction_3dcnn.stream_integration",
    "PatchCutter": "fp_reduction_3dcnn.data",
    "load_candidates": "fp_reduction_3dcnn.data",
    "hit_labels": "fp_reduction_3dcnn.data",
    "BalancedBatchSampler": "fp_reduction_3dcnn.sampler",
    "FoldManifest": "fp_reduction_3dcnn.manifest",
    "tta_predict": "fp_reduction_3dcnn.symmetries",
    "open_model": "fp_reduction_3dcnn.predict",
    "grad_cam": "fp_reduction_3dcnn.gradcam",
    "gradcam_figure": "fp_reduction_3dcnn.gradcam",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fp_reduction_3dcnn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
