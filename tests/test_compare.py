"""Paired comparison of submissions (``integration.compare``, ``python -m integration compare``).

The hand-built case is worked out on paper; the correlated case checks what pairing is for:
two systems that share most of their marks get a narrower interval for their difference than
independent resamples give.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from integration import evaluate
from integration.__main__ import main
from integration.compare import compare
from lungct.errors import LungCTError
from lungct.tables import AnnotationTable, ResultTable

UIDS = ["s0", "s1", "s2"]
# One 10 mm nodule per scan, each at a different place.
NODULES = AnnotationTable.from_rows(
    [("s0", 0, 0, 0, 10), ("s1", 50, 0, 0, 10), ("s2", 0, 50, 0, 10)]
)
# System A: all three nodules found (0.9, 0.7, 0.6) and one false positive (0.8) in s1.
A_ROWS = [
    ("s0", 1, 0, 0, 0.9),
    ("s1", 200, 200, 200, 0.8),
    ("s1", 51, 0, 0, 0.7),
    ("s2", 0, 51, 0, 0.6),
]
# System B: A without its mark on the nodule of s2.
B_ROWS = A_ROWS[:3]


def test_paired_difference_of_known_marks_is_exact() -> None:
    """On paper (3 scans, 3 nodules, one false positive, so FPs/scan steps at 1/3):

    A's FROC is (0, 0), (0, 1/3), (1/3, 1/3), (1/3, 1): sensitivity 1/3 at 1/8 and 1/4 FPs/scan
    and 1 from 1/2 on, CPM (2/3 + 5) / 7 = 17/21. B's is (0, 0), (0, 1/3), (1/3, 1/3),
    (1/3, 2/3): CPM (2/3 + 10/3) / 7 = 4/7. B - A = 4/7 - 17/21 = -5/21.
    """
    result = compare(
        NODULES,
        None,
        UIDS,
        [ResultTable.from_rows(A_ROWS), ResultTable.from_rows(B_ROWS)],
        labels=["A", "B"],
        bootstrap=200,
        seed=3,
    )
    a, b = result.results
    assert a.cpm == pytest.approx(17 / 21, abs=1e-12)
    assert b.cpm == pytest.approx(4 / 7, abs=1e-12)
    (d,) = result.differences
    assert (d.label, d.reference) == ("B", "A")
    assert d.cpm_difference == pytest.approx(-5 / 21, abs=1e-12)
    np.testing.assert_allclose(
        d.sensitivity_difference, [0, 0, -1 / 3, -1 / 3, -1 / 3, -1 / 3, -1 / 3], atol=1e-12
    )
    # B never finds more than A on any resample: the paired differences are all <= 0.
    assert d.ci[1] <= 0.0
    # Each system's own interval is the one evaluate() gives with the same seed.
    alone = evaluate(NODULES, None, UIDS, ResultTable.from_rows(B_ROWS), bootstrap=200, seed=3)
    assert b.bootstrap.cpm_ci == alone.bootstrap.cpm_ci
    np.testing.assert_array_equal(b.bootstrap.cpm_samples, alone.bootstrap.cpm_samples)


def test_identical_submissions_do_not_differ() -> None:
    table = ResultTable.from_rows(A_ROWS)
    result = compare(NODULES, None, UIDS, [table, table], labels=["A", "A again"], bootstrap=50)
    (d,) = result.differences
    assert d.cpm_difference == 0.0 and d.ci == (0.0, 0.0)
    assert d.p_value == 1.0 and not d.excludes_zero


def _correlated(n_scans: int = 80, seed: int = 0) -> tuple[AnnotationTable, list, list]:
    """Two systems sharing every mark; B scores one nodule in ten a little higher. Scans
    differ a lot in difficulty, which is what makes independent resampling too wide."""
    rng = np.random.default_rng(seed)
    nodules, rows_a, rows_b = [], [], []
    for i in range(n_scans):
        uid = f"s{i}"
        hard = rng.random() < 0.5
        for k in range(2):
            x = 60.0 * k
            nodules.append((uid, x, 0.0, 0.0, 8.0))
            score = float(rng.uniform(0.05, 0.5) if hard else rng.uniform(0.4, 0.99))
            rows_a.append((uid, x + 1, 0.0, 0.0, score))
            better = min(0.999, score + 0.3) if rng.random() < 0.1 else score
            rows_b.append((uid, x + 1, 0.0, 0.0, better))
        for k in range(4):
            fp = (uid, 300.0 + 30 * k, 300.0, 300.0, float(rng.uniform(0.0, 0.9)))
            rows_a.append(fp)
            rows_b.append(fp)
    return AnnotationTable.from_rows(nodules), rows_a, rows_b


def test_pairing_narrows_the_interval_of_correlated_submissions() -> None:
    nodules, rows_a, rows_b = _correlated()
    uids = [f"s{i}" for i in range(80)]
    result = compare(
        nodules,
        None,
        uids,
        [ResultTable.from_rows(rows_a), ResultTable.from_rows(rows_b)],
        labels=["A", "B"],
        bootstrap=300,
        seed=1,
    )
    (d,) = result.differences
    paired = d.ci[1] - d.ci[0]
    unpaired = d.unpaired_ci[1] - d.unpaired_ci[0]
    assert d.ci[0] <= d.cpm_difference <= d.ci[1]
    assert paired < 0.5 * unpaired, (paired, unpaired)
    assert d.cpm_difference > 0 and d.excludes_zero and d.p_value < 0.05
    # Unpaired, the same difference is lost in the scans' spread.
    assert d.unpaired_ci[0] < 0.0 < d.unpaired_ci[1]


def test_compare_refuses_what_cannot_be_compared() -> None:
    table = ResultTable.from_rows(A_ROWS)
    with pytest.raises(LungCTError, match="two or more"):
        compare(NODULES, None, UIDS, [table])
    with pytest.raises(LungCTError, match="labels must differ"):
        compare(NODULES, None, UIDS, [table, table], labels=["x", "x"])
    with pytest.raises(LungCTError, match="reference 2"):
        compare(NODULES, None, UIDS, [table, table], reference=2)
    with pytest.raises(LungCTError, match="bootstrap >= 1"):
        compare(NODULES, None, UIDS, [table, table], bootstrap=0)


def _write(path: Path, header: list[str], rows: list[tuple]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_cli_compare_writes_the_table_the_json_and_the_figure(tmp_path: Path, capsys) -> None:
    _, rows_a, rows_b = _correlated(40)
    ann = _write(
        tmp_path / "annotations.csv",
        ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"],
        [(f"s{i}", 60.0 * k, 0.0, 0.0, 8.0) for i in range(40) for k in range(2)],
    )
    exc = _write(
        tmp_path / "excluded.csv", ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"], []
    )
    uids = tmp_path / "seriesuids.csv"
    uids.write_text("".join(f"s{i}\n" for i in range(40)))
    header = ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    a = _write(tmp_path / "plain.csv", header, rows_a)
    b = _write(tmp_path / "better.csv", header, rows_b)
    out = tmp_path / "cmp"
    argv = ["compare", "--annotations", str(ann), "--excluded", str(exc)]
    argv += ["--seriesuids", str(uids), "--results", str(a), str(b), "--out", str(out)]
    code = main([*argv, "--bootstrap", "100", "--reference", "plain"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    data = json.loads(printed[-1])
    assert data["reference"] == "plain" and [s["label"] for s in data["systems"]] == [
        "plain",
        "better",
    ]
    assert data == json.loads((out / "comparison.json").read_text())
    assert any(line.startswith("better") and "+0." in line for line in printed)
    assert (out / "froc_compare.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((out / "differences.csv").open()))
    assert [r["label"] for r in rows] == ["better"]
    assert float(rows[0]["cpm_difference"]) == pytest.approx(
        data["differences"][0]["cpm_difference"]
    )


def test_cli_compare_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    uids = tmp_path / "seriesuids.csv"
    uids.write_text("s0\n")
    missing = tmp_path / "nope.csv"
    argv = ["compare", "--annotations", str(missing), "--excluded", str(missing)]
    argv += ["--seriesuids", str(uids), "--results", str(missing), str(missing)]
    code = main([*argv, "--out", str(tmp_path / "o"), "--labels", "a"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:")
    code = main([*argv, "--out", str(tmp_path / "o"), "--reference", "zzz"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "zzz" in err[0]
    assert not (tmp_path / "o").exists()
