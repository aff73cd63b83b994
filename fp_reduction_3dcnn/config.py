"""The training plan: every choice that shapes the patches, the network and the optimiser.

A plan is a frozen dataclass that round-trips through a plain JSON file (``plan.json`` in every
model folder), so a user can open it in an editor and an ablation is a name in the output.
Its ``network`` says which classifier it trains (:data:`NETWORKS`): the MGI-CNN (the default,
and every plan written before the field existed), or one of two single-patch 3-D classifiers
that the ablations compare with it.

Named plans (:data:`PLANS`):

* ``default`` - narrow 2.5-D MGI-CNN that trains to a useful model in minutes on two CPU cores;
  the paper's optimiser (SGD, momentum 0.9, lr 0.003 decayed 2.5 % per epoch, batch 128),
  nearest-neighbour resizing and a 1:6 positive:negative ratio; besides the paper's rotations
  and shifts of positives it also flips, and rotates / flips negatives (few training nodules).
* ``default_adam`` - the ``default`` network with the authors' code optimiser (Adam, lr 0.003,
  beta1 0.5): converges faster in a short CPU budget (the acceptance runs use it).
* ``default_3d`` - the same network with true 3-D convolutions on ``(x, y, z, 1)`` patches.
* ``paper`` - the published filter widths (64/128/192 gradual extraction, 256 per stream,
  512 after the streams merge, two fully connected layers of 1024) with the paper's optimiser and
  augmentation (positives only: rotations and 1-voxel shifts).
* ``code`` - the authors' released code: the same widths, Adam (lr 0.003, beta1 0.5) and cubic
  spline resizing (``scipy`` order 3).
* ``resnet3d`` - the ``default`` plan with a 3-D ResNet (:class:`~fp_reduction_3dcnn.resnet3d.
  ResNet3D`) on one 48x48x48 mm patch instead of the MGI-CNN: every training choice is
  ``default``'s, so an ablation that swaps the plan swaps only the network and its input.
* ``cnn3d`` - likewise with the small 3-D CNN (:class:`~fp_reduction_3dcnn.cnn3d.CNN3D`) of
  "Deep Learning with PyTorch" on one 48x48x32 mm (x, y, z) patch.

Axis conventions: patch sizes, spacings and the network input size are written ``(x, y, z)``
as in the paper; arrays handed to the network are ``(batch, y, x, z)`` (an axial image with the
slices last), so an axial rotation acts on axes 1 and 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungct.errors import LungCTError
from lungct.plans import JSONPlan
from lungct.preprocess import WINDOWS

NETWORKS = ("mgicnn", "resnet3d", "cnn3d")
"""The classifiers a plan can train: the MGI-CNN (three co-centred scales), a 3-D ResNet and a
small 3-D CNN (one patch each)."""

NETWORK_LABELS = {"mgicnn": "MGI-CNN", "resnet3d": "ResNet-3D", "cnn3d": "CNN-3D"}
"""How logs and tables name each network."""

VARIANTS = ("mgi", "zoom_in", "zoom_out", "ri", "lr")
"""MGI-CNN variants: the full model and the paper's ablations (section 3 of docs/methods.md)."""

MGICNN_ONLY_FIELDS = (
    "variant",
    "merge",
    "stream_filters",
    "stream_top_filters",
    "head_filters",
    "dense_units",
    "dropout",
    "leaky_alpha",
)
"""Plan fields that only the MGI-CNN reads."""

SINGLE_PATCH_FIELDS = ("block_filters", "blocks_per_stage")
"""Plan fields that only the single-patch networks (``resnet3d``, ``cnn3d``) read."""

MERGES = ("sum", "concat", "conv1x1")
"""How the zoom-in and zoom-out streams (or the late-fusion branches) are merged (the paper's
"multi-stream feature integration")."""

RENAMED_FIELDS = {"integration": "merge"}
"""Plan keys of earlier versions and the fields they now load as (``plan.json`` files of
model folders trained before the rename keep loading unchanged)."""

CONV_MODES = ("2.5d", "3d")
"""``2.5d``: the 6 slices are channels of 2-D convolutions (authors' code); ``3d``: Conv3D."""

RESIZE_MODES = ("nearest", "cubic")
"""Interpolation that brings every scale to the input size: paper (nearest) or code (cubic)."""

OPTIMIZERS = ("sgd", "adam")


def _tuple(value: Any) -> tuple:
    return tuple(_tuple(v) if isinstance(v, list | tuple) else v for v in value)


def renamed_fields(values: Any, source: str | Path | None = None) -> Any:
    """``values`` with the keys of earlier versions (:data:`RENAMED_FIELDS`) under their new
    names; anything but a dict is returned as it is (the caller refuses it).

    Raises:
        LungCTError: an old key and its new name both given, with different values.
    """
    if not isinstance(values, dict) or not RENAMED_FIELDS.keys() & values.keys():
        return values
    values = dict(values)
    for old, new in RENAMED_FIELDS.items():
        if old in values:
            value = values.pop(old)
            if values.setdefault(new, value) != value:
                raise LungCTError(
                    source,
                    f"both {new} {values[new]!r} and {old} {value!r} given ({old} is the name "
                    f"of {new} in earlier versions): keep {new} only",
                )
    return values


@dataclass(frozen=True)
class FPRPlan(JSONPlan):
    """Everything that shapes a false-positive reducer: the MGI-CNN or another classifier.

    Args:
        name: label written into the model folder.
        network: one of :data:`NETWORKS`: ``mgicnn`` (three scales), ``resnet3d`` or ``cnn3d``
            (one patch each; their plans are ``resnet3d`` and ``cnn3d``).
        variant: one of :data:`VARIANTS` (MGI-CNN only: the other networks take ``mgi``).
        merge: one of :data:`MERGES`, how the streams are merged (used by ``mgi`` and ``lr``;
            ``integration`` in plans of earlier versions).
        conv: one of :data:`CONV_MODES` (the single-patch networks are ``3d``).
        stream_filters: filters of the three gradual-extraction stages (two convs each).
        stream_top_filters: filters of the two convs after the stream's pooling.
        head_filters: filters of the two convs after the merge.
        dense_units: widths of the fully connected layers.
        dropout: dropout rate before each fully connected layer.
        leaky_alpha: LeakyReLU slope (the code's 0.2).
        block_filters: ``resnet3d``: widths of the residual stages (each after the first halves
            the grid); ``cnn3d``: widths of the conv-conv-maxpool blocks. Not read by the
            MGI-CNN.
        blocks_per_stage: ``resnet3d``: residual blocks per stage (ResNet-18: 2).
        patch_sizes: voxels ``(x, y, z)`` of the co-centred scales, wide to narrow: three for
            the MGI-CNN, one for the other networks.
        cut_spacing: mm ``(x, y, z)`` the patches are cut at (1 mm = the cache grid).
        input_size: ``(x, y, z)`` every scale is resized to.
        resize: one of :data:`RESIZE_MODES`.
        hu_window: HU mapped to [0, 1] (clipped outside).
        negatives_per_positive: sampling ratio of a training batch (paper ~6).
        batch_size: samples per training step.
        steps_per_epoch: training steps per epoch; 0 = one pass over the training negatives.
        epochs: training epochs.
        augment_negatives: also rotate (and flip) negatives; positives are always augmented.
        augment_flips: random left-right and z flips on top of the rotations (not in the paper).
        shift_voxels: largest shift (in cut voxels, per axis) of an augmented positive.
        val_max_negatives: negatives kept for validation (all positives are kept); 0 = all.
        optimizer: ``sgd`` (paper) or ``adam`` (code).
        learning_rate: initial learning rate.
        momentum: SGD momentum.
        beta_1: Adam beta1.
        lr_decay_per_epoch: the learning rate is multiplied by ``1 - lr_decay_per_epoch``
            after every epoch.
        seed: seeds weights and sampling.

    Example:
        >>> plan = get_plan("default", variant="zoom_in")
        >>> plan.variant, plan.input_size
        ('zoom_in', (20, 20, 6))
    """

    name: str = "default"
    network: str = "mgicnn"
    variant: str = "mgi"
    merge: str = "sum"
    conv: str = "2.5d"
    stream_filters: tuple[int, int, int] = (24, 32, 48)
    stream_top_filters: int = 64
    head_filters: int = 64
    dense_units: tuple[int, ...] = (128, 128)
    dropout: float = 0.5
    leaky_alpha: float = 0.2
    block_filters: tuple[int, ...] = (16, 32, 64, 128)
    blocks_per_stage: int = 2
    patch_sizes: tuple[tuple[int, int, int], ...] = ((40, 40, 26), (30, 30, 10), (20, 20, 6))
    cut_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    input_size: tuple[int, int, int] = (20, 20, 6)
    resize: str = "nearest"
    hu_window: tuple[float, float] = WINDOWS["mgicnn"]
    negatives_per_positive: float = 6.0
    batch_size: int = 128
    steps_per_epoch: int = 0
    epochs: int = 40
    augment_negatives: bool = True
    augment_flips: bool = True
    shift_voxels: int = 1
    val_max_negatives: int = 4000
    optimizer: str = "sgd"
    learning_rate: float = 0.003
    momentum: float = 0.9
    beta_1: float = 0.5
    lr_decay_per_epoch: float = 0.025
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("stream_filters", "dense_units", "block_filters", "patch_sizes"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        object.__setattr__(self, "input_size", _tuple(self.input_size))
        object.__setattr__(self, "hu_window", tuple(float(v) for v in self.hu_window))
        object.__setattr__(self, "cut_spacing", tuple(float(v) for v in self.cut_spacing))
        self._check()

    @classmethod
    def from_dict(cls, d: dict, source: str | Path | None = None) -> FPRPlan:
        """As :meth:`JSONPlan.from_dict`; a key of earlier versions (:data:`RENAMED_FIELDS`)
        loads as its field."""
        return super().from_dict(renamed_fields(d, source), source)

    def replace(self, **changes: Any) -> FPRPlan:
        """As :meth:`JSONPlan.replace`; a key of earlier versions names its field."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return super().replace(**renamed_fields(changes))

    def _check(self) -> None:
        def bad(problem: str) -> LungCTError:
            return LungCTError(None, f"plan {self.name!r}: {problem}")

        for field, allowed in (
            ("network", NETWORKS),
            ("variant", VARIANTS),
            ("merge", MERGES),
            ("conv", CONV_MODES),
            ("resize", RESIZE_MODES),
            ("optimizer", OPTIMIZERS),
        ):
            if getattr(self, field) not in allowed:
                raise bad(
                    f"{field} must be one of {', '.join(allowed)}, not {getattr(self, field)!r}"
                )
        if len(self.stream_filters) != 3 or min(self.stream_filters) < 1:
            raise bad("stream_filters needs 3 positive numbers")
        if min(self.stream_top_filters, self.head_filters) < 1:
            raise bad("filter counts must be positive")
        if any(u < 1 for u in self.dense_units):
            raise bad("dense_units must be positive")
        if not self.block_filters or min(self.block_filters) < 1 or self.blocks_per_stage < 1:
            raise bad("block_filters needs positive numbers and blocks_per_stage must be >= 1")
        if any(len(s) != 3 or min(s) < 1 for s in self.patch_sizes):
            raise bad("patch_sizes needs (x, y, z) sizes")
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise bad("input_size needs (x, y, z)")
        if self.network == "mgicnn":
            if len(self.patch_sizes) != 3:
                raise bad("patch_sizes needs three (x, y, z) sizes (the MGI-CNN's scales)")
        else:
            self._check_single_patch(bad)
        if self.input_size[0] != self.input_size[1]:
            raise bad("input_size must be square in x and y (axial rotations)")
        if any(s[0] != s[1] for s in self.patch_sizes):
            raise bad("patch sizes must be square in x and y (axial rotations)")
        if len(self.cut_spacing) != 3 or min(self.cut_spacing) <= 0:
            raise bad("cut_spacing needs 3 positive numbers")
        if self.hu_window[0] >= self.hu_window[1]:
            raise bad(f"empty HU window {self.hu_window}")
        if not 0 <= self.dropout < 1:
            raise bad("dropout must be in [0, 1)")
        if self.negatives_per_positive < 0:
            raise bad("negatives_per_positive must be >= 0")
        if self.batch_size < 2:
            raise bad("batch_size must be >= 2")
        if self.steps_per_epoch < 0 or self.epochs < 1:
            raise bad("epochs must be >= 1 and steps_per_epoch >= 0")
        if self.shift_voxels < 0 or self.val_max_negatives < 0:
            raise bad("shift_voxels and val_max_negatives must be >= 0")
        if self.learning_rate <= 0 or not 0 <= self.lr_decay_per_epoch < 1:
            raise bad("learning_rate must be > 0 and lr_decay_per_epoch in [0, 1)")

    def _check_single_patch(self, bad: Callable[[str], LungCTError]) -> None:
        """The rules of the single-patch networks (``resnet3d``, ``cnn3d``)."""
        if len(self.patch_sizes) != 1:
            raise bad(f"patch_sizes needs one (x, y, z) size (network {self.network})")
        if self.variant != "mgi":
            raise bad(
                f"variant {self.variant!r} is an MGI-CNN ablation; network {self.network} has "
                "none (leave variant 'mgi')"
            )
        if self.conv != "3d":
            raise bad(f"network {self.network} convolves in 3-D: conv must be '3d'")
        if self.network == "cnn3d":
            smallest = 2 ** len(self.block_filters)
            if min(self.input_size) < smallest:
                raise bad(
                    f"input_size {list(self.input_size)} is too small for "
                    f"{len(self.block_filters)} blocks of 2x2x2 max pooling (>= {smallest} a side)"
                )

    def key_fields(self) -> dict:
        """The JSON fields that shape the trained network: :meth:`to_dict` less the fields
        its network does not read (two plans that differ only there train the same network).

        An MGI-CNN plan gives exactly the fields of the plans before ``network`` existed, so
        the stages of an ablation trained then keep their keys.
        """
        if self.network == "mgicnn":
            unused = (*SINGLE_PATCH_FIELDS, "network")
        else:
            unused = MGICNN_ONLY_FIELDS
        return {k: v for k, v in self.to_dict().items() if k not in unused}

    @property
    def network_label(self) -> str:
        """The network's name in logs and tables (``MGI-CNN``, ``ResNet-3D``, ``CNN-3D``)."""
        return NETWORK_LABELS[self.network]

    # --- sizes used by the data pipeline -----------------------------------------------------

    @property
    def positives_per_batch(self) -> int:
        """Positives in each training batch: ``batch / (1 + ratio)``, at least one."""
        return max(
            1,
            min(self.batch_size - 1, round(self.batch_size / (1.0 + self.negatives_per_positive))),
        )

    @property
    def scales(self) -> int:
        """Patches cut around each candidate (network inputs): 3 for the MGI-CNN, else 1."""
        return len(self.patch_sizes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one network input, ``(y, x, z)``."""
        x, y, z = self.input_size
        return (y, x, z)


_PAPER_WIDTHS = {
    "stream_filters": (64, 128, 192),
    "stream_top_filters": 256,
    "head_filters": 512,
    "dense_units": (1024, 1024),
}

PLANS: dict[str, FPRPlan] = {
    "default": FPRPlan(),
    "default_3d": FPRPlan(
        name="default_3d",
        conv="3d",
        stream_filters=(8, 16, 24),
        stream_top_filters=32,
        head_filters=32,
        dense_units=(128, 128),
    ),
    "default_adam": FPRPlan(name="default_adam", optimizer="adam", beta_1=0.5),
    "paper": FPRPlan(name="paper", augment_negatives=False, augment_flips=False, **_PAPER_WIDTHS),
    "code": FPRPlan(
        name="code",
        optimizer="adam",
        learning_rate=0.003,
        beta_1=0.5,
        resize="cubic",
        lr_decay_per_epoch=0.0,
        **_PAPER_WIDTHS,
    ),
    # The other networks: ``default``'s training, only the network and its input changed.
    "resnet3d": FPRPlan(
        name="resnet3d",
        network="resnet3d",
        conv="3d",
        block_filters=(16, 32, 64, 128),
        blocks_per_stage=2,
        patch_sizes=((48, 48, 48),),
        input_size=(48, 48, 48),
    ),
    "cnn3d": FPRPlan(
        name="cnn3d",
        network="cnn3d",
        conv="3d",
        block_filters=(8, 16, 32, 64),
        patch_sizes=((48, 48, 32),),
        input_size=(48, 48, 32),
    ),
}
"""The named plans; see the module docstring."""


def get_plan(name_or_path: str | Path = "default", **overrides: Any) -> FPRPlan:
    """A named plan (see :data:`PLANS`) or a plan JSON file, with optional field overrides."""
    text = str(name_or_path)
    if text in PLANS:
        plan = PLANS[text]
    elif text.endswith(".json") or Path(text).is_file():
        plan = FPRPlan.load(text)
    else:
        raise LungCTError(None, f"unknown plan {text!r} (named plans: {', '.join(PLANS)})")
    return plan.replace(**overrides)
