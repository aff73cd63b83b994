"""Per-scan caches: a memory-mappable int16 volume, its lung mask and its geometry.

``python -m lungct prepare --data DIR --cache DIR`` turns a LUNA16-layout folder into::

    CACHE/plan.json                 the preprocessing plan every entry was made with
    CACHE/<seriesuid>/volume.npy    int16 HU, (z, y, x), at the plan's spacing
    CACHE/<seriesuid>/lung.npy      uint8 lung mask on the same grid
    CACHE/<seriesuid>/meta.json     geometry (world placement), source file, fold, lung volume

An entry is written in a staging folder and published with ``meta.json`` last
(:func:`lungct.fileio.staged_outputs`), so an entry with it was complete when written; an
interrupted prepare resumes by skipping complete entries, after checking that their arrays still
have the shape and byte count ``meta.json`` says (a file cut short later is rebuilt). Readers
open the arrays with ``mmap_mode='r'``: a patch touches only the pages it needs, and nothing
holds a whole dataset in memory.

Parallel prepares run in worker processes that end with the command: Ctrl-C or SIGTERM stops
them before the command exits, and a worker whose parent was killed outright ends itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from lungct.errors import LungCTError
from lungct.fileio import (
    STAGE_PREFIX,
    WriteError,
    npy_problem,
    remove_abandoned_stages,
    save_npy_atomic,
    staged_outputs,
    write_json_atomic,
)
from lungct.geometry import Geometry
from lungct.io import read_scan, series_uid_from_path
from lungct.lungmask import lung_volume_ml, segment_lungs_array
from lungct.preprocess import PreprocessPlan, resample_array
from lungct.scan import AIR_HU

if TYPE_CHECKING:
    from lungct.raypool import RayOptions

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
        """Whether the scan's entry was fully written and is still whole
        (:meth:`entry_problem`)."""
        return self.entry_problem(seriesuid) is None

    def entry_problem(self, seriesuid: str) -> str | None:
        """What is wrong with a scan's entry (None: nothing).

        ``meta.json`` is written last, so its absence means an unfinished entry; with it, the
        arrays' headers (read without loading the data) must give the geometry's shape and
        their files the byte count that shape needs. A file cut short or replaced after the
        entry was made would otherwise be skipped by ``prepare`` and fail only when read.
        """
        entry = self.entry_dir(seriesuid)
        meta_path = entry / "meta.json"
        if not meta_path.is_file():
            return "no meta.json (unfinished entry)"
        try:
            meta = json.loads(meta_path.read_text())
            shape = Geometry.from_dict(meta["geometry"]).shape_zyx
        except (OSError, ValueError, KeyError, TypeError, LungCTError) as exc:
            return f"meta.json is unreadable ({exc})"
        for name, dtype in (("volume.npy", np.int16), ("lung.npy", None)):
            try:
                problem = npy_problem(entry / name, shape, dtype)
            except OSError as exc:
                problem = f"cannot be read ({exc.strerror or exc})"
            if problem:
                return f"{name} {problem}"
        return None

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


class RecentScans:
    """Cache entries opened on demand, the ``keep`` most recently used kept open (memory maps).

    Patch streaming asks for scans in any order; keeping a few open saves reopening them
    without holding every scan of a dataset. Safe to call from several threads at once (the
    trainers cut patches in two).

    Example:
        >>> scans = RecentScans(ScanCache("cache"), keep=8)  # doctest: +SKIP
        >>> scan = scans(uid)  # doctest: +SKIP
    """

    def __init__(self, cache: ScanCache, keep: int = 8) -> None:
        self.cache, self.keep = cache, keep
        self._open: dict[str, CachedScan] = {}
        self._lock = threading.Lock()

    def __call__(self, seriesuid: str) -> CachedScan:
        with self._lock:
            scan = self._open.pop(seriesuid, None)
            if scan is None:
                scan = self.cache.open(seriesuid)
            self._open[seriesuid] = scan  # most recent last
            while len(self._open) > self.keep:
                del self._open[next(iter(self._open))]
            return scan


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
    with staged_outputs(Path(cache_root) / scan_file.seriesuid, "meta.json") as stage:
        save_npy_atomic(stage / "volume.npy", volume)
        save_npy_atomic(stage / "lung.npy", lung)
        write_json_atomic(stage / "meta.json", meta)
    return meta


def prepare_dataset(
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    plan: PreprocessPlan | None = None,
    folds: Iterable[int] | None = None,
    workers: int = 2,
    progress: bool = True,
    ray: RayOptions | None = None,
) -> dict:
    """Build (or complete) the per-scan cache of a dataset, ``workers`` scans at a time.

    At most ``workers`` scans are in memory at once. With ``ray`` each scan is a Ray task
    instead, on a local Ray started for the call or on a cluster (:mod:`lungct.raypool`; one
    scan at a time per worker, ``workers`` then unused). Scans whose entry is complete and whole
    (:meth:`ScanCache.entry_problem`) are skipped; a broken one is rebuilt. A scan that fails
    is reported by name and the others still get done, but an output that cannot be written
    (:class:`lungct.fileio.WriteError`: full disk, read-only folder) stops the whole prepare,
    since every other scan would fail the same way. An interrupt (Ctrl-C, SIGTERM) stops the
    worker processes before it propagates. ``progress`` shows a bar on a terminal.

    Returns:
        ``{"prepared": [...], "skipped": [...], "failed": {uid: message}}``.
    """
    plan = plan or PreprocessPlan()
    if ray is not None:
        from lungct.raypool import import_ray

        import_ray(ray)  # a missing Ray is said before anything is written
    cache = ScanCache(cache_dir)
    try:
        cache.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(
            cache.root, f"cannot create the cache folder ({exc.strerror or exc})"
        ) from None
    cache.check_plan(plan)
    scans = find_scans(data_dir, folds)
    for stage in cache.root.glob(f"*/{STAGE_PREFIX}*"):  # left by a killed prepare
        remove_abandoned_stages(stage.parent)
    whole = {s.seriesuid for s in scans if cache.is_complete(s.seriesuid)}
    todo = [s for s in scans if s.seriesuid not in whole]
    report: dict = {
        "prepared": [],
        "skipped": [s.seriesuid for s in scans if s.seriesuid in whole],
        "failed": {},
    }
    bar = tqdm(total=len(todo), desc="prepare", unit="scan", disable=not progress)
    try:
        if ray is not None and todo:
            _prepare_on_ray(todo, cache.root, plan, ray, report, bar)
        elif workers <= 1 or len(todo) <= 1:
            for s in todo:
                _record(s, report, lambda s=s: prepare_one(s, cache.root, plan))
                bar.update()
        else:
            _prepare_in_workers(todo, cache.root, plan, workers, report, bar)
    finally:
        bar.close()
    return report


def _record(s: ScanFile, report: dict, run: Callable[[], object]) -> None:
    """Run one scan's preparation into ``report``; a bad scan is noted, a write error raised."""
    try:
        run()
        report["prepared"].append(s.seriesuid)
    except WriteError:
        raise
    except LungCTError as exc:
        report["failed"][s.seriesuid] = str(exc)


def _prepare_in_workers(
    todo: Sequence[ScanFile],
    root: Path,
    plan: PreprocessPlan,
    workers: int,
    report: dict,
    bar: tqdm,
) -> None:
    """Prepare ``todo`` in a pool of worker processes that never outlive this call.

    Workers ignore SIGINT (a terminal sends Ctrl-C to the whole process group; the parent alone
    decides) and end themselves when the parent dies (:func:`_worker_start`). Here, SIGTERM
    becomes an exit with status 143 that runs the clean-up, and any way out other than
    success (an interrupt, a write error) stops the workers before it goes on.
    """
    # spawn, not fork: SimpleITK's thread pool does not survive a fork reliably.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_worker_start,
        initargs=(os.getpid(),),
    )
    try:
        with _sigterm_exits():
            with _sigint_ignored():  # workers start here and inherit the ignored SIGINT
                futures = {pool.submit(_prepare_in_worker, s, root, plan): s for s in todo}
            for fut in as_completed(futures):
                s = futures[fut]
                _record(s, report, fut.result)
                bar.update()
    except BrokenProcessPool:
        _stop_workers(pool)
        raise LungCTError(
            root, "a worker process died while preparing (out of memory? try fewer --workers)"
        ) from None
    except BaseException:
        _stop_workers(pool)
        for s in todo:  # what a worker stopped mid-write left
            remove_abandoned_stages(root / s.seriesuid)
            # A worker stopped between creating its entry's folder and staging into it
            # leaves the folder empty: that is no entry.
            with contextlib.suppress(OSError):
                (root / s.seriesuid).rmdir()
        raise
    pool.shutdown(wait=True)


class PrepareWorker:
    """A Ray actor's state for :func:`prepare_dataset`: one scan per :meth:`run`."""

    def __init__(self, cache_root: str, plan: PreprocessPlan) -> None:
        self.root, self.plan = Path(cache_root), plan

    def ready(self) -> str | None:
        """Nothing to set up: always ready."""
        return None

    def run(self, scan_file: ScanFile) -> tuple[str, str | None]:
        """Prepare one scan: ``("prepared", None)`` or ``("failed", message)``.

        Raises:
            WriteError: the entry cannot be written (the whole prepare stops).
        """
        try:
            prepare_one(scan_file, self.root, self.plan)
        except WriteError:
            raise
        except LungCTError as exc:
            return "failed", str(exc)
        return "prepared", None


def _prepare_on_ray(
    todo: Sequence[ScanFile],
    root: Path,
    plan: PreprocessPlan,
    options: RayOptions,
    report: dict,
    bar: tqdm,
) -> None:
    """Prepare ``todo`` as Ray tasks; a worker that died fails its scan, the others go on."""
    from lungct.raypool import WorkerLost, ray_runtime, stream_on_actors, worker_count

    with ray_runtime(options) as ray:
        workers = worker_count(ray, options, len(todo))
        for s, outcome in stream_on_actors(ray, PrepareWorker, (str(root), plan), todo, workers):
            if isinstance(outcome, WorkerLost):
                report["failed"][s.seriesuid] = f"{s.path}: {outcome.reason}"
            elif outcome[0] == "failed":
                report["failed"][s.seriesuid] = outcome[1]
            else:
                report["prepared"].append(s.seriesuid)
            bar.update()


def _prepare_in_worker(scan_file: ScanFile, cache_root: Path, plan: PreprocessPlan) -> dict:
    """:func:`prepare_one` in a worker; SIGTERM ends the process once the entry's staging
    folder is cleaned up (the executor would otherwise catch the exit and go on)."""
    try:
        return prepare_one(scan_file, cache_root, plan)
    except SystemExit as exc:
        os._exit(exc.code if isinstance(exc.code, int) else 1)


def _worker_start(parent_pid: int) -> None:
    """Set up a worker process: SIGINT ignored, SIGTERM an orderly exit, and an end of its own
    when the parent dies.

    SIGINT is the parent's to handle (a terminal sends Ctrl-C to the whole process group).
    SIGTERM, which the parent sends to stop it, raises ``SystemExit`` so the entry being
    written removes its staging folder. On Linux the kernel sends SIGKILL when the parent
    process ends (``PR_SET_PDEATHSIG``); elsewhere, and as a second guard, a thread checks
    every half second that the parent is still the one that started the worker.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the guard was in place
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_PR_SET_PDEATHSIG = 1


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and end the worker processes now (SIGTERM, then SIGKILL)."""
    # The executor has no public way to end busy workers before Python 3.14
    # (``terminate_workers``); its process table is what that method uses.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    deadline = time.monotonic() + 5.0
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(1.0)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored inside the block (main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` inside the block, so clean-up code runs (Python's
    default is to die at once, leaving the workers behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        # None: a handler set outside Python, which cannot be put back; the default is closest.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
