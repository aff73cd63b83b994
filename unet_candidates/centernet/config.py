"""The CenterNet detector's plan: every choice that shapes its data, network and candidates.

A :class:`CenterNetPlan` is a frozen dataclass that round-trips through a plain JSON file (the
``plan.json`` of its model folder). Presets are named entries of :data:`CENTERNET_PRESETS`; a
plan file may start from one and override any field::

    {"preset": "centernet", "spacing": [2.0, 2.0, 2.0], "epochs": 40}

Its ``detector`` field (always ``"centernet"``) tells the file from a U-Net's ``plan.json``
(:func:`is_centernet_plan`), so one ``extract`` command reads either model folder.

Axis orders, as in :class:`unet_candidates.config.UNetPlan`: ``spacing`` is world
``(x, y, z)`` mm; ``patch_size`` and ``window_size`` are numpy ``(z, y, x)`` voxels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError
from lungct.fileio import read_json
from lungct.plans import JSONPlan, check_field_types, pop_plan_format
from lungct.preprocess import WINDOWS

DETECTOR = "centernet"
"""The value of a CenterNet plan's ``detector`` field."""


@dataclass(frozen=True)
class CenterNetPlan(JSONPlan):
    """Everything a CenterNet candidate run depends on, except paths.

    Args:
        name: label of the plan (model folders, logs).
        detector: the kind of candidate network: always ``centernet`` (a U-Net's plan has no
            such field).
        spacing: model grid ``(x, y, z)`` mm; scans and the 1 mm cache are resampled to it.
        hu_window: HU range mapped to [0, 1] (clipped outside).
        backbone_filters: widths of the backbone's levels, at strides 1, 2, 4, 8 ... (the
            depth is the number of entries).
        blocks_per_level: residual blocks per backbone level.
        neck_filters: width of the feature pyramid that merges the levels top-down.
        head_filters: width of the 3^3 convolution in front of each output.
        batch_norm: batch normalisation after each backbone and neck convolution.
        heatmap_prior: initial heatmap value everywhere (sets the last bias).
        size_prior_mm: initial diameter output (sets the size head's bias).
        patch_size: training patch ``(z, y, x)`` voxels.
        window_size: extraction window ``(z, y, x)`` voxels.
        window_overlap: fraction of a window shared with its neighbour along each axis.
        window_batch: windows predicted per batch at extraction.
        sigma_fraction: a finding's Gaussian has a sigma of this fraction of its diameter
            (world mm), clipped to ``[min_sigma_mm, max_sigma_mm]``.
        min_sigma_mm, max_sigma_mm: the clip of the Gaussian's sigma (mm).
        size_region: the size output is trained where a nodule's Gaussian is at least this
            (its core; 1 = the peak voxel alone, as the original).
        ignore_margin_mm: excluded findings that are not weak positives (see
            ``reader_weights``) are left out of the loss within their radius + this margin.
        min_ignore_radius_mm: smallest such radius (a finding of unknown size: 10 mm across).
        reader_weights: loss weight of a finding that 1, 2, 3, 4 ... readers marked (the
            ``reader_count`` column of the tables). A nodule of unknown count weighs 1; an
            excluded finding with a count and a size becomes a positive of its weight (LIDC's
            1-2-reader nodules). Empty = no consensus weighting: every nodule weighs 1 and
            every excluded finding is left out, as for the U-Net.
        batch_size: training patches per step.
        nodule_fraction: share of patches containing a nodule (random offset inside the patch).
        vessel_fraction: share of hard negatives centred on bright lung voxels.
        max_offset_fraction: a nodule's centre lies within this fraction of the patch's half
            size from the patch centre.
        small_nodule_weight: nodule patches pick nodule *i* with probability proportional to
            ``diameter_i ** -small_nodule_weight``.
        faint_nodule_weight: and to ``1 + faint_nodule_weight * faintness_i`` (see the U-Net
            plan).
        flip: random flips along every axis; rot90: random 90-degree rotations in the axial
            plane; intensity_jitter: +- scale and shift of the [0, 1] intensities;
            noise_std: Gaussian noise added to the [0, 1] intensities.
        optimizer: ``"adam"`` or ``"sgd_nesterov"``.
        learning_rate: initial learning rate (cosine decay to 5 % over the run's budget).
        focal_alpha, focal_beta: exponents of the penalty-reduced focal loss (CenterNet: 2, 4).
        size_weight: weight of the L1 size loss (CenterNet: 0.1).
        epochs, steps_per_epoch: training length (``--max-minutes`` may stop it earlier).
        val_patches: fixed validation patches drawn once from the validation folds.
        buffer_size: patches held in the shuffle buffer (bounds training memory).
        prefetch_batches: batches cut ahead in a background thread (0 = in the loop; a 3-D
            network's step competes with the cutting thread for a CPU's cores).
        seed: random seed of sampling, augmentation and initialisation.
        threshold: heatmap peaks above this become candidates.
        peak_kernel: a peak is a voxel equal to the maximum of the ``peak_kernel``^3 block
            around it (3-D max pooling, stride 1).
        lung_dilation_mm: the heatmap is kept inside the lung mask dilated this much.
        nms_radius_mm: peaks closer than this (world mm) merge into the highest one.
        max_candidates: most candidates kept per scan (highest first; 0 = no cap).
        test_time_flips: in-plane flips averaged with the plain prediction (0 = none, 1 = x,
            2 = x and y, 3 = x, y and both); each costs one more pass.
    """

    name: str = "centernet"
    detector: str = DETECTOR
    # Model grid and input.
    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    hu_window: tuple[float, float] = WINDOWS["mgicnn"]
    # Network.
    backbone_filters: tuple[int, ...] = (8, 16, 32, 64)
    blocks_per_level: int = 1
    neck_filters: int = 16
    head_filters: int = 16
    batch_norm: bool = True
    heatmap_prior: float = 0.01
    size_prior_mm: float = 8.0
    # Patches and windows.
    patch_size: tuple[int, int, int] = (32, 32, 32)
    window_size: tuple[int, int, int] = (64, 64, 64)
    window_overlap: float = 0.25
    window_batch: int = 2
    # Targets.
    sigma_fraction: float = 0.25
    min_sigma_mm: float = 2.0
    max_sigma_mm: float = 6.0
    size_region: float = 0.5
    ignore_margin_mm: float = 1.0
    min_ignore_radius_mm: float = 3.0
    reader_weights: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    # Sampling and augmentation.
    batch_size: int = 4
    nodule_fraction: float = 0.6
    vessel_fraction: float = 0.2
    max_offset_fraction: float = 0.6
    small_nodule_weight: float = 0.0
    faint_nodule_weight: float = 0.0
    flip: bool = True
    rot90: bool = True
    intensity_jitter: float = 0.05
    noise_std: float = 0.01
    # Optimisation.
    optimizer: str = "adam"
    learning_rate: float = 2e-3
    focal_alpha: float = 2.0
    focal_beta: float = 4.0
    size_weight: float = 0.1
    epochs: int = 100
    steps_per_epoch: int = 50
    val_patches: int = 32
    buffer_size: int = 128
    prefetch_batches: int = 0
    seed: int = 0
    # Candidates.
    threshold: float = 0.05
    peak_kernel: int = 3
    lung_dilation_mm: float = 4.0
    nms_radius_mm: float = 8.0
    max_candidates: int = 50
    test_time_flips: int = 0

    def __post_init__(self) -> None:
        for key, cast in (
            ("spacing", float),
            ("hu_window", float),
            ("backbone_filters", int),
            ("patch_size", int),
            ("window_size", int),
            ("reader_weights", float),
        ):
            value = getattr(self, key)
            if not isinstance(value, list | tuple):
                raise LungCTError(None, f"plan {self.name!r}: {key} must be a list")
            object.__setattr__(self, key, tuple(cast(v) for v in value))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`LungCTError` naming the first inconsistent field."""

        def bad(problem: str) -> LungCTError:
            return LungCTError(None, f"plan {self.name!r}: {problem}")

        if self.detector != DETECTOR:
            raise bad(f"detector must be {DETECTOR!r}, got {self.detector!r}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise bad("spacing must be 3 positive numbers (x, y, z mm)")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise bad(f"hu_window must be [low, high], got {list(self.hu_window)}")
        if not self.backbone_filters or min(self.backbone_filters) < 1:
            raise bad("backbone_filters must be positive")
        if min(self.neck_filters, self.head_filters) < 1 or self.blocks_per_level < 0:
            raise bad("neck_filters and head_filters must be >= 1, blocks_per_level >= 0")
        multiple = self.size_multiple
        for key in ("patch_size", "window_size"):
            size = getattr(self, key)
            if len(size) != 3 or min(size) < 1:
                raise bad(f"{key} must be 3 positive sizes (z, y, x)")
            if any(s % multiple for s in size):
                raise bad(
                    f"{key} {list(size)}: the {len(self.backbone_filters)}-level backbone "
                    f"needs sizes divisible by {multiple}"
                )
        if not 0.0 <= self.window_overlap < 1.0:
            raise bad("window_overlap must be in [0, 1)")
        if not 0.0 < self.heatmap_prior < 1.0:
            raise bad("heatmap_prior must be in (0, 1)")
        if not 0.0 < self.min_sigma_mm <= self.max_sigma_mm or self.sigma_fraction <= 0:
            raise bad("need sigma_fraction > 0 and 0 < min_sigma_mm <= max_sigma_mm")
        if not 0.0 < self.size_region <= 1.0:
            raise bad("size_region must be in (0, 1]")
        if self.ignore_margin_mm < 0 or self.min_ignore_radius_mm <= 0:
            raise bad("ignore_margin_mm must be >= 0 and min_ignore_radius_mm > 0")
        if any(w < 0 for w in self.reader_weights):
            raise bad("reader_weights must be >= 0")
        if not 0.0 <= self.nodule_fraction <= 1.0 or not 0.0 <= self.vessel_fraction <= 1.0:
            raise bad("nodule_fraction and vessel_fraction must be in [0, 1]")
        if self.nodule_fraction + self.vessel_fraction > 1.0:
            raise bad("nodule_fraction + vessel_fraction must not exceed 1")
        if not 0.0 <= self.max_offset_fraction <= 1.0:
            raise bad("max_offset_fraction must be in [0, 1]")
        if not 0.0 <= self.small_nodule_weight <= 4.0:
            raise bad("small_nodule_weight must be in [0, 4]")
        if not 0.0 <= self.faint_nodule_weight <= 20.0:
            raise bad("faint_nodule_weight must be in [0, 20]")
        if self.optimizer not in ("adam", "sgd_nesterov"):
            raise bad(f"optimizer must be 'adam' or 'sgd_nesterov', got {self.optimizer!r}")
        if self.learning_rate <= 0 or self.focal_alpha < 0 or self.focal_beta < 0:
            raise bad("learning_rate must be > 0; focal_alpha and focal_beta >= 0")
        if self.size_weight < 0:
            raise bad("size_weight must be >= 0")
        for key in ("batch_size", "epochs", "steps_per_epoch", "window_batch", "buffer_size"):
            if getattr(self, key) < 1:
                raise bad(f"{key} must be >= 1")
        if self.val_patches < 0 or self.prefetch_batches < 0 or self.max_candidates < 0:
            raise bad("val_patches, prefetch_batches and max_candidates must be >= 0")
        if not 0.0 < self.threshold < 1.0:
            raise bad("threshold must be in (0, 1)")
        if self.peak_kernel < 1 or self.peak_kernel % 2 == 0:
            raise bad("peak_kernel must be odd and >= 1")
        if self.nms_radius_mm < 0 or self.lung_dilation_mm < 0:
            raise bad("nms_radius_mm and lung_dilation_mm must be >= 0")
        if not 0 <= self.test_time_flips <= 3:
            raise bad("test_time_flips must be 0, 1, 2 or 3")

    # ------------------------------------------------------------------------------------------
    @property
    def dims(self) -> str:
        """Always ``"3d"``: the network sees cubic blocks (what the shared sampler and sliding
        windows of the U-Net stage ask)."""
        return "3d"

    @property
    def input_channels(self) -> int:
        """Channels of the model input (one CT volume)."""
        return 1

    @property
    def size_multiple(self) -> int:
        """Patch and window sizes must be multiples of this (the backbone's largest stride)."""
        return 2 ** (len(self.backbone_filters) - 1)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """The model grid spacing in numpy order."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    def reader_weight(self, readers: int) -> float | None:
        """The loss weight of a finding ``readers`` readers marked; ``None`` when the count is
        unknown (0) or consensus weighting is off (no ``reader_weights``)."""
        if not self.reader_weights or readers <= 0:
            return None
        return self.reader_weights[min(int(readers), len(self.reader_weights)) - 1]

    def build_model(self) -> Any:
        """A freshly initialised Keras model of this plan (not compiled)."""
        from unet_candidates.centernet.model import CenterNet3D

        return CenterNet3D(**self.architecture(), name="centernet3d")

    def architecture(self) -> dict[str, Any]:
        """The constructor settings of :class:`CenterNet3D`, as its config spells them."""
        return {
            "backbone_filters": list(self.backbone_filters),
            "blocks_per_level": self.blocks_per_level,
            "neck_filters": self.neck_filters,
            "head_filters": self.head_filters,
            "input_channels": self.input_channels,
            "batch_norm": self.batch_norm,
            "heatmap_prior": self.heatmap_prior,
            "size_prior_mm": self.size_prior_mm,
        }

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, source: str | Path | None = None) -> CenterNetPlan:
        """Build from JSON: start from the defaults of ``d['preset']`` (else the
        ``centernet`` preset), then apply every other key; an unknown key or a value of the
        wrong JSON type is an error naming it."""
        if not isinstance(d, dict):
            raise LungCTError(source, "a plan must be a JSON object")
        d = dict(pop_plan_format(d, source))
        preset = d.pop("preset", "centernet")
        if not isinstance(preset, str):
            raise LungCTError(source, f"plan field 'preset' must be a string, not {preset!r}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise LungCTError(source, f"unknown plan keys {unknown}")
        check_field_types(cls, d, source)
        try:
            return replace(centernet_preset_plan(preset), **d)
        except LungCTError as exc:
            raise LungCTError(source, exc.problem) from None
        except (TypeError, ValueError) as exc:
            raise LungCTError(source, f"bad plan value ({exc})") from None


CENTERNET_PRESETS: dict[str, dict[str, Any]] = {
    # Light enough for a CPU: 1.5 mm voxels, 32^3 training blocks (48 mm), 64^3 windows,
    # a 4-level backbone 8/16/32/64 with one residual block per level, a 16-wide pyramid
    # neck back to full resolution; consensus weighting on (readers / 4).
    "centernet": {},
    # The same without consensus weighting: every nodule weighs 1, excluded findings are
    # left out of the loss (as for the U-Net), whatever reader counts the tables hold.
    "centernet-no-consensus": {"name": "centernet_no_consensus", "reader_weights": ()},
}
"""Named CenterNet plans (``--preset NAME``; ``candidates`` of the stage settings)."""


def centernet_preset_plan(preset: str = "centernet", **overrides: Any) -> CenterNetPlan:
    """The plan of a named preset, with optional field overrides.

    Raises:
        LungCTError: an unknown preset, field or value.
    """
    if preset not in CENTERNET_PRESETS:
        raise LungCTError(
            None, f"unknown CenterNet preset {preset!r} (choose from {sorted(CENTERNET_PRESETS)})"
        )
    unknown = sorted(set(overrides) - {f.name for f in fields(CenterNetPlan)})
    if unknown:
        raise LungCTError(None, f"unknown CenterNet plan keys {unknown}")
    check_field_types(CenterNetPlan, overrides)
    return CenterNetPlan(**{**CENTERNET_PRESETS[preset], **overrides})


def is_centernet_plan(plan_or_path: Any) -> bool:
    """Whether a plan, a plan's JSON dict or a ``plan.json`` (or a model folder holding one)
    is a CenterNet's. An unreadable file is not (the U-Net's loader then names the problem)."""
    if isinstance(plan_or_path, CenterNetPlan):
        return True
    data = plan_or_path
    if isinstance(plan_or_path, str | os.PathLike):
        path = Path(plan_or_path)
        if path.is_dir():
            path = path / "plan.json"
        try:
            data = read_json(path)
        except LungCTError:
            return False
    if not isinstance(data, dict):
        return False
    return data.get("detector") == DETECTOR or data.get("preset") in CENTERNET_PRESETS
