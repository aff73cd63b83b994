"""Training speed of the MGI-CNN's trainer on ``model.fit`` against a hand-written loop, and the
cost of a second replica and of a second worker.

Usage::

    python bench/bench_fit.py [--steps 30] [--repeats 3] [--batch 128] [--work DIR]

Writes a small labelled set with its cache (``fp_reduction_3dcnn.testing.make_tiny_dataset``:
8 scans of 48x64x64 voxels, 40 candidates each), then trains the default plan's MGI-CNN (full
size) for one epoch of ``--steps`` steps, each way in a fresh process, alternately, ``--repeats``
times:

- ``loop``: the loop the trainer had before ``model.fit``: ``train_on_batch`` on the same
  sampler's batches, cut one batch ahead in a background thread;
- ``fit``: ``fp_reduction_3dcnn.train.train`` as ``train`` runs it (``model.fit`` on a
  ``PyDataset``, the contract's callbacks: checkpoint, log, TensorBoard);
- ``fit-2-replicas``: the same with ``--strategy mirrored`` over two logical CPU devices;
- ``fit-2-workers``: the same with ``--strategy multiworker``, two worker processes on this
  machine talking over localhost (``TF_CONFIG`` on two free ports); the chief's figure. Both
  share the machine's cores, and each cuts the patches of the whole global batch.

Each figure is samples per second over the timed steps (the first step of each run, which
traces the graph, left out), from the ``train_samples_per_s`` the trainer logs or the same
timing in the loop; global samples (the plan's batch) in every mode. Printed: the medians and
the ratios fit / loop, 2 replicas / fit and 2 workers / fit, as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(REPO))

_CHILD = r"""
import json, sys, time
mode, plan_path, cache, candidates, out = sys.argv[1:6]
if mode == "fit-2-replicas":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from fp_reduction_3dcnn.config import FPRPlan
plan = FPRPlan.load(plan_path)
if mode == "loop":
    import keras
    import numpy as np
    from fp_reduction_3dcnn.data import PatchCutter, load_candidates, rows_in_folds, series_folds
    from fp_reduction_3dcnn.model import compile_model
    from fp_reduction_3dcnn.networks import build_network
    from fp_reduction_3dcnn.sampler import BalancedBatchSampler
    from lungct.cache import ScanCache
    from lungct.patches import prefetch
    cache_ = ScanCache(cache)
    table = load_candidates(candidates)
    rows = rows_in_folds(table, series_folds(cache_, table.uids, None), list(range(10)))
    sampler = BalancedBatchSampler(plan, PatchCutter(plan, cache_), table, rows)
    keras.utils.set_random_seed(plan.seed)
    model = compile_model(build_network(plan), plan)
    step_time, steps = 0.0, 0
    for inputs, labels in prefetch(sampler.epoch(0), depth=3):
        ts = time.monotonic()
        model.train_on_batch(inputs, labels)
        step_time += time.monotonic() - ts if steps else 0.0
        steps += 1
    rate = (steps - 1) * plan.batch_size / step_time
else:
    from fp_reduction_3dcnn.train import train
    from lungct.training import read_log
    strategy = {"fit-2-replicas": "mirrored", "fit-2-workers": "multiworker"}.get(mode, "none")
    train(plan, cache, candidates, list(range(10)), [], out, strategy=strategy, progress=False)
    log = read_log(out)  # empty on a worker other than the chief: it writes no folder
    rate = float(log[-1]["train_samples_per_s"]) if log else 0.0
print("RATE" + json.dumps(rate))
"""


def _rate(mode: str, stdout: str) -> float:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("RATE"))
    return float(json.loads(line[4:]))


def run(mode: str, plan: Path, tiny: dict, out: Path) -> float:
    """Samples per second of one training run in a fresh process (two for
    ``fit-2-workers``: the chief's figure)."""
    argv = [sys.executable, "-c", _CHILD, mode, str(plan), tiny["cache"], tiny["candidates"]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if mode == "fit-2-workers":
        return run_workers(argv, env, out)
    done = subprocess.run([*argv, str(out)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed: {done.stderr.strip()[-2000:]}")
    return _rate(mode, done.stdout)


def run_workers(argv: list[str], env: dict[str, str], out: Path, timeout: float = 3600) -> float:
    """Two workers of a localhost cluster, each with its own folder; the chief's rate."""
    sockets = [socket.socket() for _ in range(2)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    addresses = [f"localhost:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for k in range(2):
            config = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": k}}
            with open(out / f"{k}.out", "w") as stdout, open(out / f"{k}.err", "w") as stderr:
                procs.append(
                    subprocess.Popen(
                        [*argv, str(out / f"worker{k}")],
                        env={**env, "TF_CONFIG": json.dumps(config)},
                        stdout=stdout,
                        stderr=stderr,
                    )
                )
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for k, p in enumerate(procs):
        if p.returncode != 0:
            err = (out / f"{k}.err").read_text().strip()[-2000:]
            raise SystemExit(f"fit-2-workers: worker {k} failed: {err}")
    return _rate("fit-2-workers", (out / "0.out").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps of the epoch (30)")
    parser.add_argument("--repeats", type=int, default=3, help="runs each way (3)")
    parser.add_argument("--batch", type=int, default=128, help="global batch (plan: 128)")
    parser.add_argument("--work", help="folder for the data (default: a temporary one)")
    parser.add_argument(
        "--modes",
        default="loop,fit,fit-2-replicas,fit-2-workers",
        help="which runs, comma-separated (default: all four)",
    )
    args = parser.parse_args()

    from fp_reduction_3dcnn.config import get_plan
    from fp_reduction_3dcnn.testing import make_tiny_dataset

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        tiny = make_tiny_dataset(
            root / "set", n_scans=8, shape_zyx=(48, 64, 64), negatives_per_scan=40, seed=3
        )
        plan_path = root / "plan.json"
        get_plan("default").replace(
            batch_size=args.batch, steps_per_epoch=args.steps, epochs=1
        ).save(plan_path)
        modes = tuple(m for m in args.modes.split(",") if m)
        rates: dict[str, list[float]] = {m: [] for m in modes}
        for k in range(args.repeats):
            for mode in modes:
                rates[mode].append(run(mode, plan_path, tiny, root / f"{mode}-{k}"))
            print(
                f"repeat {k + 1}/{args.repeats}: "
                + ", ".join(f"{m} {rates[m][-1]:.1f}" for m in modes)
                + " samples/s",
                file=sys.stderr,
                flush=True,
            )
    med = {m: statistics.median(v) for m, v in rates.items()}
    print(
        json.dumps(
            {
                "network": "mgicnn (default plan)",
                "batch": args.batch,
                "steps": args.steps,
                "repeats": args.repeats,
                "cpu_count": os.cpu_count(),
                "samples_per_s": {m: [round(r, 1) for r in v] for m, v in rates.items()},
                "median_samples_per_s": {m: round(r, 1) for m, r in med.items()},
                **{
                    name: round(med[a] / med[b], 3)
                    for name, a, b in (
                        ("ratio_fit_over_loop", "fit", "loop"),
                        ("ratio_2_replicas_over_fit", "fit-2-replicas", "fit"),
                        ("ratio_2_workers_over_fit", "fit-2-workers", "fit"),
                    )
                    if a in med and b in med
                },
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
