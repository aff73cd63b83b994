"""Malignancy of a found nodule: a small 3-D CNN on a nodule-centred patch, and its baseline.

A module of the second stage because it is the same kind of model on the same input: a
classifier of a world point of a scan, fed a patch cut at 1 mm from the per-scan cache (or, in
``integration detect``, from the scan resampled to the cache grid), trained fold by fold and
saved as a sealed model folder (:mod:`lungct.modeldir`, stage ``malignancy``).

Labels follow the LIDC literature: a nodule whose median malignancy rating is 4 or 5 is
malignant, 1 or 2 benign, and 3 (indeterminate) is left out of the two-class loss; the rating
itself is also regressed (all rated nodules). They come from ``nodule_attributes.csv``
(:func:`lungct.tables.read_nodule_attributes`), written by the synthetic generator and by the
LIDC importer.

What it must beat: a logistic regression on size and the readers' sphericity and spiculation
ratings (:class:`ShapeBaseline`). On synthetic data its inputs are the ratings of the very
outline the nodule was drawn from, by the reader who rated its malignancy, so it is a strong
baseline, not a straw man.

Reference: the PyTorch-book LUNA project (Stevens, Antiga, Viehmann, "Deep Learning with
PyTorch", Manning 2020, chapter 14) classifies detected nodules as benign or malignant with
the same small 3-D CNN it uses for candidates and diagnoses the patient by the most malignant
one (:func:`patient_score`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungct.errors import LungCTError
from lungct.plans import JSONPlan

MALIGNANT_MIN = 4
"""Median malignancy rating from which a nodule counts as malignant."""
BENIGN_MAX = 2
"""Median malignancy rating up to which a nodule counts as benign (3 is left out)."""
MODEL_FILE = "model.keras"
PREDICTIONS_FILE = "predictions.csv"
PREDICTION_COLUMNS = (
    "seriesuid",
    "coordX",
    "coordY",
    "coordZ",
    "diameter_mm",
    "fold",
    "malignancy_rating",
    "label",
    "cnn_probability",
    "cnn_rating",
    "baseline_probability",
)


@dataclass(frozen=True)
class MalignancyPlan(JSONPlan):
    """How the malignancy CNN is built and trained (``plan.json`` of its model folder).

    Args:
        name: a label that shows up in the model folder and the model card.
        patch_mm: side of the cubic patch, in voxels at 1 mm (the cache grid).
        hu_window: HU mapped to [0, 1] (clipped outside).
        block_filters: widths of the conv-conv-maxpool blocks.
        dense_units: width of the hidden layer before the two heads.
        dropout: dropout rate before the hidden layer.
        batch_size: patches per step.
        epochs: passes over the training nodules.
        learning_rate: Adam's initial rate (cosine decay to 0 over the epochs).
        rating_weight: weight of the rating regression in the loss.
        shift_mm: training patches are cut up to this far (each axis) from the centre.
        train_folds, val_folds, test_folds: the LUNA16 subsets of each role.
        seed: random seed of initialisation, shuffling and augmentation.
    """

    name: str = "malignancy"
    patch_mm: int = 40
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    block_filters: tuple[int, ...] = (8, 16, 32, 64)
    dense_units: int = 32
    dropout: float = 0.3
    batch_size: int = 32
    epochs: int = 30
    learning_rate: float = 1e-3
    rating_weight: float = 0.5
    shift_mm: int = 2
    train_folds: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    val_folds: tuple[int, ...] = (6,)
    test_folds: tuple[int, ...] = (7, 8, 9)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hu_window", "block_filters", "train_folds", "val_folds", "test_folds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.patch_mm < 2 ** len(self.block_filters):
            raise LungCTError(
                None,
                f"patch_mm {self.patch_mm} is too small for {len(self.block_filters)} poolings",
            )
        roles = [set(self.train_folds), set(self.val_folds), set(self.test_folds)]
        if roles[0] & (roles[1] | roles[2]) or roles[1] & roles[2]:
            raise LungCTError(None, "train, validation and test folds must not overlap")
        if not self.train_folds:
            raise LungCTError(None, "the plan names no training fold")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The network input ``(y, x, z)``."""
        return (self.patch_mm,) * 3

    def architecture(self) -> dict[str, Any]:
        """The constructor settings of the network this plan builds (checked when loading)."""
        return {
            "block_filters": list(self.block_filters),
            "input_shape": list(self.input_shape),
            "dense_units": self.dense_units,
            "dropout": self.dropout,
        }


# ----------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------


@dataclass
class RatedNodules:
    """Rated nodules of a data folder: where they are, their size, ratings and fold.

    Attributes:
        uids: series UID of each nodule.
        coords: ``(N, 3)`` world ``(x, y, z)`` mm.
        diameter_mm: ``(N,)``.
        malignancy: ``(N,)`` median malignancy rating (1-5).
        sphericity, spiculation: ``(N,)`` median ratings (1-5).
        folds: ``(N,)`` LUNA16 subset of each nodule's scan.
    """

    uids: list[str]
    coords: np.ndarray
    diameter_mm: np.ndarray
    malignancy: np.ndarray
    sphericity: np.ndarray
    spiculation: np.ndarray
    folds: np.ndarray

    def __len__(self) -> int:
        return len(self.uids)

    @property
    def labels(self) -> np.ndarray:
        """1 malignant, 0 benign, -1 indeterminate (rating between the two)."""
        out = np.full(len(self), -1, dtype=np.int64)
        out[self.malignancy >= MALIGNANT_MIN] = 1
        out[self.malignancy <= BENIGN_MAX] = 0
        return out

    def subset(self, rows: np.ndarray) -> RatedNodules:
        rows = np.asarray(rows, dtype=np.int64)
        return RatedNodules(
            [self.uids[i] for i in rows],
            self.coords[rows],
            self.diameter_mm[rows],
            self.malignancy[rows],
            self.sphericity[rows],
            self.spiculation[rows],
            self.folds[rows],
        )

    def in_folds(self, folds: Sequence[int]) -> RatedNodules:
        return self.subset(np.flatnonzero(np.isin(self.folds, list(folds))))


def read_rated_nodules(data_dir: str | os.PathLike) -> RatedNodules:
    """The nodules of ``nodule_attributes.csv`` that have a malignancy rating, with folds.

    Raises:
        LungCTError: no attribute table, a table naming a series outside the folder's
            ``subsetN/`` scans, a rating out of its scale.
    """
    from lungct.cache import find_scans
    from lungct.tables import read_nodule_attributes

    root = Path(data_dir)
    folds = {s.seriesuid: s.fold for s in find_scans(root)}
    path = root / "nodule_attributes.csv"
    if not path.is_file():
        raise LungCTError(
            path,
            "missing: the data folder has no nodule ratings (made by `lungct synth`, "
            "`lungct import lidc`)",
        )
    table = read_nodule_attributes(path, known_series=folds)
    rated = np.flatnonzero(~np.isnan(table.rating("malignancy")))
    uids = [table.uids[int(k)] for k in table.series_index[rated]]
    return RatedNodules(
        uids=uids,
        coords=table.coords[rated],
        diameter_mm=table.diameter_mm[rated],
        malignancy=table.rating("malignancy")[rated],
        sphericity=table.rating("sphericity")[rated],
        spiculation=table.rating("spiculation")[rated],
        folds=np.array([folds[u] if folds[u] is not None else -1 for u in uids], dtype=np.int64),
    )


# ----------------------------------------------------------------------------------------------
# Patches
# ----------------------------------------------------------------------------------------------


def cut_patches(
    scan: Any,
    centres_world: np.ndarray,
    plan: MalignancyPlan,
    shifts_vox: np.ndarray | None = None,
) -> np.ndarray:
    """Windowed nodule-centred cubes ``(N, y, x, z)`` float32 from a scan on the cache grid.

    ``scan`` is anything with ``volume`` (z, y, x) and ``geometry`` on the 1 mm world-aligned
    grid: a :class:`lungct.cache.CachedScan` or a scan resampled for detection.
    """
    from lungct.patches import crop_patch
    from lungct.preprocess import apply_window

    centres = np.asarray(centres_world, dtype=np.float64).reshape(-1, 3)
    size = (plan.patch_mm,) * 3
    out = np.empty((len(centres), *size), dtype=np.float32)
    spacing = np.asarray(scan.geometry.spacing, dtype=np.float64)
    for i, c in enumerate(centres):
        if shifts_vox is not None:
            c = c + shifts_vox[i] * spacing
        out[i] = crop_patch(scan.volume, scan.geometry, c, size)
    x = apply_window(out, plan.hu_window, (0.0, 1.0))
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)), dtype=np.float32)


def nodule_patches(
    nodules: RatedNodules,
    rows: np.ndarray,
    open_scan: Any,
    plan: MalignancyPlan,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Patches of ``rows`` of ``nodules`` in ``rows`` order (augmented when ``rng`` is given:
    shifts up to ``plan.shift_mm``, left-right and z flips, quarter turns in the axial plane)."""
    from fp_reduction_3dcnn.symmetries import augment_batch

    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), *plan.input_shape), dtype=np.float32)
    shifts = None
    if rng is not None:
        shifts = rng.integers(-plan.shift_mm, plan.shift_mm + 1, size=(len(rows), 3))
    for uid in dict.fromkeys(nodules.uids[i] for i in rows):
        sel = np.flatnonzero([nodules.uids[i] == uid for i in rows])
        out[sel] = cut_patches(
            open_scan(uid),
            nodules.coords[rows[sel]],
            plan,
            None if shifts is None else shifts[sel],
        )
    if rng is not None:
        out = augment_batch(
            out, rng.integers(0, 4, size=len(rows)), rng.random((len(rows), 2)) < 0.5
        )
    return out


def rating_target(rating: np.ndarray) -> np.ndarray:
    """The regression target of a 1-5 rating: ``(rating - 3) / 2``, in [-1, 1]."""
    return ((np.asarray(rating, dtype=np.float32) - 3.0) / 2.0).reshape(-1, 1)


def rating_from_target(value: np.ndarray) -> np.ndarray:
    """A regressed target back on the 1-5 scale (clipped)."""
    return np.clip(np.asarray(value, dtype=np.float64) * 2.0 + 3.0, 1.0, 5.0)


def make_dataset(
    nodules: RatedNodules,
    open_scan: Any,
    plan: MalignancyPlan,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
) -> Any:
    """A :class:`keras.utils.PyDataset` of ``(patches, targets, sample weights)`` batches.

    Targets are ``{"malignancy": 0/1, "rating": (rating - 3) / 2}``; an indeterminate nodule
    (rating 3) weighs 0 in the two-class loss and 1 in the regression. Training batches
    (``shuffle``) are reshuffled and augmented each epoch from ``(seed, epoch)``, counting from
    ``epoch`` (where a resumed run starts); memory is one batch of patches.
    """
    import keras

    labels = nodules.labels

    class _Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False, max_queue_size=4)
            self.epoch = epoch
            self.order = np.arange(len(nodules))
            self._shuffle()

        def _shuffle(self) -> None:
            if shuffle:
                rng = np.random.default_rng([seed, self.epoch])
                self.order = rng.permutation(len(nodules))

        def __len__(self) -> int:
            return math.ceil(len(nodules) / plan.batch_size)

        def __getitem__(self, i: int):
            rows = self.order[i * plan.batch_size : (i + 1) * plan.batch_size]
            rng = np.random.default_rng([seed, self.epoch, i]) if shuffle else None
            x = nodule_patches(nodules, rows, open_scan, plan, rng)
            lab = labels[rows]
            y = {
                "malignancy": np.maximum(lab, 0).astype(np.float32).reshape(-1, 1),
                "rating": rating_target(nodules.malignancy[rows]),
            }
            w = {
                "malignancy": (lab >= 0).astype(np.float32),
                "rating": np.ones(len(rows), dtype=np.float32),
            }
            return x, y, w

        def set_epoch(self, new_epoch: int) -> None:
            """The epoch that begins (:func:`lungct.training.fit_callbacks` calls it)."""
            if new_epoch != self.epoch:
                self.epoch = new_epoch
                self._shuffle()

    return _Batches()


# ----------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------


def build_network(plan: MalignancyPlan) -> Any:
    """The malignancy CNN of a plan (:class:`MalignancyCNN`), not compiled."""
    from fp_reduction_3dcnn.malignancy_net import MalignancyCNN

    return MalignancyCNN(**plan.architecture(), name="malignancy_cnn")


def compile_network(model: Any, plan: MalignancyPlan, steps_per_epoch: int) -> None:
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(
        plan.learning_rate, decay_steps=max(1, plan.epochs * steps_per_epoch)
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss={"malignancy": "binary_crossentropy", "rating": "mean_squared_error"},
        loss_weights={"malignancy": 1.0, "rating": plan.rating_weight},
        weighted_metrics={"malignancy": [keras.metrics.AUC(name="auc")]},
    )


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic; ties count one half)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not n_pos or not n_neg:
        return math.nan
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_aucs(
    labels: np.ndarray,
    scores: Sequence[np.ndarray],
    rounds: int = 2000,
    seed: int = 0,
) -> np.ndarray:
    """AUCs of several scorers on the same resampled nodules, ``(rounds, len(scores))``.

    Each round draws the nodules with replacement, malignant and benign apart (so every round
    has both), and scores every scorer on that same draw: the difference of two columns is a
    paired bootstrap of the AUC difference.
    """
    labels = np.asarray(labels).astype(bool)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    rng = np.random.default_rng(seed)
    out = np.empty((rounds, len(scores)))
    for r in range(rounds):
        rows = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        for k, s in enumerate(scores):
            out[r, k] = auc(labels[rows], np.asarray(s)[rows])
    return out


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval."""
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def calibration_bins(
    labels: np.ndarray, probs: np.ndarray, bins: int = 10
) -> list[tuple[float, float, int]]:
    """Reliability diagram points: (mean predicted, observed malignant fraction, count) per
    equal-width probability bin that holds a nodule."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    which = np.minimum((probs * bins).astype(np.int64), bins - 1)
    out = []
    for b in range(bins):
        sel = which == b
        if sel.any():
            out.append((float(probs[sel].mean()), float(labels[sel].mean()), int(sel.sum())))
    return out


@dataclass
class ShapeBaseline:
    """Logistic regression of malignancy on log size, sphericity and spiculation.

    Fitted by Newton's method with a small ridge penalty on standardised features.
    """

    mean: np.ndarray = field(default_factory=lambda: np.zeros(3))
    scale: np.ndarray = field(default_factory=lambda: np.ones(3))
    weights: np.ndarray = field(default_factory=lambda: np.zeros(4))

    FEATURES = ("log diameter", "sphericity", "spiculation")

    @staticmethod
    def features(nodules: RatedNodules) -> np.ndarray:
        x = np.column_stack(
            [
                np.log(np.maximum(nodules.diameter_mm, 0.5)),
                nodules.sphericity,
                nodules.spiculation,
            ]
        ).astype(np.float64)
        # A nodule without a sphericity or spiculation rating takes the scale's middle.
        return np.where(np.isnan(x), 3.0, x)

    @classmethod
    def fit(cls, nodules: RatedNodules, ridge: float = 1e-3, iterations: int = 50) -> ShapeBaseline:
        labels = nodules.labels
        keep = labels >= 0
        x = cls.features(nodules)[keep]
        y = labels[keep].astype(np.float64)
        if not len(np.unique(y)) == 2:
            raise LungCTError(None, "the baseline needs both malignant and benign nodules")
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
        a = np.column_stack([np.ones(len(x)), (x - mean) / scale])
        w = np.zeros(a.shape[1])
        penalty = ridge * np.diag([0.0, *([1.0] * (a.shape[1] - 1))])
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-(a @ w)))
            grad = a.T @ (p - y) + penalty @ w
            hess = (a * (p * (1 - p))[:, None]).T @ a + penalty
            step = np.linalg.solve(hess, grad)
            w -= step
            if np.abs(step).max() < 1e-9:
                break
        return cls(mean, scale, w)

    def predict(self, nodules: RatedNodules) -> np.ndarray:
        x = (self.features(nodules) - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(self.weights[0] + x @ self.weights[1:])))

    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.FEATURES),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "intercept_and_weights": self.weights.tolist(),
        }


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


def _log(message: str, progress: bool) -> None:
    if progress:
        import sys

        print(message, file=sys.stderr, flush=True)


def train_malignancy(
    plan: MalignancyPlan,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    resume: bool = False,
    progress: bool = True,
    max_minutes: float | None = None,
    strategy: str = "none",
    mixed_precision: bool = False,
) -> dict[str, Any]:
    """Train the malignancy CNN on the plan's training folds; write a sealed model folder.

    ``model.fit`` on the suite's training contract (:mod:`lungct.training`): a killed run, or
    one stopped by ``max_minutes``, continues to the plan's last epoch with ``resume``;
    ``logs/train_log.csv``, TensorBoard under ``logs/``, the cosine schedule. ``strategy`` is
    made first, before any other TensorFlow op; under ``multiworker`` every worker runs this
    with the same arguments, and only the chief writes ``out_dir``
    (:func:`lungct.training.worker_dir`).

    Raises:
        LungCTError: bad data (see :func:`read_rated_nodules`), scans missing from the cache,
            a folder that holds another training (without ``resume``), too few labelled
            nodules; a bad ``TF_CONFIG`` or a worker of the cluster that stopped.
    """
    from lungct.training import make_strategy, worker_dir

    # First: MultiWorkerMirroredStrategy must be made before any other TensorFlow op.
    dist = make_strategy(strategy)
    with worker_dir(out_dir, dist) as folder:
        return _train_malignancy(
            plan,
            data_dir,
            cache_dir,
            Path(out_dir),
            folder,
            dist,
            resume=resume,
            progress=progress,
            max_minutes=max_minutes,
            strategy=strategy,
            mixed_precision=mixed_precision,
        )


def _train_malignancy(
    plan: MalignancyPlan,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    model_dir: Path,
    out: Path,
    dist: Any,
    *,
    resume: bool,
    progress: bool,
    max_minutes: float | None,
    strategy: str,
    mixed_precision: bool,
) -> dict[str, Any]:
    """:func:`train_malignancy` once its strategy is made: ``model_dir`` is the model folder,
    ``out`` the folder this worker writes (the model folder on the chief)."""
    import keras

    from fp_reduction_3dcnn.data import check_cache_has
    from lungct.cache import RecentScans, ScanCache
    from lungct.fileio import write_json_atomic
    from lungct.modeldir import MANIFEST_NAME, PLAN_NAME, seal_model_dir
    from lungct.training import (
        fit_callbacks,
        fit_epochs,
        from_chief,
        is_chief,
        log_float,
        prepare_model,
        read_log,
        replicas,
        restored_epoch,
        save_model_atomic,
        strategy_scope,
        task_name,
        worker_count,
    )

    chief = is_chief(dist)  # the chief alone reads the model folder; the others follow it
    manifest_path = out / MANIFEST_NAME
    if chief and manifest_path.exists() and not resume:
        raise LungCTError(out, "already holds a training; pass --resume to continue it")
    if chief and resume and (out / PLAN_NAME).is_file():
        saved = MalignancyPlan.load(out / PLAN_NAME)
        if saved != plan:
            raise LungCTError(out / PLAN_NAME, "the folder's plan differs from this run's plan")
    nodules = read_rated_nodules(data_dir)
    train = nodules.in_folds(plan.train_folds)
    val = nodules.in_folds(plan.val_folds)
    labels = train.labels
    if (labels == 1).sum() < 2 or (labels == 0).sum() < 2:
        raise LungCTError(
            Path(data_dir) / "nodule_attributes.csv",
            f"too few malignant or benign nodules in the training folds "
            f"({int((labels == 1).sum())} and {int((labels == 0).sum())})",
        )
    cache = ScanCache(cache_dir)
    check_cache_has(cache, set(train.uids) | set(val.uids))
    open_scan = RecentScans(cache, keep=6)

    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    plan.save(out / PLAN_NAME)
    write_json_atomic(
        manifest_path,
        {
            "stage": "malignancy",
            "plan": plan.name,
            "train_folds": list(plan.train_folds),
            "val_folds": list(plan.val_folds),
            "test_folds": list(plan.test_folds),
            "train_series": sorted(set(train.uids)),
            "val_series": sorted(set(val.uids)),
            "nodules": {
                "train": len(train),
                "train_labelled": int((train.labels >= 0).sum()),
                "val": len(val),
                "val_labelled": int((val.labels >= 0).sum()),
            },
        },
    )
    (start_epoch,) = from_chief(dist, [restored_epoch(out) if resume else 0])
    data = make_dataset(train, open_scan, plan, shuffle=True, seed=plan.seed, epoch=start_epoch)
    val_data = (
        make_dataset(val, open_scan, plan, shuffle=False, seed=plan.seed) if len(val) else None
    )
    with strategy_scope(strategy, mixed_precision, strategy=dist) as scope:
        keras.utils.set_random_seed(plan.seed)
        model = build_network(plan)
        compile_network(model, plan, len(data))
    prepare_model(model, scope)
    label = "malignancy" if chief else f"malignancy {task_name(dist)}"
    callbacks, budget = fit_callbacks(
        out,
        label=label,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        max_minutes=max_minutes,
        resume=resume,
        shown=("loss", "malignancy_auc", "val_loss", "val_malignancy_auc"),
        keep_checkpoints=3,
        progress=progress,
        seed=plan.seed,
        data=data,
        strategy=scope,
        mixed_precision=mixed_precision,
    )
    _log(
        f"[{label}] {len(train)} training nodules ({int((train.labels >= 0).sum())} "
        f"labelled), {len(val)} validation, epochs {start_epoch + 1}-{plan.epochs}"
        + (f" on {replicas(scope)} replicas" if scope is not None else "")
        + (f" of {worker_count(scope)} workers" if worker_count(scope) > 1 else ""),
        progress,
    )
    fit_epochs(
        model,
        data,
        epochs=plan.epochs,
        start_epoch=start_epoch,
        callbacks=callbacks,
        strategy=scope,
        validation_data=val_data,
    )
    log = read_log(out)
    save_model_atomic(model, out / MODEL_FILE)
    last = {
        k: log_float(log[-1], k)
        for k in ("loss", "malignancy_auc", "val_loss", "val_malignancy_auc", "val_rating_mae")
        if log and k in log[-1]
    }
    epochs_done = int(log_float(log[-1], "epoch")) + 1 if log else start_epoch
    seconds = sum(log_float(r, "seconds") for r in log if r.get("seconds"))
    seal_model_dir(
        out,
        "malignancy",
        train_seconds=seconds,
        data_dir=data_dir,
        seeds={"plan": plan.seed},
        steps=int(sum(log_float(r, "steps") for r in log if r.get("steps"))),
        extra={
            "epochs": epochs_done,
            "stopped_by_time": bool(budget.stopped),
            "last_epoch": last,
            "strategy": strategy,
            "replicas": replicas(scope),
            "workers": worker_count(scope),
        },
        plan=plan.to_dict(),
    )
    return {
        "out_dir": str(model_dir),
        "seconds": round(seconds, 1),
        "epochs_done": epochs_done,
        "stopped_early": bool(budget.stopped),
        **last,
    }


@dataclass
class MalignancyModel:
    """A sealed malignancy model folder opened for prediction."""

    model: Any
    plan: MalignancyPlan
    manifest: dict
    path: Path

    def predict(self, scan: Any, centres_world: np.ndarray, batch: int = 32) -> np.ndarray:
        """``(N, 2)``: malignancy probability and predicted rating (1-5) of world points."""
        centres = np.asarray(centres_world, dtype=np.float64).reshape(-1, 3)
        out = np.empty((len(centres), 2))
        for start in range(0, len(centres), batch):
            x = cut_patches(scan, centres[start : start + batch], self.plan)
            y = self.model.predict_on_batch(x)
            out[start : start + batch, 0] = np.asarray(y["malignancy"]).reshape(-1)
            out[start : start + batch, 1] = rating_from_target(np.asarray(y["rating"]).reshape(-1))
        return out


def open_malignancy_model(
    model_dir: str | os.PathLike, allow_unfinished: bool = False
) -> MalignancyModel:
    """Open a malignancy model folder in Keras safe mode after checking its seal and plan.

    Raises:
        LungCTError: no such folder, an unfinished or changed folder, weights that do not fit
            the plan, another stage's folder.
    """
    from lungct.modeldir import PLAN_NAME, load_keras_model, verify_model_dir

    root = Path(model_dir)
    manifest = verify_model_dir(root, allow_unfinished=allow_unfinished, stage="malignancy")
    plan = MalignancyPlan.load(root / PLAN_NAME)
    path = root / MODEL_FILE
    if not path.is_file():
        raise LungCTError(path, "model file not found (has training finished?)")
    import fp_reduction_3dcnn.malignancy_net  # noqa: F401  (registers the class)

    model = load_keras_model(
        path,
        classes=["fp_reduction_3dcnn>MalignancyCNN"],
        what="a malignancy CNN",
        architecture=plan.architecture(),
        plan_path=root / PLAN_NAME,
    )
    return MalignancyModel(model, plan, manifest, root)


def evaluate_malignancy(
    model_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    rounds: int = 2000,
    progress: bool = True,
) -> dict[str, Any]:
    """Score the held-out (test) folds' rated nodules; compare with the shape-only baseline.

    Writes ``predictions.csv`` (one row per rated test nodule), ``metrics.json`` (AUCs with
    bootstrap intervals, the paired AUC difference, the rating error, calibration bins) and
    ``calibration.png``. The baseline is fitted on the model's training and validation folds.

    Raises:
        LungCTError: the model's test folds hold scans it was trained on, bad data, scans
            missing from the cache, too few labelled test nodules.
    """
    from fp_reduction_3dcnn.data import check_cache_has
    from lungct.cache import RecentScans, ScanCache
    from lungct.fileio import write_json_atomic
    from lungct.tables import write_csv_atomic

    trained = open_malignancy_model(model_dir)
    plan = trained.plan
    nodules = read_rated_nodules(data_dir)
    test = nodules.in_folds(plan.test_folds)
    seen = set(trained.manifest.get("train_series", [])) | set(
        trained.manifest.get("val_series", [])
    )
    overlap = sorted(seen & set(test.uids))
    if overlap:
        raise LungCTError(
            Path(data_dir), f"test series {overlap[0]} was used in training: not held out"
        )
    labels = test.labels
    if (labels == 1).sum() < 2 or (labels == 0).sum() < 2:
        raise LungCTError(Path(data_dir), "too few malignant or benign nodules in the test folds")
    cache = ScanCache(cache_dir)
    check_cache_has(cache, set(test.uids))
    open_scan = RecentScans(cache, keep=6)
    preds = np.empty((len(test), 2))
    order = np.argsort(np.array(test.uids), kind="stable")
    for start in range(0, len(order), 64):
        rows = order[start : start + 64]
        for uid in dict.fromkeys(test.uids[i] for i in rows):
            sel = rows[[test.uids[i] == uid for i in rows]]
            preds[sel] = trained.predict(open_scan(uid), test.coords[sel])
        _log(f"[malignancy] scored {min(start + 64, len(order))}/{len(order)}", progress)
    fit_on = nodules.in_folds([*plan.train_folds, *plan.val_folds])
    baseline = ShapeBaseline.fit(fit_on)
    base = baseline.predict(test)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(
        out / PREDICTIONS_FILE,
        PREDICTION_COLUMNS,
        (
            [
                test.uids[i],
                *(float(v) for v in test.coords[i]),
                float(test.diameter_mm[i]),
                int(test.folds[i]),
                float(test.malignancy[i]),
                int(labels[i]),
                round(float(preds[i, 0]), 6),
                round(float(preds[i, 1]), 4),
                round(float(base[i]), 6),
            ]
            for i in range(len(test))
        ),
    )
    keep = labels >= 0
    y = labels[keep]
    cnn_p, base_p = preds[keep, 0], base[keep]
    boot = bootstrap_aucs(y, [cnn_p, base_p], rounds=rounds, seed=plan.seed)
    diff = boot[:, 0] - boot[:, 1]
    point = auc(y, cnn_p) - auc(y, base_p)
    metrics = {
        "test_folds": list(plan.test_folds),
        "test_series": len(set(test.uids)),
        "rated_nodules": len(test),
        "labelled_nodules": int(keep.sum()),
        "malignant": int((y == 1).sum()),
        "benign": int((y == 0).sum()),
        "cnn_auc": auc(y, cnn_p),
        "cnn_auc_ci95": interval(boot[:, 0]),
        "baseline_auc": auc(y, base_p),
        "baseline_auc_ci95": interval(boot[:, 1]),
        "auc_difference": point,
        "auc_difference_ci95": interval(diff),
        "auc_difference_p": float(min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean()))),
        "bootstrap_rounds": rounds,
        "rating_mae": float(np.abs(preds[:, 1] - test.malignancy).mean()),
        "rating_mae_baseline_constant": float(
            np.abs(np.median(fit_on.malignancy) - test.malignancy).mean()
        ),
        "cnn_calibration": calibration_bins(y, cnn_p),
        "baseline_calibration": calibration_bins(y, base_p),
        "baseline": baseline.to_dict(),
    }
    write_json_atomic(out / "metrics.json", metrics)
    calibration_figure(metrics, out / "calibration.png")
    return metrics


def calibration_figure(metrics: dict[str, Any], path: str | os.PathLike) -> None:
    """Reliability diagram of the CNN and the baseline (PNG, written atomically)."""
    from lungct.fileio import new_figure, write_figure_atomic

    fig = new_figure(figsize=(5.2, 5.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect calibration")
    for key, name, colour in (
        ("cnn", "3-D CNN", "tab:red"),
        ("baseline", "size + sphericity + spiculation", "tab:blue"),
    ):
        pts = metrics[f"{key}_calibration"]
        if not pts:
            continue
        x, y, n = (np.array(v) for v in zip(*pts, strict=True))
        lo, hi = metrics[f"{key}_auc_ci95"]
        ax.plot(
            x,
            y,
            "o-",
            color=colour,
            label=f"{name}: AUC {metrics[f'{key}_auc']:.2f} ({lo:.2f}-{hi:.2f})",
        )
        ax.scatter(x, y, s=8 + 2 * n, color=colour, alpha=0.35)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("predicted probability of malignancy")
    ax.set_ylabel("malignant fraction (rating >= 4)")
    ax.set_title(
        f"Held-out folds: {metrics['malignant']} malignant, {metrics['benign']} benign nodules",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=7.5)
    write_figure_atomic(fig, path, dpi=110)


def patient_score(
    detection_probs: Sequence[float], malignancy_probs: Sequence[float], threshold: float
) -> tuple[float, int]:
    """The patient's score as the PyTorch-book project defines it: the highest malignancy
    probability among the nodules detected with probability ``>= threshold``; 0 when none is.

    Returns:
        The score and how many detections it was taken over.
    """
    det = np.asarray(detection_probs, dtype=np.float64)
    mal = np.asarray(malignancy_probs, dtype=np.float64)
    chosen = det >= threshold
    if not chosen.any():
        return 0.0, 0
    return float(mal[chosen].max()), int(chosen.sum())
