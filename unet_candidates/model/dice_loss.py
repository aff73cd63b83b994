"""Soft Dice loss over the whole batch (the original 2-D U-Net's -Dice, as 1 - Dice), + BCE.

Tversky-weighted: a missed nodule voxel may cost more than a false one.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


def per_sample(loss: Any, y_pred: Any) -> Any:
    """A loss pooled over the whole batch, repeated once per sample.

    Keras reduces a loss's per-sample values to their mean, and under ``tf.distribute``
    divides it by the number of replicas so that the replicas' gradients sum to the global
    batch's. A scalar skips that reduction: on two replicas its gradients would count twice.
    Repeated per sample, the pooled loss is reduced like any other (its mean is itself).
    """
    return ops.broadcast_to(loss, ops.shape(y_pred)[:1])


@keras.saving.register_keras_serializable(package="unet_candidates")
class DiceLoss(keras.losses.Loss):
    """``1 - Tversky index`` over every voxel of the batch at once, plus optional BCE.

    The Tversky index ``(TP + s) / (TP + a FP + b FN + s)`` with ``b = fn_weight`` and
    ``a = 1 - b`` is the Dice coefficient for ``b = 0.5`` (the original code's loss). A candidate
    detector wants recall: ``b > 0.5`` makes a missed nodule voxel cost more than a false one.

    Target voxels with a value above 1 are left out (neither foreground nor background): the
    training data marks findings that are neither nodule nor background that way.

    Pooling the whole batch (instead of averaging per-patch scores) keeps patches without a
    nodule - random lung and hard negatives - meaningful: their false positives enlarge the
    denominator, and an empty patch never divides zero by zero.

    Args:
        smooth: added to numerator and denominator (the original 2-D U-Net code: 100 on
            320x320 slices; small patches want a smaller value, or empty batches dominate).
        fn_weight: weight ``b`` of false negatives (0.5 = Dice).
        bce_weight: weight of an added binary cross-entropy term (0 = none, as the original
            code).
        hard_negative_fraction: when above 0, the cross-entropy is taken over the target
            voxels and only this fraction of each patch's voxels among its background: the
            ones the network gets most wrong (online hard example mining). Averaged over the
            whole patch, the background's cross-entropy is mostly easy air; a vessel that looks
            like a nodule weighs no more than any of it.
        **kwargs: passed to :class:`keras.losses.Loss` (``name``...).

    Example:
        >>> loss = DiceLoss(smooth=1.0)
        >>> float(loss(keras.ops.ones((1, 4, 4, 1)), keras.ops.ones((1, 4, 4, 1))))
        0.0

    Reference:
        Milletari, Navab, Ahmadi, "V-Net: Fully Convolutional Neural Networks for Volumetric
        Medical Image Segmentation", 3DV 2016 (arXiv 1606.04797); Salehi, Erdogmus, Gholipour,
        "Tversky loss function for image segmentation using 3D fully convolutional deep
        networks", MLMI 2017 (arXiv 1706.05721).
    """

    def __init__(
        self,
        smooth: float = 1.0,
        fn_weight: float = 0.5,
        bce_weight: float = 0.0,
        hard_negative_fraction: float = 0.0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "dice_loss")
        super().__init__(**kwargs)
        self.smooth = float(smooth)
        self.fn_weight = float(fn_weight)
        self.bce_weight = float(bce_weight)
        self.hard_negative_fraction = float(hard_negative_fraction)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        # Target values above 1 mark voxels to leave out of the loss (unsure findings).
        valid = ops.cast(y_true <= 1.0, y_pred.dtype)
        y_true = y_true * valid
        y_pred = y_pred * valid
        tp = ops.sum(y_true * y_pred)
        fp = ops.sum((1.0 - y_true) * y_pred)
        fn = ops.sum(y_true * (1.0 - y_pred))
        b = self.fn_weight
        denominator = tp + (1.0 - b) * fp + b * fn + self.smooth
        loss = 1.0 - (tp + self.smooth) / denominator
        if self.bce_weight > 0:
            bce = keras.losses.binary_crossentropy(y_true, y_pred)[..., None] * valid
            if self.hard_negative_fraction > 0:
                bce = self._hard_examples(bce, y_true)
            else:
                bce = ops.sum(bce) / ops.maximum(ops.sum(valid), 1.0)
            loss = loss + self.bce_weight * bce
        return per_sample(loss, y_pred)

    def _hard_examples(self, bce, y_true):
        """Mean cross-entropy over the target voxels and each patch's hardest background."""
        voxels = 1
        for size in bce.shape[1:]:
            if size is None:
                raise ValueError("hard negative mining needs patches of a known size")
            voxels *= int(size)
        k = max(1, round(self.hard_negative_fraction * voxels))
        positive = ops.sum(bce * y_true)
        background = ops.reshape(bce * (1.0 - y_true), (-1, voxels))
        hardest = ops.sum(ops.top_k(background, k, sorted=False)[0])
        count = ops.sum(y_true) + ops.cast(ops.shape(background)[0] * k, bce.dtype)
        return (positive + hardest) / count

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "smooth": self.smooth,
            "fn_weight": self.fn_weight,
            "bce_weight": self.bce_weight,
            "hard_negative_fraction": self.hard_negative_fraction,
        }
