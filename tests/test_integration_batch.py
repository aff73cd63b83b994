"""`integration detect --scans`: many scans of mixed formats, one corrupt, in one process and on
a local Ray; failures reported, the others detected, a re-run doing nothing."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from integration.__main__ import main
from integration.batch import (
    BATCH_FILE,
    FAILURE_COLUMNS,
    SUBMISSION_COLUMNS,
    BatchScan,
    find_batch_scans,
)
from lungct.errors import LungCTError
from lungct.io import read_scan, write_scan
from lungct.testing import write_dicom_series
from unet_candidates.testing import phantom_chest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

GOOD = {
    "1.2.840.99.1": "1.2.840.99.1.mhd",
    "1.2.840.99.2": "more/1.2.840.99.2.mhd",
    "1.2.840.99.3": "1.2.840.99.3.nii.gz",
    "1.2.840.99.4": "1.2.840.99.4.mha",
    "1.2.840.99.5": "patient/series",  # a DICOM series folder
}
CORRUPT = "1.2.840.99.6.mhd"  # its .zraw cut in half


def _chest(uid: str, seed: int):
    """A tiny chest (168 x 144 x 72 mm): a second or two of detection with the shipped set."""
    scan, _ = phantom_chest(
        shape_zyx=(18, 48, 56),
        nodules_zyx=((9, 24, 16),),
        spacing=(3.0, 3.0, 4.0),
        origin=(-84.0, -72.0, -36.0),
        seriesuid=uid,
        seed=seed,
    )
    return scan


@pytest.fixture(scope="module")
def scans_dir(tmp_path_factory) -> Path:
    """Six scans: MetaImage (.mhd/.zraw, .mha), NIfTI (.nii.gz), a DICOM series, one corrupt;
    and a LUNA16-like lung-mask folder, which is not searched."""
    root = tmp_path_factory.mktemp("scans")
    for seed, (uid, name) in enumerate(GOOD.items(), start=1):
        if name.endswith("series"):
            write_dicom_series(_chest(uid, seed), root / name)
        else:
            write_scan(_chest(uid, seed), root / name)
    write_scan(_chest("1.2.840.99.6", 6), root / CORRUPT)
    data = root / CORRUPT.replace(".mhd", ".zraw")
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    (root / "notes.txt").write_text("not a scan\n")
    write_scan(_chest("1.2.840.99.1", 1), root / "seg-lungs-LUNA16" / "1.2.840.99.1.mhd")
    return root


def _copy(scans_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(scans_dir, tmp_path / "scans"))


def _run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's refusal of an option
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _check_outputs(out: Path, scans: Path, err: str, report: bool = True) -> None:
    """One corrupt scan in failures.csv, the five others in detections.csv (world mm)."""
    failures = _rows(out / "failures.csv")
    assert tuple(failures[0]) == FAILURE_COLUMNS and len(failures) == 2, failures
    scan, uid, reason = failures[1]
    assert scan == str((scans / CORRUPT).resolve()) and uid == "1.2.840.99.6"
    assert "CompressedDataSize" in reason and "\n" not in reason
    rows = _rows(out / "detections.csv")
    assert tuple(rows[0]) == SUBMISSION_COLUMNS
    assert {r[0] for r in rows[1:]} == set(GOOD)
    for uid, name in GOOD.items():
        folder = out / "scans" / uid
        assert (folder / "summary.json").is_file() and (folder / "report.html").exists() == report
        own = [r[:5] for r in _rows(folder / "detections.csv")[1:]]
        assert own == [r for r in rows[1:] if r[0] == uid]  # built from the per-scan CSVs
        back = read_scan(scans / name)
        for r in own:
            voxel = back.world_to_voxel(np.asarray([float(v) for v in r[1:4]]))
            assert back.geometry.contains(voxel, margin=1.0)
            assert 0.0 <= float(r[4]) <= 1.0
    assert not (out / "scans" / "1.2.840.99.6").exists()
    progress = [line for line in err.splitlines() if line.startswith("[batch] ") and "/6 " in line]
    assert len(progress) == 6 and sum("failed after" in line for line in progress) == 1


def _check_rerun_does_nothing(argv: list[str], out: Path) -> None:
    before = _mtimes(out)
    code, stdout, err = _run(argv)
    assert code == 1, err  # the corrupt scan is still failed
    assert "5 done earlier, 1 failed earlier (--retry-failed tries them again), 0 to do" in err
    assert "/6 " not in err and "Ray workers" not in err
    assert "6 scans: 5 done (0 now, 5 earlier), 1 failed" in stdout
    assert _mtimes(out) == before


def test_batch_in_one_process(scans_dir: Path, tmp_path: Path) -> None:
    scans = _copy(scans_dir, tmp_path)
    out = tmp_path / "out"
    argv = ["detect", "--scans", str(scans), "--out", str(out)]
    code, stdout, err = _run(argv)
    assert code == 1, err
    assert "6 scans: 5 done (5 now, 0 earlier), 1 failed" in stdout
    assert f"detections: {out / 'detections.csv'}" in stdout
    _check_outputs(out, scans, err)
    _check_rerun_does_nothing(argv, out)

    # The file mended, --retry-failed detects it; the others stay as they were.
    kept = _mtimes(out / "scans")
    write_scan(_chest("1.2.840.99.6", 6), scans / CORRUPT)
    code, stdout, err = _run([*argv, "--retry-failed", "--no-report"])
    assert code == 0, err
    assert "6 scans: 6 done (1 now, 5 earlier), 0 failed" in stdout
    assert _rows(out / "failures.csv") == [list(FAILURE_COLUMNS)]
    assert "1.2.840.99.6" in {r[0] for r in _rows(out / "detections.csv")[1:]}
    assert all(_mtimes(out / "scans")[p] == t for p, t in kept.items())


def test_batch_on_a_local_ray(scans_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    scans = _copy(scans_dir, tmp_path)
    out = tmp_path / "out"
    argv = ["detect", "--scans", str(scans), "--out", str(out), "--ray", "--ray-cpus", "2"]
    code, stdout, err = _run(argv)
    assert code == 1, err
    assert "6 scans: 5 done (5 now, 0 earlier), 1 failed" in stdout
    assert "2 Ray workers are loading the models" in err
    _check_outputs(out, scans, err)
    _check_rerun_does_nothing(argv, out)


def test_a_list_of_scans_and_a_folder_find_the_same(scans_dir: Path, tmp_path: Path) -> None:
    found = find_batch_scans(scans_dir)
    assert sorted(s.seriesuid for s in found) == [*sorted(GOOD), "1.2.840.99.6"]
    series = next(s for s in found if s.path.is_dir())
    assert series.seriesuid == "1.2.840.99.5" and series.path == (scans_dir / GOOD["1.2.840.99.5"])
    listing = tmp_path / "list.csv"
    lines = ["scan", "# a comment", "", *(os.path.relpath(s.path, tmp_path) for s in found)]
    listing.write_text("\n".join(lines) + "\n")
    assert find_batch_scans(listing) == found
    (tmp_path / "no-header.csv").write_text(f"{found[0].path},ignored\n")
    assert find_batch_scans(tmp_path / "no-header.csv") == found[:1]
    # The output folder inside the scans folder is never searched.
    assert find_batch_scans(scans_dir, exclude=scans_dir / "more") == [
        s for s in found if s.seriesuid != "1.2.840.99.2"
    ]
    assert BatchScan(Path("x"), "../a b").folder == "_.._a_b"


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: d / "absent", "no such folder or scan list"),
        (lambda d: d, "no scans found"),
        (lambda d: (d / "list.txt").write_text("a.mhd\n") and d / "list.txt", "a .csv list"),
        (lambda d: (d / "list.csv").write_text("path\n") and d / "list.csv", "lists no scans"),
    ],
)
def test_bad_scan_sources_are_one_line_and_exit_2(tmp_path: Path, make, problem: str) -> None:
    source = make(tmp_path)
    with pytest.raises(LungCTError, match=problem):
        find_batch_scans(source)
    code, _, err = _run(["detect", "--scans", str(source), "--out", str(tmp_path / "out")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and problem in err
    assert not (tmp_path / "out").exists()


def test_batch_command_line_errors(scans_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    base = ["detect", "--out", str(out)]
    code, _, err = _run([*base, "--scan", "x.mhd", "--ray"])
    assert code == 2 and "go with --scans" in err
    code, _, err = _run([*base, "--scans", str(scans_dir), "--ray-cpus", "2"])
    assert code == 2 and "--ray-cpus and --ray-address go with --ray" in err
    code, _, err = _run([*base, "--scans", str(scans_dir), "--scan", "x.mhd"])
    assert code == 2 and "not allowed with argument" in err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code, _, err = _run([*base, "--scans", str(scans_dir), "--ray"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--ray needs Ray, which is not installed here (pip install 'ray[data]==" in err
    assert not out.exists()  # nothing is written before Ray is known to be missing
    # An output folder of another model set is refused before any scan is read.
    out.mkdir()
    (out / BATCH_FILE).write_text('{"format": 1, "model_set": "other", "weights": {}}')
    code, _, err = _run([*base, "--scans", str(scans_dir)])
    assert code == 2 and "holds the detections of model set 'other'" in err
    assert sorted(p.name for p in out.iterdir()) == [BATCH_FILE]


def test_an_output_of_the_same_set_with_another_score_mix_is_refused(
    scans_dir: Path, tmp_path: Path
) -> None:
    import json

    from integration.batch import BatchOptions, _claim_output
    from integration.pipeline import open_model_set

    out = tmp_path / "out"
    _claim_output(out, open_model_set(), BatchOptions())  # the shipped set, as written
    claim = json.loads((out / BATCH_FILE).read_text())
    assert claim["candidate_weight"] == 0.0
    _claim_output(out, open_model_set(), BatchOptions())  # the same detector: accepted
    (out / BATCH_FILE).write_text(json.dumps({**claim, "candidate_weight": 0.5}))
    code, _, err = _run(["detect", "--scans", str(scans_dir), "--out", str(out)])
    assert code == 2 and "candidate_weight 0.5" in err
    assert sorted(p.name for p in out.iterdir()) == [BATCH_FILE]
