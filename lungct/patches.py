"""Patches cut by world coordinates, and a bounded shuffling queue that streams them.

Two ways to cut:

* :func:`crop_patch` - an integer-voxel crop of a cached volume around the voxel nearest to a world
  point, padded with air where it leaves the volume. Exact and cheap; the cache grid is 1 mm and
  world-aligned by default, so every patch has the same orientation and scale.
* :func:`sample_patch` - trilinear sampling on an arbitrary world-aligned grid (any spacing, any
  size), for plans that cut at another spacing than the cache's.

:class:`PatchQueue` follows TorchIO's queue: open a scan once (a memory map, so nothing is read
until touched), cut every patch asked of it, and shuffle in a buffer of ``buffer_size`` patches.
Memory is set by the buffer, never by the dataset.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from lungct.cache import CachedScan, ScanCache
from lungct.geometry import Geometry
from lungct.scan import AIR_HU


def crop_patch(
    volume: np.ndarray,
    geometry: Geometry,
    center_world: Sequence[float],
    size_zyx: Sequence[int],
    fill: float = AIR_HU,
) -> np.ndarray:
    """A ``size_zyx`` block of ``volume`` centred on the voxel nearest to ``center_world``.

    For even sizes the centre voxel sits at index ``size // 2``. Parts outside the volume are
    ``fill``. The result is a new array (never a view into a memory map).
    """
    size = np.asarray(size_zyx, dtype=np.int64)
    center = np.rint(geometry.world_to_voxel(center_world)).astype(np.int64)
    start = center - size // 2
    stop = start + size
    shape = np.asarray(volume.shape)
    out = np.full(tuple(size), fill, dtype=volume.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(stop, shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi, strict=True))] = volume[
        tuple(slice(a, b) for a, b in zip(src_lo, src_hi, strict=True))
    ]
    return out


def sample_patch(
    volume: np.ndarray,
    geometry: Geometry,
    center_world: Sequence[float],
    size_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    order: int = 1,
    fill: float = AIR_HU,
) -> np.ndarray:
    """Sample a world-aligned patch of ``size_zyx`` voxels at ``spacing_zyx`` mm around a point.

    Voxel ``i`` along an axis sits at ``center + (i - (n - 1) / 2) * spacing``, so the patch is
    centred exactly on ``center_world`` (no rounding). Works for any source direction.
    """
    size = np.asarray(size_zyx, dtype=np.int64)
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    offsets = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(size, spacing, strict=True)]
    dz, dy, dx = np.meshgrid(*offsets, indexing="ij")
    cx, cy, cz = (float(v) for v in center_world)
    world = np.stack([cx + dx, cy + dy, cz + dz], axis=-1).reshape(-1, 3)
    vox = geometry.world_to_voxel(world)  # (N, 3) as z, y, x
    lo = np.maximum(np.floor(vox.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(vox.max(axis=0)).astype(int) + 2, np.asarray(volume.shape))
    if np.any(hi <= lo):
        return np.full(tuple(size), fill, dtype=np.float32)
    block = np.asarray(volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], dtype=np.float32)
    coords = (vox - lo).T
    values = ndimage.map_coordinates(block, coords, order=order, mode="constant", cval=fill)
    # map_coordinates treats points just past the block as outside; so does the scan.
    return values.reshape(tuple(size)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class PatchRequest:
    """One patch to cut: which scan, where (world mm), and what to carry along with it."""

    seriesuid: str
    center_world: tuple[float, float, float]
    label: Any = None
    info: dict = field(default_factory=dict, compare=False, hash=False)


class PatchQueue:
    """Stream patches from a :class:`ScanCache` through a bounded shuffle buffer.

    Args:
        cache: the per-scan cache.
        requests: patches to cut, in any order; they are grouped by scan so each scan is opened
            once per pass.
        cut: ``cut(scan, request) -> array``, e.g. ``lambda s, r: crop_patch(s.volume,
            s.geometry, r.center_world, (32, 32, 32))``.
        buffer_size: most patches held at once.
        seed: shuffling seed (scan order and buffer draws); ``None`` keeps the given order.

    Example:
        >>> queue = PatchQueue(cache, requests, cut, buffer_size=256, seed=0)  # doctest: +SKIP
        >>> for patch, request in queue: ...  # doctest: +SKIP
    """

    def __init__(
        self,
        cache: ScanCache,
        requests: Sequence[PatchRequest],
        cut: Callable[[CachedScan, PatchRequest], np.ndarray],
        buffer_size: int = 256,
        seed: int | None = 0,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        self.cache = cache
        self.requests = list(requests)
        self.cut = cut
        self.buffer_size = buffer_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[tuple[np.ndarray, PatchRequest]]:
        rng = None if self.seed is None else np.random.default_rng((self.seed, self.epoch))
        self.epoch += 1
        by_scan: dict[str, list[PatchRequest]] = defaultdict(list)
        for r in self.requests:
            by_scan[r.seriesuid].append(r)
        order = list(by_scan)
        if rng is not None:
            rng.shuffle(order)
        buffer: list[tuple[np.ndarray, PatchRequest]] = []
        for uid in order:
            scan = self.cache.open(uid)
            reqs = by_scan[uid]
            if rng is not None:
                reqs = [reqs[i] for i in rng.permutation(len(reqs))]
            for r in reqs:
                buffer.append((self.cut(scan, r), r))
                if len(buffer) >= self.buffer_size:
                    yield buffer.pop(0 if rng is None else int(rng.integers(len(buffer))))
            del scan
        while buffer:
            yield buffer.pop(0 if rng is None else int(rng.integers(len(buffer))))


_END = object()


def prefetch(items: Iterable[Any], depth: int = 4) -> Iterator[Any]:
    """Yield ``items`` in order while a background thread produces up to ``depth`` ahead.

    Cutting and augmenting patches (NumPy, SciPy, memory-mapped reads) then overlaps with the
    training step (TensorFlow), both of which release the GIL for most of their work. Memory
    stays bounded by ``depth`` items. An exception in the producer is raised here, at the
    position it happened; leaving the loop early stops the producer.

    Example:
        >>> list(prefetch(range(5), depth=2))
        [0, 1, 2, 3, 4]
    """
    if depth < 1:
        yield from items
        return
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((_END, exc))

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        worker.join(timeout=5.0)
