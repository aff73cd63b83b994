"""ResNet3D: a 3-D residual network that scores one cubic patch around a candidate (Keras 3).

The ``resnet3d`` network of the plans, beside the MGI-CNN in the ablations: the classifier of
the lung_nodule_detection project (a 3-D ResNet on 48x48x48 patches after its 3-D U-Net),
built as a ResNet-18-like stack of basic blocks. Only ``keras.layers`` are used, so a saved
``.keras`` file reloads in safe mode under any backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from fp_reduction_3dcnn.config import FPRPlan


def _batch_norm(name: str) -> keras.layers.BatchNormalization:
    # PyTorch's defaults (momentum 0.1 there), as in the MGI-CNN: short runs need running
    # statistics that follow the weights quickly.
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)


def apply_basic_block(x, filters: int, strides: int, name: str):
    """A ResNet basic block in 3-D.

    conv 3x3x3 (``strides``) -> batch norm -> ReLU -> conv 3x3x3 -> batch norm, added to the
    shortcut (the input itself, or a strided 1x1x1 conv + batch norm where the grid or the
    width changes), then ReLU. Convolutions carry no bias (batch norm follows each).
    """
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv3D(
            filters,
            1,
            strides=strides,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            name=f"{name}_shortcut_conv",
        )(x)
        shortcut = _batch_norm(f"{name}_shortcut_bn")(shortcut)
    y = keras.layers.Conv3D(
        filters,
        3,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv1",
    )(x)
    y = _batch_norm(f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv3D(
        filters,
        3,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv2",
    )(y)
    y = _batch_norm(f"{name}_bn2")(y)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


@keras.saving.register_keras_serializable(package="fp_reduction_3dcnn")
class ResNet3D(keras.Model):
    """A 3-D ResNet classifier of one patch: the probability that a candidate is a nodule.

    The input is one windowed patch ``(y, x, z)`` (the plans' ``resnet3d``: 48x48x48 voxels at
    1 mm, a 48 mm cube around the candidate). A stem (5x5x5 convolution, stride 2, batch norm,
    ReLU) halves the grid; then one stage of ``blocks_per_stage`` basic blocks
    (:func:`apply_basic_block`) per entry of ``block_filters``, every stage after the first
    starting with a stride-2 block; global average pooling; one sigmoid unit (the ``logit``
    layer holds the value before it). On 48^3 the stages run at 24^3, 12^3, 6^3 and 3^3.

    Where it differs from a ResNet-18 (and the lung_nodule_detection classifier): 3-D
    convolutions throughout; a 5x5x5 stride-2 stem without max pooling (ResNet-18's 7x7 stride-2
    stem and max pooling would shrink a 48 mm cube to 12 voxels before the first block, too
    coarse for a 3 mm nodule); widths a quarter of ResNet-18's in the ``resnet3d`` plan
    (16/32/64/128, 2.1 M parameters) so that minutes of CPU training are useful; one sigmoid
    unit instead of a two-class softmax.

    Args:
        block_filters: widths of the stages.
        blocks_per_stage: basic blocks per stage (ResNet-18: 2).
        input_shape: ``(y, x, z)`` of the patch.
        **kwargs: standard model arguments (``name``, ``dtype``...).

    Example:
        >>> import numpy as np
        >>> model = ResNet3D(block_filters=(4, 8), blocks_per_stage=1, input_shape=(16, 16, 16))
        >>> x = np.zeros((2, 16, 16, 16), "float32")
        >>> tuple(model.predict([x], verbose=0).shape)
        (2, 1)

    Reference:
        He, Zhang, Ren, Sun. "Deep residual learning for image recognition." CVPR 2016
        (arXiv:1512.03385).
    """

    def __init__(
        self,
        block_filters: Sequence[int] = (16, 32, 64, 128),
        blocks_per_stage: int = 2,
        input_shape: Sequence[int] = (48, 48, 48),
        **kwargs,
    ) -> None:
        block_filters = tuple(int(f) for f in block_filters)
        blocks_per_stage = int(blocks_per_stage)
        input_shape = tuple(int(s) for s in input_shape)
        if not block_filters or min(block_filters) < 1 or blocks_per_stage < 1:
            raise ValueError(
                "block_filters needs positive widths and blocks_per_stage must be >= 1, got "
                f"{block_filters}, {blocks_per_stage}"
            )

        # === Functional Model ===
        patch = keras.Input(shape=input_shape, name="patch")
        x = keras.layers.Reshape((*input_shape, 1), name="patch_volume")(patch)
        x = keras.layers.Conv3D(
            block_filters[0],
            5,
            strides=2,
            padding="same",
            use_bias=False,
            kernel_initializer="he_normal",
            name="stem_conv",
        )(x)
        x = _batch_norm("stem_bn")(x)
        x = keras.layers.ReLU(name="stem_relu")(x)
        for stage, filters in enumerate(block_filters, start=1):
            for block in range(1, blocks_per_stage + 1):
                strides = 2 if stage > 1 and block == 1 else 1
                x = apply_basic_block(x, filters, strides, f"stage{stage}_block{block}")
        x = keras.layers.GlobalAveragePooling3D(name="pool")(x)
        logit = keras.layers.Dense(1, name="logit")(x)
        probability = keras.layers.Activation("sigmoid", dtype="float32", name="probability")(logit)
        super().__init__(inputs=[patch], outputs=probability, **kwargs)

        # === Config ===
        self.block_filters = block_filters
        self.blocks_per_stage = blocks_per_stage
        self.patch_input_shape = input_shape

    @property
    def gradcam_layer(self) -> str:
        """Name of the last residual block's output (the Grad-CAM feature map)."""
        return f"stage{len(self.block_filters)}_block{self.blocks_per_stage}_out"

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "block_filters": list(self.block_filters),
            "blocks_per_stage": self.blocks_per_stage,
            "input_shape": list(self.patch_input_shape),
        }

    @classmethod
    def from_config(cls, config: dict) -> ResNet3D:
        return cls(**config)

    @classmethod
    def from_plan(cls, plan: FPRPlan, **kwargs) -> ResNet3D:
        """The network a ``resnet3d`` plan describes (not compiled)."""
        return cls(
            block_filters=plan.block_filters,
            blocks_per_stage=plan.blocks_per_stage,
            input_shape=plan.input_shape,
            name=kwargs.pop("name", "resnet3d"),
            **kwargs,
        )
