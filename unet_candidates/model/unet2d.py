"""The 2-D U-Net on axial slices (the candidate network of the original 2-D U-Net code)."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from unet_candidates.model.blocks import build_unet_graph


@keras.saving.register_keras_serializable(package="unet_candidates")
class UNet2D(keras.Model):
    """A 2-D U-Net mapping axial slices to a per-pixel nodule probability.

    The input holds ``input_channels`` neighbouring axial slices as channels (1 = the original
    code's single slice; 3 or 5 = "2.5-D" context that tells a round nodule from a vessel
    crossing the slice); the output is the probability of the centre slice. Any height and width
    divisible by ``2 ** len(filters)`` is accepted, so a model trained on small patches predicts
    whole slices.

    Args:
        filters: encoder widths, one per level (the original code: ``(32, 64, 96, 128, 128)``);
            the depth is ``len(filters)``.
        bottleneck_filters: width of the lowest level (the original code: 128).
        input_channels: number of neighbouring slices fed as channels (odd).
        convs_per_block: 3x3 convolutions per level.
        batch_norm: batch normalisation after each convolution.
        dropout: dropout rate at the bottleneck (0 = none).
        output_prior: initial output probability everywhere (sets the last bias).
        **kwargs: passed to :class:`keras.Model` (``name``, ``dtype``...).

    Example:
        >>> model = UNet2D(filters=(8, 16), bottleneck_filters=16, input_channels=3)
        >>> model(keras.ops.ones((2, 32, 32, 3))).shape
        (2, 32, 32, 1)

    Reference:
        Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
        Segmentation", MICCAI 2015 (arXiv 1505.04597); the original repository
        Pulmonary-Nodule-Detection (2-D U-Net, -Dice loss, disk targets).
    """

    def __init__(
        self,
        filters: Sequence[int] = (32, 64, 96, 128, 128),
        bottleneck_filters: int = 128,
        input_channels: int = 1,
        convs_per_block: int = 2,
        batch_norm: bool = True,
        dropout: float = 0.0,
        output_prior: float = 0.01,
        **kwargs,
    ) -> None:
        # === Functional Model ===
        inputs = keras.Input(shape=(None, None, int(input_channels)), name="slices")
        outputs = build_unet_graph(
            inputs,
            tuple(int(f) for f in filters),
            int(bottleneck_filters),
            rank=2,
            convs_per_block=int(convs_per_block),
            batch_norm=bool(batch_norm),
            dropout=float(dropout),
            output_prior=float(output_prior),
        )
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.filters = [int(f) for f in filters]
        self.bottleneck_filters = int(bottleneck_filters)
        self.input_channels = int(input_channels)
        self.convs_per_block = int(convs_per_block)
        self.batch_norm = bool(batch_norm)
        self.dropout = float(dropout)
        self.output_prior = float(output_prior)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** len(self.filters)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "filters": list(self.filters),
            "bottleneck_filters": self.bottleneck_filters,
            "input_channels": self.input_channels,
            "convs_per_block": self.convs_per_block,
            "batch_norm": self.batch_norm,
            "dropout": self.dropout,
            "output_prior": self.output_prior,
        }

    @classmethod
    def from_config(cls, config: dict) -> UNet2D:
        return cls(**config)
