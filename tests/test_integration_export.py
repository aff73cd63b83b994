"""`integration export`: SavedModel (and ONNX) of a models folder give the Keras models' outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fp_reduction_3dcnn.config import get_plan
from fp_reduction_3dcnn.malignancy import MalignancyPlan, build_network
from fp_reduction_3dcnn.model import MGICNN
from integration.__main__ import main
from integration.pipeline import PipelineConfig
from lungct.testing import seal_hand_made_model
from unet_candidates.testing import tiny_plan

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY_FPR = {
    "stream_filters": (4, 4, 4),
    "stream_top_filters": 4,
    "head_filters": 4,
    "dense_units": (8,),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder with a tiny 2-D U-Net and a tiny MGI-CNN (conv1x1), random weights."""
    import keras

    root = tmp_path_factory.mktemp("export") / "models"
    keras.utils.set_random_seed(0)
    plan = tiny_plan("2d")
    (root / "unet").mkdir(parents=True)
    plan.save(root / "unet" / "plan.json")
    plan.build_model().save(root / "unet" / "model.keras")
    fpr_plan = get_plan("default", merge="conv1x1", **TINY_FPR)
    (root / "fpr").mkdir()
    fpr_plan.save(root / "fpr" / "plan.json")
    MGICNN.from_plan(fpr_plan).save(root / "fpr" / "model.keras")
    seal_hand_made_model(root / "unet", "unet")
    seal_hand_made_model(root / "fpr", "fpr")
    malignancy = MalignancyPlan(patch_mm=16, block_filters=(4, 8), dense_units=8)
    (root / "malignancy").mkdir()
    malignancy.save(root / "malignancy" / "plan.json")
    build_network(malignancy).save(root / "malignancy" / "model.keras")
    seal_hand_made_model(root / "malignancy", "malignancy")
    PipelineConfig(threshold=0.3).save(root)
    return root


def _keras_models(models: Path):
    from integration.export import load_fpr_model
    from unet_candidates.extract import load_unet

    unet, _ = load_unet(models / "unet")
    fpr, _ = load_fpr_model(models / "fpr")
    return unet, fpr


def _inputs(seed: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    slab = rng.random((2, 48, 32, 3), dtype=np.float32)  # any multiple of 2**levels
    patches = [rng.random((3, 20, 20, 6), dtype=np.float32) for _ in range(3)]
    return slab, patches


def test_saved_model_matches_keras(models: Path, tmp_path: Path, capsys) -> None:
    import tensorflow as tf

    out = tmp_path / "exported"
    assert main(["export", "--models", str(models), "--out", str(out)]) == 0
    assert "export_manifest.json" in capsys.readouterr().out
    unet, fpr = _keras_models(models)
    slab, patches = _inputs()

    served_unet = tf.saved_model.load(str(out / "unet" / "saved_model"))
    got = np.asarray(served_unet.serve(tf.constant(slab)))
    want = np.asarray(unet.predict(slab, verbose=0))
    assert got.shape == want.shape == (2, 48, 32, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)

    served_fpr = tf.saved_model.load(str(out / "fpr" / "saved_model"))
    got = np.asarray(served_fpr.serve([tf.constant(p) for p in patches]))
    want = np.asarray(fpr.predict(patches, verbose=0))
    assert got.shape == want.shape == (3, 1)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(want, want[0]), "different inputs must give different scores"

    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["format"] == "saved_model"
    assert manifest["models"]["unet"]["path"] == "unet/saved_model"
    assert [i["name"] for i in manifest["models"]["fpr"]["keras_inputs"]] == [
        "scale_1", "scale_2", "scale_3",
    ]  # fmt: skip
    assert manifest["models"]["fpr"]["keras_inputs"][0]["shape"] == [None, 20, 20, 6]
    assert manifest["models"]["unet"]["keras_inputs"][0]["shape"] == [None, None, None, 3]
    assert len(manifest["models"]["fpr"]["inputs"]) == 3  # the serving signature's inputs
    for name in ("unet/plan.json", "fpr/plan.json", "pipeline.json"):
        assert (out / name).read_text() == (models / name).read_text()

    # The malignancy CNN: both heads, as Keras gives them.
    from fp_reduction_3dcnn.malignancy import open_malignancy_model

    cubes = np.random.default_rng(3).random((2, 16, 16, 16), dtype=np.float32)
    loaded = tf.saved_model.load(str(out / "malignancy" / "saved_model"))
    served = loaded.serve(cubes)
    want = open_malignancy_model(models / "malignancy").model.predict(cubes, verbose=0)
    for head in ("malignancy", "rating"):
        np.testing.assert_allclose(np.asarray(served[head]), want[head], atol=1e-5)
    assert (out / "malignancy" / "plan.json").read_text() == (
        models / "malignancy" / "plan.json"
    ).read_text()

    # A second export into the same folder replaces the first one.
    assert main(["export", "--models", str(models), "--out", str(out)]) == 0
    assert not list(out.rglob(".partial-*"))


def test_onnx_matches_keras(models: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    out = tmp_path / "onnx"
    assert main(["export", "--models", str(models), "--out", str(out), "--format", "onnx"]) == 0
    unet, fpr = _keras_models(models)
    slab, patches = _inputs(2)
    runner = ort.InferenceSession(str(out / "unet" / "model.onnx"))
    (got,) = runner.run(None, {runner.get_inputs()[0].name: slab})
    np.testing.assert_allclose(got, unet.predict(slab, verbose=0), atol=1e-5)
    runner = ort.InferenceSession(str(out / "fpr" / "model.onnx"))
    feed = {i.name: p for i, p in zip(runner.get_inputs(), patches, strict=True)}
    assert sorted(feed) == ["scale_1", "scale_2", "scale_3"]
    (got,) = runner.run(None, feed)
    np.testing.assert_allclose(got, fpr.predict(patches, verbose=0), atol=1e-5)
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["models"]["fpr"]["inputs"][0]["shape"][1:] == [20, 20, 6]
    assert manifest["versions"]["tf2onnx"] != "not installed"


def test_export_errors_are_one_line(models: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import integration.export as export

    monkeypatch.setattr(export, "missing_onnx_packages", lambda: ["tf2onnx"])
    code = main(
        ["export", "--models", str(models), "--out", str(tmp_path / "o"), "--format", "onnx"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "needs the package tf2onnx" in err[0] and "pip install" in err[0]
    code = main(["export", "--models", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "models folder does not exist" in err[0]
    (tmp_path / "empty").mkdir()
    code = main(["export", "--models", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "has no unet/ model folder" in err[0]
