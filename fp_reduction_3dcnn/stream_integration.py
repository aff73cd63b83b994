"""The stream merge: one feature map from the equal-shaped maps of parallel streams.

The plan calls this choice ``merge``; the paper calls it "multi-stream feature integration".
"""

from __future__ import annotations

import keras
from keras import ops

MERGE_MODES = ("sum", "concat", "conv1x1")


# The class keeps its name, and this module the class's, although the plan says "merge": Keras 3
# stores a layer's weights in model.weights.h5 under a path made from its class name
# (layers/stream_integration/vars), so a renamed class would not load the conv1x1 weights of any
# model file trained before. The layer's name inside MGICNN ("integration" before, "merge" now)
# is in no model file: the weights path does not use it and MGICNN's config rebuilds the network
# from its arguments, so that name could change.
@keras.saving.register_keras_serializable(package="fp_reduction_3dcnn")
class StreamIntegration(keras.layers.Layer):
    """Merge the feature maps of parallel streams into one (the plan's ``merge``; the paper's
    multi-stream feature integration).

    Every input is a channels-last feature map of the same spatial shape (2-D or 3-D).

    * ``sum``: element-wise sum (the paper's choice); inputs need equal channel counts.
    * ``concat``: concatenation along channels.
    * ``conv1x1``: a learned 1x1 convolution (a per-position linear map) of each stream to
      ``filters`` channels (default: the first input's), then the sum; as in the authors' code.

    Args:
        mode: one of ``"sum"``, ``"concat"``, ``"conv1x1"``.
        filters: output channels of ``conv1x1`` (``None`` = channels of the first input).
        **kwargs: standard layer arguments (``name``, ``dtype``, ...).

    Example:
        >>> import numpy as np
        >>> layer = StreamIntegration("sum")
        >>> a = np.ones((2, 5, 5, 8), "float32")
        >>> tuple(layer([a, a]).shape)
        (2, 5, 5, 8)

    Reference:
        Kim, Yoon, Choi, Suk. "Multi-scale gradual integration CNN for false positive reduction
        in pulmonary nodule detection." Neural Networks 115:1-10, 2019 (arXiv:1807.10581),
        section on multi-stream feature integration.
    """

    def __init__(self, mode: str = "sum", filters: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in MERGE_MODES:
            raise ValueError(f"mode must be one of {MERGE_MODES}, got {mode!r}")
        self.mode = mode
        self.filters = filters

    def build(self, input_shape) -> None:
        if not isinstance(input_shape, list | tuple) or len(input_shape) < 2:
            raise ValueError("StreamIntegration needs a list of at least two inputs")
        spatial = {tuple(s[1:-1]) for s in input_shape}
        if len(spatial) != 1:
            raise ValueError(f"streams must share their spatial shape, got {input_shape}")
        channels = [int(s[-1]) for s in input_shape]
        if self.mode == "sum" and len(set(channels)) != 1:
            raise ValueError(f"'sum' needs equal channel counts, got {channels}")
        self.kernels = []
        self.biases = []
        if self.mode == "conv1x1":
            out = int(self.filters or channels[0])
            for i, c in enumerate(channels):
                self.kernels.append(
                    self.add_weight(
                        shape=(c, out), initializer="glorot_uniform", name=f"kernel_{i}"
                    )
                )
            self.biases.append(self.add_weight(shape=(out,), initializer="zeros", name="bias"))

    def call(self, inputs):
        if self.mode == "sum":
            out = inputs[0]
            for x in inputs[1:]:
                out = out + x
            return out
        if self.mode == "concat":
            return ops.concatenate(list(inputs), axis=-1)
        out = self.biases[0]
        for x, kernel in zip(inputs, self.kernels, strict=True):
            out = out + ops.matmul(x, kernel)
        return out

    def compute_output_shape(self, input_shape):
        first = tuple(input_shape[0])
        if self.mode == "sum":
            return first
        if self.mode == "concat":
            return (*first[:-1], sum(int(s[-1]) for s in input_shape))
        return (*first[:-1], int(self.filters or first[-1]))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"mode": self.mode, "filters": self.filters})
        return config
