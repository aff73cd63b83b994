"""The two convolution blocks of the 3-D pix2pix networks (as in the authors' code).

Backend-agnostic: only ``keras.layers``, so ``KERAS_BACKEND=torch`` or ``jax`` builds the same
graphs (training itself needs TensorFlow, see :mod:`ct_gan_augment.train`).
"""

from __future__ import annotations

import keras


def apply_down_block(
    x,
    filters: int,
    kernel_size: int,
    batch_norm: bool,
    leaky_alpha: float,
    bn_momentum: float,
    name: str,
):
    """Encoder step: Conv3D stride 2 ('same') -> LeakyReLU -> batch norm (not in the first)."""
    x = keras.layers.Conv3D(filters, kernel_size, strides=2, padding="same", name=f"{name}_conv")(x)
    x = keras.layers.LeakyReLU(negative_slope=leaky_alpha, name=f"{name}_act")(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    return x


def apply_up_block(
    x,
    skip,
    filters: int,
    kernel_size: int,
    dropout: float,
    bn_momentum: float,
    name: str,
):
    """Decoder step: UpSampling3D x2 -> Conv3D + ReLU -> dropout -> batch norm -> concat skip.

    Upsampling + convolution, not a transposed convolution: the latter is far slower on CPU
    TensorFlow and gives checkerboard artefacts.
    """
    x = keras.layers.UpSampling3D(2, name=f"{name}_up")(x)
    x = keras.layers.Conv3D(
        filters, kernel_size, padding="same", activation="relu", name=f"{name}_conv"
    )(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout")(x)
    x = keras.layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    return keras.layers.Concatenate(name=f"{name}_skip")([x, skip])
