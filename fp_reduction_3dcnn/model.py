"""MGI-CNN: multi-scale gradual integration CNN for false-positive reduction (Keras 3).

Backend-agnostic: only ``keras.layers`` / ``keras.ops``, so ``KERAS_BACKEND=torch`` or ``jax``
runs the same model. The network is built as a functional graph inside ``__init__`` (as KerasHub
backbones are), so ``model.summary()`` shows every layer and a saved ``.keras`` file reloads in
safe mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras

from fp_reduction_3dcnn.config import CONV_MODES, MERGES, VARIANTS, FPRPlan, renamed_fields
from fp_reduction_3dcnn.stream_integration import StreamIntegration

GRADCAM_LAYER = "head_conv2_act"
"""Name of the last convolutional block's output (the Grad-CAM feature map)."""

LOGIT_LAYER = "logit"
"""Name of the pre-sigmoid output layer."""


def apply_conv_block(x, filters: int, conv: str, alpha: float, name: str, kernel_size: int = 3):
    """Convolution (3x3 in 2.5-D, 3x3x3 in 3-D, 'same' padding) -> batch norm -> LeakyReLU."""
    if conv == "3d":
        x = keras.layers.Conv3D(filters, kernel_size, padding="same", name=f"{name}_conv")(x)
    else:
        x = keras.layers.Conv2D(filters, kernel_size, padding="same", name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return keras.layers.LeakyReLU(negative_slope=alpha, name=f"{name}_act")(x)


def apply_pool(x, conv: str, name: str):
    """Max pooling 3 / stride 2, 'same' padding (in-plane and, in 3-D, along z too)."""
    if conv == "3d":
        return keras.layers.MaxPooling3D(3, strides=2, padding="same", name=name)(x)
    return keras.layers.MaxPooling2D(3, strides=2, padding="same", name=name)(x)


def apply_gradual_stream(
    scales: Sequence, filters: Sequence[int], top_filters: int, conv: str, alpha: float, name: str
):
    """Gradual feature extraction over the scales in the given order.

    conv x2 on the first scale -> concatenate the second scale along channels -> conv x2 ->
    concatenate the third -> conv x2 -> max pool -> conv x2 (``top_filters``).
    """
    x = scales[0]
    for stage, f in enumerate(filters):
        if stage:
            x = keras.layers.Concatenate(name=f"{name}_add_scale{stage + 1}")([scales[stage], x])
        x = apply_conv_block(x, f, conv, alpha, f"{name}_s{stage + 1}a")
        x = apply_conv_block(x, f, conv, alpha, f"{name}_s{stage + 1}b")
    x = apply_pool(x, conv, f"{name}_pool")
    x = apply_conv_block(x, top_filters, conv, alpha, f"{name}_top_a")
    return apply_conv_block(x, top_filters, conv, alpha, f"{name}_top_b")


@keras.saving.register_keras_serializable(package="fp_reduction_3dcnn")
class MGICNN(keras.Model):
    """Multi-scale gradual integration CNN (MGI-CNN) and its ablation variants.

    Inputs are three co-centred patches of one candidate, wide to narrow (the paper's
    40x40x26, 30x30x10 and 20x20x6 voxels), each resized to ``input_shape`` = ``(y, x, z)``.
    The output is the probability that the candidate is a nodule (the ``logit`` layer holds the
    value before the sigmoid).

    Variants:

    * ``mgi``: a zoom-in stream (wide -> narrow) and a zoom-out stream (narrow -> wide), each a
      gradual feature extraction; merged by :class:`StreamIntegration` (``merge``).
    * ``zoom_in`` / ``zoom_out``: one stream only.
    * ``ri``: the three inputs concatenated along channels, then one plain stream of the same
      depth (the paper's input-level integration).
    * ``lr``: each scale through its own first conv pair, merged by ``merge``, then the rest
      of the stream (late fusion; the authors' code used 1x1 kernels in the per-scale pair,
      here they are 3x3).

    ``conv="2.5d"`` treats the slices as channels of 2-D convolutions (the authors' code);
    ``conv="3d"`` adds a channel axis and uses 3-D convolutions and pooling.

    After the streams: max pool, two conv blocks (``head_filters``; the last one is the
    Grad-CAM layer :data:`GRADCAM_LAYER`), flatten, fully connected layers (``dense_units``,
    dropout before each, batch norm, LeakyReLU) and one sigmoid unit. Every conv is followed by
    batch norm and LeakyReLU(``leaky_alpha``) as in the authors' code.

    Args:
        variant: one of ``mgi``, ``zoom_in``, ``zoom_out``, ``ri``, ``lr``.
        merge: how the streams are merged: ``sum`` (paper), ``concat`` or ``conv1x1``
            (``integration`` in the config of model files of earlier versions, which
            :meth:`from_config` still reads).
        conv: ``2.5d`` or ``3d``.
        stream_filters: filters of the three gradual stages (two convs each).
        stream_top_filters: filters of the two convs after the stream's pooling.
        head_filters: filters of the two convs after the merge.
        dense_units: widths of the fully connected layers.
        dropout: dropout rate before each fully connected layer.
        leaky_alpha: LeakyReLU slope.
        input_shape: ``(y, x, z)`` of each input.
        **kwargs: standard model arguments (``name``, ``dtype``...).

    Example:
        >>> import numpy as np
        >>> model = MGICNN(stream_filters=(4, 4, 4), stream_top_filters=4, head_filters=4,
        ...                dense_units=(8,))
        >>> x = np.zeros((2, 20, 20, 6), "float32")
        >>> tuple(model.predict([x, x, x], verbose=0).shape)
        (2, 1)

    Reference:
        Kim, Yoon, Choi, Suk. "Multi-scale gradual integration CNN for false positive reduction
        in pulmonary nodule detection." Neural Networks 115:1-10, 2019 (arXiv:1807.10581).
    """

    gradcam_layer = GRADCAM_LAYER
    """Name of the last convolutional block's output (the Grad-CAM feature map)."""

    def __init__(
        self,
        variant: str = "mgi",
        merge: str = "sum",
        conv: str = "2.5d",
        stream_filters: Sequence[int] = (24, 32, 48),
        stream_top_filters: int = 64,
        head_filters: int = 64,
        dense_units: Sequence[int] = (128, 128),
        dropout: float = 0.5,
        leaky_alpha: float = 0.2,
        input_shape: Sequence[int] = (20, 20, 6),
        **kwargs,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if conv not in CONV_MODES:
            raise ValueError(f"conv must be one of {CONV_MODES}, got {conv!r}")
        stream_filters = tuple(int(f) for f in stream_filters)
        dense_units = tuple(int(u) for u in dense_units)
        input_shape = tuple(int(s) for s in input_shape)
        alpha = float(leaky_alpha)

        # === Functional Model ===
        inputs = [keras.Input(shape=input_shape, name=f"scale_{i + 1}") for i in range(3)]
        if conv == "3d":
            scales = [
                keras.layers.Reshape((*input_shape, 1), name=f"scale_{i + 1}_volume")(x)
                for i, x in enumerate(inputs)
            ]
        else:
            scales = list(inputs)
        f1, f2, f3 = stream_filters
        top = int(stream_top_filters)

        def stream(order: tuple[int, int, int], name: str):
            return apply_gradual_stream(
                [scales[i] for i in order], stream_filters, top, conv, alpha, name
            )

        if variant == "mgi":
            zoom_in = stream((0, 1, 2), "zoom_in")
            zoom_out = stream((2, 1, 0), "zoom_out")
            x = StreamIntegration(merge, name="merge")([zoom_in, zoom_out])
        elif variant == "zoom_in":
            x = stream((0, 1, 2), "zoom_in")
        elif variant == "zoom_out":
            x = stream((2, 1, 0), "zoom_out")
        else:
            if variant == "ri":
                x = keras.layers.Concatenate(name="ri_inputs")(scales)
                x = apply_conv_block(x, f1, conv, alpha, "ri_s1a")
                x = apply_conv_block(x, f1, conv, alpha, "ri_s1b")
            else:  # lr: late fusion of per-scale branches
                branches = []
                for i, s in enumerate(scales):
                    b = apply_conv_block(s, f1, conv, alpha, f"lr_scale{i + 1}_a")
                    branches.append(apply_conv_block(b, f1, conv, alpha, f"lr_scale{i + 1}_b"))
                x = StreamIntegration(merge, name="merge")(branches)
            for stage, f in ((2, f2), (3, f3)):
                x = apply_conv_block(x, f, conv, alpha, f"{variant}_s{stage}a")
                x = apply_conv_block(x, f, conv, alpha, f"{variant}_s{stage}b")
            x = apply_pool(x, conv, f"{variant}_pool")
            x = apply_conv_block(x, top, conv, alpha, f"{variant}_top_a")
            x = apply_conv_block(x, top, conv, alpha, f"{variant}_top_b")

        x = apply_pool(x, conv, "head_pool")
        x = apply_conv_block(x, int(head_filters), conv, alpha, "head_conv1")
        x = apply_conv_block(x, int(head_filters), conv, alpha, "head_conv2")
        x = keras.layers.Flatten(name="flatten")(x)
        for i, units in enumerate(dense_units):
            x = keras.layers.Dropout(dropout, name=f"fc{i + 1}_dropout")(x)
            x = keras.layers.Dense(units, name=f"fc{i + 1}")(x)
            x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"fc{i + 1}_bn")(x)
            x = keras.layers.LeakyReLU(negative_slope=alpha, name=f"fc{i + 1}_act")(x)
        logit = keras.layers.Dense(1, name=LOGIT_LAYER)(x)
        probability = keras.layers.Activation("sigmoid", dtype="float32", name="probability")(logit)
        super().__init__(inputs=inputs, outputs=probability, **kwargs)

        # === Config ===
        self.variant = variant
        self.merge = merge
        self.conv = conv
        self.stream_filters = stream_filters
        self.stream_top_filters = top
        self.head_filters = int(head_filters)
        self.dense_units = dense_units
        self.dropout = float(dropout)
        self.leaky_alpha = alpha
        self.patch_input_shape = input_shape

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "variant": self.variant,
            "merge": self.merge,
            "conv": self.conv,
            "stream_filters": list(self.stream_filters),
            "stream_top_filters": self.stream_top_filters,
            "head_filters": self.head_filters,
            "dense_units": list(self.dense_units),
            "dropout": self.dropout,
            "leaky_alpha": self.leaky_alpha,
            "input_shape": list(self.patch_input_shape),
        }

    @classmethod
    def from_config(cls, config: dict) -> MGICNN:
        # A model file of an earlier version says "integration" for "merge".
        return cls(**renamed_fields(config))

    @classmethod
    def from_plan(cls, plan: FPRPlan, **kwargs) -> MGICNN:
        """The network a plan describes (not compiled)."""
        return cls(
            variant=plan.variant,
            merge=plan.merge,
            conv=plan.conv,
            stream_filters=plan.stream_filters,
            stream_top_filters=plan.stream_top_filters,
            head_filters=plan.head_filters,
            dense_units=plan.dense_units,
            dropout=plan.dropout,
            leaky_alpha=plan.leaky_alpha,
            input_shape=plan.input_shape,
            name=kwargs.pop("name", f"mgicnn_{plan.variant}"),
            **kwargs,
        )


def build_optimizer(plan: FPRPlan) -> keras.optimizers.Optimizer:
    """The plan's optimiser: SGD with momentum (paper) or Adam with beta1 (authors' code)."""
    if plan.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate=plan.learning_rate, beta_1=plan.beta_1)
    return keras.optimizers.SGD(learning_rate=plan.learning_rate, momentum=plan.momentum)


def compile_model(model: keras.Model, plan: FPRPlan) -> keras.Model:
    """Compile for binary cross-entropy with the plan's optimiser (Xavier init = Keras default)."""
    model.compile(
        optimizer=build_optimizer(plan),
        loss="binary_crossentropy",
        metrics=["binary_accuracy"],
    )
    return model
