"""MalignancyCNN: a small 3-D CNN with two heads, malignancy class and rating (Keras 3).

The trunk is that of :class:`fp_reduction_3dcnn.cnn3d.CNN3D` (batch norm of the input, then
conv-conv-maxpool blocks); after it come dropout, one hidden layer and two heads: the
probability that the nodule is malignant (median rating >= 4 against <= 2) and the rating
itself, regressed as ``(rating - 3) / 2``. Only ``keras.layers`` are used, so the saved file
reloads in safe mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from fp_reduction_3dcnn.cnn3d import book_trunk


@keras.saving.register_keras_serializable(package="fp_reduction_3dcnn")
class MalignancyCNN(keras.Model):
    """Malignancy of a nodule-centred patch.

    Args:
        block_filters: widths of the conv-conv-maxpool blocks.
        input_shape: ``(y, x, z)`` of the patch.
        dense_units: width of the hidden layer.
        dropout: dropout rate before the hidden layer.
        **kwargs: standard model arguments (``name``...).

    Outputs a dict: ``malignancy`` (sigmoid probability) and ``rating`` (linear).

    Example:
        >>> import numpy as np
        >>> model = MalignancyCNN(block_filters=(4, 8), input_shape=(16, 16, 16))
        >>> out = model.predict(np.zeros((2, 16, 16, 16), "float32"), verbose=0)
        >>> tuple(out["malignancy"].shape), tuple(out["rating"].shape)
        ((2, 1), (2, 1))
    """

    def __init__(
        self,
        block_filters: Sequence[int] = (8, 16, 32, 64),
        input_shape: Sequence[int] = (40, 40, 40),
        dense_units: int = 32,
        dropout: float = 0.3,
        **kwargs,
    ) -> None:
        block_filters = tuple(int(f) for f in block_filters)
        input_shape = tuple(int(s) for s in input_shape)

        # === Functional Model ===
        patch, x = book_trunk(block_filters, input_shape)
        x = keras.layers.Dropout(float(dropout), name="dropout")(x)
        x = keras.layers.Dense(int(dense_units), activation="relu", name="hidden")(x)
        logit = keras.layers.Dense(1, name="logit")(x)
        probability = keras.layers.Activation("sigmoid", dtype="float32", name="malignancy")(logit)
        rating = keras.layers.Dense(1, dtype="float32", name="rating")(x)
        super().__init__(
            inputs=patch, outputs={"malignancy": probability, "rating": rating}, **kwargs
        )

        # === Config ===
        self.block_filters = block_filters
        self.patch_input_shape = input_shape
        self.dense_units = int(dense_units)
        self.dropout_rate = float(dropout)

    @property
    def gradcam_layer(self) -> str:
        """Name of the last convolution's output, before its pooling."""
        return f"block{len(self.block_filters)}_relu2"

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "block_filters": list(self.block_filters),
            "input_shape": list(self.patch_input_shape),
            "dense_units": self.dense_units,
            "dropout": self.dropout_rate,
        }

    @classmethod
    def from_config(cls, config: dict) -> MalignancyCNN:
        return cls(**config)
