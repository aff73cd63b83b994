"""The 3-D U-Net on cubic patches (the candidate network of the original 3-D U-Net code)."""

from __future__ import annotations

from collections.abc import Sequence

import keras

from unet_candidates.model.blocks import build_unet_graph


@keras.saving.register_keras_serializable(package="unet_candidates")
class UNet3D(keras.Model):
    """A 3-D U-Net mapping a CT block to a per-voxel nodule probability.

    Trained on cubic patches with 0/1 sphere targets, applied by sliding windows. Any size
    divisible by ``2 ** len(filters)`` along each axis is accepted. The decoder upsamples and
    convolves instead of using transposed 3-D convolutions (far slower on CPU TensorFlow).

    Args:
        filters: encoder widths, one per level; the depth is ``len(filters)``.
        bottleneck_filters: width of the lowest level.
        input_channels: channels of the input volume (1 for CT).
        convs_per_block: 3x3x3 convolutions per level.
        batch_norm: batch normalisation after each convolution.
        dropout: dropout rate at the bottleneck (0 = none).
        output_prior: initial output probability everywhere (sets the last bias).
        **kwargs: passed to :class:`keras.Model` (``name``, ``dtype``...).

    Example:
        >>> model = UNet3D(filters=(4, 8), bottleneck_filters=8)
        >>> model(keras.ops.ones((1, 16, 16, 16, 1))).shape
        (1, 16, 16, 16, 1)

    Reference:
        Cicek, Abdulkadir, Lienkamp, Brox, Ronneberger, "3D U-Net: Learning Dense Volumetric
        Segmentation from Sparse Annotation", MICCAI 2016 (arXiv 1606.06650); the original
        repository lung_nodule_detection (3-D U-Net on 48^3 windows, sphere targets).
    """

    def __init__(
        self,
        filters: Sequence[int] = (8, 16, 32, 64),
        bottleneck_filters: int = 64,
        input_channels: int = 1,
        convs_per_block: int = 2,
        batch_norm: bool = True,
        dropout: float = 0.0,
        output_prior: float = 0.01,
        **kwargs,
    ) -> None:
        # === Functional Model ===
        inputs = keras.Input(shape=(None, None, None, int(input_channels)), name="volume")
        outputs = build_unet_graph(
            inputs,
            tuple(int(f) for f in filters),
            int(bottleneck_filters),
            rank=3,
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
    def from_config(cls, config: dict) -> UNet3D:
        return cls(**config)
