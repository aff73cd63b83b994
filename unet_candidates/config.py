"""The candidate stage's plan: every choice that shapes the data, the model and the candidates.

A :class:`UNetPlan` is a frozen dataclass that round-trips through a plain JSON file the user
can open in an editor (nnU-Net's "plans"). Presets are named entries of :data:`PRESETS`; a
plan file may start from a preset and override any field::

    {"preset": "3d", "spacing": [1.5, 1.5, 1.5], "epochs": 40}

Axis orders: ``spacing`` is world ``(x, y, z)`` mm like every :class:`lungct.Geometry`;
``patch_size`` and ``window_size`` are numpy ``(z, y, x)`` voxels of the model grid.
For a 2-D network the first entry is the number of neighbouring slices fed as channels
(the output is the centre slice); for a 3-D network it is the block depth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic
from lungct.plans import check_field_types, pop_plan_format, with_plan_format
from lungct.preprocess import WINDOWS, PreprocessPlan

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class UNetPlan:
    """Everything a candidate run depends on, except paths.

    Args:
        name: label of the plan (shows up in model folders and logs).
        dims: ``"2d"`` (axial slices, neighbouring slices as channels) or ``"3d"`` (blocks).
        spacing: model grid ``(x, y, z)`` mm; scans and the 1 mm cache are resampled to it on a
            world-aligned grid.
        hu_window: HU range mapped to [0, 1] (clipped outside).
        filters: encoder widths, one per level (depth = number of entries).
        bottleneck_filters: width of the lowest level.
        convs_per_block: convolutions per level.
        batch_norm: batch normalisation after each convolution.
        dropout: dropout at the bottleneck.
        output_prior: initial output probability (the last layer's bias), see the models.
        patch_size: training patch ``(z, y, x)`` voxels (2-D: ``(slices, h, w)``).
        window_size: extraction window ``(z, y, x)`` voxels (2-D: ``(slices, h, w)``).
        window_overlap: fraction of a window shared with its neighbour along each axis.
        window_batch: windows predicted per batch at extraction.
        target_margin_mm: added to each nodule's radius to make its target sphere / disk.
        min_target_radius_mm: smallest target radius (3 mm nodules still get a visible blob).
        max_target_radius_mm: largest target radius. Dice over a batch weighs each nodule by
            its target volume; without a cap a 20 mm nodule counts 300 times a 3 mm one and
            the network learns to ignore small nodules. The candidate needs the centre, not
            the outline.
        batch_size: training patches per step.
        nodule_fraction: share of patches containing a nodule (random offset inside the patch).
        vessel_fraction: share of hard negatives centred on bright lung voxels (vessels, walls).
        max_offset_fraction: a nodule's centre lies within this fraction of the patch's half
            size from the patch centre.
        small_nodule_weight: nodule patches pick nodule *i* with probability proportional to
            ``diameter_i ** -small_nodule_weight`` (0 = every nodule equally often; 1 = a 4 mm
            nodule 2.5 times as often as a 10 mm one).
        faint_nodule_weight: nodule patches pick nodule *i* with probability proportional to
            ``1 + faint_nodule_weight * f_i``, ``f_i`` its faintness: 0 for a mean HU inside
            its sphere of -450 or more (solid), rising linearly to 1 at -650 or less (ground
            glass). 0 = every nodule equally often. Multiplies ``small_nodule_weight``'s factor.
        flip: random flips along every axis; rot90: random 90-degree rotations in the axial
            plane; intensity_jitter: +- scale and shift of the [0, 1] intensities;
            noise_std: Gaussian noise added to the [0, 1] intensities.
        optimizer: ``"adam"`` or ``"sgd_nesterov"`` (the original code: SGD Nesterov, lr 1e-3).
        learning_rate: initial learning rate (cosine decay to 5 % over the run's budget).
        dice_smooth: smoothing term of the Dice loss; fn_weight: Tversky weight of false
            negatives (0.5 = Dice, as the original code; more = recall first); bce_weight: weight of an
            added BCE term; hard_negative_fraction: when above 0 the BCE covers the nodule
            voxels and only this fraction of each patch's voxels among the background, the
            hardest ones (0 = every voxel).
        epochs, steps_per_epoch: training length (``--max-minutes`` may stop it earlier).
        val_patches: fixed validation patches drawn once from the validation folds.
        buffer_size: patches held in the shuffle buffer (bounds training memory).
        prefetch_batches: batches cut ahead in a background thread while the network trains
            (0 = cut in the training loop). Helps the 2-D net (94 epochs instead of 78 in 10
            minutes on 2 cores); the 3-D net's heavier step competes with the cutting thread
            for the cores (15 s per epoch with it, 11.5 s without), so its preset turns it off.
        seed: random seed of sampling, augmentation and initialisation.
        threshold: probability above which voxels form candidate components.
        lung_dilation_mm: the probability map is kept inside the lung mask dilated this much.
        min_component_voxels: smaller components are dropped.
        nms_radius_mm: marks closer than this are merged (the most probable is kept).
        max_candidates: most candidates kept per scan (most probable first; 0 = no cap).
        test_time_flips: in-plane flips averaged with the plain prediction at extraction
            (0 = none, 1 = x, 2 = x and y, 3 = x, y and both); each costs one more pass.
        flip_threshold: 2-D only: the flips are averaged in only around lung pixels whose
            plain prediction exceeds this (0 = everywhere). Where the plain pass is below it,
            a single flipped pass would need more than ``2 * threshold - flip_threshold`` to
            lift the mean over ``threshold``.
        score_sigma_voxels: a mark's probability is its component's peak of the map smoothed
            by a Gaussian of this sigma (voxels; 0 = the raw peak).
    """

    name: str = "unet2d"
    dims: str = "2d"
    # Model grid and input.
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.0)
    hu_window: tuple[float, float] = WINDOWS["mgicnn"]
    # Network.
    filters: tuple[int, ...] = (16, 32, 48, 64, 64)
    bottleneck_filters: int = 64
    convs_per_block: int = 2
    batch_norm: bool = True
    dropout: float = 0.0
    output_prior: float = 0.01
    # Patches and windows.
    patch_size: tuple[int, int, int] = (5, 64, 64)
    window_size: tuple[int, int, int] = (5, 128, 128)
    window_overlap: float = 0.25
    window_batch: int = 8
    # Targets.
    target_margin_mm: float = 1.0
    min_target_radius_mm: float = 3.0
    max_target_radius_mm: float = 5.0
    # Sampling and augmentation.
    batch_size: int = 16
    nodule_fraction: float = 0.7
    vessel_fraction: float = 0.1
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
    dice_smooth: float = 1.0
    fn_weight: float = 0.85
    bce_weight: float = 1.0
    hard_negative_fraction: float = 0.0
    epochs: int = 100
    steps_per_epoch: int = 50
    val_patches: int = 64
    buffer_size: int = 256
    prefetch_batches: int = 4
    seed: int = 0
    # Candidates.
    threshold: float = 0.5
    lung_dilation_mm: float = 4.0
    test_time_flips: int = 0
    flip_threshold: float = 0.05
    min_component_voxels: int = 1
    nms_radius_mm: float = 8.0
    max_candidates: int = 50
    score_sigma_voxels: float = 1.0
    version: int = field(default=1)

    def __post_init__(self) -> None:
        for key, cast in (
            ("spacing", float),
            ("hu_window", float),
            ("filters", int),
            ("patch_size", int),
            ("window_size", int),
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

        if self.dims not in ("2d", "3d"):
            raise bad(f"dims must be '2d' or '3d', got {self.dims!r}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise bad("spacing must be 3 positive numbers (x, y, z mm)")
        if len(self.hu_window) != 2 or self.hu_window[0] >= self.hu_window[1]:
            raise bad(f"hu_window must be [low, high], got {list(self.hu_window)}")
        if not self.filters or min(self.filters) < 1 or self.bottleneck_filters < 1:
            raise bad("filters and bottleneck_filters must be positive")
        multiple = 2 ** len(self.filters)
        for key in ("patch_size", "window_size"):
            size = getattr(self, key)
            if len(size) != 3 or min(size) < 1:
                raise bad(f"{key} must be 3 positive sizes (z, y, x)")
            spatial = size[1:] if self.dims == "2d" else size
            if any(s % multiple for s in spatial):
                raise bad(
                    f"{key} {list(size)}: the {len(self.filters)}-level U-Net needs "
                    f"{'in-plane ' if self.dims == '2d' else ''}sizes divisible by {multiple}"
                )
        if self.dims == "2d":
            if self.patch_size[0] % 2 == 0:
                raise bad("2-D patch_size[0] (neighbouring slices) must be odd")
            if self.window_size[0] != self.patch_size[0]:
                raise bad("2-D window_size[0] must equal patch_size[0] (the input slices)")
        if not 0.0 <= self.window_overlap < 1.0:
            raise bad("window_overlap must be in [0, 1)")
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
        if not 0.0 < self.threshold < 1.0:
            raise bad("threshold must be in (0, 1)")
        if not 0.0 < self.min_target_radius_mm <= self.max_target_radius_mm:
            raise bad("need 0 < min_target_radius_mm <= max_target_radius_mm")
        if not 0.0 < self.output_prior < 1.0:
            raise bad("output_prior must be in (0, 1)")
        for key in ("batch_size", "epochs", "steps_per_epoch", "window_batch", "buffer_size"):
            if getattr(self, key) < 1:
                raise bad(f"{key} must be >= 1")
        if not 0 <= self.test_time_flips <= 3:
            raise bad("test_time_flips must be 0, 1, 2 or 3")
        if not 0.0 <= self.flip_threshold < 1.0:
            raise bad("flip_threshold must be in [0, 1)")
        if self.prefetch_batches < 0:
            raise bad("prefetch_batches must be >= 0")
        if self.val_patches < 0 or self.max_candidates < 0 or self.min_component_voxels < 1:
            raise bad("val_patches and max_candidates must be >= 0, min_component_voxels >= 1")
        if self.learning_rate <= 0 or self.dice_smooth < 0 or self.bce_weight < 0:
            raise bad("learning_rate must be > 0; dice_smooth and bce_weight >= 0")
        if not 0.0 <= self.hard_negative_fraction <= 1.0:
            raise bad("hard_negative_fraction must be in [0, 1]")
        if not 0.0 < self.fn_weight < 1.0:
            raise bad("fn_weight must be in (0, 1)")

    # ------------------------------------------------------------------------------------------
    @property
    def input_channels(self) -> int:
        """Channels of the model input (neighbouring slices for 2-D, 1 for 3-D)."""
        return self.patch_size[0] if self.dims == "2d" else 1

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """The model grid spacing in numpy order."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def preprocess(self) -> PreprocessPlan:
        """The resampling/windowing part as a :class:`lungct.preprocess.PreprocessPlan`."""
        return PreprocessPlan(
            name=f"{self.name}_input",
            spacing=self.spacing,
            hu_window=self.hu_window,
            output_range=(0.0, 1.0),
            image_interpolation="linear",
            align_to_world=True,
        )

    def build_model(self):
        """A freshly initialised Keras model of this plan (not compiled)."""
        from unet_candidates.model import UNet2D, UNet3D

        cls = UNet2D if self.dims == "2d" else UNet3D
        return cls(
            filters=self.filters,
            bottleneck_filters=self.bottleneck_filters,
            input_channels=self.input_channels,
            convs_per_block=self.convs_per_block,
            batch_norm=self.batch_norm,
            dropout=self.dropout,
            output_prior=self.output_prior,
            name=f"unet{self.dims}",
        )

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | Path | None = None) -> UNetPlan:
        """Build from JSON: start from the defaults of ``d['preset']`` (else of ``d['dims']``,
        else of ``2d``), then apply every other key.

        Unknown keys are an error (a typo must not pass silently), so is a value of the wrong
        JSON type (naming the field and the type). Plans written before the field was named
        ``dims`` say ``variant``; they read as before.
        """
        if not isinstance(d, dict):
            raise LungCTError(source, "a plan must be a JSON object")
        d = pop_plan_format(d, source)
        d = dict(d)
        preset = d.pop("preset", None)
        if "variant" in d:  # the name of ``preset`` / ``dims`` in plans of earlier versions
            legacy = d.pop("variant")
            if preset is not None and preset != legacy:
                raise LungCTError(source, f"plan names preset {preset!r} and variant {legacy!r}")
            preset = legacy
        if preset is not None and not isinstance(preset, str):
            raise LungCTError(source, f"plan field 'preset' must be a string, not {preset!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise LungCTError(source, f"unknown plan keys {unknown}")
        check_field_types(cls, d, source)
        if preset is None and d.get("dims", "2d") not in ("2d", "3d"):
            raise LungCTError(source, f"dims must be '2d' or '3d', got {d['dims']!r}")
        try:
            base = preset_plan(LEGACY_PRESETS.get(preset, preset) or d.get("dims", "2d"))
            if d.get("dims", base.dims) != base.dims:
                raise LungCTError(
                    source, f"plan says dims {d['dims']!r} but preset {preset!r} is {base.dims}"
                )
            return replace(base, **d)
        except LungCTError as exc:
            raise LungCTError(source, exc.problem) from None
        except (TypeError, ValueError) as exc:
            raise LungCTError(source, f"bad plan value ({exc})") from None

    def save(self, path: str | Path) -> None:
        """Write the plan as indented JSON (with its format version), atomically."""
        write_json_atomic(path, with_plan_format(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> UNetPlan:
        """Read a plan written by :meth:`save` (or a hand-written partial one)."""
        path = Path(path)
        return cls.from_dict(read_json(path, "plan file is missing"), source=path)


PRESETS: dict[str, dict[str, Any]] = {
    # The CPU default: the original 2-D U-Net code's design at half its widths, fed five neighbouring 2 mm
    # slices at 1 mm in-plane so a vessel crossing the slice looks different from a nodule and
    # 3-5 mm nodules keep their contrast (on a 2 mm in-plane grid they blur into the lung).
    # Trains to useful recall in 10 CPU minutes. The BCE covers the nodules and the hardest 2 %
    # of the background: on generator v4 it kept 86-87 of 92 held-out nodules in the top 50 per
    # scan against 83-84 with plain BCE (two seeds each), and ranked them far better.
    # Extraction averages the plain and the x-flipped prediction and keeps components above
    # 0.3 (averaging two passes lowers the peaks of the nodules one pass is unsure of): on a
    # fresh 178-nodule set this kept 170 and 171 in the top 50 per scan (seeds 0, 1) against
    # one pass's 167 and 169, at 1.8x the prediction time (README, stage one).
    "2d": {
        "name": "unet2d",
        "dims": "2d",
        "hard_negative_fraction": 0.02,
        "test_time_flips": 1,
        "threshold": 0.3,
    },
    # The original 2-D U-Net code's widths (encoder 32/64/96/128/128 + 128 bottleneck): ~4x
    # the compute per patch.
    "2d-original": {
        "name": "unet2d_original",
        "dims": "2d",
        "filters": (32, 64, 96, 128, 128),
        "bottleneck_filters": 128,
    },
    # The original 3-D U-Net code's design (sphere targets on cubic blocks), made light enough for a CPU:
    # 32^3 blocks of 1.5 mm voxels (48 mm) for training, 64^3 windows for extraction.
    "3d": {
        "name": "unet3d",
        "dims": "3d",
        "spacing": (1.5, 1.5, 1.5),
        "filters": (8, 16, 32),
        "bottleneck_filters": 64,
        "patch_size": (32, 32, 32),
        "window_size": (64, 64, 64),
        "batch_size": 8,
        "prefetch_batches": 0,
    },
}
"""Named plans; ``--preset NAME`` picks one, a ``--plan FILE`` may override any field."""

LEGACY_PRESETS = {"2d-seed": "2d-original"}
"""Preset names of earlier versions, as plan files written then may spell them."""


def preset_plan(preset: str, **overrides: Any) -> UNetPlan:
    """The default plan of a named preset, with optional field overrides."""
    if preset not in PRESETS:
        raise LungCTError(None, f"unknown preset {preset!r} (choose from {sorted(PRESETS)})")
    check_field_types(UNetPlan, overrides)
    values = {**PRESETS[preset], **overrides}
    return UNetPlan(**values)
