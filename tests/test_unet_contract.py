"""The training contract (lungct.training) on the candidate networks' trainer (the U-Net and
the CenterNet): TensorBoard event files, resume after a real ``kill -9``, one against two
replicas."""

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

from lungct.cache import prepare_dataset
from lungct.modeldir import is_sealed
from lungct.preprocess import PreprocessPlan
from lungct.training import LOG_FILE, restored_epoch
from unet_candidates.testing import tiny_centernet_plan, tiny_plan, write_tiny_luna

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_luna(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("unet-contract")
    data = write_tiny_luna(root / "data", scans_per_fold=1, folds=2)
    cache = root / "cache"
    report = prepare_dataset(
        data, cache, PreprocessPlan(name="t4", spacing=(4.0,) * 3), workers=1, progress=False
    )
    assert not report["failed"]
    return data, cache


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", PYTHONPATH=str(REPO))
    return env


def _log(model_dir: Path) -> list[dict[str, str]]:
    with open(model_dir / LOG_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def _scalars(model_dir: Path, tag: str, writer: str = "train") -> dict[int, float]:
    import tensorflow as tf

    events = sorted((model_dir / "logs" / writer).glob("events.out.tfevents.*"))
    assert events, f"no TensorBoard event file under {model_dir}/logs/{writer}"
    out = {}
    for event in tf.compat.v1.train.summary_iterator(str(events[0])):
        for value in event.summary.value:
            if value.tag == tag:
                out[event.step] = float(tf.make_ndarray(value.tensor))
    return out


@pytest.mark.parametrize("network", ["unet", "centernet"])
def test_tensorboard_event_files_hold_the_epoch_logs(tiny_luna, tmp_path, network) -> None:
    from unet_candidates.centernet.train import train as train_centernet
    from unet_candidates.train import train as train_unet

    data, cache = tiny_luna
    out = tmp_path / network
    if network == "unet":
        summary = train_unet(tiny_plan("2d"), data, cache, [0], [1], out, progress=False)
        metric = "val_dice"
    else:
        plan = tiny_centernet_plan()
        summary = train_centernet(plan, data, cache, [0], [1], out, progress=False)
        metric = "val_hit"
    assert summary["epochs_done"] == 2 and is_sealed(
        json.loads((out / "manifest.json").read_text())
    )
    logged = _log(out)
    assert [int(r["epoch"]) for r in logged] == [0, 1]
    # Keras' TensorBoard callback writes val_* to logs/validation, without the prefix.
    scalars = (("train", "epoch_loss", "loss"), ("validation", f"epoch_{metric[4:]}", metric))
    for writer, tag, column in scalars:
        values = _scalars(out, tag, writer)
        assert sorted(values) == [0, 1], tag
        for epoch, value in values.items():
            assert value == pytest.approx(float(logged[epoch][column]), rel=1e-5), tag
    # The learning rate follows the cosine over the plan's steps: lower in the second epoch.
    rates = [float(r["learning_rate"]) for r in logged]
    assert rates[1] < rates[0]


def _train_argv(data: Path, cache: Path, plan: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "unet_candidates", "train", "--data", str(data),
            "--cache", str(cache), "--folds", "0", "--val-folds", "1", "--plan", str(plan),
            "--out", str(out), "--quiet"]  # fmt: skip


def _weights(model_dir: Path) -> list[np.ndarray]:
    from unet_candidates.extract import load_unet

    model, _ = load_unet(model_dir)
    return [np.asarray(w) for w in model.get_weights()]


@pytest.mark.slow
def test_kill_9_then_resume_ends_where_an_uninterrupted_run_ends(tiny_luna, tmp_path) -> None:
    data, cache = tiny_luna
    epochs = 4
    plan = tmp_path / "plan.json"
    tiny_plan("2d", epochs=epochs, steps_per_epoch=6).save(plan)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(
        _train_argv(data, cache, plan, whole),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(
        _train_argv(data, cache, plan, killed),
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
    assert 2 <= restored_epoch(killed) < epochs
    done = subprocess.run(
        [*_train_argv(data, cache, plan, killed), "--resume"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["epochs_done"] == epochs
    rows = [int(r["epoch"]) for r in _log(killed)]
    assert sorted(set(rows)) == list(range(epochs)) and len(rows) <= epochs + 1
    # The same batches, learning rates, weights and optimiser state as the uninterrupted run.
    for a, b in zip(_weights(whole), _weights(killed), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


_REPLICAS = r"""
import json, sys
import tensorflow as tf
n = int(sys.argv[1])
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * n)
from unet_candidates.config import UNetPlan
from unet_candidates.train import train
summary = train(UNetPlan.load(sys.argv[2]), sys.argv[3], sys.argv[4], [0], [1], sys.argv[5],
                strategy=sys.argv[6], progress=False)
print(json.dumps(summary))
"""


def test_a_multiworker_resume_names_its_plan(tiny_luna, tmp_path, capsys) -> None:
    """Only the chief reads --out, so a cluster's resumed run names its plan on every
    worker; without it the command says so in one line before any worker starts."""
    from unet_candidates.__main__ import main

    data, cache = tiny_luna
    status = main(["train", "--data", str(data), "--cache", str(cache), "--out",
                   str(tmp_path / "m"), "--resume", "--strategy", "multiworker"])  # fmt: skip
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "needs the plan on every worker" in lines[0], lines


def test_two_replicas_match_one_replica(tiny_luna, tmp_path) -> None:
    """MirroredStrategy over two logical CPUs against the default device, the same global
    batch of 8: the epoch losses agree within 8 %. Not closer: the Dice loss is a ratio pooled
    over the batch, and each replica pools its own half (the mean of two halves' Dice is not
    the whole batch's), and batch normalisation's statistics are each replica's own; the
    2-replica losses came out 4.4-6.2 % lower. A loss not divided between the replicas
    (gradients counted twice) came out 88-91 % higher."""
    data, cache = tiny_luna
    plan = tmp_path / "plan.json"
    tiny_plan("2d", epochs=3, steps_per_epoch=4, batch_size=8).save(plan)
    runs = {}
    for n, strategy in ((1, "none"), (2, "mirrored")):
        out = tmp_path / f"r{n}"
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _REPLICAS,
                str(n),
                str(plan),
                str(data),
                str(cache),
                str(out),
                strategy,
            ],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1])["replicas"] == n
        runs[n] = [float(r["loss"]) for r in _log(out)]
        # Validated on this process's copy of the model (a strategy's predict_on_batch returns
        # one copy of the output per replica).
        assert all(0.0 <= float(r["val_dice"]) <= 1.0 for r in _log(out))
    assert len(runs[1]) == len(runs[2]) == 3
    np.testing.assert_allclose(runs[2], runs[1], rtol=0.08)
