"""Background mode: each output is a mirrored / z-cropped copy of the real scan, and the real
scan's own findings go into the output tables at the moved positions.

The fast tests use a small synthetic scan written to disk as the "real" background (its own
ground truth plays the LUNA16 rows); the slow one uses LIDC-IDRI-0002 and its 53 real rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import LUNA_CSV, MHD_0002
from lungct.geometry import Geometry
from lungct.io import read_scan, write_scan
from lungct.synth import generate_dataset, synthesize_scan
from lungct.synth.background import (
    UNKNOWN_DIAMETER_MM,
    BackgroundFindings,
    Framing,
    read_background_findings,
    synthesize_on_background,
)
from lungct.tables import read_annotations, read_candidates, read_seriesuids, write_csv_atomic

pytest.importorskip("lungct.lungmask")


def _radius(d: float) -> float:
    return 0.5 * (d if d > 0 else UNKNOWN_DIAMETER_MM)


@pytest.mark.parametrize("mirror", [False, True])
def test_framing_moves_voxels_and_world_coordinates_together(mirror: bool) -> None:
    """A voxel's value is found again at the world position the framing maps it to, on a
    grid with flipped x and y directions; without a mirror, kept voxels keep their world."""
    geom = Geometry(
        size=(7, 5, 12),
        spacing=(0.8, 0.7, 2.5),
        origin=(30.0, -12.0, -200.0),
        direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),
    )
    array = np.arange(np.prod(geom.shape_zyx)).reshape(geom.shape_zyx)
    framing = Framing(mirror, 3, 10)
    out_geom = framing.geometry(geom)
    out = framing.apply(array)
    assert out.shape == out_geom.shape_zyx == (7, 5, 7)
    assert out_geom.spacing == geom.spacing and out_geom.direction == geom.direction
    k, j, i = np.meshgrid(np.arange(3, 10), np.arange(5), np.arange(7), indexing="ij")
    voxels = np.stack([k.ravel(), j.ravel(), i.ravel()], axis=1).astype(float)
    moved = framing.world(geom.voxel_to_world(voxels), geom)
    found = out_geom.world_to_index(moved)
    assert np.array_equal(out[tuple(found.T)], array[tuple(voxels.astype(int).T)])
    same_world = np.allclose(moved, geom.voxel_to_world(voxels))
    assert same_world != mirror


def test_keep_out_holds_synthetic_findings_away() -> None:
    """Without the keep-out ball many findings land in it; with it, none comes within 5 mm."""
    from lungct.synth.placement import KeepOut, LungMap, TubeSamples, plan_findings
    from lungct.synth.render import BodyGrid

    lungs = np.ones((30, 30, 30), np.uint8)
    lungs[[0, -1]] = lungs[:, [0, -1]] = lungs[:, :, [0, -1]] = 0
    lung = LungMap.build(lungs, BodyGrid.regular(np.zeros(3), (2.0, 2.0, 2.0), lungs.shape))
    none = TubeSamples(np.zeros((0, 3)), np.zeros(0), np.zeros((0, 3)), np.zeros(0, np.int64))
    ball = KeepOut(np.array([[30.0, 30.0, 30.0]]), np.array([12.0]))
    for keep_out, expect_clear in ((None, False), (ball, True)):
        clear = []
        for seed in range(6):
            rng = np.random.default_rng(seed)
            nodules, excluded = plan_findings(rng, lung, none, none, 4, 4, keep_out)
            clear += [ball.clear_of(f.centre, 0.5 * f.diameter) for f in [*nodules, *excluded]]
        assert len(clear) >= 12 and all(clear) == expect_clear


@pytest.fixture(scope="module")
def small_background(tmp_path_factory) -> tuple[Path, BackgroundFindings, Path]:
    """A small synthetic scan with x and y flipped, written as a MetaImage, its findings as
    LUNA16 tables (diameter -1 kept), and the folder holding both tables."""
    case = synthesize_scan(5, 7, "small", n_nodules=4)
    assert case.scan.direction[0] < 0  # index 7: flip_xy
    folder = tmp_path_factory.mktemp("bg")
    path = folder / f"{case.seriesuid}.mhd"
    write_scan(case.scan, path)
    nodules = [(case.seriesuid, *n.world, n.diameter_mm) for n in case.nodules]
    excluded = [(case.seriesuid, *n.world, n.listed_diameter_mm) for n in case.excluded]
    other = ("1.2.3.4", 1.0, 2.0, 3.0, 5.0)  # another series: must not come along
    write_csv_atomic(
        folder / "annotations.csv",
        ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"),
        [*nodules, other],
    )
    write_csv_atomic(
        folder / "annotations_excluded.csv",
        ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"),
        [other, *excluded],
    )
    findings = read_background_findings(
        path, folder / "annotations.csv", folder / "annotations_excluded.csv"
    )
    assert len(findings.nodules) == 4 and len(findings.excluded) == len(case.excluded)
    assert any(r[3] == -1 for r in findings.excluded)
    return path, findings, folder


def _check_real_findings(bg, findings: BackgroundFindings, case) -> None:
    """Every real row is either in the output at the position its voxels moved to, or listed
    as cropped away; nothing synthetic is on or near it; real nodules have class-1 rows."""
    info = case.info
    out = case.scan
    nz = bg.array.shape[0]
    z0, z1 = info["crop_z"]
    assert z1 - z0 >= 0.7 * nz and out.array.shape == (z1 - z0, *bg.array.shape[1:])
    assert out.geometry.spacing == bg.geometry.spacing
    assert out.geometry.direction == bg.geometry.direction
    away = [tuple(r["world"]) for r in info["real_cropped_away"]]
    for rows, found, key in (
        (findings.nodules, case.nodules, "real_nodules"),
        (findings.excluded, case.excluded, "real_excluded"),
    ):
        real = [f for f in found if f.category == "real"]
        kept = [r for r in rows if tuple(r[:3]) not in away]
        assert len(real) == len(kept) == info[key]
        for row, f in zip(kept, real, strict=True):
            assert f.listed_diameter_mm == row[3]  # -1 stays -1
            src = bg.geometry.world_to_index(row[:3])
            dst = out.geometry.world_to_index(f.world)
            assert out.array[tuple(dst)] == bg.array[tuple(src)], (row, f.world)
            # The neighbourhood too, mirrored when the scan was: the array and the
            # coordinates were moved the same way.
            a = out.array[tuple(slice(v - 1, v + 2) for v in dst)]
            b = bg.array[tuple(slice(v - 1, v + 2) for v in src)]
            if a.shape == b.shape == (3, 3, 3):
                assert np.array_equal(a, b[:, :, ::-1] if info["mirror_x"] else b)
            for g in found:
                if g.category != "real":  # synthetic findings keep their distance
                    gap = np.linalg.norm(np.subtract(g.world, f.world))
                    assert gap >= _radius(row[3]) + 0.5 * g.diameter_mm + 5.0 - 1e-6
            pts = np.array([c.world for c in case.candidates if c.label == 0])
            assert np.all(np.linalg.norm(pts - f.world, axis=1) >= _radius(row[3]) + 5 - 1e-6)
            if key == "real_nodules":
                pos = np.array([c.world for c in case.candidates if c.label == 1])
                assert np.any(np.linalg.norm(pos - f.world, axis=1) <= 0.5 * row[3])


def test_background_copies_carry_the_real_findings(small_background) -> None:
    path, findings, _ = small_background
    bg = read_scan(path)
    mirrors, crops = set(), set()
    for index in range(6):
        case = synthesize_on_background(path, 3, index, findings)
        _check_real_findings(bg, findings, case)
        mirrors.add(case.info["mirror_x"])
        crops.add(tuple(case.info["crop_z"]))
        assert case.lung_mask.shape == case.scan.array.shape
    assert mirrors == {False, True} and len(crops) == 6


def test_a_crop_drops_whole_findings_only(small_background) -> None:
    """A boundary through a finding moves out past it; one left outside is reported."""
    path, findings, _ = small_background
    bg = read_scan(path)
    z = bg.geometry.world_to_voxel(np.array([r[:3] for r in findings.excluded]))[:, 0]
    lowest = int(np.argmin(z))
    # A background with the same scan but one more finding, low down, to be cropped away.
    row = (*findings.excluded[lowest][:2], float(bg.geometry.voxel_to_world((1.0, 0, 0))[2]), 4.0)
    more = BackgroundFindings(findings.nodules, (*findings.excluded, row))
    dropped = 0
    for index in range(8):
        case = synthesize_on_background(path, 4, index, more)
        _check_real_findings(bg, more, case)
        away = case.info["real_cropped_away"]
        dropped += len(away)
        z0, z1 = case.info["crop_z"]
        for f in [*case.nodules, *case.excluded]:
            if f.category == "real":
                r = _radius(f.listed_diameter_mm) / bg.geometry.spacing[2]
                assert f.voxel_zyx[0] - r >= -0.5 and f.voxel_zyx[0] + r <= z1 - z0 - 0.5
        for a in away:
            k = bg.geometry.world_to_voxel(a["world"])[0]
            assert k < z0 - 0.5 or k > z1 - 0.5
    assert dropped >= 1


def test_cli_refuses_a_background_without_its_findings(small_background, tmp_path, capsys):
    from lungct.__main__ import main

    path, _, folder = small_background
    base = ["synth", "--out", str(tmp_path / "o"), "--scans", "1", "--quiet"]
    assert main([*base, "--background", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and path.name in err[0]
    assert "--background-has-no-findings" in err[0]
    only_one = ["--background-annotations", str(folder / "annotations.csv")]
    assert main([*base, "--background", str(path), *only_one]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main([*base, *only_one]) == 2  # tables without a background
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    both = [*only_one, "--background-excluded", str(folder / "annotations_excluded.csv")]
    assert main([*base, "--background", str(path), *both, "--background-has-no-findings"]) == 2
    assert "no findings" in capsys.readouterr().err
    assert not (tmp_path / "o" / "seriesuids.csv").exists()


def test_other_findings_regenerate_on_resume(small_background, tmp_path) -> None:
    path, _, folder = small_background
    out = tmp_path / "bg"
    tables = {
        "background_annotations": folder / "annotations.csv",
        "background_excluded": folder / "annotations_excluded.csv",
    }
    run = {"progress": False, "workers": 1, "background": path}
    first = generate_dataset(out, 1, 3, **run, **tables)
    assert first["background_findings"] == {"nodules": 4, "excluded": 4}
    uid = read_seriesuids(out / "seriesuids.csv")[0]
    ann = read_annotations(out / "annotations.csv")
    assert len(ann.rows_in_series(uid)) >= 4  # the real ones and any synthetic
    cand = read_candidates(out / "candidates.csv")
    assert int(np.sum(cand.label == 1)) >= 4
    assert generate_dataset(out, 1, 3, **run, **tables)["n_skipped"] == 1
    none = generate_dataset(out, 1, 3, **run, background_has_no_findings=True)
    assert none["n_skipped"] == 0 and none["background_findings"] == {"nodules": 0, "excluded": 0}
    record = json.loads((out / ".synth" / "scan_00000.json").read_text())
    assert record["info"]["real_nodules"] == 0
    assert not any(row[4] == "real" for row in record["annotations"])


@pytest.mark.slow
def test_lidc_0002_excluded_findings_follow_mirror_and_crop(real_data: Path, tmp_path: Path):
    """LIDC-IDRI-0002 has no LUNA16 nodule and 53 excluded findings. Two outputs (seed 74:
    one plain, one mirrored that also crops two findings away) list every one that was not
    cropped away at its moved position, where the output holds the background's HU."""
    from lungct.__main__ import main

    out = tmp_path / "real"
    rc = main(
        ["synth", "--out", str(out), "--scans", "2", "--seed", "74", "--background",
         str(MHD_0002), "--background-annotations", str(LUNA_CSV / "annotations.csv"),
         "--background-excluded", str(LUNA_CSV / "annotations_excluded.csv"),
         "--workers", "1", "--quiet"]
    )  # fmt: skip
    assert rc == 0
    bg = read_scan(MHD_0002)
    table = read_annotations(LUNA_CSV / "annotations_excluded.csv", allow_negative_diameter=True)
    rows = table.rows_in_series(bg.seriesuid)
    assert len(rows) == 53
    assert len(read_annotations(LUNA_CSV / "annotations.csv").rows_in_series(bg.seriesuid)) == 0
    originals = [(*table.coords[r], table.diameter_mm[r]) for r in rows]
    excluded = read_annotations(out / "annotations_excluded.csv", allow_negative_diameter=True)
    mirrors, n_away = set(), 0
    for index, uid in enumerate(read_seriesuids(out / "seriesuids.csv")):
        record = json.loads((out / ".synth" / f"scan_{index:05d}.json").read_text())
        info = record["info"]
        mirrors.add(info["mirror_x"])
        away = [tuple(a["world"]) for a in info["real_cropped_away"]]  # rows may repeat
        n_away += len(away)
        assert info["real_excluded"] == 53 - len(away)
        scan = read_scan(out / record["mhd"])
        csv_rows = excluded.rows_in_series(uid)
        real = [r for r, rec in zip(csv_rows, record["excluded"], strict=True) if rec[4] == "real"]
        kept = [o for o in originals if tuple(o[:3]) not in away]
        assert len(real) == len(kept) == 53 - len(away)
        for o, r in zip(kept, real, strict=True):
            moved = excluded.coords[r]
            assert np.isclose(excluded.diameter_mm[r], o[3], atol=1e-6)  # -1 stays -1
            # Identity direction: the mirror moves x only, the crop moves no world position.
            assert np.allclose(moved[1:], o[1:3], atol=1e-5)
            assert np.isclose(moved[0], o[0], atol=1e-5) != info["mirror_x"]
            src = bg.geometry.world_to_index(o[:3])
            dst = scan.geometry.world_to_index(moved)
            assert scan.array[tuple(dst)] == bg.array[tuple(src)]
            a = scan.array[tuple(slice(v - 1, v + 2) for v in dst)]
            b = bg.array[tuple(slice(v - 1, v + 2) for v in src)]
            assert np.array_equal(a, b[:, :, ::-1] if info["mirror_x"] else b)
    # The random seed was picked so both branches are exercised; a generator change may need another.
    assert mirrors == {False, True} and n_away >= 1
