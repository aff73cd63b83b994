"""What both importers share: finding the input scans, folds by patient, writing the layout.

The output is the LUNA16 layout the rest of the suite reads (as :mod:`lungct.synth.layout`
writes it)::

    OUT/
      subset0/ .. subset9/<seriesuid>.mhd + .zraw   int16 HU, zlib-compressed MetaImage
      annotations.csv            seriesuid,coordX,coordY,coordZ,diameter_mm   (world mm)
                                 (LIDC: and reader_count, how many readers marked it)
      annotations_excluded.csv   same columns; diameter -1 = unknown (reader_count empty =
                                 unknown)
      seriesuids.csv             one UID a line, no header
      import.json                what was imported from where (counts, folds, skipped scans)
      .import/<seriesuid>.json   per-scan record: the resume marker

**Folds by patient.** Every scan of one patient goes to the same subset, so no patient is in
two folds. The patient is the DICOM PatientID; a scan without one (a NIfTI or MetaImage file,
or a DICOM series with an empty PatientID) is a patient of its own. Patients are dealt to the
ten subsets largest first, each to the subset holding the fewest scans so far (ties: the lower
subset; patients of equal size in the order of their IDs), so the same input always gives the
same folds. A patient imported before keeps its subset on a rerun (models trained on some
folds must never find their training scans in another fold): only new patients are dealt, to
the subsets holding the fewest scans.

**Resuming.** A scan's record is written when its MetaImage is whole; a rerun keeps a scan
whose record matches its source (paths, sizes and modification times of its files) and
rewrites the tables whole. Scans an earlier import wrote for inputs no longer given are
removed, so the folder always matches its tables. A folder holding scans that no import wrote
(a LUNA16 download, a synthetic set) is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pydicom

from lungct.errors import LungCTError
from lungct.fileio import WriteError, write_json_atomic, write_text_atomic
from lungct.io import scan_suffix, series_uid_from_path, write_scan
from lungct.scan import Scan
from lungct.tables import (
    ANNOTATION_COLUMNS,
    FOLD_COUNT,
    NODULE_ATTRIBUTE_COLUMNS,
    write_csv_atomic,
)

IMPORTER_VERSION = 1
"""Bumped when the importers' output changes; older records are then redone."""

RECORD_DIR = ".import"
SUMMARY_FILE = "import.json"
TABLES = ("annotations.csv", "annotations_excluded.csv", "seriesuids.csv")
ATTRIBUTES_TABLE = "nodule_attributes.csv"
"""The nodules' LIDC ratings, written by the LIDC importer."""

# Files that are never DICOM slices; skipped without being opened when looking for series.
_NOT_DICOM = (
    ".xml", ".csv", ".json", ".txt", ".md", ".png", ".jpg", ".jpeg", ".raw", ".zraw",
    ".mhd", ".mha", ".nii", ".gz", ".zip", ".py", ".html", ".pdf",
)  # fmt: skip
_PEEK_LIMIT = 50
"""Files tried per folder before deciding it holds no DICOM image."""

_SAFE_UID = re.compile(r"[^A-Za-z0-9._-]+")

READER_COUNT = "reader_count"
"""The optional column of the suite's annotation tables: how many readers marked a finding."""


@dataclass(frozen=True)
class ScanSource:
    """One scan to import.

    Attributes:
        path: a DICOM series folder or a scan file (.mhd, .mha, .nii, .nii.gz).
        seriesuid: its name in the layout (DICOM: SeriesInstanceUID; a file: its name).
        patient: the key that keeps a patient's scans in one fold.
        patient_from: ``"PatientID"`` (DICOM) or ``"file"`` (no patient known: a patient of
            its own).
        relative: its path relative to the input folder it was found in.
        names: other names a nodule table may use for it (file name, relative path, the path
            as found).
        modality: the DICOM Modality (empty for files).
        xml: the LIDC reading XML (LIDC import only).
    """

    path: Path
    seriesuid: str
    patient: str
    patient_from: str
    relative: str = ""
    names: tuple[str, ...] = ()
    modality: str = ""
    xml: Path | None = None

    @property
    def is_dicom(self) -> bool:
        """Whether the source is a DICOM series folder."""
        return self.path.is_dir()


# ----------------------------------------------------------------------------------------------
# Finding the inputs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DicomPeek:
    """What the first DICOM image of a folder says about its series."""

    series_uid: str
    patient_id: str
    modality: str


def peek_dicom_folder(folder: Path) -> DicomPeek | None:
    """The series of the first DICOM image file in ``folder`` (None: no DICOM image there)."""
    tried = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.name.lower().endswith(_NOT_DICOM) or path.name.startswith("."):
            continue
        tried += 1
        if tried > _PEEK_LIMIT:
            break
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(
                    path,
                    stop_before_pixels=True,
                    specific_tags=["Rows", "Modality", "SeriesInstanceUID", "PatientID"],
                )
        except Exception:  # not DICOM (pydicom raises many kinds of error on other bytes)
            continue
        if "Rows" not in ds:
            continue  # DICOMDIR and the like
        return DicomPeek(
            series_uid=str(ds.get("SeriesInstanceUID", "") or "").strip(),
            patient_id=str(ds.get("PatientID", "") or "").strip(),
            modality=str(ds.get("Modality", "") or "").strip(),
        )
    return None


def _walk(root: Path, out: Path) -> Iterable[tuple[Path, list[Path]]]:
    """Each folder under ``root`` (sorted, hidden folders and the output folder skipped) with
    its files."""
    out = out.resolve()
    for current, dirs, files in os.walk(root):
        here = Path(current)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() != out)
        yield here, [here / f for f in sorted(files)]


def find_sources(
    inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *, files: bool
) -> list[ScanSource]:
    """The scans under ``inputs``: DICOM series folders (one series per folder) and, with
    ``files``, MetaImage and NIfTI files. The output folder is never searched.

    Raises:
        LungCTError: an input that does not exist; two folders holding the same series.
    """
    out = Path(out)
    found: list[ScanSource] = []
    for given in inputs:
        root = Path(given)
        if not root.exists():
            raise LungCTError(root, "no such file or folder")
        if root.is_file():
            if not (files and scan_suffix(root)):
                kinds = ".mhd, .mha, .nii or .nii.gz file or a folder" if files else "folder"
                raise LungCTError(root, f"is not a {kinds}")
            found.append(_file_source(root, root.parent))
            continue
        if root.resolve() == out.resolve():
            raise LungCTError(root, "is the output folder; import from another folder")
        for folder, names in _walk(root, out):
            if files:
                found += [_file_source(p, root) for p in names if scan_suffix(p)]
            peek = peek_dicom_folder(folder)
            if peek is not None:
                found.append(_dicom_source(folder, root, peek))
    return _unique_uids(found)


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _file_source(path: Path, root: Path) -> ScanSource:
    stem = series_uid_from_path(path)
    rel = _relative(path, root)
    return ScanSource(
        path=path,
        seriesuid=_SAFE_UID.sub("_", stem),
        patient=f"file:{path.resolve()}",
        patient_from="file",
        relative=rel,
        names=tuple(dict.fromkeys((path.name, rel, stem, str(path)))),
    )


def _dicom_source(folder: Path, root: Path, peek: DicomPeek) -> ScanSource:
    uid = _SAFE_UID.sub("_", peek.series_uid) or _SAFE_UID.sub("_", folder.name)
    rel = _relative(folder, root)
    if peek.patient_id:
        patient, patient_from = f"PatientID:{peek.patient_id}", "PatientID"
    else:
        patient, patient_from = f"file:{folder.resolve()}", "file"
    return ScanSource(
        path=folder,
        seriesuid=uid,
        patient=patient,
        patient_from=patient_from,
        relative=rel,
        names=tuple(dict.fromkeys((folder.name, rel, str(folder)))),
        modality=peek.modality,
    )


def _unique_uids(sources: list[ScanSource]) -> list[ScanSource]:
    """Give files that share a name a name from their relative path; refuse a series found
    twice."""
    unique: dict[Path, ScanSource] = {}
    for s in sources:  # the same file or folder given twice counts once
        unique.setdefault(s.path.resolve(), s)
    by_uid: dict[str, list[ScanSource]] = defaultdict(list)
    for s in unique.values():
        by_uid[s.seriesuid].append(s)
    renamed = []
    for s in unique.values():
        if len(by_uid[s.seriesuid]) > 1 and not s.is_dicom:
            longer = _SAFE_UID.sub("_", series_uid_from_path(s.relative).replace("/", "_"))
            s = replace(s, seriesuid=longer)
        renamed.append(s)
    seen: dict[str, ScanSource] = {}
    for s in renamed:
        if s.seriesuid in seen:
            raise LungCTError(
                s.path, f"series {s.seriesuid} is also in {seen[s.seriesuid].path}; give it once"
            )
        seen[s.seriesuid] = s
    return renamed


# ----------------------------------------------------------------------------------------------
# Folds
# ----------------------------------------------------------------------------------------------


def patient_key(patient: str) -> str:
    """A digest of a patient key, kept in the records instead of the PatientID itself."""
    return hashlib.sha256(patient.encode("utf-8")).hexdigest()[:20]


def assign_folds(
    sources: Sequence[ScanSource],
    earlier: Mapping[str, int] | None = None,
    n_folds: int = FOLD_COUNT,
) -> dict[str, int]:
    """Series UID -> subset, every patient's scans in one subset (see the module's notes).

    Args:
        sources: the scans.
        earlier: :func:`patient_key` -> subset of patients imported before; they keep it.
        n_folds: the number of subsets.
    """
    by_patient: dict[str, list[str]] = defaultdict(list)
    for s in sources:
        by_patient[s.patient].append(s.seriesuid)
    earlier = earlier or {}
    load = [0] * n_folds
    chosen = {}
    for patient, uids in by_patient.items():
        fold = earlier.get(patient_key(patient))
        if fold is not None and 0 <= fold < n_folds:
            chosen[patient] = fold
            load[fold] += len(uids)
    for patient in sorted(by_patient, key=lambda p: (-len(by_patient[p]), p)):
        if patient not in chosen:
            chosen[patient] = min(range(n_folds), key=lambda f: (load[f], f))
            load[chosen[patient]] += len(by_patient[patient])
    return {uid: chosen[p] for p, uids in by_patient.items() for uid in uids}


# ----------------------------------------------------------------------------------------------
# Records and the import loop
# ----------------------------------------------------------------------------------------------


def fingerprint(paths: Iterable[Path]) -> str:
    """A digest of files' paths, sizes and modification times (a folder: its files)."""
    digest = hashlib.sha256()
    for path in paths:
        members = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for member in members:
            st = member.stat()
            digest.update(f"{member.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _source_files(source: ScanSource) -> list[Path]:
    paths = [source.path]
    if scan_suffix(source.path) == ".mhd":
        paths += [
            source.path.with_suffix(s)
            for s in (".raw", ".zraw")
            if source.path.with_suffix(s).exists()
        ]
    if source.xml is not None:
        paths.append(source.xml)
    return paths


def read_records(out: Path) -> dict[str, dict]:
    """The per-scan records of an earlier import into ``out`` (torn ones are dropped)."""
    records = {}
    folder = out / RECORD_DIR
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            records[str(record["seriesuid"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
    return records


def check_output_folder(out: Path, records: dict[str, dict]) -> None:
    """Refuse an output folder holding scans that no import wrote."""
    ours = {(out / str(r.get("mhd", ""))).resolve() for r in records.values()}
    for mhd in sorted(out.glob("subset*/*.mhd")):
        if mhd.resolve() not in ours:
            raise LungCTError(
                out,
                f"holds scans that no import wrote ({mhd.relative_to(out).as_posix()}); "
                "import into an empty folder or the folder of an earlier import",
            )


def _record_path(out: Path, uid: str) -> Path:
    return out / RECORD_DIR / f"{uid}.json"


def _complete(out: Path, record: dict) -> bool:
    mhd = out / str(record.get("mhd", ""))
    raw = mhd.with_suffix(".zraw")
    return (
        record.get("state") == "done"
        and mhd.is_file()
        and raw.is_file()
        and raw.stat().st_size == record.get("raw_bytes")
    )


def _remove_scan(out: Path, record: dict) -> None:
    """Delete a scan an import wrote (only what its record names) and its record."""
    mhd = out / str(record.get("mhd", ""))
    if mhd.parent.parent == out and mhd.name.endswith(".mhd"):
        for path in (mhd, mhd.with_suffix(".zraw")):
            path.unlink(missing_ok=True)
    _record_path(out, str(record["seriesuid"])).unlink(missing_ok=True)


def _move_scan(out: Path, record: dict, subset: int) -> dict:
    """Move a recorded scan into another subset (its patient's fold changed)."""
    mhd = out / record["mhd"]
    target = out / f"subset{subset}" / mhd.name
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(mhd.with_suffix(".zraw"), target.with_suffix(".zraw"))
    os.replace(mhd, target)
    record = {**record, "subset": subset, "mhd": target.relative_to(out).as_posix()}
    write_json_atomic(_record_path(out, record["seriesuid"]), record)
    return record


Convert = Callable[[ScanSource], tuple[Scan | None, dict[str, Any]]]
"""Read one source: ``(scan, extra record fields)``, or ``(None, {"skipped": reason})``."""


def import_scans(
    out: Path,
    importer: str,
    sources: Sequence[ScanSource],
    convert: Convert,
    *,
    keep_going: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write every source's scan into ``out`` (or keep it from an earlier run) with its record.

    Args:
        out: the output folder (created).
        importer: ``"lidc"`` or ``"own"``; part of each record's key.
        sources: the scans, in the order of ``seriesuids.csv``.
        convert: reads a source (see :data:`Convert`).
        keep_going: a source whose input is bad (:class:`LungCTError`) is reported and left
            out instead of ending the import; an output that cannot be written
            (:class:`lungct.fileio.WriteError`) still ends it.
        progress: a bar on stderr (on a terminal).

    Returns:
        ``{"records": [...], "kept": n, "skipped": {path: reason}, "failed": {path: message},
        "removed": n}``; records in source order.
    """
    from tqdm import tqdm

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LungCTError(out, f"cannot create the output folder ({exc.strerror or exc})") from None
    old = read_records(out)
    check_output_folder(out, old)
    earlier = {
        str(r["patient"]): int(r["subset"])
        for r in old.values()
        if r.get("state") == "done" and "patient" in r and "subset" in r
    }
    folds = assign_folds(sources, earlier)
    current = {s.seriesuid for s in sources}
    removed = 0
    for uid, record in old.items():
        if uid not in current:
            _remove_scan(out, record)
            removed += 1
    if removed:
        print(
            f"note: {out}: removed {removed} scan(s) of an earlier import that are not among "
            "the inputs now",
            file=sys.stderr,
        )
    records: list[dict] = []
    kept = 0
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    bar = tqdm(
        total=len(sources),
        desc=f"import {importer}",
        unit="scan",
        disable=None if progress else True,
    )
    try:
        for source in sources:
            key = {
                "version": IMPORTER_VERSION,
                "importer": importer,
                "source": str(source.path.resolve()),
                "xml": None if source.xml is None else str(source.xml.resolve()),
                "fingerprint": fingerprint(_source_files(source)),
            }
            subset = folds[source.seriesuid]
            record = old.get(source.seriesuid)
            if (
                record is not None
                and _complete(out, record)
                and all(record.get(k) == v for k, v in key.items())
            ):
                if record["subset"] != subset:
                    record = _move_scan(out, record, subset)
                records.append(record)
                kept += 1
                bar.update(1)
                continue
            if record is not None:
                _remove_scan(out, record)
            try:
                record = _import_one(out, source, subset, key, convert)
            except LungCTError as exc:
                if not keep_going or isinstance(exc, WriteError):
                    raise  # a full disk or a read-only folder would fail every scan alike
                failed[str(source.path)] = str(exc)
                print(f"error: {exc}", file=sys.stderr)
                record = None
            if record is not None and "skipped" in record:
                skipped[str(source.path)] = record["skipped"]
                print(f"note: {source.path}: skipped ({record['skipped']})", file=sys.stderr)
            elif record is not None:
                records.append(record)
            bar.update(1)
    finally:
        bar.close()
    return {
        "records": records,
        "kept": kept,
        "skipped": skipped,
        "failed": failed,
        "removed": removed,
    }


def _import_one(out: Path, source: ScanSource, subset: int, key: dict, convert: Convert) -> dict:
    scan, extra = convert(source)
    if scan is None:
        return {"skipped": extra.get("skipped", "not imported")}
    mhd = out / f"subset{subset}" / f"{source.seriesuid}.mhd"
    record = {
        **key,
        "state": "writing",
        "seriesuid": source.seriesuid,
        "subset": subset,
        "mhd": mhd.relative_to(out).as_posix(),
        "patient": patient_key(source.patient),
        "patient_from": source.patient_from,
    }
    # Written before the scan, so a scan left by a killed run is known as this importer's.
    write_json_atomic(_record_path(out, source.seriesuid), record)
    write_scan(scan, mhd)
    record.update(
        state="done",
        raw_bytes=mhd.with_suffix(".zraw").stat().st_size,
        geometry=scan.geometry.to_dict(),
        stored_hu_range=[scan.hu_min, scan.hu_max],
        **extra,
    )
    write_json_atomic(_record_path(out, source.seriesuid), record)
    return record


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _round(v: float) -> float:
    # 1 micrometre is far below any voxel; fixed rounding keeps the tables short and stable.
    return round(float(v), 6)


def _diameter(d: float) -> float | int:
    return -1 if d < 0 else _round(d)  # LUNA16 writes an unknown size as a bare -1


def write_tables(
    out: Path,
    records: Sequence[dict],
    annotations: Sequence[Sequence[Any]],
    excluded: Sequence[Sequence[Any]],
    summary: dict[str, Any],
    reader_counts: bool = False,
    attributes: Sequence[Sequence[Any]] | None = None,
) -> None:
    """Write annotations.csv, annotations_excluded.csv, seriesuids.csv and import.json.

    ``annotations`` and ``excluded`` hold ``(seriesuid, x, y, z, diameter_mm)`` rows, with
    ``reader_counts`` a sixth value: how many readers marked the finding (the optional
    ``reader_count`` column of the suite's tables; 0 is written empty, unknown).
    ``attributes``, when given, are the rows of ``nodule_attributes.csv``
    (:data:`lungct.tables.NODULE_ATTRIBUTE_COLUMNS`), one per annotation.
    """
    if attributes is not None:
        write_csv_atomic(
            out / ATTRIBUTES_TABLE,
            NODULE_ATTRIBUTE_COLUMNS,
            (
                [
                    row[0],
                    *(_round(v) for v in row[1:4]),
                    _diameter(row[4]),
                    int(row[5]) or "",
                    *row[6:],
                ]
                for row in attributes
            ),
        )
        (out / ATTRIBUTES_TABLE).chmod(0o644)
    header = (*ANNOTATION_COLUMNS, READER_COUNT) if reader_counts else ANNOTATION_COLUMNS
    for name, rows in (("annotations.csv", annotations), ("annotations_excluded.csv", excluded)):
        write_csv_atomic(
            out / name,
            header,
            (
                [
                    row[0],
                    *(_round(v) for v in row[1:4]),
                    _diameter(row[4]),
                    *([int(row[5]) or ""] if reader_counts else []),
                ]
                for row in rows
            ),
        )
    write_text_atomic(out / "seriesuids.csv", "".join(f"{r['seriesuid']}\n" for r in records))
    write_json_atomic(out / SUMMARY_FILE, summary)
    for name in (*TABLES, SUMMARY_FILE):
        (out / name).chmod(0o644)  # temporary files are created private; tables are not


def fold_counts(records: Sequence[dict]) -> dict[str, int]:
    """Scans per subset, ``{"subset0": n, ...}`` (empty subsets left out)."""
    counts: dict[int, int] = defaultdict(int)
    for r in records:
        counts[int(r["subset"])] += 1
    return {f"subset{k}": counts[k] for k in sorted(counts)}


def folds_by(records: Sequence[dict]) -> dict[str, int]:
    """How many scans were given their fold by DICOM PatientID and how many by file."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[r.get("patient_from", "file")] += 1
    return dict(counts)
