"""Training speed of the MGI-CNN's trainer on ``model.fit`` against a hand-written loop, and the
cost of a second replica.

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
- ``fit-2-replicas``: the same with ``--strategy mirrored`` over two logical CPU devices.

Each figure is samples per second over the timed steps (the first step of each run, which
traces the graph, left out), from the ``train_samples_per_s`` the trainer logs or the same
timing in the loop. Printed: the medians and the ratios fit / loop and 2 replicas / fit, as
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
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
    strategy = "mirrored" if mode == "fit-2-replicas" else "none"
    train(plan, cache, candidates, list(range(10)), [], out, strategy=strategy, progress=False)
    rate = float(read_log(out)[-1]["train_samples_per_s"])
print("RATE" + json.dumps(rate))
"""


def run(mode: str, plan: Path, tiny: dict, out: Path) -> float:
    """Samples per second of one training run in a fresh process."""
    argv = [sys.executable, "-c", _CHILD, mode, str(plan), tiny["cache"], tiny["candidates"]]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([*argv, str(out)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} failed: {done.stderr.strip()[-2000:]}")
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RATE"))
    return float(json.loads(line[4:]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="steps of the epoch (30)")
    parser.add_argument("--repeats", type=int, default=3, help="runs each way (3)")
    parser.add_argument("--batch", type=int, default=128, help="global batch (plan: 128)")
    parser.add_argument("--work", help="folder for the data (default: a temporary one)")
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
        modes = ("loop", "fit", "fit-2-replicas")
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
                "ratio_fit_over_loop": round(med["fit"] / med["loop"], 3),
                "ratio_2_replicas_over_fit": round(med["fit-2-replicas"] / med["fit"], 3),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
