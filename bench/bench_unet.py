"""Benchmark of the candidate stage: extraction time and peak memory on a real scan, training speed.

Usage::

    python bench/bench_unet.py                       # default plans, untrained weights
    python bench/bench_unet.py --model2d M2 --model3d M3 [--cache CACHE] [--out bench.json]

* Extraction: each preset runs in a fresh child process on the real LIDC-IDRI-0002 MetaImage
  (512x512x261, 0.68 x 0.68 x 1.25 mm): read -> resample to the plan's grid -> lung mask ->
  sliding windows -> candidates. Reported: wall seconds per step (after a warm-up extraction
  that traces the predict function, which a long run pays once), the whole first call, and
  the child's peak resident memory (ru_maxrss).
* Training: samples per second of ``train_on_batch`` on the plan's patch and batch size,
  after two warm-up steps; with ``--cache``, also the patch sampler alone (patches/s from the
  memory-mapped 1 mm cache, augmentation included).

Untrained weights give the same timings as trained ones except for the (small) post-processing
step, whose cost grows with the number of components.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
REAL_MHD = (
    REPO.parent
    / "shared/data/real/mhd/1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919.mhd"
)


def _untrained_model_dir(preset: str, root: Path) -> Path:
    from lungct.testing import seal_hand_made_model
    from unet_candidates.config import preset_plan
    from unet_candidates.train import compile_model

    plan = preset_plan(preset)
    out = root / f"untrained_{preset}"
    out.mkdir(parents=True, exist_ok=True)
    compile_model(plan.build_model(), plan).save(out / "model.keras")
    plan.save(out / "plan.json")
    seal_hand_made_model(out, "unet")
    return out


def child_extract(model_dir: str, scan_path: str) -> dict:
    """Run in a fresh process: time one extraction and report peak memory."""
    from lungct.io import read_scan
    from unet_candidates.extract import load_unet, run_extraction

    t0 = time.perf_counter()
    model, plan = load_unet(model_dir)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    scan = read_scan(scan_path)
    t_read = time.perf_counter() - t0
    first = run_extraction(scan, model, plan)
    t0 = time.perf_counter()
    scan = read_scan(scan_path)
    t_read2 = time.perf_counter() - t0
    second = run_extraction(scan, model, plan)
    return {
        "dims": plan.dims,
        "spacing_mm": list(plan.spacing),
        "window": list(plan.window_size),
        "model_grid_zyx": list(second.geometry.shape_zyx),
        "load_model_s": round(t_load, 2),
        "read_s": round(t_read2, 2),
        "first_call_s": round(t_read + first.seconds, 2),
        "steady_s": round(t_read2 + second.seconds, 2),
        "steps_s": {k: round(v, 2) for k, v in second.timings.items()},
        "candidates": len(second.candidates),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    }


def bench_extraction(model_dir: Path, scan: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model_dir), str(scan)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_training(model_dir: Path | None, preset: str, steps: int, cache: Path | None) -> dict:
    import numpy as np

    from unet_candidates.config import UNetPlan, preset_plan
    from unet_candidates.train import compile_model

    plan = UNetPlan.load(model_dir / "plan.json") if model_dir else preset_plan(preset)
    model = compile_model(plan.build_model(), plan)
    rng = np.random.default_rng(0)
    if plan.dims == "2d":
        x_shape = (plan.batch_size, *plan.patch_size[1:], plan.patch_size[0])
    else:
        x_shape = (plan.batch_size, *plan.patch_size, 1)
    x = rng.random(x_shape, dtype=np.float32)
    y = (rng.random((*x_shape[:-1], 1)) > 0.97).astype(np.float32)
    for _ in range(2):
        model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    out = {
        "dims": plan.dims,
        "patch": list(plan.patch_size),
        "batch": plan.batch_size,
        "params": int(model.count_params()),
        "median_step_s": round(step, 3),
        "train_samples_per_s": round(plan.batch_size / step, 1),
    }
    if cache is not None:
        out["sampler_patches_per_s"] = round(_sampler_speed(plan, cache), 1)
    return out


def _sampler_speed(plan, cache_dir: Path, n: int = 256) -> float:
    import numpy as np

    from lungct.cache import ScanCache
    from unet_candidates.data import PatchSampler, build_scan_samples

    cache = ScanCache(cache_dir)
    uids = cache.seriesuids()[:8]
    samples = [build_scan_samples(cache.open(u), np.zeros((0, 4)), plan) for u in uids]
    sampler = PatchSampler(cache, samples, plan, augment=True)
    t0 = time.perf_counter()
    count = sum(1 for _ in sampler.patches(n, epoch=0))
    return count / (time.perf_counter() - t0)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child_extract(sys.argv[2], sys.argv[3])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model2d", type=Path, help="trained 2-D model folder")
    parser.add_argument("--model3d", type=Path, help="trained 3-D model folder")
    parser.add_argument("--scan", type=Path, default=REAL_MHD, help="scan to extract from")
    parser.add_argument("--cache", type=Path, help="a per-scan cache, to time the sampler too")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if not args.scan.exists():
        print(f"skipped: {args.scan} not found", file=sys.stderr)
        return 0
    results: dict = {"scan": str(args.scan), "cpus": os.cpu_count(), "extract": {}, "train": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for preset, given in (("2d", args.model2d), ("3d", args.model3d)):
            model_dir = given or _untrained_model_dir(preset, Path(tmp))
            results["extract"][preset] = bench_extraction(model_dir, args.scan)
            results["extract"][preset]["weights"] = "trained" if given else "untrained"
            print(json.dumps(results["extract"][preset]), flush=True)
            results["train"][preset] = bench_training(given, preset, args.steps, args.cache)
            print(json.dumps(results["train"][preset]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
