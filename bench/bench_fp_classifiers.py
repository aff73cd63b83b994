"""The false-positive reducers side by side: MGI-CNN, ResNet-3D and CNN-3D on this machine.

Usage::

    python bench/bench_fp_classifiers.py [--repeats 3] [--plans default,resnet3d,cnn3d]
    python bench/bench_fp_classifiers.py --plans default,default:variant=ri,default:merge=concat
    python bench/bench_fp_classifiers.py --out fp_classifiers.json
    python bench/bench_fp_classifiers.py --scan SCAN.mhd   # another real scan (default below)

For each plan, in one process, with its network built and compiled as ``train`` builds it:

* ``train_samples_per_s``: ``train_on_batch`` on random inputs of the plan's batch size (128),
  the network alone;
* ``sampler_samples_per_s``: balanced training batches cut and augmented from a per-scan cache
  (:class:`~fp_reduction_3dcnn.sampler.BalancedBatchSampler`), the data side alone;
* ``predict_s_per_1000``: seconds to score 1000 candidates, the network alone (4 batches of
  250 random inputs) and ``score_s_per_1000`` with their patches cut from the cache
  (:func:`~fp_reduction_3dcnn.predict.score_rows`, as ``predict`` scores them);
* ``scan_score_s``: seconds to score every candidate of one real scan as ``detect`` does
  (patches cut from the scan resampled in memory, batches of the shipped set's size, no TTA).
  The scan is the real LIDC-IDRI-0002 MetaImage (``--scan`` for another); its candidates are
  the shipped model set's U-Net's, extracted once before any timing. Skipped when the scan or
  the shipped set is missing.

A plan is a name of :data:`fp_reduction_3dcnn.config.PLANS` with optional field overrides after
a colon, ``+`` between them (``default:variant=zoom_in+merge=concat``): the MGI-CNN's variants
and merges are measured that way. Every figure is the median of ``--repeats`` timed runs after
one untimed warm-up (tracing), and each network's figures are also given as ratios to the
MGI-CNN's (the first plan): above 1 is faster for the speeds, slower for the seconds. The cache
is two random 160x256x256 scans on the 1 mm grid, so the patch cutting is exact cropping, as on
a prepared cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CANDIDATES = 1000
PREDICT_BATCH = 250
REAL_MHD = (
    Path(__file__).resolve().parents[2]
    / "shared/data/real/mhd/1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919.mhd"
)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: tracing, first memory maps
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fake_cache(root: Path) -> tuple[list[str], tuple]:
    import numpy as np

    from fp_reduction_3dcnn.testing import write_cache_entry
    from lungct.geometry import Geometry

    rng = np.random.default_rng(0)
    uids, lo, hi = [], [], []
    nz, ny, nx = 160, 256, 256
    for i in range(2):
        uid = f"1.3.6.1.4.1.77777.{i}"
        geometry = Geometry((nx, ny, nz), (1.0, 1.0, 1.0), (-150.0, -150.0, -300.0 + i))
        volume = rng.integers(-1000, 200, (nz, ny, nx), dtype=np.int16)
        write_cache_entry(root, uid, volume, geometry, i)
        uids.append(uid)
        lo.append(np.asarray(geometry.origin) + 30)
        hi.append(np.asarray(geometry.origin) + np.asarray([nx, ny, nz]) - 30)
    return uids, (np.asarray(lo), np.asarray(hi))


class RealScan:
    """One real scan resampled as ``detect`` resamples it, with the shipped U-Net's candidates."""

    def __init__(self, path: Path) -> None:
        import numpy as np

        from integration.pipeline import Detector, to_cache_grid
        from lungct.io import read_scan
        from unet_candidates import extract_candidates

        detector = Detector.load()
        self.path = path
        self.batch_size = int(detector.config.batch_size)
        self.cached = to_cache_grid(read_scan(path))
        found = extract_candidates(self.cached, detector.unet_model, detector.unet_plan)
        self.centres = np.asarray([[c.coordX, c.coordY, c.coordZ] for c in found], dtype=np.float64)


def scan_score_seconds(model, plan, scan: RealScan, repeats: int) -> float:
    """Median seconds to score every candidate of ``scan`` as ``detect`` does."""
    import numpy as np

    from fp_reduction_3dcnn.data import PatchCutter

    cutter = PatchCutter(plan, cache=None)

    def score() -> None:
        for start in range(0, len(scan.centres), scan.batch_size):
            inputs = cutter.cut_scan(scan.cached, scan.centres[start : start + scan.batch_size])
            np.asarray(model.predict_on_batch(inputs))

    return _median_seconds(score, repeats)


def parse_plan_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"default:variant=ri+merge=concat"`` ->
    ``("default", {"variant": "ri", "merge": "concat"})``. A value that reads as JSON (a number,
    true / false) is taken as such; ``,`` separates plans, so a list value cannot be given."""
    name, _, rest = spec.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split("+")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--plans: {spec!r}: expected field=value after the colon")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def bench_plan(
    name: str, cache_dir: Path, candidates: Path, repeats: int, scan: RealScan | None = None
) -> dict:
    """The figures of one plan's network."""
    import numpy as np

    from fp_reduction_3dcnn.config import get_plan
    from fp_reduction_3dcnn.data import PatchCutter, load_candidates
    from fp_reduction_3dcnn.model import compile_model
    from fp_reduction_3dcnn.networks import build_network
    from fp_reduction_3dcnn.predict import TrainedModel, score_rows
    from fp_reduction_3dcnn.sampler import BalancedBatchSampler
    from lungct.cache import ScanCache

    base, overrides = parse_plan_spec(name)
    plan = get_plan(base, **overrides)
    model = compile_model(build_network(plan), plan)
    rng = np.random.default_rng(0)

    def inputs(n: int) -> list[np.ndarray]:
        return [rng.random((n, *plan.input_shape), dtype=np.float32) for _ in model.inputs]

    x = inputs(plan.batch_size)
    y = (rng.random((plan.batch_size, 1)) < 1 / 7).astype(np.float32)
    train_s = _median_seconds(lambda: model.train_on_batch(x, y), repeats)

    chunks = [inputs(PREDICT_BATCH) for _ in range(CANDIDATES // PREDICT_BATCH)]
    predict_s = _median_seconds(
        lambda: [np.asarray(model.predict_on_batch(c)) for c in chunks], repeats
    )

    table = load_candidates(candidates)
    cutter = PatchCutter(plan, ScanCache(cache_dir))
    sampler = BalancedBatchSampler(plan, cutter, table, np.arange(len(table)))
    draw_rng = np.random.default_rng(1)
    sample_s = _median_seconds(lambda: sampler.draw(draw_rng), repeats)

    trained = TrainedModel(model, plan, None, cache_dir)  # score_rows reads only the model
    rows = np.arange(len(table))
    score_s = _median_seconds(
        lambda: score_rows(trained, cutter, table, rows, batch_size=PREDICT_BATCH, progress=False),
        repeats,
    )
    figures = {
        "plan": name,
        "network": plan.network,
        "params": int(model.count_params()),
        "input_xyz": [list(s) for s in plan.patch_sizes],
        "batch": plan.batch_size,
        "train_samples_per_s": round(plan.batch_size / train_s, 1),
        "sampler_samples_per_s": round(plan.batch_size / sample_s, 1),
        "predict_s_per_1000": round(predict_s * 1000 / CANDIDATES, 3),
        "score_s_per_1000": round(score_s * 1000 / len(table), 3),
    }
    if scan is not None:
        figures["scan_score_s"] = round(scan_score_seconds(model, plan, scan, repeats), 3)
    return figures


def with_ratios(results: list[dict]) -> list[dict]:
    """Each result with its figures divided by the first (the MGI-CNN's)."""
    base = results[0]
    out = []
    for r in results:
        ratios = {
            f"{k}_vs_{base['plan']}": round(r[k] / base[k], 3)
            for k in (
                "params",
                "train_samples_per_s",
                "sampler_samples_per_s",
                "predict_s_per_1000",
                "score_s_per_1000",
                "scan_score_s",
            )
            if k in r and k in base
        }
        out.append({**r, **ratios})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (3)")
    parser.add_argument(
        "--plans", default="default,resnet3d,cnn3d", help="plans to compare; the first is the base"
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument(
        "--scan", type=Path, default=REAL_MHD, help="real scan for scan_score_s (LIDC-IDRI-0002)"
    )
    args = parser.parse_args()

    import keras

    from fp_reduction_3dcnn.testing import write_large_candidates

    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    header = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "cpu_count": os.cpu_count(),
        "repeats": args.repeats,
        "candidates": CANDIDATES,
    }
    scan = None
    if args.scan.exists():
        from lungct.errors import LungCTError

        try:
            scan = RealScan(args.scan)
        except LungCTError as exc:
            print(f"scan_score_s skipped: {exc}", file=sys.stderr)
        else:
            header.update(scan=args.scan.name, scan_candidates=len(scan.centres))
    else:
        print(f"scan_score_s skipped: {args.scan} not found", file=sys.stderr)
    print(json.dumps(header), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_fpc_") as tmp:
        root = Path(tmp)
        uids, box = _fake_cache(root / "cache")
        candidates = root / "candidates.csv"
        write_large_candidates(candidates, uids, CANDIDATES, box, positive_fraction=0.05)
        for name in plans:
            results.append(bench_plan(name, root / "cache", candidates, args.repeats, scan))
            print(json.dumps(results[-1]), flush=True)
    results = with_ratios(results)
    width = max(10, *(len(r["plan"]) for r in results))
    keys = ["train_samples_per_s", "sampler_samples_per_s", "predict_s_per_1000"]
    keys += ["score_s_per_1000"] + (["scan_score_s"] if scan is not None else [])
    print()
    print(
        f"{'plan':<{width}} {'network':<9} {'params':>10} {'train/s':>8} {'sampler/s':>9} "
        f"{'pred s/1k':>9} {'score s/1k':>10}"
        + (f" {'scan s':>7}" if scan is not None else "")
        + f"   ratios to {plans[0]} ({', '.join(keys)})"
    )
    for r in results:
        print(
            f"{r['plan']:<{width}} {r['network']:<9} {r['params']:>10,} "
            f"{r['train_samples_per_s']:>8} {r['sampler_samples_per_s']:>9} "
            f"{r['predict_s_per_1000']:>9} {r['score_s_per_1000']:>10}"
            + (f" {r['scan_score_s']:>7}" if scan is not None else "")
            + "   "
            + ", ".join(f"{r[f'{k}_vs_{plans[0]}']:g}" for k in keys)
        )
    if args.out:
        Path(args.out).write_text(json.dumps({**header, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
