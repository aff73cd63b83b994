"""``--strategy multiworker`` on localhost: two real worker processes of ``python -m
fp_reduction_3dcnn train`` train as one process with two replicas does, only the chief writes
the model folder, a resumed cluster ends where an uninterrupted one ends, and a bad
``TF_CONFIG`` is one line with exit status 2."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fp_reduction_3dcnn.testing import make_tiny_dataset, tiny_plan
from lungct.errors import LungCTError
from lungct.modeldir import is_sealed
from lungct.training import (
    LOG_FILE,
    STRATEGIES,
    is_chief,
    read_tf_config,
    worker_count,
    worker_dir,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
PLAN = tiny_plan(steps_per_epoch=3, epochs=3, batch_size=32, dropout=0.0)
TIMEOUT_S = 240
RTOL = 1e-5
"""Two workers against one process with two replicas: the same global batch of 32, split the
same way (the first 16 samples to replica 0, the next 16 to replica 1), the same per-replica
batch normalisation, so the same losses but for the order of float32 sums in the all-reduce
(on 2 CPU cores they came out identical). Against one replica they differ by up to 2 %: batch
normalisation's statistics are each replica's own (``test_training_contract``)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return make_tiny_dataset(tmp_path_factory.mktemp("multiworker"), n_scans=4)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    env.update(TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", PYTHONPATH=str(REPO))
    env.update(extra)
    return env


def _train_args(tiny: dict, plan: Path, out: Path, *extra: str) -> list[str]:
    return [
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
        *extra,
    ]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports nothing listens on now (held open together, so all differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Worker:
    returncode: int
    stdout: str
    stderr: str
    tmpdir: Path

    def summary(self) -> dict:
        return json.loads(self.stdout.strip().splitlines()[-1])


def _run_cluster(
    args_of: list[list[str]], logs: Path, module: str = "fp_reduction_3dcnn"
) -> list[Worker]:
    """Run ``python -m MODULE ARGS`` once per worker, ``args_of[k]`` as ``worker k`` of a
    cluster on free localhost ports, each with its own TMPDIR; kill every worker once one
    has failed and the others have not ended 60 s later, or at the timeout."""
    logs.mkdir(parents=True, exist_ok=True)
    ports = _free_ports(len(args_of))
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    procs, files = [], []
    try:
        for k, args in enumerate(args_of):
            tmpdir = logs / f"tmp{k}"
            tmpdir.mkdir(exist_ok=True)
            config = {"cluster": cluster, "task": {"type": "worker", "index": k}}
            out, err = open(logs / f"{k}.out", "w+"), open(logs / f"{k}.err", "w+")
            files += [out, err]
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, *args],
                    env=_env(TF_CONFIG=json.dumps(config), TMPDIR=str(tmpdir)),
                    stdout=out,
                    stderr=err,
                )
            )
        deadline, failed_at = time.monotonic() + TIMEOUT_S, None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + 60):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in files:
            f.close()
    return [
        Worker(
            p.returncode,
            (logs / f"{k}.out").read_text(),
            (logs / f"{k}.err").read_text(),
            logs / f"tmp{k}",
        )
        for k, p in enumerate(procs)
    ]


def _ok(workers: list[Worker]) -> None:
    for k, w in enumerate(workers):
        assert w.returncode == 0, f"worker {k} ended with {w.returncode}:\n{w.stderr[-3000:]}"


def _log(model_dir: Path) -> list[dict[str, str]]:
    with open(model_dir / LOG_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def _weights(model_dir: Path) -> list[np.ndarray]:
    from fp_reduction_3dcnn.train import load_keras

    return [np.asarray(w) for w in load_keras(model_dir / "model.keras").get_weights()]


_ONE_PROCESS_TWO_REPLICAS = r"""
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from fp_reduction_3dcnn.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def cluster_run(tiny, tmp_path_factory) -> dict:
    """The plan trained by a cluster of two workers (chief and worker 1, each with its own
    --out, as on two machines), and by one process with two replicas."""
    root = tmp_path_factory.mktemp("cluster")
    plan = root / "plan.json"
    PLAN.save(plan)
    chief, other = root / "chief" / "model", root / "worker" / "model"
    t0 = time.monotonic()
    workers = _run_cluster(
        [
            _train_args(tiny, plan, chief, "--strategy", "multiworker"),
            _train_args(tiny, plan, other, "--strategy", "multiworker"),
        ],
        root / "logs",
    )
    seconds = time.monotonic() - t0
    one = root / "one" / "model"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _ONE_PROCESS_TWO_REPLICAS,
            *_train_args(tiny, plan, one, "--strategy", "mirrored"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "plan": plan,
        "chief": chief,
        "other": other,
        "one": one,
        "workers": workers,
        "seconds": seconds,
    }


def test_two_workers_train_as_one_process_with_two_replicas(cluster_run):
    workers = cluster_run["workers"]
    _ok(workers)
    chief, other = workers[0].summary(), workers[1].summary()
    assert (chief["chief"], other["chief"]) == (True, False)
    assert chief["workers"] == other["workers"] == 2
    assert chief["replicas"] == 2 and chief["epochs_done"] == PLAN.epochs

    # The chief's folder is whole: sealed, one log row per epoch, checkpoints, TensorBoard,
    # a model that loads in safe mode.
    folder = cluster_run["chief"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert is_sealed(manifest)
    assert [int(r["epoch"]) for r in _log(folder)] == list(range(PLAN.epochs))
    assert sorted(p.name for p in (folder / "checkpoints").glob("epoch_*.keras")) == [
        f"epoch_{e:03d}.keras" for e in range(1, PLAN.epochs + 1)
    ]
    assert list((folder / "logs" / "train").glob("events.out.tfevents.*"))
    _weights(folder)

    # Worker 1 wrote nothing: not its --out, and its private folder is gone.
    assert not cluster_run["other"].exists()
    assert not list(workers[1].tmpdir.glob("lungct-worker-*"))

    # The epoch losses of one process with two replicas (validation is the chief's alone).
    one = _log(cluster_run["one"])
    got = [float(r["loss"]) for r in _log(folder)]
    want = [float(r["loss"]) for r in one]
    np.testing.assert_allclose(got, want, rtol=RTOL)
    for key in ("val_loss", "val_auc"):
        np.testing.assert_allclose(
            [float(r[key]) for r in _log(folder)], [float(r[key]) for r in one], rtol=RTOL
        )


@pytest.mark.slow
def test_a_resumed_cluster_ends_where_an_uninterrupted_one_ends(cluster_run, tiny, tmp_path):
    """The chief alone holds the backup; worker 1 starts the last epoch from the chief's
    weights and optimiser state (without them the all-reduced gradients would differ)."""
    plan, out = cluster_run["plan"], tmp_path / "resumed"

    def run(*extra: str) -> list[Worker]:
        return _run_cluster(
            [
                _train_args(tiny, plan, out, "--strategy", "multiworker", *extra),
                _train_args(tiny, plan, tmp_path / "w1", "--strategy", "multiworker", *extra),
            ],
            tmp_path / f"logs{len(extra)}",
        )

    _ok(run("--epochs", str(PLAN.epochs - 1)))
    assert [int(r["epoch"]) for r in _log(out)] == list(range(PLAN.epochs - 1))
    _ok(run("--epochs", str(PLAN.epochs), "--resume"))
    assert [int(r["epoch"]) for r in _log(out)] == list(range(PLAN.epochs))
    assert not (tmp_path / "w1").exists()
    for a, b in zip(_weights(cluster_run["chief"]), _weights(out), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_worker_that_stops_stops_the_cluster_in_one_line(cluster_run, tiny, tmp_path):
    """The chief refuses a folder that holds a model (no --resume); worker 1, waiting for
    it, ends with one line too, both with status 2."""
    plan = cluster_run["plan"]
    workers = _run_cluster(
        [
            _train_args(tiny, plan, cluster_run["chief"], "--strategy", "multiworker"),
            _train_args(tiny, plan, tmp_path / "w1", "--strategy", "multiworker"),
        ],
        tmp_path / "logs",
    )
    assert [w.returncode for w in workers] == [2, 2], [w.stderr[-2000:] for w in workers]
    assert "already holds a model" in workers[0].stderr
    line = workers[1].stderr.strip().splitlines()
    assert len(line) == 1 and "another worker of the cluster stopped" in line[0], line


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "needs TF_CONFIG"),
        ('{"cluster": ', "is not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', 'lacks "cluster"'),
        ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "names jobs ps"),
        ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
        (
            '{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}',
            "twice",
        ),
        ('{"cluster": {"worker": ["a:1"]}}', 'lacks "task"'),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "not a job"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "range"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}', "integer"),
        ('{"cluster": {"chief": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}', "one"),
    ],
)
def test_a_bad_tf_config_is_one_line(text, says):
    with pytest.raises(LungCTError, match=says) as caught:
        read_tf_config(text)
    assert "\n" not in str(caught.value) and "TF_CONFIG" in str(caught.value)


def test_a_good_tf_config_and_the_helpers_outside_a_cluster(tmp_path):
    config = read_tf_config(
        '{"cluster": {"chief": ["h0:2222"], "worker": ["h1:2222", "h2:2222"]}, '
        '"task": {"type": "worker", "index": 1}}'
    )
    assert config["task"] == {"type": "worker", "index": 1}
    assert "multiworker" in STRATEGIES
    assert is_chief(None) and worker_count(None) == 1
    with worker_dir(tmp_path / "model", None) as folder:
        assert folder == tmp_path / "model"


@pytest.mark.parametrize("config", [None, '{"cluster": {"worker": ["localhost:1"]'])
def test_the_command_with_a_bad_tf_config_exits_2_with_one_line(tiny, tmp_path, config):
    plan = tmp_path / "plan.json"
    PLAN.save(plan)
    env = _env() if config is None else _env(TF_CONFIG=config)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fp_reduction_3dcnn",
            *_train_args(tiny, plan, tmp_path / "model", "--strategy", "multiworker"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "TF_CONFIG" in lines[0], lines
    assert not (tmp_path / "model").exists()


def test_both_train_commands_take_multiworker():
    from fp_reduction_3dcnn.__main__ import build_parser

    parser = build_parser()
    common = ["--cache", "c", "--out", "o", "--strategy", "multiworker"]
    args = parser.parse_args(["train", "--candidates", "x", "--folds", "0", *common])
    assert args.strategy == "multiworker"
    args = parser.parse_args(["malignancy-train", "--data", "d", *common])
    assert args.strategy == "multiworker"
