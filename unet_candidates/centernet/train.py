"""Training of the CenterNet detector: the U-Net stage's loop with CenterNet hooks.

:func:`unet_candidates.train.fit_candidate_network` does the work (cache, patch stream, cosine
schedule, ``--max-minutes``, checkpoints and ``--resume``, the sealed model folder, whose seal
names the stage ``centernet``); this module gives it the network, its loss, its sampler
(:class:`unet_candidates.centernet.targets.HeatmapSampler`) and its validation. The log's
metric is ``val_hit``: the share of validation patches holding a nodule centre whose highest
heatmap voxel lies in a nodule's core (target >= 0.5).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from unet_candidates.centernet.config import CenterNetPlan
from unet_candidates.centernet.extract import CENTERNET_CLASS
from unet_candidates.centernet.targets import HeatmapSampler, centernet_scan_samples
from unet_candidates.train import CandidateNetwork, fit_candidate_network


def compile_centernet(model: Any, plan: CenterNetPlan) -> Any:
    """Attach the plan's optimiser and :class:`CenterNetLoss` (the learning rate is set per
    step by the loop)."""
    import keras

    from unet_candidates.centernet.loss import CenterNetLoss

    if plan.optimizer == "adam":
        optimizer = keras.optimizers.Adam(learning_rate=plan.learning_rate)
    else:
        optimizer = keras.optimizers.SGD(
            learning_rate=plan.learning_rate, momentum=0.9, nesterov=True
        )
    model.compile(
        optimizer=optimizer,
        loss=CenterNetLoss(plan.focal_alpha, plan.focal_beta, plan.size_weight),
        jit_compile=keras.backend.backend() != "tensorflow",
    )
    return model


def validate_centernet(
    model: Any, val_set: tuple[np.ndarray, np.ndarray] | None, plan: CenterNetPlan
) -> tuple[float | None, float | None]:
    """``(loss, hit rate)`` on the validation patches (``None, None`` without them)."""
    if val_set is None:
        return None, None
    from unet_candidates.centernet.loss import CenterNetLoss

    x, y = val_set
    pred = np.concatenate(
        [
            np.asarray(model.predict_on_batch(x[i : i + plan.batch_size]))
            for i in range(0, len(x), plan.batch_size)
        ]
    )
    loss = float(CenterNetLoss(plan.focal_alpha, plan.focal_beta, plan.size_weight)(y, pred))
    heat = y[..., 0].reshape(len(y), -1)
    with_centre = heat.max(axis=1) >= 1.0
    if not with_centre.any():
        return loss, None
    best = pred[..., 0].reshape(len(pred), -1).argmax(axis=1)
    hits = heat[np.arange(len(heat)), best] >= 0.5
    return loss, float(hits[with_centre].mean())


def _registered_class(plan: CenterNetPlan) -> str:
    """The Keras class name, once the CenterNet's classes are registered (before a checkpoint
    is loaded)."""
    # Importing them registers the CenterNet's classes with Keras.
    import unet_candidates.centernet.loss
    import unet_candidates.centernet.model  # noqa: F401

    return CENTERNET_CLASS


CENTERNET_NETWORK = CandidateNetwork(
    stage="centernet",
    plan_class=CenterNetPlan,
    build=lambda plan: compile_centernet(plan.build_model(), plan),
    keras_class=_registered_class,
    architecture=lambda plan: plan.architecture(),
    what=lambda plan: "a CenterNet",
    sampler=HeatmapSampler,
    scan_samples=centernet_scan_samples,
    validate=validate_centernet,
    metric="val_hit",
)
"""The CenterNet's hooks of the training loop."""


def train(
    plan: CenterNetPlan | None,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    folds: list[int],
    val_folds: list[int],
    out_dir: str | os.PathLike,
    **kwargs: Any,
) -> dict:
    """Train (or resume training) a CenterNet detector; return a summary dict.

    The arguments are those of :func:`unet_candidates.train.train` (``annotations``,
    ``excluded``, ``resume``, ``max_minutes``, ``progress``, ``prepare_workers``). Nodule
    reader counts come from the optional ``reader_count`` column of the annotation tables.

    Raises:
        LungCTError: bad folds, missing data, a folder holding another run, a plan mismatch.
    """
    return fit_candidate_network(
        CENTERNET_NETWORK, plan, data_dir, cache_dir, folds, val_folds, out_dir, **kwargs
    )
