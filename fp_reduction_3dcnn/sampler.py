"""Balanced training batches streamed from the per-scan cache."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from fp_reduction_3dcnn.config import FPRPlan
from fp_reduction_3dcnn.data import PatchCutter
from lungct.errors import LungCTError
from lungct.tables import CandidateTable


class BatchPlan(NamedTuple):
    """The rows of one batch and how each is augmented (patches are cut later)."""

    rows: np.ndarray
    labels: np.ndarray
    rotations: np.ndarray
    shifts_mm: np.ndarray
    flips: np.ndarray


class BalancedBatchSampler:
    """Stream class-balanced batches of patches; memory set by the batch size.

    Every batch holds ``plan.positives_per_batch`` positives (drawn with replacement and
    augmented on the fly: a random 0/90/180/270-degree axial rotation and a random shift of up
    to ``plan.shift_voxels`` cut voxels per axis; with ``plan.augment_flips`` also random x and
    z flips) and the rest negatives (a fresh permutation
    of the training negatives each epoch, so every negative is seen before any repeats).
    Patches are cut when a batch is drawn; nothing is stored per candidate but the row indices.

    Batches of epoch ``e`` come from ``numpy.random.default_rng((seed, e))``, so a resumed run
    draws the same batches as an uninterrupted one.

    Args:
        plan: the training plan (batch size, ratio, augmentation, steps per epoch).
        cutter: cuts patches from the cache.
        table: all candidates (with labels).
        rows: indices of the training rows of ``table``.
        seed: sampling seed (default: ``plan.seed``).

    Example:
        >>> sampler = BalancedBatchSampler(plan, cutter, table, train_rows)  # doctest: +SKIP
        >>> for (s1, s2, s3), labels in sampler.epoch(0): ...  # doctest: +SKIP
    """

    def __init__(
        self,
        plan: FPRPlan,
        cutter: PatchCutter,
        table: CandidateTable,
        rows: np.ndarray,
        seed: int | None = None,
    ) -> None:
        if table.label is None:
            raise LungCTError(table.path, "candidates need labels for training")
        rows = np.asarray(rows, dtype=np.int64)
        labels = table.label[rows]
        self.plan = plan
        self.cutter = cutter
        self.table = table
        self.positives = rows[labels == 1]
        self.negatives = rows[labels == 0]
        if not len(self.positives) or not len(self.negatives):
            raise LungCTError(
                table.path,
                f"training folds hold {len(self.positives)} positive and "
                f"{len(self.negatives)} negative candidates; need both",
            )
        self.seed = plan.seed if seed is None else int(seed)
        self.n_pos = plan.positives_per_batch
        self.n_neg = plan.batch_size - self.n_pos
        self.steps = plan.steps_per_epoch or max(1, math.ceil(len(self.negatives) / self.n_neg))

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> Iterator[tuple[list[np.ndarray], np.ndarray]]:
        """The batches ``([scale_1, scale_2, scale_3], labels)`` of one epoch (``([patch],
        labels)`` for a single-patch network)."""
        for batch in self.epoch_plan(epoch):
            yield self.cut(batch)

    def epoch_plan(self, epoch: int) -> Iterator[BatchPlan]:
        """What the batches of one epoch hold (rows, labels, augmentation), without patches."""
        rng = np.random.default_rng((self.seed, int(epoch)))
        order = rng.permutation(len(self.negatives))
        cursor = 0
        for _ in range(self.steps):
            if cursor + self.n_neg > len(order):
                order = np.concatenate([order[cursor:], rng.permutation(len(self.negatives))])
                cursor = 0
            neg = self.negatives[order[cursor : cursor + self.n_neg]]
            cursor += self.n_neg
            yield self.plan_batch(rng, neg)

    def plan_batch(
        self, rng: np.random.Generator, negatives: np.ndarray | None = None
    ) -> BatchPlan:
        """One batch: augmented positives plus the given (or randomly drawn) negatives."""
        if negatives is None:
            negatives = rng.choice(self.negatives, self.n_neg)
        pos = rng.choice(self.positives, self.n_pos)
        rows = np.concatenate([pos, negatives])
        labels = np.concatenate([np.ones(len(pos)), np.zeros(len(negatives))]).astype("float32")
        # Positives always get the paper's augmentation; negatives only if the plan says so.
        moved = len(rows) if self.plan.augment_negatives else len(pos)
        rotations = np.zeros(len(rows), dtype=np.int64)
        rotations[:moved] = rng.integers(0, 4, moved)
        flips = np.zeros((len(rows), 2), dtype=bool)
        if self.plan.augment_flips:
            flips[:moved] = rng.random((moved, 2)) < 0.5
        s = self.plan.shift_voxels
        shifts = np.zeros((len(rows), 3))
        if s:
            shifts[: len(pos)] = rng.integers(-s, s + 1, (len(pos), 3)) * np.asarray(
                self.plan.cut_spacing
            )
        perm = rng.permutation(len(rows))
        return BatchPlan(rows[perm], labels[perm, None], rotations[perm], shifts[perm], flips[perm])

    def cut(self, batch: BatchPlan) -> tuple[list[np.ndarray], np.ndarray]:
        """Cut the patches of a planned batch: ``([scale_1, scale_2, scale_3], labels)``."""
        inputs = self.cutter.cut_rows(
            self.table, batch.rows, batch.rotations, batch.shifts_mm, batch.flips
        )
        return inputs, batch.labels

    def draw(self, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
        """One random batch with patches (negatives drawn with replacement)."""
        return self.cut(self.plan_batch(rng))


def validation_rows(
    table: CandidateTable, rows: np.ndarray, max_negatives: int, seed: int = 0
) -> np.ndarray:
    """All positive rows and at most ``max_negatives`` negatives (a fixed random subset)."""
    rows = np.asarray(rows, dtype=np.int64)
    if table.label is None or not len(rows):
        return rows
    labels = table.label[rows]
    pos, neg = rows[labels == 1], rows[labels == 0]
    if max_negatives and len(neg) > max_negatives:
        neg = np.random.default_rng((seed, 977)).choice(neg, max_negatives, replace=False)
    return np.sort(np.concatenate([pos, neg]))
