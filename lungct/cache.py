"""Per-scan caches: a memory-mappable int16 volume, its lung mask and its geometry.

``python -m lungct prepare --data DIR --cache DIR`` turns a LUNA16-layout folder into::

    CACHE/plan.json                 the preprocessing plan every entry was made with
    CACHE/<seriesuid>/volume.npy    int16 HU, (z, y, x), at the plan's spacing
    CACHE/<seriesuid>/lung.npy      uint8 lung mask on the same grid
    CACHE/<seriesuid>/meta.json     geometry (world placement), source file, fold, lung volume

``meta.json`` is written last, so an entry with it is complete; an interrupted prepare resumes by
skipping complete entries. Readers open the arrays with ``mmap_mode='r'``: a patch touches only
the pages it needs, and nothing holds a whole dataset in memory.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lungct.errors import LungCTError
from lungct.fileio import save_npy_atomic, write_json_atomic
from lungct.geometry import Geometry
from lungct.io import read_scan, series_uid_from_path
from lungct.lungmask import lung_volume_ml, segment_lungs_array
from lungct.preprocess import PreprocessPlan, resample_array
from lungct.scan import AIR_HU

_SUBSET = re.compile(r"^subset(\d+)$")


@dataclass(frozen=True)
class ScanFile:
    """One scan of a dataset folder: its path, series UID and LUNA16 fold (None if unknown)."""

    path: Path
    seriesuid: str
    fold: int | None


def find_scans(data_dir: str | os.PathLike, folds: Iterable[int] | None = None) -> list[ScanFile]:
    """The ``.mhd`` scans of a LUNA16-layout folder (``subsetN/*.mhd``, or ``*.mhd`` at the top).

    ``folds`` keeps only the given subsets. Raises if the folder is missing or holds no scan.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LungCTError(data_dir, "dataset folder does not exist")
    wanted = None if folds is None else {int(f) for f in folds}
    found: list[ScanFile] = []
    for sub in sorted(data_dir.iterdir()):
        m = _SUBSET.match(sub.name)
        if sub.is_dir() and m:
            fold = int(m.group(1))
            if wanted is None or fold in wanted:
                found += [
                    ScanFile(p, series_uid_from_path(p), fold) for p in sorted(sub.glob("*.mhd"))
                ]
    if wanted is None:
        found += [
            ScanFile(p, series_uid_from_path(p), None) for p in sorted(data_dir.glob("*.mhd"))
        ]
    if not found:
        which = "" if wanted is None else f" in subsets {sorted(wanted)}"
        raise LungCTError(data_dir, f"no .mhd scans found{which} (expected subset0..9/*.mhd)")
    uids = [s.seriesuid for s in found]
    if len(set(uids)) != len(uids):
        dup = next(u for u in uids if uids.count(u) > 1)
        raise LungCTError(data_dir, f"series {dup} appears twice")
    return found


@dataclass
class CachedScan:
    """A prepared scan opened from the cache (arrays are read-only memory maps)."""

    seriesuid: str
    volume: np.ndarray
    lung: np.ndarray
    geometry: Geometry
    meta: dict

    @property
    def fold(self) -> int | None:
        """LUNA16 subset the scan came from (None for a scan outside the layout)."""
        return self.meta.get("fold")

    def world_to_voxel(self, world_xyz: Sequence[float] | np.ndarray) -> np.ndarray:
        """World ``(x, y, z)`` mm -> continuous voxel ``(z, y, x)`` of the cached grid."""
        return self.geometry.world_to_voxel(world_xyz)

    def voxel_to_world(self, voxel_zyx: Sequence[float] | np.ndarray) -> np.ndarray:
        """Continuous voxel ``(z, y, x)`` of the cached grid -> world ``(x, y, z)`` mm."""
        return self.geometry.voxel_to_world(voxel_zyx)


class ScanCache:
    """A folder of prepared scans (see the module docstring for the layout)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @property
    def plan(self) -> PreprocessPlan:
        """The preprocessing plan the cache was made with."""
        return PreprocessPlan.load(self.root / "plan.json")

    def entry_dir(self, seriesuid: str) -> Path:
        """Folder of one scan's entry."""
        return self.root / seriesuid

    def is_complete(self, seriesuid: str) -> bool:
        """Whether the scan's entry was fully written."""
        return (self.entry_dir(seriesuid) / "meta.json").is_file()

    def seriesuids(self) -> list[str]:
        """UIDs of every complete entry, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.parent.name for p in self.root.glob("*/meta.json"))

    def open(self, seriesuid: str) -> CachedScan:
        """Memory-map one prepared scan."""
        entry = self.entry_dir(seriesuid)
        meta_path = entry / "meta.json"
        if not meta_path.is_file():
            raise LungCTError(
                self.root,
                f"series {seriesuid} is not in the cache (run `python -m lungct prepare`)",
            )
        try:
            meta = json.loads(meta_path.read_text())
            volume = np.load(entry / "volume.npy", mmap_mode="r", allow_pickle=False)
            lung = np.load(entry / "lung.npy", mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise LungCTError(
                entry, f"broken cache entry ({exc}); delete it and prepare again"
            ) from None
        geometry = Geometry.from_dict(meta["geometry"])
        if volume.shape != geometry.shape_zyx or lung.shape != volume.shape:
            raise LungCTError(entry, "cache entry arrays do not match its geometry; prepare again")
        return CachedScan(seriesuid, volume, lung, geometry, meta)

    def check_plan(self, plan: PreprocessPlan) -> None:
        """Write the plan on first use; refuse to mix entries made with another plan."""
        path = self.root / "plan.json"
        if path.is_file():
            existing = PreprocessPlan.load(path)
            if existing != plan:
                raise LungCTError(
                    path,
                    f"cache was made with plan {existing.name!r} {existing.to_dict()}, "
                    f"not {plan.name!r}; use another --cache folder",
                )
        else:
            plan.save(path)


def prepare_one(scan_file: ScanFile, cache_root: str | os.PathLike, plan: PreprocessPlan) -> dict:
    """Read, resample and lung-mask one scan into the cache; return its meta."""
    scan = read_scan(scan_file.path)
    if scan.seriesuid != scan_file.seriesuid:
        raise LungCTError(scan_file.path, "series UID does not match the file name")
    lung_native_geo = scan.geometry
    volume, geometry = resample_array(
        scan.array,
        scan.geometry,
        plan.spacing,
        plan.image_interpolation,
        default_value=AIR_HU,
        align_to_world=plan.align_to_world,
    )
    del scan
    volume = volume.astype(np.int16, copy=False)
    lung = segment_lungs_array(volume, geometry)
    entry = Path(cache_root) / scan_file.seriesuid
    save_npy_atomic(entry / "volume.npy", volume)
    save_npy_atomic(entry / "lung.npy", lung)
    meta = {
        "seriesuid": scan_file.seriesuid,
        "source": str(scan_file.path),
        "fold": scan_file.fold,
        "plan": plan.name,
        "geometry": geometry.to_dict(),
        "source_geometry": lung_native_geo.to_dict(),
        "lung_volume_ml": round(lung_volume_ml(lung, geometry), 1),
        "lung_found": bool(lung.any()),
    }
    write_json_atomic(entry / "meta.json", meta)
    return meta


def prepare_dataset(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    plan: PreprocessPlan | None = None,
    folds: Iterable[int] | None = None,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Build (or complete) the per-scan cache of a dataset, ``workers`` scans at a time.

    At most ``workers`` scans are in memory at once. Scans whose entry is complete are skipped.
    A scan that fails is reported by name and the others still get done.

    Returns:
        ``{"prepared": [...], "skipped": [...], "failed": {uid: message}}``.
    """
    plan = plan or PreprocessPlan()
    cache = ScanCache(cache_dir)
    cache.root.mkdir(parents=True, exist_ok=True)
    cache.check_plan(plan)
    scans = find_scans(data_dir, folds)
    todo = [s for s in scans if not cache.is_complete(s.seriesuid)]
    report: dict = {
        "prepared": [],
        "skipped": [s.seriesuid for s in scans if cache.is_complete(s.seriesuid)],
        "failed": {},
    }
    bar = tqdm(total=len(todo), desc="prepare", unit="scan", disable=not progress)
    if workers <= 1 or len(todo) <= 1:
        for s in todo:
            _run_one(s, cache.root, plan, report)
            bar.update()
    else:
        # spawn, not fork: SimpleITK's thread pool does not survive a fork reliably.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(prepare_one, s, cache.root, plan): s for s in todo}
            for fut in as_completed(futures):
                s = futures[fut]
                try:
                    fut.result()
                    report["prepared"].append(s.seriesuid)
                except LungCTError as exc:
                    report["failed"][s.seriesuid] = str(exc)
                bar.update()
    bar.close()
    return report


def _run_one(s: ScanFile, root: Path, plan: PreprocessPlan, report: dict) -> None:
    try:
        prepare_one(s, root, plan)
        report["prepared"].append(s.seriesuid)
    except LungCTError as exc:
        report["failed"][s.seriesuid] = str(exc)
