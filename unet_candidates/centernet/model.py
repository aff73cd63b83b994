"""The CenterNet-style 3-D heatmap detector: a multi-scale backbone, a pyramid neck, two heads."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras


def apply_conv_bn_relu(
    x: keras.KerasTensor,
    filters: int,
    kernel: int = 3,
    strides: int = 1,
    batch_norm: bool = True,
    name: str = "conv",
) -> keras.KerasTensor:
    """A ``kernel``^3 convolution (``strides`` 2 halves the grid) -> optional batch norm -> ReLU."""
    x = keras.layers.Conv3D(
        filters,
        kernel,
        strides=strides,
        padding="same",
        use_bias=not batch_norm,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def apply_residual_block(
    x: keras.KerasTensor, filters: int, batch_norm: bool = True, name: str = "res"
) -> keras.KerasTensor:
    """ResNet's basic block: two 3^3 convolutions added to the input, then ReLU."""
    y = apply_conv_bn_relu(x, filters, batch_norm=batch_norm, name=f"{name}_a")
    y = keras.layers.Conv3D(
        filters,
        3,
        padding="same",
        use_bias=not batch_norm,
        kernel_initializer="he_normal",
        name=f"{name}_b_conv",
    )(y)
    if batch_norm:
        y = keras.layers.BatchNormalization(name=f"{name}_b_bn")(y)
    y = keras.layers.Add(name=f"{name}_add")([x, y])
    return keras.layers.Activation("relu", name=f"{name}_relu")(y)


def apply_backbone(
    x: keras.KerasTensor, filters: Sequence[int], blocks: int, batch_norm: bool
) -> list[keras.KerasTensor]:
    """Feature maps at strides 1, 2, 4 ...: a stem, then per level a strided convolution and
    ``blocks`` residual blocks."""
    x = apply_conv_bn_relu(x, filters[0], batch_norm=batch_norm, name="stem")
    features = []
    for level, f in enumerate(filters):
        if level > 0:
            x = apply_conv_bn_relu(x, f, strides=2, batch_norm=batch_norm, name=f"down{level}")
        for b in range(blocks):
            x = apply_residual_block(x, f, batch_norm, name=f"level{level}_res{b + 1}")
        features.append(x)
    return features


def apply_pyramid_neck(
    features: Sequence[keras.KerasTensor], filters: int, batch_norm: bool
) -> keras.KerasTensor:
    """A feature pyramid (FPN) merged top-down to full resolution: each level's 1^3 lateral
    projection is added to the upsampled coarser merge, then smoothed by a 3^3 convolution."""
    x = keras.layers.Conv3D(filters, 1, name=f"lateral{len(features) - 1}")(features[-1])
    for level in reversed(range(len(features) - 1)):
        x = keras.layers.UpSampling3D(2, name=f"neck{level}_upsample")(x)
        lateral = keras.layers.Conv3D(filters, 1, name=f"lateral{level}")(features[level])
        x = keras.layers.Add(name=f"neck{level}_add")([x, lateral])
        x = apply_conv_bn_relu(x, filters, batch_norm=batch_norm, name=f"neck{level}")
    return x


def apply_head(
    x: keras.KerasTensor,
    filters: int,
    activation: str | None,
    bias: float,
    name: str,
) -> keras.KerasTensor:
    """3^3 convolution + ReLU, then a 1^3 convolution to one channel starting at ``bias``."""
    x = keras.layers.Conv3D(filters, 3, padding="same", activation="relu", name=f"{name}_hidden")(x)
    return keras.layers.Conv3D(
        1,
        1,
        activation=activation,
        bias_initializer=keras.initializers.Constant(bias),
        dtype="float32",
        name=name,
    )(x)


@keras.saving.register_keras_serializable(package="unet_candidates")
class CenterNet3D(keras.Model):
    """A 3-D CenterNet: a CT block in, a nodule-centre heatmap and a diameter map out.

    Backbone: a stem and one level per entry of ``backbone_filters`` (each after the first
    halves the grid with a strided convolution), with residual blocks. Neck: a feature
    pyramid that adds the levels top-down back to the input's resolution, so the heatmap has
    one value per input voxel and needs no offset head. Heads: a sigmoid heatmap (peaks at
    nodule centres, trained towards a Gaussian around each) and the nodule diameter in mm.
    The output stacks them as two channels, ``[..., 0]`` heatmap and ``[..., 1]`` diameter,
    so the network has one input and one output like the U-Nets (and converts to ONNX the
    same way). Sizes divisible by ``2 ** (len(backbone_filters) - 1)`` are accepted.

    Args:
        backbone_filters: widths of the backbone levels (strides 1, 2, 4 ...).
        blocks_per_level: residual blocks per level.
        neck_filters: width of the pyramid neck.
        head_filters: width of each head's hidden convolution.
        input_channels: channels of the input volume (1 for CT).
        batch_norm: batch normalisation after the backbone and neck convolutions.
        heatmap_prior: initial heatmap value everywhere (RetinaNet's prior initialisation).
        size_prior_mm: initial diameter output.
        **kwargs: passed to :class:`keras.Model` (``name``, ``dtype``...).

    Example:
        >>> model = CenterNet3D(backbone_filters=(4, 8), neck_filters=4, head_filters=4)
        >>> model(keras.ops.ones((1, 16, 16, 16, 1))).shape
        (1, 16, 16, 16, 2)

    Reference:
        Zhou, Wang, Kraehenbuehl, "Objects as Points", arXiv 1904.07850 (2019); Lin et al.,
        "Feature Pyramid Networks for Object Detection", CVPR 2017 (arXiv 1612.03144); the
        VUNO-style Lung_Cancer_Detection code (3-D multi-scale heatmap detector,
        consensus-weighted loss, volumetric NMS).
    """

    def __init__(
        self,
        backbone_filters: Sequence[int] = (8, 16, 32, 64),
        blocks_per_level: int = 1,
        neck_filters: int = 16,
        head_filters: int = 16,
        input_channels: int = 1,
        batch_norm: bool = True,
        heatmap_prior: float = 0.01,
        size_prior_mm: float = 8.0,
        **kwargs,
    ) -> None:
        # === Functional Model ===
        filters = tuple(int(f) for f in backbone_filters)
        inputs = keras.Input(shape=(None, None, None, int(input_channels)), name="volume")
        features = apply_backbone(inputs, filters, int(blocks_per_level), bool(batch_norm))
        x = apply_pyramid_neck(features, int(neck_filters), bool(batch_norm))
        prior = min(max(float(heatmap_prior), 1e-6), 1 - 1e-6)
        heatmap = apply_head(
            x, int(head_filters), "sigmoid", math.log(prior / (1.0 - prior)), name="heatmap"
        )
        size = apply_head(x, int(head_filters), None, float(size_prior_mm), name="size")
        outputs = keras.layers.Concatenate(axis=-1, dtype="float32", name="heatmap_size")(
            [heatmap, size]
        )
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.backbone_filters = list(filters)
        self.blocks_per_level = int(blocks_per_level)
        self.neck_filters = int(neck_filters)
        self.head_filters = int(head_filters)
        self.input_channels = int(input_channels)
        self.batch_norm = bool(batch_norm)
        self.heatmap_prior = float(heatmap_prior)
        self.size_prior_mm = float(size_prior_mm)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** (len(self.backbone_filters) - 1)

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "backbone_filters": list(self.backbone_filters),
            "blocks_per_level": self.blocks_per_level,
            "neck_filters": self.neck_filters,
            "head_filters": self.head_filters,
            "input_channels": self.input_channels,
            "batch_norm": self.batch_norm,
            "heatmap_prior": self.heatmap_prior,
            "size_prior_mm": self.size_prior_mm,
        }

    @classmethod
    def from_config(cls, config: dict) -> CenterNet3D:
        return cls(**config)
