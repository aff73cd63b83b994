"""Solutions to the exercises of lab 6, the whole detector and a fair comparison
(``labs/06-detector-and-comparison.ipynb``).

Try the exercises first. ``tests/test_labs.py`` checks these functions against the suite's
paired comparison (``integration.compare``) and bootstrap (``integration.evaluate``), so they
stay right as the suite changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from integration import evaluate
from lungct.errors import LungCTError
from lungct.tables import AnnotationTable, ResultTable


def paired_p_value(differences: Sequence[float]) -> float:
    """Exercise 1: the two-sided bootstrap p-value of "no difference".

    ``differences`` holds one CPM difference per bootstrap round (system minus reference, both
    scored on the same resampled scans). Count the rounds at or below 0 and those at or above 0;
    take the smaller count ``k``; the p-value is ``2 (k + 1) / (B + 1)``, at most 1. The ``+ 1``
    counts the observed test set as one more round, so the p-value is never 0: with ``B``
    rounds it cannot go below ``2 / (B + 1)`` (0.0198 with 100 rounds, 0.002 with 1000).
    """
    d = np.asarray(differences, dtype=np.float64)
    k = min(int(np.count_nonzero(d <= 0.0)), int(np.count_nonzero(d >= 0.0)))
    return min(1.0, 2.0 * (k + 1) / (len(d) + 1))


def _copies(table: AnnotationTable | ResultTable, rows: list[np.ndarray], names: list[str]):
    """The rows of each drawn scan, renamed: ``rows[k]`` of ``table`` become scan ``names[k]``."""
    index = np.concatenate(rows) if rows else np.zeros(0, dtype=np.intp)
    series = np.repeat(np.arange(len(names)), [len(r) for r in rows])
    if isinstance(table, ResultTable):
        return ResultTable(names, series, table.coords[index], probability=table.probability[index])
    return AnnotationTable(names, series, table.coords[index], diameter_mm=table.diameter_mm[index])


def resampled_cpms(
    annotations: AnnotationTable,
    excluded: AnnotationTable | None,
    seriesuids: Sequence[str],
    results: ResultTable,
    samples: int,
    seed: int = 0,
) -> np.ndarray:
    """Exercise 2: the CPM of every bootstrap round, by copying the drawn scans.

    One ``numpy.random.RandomState(seed)`` for all rounds; each round draws ``N`` scan numbers
    with ``randint(N, size=N)`` (the official LUNA16 script's draws). The round's test set
    holds a copy of every drawn scan under a new name, with that scan's nodules, excluded
    findings and marks: a scan drawn twice counts twice. Its CPM is what ``evaluate`` gives.
    A round that draws only scans without nodules has no sensitivity; the suite counts it as
    CPM 0, and so does this function.

    Returns:
        ``(samples,)`` CPMs, equal to ``evaluate(..., bootstrap=samples, seed=seed)``'s
        ``bootstrap.cpm_samples``.
    """
    uids = list(seriesuids)
    rng = np.random.RandomState(seed)
    tables = (annotations, excluded, results)
    # The rows of every scan in each table, looked up once.
    rows_of = [
        {uid: t.rows_in_series(uid) for uid in uids} if t is not None else None for t in tables
    ]
    cpms = np.zeros(samples)
    for b in range(samples):
        drawn = [uids[j] for j in rng.randint(len(uids), size=len(uids))]
        names = [f"{uid}#{k}" for k, uid in enumerate(drawn)]
        copies = [
            None if t is None else _copies(t, [rows[uid] for uid in drawn], names)
            for t, rows in zip(tables, rows_of, strict=True)
        ]
        try:
            cpms[b] = evaluate(copies[0], copies[1], names, copies[2]).cpm
        except LungCTError:
            if len(copies[0]):  # not the "no nodule in this round" case: a real problem
                raise
            cpms[b] = 0.0
    return cpms


def paired_and_unpaired_ci(
    annotations: AnnotationTable,
    excluded: AnnotationTable | None,
    seriesuids: Sequence[str],
    reference: ResultTable,
    system: ResultTable,
    samples: int,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Exercise 3: the paired and the unpaired interval of ``CPM(system) - CPM(reference)``.

    Paired: both systems on the same rounds (the draws of ``seed``), the difference taken
    round by round. Unpaired: the system on the draws of ``seed + 1``, as if it had been
    bootstrapped on its own. Each interval is read off the sorted differences at positions
    ``floor(p * B)`` for ``p = (1 - confidence) / 2`` and ``1 - p`` (the official percentile
    rule).
    """
    ref = resampled_cpms(annotations, excluded, seriesuids, reference, samples, seed)
    same = resampled_cpms(annotations, excluded, seriesuids, system, samples, seed)
    other = resampled_cpms(annotations, excluded, seriesuids, system, samples, seed + 1)
    p = (1.0 - confidence) / 2.0
    lo, hi = math.floor(p * samples), math.floor((1.0 - p) * samples)
    paired, unpaired = np.sort(same - ref), np.sort(other - ref)
    return (float(paired[lo]), float(paired[hi])), (float(unpaired[lo]), float(unpaired[hi]))
