"""The training contract (lungct.training) on the MGI-CNN's trainer: resume after a real
``kill -9``, TensorBoard event files, the time budget, and one against two replicas."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fp_reduction_3dcnn.testing import make_tiny_dataset, tiny_plan
from fp_reduction_3dcnn.train import train
from lungct.errors import LungCTError
from lungct.modeldir import is_sealed
from lungct.training import LOG_FILE, make_strategy, restored_epoch, strategy_scope

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
TINY_PLAN = tiny_plan(steps_per_epoch=3, epochs=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("contract"), n_scans=4)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", PYTHONPATH=str(REPO))
    return env


def _train_argv(tiny: dict, plan: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fp_reduction_3dcnn",
        "train",
        "--cache",
        tiny["cache"],
        "--candidates",
        tiny["candidates"],
        "--data",
        tiny["data"],
        "--folds",
        "0-1",
        "--val-folds",
        "2",
        "--test-folds",
        "3",
        "--plan",
        str(plan),
        "--quiet",
        "--out",
        str(out),
    ]


def _log(model_dir: Path) -> list[dict[str, str]]:
    with open(model_dir / LOG_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def _weights(model_dir: Path) -> list[np.ndarray]:
    from fp_reduction_3dcnn.train import load_keras

    return [np.asarray(w) for w in load_keras(model_dir / "model.keras").get_weights()]


def test_kill_9_then_resume_ends_where_an_uninterrupted_run_ends(tiny, tmp_path):
    plan = tmp_path / "plan.json"
    TINY_PLAN.save(plan)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(
        _train_argv(tiny, plan, whole), env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(
        _train_argv(tiny, plan, killed),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while restored_epoch(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    reached = restored_epoch(killed)
    assert 2 <= reached < TINY_PLAN.epochs
    assert not is_sealed(json.loads((killed / "manifest.json").read_text()))

    done = subprocess.run(
        [*_train_argv(tiny, plan, killed), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["epochs_done"] == TINY_PLAN.epochs
    assert is_sealed(json.loads((killed / "manifest.json").read_text()))
    # Every epoch logged; at most the one under way at the kill was run twice.
    epochs = [int(r["epoch"]) for r in _log(killed)]
    assert sorted(set(epochs)) == list(range(TINY_PLAN.epochs))
    assert len(epochs) <= TINY_PLAN.epochs + 1
    # The same batches, weights and optimiser state: the same model as the uninterrupted run.
    for a, b in zip(_weights(whole), _weights(killed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    last_whole, last_killed = _log(whole)[-1], _log(killed)[-1]
    assert float(last_killed["loss"]) == pytest.approx(float(last_whole["loss"]), rel=1e-4)


def test_tensorboard_event_files_hold_the_epoch_loss(tiny, tmp_path):
    import tensorflow as tf

    out = tmp_path / "model"
    train(
        TINY_PLAN.replace(epochs=2),
        tiny["cache"],
        tiny["candidates"],
        [0, 1],
        [2],
        out,
        data_dir=tiny["data"],
        progress=False,
    )
    events = sorted((out / "logs" / "train").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under logs/train"
    losses = {}
    for event in tf.compat.v1.train.summary_iterator(str(events[0])):
        for value in event.summary.value:
            if value.tag == "epoch_loss":
                losses[event.step] = float(tf.make_ndarray(value.tensor))
    logged = {int(r["epoch"]): float(r["loss"]) for r in _log(out)}
    assert sorted(losses) == [0, 1]
    for epoch, loss in losses.items():
        assert loss == pytest.approx(logged[epoch], rel=1e-5)


def test_a_time_budget_stops_the_run_and_resume_continues_it(tiny, tmp_path):
    out = tmp_path / "model"
    plan = TINY_PLAN.replace(epochs=3)
    args = (plan, tiny["cache"], tiny["candidates"], [0, 1], [2], out)
    first = train(*args, data_dir=tiny["data"], max_minutes=1e-6, progress=False)
    assert first["stopped_early"] and first["epochs_done"] == 1
    rows = _log(out)
    assert len(rows) == 1 and float(rows[0]["steps"]) == 1  # stopped after its first batch
    second = train(*args, data_dir=tiny["data"], resume=True, progress=False)
    assert not second["stopped_early"] and second["epochs_done"] == 3
    assert [int(r["epoch"]) for r in _log(out)] == [0, 1, 2]


def test_resume_under_another_precision_policy_is_refused(tiny, tmp_path):
    """A backup made with --mixed-precision resumes with it only: Keras would restore the
    optimizer's state only in part under the other policy, without a word."""
    out = tmp_path / "model"
    args = (TINY_PLAN.replace(epochs=3), tiny["cache"], tiny["candidates"], [0, 1], [2], out)
    first = train(*args, data_dir=tiny["data"], max_minutes=1e-6, progress=False,
                  mixed_precision=True)  # fmt: skip
    assert first["stopped_early"]
    assert json.loads((out / "checkpoints" / "precision.json").read_text()) == {
        "policy": "mixed_float16"
    }
    with pytest.raises(LungCTError, match="resume it with --mixed-precision"):
        train(*args, data_dir=tiny["data"], resume=True, progress=False)
    second = train(*args, data_dir=tiny["data"], resume=True, progress=False, mixed_precision=True)
    assert second["epochs_done"] == 3


def test_strategy_choices():
    assert make_strategy("none") is None
    with pytest.raises(LungCTError, match="--strategy must be one of none, mirrored, multiworker"):
        with strategy_scope("gpus"):
            pass


_REPLICAS = r"""
import json, sys
import tensorflow as tf
n = int(sys.argv[1])
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
from fp_reduction_3dcnn.config import FPRPlan
from fp_reduction_3dcnn.train import train
summary = train(FPRPlan.load(sys.argv[2]), sys.argv[3], sys.argv[4], [0, 1], [], sys.argv[5],
                strategy=sys.argv[6], progress=False)
print(json.dumps(summary))
"""


def test_two_replicas_match_one_replica(tiny, tmp_path):
    """MirroredStrategy over two logical CPUs against the default device, the same global
    batch of 32: the epoch losses agree within 3 %. Not to the last digit: batch
    normalisation's statistics are each replica's own (16 samples, not 32); the differences
    seen were 0.8-2.0 %. Without dropout, whose masks are drawn per replica."""
    plan = tmp_path / "plan.json"
    TINY_PLAN.replace(epochs=3, batch_size=32, dropout=0.0).save(plan)
    runs = {}
    for n, strategy in ((1, "none"), (2, "mirrored")):
        out = tmp_path / f"r{n}"
        argv = [sys.executable, "-c", _REPLICAS, str(n), str(plan), tiny["cache"]]
        done = subprocess.run(
            [*argv, tiny["candidates"], str(out), strategy],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["replicas"] == n
        runs[n] = [float(r["loss"]) for r in _log(out)]
    assert len(runs[1]) == len(runs[2]) == 3
    np.testing.assert_allclose(runs[2], runs[1], rtol=0.03)


def test_training_state_reads_the_folder(tmp_path):
    """What `integration` asks a stage's folder: nothing, started (resume it) or done."""
    from lungct.modeldir import seal_model_dir
    from lungct.training import training_state

    folder = tmp_path / "model"
    assert training_state(folder) == "none"
    folder.mkdir()
    (folder / "plan.json").write_text("{}")
    (folder / "manifest.json").write_text("{}")
    assert training_state(folder) == "started"
    (folder / "model.keras").write_bytes(b"weights")
    seal_model_dir(folder, "fpr", 1.0)
    assert training_state(folder) == "done"
    (folder / "model.keras").unlink()  # a file the seal lists is gone: train it again
    assert training_state(folder) == "started"


def test_the_stage_list_follows_the_settings():
    from integration.stages import STAGES, StageSettings

    def names(**settings):
        chosen = StageSettings.from_dict(settings)
        return [s.name for s in STAGES if s.applies(chosen)]

    everything = ["candidate network", "candidates", "CT-GAN", "augmentation", "FP reducer"]
    assert names() == [*everything, "scores"]
    assert names(gan=False) == ["candidate network", "candidates", "FP reducer", "scores"]
    assert names(fpr=False) == ["candidate network", "candidates"]
    assert names(hard_negatives=True) == [
        *everything[:2],
        "hard negatives",
        *everything[2:],
        "scores",
    ]
    assert names(hard_negatives=True, fpr=False) == ["candidate network", "candidates"]
    # The stages that train name their folder and budget, read from one place.
    budgets = {s.name: s.budget(StageSettings()) for s in STAGES if s.budget is not None}
    assert budgets == {"candidate network": 3.0, "CT-GAN": 2.0, "FP reducer": 4.0}


def test_detector_candidates_are_labelled_by_the_hit_rule(tmp_path):
    """A detector's candidates become training rows: a hit is class 1, a miss class 0, and a
    mark on an excluded finding is left out (never taught as a negative)."""
    from integration.stages import label_detector_candidates
    from lungct.tables import read_candidates

    data = tmp_path / "data"
    data.mkdir()
    (data / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,10,20,30,8\n"
    )
    (data / "annotations_excluded.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,-50,0,0,6\n1.2.3,50,0,0,-1\n"
    )
    raw = tmp_path / "raw.csv"
    raw.write_text(
        "seriesuid,coordX,coordY,coordZ,probability\n"
        "1.2.3,11,21,31,0.9\n"  # 1.7 mm from the nodule's centre (radius 4): a hit
        "1.2.3,10,20,35,0.8\n"  # 5 mm away: outside the radius
        "1.2.3,-51,0,0,0.7\n"  # on an excluded finding (radius 3)
        "1.2.3,54,0,0,0.6\n"  # on an excluded finding of unknown size (10 mm)
        "4.5.6,0,0,0,0.5\n"  # a scan without nodules
    )
    out = tmp_path / "labelled.csv"
    assert label_detector_candidates(raw, data, out) == 3
    table = read_candidates(out)
    assert [table.uid_of(i) for i in range(3)] == ["1.2.3", "1.2.3", "4.5.6"]
    assert table.label.tolist() == [1, 0, 0]


def test_convergence_reads_the_plateau_from_the_log(tmp_path):
    from lungct.training import convergence

    def write(folder: Path, losses: list[float], planned: int) -> Path:
        (folder / "logs").mkdir(parents=True)
        rows = "".join(f"{e},{v}\n" for e, v in enumerate(losses))
        (folder / "logs" / "train_log.csv").write_text("epoch,val_loss\n" + rows)
        (folder / "plan.json").write_text(json.dumps({"epochs": planned}))
        return folder

    # Still falling in the last quarter (0.50 -> 0.40): no plateau; stopped on its budget.
    falling = convergence(write(tmp_path / "a", [1.0, 0.8, 0.6, 0.55, 0.5, 0.45, 0.42, 0.4], 10))
    assert falling["gain"] == pytest.approx((0.45 - 0.4) / 0.45)
    assert not falling["plateau"] and falling["ended_by"] == "budget"
    # Flat at the end (best before 0.400, best of the last two 0.396: 1 %): a plateau.
    flat = convergence(write(tmp_path / "b", [1.0, 0.6, 0.45, 0.41, 0.4, 0.401, 0.398, 0.396], 8))
    assert flat["plateau"] and flat["ended_by"] == "epochs" and flat["best"] == 0.396
    assert convergence(write(tmp_path / "c", [1.0, 0.5, 0.4], 3)) is None  # too short to say
    assert convergence(tmp_path / "none") is None
