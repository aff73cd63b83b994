"""Paired comparison of CAD submissions on the same scans: CPM differences that can rank.

Two systems evaluated on the same test scans are not independent: a scan full of hard nodules
lowers both. Bootstrapping each system on its own resamples ignores that, and the interval of
their difference comes out too wide to rank anything. Here every submission is scored on the
*same* resampled scans in every bootstrap round (the draws of :func:`integration.evaluate` with
the same seed, so each system's own interval is the one ``evaluate`` reports), and the CPM
difference to the reference is taken round by round:

- ``cpm_difference``: the observed CPM of the system minus the reference's;
- ``ci``: the percentile interval of the paired differences (the official percentile rule);
- ``p_value``: two-sided bootstrap p-value of "no difference": twice the smaller share of the
  paired differences on either side of 0, ``(count + 1) / (B + 1)`` so that it is never 0;
- ``unpaired_ci``: the interval the same difference gets when the two systems are resampled
  independently (the system on the draws of ``seed + 1``), for comparison: it is what one
  would conclude from two separate ``evaluate`` runs.

Sensitivity differences at the seven CPM operating points get paired intervals too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from integration.evaluation import (
    FP_RATE_KEYS,
    EvaluationResult,
    _bootstrap_statistics,
    _draws,
    _evaluate,
    _percentile_indices,
    _resampled_frocs,
    plot_froc,
)
from lungct.errors import LungCTError
from lungct.fileio import staged_outputs, write_json_atomic
from lungct.tables import (
    AnnotationTable,
    ResultTable,
    read_annotations,
    read_results,
    read_seriesuids,
    write_csv_atomic,
)

COMPARISON_MARKER = "comparison.json"
"""The file :func:`write_comparison` publishes last."""


@dataclass(eq=False)
class PairedDifference:
    """One system against the reference, scored on the same resampled scans.

    Attributes:
        label, reference: the system and the reference it is compared with.
        cpm_difference: observed CPM of ``label`` minus that of ``reference``.
        ci: paired bootstrap interval of the difference.
        p_value: two-sided bootstrap p-value of no difference.
        unpaired_ci: the interval from independent resamples of the two systems.
        sensitivity_difference: ``(7,)`` observed differences at the CPM operating points.
        sensitivity_ci: ``(7, 2)`` their paired intervals.
        samples, seed, confidence: the bootstrap's settings.
    """

    label: str
    reference: str
    cpm_difference: float
    ci: tuple[float, float]
    p_value: float
    unpaired_ci: tuple[float, float]
    sensitivity_difference: np.ndarray
    sensitivity_ci: np.ndarray
    samples: int
    seed: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the paired interval lies wholly on one side of 0."""
        return self.ci[0] > 0.0 or self.ci[1] < 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "reference": self.reference,
            "cpm_difference": float(self.cpm_difference),
            "ci": [float(self.ci[0]), float(self.ci[1])],
            "p_value": float(self.p_value),
            "unpaired_ci": [float(self.unpaired_ci[0]), float(self.unpaired_ci[1])],
            "excludes_zero": self.excludes_zero,
            "sensitivity_difference": {
                k: float(v) for k, v in zip(FP_RATE_KEYS, self.sensitivity_difference, strict=True)
            },
            "sensitivity_ci": {
                k: [float(lo), float(hi)]
                for k, (lo, hi) in zip(FP_RATE_KEYS, self.sensitivity_ci, strict=True)
            },
        }


@dataclass(eq=False)
class Comparison:
    """Several submissions on the same scans, each against the reference.

    Attributes:
        results: every submission's evaluation, bootstrapped on the shared resamples.
        reference: index of the reference in ``results``.
        differences: one :class:`PairedDifference` per other submission, in input order.
    """

    results: list[EvaluationResult]
    reference: int
    differences: list[PairedDifference]

    def to_json(self) -> dict[str, Any]:
        first = self.results[0]
        bs = first.bootstrap
        return {
            "reference": self.results[self.reference].label,
            "scans": first.scans,
            "nodules": first.nodules,
            "bootstrap": None if bs is None else bs.samples,
            "seed": None if bs is None else bs.seed,
            "confidence": None if bs is None else bs.confidence,
            "systems": [
                {
                    "label": r.label,
                    "cpm": float(r.cpm),
                    "cpm_ci": None
                    if r.bootstrap is None
                    else [float(r.bootstrap.cpm_ci[0]), float(r.bootstrap.cpm_ci[1])],
                    "detected": r.detected,
                    "false_positives": r.false_positives,
                }
                for r in self.results
            ],
            "differences": [d.to_json() for d in self.differences],
        }

    def table(self) -> str:
        """A plain-text table: one line per system, its CPM and interval, and its difference to
        the reference with the paired interval, the p-value and the unpaired interval."""
        ref = self.results[self.reference]
        level = round(100 * self.differences[0].confidence) if self.differences else 95
        width = max(len("system"), *(len(r.label) for r in self.results))
        diff_head = f"CPM - {ref.label}"
        dw = max(9, len(diff_head))
        head = (
            f"{'system':<{width}}  {'CPM':>6}  {f'{level}% CI':<11}  {diff_head:>{dw}}  "
            f"{f'paired {level}% CI':<17}  {'p':>6}  unpaired {level}% CI"
        )
        lines = [head]
        by_label = {d.label: d for d in self.differences}
        for i, r in enumerate(self.results):
            bs = r.bootstrap
            ci = f"{bs.cpm_ci[0]:.3f}-{bs.cpm_ci[1]:.3f}" if bs is not None else ""
            line = f"{r.label:<{width}}  {r.cpm:6.4f}  {ci:<11}"
            if i == self.reference:
                line += f"  {'reference':>{dw}}"
            else:
                d = by_label[r.label]
                line += (
                    f"  {d.cpm_difference:+{dw}.4f}  {d.ci[0]:+.3f} to {d.ci[1]:+.3f}  "
                    f"{d.p_value:6.4f}  {d.unpaired_ci[0]:+.3f} to {d.unpaired_ci[1]:+.3f}"
                )
            lines.append(line)
        return "\n".join(lines)


def _two_sided_p(differences: np.ndarray) -> float:
    below = int(np.count_nonzero(differences <= 0.0))
    above = int(np.count_nonzero(differences >= 0.0))
    return min(1.0, 2.0 * (min(below, above) + 1) / (len(differences) + 1))


def compare(
    annotations: AnnotationTable,
    excluded: AnnotationTable | None,
    seriesuids: Sequence[str],
    submissions: Sequence[ResultTable],
    labels: Sequence[str] | None = None,
    reference: int = 0,
    cap: bool | int | None = True,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Comparison:
    """Compare submissions on the same scans with a paired bootstrap (see the module doc).

    Args:
        annotations, excluded, seriesuids: the test set, as for :func:`integration.evaluate`.
        submissions: two or more results tables.
        labels: one name per submission (default ``system 1``, ``system 2``, ...).
        reference: index of the submission the others are compared with.
        cap: the marks-per-scan cap, as for :func:`integration.evaluate`.
        bootstrap: resamples of the scans (at least 1).
        seed: seed of the shared draws (the reference and each system use the same draws).
        confidence: level of every interval.

    Raises:
        LungCTError: fewer than two submissions, duplicate labels, a bad reference or
            bootstrap count, or what :func:`integration.evaluate` refuses.
    """
    if len(submissions) < 2:
        raise LungCTError(None, f"compare needs two or more submissions, got {len(submissions)}")
    names = (
        list(labels) if labels is not None else [f"system {i + 1}" for i in range(len(submissions))]
    )
    if len(names) != len(submissions):
        raise LungCTError(None, f"{len(names)} labels for {len(submissions)} submissions")
    if len(set(names)) != len(names):
        raise LungCTError(None, f"labels must differ, got {names}")
    if not 0 <= reference < len(submissions):
        raise LungCTError(None, f"reference {reference} is not one of 0..{len(submissions) - 1}")
    if bootstrap < 1:
        raise LungCTError(None, f"a paired comparison needs bootstrap >= 1, got {bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise LungCTError(None, f"confidence must be between 0 and 1, got {confidence}")

    evaluated = [
        _evaluate(annotations, excluded, seriesuids, table, cap, name)
        for table, name in zip(submissions, names, strict=True)
    ]
    n_scans = evaluated[0][0].scans
    shared = _draws(n_scans, bootstrap, seed)
    others = _draws(n_scans, bootstrap, seed + 1)
    resampled = [_resampled_frocs(prepared, shared) for _, prepared in evaluated]
    results = []
    for (result, _), frocs in zip(evaluated, resampled, strict=True):
        result.bootstrap = _bootstrap_statistics(*frocs, seed=seed, confidence=confidence)
        results.append(result)

    lo_i, hi_i = _percentile_indices(bootstrap, confidence)
    ref_result = results[reference]
    _, ref_rates, ref_cpms = resampled[reference]
    differences = []
    for i, result in enumerate(results):
        if i == reference:
            continue
        _, rates, cpms = resampled[i]
        paired = cpms - ref_cpms
        _, _, independent = _resampled_frocs(evaluated[i][1], others)
        unpaired = np.sort(independent - ref_cpms)
        rate_diff = np.sort(rates - ref_rates, axis=0)
        paired_sorted = np.sort(paired)
        differences.append(
            PairedDifference(
                label=result.label,
                reference=ref_result.label,
                cpm_difference=float(result.cpm - ref_result.cpm),
                ci=(float(paired_sorted[lo_i]), float(paired_sorted[hi_i])),
                p_value=_two_sided_p(paired),
                unpaired_ci=(float(unpaired[lo_i]), float(unpaired[hi_i])),
                sensitivity_difference=result.sensitivities - ref_result.sensitivities,
                sensitivity_ci=np.stack([rate_diff[lo_i], rate_diff[hi_i]], axis=1),
                samples=bootstrap,
                seed=seed,
                confidence=confidence,
            )
        )
    return Comparison(results=results, reference=reference, differences=differences)


def compare_files(
    annotations: str | os.PathLike,
    excluded: str | os.PathLike | None,
    seriesuids: str | os.PathLike,
    results: Sequence[str | os.PathLike],
    labels: Sequence[str] | None = None,
    reference: int = 0,
    cap: bool | int | None = True,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> Comparison:
    """:func:`compare` on files; the labels default to the results files' stems."""
    from pathlib import Path

    if labels is None:
        labels = [Path(r).stem for r in results]
        if len(set(labels)) != len(labels):
            labels = [str(r) for r in results]
    return compare(
        read_annotations(annotations),
        read_annotations(excluded, allow_negative_diameter=True) if excluded else None,
        read_seriesuids(seriesuids),
        [read_results(r) for r in results],
        labels=labels,
        reference=reference,
        cap=cap,
        bootstrap=bootstrap,
        seed=seed,
        confidence=confidence,
    )


def write_comparison(comparison: Comparison, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``comparison.json``, ``differences.csv`` and ``froc_compare.png`` (every system's
    FROC with its bootstrap band, overlaid) into ``out_dir``, published together with
    ``comparison.json`` last. Returns the JSON dict."""
    data = comparison.to_json()
    with staged_outputs(out_dir, COMPARISON_MARKER) as out:
        write_csv_atomic(
            out / "differences.csv",
            (
                "label",
                "reference",
                "cpm_difference",
                "ci_lower",
                "ci_upper",
                "p_value",
                "unpaired_ci_lower",
                "unpaired_ci_upper",
            ),
            [
                [
                    d.label,
                    d.reference,
                    d.cpm_difference,
                    d.ci[0],
                    d.ci[1],
                    d.p_value,
                    d.unpaired_ci[0],
                    d.unpaired_ci[1],
                ]
                for d in comparison.differences
            ],
        )
        plot_froc(
            comparison.results,
            out / "froc_compare.png",
            title=f"FROC - each against {comparison.results[comparison.reference].label}",
        )
        write_json_atomic(out / COMPARISON_MARKER, data)
    return data
