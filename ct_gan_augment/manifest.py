"""What a model folder was trained on, and the fold guard that keeps augmentation honest.

``manifest.json`` records the kind of model, the LUNA16 folds and series it was trained on and
how far training got. :meth:`ModelManifest.check_folds` and :meth:`ModelManifest.check_scan`
refuse to augment a held-out fold: injected nodules made by a model that saw a scan must never
reach the test fold of a cross-validation (section 4 of ``docs/methods.md``).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ct_gan_augment.config import KINDS
from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic
from lungct.modeldir import MANIFEST_NAME, check_manifest_shape, strip_seal
from lungct.plans import check_field_types, key_list


def format_folds(folds: Iterable[int]) -> str:
    """``[0, 1, 2, 3, 5]`` -> ``"0-3,5"`` (the syntax ``--folds`` accepts)."""
    folds = sorted(set(int(f) for f in folds))
    parts: list[str] = []
    start = prev = None
    for f in folds:
        if start is None:
            start = prev = f
        elif f == prev + 1:
            prev = f
        else:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = f
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


@dataclass
class ModelManifest:
    """Provenance of a CT-GAN model folder.

    Args:
        kind: ``injector`` or ``remover``.
        training_folds: the LUNA16 folds (subsets) whose scans made the training cubes.
        series: the series UIDs the cubes came from.
        plan: name of the plan (the full plan is ``plan.json``).
        data_dir: the dataset folder.
        cache_dir: the per-scan cache folder.
        annotations: the annotation table of the nodule cubes (injector).
        n_cubes: training cubes (before augmentation).
        nodule_diameters_mm: diameters of the injector's training nodules; an injection
            without a given size draws one of them (size channel, see ``GANPlan``).
        steps_done: training steps completed.
        train_seconds: wall time of the training epochs, all resumed runs together.
        final: the last epoch's mean losses and discriminator accuracy.
        versions: library versions and platform.

    Example:
        >>> m = ModelManifest("injector", [0, 1, 2], ["1.2.3"])
        >>> m.check_folds([0, 2])
        >>> m.check_folds([3])  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        LungCTError: ...
    """

    kind: str
    training_folds: list[int]
    series: list[str]
    plan: str = "default"
    data_dir: str | None = None
    cache_dir: str | None = None
    annotations: str | None = None
    n_cubes: int = 0
    nodule_diameters_mm: list[float] = field(default_factory=list)
    steps_done: int = 0
    train_seconds: float = 0.0
    final: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    path: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LungCTError(
                self.path, f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}"
            )
        self.training_folds = sorted(int(f) for f in self.training_folds)
        self.series = list(self.series)

    def check_folds(self, folds: Iterable[int]) -> None:
        """Refuse any fold outside the model's training folds."""
        outside = sorted(set(int(f) for f in folds) - set(self.training_folds))
        if outside:
            raise LungCTError(
                self.path,
                f"fold(s) {format_folds(outside)} are held out for this {self.kind} (trained on "
                f"folds {format_folds(self.training_folds)}); augmenting them would leak the "
                "model into their evaluation",
            )

    def check_scan(self, seriesuid: str, fold: int | None) -> None:
        """Refuse a scan outside the LUNA16 layout or in a held-out fold."""
        if fold is None:
            raise LungCTError(
                self.path,
                f"series {seriesuid} is not in a subsetN folder, so its fold is unknown; "
                "augmentation needs the fold to keep held-out folds out",
            )
        if int(fold) not in self.training_folds:
            raise LungCTError(
                self.path,
                f"series {seriesuid} is in held-out fold {fold} (model trained on folds "
                f"{format_folds(self.training_folds)})",
            )

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        d = asdict(self)
        d.pop("path")
        d["training_folds_text"] = format_folds(self.training_folds)
        return d

    def save(self, model_dir: str | os.PathLike) -> None:
        """Write ``manifest.json`` in ``model_dir``, atomically."""
        write_json_atomic(Path(model_dir) / MANIFEST_NAME, self.to_dict())

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> ModelManifest:
        """Read ``manifest.json`` from a model folder."""
        path = Path(model_dir) / MANIFEST_NAME
        data = read_json(path, "model manifest not found (is this a CT-GAN model folder?)")
        check_manifest_shape(path, data)
        data = strip_seal(data)
        data.pop("training_folds_text", None)
        known = set(cls.__dataclass_fields__) - {"path"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LungCTError(
                path,
                f"unknown manifest keys {key_list(unknown)}: not a CT-GAN model folder's manifest",
            )
        missing = sorted({"kind", "training_folds", "series"} - set(data))
        if missing:
            raise LungCTError(path, f"manifest keys {missing} are missing")
        check_field_types(cls, data, path)
        return cls(**data, path=str(path))


def library_versions() -> dict[str, str]:
    """Versions worth recording next to a trained model."""
    import keras
    import numpy as np

    versions = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
    }
    try:
        import tensorflow as tf

        versions["tensorflow"] = tf.__version__
    except ImportError:  # pragma: no cover - another backend only
        pass
    return versions
