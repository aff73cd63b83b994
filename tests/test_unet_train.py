"""Training from a tiny phantom cache: model folder, time budget, resume; then extraction."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lungct.cache import ScanCache, prepare_dataset
from lungct.errors import LungCTError
from lungct.geometry import Geometry
from lungct.io import read_scan
from lungct.preprocess import PreprocessPlan
from lungct.tables import read_results
from lungct.training import restored_epoch
from unet_candidates.__main__ import main
from unet_candidates.config import UNetPlan
from unet_candidates.data import (
    IGNORE,
    PatchSampler,
    ScanSamples,
    build_scan_samples,
    faintness,
    nodule_mean_hu,
    sphere_target,
)
from unet_candidates.testing import tiny_plan, write_tiny_luna
from unet_candidates.train import train


@pytest.fixture(scope="module")
def tiny_luna(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("luna")
    data = write_tiny_luna(root / "data", scans_per_fold=1, folds=2)
    cache = root / "cache"
    plan = PreprocessPlan(name="test4mm", spacing=(4.0, 4.0, 4.0))
    report = prepare_dataset(data, cache, plan, workers=1, progress=False)
    assert not report["failed"]
    return data, cache


def test_sampler_targets_follow_the_nodules(tiny_luna) -> None:
    data, cache_dir = tiny_luna
    cache = ScanCache(cache_dir)
    uid = cache.seriesuids()[0]
    scan = cache.open(uid)
    nodules = np.array([[float(v) for v in row[1:]] for row in _annotations(data) if row[0] == uid])
    plan = tiny_plan("3d", nodule_fraction=1.0, vessel_fraction=0.0, max_offset_fraction=0.0)
    samples = build_scan_samples(scan, nodules, plan)
    assert len(samples.lung_points) > 0
    sampler = PatchSampler(cache, [samples], plan, augment=False)
    x, y = sampler.fixed_set(4)
    assert x.shape == (4, 16, 16, 16, 1) and y.shape == x.shape
    # A centred nodule: the target is a ball in the middle, and the image is bright there.
    centre = y[:, 7:9, 7:9, 7:9]
    assert centre.mean() == 1.0
    assert x[y > 0].mean() > x[y == 0].mean() + 0.2
    # 2-D: three slices in, the centre slice's disk out.
    plan2 = tiny_plan("2d", nodule_fraction=1.0, vessel_fraction=0.0, max_offset_fraction=0.0)
    x2, y2 = PatchSampler(cache, [samples], plan2, augment=True).fixed_set(2)
    assert x2.shape == (2, 16, 16, 3) and y2.shape == (2, 16, 16, 1)
    assert y2[:, 7:9, 7:9].min() == 1.0


def test_small_nodule_weight_draws_small_nodules_more_often() -> None:
    """diameter^-1: a 4 mm nodule comes round 2.5 times as often as a 10 mm one; 0 = equally."""
    lung = np.zeros((5, 3))
    small = ScanSamples("a", np.array([[0.0, 0.0, 0.0, 4.0]]), lung, np.zeros((0, 3)))
    large = ScanSamples("b", np.array([[0.0, 0.0, 0.0, 10.0]]), lung, np.zeros((0, 3)))
    for weight, ratio in ((0.0, 1.0), (1.0, 2.5)):
        plan = tiny_plan("3d", nodule_fraction=1.0, vessel_fraction=0.0, small_nodule_weight=weight)
        sampler = PatchSampler(None, [small, large], plan, augment=False)
        picks = [r.seriesuid for r in sampler.requests(6000, np.random.default_rng(0))]
        assert picks.count("a") / picks.count("b") == pytest.approx(ratio, rel=0.1)
    with pytest.raises(LungCTError, match="small_nodule_weight"):
        tiny_plan("2d", small_nodule_weight=-1.0)


def test_nodule_mean_hu_measures_the_sphere_on_any_grid() -> None:
    """A -100 HU ball of 8 mm in -850 HU lung; anisotropic voxels and a flipped axis."""
    geo = Geometry((40, 30, 20), (0.5, 0.8, 1.5), (10.0, -20.0, 30.0), (-1, 0, 0, 0, 1, 0, 0, 0, 1))
    centre = geo.voxel_to_world(np.array([[10.0, 15.0, 20.0]]))[0]
    zz, yy, xx = np.indices(geo.shape_zyx)
    r = np.sqrt(((zz - 10) * 1.5) ** 2 + ((yy - 15) * 0.8) ** 2 + ((xx - 20) * 0.5) ** 2)
    volume = np.where(r <= 4.0, -100, -850).astype(np.int16)
    nodules = np.array([[*centre, 8.0], [*centre, 16.0], [500.0, 500.0, 500.0, 6.0]])
    hu = nodule_mean_hu(volume, geo, nodules)
    assert hu[0] == pytest.approx(-100.0, abs=15)  # the ball alone (edge voxels aside)
    assert hu[1] == pytest.approx(-850 + 750 / 8, abs=40)  # an eighth of the 16 mm sphere
    assert np.isnan(hu[2])  # outside the volume
    assert faintness(np.array([-100.0, -450.0, -550.0, -650.0, -800.0, np.nan])) == (
        pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0, 0.0])
    )


def test_faint_nodule_weight_draws_ground_glass_more_often() -> None:
    """1 + 3 * faintness: a -700 HU nodule four times as often as a -200 HU one; 0 = equally."""
    lung = np.zeros((5, 3))
    nodule = np.array([[0.0, 0.0, 0.0, 6.0]])
    faint = ScanSamples("a", nodule, lung, np.zeros((0, 3)), nodule_hu=np.array([-700.0]))
    solid = ScanSamples("b", nodule, lung, np.zeros((0, 3)), nodule_hu=np.array([-200.0]))
    unmeasured = ScanSamples("c", nodule, lung, np.zeros((0, 3)))
    for weight, ratio in ((0.0, 1.0), (3.0, 4.0)):
        plan = tiny_plan("3d", nodule_fraction=1.0, vessel_fraction=0.0, faint_nodule_weight=weight)
        sampler = PatchSampler(None, [faint, solid, unmeasured], plan, augment=False)
        picks = [r.seriesuid for r in sampler.requests(9000, np.random.default_rng(0))]
        assert picks.count("a") / picks.count("b") == pytest.approx(ratio, rel=0.1)
        assert picks.count("c") / picks.count("b") == pytest.approx(1.0, rel=0.1)
    with pytest.raises(LungCTError, match="faint_nodule_weight"):
        tiny_plan("2d", faint_nodule_weight=-1.0)


def test_excluded_findings_are_ignored_not_background(tiny_luna) -> None:
    data, cache_dir = tiny_luna
    cache = ScanCache(cache_dir)
    uid = cache.seriesuids()[0]
    nodules = np.array([[float(v) for v in row[1:]] for row in _annotations(data) if row[0] == uid])
    unsure = nodules.copy()
    unsure[:, 0] += 12.0  # a finding 12 mm beside the nodule, unknown size
    unsure[:, 3] = -1.0
    plan = tiny_plan("3d", nodule_fraction=1.0, vessel_fraction=0.0, max_offset_fraction=0.0)
    samples = build_scan_samples(cache.open(uid), nodules, plan, excluded=unsure)
    _, y = PatchSampler(cache, [samples], plan, augment=False).fixed_set(1)
    assert set(np.unique(y)) == {0.0, 1.0, IGNORE}
    assert y[0, 7:9, 7:9, 7:9].min() == 1.0  # the nodule wins where both overlap
    assert y[0, 7:9, 7:9, 10:12].min() == IGNORE  # 12 mm along +x = 3 voxels


def test_sphere_target_is_in_world_mm() -> None:
    t = sphere_target((10.0, 0.0, 0.0), (5, 5, 5), (1.0, 1.0, 1.0), np.array([[11.0, 0, 0]]), [1.0])
    assert t.sum() == 7  # the centre voxel and its 6 face neighbours
    assert t[2, 2, 3] == 1 and t[2, 2, 1] == 0


def _annotations(data: Path) -> list[list[str]]:
    with (data / "annotations.csv").open() as f:
        return list(csv.reader(f))[1:]


def test_train_refuses_an_empty_validation_fold(tiny_luna, tmp_path: Path, capsys) -> None:
    """Naming a validation fold without scans must not train silently without validation."""
    data, cache = tiny_luna
    out = tmp_path / "model"
    with pytest.raises(LungCTError, match=r"validation fold\(s\) \[8\] hold no scan"):
        train(tiny_plan("2d"), data, cache, [0], [8], out, progress=False)
    assert not out.exists()
    # The command says so in one line and exits 2.
    code = main(["train", "--data", str(data), "--cache", str(cache), "--folds", "0",
                 "--val-folds", "8", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hold no scan" in err[0]


def test_train_budget_resume_and_extract(tiny_luna, tmp_path: Path, capsys) -> None:
    data, cache = tiny_luna
    out = tmp_path / "model"
    plan = tiny_plan("2d")
    # A time budget of ~0 stops during the first epoch, which is still checkpointed.
    summary = train(plan, data, cache, [0], [1], out, max_minutes=1e-6, progress=False)
    assert summary["stopped_by_time"] and summary["epochs_done"] == 1
    for name in ("plan.json", "manifest.json", "model.keras", "logs/train_log.csv"):
        assert (out / name).is_file(), name
    assert UNetPlan.load(out / "plan.json") == plan
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["train_folds"] == [0] and manifest["val_folds"] == [1]
    assert manifest["train_series"] == ["1.2.3.0.0"] and manifest["val_series"] == ["1.2.3.1.0"]

    with pytest.raises(LungCTError, match="already holds a training run"):
        train(plan, data, cache, [0], [1], out, progress=False)

    # --resume continues with epoch 2 (epochs counted from 0 in the log) and appends to the log.
    assert main(["train", "--data", str(data), "--cache", str(cache), "--folds", "0",
                 "--val-folds", "1", "--out", str(out), "--resume", "--quiet"]) == 0  # fmt: skip
    assert restored_epoch(out) == 2
    with (out / "logs" / "train_log.csv").open() as f:
        log = list(csv.DictReader(f))
    assert [row["epoch"] for row in log] == ["0", "1"]
    assert all(np.isfinite(float(row["loss"])) for row in log)
    assert all(np.isfinite(float(row["val_dice"])) for row in log)
    assert len(list((out / "checkpoints").glob("epoch_*.keras"))) == 2
    capsys.readouterr()

    # Extraction from the cache and from the scan file give the same kind of output.
    csv_path = tmp_path / "cands" / "candidates.csv"
    maps = tmp_path / "maps"
    code = main(["extract", "--data", str(data), "--folds", "1", "--cache", str(cache),
                 "--model", str(out), "--out", str(csv_path), "--prob-maps", str(maps),
                 "--quiet"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["scans_done"] == 1 and summary["failed"] == {}
    header = csv_path.read_text().splitlines()[0]
    assert header == "seriesuid,coordX,coordY,coordZ,probability,diameter_mm"
    read_results(csv_path)
    assert UNetPlan.load(tmp_path / "cands" / "candidates.plan.json") == plan
    assert (tmp_path / "cands" / "candidates.summary.json").is_file()
    prob = read_scan(maps / "1.2.3.1.0_prob.mhd")
    native = read_scan(data / "subset1" / "1.2.3.1.0.mhd")
    assert prob.geometry == native.geometry

    # An impossible threshold: a valid, header-only CSV.
    scan_path = data / "subset1" / "1.2.3.1.0.mhd"
    code = main(["extract", "--scan", str(scan_path), "--model", str(out),
                 "--out", str(tmp_path / "none.csv"), "--threshold", "0.99999", "--quiet"])  # fmt: skip
    assert code == 0
    assert (tmp_path / "none.csv").read_text() == header + "\n"

    # A broken resume state of the former loop is an error naming the file, not a JSON
    # traceback.
    (out / "checkpoints" / "state.json").write_text("{broken")
    with pytest.raises(LungCTError, match="state.json.*not valid JSON"):
        train(None, data, cache, [0], [1], out, resume=True, progress=False)


class _CountingSampler:
    """Batches ``(epoch, i)`` in order, counting how many were made."""

    def __init__(self) -> None:
        self.made = 0

    def batches(self, epoch: int, steps: int):
        for i in range(steps):
            self.made += 1
            yield (epoch, i)


@pytest.mark.parametrize("depth", [0, 3])
def test_candidate_batches_stay_in_order_and_cut_ahead(depth: int) -> None:
    import threading
    import time

    from unet_candidates.train import _candidate_batches_class

    before = set(threading.enumerate())
    sampler = _CountingSampler()
    batches = _candidate_batches_class()(sampler, epoch=2, steps=6, depth=depth)
    assert batches[0] == (2, 0)
    assert batches[1] == (2, 1)
    if depth:  # the background thread makes batches ahead, at most ``depth`` waiting
        deadline = time.monotonic() + 5.0
        while sampler.made < 2 + depth + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        assert 2 + depth <= sampler.made <= 2 + depth + 1
    else:
        assert sampler.made == 2
    assert batches[0] == (2, 0)  # held for the epoch: not a restart
    assert [batches[i] for i in range(2, 6)] == [(2, i) for i in range(2, 6)]
    assert batches[3] == (2, 3)  # out of order: the epoch's stream again, same batches
    batches.set_epoch(3)
    assert batches[0] == (3, 0)
    batches.close()
    deadline = time.monotonic() + 5.0
    while any(t.name == "prefetch" for t in set(threading.enumerate()) - before):
        assert time.monotonic() < deadline, "the background thread outlived close()"
        time.sleep(0.01)
