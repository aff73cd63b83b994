"""Writing a synthetic data set in the real LUNA16 layout.

::

    OUT/
      subset0/ .. subset9/<seriesuid>.mhd + .zraw   scan i goes to subset i % 10
      annotations.csv            seriesuid,coordX,coordY,coordZ,diameter_mm,reader_count
                                 (>= 3 mm nodules; reader_count: 3 or 4 readers, drawn like
                                 LIDC's; LUNA16's own table has no such column)
      annotations_excluded.csv   same columns; < 3 mm, one-reader and non-nodule findings
                                 (diameter -1 = unknown, as in LUNA16; reader_count 1 or 2 for
                                 the one-reader nodules, empty = unknown for the others)
      candidates.csv             seriesuid,coordX,coordY,coordZ,class
      nodule_attributes.csv      one row per annotations.csv row: the LIDC ratings (subtlety ...
                                 malignancy) of the outline its shape came from (one reader),
                                 empty for analytic shapes and a background's own nodules
      seriesuids.csv             one UID a line, no header
      synth.json                 how it was made (seed, size, counts, generator version)
      seg-lungs/<seriesuid>.mhd  ground-truth lung masks (only with lung_masks=True)
      .synth/scan_NNNNN.json     per-scan record, written last: the resume marker

Every scan is made from (seed, index) alone, so scans are generated in parallel worker
processes (spawn-safe) and a rerun skips scans whose record matches; the CSVs are always
rewritten whole from the records, in index order, so they are byte-identical however the work
was split. On a real background the tables also hold the background's own LUNA16 rows, moved
with each scan's mirror and crop (:mod:`lungct.synth.background`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from lungct.errors import LungCTError
from lungct.fileio import read_json, write_json_atomic, write_text_atomic
from lungct.io import write_image, write_scan
from lungct.synth.background import (
    BackgroundFindings,
    read_background_findings,
    synthesize_on_background,
)
from lungct.synth.case import GENERATOR_VERSION, SIZES, SyntheticCase, synthesize_scan
from lungct.synth.shapes import shape_ratings
from lungct.tables import (
    ANNOTATION_COLUMNS,
    CANDIDATE_COLUMNS,
    NODULE_ATTRIBUTE_COLUMNS,
    RATING_COLUMNS,
    READER_COUNT_COLUMN,
    write_csv_atomic,
)

RECORD_DIR = ".synth"
N_SUBSETS = 10


def subset_of(index: int) -> int:
    """LUNA16 fold of scan ``index``: round-robin, so N = 20 gives two scans per fold."""
    return index % N_SUBSETS


def _round(v: float) -> float:
    # 1 micrometre is far below any voxel; fixed rounding keeps the CSVs short and stable.
    return round(float(v), 6)


def _job_key(
    seed: int,
    index: int,
    size: str,
    background: str | None,
    findings: BackgroundFindings | None,
    nodules_per_scan: int | None = None,
) -> dict:
    """What a scan's record must match to be kept on a rerun. The background's own findings
    are keyed by content, so other tables (or rows) regenerate, a moved file does not."""
    return {
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "index": int(index),
        "size": size,
        "background": background,
        "background_findings": None if findings is None else findings.digest(),
        "nodules_per_scan": None if nodules_per_scan is None else int(nodules_per_scan),
    }


def case_record(case: SyntheticCase, key: dict, out_dir: Path, mhd: Path) -> dict:
    """The JSON record of one written scan (its CSV rows and what made it)."""
    raw = mhd.with_suffix(".zraw")
    return {
        **key,
        "seriesuid": case.seriesuid,
        "subset": subset_of(case.index),
        "mhd": mhd.relative_to(out_dir).as_posix(),
        "raw_bytes": raw.stat().st_size if raw.exists() else None,
        "geometry": case.scan.geometry.to_dict(),
        "annotations": [
            [
                *(_round(v) for v in n.world),
                _round(n.diameter_mm),
                n.category,
                n.location,
                n.readers,
                n.shape,
            ]
            for n in case.nodules
        ],
        "excluded": [
            [
                *(_round(v) for v in n.world),
                _round(n.listed_diameter_mm),
                n.category,
                n.reason,
                n.readers,
            ]
            for n in case.excluded
        ],
        "candidates": [[*(_round(v) for v in c.world), c.label, c.source] for c in case.candidates],
        "info": case.info,
    }


def _make_one(job: tuple) -> dict:
    """Worker: synthesise, write the scan (and mask), then its record. Top level: spawn-safe."""
    out_dir, seed, index, size, background, findings, lung_masks, n_nodules = job
    out_dir = Path(out_dir)
    if background is None:
        case = synthesize_scan(seed, index, size, n_nodules=n_nodules)
    else:
        case = synthesize_on_background(background, seed, index, findings, n_nodules=n_nodules)
    mhd = out_dir / f"subset{subset_of(index)}" / f"{case.seriesuid}.mhd"
    write_scan(case.scan, mhd)
    if lung_masks:
        write_image(case.lung_mask, case.scan.geometry, out_dir / "seg-lungs" / mhd.name)
    key = _job_key(seed, index, size, background, findings, n_nodules)
    record = case_record(case, key, out_dir, mhd)
    write_json_atomic(out_dir / RECORD_DIR / f"scan_{index:05d}.json", record)
    return record


def _read_records(out_dir: Path) -> dict[int, tuple[Path, dict]]:
    records = {}
    folder = out_dir / RECORD_DIR
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("scan_*.json")):
        try:
            rec = json.loads(path.read_text())
            records[int(rec["index"])] = (path, rec)
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # a torn or foreign record: regenerate that scan
    return records


def _complete(out_dir: Path, rec: dict) -> bool:
    mhd = out_dir / rec.get("mhd", "")
    raw = mhd.with_suffix(".zraw")
    return mhd.is_file() and raw.is_file() and raw.stat().st_size == rec.get("raw_bytes")


def _remove_scan_files(out_dir: Path, rec: dict) -> None:
    """Delete a scan this generator wrote earlier (and only that: paths come from its record)."""
    mhd = out_dir / rec.get("mhd", "")
    if mhd.parent.parent != out_dir or not mhd.name.endswith(".mhd"):
        return
    for path in (mhd, mhd.with_suffix(".zraw")):
        path.unlink(missing_ok=True)
    for path in (out_dir / "seg-lungs" / mhd.name, out_dir / "seg-lungs" / (mhd.stem + ".zraw")):
        path.unlink(missing_ok=True)


def generate_dataset(
    out_dir: str | os.PathLike,
    n_scans: int,
    seed: int,
    size: str = "small",
    background: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int | None = None,
    lung_masks: bool = False,
    background_annotations: str | os.PathLike | None = None,
    background_excluded: str | os.PathLike | None = None,
    background_has_no_findings: bool = False,
    nodules_per_scan: int | None = None,
) -> dict:
    """Write ``n_scans`` synthetic scans and the LUNA16 tables to ``out_dir``.

    Args:
        out_dir: output folder (created). Scans from an earlier run with the same seed, size
            and background are kept (resume); scans this generator wrote for other settings
            or beyond ``n_scans`` are removed, so the folder always matches its tables.
        n_scans: number of scans.
        seed: data-set seed; scan ``i`` depends only on ``(seed, i)``.
        size: 'small' (fast, for tests and demos) or 'full' (512^2, LUNA16's spread of pixel
            and slice spacing).
        background: a real scan to put the nodules in; each scan is a mirrored and/or
            z-cropped copy of it (see :mod:`lungct.synth.background`).
        progress: show a progress bar over scans.
        workers: processes (default ``min(2, cpu count)``; 1 = in this process).
        lung_masks: also write the ground-truth lung masks to ``seg-lungs/``.
        background_annotations, background_excluded: LUNA16 ``annotations.csv`` and
            ``annotations_excluded.csv`` holding the background's own findings; their rows
            for its series go into the output tables, moved with the scan. Required with a
            background unless ``background_has_no_findings`` says there are none, so a real
            nodule is never taught as a negative.
        nodules_per_scan: ask for this many nodules in every scan instead of LUNA16's 0-4
            (a dense test set: more nodules measured per scan generated; a nodule that finds
            no free place in the lungs is left out, so a scan may hold fewer).

    Returns:
        A summary: counts of scans, nodules, excluded findings and candidates, skipped scans,
        seconds, and the per-scan series UIDs and subsets.
    """
    if size not in SIZES:
        raise LungCTError(None, f"size must be one of {', '.join(SIZES)}, got {size!r}")
    if n_scans < 1:
        raise LungCTError(None, f"the number of scans must be >= 1, got {n_scans}")
    if nodules_per_scan is not None and not 0 <= nodules_per_scan <= 30:
        raise LungCTError(None, f"nodules per scan must be 0-30, got {nodules_per_scan}")
    findings = None
    tables = (background_annotations, background_excluded)
    if background is None:
        if any(t is not None for t in tables) or background_has_no_findings:
            raise LungCTError(
                None, "the background's findings (or that it has none) need a background scan"
            )
    else:
        background = str(Path(background).resolve())
        if not Path(background).exists():
            raise LungCTError(background, "background scan not found")
        if background_has_no_findings and any(t is not None for t in tables):
            raise LungCTError(
                background, "it cannot both have no findings and have them in the tables given"
            )
        if all(t is not None for t in tables):
            findings = read_background_findings(background, *tables)
        elif any(t is not None for t in tables):
            raise LungCTError(
                None, "give both of the background's tables (annotations and excluded findings)"
            )
        elif background_has_no_findings:
            findings = BackgroundFindings()
        else:
            raise LungCTError(
                background,
                "its own findings are unknown: give its LUNA16 annotations and excluded "
                "findings (--background-annotations, --background-excluded), or say it has "
                "none (--background-has-no-findings), so no real nodule is taught as a negative",
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    records: dict[int, dict] = {}
    for index, (path, rec) in _read_records(out).items():
        key = _job_key(seed, index, size, background, findings, nodules_per_scan)
        if index < n_scans and all(rec.get(k) == v for k, v in key.items()) and _complete(out, rec):
            records[index] = rec
        else:
            _remove_scan_files(out, rec)
            path.unlink(missing_ok=True)
    skipped = len(records)
    todo = [i for i in range(n_scans) if i not in records]
    jobs = [
        (str(out), int(seed), i, size, background, findings, lung_masks, nodules_per_scan)
        for i in todo
    ]

    n_workers = min(workers or min(2, os.cpu_count() or 1), os.cpu_count() or 1, max(1, len(jobs)))
    bar = _progress(len(jobs), progress, initial_note=f"{skipped} done" if skipped else "")
    try:
        if n_workers <= 1:
            for job in jobs:
                rec = _make_one(job)
                records[rec["index"]] = rec
                bar.update(1)
        else:
            with ProcessPoolExecutor(n_workers, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_make_one, job) for job in jobs]
                for fut in as_completed(futures):
                    rec = fut.result()
                    records[rec["index"]] = rec
                    bar.update(1)
    finally:
        bar.close()

    ordered = [records[i] for i in range(n_scans)]
    write_tables(out, ordered)
    summary = {
        "out_dir": str(out),
        "seed": int(seed),
        "size": size,
        "background": background,
        "background_findings": None
        if findings is None
        else {"nodules": len(findings.nodules), "excluded": len(findings.excluded)},
        "generator_version": GENERATOR_VERSION,
        "nodules_per_scan": nodules_per_scan,
        "n_scans": n_scans,
        "n_skipped": skipped,
        "n_annotations": sum(len(r["annotations"]) for r in ordered),
        "n_excluded": sum(len(r["excluded"]) for r in ordered),
        "n_candidates": sum(len(r["candidates"]) for r in ordered),
        "n_positive_candidates": sum(c[3] == 1 for r in ordered for c in r["candidates"]),
        "scans": [
            {"index": r["index"], "seriesuid": r["seriesuid"], "subset": r["subset"]}
            for r in ordered
        ],
    }
    write_json_atomic(out / "synth.json", summary)
    (out / "synth.json").chmod(0o644)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary


def write_tables(out: Path, records: list[dict]) -> None:
    """annotations.csv, annotations_excluded.csv, candidates.csv and seriesuids.csv."""
    write_csv_atomic(
        out / "annotations.csv",
        (*ANNOTATION_COLUMNS, READER_COUNT_COLUMN),
        (
            [r["seriesuid"], *row[:4], _readers_text(row)]
            for r in records
            for row in r["annotations"]
        ),
    )
    write_csv_atomic(
        out / "annotations_excluded.csv",
        (*ANNOTATION_COLUMNS, READER_COUNT_COLUMN),
        (
            [r["seriesuid"], *row[:3], _diameter_text(row[3]), _readers_text(row)]
            for r in records
            for row in r["excluded"]
        ),
    )
    write_csv_atomic(
        out / "candidates.csv",
        CANDIDATE_COLUMNS,
        ([r["seriesuid"], *row[:4]] for r in records for row in r["candidates"]),
    )
    write_csv_atomic(
        out / "nodule_attributes.csv",
        NODULE_ATTRIBUTE_COLUMNS,
        (
            [r["seriesuid"], *row[:4], _readers_text(row), *_ratings_of(row)]
            for r in records
            for row in r["annotations"]
        ),
    )
    text = "".join(f"{r['seriesuid']}\n" for r in records)
    write_text_atomic(out / "seriesuids.csv", text)
    for name in (*_TABLES, "seriesuids.csv"):
        (out / name).chmod(0o644)  # temporary files are created private; tables are not


def _ratings_of(row: list) -> list:
    """``rating_readers``, the 9 ratings and the LIDC annotation id of a record's nodule: those
    of the reader whose outline its shape is (one reader), or empty cells."""
    shape = int(row[7]) if len(row) > 7 else -1
    if shape < 0:
        return [0, *[""] * len(RATING_COLUMNS), ""]
    ratings, ids = shape_ratings()
    return [1, *(int(v) for v in ratings[shape]), int(ids[shape])]


def _diameter_text(d: float) -> float | int:
    # LUNA16 writes unknown sizes as a bare -1.
    return -1 if d < 0 else d


def _readers_text(row: list) -> int | str:
    """A record row's reader count; empty when unknown (0, or a record written before the
    generator drew reader counts)."""
    readers = row[6] if len(row) > 6 else 0
    return int(readers) if readers else ""


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, initial_note: str = ""):
    if not enabled or total == 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="synth", unit="scan", postfix=initial_note or None)


SOURCES_FILE = "sources.json"
"""Written by :func:`merge_layouts`: the data sets a merged folder is made of."""

_TABLES = ("annotations.csv", "annotations_excluded.csv", "candidates.csv", "nodule_attributes.csv")
_OPTIONAL_TABLES = ("nodule_attributes.csv",)


def _merged_table(parts: list[tuple[list[str], list[str]]]) -> tuple[str, list[str]]:
    """One CSV (header line, row lines) from several parts' ``(header, row lines)``.

    Parts with the same columns are joined line by line; when their columns differ (a part
    with an optional column such as ``reader_count`` and one without), the header is the union
    of the columns in order of appearance and a part's missing cells are empty.
    """
    columns: list[str] = []
    for header, _ in parts:
        columns += [c for c in header if c not in columns]
    out: list[str] = []
    for header, lines in parts:
        if header == columns:
            out += lines
            continue
        where = [header.index(c) if c in header else None for c in columns]
        for row in csv.reader(lines):
            if not row:
                continue
            cells = ["" if i is None or i >= len(row) else row[i] for i in where]
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="").writerow(cells)
            out.append(buffer.getvalue())
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(columns)
    return buffer.getvalue(), out


def merge_layouts(
    out_dir: str | os.PathLike,
    parts: list[tuple[str | os.PathLike, list[int] | None]],
) -> dict:
    """One LUNA16-layout folder that shows several generated data sets as one.

    Each part is ``(folder, folds)``: its scans keep their own subsets when ``folds`` is
    ``None``, else they are dealt round-robin over ``folds`` (background copies of one real
    scan go to the training folds only, so no held-out subset holds a copy of trained anatomy).
    Scans are symbolic links into the parts; the tables are the parts' tables one after the
    other; ``sources.json`` names the parts. The folder is rebuilt whole on every call.

    Raises:
        LungCTError: a part that is not a LUNA16-layout folder, or a series in two parts.
    """
    from lungct.cache import find_scans

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for sub in out.glob("subset*"):
        if sub.is_dir():
            for link in sub.iterdir():
                if link.is_symlink():
                    link.unlink()
    seen: dict[str, str] = {}
    tables: dict[str, list[str]] = {name: [] for name in (*_TABLES, "seriesuids.csv")}
    parts_of: dict[str, list[tuple[list[str], list[str]] | None]] = {name: [] for name in _TABLES}
    sources = []
    for folder, folds in parts:
        folder = Path(folder).resolve()
        scans = find_scans(folder)
        for i, scan in enumerate(scans):
            if scan.seriesuid in seen:
                raise LungCTError(
                    folder, f"series {scan.seriesuid} is also in {seen[scan.seriesuid]}"
                )
            seen[scan.seriesuid] = str(folder)
            subset = scan.fold if folds is None else folds[i % len(folds)]
            target = out / f"subset{subset}"
            target.mkdir(exist_ok=True)
            for path in (scan.path, scan.path.with_suffix(".zraw")):
                if path.exists():
                    (target / path.name).symlink_to(path)
        for name in _TABLES:
            path = folder / name
            if not path.is_file():
                if name in _OPTIONAL_TABLES:  # a part made before the table existed
                    parts_of[name].append(None)
                    continue
                raise LungCTError(path, "missing: a merged part needs the LUNA16 tables")
            lines = path.read_text().splitlines()
            parts_of[name].append((next(csv.reader(lines[:1]), []), lines[1:]))
        tables["seriesuids.csv"] += [s.seriesuid for s in scans]
        synth = folder / "synth.json"
        sources.append(
            {
                "folder": folder.name,
                "path": str(folder),
                "scans": len(scans),
                "folds": folds,
                "synth": read_json(synth) if synth.is_file() else None,
            }
        )
    for name in _TABLES:
        if any(part is None for part in parts_of[name]):
            (out / name).unlink(missing_ok=True)  # not every part has it: none
            continue
        header, rows = _merged_table(parts_of[name])
        write_text_atomic(out / name, "\n".join([header, *rows]) + "\n")
    write_text_atomic(out / "seriesuids.csv", "".join(f"{u}\n" for u in tables["seriesuids.csv"]))
    summary = {"parts": sources, "scans": len(seen)}
    write_json_atomic(out / SOURCES_FILE, summary)
    return summary
