"""Hostile headers: how fast, and in how much memory, reading refuses a decompression bomb.

Each input claims far more voxels than the limit (``lungct.headers.DEFAULT_MAX_VOXELS``):

* a MetaImage whose 3 MB ``.zraw`` is a valid zlib stream of 3 GB of zeros, under a header
  claiming 2048^3 int16 voxels (16 GiB; SimpleITK alone would allocate all of it);
* a ``.nii.gz`` of a few hundred bytes whose header claims 2048^3;
* a MetaImage whose ``CompressedDataSize`` claims 8 GiB for a 600-byte ``.zraw``.

Each runs in fresh processes (median of ``--repeats``; peak RSS is the largest): the whole
command ``python -m lungct info FILE`` (imports and parser included), then ``read_scan`` alone
(its imports excluded). For scale, the real 512x512x261 MetaImage is read too, when present.
Run: ``.venv/bin/python bench/bench_hostile_read.py [--repeats 3]`` (from the repository root).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import report

REPO = Path(__file__).resolve().parents[1]
REAL_MHD = (
    REPO.parent
    / "shared/data/real/mhd/1.3.6.1.4.1.14519.5.2.1.6279.6001.619372068417051974713149104919.mhd"
)

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from lungct.__main__ import main
status = main(["info", sys.argv[1]])
t1 = time.perf_counter()
from lungct.errors import LungCTError
from lungct.io import read_scan
t2 = time.perf_counter()
try:
    read_scan(sys.argv[1])
except LungCTError:
    pass
t3 = time.perf_counter()
print("BENCH" + json.dumps({"status": status, "command_s": t1 - t0, "read_s": t3 - t2,
      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _zlib_bomb(chunks: int) -> bytes:
    """A valid zlib stream of ``chunks`` x 16 MiB of zeros (one deflated chunk, repeated)."""
    zeros = bytes(1 << 24)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    adler = ((chunks * len(zeros)) % 65521) << 16 | 1
    return b"\x78\xda" + block * chunks + b"\x03\x00" + struct.pack(">I", adler)


def _mhd(folder: Path, name: str, dims: str, zraw: bytes, compressed_size: int | None) -> Path:
    (folder / f"{name}.zraw").write_bytes(zraw)
    size = len(zraw) if compressed_size is None else compressed_size
    header = folder / f"{name}.mhd"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"CompressedData = True\nCompressedDataSize = {size}\n"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 0 0 0\nElementSpacing = 1 1 1\n"
        f"DimSize = {dims}\nElementType = MET_SHORT\nElementDataFile = {name}.zraw\n"
    )
    return header


def _nifti_bomb(folder: Path) -> Path:
    header = bytearray(352)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, 2048, 2048, 2048, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, 4, 16)  # int16
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352)
    header[344:348] = b"n+1\0"
    path = folder / "bomb.nii.gz"
    path.write_bytes(gzip.compress(bytes(header) + bytes(4096)))
    return path


def _run(path: Path, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout
        runs.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("BENCH"))[5:]))
    return {
        "exit_status": runs[0]["status"],
        "command_median_s": round(statistics.median(r["command_s"] for r in runs), 3),
        "read_scan_median_s": round(statistics.median(r["read_s"] for r in runs), 4),
        "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs), 1),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bomb = _mhd(folder, "bomb", "2048 2048 2048", _zlib_bomb(184), None)
        size_mb = (folder / "bomb.zraw").stat().st_size / 1e6
        report(f"zraw bomb 2048^3 ({size_mb:.1f} MB file)", _run(bomb, args.repeats))
        report("nii.gz bomb 2048^3", _run(_nifti_bomb(folder), args.repeats))
        small = zlib.compress(bytes(8 * 8 * 4 * 2))
        liar = _mhd(folder, "liar", "8 8 4", small, 8 << 30)
        report("CompressedDataSize 8 GiB on a small .zraw", _run(liar, args.repeats))
    if REAL_MHD.exists():
        report("real 512x512x261 MetaImage (reads)", _run(REAL_MHD, args.repeats))
    else:
        print(f"skipped the real scan: {REAL_MHD} not found")


if __name__ == "__main__":
    main()
