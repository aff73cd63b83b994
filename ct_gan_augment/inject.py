"""Injecting and removing nodules at world coordinates in a scan of any spacing.

For one site: cut a world-aligned ``cube_size``^3 cube at 1 mm (exact size at any spacing, air
outside the volume), equalise and normalise it, zero its centre, generate, clip to +-0.5,
de-normalise, fix HU overflow, then paste: the generated cube is resampled onto the scan's own
voxels inside the cube (trilinear), noise with the scan's own texture is added, and the result
is blended in:

* injection: weight ``sigmoid((g + 700) / 70) * w(r)`` (only tissue denser than about -700 HU
  comes in), keeping ``max(blended, original)`` so nothing in the scan gets darker;
* removal: weight ``w(r)`` (1 over the hole, a Gaussian edge, 0 at the cube's faces).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy import ndimage

from ct_gan_augment.config import GANPlan
from ct_gan_augment.data import size_ball
from ct_gan_augment.injected_nodule import InjectedNodule
from ct_gan_augment.manifest import ModelManifest
from ct_gan_augment.model import GENERATOR_FILE, NORMALISER_FILE, PLAN_FILE, load_network
from ct_gan_augment.normaliser import CubeNormaliser
from ct_gan_augment.paste import (
    blend_weight,
    cube_region,
    cut_cube,
    fix_hu_overflow,
    matched_noise,
    resample_cube,
    sigmoid,
    to_int16_hu,
)
from lungct.errors import LungCTError
from lungct.modeldir import verify_model_dir
from lungct.scan import Scan

GeneratorFn = Callable[[np.ndarray], np.ndarray]


def make_condition(
    normalised: np.ndarray,
    plan: GANPlan,
    diameters_mm: np.ndarray | None = None,
    centres_vox: np.ndarray | None = None,
) -> np.ndarray:
    """The generator's input ``(n, c, c, c, C)`` for normalised cubes ``(n, c, c, c)``: each cube
    with its centre zeroed, and with ``diameters_mm`` a second channel, the size ball
    (:func:`ct_gan_augment.data.size_ball`, centred at ``centres_vox`` or the cube's centre)."""
    condition = np.array(normalised, dtype=np.float32, copy=True)
    hole = plan.hole_slice
    condition[:, hole, hole, hole] = 0.0
    channels = [condition]
    if diameters_mm is not None:
        channels.append(size_ball(diameters_mm, centres_vox, plan))
    return np.stack(channels, axis=-1)


def run_generator(generator: GeneratorFn, conditions: np.ndarray) -> np.ndarray:
    """Generator outputs ``(n, c, c, c)`` (normalised) for conditions ``(n, c, c, c[, C])``.

    A Keras generator runs in inference mode (batch-norm moving statistics, no dropout), as the
    code's ``predict``; any other callable gets ``(1, c, c, c, C)`` arrays one at a time.
    """
    import keras

    x = np.asarray(conditions, dtype=np.float32)
    if x.ndim == 4:
        x = x[..., None]
    if isinstance(generator, keras.Model):
        out = keras.ops.convert_to_numpy(generator(x, training=False))
        return np.asarray(out, dtype=np.float32)[..., 0]
    return np.stack([np.asarray(generator(c[None]), np.float32)[0, ..., 0] for c in x])


def generated_to_hu(
    generated: np.ndarray, cube_hu: np.ndarray, normaliser: CubeNormaliser, plan: GANPlan
) -> np.ndarray:
    """A generator output (normalised) -> HU, as pasted: clip to +-0.5, de-normalise, fix
    overflow, raise values below the replaced cube's ``local_floor_percentile``, despeckle."""
    hu = normaliser.inverse(np.clip(generated, -0.5, 0.5))
    floor = plan.hu_floor
    if plan.local_floor_percentile > 0:
        floor = max(floor, float(np.percentile(cube_hu, plan.local_floor_percentile)))
    return fix_hu_overflow(hu, plan.hu_overflow, floor, plan.despeckle_hu)


class CubeTamperer:
    """Inject or remove nodules with a trained CT-GAN generator (see the module docstring).

    Args:
        generator: a Keras generator, or any function ``(1, c, c, c, 1) float32 -> same``.
        normaliser: the model's fitted :class:`CubeNormaliser`.
        plan: the model's plan (cube and hole size, paste settings).
        kind: ``injector`` or ``remover`` (which of :meth:`inject` / :meth:`remove` is allowed;
            ``None`` allows both, for tests).
        seed: seeds the noise touch-up and the drawn sizes.
        diameters_mm: sizes an injection without a given diameter draws from (the training
            nodules'); without them, uniform over the plan's nodule size range.

    Example:
        >>> tamperer = CubeTamperer.from_dir("runs/injector")  # doctest: +SKIP
        >>> scan2, nodule = tamperer.inject(scan, (-80.0, 40.0, -120.0))  # doctest: +SKIP

    Reference:
        Mirsky et al. "CT-GAN". USENIX Security 2019 (``procedures/attack_pipeline.py``).
    """

    def __init__(
        self,
        generator: GeneratorFn,
        normaliser: CubeNormaliser,
        plan: GANPlan,
        kind: str | None = None,
        seed: int | None = 0,
        diameters_mm: Sequence[float] | None = None,
    ) -> None:
        self.generator = generator
        self.normaliser = normaliser
        self.plan = plan
        self.kind = kind
        self.rng = np.random.default_rng(seed)
        self.diameters_mm = [float(d) for d in diameters_mm or () if d > 0]
        shape = getattr(generator, "input_shape", None)
        if shape is not None:
            self.sized = int(shape[-1]) > 1
        else:
            self.sized = plan.condition_channels(kind or "injector") > 1

    @classmethod
    def from_dir(
        cls, model_dir: str | os.PathLike, seed: int | None = 0, allow_unfinished: bool = False
    ) -> CubeTamperer:
        """Load plan, normaliser, manifest and ``generator.keras`` (safe mode) from a folder.

        ``allow_unfinished`` accepts a folder whose training has not ended (the generator of
        its last checkpoint).
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise LungCTError(model_dir, "model folder does not exist")
        # The folder first (training ended, files unchanged, a CT-GAN's): another stage's
        # folder is named as such, not by the plan keys it does not share.
        verify_model_dir(model_dir, allow_unfinished=allow_unfinished, stage="gan")
        plan = GANPlan.load(model_dir / PLAN_FILE)
        normaliser = CubeNormaliser.load(model_dir / NORMALISER_FILE)
        manifest = ModelManifest.load(model_dir)
        generator = load_network(
            model_dir, GENERATOR_FILE, allow_unfinished, plan, manifest.kind, verify=False
        )
        return cls(generator, normaliser, plan, manifest.kind, seed, manifest.nodule_diameters_mm)

    # --- the cube -------------------------------------------------------------------------

    def generate(self, cube_hu: np.ndarray, diameter_mm: float | None = None) -> np.ndarray:
        """In-paint the centre of one HU cube; returns the generated cube in HU (float32).

        ``diameter_mm`` is the wanted nodule size for a model with a size channel (drawn when
        ``None``, see :meth:`nodule_size`); a model without one ignores it.
        """
        c = self.plan.cube_size
        if cube_hu.shape != (c, c, c):
            raise ValueError(f"cube must be {(c, c, c)}, got {cube_hu.shape}")
        x = self.normaliser.transform(cube_hu)[None]
        sizes = [self.nodule_size(diameter_mm)] if self.sized else None
        out = run_generator(self.generator, make_condition(x, self.plan, sizes))[0]
        return generated_to_hu(out, cube_hu, self.normaliser, self.plan)

    def nodule_size(self, diameter_mm: float | None = None) -> float:
        """The size of the next injection: ``diameter_mm`` checked, or one drawn."""
        plan = self.plan
        if diameter_mm is None:
            if self.diameters_mm:
                return float(self.rng.choice(self.diameters_mm))
            return float(self.rng.uniform(plan.min_nodule_diameter_mm, plan.max_diameter_mm))
        largest = plan.hole_size * plan.cut_spacing_mm
        if not 0 < diameter_mm <= largest:
            raise LungCTError(
                None,
                f"nodule diameter {diameter_mm:g} mm is outside (0, {largest:g}] mm, the "
                "in-painted hole of this model",
            )
        return float(diameter_mm)

    # --- scans ----------------------------------------------------------------------------

    def _check_kind(self, wanted: str) -> None:
        if self.kind is not None and self.kind != wanted:
            verb = "inject" if wanted == "injector" else "remove"
            raise LungCTError(None, f"this model is a {self.kind}; {verb} needs a {wanted}")

    def _tamper(
        self, scan: Scan, site: Sequence[float], mode: str, diameter_mm: float | None = None
    ) -> tuple[Scan, np.ndarray]:
        plan = self.plan
        site = np.asarray(site, dtype=np.float64).reshape(3)
        if not np.all(np.isfinite(site)):
            raise LungCTError(scan.source, f"site {site.tolist()} is not finite")
        region = cube_region(scan.geometry, site, plan.cube_size, plan.cut_spacing_mm)
        if region.empty or not np.any(region.face_mm > 0):
            raise LungCTError(
                scan.source or scan.seriesuid,
                f"site {np.round(site, 1).tolist()} mm is outside the scan",
            )
        clean = cut_cube(scan.array, scan.geometry, site, plan.cube_size, plan.cut_spacing_mm)
        generated = self.generate(clean, diameter_mm)
        original = np.asarray(scan.array[region.slices], dtype=np.float32)
        values = resample_cube(generated, region)
        values += matched_noise(original, self.rng, plan.noise_scale)
        if mode == "inject":
            flat, sigma = plan.inject_blend_mm
            weight = blend_weight(region.radius_mm, region.face_mm, flat, sigma)
            weight *= sigmoid((values + 700.0) / 70.0)
            blended = np.maximum(weight * values + (1.0 - weight) * original, original)
        else:
            flat, sigma = plan.remove_blend_mm
            weight = blend_weight(region.radius_mm, region.face_mm, flat, sigma)
            blended = weight * values + (1.0 - weight) * original
        array = scan.array.copy()
        array[region.slices] = to_int16_hu(blended)
        hu_max = max(int(scan.hu_max), int(array[region.slices].max()))
        return replace(scan, array=array, hu_max=hu_max), clean

    def inject(
        self, scan: Scan, site: Sequence[float], diameter_mm: float | None = None
    ) -> tuple[Scan, InjectedNodule]:
        """A copy of ``scan`` with a nodule injected at ``site`` (world mm), and its annotation.

        ``diameter_mm``: the wanted size, for a model with a size channel (drawn from the
        training nodules' sizes when ``None``); the annotation reports the size measured.
        """
        self._check_kind("injector")
        if diameter_mm is not None and not self.sized:
            raise LungCTError(
                None, "this injector has no size channel (plan size_channel false): no diameter"
            )
        new, before = self._tamper(scan, site, "inject", diameter_mm)
        return new, self.measure(before, new, site)

    def remove(self, scan: Scan, site: Sequence[float]) -> Scan:
        """A copy of ``scan`` with whatever lies at ``site`` replaced by generated parenchyma."""
        self._check_kind("remover")
        return self._tamper(scan, site, "remove")[0]

    def measure(self, before: np.ndarray, scan: Scan, site: Sequence[float]) -> InjectedNodule:
        """Centre and equivalent diameter of what the injection added around ``site``.

        On the 1 mm cube of ``after - before`` (so vessels and walls that were already there do
        not count): the peak rise within ``hole_size / 4`` of the centre must reach
        ``nodule_min_contrast_hu``; the nodule is the connected part of the rise above half that
        peak (full width at half maximum, which sizes partial-volume-blurred nodules fairly) that
        holds the peak. Its centre is the rise-weighted centroid.
        """
        plan = self.plan
        site_t = tuple(float(v) for v in site)
        after = cut_cube(scan.array, scan.geometry, site, plan.cube_size, plan.cut_spacing_mm)
        rise = after - before
        c = plan.cube_size
        offsets = np.indices((c, c, c), dtype=np.float32) - (c - 1) / 2.0
        near = np.sqrt(np.sum(offsets**2, axis=0)) <= max(2.0, plan.hole_size / 4.0)
        peak = float(rise[near].max())
        if peak < plan.nodule_min_contrast_hu:
            return InjectedNodule(site_t, site_t, 0.0, 0.0)
        peak_index = tuple(np.argwhere(near & (rise == peak))[0])
        labels, _ = ndimage.label(rise >= 0.5 * peak)
        component = labels == labels[peak_index]
        weights = rise[component]
        index = np.argwhere(component).astype(np.float64)
        volume = float(component.sum()) * plan.cut_spacing_mm**3
        diameter = (6.0 * volume / np.pi) ** (1.0 / 3.0)
        centroid = (weights[:, None] * index).sum(axis=0) / weights.sum()
        offset_zyx = (centroid - (c - 1) / 2.0) * plan.cut_spacing_mm
        center = np.asarray(site, dtype=np.float64) + offset_zyx[::-1]
        return InjectedNodule(site_t, tuple(float(v) for v in center), round(diameter, 2), volume)
