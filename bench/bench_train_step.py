"""Training and prediction speed of the shipped architectures on this machine's device.

Usage::

    python bench/bench_train_step.py [--steps 20] [--mixed-precision] [--stages unet,fpr]
    KERAS_BACKEND=jax python bench/bench_train_step.py ...   # any Keras backend

For each stage, in one process: the model of its default plan, compiled as its trainer compiles
it, gets random batches of the plan's patch and batch size; after warm-up steps (tracing), the
median seconds of ``--steps`` timed ``train_on_batch`` calls give training samples per second,
and the median of timed ``predict_on_batch`` calls on a batch of extraction windows (U-Net) or
candidates (MGI-CNN) gives prediction samples per second. The figures bound what data loading
must keep up with; they do not include it. ``--mixed-precision`` trains under Keras's
``mixed_float16`` policy on a GPU (``mixed_bfloat16`` on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_seconds(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_unet(steps: int, window_batch: int, batch: int | None = None) -> dict:
    import numpy as np

    from unet_candidates.config import preset_plan
    from unet_candidates.train import compile_model

    plan = preset_plan("2d", **({"batch_size": batch} if batch else {}))
    model = compile_model(plan.build_model(), plan)
    rng = np.random.default_rng(0)
    shape = (plan.batch_size, *plan.patch_size[1:], plan.patch_size[0])
    x = rng.random(shape, dtype=np.float32)
    y = (rng.random((*shape[:-1], 1)) > 0.97).astype(np.float32)
    train_s = _median_seconds(lambda: model.train_on_batch(x, y), steps)
    windows = rng.random(
        (window_batch, *plan.window_size[1:], plan.window_size[0]), dtype=np.float32
    )
    predict_s = _median_seconds(lambda: np.asarray(model.predict_on_batch(windows)), steps)
    pixels = window_batch * plan.window_size[1] * plan.window_size[2]
    return {
        "params": int(model.count_params()),
        "batch": plan.batch_size,
        "patch_zyx": list(plan.patch_size),
        "train_samples_per_s": round(plan.batch_size / train_s, 1),
        "predict_windows": window_batch,
        "window_zyx": list(plan.window_size),
        "predict_megapixels_per_s": round(pixels / predict_s / 1e6, 2),
    }


def bench_fpr(steps: int, predict_batch: int, batch: int | None = None) -> dict:
    import numpy as np

    from fp_reduction_3dcnn.config import get_plan
    from fp_reduction_3dcnn.model import MGICNN, compile_model

    plan = get_plan("default", **({"batch_size": batch} if batch else {}))
    model = compile_model(MGICNN.from_plan(plan), plan)
    rng = np.random.default_rng(0)

    def batch(n: int) -> list:
        return [rng.random((n, *t.shape[1:]), dtype=np.float32) for t in model.inputs]

    x = batch(plan.batch_size)
    y = (rng.random((plan.batch_size, 1)) > 0.5).astype(np.float32)
    train_s = _median_seconds(lambda: model.train_on_batch(x, y), steps)
    xp = batch(predict_batch)
    predict_s = _median_seconds(lambda: np.asarray(model.predict_on_batch(xp)), steps)
    return {
        "params": int(model.count_params()),
        "batch": plan.batch_size,
        "train_samples_per_s": round(plan.batch_size / train_s, 1),
        "predict_samples_per_s": round(predict_batch / predict_s, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per figure (20)")
    parser.add_argument("--stages", default="unet,fpr", help="unet,fpr (default both)")
    parser.add_argument("--mixed-precision", action="store_true", help="mixed-precision policy")
    parser.add_argument("--window-batch", type=int, default=8, help="U-Net windows per predict")
    parser.add_argument("--predict-batch", type=int, default=256, help="MGI-CNN batch (256)")
    parser.add_argument("--unet-batch", type=int, help="U-Net training batch (default: the plan's)")
    parser.add_argument("--fpr-batch", type=int, help="MGI-CNN training batch (the plan's)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()

    import keras

    devices = _devices()
    if args.mixed_precision:
        keras.mixed_precision.set_global_policy(
            "mixed_float16" if devices["gpu"] else "mixed_bfloat16"
        )
    result = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "policy": keras.mixed_precision.global_policy().name,
        **devices,
    }
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if "unet" in stages:
        result["unet_2d"] = bench_unet(args.steps, args.window_batch, args.unet_batch)
        print(json.dumps({"unet_2d": result["unet_2d"]}), flush=True)
    if "fpr" in stages:
        result["mgi_cnn"] = bench_fpr(args.steps, args.predict_batch, args.fpr_batch)
        print(json.dumps({"mgi_cnn": result["mgi_cnn"]}), flush=True)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _devices() -> dict:
    """The accelerator the backend trains on, if any."""
    import keras

    backend = keras.backend.backend()
    gpu: list[str] = []
    if backend == "tensorflow":
        import tensorflow as tf

        gpu = [d.name for d in tf.config.list_physical_devices("GPU")]
    elif backend == "jax":
        import jax

        gpu = [str(d) for d in jax.devices() if d.platform == "gpu"]
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            gpu = [torch.cuda.get_device_name(0)]
    return {"gpu": gpu, "cpu_count": os.cpu_count()}


if __name__ == "__main__":
    sys.exit(main())
