"""The fold guard: a model folder records what it was trained on, and refuses the rest.

The original MGI-CNN code restored ONE checkpoint to predict all five of its test folds, so four
of them were scored by a model that had trained on them. Here every model folder holds a
``manifest.json`` with its training folds and series; training refuses overlapping
train/validation/test folds, and prediction refuses any series from a training fold (or any
series the model trained on) unless the user says ``--allow-train-folds`` (e.g. to look at
training-set scores on purpose).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic
from lungct.modeldir import MANIFEST_NAME, check_manifest_shape, strip_seal
from lungct.plans import check_field_types, key_list
from lungct.tables import FOLD_COUNT


def check_split(
    train_folds: Sequence[int], val_folds: Sequence[int], test_folds: Sequence[int] = ()
) -> None:
    """Refuse an empty training set and any fold named in two roles.

    Raises:
        LungCTError: overlapping train / validation / test folds, or no training fold.
    """
    if not train_folds:
        raise LungCTError(None, "no training folds given")
    roles = {"training": set(train_folds), "validation": set(val_folds), "test": set(test_folds)}
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = sorted(roles[a] & roles[b])
            if both:
                raise LungCTError(
                    None,
                    f"fold{'s' if len(both) > 1 else ''} {both} named as both {a} and {b} "
                    "folds; a model must never see its test fold",
                )


@dataclass
class FoldManifest:
    """What a model folder was trained on.

    Args:
        train_folds: LUNA16 subsets the weights were fitted on.
        val_folds: subsets used to monitor training (never fitted on).
        test_folds: subsets declared held out (never fitted on, never monitored).
        train_series: every series UID that contributed training patches.
        val_series: every series UID used for validation.
        candidates: the candidates file and its SHA-256.
        plan: name of the training plan.
        positives / negatives: training rows of each class.
        excluded / ignored_negatives: the irrelevant-findings table and how many training
            negatives on it were left out.
        epochs_done: completed (or time-limited) epochs.
    """

    train_folds: list[int]
    val_folds: list[int]
    test_folds: list[int]
    train_series: list[str]
    val_series: list[str]
    candidates: str = ""
    candidates_sha256: str = ""
    annotations: str | None = None
    excluded: str | None = None
    ignored_negatives: int = 0
    data: str | None = None
    cache: str = ""
    plan: str = ""
    positives: int = 0
    negatives: int = 0
    epochs_done: int = 0
    created: str = field(default_factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))
    updated: str = ""

    @property
    def held_out_folds(self) -> list[int]:
        """Folds whose scans the weights never trained on."""
        return [f for f in range(FOLD_COUNT) if f not in set(self.train_folds)]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["held_out_folds"] = self.held_out_folds
        return d

    def save(self, model_dir: str | os.PathLike) -> None:
        """Write ``manifest.json`` atomically."""
        self.updated = _dt.datetime.now().isoformat(timespec="seconds")
        write_json_atomic(Path(model_dir) / MANIFEST_NAME, self.to_dict())

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> FoldManifest:
        """Read a model folder's manifest.

        Raises:
            LungCTError: the folder has no readable manifest (then its folds are unknown and
                nothing may be predicted with it), or one of the wrong shape: not an object,
                unknown or missing keys, a value of the wrong type (a fold list that is a
                string would let every fold through the guard).
        """
        path = Path(model_dir) / MANIFEST_NAME
        data = read_json(
            path,
            "no manifest.json: the model's training folds are unknown, so it cannot be "
            "used to predict (train it with `python -m fp_reduction_3dcnn train`)",
            missing_where=model_dir,
        )
        check_manifest_shape(path, data)
        data = strip_seal(data)
        data.pop("held_out_folds", None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise LungCTError(
                path,
                f"unknown manifest keys {key_list(unknown)}: not an MGI-CNN model folder's manifest",
            )
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in data
        )
        if missing:
            raise LungCTError(path, f"manifest keys {missing} are missing")
        check_field_types(cls, data, path)
        return cls(**data)

    def check_prediction(
        self, folds_of_series: dict[str, int | None], allow_train_folds: bool = False
    ) -> None:
        """Refuse to score series from the training folds (or that the model trained on).

        Raises:
            LungCTError: naming the first offending series and its fold.
        """
        if allow_train_folds:
            return
        trained = set(self.train_series)
        train_folds = set(self.train_folds)
        bad = [
            (uid, fold)
            for uid, fold in folds_of_series.items()
            if uid in trained or (fold is not None and fold in train_folds)
        ]
        if bad:
            uid, fold = bad[0]
            where = f"fold {fold}" if fold is not None else "the training set"
            raise LungCTError(
                None,
                f"{len(bad)} series to predict are in the model's training data (e.g. {uid} in "
                f"{where}; trained on folds {sorted(train_folds)}, held out "
                f"{self.held_out_folds}); predict a held-out fold, train a model per test fold, "
                "or pass --allow-train-folds to score training data on purpose",
            )

    def check_same_training(self, other: FoldManifest) -> None:
        """On ``--resume``: the folds and the candidates must be those of the first run."""
        for name in ("train_folds", "val_folds", "test_folds", "candidates_sha256"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                raise LungCTError(
                    None,
                    f"cannot resume: {name} was {a} in the first run and is {b} now; "
                    "use a new --out folder",
                )


def folds_text(folds: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    folds = sorted(set(folds))
    parts: list[str] = []
    i = 0
    while i < len(folds):
        j = i
        while j + 1 < len(folds) and folds[j + 1] == folds[j] + 1:
            j += 1
        parts.append(str(folds[i]) if i == j else f"{folds[i]}-{folds[j]}")
        i = j + 1
    return ",".join(parts)
