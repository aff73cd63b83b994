"""The 8-bit copy of a 2-D U-Net: written with its record, used on a CPU, refused when stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lungct.errors import LungCTError
from lungct.io import write_scan
from lungct.testing import seal_hand_made_model
from unet_candidates import load_unet, run_extraction
from unet_candidates.__main__ import main
from unet_candidates.runtime import (
    INT8_FILE,
    INT8_RECORD,
    OnnxPredictor,
    int8_problem,
    predictor,
    runtime_of,
)
from unet_candidates.testing import phantom_chest, tiny_plan
from unet_candidates.train import compile_model

pytest.importorskip("onnxruntime")
pytest.importorskip("tf2onnx")


def _model_folder(out: Path, dims: str = "2d", seed: int = 0) -> Path:
    import keras

    keras.utils.set_random_seed(seed)
    plan = tiny_plan(dims)
    model = compile_model(plan.build_model(), plan)
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.keras")
    plan.save(out / "plan.json")
    seal_hand_made_model(out, "unet")
    return out


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> tuple[Path, list[Path]]:
    """A tiny 2-D U-Net folder quantized on two phantom chests, through the command line."""
    root = tmp_path_factory.mktemp("quantize")
    folder = _model_folder(root / "unet")
    scans = []
    for i in range(2):
        scan, _ = phantom_chest(seriesuid=f"1.2.3.{i}", seed=i)
        scans.append(root / f"1.2.3.{i}.mhd")
        write_scan(scan, scans[-1])
    argv = ["quantize", "--model", str(folder), "--batches", "6"]
    for s in scans:
        argv += ["--scan", str(s)]
    assert main(argv) == 0
    return folder, scans


def test_quantize_writes_the_copy_and_its_record(quantized, capsys) -> None:
    folder, _ = quantized
    record = json.loads((folder / INT8_RECORD).read_text())
    assert record["calibration"]["series"] == ["1.2.3.0", "1.2.3.1"]
    assert 1 <= record["calibration"]["batches"] <= 6
    assert record["calibration"]["max_abs_probability_difference"] < 0.05
    assert int8_problem(folder) is None
    model, _ = load_unet(folder)
    chosen = predictor(model, "auto", model_dir=folder)
    assert isinstance(chosen, OnnxPredictor) and runtime_of(chosen) == "int8"
    assert runtime_of(predictor(model, "onnx", model_dir=folder)) == "onnx"
    assert runtime_of(predictor(model, "auto")) == "onnx"  # no folder: float32


def test_the_copy_follows_the_float_network(quantized) -> None:
    folder, _ = quantized
    model, plan = load_unet(folder)
    scan, _ = phantom_chest(seriesuid="held-out", seed=7)
    full = run_extraction(scan, predictor(model, "onnx"), plan).probability
    small = run_extraction(scan, predictor(model, "int8", model_dir=folder), plan).probability
    lungs = full > 0
    assert lungs.sum() > 1000
    assert np.abs(small - full)[lungs].max() < 0.05
    # The 8-bit map ranks the voxels as the float one does.
    assert np.corrcoef(small[lungs], full[lungs])[0, 1] > 0.9


def test_a_stale_or_changed_copy_is_not_used(quantized, tmp_path: Path, capsys) -> None:
    folder, scans = quantized
    # Weights trained again: the record names the old model.keras.
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    retrained = _model_folder(tmp_path / "retrained", seed=1)
    shutil.copy(retrained / "model.keras", other / "model.keras")
    seal_hand_made_model(other, "unet")
    assert "another model.keras" in int8_problem(other)
    model, _ = load_unet(other)
    capsys.readouterr()
    assert runtime_of(predictor(model, "auto", model_dir=other)) == "onnx"
    assert "predicting in float32" in capsys.readouterr().err
    with pytest.raises(LungCTError, match="another model.keras") as err:
        predictor(model, "int8", model_dir=other)
    assert str(other / INT8_FILE) in str(err.value)
    # The copy edited after it was written.
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    data = bytearray((edited / INT8_FILE).read_bytes())
    data[-1] ^= 0xFF
    (edited / INT8_FILE).write_bytes(bytes(data))
    assert "sha256 mismatch" in int8_problem(edited)
    # Half a pair, and no pair at all.
    (edited / INT8_RECORD).unlink()
    assert "come together" in int8_problem(edited)
    (edited / INT8_FILE).unlink()
    assert "no model.int8.onnx" in int8_problem(edited)
    # The command line says it in one line, exit 2.
    code = main(
        ["extract", "--model", str(edited), "--scan", str(scans[0]), "--out",
         str(tmp_path / "c.csv"), "--runtime", "int8", "--quiet"]
    )  # fmt: skip
    assert code == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert err_lines[-1].startswith("error:") and "no model.int8.onnx" in err_lines[-1]


def test_quantize_refuses_what_it_cannot_do(tmp_path: Path, capsys) -> None:
    three_d = _model_folder(tmp_path / "unet3d", dims="3d")
    scan, _ = phantom_chest()
    write_scan(scan, tmp_path / "s.mhd")
    cases = [
        (["--model", str(three_d), "--scan", str(tmp_path / "s.mhd")], "only a 2-D U-Net"),
        (["--model", str(three_d)], "give either --data DIR --folds F or --scan PATH"),
        (["--model", str(three_d), "--data", str(tmp_path)], "--data needs --folds"),
    ]
    for argv, message in cases:
        assert main(["quantize", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (three_d / INT8_FILE).exists()
