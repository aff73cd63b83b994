"""Benchmark of the stage-1 candidate alternatives: extraction, peak memory, training, ratios.

Usage::

    python bench/bench_unet.py                       # 2d, 3d, centernet; untrained weights
    python bench/bench_unet.py --presets 2d,centernet --repeats 5 --steps 20
    python bench/bench_unet.py --model2d M2 --model3d M3 --centernet MC [--cache CACHE] \\
        [--out bench.json]

Every preset of ``--presets`` (default ``2d,3d,centernet``) is measured in the same run: the
U-Net presets of :data:`unet_candidates.config.PRESETS` and the CenterNet-style heatmap
detector's of :data:`unet_candidates.centernet.config.CENTERNET_PRESETS`. A trained model folder
(``--model2d``, ``--model3d``, ``--centernet``) is used for its preset; otherwise an untrained
model of the preset's plan is saved and sealed in a temporary folder.

* Extraction: each preset runs in a fresh child process on the real LIDC-IDRI-0002 MetaImage
  (512x512x261, 0.68 x 0.68 x 1.25 mm): read -> resample to the plan's grid -> lung mask ->
  sliding windows -> candidates (a U-Net's probability components, a CenterNet's heatmap
  peaks). A warm-up extraction traces the predict function (which a long run pays once) and
  gives ``first_call_s``; then ``--repeats`` timed extractions (default 3) give the medians
  ``steady_s`` (read + extraction) and ``steps_s`` (per step). ``peak_rss_mb`` is the child's
  peak resident memory (ru_maxrss).
* Training: samples per second of ``train_on_batch`` on random inputs of the plan's patch and
  batch size (median of ``--steps`` timed steps after two warm-up steps). A U-Net's target is a
  sparse binary mask; a CenterNet's has the four channels its loss reads
  (:data:`unet_candidates.centernet.loss.TARGET_CHANNELS`: a heatmap with one centre voxel per
  patch, the loss weight, the diameter and the size mask). With ``--cache``, also the patch
  sampler alone (patches/s from the memory-mapped 1 mm cache, augmentation and, for the
  CenterNet, its heatmap targets included).
* Ratios: each other preset's figures divided by the first preset's (``2d`` by default), under
  ``ratios``: ``train_samples_per_s`` (above 1 = trains faster), ``extract_steady_s`` and
  ``extract_peak_rss_mb`` (above 1 = slower, more memory).

Output: one JSON line per measurement on stdout (``measure`` is ``extract``, ``train`` or
``ratio``), progress on stderr, everything in the ``--out`` JSON file.

Untrained weights give the same timings as trained ones except for the (small) post-processing
step, whose cost grows with the number of components or peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parents[1]
REAL_MHD = (
    REPO.parent
    / "shared/data/real/mhd/1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919.mhd"
)
DEFAULT_PRESETS = "2d,3d,centernet"


def _progress(message: str) -> None:
    print(f"[bench_unet] {message}", file=sys.stderr, flush=True)


def is_centernet_preset(preset: str) -> bool:
    """Whether ``preset`` names a CenterNet plan (else a U-Net one)."""
    from unet_candidates.centernet.config import CENTERNET_PRESETS

    return preset in CENTERNET_PRESETS


def known_presets() -> list[str]:
    """Every preset name this benchmark accepts: the U-Net's, then the CenterNet's."""
    from unet_candidates.centernet.config import CENTERNET_PRESETS
    from unet_candidates.config import PRESETS

    return [*PRESETS, *CENTERNET_PRESETS]


def load_plan(preset: str, model_dir: Path | None = None) -> Any:
    """The plan of a model folder, else of the named preset (a U-Net's or a CenterNet's)."""
    from unet_candidates.centernet.config import (
        CenterNetPlan,
        centernet_preset_plan,
        is_centernet_plan,
    )
    from unet_candidates.config import UNetPlan, preset_plan

    if model_dir is not None:
        if is_centernet_plan(model_dir):
            return CenterNetPlan.load(model_dir / "plan.json")
        return UNetPlan.load(model_dir / "plan.json")
    return centernet_preset_plan(preset) if is_centernet_preset(preset) else preset_plan(preset)


def compiled_model(plan: Any) -> Any:
    """A fresh model of ``plan``, compiled as its trainer compiles it."""
    from unet_candidates.centernet.config import CenterNetPlan

    if isinstance(plan, CenterNetPlan):
        from unet_candidates.centernet.train import compile_centernet

        return compile_centernet(plan.build_model(), plan)
    from unet_candidates.train import compile_model

    return compile_model(plan.build_model(), plan)


def _untrained_model_dir(preset: str, root: Path) -> Path:
    """Save and seal an untrained model folder of ``preset`` under ``root``."""
    from lungct.testing import seal_hand_made_model

    plan = load_plan(preset)
    out = root / f"untrained_{preset}"
    out.mkdir(parents=True, exist_ok=True)
    compiled_model(plan).save(out / "model.keras")
    plan.save(out / "plan.json")
    seal_hand_made_model(out, "centernet" if is_centernet_preset(preset) else "unet")
    return out


def child_extract(model_dir: str, scan_path: str, repeats: int = 3) -> dict:
    """Run in a fresh process: one warm-up extraction, ``repeats`` timed ones, peak memory."""
    from lungct.io import read_scan
    from unet_candidates.centernet.config import is_centernet_plan

    centernet = is_centernet_plan(model_dir)
    if centernet:
        from unet_candidates.centernet.extract import load_centernet as load
        from unet_candidates.centernet.extract import run_centernet_extraction as run
    else:
        from unet_candidates.extract import load_unet as load
        from unet_candidates.extract import run_extraction as run

    t0 = time.perf_counter()
    model, plan = load(model_dir)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    scan = read_scan(scan_path)
    t_read = time.perf_counter() - t0
    first = run(scan, model, plan)
    reads, steady, steps = [], [], {}
    result = first
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        scan = read_scan(scan_path)
        t_read_i = time.perf_counter() - t0
        result = run(scan, model, plan)
        reads.append(t_read_i)
        steady.append(t_read_i + result.seconds)
        for key, seconds in result.timings.items():
            steps.setdefault(key, []).append(seconds)
    return {
        "detector": "centernet" if centernet else "unet",
        "dims": plan.dims,
        "spacing_mm": list(plan.spacing),
        "window": list(plan.window_size),
        "model_grid_zyx": list(result.geometry.shape_zyx),
        "load_model_s": round(t_load, 2),
        "first_call_s": round(t_read + first.seconds, 2),
        "repeats": len(steady),
        "read_s": round(statistics.median(reads), 2),
        "steady_s": round(statistics.median(steady), 2),
        "steady_runs_s": [round(s, 2) for s in steady],
        "steps_s": {k: round(statistics.median(v), 2) for k, v in steps.items()},
        "candidates": len(result.candidates),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
    }


def bench_extraction(model_dir: Path, scan: Path, repeats: int = 3) -> dict:
    """:func:`child_extract` in a fresh Python process (its own peak memory)."""
    cmd = [sys.executable, __file__, "--child", str(model_dir), str(scan), str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def random_batch(plan: Any, rng: Any) -> tuple[Any, Any]:
    """Random ``(x, y)`` of the plan's patch and batch size, with targets its loss reads."""
    import numpy as np

    from unet_candidates.centernet.config import CenterNetPlan

    if plan.dims == "2d":
        x_shape = (plan.batch_size, *plan.patch_size[1:], plan.patch_size[0])
    else:
        x_shape = (plan.batch_size, *plan.patch_size, 1)
    x = rng.random(x_shape, dtype=np.float32)
    if not isinstance(plan, CenterNetPlan):
        return x, (rng.random((*x_shape[:-1], 1)) > 0.97).astype(np.float32)
    from unet_candidates.centernet.loss import TARGET_CHANNELS

    # Heatmap: mostly near 0 with a Gaussian-like tail, exactly 1 at one centre per patch.
    spatial = x_shape[1:-1]
    heat = rng.random(x_shape[:-1], dtype=np.float32) ** 8
    for b in range(plan.batch_size):
        heat[(b, *(int(rng.integers(n)) for n in spatial))] = 1.0
    core = (heat >= plan.size_region).astype(np.float32)
    weight = np.ones_like(heat)
    size = core * np.float32(plan.size_prior_mm)
    y = np.stack([heat, weight, size, core], axis=-1)
    assert y.shape[-1] == len(TARGET_CHANNELS)
    return x, y


def bench_training(model_dir: Path | None, preset: str, steps: int, cache: Path | None) -> dict:
    """Median ``train_on_batch`` step on random data; the sampler's speed with ``cache``."""
    import keras
    import numpy as np

    plan = load_plan(preset, model_dir)
    keras.backend.clear_session()
    model = compiled_model(plan)
    x, y = random_batch(plan, np.random.default_rng(0))
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
        "target_shape": list(y.shape),
        "params": int(model.count_params()),
        "median_step_s": round(step, 3),
        "train_samples_per_s": round(plan.batch_size / step, 1),
    }
    if cache is not None:
        out["sampler_patches_per_s"] = round(_sampler_speed(plan, cache), 1)
    return out


def _sampler_speed(plan: Any, cache_dir: Path, n: int = 256) -> float:
    import numpy as np

    from lungct.cache import ScanCache
    from unet_candidates.centernet.config import CenterNetPlan

    if isinstance(plan, CenterNetPlan):
        from unet_candidates.centernet.targets import HeatmapSampler as Sampler
        from unet_candidates.centernet.targets import centernet_scan_samples as scan_samples
    else:
        from unet_candidates.data import PatchSampler as Sampler
        from unet_candidates.data import build_scan_samples as scan_samples

    cache = ScanCache(cache_dir)
    uids = cache.seriesuids()[:8]
    samples = [scan_samples(cache.open(u), np.zeros((0, 4)), plan) for u in uids]
    sampler = Sampler(cache, samples, plan, augment=True)
    t0 = time.perf_counter()
    count = sum(1 for _ in sampler.patches(n, epoch=0))
    return count / (time.perf_counter() - t0)


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return round(value / base, 3)


def ratios(results: dict, presets: list[str]) -> dict:
    """Each preset after the first, as ratios to the first's figures."""
    base = presets[0]
    ext, train = results["extract"], results["train"]
    out = {}
    for preset in presets[1:]:
        out[preset] = {
            "baseline": base,
            "train_samples_per_s": _ratio(
                train[preset]["train_samples_per_s"], train[base]["train_samples_per_s"]
            ),
            "extract_steady_s": _ratio(ext[preset]["steady_s"], ext[base]["steady_s"]),
            "extract_peak_rss_mb": _ratio(ext[preset]["peak_rss_mb"], ext[base]["peak_rss_mb"]),
        }
    return out


def _emit(measure: str, preset: str, figures: dict) -> None:
    print(json.dumps({"measure": measure, "preset": preset, **figures}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--presets",
        default=DEFAULT_PRESETS,
        help=f"comma list of presets; the first is the ratios' baseline (default {DEFAULT_PRESETS})",
    )
    parser.add_argument("--model2d", type=Path, help="trained 2-D U-Net folder (preset 2d)")
    parser.add_argument("--model3d", type=Path, help="trained 3-D U-Net folder (preset 3d)")
    parser.add_argument("--centernet", type=Path, help="trained CenterNet folder (centernet)")
    parser.add_argument("--scan", type=Path, default=REAL_MHD, help="scan to extract from")
    parser.add_argument("--cache", type=Path, help="a per-scan cache, to time the sampler too")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed extractions after the warm-up (median)"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    known = known_presets()
    unknown = [p for p in args.presets if p not in known]
    if not args.presets or unknown or len(set(args.presets)) != len(args.presets):
        parser.error(f"--presets: give distinct names from {known} (got {args.presets})")
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1")
    args.given = {"2d": args.model2d, "3d": args.model3d, "centernet": args.centernet}
    for preset, folder in args.given.items():
        if folder is not None and preset not in args.presets:
            _progress(f"warning: the folder for {preset!r} is unused ({preset} not in --presets)")
    return args


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 3
        print(json.dumps(child_extract(sys.argv[2], sys.argv[3], repeats)))
        return 0
    args = parse_args()
    if not args.scan.exists():
        print(f"skipped: {args.scan} not found", file=sys.stderr)
        return 0
    results: dict = {
        "scan": str(args.scan),
        "cpus": os.cpu_count(),
        "presets": args.presets,
        "repeats": args.repeats,
        "steps": args.steps,
        "extract": {},
        "train": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            given = args.given.get(preset)
            t0 = time.perf_counter()
            _progress(
                f"{preset}: {'model ' + str(given) if given else 'saving an untrained model'}"
            )
            model_dir = given or _untrained_model_dir(preset, Path(tmp))
            _progress(f"{preset}: extraction, 1 warm-up + {args.repeats} timed, in a child")
            extract = bench_extraction(model_dir, args.scan, args.repeats)
            extract["weights"] = "trained" if given else "untrained"
            results["extract"][preset] = extract
            _emit("extract", preset, extract)
            _progress(f"{preset}: training, 2 warm-up + {args.steps} timed steps")
            results["train"][preset] = bench_training(given, preset, args.steps, args.cache)
            _emit("train", preset, results["train"][preset])
            _progress(f"{preset}: done in {time.perf_counter() - t0:.0f} s")
    results["ratios"] = ratios(results, args.presets)
    for preset, figures in results["ratios"].items():
        _emit("ratio", preset, figures)
        _progress(
            f"{preset} / {figures['baseline']}: training x{figures['train_samples_per_s']} "
            f"samples/s, extraction x{figures['extract_steady_s']} s, "
            f"peak RSS x{figures['extract_peak_rss_mb']}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
