"""``--strategy multiworker`` on the other trainers: two real worker processes of
``python -m unet_candidates train`` and of ``python -m ct_gan_augment train`` on localhost
train as one process with two replicas does, and only the chief writes its ``--out``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_ct_gan_cli import make_dataset
from test_ct_gan_training import TINY
from test_multiworker import TIMEOUT_S, Worker, _env, _ok, _run_cluster

from lungct.cache import prepare_dataset
from lungct.modeldir import is_sealed
from lungct.preprocess import PreprocessPlan
from lungct.training import LOG_FILE
from unet_candidates.testing import tiny_plan, write_tiny_luna

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RTOL = 1e-5
"""Two workers against one process with two replicas: the same global batch, split the same
way (its first half to replica 0, the second to replica 1), the same per-replica pooling (the
U-Net's Dice is pooled over each replica's half, the CT-GAN's losses are each replica's
means divided by the replicas) and the same per-replica batch normalisation, so the same
losses but for the order of float32 sums in the all-reduce."""

_ONE_PROCESS_TWO_REPLICAS = r"""
import importlib, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
main = importlib.import_module(sys.argv[1] + ".__main__").main
sys.exit(main(sys.argv[2:]))
"""


def _log(model_dir: Path) -> list[dict[str, str]]:
    with open(model_dir / LOG_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def _cluster_and_one(
    module: str, args: list[str], root: Path
) -> tuple[list[Worker], Path, Path, Path, float]:
    """``python -m MODULE ARGS --out ...`` by two workers (each its own --out, as on two
    machines) and by one process with two replicas; the folders and the cluster's seconds."""
    chief, other, one = root / "chief" / "model", root / "worker" / "model", root / "one" / "model"
    t0 = time.monotonic()
    workers = _run_cluster(
        [
            [*args, "--out", str(chief), "--strategy", "multiworker"],
            [*args, "--out", str(other), "--strategy", "multiworker"],
        ],
        root / "logs",
        module=module,
    )
    seconds = time.monotonic() - t0
    _ok(workers)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _ONE_PROCESS_TWO_REPLICAS,
            module,
            *args,
            "--out",
            str(one),
            "--strategy",
            "mirrored",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return workers, chief, other, one, seconds


def _check_only_the_chief_wrote(workers: list[Worker], chief: Path, other: Path) -> None:
    summaries = [w.summary() for w in workers]
    assert [s["chief"] for s in summaries] == [True, False]
    assert [s["workers"] for s in summaries] == [2, 2]
    assert is_sealed(json.loads((chief / "manifest.json").read_text()))
    assert not other.exists()
    assert not list(workers[1].tmpdir.glob("lungct-worker-*"))


def _losses(model_dir: Path, keys: tuple[str, ...]) -> np.ndarray:
    return np.array([[float(r[k]) for k in keys] for r in _log(model_dir)])


def test_unet_two_workers_train_as_one_process_with_two_replicas(tmp_path) -> None:
    data = write_tiny_luna(tmp_path / "data", scans_per_fold=1, folds=2)
    cache = tmp_path / "cache"
    report = prepare_dataset(
        data, cache, PreprocessPlan(name="t4", spacing=(4.0,) * 3), workers=1, progress=False
    )
    assert not report["failed"]
    plan = tmp_path / "plan.json"
    tiny_plan("2d", epochs=2, steps_per_epoch=3, batch_size=4).save(plan)
    args = ["train", "--data", str(data), "--cache", str(cache), "--folds", "0",
            "--val-folds", "1", "--plan", str(plan), "--quiet"]  # fmt: skip
    workers, chief, other, one, seconds = _cluster_and_one("unet_candidates", args, tmp_path)
    _check_only_the_chief_wrote(workers, chief, other)
    assert [int(r["epoch"]) for r in _log(chief)] == [0, 1]
    assert (chief / "model.keras").is_file()
    got, want = _losses(chief, ("loss",)), _losses(one, ("loss",))
    print(f"unet: cluster {seconds:.0f} s, loss {got.ravel()} vs {want.ravel()}")
    np.testing.assert_allclose(got, want, rtol=RTOL)
    # Validation runs on the chief's own copy of the model, as in the one process.
    np.testing.assert_allclose(
        _losses(chief, ("val_loss",)), _losses(one, ("val_loss",)), rtol=RTOL
    )


def test_ct_gan_two_workers_train_as_one_process_with_two_replicas(tmp_path) -> None:
    dataset = make_dataset(tmp_path / "gan")
    plan = tmp_path / "plan.json"
    TINY.replace(steps=4, checkpoint_every=2).save(plan)
    args = ["train", "--data", str(dataset["data"]), "--cache", str(dataset["cache"]),
            "--folds", "0-1", "--kind", "injector", "--plan", str(plan), "--quiet"]  # fmt: skip
    workers, chief, other, one, seconds = _cluster_and_one("ct_gan_augment", args, tmp_path)
    _check_only_the_chief_wrote(workers, chief, other)
    assert (chief / "generator.keras").is_file() and list((chief / "grids").glob("*.png"))
    keys = ("d_loss", "g_loss", "g_l1")
    got, want = _losses(chief, keys), _losses(one, keys)
    assert len(got) == 2
    print(f"ct-gan: cluster {seconds:.0f} s, losses {got.tolist()} vs {want.tolist()}")
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_the_candidate_and_gan_train_commands_take_multiworker() -> None:
    from ct_gan_augment.__main__ import build_parser as gan_parser
    from unet_candidates.__main__ import build_parser as unet_parser

    unet = ["train", "--data", "d", "--cache", "c", "--out", "o", "--preset", "centernet",
            "--strategy", "multiworker"]  # fmt: skip
    args = unet_parser().parse_args(unet)
    assert args.strategy == "multiworker" and args.preset == "centernet"
    gan = ["train", "--data", "d", "--cache", "c", "--folds", "0", "--kind", "injector",
           "--out", "o", "--strategy", "multiworker"]  # fmt: skip
    args = gan_parser().parse_args(gan)
    assert args.strategy == "multiworker"
