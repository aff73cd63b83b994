"""Training speed of the candidate networks' trainer (U-Net, CenterNet) on ``model.fit``
against the hand-written loop it replaced, and the cost of a second replica.

Usage::

    python bench/bench_fit_candidates.py [--networks unet,centernet] [--steps 20] [--repeats 3]
        [--modes loop,fit,fit-2-replicas] [--baseline OTHER_CHECKOUT]

Writes 4 small synthetic scans (``lungct synth``, seed 77) and their cache, then trains each
network's default plan (``2d``, ``centernet``) for one epoch of ``--steps`` steps without
validation, each way in a fresh process, alternately, ``--repeats`` times:

- ``loop``: the former loop: ``train_on_batch`` on the sampler's batches, the plan's
  ``prefetch_batches`` made ahead in a background thread (4 for the U-Net, none for
  CenterNet), the cosine learning rate set before each step;
- ``fit``: ``unet_candidates train`` as it runs now (``model.fit`` on a ``PyDataset``, the
  training contract's callbacks: checkpoint, log, TensorBoard, the learning-rate schedule);
- ``fit-2-replicas``: the same with ``--strategy mirrored`` over two logical CPU devices;
- ``fit-baseline`` (with ``--baseline``): ``fit`` run from another checkout of the suite (the
  code before a change), interleaved with the others, for a before / after ratio.

Each figure is samples per second over the steps after the first (which traces the graph),
waiting for data included: the ``train_samples_per_s`` the trainer logs (its steps' time, each
from the step's start, when it asks for its batch, to its end), and in the loop the wall time
from the end of the first step to the end of the last. Each run also times its steps by wall
clock at the end of everything done after a step (in fit, after the contract's callbacks):
the mean of steps 3 to the last, ``mean_step_ms``. Printed: per network the medians and the
ratios fit / loop, 2 replicas / fit and fit / fit-baseline (those whose modes ran), as one
JSON object.
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
mode, network, plan_path, data, cache, out = sys.argv[1:7]
if mode == "fit-2-replicas":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import importlib
from pathlib import Path
import keras
from lungct.cache import ScanCache, find_scans
stamps = []  # wall clock at the end of each step, everything after the step included
if network == "unet":
    from unet_candidates.config import UNetPlan as Plan
    trainer = importlib.import_module("unet_candidates.train")
    hooks = trainer.UNET_NETWORK
else:
    from unet_candidates.centernet.config import CenterNetPlan as Plan
    trainer = importlib.import_module("unet_candidates.centernet.train")
    hooks = trainer.CENTERNET_NETWORK
plan = Plan.load(plan_path)
if mode == "loop":
    import keras
    from lungct.patches import prefetch
    from unet_candidates.train import _findings_by_series, _samples, cosine_learning_rate
    cache_ = ScanCache(cache)
    uids = [s.seriesuid for s in find_scans(data, range(10))]
    nodules, readers = _findings_by_series(Path(data) / "annotations.csv", uids)
    samples = _samples(hooks, cache_, uids, nodules, {}, (readers, {}), plan, plan.seed, False, "")
    sampler = hooks.sampler(cache_, samples, plan, augment=True, seed=plan.seed)
    keras.utils.set_random_seed(plan.seed)
    model = hooks.build(plan)
    total = plan.epochs * plan.steps_per_epoch
    steps, first_end = 0, 0.0
    for x, y in prefetch(sampler.batches(0), depth=plan.prefetch_batches):
        model.optimizer.learning_rate.assign(cosine_learning_rate(plan, steps / total))
        model.train_on_batch(x, y)
        steps += 1
        stamps.append(time.monotonic())
        if steps == 1:
            first_end = time.monotonic()
    rate = (steps - 1) * plan.batch_size / (time.monotonic() - first_end)
else:
    from lungct.training import read_log
    candidate_train = importlib.import_module("unet_candidates.train")

    class Stamp(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.monotonic())

    contract = candidate_train.fit_callbacks

    def with_stamps(*args, **kwargs):
        callbacks, budget = contract(*args, **kwargs)
        return [*callbacks, Stamp()], budget

    candidate_train.fit_callbacks = with_stamps  # the bench's clock after the contract's own
    strategy = "mirrored" if mode == "fit-2-replicas" else "none"
    trainer.train(plan, data, cache, list(range(10)), [], out, strategy=strategy, progress=False)
    rate = float(read_log(out)[-1]["train_samples_per_s"])
steps_ms = [1e3 * (b - a) for a, b in zip(stamps[1:], stamps[2:])]  # steps 3 ..
print("RATE" + json.dumps({"rate": rate, "step_ms": sum(steps_ms) / max(len(steps_ms), 1)}))
"""

MODES = ("loop", "fit", "fit-2-replicas")


def run(
    mode: str, network: str, plan: Path, data: Path, cache: Path, out: Path, baseline: Path | None
) -> tuple[float, float]:
    """Samples per second of one training run in a fresh process, and its mean step in ms."""
    repo = REPO
    if mode == "fit-baseline":
        mode, repo = "fit", baseline or REPO
    argv = [sys.executable, "-c", _CHILD, mode, network, str(plan), str(data), str(cache)]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    done = subprocess.run([*argv, str(out)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{network} {mode} failed: {done.stderr.strip()[-2000:]}")
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RATE"))
    result = json.loads(line[4:])
    return float(result["rate"]), float(result["step_ms"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="unet,centernet", help="unet,centernet")
    parser.add_argument("--steps", type=int, default=20, help="steps of the epoch (20)")
    parser.add_argument("--repeats", type=int, default=3, help="runs each way (3)")
    parser.add_argument("--work", help="folder for the data (default: a temporary one)")
    parser.add_argument(
        "--modes", default=",".join(MODES), help="ways to train, in this order (all three)"
    )
    parser.add_argument(
        "--baseline", type=Path, help="another checkout of the suite: adds the mode fit-baseline"
    )
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if args.baseline is not None:
        if not (args.baseline / "unet_candidates" / "train.py").is_file():
            parser.error(f"--baseline {args.baseline}: not a checkout of the suite")
        modes.append("fit-baseline")
    unknown = sorted(set(modes) - {*MODES, "fit-baseline"})
    if unknown:
        parser.error(f"unknown modes: {', '.join(unknown)}")

    from lungct.cache import prepare_dataset
    from lungct.synth import generate_dataset
    from unet_candidates.centernet.config import centernet_preset_plan
    from unet_candidates.config import preset_plan

    plans = {
        "unet": lambda: preset_plan("2d", epochs=1, steps_per_epoch=args.steps, val_patches=0),
        "centernet": lambda: centernet_preset_plan(
            "centernet", epochs=1, steps_per_epoch=args.steps, val_patches=0
        ),
    }
    report: dict = {"steps": args.steps, "repeats": args.repeats, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        root = Path(tmp)
        data, cache = root / "data", root / "cache"
        generate_dataset(data, 4, seed=77, size="small", progress=False)
        prepare_dataset(data, cache, workers=2, progress=False)
        for network in args.networks.split(","):
            plan_path = root / f"{network}.json"
            plan = plans[network]()
            plan.save(plan_path)
            rates: dict[str, list[float]] = {m: [] for m in modes}
            step_ms: dict[str, list[float]] = {m: [] for m in modes}
            for k in range(args.repeats):
                for mode in modes:
                    out = root / f"{network}-{mode}-{k}"
                    rate, step = run(mode, network, plan_path, data, cache, out, args.baseline)
                    rates[mode].append(rate)
                    step_ms[mode].append(step)
                print(
                    f"{network} repeat {k + 1}/{args.repeats}: "
                    + ", ".join(f"{m} {rates[m][-1]:.1f}" for m in modes)
                    + " samples/s",
                    file=sys.stderr,
                    flush=True,
                )
            med = {m: statistics.median(v) for m, v in rates.items()}
            report[network] = {
                "plan": plan.name,
                "batch": plan.batch_size,
                "samples_per_s": {m: [round(r, 1) for r in v] for m, v in rates.items()},
                "median_samples_per_s": {m: round(r, 1) for m, r in med.items()},
                "mean_step_ms": {m: [round(t, 1) for t in v] for m, v in step_ms.items()},
                "median_of_mean_step_ms": {
                    m: round(statistics.median(v), 1) for m, v in step_ms.items()
                },
            }
            for name, top, bottom in (
                ("ratio_fit_over_loop", "fit", "loop"),
                ("ratio_2_replicas_over_fit", "fit-2-replicas", "fit"),
                ("ratio_fit_over_baseline", "fit", "fit-baseline"),
            ):
                if top in med and bottom in med:
                    report[network][name] = round(med[top] / med[bottom], 3)
                    # the same ratio repeat by repeat (each pair ran back to back)
                    report[network][name + "_per_repeat"] = [
                        round(a / b, 3) for a, b in zip(rates[top], rates[bottom], strict=True)
                    ]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
