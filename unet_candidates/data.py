"""Training data of the candidate stage, streamed from the per-scan cache.

Each training patch is cut from a cached scan (1 mm, world-aligned, memory-mapped) by trilinear
sampling at the plan's spacing, so the model sees the same grid at training and at extraction.
Three kinds of patch centre:

* **nodule**: an annotated nodule, moved off the patch centre by a random offset;
* **vessel** (hard negative): a bright voxel inside the lung mask - vessels, fissures, the
  pleura - away from every nodule;
* **lung**: any voxel of the lung mask.

The target is 1 inside a sphere around every nodule that reaches the patch (radius =
``d / 2 + margin`` clipped to ``[min_radius, max_radius]`` mm, computed in world mm), 0
elsewhere, and :data:`IGNORE` around the excluded findings (irrelevant findings, nodules
< 3 mm or of one reader): they look like nodules, and teaching the network that they are
background would teach it to miss small nodules. The evaluation ignores marks on them too. For a 2-D network
the target is the disk where that sphere cuts the centre slice.

Patches go through :class:`lungct.patches.PatchQueue`, whose shuffle buffer bounds memory; the
per-scan sampling index keeps only a few hundred world points per scan.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lungct.cache import CachedScan, ScanCache
from lungct.geometry import Geometry
from lungct.lungmask import segment_lungs_array
from lungct.patches import PatchQueue, PatchRequest, sample_patch
from lungct.preprocess import apply_window
from lungct.scan import AIR_HU
from unet_candidates.config import UNetPlan

VESSEL_HU = -400.0
"""Lung voxels brighter than this are vessel / wall hard-negative centres."""

NODULE_CLEARANCE_MM = 6.0
"""Hard negatives keep at least this far outside every nodule's target sphere."""

IGNORE = 2.0
"""Target value of voxels the loss leaves out (around excluded findings)."""

UNKNOWN_EXCLUDED_DIAMETER_MM = 10.0
"""Size assumed for an excluded finding of unknown diameter (as the LUNA16 evaluation does)."""


@dataclass
class ScanSamples:
    """Where patches of one training scan may be centred (world mm).

    Attributes:
        seriesuid: the scan.
        nodules: ``(N, 4)`` float64 ``x, y, z, diameter_mm`` of its annotated nodules.
        lung_points: ``(M, 3)`` random points of its lung mask.
        vessel_points: ``(K, 3)`` random bright lung points away from nodules.
        excluded: ``(E, 4)`` ``x, y, z, diameter_mm`` of findings the loss ignores (LUNA16's
            annotations_excluded.csv: nodules < 3 mm, nodules of one or two readers,
            non-nodules; a negative diameter means unknown).
        nodule_hu: ``(N,)`` mean HU inside each nodule's sphere (:func:`nodule_mean_hu`);
            empty when not measured (then every nodule counts as solid).
        reader_count: ``(N,)`` how many readers marked each nodule (0 = unknown; the optional
            ``reader_count`` column of the annotation table); empty when the table has none.
    """

    seriesuid: str
    nodules: np.ndarray
    lung_points: np.ndarray
    vessel_points: np.ndarray
    excluded: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    nodule_hu: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reader_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


SOLID_MEAN_HU = -450.0
"""A nodule whose mean HU (over its sphere) is at least this counts as solid: faintness 0."""

GROUND_GLASS_MEAN_HU = -650.0
"""A nodule whose mean HU is at most this counts as faint ground glass: faintness 1."""


def nodule_mean_hu(volume: np.ndarray, geometry: Geometry, nodules: np.ndarray) -> np.ndarray:
    """Mean HU inside each nodule's sphere (radius diameter / 2, at least one voxel).

    Reads a small block around each nodule, so a memory-mapped cached volume is not loaded
    whole. A nodule outside the volume gets ``nan``.
    """
    nodules = np.asarray(nodules, np.float64).reshape(-1, 4)
    out = np.full(len(nodules), np.nan)
    spacing = np.asarray(geometry.spacing, np.float64)[::-1]  # z, y, x
    shape = np.asarray(volume.shape)
    for i, (x, y, z, d) in enumerate(nodules):
        radius = max(d / 2.0, float(spacing.max()))
        c = geometry.world_to_voxel((x, y, z))
        reach = np.ceil(radius / spacing).astype(int)
        lo = np.maximum(np.floor(c).astype(int) - reach, 0)
        hi = np.minimum(np.ceil(c).astype(int) + reach + 1, shape)
        if np.any(hi <= lo):
            continue
        block = np.asarray(volume[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], np.float64)
        zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        r2 = (
            ((zz - c[0]) * spacing[0]) ** 2
            + ((yy - c[1]) * spacing[1]) ** 2
            + ((xx - c[2]) * spacing[2]) ** 2
        )
        inside = r2 <= radius * radius
        if inside.any():
            out[i] = float(block[inside].mean())
    return out


def faintness(mean_hu: np.ndarray) -> np.ndarray:
    """0 for solid nodules, 1 for faint ground glass, linear between (``nan`` -> 0)."""
    hu = np.nan_to_num(np.asarray(mean_hu, np.float64), nan=SOLID_MEAN_HU)
    return np.clip((SOLID_MEAN_HU - hu) / (SOLID_MEAN_HU - GROUND_GLASS_MEAN_HU), 0.0, 1.0)


def target_radius_mm(diameter_mm: np.ndarray | float, plan: UNetPlan) -> np.ndarray:
    """The radius (mm) of a nodule's target sphere."""
    d = np.asarray(diameter_mm, dtype=np.float64)
    return np.clip(
        d / 2.0 + plan.target_margin_mm, plan.min_target_radius_mm, plan.max_target_radius_mm
    )


def sphere_target(
    center_world: Sequence[float],
    size_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    nodules: np.ndarray,
    radii_mm: np.ndarray,
) -> np.ndarray:
    """0/1 float32 target on the world-aligned grid that :func:`lungct.patches.sample_patch` cuts.

    Voxel ``i`` along an axis lies at ``center + (i - (n - 1) / 2) * spacing``.

    Args:
        center_world: patch centre ``(x, y, z)`` mm.
        size_zyx: patch size in voxels.
        spacing_zyx: voxel size in mm.
        nodules: ``(N, >=3)`` world ``x, y, z`` of the nodules (extra columns ignored).
        radii_mm: ``(N,)`` sphere radius of each nodule.
    """
    size = [int(n) for n in size_zyx]
    out = np.zeros(size, np.float32)
    if len(nodules) == 0:
        return out
    cx, cy, cz = (float(v) for v in center_world)
    axes = [
        c + (np.arange(n) - (n - 1) / 2.0) * s
        for c, n, s in zip((cz, cy, cx), size, spacing_zyx, strict=True)
    ]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
    for (x, y, z), r in zip(np.asarray(nodules)[:, :3], np.asarray(radii_mm), strict=True):
        if (
            abs(z - cz) > r + size[0] * spacing_zyx[0] / 2
            or abs(y - cy) > r + size[1] * spacing_zyx[1] / 2
            or abs(x - cx) > r + size[2] * spacing_zyx[2] / 2
        ):
            continue
        out[(zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2 <= r * r] = 1.0
    return out


def build_scan_samples(
    scan: CachedScan,
    nodules: np.ndarray,
    plan: UNetPlan,
    points: int = 400,
    rng: np.random.Generator | None = None,
    excluded: np.ndarray | None = None,
    radii_mm: np.ndarray | None = None,
) -> ScanSamples:
    """Pick lung and hard-negative centres of one cached scan.

    Reads the lung mask and volume on a strided grid (every 2nd voxel), so a whole-lung scan
    costs a few tens of megabytes once, and keeps ``points`` world points of each kind. An
    empty cached lung mask is segmented again on that grid. Hard negatives keep
    :data:`NODULE_CLEARANCE_MM` outside each nodule's target radius: ``radii_mm`` (one per
    nodule), else the plan's target sphere (:func:`target_radius_mm`).
    """
    rng = rng or np.random.default_rng(0)
    nodule_hu = nodule_mean_hu(scan.volume, scan.geometry, nodules)
    stride = 2
    volume = np.asarray(scan.volume[::stride, ::stride, ::stride])
    lung = np.asarray(scan.lung[::stride, ::stride, ::stride]) > 0
    grid = Geometry(
        volume.shape[::-1],
        tuple(s * stride for s in scan.geometry.spacing),
        scan.geometry.origin,
        scan.geometry.direction,
    )
    if not lung.any():
        # An empty cached mask: segment again on the coarse grid, which often succeeds.
        lung = segment_lungs_array(volume, grid) > 0
    lung_idx = np.argwhere(lung)
    bright_idx = np.argwhere(lung & (volume > VESSEL_HU))
    del lung, volume

    def to_world(idx: np.ndarray, n: int) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros((0, 3))
        pick = idx[rng.choice(len(idx), size=min(n, len(idx)), replace=False)]
        return grid.voxel_to_world(pick).reshape(-1, 3)

    lung_points = to_world(lung_idx, points)
    vessel_points = to_world(bright_idx, 4 * points)
    if len(nodules) and len(vessel_points):
        radii = target_radius_mm(nodules[:, 3], plan) if radii_mm is None else radii_mm
        radii = np.asarray(radii, np.float64) + NODULE_CLEARANCE_MM
        d2 = ((vessel_points[:, None, :] - nodules[None, :, :3]) ** 2).sum(-1)
        vessel_points = vessel_points[np.all(d2 > radii[None, :] ** 2, axis=1)]
    return ScanSamples(
        scan.seriesuid,
        np.asarray(nodules, np.float64).reshape(-1, 4),
        lung_points,
        vessel_points[:points],
        np.zeros((0, 4)) if excluded is None else np.asarray(excluded, np.float64).reshape(-1, 4),
        nodule_hu,
    )


class PatchSampler:
    """Draws patch requests, cuts patches, and augments them into training batches.

    Args:
        cache: the per-scan cache the scans were prepared into.
        samples: sampling index of every scan to draw from (:func:`build_scan_samples`).
        plan: the candidate plan (patch size, spacing, fractions, augmentation).
        augment: apply flips, rotations and intensity jitter.
        seed: seed of the draws; epoch ``e`` uses ``(seed, e)``, so a resumed run sees the
            same stream as an uninterrupted one.

    Example:
        >>> sampler = PatchSampler(cache, samples, plan)  # doctest: +SKIP
        >>> x, y = next(sampler.batches(epoch=0))  # doctest: +SKIP
    """

    def __init__(
        self,
        cache: ScanCache,
        samples: Sequence[ScanSamples],
        plan: UNetPlan,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        self.cache = cache
        self.samples = {s.seriesuid: s for s in samples}
        self.plan = plan
        self.augment = augment
        self.seed = seed
        self._nodule_refs = [(s.seriesuid, i) for s in samples for i in range(len(s.nodules))]
        self._nodule_p = None
        if self._nodule_refs and (plan.small_nodule_weight > 0 or plan.faint_nodule_weight > 0):
            # Small and faint nodules, the ones the network misses, come round more often than
            # the large, solid, easy ones: diameter^-k times 1 + k' * faintness.
            d = np.array([self.samples[u].nodules[i][3] for u, i in self._nodule_refs])
            hu = np.array(
                [
                    self.samples[u].nodule_hu[i] if len(self.samples[u].nodule_hu) else np.nan
                    for u, i in self._nodule_refs
                ]
            )
            w = np.maximum(d, 3.0) ** -plan.small_nodule_weight
            w = w * (1.0 + plan.faint_nodule_weight * faintness(hu))
            self._nodule_p = w / w.sum()
        self._lung_uids = [s.seriesuid for s in samples if len(s.lung_points)]
        self._vessel_uids = [s.seriesuid for s in samples if len(s.vessel_points)]
        if not self._lung_uids:
            raise ValueError("no scan with a lung mask to sample from")

    # ------------------------------------------------------------------------------------------
    def requests(self, n: int, rng: np.random.Generator) -> list[PatchRequest]:
        """``n`` patch centres drawn by the plan's fractions."""
        plan = self.plan
        kinds = rng.choice(
            3,
            size=n,
            p=self._kind_probabilities(),
        )
        half_mm = 0.5 * np.asarray(plan.patch_size) * np.asarray(plan.spacing_zyx)
        out = []
        for kind in kinds:
            if kind == 0:
                if self._nodule_p is None:
                    pick = int(rng.integers(len(self._nodule_refs)))
                else:
                    pick = int(rng.choice(len(self._nodule_refs), p=self._nodule_p))
                uid, i = self._nodule_refs[pick]
                x, y, z, d = self.samples[uid].nodules[i]
                reach = plan.max_offset_fraction * half_mm  # (z, y, x)
                if plan.dims == "2d":
                    # The output is the centre slice: it must cut the nodule's target sphere.
                    reach[0] = 0.8 * float(target_radius_mm(d, plan))
                dz, dy, dx = rng.uniform(-reach, reach)
                out.append(PatchRequest(uid, (x + dx, y + dy, z + dz), label="nodule"))
                continue
            if kind == 1:
                uid = self._vessel_uids[int(rng.integers(len(self._vessel_uids)))]
                points = self.samples[uid].vessel_points
                label = "vessel"
            else:
                uid = self._lung_uids[int(rng.integers(len(self._lung_uids)))]
                points = self.samples[uid].lung_points
                label = "lung"
            p = points[int(rng.integers(len(points)))] + rng.uniform(-2.0, 2.0, size=3)
            out.append(PatchRequest(uid, tuple(float(v) for v in p), label=label))
        return out

    def _kind_probabilities(self) -> np.ndarray:
        plan = self.plan
        p = np.array(
            [
                plan.nodule_fraction if self._nodule_refs else 0.0,
                plan.vessel_fraction if self._vessel_uids else 0.0,
                0.0,
            ]
        )
        p[2] = max(0.0, 1.0 - p[:2].sum())
        return p / p.sum()

    def cut(self, scan: CachedScan, request: PatchRequest) -> np.ndarray:
        """Image channels followed by the target channel, ``(C + 1, y, x)`` (2-D) or
        ``(2, z, y, x)`` (3-D), float32."""
        plan = self.plan
        hu = sample_patch(
            scan.volume,
            scan.geometry,
            request.center_world,
            plan.patch_size,
            plan.spacing_zyx,
            order=1,
            fill=AIR_HU,
        )
        image = apply_window(hu, plan.hu_window, (0.0, 1.0))
        samples = self.samples[request.seriesuid]
        nodules, excluded = samples.nodules, samples.excluded
        radii = target_radius_mm(nodules[:, 3], plan) if len(nodules) else np.zeros(0)
        size = (1, *plan.patch_size[1:]) if plan.dims == "2d" else plan.patch_size
        target = sphere_target(request.center_world, size, plan.spacing_zyx, nodules, radii)
        if len(excluded):
            d = np.where(excluded[:, 3] > 0, excluded[:, 3], UNKNOWN_EXCLUDED_DIAMETER_MM)
            ignore = sphere_target(
                request.center_world,
                size,
                plan.spacing_zyx,
                excluded,
                np.maximum(d / 2.0 + plan.target_margin_mm, plan.min_target_radius_mm),
            )
            target[(ignore > 0) & (target == 0)] = IGNORE
        if plan.dims == "2d":
            return np.concatenate([image, target], axis=0)
        return np.stack([image, target], axis=0)

    # ------------------------------------------------------------------------------------------
    def patches(
        self, n: int, epoch: int, augment: bool | None = None
    ) -> Iterator[tuple[np.ndarray, PatchRequest]]:
        """``n`` (augmented) patches of one epoch, through the bounded shuffle buffer."""
        rng = np.random.default_rng((self.seed, epoch))
        requests = self.requests(n, rng)
        queue = PatchQueue(
            self.cache,
            requests,
            self.cut,
            buffer_size=self.plan.buffer_size,
            seed=int(rng.integers(2**31)),
        )
        augment = self.augment if augment is None else augment
        for patch, request in queue:
            if augment:
                patch = augment_patch(patch, self.plan, rng)
            yield patch, request

    def batches(
        self, epoch: int, steps: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``steps`` batches ``(x, y)`` in the model's layout (channels last)."""
        plan = self.plan
        steps = plan.steps_per_epoch if steps is None else steps
        batch: list[np.ndarray] = []
        for patch, _ in self.patches(steps * plan.batch_size, epoch):
            batch.append(patch)
            if len(batch) == plan.batch_size:
                yield self.model_layout(np.stack(batch))
                batch = []

    def fixed_set(self, n: int, epoch: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """``n`` patches without augmentation (a validation set), in the model's layout."""
        patches = [p for p, _ in self.patches(n, epoch=epoch % 2**31, augment=False)]
        return self.model_layout(np.stack(patches))

    def model_layout(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stacked patches as the network's ``(x, y)`` (:func:`to_model_layout`)."""
        return to_model_layout(batch, self.plan)


def to_model_layout(batch: np.ndarray, plan: UNetPlan) -> tuple[np.ndarray, np.ndarray]:
    """Split stacked ``(B, channels, ...)`` patches into channels-last ``x`` and ``y``."""
    if plan.dims == "2d":
        x = np.moveaxis(batch[:, :-1], 1, -1)
        y = batch[:, -1][..., None]
    else:
        x = batch[:, 0][..., None]
        y = batch[:, 1][..., None]
    return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.float32)


def augment_patch(patch: np.ndarray, plan: UNetPlan, rng: np.random.Generator) -> np.ndarray:
    """Random flips, axial 90-degree rotations and intensity jitter of one stacked patch.

    ``patch`` is ``(channels, ...)`` as :meth:`PatchSampler.cut` returns it; the last channel
    (the target) moves with the image but keeps its 0/1 values.
    """
    out = patch
    if plan.dims == "2d":
        # Channels are neighbouring slices: reversing them is a flip along z.
        if plan.flip and rng.random() < 0.5:
            out = np.concatenate([out[:-1][::-1], out[-1:]], axis=0)
        spatial = (1, 2)
    else:
        spatial = (1, 2, 3)
        if plan.flip and rng.random() < 0.5:
            out = np.flip(out, axis=1)
    if plan.flip:
        for axis in spatial[-2:]:
            if rng.random() < 0.5:
                out = np.flip(out, axis=axis)
    if plan.rot90:
        k = int(rng.integers(4))
        if k and out.shape[spatial[-2]] == out.shape[spatial[-1]]:
            out = np.rot90(out, k, axes=spatial[-2:])
    out = np.array(out, dtype=np.float32)  # a copy: flips are views
    image = out[:-1] if plan.dims == "2d" else out[:1]
    if plan.intensity_jitter > 0:
        j = plan.intensity_jitter
        image *= 1.0 + rng.uniform(-j, j)
        image += rng.uniform(-j, j)
    if plan.noise_std > 0:
        image += rng.normal(0.0, plan.noise_std, size=image.shape).astype(np.float32)
    return out
