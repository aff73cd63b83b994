"""LUNA16 tables: annotations, candidates, results, series lists and folds, validated on load.

Every table is read with the :mod:`csv` module, streamed in chunks into numpy columns (no pandas,
no list of per-row Python objects), and checked as it is read. A bad input raises
:class:`lungct.errors.LungCTError` with one line naming the file, the line and the problem, e.g.
``results.csv: line 17: column 'probability': 'abc' is not a number``.

Column layout of the tables (world millimetres, the ITK/DICOM patient frame):

- annotations.csv / annotations_excluded.csv: ``seriesuid,coordX,coordY,coordZ,diameter_mm``
  (in the excluded findings a negative diameter means "unknown"; the evaluation uses 10 mm),
  optionally with ``reader_count``: how many LIDC readers marked the finding (1-4; an empty
  cell or 0 = unknown). LUNA16's own tables have no such column; the synthetic generator
  writes one;
- candidates.csv / candidates_V2.csv: ``seriesuid,coordX,coordY,coordZ,class``, optionally with
  ``diameter_mm`` and/or ``probability`` columns;
- results (a submission): ``seriesuid,coordX,coordY,coordZ,probability``;
- seriesuids.csv: one series UID a line, no header.

Column order is free (columns are found by header name) and extra columns are ignored.
A table keeps the series UIDs once, in :attr:`PointTable.uids` (first-appearance order), and a
per-row integer :attr:`PointTable.series_index` into that list, so 750,000 candidates cost about
40 bytes a row.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Self

import numpy as np

from lungct.errors import LungCTError
from lungct.fileio import write_text_atomic

FOLD_COUNT = 10
"""LUNA16 has ten subsets, ``subset0`` .. ``subset9``; they are the ten cross-validation folds."""

COORD_COLUMNS = ("coordX", "coordY", "coordZ")
ANNOTATION_COLUMNS = ("seriesuid", *COORD_COLUMNS, "diameter_mm")
READER_COUNT_COLUMN = "reader_count"
"""Optional last column of an annotation table: how many readers marked the finding."""
CANDIDATE_COLUMNS = ("seriesuid", *COORD_COLUMNS, "class")
RESULT_COLUMNS = ("seriesuid", *COORD_COLUMNS, "probability")

_CHUNK_ROWS = 65536


# ----------------------------------------------------------------------------------------------
# Table types
# ----------------------------------------------------------------------------------------------


class Annotation(NamedTuple):
    """One row of an annotation table."""

    seriesuid: str
    coordX: float
    coordY: float
    coordZ: float
    diameter_mm: float


@dataclass(eq=False)
class PointTable:
    """Rows of world points grouped by CT series: the common part of every LUNA16 table.

    Attributes:
        uids: the distinct series UIDs, in order of first appearance.
        series_index: ``(N,)`` int32, row ``i`` belongs to series ``uids[series_index[i]]``.
        coords: ``(N, 3)`` float64 world millimetres ``(x, y, z)``.
        path: the file the table was read from (``None`` if built in memory), for messages.
    """

    uids: list[str]
    series_index: np.ndarray
    coords: np.ndarray
    path: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        self.uids = list(self.uids)
        self.series_index = np.ascontiguousarray(self.series_index, dtype=np.int32).reshape(-1)
        self.coords = np.ascontiguousarray(self.coords, dtype=np.float64).reshape(-1, 3)
        n = len(self.series_index)
        if len(self.coords) != n:
            raise ValueError(f"{len(self.coords)} coordinates for {n} rows")
        if n and (self.series_index.min() < 0 or self.series_index.max() >= len(self.uids)):
            raise ValueError("series_index points outside uids")
        for name in self._row_columns():
            value = getattr(self, name)
            if value is None:
                continue
            value = np.ascontiguousarray(value, dtype=self._column_dtype(name)).reshape(-1)
            if len(value) != n:
                raise ValueError(f"column {name!r} has {len(value)} values for {n} rows")
            setattr(self, name, value)

    # Subclasses list their extra per-row columns here.
    @classmethod
    def _row_columns(cls) -> tuple[str, ...]:
        return ()

    @classmethod
    def _column_dtype(cls, name: str) -> Any:
        return np.float64

    def __len__(self) -> int:
        return len(self.series_index)

    @property
    def seriesuids(self) -> np.ndarray:
        """The series UID of every row, as an object array (built on demand)."""
        return np.asarray(self.uids, dtype=object)[self.series_index]

    def uid_of(self, row: int) -> str:
        """The series UID of one row."""
        return self.uids[int(self.series_index[row])]

    def select(self, rows: np.ndarray) -> Self:
        """A new table holding only ``rows`` (a boolean mask or integer indices)."""
        kwargs = {
            name: None if getattr(self, name) is None else getattr(self, name)[rows]
            for name in self._row_columns()
        }
        return type(self)(
            self.uids, self.series_index[rows], self.coords[rows], path=self.path, **kwargs
        )

    def rows_in_series(self, uid: str) -> np.ndarray:
        """Indices of the rows of one series (empty if the series has none)."""
        try:
            k = self.uids.index(uid)
        except ValueError:
            return np.zeros(0, dtype=np.intp)
        return np.flatnonzero(self.series_index == k)

    @staticmethod
    def _index_uids(seriesuids: Iterable[str]) -> tuple[list[str], np.ndarray]:
        lookup: dict[str, int] = {}
        index = array("i")
        for uid in seriesuids:
            k = lookup.setdefault(uid, len(lookup))
            index.append(k)
        return list(lookup), np.frombuffer(index, dtype=np.int32).copy()


@dataclass(eq=False)
class AnnotationTable(PointTable):
    """Nodule annotations (or excluded findings): a point and a diameter per row.

    Attributes:
        diameter_mm: ``(N,)`` float64; in excluded findings a negative value means unknown.
        reader_count: ``(N,)`` int8, how many readers marked each finding (0 = unknown), or
            ``None`` when the table has no ``reader_count`` column (LUNA16's tables).
    """

    diameter_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reader_count: np.ndarray | None = None

    @classmethod
    def _row_columns(cls) -> tuple[str, ...]:
        return ("diameter_mm", "reader_count")

    @classmethod
    def _column_dtype(cls, name: str) -> Any:
        return np.int8 if name == "reader_count" else np.float64

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> AnnotationTable:
        """Build from ``(seriesuid, x, y, z, diameter_mm)`` tuples (for tests and scripts)."""
        rows = list(rows)
        uids, index = cls._index_uids(str(r[0]) for r in rows)
        coords = np.array([[float(v) for v in r[1:4]] for r in rows], dtype=np.float64)
        diam = np.array([float(r[4]) for r in rows], dtype=np.float64)
        return cls(uids, index, coords.reshape(-1, 3), diameter_mm=diam)

    def __iter__(self) -> Iterator[Annotation]:
        for i in range(len(self)):
            x, y, z = self.coords[i]
            yield Annotation(
                self.uid_of(i), float(x), float(y), float(z), float(self.diameter_mm[i])
            )


@dataclass(eq=False)
class CandidateTable(PointTable):
    """Candidate locations (LUNA16 candidates.csv / candidates_V2.csv, or a detector's output).

    Attributes:
        label: ``(N,)`` int8 class (1 = nodule, 0 = not), or ``None`` when the file has none.
        diameter_mm: ``(N,)`` float64 or ``None``.
        probability: ``(N,)`` float64 or ``None``.
    """

    label: np.ndarray | None = None
    diameter_mm: np.ndarray | None = None
    probability: np.ndarray | None = None

    @classmethod
    def _row_columns(cls) -> tuple[str, ...]:
        return ("label", "diameter_mm", "probability")

    @classmethod
    def _column_dtype(cls, name: str) -> Any:
        return np.int8 if name == "label" else np.float64

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write ``seriesuid,coordX,coordY,coordZ[,class][,diameter_mm][,probability]`` atomically."""
        header = ["seriesuid", *COORD_COLUMNS]
        extra: list[np.ndarray] = []
        for name, column in (
            ("class", self.label),
            ("diameter_mm", self.diameter_mm),
            ("probability", self.probability),
        ):
            if column is not None:
                header.append(name)
                extra.append(column)
        uids = self.uids

        def rows() -> Iterator[list[Any]]:
            for i in range(len(self)):
                x, y, z = self.coords[i].tolist()
                yield [uids[self.series_index[i]], x, y, z, *(c[i].item() for c in extra)]

        write_csv_atomic(path, header, rows())


@dataclass(eq=False)
class ResultTable(PointTable):
    """A CAD submission: marks with a probability, ``seriesuid,coordX,coordY,coordZ,probability``.

    Attributes:
        probability: ``(N,)`` float64, finite.
    """

    probability: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def _row_columns(cls) -> tuple[str, ...]:
        return ("probability",)

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> ResultTable:
        """Build from ``(seriesuid, x, y, z, probability)`` tuples (for tests and scripts)."""
        rows = list(rows)
        uids, index = cls._index_uids(str(r[0]) for r in rows)
        coords = np.array([[float(v) for v in r[1:4]] for r in rows], dtype=np.float64)
        prob = np.array([float(r[4]) for r in rows], dtype=np.float64)
        return cls(uids, index, coords.reshape(-1, 3), probability=prob)

    @classmethod
    def from_arrays(
        cls, seriesuids: Sequence[str], coords: np.ndarray, probability: np.ndarray
    ) -> ResultTable:
        """Build from a per-row series UID sequence, ``(N, 3)`` world coordinates and scores."""
        uids, index = cls._index_uids(seriesuids)
        return cls(uids, index, coords, probability=probability)

    def to_csv(self, path: str | os.PathLike) -> None:
        """Write the submission as ``seriesuid,coordX,coordY,coordZ,probability`` atomically."""
        uids = self.uids

        def rows() -> Iterator[list[Any]]:
            for i in range(len(self)):
                x, y, z = self.coords[i].tolist()
                yield [uids[self.series_index[i]], x, y, z, self.probability[i].item()]

        write_csv_atomic(path, RESULT_COLUMNS, rows())


# ----------------------------------------------------------------------------------------------
# Streaming CSV reader
# ----------------------------------------------------------------------------------------------

_Check = Callable[[np.ndarray], np.ndarray]
"""A column check: values -> boolean mask of the BAD values."""


@dataclass
class _Column:
    name: str
    required: bool
    check: _Check | None = None
    problem: str = ""
    blank: float | None = None
    """The value of an empty cell (``None``: an empty cell is an error)."""


def _open_text(path: Path) -> Any:
    if not path.exists():
        raise LungCTError(path, "file not found")
    if path.is_dir():
        raise LungCTError(path, "is a directory, expected a CSV file")
    try:
        return path.open("r", newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise LungCTError(path, f"cannot open: {exc.strerror or exc}") from exc


def _is_blank(row: list[str]) -> bool:
    return not row or all(not cell.strip() for cell in row)


def _read_point_csv(
    path: str | os.PathLike,
    columns: Sequence[_Column],
    known_series: Collection[str] | None,
) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray | None]]:
    """Stream a ``seriesuid,coordX,coordY,coordZ,...`` CSV into numpy columns, validating it.

    Returns ``(uids, series_index, coords, extra)`` where ``extra`` maps every column of
    ``columns`` to its float64 values (``None`` for an optional column the file lacks).
    """
    path = Path(path)
    all_cols = [_Column(name, True) for name in COORD_COLUMNS] + list(columns)
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        try:
            header: list[str] | None = None
            for row in reader:
                if not _is_blank(row):
                    header = [cell.strip() for cell in row]
                    break
            if header is None:
                raise LungCTError(path, "empty file: no header line")
            seen: set[str] = set()
            for name in header:
                if name and name in seen:
                    raise LungCTError(
                        path, f"line {reader.line_num}: column {name!r} appears twice"
                    )
                seen.add(name)
            wanted = ["seriesuid", *(c.name for c in all_cols if c.required)]
            missing = [name for name in wanted if name not in header]
            if missing:
                names = ", ".join(repr(m) for m in missing)
                raise LungCTError(
                    path,
                    f"missing column{'s' if len(missing) > 1 else ''} {names} "
                    f"(header: {','.join(header)})",
                )
            present = [c for c in all_cols if c.name in header]
            positions = [header.index(c.name) for c in present]
            uid_pos = header.index("seriesuid")
            n_fields = len(header)

            lookup: dict[str, int] = {}
            index = array("i")
            chunks: dict[str, list[np.ndarray]] = {c.name: [] for c in present}
            buffers: list[list[str]] = [[] for _ in present]
            lines: list[int] = []

            def flush() -> None:
                for col, buf in zip(present, buffers, strict=True):
                    chunks[col.name].append(_convert(path, col, buf, lines))
                    buf.clear()
                lines.clear()

            for row in reader:
                if _is_blank(row):
                    continue
                if len(row) != n_fields:
                    raise LungCTError(
                        path,
                        f"line {reader.line_num}: expected {n_fields} fields, found {len(row)}",
                    )
                uid = row[uid_pos].strip()
                k = lookup.get(uid)
                if k is None:
                    if not uid:
                        raise LungCTError(path, f"line {reader.line_num}: empty seriesuid")
                    if known_series is not None and uid not in known_series:
                        raise LungCTError(
                            path,
                            f"line {reader.line_num}: seriesuid {uid!r} is not a known series",
                        )
                    k = lookup[uid] = len(lookup)
                index.append(k)
                for buf, pos in zip(buffers, positions, strict=True):
                    buf.append(row[pos])
                lines.append(reader.line_num)
                if len(lines) >= _CHUNK_ROWS:
                    flush()
            flush()
        except csv.Error as exc:
            raise LungCTError(path, f"line {reader.line_num}: malformed CSV ({exc})") from exc
        except UnicodeDecodeError as exc:
            raise LungCTError(path, f"not a UTF-8 text CSV file ({exc.reason})") from exc

    def joined(name: str) -> np.ndarray | None:
        parts = chunks.get(name)
        if parts is None:
            return None
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float64)

    coords = np.stack([joined(name) for name in COORD_COLUMNS], axis=1)  # type: ignore[misc]
    extra = {c.name: joined(c.name) for c in columns}
    series_index = np.frombuffer(index, dtype=np.int32).copy()
    return list(lookup), series_index, coords, extra


def _convert(path: Path, col: _Column, values: list[str], lines: list[int]) -> np.ndarray:
    """Parse one chunk of one column to float64 and apply its checks."""
    empty = np.zeros(len(values), bool)
    if col.blank is not None:  # an empty cell takes the blank value, unchecked (NaN allowed)
        empty = np.fromiter((not v.strip() for v in values), dtype=bool, count=len(values))
        values = [v if v.strip() else str(col.blank) for v in values]
    try:
        out = np.fromiter(map(float, values), dtype=np.float64, count=len(values))
    except ValueError:
        for i, text in enumerate(values):
            try:
                float(text)
            except ValueError:
                raise LungCTError(
                    path, f"line {lines[i]}: column {col.name!r}: {text.strip()!r} is not a number"
                ) from None
        raise  # pragma: no cover - float() failed on the whole but on no single value
    bad = ~np.isfinite(out) & ~empty
    if bad.any():
        i = int(np.argmax(bad))
        kind = "NaN" if math.isnan(out[i]) else "infinite"
        raise LungCTError(path, f"line {lines[i]}: column {col.name!r}: value is {kind}")
    if col.check is not None:
        with np.errstate(invalid="ignore"):
            bad = col.check(out) & ~empty
        if bad.any():
            i = int(np.argmax(bad))
            raise LungCTError(
                path,
                f"line {lines[i]}: column {col.name!r}: {values[i].strip()!r} {col.problem}",
            )
    return out


# ----------------------------------------------------------------------------------------------
# Public readers
# ----------------------------------------------------------------------------------------------


def read_annotations(
    path: str | os.PathLike,
    known_series: Collection[str] | None = None,
    *,
    allow_negative_diameter: bool = False,
) -> AnnotationTable:
    """Read ``annotations.csv`` (or, with ``allow_negative_diameter``, the excluded findings).

    Args:
        path: a CSV with columns ``seriesuid,coordX,coordY,coordZ,diameter_mm``.
        known_series: if given, every series UID must be in it.
        allow_negative_diameter: accept negative diameters ("unknown size", as in
            ``annotations_excluded.csv``); otherwise every diameter must be positive.

    An optional ``reader_count`` column (how many readers marked each finding; empty or 0 =
    unknown) is read into :attr:`AnnotationTable.reader_count`.

    Raises:
        LungCTError: missing file or column, non-numeric or non-finite value, unknown series,
            bad diameter or reader count; the message names the file and the line.
    """
    if allow_negative_diameter:
        diameter = _Column("diameter_mm", True)
    else:
        diameter = _Column(
            "diameter_mm",
            True,
            check=lambda d: ~(d > 0),
            problem="is not a positive diameter (negative sizes belong in the excluded findings)",
        )
    readers = _Column(
        READER_COUNT_COLUMN,
        False,
        check=lambda n: (n < 0) | (n > 127) | (n != np.round(n)),
        problem="is not a reader count (a whole number >= 0; empty or 0 = unknown)",
        blank=0.0,
    )
    uids, index, coords, extra = _read_point_csv(path, [diameter, readers], known_series)
    return AnnotationTable(
        uids,
        index,
        coords,
        diameter_mm=extra["diameter_mm"],
        reader_count=extra["reader_count"],
        path=os.fspath(path),
    )


RATING_COLUMNS = (
    "subtlety",
    "internalStructure",
    "calcification",
    "sphericity",
    "margin",
    "lobulation",
    "spiculation",
    "texture",
    "malignancy",
)
"""The LIDC readers' 1-5 ratings of a nodule (``internalStructure`` 1-4 and ``calcification``
1-6 in LIDC's own scales are kept as rated)."""
NODULE_ATTRIBUTE_COLUMNS = (
    *ANNOTATION_COLUMNS,
    READER_COUNT_COLUMN,
    "rating_readers",
    *RATING_COLUMNS,
    "lidc_annotation_ids",
)
"""``nodule_attributes.csv``: one row per row of ``annotations.csv``, the same point, with the
median rating of the ``rating_readers`` readers who rated it (empty cells: not rated) and the
LIDC annotation ids the ratings came from (``;``-separated)."""

RATING_SCALES = {
    name: {"internalStructure": (1, 4), "calcification": (1, 6)}.get(name, (1, 5))
    for name in RATING_COLUMNS
}
"""Each rating's LIDC scale (lowest, highest)."""


@dataclass(eq=False)
class NoduleAttributeTable(PointTable):
    """Nodule ratings: a point, its diameter, and the readers' median ratings.

    Attributes:
        diameter_mm: ``(N,)`` float64.
        rating_readers: ``(N,)`` how many readers' ratings each row's medians come from
            (0 = not rated).
        ratings: ``(N, 9)`` float64 median ratings in :data:`RATING_COLUMNS` order, NaN where
            not rated.
    """

    diameter_mm: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rating_readers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    ratings: np.ndarray = field(default_factory=lambda: np.zeros((0, len(RATING_COLUMNS))))

    def rating(self, name: str) -> np.ndarray:
        """One rating's column (NaN where not rated)."""
        return self.ratings[:, RATING_COLUMNS.index(name)]


def read_nodule_attributes(
    path: str | os.PathLike, known_series: Collection[str] | None = None
) -> NoduleAttributeTable:
    """Read ``nodule_attributes.csv`` (:data:`NODULE_ATTRIBUTE_COLUMNS`).

    Raises:
        LungCTError: missing file or column, a series UID outside ``known_series``, a rating
            outside its scale (1-5; ``internalStructure`` 1-4, ``calcification`` 1-6) or not a
            multiple of 0.5 (a median), a row with ratings but no rating readers; the message
            names the file and the line.
    """

    def rating(name: str) -> _Column:
        lo, hi = RATING_SCALES[name]
        return _Column(
            name,
            True,
            check=lambda v, lo=lo, hi=hi: (v < lo) | (v > hi) | (v * 2 != np.round(v * 2)),
            problem=f"is not a rating from {lo} to {hi} (empty = not rated)",
            blank=math.nan,
        )

    columns = [
        _Column("diameter_mm", True, check=lambda d: ~(d > 0), problem="is not a diameter"),
        _Column(
            "rating_readers",
            True,
            check=lambda n: (n < 0) | (n > 127) | (n != np.round(n)),
            problem="is not a reader count",
            blank=0.0,
        ),
        *(rating(name) for name in RATING_COLUMNS),
    ]
    uids, index, coords, extra = _read_point_csv(path, columns, known_series)
    ratings = np.column_stack([extra[n] for n in RATING_COLUMNS]).reshape(-1, len(RATING_COLUMNS))
    readers = extra["rating_readers"].astype(np.int8)
    unrated = (readers == 0) & ~np.isnan(ratings).all(axis=1)
    if unrated.any():
        raise LungCTError(
            path, f"row {int(np.argmax(unrated)) + 1}: ratings given but rating_readers is 0"
        )
    return NoduleAttributeTable(
        uids,
        index,
        coords,
        diameter_mm=extra["diameter_mm"],
        rating_readers=readers,
        ratings=ratings,
        path=os.fspath(path),
    )


def read_candidates(
    path: str | os.PathLike,
    known_series: Collection[str] | None = None,
    *,
    require_class: bool = True,
) -> CandidateTable:
    """Read a candidates table (``candidates.csv`` / ``candidates_V2.csv`` or a detector's output).

    Columns ``seriesuid,coordX,coordY,coordZ,class``; optional ``diameter_mm`` and
    ``probability``. Streamed in chunks: 750,000 rows cost tens of megabytes.

    Args:
        path: the CSV file.
        known_series: if given, every series UID must be in it.
        require_class: if False the ``class`` column may be absent (unlabelled candidates).

    Raises:
        LungCTError: as :func:`read_annotations`; ``class`` must be 0 or 1, a diameter must not
            be negative.
    """
    columns = [
        _Column(
            "class", require_class, check=lambda c: (c != 0) & (c != 1), problem="is not 0 or 1"
        ),
        _Column("diameter_mm", False, check=lambda d: d < 0, problem="is a negative diameter"),
        _Column("probability", False),
    ]
    uids, index, coords, extra = _read_point_csv(path, columns, known_series)
    label = extra["class"]
    return CandidateTable(
        uids,
        index,
        coords,
        label=None if label is None else label.astype(np.int8),
        diameter_mm=extra["diameter_mm"],
        probability=extra["probability"],
        path=os.fspath(path),
    )


def read_results(
    path: str | os.PathLike, known_series: Collection[str] | None = None
) -> ResultTable:
    """Read a submission ``seriesuid,coordX,coordY,coordZ,probability`` (world mm).

    Raises:
        LungCTError: missing file or column, malformed row, non-numeric, NaN or infinite
            coordinate or probability, a series UID outside ``known_series`` (when given).
    """
    uids, index, coords, extra = _read_point_csv(path, [_Column("probability", True)], known_series)
    return ResultTable(uids, index, coords, probability=extra["probability"], path=os.fspath(path))


def read_seriesuids(path: str | os.PathLike) -> list[str]:
    """Read a series list (``seriesuids.csv``): one UID a line, no header, no duplicates.

    Surrounding whitespace and trailing blank lines are ignored; as in the official LUNA16
    script, only the first comma-separated field of a line is used.

    Raises:
        LungCTError: missing or empty file, a blank line inside the list, a header line, or a
            duplicated UID (naming both lines).
    """
    path = Path(path)
    uids: list[str] = []
    first_line: dict[str, int] = {}
    blank_at: int | None = None
    with _open_text(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                uid = line.split(",", 1)[0].strip()
                if not uid:
                    if blank_at is None:
                        blank_at = number
                    continue
                if blank_at is not None:
                    raise LungCTError(path, f"line {blank_at}: blank line inside the series list")
                if number == 1 and uid.lower() == "seriesuid":
                    raise LungCTError(path, "line 1: looks like a header; the list has none")
                if uid in first_line:
                    raise LungCTError(
                        path,
                        f"line {number}: seriesuid {uid!r} repeats line {first_line[uid]}",
                    )
                first_line[uid] = number
                uids.append(uid)
        except UnicodeDecodeError as exc:
            raise LungCTError(path, f"not a UTF-8 text file ({exc.reason})") from exc
    if not uids:
        raise LungCTError(path, "no series UIDs in the file")
    return uids


# ----------------------------------------------------------------------------------------------
# Folds
# ----------------------------------------------------------------------------------------------


def folds_from_layout(data_dir: str | os.PathLike) -> dict[str, int]:
    """Map every series UID to its LUNA16 fold from the ``subset0`` .. ``subset9`` folders.

    The ten LUNA16 subsets are the ten official cross-validation folds; a scan
    ``<data_dir>/subsetK/<seriesuid>.mhd`` is in fold K. A doubled folder
    (``subsetK/subsetK/*.mhd``, as some unzip tools leave it) is accepted. Missing subsets are
    allowed (a partial download), but not a data folder with none.

    Raises:
        LungCTError: missing folder, no subset folder with scans, or a UID in two subsets.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise LungCTError(root, "data folder not found")
    folds: dict[str, int] = {}
    where: dict[str, Path] = {}
    for fold in range(FOLD_COUNT):
        folder = root / f"subset{fold}"
        if not folder.is_dir():
            continue
        files = sorted(folder.glob("*.mhd"))
        if not files and (folder / folder.name).is_dir():
            files = sorted((folder / folder.name).glob("*.mhd"))
        for file in files:
            uid = file.stem
            if uid in folds:
                raise LungCTError(
                    file, f"series {uid!r} is also in {where[uid]} (a scan must be in one fold)"
                )
            folds[uid] = fold
            where[uid] = file
    if not folds:
        raise LungCTError(root, "no scans found in subset0..subset9 (expected subsetK/*.mhd)")
    return folds


_FOLD_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_folds(text: str, n_folds: int = FOLD_COUNT) -> list[int]:
    """Parse a fold selection: ``"9"``, ``"0,2,5"``, ``"0-7"`` or a mix such as ``"0-3,8"``.

    Returns the folds in the order given. Ranges are inclusive.

    Raises:
        LungCTError: empty text, a non-integer, a fold outside ``0..n_folds-1``, a reversed
            range or a fold named twice.
    """
    problem_prefix = f"folds {text!r}"
    if not text or not text.strip():
        raise LungCTError(None, f"{problem_prefix}: empty fold selection")
    folds: list[int] = []
    for item in text.split(","):
        match = _FOLD_ITEM.match(item)
        if match is None:
            raise LungCTError(
                None,
                f"{problem_prefix}: {item.strip()!r} is not a fold number or a range like 0-7",
            )
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise LungCTError(None, f"{problem_prefix}: range {lo}-{hi} is reversed")
        for fold in range(lo, hi + 1):
            if fold >= n_folds:
                raise LungCTError(
                    None, f"{problem_prefix}: fold {fold} is outside 0..{n_folds - 1}"
                )
            if fold in folds:
                raise LungCTError(None, f"{problem_prefix}: fold {fold} is named twice")
            folds.append(fold)
    return folds


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def write_csv_atomic(
    path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """Write a CSV (header + rows) atomically; floats keep their shortest round-trip form.

    The table is formatted in memory first, so the file's byte count is known and checked
    (:func:`lungct.fileio.write_text_atomic`) before it replaces anything.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())
