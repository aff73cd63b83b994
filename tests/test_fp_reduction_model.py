"""MGI-CNN model, stream merge layer and plan: build, serialise, train one step."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from fp_reduction_3dcnn.config import PLANS, FPRPlan, get_plan
from fp_reduction_3dcnn.model import GRADCAM_LAYER, MGICNN, compile_model
from fp_reduction_3dcnn.stream_integration import StreamIntegration
from lungct.errors import LungCTError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY = {
    "stream_filters": (4, 4, 4),
    "stream_top_filters": 4,
    "head_filters": 4,
    "dense_units": (8,),
}


def _inputs(n: int = 2, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((n, 20, 20, 6), dtype=np.float32) for _ in range(3)]


def _predict(model: keras.Model, x: list[np.ndarray]) -> np.ndarray:
    # An eager call: no graph tracing, so the many tiny models here stay fast.
    return keras.ops.convert_to_numpy(model(x, training=False))


def _round_trip(model: keras.Model, tmp_path, name: str) -> None:
    x = _inputs()
    before = _predict(model, x)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, MGICNN)
    assert loaded.get_config() == model.get_config()
    np.testing.assert_allclose(_predict(loaded, x), before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv", ["2.5d", "3d"])
@pytest.mark.parametrize("variant", ["mgi", "zoom_in", "zoom_out", "ri", "lr"])
def test_every_variant_builds_and_round_trips(variant, conv, tmp_path):
    model = MGICNN(variant=variant, conv=conv, **TINY)
    assert model.get_layer(GRADCAM_LAYER) is not None
    out = _predict(model, _inputs())
    assert out.shape == (2, 1)
    assert np.all((out >= 0) & (out <= 1))
    _round_trip(model, tmp_path, f"{variant}_{conv}")


@pytest.mark.parametrize("merge", ["concat", "conv1x1"])
def test_merge_modes_round_trip(merge, tmp_path):
    model = MGICNN(variant="mgi", merge=merge, **TINY)
    layer = model.get_layer("merge")
    assert isinstance(layer, StreamIntegration) and layer.mode == merge
    _round_trip(model, tmp_path, merge)


def test_streams_differ_in_scale_order():
    zoom_in = MGICNN(variant="zoom_in", **TINY)
    first_concat = zoom_in.get_layer("zoom_in_add_scale2")
    # zoom-in: the wide scale starts the stream, the narrower ones join later.
    assert first_concat.input[0].name.startswith("scale_2")
    zoom_out = MGICNN(variant="zoom_out", **TINY)
    assert zoom_out.get_layer("zoom_out_add_scale3").input[0].name.startswith("scale_1")


def test_one_training_step_changes_weights():
    plan = get_plan("default").replace(**TINY)
    model = compile_model(MGICNN.from_plan(plan), plan)
    x = _inputs(8)
    y = np.array([[1], [0]] * 4, dtype="float32")
    before = [w.copy() for w in model.get_weights()]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    changed = [not np.allclose(a, b) for a, b in zip(before, model.get_weights(), strict=True)]
    assert any(changed)


def test_paper_widths_parameter_count():
    # The published widths: 21.45 M parameters as in the authors' code (paper text: 9,472,000).
    model = MGICNN.from_plan(PLANS["paper"])
    assert model.count_params() == 21_451_777


def test_stream_merge_layer():
    a = np.ones((2, 5, 5, 3), "float32")
    b = 2 * np.ones((2, 5, 5, 3), "float32")
    np.testing.assert_allclose(StreamIntegration("sum")([a, b]), 3 * a)
    assert tuple(StreamIntegration("concat")([a, b]).shape) == (2, 5, 5, 6)
    conv = StreamIntegration("conv1x1", filters=7)
    assert tuple(conv([a, b]).shape) == (2, 5, 5, 7)
    again = StreamIntegration.from_config(conv.get_config())
    assert again.mode == "conv1x1" and again.filters == 7
    with pytest.raises(ValueError):
        StreamIntegration("average")
    with pytest.raises(ValueError):
        StreamIntegration("sum")([a, np.ones((2, 5, 5, 4), "float32")])


def test_plan_json_round_trip_and_errors(tmp_path):
    plan = get_plan("code", variant="ri", conv="3d")
    path = tmp_path / "plan.json"
    plan.save(path)
    assert FPRPlan.load(path) == plan
    assert get_plan(str(path)) == plan
    assert plan.optimizer == "adam" and plan.beta_1 == 0.5 and plan.resize == "cubic"
    data = json.loads(path.read_text())
    data["varient"] = "mgi"
    path.write_text(json.dumps(data))
    with pytest.raises(LungCTError, match="unknown plan keys"):
        FPRPlan.load(path)
    with pytest.raises(LungCTError, match="variant must be one of"):
        get_plan("default", variant="deep")
    with pytest.raises(LungCTError, match="unknown plan"):
        get_plan("nonexistent")
    default = PLANS["default"]
    assert (default.optimizer, default.learning_rate, default.momentum) == ("sgd", 0.003, 0.9)
    assert default.batch_size == 128 and default.lr_decay_per_epoch == 0.025
    assert default.positives_per_batch == 18  # 128 / (1 + 6)
    fast = PLANS["default_adam"]
    assert (fast.optimizer, fast.learning_rate, fast.beta_1) == ("adam", 0.003, 0.5)
    assert fast.replace(optimizer="sgd", name="default") == default


def test_a_plan_of_an_earlier_version_says_integration_for_merge(tmp_path):
    # Plans written before the rename (the shipped set's among them) keep loading as they are.
    path = tmp_path / "plan.json"
    data = get_plan("default").to_dict()
    del data["merge"]
    path.write_text(json.dumps({**data, "integration": "concat"}))
    plan = FPRPlan.load(path)
    assert plan.merge == "concat" and "integration" not in plan.to_dict()
    assert get_plan(str(path)) == plan == get_plan("default", merge="concat")
    assert get_plan("default").replace(integration="conv1x1").merge == "conv1x1"
    path.write_text(json.dumps({**data, "integration": "concat", "merge": "concat"}))
    assert FPRPlan.load(path) == plan  # both names, one value: the same plan
    path.write_text(json.dumps({**data, "integration": "concat", "merge": "sum"}))
    with pytest.raises(LungCTError, match="both merge 'sum' and integration 'concat'") as exc:
        FPRPlan.load(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(str(path))


def test_a_model_file_of_an_earlier_version_says_integration_for_merge(tmp_path):
    # A .keras file saved before the rename: its config says "integration". It loads, passes
    # the architecture check against a plan saying "merge", and gives the same outputs.
    import zipfile

    from fp_reduction_3dcnn.train import load_keras

    plan = get_plan("default", merge="conv1x1", **TINY)
    model = MGICNN.from_plan(plan)
    new, old = tmp_path / "new.keras", tmp_path / "old.keras"
    model.save(new)
    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, "w") as dst:
        for item in src.infolist():
            content = src.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(content)
                config["config"]["integration"] = config["config"].pop("merge")
                content = json.dumps(config).encode()
            dst.writestr(item, content)
    loaded = load_keras(old, compile=False, plan=plan)
    assert loaded.merge == "conv1x1" and loaded.get_config() == model.get_config()
    x = _inputs()
    np.testing.assert_allclose(_predict(loaded, x), _predict(model, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(LungCTError, match=r"merge \"conv1x1\" \(plan \"sum\"\)"):
        load_keras(old, compile=False, plan=plan.replace(merge="sum"))
