"""CenterNet's loss: a penalty-reduced focal loss on the heatmap plus an L1 size loss, weighted
per voxel (reader consensus, left-out findings)."""

from __future__ import annotations

import keras
from keras import ops

from unet_candidates.model.dice_loss import per_sample

TARGET_CHANNELS = ("heatmap", "weight", "size", "size_mask")
"""The channels of a CenterNet training target, in order (:mod:`unet_candidates.centernet.targets`)."""


@keras.saving.register_keras_serializable(package="unet_candidates")
class CenterNetLoss(keras.losses.Loss):
    """Focal heatmap loss + ``size_weight`` x masked L1 diameter loss.

    ``y_true`` has the channels of :data:`TARGET_CHANNELS`: the Gaussian heatmap (exactly 1 at
    each finding's centre voxel), a per-voxel loss weight (the finding's reader-consensus
    weight around it, 0 where a finding is left out, else 1), the diameter in mm and the
    weight of the size loss at each voxel (0 outside the nodules' cores). ``y_pred`` is the
    network's ``[heatmap, diameter]``.

    The heatmap loss is CenterNet's: at a centre voxel ``-(1 - p)^a log p``, elsewhere
    ``-(1 - y)^b p^a log(1 - p)`` (the closer to a centre, the less a high value costs), each
    times the voxel's weight, summed and divided by the number of centre voxels in the batch
    (at least 1). The size loss is the weighted mean absolute error over the size mask.

    Args:
        focal_alpha: ``a`` (CenterNet: 2).
        focal_beta: ``b`` (CenterNet: 4).
        size_weight: weight of the size loss (CenterNet: 0.1).
        **kwargs: passed to :class:`keras.losses.Loss` (``name``...).

    Example:
        >>> y = keras.ops.zeros((1, 4, 4, 4, 4))
        >>> p = keras.ops.concatenate([keras.ops.full((1, 4, 4, 4, 1), 0.01)] * 2, axis=-1)
        >>> round(float(CenterNetLoss()(y, p)), 6)  # no centre, weight 0 everywhere
        0.0

    Reference:
        Zhou, Wang, Kraehenbuehl, "Objects as Points", arXiv 1904.07850 (2019); Law, Deng,
        "CornerNet", ECCV 2018 (the penalty-reduced focal loss).
    """

    def __init__(
        self,
        focal_alpha: float = 2.0,
        focal_beta: float = 4.0,
        size_weight: float = 0.1,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "centernet_loss")
        super().__init__(**kwargs)
        self.focal_alpha = float(focal_alpha)
        self.focal_beta = float(focal_beta)
        self.size_weight = float(size_weight)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        heat, weight = y_true[..., 0], y_true[..., 1]
        size, size_mask = y_true[..., 2], y_true[..., 3]
        p = ops.clip(y_pred[..., 0], 1e-6, 1.0 - 1e-6)
        centre = ops.cast(heat >= 1.0, "float32")
        pos = -ops.log(p) * ops.power(1.0 - p, self.focal_alpha) * centre
        neg = (
            -ops.log(1.0 - p)
            * ops.power(p, self.focal_alpha)
            * ops.power(1.0 - heat, self.focal_beta)
            * (1.0 - centre)
        )
        focal = ops.sum((pos + neg) * weight) / ops.maximum(ops.sum(centre), 1.0)
        if self.size_weight <= 0:
            return per_sample(focal, y_pred)
        l1 = ops.sum(ops.abs(y_pred[..., 1] - size) * size_mask)
        return per_sample(
            focal + self.size_weight * l1 / ops.maximum(ops.sum(size_mask), 1.0), y_pred
        )

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "focal_alpha": self.focal_alpha,
            "focal_beta": self.focal_beta,
            "size_weight": self.size_weight,
        }
