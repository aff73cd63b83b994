"""Building blocks shared by the 2-D and 3-D U-Nets (backend-agnostic Keras layers only)."""

from __future__ import annotations

import math

import keras

_CONV = {2: keras.layers.Conv2D, 3: keras.layers.Conv3D}
_POOL = {2: keras.layers.MaxPooling2D, 3: keras.layers.MaxPooling3D}
_UP = {2: keras.layers.UpSampling2D, 3: keras.layers.UpSampling3D}


def apply_conv_block(
    x: keras.KerasTensor,
    filters: int,
    rank: int,
    convs: int = 2,
    batch_norm: bool = True,
    name: str = "block",
) -> keras.KerasTensor:
    """``convs`` x (3^rank convolution -> optional batch norm -> ReLU).

    Args:
        x: input tensor, channels last.
        filters: output channels of every convolution.
        rank: 2 for slices, 3 for volumes.
        convs: how many convolutions in a row.
        batch_norm: normalise after each convolution (then the convolution has no bias).
        name: prefix of the layer names.
    """
    for i in range(convs):
        x = _CONV[rank](
            filters,
            3,
            padding="same",
            use_bias=not batch_norm,
            kernel_initializer="he_normal",
            name=f"{name}_conv{i + 1}",
        )(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"{name}_bn{i + 1}")(x)
        x = keras.layers.Activation("relu", name=f"{name}_relu{i + 1}")(x)
    return x


def apply_down(x: keras.KerasTensor, rank: int, name: str) -> keras.KerasTensor:
    """Halve every spatial size with 2^rank max pooling."""
    return _POOL[rank](2, name=name)(x)


def apply_up_block(
    x: keras.KerasTensor,
    skip: keras.KerasTensor,
    filters: int,
    rank: int,
    convs: int = 2,
    batch_norm: bool = True,
    name: str = "up",
) -> keras.KerasTensor:
    """Decoder step: nearest upsampling + 3^rank convolution, concatenate the skip, conv block.

    Upsampling followed by a convolution replaces the transposed convolution, which CPU
    TensorFlow runs many times slower in 3-D (and which leaves checkerboard artefacts).
    """
    x = _UP[rank](2, name=f"{name}_upsample")(x)
    x = _CONV[rank](
        filters,
        3,
        padding="same",
        use_bias=not batch_norm,
        kernel_initializer="he_normal",
        name=f"{name}_upconv",
    )(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{name}_upbn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_uprelu")(x)
    x = keras.layers.Concatenate(axis=-1, name=f"{name}_concat")([x, skip])
    return apply_conv_block(x, filters, rank, convs, batch_norm, name=f"{name}_block")


def build_unet_graph(
    inputs: keras.KerasTensor,
    filters: tuple[int, ...],
    bottleneck_filters: int,
    rank: int,
    convs_per_block: int,
    batch_norm: bool,
    dropout: float,
    output_prior: float = 0.01,
) -> keras.KerasTensor:
    """Encoder (``len(filters)`` levels, each pooled) -> bottleneck -> mirrored decoder -> sigmoid.

    Spatial sizes of the input must be divisible by ``2 ** len(filters)``. The output bias
    starts at ``logit(output_prior)``: nodules fill a tiny part of a patch, and a network that
    starts by predicting 0.5 everywhere spends its first thousands of steps unlearning that
    (RetinaNet's prior initialisation, Lin et al. 2017).
    """
    x = inputs
    skips = []
    for level, f in enumerate(filters):
        x = apply_conv_block(x, f, rank, convs_per_block, batch_norm, name=f"enc{level + 1}")
        skips.append(x)
        x = apply_down(x, rank, name=f"enc{level + 1}_pool")
    x = apply_conv_block(
        x, bottleneck_filters, rank, convs_per_block, batch_norm, name="bottleneck"
    )
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(len(filters))):
        x = apply_up_block(
            x,
            skips[level],
            filters[level],
            rank,
            convs_per_block,
            batch_norm,
            name=f"dec{level + 1}",
        )
    prior = min(max(float(output_prior), 1e-6), 1 - 1e-6)
    return _CONV[rank](
        1,
        1,
        activation="sigmoid",
        bias_initializer=keras.initializers.Constant(math.log(prior / (1.0 - prior))),
        dtype="float32",
        name="probability",
    )(x)
