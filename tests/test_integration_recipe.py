"""`integration train-models` and `evaluate-models` on a tiny recipe: the set, its seals,
resuming, refusals, and detect with the trained set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from integration.__main__ import main
from integration.modelset import read_model_set
from integration.recipe import Recipe
from integration.testing import tiny_settings
from lungct.errors import LungCTError
from lungct.modeldir import verify_model_dir
from unet_candidates.runtime import int8_problem

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def tiny_recipe(**changes) -> dict:
    recipe = {
        "name": "tiny",
        "version": "0.1",
        "description": "a test recipe",
        "data": {"scans": 4, "seed": 0, "size": "small"},
        "split": {"train": [0, 1], "val": [2], "test": [3]},
        "preprocess": {"name": "test2mm", "spacing": [2.0, 2.0, 2.0]},
        "settings": tiny_settings(quantize=True, hard_negatives=True),
        "bootstrap": 10,
        "workers": 1,
        "report_fps_per_scan": 1.0,
    }
    recipe.update(changes)
    return recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipe")
    recipe = root / "tiny.json"
    recipe.write_text(json.dumps(tiny_recipe()))
    out = root / "run"
    assert main(["train-models", "--recipe", str(recipe), "--out", str(out), "--quiet"]) == 0
    return {"root": root, "recipe": recipe, "out": out}


def test_train_models_writes_a_sealed_model_set(trained: dict[str, Path], capsys) -> None:
    models = trained["out"] / "models"
    model_set = read_model_set(models)
    assert model_set.name == "tiny" and model_set.version == "0.1"
    assert model_set.stages == ["unet", "fpr"] and model_set.demo_grade
    for stage in ("unet", "fpr", "gan"):
        manifest = verify_model_dir(models / stage)
        assert manifest["provenance"]["data"]["kind"] == "synthetic"
        assert manifest["provenance"]["data"]["scans"] == 4
    card = (models / "MODEL_CARD.md").read_text()
    assert "Not a medical device" in card and "Demo-grade training" in card
    assert "Held-out subset [3]" in card
    summary = json.loads((trained["out"] / "train_models.json").read_text())
    assert set(summary["seconds"]) >= {
        "synth", "prepare", "train U-Net", "quantize U-Net", "train MGI-CNN"
    }  # fmt: skip
    record = json.loads((models / "unet" / "model.int8.json").read_text())
    assert len(record["calibration"]["series"]) == 1  # the validation subset's scan
    assert int8_problem(models / "unet") is None
    assert summary["heldout"]["nodules"] >= 0
    # The MGI-CNN also trained on the U-Net's own candidates of the training and validation
    # folds, labelled (the hard negatives).
    assert "extract training candidates" in summary["seconds"]
    mined = (trained["out"] / "heldout" / "candidates_hard_negatives.csv").read_text().splitlines()
    assert mined[0] == "seriesuid,coordX,coordY,coordZ,class" and len(mined) > 1
    merged = (trained["out"] / "heldout" / "candidates_train.csv").read_text().splitlines()
    assert set(mined[1:]) <= set(merged[1:])
    # The report threshold was chosen on the validation scan, never below 0.5.
    chosen = summary["report_threshold"]
    assert chosen["scans"] == 1 and chosen["folds"] == [2] and chosen["threshold"] >= 0.5
    assert chosen["false_positives_per_scan"] <= 1.0
    pipeline = json.loads((models / "pipeline.json").read_text())
    assert pipeline["threshold"] == chosen["threshold"]
    card = (models / "MODEL_CARD.md").read_text()
    assert f"Report threshold {chosen['threshold']:.3f}" in card
    assert "chosen on the validation subsets [2]" in card

    # Rerunning resumes: nothing is trained again, the sealed weights stay as they were.
    stamp = (models / "unet" / "model.keras").stat().st_mtime_ns
    argv = ["train-models", "--recipe", str(trained["recipe"]), "--out", str(trained["out"])]
    assert main([*argv, "--quiet"]) == 0
    assert (models / "unet" / "model.keras").stat().st_mtime_ns == stamp
    again = json.loads((trained["out"] / "train_models.json").read_text())
    assert "train U-Net" not in again["seconds"] and len(again["runs"]) == 2
    assert "quantize U-Net" not in again["seconds"]
    capsys.readouterr()

    # Another recipe into the same folder is refused in one line.
    other = trained["root"] / "other.json"
    other.write_text(json.dumps(tiny_recipe(version="0.2")))
    code = main(["train-models", "--recipe", str(other), "--out", str(trained["out"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "started with another recipe" in err[0]


def test_evaluate_models_on_fresh_data_and_detect(trained: dict[str, Path], tmp_path, capsys):
    from lungct.synth import generate_dataset

    fresh = tmp_path / "fresh"
    generate_dataset(fresh, 2, 77, "small", progress=False, workers=1)
    out = tmp_path / "eval"
    code = main([
        "evaluate-models", "--models", str(trained["out"] / "models"), "--data", str(fresh),
        "--cache", str(tmp_path / "cache"), "--out", str(out), "--bootstrap", "10",
        "--workers", "1", "--quiet",
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["scans"] == 2 and "cpm_ci95" in metrics
    by_size = json.loads((out / "evaluation" / "by_size.json").read_text())
    assert sum(row["nodules"] for row in by_size.values()) == metrics["nodules"]
    assert (out / "submission.csv").is_file()

    # The training data itself is refused: the set has seen it.
    code = main([
        "evaluate-models", "--models", str(trained["out"] / "models"),
        "--data", str(trained["out"] / "data"), "--cache", str(trained["out"] / "cache"),
        "--out", str(tmp_path / "eval2"), "--quiet",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "were in the model set's training data" in err[0]

    scan = sorted((fresh / "subset0").glob("*.mhd"))[0]
    report = tmp_path / "detect"
    code = main([
        "detect", "--scan", str(scan), "--models", str(trained["out"] / "models"),
        "--out", str(report),
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    summary = json.loads((report / "summary.json").read_text())
    assert summary["model_set"]["name"] == "tiny" and summary["unet_runtime"] == "int8"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"surprise": 1}, "unknown recipe keys ['surprise']"),
        ({"data": {"scans": 0, "seed": 0}}, "data.scans must be a positive integer"),
        ({"data": {"scans": 2, "size": "huge"}}, "data.size must be one of"),
        ({"split": {"train": [0], "val": [0], "test": [1]}}, "both training and validation"),
        ({"settings": {"unet_minutes": -1}}, "'unet_minutes' must be > 0"),
        ({"preprocess": {"spacing": [1, 1]}}, "spacing must be 3 positive numbers"),
        ({"workers": 0}, "workers must be a positive integer"),
        ({"background": {"scans": 0, "seed": 1}}, "background.scans must be a positive integer"),
        ({"background": {"scans": 2}}, "recipe background must be {scans, seed} or null"),
        ({"report_fps_per_scan": 0}, "report_fps_per_scan must be a number > 0"),
        ({"malignancy": {"scans": 2, "seed": 1}}, "needs the background part's real scan"),
        ({"malignancy": {"scans": 2}}, "recipe malignancy must be {scans, seed,"),
    ],
)
def test_bad_recipes_are_refused(change: dict, problem: str) -> None:
    with pytest.raises(LungCTError) as info:
        Recipe.from_dict(tiny_recipe(**change), source="r.json")
    assert problem in str(info.value)


def test_shipped_recipes_load(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "suite-default").mkdir()  # an output folder of that name is not the recipe
    recipe = Recipe.load("suite-default")
    assert recipe.data["size"] == "full" and recipe.stage_settings().gan
    with pytest.raises(LungCTError, match="no recipe named 'nope'"):
        Recipe.load("nope")


def test_report_threshold_allows_the_asked_false_positives() -> None:
    from integration.recipe import report_threshold

    scores = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.3])
    labels = np.array([1, 0, 0, 1, 0, 0, 0])
    # 2 scans at 1 per scan: 2 false positives may stay (0.95, 0.9), the third (0.7) may not.
    t = report_threshold(scores, labels, n_scans=2, fps_per_scan=1.0)
    assert 0.7 < t < 0.7001 and ((scores >= t) & (labels == 0)).sum() == 2
    # Never below the floor, even where few false positives are left.
    assert report_threshold(scores, labels, n_scans=10, fps_per_scan=1.0) == 0.5
    assert report_threshold(scores, labels, n_scans=4, fps_per_scan=0.5, floor=0.1) > 0.7


def test_sensitivity_by_size_reads_the_froc_operating_points() -> None:
    from types import SimpleNamespace

    import numpy as np

    from integration.recipe import sensitivity_by_size

    table = SimpleNamespace(
        diameter_mm=np.array([4.0, 5.0, 8.0, 12.0]),
        detected=np.array([True, False, True, False]),
        probability=np.array([0.9, np.nan, 0.4, np.nan]),
    )
    result = SimpleNamespace(
        nodule_table=table,
        froc_fps=np.array([0.0, 1.0, 5.0]),
        froc_thresholds=np.array([np.inf, 0.8, 0.3]),
    )
    bands = sensitivity_by_size(result)
    assert list(bands) == ["0-6 mm", "6-10 mm", ">= 10 mm"]
    assert bands["0-6 mm"]["nodules"] == 2 and bands["0-6 mm"]["any"] == 0.5
    assert bands["0-6 mm"]["0.5"] == 0.0  # only the infinite threshold stays under 0.5 FP
    assert bands["0-6 mm"]["1"] == 0.5 and bands["6-10 mm"]["1"] == 0.0
    assert bands["6-10 mm"]["8"] == 1.0 and bands[">= 10 mm"]["8"] == 0.0


def test_modelset_command_describes_hand_trained_stages(trained: dict[str, Path], tmp_path, capsys):
    import shutil

    models = tmp_path / "models"
    for stage in ("unet", "fpr"):
        shutil.copytree(trained["out"] / "models" / stage, models / stage)
    perf = tmp_path / "perf.md"
    perf.write_text("| set | CPM |\n|---|---|\n| fresh | 0.123 |\n")
    code = main([
        "modelset", "--models", str(models), "--name", "mine", "--version", "2",
        "--performance", str(perf),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "mine: stages unet, fpr" in out and "demo-grade" in out
    card = (models / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: mine 2") and "| fresh | 0.123 |" in card
    assert json.loads((models / "modelset.json").read_text())["stages"] == ["unet", "fpr"]

    code = main(["modelset", "--models", str(models), "--name", "x", "--performance", "nope.md"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.md: cannot be read" in err[0]
    shutil.rmtree(models / "unet")
    code = main(["modelset", "--models", str(models), "--name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "a model set needs at least the U-Net" in err[0]


def test_a_background_part_joins_the_training_folds(tmp_path: Path, capsys) -> None:
    """The recipe's background copies are merged into the training folds, seals say so."""
    from lungct.io import write_scan
    from unet_candidates.testing import phantom_chest

    scan, _ = phantom_chest(
        shape_zyx=(40, 96, 112), nodules_zyx=(), spacing=(2.5, 2.5, 2.5), seriesuid="5.5.5"
    )
    background = tmp_path / "5.5.5.mhd"
    write_scan(scan, background)
    recipe = tmp_path / "bg.json"
    malignancy = {
        "scans": 10,
        "seed": 4,
        "nodules_per_scan": 6,
        "minutes": 2,
        "plan": {"epochs": 1, "patch_mm": 16, "block_filters": [4, 8], "batch_size": 8},
    }
    part = {"background": {"scans": 2, "seed": 9}, "malignancy": malignancy}
    recipe.write_text(json.dumps(tiny_recipe(**part)))
    out = tmp_path / "run"
    argv = ["train-models", "--recipe", str(recipe), "--out", str(out), "--quiet"]
    assert main(argv) == 2
    assert "give its real scan" in capsys.readouterr().err
    code = main([*argv, "--background", str(background), "--background-has-no-findings"])
    assert code == 0, capsys.readouterr().err
    data = out / "data"
    sources = json.loads((data / "sources.json").read_text())
    assert [p["folder"] for p in sources["parts"]] == ["synthetic", "background"]
    bg_uids = (out / "parts" / "background" / "seriesuids.csv").read_text().split()
    bg_folders = {p.parent.name for p in data.glob("subset*/*.mhd") if p.stem in bg_uids}
    assert bg_folders == {"subset0", "subset1"}  # the recipe's training folds only
    all_uids = (data / "seriesuids.csv").read_text().split()
    assert len(all_uids) == 6 and set(bg_uids) <= set(all_uids)
    unet = verify_model_dir(out / "models" / "unet")
    parts = unet["provenance"]["data"]["parts"]
    assert parts[1]["background"] == "5.5.5.mhd" and parts[1]["size"] == "real background"
    assert "copies of the real scan 5.5.5.mhd" in (out / "models" / "MODEL_CARD.md").read_text()
    # The malignancy part: its own rated copies of the background, its CNN in the set.
    assert (out / "parts" / "malignancy" / "nodule_attributes.csv").is_file()
    verify_model_dir(out / "models" / "malignancy")
    assert json.loads((out / "models" / "malignancy" / "plan.json").read_text())["epochs"] == 1
    assert read_model_set(out / "models").stages == ["unet", "fpr", "malignancy"]
    summary = json.loads((out / "train_models.json").read_text())
    assert "train malignancy CNN" in summary["seconds"]
