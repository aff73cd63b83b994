"""The LUNA16 evaluation, exact to the last digit: FROC, CPM, bootstrap, candidate-stage mode.

This is an independent, vectorised implementation of the rules of the official LUNA16 script
``noduleCADEvaluationLUNA16.py`` (see ``docs/methods.md`` section 5):

1. Only the series of the series list count; results rows for other series are counted
   (``unknown_series_rows``) and left out, annotations of other series are ignored.
2. Per scan, when there are more than 100 marks, only the marks whose probability is strictly
   above the 101st highest are kept (ties at the cut can leave fewer than 100).
3. A mark hits a finding when its squared world distance to the centre is
   ``< (diameter / 2) ** 2``; an excluded finding with a negative (unknown) diameter is 10 mm.
4. A nodule hit by at least one mark is detected, with the highest probability among its marks;
   its other marks are ignored (double detections). A mark on two nodules detects both.
5. A mark that hits no nodule but an excluded finding is ignored; every other mark is a false
   positive.
6. Missed nodules stay in the denominator. The FROC is the ROC over {detected nodules, false
   positives} as :func:`sklearn.metrics.roc_curve` builds it (distinct thresholds, then
   ``drop_intermediate``), rescaled: FPs/scan = fpr * FPs / scans, sensitivity =
   tpr * detected / nodules. Dropping intermediate collinear points changes ``np.interp`` where
   an operating point lies exactly on a vertical step (k/8 FPs/scan with 8k scans), so the
   same points are kept here.
7. CPM = mean of ``np.interp`` at 1/8, 1/4, 1/2, 1, 2, 4, 8 FPs/scan.
8. Bootstrap: resample the scans with replacement (``RandomState(seed).randint(N, size=N)``
   per resample, the draws the official script makes after ``np.random.seed(seed)``), build
   each resample's FROC the same way, interpolate on ``linspace(0.125, 8, 10000)`` (float32),
   and take the mean and the sorted values at ``floor(p * B)`` for p = 0.025 and 0.975.
   The CPM's interval is taken the same way from the resamples' CPMs.

Where the official script produces NaN or crashes (no detected nodule, no mark at all), this
module returns sensitivity 0; a scan list with no nodule raises :class:`LungCTError`.

Speed: the per-mark labels are computed once; a bootstrap resample is a multiset of scans, so
its FROC is built from weighted cumulative sums over the marks sorted once by probability.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungct.errors import LungCTError
from lungct.fileio import new_figure, staged_outputs, write_figure_atomic, write_json_atomic
from lungct.tables import (
    AnnotationTable,
    PointTable,
    ResultTable,
    read_annotations,
    read_results,
    read_seriesuids,
    write_csv_atomic,
)

FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The seven operating points of the CPM, in false positives per scan."""
FP_RATE_KEYS: tuple[str, ...] = ("0.125", "0.25", "0.5", "1", "2", "4", "8")
"""The JSON keys of :data:`FP_RATES`."""
MAX_MARKS_PER_SCAN = 100
"""The official cap on marks per scan."""
UNKNOWN_DIAMETER_MM = 10.0
"""Diameter used for excluded findings whose diameter is negative (unknown)."""
FROC_MIN_FPS = 0.125
FROC_MAX_FPS = 8.0
BOOTSTRAP_GRID_POINTS = 10000
_MATCH_BLOCK = 1 << 18  # mark x finding pairs per block of the hit test
CANDIDATE_BUDGETS: tuple[int, ...] = (10, 25, 50, 100, 200, 500, 1000)
"""Candidates-per-scan budgets at which the candidate-stage sensitivity is reported."""


# ----------------------------------------------------------------------------------------------
# Result types
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class NoduleOutcomes:
    """Every nodule of the evaluated scans: hit or missed, its best probability, its size.

    Attributes:
        seriesuids: ``(M,)`` object array of series UIDs.
        coords: ``(M, 3)`` world mm.
        diameter_mm: ``(M,)``.
        detected: ``(M,)`` bool.
        probability: ``(M,)`` highest probability among the marks that hit it (NaN if missed).
        marks: ``(M,)`` number of marks that hit it.
    """

    seriesuids: np.ndarray
    coords: np.ndarray
    diameter_mm: np.ndarray
    detected: np.ndarray
    probability: np.ndarray
    marks: np.ndarray

    HEADER = (
        "seriesuid",
        "coordX",
        "coordY",
        "coordZ",
        "diameter_mm",
        "detected",
        "probability",
        "marks",
    )

    def __len__(self) -> int:
        return len(self.detected)

    def rows(self) -> list[list[Any]]:
        """One list per nodule, in :attr:`HEADER` order (missed: empty probability)."""
        out = []
        for i in range(len(self)):
            x, y, z = self.coords[i].tolist()
            p = self.probability[i]
            out.append(
                [
                    self.seriesuids[i],
                    x,
                    y,
                    z,
                    float(self.diameter_mm[i]),
                    int(self.detected[i]),
                    "" if math.isnan(p) else float(p),
                    int(self.marks[i]),
                ]
            )
        return out

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write ``nodules.csv`` atomically."""
        write_csv_atomic(path, self.HEADER, self.rows())


@dataclass(eq=False)
class BootstrapResult:
    """Bootstrap statistics of a FROC.

    Attributes:
        samples: number of resamples.
        seed: the random seed of ``numpy.random.RandomState``.
        fps: the grid ``linspace(0.125, 8, 10000)``.
        mean, lower, upper: float32 mean curve and percentile band on that grid.
        cpm_samples: ``(samples,)`` CPM of every resample.
        cpm_mean: mean of ``cpm_samples``.
        cpm_ci: ``(lower, upper)`` CPM interval.
        sensitivity_ci: ``(7, 2)`` interval of the sensitivity at each of :data:`FP_RATES`.
        confidence: the interval's level (0.95).
    """

    samples: int
    seed: int
    fps: np.ndarray
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    cpm_samples: np.ndarray
    cpm_mean: float
    cpm_ci: tuple[float, float]
    sensitivity_ci: np.ndarray
    confidence: float = 0.95


@dataclass(eq=False)
class CandidateStageResult:
    """Candidate-stage quality: sensitivity against candidates per scan (no cap, no exclusion).

    Attributes:
        sensitivity: fraction of nodules hit by at least one candidate.
        candidates_per_scan: candidates (in the listed scans) per scan.
        candidates: number of candidates.
        nodules, detected, scans: counts.
        curve_candidates_per_scan, curve_sensitivity, curve_thresholds: the curve obtained by
            raising a probability threshold (candidates kept: probability >= threshold).
        nodule_table: per-nodule outcome.
    """

    sensitivity: float
    candidates_per_scan: float
    candidates: int
    nodules: int
    detected: int
    scans: int
    curve_candidates_per_scan: np.ndarray
    curve_sensitivity: np.ndarray
    curve_thresholds: np.ndarray
    nodule_table: NoduleOutcomes

    def sensitivity_at(self, candidates_per_scan: float) -> float:
        """Sensitivity of the largest threshold set with at most that many candidates per scan."""
        ok = self.curve_candidates_per_scan <= candidates_per_scan
        return float(self.curve_sensitivity[ok][-1]) if ok.any() else 0.0

    def to_json(self) -> dict[str, Any]:
        """The JSON-ready summary."""
        return {
            "candidate_sensitivity": self.sensitivity,
            "candidates_per_scan": self.candidates_per_scan,
            "candidates": self.candidates,
            "nodules": self.nodules,
            "detected": self.detected,
            "scans": self.scans,
            "candidate_sensitivity_at": {str(b): self.sensitivity_at(b) for b in CANDIDATE_BUDGETS},
        }


@dataclass(eq=False)
class EvaluationResult:
    """The outcome of a LUNA16 evaluation.

    Attributes:
        cpm: competition performance metric.
        sensitivities: ``(7,)`` sensitivity at each of :data:`FP_RATES`.
        froc_fps, froc_sens, froc_thresholds: the FROC points, exactly as the official script
            builds them (first threshold ``inf``).
        nodules, detected, scans: counts (nodules in the listed scans).
        marks: marks of listed scans after the cap; false_positives, ignored_excluded
            (marks on excluded findings only), double_detections: their fate.
        marks_dropped_by_cap, unknown_series_rows, unknown_series: bookkeeping.
        scans_without_marks: listed scans with no mark at all.
        cap: marks-per-scan cap (``None`` in candidate-stage mode).
        nodule_table: per-nodule outcome.
        bootstrap: bootstrap statistics, or ``None``.
        candidate_stage: candidate-stage statistics (only when ``cap`` is ``None``).
        label: name of the system, for figures.
    """

    cpm: float
    sensitivities: np.ndarray
    froc_fps: np.ndarray
    froc_sens: np.ndarray
    froc_thresholds: np.ndarray
    nodules: int
    detected: int
    scans: int
    marks: int
    false_positives: int
    ignored_excluded: int
    double_detections: int
    marks_dropped_by_cap: int
    unknown_series_rows: int
    unknown_series: int
    scans_without_marks: int
    cap: int | None
    nodule_table: NoduleOutcomes
    bootstrap: BootstrapResult | None = None
    candidate_stage: CandidateStageResult | None = None
    label: str = "CAD"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sensitivity_by_rate(self) -> dict[str, float]:
        """``{"0.125": s, ..., "8": s}``."""
        return {k: float(v) for k, v in zip(FP_RATE_KEYS, self.sensitivities, strict=True)}

    def to_json(self) -> dict[str, Any]:
        """The metrics as a JSON-ready dict (the CLI prints it and writes ``metrics.json``)."""
        out: dict[str, Any] = {
            "cpm": float(self.cpm),
            "sensitivity": self.sensitivity_by_rate,
            "cpm_ci95": None,
            "nodules": self.nodules,
            "detected": self.detected,
            "scans": self.scans,
        }
        if self.bootstrap is not None:
            bs = self.bootstrap
            out["cpm_ci95"] = [float(bs.cpm_ci[0]), float(bs.cpm_ci[1])]
            out["cpm_bootstrap_mean"] = float(bs.cpm_mean)
            out["sensitivity_ci95"] = {
                k: [float(lo), float(hi)]
                for k, (lo, hi) in zip(FP_RATE_KEYS, bs.sensitivity_ci, strict=True)
            }
            out["bootstrap"] = bs.samples
            out["seed"] = bs.seed
        out.update(
            {
                "marks": self.marks,
                "false_positives": self.false_positives,
                "ignored_excluded_marks": self.ignored_excluded,
                "double_detections": self.double_detections,
                "marks_dropped_by_cap": self.marks_dropped_by_cap,
                "unknown_series_rows": self.unknown_series_rows,
                "unknown_series": self.unknown_series,
                "scans_without_marks": self.scans_without_marks,
                "cap": self.cap,
            }
        )
        if self.candidate_stage is not None:
            cs = self.candidate_stage.to_json()
            for key in ("candidate_sensitivity", "candidates_per_scan", "candidate_sensitivity_at"):
                out[key] = cs[key]
        out.update(self.extra)
        return out


# ----------------------------------------------------------------------------------------------
# Matching marks to findings
# ----------------------------------------------------------------------------------------------


def _scan_index(table: PointTable, lookup: dict[str, int]) -> np.ndarray:
    """Scan number (position in the series list) of every row, -1 for unlisted series."""
    per_uid = np.array([lookup.get(uid, -1) for uid in table.uids], dtype=np.int64)
    return per_uid[table.series_index] if len(table) else np.zeros(0, dtype=np.int64)


def _radius_squared(diameter: np.ndarray) -> np.ndarray:
    d = np.where(diameter < 0.0, UNKNOWN_DIAMETER_MM, diameter)
    r = d / 2.0
    return r * r


def _group_bounds(sorted_scan: np.ndarray, n_scans: int) -> np.ndarray:
    """``bounds[s]:bounds[s+1]`` is the slice of scan ``s`` in an array sorted by scan."""
    return np.searchsorted(sorted_scan, np.arange(n_scans + 1), side="left")


def _match(
    mark_scan: np.ndarray,
    mark_xyz: np.ndarray,
    mark_prob: np.ndarray,
    find_scan: np.ndarray,
    find_xyz: np.ndarray,
    find_r2: np.ndarray,
    n_scans: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hit test of every mark against every finding of its scan.

    Returns ``(mark_hits, find_best, find_count)``: whether each mark hits at least one finding,
    each finding's highest hitting probability (``-inf`` if none) and its number of hits.
    """
    mark_hits = np.zeros(len(mark_scan), dtype=bool)
    find_best = np.full(len(find_scan), -np.inf)
    find_count = np.zeros(len(find_scan), dtype=np.int64)
    if len(mark_scan) == 0 or len(find_scan) == 0:
        return mark_hits, find_best, find_count
    m_order = np.argsort(mark_scan, kind="stable")
    f_order = np.argsort(find_scan, kind="stable")
    m_bounds = _group_bounds(mark_scan[m_order], n_scans)
    f_bounds = _group_bounds(find_scan[f_order], n_scans)
    both = np.flatnonzero((np.diff(m_bounds) > 0) & (np.diff(f_bounds) > 0))
    for s in both:
        fi = f_order[f_bounds[s] : f_bounds[s + 1]]
        f_xyz = find_xyz[fi][None, :, :]
        f_r2 = find_r2[fi][None, :]
        # Blocks of marks keep the (marks x findings x 3) array small even without a cap.
        block = max(1, _MATCH_BLOCK // len(fi))
        for start in range(m_bounds[s], m_bounds[s + 1], block):
            mi = m_order[start : min(start + block, m_bounds[s + 1])]
            # (finding - mark)^2 summed x, y, z in that order, as the official script does.
            delta = f_xyz - mark_xyz[mi][:, None, :]
            sq = delta * delta
            hit = ((sq[..., 0] + sq[..., 1]) + sq[..., 2]) < f_r2
            if not hit.any():
                continue
            mark_hits[mi] = hit.any(axis=1)
            find_count[fi] += hit.sum(axis=0)
            best = np.where(hit, mark_prob[mi][:, None], -np.inf).max(axis=0)
            np.maximum(find_best[fi], best, out=best)
            find_best[fi] = best
    return mark_hits, find_best, find_count


def _cap_marks(scan: np.ndarray, prob: np.ndarray, n_scans: int, cap: int) -> np.ndarray:
    """Keep-mask: per scan with more than ``cap`` marks, those strictly above the (cap+1)th."""
    keep = np.ones(len(scan), dtype=bool)
    counts = np.bincount(scan, minlength=n_scans)
    over = np.flatnonzero(counts > cap)
    if len(over) == 0:
        return keep
    order = np.lexsort((-prob, scan))  # by scan, then probability high to low
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    threshold = np.full(n_scans, -np.inf)
    threshold[over] = prob[order[starts[over] + cap]]
    in_over = counts[scan] > cap
    keep[in_over] = prob[in_over] > threshold[scan[in_over]]
    return keep


# ----------------------------------------------------------------------------------------------
# FROC construction
# ----------------------------------------------------------------------------------------------


def _roc_counts(
    cum_tp: np.ndarray, cum_fp: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's ``drop_intermediate`` on cumulative counts at distinct thresholds.

    Returns the kept indices and the kept ``(fps, tps)`` with the leading ``(0, 0)`` point.
    """
    n = len(cum_tp)
    if n > 2:
        corner = (np.diff(cum_fp, 2) != 0) | (np.diff(cum_tp, 2) != 0)
        keep = np.flatnonzero(np.concatenate(([True], corner, [True])))
    else:
        keep = np.arange(n)
    fps = np.concatenate(([0.0], cum_fp[keep]))
    tps = np.concatenate(([0.0], cum_tp[keep]))
    return keep, fps, tps


def _froc_from_counts(
    fps: np.ndarray, tps: np.ndarray, n_nodules: float, n_scans: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rescale ROC counts to (FPs per scan, sensitivity) with the official arithmetic."""
    n_fp = fps[-1]
    n_tp = tps[-1]
    if n_fp > 0:
        fpr = fps / n_fp
        fps_per_scan = fpr * n_fp / n_scans
    else:  # the official "system has no false positives" branch
        fps_per_scan = np.zeros(len(fps))
    if n_tp > 0 and n_nodules > 0:
        tpr = tps / n_tp
        sens = tpr * n_tp / n_nodules
    else:  # the official script gives NaN here
        sens = np.zeros(len(tps))
    return fps_per_scan, sens


def _cpm(fps: np.ndarray, sens: np.ndarray) -> tuple[float, np.ndarray]:
    at = np.interp(FP_RATES, fps, sens)
    return float(np.mean(at)), at


@dataclass
class _Prepared:
    """Per-entry arrays of the ROC (detected nodules and false positives), sorted once."""

    n_scans: int
    prob: np.ndarray  # descending
    is_tp: np.ndarray  # float64 0/1
    scan: np.ndarray
    last_of_value: np.ndarray  # indices of the last entry of each distinct probability
    nodule_scan: np.ndarray  # scan of every nodule (detected or missed)


def _prepare(
    entry_prob: np.ndarray,
    entry_tp: np.ndarray,
    entry_scan: np.ndarray,
    nodule_scan: np.ndarray,
    n_scans: int,
) -> _Prepared:
    order = np.argsort(-entry_prob, kind="stable")
    prob = entry_prob[order]
    if len(prob):
        last = np.flatnonzero(np.concatenate((prob[1:] != prob[:-1], [True])))
    else:
        last = np.zeros(0, dtype=np.intp)
    return _Prepared(
        n_scans=n_scans,
        prob=prob,
        is_tp=entry_tp[order].astype(np.float64),
        scan=entry_scan[order],
        last_of_value=last,
        nodule_scan=nodule_scan,
    )


def _full_froc(p: _Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The FROC of the whole set: (fps per scan, sensitivity, thresholds)."""
    if len(p.prob) == 0:
        return np.zeros(1), np.zeros(1), np.array([np.inf])
    cum_tp = np.cumsum(p.is_tp)[p.last_of_value]
    cum_fp = (p.last_of_value + 1.0) - cum_tp
    keep, fps, tps = _roc_counts(cum_tp, cum_fp)
    thresholds = np.concatenate(([np.inf], p.prob[p.last_of_value[keep]]))
    fps_s, sens = _froc_from_counts(fps, tps, float(len(p.nodule_scan)), p.n_scans)
    return fps_s, sens, thresholds


def _draws(n_scans: int, samples: int, seed: int) -> np.ndarray:
    """``(samples, n_scans)`` multiplicity of every scan in every bootstrap resample.

    ``RandomState(seed).randint(N, size=N)`` per resample, the official script's draws. Two
    systems bootstrapped with the same draws are scored on the same resampled scans (paired).
    """
    rng = np.random.RandomState(seed)
    mults = np.empty((samples, n_scans), dtype=np.float64)
    for b in range(samples):
        mults[b] = np.bincount(rng.randint(n_scans, size=n_scans), minlength=n_scans)
    return mults


def _resampled_frocs(p: _Prepared, mults: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every resample's FROC on the bootstrap grid, its sensitivities at :data:`FP_RATES` and
    its CPM: ``(curves float32 (B, grid), at_rates (B, 7), cpms (B,))``."""
    samples, n = mults.shape
    grid = np.linspace(FROC_MIN_FPS, FROC_MAX_FPS, num=BOOTSTRAP_GRID_POINTS)
    curves = np.zeros((samples, len(grid)), dtype=np.float32)
    cpms = np.zeros(samples)
    at_rates = np.zeros((samples, len(FP_RATES)))
    nodules_per_scan = np.bincount(p.nodule_scan, minlength=n).astype(np.float64)
    last = p.last_of_value
    n_groups = len(last)
    # The few true positives are counted per distinct-probability group on their own; every
    # count is a whole number, so the float sums are exact in any order.
    tp_pos = np.flatnonzero(p.is_tp)
    tp_group = np.searchsorted(last, tp_pos)
    tp_scan = p.scan[tp_pos]
    for b in range(samples):
        mult = mults[b]
        if n_groups:
            cum_all = np.cumsum(mult[p.scan])[last]
            cum_tp = np.cumsum(np.bincount(tp_group, weights=mult[tp_scan], minlength=n_groups))
            cum_fp = cum_all - cum_tp
            present = np.diff(cum_all, prepend=0.0) > 0
            _, fps, tps = _roc_counts(cum_tp[present], cum_fp[present])
        else:
            fps = tps = np.zeros(1)
        fps_s, sens = _froc_from_counts(fps, tps, float(mult @ nodules_per_scan), n)
        curves[b] = np.interp(grid, fps_s, sens)
        at_rates[b] = np.interp(FP_RATES, fps_s, sens)
        cpms[b] = np.mean(at_rates[b])
    return curves, at_rates, cpms


def _percentile_indices(samples: int, confidence: float) -> tuple[int, int]:
    """Positions of an interval's ends in ``samples`` sorted values (the official rule)."""
    pz = (1.0 - confidence) / 2.0
    return math.floor(pz * samples), math.floor((1.0 - pz) * samples)


def _bootstrap(p: _Prepared, samples: int, seed: int, confidence: float) -> BootstrapResult:
    """Scan-level bootstrap with multiplicity weights (see the module docstring)."""
    resampled = _resampled_frocs(p, _draws(p.n_scans, samples, seed))
    return _bootstrap_statistics(*resampled, seed=seed, confidence=confidence)


def _bootstrap_statistics(
    curves: np.ndarray, at_rates: np.ndarray, cpms: np.ndarray, seed: int, confidence: float
) -> BootstrapResult:
    """Mean curve, percentile band and intervals of resampled FROCs (:func:`_resampled_frocs`)."""
    samples = len(cpms)
    grid = np.linspace(FROC_MIN_FPS, FROC_MAX_FPS, num=BOOTSTRAP_GRID_POINTS)
    lo_i, hi_i = _percentile_indices(samples, confidence)
    by_point = np.sort(np.ascontiguousarray(curves.T), axis=1)
    mean = by_point.mean(axis=1)
    cpm_sorted = np.sort(cpms)
    rates_sorted = np.sort(at_rates, axis=0)
    return BootstrapResult(
        samples=samples,
        seed=seed,
        fps=grid,
        mean=mean,
        lower=by_point[:, lo_i].copy(),
        upper=by_point[:, hi_i].copy(),
        cpm_samples=cpms,
        cpm_mean=float(np.mean(cpms)),
        cpm_ci=(float(cpm_sorted[lo_i]), float(cpm_sorted[hi_i])),
        sensitivity_ci=np.stack([rates_sorted[lo_i], rates_sorted[hi_i]], axis=1),
        confidence=confidence,
    )


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _cap_value(cap: bool | int | None) -> int | None:
    if cap is None or cap is False:
        return None
    if cap is True:
        return MAX_MARKS_PER_SCAN
    if int(cap) <= 0:
        return None
    return int(cap)


def _check_finite(table: PointTable, name: str, values: np.ndarray) -> None:
    """Tables built in memory skip the readers' checks: refuse NaN / infinite values here."""
    bad = ~np.isfinite(values)
    if bad.ndim > 1:
        bad = bad.any(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise LungCTError(
            table.path, f"row {row} (series {table.uid_of(row)!r}): {name} is NaN or infinite"
        )


def _scan_lookup(seriesuids: Sequence[str]) -> dict[str, int]:
    lookup: dict[str, int] = {}
    for i, uid in enumerate(seriesuids):
        if uid in lookup:
            raise LungCTError(None, f"series list: seriesuid {uid!r} appears twice")
        lookup[uid] = i
    if not lookup:
        raise LungCTError(None, "series list is empty")
    return lookup


def evaluate(
    annotations: AnnotationTable,
    excluded: AnnotationTable | None,
    seriesuids: Sequence[str],
    results: ResultTable,
    cap: bool | int | None = True,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
    label: str = "CAD",
) -> EvaluationResult:
    """Evaluate a CAD submission exactly as the official LUNA16 script does.

    Args:
        annotations: the nodules (annotations.csv).
        excluded: irrelevant findings (annotations_excluded.csv), or ``None``.
        seriesuids: the scans evaluated; rows of other series are counted and left out.
        results: the marks (``seriesuid, x, y, z, probability``).
        cap: ``True`` for the official 100 marks per scan, an int for another cap, ``False`` /
            ``None`` for none (candidate-stage mode: also fills ``candidate_stage``).
        bootstrap: number of bootstrap resamples of scans (0 = none).
        seed: seed of the bootstrap's ``numpy.random.RandomState``.
        confidence: level of the bootstrap intervals.
        label: name of the system, for figures.

    Raises:
        LungCTError: empty or duplicated series list, no nodule in the listed scans.
    """
    if bootstrap < 0:
        raise LungCTError(None, f"bootstrap must be >= 0, got {bootstrap}")
    result, prepared = _evaluate(annotations, excluded, seriesuids, results, cap, label)
    if bootstrap:
        result.bootstrap = _bootstrap(prepared, bootstrap, seed, confidence)
    return result


def _evaluate(
    annotations: AnnotationTable,
    excluded: AnnotationTable | None,
    seriesuids: Sequence[str],
    results: ResultTable,
    cap: bool | int | None,
    label: str,
) -> tuple[EvaluationResult, _Prepared]:
    """:func:`evaluate` without the bootstrap; also returns the sorted ROC entries that a
    bootstrap resamples."""
    _check_finite(results, "coords", results.coords)
    _check_finite(results, "probability", results.probability)
    for table in (annotations, excluded):
        if table is not None:
            _check_finite(table, "coords", table.coords)
            _check_finite(table, "diameter_mm", table.diameter_mm)
    lookup = _scan_lookup(seriesuids)
    n_scans = len(lookup)
    cap_n = _cap_value(cap)

    # Nodules and excluded findings of the listed scans.
    a_scan = _scan_index(annotations, lookup)
    a_rows = np.flatnonzero(a_scan >= 0)
    nod_scan = a_scan[a_rows]
    nod_xyz = annotations.coords[a_rows]
    nod_diam = annotations.diameter_mm[a_rows]
    if len(nod_scan) == 0:
        raise LungCTError(
            annotations.path, "no nodule in the listed scans: sensitivity is undefined"
        )
    if excluded is not None and len(excluded):
        e_scan = _scan_index(excluded, lookup)
        e_rows = np.flatnonzero(e_scan >= 0)
        exc_scan, exc_xyz, exc_diam = (
            e_scan[e_rows],
            excluded.coords[e_rows],
            excluded.diameter_mm[e_rows],
        )
    else:
        exc_scan, exc_xyz, exc_diam = np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0)

    # Marks of the listed scans, capped.
    r_scan = _scan_index(results, lookup)
    known = r_scan >= 0
    unknown_rows = int(len(r_scan) - known.sum())
    unknown_series = int(sum(1 for uid in results.uids if uid not in lookup))
    m_scan = r_scan[known]
    m_xyz = results.coords[known]
    m_prob = results.probability[known]
    scans_without_marks = int(n_scans - len(np.unique(m_scan)))
    n_before_cap = len(m_scan)
    if cap_n is not None:
        keep = _cap_marks(m_scan, m_prob, n_scans, cap_n)
        m_scan, m_xyz, m_prob = m_scan[keep], m_xyz[keep], m_prob[keep]

    on_nodule, best, hits = _match(
        m_scan, m_xyz, m_prob, nod_scan, nod_xyz, _radius_squared(nod_diam), n_scans
    )
    on_excluded, _, _ = _match(
        m_scan, m_xyz, m_prob, exc_scan, exc_xyz, _radius_squared(exc_diam), n_scans
    )
    detected = hits > 0
    is_fp = ~on_nodule & ~on_excluded

    entry_prob = np.concatenate((best[detected], m_prob[is_fp]))
    entry_tp = np.concatenate((np.ones(int(detected.sum())), np.zeros(int(is_fp.sum()))))
    entry_scan = np.concatenate((nod_scan[detected], m_scan[is_fp]))
    prepared = _prepare(entry_prob, entry_tp, entry_scan, nod_scan, n_scans)
    fps, sens, thresholds = _full_froc(prepared)
    cpm, at = _cpm(fps, sens)

    table = NoduleOutcomes(
        seriesuids=np.asarray(annotations.seriesuids[a_rows], dtype=object),
        coords=nod_xyz,
        diameter_mm=nod_diam,
        detected=detected,
        probability=np.where(detected, best, np.nan),
        marks=hits,
    )
    result = EvaluationResult(
        cpm=cpm,
        sensitivities=at,
        froc_fps=fps,
        froc_sens=sens,
        froc_thresholds=thresholds,
        nodules=len(nod_scan),
        detected=int(detected.sum()),
        scans=n_scans,
        marks=len(m_scan),
        false_positives=int(is_fp.sum()),
        ignored_excluded=int((~on_nodule & on_excluded).sum()),
        double_detections=int((hits[detected] - 1).sum()),
        marks_dropped_by_cap=n_before_cap - len(m_scan),
        unknown_series_rows=unknown_rows,
        unknown_series=unknown_series,
        scans_without_marks=scans_without_marks,
        cap=cap_n,
        nodule_table=table,
        label=label,
    )
    if cap_n is None:
        result.candidate_stage = _candidate_curve(m_prob, table, n_scans)
    return result, prepared


def evaluate_files(
    annotations: str | os.PathLike,
    excluded: str | os.PathLike | None,
    seriesuids: str | os.PathLike,
    results: str | os.PathLike,
    cap: bool | int | None = True,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
    label: str | None = None,
) -> EvaluationResult:
    """:func:`evaluate` on files: annotations.csv, annotations_excluded.csv (or ``None``),
    seriesuids.csv (no header) and a results CSV.

    The label defaults to the results file's stem. Raises :class:`LungCTError` on bad input.
    """
    uids = read_seriesuids(seriesuids)
    ann = read_annotations(annotations)
    exc = read_annotations(excluded, allow_negative_diameter=True) if excluded else None
    res = read_results(results)
    return evaluate(
        ann,
        exc,
        uids,
        res,
        cap=cap,
        bootstrap=bootstrap,
        seed=seed,
        confidence=confidence,
        label=label if label is not None else Path(results).stem,
    )


def _candidate_curve(prob: np.ndarray, table: NoduleOutcomes, n_scans: int) -> CandidateStageResult:
    """Sensitivity against candidates per scan as a probability threshold rises."""
    n_nod = len(table)
    detected = int(table.detected.sum())
    if len(prob):
        desc = np.sort(prob)[::-1]
        last = np.flatnonzero(np.concatenate((desc[1:] != desc[:-1], [True])))
        thresholds = desc[last]
        kept = (last + 1).astype(np.float64)
        best = np.sort(table.probability[table.detected])  # ascending
        found = len(best) - np.searchsorted(best, thresholds, side="left")
        curve_c = kept / n_scans
        curve_s = found / n_nod if n_nod else np.zeros(len(found))
    else:
        thresholds = np.zeros(0)
        curve_c = np.zeros(0)
        curve_s = np.zeros(0)
    return CandidateStageResult(
        sensitivity=detected / n_nod if n_nod else 0.0,
        candidates_per_scan=len(prob) / n_scans,
        candidates=len(prob),
        nodules=n_nod,
        detected=detected,
        scans=n_scans,
        curve_candidates_per_scan=curve_c,
        curve_sensitivity=np.asarray(curve_s, dtype=np.float64),
        curve_thresholds=thresholds,
        nodule_table=table,
    )


def candidate_sensitivity(
    annotations: AnnotationTable,
    candidates: PointTable,
    seriesuids: Sequence[str],
) -> CandidateStageResult:
    """Judge a candidate set: sensitivity (hit = within the radius) against candidates per scan.

    No cap and no exclusion apply. ``candidates`` is a :class:`ResultTable` or a
    :class:`CandidateTable`; without probabilities every candidate counts as probability 1,
    so the curve has one point.
    """
    lookup = _scan_lookup(seriesuids)
    n_scans = len(lookup)
    a_scan = _scan_index(annotations, lookup)
    a_rows = np.flatnonzero(a_scan >= 0)
    c_scan = _scan_index(candidates, lookup)
    c_rows = np.flatnonzero(c_scan >= 0)
    prob = getattr(candidates, "probability", None)
    prob = np.ones(len(candidates)) if prob is None else prob
    c_prob = prob[c_rows]
    _, best, hits = _match(
        c_scan[c_rows],
        candidates.coords[c_rows],
        c_prob,
        a_scan[a_rows],
        annotations.coords[a_rows],
        _radius_squared(annotations.diameter_mm[a_rows]),
        n_scans,
    )
    detected = hits > 0
    table = NoduleOutcomes(
        seriesuids=np.asarray(annotations.seriesuids[a_rows], dtype=object),
        coords=annotations.coords[a_rows],
        diameter_mm=annotations.diameter_mm[a_rows],
        detected=detected,
        probability=np.where(detected, best, np.nan),
        marks=hits,
    )
    return _candidate_curve(c_prob, table, n_scans)


def label_candidates(annotations: AnnotationTable, candidates: PointTable) -> np.ndarray:
    """Class of every candidate: 1 when it hits an annotation of its series, else 0 (int8).

    The hit rule is the evaluation's: squared distance < (diameter / 2) ** 2, a negative
    diameter counting as 10 mm. Series are matched by UID; no series list is needed.
    """
    lookup = {uid: i for i, uid in enumerate(dict.fromkeys([*candidates.uids, *annotations.uids]))}
    n = len(lookup)
    c_scan = _scan_index(candidates, lookup)
    a_scan = _scan_index(annotations, lookup)
    hit, _, _ = _match(
        c_scan,
        candidates.coords,
        np.zeros(len(candidates)),
        a_scan,
        annotations.coords,
        _radius_squared(annotations.diameter_mm),
        n,
    )
    return hit.astype(np.int8)


# ----------------------------------------------------------------------------------------------
# Figures and files
# ----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class FrocCurve:
    """A FROC to draw: points, and optionally a bootstrap band on a grid."""

    fps: np.ndarray
    sens: np.ndarray
    label: str = "CAD"
    cpm: float | None = None
    band_fps: np.ndarray | None = None
    band_lower: np.ndarray | None = None
    band_upper: np.ndarray | None = None
    band_mean: np.ndarray | None = None
    cpm_ci: tuple[float, float] | None = None
    confidence: float = 0.95


def _as_curve(item: Any, label: str | None) -> FrocCurve:
    if isinstance(item, FrocCurve):
        curve = item
    elif isinstance(item, EvaluationResult):
        bs = item.bootstrap
        curve = FrocCurve(
            fps=item.froc_fps,
            sens=item.froc_sens,
            label=item.label,
            cpm=item.cpm,
            band_fps=None if bs is None else bs.fps,
            band_lower=None if bs is None else bs.lower,
            band_upper=None if bs is None else bs.upper,
            band_mean=None if bs is None else bs.mean,
            cpm_ci=None if bs is None else bs.cpm_ci,
            confidence=0.95 if bs is None else bs.confidence,
        )
    else:
        fps, sens = item
        fps = np.asarray(fps, dtype=np.float64)
        sens = np.asarray(sens, dtype=np.float64)
        curve = FrocCurve(fps=fps, sens=sens, cpm=_cpm(fps, sens)[0])
    if label is not None:
        curve = FrocCurve(**{**curve.__dict__, "label": label})
    return curve


def plot_froc(
    results_or_curves: EvaluationResult | FrocCurve | Sequence[Any],
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    title: str | None = "FROC",
    dpi: int = 150,
) -> list[str]:
    """Draw one or several FROC curves (log2 x axis 1/8..8, sensitivity 0..1), atomically.

    Args:
        results_or_curves: an :class:`EvaluationResult`, a :class:`FrocCurve`, an
            ``(fps, sens)`` pair, or a sequence of these to overlay (ablations).
        path: the image file (its suffix picks the format: .png, .pdf, .svg).
        labels: legend names, overriding the results' own labels.
        title: figure title (``None`` for none).
        dpi: resolution of raster output.

    Each curve is drawn with its CPM in the legend, dots at the seven CPM operating points
    and, when bootstrapped, the mean curve (dashed) and the percentile band (shaded), both in
    the curve's colour; the legend names every one of these.

    Returns:
        The legend's entries, top to bottom.
    """
    import matplotlib
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    items: list[Any]
    if isinstance(results_or_curves, (EvaluationResult, FrocCurve)) or (
        isinstance(results_or_curves, tuple)
        and len(results_or_curves) == 2
        and np.ndim(results_or_curves[0]) == 1
    ):
        items = [results_or_curves]
    else:
        items = list(results_or_curves)
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"{len(labels)} labels for {len(items)} curves")
    curves = [_as_curve(it, None if labels is None else labels[i]) for i, it in enumerate(items)]

    fig = new_figure((6.4, 4.8))
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    banded = [c for c in curves if c.band_fps is not None]
    # One curve: its own band and mean are the legend's entries. Several: a grey key for each.
    own_key = len(curves) == 1 and len(banded) == 1
    for i, c in enumerate(curves):
        colour = colours[i % len(colours)]
        name = c.label
        if c.cpm is not None:
            name += f": CPM {c.cpm:.3f}"
        if c.cpm_ci is not None:
            name += f" ({c.confidence:.0%} CI {c.cpm_ci[0]:.3f}-{c.cpm_ci[1]:.3f})"
        ax.plot([], [], color=colour, lw=2, label=name)  # the curve's entry comes first
        if c.band_fps is not None:
            ax.fill_between(
                c.band_fps,
                c.band_lower,
                c.band_upper,
                color=colour,
                alpha=0.15,
                linewidth=0,
                label=f"{c.confidence:.0%} bootstrap band" if own_key else None,
            )
            if c.band_mean is not None:
                ax.plot(
                    c.band_fps,
                    c.band_mean,
                    color=colour,
                    ls="--",
                    lw=1,
                    label="bootstrap mean" if own_key else None,
                )
        # The curve on the plotted range: the ROC points plus the interpolated ends.
        inside = (c.fps > FROC_MIN_FPS) & (c.fps < FROC_MAX_FPS)
        xs = np.concatenate(([FROC_MIN_FPS], c.fps[inside], [FROC_MAX_FPS]))
        ys = np.concatenate(
            (
                np.interp([FROC_MIN_FPS], c.fps, c.sens),
                c.sens[inside],
                np.interp([FROC_MAX_FPS], c.fps, c.sens),
            )
        )
        ax.plot(xs, ys, color=colour, lw=2)
        ax.plot(FP_RATES, np.interp(FP_RATES, c.fps, c.sens), "o", color=colour, ms=4)
    ax.set_xscale("log", base=2)
    ax.set_xlim(FROC_MIN_FPS, FROC_MAX_FPS)
    ax.set_ylim(0, 1)
    ax.xaxis.set_major_locator(FixedLocator(FP_RATES))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels(["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.set_yticks(np.linspace(0, 1, 11))
    ax.grid(True, which="major", alpha=0.4)
    ax.set_xlabel("Average number of false positives per scan")
    ax.set_ylabel("Sensitivity")
    if title:
        ax.set_title(title)
    if banded and not own_key:
        levels = sorted({f"{c.confidence:.0%}" for c in banded})
        ax.fill_between(
            [],
            [],
            [],
            color="grey",
            alpha=0.15,
            label=f"{'/'.join(levels)} bootstrap band (in the curve's colour)",
        )
        ax.plot([], [], color="grey", ls="--", lw=1, label="bootstrap mean (in the curve's colour)")
    ax.plot([], [], "o", color="grey" if len(curves) > 1 else colours[0], ms=4,
            label="sensitivity at 1/8 ... 8 FPs/scan")  # fmt: skip
    legend = ax.legend(loc="lower right", fontsize=8)
    entries = [t.get_text() for t in legend.get_texts()]
    fig.tight_layout()
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower() or "png"
    write_figure_atomic(fig, target, format=fmt, dpi=dpi)
    return entries


def plot_candidate_curve(
    results: CandidateStageResult | Sequence[CandidateStageResult],
    path: str | os.PathLike,
    labels: Sequence[str] | None = None,
    title: str | None = "Candidate stage",
) -> None:
    """Draw sensitivity against candidates per scan (log x axis), atomically."""

    items = [results] if isinstance(results, CandidateStageResult) else list(results)
    fig = new_figure((6.4, 4.8))
    ax = fig.subplots()
    for i, r in enumerate(items):
        name = labels[i] if labels is not None else f"candidates {i + 1}"
        name += f"  sens {r.sensitivity:.3f} @ {r.candidates_per_scan:.1f}/scan"
        if len(r.curve_candidates_per_scan):
            ax.plot(r.curve_candidates_per_scan, r.curve_sensitivity, lw=2, label=name)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_yticks(np.linspace(0, 1, 11))
    ax.grid(True, which="both", alpha=0.3)
    ax.set_xlabel("Candidates per scan")
    ax.set_ylabel("Sensitivity")
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    target = Path(path)
    write_figure_atomic(fig, target, format=target.suffix.lstrip(".").lower() or "png", dpi=150)


OUTPUT_MARKER = "metrics.json"
"""The file :func:`write_outputs` publishes last: an evaluation folder without it is incomplete."""

OPTIONAL_OUTPUTS = ("froc_bootstrap.csv", "candidates.csv", "candidates.png")
"""Outputs only some evaluations write; an earlier run's copies are removed when a new run
publishes without them, so every file in the folder belongs to the same run."""


def write_outputs(result: EvaluationResult, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``metrics.json``, ``froc.csv``, ``froc.png``, ``nodules.csv`` (and, when present,
    ``froc_bootstrap.csv``, ``candidates.csv`` and ``candidates.png``) into ``out_dir``.

    The files are written and checked in a staging folder and published together, with
    ``metrics.json`` last (:func:`lungct.fileio.staged_outputs`): a failed write (full disk,
    read-only folder) leaves an earlier evaluation in ``out_dir`` as it was, never a mix.

    Returns the metrics dict.
    """
    metrics = result.to_json()
    with staged_outputs(out_dir, OUTPUT_MARKER, stale=OPTIONAL_OUTPUTS) as out:
        write_csv_atomic(
            out / "froc.csv",
            ("fps_per_scan", "sensitivity", "threshold"),
            zip(
                result.froc_fps.tolist(),
                result.froc_sens.tolist(),
                result.froc_thresholds.tolist(),
                strict=True,
            ),
        )
        if result.bootstrap is not None:
            bs = result.bootstrap
            write_csv_atomic(
                out / "froc_bootstrap.csv",
                ("fps_per_scan", "sensitivity_mean", "sensitivity_lower", "sensitivity_upper"),
                zip(
                    bs.fps.tolist(),
                    bs.mean.astype(float).tolist(),
                    bs.lower.astype(float).tolist(),
                    bs.upper.astype(float).tolist(),
                    strict=True,
                ),
            )
        result.nodule_table.to_csv(out / "nodules.csv")
        plot_froc(result, out / "froc.png", title=f"FROC - {result.label}")
        if result.candidate_stage is not None:
            cs = result.candidate_stage
            write_csv_atomic(
                out / "candidates.csv",
                ("candidates_per_scan", "sensitivity", "threshold"),
                zip(
                    cs.curve_candidates_per_scan.tolist(),
                    cs.curve_sensitivity.tolist(),
                    cs.curve_thresholds.tolist(),
                    strict=True,
                ),
            )
            plot_candidate_curve(cs, out / "candidates.png", labels=[result.label])
        write_json_atomic(out / OUTPUT_MARKER, metrics)
    return metrics


def metrics_line(metrics: dict[str, Any]) -> str:
    """The metrics as one JSON line (what the CLI prints last)."""
    return json.dumps(metrics, separators=(", ", ": "))
