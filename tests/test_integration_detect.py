"""End to end: `integration detect` on a small synthetic scan with tiny trained models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fp_reduction_3dcnn.testing import make_tiny_dataset
from fp_reduction_3dcnn.testing import tiny_plan as fpr_tiny_plan
from fp_reduction_3dcnn.train import train as train_fpr
from integration.__main__ import main
from integration.modelset import write_model_set
from integration.pipeline import DETECTION_COLUMNS, PipelineConfig
from lungct.cache import prepare_dataset
from lungct.errors import LungCTError
from lungct.io import read_scan, write_scan
from lungct.preprocess import PreprocessPlan
from unet_candidates.testing import phantom_chest, tiny_plan, write_tiny_luna
from unet_candidates.train import train as train_unet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A models folder: a tiny U-Net and a tiny MGI-CNN, each trained for a few steps."""
    root = tmp_path_factory.mktemp("e2e")
    data = write_tiny_luna(root / "data", scans_per_fold=1, folds=2)
    cache = root / "cache"
    prepare_dataset(
        data, cache, PreprocessPlan(name="test4mm", spacing=(4.0, 4.0, 4.0)), workers=1,
        progress=False,
    )  # fmt: skip
    models = root / "models"
    # A low threshold so the untrained-looking map still yields candidates to score (in the
    # plan trained with: a plan edited after training is refused).
    plan = tiny_plan("2d", threshold=1e-3, max_candidates=20)
    train_unet(plan, data, cache, [0], [1], models / "unet", progress=False)
    tiny = make_tiny_dataset(root / "fpr", n_scans=3)
    fpr_plan = fpr_tiny_plan()
    train_fpr(fpr_plan, tiny["cache"], tiny["candidates"], [0, 1], [2], models / "fpr",
              data_dir=tiny["data"], progress=False)  # fmt: skip
    PipelineConfig(threshold=0.0).save(models)
    write_model_set(models, name="test set", version="0")
    return models


def test_detect_writes_detections_and_report(models: Path, tmp_path: Path, capsys) -> None:
    scan, _ = phantom_chest(nodules_zyx=((20, 40, 70),), seriesuid="9.8.7.6", seed=5)
    scan_path = tmp_path / "9.8.7.6.mhd"
    write_scan(scan, scan_path)
    out = tmp_path / "detect"
    code = main(["detect", "--scan", str(scan_path), "--models", str(models), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    with open(out / "detections.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == DETECTION_COLUMNS
    summary = json.loads((out / "summary.json").read_text())
    assert summary["candidates"] == len(rows) - 1
    assert summary["peak_rss_mb"] > 0 and summary["total_seconds"] > 0
    assert set(summary["seconds"]) >= {"read", "resample + lung mask"}
    html = (out / "report.html").read_text()
    assert "9.8.7.6" in html and "overview.png" in html
    assert (out / "overview.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "view3d.png").exists() and "view3d.png" not in html  # on request only
    back = read_scan(scan_path)
    for row in rows[1:]:
        assert row[0] == "9.8.7.6"
        world = np.asarray([float(v) for v in row[1:4]])
        assert back.geometry.contains(back.world_to_voxel(world), margin=1.0)
        assert 0.0 <= float(row[4]) <= 1.0 and float(row[5]) >= 0.0
    assert len(rows) > 1, "the low U-Net threshold must leave candidates for the MGI-CNN"
    assert any(k == "MGI-CNN scores" for k in summary["seconds"])
    assert (out / "detection_01.png").exists()  # threshold 0: every detection gets crops
    # The set is named, and a training of seconds is flagged as demo-grade everywhere.
    assert summary["model_set"]["name"] == "test set" and summary["model_set"]["demo_grade"]
    assert summary["model_set"]["stages"] == ["unet", "fpr"]
    assert 'class="banner"' in html and "demo-grade training" in html and "test set 0" in html
    err = capsys.readouterr().err
    assert "warning: model set 'test set' is a demo-grade training" in err
    # On a CPU the U-Net runs in ONNX Runtime by default; Keras gives the same detections.
    assert summary["unet_runtime"] == "onnx"
    again = tmp_path / "detect-keras"
    argv = ["detect", "--scan", str(scan_path), "--models", str(models), "--out", str(again)]
    assert main([*argv, "--runtime", "keras", "--no-report"]) == 0
    assert json.loads((again / "summary.json").read_text())["unet_runtime"] == "keras"
    viewed = tmp_path / "detect-3d"
    argv3 = ["detect", "--scan", str(scan_path), "--models", str(models), "--out", str(viewed)]
    assert main([*argv3, "--view-3d"]) == 0
    assert (viewed / "view3d.png").read_bytes()[:4] == b"\x89PNG"
    assert '<img src="view3d.png"' in (viewed / "report.html").read_text()
    with open(again / "detections.csv", newline="") as f:
        keras_rows = list(csv.reader(f))
    assert len(keras_rows) == len(rows)
    np.testing.assert_allclose(
        np.array([[float(v) for v in r[1:5]] for r in keras_rows[1:]]),
        np.array([[float(v) for v in r[1:5]] for r in rows[1:]]),
        atol=1e-3,
    )


def test_detect_errors_are_one_line(models: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "absent.mhd"
    code = main(["detect", "--scan", str(missing), "--models", str(models), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "absent.mhd: no such file" in err[0]
    code = main(
        ["detect", "--scan", str(missing), "--models", str(tmp_path), "--out", str(tmp_path)]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no modelset.json: not a model set" in err[0]


def _detect_refuses(models: Path, tmp_path: Path, capsys, problem: str) -> None:
    """detect stops in one line naming the problem, before writing anything."""
    out = tmp_path / "never_written"
    code = main(["detect", "--scan", "x.mhd", "--models", str(models), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and problem in err[0], err
    assert not out.exists()


def test_broken_model_sets_are_refused(models: Path, tmp_path: Path, capsys) -> None:
    import shutil

    from lungct.modeldir import seal_model_dir

    broken = tmp_path / "set"
    shutil.copytree(models, broken)
    weights = broken / "unet" / "model.keras"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    _detect_refuses(broken, tmp_path, capsys, "model.keras: file changed since the model was")
    weights.write_bytes(original)

    plan_path = broken / "unet" / "plan.json"
    plan_text = plan_path.read_text()
    plan_path.write_text(plan_text.replace('"plan_format": 1', '"plan_format": 2'))
    seal_model_dir(broken / "unet", "unet", 1.0)  # as a newer suite would have sealed it
    _detect_refuses(
        broken,
        tmp_path,
        capsys,
        "plan.json: written by a newer version of the suite (plan format 2",
    )
    plan_path.write_text(plan_text)
    seal_model_dir(broken / "unet", "unet", 1.0)

    manifest = broken / "fpr" / "manifest.json"
    manifest_text = manifest.read_text()
    manifest.unlink()
    _detect_refuses(broken, tmp_path, capsys, "fpr: no manifest.json")
    manifest.write_text(manifest_text)

    set_file = broken / "modelset.json"
    info = json.loads(set_file.read_text())
    set_file.write_text(json.dumps({**info, "format": 2}))
    _detect_refuses(broken, tmp_path, capsys, "newer version of the suite (model set format 2")
    set_file.write_text(json.dumps(info))

    shutil.rmtree(broken / "fpr")
    _detect_refuses(broken, tmp_path, capsys, "lists a fpr/ stage but the folder has none")


def test_detect_without_models_needs_a_shipped_set(tmp_path: Path, monkeypatch, capsys) -> None:
    import integration.pipeline

    monkeypatch.setattr(integration.pipeline, "SHIPPED_MODELS", tmp_path / "shipped_models")
    out = tmp_path / "out"
    code = main(["detect", "--scan", "x.mhd", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no shipped model set in this installation" in err[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"treshold": 0.5}', "unknown plan keys ['treshold']"),
        ('{"threshold": "0.5"}', "threshold must be a number"),
        ('{"threshold": 1.5}', "threshold must be a number"),
        ('{"tta": "yes"}', "tta must be true or false"),
        ('{"batch_size": 0}', "batch_size must be a positive integer"),
        ("[0.5]", "must be a JSON object"),
        ('{"threshold": 0.5', "not valid JSON"),
    ],
)
def test_pipeline_config_errors(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "pipeline.json").write_text(text)
    with pytest.raises(LungCTError, match="pipeline.json") as info:
        PipelineConfig.load(tmp_path)
    assert problem in str(info.value)


def test_pipeline_config_round_trip(tmp_path: Path) -> None:
    assert PipelineConfig.load(tmp_path) == PipelineConfig()  # absent: the defaults
    PipelineConfig(threshold=0.25, tta=True, batch_size=8).save(tmp_path)
    assert PipelineConfig.load(tmp_path) == PipelineConfig(0.25, True, 8)


@pytest.mark.parametrize("flip_x", [False, True])
def test_overview_projects_only_the_lungs_on_any_grid(flip_x: bool) -> None:
    """The 1 mm lung mask limits the overview on a scan of another spacing and direction."""
    from integration.pipeline import to_cache_grid
    from integration.report import inner_lung, lung_on_grid, overview_volume
    from lungct.geometry import Geometry
    from lungct.scan import Scan
    from lungct.show import world_aligned
    from lungct.testing import chest_phantom_hu

    direction = (-1, 0, 0, 0, 1, 0, 0, 0, 1) if flip_x else (1, 0, 0, 0, 1, 0, 0, 0, 1)
    geometry = Geometry((96, 96, 30), (1.6, 1.6, 2.5), (-80.0, -80.0, -40.0), direction)
    scan = Scan(np.rint(chest_phantom_hu((30, 96, 96))).astype(np.int16), geometry, "s")
    cached = to_cache_grid(scan)
    assert cached.geometry != scan.geometry  # the mask is on another grid
    shown = world_aligned(scan)
    lung = lung_on_grid(cached.lung, cached.geometry, shown)
    assert lung.shape == shown.array.shape
    soft = shown.array > -500  # the body's soft tissue (40 HU)
    assert (overview_volume(shown, None) > -500).sum() == soft.sum()
    masked = overview_volume(shown, lung_on_grid(inner_lung(cached.lung, cached.geometry),
                                                 cached.geometry, shown))  # fmt: skip
    assert (masked > -500).sum() < 0.05 * soft.sum()  # a rim at the lungs' edge at most
    lungs = (shown.array < -800) & (shown.array > -900)
    assert ((masked < -800) & (masked > -900)).sum() > 0.8 * lungs.sum()
    with pytest.raises(ValueError, match="does not fit its grid"):
        lung_on_grid(cached.lung[:-1], cached.geometry, shown)
