"""An 8-bit copy of a trained 2-D U-Net for CPUs, calibrated on scans.

``python -m unet_candidates quantize --model DIR --scan S [--scan S ...]`` (or ``--data DIR
--folds 8 [--cache C]``) writes ``DIR/model.int8.onnx`` and its record ``DIR/model.int8.json``;
extraction on a CPU then runs the copy (:func:`unet_candidates.runtime.predictor`, runtime
``auto`` or ``int8``). ``model.keras`` stays the source: the record names its sha256, and a
copy made from other weights is not used.

How: the network is converted to ONNX, its batch normalisation folded into the convolutions
(ONNX Runtime's graph optimisation), and quantized statically with ONNX Runtime: weights to
signed 8 bits per output channel, activations to unsigned 8 bits per tensor, with ranges
measured (minimum and maximum) on the network's own inputs at extraction: the extraction runs
on the calibration scans and its batches are sampled. Calibrate on scans like those it will
see (the training data's validation fold), never on the scans it will be measured on. The
record keeps the calibration's series and the largest difference between the float32 and the
8-bit probabilities on the sampled batches; check the candidates on a held-out set
(``unet_candidates extract --runtime int8`` against ``--runtime onnx``) before relying on it.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lungct.errors import LungCTError
from lungct.fileio import write_bytes_atomic, write_json_atomic
from lungct.modeldir import file_sha256
from unet_candidates.runtime import INT8_FILE, INT8_FORMAT, INT8_RECORD, OnnxPredictor, to_onnx

DEFAULT_BATCHES = 24
"""Extraction batches sampled for calibration (a few hundred slices' crops)."""


class _Sampler:
    """A predictor that passes each batch to ``inner`` and keeps a random sample of them."""

    def __init__(self, inner: Any, keep: float, rng: np.random.Generator) -> None:
        self.inner = inner
        self.keep = keep
        self.rng = rng
        self.batches: list[np.ndarray] = []
        self.inputs = inner.inputs

    def predict_on_batch(self, x: np.ndarray) -> np.ndarray:
        if self.rng.random() < self.keep:
            self.batches.append(np.array(x, dtype=np.float32, copy=True))
        return self.inner.predict_on_batch(x)


def calibration_batches(
    predict: Any,
    plan: Any,
    scans: Iterable[Callable[[], Any]],
    n_scans: int,
    batches: int = DEFAULT_BATCHES,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> tuple[list[np.ndarray], list[str]]:
    """Input batches of the extraction on the scans (loaders of Scans or CachedScans), sampled.

    About ``batches`` batches are kept, spread over the scans; the extraction's own steps cut
    them (lung boxes, flips where the map is uncertain), so they are what the network sees.
    Returns the batches and the series they came from.
    """
    from unet_candidates.extract import predict_probability_map, prepare_input

    rng = np.random.default_rng(seed)
    kept: list[np.ndarray] = []
    series: list[str] = []
    # About 25 batches per full-size scan on the 2-D default plan.
    keep = min(1.0, batches / max(1, 25 * n_scans))
    for i, load in enumerate(scans, start=1):
        sampler = _Sampler(predict, keep, rng)
        scan = load()
        predict_probability_map(sampler, prepare_input(scan, plan), plan)
        kept.extend(sampler.batches)
        series.append(str(scan.seriesuid))
        if log:
            log(f"[quantize] scan {i}/{n_scans}: {len(sampler.batches)} batches kept")
    if not kept:
        raise LungCTError(None, "no calibration batch was kept; give more scans")
    if len(kept) > batches:
        kept = [kept[i] for i in sorted(rng.choice(len(kept), batches, replace=False))]
    return kept, series


def quantize_graph(graph: bytes, batches: list[np.ndarray]) -> bytes:
    """The float32 ONNX graph quantized to 8 bits with ranges measured on ``batches``."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self._it, None)
            return None if x is None else {name: x}

    with tempfile.TemporaryDirectory(prefix="lungct-quantize-") as tmp:
        plain, folded, quantized = (Path(tmp) / n for n in ("f32.onnx", "fold.onnx", "q.onnx"))
        plain.write_bytes(graph)
        # Fold batch normalisation into the convolutions before the ranges are measured.
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(folded)
        options.log_severity_level = 3
        ort.InferenceSession(str(plain), options, providers=["CPUExecutionProvider"])
        logging.disable(logging.WARNING)  # its per-tensor notes on the shape ops are not ours
        try:
            quantize_static(
                str(folded),
                str(quantized),
                Reader(),
                quant_format=QuantFormat.QOperator,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        finally:
            logging.disable(logging.NOTSET)
        return quantized.read_bytes()


def quantize_model_dir(
    model_dir: str | os.PathLike,
    scans: Iterable[Callable[[], Any]],
    n_scans: int,
    batches: int = DEFAULT_BATCHES,
    seed: int = 0,
    allow_unfinished: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Write ``model.int8.onnx`` and ``model.int8.json`` into a 2-D U-Net's model folder.

    Args:
        model_dir: a trained 2-D U-Net folder.
        scans: loaders of the calibration scans (Scan or CachedScan).
        n_scans: how many loaders ``scans`` yields.
        batches: extraction batches to calibrate on.
        seed: random seed of the sampling.
        allow_unfinished: accept a folder whose training has not ended.
        log: progress lines (default: stderr).

    Raises:
        LungCTError: not a finished 2-D U-Net folder, or no calibration scan usable.
        lungct.fileio.WriteError: the folder cannot be written.

    Returns:
        The record written.
    """
    import onnxruntime as ort

    from unet_candidates.extract import MODEL_FILE, load_unet

    log = log or (lambda message: print(message, file=sys.stderr))
    root = Path(model_dir)
    model, plan = load_unet(root, allow_unfinished=allow_unfinished)
    if plan.dims != "2d":
        raise LungCTError(root, "only a 2-D U-Net has an 8-bit copy (this plan is 3-D)")
    keras_sha = file_sha256(root / MODEL_FILE)
    graph = to_onnx(model)
    plain = OnnxPredictor(model, graph=graph)
    samples, series = calibration_batches(plain, plan, scans, n_scans, batches, seed, log)
    log(f"[quantize] calibrating on {len(samples)} batches")
    quantized = quantize_graph(graph, samples)
    small = OnnxPredictor(model, graph=quantized, precision="int8")
    difference = max(
        float(np.abs(small.predict_on_batch(x) - plain.predict_on_batch(x)).max()) for x in samples
    )
    record = {
        "format": INT8_FORMAT,
        "sha256": file_sha256_bytes(quantized),
        "model_keras_sha256": keras_sha,
        "method": "ONNX Runtime static quantization, QOperator, weights int8 per channel, "
        "activations uint8 per tensor, MinMax ranges",
        "calibration": {
            "series": series,
            "batches": len(samples),
            "seed": seed,
            "max_abs_probability_difference": round(difference, 5),
        },
        "onnxruntime": ort.__version__,
        "written": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    write_bytes_atomic(root / INT8_FILE, quantized)
    write_json_atomic(root / INT8_RECORD, record)
    log(
        f"[quantize] wrote {root / INT8_FILE} ({len(quantized) / 1e6:.1f} MB); largest "
        f"probability difference on the calibration batches {difference:.4f}"
    )
    return record


def file_sha256_bytes(data: bytes) -> str:
    """SHA-256 of bytes in memory (as :func:`lungct.modeldir.file_sha256` of a file)."""
    import hashlib

    return hashlib.sha256(data).hexdigest()
