"""Extraction: bad inputs give one clear error; the Python API on scans, caches and arrays."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.io import write_scan
from lungct.scan import Scan
from lungct.testing import seal_hand_made_model
from unet_candidates import extract_candidates, load_unet, run_extraction
from unet_candidates.__main__ import main
from unet_candidates.extract import _predict_flipped
from unet_candidates.testing import phantom_chest, tiny_plan
from unet_candidates.train import compile_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained tiny 3-D model folder (plan.json + model.keras)."""
    out = tmp_path_factory.mktemp("model")
    plan = tiny_plan("3d")
    model = compile_model(plan.build_model(), plan)
    model.save(out / "model.keras")
    plan.save(out / "plan.json")
    seal_hand_made_model(out, "unet")
    return out


def test_model_folder_errors(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(LungCTError, match="model folder does not exist"):
        load_unet(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LungCTError, match=r"no plan\.json"):
        load_unet(empty)
    (empty / "plan.json").write_text((model_dir / "plan.json").read_text())
    with pytest.raises(LungCTError, match=r"no model\.keras") as info:
        load_unet(empty)
    assert "resume" not in str(info.value)
    (empty / "checkpoints").mkdir()
    (empty / "checkpoints" / "epoch_001.keras").write_bytes(b"x")
    with pytest.raises(LungCTError, match="--resume"):
        load_unet(empty)
    (empty / "model.keras").write_bytes(b"not a zip file")
    with pytest.raises(LungCTError, match="no manifest.json"):
        load_unet(empty)
    seal_hand_made_model(empty, "unet")
    with pytest.raises(LungCTError, match="cannot be loaded as a Keras model"):
        load_unet(empty)
    # A plan edited after sealing is refused, and sealing again does not cover it.
    (empty / "model.keras").write_bytes((model_dir / "model.keras").read_bytes())
    tiny_plan("2d").save(empty / "plan.json")
    with pytest.raises(LungCTError, match=r"plan\.json: edited after training"):
        load_unet(empty)
    with pytest.raises(LungCTError, match="not sealing"):
        seal_hand_made_model(empty, "unet")
    # Weights of a 3-D model with a 2-D plan, in a folder sealed that way from the start.
    (empty / "manifest.json").unlink()
    seal_hand_made_model(empty, "unet")
    with pytest.raises(LungCTError, match="does not fit the plan"):
        load_unet(empty)


def test_api_on_scan_array_and_flipped_scan(model_dir: Path) -> None:
    model, plan = load_unet(model_dir)
    scan, _ = phantom_chest(shape_zyx=(30, 64, 72), spacing=(4.0, 4.0, 4.0))
    result = run_extraction(scan, model, plan)
    assert result.probability.shape == result.geometry.shape_zyx
    assert result.source_geometry == scan.geometry
    assert 0.0 <= result.probability.min() and result.probability.max() <= 1.0
    rows = extract_candidates(scan.array, model, plan, geometry=scan.geometry, seriesuid="x")
    assert all(r.seriesuid == "x" for r in rows)
    assert [r[1:4] for r in rows] == [r[1:4] for r in result.candidates]
    # The same chest stored with flipped x/y axes: marks stay at the same world positions.
    flipped_geo = Geometry(
        scan.geometry.size,
        scan.geometry.spacing,
        tuple(np.add(scan.geometry.origin, (284.0, 252.0, 0.0))),
        (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    )
    flipped = Scan(scan.array[:, ::-1, ::-1].copy(), flipped_geo, "flip")
    np.testing.assert_allclose(
        flipped.voxel_to_world((3, 5, 7)), scan.voxel_to_world((3, 58, 64)), atol=1e-6
    )
    a = run_extraction(flipped, model, plan)
    np.testing.assert_allclose(a.probability, result.probability, atol=1e-5)
    # A model folder works in place of (model, plan).
    assert len(extract_candidates(scan, str(model_dir))) == len(result.candidates)


def test_no_lungs_is_a_clear_error(model_dir: Path, tmp_path: Path, capsys) -> None:
    model, plan = load_unet(model_dir)
    solid = Scan(
        np.full((30, 64, 72), 40, np.int16), Geometry((72, 64, 30), (4, 4, 4), (0, 0, 0)), "s"
    )
    with pytest.raises(LungCTError, match="no lungs found"):
        extract_candidates(solid, model, plan)
    path = tmp_path / "solid.mhd"
    write_scan(solid, path)
    code = main(["extract", "--scan", str(path), "--model", str(model_dir),
                 "--out", str(tmp_path / "c.csv"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: ") and "solid.mhd" in err[-1] and "no lungs" in err[-1]
    assert not (tmp_path / "c.csv").exists()


def test_scan_smaller_than_a_window(model_dir: Path) -> None:
    model, plan = load_unet(model_dir)
    scan, _ = phantom_chest(shape_zyx=(12, 64, 72), spacing=(4.0, 4.0, 4.0))  # 48 mm < 64 mm
    with pytest.raises(LungCTError, match="smaller than one window") as info:
        extract_candidates(scan, model, plan)
    assert "[12, 64, 72]" in str(info.value)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--model", "{tmp}/none"], "model folder does not exist"),
        (["--model", "{model}"], "give either --data"),
        (["--model", "{model}", "--data", "{tmp}"], "--data needs --folds"),
        (["--model", "{model}", "--data", "{tmp}/no", "--folds", "9"], "dataset folder does not"),
        (["--model", "{model}", "--data", "{tmp}", "--folds", "12"], "outside 0..9"),
    ],
)
def test_cli_errors_are_one_line(argv, match, model_dir: Path, tmp_path: Path, capsys) -> None:
    argv = [a.format(tmp=tmp_path, model=model_dir) for a in argv]
    if "--scan" not in argv and "give either" not in match and "--data" not in argv:
        argv += ["--scan", str(tmp_path / "x.mhd")]
    code = main(["extract", *argv, "--out", str(tmp_path / "c.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert match in err[0]


def test_every_verb_has_help(capsys) -> None:
    for verb in ("train", "extract"):
        with pytest.raises(SystemExit) as info:
            main([verb, "--help"])
        assert info.value.code == 0
        assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_test_time_flips_make_predictions_mirror_symmetric(dims: str) -> None:
    """Averaged over x, y and xy flips, a mirrored window gives the mirrored prediction."""
    plan = tiny_plan(dims)
    model = plan.build_model()
    shape = (2, 16, 16, 3) if dims == "2d" else (2, 8, 16, 16, 1)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for axis in (-2, -3):  # x, y of the window; the prediction has no channel axis
        plain = _predict_flipped(model, x, 0)
        mirrored = _predict_flipped(model, np.flip(x, axis), 0)
        assert np.abs(np.flip(plain, axis + 1) - mirrored).max() > 1e-4  # not symmetric
        tta = _predict_flipped(model, x, 3)
        mirrored = _predict_flipped(model, np.flip(x, axis), 3)
        np.testing.assert_allclose(np.flip(tta, axis + 1), mirrored, atol=1e-6)
    with pytest.raises(LungCTError, match="test_time_flips"):
        replace(plan, test_time_flips=4).validate()
