"""The in-painting generator: a 3-D U-Net that fills the zeroed centre of a CT cube."""

from __future__ import annotations

import math

import keras

from ct_gan_augment.blocks import apply_down_block, apply_up_block


@keras.saving.register_keras_serializable(package="ct_gan_augment")
class InpaintingGenerator(keras.Model):
    """3-D U-Net generator of CT-GAN (pix2pix in 3-D) for ``(cube, cube, cube, 1)`` inputs.

    The input is a normalised cube whose centre was set to 0 (the condition), optionally with
    more channels (a ball of the wanted nodule's size, see ``GANPlan.size_channel``); the output
    (tanh) is the whole cube with the centre in-painted. Encoder: Conv3D ``kernel_size``^3,
    stride 2, filters ``filters * (1, 2, 4, 8, 8, ...)``, LeakyReLU, batch norm except in the
    first block. Decoder: UpSampling3D + Conv3D + ReLU + dropout + batch norm + skip
    concatenation; a last UpSampling3D + Conv3D(1, tanh).

    Args:
        cube_size: edge of the cube in voxels (a power of two).
        filters: filters of the first encoder block (the paper's ``gf``, 100).
        levels: encoder blocks; ``0`` = ``log2(cube_size)`` (down to one voxel, as the code).
        kernel_size: convolution kernel edge (4 in the paper).
        dropout: decoder dropout rate (0.5).
        leaky_alpha: LeakyReLU slope of the encoder (0.2).
        bn_momentum: batch-norm momentum (0.8 in the code).
        condition_channels: channels of the condition (1 = the cube; 2 = cube + size ball).
        **kwargs: passed to :class:`keras.Model` (``name``, ``dtype``...).

    Example:
        >>> g = InpaintingGenerator(cube_size=16, filters=4)
        >>> tuple(g.output_shape)
        (None, 16, 16, 16, 1)

    Reference:
        Mirsky, Mahler, Shelef, Elovici. "CT-GAN: Malicious Tampering of 3D Medical Imagery
        using Deep Learning". USENIX Security 2019.
    """

    def __init__(
        self,
        cube_size: int = 32,
        filters: int = 8,
        levels: int = 0,
        kernel_size: int = 4,
        dropout: float = 0.5,
        leaky_alpha: float = 0.2,
        bn_momentum: float = 0.8,
        condition_channels: int = 1,
        **kwargs,
    ) -> None:
        depth = levels or int(math.log2(cube_size))
        if cube_size % (2**depth):
            raise ValueError(f"cube_size {cube_size} is not divisible by 2**levels = {2**depth}")

        # === Functional Model ===
        condition = keras.Input(
            (cube_size, cube_size, cube_size, int(condition_channels)), name="condition"
        )
        x = condition
        skips = []
        for level in range(depth):
            x = apply_down_block(
                x,
                filters * min(2**level, 8),
                kernel_size,
                batch_norm=level > 0,
                leaky_alpha=leaky_alpha,
                bn_momentum=bn_momentum,
                name=f"down{level + 1}",
            )
            skips.append(x)
        for level in reversed(range(depth - 1)):
            x = apply_up_block(
                x,
                skips[level],
                filters * min(2**level, 8),
                kernel_size,
                dropout,
                bn_momentum,
                name=f"up{level + 1}",
            )
        x = keras.layers.UpSampling3D(2, name="out_up")(x)
        cube = keras.layers.Conv3D(
            1, kernel_size, padding="same", activation="tanh", dtype="float32", name="out_conv"
        )(x)
        super().__init__(inputs=condition, outputs=cube, **kwargs)

        # === Config ===
        self.cube_size = cube_size
        self.filters = filters
        self.levels = levels
        self.kernel_size = kernel_size
        self.dropout = dropout
        self.leaky_alpha = leaky_alpha
        self.bn_momentum = bn_momentum
        self.condition_channels = int(condition_channels)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "cube_size": self.cube_size,
            "filters": self.filters,
            "levels": self.levels,
            "kernel_size": self.kernel_size,
            "dropout": self.dropout,
            "leaky_alpha": self.leaky_alpha,
            "bn_momentum": self.bn_momentum,
            "condition_channels": self.condition_channels,
        }

    @classmethod
    def from_config(cls, config: dict) -> InpaintingGenerator:
        return cls(**config)
