"""CNN3D: the small 3-D CNN of "Deep Learning with PyTorch" (part 2), scoring one patch (Keras 3).

The ``cnn3d`` network of the plans, beside the MGI-CNN in the ablations: the nodule classifier
of the book's LUNA project (its ``LunaModel``): batch norm on the input, conv-conv-maxpool
blocks, one linear layer on the flattened map. Only ``keras.layers`` are used, so a saved
``.keras`` file reloads in safe mode under any backend.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from fp_reduction_3dcnn.config import FPRPlan


def apply_conv_pool_block(x, filters: int, name: str):
    """Two 3x3x3 convolutions ('same' padding, bias, ReLU each), then 2x2x2 max pooling."""
    for i in (1, 2):
        x = keras.layers.Conv3D(
            filters, 3, padding="same", kernel_initializer="he_normal", name=f"{name}_conv{i}"
        )(x)
        x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
    return keras.layers.MaxPooling3D(2, name=f"{name}_pool")(x)


def book_trunk(block_filters: tuple[int, ...], input_shape: tuple[int, ...]):
    """The book's trunk: the patch input, batch norm of it, one conv-conv-maxpool block per
    width, flattened. Returns ``(input, features)``.

    Raises:
        ValueError: no or non-positive widths, or a patch too small for the poolings.
    """
    if not block_filters or min(block_filters) < 1:
        raise ValueError(f"block_filters needs positive widths, got {block_filters}")
    if min(input_shape) < 2 ** len(block_filters):
        raise ValueError(
            f"input_shape {input_shape} is too small for {len(block_filters)} poolings"
        )
    patch = keras.Input(shape=input_shape, name="patch")
    x = keras.layers.Reshape((*input_shape, 1), name="patch_volume")(patch)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="input_bn")(x)
    for i, filters in enumerate(block_filters, start=1):
        x = apply_conv_pool_block(x, filters, f"block{i}")
    return patch, keras.layers.Flatten(name="flatten")(x)


@keras.saving.register_keras_serializable(package="fp_reduction_3dcnn")
class CNN3D(keras.Model):
    """A small 3-D CNN classifier of one patch: the probability that a candidate is a nodule.

    The input is one windowed patch ``(y, x, z)`` (the plans' ``cnn3d``: 48x48x32 voxels
    ``(x, y, z)`` at 1 mm). Batch norm of the input (the book's "tail"), then one block per
    entry of ``block_filters`` (:func:`apply_conv_pool_block`: conv, ReLU, conv, ReLU, 2x2x2
    max pooling), flatten, one linear unit (the ``logit`` layer) and its sigmoid. On 48x48x32
    the four blocks of the ``cnn3d`` plan leave a 3x3x2 map of 64 channels: 1,152 features, as
    in the book.

    Where it differs from the book's ``LunaModel``: the crop is cut at 1 mm on the world-aligned
    cache grid (the book crops 32x48x48 voxels at each scan's own spacing, so its field of view
    changes from scan to scan); HU are windowed to [0, 1] over the plan's window (the book clamps
    to [-1000, 1000]); one sigmoid unit instead of a two-way softmax (the same model for two
    classes); He-normal initialisation with fan-in rather than fan-out.

    Args:
        block_filters: widths of the conv-conv-maxpool blocks (the book: 8, 16, 32, 64).
        input_shape: ``(y, x, z)`` of the patch; every side must be at least
            ``2 ** len(block_filters)``.
        **kwargs: standard model arguments (``name``, ``dtype``...).

    Example:
        >>> import numpy as np
        >>> model = CNN3D(block_filters=(4, 8), input_shape=(16, 16, 8))
        >>> x = np.zeros((2, 16, 16, 8), "float32")
        >>> tuple(model.predict([x], verbose=0).shape)
        (2, 1)

    Reference:
        Stevens, Antiga, Viehmann. "Deep Learning with PyTorch", Manning 2020, part 2
        (chapters 11-12: the LUNA classification model).
    """

    def __init__(
        self,
        block_filters: Sequence[int] = (8, 16, 32, 64),
        input_shape: Sequence[int] = (48, 48, 32),
        **kwargs,
    ) -> None:
        block_filters = tuple(int(f) for f in block_filters)
        input_shape = tuple(int(s) for s in input_shape)

        # === Functional Model ===
        patch, x = book_trunk(block_filters, input_shape)
        logit = keras.layers.Dense(1, name="logit")(x)
        probability = keras.layers.Activation("sigmoid", dtype="float32", name="probability")(logit)
        super().__init__(inputs=[patch], outputs=probability, **kwargs)

        # === Config ===
        self.block_filters = block_filters
        self.patch_input_shape = input_shape

    @property
    def gradcam_layer(self) -> str:
        """Name of the last convolution's output, before its pooling (the Grad-CAM map)."""
        return f"block{len(self.block_filters)}_relu2"

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "block_filters": list(self.block_filters),
            "input_shape": list(self.patch_input_shape),
        }

    @classmethod
    def from_config(cls, config: dict) -> CNN3D:
        return cls(**config)

    @classmethod
    def from_plan(cls, plan: FPRPlan, **kwargs) -> CNN3D:
        """The network a ``cnn3d`` plan describes (not compiled)."""
        return cls(
            block_filters=plan.block_filters,
            input_shape=plan.input_shape,
            name=kwargs.pop("name", "cnn3d"),
            **kwargs,
        )
