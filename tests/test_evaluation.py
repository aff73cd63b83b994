"""Tests of integration.evaluation: the exact LUNA16 FROC / CPM, bootstrap and candidate mode.

Three kinds of check:

- hand-built cases whose FROC and CPM are worked out on paper in the comments;
- property tests (hypothesis): row order does not matter; a mark far from every finding never
  raises the sensitivity at a fixed FP rate;
- exactness: a slow, literal, loop-based reference written here step by step after the rules of
  the official ``noduleCADEvaluationLUNA16.py`` (with ``sklearn.metrics.roc_curve``) against the
  vectorised implementation, on random submissions over the real 888-scan LUNA16 tables.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from integration.__main__ import main
from integration.evaluation import (
    FP_RATES,
    EvaluationResult,
    candidate_sensitivity,
    evaluate,
    evaluate_files,
    label_candidates,
    plot_froc,
    write_outputs,
)
from lungct.errors import LungCTError
from lungct.tables import AnnotationTable, CandidateTable, ResultTable

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
LUNA_CSV = SHARED / "data" / "real" / "luna16-csv"
needs_shared = pytest.mark.skipif(
    not SHARED.exists(), reason=f"shared data folder {SHARED} is absent (real LUNA16 tables)"
)

FAR = (500.0, 500.0, 500.0)


def scans(n: int) -> list[str]:
    return [f"s{i}" for i in range(n)]


def ann(*rows: tuple) -> AnnotationTable:
    return AnnotationTable.from_rows(rows)


def res(*rows: tuple) -> ResultTable:
    return ResultTable.from_rows(rows)


def far(uid: str, p: float, k: int = 0) -> tuple:
    """A false positive: far from everything (distinct positions so nothing coincides)."""
    return (uid, FAR[0] + 30 * k, FAR[1], FAR[2], p)


# ----------------------------------------------------------------------------------------------
# Hand-built cases (worked out on paper)
# ----------------------------------------------------------------------------------------------


def test_paper_case_eight_scans_with_step_on_an_operating_point() -> None:
    # 8 scans, 4 nodules of 10 mm at the origin of s0..s3. Marks by probability:
    #   .9 TP(s0)  .8 FP  .7 TP(s1)  .6 TP(s2)  .5 FP  .4 FP  .3 TP(s3)  .2 FP
    # cumulative (fp, tp) at each threshold: (0,1) (1,1) (1,2) (1,3) (2,3) (3,3) (3,4) (4,4);
    # drop_intermediate removes (1,2) and (2,3) (collinear, equal steps).
    # FPs/scan = fp/8, sensitivity = tp/4:
    #   (0,0) (0,.25) (.125,.25) (.125,.75) (.375,.75) (.375,1) (.5,1)
    # At 1/8 the operating point sits exactly on the vertical step: np.interp gives its top .75.
    # sensitivities: .75 .75 1 1 1 1 1 -> CPM = 6.5 / 7.
    a = ann(*[(f"s{i}", 0, 0, 0, 10) for i in range(4)])
    r = res(
        ("s0", 1, 0, 0, 0.9),
        far("s4", 0.8),
        ("s1", 0, 1, 0, 0.7),
        ("s2", 0, 0, 1, 0.6),
        far("s5", 0.5),
        far("s6", 0.4),
        ("s3", 0, 0, -1, 0.3),
        far("s7", 0.2),
    )
    out = evaluate(a, None, scans(8), r)
    np.testing.assert_allclose(out.froc_fps, [0, 0, 0.125, 0.125, 0.375, 0.375, 0.5])
    np.testing.assert_allclose(out.froc_sens, [0, 0.25, 0.25, 0.75, 0.75, 1, 1])
    np.testing.assert_allclose(out.sensitivities, [0.75, 0.75, 1, 1, 1, 1, 1])
    assert out.cpm == pytest.approx(6.5 / 7, abs=1e-15)
    assert (out.nodules, out.detected, out.false_positives, out.scans) == (4, 4, 4, 8)


def test_cap_with_ties_at_the_101st_mark() -> None:
    # s0: a nodule, 100 far FPs and the nodule's mark, all at p = .5 -> 101 marks; the 101st
    # probability is .5 and only marks strictly above it stay: none. s1: a nodule hit at .9.
    # One of two nodules detected, no false positive at all: sensitivity .5 everywhere.
    a = ann(("s0", 0, 0, 0, 10), ("s1", 0, 0, 0, 10))
    marks = [far("s0", 0.5, k) for k in range(100)] + [("s0", 1, 1, 1, 0.5), ("s1", 0, 0, 0, 0.9)]
    out = evaluate(a, None, scans(2), res(*marks))
    assert out.cpm == 0.5
    assert (out.detected, out.false_positives, out.marks_dropped_by_cap) == (1, 0, 101)
    # A cap of 100 keeps a scan with exactly 100 marks whole. With 99 FPs at .5 in s0:
    # (fp, tp): (0,1) at .9, (99,2) at .5 -> points (0,0) (0,.5) (49.5,1);
    # sensitivity at r = .5 + r/99 -> CPM = .5 + 15.875/693.
    out = evaluate(a, None, scans(2), res(*marks[1:]))
    assert out.marks_dropped_by_cap == 0
    assert out.cpm == pytest.approx(0.5 + 15.875 / 693, abs=1e-15)
    # Without the cap (candidate-stage mode) every mark counts.
    out = evaluate(a, None, scans(2), res(*marks), cap=False)
    assert out.detected == 2 and out.false_positives == 100 and out.cap is None
    # ... and a higher mark than the tie survives the cap on its own.
    marks[100] = ("s0", 1, 1, 1, 0.6)
    out = evaluate(a, None, scans(2), res(*marks))
    assert (out.detected, out.false_positives, out.marks) == (2, 0, 2)
    assert out.cpm == 1.0


def test_one_mark_on_two_nodules_detects_both() -> None:
    # Two 10 mm nodules 4 mm apart in s0; one mark between them at .8 hits both.
    # An FP at .9 in s1. (fp, tp): (1,0) at .9, (1,2) at .8 -> (0,0) (.5,0) (.5,1):
    # sensitivity 0 at 1/8 and 1/4, 1 from 1/2 on -> CPM 5/7.
    a = ann(("s0", 0, 0, 0, 10), ("s0", 4, 0, 0, 10))
    out = evaluate(a, None, scans(2), res(("s0", 2, 0, 0, 0.8), far("s1", 0.9)))
    assert out.detected == 2 and out.double_detections == 0
    np.testing.assert_allclose(out.sensitivities, [0, 0, 1, 1, 1, 1, 1])
    assert out.cpm == pytest.approx(5 / 7, abs=1e-15)
    np.testing.assert_array_equal(out.nodule_table.probability, [0.8, 0.8])


def test_marks_on_excluded_findings_are_ignored() -> None:
    # s0: a nodule at the origin; an excluded finding of unknown size (-1 -> 10 mm) at x=50.
    # A mark 4.9 mm from it (.95) is ignored, one 5.1 mm away (.94) is an FP, the nodule's
    # mark is at .5. (fp, tp): (1,0) (1,1) -> (0,0) (1,0) (1,1): sens 0 below 1 FP/scan.
    # CPM = 4/7.
    a = ann(("s0", 0, 0, 0, 10))
    e = ann(("s0", 50, 0, 0, -1))
    r = res(("s0", 54.9, 0, 0, 0.95), ("s0", 55.1, 0, 0, 0.94), ("s0", 0, 0, 0, 0.5))
    out = evaluate(a, e, scans(1), r)
    assert (out.ignored_excluded, out.false_positives, out.detected) == (1, 1, 1)
    np.testing.assert_allclose(out.sensitivities, [0, 0, 0, 1, 1, 1, 1])
    assert out.cpm == pytest.approx(4 / 7, abs=1e-15)
    # A mark on a nodule AND an excluded finding is the nodule's.
    e2 = ann(("s0", 1, 0, 0, 3))
    out = evaluate(a, e2, scans(1), res(("s0", 1, 0, 0, 0.7)))
    assert (out.detected, out.ignored_excluded, out.false_positives) == (1, 0, 0)


def test_hit_is_strictly_inside_the_radius() -> None:
    a = ann(("s0", 0, 0, 0, 10))
    out = evaluate(a, None, scans(1), res(("s0", 5, 0, 0, 0.9)))  # distance 5 = radius
    assert out.detected == 0 and out.false_positives == 1 and out.cpm == 0.0
    out = evaluate(a, None, scans(1), res(("s0", 4.999, 0, 0, 0.9)))
    assert out.detected == 1


def test_double_detections_keep_the_highest_probability() -> None:
    # Three marks on one nodule (.3, .7, .5): one TP at .7, two ignored. An FP at .6 in s1.
    # (0,0) (0,1) (.5,1) -> sensitivity 1 everywhere, CPM 1.
    a = ann(("s0", 0, 0, 0, 10))
    r = res(("s0", 1, 0, 0, 0.3), ("s0", 0, 1, 0, 0.7), ("s0", 0, 0, 1, 0.5), far("s1", 0.6))
    out = evaluate(a, None, scans(2), r)
    assert (out.detected, out.double_detections, out.false_positives) == (1, 2, 1)
    assert out.cpm == 1.0
    table = out.nodule_table
    assert table.probability[0] == 0.7 and table.marks[0] == 3 and table.detected[0]


def test_scans_without_marks_and_missed_nodules() -> None:
    # s0: nodule hit at .8, FP at .9; s1: nodule, no mark; s2: nothing. 3 scans, 2 nodules.
    # (0,0) (1/3,0) (1/3,.5): sensitivity 0 at 1/8 and 1/4, .5 from 1/2 -> CPM 2.5/7.
    a = ann(("s0", 0, 0, 0, 10), ("s1", 0, 0, 0, 10))
    out = evaluate(a, None, scans(3), res(("s0", 0, 0, 0, 0.8), far("s0", 0.9)))
    assert out.scans_without_marks == 2 and out.nodules == 2 and out.detected == 1
    assert out.cpm == pytest.approx(2.5 / 7, abs=1e-15)
    assert math.isnan(out.nodule_table.probability[1]) and not out.nodule_table.detected[1]


def test_system_without_false_positives() -> None:
    # One of two nodules found, no FP: the official branch puts every point at 0 FPs/scan,
    # so the sensitivity is .5 at every rate.
    a = ann(("s0", 0, 0, 0, 10), ("s1", 0, 0, 0, 10))
    out = evaluate(a, None, scans(2), res(("s0", 0, 0, 0, 0.9)))
    np.testing.assert_array_equal(out.froc_fps, 0.0)
    assert out.cpm == 0.5


def test_degenerate_inputs() -> None:
    a = ann(("s0", 0, 0, 0, 10))
    # No marks at all, only false positives: sensitivity 0 (the official script gives NaN).
    assert evaluate(a, None, scans(1), res()).cpm == 0.0
    assert evaluate(a, None, scans(1), res(far("s0", 0.5))).cpm == 0.0
    with pytest.raises(LungCTError, match="no nodule in the listed scans"):
        evaluate(a, None, ["other"], res())
    with pytest.raises(LungCTError, match="appears twice"):
        evaluate(a, None, ["s0", "s0"], res())


def test_unknown_series_rows_are_counted_not_used() -> None:
    a = ann(("s0", 0, 0, 0, 10), ("zz", 0, 0, 0, 10))  # a nodule outside the list is ignored
    r = res(("s0", 0, 0, 0, 0.9), ("zz", 0, 0, 0, 0.95), ("yy", 1, 1, 1, 0.5), ("yy", 2, 2, 2, 0.4))
    out = evaluate(a, None, scans(1), r)
    assert (out.unknown_series_rows, out.unknown_series, out.nodules) == (3, 2, 1)
    assert out.to_json()["unknown_series_rows"] == 3


def test_candidate_stage_mode_and_labels() -> None:
    a = ann(("s0", 0, 0, 0, 10), ("s1", 0, 0, 0, 10), ("s1", 30, 0, 0, 6))
    r = res(
        ("s0", 1, 0, 0, 0.2),
        far("s0", 0.9),
        far("s0", 0.8, 1),
        ("s1", 30, 1, 0, 0.7),
        far("s1", 0.1),
    )
    cs = candidate_sensitivity(a, r, scans(2))
    assert cs.sensitivity == pytest.approx(2 / 3) and cs.candidates_per_scan == 2.5
    # thresholds .9 .8 .7 .2 .1 -> candidates 1 2 3 4 5 (/2 scans), nodules found 0 0 1 2 2
    np.testing.assert_allclose(cs.curve_candidates_per_scan, [0.5, 1, 1.5, 2, 2.5])
    np.testing.assert_allclose(cs.curve_sensitivity, [0, 0, 1 / 3, 2 / 3, 2 / 3])
    assert cs.sensitivity_at(1.5) == pytest.approx(1 / 3)
    out = evaluate(a, None, scans(2), r, cap=False)
    metrics = out.to_json()
    assert metrics["candidate_sensitivity"] == pytest.approx(2 / 3)
    assert metrics["candidates_per_scan"] == 2.5
    labels = label_candidates(a, r)
    assert labels.dtype == np.int8
    np.testing.assert_array_equal(labels, [1, 0, 0, 1, 0])
    cands = CandidateTable(r.uids, r.series_index, r.coords)  # no probability: one point
    cs = candidate_sensitivity(a, cands, scans(2))
    assert len(cs.curve_sensitivity) == 1 and cs.sensitivity == pytest.approx(2 / 3)


def test_bootstrap_interval_contains_the_cpm_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    rows_a, rows_r = [], []
    for i in range(40):
        rows_a.append((f"s{i}", 0, 0, 0, 8))
        if rng.random() < 0.8:
            rows_r.append((f"s{i}", 1, 0, 0, float(rng.random())))
        rows_r.extend(far(f"s{i}", float(rng.random()) * 0.8, k) for k in range(3))
    a, r = ann(*rows_a), res(*rows_r)
    one = evaluate(a, None, scans(40), r, bootstrap=200, seed=7)
    two = evaluate(a, None, scans(40), r, bootstrap=200, seed=7)
    bs = one.bootstrap
    assert bs is not None
    assert bs.cpm_ci[0] <= one.cpm <= bs.cpm_ci[1]
    np.testing.assert_array_equal(bs.cpm_samples, two.bootstrap.cpm_samples)
    assert bs.mean.dtype == np.float32 and bs.fps[0] == 0.125 and bs.fps[-1] == 8
    assert (bs.lower <= bs.upper).all()
    assert one.to_json()["cpm_ci95"] == [bs.cpm_ci[0], bs.cpm_ci[1]]


# ----------------------------------------------------------------------------------------------
# Property tests
# ----------------------------------------------------------------------------------------------

PROB = st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.5, 0.7, 0.9, 0.95])  # many ties


@st.composite
def worlds(draw: st.DrawFn) -> tuple[AnnotationTable, AnnotationTable, list[str], list[tuple]]:
    n_scans = draw(st.integers(1, 6))
    uids = scans(n_scans)
    nodules = [
        (u, draw(st.integers(-3, 3)) * 6.0, 0.0, 0.0, draw(st.sampled_from([4.0, 8.0, 12.0])))
        for u in uids
        for _ in range(draw(st.integers(0, 2)))
    ]
    if not nodules:
        nodules = [(uids[0], 0.0, 0.0, 0.0, 10.0)]
    excluded = [
        (u, draw(st.integers(-3, 3)) * 6.0, 6.0, 0.0, draw(st.sampled_from([-1.0, 5.0])))
        for u in uids
        for _ in range(draw(st.integers(0, 1)))
    ]
    marks = [
        (
            draw(st.sampled_from(uids)),
            draw(st.integers(-4, 4)) * 3.0,
            draw(st.integers(0, 3)) * 2.0,
            0.0,
            draw(PROB),
        )
        for _ in range(draw(st.integers(0, 25)))
    ]
    return ann(*nodules), ann(*excluded), uids, marks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), data=st.data())
def test_row_order_does_not_matter(world, data) -> None:
    a, e, uids, marks = world
    perm = data.draw(st.permutations(marks))
    for cap in (True, 3):
        one = evaluate(a, e, uids, res(*marks), cap=cap)
        two = evaluate(a, e, uids, res(*perm), cap=cap)
        assert one.cpm == two.cpm
        np.testing.assert_array_equal(one.froc_fps, two.froc_fps)
        np.testing.assert_array_equal(one.froc_sens, two.froc_sens)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(world=worlds(), data=st.data())
def test_a_far_mark_never_raises_sensitivity(world, data) -> None:
    a, e, uids, marks = world
    extra = far(data.draw(st.sampled_from(uids)), data.draw(PROB))
    for cap in (True, 3):  # a cap of 3 also lets the new mark push marks out of a scan
        if cap == 3 and _tie_at_the_cut([m[4] for m in marks if m[0] == extra[0]] + [extra[4]], 3):
            continue  # the official cap then drops every tied mark: see the next test
        before = evaluate(a, e, uids, res(*marks), cap=cap)
        after = evaluate(a, e, uids, res(*marks, extra), cap=cap)
        assert (after.sensitivities <= before.sensitivities + 1e-12).all()
        assert after.cpm <= before.cpm + 1e-12


def _tie_at_the_cut(probabilities: list[float], cap: int) -> bool:
    ranked = sorted(probabilities, reverse=True)
    return len(ranked) > cap and ranked[cap - 1] == ranked[cap]


def test_the_official_cap_drops_every_mark_tied_at_the_cut() -> None:
    # The official script keeps the marks strictly above the (cap + 1)th probability, so
    # marks tied at the cut all go. A far false positive can then push three tied false
    # positives out of their scan and *raise* the sensitivity at low FP rates (hypothesis
    # found this case). The evaluation reproduces the official rule, quirk included.
    nodules = ann(("s2", 0.0, 0.0, 0.0, 4.0))
    uids = scans(3)
    marks = [("s0", 0.0, 0.0, 0.0, 0.1)] * 3 + [("s2", 0.0, 0.0, 0.0, 0.1)]
    before = evaluate(nodules, ann(), uids, res(*marks), cap=3)
    after = evaluate(nodules, ann(), uids, res(*marks, far("s0", 0.1)), cap=3)
    assert before.marks_dropped_by_cap == 0 and after.marks_dropped_by_cap == 4
    np.testing.assert_allclose(before.sensitivities, [0.125, 0.25, 0.5, 1, 1, 1, 1])
    np.testing.assert_allclose(after.sensitivities, 1.0)
    # Without the cap the far mark only adds a false positive.
    uncapped = evaluate(nodules, ann(), uids, res(*marks, far("s0", 0.1)), cap=False)
    assert (uncapped.sensitivities <= before.sensitivities).all()


# ----------------------------------------------------------------------------------------------
# Exactness against a literal reference of the official algorithm
# ----------------------------------------------------------------------------------------------


def reference_froc(gt, prob, n_images, excluded):
    """FROC of FROC lists, following the official computeFROC step by step."""
    from sklearn.metrics import roc_curve

    gt_local = [g for g, x in zip(gt, excluded, strict=True) if not x]
    prob_local = [p for p, x in zip(prob, excluded, strict=True) if not x]
    detected = sum(gt_local)
    lesions = sum(gt)
    candidates = len(prob_local)
    fpr, tpr, _ = roc_curve(gt_local, prob_local)
    if sum(gt) == len(gt):
        fps = np.zeros(len(fpr))
    else:
        fps = fpr * (candidates - detected) / n_images
    sens = (tpr * detected) / lesions
    return fps, sens


def reference_lists(uids, nodule_rows, excluded_rows, result_rows, cap=100):
    """The official per-scan, per-finding, per-mark loop, written out literally."""
    findings = {u: [] for u in uids}
    for row in nodule_rows:
        if row[0] in findings:
            findings[row[0]].append(("included", row))
    for row in excluded_rows:
        if row[0] in findings:
            findings[row[0]].append(("excluded", row))
    marks = {u: [] for u in uids}
    for row in result_rows:
        if row[0] in marks:
            marks[row[0]].append(row)
    gt, prob, scan_of, excluded = [], [], [], []
    for uid in uids:
        cands = marks[uid]
        if cap > 0 and len(cands) > cap:
            probs = sorted((float(c[4]) for c in cands), reverse=True)
            cut = probs[cap]
            cands = [c for c in cands if float(c[4]) > cut]
        remaining = set(range(len(cands)))
        for state, f in findings[uid]:
            diameter = float(f[4])
            if diameter < 0.0:
                diameter = 10.0
            radius2 = math.pow(diameter / 2.0, 2.0)
            matches = []
            for j, c in enumerate(cands):
                dist = (
                    math.pow(f[1] - c[1], 2.0)
                    + math.pow(f[2] - c[2], 2.0)
                    + math.pow(f[3] - c[3], 2.0)
                )
                if dist < radius2:
                    if state == "included":
                        matches.append(j)
                    remaining.discard(j)
            if state == "included":
                gt.append(1.0)
                scan_of.append(uid)
                if matches:
                    prob.append(max(float(cands[j][4]) for j in matches))
                    excluded.append(False)
                else:
                    prob.append(-1000000000.0)
                    excluded.append(True)
        for j in sorted(remaining):
            gt.append(0.0)
            prob.append(float(cands[j][4]))
            scan_of.append(uid)
            excluded.append(False)
    return gt, prob, scan_of, excluded


def reference_bootstrap(gt, prob, scan_of, excluded, uids, samples, seed):
    """The official bootstrap: global RNG, scans drawn with replacement, concatenated lists."""
    per_scan: dict[str, list[int]] = {}
    for i, s in enumerate(scan_of):
        per_scan.setdefault(s, []).append(i)
    np.random.seed(seed)  # noqa: NPY002 - the official script's global RNG
    grid = np.linspace(0.125, 8, num=10000)
    curves = np.zeros((samples, len(grid)), dtype="float32")
    uid_array = np.asarray(uids)
    for b in range(samples):
        draw = uid_array[np.random.randint(len(uids), size=len(uids))]  # noqa: NPY002
        idx = [i for u in draw if u in per_scan for i in per_scan[u]]
        fps, sens = reference_froc(
            [gt[i] for i in idx], [prob[i] for i in idx], len(uids), [excluded[i] for i in idx]
        )
        curves[b, :] = np.interp(grid, fps, sens)
    pz = (1.0 - 0.95) / 2.0
    mean = np.zeros(len(grid), dtype="float32")
    lower = np.zeros(len(grid), dtype="float32")
    upper = np.zeros(len(grid), dtype="float32")
    for i in range(len(grid)):
        vec = curves[:, i]
        vec.sort()
        mean[i] = np.average(vec)
        lower[i] = vec[math.floor(pz * len(vec))]
        upper[i] = vec[math.floor((1.0 - pz) * len(vec))]
    return mean, lower, upper


def reference_cpm(uids, nodule_rows, excluded_rows, result_rows, cap=100):
    gt, prob, _, excluded = reference_lists(uids, nodule_rows, excluded_rows, result_rows, cap)
    fps, sens = reference_froc(gt, prob, len(uids), excluded)
    return float(np.mean(np.interp(FP_RATES, fps, sens))), fps, sens


def read_rows(path: Path) -> list[tuple]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [(r[0], float(r[1]), float(r[2]), float(r[3]), float(r[4])) for r in rows]


@pytest.fixture(scope="module")
def luna():
    if not SHARED.exists():
        pytest.skip(f"shared data folder {SHARED} is absent (real LUNA16 tables)")
    uids = [line.strip() for line in (LUNA_CSV / "seriesuids.csv").read_text().splitlines()]
    uids = [u for u in uids if u]
    return (
        uids,
        read_rows(LUNA_CSV / "annotations.csv"),
        read_rows(LUNA_CSV / "annotations_excluded.csv"),
    )


def random_submission(seed, uids, nodules, excluded, marks=(40, 130), decimals=2, quality=0.5):
    """Random marks: some on nodules, some on excluded findings, the rest scattered."""
    rng = np.random.default_rng(seed)
    by_scan: dict[str, list] = {}
    for row in nodules:
        by_scan.setdefault(row[0], []).append((True, row))
    for row in excluded:
        by_scan.setdefault(row[0], []).append((False, row))
    rows = []
    for uid in uids:
        finds = by_scan.get(uid, [])
        centre = np.mean([f[1][1:4] for f in finds], axis=0) if finds else np.zeros(3)
        for _ in range(int(rng.integers(*marks))):
            if finds and rng.random() < 0.25:
                is_nodule, f = finds[int(rng.integers(len(finds)))]
                size = f[4] if f[4] > 0 else 10.0
                xyz = np.asarray(f[1:4]) + rng.normal(0, size / 3.0, 3)
                p = rng.beta(1 + 8 * quality, 2) if is_nodule else rng.beta(2, 3)
            else:
                xyz = centre + rng.normal(0, 60, 3)
                p = rng.beta(1.5, 4)
            p = float(p) if decimals is None else round(float(p), decimals)
            rows.append((uid, *map(float, xyz), p))
    rows.append(("1.2.3.not.a.luna.scan", 0.0, 0.0, 0.0, 0.5))
    return [rows[i] for i in rng.permutation(len(rows))]


def results_table(rows) -> ResultTable:
    return ResultTable.from_rows(rows)


def tables(nodules, excluded):
    return AnnotationTable.from_rows(nodules), AnnotationTable.from_rows(excluded)


@needs_shared
@pytest.mark.parametrize(
    ("seed", "n_scans", "decimals"),
    [
        (1, 888, 2),  # all 888 scans (a multiple of 8), heavy ties, cap active
        (2, 200, 3),  # a multiple of 8
        (3, 201, None),  # not a multiple of 8, continuous probabilities
    ],
)
def test_cpm_identical_to_the_official_rules_on_real_tables(luna, seed, n_scans, decimals):
    uids, nodules, excluded = luna
    rng = np.random.default_rng(100 + seed)
    chosen = [uids[i] for i in sorted(rng.choice(len(uids), n_scans, replace=False))]
    rows = random_submission(seed, chosen, nodules, excluded, decimals=decimals)
    ref_cpm, ref_fps, ref_sens = reference_cpm(chosen, nodules, excluded, rows)
    a, e = tables(nodules, excluded)
    out = evaluate(a, e, chosen, results_table(rows))
    assert abs(out.cpm - ref_cpm) < 1e-9
    np.testing.assert_array_equal(out.froc_fps, ref_fps)  # bit for bit
    np.testing.assert_array_equal(out.froc_sens, ref_sens)
    assert out.cpm == ref_cpm
    assert out.unknown_series_rows == 1


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20, 30))
def test_cpm_identical_on_many_random_submissions(luna, seed):
    uids, nodules, excluded = luna
    rng = np.random.default_rng(seed)
    n_scans = int(rng.choice([888, 8 * int(rng.integers(10, 111)), int(rng.integers(50, 888))]))
    chosen = [uids[i] for i in sorted(rng.choice(len(uids), n_scans, replace=False))]
    decimals = [None, 1, 2, 3][seed % 4]
    rows = random_submission(
        seed, chosen, nodules, excluded, decimals=decimals, quality=float(rng.random())
    )
    ref_cpm, ref_fps, ref_sens = reference_cpm(chosen, nodules, excluded, rows)
    a, e = tables(nodules, excluded)
    out = evaluate(a, e, chosen, results_table(rows))
    assert abs(out.cpm - ref_cpm) < 1e-9
    np.testing.assert_array_equal(out.froc_fps, ref_fps)
    np.testing.assert_array_equal(out.froc_sens, ref_sens)


@pytest.mark.parametrize(("false_positives", "cpm"), [(155, 6 / 7), (147, 1.0), (150, 1.0)])
def test_operating_point_exactly_on_a_vertical_step(false_positives, cpm) -> None:
    # 888 = 8 x 111 scans, 100 nodules. 111 FPs at .99, every nodule hit at .9, the other FPs
    # at .5. On paper the FROC climbs from 0 to 1 at exactly 1/8 FP/scan (111 FPs / 888 scans).
    # The official arithmetic, fpr * FPs / scans with fpr = 111 / FPs, puts that step at
    # (111 / 155) * 155 / 888, a hair ABOVE 1/8, with 155 FPs: the sensitivity at 1/8 is then
    # the bottom of the step (0) and CPM = 6/7; with 147 or 150 FPs it is the top (CPM = 1).
    uids = scans(888)
    nodules = [(u, 0.0, 0.0, 0.0, 10.0) for u in uids[:100]]
    rows = [(u, 0.0, 0.0, 1.0, 0.9) for u in uids[:100]]
    rows += [far(uids[100 + k], 0.99) for k in range(111)]
    rows += [far(uids[300 + k], 0.5) for k in range(false_positives - 111)]
    out = evaluate(ann(*nodules), None, uids, res(*rows))
    ref, _, _ = reference_cpm(uids, nodules, [], rows)
    assert out.cpm == ref
    assert out.cpm == pytest.approx(cpm, abs=1e-15)


@needs_shared
def test_no_cap_mode_matches_reference(luna):
    uids, nodules, excluded = luna
    chosen = uids[:96]
    rows = random_submission(5, chosen, nodules, excluded, marks=(90, 160), decimals=2)
    ref_cpm, _, _ = reference_cpm(chosen, nodules, excluded, rows, cap=0)
    a, e = tables(nodules, excluded)
    out = evaluate(a, e, chosen, results_table(rows), cap=False)
    assert out.cpm == ref_cpm
    assert out.candidate_stage is not None


@needs_shared
def test_bootstrap_identical_to_the_official_procedure(luna):
    uids, nodules, excluded = luna
    chosen = uids[:64]
    rows = random_submission(7, chosen, nodules, excluded, marks=(20, 60), decimals=2)
    gt, prob, scan_of, excl = reference_lists(chosen, nodules, excluded, rows)
    mean, lower, upper = reference_bootstrap(gt, prob, scan_of, excl, chosen, 40, seed=123)
    a, e = tables(nodules, excluded)
    out = evaluate(a, e, chosen, results_table(rows), bootstrap=40, seed=123)
    np.testing.assert_array_equal(out.bootstrap.mean, mean)
    np.testing.assert_array_equal(out.bootstrap.lower, lower)
    np.testing.assert_array_equal(out.bootstrap.upper, upper)


# ----------------------------------------------------------------------------------------------
# Files, command line, figure
# ----------------------------------------------------------------------------------------------


def write_case(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\ns0,0,0,0,10\ns1,0,0,0,10\n"
    )
    (tmp_path / "e.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\ns0,50,0,0,-1\n")
    (tmp_path / "s.csv").write_text("s0\ns1\ns2\n")
    (tmp_path / "r.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,probability\n"
        "s0,1,0,0,0.8\ns0,200,0,0,0.9\ns0,50,1,0,0.99\ns2,9,9,9,0.3\nzz,0,0,0,0.5\n"
    )
    return {
        k: tmp_path / f"{k[0]}.csv" for k in ("annotations", "excluded", "seriesuids", "results")
    }


def test_cli_evaluate_writes_every_output(tmp_path: Path, capsys) -> None:
    files = write_case(tmp_path)
    out_dir = tmp_path / "out"
    argv = ["evaluate", *(x for k, v in files.items() for x in (f"--{k}", str(v)))]
    code = main([*argv, "--out", str(out_dir), "--bootstrap", "50", "--seed", "1"])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    metrics = json.loads(last)
    assert set(metrics) >= {"cpm", "sensitivity", "cpm_ci95", "nodules", "detected", "scans"}
    assert list(metrics["sensitivity"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8"]
    assert (metrics["nodules"], metrics["detected"], metrics["scans"]) == (2, 1, 3)
    assert metrics["unknown_series_rows"] == 1 and len(metrics["cpm_ci95"]) == 2
    for name in ("metrics.json", "froc.csv", "froc.png", "nodules.csv", "froc_bootstrap.csv"):
        assert (out_dir / name).is_file(), name
    assert json.loads((out_dir / "metrics.json").read_text()) == metrics
    with (out_dir / "nodules.csv").open() as f:
        nod = list(csv.DictReader(f))
    assert [(r["seriesuid"], r["detected"], r["probability"]) for r in nod] == [
        ("s0", "1", "0.8"),
        ("s1", "0", ""),
    ]
    assert (out_dir / "froc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = main([*argv, "--out", str(tmp_path / "nc"), "--bootstrap", "0", "--no-cap"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["cpm_ci95"] is None and metrics["candidates_per_scan"] == pytest.approx(4 / 3)
    assert (tmp_path / "nc" / "candidates.csv").is_file()
    # Without --excluded the mark on the excluded finding (p = 0.99) is a false positive.
    plain = [a for k, v in files.items() if k != "excluded" for a in (f"--{k}", str(v))]
    assert main(["evaluate", *plain, "--out", str(tmp_path / "ne"), "--bootstrap", "0"]) == 0
    without = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert without["detected"] == 1 and without["cpm"] < metrics["cpm"]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    files = write_case(tmp_path)
    files["results"].write_text("seriesuid,coordX,coordY,coordZ,probability\ns0,1,2,3,inf\n")
    argv = ["evaluate", *(x for k, v in files.items() for x in (f"--{k}", str(v)))]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "line 2" in err and "probability" in err and "infinite" in err
    files["results"].write_text("seriesuid,coordX,coordY,probability\n")
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "missing column 'coordZ'" in capsys.readouterr().err
    assert main([*argv[:-2], "--results", str(tmp_path / "none.csv"), "--out", "x"]) == 2
    assert "file not found" in capsys.readouterr().err


def test_module_runs_as_a_program(tmp_path: Path) -> None:
    files = write_case(tmp_path)
    argv = [x for k, v in files.items() for x in (f"--{k}", str(v))]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "integration",
            "evaluate",
            *argv,
            "--out",
            str(tmp_path / "o"),
            "--bootstrap",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["scans"] == 3


def test_evaluate_files_and_overlay_figure(tmp_path: Path) -> None:
    files = write_case(tmp_path)
    out = evaluate_files(*files.values(), bootstrap=20)
    assert isinstance(out, EvaluationResult) and out.label == "r"
    metrics = write_outputs(out, tmp_path / "o")
    assert metrics["cpm"] == out.cpm
    other = evaluate_files(*files.values(), cap=False)
    plot_froc(
        [out, other, (out.froc_fps, out.froc_sens)],
        tmp_path / "overlay.png",
        labels=["capped", "no cap", "pair"],
    )
    assert (tmp_path / "overlay.png").stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_blocked_hit_test_gives_the_same_answer(monkeypatch) -> None:
    import integration.evaluation as ev

    rng = np.random.default_rng(0)
    a = ann(*[(f"s{i % 3}", *rng.normal(0, 5, 3).tolist(), 8.0) for i in range(9)])
    e = ann(*[(f"s{i % 3}", *rng.normal(0, 5, 3).tolist(), -1.0) for i in range(6)])
    r = res(
        *[(f"s{i % 3}", *rng.normal(0, 8, 3).tolist(), float(rng.random())) for i in range(300)]
    )
    whole = evaluate(a, e, scans(3), r, cap=False)
    monkeypatch.setattr(ev, "_MATCH_BLOCK", 5)
    blocked = evaluate(a, e, scans(3), r, cap=False)
    assert blocked.cpm == whole.cpm
    np.testing.assert_array_equal(blocked.nodule_table.probability, whole.nodule_table.probability)
    np.testing.assert_array_equal(blocked.nodule_table.marks, whole.nodule_table.marks)
    assert blocked.false_positives == whole.false_positives
    assert blocked.ignored_excluded == whole.ignored_excluded


def test_in_memory_tables_are_checked(tmp_path: Path) -> None:
    a = ann(("s0", 0, 0, 0, 10))
    with pytest.raises(LungCTError, match=r"row 1 \(series 's0'\): probability is NaN"):
        evaluate(a, None, scans(1), res(("s0", 0, 0, 0, 0.5), ("s0", 0, 0, 0, float("nan"))))
    with pytest.raises(LungCTError, match="coords is NaN or infinite"):
        evaluate(a, None, scans(1), res(("s0", float("inf"), 0, 0, 0.5)))
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = evaluate(a, None, scans(1), res(("s0", 0, 0, 0, 0.5)))
    with pytest.raises(LungCTError, match="cannot create the output folder"):
        write_outputs(out, blocker / "out")
