"""Where the U-Net's forward pass runs at extraction: Keras, or ONNX Runtime on a CPU.

On a CPU, ONNX Runtime runs the suite's U-Nets 1.3-1.7 times faster than TensorFlow with the
same numbers (within 1e-5; ``bench/bench_detect.py`` measures it). The network is converted in
memory when it is loaded (``tf2onnx``, a few seconds); nothing is written, and the model
folder's ``model.keras`` stays the one source of the weights. On a GPU, or with another Keras
backend, the Keras model itself predicts.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import numpy as np

from lungct.errors import LungCTError

RUNTIMES = ("auto", "keras", "onnx")
"""``auto``: ONNX Runtime on a CPU with the TensorFlow backend, else Keras."""


class OnnxPredictor:
    """A Keras model's forward pass through ONNX Runtime, with Keras's ``predict_on_batch``.

    Args:
        model: a built Keras model with one input and one output (any spatial size).
        threads: intra-op threads (default: ONNX Runtime's, one per physical core).
    """

    def __init__(self, model: Any, threads: int | None = None) -> None:
        import onnxruntime as ort
        import tensorflow as tf
        import tf2onnx

        shape = [None] * len(model.inputs[0].shape[:-1]) + [int(model.inputs[0].shape[-1])]
        spec = (tf.TensorSpec(shape, tf.float32, name="x"),)
        forward = tf.function(lambda x: model(x, training=False))
        proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=17)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        self._session = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self.keras_model = model
        self.inputs = model.inputs

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        """The model's output for one batch (float32)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self._session.run(None, {self._input: x})[0]

    def __repr__(self) -> str:
        return f"OnnxPredictor({self.keras_model.name!r})"


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def predictor(model: Any, runtime: str = "auto", threads: int | None = None) -> Any:
    """What predicts for ``model`` at extraction: the model itself or an :class:`OnnxPredictor`
    (with ``threads`` intra-op threads; default: one per core).

    Raises:
        LungCTError: an unknown runtime, or ``onnx`` asked for where it cannot run.
    """
    if runtime not in RUNTIMES:
        raise LungCTError(None, f"runtime must be one of {list(RUNTIMES)}, got {runtime!r}")
    if runtime == "keras":
        return model
    import keras

    missing = [n for n in ("onnxruntime", "tf2onnx") if importlib.util.find_spec(n) is None]
    usable = keras.backend.backend() == "tensorflow" and not missing
    if runtime == "auto" and (not usable or _gpu_visible()):
        return model
    if not usable:
        why = f"missing {missing}" if missing else f"the {keras.backend.backend()} backend"
        raise LungCTError(None, f"the onnx runtime cannot run here ({why})")
    try:
        return OnnxPredictor(model, threads=threads)
    except Exception as exc:  # tf2onnx raises many types for an op it cannot convert
        if runtime == "onnx":
            raise LungCTError(None, f"the U-Net could not be converted to ONNX ({exc})") from None
        print(
            f"[unet] ONNX conversion failed ({type(exc).__name__}); predicting with Keras",
            file=sys.stderr,
        )
        return model


def default_runtime() -> str:
    """``LUNGCT_RUNTIME`` from the environment, else ``auto``."""
    return os.environ.get("LUNGCT_RUNTIME", "auto")


def runtime_of(model: Any) -> str:
    """``onnx`` for an :class:`OnnxPredictor`, else ``keras``."""
    return "onnx" if isinstance(model, OnnxPredictor) else "keras"
