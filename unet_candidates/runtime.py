"""Where the U-Net's forward pass runs at extraction: Keras, or ONNX Runtime on a CPU.

On a CPU, ONNX Runtime runs the suite's U-Nets 1.3-1.7 times faster than TensorFlow with the
same numbers (within 1e-5; ``bench/bench_detect.py`` measures it). The network is converted in
memory when it is loaded (``tf2onnx``, a few seconds); ``model.keras`` stays the one source of
the weights. A model folder may also hold an 8-bit copy of the 2-D U-Net, calibrated on scans
(``python -m unet_candidates quantize``, :mod:`unet_candidates.quantize`): ``model.int8.onnx``
with its record ``model.int8.json``, which names the ``model.keras`` it was made from. Where
it is there and still fits, ``auto`` runs it on a CPU (about twice as fast again). On a GPU,
or with another Keras backend, the Keras model itself predicts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lungct.errors import LungCTError

RUNTIMES = ("auto", "keras", "onnx", "int8")
"""``auto``: ONNX Runtime on a CPU with the TensorFlow backend (the folder's 8-bit copy where
it has a valid one), else Keras. ``onnx``: the float32 network in ONNX Runtime. ``int8``: the
folder's 8-bit copy, required."""

INT8_FILE = "model.int8.onnx"
"""The 8-bit copy of a model folder's network (written by :mod:`unet_candidates.quantize`)."""
INT8_RECORD = "model.int8.json"
"""What the 8-bit copy was made from: the sha256 of ``model.keras`` and of the copy, and its
calibration."""
INT8_FORMAT = 1


def to_onnx(model: Any) -> bytes:
    """The Keras model's inference forward pass as a serialized ONNX graph (any batch and
    spatial size; channels last, as the Keras model)."""
    import tensorflow as tf
    import tf2onnx

    shape = [None] * len(model.inputs[0].shape[:-1]) + [int(model.inputs[0].shape[-1])]
    spec = (tf.TensorSpec(shape, tf.float32, name="x"),)
    forward = tf.function(lambda x: model(x, training=False))
    proto, _ = tf2onnx.convert.from_function(forward, input_signature=spec, opset=17)
    return proto.SerializeToString()


class OnnxPredictor:
    """A Keras model's forward pass through ONNX Runtime, with Keras's ``predict_on_batch``.

    Args:
        model: a built Keras model with one input and one output (any spatial size).
        threads: intra-op threads (default: ONNX Runtime's, one per physical core).
        graph: a serialized ONNX graph of the same network to run instead of converting
            ``model`` (the folder's 8-bit copy).
        precision: what ``graph`` computes in, ``float32`` or ``int8`` (for the record).
    """

    def __init__(
        self,
        model: Any,
        threads: int | None = None,
        graph: bytes | None = None,
        precision: str = "float32",
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        self._session = ort.InferenceSession(
            graph if graph is not None else to_onnx(model),
            options,
            providers=["CPUExecutionProvider"],
        )
        self._input = self._session.get_inputs()[0].name
        self.keras_model = model
        self.inputs = model.inputs
        self.precision = precision

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        """The model's output for one batch (float32)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        self._last_shape = x.shape
        return self._session.run(None, {self._input: x})[0]

    def release_memory(self) -> None:
        """Give back what ONNX Runtime's memory arena grew to for a scan's batches (about
        0.45 GB for the 2-D default on a 512x512 scan; the next scan grows it again).

        The arena is shrunk at the end of one more run, of one sample of the last batch's shape.
        """
        import onnxruntime as ort

        shape = getattr(self, "_last_shape", None)
        if shape is None:
            return
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        zeros = np.zeros((1, *shape[1:]), np.float32)
        self._session.run(None, {self._input: zeros}, options)

    def __repr__(self) -> str:
        return f"OnnxPredictor({self.keras_model.name!r}, {self.precision})"


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def int8_problem(model_dir: str | os.PathLike) -> str | None:
    """What keeps a model folder's 8-bit copy from being used, or ``None`` when it fits.

    The copy fits when its record is readable, the copy's sha256 is the recorded one, and the
    recorded ``model.keras`` sha256 is that of the folder's ``model.keras`` (a network trained
    again, or resumed, leaves the copy behind).
    """
    from lungct.modeldir import file_sha256

    root = Path(model_dir)
    graph, record_path = root / INT8_FILE, root / INT8_RECORD
    if not graph.is_file() and not record_path.is_file():
        return f"no {INT8_FILE} (make one with `python -m unet_candidates quantize`)"
    if not graph.is_file() or not record_path.is_file():
        return f"{INT8_FILE} and {INT8_RECORD} come together; one of them is missing"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{INT8_RECORD} is not readable JSON ({exc})"
    if not isinstance(record, dict) or record.get("format") != INT8_FORMAT:
        return f"{INT8_RECORD} is not an 8-bit record of format {INT8_FORMAT}"
    if file_sha256(graph) != record.get("sha256"):
        return f"{INT8_FILE} changed since it was written (sha256 mismatch)"
    keras_file = root / "model.keras"
    if not keras_file.is_file() or file_sha256(keras_file) != record.get("model_keras_sha256"):
        return (
            f"{INT8_FILE} was made from another model.keras (the network was trained again); "
            "quantize it again"
        )
    return None


def predictor(
    model: Any,
    runtime: str = "auto",
    threads: int | None = None,
    model_dir: str | os.PathLike | None = None,
) -> Any:
    """What predicts for ``model`` at extraction: the model itself or an :class:`OnnxPredictor`
    (with ``threads`` intra-op threads; default: one per core). ``model_dir`` is the model's
    folder, where ``auto`` and ``int8`` look for the 8-bit copy.

    Raises:
        LungCTError: an unknown runtime, ``onnx`` asked for where it cannot run, or ``int8``
            without a fitting 8-bit copy.
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
        raise LungCTError(None, f"the {runtime} runtime cannot run here ({why})")
    if runtime in ("auto", "int8"):
        where = Path(model_dir) / INT8_FILE if model_dir is not None else None
        problem = int8_problem(model_dir) if model_dir is not None else "no model folder given"
        if problem is None:
            graph = Path(model_dir, INT8_FILE).read_bytes()  # type: ignore[arg-type]
            return OnnxPredictor(model, threads=threads, graph=graph, precision="int8")
        if runtime == "int8":
            raise LungCTError(where or model_dir, problem)
        if where is not None and (where.exists() or where.with_suffix(".json").exists()):
            print(f"[unet] {where}: {problem}; predicting in float32", file=sys.stderr)
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
    """``int8`` or ``onnx`` for an :class:`OnnxPredictor` (8-bit or float32), else ``keras``."""
    if isinstance(model, OnnxPredictor):
        return "int8" if model.precision == "int8" else "onnx"
    return "keras"
