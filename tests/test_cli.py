"""The `python -m lungct` verbs: help texts, `show`, and one-line errors for bad tables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import DICOM_0001, LUNA_CSV, phantom_hu
from lungct.__main__ import build_parser, main
from lungct.cli import run_command
from lungct.geometry import Geometry
from lungct.io import write_scan
from lungct.scan import Scan

UID = "1.2.840.1"


@pytest.mark.parametrize("verb", ["info", "lungmask", "prepare", "show", "synth"])
def test_every_verb_has_help(verb: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([verb, "--help"])
    assert info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.fixture()
def phantom(tmp_path: Path) -> tuple[Path, tuple[float, float, float]]:
    geo = Geometry((96, 80, 40), (3.0, 3.0, 4.0), (-150.0, -120.0, -300.0))
    path = tmp_path / f"{UID}.mhd"
    write_scan(Scan(phantom_hu((40, 80, 96), (20, 40, 29), 2.5), geo, UID), path)
    return path, tuple(geo.voxel_to_world([20, 40, 29]))


def _csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_show_draws_each_annotated_nodule(phantom, tmp_path: Path, capsys) -> None:
    scan, (x, y, z) = phantom
    ann = _csv(
        tmp_path / "annotations.csv",
        "seriesuid,coordX,coordY,coordZ,diameter_mm",
        f"{UID},{x},{y},{z},7.5",
        f"{UID},{x + 20},{y},{z},-1",
        f"9.9.9,{x},{y},{z},5",
    )
    out = tmp_path / "views.png"
    assert main(["show", str(scan), "--annotations", str(ann), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["nodules"] == 2
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    image = mpimg.imread(out)
    assert image.shape[0] > image.shape[1] / 3 * 1.5  # two rows of three views
    assert np.any((image[..., 0] > 0.9) & (image[..., 1] < 0.4))  # a red circle was drawn


def test_show_real_dicom_with_real_annotations(real_data, tmp_path: Path) -> None:
    out = tmp_path / "lidc0001.png"
    ann = LUNA_CSV / "annotations.csv"
    assert main(["show", str(DICOM_0001), "--annotations", str(ann), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000


BAD_TABLES = {
    "nan_in_row": (
        "seriesuid,coordX,coordY,coordZ,diameter_mm",
        f"{UID},nan,1,2,5",
        "line 2",
    ),
    "missing_column": ("seriesuid,coordX,coordY,diameter_mm", f"{UID},1,2,5", "coordZ"),
    "not_a_number": (
        "seriesuid,coordX,coordY,coordZ,diameter_mm",
        f"{UID},1,abc,2,5",
        "'abc'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_annotation_table_one_line_error(phantom, tmp_path: Path, case: str, capsys) -> None:
    scan, _ = phantom
    header, row, problem = BAD_TABLES[case]
    ann = _csv(tmp_path / "bad.csv", header, row)
    code = main(["show", str(scan), "--annotations", str(ann), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: {ann}") and problem in err[0]
    assert not (tmp_path / "x.png").exists()


def test_unknown_series_uid_is_named(tmp_path: Path) -> None:
    from lungct.errors import LungCTError
    from lungct.tables import read_annotations

    ann = _csv(tmp_path / "a.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm", "7.7.7,1,2,3,5")
    with pytest.raises(LungCTError, match=r"a\.csv.*7\.7\.7"):
        read_annotations(ann, known_series={UID})


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            OSError(28, "No space left on device", "/out/volume.npy"),
            "error: /out/volume.npy: No space left on device",
        ),
        (OSError("Not enough free space to write 16795825 bytes"), "error: Not enough free space"),
    ],
)
def test_os_errors_end_in_one_line(exc: OSError, expected: str, capsys) -> None:
    """A full disk is not bad input, but it gets the same one-line error and status 2."""

    def fail(args: argparse.Namespace) -> None:
        raise exc

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=fail)
    assert run_command(parser, []) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected)
