"""The CT-GAN plan: every choice that shapes the cubes, the two networks, training and pasting.

A plan is a frozen dataclass that round-trips through a plain JSON file (``plan.json`` in every
model folder), so a user can open it in an editor and an ablation is a name in the output.

Named plans (:data:`PLANS`, section 4 of ``docs/methods.md``):

* ``default`` - narrow networks (``gf = df = 8``) that train on two CPU cores in minutes; the
  paper's 16^3 hole, least squares + 100 x L1, Adam 2e-4 (beta1 0.5) for G and 5e-5 for D; the L1
  term weighs the hole 4x the context; 10 % of the cubes shifted; the injector's condition has
  a second channel, a ball of the nodule's diameter (``size_channel``: minutes of training
  without it in-paint the average of all sizes, a faint blur).
* ``paper`` - the published widths ``gf = df = 100`` (G ~162.6 M parameters), 16^3 hole (the
  paper's figure), D learning rate 1e-6.
* ``code`` - the authors' code: 20^3 hole (indices 6..26), ``gf = df = 100``, D learning rate 1e-6
  and its inverted labels (real = 0, fake = 1).
* ``code-gf40`` - the CT-GAN copy in the original repository: as ``code`` with ``gf = df = 40``
  (named ``seed`` in earlier versions; that name still selects it).

Axis convention: cubes are ``(z, y, x)`` numpy arrays at ``cut_spacing_mm`` (1 mm) in a
world-aligned grid, so a cube cut from any scan has the same orientation and scale.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError
from lungct.plans import JSONPlan

KINDS = ("injector", "remover")
"""What a model is trained on: nodule cubes (injector) or healthy lung cubes (remover)."""


def _tuple(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tuple(v) for v in value)
    return value


@dataclass(frozen=True)
class GANPlan(JSONPlan):
    """Everything that shapes a CT-GAN injector or remover.

    Args:
        name: label written into the model folder.
        cube_size: edge of the training / generated cube in voxels (paper 32).
        hole_size: edge of the zeroed centre the generator in-paints (paper figure 16,
            code 20).
        cut_spacing_mm: voxel size of the cube (paper 1 mm isotropic).
        gf: filters of the generator's first layer (encoder ``gf * (1, 2, 4, 8, 8)``).
        df: filters of the discriminator's first layer (``df * (1, 2, 4, 8)``).
        generator_levels: encoder depth; ``0`` = down to 1 voxel (``log2(cube_size)``).
        discriminator_levels: PatchGAN depth (4 gives a 2^3 validity map on 32^3 cubes).
        kernel_size: convolution kernel edge (paper 4).
        dropout: decoder dropout rate (paper 0.5).
        bn_momentum: batch-norm momentum (code 0.8).
        leaky_alpha: LeakyReLU slope (0.2).
        g_learning_rate: Adam learning rate of the generator (2e-4).
        d_learning_rate: Adam learning rate of the discriminator (code 1e-6).
        beta_1: Adam beta1 of both optimisers (0.5).
        l1_weight: weight of the L1 reconstruction term (100).
        l1_hole_weight: weight of the hole's voxels in the L1 mean relative to the given context
            (the code's 1 = a plain mean over the cube; more makes the generator spend its
            effort on the in-painted centre, which is all that is pasted back).
        real_label: discriminator target for real pairs (code 0).
        fake_label: discriminator target for generated pairs (code 1).
        batch_size: cubes per training step (the global batch, split between replicas).
        steps: training steps (one step updates D and G once), rounded up to whole epochs.
        checkpoint_every: steps of an epoch: the log's row, the checkpoint and the refreshed
            ``generator.keras`` come at the end of each (a plan with fewer ``steps`` trains
            one epoch of them).
        grid_every: steps between PNG grids (condition | generated | real), written at the
            end of the epoch that passes a multiple of it (and at the end of a run).
        log_every: unused since training runs on ``model.fit`` (the log has one row per
            epoch); kept so that every plan file loads.
        keep_checkpoints: newest epoch checkpoints kept (older ones are deleted).
        max_shift_vox: largest random shift of the cube centre, voxels per axis (paper 4).
        shift_probability: share of training cubes that get a shift (the code shifts 4 of its
            67 copies, ~6 %; shifting every cube blurs what the L1 term asks for at the centre).
        rotate: random rotation about the z axis (paper: 59 rotations in 6 degree steps).
        flip_axes: numpy axes ``(z, y, x)`` flipped at random (paper: y and x).
        hist_bins: bins of the histogram equalisation (paper 10,000).
        size_channel: the injector's condition gets a second channel, a ball of the nodule's
            diameter at its centre (1 inside, 0 outside); injection then takes a diameter (or
            draws one of the training nodules'). Not in the paper: without it the generator
            must guess the size from the context alone and, trained for minutes, in-paints
            the average of all sizes - a faint blur. The remover never has it.
        min_nodule_diameter_mm: smallest annotated nodule used by the injector.
        max_nodule_diameter_mm: largest one; ``0`` = ``hole_size * cut_spacing_mm``.
        healthy_per_scan: healthy cubes cut from each training scan for the remover.
        hu_overflow: generated HU above this is replaced by its 5^3 neighbourhood mean (code).
        hu_floor: generated HU below this is raised to it (code -1000).
        local_floor_percentile: generated HU below this percentile of the cube it replaces is
            raised to it (no air holes darker than anything around them); 0 = off.
        despeckle_hu: a generated voxel further than this from the median of its 3^3
            neighbourhood takes that median (isolated dark or bright dots); 0 = off.
        inject_blend_mm: (flat radius, Gaussian sigma) of the injection blending weight.
        remove_blend_mm: (flat radius, Gaussian sigma) of the removal blending weight.
        noise_scale: the noise touch-up's std as a fraction of the scan's own (code 0.6).
        nodule_min_contrast_hu: least HU rise at the centre for an injection to count as a
            nodule (its size is then taken at half that rise; see ``CubeTamperer.measure``).
        site_pleura_mm: (min, max) distance of an automatic site from the pleura.
        juxtapleural_pleura_mm: the same range for juxtapleural sites.
        site_vessel_hu: lung voxels above this are vessels (or other dense tissue).
        site_large_vessel_mm: vessels at least this thick are avoided.
        site_vessel_margin_mm: least distance of a site from a large vessel.
        site_nodule_margin_mm: least distance from the edge of a nodule or excluded finding.
        site_min_separation_mm: least distance between two sites in one scan.
        site_grid_mm: voxel size of the coarse grid sites are chosen on.
        seed: seeds weights, sampling and site choice.

    Example:
        >>> plan = get_plan("code")
        >>> plan.hole_size, plan.d_learning_rate, plan.hole_slice
        (20, 1e-06, slice(6, 26, None))
    """

    name: str = "default"
    cube_size: int = 32
    hole_size: int = 16
    cut_spacing_mm: float = 1.0
    gf: int = 8
    df: int = 8
    generator_levels: int = 0
    discriminator_levels: int = 4
    kernel_size: int = 4
    dropout: float = 0.5
    bn_momentum: float = 0.8
    leaky_alpha: float = 0.2
    g_learning_rate: float = 2e-4
    d_learning_rate: float = 5e-5
    beta_1: float = 0.5
    l1_weight: float = 100.0
    l1_hole_weight: float = 4.0
    real_label: float = 1.0
    fake_label: float = 0.0
    batch_size: int = 8
    steps: int = 2000
    checkpoint_every: int = 250
    grid_every: int = 250
    log_every: int = 10
    keep_checkpoints: int = 2
    max_shift_vox: int = 4
    shift_probability: float = 0.1
    rotate: bool = True
    flip_axes: tuple[int, ...] = (1, 2)
    size_channel: bool = True
    hist_bins: int = 10000
    min_nodule_diameter_mm: float = 3.0
    max_nodule_diameter_mm: float = 0.0
    healthy_per_scan: int = 16
    hu_overflow: float = 2000.0
    hu_floor: float = -1000.0
    local_floor_percentile: float = 1.0
    despeckle_hu: float = 400.0
    inject_blend_mm: tuple[float, float] = (6.0, 3.0)
    remove_blend_mm: tuple[float, float] = (9.0, 2.5)
    noise_scale: float = 0.6
    nodule_min_contrast_hu: float = 150.0
    site_pleura_mm: tuple[float, float] = (8.0, 1000.0)
    juxtapleural_pleura_mm: tuple[float, float] = (1.0, 4.0)
    site_vessel_hu: float = -500.0
    site_large_vessel_mm: float = 3.0
    site_vessel_margin_mm: float = 4.0
    site_nodule_margin_mm: float = 10.0
    site_min_separation_mm: float = 32.0
    site_grid_mm: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, f.name, _tuple(value))
        self._check()

    def _check(self) -> None:
        def bad(problem: str) -> LungCTError:
            return LungCTError(None, f"plan {self.name!r}: {problem}")

        if self.cube_size < 8 or self.cube_size & (self.cube_size - 1):
            raise bad(f"cube_size must be a power of two >= 8, not {self.cube_size}")
        if not 0 < self.hole_size < self.cube_size:
            raise bad(f"hole_size must be in 1..{self.cube_size - 1}, not {self.hole_size}")
        if self.cut_spacing_mm <= 0:
            raise bad("cut_spacing_mm must be positive")
        if min(self.gf, self.df) < 1:
            raise bad("gf and df must be >= 1")
        max_levels = int(math.log2(self.cube_size))
        if not 0 <= self.generator_levels <= max_levels:
            raise bad(f"generator_levels must be in 0..{max_levels}")
        if not 1 <= self.discriminator_levels <= max_levels:
            raise bad(f"discriminator_levels must be in 1..{max_levels}")
        if self.kernel_size < 1:
            raise bad("kernel_size must be >= 1")
        if not 0 <= self.dropout < 1:
            raise bad("dropout must be in [0, 1)")
        if min(self.g_learning_rate, self.d_learning_rate) <= 0:
            raise bad("learning rates must be positive")
        if self.l1_weight < 0 or self.l1_hole_weight <= 0:
            raise bad("l1_weight must be >= 0 and l1_hole_weight > 0")
        if self.real_label == self.fake_label:
            raise bad("real_label and fake_label must differ")
        if self.batch_size < 1 or self.steps < 0:
            raise bad("batch_size must be >= 1 and steps >= 0")
        if min(self.checkpoint_every, self.grid_every, self.log_every, self.keep_checkpoints) < 1:
            raise bad("checkpoint_every, grid_every, log_every and keep_checkpoints must be >= 1")
        if self.max_shift_vox < 0 or not 0 <= self.shift_probability <= 1:
            raise bad("max_shift_vox must be >= 0 and shift_probability in [0, 1]")
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise bad("flip_axes must name numpy axes 0, 1 or 2")
        if self.hist_bins < 16:
            raise bad("hist_bins must be >= 16")
        if self.despeckle_hu < 0 or not 0 <= self.local_floor_percentile <= 100:
            raise bad("despeckle_hu must be >= 0 and local_floor_percentile in [0, 100]")
        if self.hu_floor >= self.hu_overflow:
            raise bad("hu_floor must be below hu_overflow")
        for name in ("inject_blend_mm", "remove_blend_mm"):
            value = getattr(self, name)
            if len(value) != 2 or value[0] < 0 or value[1] <= 0:
                raise bad(f"{name} needs (flat radius >= 0, sigma > 0)")
        for name in ("site_pleura_mm", "juxtapleural_pleura_mm"):
            lo, hi = getattr(self, name)
            if not 0 <= lo < hi:
                raise bad(f"{name} needs 0 <= min < max")
        if self.site_grid_mm <= 0 or self.healthy_per_scan < 0 or self.noise_scale < 0:
            raise bad("site_grid_mm must be > 0, healthy_per_scan and noise_scale >= 0")

    # --- derived sizes --------------------------------------------------------------------

    @property
    def hole_slice(self) -> slice:
        """Index range of the zeroed centre along every axis (code: ``slice(6, 26)``)."""
        start = (self.cube_size - self.hole_size) // 2
        return slice(start, start + self.hole_size)

    @property
    def cube_mm(self) -> float:
        """Edge of the cube in millimetres."""
        return self.cube_size * self.cut_spacing_mm

    @classmethod
    def from_dict(cls, d: dict, source: str | Path | None = None) -> GANPlan:
        """As :meth:`JSONPlan.from_dict`; a plan saved before ``size_channel`` existed had none."""
        if isinstance(d, dict) and "size_channel" not in d:
            d = {**d, "size_channel": False}
        return super().from_dict(d, source)

    def condition_channels(self, kind: str) -> int:
        """Channels of a ``kind`` model's condition: the cube, and for a sized injector the ball."""
        return 2 if self.size_channel and kind == "injector" else 1

    @property
    def max_diameter_mm(self) -> float:
        """Largest nodule diameter the injector trains on."""
        return self.max_nodule_diameter_mm or self.hole_size * self.cut_spacing_mm


_AS_PUBLISHED = {
    "gf": 100,
    "df": 100,
    "d_learning_rate": 1e-6,
    "l1_hole_weight": 1.0,
    "shift_probability": 4 / 67,
    "despeckle_hu": 0.0,
    "local_floor_percentile": 0.0,
    "size_channel": False,
}
_CODE_ONLY = {"hole_size": 20, "real_label": 0.0, "fake_label": 1.0}

PLANS: dict[str, GANPlan] = {
    "default": GANPlan(),
    "paper": GANPlan(name="paper", **_AS_PUBLISHED),
    "code": GANPlan(name="code", **_AS_PUBLISHED, **_CODE_ONLY),
    "code-gf40": GANPlan(name="code-gf40", **{**_AS_PUBLISHED, "gf": 40, "df": 40}, **_CODE_ONLY),
}
"""The named plans; see the module docstring."""

LEGACY_PLANS = {"seed": "code-gf40"}
"""Plan names of earlier versions (settings and command lines written then may use them)."""


def get_plan(name_or_path: str | Path, **changes: Any) -> GANPlan:
    """A named plan (:data:`PLANS`) or a ``plan.json`` path, with ``changes`` applied.

    Raises:
        LungCTError: unknown name, missing or bad file, unknown key.
    """
    text = str(name_or_path)
    text = LEGACY_PLANS.get(text, text)
    if text in PLANS:
        plan = PLANS[text]
    elif text.endswith(".json") or Path(text).is_file():
        plan = GANPlan.load(text)
    else:
        raise LungCTError(None, f"unknown plan {text!r} (named plans: {', '.join(PLANS)})")
    return plan.replace(**changes)


def parse_plan_overrides(items: list[str] | None) -> dict[str, Any]:
    """Turn ``["gf=16", "rotate=false", "flip_axes=[1,2]"]`` into plan changes (JSON values).

    A value that is not JSON is taken as a string.
    """
    changes: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise LungCTError(None, f"plan override {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
    fields = {f.name for f in dataclasses.fields(GANPlan)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise LungCTError(None, f"unknown plan keys {unknown}")
    return changes
