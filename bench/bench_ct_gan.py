"""CT-GAN throughput: training samples/s of the former loop, of ``model.fit`` and of ``model.fit``
on two replicas; time per injected nodule.

* training: the default plan (gf = df = 8, batches of 8 augmented 32^3 cubes, sampling and
  normalisation included) for ``--steps`` steps, three ways in one process, alternately,
  ``--train-repeats`` times:

  - ``loop``: the loop the trainer had before ``model.fit`` (kept here as the baseline): its
    ``tf.function`` GradientTape step on batches made in the loop from one random stream;
  - ``fit``: ``ct_gan_augment.train.fit_gan`` as ``train`` runs it (``model.fit`` on a
    ``PyDataset``, the contract's callbacks) on TensorFlow's default device;
  - ``fit-2-replicas``: the same with ``strategy="mirrored"`` over two logical CPU devices.

  Each figure is samples per second over the steps after the first (which traces the graph):
  the ``train_samples_per_s`` the trainer logs, or the same timing around the loop's batch and
  step. The process is given two logical CPU devices before TensorFlow starts, for all three.
  Printed: every figure, the medians and the ratios fit / loop and 2 replicas / fit;
* injection: one nodule pasted into the real 512x512x261 LIDC-IDRI-0002 MetaImage (0.68 x 0.68 x
  1.25 mm) or, without ../shared, into a 0.5 mm phantom: cut, generate, paste, blend, measure;
* automatic sites: lung mask + site choice on the same scan;
* with ``--paper``: the paper-width generator (gf = 100, 162.6 M parameters): one cube's
  generation time.

Run under the shared lock: ``flock /tmp/heavy_cpu.lock nice -n 10 .venv/bin/python
bench/bench_ct_gan.py [--steps 30] [--train-repeats 3] [--paper]``. Weights are untrained (speed does
not depend on them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from _measure import report

from ct_gan_augment.config import PLANS
from ct_gan_augment.data import TrainingCubes, base_shape
from ct_gan_augment.inject import CubeTamperer
from ct_gan_augment.manifest import ModelManifest
from ct_gan_augment.model import build_generator
from ct_gan_augment.normaliser import CubeNormaliser

REPO = Path(__file__).resolve().parents[1]
REAL_MHD = (
    REPO.parent
    / "shared/data/real/mhd/1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919.mhd"
)


def _cubes(plan, n: int = 16) -> TrainingCubes:
    rng = np.random.default_rng(0)
    shape = base_shape(plan)
    z, y, x = np.indices(shape) - (np.asarray(shape)[:, None, None, None] - 1) / 2.0
    ball = (z**2 + y**2 + x**2) <= 16
    base = rng.normal(-820, 60, (n, *shape))
    base[:, ball] = 30
    return TrainingCubes(base.astype(np.int16), [None] * n, plan)


def _former_step(g, d, g_opt, d_opt, plan):
    """The former ``GANTrainer``'s step: a ``tf.function`` updating G then D from one pass."""
    import tensorflow as tf

    from ct_gan_augment.gan import l1_weights

    real_label, fake_label = float(plan.real_label), float(plan.fake_label)
    weights = tf.constant(l1_weights(plan.cube_size, plan.hole_size, plan.l1_hole_weight))

    @tf.function(reduce_retracing=True)
    def step(real, condition):
        with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
            fake = g(condition, training=True)
            score_real = d([real, condition], training=True)
            score_fake = d([fake, condition], training=True)
            d_loss = 0.5 * (
                tf.reduce_mean(tf.square(score_real - real_label))
                + tf.reduce_mean(tf.square(score_fake - fake_label))
            )
            g_adv = tf.reduce_mean(tf.square(score_fake - real_label))
            g_l1 = tf.reduce_mean(weights * tf.abs(fake - real))
            g_loss = g_adv + plan.l1_weight * g_l1
        g_vars, d_vars = g.trainable_variables, d.trainable_variables
        g_opt.apply_gradients(zip(g_tape.gradient(g_loss, g_vars), g_vars, strict=True))
        d_opt.apply_gradients(zip(d_tape.gradient(d_loss, d_vars), d_vars, strict=True))
        return {"d_loss": d_loss, "g_loss": g_loss, "g_adv": g_adv, "g_l1": g_l1}

    return step


def loop_rate(plan, cubes: TrainingCubes, norm: CubeNormaliser, steps: int) -> float:
    """Samples/s of the former loop: batch made in the loop, then its step, read back."""
    import keras

    from ct_gan_augment.inject import make_condition
    from ct_gan_augment.model import build_discriminator

    keras.utils.set_random_seed(plan.seed)
    g, d = build_generator(plan, "injector"), build_discriminator(plan, "injector")
    g_opt = keras.optimizers.Adam(plan.g_learning_rate, beta_1=plan.beta_1)
    d_opt = keras.optimizers.Adam(plan.d_learning_rate, beta_1=plan.beta_1)
    g_opt.build(g.trainable_variables)
    d_opt.build(d.trainable_variables)
    step = _former_step(g, d, g_opt, d_opt, plan)
    rng = np.random.default_rng(plan.seed)
    timed = 0.0
    for k in range(steps):
        t0 = time.perf_counter()
        batch, diameters, centres = cubes.sample_sized(rng, plan.batch_size)
        real = norm.transform(batch)
        condition = make_condition(real, plan, diameters, centres)
        out = step(real[..., None], condition)
        {key: float(v) for key, v in out.items()}  # as the loop read its losses back
        if k:
            timed += time.perf_counter() - t0
    return (steps - 1) * plan.batch_size / timed


def fit_rate(plan, cubes: TrainingCubes, norm: CubeNormaliser, steps: int, strategy: str) -> float:
    """Samples/s of ``fit_gan``: one epoch of ``steps`` steps, as its log gives them."""
    from ct_gan_augment.train import fit_gan
    from lungct.training import read_log

    manifest = ModelManifest("injector", [0], ["x"], n_cubes=len(cubes))
    with tempfile.TemporaryDirectory() as tmp:
        fit_gan(
            plan.replace(steps=steps, checkpoint_every=steps), tmp, cubes, norm, manifest,
            progress=False, strategy=strategy,
        )  # fmt: skip
        return float(read_log(tmp)[-1]["train_samples_per_s"])


def train_rates(steps: int, repeats: int) -> dict:
    """The three ways, alternately, ``repeats`` times (in a process with two logical CPUs)."""
    plan = PLANS["default"]
    cubes = _cubes(plan)
    norm = CubeNormaliser.fit(cubes.central(), plan.hist_bins)
    modes = ("loop", "fit", "fit-2-replicas")
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for k in range(repeats):
        rates["loop"].append(loop_rate(plan, cubes, norm, steps))
        rates["fit"].append(fit_rate(plan, cubes, norm, steps, "none"))
        rates["fit-2-replicas"].append(fit_rate(plan, cubes, norm, steps, "mirrored"))
        print(
            f"repeat {k + 1}/{repeats}: "
            + ", ".join(f"{m} {rates[m][-1]:.1f}" for m in modes)
            + " samples/s",
            file=sys.stderr,
            flush=True,
        )
    med = {m: statistics.median(v) for m, v in rates.items()}
    return {
        "plan": "default (gf=df=8, batch 8, 32^3)",
        "steps": steps,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "samples_per_s": {m: [round(r, 1) for r in v] for m, v in rates.items()},
        "median_samples_per_s": {m: round(r, 1) for m, r in med.items()},
        "ratio_fit_over_loop": round(med["fit"] / med["loop"], 3),
        "ratio_2_replicas_over_fit": round(med["fit-2-replicas"] / med["fit"], 3),
    }


_CHILD = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
import bench_ct_gan
print("RESULT" + json.dumps(bench_ct_gan.train_rates(int(sys.argv[2]), int(sys.argv[3]))))
"""


def bench_training(steps: int, repeats: int) -> None:
    """:func:`train_rates` in a fresh process (its logical devices are set before TensorFlow
    starts)."""
    here = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, here, str(steps), str(repeats)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"training bench failed (exit {done.returncode})")
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line[6:])
    report("train: former loop, fit, fit on 2 replicas", result["median_samples_per_s"])
    print(json.dumps(result, indent=2), flush=True)


def _scan_and_site():
    from lungct.io import read_scan

    if REAL_MHD.exists():
        # A point in the right lung of LIDC-IDRI-0002.
        return read_scan(REAL_MHD), (-80.0, -20.0, -180.0), "real 512x512x261, 0.68x0.68x1.25 mm"
    from lungct.geometry import Geometry
    from lungct.scan import Scan

    geo = Geometry((240, 200, 160), (0.5, 0.5, 0.5), (-60.0, -50.0, -40.0))
    hu = np.random.default_rng(0).normal(-850, 20, geo.shape_zyx).astype(np.int16)
    return Scan(hu, geo, "phantom"), (0.0, 0.0, 0.0), "phantom 240x200x160, 0.5 mm"


def bench_injection(repeats: int) -> None:
    plan = PLANS["default"]
    cubes = _cubes(plan)
    norm = CubeNormaliser.fit(cubes.central(), plan.hist_bins)
    tamperer = CubeTamperer(build_generator(plan), norm, plan)
    scan, site, what = _scan_and_site()
    tamperer.inject(scan, site)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tamperer.inject(scan, site)
        times.append(time.perf_counter() - t0)
    report(f"inject one nodule ({what})", {"median_s": round(statistics.median(times), 3)})
    from ct_gan_augment.sites import choose_sites
    from lungct.lungmask import segment_lungs

    t0 = time.perf_counter()
    lung = segment_lungs(scan)
    t_mask = time.perf_counter() - t0
    t0 = time.perf_counter()
    sites = choose_sites(scan.array, lung, scan.geometry, 4, plan, np.random.default_rng(0))
    t_sites = time.perf_counter() - t0
    report(
        f"automatic sites ({what})",
        {
            "lung_mask_s": round(t_mask, 2),
            "choose_4_sites_s": round(t_sites, 2),
            "found": len(sites),
        },
    )


def bench_paper_generator() -> None:
    plan = PLANS["paper"]
    g = build_generator(plan)
    x = np.zeros((1, 32, 32, 32, 1), np.float32)
    g(x, training=False)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        g(x, training=False)
        times.append(time.perf_counter() - t0)
    report(
        "paper generator (gf=100): one cube",
        {
            "params_m": round(g.count_params() / 1e6, 1),
            "median_s": round(statistics.median(times), 3),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="training steps of each run (30)")
    parser.add_argument("--train-repeats", type=int, default=3, help="training runs each way (3)")
    parser.add_argument("--repeats", type=int, default=5, help="timed injections")
    parser.add_argument("--paper", action="store_true", help="also time the gf=100 generator")
    args = parser.parse_args()
    bench_training(args.steps, args.train_repeats)
    bench_injection(args.repeats)
    if args.paper:
        bench_paper_generator()


if __name__ == "__main__":
    main()
