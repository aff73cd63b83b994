"""The PatchGAN discriminator: judges (cube, condition) pairs patch by patch."""

from __future__ import annotations

import keras

from ct_gan_augment.blocks import apply_down_block


@keras.saving.register_keras_serializable(package="ct_gan_augment")
class PatchDiscriminator(keras.Model):
    """3-D PatchGAN on a cube and its condition (the cube with the centre zeroed).

    The two inputs are concatenated along channels, then ``levels`` blocks of Conv3D
    ``kernel_size``^3 stride 2 + LeakyReLU (+ batch norm after the first) with filters
    ``filters * (1, 2, 4, 8, ...)``, and a last Conv3D(1) gives one score per patch: a
    ``(cube / 2**levels)^3`` validity map (2^3 for 32^3 cubes and 4 levels, as in the code).
    The output is linear: the least-squares GAN loss compares it with the labels directly.

    Args:
        cube_size: edge of the cube in voxels.
        filters: filters of the first block (the paper's ``df``, 100).
        levels: stride-2 blocks (4).
        kernel_size: convolution kernel edge (4).
        leaky_alpha: LeakyReLU slope (0.2).
        bn_momentum: batch-norm momentum (0.8).
        condition_channels: channels of the condition (as the generator's input).
        **kwargs: passed to :class:`keras.Model`.

    Example:
        >>> d = PatchDiscriminator(cube_size=16, filters=4, levels=3)
        >>> tuple(d.output_shape)
        (None, 2, 2, 2, 1)

    Reference:
        Isola, Zhu, Zhou, Efros. "Image-to-Image Translation with Conditional Adversarial
        Networks". CVPR 2017; Mirsky et al. "CT-GAN". USENIX Security 2019.
    """

    def __init__(
        self,
        cube_size: int = 32,
        filters: int = 8,
        levels: int = 4,
        kernel_size: int = 4,
        leaky_alpha: float = 0.2,
        bn_momentum: float = 0.8,
        condition_channels: int = 1,
        **kwargs,
    ) -> None:
        if cube_size % (2**levels):
            raise ValueError(f"cube_size {cube_size} is not divisible by 2**levels = {2**levels}")

        # === Functional Model ===
        shape = (cube_size, cube_size, cube_size, 1)
        cube = keras.Input(shape, name="cube")
        condition = keras.Input((*shape[:3], int(condition_channels)), name="condition")
        x = keras.layers.Concatenate(name="pair")([cube, condition])
        for level in range(levels):
            x = apply_down_block(
                x,
                filters * 2**level,
                kernel_size,
                batch_norm=level > 0,
                leaky_alpha=leaky_alpha,
                bn_momentum=bn_momentum,
                name=f"d{level + 1}",
            )
        validity = keras.layers.Conv3D(
            1, kernel_size, padding="same", dtype="float32", name="validity"
        )(x)
        super().__init__(inputs=[cube, condition], outputs=validity, **kwargs)

        # === Config ===
        self.cube_size = cube_size
        self.filters = filters
        self.levels = levels
        self.kernel_size = kernel_size
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
            "leaky_alpha": self.leaky_alpha,
            "bn_momentum": self.bn_momentum,
            "condition_channels": self.condition_channels,
        }

    @classmethod
    def from_config(cls, config: dict) -> PatchDiscriminator:
        return cls(**config)
