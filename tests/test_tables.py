"""Tests of lungct.tables: LUNA16 tables read and validated, folds, atomic CSV writing."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from lungct.errors import LungCTError
from lungct.tables import (
    AnnotationTable,
    CandidateTable,
    ResultTable,
    folds_from_layout,
    parse_folds,
    read_annotations,
    read_candidates,
    read_results,
    read_seriesuids,
    write_csv_atomic,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
LUNA_CSV = SHARED / "data" / "real" / "luna16-csv"
needs_shared = pytest.mark.skipif(
    not SHARED.exists(), reason=f"shared data folder {SHARED} is absent"
)

UID_A = "1.2.3.4"
UID_B = "1.2.3.5"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------------------------
# Real LUNA16 tables
# ----------------------------------------------------------------------------------------------


@needs_shared
def test_real_tables_load_with_the_published_counts() -> None:
    uids = read_seriesuids(LUNA_CSV / "seriesuids.csv")
    assert len(uids) == 888
    known = set(uids)
    ann = read_annotations(LUNA_CSV / "annotations.csv", known)
    assert len(ann) == 1186
    assert len(ann.uids) == 601  # 1186 nodules in 601 of 888 scans
    assert (ann.diameter_mm > 0).all()
    exc = read_annotations(
        LUNA_CSV / "annotations_excluded.csv", known, allow_negative_diameter=True
    )
    assert len(exc) == 35192
    assert (exc.diameter_mm == -1).sum() > 0
    # LIDC-IDRI-0001: one nodule at (56.208, 86.343, -115.868), 23.35 mm; 25 excluded rows.
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    rows = ann.rows_in_series(uid)
    assert len(rows) == 1
    np.testing.assert_allclose(ann.coords[rows[0]], [56.208, 86.343, -115.868], atol=1e-3)
    assert ann.diameter_mm[rows[0]] == pytest.approx(23.35, abs=1e-2)
    assert len(exc.rows_in_series(uid)) == 25
    first = next(iter(ann))
    assert first.seriesuid == ann.uids[0] and first.diameter_mm > 0


@needs_shared
def test_real_excluded_findings_are_rejected_as_annotations() -> None:
    with pytest.raises(LungCTError, match=r"line \d+: column 'diameter_mm': '-1'"):
        read_annotations(LUNA_CSV / "annotations_excluded.csv")


# ----------------------------------------------------------------------------------------------
# Annotations
# ----------------------------------------------------------------------------------------------


def test_annotations_columns_in_any_order_and_extra_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.csv",
        f"diameter_mm,coordZ,note,seriesuid,coordY,coordX\n5.5,3,x,{UID_A},2,1\n"
        f"4,30,y,{UID_B},20,10\n\n",
    )
    table = read_annotations(path)
    assert isinstance(table, AnnotationTable)
    assert table.uids == [UID_A, UID_B]
    np.testing.assert_array_equal(table.coords, [[1, 2, 3], [10, 20, 30]])
    np.testing.assert_array_equal(table.diameter_mm, [5.5, 4])
    assert table.coords.dtype == np.float64 and table.series_index.dtype == np.int32
    assert list(table.seriesuids) == [UID_A, UID_B]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LungCTError, match="nope.csv: file not found"):
        read_annotations(tmp_path / "nope.csv")


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", f"seriesuid,coordX,coordY\n{UID_A},1,2\n")
    with pytest.raises(LungCTError, match=r"missing columns 'coordZ', 'diameter_mm'"):
        read_annotations(path)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(LungCTError, match="empty file"):
        read_annotations(write(tmp_path / "a.csv", ""))


def test_non_numeric_value_names_line_and_column(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.csv",
        f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID_A},1,2,3,4\n{UID_A},1,abc,3,4\n",
    )
    with pytest.raises(LungCTError) as info:
        read_annotations(path)
    message = str(info.value)
    assert message.startswith(str(path))
    assert "line 3" in message and "'coordY'" in message and "'abc'" in message
    assert "\n" not in message


@pytest.mark.parametrize(("value", "kind"), [("nan", "NaN"), ("inf", "infinite")])
def test_nan_and_infinite_coordinates(tmp_path: Path, value: str, kind: str) -> None:
    path = write(
        tmp_path / "a.csv",
        f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID_A},1,2,{value},4\n",
    )
    with pytest.raises(LungCTError, match=f"line 2: column 'coordZ': value is {kind}"):
        read_annotations(path)


def test_negative_or_zero_diameter_in_annotations(tmp_path: Path) -> None:
    for value in ("-1", "0"):
        path = write(
            tmp_path / "a.csv",
            f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID_A},1,2,3,{value}\n",
        )
        with pytest.raises(LungCTError, match="line 2: column 'diameter_mm'"):
            read_annotations(path)
        assert read_annotations(path, allow_negative_diameter=True).diameter_mm[0] == float(value)


def test_unknown_series(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.csv",
        f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID_A},1,2,3,4\n{UID_B},1,2,3,4\n",
    )
    with pytest.raises(LungCTError, match=rf"line 3: seriesuid '{UID_B}' is not a known series"):
        read_annotations(path, known_series={UID_A})


def test_wrong_field_count_and_empty_uid(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", f"seriesuid,coordX,coordY,coordZ,diameter_mm\n{UID_A},1,2,3\n")
    with pytest.raises(LungCTError, match="line 2: expected 5 fields, found 4"):
        read_annotations(path)
    path = write(tmp_path / "b.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\n ,1,2,3,4\n")
    with pytest.raises(LungCTError, match="line 2: empty seriesuid"):
        read_annotations(path)


def test_duplicate_column(tmp_path: Path) -> None:
    path = write(tmp_path / "a.csv", "seriesuid,coordX,coordX,coordY,coordZ,diameter_mm\n")
    with pytest.raises(LungCTError, match="column 'coordX' appears twice"):
        read_annotations(path)


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_bytes(b"seriesuid,coordX\n\xff\xfe\x00\x01")
    with pytest.raises(LungCTError, match="not a UTF-8"):
        read_annotations(path)


def test_from_rows_and_select() -> None:
    table = AnnotationTable.from_rows(
        [(UID_A, 1, 2, 3, 4), (UID_B, 5, 6, 7, 8), (UID_A, 0, 0, 0, 1)]
    )
    assert table.uids == [UID_A, UID_B]
    np.testing.assert_array_equal(table.series_index, [0, 1, 0])
    sub = table.select(np.array([False, True, True]))
    assert len(sub) == 2 and sub.uid_of(0) == UID_B
    np.testing.assert_array_equal(sub.diameter_mm, [8, 1])
    with pytest.raises(ValueError, match="column 'diameter_mm'"):
        AnnotationTable([UID_A], np.zeros(2), np.zeros((2, 3)), diameter_mm=np.zeros(3))


# ----------------------------------------------------------------------------------------------
# Candidates and results
# ----------------------------------------------------------------------------------------------


def test_candidates_with_optional_columns(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.csv",
        f"seriesuid,coordX,coordY,coordZ,class,probability\n{UID_A},1,2,3,1,0.5\n"
        f"{UID_B},4,5,6,0,0.25\n{UID_A},7,8,9,0,0.75\n",
    )
    table = read_candidates(path)
    assert isinstance(table, CandidateTable)
    assert table.label.dtype == np.int8
    np.testing.assert_array_equal(table.label, [1, 0, 0])
    np.testing.assert_array_equal(table.probability, [0.5, 0.25, 0.75])
    assert table.diameter_mm is None
    np.testing.assert_array_equal(table.series_index, [0, 1, 0])
    out = tmp_path / "out.csv"
    table.to_csv(out)
    again = read_candidates(out)
    np.testing.assert_array_equal(again.coords, table.coords)
    np.testing.assert_array_equal(again.probability, table.probability)


def test_candidates_class_must_be_binary(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", f"seriesuid,coordX,coordY,coordZ,class\n{UID_A},1,2,3,2\n")
    with pytest.raises(LungCTError, match="line 2: column 'class': '2' is not 0 or 1"):
        read_candidates(path)


def test_candidates_without_class(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", f"seriesuid,coordX,coordY,coordZ\n{UID_A},1,2,3\n")
    with pytest.raises(LungCTError, match="missing column 'class'"):
        read_candidates(path)
    assert read_candidates(path, require_class=False).label is None


def test_many_candidates_load_as_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 20000
    uids = [f"1.2.{i}" for i in range(50)]
    path = tmp_path / "c.csv"
    with path.open("w") as f:
        f.write("seriesuid,coordX,coordY,coordZ,class\n")
        for i in range(n):
            x, y, z = rng.normal(size=3).tolist()
            f.write(f"{uids[i % 50]},{x!r},{y!r},{z!r},{i % 7 == 0:d}\n")
    table = read_candidates(path, known_series=set(uids))
    assert len(table) == n and table.coords.shape == (n, 3)
    assert table.uids == uids
    assert table.label.sum() == len(range(0, n, 7))


def test_results_roundtrip_and_errors(tmp_path: Path) -> None:
    table = ResultTable.from_rows([(UID_A, 1.5, -2.25, 3.0, 0.1), (UID_B, 0.1, 0.2, 0.3, 0.9)])
    path = tmp_path / "r.csv"
    table.to_csv(path)
    again = read_results(path, known_series={UID_A, UID_B})
    np.testing.assert_array_equal(again.coords, table.coords)
    np.testing.assert_array_equal(again.probability, table.probability)
    bad = write(
        tmp_path / "bad.csv", f"seriesuid,coordX,coordY,coordZ,probability\n{UID_A},1,2,3,nan\n"
    )
    with pytest.raises(LungCTError, match="line 2: column 'probability': value is NaN"):
        read_results(bad)
    bad = write(tmp_path / "bad2.csv", f"seriesuid,coordX,coordY,coordZ\n{UID_A},1,2,3\n")
    with pytest.raises(LungCTError, match="missing column 'probability'"):
        read_results(bad)
    empty = write(tmp_path / "empty.csv", "seriesuid,coordX,coordY,coordZ,probability\n")
    assert len(read_results(empty)) == 0


def test_results_from_arrays() -> None:
    table = ResultTable.from_arrays([UID_A, UID_B, UID_A], np.zeros((3, 3)), [0.1, 0.2, 0.3])
    assert table.uids == [UID_A, UID_B]
    np.testing.assert_array_equal(table.series_index, [0, 1, 0])


# ----------------------------------------------------------------------------------------------
# Series lists and folds
# ----------------------------------------------------------------------------------------------


def test_seriesuids(tmp_path: Path) -> None:
    assert read_seriesuids(write(tmp_path / "s.csv", f"{UID_A}\n{UID_B}\n\n")) == [UID_A, UID_B]
    assert read_seriesuids(write(tmp_path / "s2.csv", f"{UID_A}\r\n{UID_B}")) == [UID_A, UID_B]
    with pytest.raises(LungCTError, match=rf"line 3: seriesuid '{UID_A}' repeats line 1"):
        read_seriesuids(write(tmp_path / "d.csv", f"{UID_A}\n{UID_B}\n{UID_A}\n"))
    with pytest.raises(LungCTError, match="line 2: blank line inside"):
        read_seriesuids(write(tmp_path / "b.csv", f"{UID_A}\n\n{UID_B}\n"))
    with pytest.raises(LungCTError, match="header"):
        read_seriesuids(write(tmp_path / "h.csv", f"seriesuid\n{UID_A}\n"))
    with pytest.raises(LungCTError, match="no series UIDs"):
        read_seriesuids(write(tmp_path / "e.csv", "\n"))
    with pytest.raises(LungCTError, match="file not found"):
        read_seriesuids(tmp_path / "missing.csv")


def test_folds_from_layout(tmp_path: Path) -> None:
    for fold, uid in ((0, UID_A), (3, UID_B), (9, "1.9")):
        folder = tmp_path / f"subset{fold}"
        if fold == 9:  # a doubled folder, as some unzip tools leave it
            folder = folder / f"subset{fold}"
        folder.mkdir(parents=True)
        (folder / f"{uid}.mhd").write_text("")
        (folder / f"{uid}.raw").write_text("")
    (tmp_path / "other").mkdir()
    assert folds_from_layout(tmp_path) == {UID_A: 0, UID_B: 3, "1.9": 9}
    (tmp_path / "subset4").mkdir()
    (tmp_path / "subset4" / f"{UID_A}.mhd").write_text("")
    with pytest.raises(LungCTError, match="also in"):
        folds_from_layout(tmp_path)


def test_folds_from_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(LungCTError, match="data folder not found"):
        folds_from_layout(tmp_path / "nope")
    with pytest.raises(LungCTError, match="no scans found"):
        folds_from_layout(tmp_path)


def test_parse_folds() -> None:
    assert parse_folds("0-7") == list(range(8))
    assert parse_folds("0,2,5") == [0, 2, 5]
    assert parse_folds("9") == [9]
    assert parse_folds(" 0-2 , 8 ") == [0, 1, 2, 8]
    for text, problem in (
        ("", "empty"),
        ("a", "not a fold number"),
        ("10", "outside 0..9"),
        ("7-3", "reversed"),
        ("1,1", "named twice"),
        ("0-3,2", "named twice"),
        ("1.5", "not a fold number"),
        ("-1", "not a fold number"),
    ):
        with pytest.raises(LungCTError, match=problem):
            parse_folds(text)


def test_write_csv_atomic(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.csv"
    write_csv_atomic(path, ["a", "b"], [[1, 0.1], ["u,v", 1e-300]])
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["a", "b"], ["1", "0.1"], ["u,v", "1e-300"]]
    assert [p.name for p in path.parent.iterdir()] == ["x.csv"]

    def failing():
        yield [1, 2]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_csv_atomic(path, ["a", "b"], failing())
    assert path.read_text().splitlines()[1] == "1,0.1"  # the old file is untouched
    assert [p.name for p in path.parent.iterdir()] == ["x.csv"]
