"""Tiny datasets for tests and benchmarks, in the real on-disk layout.

:func:`make_tiny_dataset` writes a few small scans as ``subsetK/<uid>.mhd`` (one fold each), their
per-scan cache entries (the layout of :mod:`lungct.cache`), ``annotations.csv`` and a labelled
``candidates.csv``: bright spheres are nodules, points on thin bright tubes and in the background
are negatives. :func:`write_large_candidates` writes a candidates file of any length quickly (for
the 750,000-row memory check). :func:`tiny_plan` is the default plan with a network small enough
to train in seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lungct.fileio import save_npy_atomic, write_json_atomic
from lungct.geometry import Geometry
from lungct.io import write_scan
from lungct.preprocess import PreprocessPlan
from lungct.scan import Scan

if TYPE_CHECKING:
    from fp_reduction_3dcnn.config import FPRPlan


def _uid(i: int) -> str:
    return f"1.3.6.1.4.1.99999.{1000 + i}"


def write_cache_entry(
    cache_dir: str | os.PathLike, uid: str, volume: np.ndarray, geometry: Geometry, fold: int | None
) -> None:
    """Write one cache entry as ``python -m lungct prepare`` does (volume, lung, meta last)."""
    entry = Path(cache_dir) / uid
    save_npy_atomic(entry / "volume.npy", volume.astype(np.int16))
    save_npy_atomic(entry / "lung.npy", (volume < -400).astype(np.uint8))
    write_json_atomic(
        entry / "meta.json",
        {
            "seriesuid": uid,
            "source": "synthetic",
            "fold": fold,
            "plan": "iso1mm_mgicnn",
            "geometry": geometry.to_dict(),
            "source_geometry": geometry.to_dict(),
            "lung_volume_ml": 0.0,
            "lung_found": True,
        },
    )


def make_tiny_dataset(
    root: str | os.PathLike,
    n_scans: int = 4,
    shape_zyx: tuple[int, int, int] = (24, 40, 40),
    nodules_per_scan: int = 2,
    negatives_per_scan: int = 12,
    seed: int = 0,
    write_mhd: bool = True,
) -> dict:
    """Write a tiny labelled dataset; scan ``i`` goes to fold ``i % 10``.

    Returns:
        ``{"data", "cache", "candidates", "annotations", "uids", "folds"}`` (paths as str).
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    data, cache = root / "data", root / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    PreprocessPlan().save(cache / "plan.json")
    nz, ny, nx = shape_zyx
    cand_lines = ["seriesuid,coordX,coordY,coordZ,class"]
    ann_lines = ["seriesuid,coordX,coordY,coordZ,diameter_mm"]
    uids, folds = [], []
    zz, yy, xx = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    for i in range(n_scans):
        uid, fold = _uid(i), i % 10
        origin = (-100.0 + 3 * i, -50.0, -200.0 - 2 * i)
        geometry = Geometry((nx, ny, nz), (1.0, 1.0, 1.0), origin)
        vol = rng.normal(-820, 30, shape_zyx)
        # Two thin vessels (hard negatives) along x and z.
        for _ in range(2):
            cy, cz = rng.uniform(8, ny - 8), rng.uniform(6, nz - 6)
            vol[(yy - cy) ** 2 + (zz - cz) ** 2 < 1.2**2] = -50
        centres = []
        for _ in range(nodules_per_scan):
            c = np.array(
                [rng.uniform(8, nz - 8), rng.uniform(10, ny - 10), rng.uniform(10, nx - 10)]
            )
            r = rng.uniform(2.5, 4.0)
            vol[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < r * r] = 30
            world = geometry.voxel_to_world(c)
            centres.append(world)
            ann_lines.append(f"{uid},{world[0]:.3f},{world[1]:.3f},{world[2]:.3f},{2 * r:.2f}")
            jitter = world + rng.uniform(-0.5, 0.5, 3)
            cand_lines.append(f"{uid},{jitter[0]:.3f},{jitter[1]:.3f},{jitter[2]:.3f},1")
        for _ in range(negatives_per_scan):
            v = np.array([rng.uniform(4, nz - 4), rng.uniform(4, ny - 4), rng.uniform(4, nx - 4)])
            world = geometry.voxel_to_world(v)
            if min(np.linalg.norm(world - c) for c in centres) < 6:
                continue
            cand_lines.append(f"{uid},{world[0]:.3f},{world[1]:.3f},{world[2]:.3f},0")
        volume = np.clip(vol, -1024, 400).astype(np.int16)
        if write_mhd:
            write_scan(
                Scan(volume, geometry, uid), data / f"subset{fold}" / f"{uid}.mhd", compress=False
            )
        write_cache_entry(cache, uid, volume, geometry, fold)
        uids.append(uid)
        folds.append(fold)
    (root / "candidates.csv").write_text("\n".join(cand_lines) + "\n")
    (root / "annotations.csv").write_text("\n".join(ann_lines) + "\n")
    return {
        "data": str(data),
        "cache": str(cache),
        "candidates": str(root / "candidates.csv"),
        "annotations": str(root / "annotations.csv"),
        "uids": uids,
        "folds": folds,
    }


def write_large_candidates(
    path: str | os.PathLike,
    uids: list[str],
    n_rows: int,
    centre_box: tuple[np.ndarray, np.ndarray],
    positive_fraction: float = 0.002,
    seed: int = 0,
    chunk: int = 50_000,
) -> None:
    """Write ``n_rows`` random labelled candidates spread over ``uids`` (streamed, low memory).

    ``centre_box`` = ``(lo_xyz, hi_xyz)`` per series (arrays ``(len(uids), 3)``) bounds the points.
    """
    rng = np.random.default_rng(seed)
    lo, hi = (np.asarray(a, dtype=np.float64) for a in centre_box)
    with open(path, "w") as handle:
        handle.write("seriesuid,coordX,coordY,coordZ,class\n")
        for start in range(0, n_rows, chunk):
            n = min(chunk, n_rows - start)
            k = np.sort(rng.integers(0, len(uids), n))
            pts = lo[k] + rng.random((n, 3)) * (hi[k] - lo[k])
            cls = (rng.random(n) < positive_fraction).astype(int)
            handle.writelines(
                f"{uids[j]},{p[0]:.2f},{p[1]:.2f},{p[2]:.2f},{c}\n"
                for j, p, c in zip(k.tolist(), pts.tolist(), cls.tolist(), strict=True)
            )


def tiny_plan(**overrides: Any) -> FPRPlan:
    """The ``default`` plan with 4-filter streams, an 8-unit dense layer, batches of 8, 2 steps
    an epoch and 1 epoch (fields of ``overrides`` replaced)."""
    from fp_reduction_3dcnn.config import get_plan

    fields: dict[str, Any] = {
        "stream_filters": (4, 4, 4),
        "stream_top_filters": 4,
        "head_filters": 4,
        "dense_units": (8,),
        "batch_size": 8,
        "steps_per_epoch": 2,
        "epochs": 1,
    }
    return get_plan("default", **{**fields, **overrides})
