"""CT-GAN throughput: training steps/s of the default plan, and time per injected nodule.

* training: batches of 8 augmented 32^3 cubes (sampling + normalisation included), medians over
  timed steps after the first (graph tracing) ones;
* injection: one nodule pasted into the real 512x512x261 LIDC-IDRI-0002 MetaImage (0.68 x 0.68 x
  1.25 mm) or, without ../shared, into a 0.5 mm phantom: cut, generate, paste, blend, measure;
* automatic sites: lung mask + site choice on the same scan;
* with ``--paper``: the paper-width generator (gf = 100, 162.6 M parameters): one cube's
  generation time.

Run under the shared lock: ``flock /tmp/heavy_cpu.lock nice -n 10 .venv/bin/python
bench/bench_ct_gan.py [--steps 30] [--paper]``. Weights are untrained (speed does not depend
on them).
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def bench_training(steps: int) -> None:
    from ct_gan_augment.train import GANTrainer

    plan = PLANS["default"]
    cubes = _cubes(plan)
    norm = CubeNormaliser.fit(cubes.central(), plan.hist_bins)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = GANTrainer(
            plan, tmp, cubes, norm, ModelManifest("injector", [0], ["x"]), progress=False
        )
        t0 = time.perf_counter()
        trainer.train_step()
        warm = time.perf_counter() - t0
        for _ in range(2):
            trainer.train_step()
        times, batch_times = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.make_batch()
            batch_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    report(
        "train step, default plan (gf=df=8, batch 8, 32^3)",
        {
            "median_step_s": round(step, 3),
            "steps_per_s": round(1.0 / step, 2),
            "cubes_per_s": round(plan.batch_size / step, 1),
            "batch_prep_s": round(statistics.median(batch_times), 4),
            "first_step_s": round(warm, 1),
            "steps_in_10_min": int(600 / step),
            "g_params": build_generator(plan).count_params(),
        },
    )


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
    parser.add_argument("--steps", type=int, default=30, help="timed training steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed injections")
    parser.add_argument("--paper", action="store_true", help="also time the gf=100 generator")
    args = parser.parse_args()
    bench_training(args.steps)
    bench_injection(args.repeats)
    if args.paper:
        bench_paper_generator()


if __name__ == "__main__":
    main()
