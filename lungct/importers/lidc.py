"""``lungct import lidc``: LIDC-IDRI as downloaded (DICOM + reading XML) -> the LUNA16 layout.

Every CT series folder under the inputs (in a TCIA download:
``LIDC-IDRI-0001/<study>/<series>/``, its reading XML inside it) becomes
``subsetN/<SeriesInstanceUID>.mhd``; its readings become rows of ``annotations.csv`` (nodules
>= 3 mm marked by at least 3 of the 4 readers, merged) and ``annotations_excluded.csv`` (every
other mark), as LUNA16 built them, and ``nodule_attributes.csv`` the nodules' ratings (the
median over the readers who rated each, and their number). Both tables carry the suite's
optional ``reader_count``
column: how many readers outlined the finding (empty for nodules < 3 mm and non-nodules). How a reader's mark is placed, how big it is and how readers
are merged is in :mod:`lungct.importers.lidc_xml`. Folds go by patient
(:mod:`lungct.importers.layout`). X-ray series (CR, DX) are skipped with a note.

The reading XML of a series is the ``.xml`` file in its folder; when there is none (or several),
the one among ``--xml`` folders whose header names the series. Every nodule, small-nodule and
non-nodule mark is placed on its slice by ``imageSOP_UID`` (or, failing that, by
``imageZposition``); a mark on a slice that is not in the series is an error, and so is an XML
whose header names another series.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom

from lungct.dicom import read_dicom_series
from lungct.errors import LungCTError
from lungct.importers.layout import (
    _NOT_DICOM,
    IMPORTER_VERSION,
    ScanSource,
    find_sources,
    fold_counts,
    folds_by,
    import_scans,
    write_tables,
)
from lungct.importers.lidc_xml import (
    MIN_READERS,
    SeriesSlices,
    merge_readers,
    parse_lidc_xml,
    place_marks,
    read_xml_series_uid,
)
from lungct.scan import Scan

DIAMETER_NOTE = (
    "per reader: diameter of the sphere of the volume the outlines enclose (outline pixels "
    "excluded); per nodule: mean over its readers"
)


def series_slices(folder: Path, scan: Scan) -> SeriesSlices:
    """Map the SOPInstanceUID of every image in ``folder`` to its slice of ``scan``."""
    positions = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.name.lower().endswith(_NOT_DICOM):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(
                    path,
                    stop_before_pixels=True,
                    specific_tags=["SOPInstanceUID", "ImagePositionPatient"],
                )
            uid = str(ds.SOPInstanceUID).strip()
            position = [float(v) for v in ds.ImagePositionPatient]
        except Exception:  # not an image slice; the series reader has checked the slices
            continue
        if len(position) == 3:
            positions[uid] = position
    return SeriesSlices.from_positions(scan.geometry, positions)


def _xml_index(folders: Sequence[str | os.PathLike]) -> dict[str, list[Path]]:
    """Series UID -> the reading XMLs under ``folders`` whose header names it."""
    index: dict[str, list[Path]] = defaultdict(list)
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise LungCTError(folder, "XML folder not found")
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() == ".xml":
                uid = read_xml_series_uid(path)
                if uid:
                    index[uid].append(path)
    return index


def find_reading_xml(source: ScanSource, index: dict[str, list[Path]]) -> Path:
    """The reading XML of a series (see the module's notes).

    Raises:
        LungCTError: none found, or several that could be it.
    """
    own = sorted(p for p in source.path.iterdir() if p.is_file() and p.suffix.lower() == ".xml")
    if len(own) == 1:
        return own[0]  # parse_lidc_xml's caller checks that it is of this series
    if len(own) > 1:
        matching = [p for p in own if read_xml_series_uid(p) == source.seriesuid]
        if len(matching) == 1:
            return matching[0]
        names = ", ".join(p.name for p in own[:4])
        raise LungCTError(
            source.path,
            f"holds {len(own)} XML files ({names}) and {len(matching) or 'none'} of them name "
            f"series {source.seriesuid}",
        )
    found = index.get(source.seriesuid, [])
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise LungCTError(
            source.path,
            f"several reading XMLs name series {source.seriesuid}: "
            + ", ".join(str(p) for p in found[:3]),
        )
    raise LungCTError(
        source.path,
        f"no LIDC reading XML for series {source.seriesuid} (none in the folder; give the "
        "folder of the XML files with --xml)",
    )


def convert_lidc_series(
    source: ScanSource, min_readers: int = MIN_READERS, max_slice_spacing: float | None = None
) -> tuple[Scan | None, dict[str, Any]]:
    """Read one LIDC series and its readings: the scan and its table rows.

    Returns:
        ``(scan, {"annotations": [[x, y, z, d, readers], ...], "excluded": [[x, y, z, d,
        readers], ...], "readers": n, "marks": {kind: n}})`` (``readers``: how many readers
        marked the finding; 0 = unknown), or ``(None, {"skipped": reason})`` for a series
        whose slices are further apart than ``max_slice_spacing``.

    Raises:
        LungCTError: the XML does not match the series (another SeriesInstanceUID, a slice not
            in the series), a reading is malformed, or the DICOM series cannot be read.
    """
    if source.xml is None:
        raise LungCTError(source.path, "no reading XML was found for this series")
    readings = parse_lidc_xml(source.xml)  # a broken XML fails before the pixels are read
    if readings.series_uid is not None and readings.series_uid != source.seriesuid:
        raise LungCTError(
            source.xml,
            f"is the reading of series {readings.series_uid}, not of the DICOM series in "
            f"{source.path} ({source.seriesuid})",
        )
    scan = read_dicom_series(source.path)
    if max_slice_spacing is not None and scan.spacing[2] > max_slice_spacing + 1e-6:
        return None, {"skipped": f"slice spacing {scan.spacing[2]:g} mm > {max_slice_spacing:g} mm"}
    marks = place_marks(readings, series_slices(source.path, scan))
    nodules, excluded = merge_readers(marks, min_readers=min_readers)
    kinds: dict[str, int] = defaultdict(int)
    for m in marks:
        kinds[m.kind] += 1
    return scan, {
        "annotations": [[*f.world, f.diameter_mm, len(f.readers)] for f in nodules],
        "attributes": [_attribute_row(f) for f in nodules],
        "excluded": [[*m.world, m.diameter_mm, m.finding_readers] for m in excluded],
        "readers": readings.readers,
        "marks": dict(kinds),
    }


def _attribute_row(nodule: Any) -> list:
    """``rating_readers``, the median ratings (``""`` where none) and the LIDC annotation
    labels of one nodule, for ``nodule_attributes.csv``."""
    readers, medians = nodule.ratings()
    labels = ";".join(sorted({m.label for m in nodule.marks}))
    return [readers, *("" if v is None else _half(v) for v in medians), labels]


def _half(value: float) -> float | int:
    """A median as written: a whole number without its ``.0``."""
    return int(value) if value == int(value) else value


def import_lidc(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    xml_folders: Sequence[str | os.PathLike] = (),
    min_readers: int = MIN_READERS,
    max_slice_spacing: float | None = None,
    keep_going: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Import LIDC-IDRI series and their readings into a LUNA16-layout folder.

    Args:
        inputs: folders searched for DICOM series (one series per folder), e.g. ``LIDC-IDRI``
            or ``LIDC-IDRI/LIDC-IDRI-0001``.
        out: the output folder (created; resumable, see :mod:`lungct.importers.layout`).
        xml_folders: folders of reading XMLs, for series whose folder holds none.
        min_readers: readers needed for a nodule (LUNA16: 3).
        max_slice_spacing: skip series with slices further apart (LUNA16 kept <= 2.5 mm).
        keep_going: report a series that cannot be imported and go on with the others.
        progress: a progress bar on stderr (on a terminal).

    Returns:
        The summary written to ``import.json`` (counts, folds, skipped and failed series).

    Raises:
        LungCTError: no CT series found; a series or its XML is bad (unless ``keep_going``).
    """
    out = Path(out)
    found = find_sources(inputs, out, files=False)
    sources = []
    skipped: dict[str, str] = {}
    for s in found:
        if s.modality and s.modality != "CT":
            skipped[str(s.path)] = f"modality {s.modality}, not CT"
            print(f"note: {s.path}: skipped (modality {s.modality}, not CT)", file=sys.stderr)
        else:
            sources.append(s)
    if not sources:
        where = ", ".join(str(p) for p in inputs)
        raise LungCTError(where, "no CT DICOM series found")
    index = _xml_index(xml_folders)
    with_xml = []
    failed: dict[str, str] = {}
    for s in sources:
        try:
            with_xml.append(replace(s, xml=find_reading_xml(s, index)))
        except LungCTError as exc:
            if not keep_going:
                raise
            failed[str(s.path)] = str(exc)
            print(f"error: {exc}", file=sys.stderr)
    result = import_scans(
        out,
        "lidc",
        with_xml,
        lambda s: convert_lidc_series(s, min_readers, max_slice_spacing),
        keep_going=keep_going,
        progress=progress,
    )
    records = result["records"]
    imported = {r["seriesuid"] for r in records}
    annotations = [[r["seriesuid"], *row] for r in records for row in r["annotations"]]
    excluded = [[r["seriesuid"], *row] for r in records for row in r["excluded"]]
    summary = {
        "importer": "lidc",
        "version": IMPORTER_VERSION,
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "xml_folders": [str(Path(p).resolve()) for p in xml_folders],
        "min_readers": min_readers,
        "max_slice_spacing": max_slice_spacing,
        "diameter": DIAMETER_NOTE,
        "scans": len(records),
        "kept": result["kept"],
        "removed": result["removed"],
        "patients": len({s.patient for s in with_xml if s.seriesuid in imported}),
        "annotations": len(annotations),
        "excluded": len(excluded),
        "folds": fold_counts(records),
        "folds_by": folds_by(records),
        "skipped": {**skipped, **result["skipped"]},
        "failed": {**failed, **result["failed"]},
    }
    attributes = None
    if all("attributes" in r for r in records):  # records of an earlier version have none
        attributes = [
            [r["seriesuid"], *row[:5], *attrs]
            for r in records
            for row, attrs in zip(r["annotations"], r["attributes"], strict=True)
        ]
    write_tables(
        out, records, annotations, excluded, summary, reader_counts=True, attributes=attributes
    )
    return summary
