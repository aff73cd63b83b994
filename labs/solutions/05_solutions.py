"""Solutions to the exercises of lab 5, the LUNA16 evaluation (``labs/05-luna16-evaluation.ipynb``).

Try the exercises first. ``tests/test_labs.py`` checks these functions against the suite's
exact evaluation (``integration.evaluate``), so they stay right as the suite changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from integration import FP_RATES, MAX_MARKS_PER_SCAN, evaluate
from lungct.tables import AnnotationTable, ResultTable

UNKNOWN_DIAMETER_MM = 10.0
"""What LUNA16 takes for an excluded finding whose diameter is -1 (unknown)."""


def best_single_change(
    annotations: AnnotationTable,
    excluded: AnnotationTable | None,
    seriesuids: Sequence[str],
    results: ResultTable,
) -> ResultTable:
    """Exercise 1: the submission with one probability changed so that the CPM is highest.

    Only the order of the probabilities matters, so it is enough to try every mark at the top
    (just above the highest probability) and at the bottom (just below the lowest). On the
    lab's toy set the answer raises the true positive of scan B (0.45) above every false
    positive: the CPM goes from 0.524 to 2/3, its ceiling, because the 5 mm nodule of scan A is
    never marked and no probability can find it.
    """
    p = results.probability
    top, bottom = np.nextafter(p.max(), np.inf), np.nextafter(p.min(), -np.inf)
    best, best_cpm = results, evaluate(annotations, excluded, seriesuids, results).cpm
    for i in range(len(p)):
        for value in (top, bottom):
            q = p.copy()
            q[i] = value
            changed = ResultTable(results.uids, results.series_index, results.coords, probability=q)
            cpm = evaluate(annotations, excluded, seriesuids, changed).cpm
            if cpm > best_cpm:
                best, best_cpm = changed, cpm
    return best


def kept_by_cap(probability: Sequence[float], cap: int = MAX_MARKS_PER_SCAN) -> np.ndarray:
    """Exercise 2: which marks of one scan LUNA16 keeps (a boolean mask).

    With more than ``cap`` marks, only those strictly above the ``cap + 1``-th highest
    probability stay, so every mark tied with it goes too.
    """
    p = np.asarray(probability, dtype=np.float64)
    if len(p) <= cap:
        return np.ones(len(p), dtype=bool)
    cut = np.sort(p)[::-1][cap]  # the (cap + 1)-th highest
    return p > cut


def _rows(table: AnnotationTable | None, uid: str) -> tuple[np.ndarray, np.ndarray]:
    """Centres ``(k, 3)`` and radii ``(k,)`` of one scan's findings (unknown diameter: 10 mm)."""
    if table is None:
        return np.zeros((0, 3)), np.zeros(0)
    rows = table.rows_in_series(uid)
    diameter = table.diameter_mm[rows]
    diameter = np.where(diameter < 0, UNKNOWN_DIAMETER_MM, diameter)
    return table.coords[rows], diameter / 2.0


def _hits(marks: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """``(marks, findings)`` boolean: squared distance < squared radius."""
    d2 = np.sum((marks[:, None, :] - centres[None, :, :]) ** 2, axis=-1)
    return d2 < radii[None, :] ** 2


def cpm_by_hand(
    annotations: AnnotationTable,
    excluded: AnnotationTable | None,
    seriesuids: Sequence[str],
    results: ResultTable,
) -> float:
    """Exercise 3: the LUNA16 CPM from the rules, scan by scan, without ``evaluate``.

    Per scan: cap the marks; each nodule hit by a mark is detected with its best mark's
    probability; a mark on no nodule but on an excluded finding is ignored; any other mark is
    a false positive. Then the FROC over {detected nodules, false positives}, one point per
    distinct probability, rescaled with the official script's arithmetic (which decides, when
    a rate falls exactly on a vertical step, whether the bottom or the top of the step
    counts), and the mean of ``np.interp`` at the seven rates.
    """
    n_scans = len(seriesuids)
    tp_prob: list[float] = []
    fp_prob: list[float] = []
    n_nodules = 0
    for uid in seriesuids:
        centres, radii = _rows(annotations, uid)
        n_nodules += len(radii)
        rows = results.rows_in_series(uid)
        prob = results.probability[rows]
        keep = kept_by_cap(prob)
        marks, prob = results.coords[rows][keep], prob[keep]
        on_nodule = _hits(marks, centres, radii)
        for j in range(len(radii)):
            if on_nodule[:, j].any():
                tp_prob.append(float(prob[on_nodule[:, j]].max()))
        ex_centres, ex_radii = _rows(excluded, uid)
        on_excluded = _hits(marks, ex_centres, ex_radii).any(axis=1)
        fp_prob.extend(prob[~on_nodule.any(axis=1) & ~on_excluded].tolist())
    if n_nodules == 0:
        raise ValueError("no nodule in the listed scans: sensitivity is undefined")

    tp, fp = np.asarray(tp_prob), np.asarray(fp_prob)
    thresholds = np.unique(np.concatenate([tp, fp]))[::-1]  # distinct, highest first
    tps = np.array([0.0, *[(tp >= t).sum() for t in thresholds]])
    fps = np.array([0.0, *[(fp >= t).sum() for t in thresholds]])
    n_tp, n_fp = tps[-1], fps[-1]
    fps_per_scan = fps / n_fp * n_fp / n_scans if n_fp > 0 else np.zeros(len(fps))
    sensitivity = tps / n_tp * n_tp / n_nodules if n_tp > 0 else np.zeros(len(tps))
    return float(np.mean(np.interp(FP_RATES, fps_per_scan, sensitivity)))
