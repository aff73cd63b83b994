"""Where the U-Net runs: ONNX Runtime gives Keras's numbers and candidates."""

from __future__ import annotations

import numpy as np
import pytest

from lungct.errors import LungCTError
from unet_candidates import run_extraction
from unet_candidates.runtime import OnnxPredictor, predictor, runtime_of
from unet_candidates.testing import phantom_chest, tiny_plan

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_onnx_forward_pass_equals_keras(dims: str) -> None:
    model = tiny_plan(dims).build_model()
    onnx = OnnxPredictor(model)
    rng = np.random.default_rng(0)
    shapes = [(3, 32, 48, 3), (1, 64, 32, 3)] if dims == "2d" else [(2, 16, 16, 32, 1)]
    for shape in shapes:  # any batch and spatial size the network accepts
        x = rng.random(shape, dtype=np.float32)
        expected = np.asarray(model.predict_on_batch(x))
        got = onnx.predict_on_batch(x)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert runtime_of(onnx) == "onnx" and runtime_of(model) == "keras"
    # Giving the arena back between scans changes no later prediction.
    onnx.release_memory()
    np.testing.assert_array_equal(onnx.predict_on_batch(x), got)


def test_runtime_choice_and_errors(monkeypatch) -> None:
    model = tiny_plan("2d").build_model()
    assert predictor(model, "keras") is model
    assert isinstance(predictor(model, "onnx"), OnnxPredictor)
    with pytest.raises(LungCTError, match="runtime must be one of"):
        predictor(model, "tensorrt")
    import tf2onnx.convert

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(tf2onnx.convert, "from_function", broken)
    assert predictor(model, "auto") is model  # falls back to Keras, with a line on stderr
    with pytest.raises(LungCTError, match="could not be converted to ONNX"):
        predictor(model, "onnx")


def test_candidates_are_the_same_with_either_runtime() -> None:
    import keras

    keras.utils.set_random_seed(0)
    plan = tiny_plan("2d", threshold=0.015, max_candidates=20)  # untrained: outputs ~0.01
    model = plan.build_model()
    scan, _ = phantom_chest()
    keras_run = run_extraction(scan, model, plan)
    onnx_run = run_extraction(scan, predictor(model, "onnx"), plan)
    np.testing.assert_allclose(onnx_run.probability, keras_run.probability, atol=1e-5)
    keras_rows, onnx_rows = keras_run.candidates, onnx_run.candidates
    assert len(keras_rows) == len(onnx_rows) > 5
    a = np.array([r[1:5] for r in keras_rows])
    b = np.array([r[1:5] for r in onnx_rows])
    np.testing.assert_allclose(a, b, atol=1e-3)
