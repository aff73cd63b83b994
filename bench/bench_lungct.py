"""Core throughput: read + resample + lung-mask the real 512x512x261 MetaImage; `prepare`.

Each workload runs in fresh processes (imports not timed); medians of 3, peak RSS is the max.
Run: ``.venv/bin/python bench/bench_lungct.py [--scans 20]`` (from the repository root).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import measure, report

REPO = Path(__file__).resolve().parents[1]
REAL_MHD = (
    REPO.parent
    / "shared/data/real/mhd/1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919.mhd"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scans", type=int, default=20, help="small synthetic scans to prepare")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if REAL_MHD.exists():
        base = f"from lungct.io import read_scan\np = {str(REAL_MHD)!r}\n"
        report("real mhd: read", measure(base + "s = read_scan(p)", args.repeats))
        report(
            "real mhd: read + resample 1 mm",
            measure(
                base + "from lungct.preprocess import resample_scan\n"
                "s = resample_scan(read_scan(p), (1, 1, 1), align_to_world=True)",
                args.repeats,
            ),
        )
        report(
            "real mhd: read + resample 1 mm + lung mask",
            measure(
                base + "from lungct.preprocess import resample_scan\n"
                "from lungct.lungmask import segment_lungs\n"
                "s = resample_scan(read_scan(p), (1, 1, 1), align_to_world=True)\n"
                "m = segment_lungs(s)",
                args.repeats,
            ),
        )
    else:
        print(f"skipped real-scan workloads: {REAL_MHD} not found")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        try:
            from lungct.synth import generate_dataset
        except ImportError:
            print("skipped prepare: lungct.synth not available")
            return
        generate_dataset(data, args.scans, seed=0, size="small", progress=False)
        cache = Path(tmp) / "cache"
        code = (
            "from lungct.cache import prepare_dataset\n"
            f"r = prepare_dataset({str(data)!r}, {str(cache)!r}, workers=2, progress=False)\n"
            "assert not r['failed'], r['failed']"
        )
        result = measure(
            code, args.repeats, setup=f"import shutil; shutil.rmtree({str(cache)!r}, True)"
        )
        result["scans"] = args.scans
        result["note"] = "peak RSS is the parent's; each of 2 spawned workers holds one scan"
        report(f"prepare {args.scans} small synthetic scans (2 workers)", result)


if __name__ == "__main__":
    main()
