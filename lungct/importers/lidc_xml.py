"""The LIDC-IDRI reading XML: parse it, place every mark in world millimetres, merge readers.

One XML file (``069.xml`` beside the LIDC-IDRI-0001 series) holds up to four radiologists'
readings of one CT series, in the namespace ``http://www.nih.gov``::

    LidcReadMessage
      ResponseHeader/SeriesInstanceUid         the series the readings are of
      readingSession                           one radiologist (servicingRadiologistID)
        unblindedReadNodule                    a nodule: noduleID, characteristics, roi...
          roi                                  one slice: imageZposition, imageSOP_UID,
                                               inclusion (TRUE/FALSE), edgeMap (xCoord, yCoord)...
        nonNodule                              not a nodule: nonNoduleID, imageZposition,
                                               imageSOP_UID, locus (xCoord, yCoord)

A nodule of 3 mm or more is outlined on each slice it crosses (many ``edgeMap`` points per
``roi``); a nodule under 3 mm is a single point (its centre); a non-nodule is a single point.
``xCoord`` is the pixel column and ``yCoord`` the pixel row (0-based) of the slice that
``imageSOP_UID`` names (else the slice at ``imageZposition``).

**Where a reader's mark is and how big.** Pixels become world millimetres through the series
geometry (origin, spacing and direction, :class:`lungct.geometry.Geometry`), never by assuming
axes. For an outlined nodule the reader's region is, on each slice, the pixels the outline
encloses, *without the outline's own pixels* (the LIDC readers drew the outline just outside
the nodule), less the pixels enclosed by the reader's exclusion outlines (``inclusion`` FALSE).
The outline is closed through its points in order (straight steps between them). The mark's
centre is the mean position of the region's voxels, and its **diameter is that of a sphere of
the region's volume** (voxel count x voxel volume): ``d = (6 V / pi) ** (1/3)``. When the
outlines enclose no pixel at all (outlines one pixel wide), the outline pixels themselves are
the region. On LIDC-IDRI-0001 this reproduces one reader's row of LUNA16's excluded list
(centre and diameter, 23.50 mm) to 0.001 mm; on 249 LUNA16 scans with one nodule (outlines from
the LIDC database, merged as below) the merged diameter is within 15 % of LUNA16's (median
-0.4 %). A nodule under 3 mm or a non-nodule is placed at its point
(the mean of its points if there are several); its diameter is unknown (-1, as in LUNA16).

**Merging readers** (the LUNA16 protocol): two readers' outlined marks are the same finding when
their centres are closer than the sum of their radii (their spheres overlap); the findings are
the groups linked that way. A finding marked by at least ``min_readers`` (3) of the readers is
a nodule: its centre is the mean of those readers' centres and its diameter the mean of their
diameters. Every other mark (outlined nodules of one or two readers, each reader's nodules
under 3 mm, each non-nodule) is an excluded finding on its own row, as in LUNA16's
``annotations_excluded.csv``.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import numpy as np
from scipy import ndimage

from lungct.errors import LungCTError
from lungct.geometry import Geometry

try:  # refuses entity expansion and external references; optional
    from defusedxml.ElementTree import iterparse as _iterparse_xml
    from defusedxml.ElementTree import parse as _parse_xml
except ImportError:  # pragma: no cover - the standard library's parser resolves no external entity
    from xml.etree.ElementTree import iterparse as _iterparse_xml
    from xml.etree.ElementTree import parse as _parse_xml

LIDC_NAMESPACE = "http://www.nih.gov"
"""The namespace of the LIDC reading XML's elements."""

MIN_READERS = 3
"""LUNA16's reference standard: nodules >= 3 mm marked by at least 3 of the 4 readers."""

UNKNOWN_DIAMETER = -1.0
"""The diameter written for a finding of unknown size (LUNA16's excluded findings)."""


@dataclass(frozen=True)
class Roi:
    """One slice of a reader's nodule mark: an outline (or a single centre point).

    Attributes:
        z_position: ``imageZposition`` (world z of the slice, mm), if given.
        sop_uid: ``imageSOP_UID`` (the slice's SOPInstanceUID), if given.
        inclusion: False for an exclusion outline (a hole in the nodule).
        points: ``(N, 2)`` int pixel positions ``(column, row)``, in the outline's order.
    """

    z_position: float | None
    sop_uid: str | None
    inclusion: bool
    points: np.ndarray


@dataclass(frozen=True)
class Reading:
    """One reader's mark as written in the XML.

    Attributes:
        reader: the reader's index in the file (its readingSession element, 0-based).
        radiologist: its ``servicingRadiologistID`` (for messages).
        kind: ``"nodule"`` (outlined, >= 3 mm), ``"small nodule"`` (a centre point, < 3 mm)
            or ``"non-nodule"`` (a point).
        label: the ``noduleID`` / ``nonNoduleID``.
        rois: the slices of the mark (a non-nodule has one, its locus).
        ratings: the reader's ``characteristics`` of an outlined nodule, in
            :data:`lungct.tables.RATING_COLUMNS` order (``None`` where not given).
    """

    reader: int
    radiologist: str
    kind: str
    label: str
    rois: tuple[Roi, ...]
    ratings: tuple[int | None, ...] = ()

    def describe(self) -> str:
        """``reading 2 (radiologist 1234), nodule 'Nodule 001'``: where a problem lies."""
        noun = "non-nodule" if self.kind == "non-nodule" else "nodule"
        return f"reading {self.reader + 1} (radiologist {self.radiologist}), {noun} {self.label!r}"


@dataclass(frozen=True)
class LidcReadings:
    """Everything the importer needs from one LIDC reading XML.

    Attributes:
        path: the XML file.
        series_uid: the ``SeriesInstanceUid`` of its header (None if the header has none).
        readers: the number of readers (readingSession elements).
        marks: every reader's mark, in the file's order.
    """

    path: Path
    series_uid: str | None
    readers: int
    marks: tuple[Reading, ...]


@dataclass(frozen=True)
class ReaderMark:
    """One reader's mark placed in the world.

    Attributes:
        reader: the reader's index (0-based).
        kind: as :attr:`Reading.kind`.
        label: the mark's id in the XML.
        world: centre, world ``(x, y, z)`` mm.
        diameter_mm: equivalent-sphere diameter of an outlined nodule; -1 (unknown) otherwise.
        finding_readers: how many readers marked the finding this outlined mark belongs to
            (set by :func:`merge_readers`; 0 = unknown, as for small nodules and non-nodules).
        ratings: as :attr:`Reading.ratings`.
    """

    reader: int
    kind: str
    label: str
    world: tuple[float, float, float]
    diameter_mm: float
    finding_readers: int = 0
    ratings: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class Finding:
    """A nodule of the reference standard: readers' outlined marks merged.

    Attributes:
        world: mean of the readers' centres, world ``(x, y, z)`` mm.
        diameter_mm: mean of the readers' diameters.
        readers: the readers who marked it (reader indices).
        marks: the merged marks.
    """

    world: tuple[float, float, float]
    diameter_mm: float
    readers: tuple[int, ...]
    marks: tuple[ReaderMark, ...]

    def ratings(self) -> tuple[int, list[float | None]]:
        """How many of its readers rated it, and the median of each rating over them (a reader
        with two marks in it counts once, by the first that has the rating)."""
        from lungct.tables import RATING_COLUMNS

        per_reader: dict[int, list[int | None]] = {}
        for m in self.marks:
            mine = per_reader.setdefault(m.reader, [None] * len(RATING_COLUMNS))
            for i, value in enumerate(m.ratings):
                if mine[i] is None and value is not None:
                    mine[i] = value
        rated = [r for r in per_reader.values() if any(v is not None for v in r)]
        medians: list[float | None] = []
        for i in range(len(RATING_COLUMNS)):
            values = [r[i] for r in rated if r[i] is not None]
            medians.append(float(np.median(values)) if values else None)
        return len(rated), medians


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------


def _split_tag(tag: str) -> tuple[str, str]:
    """``{namespace}local`` -> ``(namespace, local)``."""
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        return namespace, local
    return "", tag


class _Names:
    """Element names in the file's namespace."""

    def __init__(self, namespace: str) -> None:
        self.prefix = f"{{{namespace}}}" if namespace else ""

    def __call__(self, local: str) -> str:
        return self.prefix + local


def _text(elem: Element, name: str) -> str | None:
    child = elem.find(name)
    if child is None or child.text is None:
        return None
    return child.text.strip()


def parse_lidc_xml(path: str | os.PathLike) -> LidcReadings:
    """Read an LIDC reading XML (``LidcReadMessage``).

    Raises:
        LungCTError: the file is missing, not XML, not an LIDC CT reading, or a mark in it is
            malformed: a nodule reading with no contours (no ``roi`` or an ``roi`` with no
            ``edgeMap``), a non-nodule without a ``locus``, a slice given by neither
            ``imageSOP_UID`` nor ``imageZposition``, a coordinate that is not a whole number.
            The message names the file, the reading and the mark.
    """
    path = Path(path)
    try:
        tree = _parse_xml(path)
    except FileNotFoundError:
        raise LungCTError(path, "file not found") from None
    except OSError as exc:
        raise LungCTError(path, f"cannot be read ({exc.strerror or exc})") from None
    except (ParseError, ValueError) as exc:
        # ValueError: defusedxml's refusal of entities and document type declarations.
        reason = " ".join(str(exc).split())[:120]
        raise LungCTError(path, f"is not valid XML ({reason})") from None
    root = tree.getroot()
    namespace, local = _split_tag(root.tag)
    if local != "LidcReadMessage":
        raise LungCTError(
            path,
            f"is not an LIDC CT reading (its root element is {local!r}, not 'LidcReadMessage')",
        )
    q = _Names(namespace)
    series_uid = None
    header = root.find(q("ResponseHeader"))
    if header is not None:
        for child in header:
            if _split_tag(child.tag)[1].lower() == "seriesinstanceuid" and child.text:
                series_uid = child.text.strip() or None
    marks: list[Reading] = []
    readings_found = root.findall(q("readingSession"))
    for reader, reading in enumerate(readings_found):
        radiologist = _text(reading, q("servicingRadiologistID")) or "?"
        for elem in reading:
            kind = _split_tag(elem.tag)[1]
            if kind == "unblindedReadNodule":
                marks.append(_nodule_reading(path, q, elem, reader, radiologist))
            elif kind == "nonNodule":
                marks.append(_non_nodule_reading(path, q, elem, reader, radiologist))
    return LidcReadings(
        path=path, series_uid=series_uid, readers=len(readings_found), marks=tuple(marks)
    )


def read_xml_series_uid(path: str | os.PathLike) -> str | None:
    """The ``SeriesInstanceUid`` in an LIDC XML's header, reading no further than it (None when
    the file is not an LIDC CT reading or names no series)."""
    try:
        for _event, elem in _iterparse_xml(os.fspath(path)):
            local = _split_tag(elem.tag)[1]
            if local.lower() == "seriesinstanceuid":
                return (elem.text or "").strip() or None
            if local == "readingSession":
                return None  # past the header
    except (ParseError, ValueError, OSError):
        return None
    return None


def _nodule_reading(path: Path, q: _Names, elem: Element, reader: int, who: str) -> Reading:
    label = _text(elem, q("noduleID")) or "?"
    draft = Reading(reader, who, "nodule", label, ())
    rois = []
    for roi in elem.findall(q("roi")):
        inclusion = (_text(roi, q("inclusion")) or "TRUE").upper() != "FALSE"
        points = _points(path, draft, roi.findall(q("edgeMap")), q)
        if not len(points):
            raise LungCTError(path, f"{draft.describe()}: an roi has no contour points (edgeMap)")
        rois.append(_roi(path, draft, roi, q, inclusion, points))
    if not rois:
        raise LungCTError(path, f"{draft.describe()}: has no contours (no roi element)")
    outlined = any(len(r.points) > 1 for r in rois)
    kind = "nodule" if outlined else "small nodule"
    if not any(r.inclusion for r in rois):
        raise LungCTError(path, f"{draft.describe()}: has only exclusion outlines")
    return Reading(reader, who, kind, label, tuple(rois), _ratings(path, q, elem, draft))


def _ratings(path: Path, q: _Names, elem: Element, mark: Reading) -> tuple[int | None, ...]:
    """A nodule reading's ``characteristics`` (``None`` for a rating it does not give).

    Raises:
        LungCTError: a rating that is not a whole number in its LIDC scale.
    """
    from lungct.tables import RATING_COLUMNS, RATING_SCALES

    found = elem.find(q("characteristics"))
    out: list[int | None] = []
    for name in RATING_COLUMNS:
        text = _text(found, q(name)) if found is not None else None
        if text is None or not text.strip():
            out.append(None)
            continue
        lo, hi = RATING_SCALES[name]
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise LungCTError(
                path, f"{mark.describe()}: {name} {text.strip()!r} is not a rating {lo}-{hi}"
            )
        out.append(value)
    return tuple(out)


def _non_nodule_reading(path: Path, q: _Names, elem: Element, reader: int, who: str) -> Reading:
    label = _text(elem, q("nonNoduleID")) or "?"
    draft = Reading(reader, who, "non-nodule", label, ())
    points = _points(path, draft, elem.findall(q("locus")), q)
    if not len(points):
        raise LungCTError(path, f"{draft.describe()}: has no position (locus)")
    return Reading(reader, who, "non-nodule", label, (_roi(path, draft, elem, q, True, points),))


def _roi(path: Path, mark: Reading, elem: Element, q: _Names, inclusion: bool, points) -> Roi:
    sop_uid = _text(elem, q("imageSOP_UID")) or None
    z_text = _text(elem, q("imageZposition"))
    z_position = None
    if z_text:
        try:
            z_position = float(z_text)
        except ValueError:
            raise LungCTError(
                path, f"{mark.describe()}: imageZposition {z_text[:40]!r} is not a number"
            ) from None
        if not np.isfinite(z_position):
            raise LungCTError(path, f"{mark.describe()}: imageZposition {z_text!r} is not finite")
    if sop_uid is None and z_position is None:
        raise LungCTError(
            path, f"{mark.describe()}: a slice has neither imageSOP_UID nor imageZposition"
        )
    return Roi(z_position=z_position, sop_uid=sop_uid, inclusion=inclusion, points=points)


def _points(path: Path, mark: Reading, elems: list[Element], q: _Names) -> np.ndarray:
    points = []
    for elem in elems:
        pair = []
        for axis in ("xCoord", "yCoord"):
            text = _text(elem, q(axis))
            try:
                value = float(text) if text is not None else float("nan")
            except ValueError:
                value = float("nan")
            if not np.isfinite(value) or value != round(value):
                raise LungCTError(
                    path, f"{mark.describe()}: {axis} {text!r} is not a whole pixel number"
                )
            pair.append(int(value))
        points.append(pair)
    return np.asarray(points, dtype=np.int64).reshape(-1, 2)


# ----------------------------------------------------------------------------------------------
# Slices of the series
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSlices:
    """Which slice index (``k`` of the ``[k, row, column]`` array) each DICOM image is.

    Attributes:
        by_sop_uid: SOPInstanceUID -> slice index.
        z_positions: world z (mm) of each slice's first pixel, by slice index (what LIDC's
            ``imageZposition`` states).
        geometry: the series geometry.
    """

    by_sop_uid: dict[str, int]
    z_positions: np.ndarray
    geometry: Geometry

    @classmethod
    def from_positions(
        cls, geometry: Geometry, positions: dict[str, Sequence[float]]
    ) -> SeriesSlices:
        """Build the map from each image's SOPInstanceUID and ImagePositionPatient (mm)."""
        by_uid = {}
        nz = geometry.size[2]
        for uid, position in positions.items():
            k = float(geometry.world_to_voxel(np.asarray(position, dtype=np.float64))[0])
            index = round(k)
            if abs(k - index) < 0.1 and 0 <= index < nz:
                by_uid[uid] = index
        ks = np.arange(nz, dtype=np.float64)
        zeros = np.zeros_like(ks)
        z = geometry.voxel_to_world(np.stack([ks, zeros, zeros], axis=1))[:, 2]
        return cls(by_sop_uid=by_uid, z_positions=z, geometry=geometry)

    def locate(self, roi: Roi) -> int | None:
        """The slice index of ``roi``: by its SOP UID, else by its z position (the slice within
        a quarter of the slice step); None when neither matches."""
        if roi.sop_uid is not None and roi.sop_uid in self.by_sop_uid:
            return self.by_sop_uid[roi.sop_uid]
        if roi.z_position is None or len(self.z_positions) < 2:
            return None
        step = float(np.median(np.abs(np.diff(self.z_positions))))
        if step < 1e-3:  # a series whose slices do not step along z (sagittal, coronal)
            return None
        k = int(np.argmin(np.abs(self.z_positions - roi.z_position)))
        return k if abs(self.z_positions[k] - roi.z_position) <= 0.25 * step else None


# ----------------------------------------------------------------------------------------------
# Marks in the world
# ----------------------------------------------------------------------------------------------


def _closed_outline(points: np.ndarray) -> np.ndarray:
    """The pixels of the closed polygon through ``points`` (``(column, row)``), 8-connected."""
    closed = np.vstack([points, points[:1]])
    pieces = []
    for a, b in itertools.pairwise(closed):
        steps = int(np.abs(b - a).max())
        t = np.arange(steps + 1, dtype=np.float64) / max(steps, 1)
        pieces.append(np.rint(a + np.outer(t, b - a)).astype(np.int64))
    return np.vstack(pieces)


def _slice_region(rois: list[Roi]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows and columns of one slice's region: enclosed pixels without the outlines (first
    pair) and with them (second pair), inclusion outlines less exclusion outlines."""
    outlines = [(_closed_outline(r.points), r.inclusion) for r in rois]
    allp = np.vstack([o for o, _ in outlines])
    x0, y0 = allp.min(axis=0) - 1
    x1, y1 = allp.max(axis=0) + 1
    shape = (int(y1 - y0 + 1), int(x1 - x0 + 1))
    inner = np.zeros(shape, bool)
    filled_all = np.zeros(shape, bool)
    holes = np.zeros(shape, bool)
    for outline, inclusion in outlines:
        edge = np.zeros(shape, bool)
        edge[outline[:, 1] - y0, outline[:, 0] - x0] = True
        # The background is flooded 4-connected, so an 8-connected outline holds it back.
        filled = ndimage.binary_fill_holes(edge)
        enclosed = filled & ~edge
        if inclusion:
            inner |= enclosed
            filled_all |= filled
        else:
            holes |= enclosed
    rows_in, cols_in = np.nonzero(inner & ~holes)
    rows_all, cols_all = np.nonzero(filled_all & ~holes)
    return rows_in + y0, cols_in + x0, rows_all + y0, cols_all + x0


def place_marks(readings: LidcReadings, slices: SeriesSlices) -> list[ReaderMark]:
    """Every reader's mark in world millimetres, in the file's order (see the module's notes
    for the centre and the diameter).

    Raises:
        LungCTError: a slice of a mark is not in the series, or a point lies outside the image;
            the message names the XML file and the mark.
    """
    geometry = slices.geometry
    columns, rows = geometry.size[0], geometry.size[1]
    voxel_volume = abs(float(np.linalg.det(geometry.index_to_world_matrix)))
    placed = []
    for mark in readings.marks:
        by_slice: dict[int, list[Roi]] = defaultdict(list)
        for roi in mark.rois:
            k = slices.locate(roi)
            if k is None:
                where = roi.sop_uid if roi.sop_uid is not None else f"z {roi.z_position:g} mm"
                raise LungCTError(
                    readings.path,
                    f"{mark.describe()}: slice {where} is not in the series (is this XML the "
                    "reading of another series?)",
                )
            x, y = roi.points[:, 0], roi.points[:, 1]
            if x.min() < 0 or y.min() < 0 or x.max() >= columns or y.max() >= rows:
                raise LungCTError(
                    readings.path,
                    f"{mark.describe()}: a point lies outside the {columns}x{rows} image",
                )
            by_slice[k].append(roi)
        if mark.kind == "nodule":
            outlined = _outlined_centre(by_slice, voxel_volume)
            if outlined is None:
                raise LungCTError(
                    readings.path, f"{mark.describe()}: its exclusion outlines cover it whole"
                )
            centre, diameter = outlined
        else:
            pts = [(k, p[1], p[0]) for k, rois in by_slice.items() for r in rois for p in r.points]
            centre, diameter = np.mean(np.asarray(pts, np.float64), axis=0), UNKNOWN_DIAMETER
        world = geometry.voxel_to_world(centre)
        placed.append(
            ReaderMark(
                reader=mark.reader,
                kind=mark.kind,
                label=mark.label,
                world=(float(world[0]), float(world[1]), float(world[2])),
                diameter_mm=float(diameter),
                ratings=mark.ratings,
            )
        )
    return placed


def _outlined_centre(
    by_slice: dict[int, list[Roi]], voxel_volume: float
) -> tuple[np.ndarray, float] | None:
    """Mean voxel ``(k, row, column)`` and equivalent-sphere diameter of an outlined mark
    (None when its region is empty)."""
    sums = np.zeros((2, 3))
    counts = np.zeros(2)
    for k, rois in by_slice.items():
        if not any(r.inclusion for r in rois):
            continue
        rows_in, cols_in, rows_all, cols_all = _slice_region(rois)
        for i, (r, c) in enumerate(((rows_in, cols_in), (rows_all, cols_all))):
            counts[i] += len(r)
            sums[i] += (k * len(r), r.sum(), c.sum())
    use = 0 if counts[0] > 0 else 1  # outlines one pixel wide enclose nothing: use the outlines
    if counts[use] == 0:
        return None
    volume = counts[use] * voxel_volume
    return sums[use] / counts[use], float((6.0 * volume / np.pi) ** (1.0 / 3.0))


def merge_readers(
    marks: Sequence[ReaderMark], min_readers: int = MIN_READERS
) -> tuple[list[Finding], list[ReaderMark]]:
    """Group the readers' outlined marks into findings; keep those of ``min_readers`` or more.

    Two outlined marks of different readers are linked when their centres are closer than the
    sum of their radii; a finding is a group of linked marks. A finding marked by at least
    ``min_readers`` distinct readers is a nodule (centre and diameter: the mean over its
    readers, a reader with two marks in it counting once, by the mean of the two).

    Returns:
        ``(nodules, excluded)``: the nodules in the order of their first mark, and every other
        mark (outlined marks of findings with fewer readers, small nodules, non-nodules) in the
        file's order, outlined ones with :attr:`ReaderMark.finding_readers` set.
    """
    outlined = [i for i, m in enumerate(marks) if m.kind == "nodule" and m.diameter_mm > 0]
    parent = {i: i for i in outlined}

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a_pos, a in enumerate(outlined):
        for b in outlined[a_pos + 1 :]:
            ma, mb = marks[a], marks[b]
            if ma.reader == mb.reader:
                continue
            distance = float(np.linalg.norm(np.subtract(ma.world, mb.world)))
            if distance < (ma.diameter_mm + mb.diameter_mm) / 2:
                parent[root(a)] = root(b)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in outlined:
        groups[root(i)].append(i)
    nodules = []
    accepted: set[int] = set()
    counted: dict[int, int] = {}
    for members in sorted(groups.values(), key=min):
        per_reader: dict[int, list[ReaderMark]] = defaultdict(list)
        for i in members:
            per_reader[marks[i].reader].append(marks[i])
        if len(per_reader) < min_readers:
            counted.update((i, len(per_reader)) for i in members)
            continue
        centres = [np.mean([m.world for m in ms], axis=0) for ms in per_reader.values()]
        diameters = [float(np.mean([m.diameter_mm for m in ms])) for ms in per_reader.values()]
        centre = np.mean(centres, axis=0)
        nodules.append(
            Finding(
                world=(float(centre[0]), float(centre[1]), float(centre[2])),
                diameter_mm=float(np.mean(diameters)),
                readers=tuple(sorted(per_reader)),
                marks=tuple(marks[i] for i in members),
            )
        )
        accepted.update(members)
    excluded = [
        replace(m, finding_readers=counted[i]) if i in counted else m
        for i, m in enumerate(marks)
        if i not in accepted
    ]
    return nodules, excluded
