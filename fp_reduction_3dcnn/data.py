"""Candidates in, patches out: labelling, folds and the three-scale patch cutter.

Candidates are kept as numpy columns (:class:`lungct.tables.CandidateTable`: ~40 bytes a row),
never as per-row objects or patches, so a 750,000-row candidates file costs tens of megabytes.
Patches are cut on demand from the per-scan cache (memory-mapped 1 mm volumes) by world
coordinates; at most a handful of scans are open at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from fp_reduction_3dcnn.config import FPRPlan
from fp_reduction_3dcnn.symmetries import augment_batch
from lungct.cache import CachedScan, RecentScans, ScanCache
from lungct.errors import LungCTError
from lungct.patches import crop_patch, sample_patch
from lungct.preprocess import apply_window
from lungct.tables import AnnotationTable, CandidateTable, read_annotations, read_candidates

# ----------------------------------------------------------------------------------------------
# Candidates and labels
# ----------------------------------------------------------------------------------------------


def hit_labels(table: CandidateTable, annotations: AnnotationTable) -> np.ndarray:
    """Label candidates by the LUNA16 hit rule: 1 if inside any nodule of the same series.

    A candidate hits a nodule when its squared world distance to the centre is below
    ``(diameter / 2) ** 2`` (the evaluation's rule, docs/methods.md section 5).
    """
    labels = np.zeros(len(table), dtype=np.int8)
    for k, uid in enumerate(table.uids):
        nodules = annotations.rows_in_series(uid)
        if not len(nodules):
            continue
        rows = np.flatnonzero(table.series_index == k)
        centres = annotations.coords[nodules]
        radius2 = (annotations.diameter_mm[nodules] / 2.0) ** 2
        for start in range(0, len(rows), 4096):
            chunk = rows[start : start + 4096]
            d2 = ((table.coords[chunk, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
            labels[chunk] = (d2 < radius2[None, :]).any(axis=1)
    return labels


def load_candidates(
    path: str | os.PathLike, annotations: str | os.PathLike | None = None
) -> CandidateTable:
    """Read a candidates CSV and make sure every row has a 0/1 ``label``.

    A LUNA16 ``candidates.csv`` / ``candidates_V2.csv`` carries its ``class`` column. A detector's
    output (the U-Net stage) has none: give ``annotations`` and rows are labelled by the
    evaluation's hit rule (:func:`hit_labels`). With both, ``annotations`` wins.

    Raises:
        LungCTError: unreadable table, or no labels and no annotations.
    """
    table = read_candidates(path, require_class=False)
    if annotations is not None:
        table.label = hit_labels(table, read_annotations(annotations))
    elif table.label is None:
        raise LungCTError(
            path, "has no 'class' column; give --annotations to label it by the hit rule"
        )
    return table


def excluded_rows(table: CandidateTable, excluded: str | os.PathLike) -> np.ndarray:
    """Boolean mask of negative rows that hit an irrelevant finding (``annotations_excluded.csv``).

    The evaluation neither counts nor penalises marks on these findings (non-nodules, nodules
    under 3 mm, nodules marked by one or two readers; an unknown diameter counts as 10 mm), so a
    model gains nothing from learning them as negatives, and many of them look like nodules.
    """
    findings = read_annotations(excluded, allow_negative_diameter=True)
    findings.diameter_mm = np.where(findings.diameter_mm < 0, 10.0, findings.diameter_mm)
    hits = hit_labels(table, findings).astype(bool)
    if table.label is not None:
        hits &= table.label == 0
    return hits


def read_unlabelled(path: str | os.PathLike) -> CandidateTable:
    """Read a candidates CSV for prediction (a ``class`` column is allowed, not needed)."""
    return read_candidates(path, require_class=False)


# ----------------------------------------------------------------------------------------------
# Folds
# ----------------------------------------------------------------------------------------------


def series_folds(
    cache: ScanCache, uids: Iterable[str], layout: dict[str, int] | None = None
) -> dict[str, int | None]:
    """The LUNA16 fold of every series: from the data layout if given, else the cache's record.

    Where both know a series' fold they must agree (a cache built from another layout would let
    a test scan slip into training). Series in neither map to ``None``.

    Raises:
        LungCTError: the cache and the layout disagree about a series' fold.
    """
    folds: dict[str, int | None] = {}
    for uid in uids:
        fold = None if layout is None else layout.get(uid)
        if cache.is_complete(uid):
            recorded = cache.open(uid).fold
            if recorded is not None and fold is not None and int(recorded) != int(fold):
                raise LungCTError(
                    cache.entry_dir(uid),
                    f"series {uid} is in fold {recorded} in the cache but in subset{fold} of the "
                    "data folder; prepare the cache again",
                )
            if fold is None and recorded is not None:
                fold = int(recorded)
        folds[uid] = fold
    return folds


def rows_in_folds(
    table: CandidateTable, folds_of_series: dict[str, int | None], folds: Iterable[int]
) -> np.ndarray:
    """Indices of the rows whose series is in one of ``folds``."""
    wanted = {int(f) for f in folds}
    keep_series = np.array([folds_of_series.get(uid) in wanted for uid in table.uids], dtype=bool)
    if not len(keep_series):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(keep_series[table.series_index])


# ----------------------------------------------------------------------------------------------
# Patches
# ----------------------------------------------------------------------------------------------


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output voxel for a nearest-neighbour resize, centres aligned."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize_patches(patches: np.ndarray, size_zyx: Sequence[int], mode: str) -> np.ndarray:
    """Resize a stack ``(N, z, y, x)`` of patches to ``(N, *size_zyx)``.

    ``nearest`` picks the voxel whose centre is nearest to each output centre (the paper);
    ``cubic`` is a cubic spline (scipy order 3, the authors' code), voxel centres aligned.
    """
    n, *shape = patches.shape
    if tuple(shape) == tuple(size_zyx):
        return patches
    if mode == "nearest":
        iz, iy, ix = (_nearest_index(a, b) for a, b in zip(shape, size_zyx, strict=True))
        return patches[:, iz][:, :, iy][:, :, :, ix]
    factors = [b / a for a, b in zip(shape, size_zyx, strict=True)]
    out = np.empty((n, *size_zyx), dtype=np.float32)
    for i in range(n):
        out[i] = ndimage.zoom(patches[i], factors, order=3, mode="nearest", grid_mode=True)
    return out


class PatchCutter:
    """Cut the co-centred scales of candidates from cached scans, as network inputs.

    The MGI-CNN takes three scales, the single-patch networks one (``plan.patch_sizes``).
    Each scale ``(x, y, z)`` voxels of ``plan.patch_sizes`` is cut around the world point at
    ``plan.cut_spacing`` (an exact integer crop when that equals the cache grid, else trilinear
    sampling on a world-aligned grid), windowed to [0, 1] with ``plan.hu_window``, resized to
    ``plan.input_size`` (``plan.resize``) and returned as ``(N, y, x, z)`` float32.

    Args:
        plan: the training plan.
        cache: the per-scan cache.
        max_open: scans kept open (memory maps) at once.

    Example:
        >>> cutter = PatchCutter(plan, ScanCache("cache"))  # doctest: +SKIP
        >>> s1, s2, s3 = cutter.cut(uid, np.array([[-50.0, 20.0, -100.0]]))  # doctest: +SKIP
    """

    def __init__(self, plan: FPRPlan, cache: ScanCache, max_open: int = 8) -> None:
        self.plan = plan
        self.cache = cache
        self.max_open = max_open
        self._scans = RecentScans(cache, keep=max_open) if cache is not None else None
        self.sizes_zyx = [tuple(reversed(s)) for s in plan.patch_sizes]
        self.input_zyx = tuple(reversed(plan.input_size))
        self.spacing_zyx = tuple(reversed(plan.cut_spacing))

    def scan(self, uid: str) -> CachedScan:
        """Open (or reuse) the memory-mapped cache entry of a series."""
        if self._scans is None:
            raise LungCTError(None, "this patch cutter has no cache to open scans from")
        return self._scans(uid)

    def _exact_crop(self, scan: CachedScan) -> bool:
        g = scan.geometry
        return np.allclose(g.spacing, self.plan.cut_spacing) and np.allclose(
            g.direction_matrix, np.eye(3)
        )

    def cut_hu(self, scan: CachedScan, centre_world: Sequence[float]) -> list[np.ndarray]:
        """The scales around one world point, in HU, ``(z, y, x)`` at the cut spacing."""
        if self._exact_crop(scan):
            # One crop of the widest scale; the narrower ones share its centre voxel.
            big = crop_patch(scan.volume, scan.geometry, centre_world, self.sizes_zyx[0])
            out = [big]
            for size in self.sizes_zyx[1:]:
                if any(s > b for s, b in zip(size, self.sizes_zyx[0], strict=True)):
                    out.append(crop_patch(scan.volume, scan.geometry, centre_world, size))
                    continue
                lo = [b // 2 - s // 2 for b, s in zip(self.sizes_zyx[0], size, strict=True)]
                out.append(
                    big[
                        lo[0] : lo[0] + size[0],
                        lo[1] : lo[1] + size[1],
                        lo[2] : lo[2] + size[2],
                    ]
                )
            return out
        return [
            sample_patch(scan.volume, scan.geometry, centre_world, size, self.spacing_zyx)
            for size in self.sizes_zyx
        ]

    def cut(
        self,
        uid: str,
        centres_world: np.ndarray,
        rotations: np.ndarray | None = None,
        flips: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Network inputs for points of one series.

        Args:
            uid: series UID (must be in the cache).
            centres_world: ``(N, 3)`` world ``(x, y, z)`` mm.
            rotations: optional ``(N,)`` counts of 90-degree axial rotations.
            flips: optional ``(N, 2)`` booleans: flip x (left-right), flip z; applied before
                the rotation (see :func:`fp_reduction_3dcnn.symmetries.augment_batch`).

        Returns:
            One float32 array ``(N, y, x, z)`` per scale (three for the MGI-CNN), wide first.
        """
        return self.cut_scan(self.scan(uid), centres_world, rotations, flips)

    def cut_scan(
        self,
        scan: CachedScan,
        centres_world: np.ndarray,
        rotations: np.ndarray | None = None,
        flips: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """As :meth:`cut`, from an opened scan (anything with ``volume`` and ``geometry``)."""
        centres_world = np.asarray(centres_world, dtype=np.float64).reshape(-1, 3)
        n = len(centres_world)
        stacks = [np.empty((n, *size), dtype=np.float32) for size in self.sizes_zyx]
        for i, centre in enumerate(centres_world):
            for stack, patch in zip(stacks, self.cut_hu(scan, centre), strict=True):
                stack[i] = patch
        out = []
        lo, hi = self.plan.hu_window
        for stack in stacks:
            x = apply_window(stack, (lo, hi), (0.0, 1.0))
            x = resize_patches(x, self.input_zyx, self.plan.resize)
            if self.plan.resize == "cubic":
                x = np.clip(x, 0.0, 1.0)
            x = np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)), dtype=np.float32)
            out.append(augment_batch(x, rotations, flips))
        return out

    def cut_rows(
        self,
        table: CandidateTable,
        rows: np.ndarray,
        rotations: np.ndarray | None = None,
        shifts_mm: np.ndarray | None = None,
        flips: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        """Network inputs for table rows (any series mix, any order); result in ``rows`` order."""
        rows = np.asarray(rows, dtype=np.int64)
        n = len(rows)
        outs = [
            np.empty((n, *self.plan.input_shape), dtype=np.float32) for _ in range(self.plan.scales)
        ]
        if not n:
            return outs
        series = table.series_index[rows]
        for k in np.unique(series):
            sel = np.flatnonzero(series == k)
            centres = table.coords[rows[sel]]
            if shifts_mm is not None:
                centres = centres + shifts_mm[sel]
            parts = self.cut(
                table.uids[int(k)],
                centres,
                None if rotations is None else rotations[sel],
                None if flips is None else flips[sel],
            )
            for out, part in zip(outs, parts, strict=True):
                out[sel] = part
        return outs


def check_cache_has(cache: ScanCache, uids: Iterable[str]) -> None:
    """Raise one clear error if some series are missing from the cache."""
    missing = [uid for uid in uids if not cache.is_complete(uid)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LungCTError(
            Path(cache.root),
            f"series {', '.join(missing[:3])}{more} not in the cache "
            "(run `python -m lungct prepare`)",
        )
