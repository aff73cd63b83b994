"""The malignancy stage: labels, statistics, the patient score, training and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fp_reduction_3dcnn.malignancy import (
    MalignancyPlan,
    RatedNodules,
    ShapeBaseline,
    auc,
    bootstrap_aucs,
    calibration_bins,
    patient_score,
    rating_from_target,
    rating_target,
)
from lungct.errors import LungCTError


def _nodules(malignancy, diameter=None, sphericity=None, spiculation=None) -> RatedNodules:
    m = np.asarray(malignancy, dtype=np.float64)
    n = len(m)
    return RatedNodules(
        uids=[f"s{i % 3}" for i in range(n)],
        coords=np.zeros((n, 3)),
        diameter_mm=np.full(n, 8.0) if diameter is None else np.asarray(diameter, float),
        malignancy=m,
        sphericity=np.full(n, 3.0) if sphericity is None else np.asarray(sphericity, float),
        spiculation=np.full(n, 1.0) if spiculation is None else np.asarray(spiculation, float),
        folds=np.arange(n) % 10,
    )


def test_labels_leave_the_indeterminate_rating_out() -> None:
    labels = _nodules([1, 2, 2.5, 3, 3.5, 4, 5]).labels
    assert labels.tolist() == [0, 0, -1, -1, -1, 1, 1]


def test_rating_target_round_trips_and_clips() -> None:
    r = np.array([1.0, 2.5, 3.0, 5.0])
    np.testing.assert_allclose(rating_from_target(rating_target(r).ravel()), r)
    assert rating_from_target(np.array([9.0]))[0] == 5.0


def test_auc_by_hand() -> None:
    # Pairs (malignant, benign): (0.9, 0.1) (0.9, 0.5) (0.4, 0.1) (0.4, 0.5) -> 3 of 4 right.
    assert auc([1, 1, 0, 0], [0.9, 0.4, 0.1, 0.5]) == pytest.approx(0.75)
    assert auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)  # a tie counts one half
    assert np.isnan(auc([1, 1], [0.2, 0.3]))


def test_paired_bootstrap_scores_both_on_the_same_draw() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    a = y + rng.normal(0, 0.8, 200)
    boot = bootstrap_aucs(y, [a, a], rounds=50, seed=3)
    assert boot.shape == (50, 2)
    np.testing.assert_array_equal(boot[:, 0], boot[:, 1])  # same draws, same scorer
    lo, hi = np.percentile(boot[:, 0], [2.5, 97.5])
    assert lo < auc(y, a) < hi


def test_calibration_bins_count_every_nodule() -> None:
    pts = calibration_bins(np.array([0, 1, 1, 0]), np.array([0.05, 0.95, 0.91, 0.5]))
    assert sum(n for _, _, n in pts) == 4
    assert pts[-1] == (pytest.approx(0.93), 1.0, 2)


def test_shape_baseline_learns_size() -> None:
    rng = np.random.default_rng(0)
    d = np.exp(rng.uniform(np.log(3), np.log(30), 300))
    malignancy = np.where(d > 9, 5, 1)
    nodules = _nodules(malignancy, diameter=d)
    model = ShapeBaseline.fit(nodules)
    assert auc(nodules.labels, model.predict(nodules)) > 0.99
    assert model.to_dict()["features"] == list(ShapeBaseline.FEATURES)
    with pytest.raises(LungCTError, match="both malignant and benign"):
        ShapeBaseline.fit(_nodules([5, 5, 4]))


def test_patient_score_is_the_most_malignant_detected_nodule() -> None:
    assert patient_score([0.9, 0.6, 0.3], [0.2, 0.7, 0.99], threshold=0.5) == (0.7, 2)
    assert patient_score([0.3], [0.9], threshold=0.5) == (0.0, 0)
    assert patient_score([], [], threshold=0.5) == (0.0, 0)


def test_patient_summary_says_why_the_score_is_zero() -> None:
    from integration.pipeline import patient_summary
    from integration.report import Detection

    none = patient_summary([Detection(0, 0, 0, 0.2, 5.0)], threshold=0.5)
    assert none["score"] == 0 and none["nodules"] == 0 and "no mark reached" in none["note"]
    some = patient_summary(
        [Detection(0, 0, 0, 0.8, 5.0, malignancy=0.3, malignancy_rating=2.4)], threshold=0.5
    )
    assert some["score"] == pytest.approx(0.3) and some["nodules"] == 1 and not some["note"]


def test_plan_refuses_overlapping_folds() -> None:
    with pytest.raises(LungCTError, match="must not overlap"):
        MalignancyPlan(train_folds=(0, 1), test_folds=(1,))
    with pytest.raises(LungCTError, match="too small"):
        MalignancyPlan(patch_mm=8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny malignancy model trained for two epochs on 10 small synthetic scans."""
    from fp_reduction_3dcnn.malignancy import train_malignancy
    from lungct.cache import prepare_dataset
    from lungct.synth import generate_dataset

    root = tmp_path_factory.mktemp("malignancy")
    data, cache, model = root / "data", root / "cache", root / "model"
    generate_dataset(data, 10, 5, "small", progress=False, workers=1, nodules_per_scan=12)
    prepare_dataset(data, cache, workers=1, progress=False)
    plan = MalignancyPlan(
        patch_mm=16, block_filters=(4, 8), dense_units=8, batch_size=16, epochs=2, seed=1
    )
    train_malignancy(plan, data, cache, model, progress=False)
    return data, cache, model


def test_training_writes_a_sealed_folder_that_loads_in_safe_mode(trained, tmp_path) -> None:
    from fp_reduction_3dcnn.malignancy import evaluate_malignancy, open_malignancy_model
    from lungct.modeldir import is_sealed

    data, cache, model = trained
    opened = open_malignancy_model(model)
    assert is_sealed(opened.manifest) and opened.manifest["provenance"]["stage"] == "malignancy"
    assert (model / "logs" / "train_log.csv").read_text().count("\n") == 3  # header + 2 epochs
    test_series = set(opened.manifest["train_series"]) & set(opened.manifest["val_series"])
    assert not test_series
    metrics = evaluate_malignancy(model, data, cache, tmp_path / "eval", rounds=20, progress=False)
    assert metrics["labelled_nodules"] == metrics["malignant"] + metrics["benign"] > 0
    assert 0 <= metrics["cnn_auc"] <= 1 and 0 <= metrics["baseline_auc"] <= 1
    lo, hi = metrics["auc_difference_ci95"]
    assert lo <= hi
    rows = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()
    assert len(rows) - 1 == metrics["rated_nodules"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["bootstrap_rounds"] == 20
    assert (tmp_path / "eval" / "calibration.png").read_bytes()[:4] == b"\x89PNG"


def test_a_second_training_into_the_same_folder_needs_resume(trained) -> None:
    from fp_reduction_3dcnn.malignancy import train_malignancy

    data, cache, model = trained
    with pytest.raises(LungCTError, match="--resume"):
        train_malignancy(MalignancyPlan(), data, cache, model, progress=False)


def test_the_folder_is_refused_as_another_stage(trained) -> None:
    from lungct.modeldir import verify_model_dir

    with pytest.raises(LungCTError, match="malignancy CNN model folder"):
        verify_model_dir(trained[2], stage="fpr")


def test_missing_ratings_are_one_clear_error(tmp_path) -> None:
    from fp_reduction_3dcnn.__main__ import main

    (tmp_path / "subset0").mkdir()
    code = main(
        [
            "malignancy-train",
            "--data",
            str(tmp_path),
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 2


def test_detect_reports_malignancy_and_the_patient_score(trained, tmp_path) -> None:
    import shutil

    from integration.__main__ import main
    from integration.modelset import SHIPPED_MODELS, write_model_set
    from lungct.cache import find_scans

    data, _, model = trained
    models = tmp_path / "models"
    for stage in ("unet", "fpr"):
        shutil.copytree(SHIPPED_MODELS / stage, models / stage)
    shutil.copytree(model, models / "malignancy", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copy(SHIPPED_MODELS / "pipeline.json", models / "pipeline.json")
    write_model_set(models, "test set")
    scans = find_scans(data)
    held_out = next(s for s in scans if s.fold == 9)
    out = tmp_path / "out"
    argv = ["detect", "--scan", str(held_out.path), "--models", str(models), "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    patient = summary["patient"]
    above = summary["detections_above_threshold"]
    assert patient["nodules"] == above == len(summary["nodules"])
    assert patient["threshold"] == summary["threshold"]
    if above:
        assert patient["score"] == max(n["malignancy"] for n in summary["nodules"])
        assert all(1 <= n["malignancy_rating"] <= 5 for n in summary["nodules"])
    else:
        assert patient["score"] == 0 and "no mark reached" in patient["note"]
    page = (out / "report.html").read_text()
    assert "Patient-level malignancy score" in page
    trained_scan = next(s for s in scans if s.fold == 0)
    argv[2] = str(trained_scan.path)
    assert main(argv) == 2  # a scan the malignancy CNN learned from
