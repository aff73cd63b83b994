"""Tests of the synthetic LUNA16-layout generator (small scans; the whole file runs in < 60 s)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lungct.io import read_scan
from lungct.synth import generate_dataset, series_uid, synthesize_scan
from lungct.synth.case import UID_PREFIX
from lungct.synth.placement import LungMap
from lungct.synth.render import BodyGrid
from lungct.synth.shapes import (
    DIAMETERS_PATH,
    SHAPES_PATH,
    load_luna16_diameters,
    load_shape_library,
)
from lungct.tables import (
    folds_from_layout,
    read_annotations,
    read_candidates,
    read_seriesuids,
)

N_SCANS = 10
SEED = 7


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Ten small scans (one per subset) with ground-truth lung masks."""
    out = tmp_path_factory.mktemp("synth") / "ds"
    generate_dataset(out, N_SCANS, SEED, size="small", progress=False, workers=2, lung_masks=True)
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / ".synth").glob("scan_*.json"))]


def _csv_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# === Shipped data ================================================================================


def test_shape_library_loads_and_is_small():
    assert SHAPES_PATH.stat().st_size < 2 * 1024 * 1024
    lib = load_shape_library()
    assert len(lib) >= 200
    assert set(np.unique(lib.category)) == {0, 1, 2}  # solid, part-solid, ground-glass
    m = lib.mask(0)
    assert m.shape == (lib.grid,) * 3 and m.any() and not m.all()
    assert np.all(lib.diameter_eq_mm > 0) and lib.diameter_eq_mm.max() > 15
    sdf = lib.signed_distance(0)
    assert sdf.min() < 0 < sdf.max()


def test_luna16_diameters_table():
    assert DIAMETERS_PATH.stat().st_size < 64 * 1024
    d = load_luna16_diameters()
    assert d.size == 1186
    assert 3.0 < d.min() and d.max() < 40.0
    assert 5.0 < float(np.median(d)) < 8.0


def test_series_uid_format():
    uids = {series_uid(SEED, i, "small") for i in range(50)}
    assert len(uids) == 50
    for uid in uids:
        assert uid.startswith(UID_PREFIX) and len(uid) <= 64
        assert all(part.isdigit() and (part == "0" or part[0] != "0") for part in uid.split("."))
    assert series_uid(1, 0, "small") != series_uid(2, 0, "small")


# === Layout ======================================================================================


def test_layout(dataset: Path):
    for k in range(10):
        assert len(list((dataset / f"subset{k}").glob("*.mhd"))) == 1
    # LUNA16's columns, then the optional reader count (tables read columns by name).
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm,reader_count"
    assert _csv_lines(dataset / "annotations.csv")[0] == header
    assert _csv_lines(dataset / "annotations_excluded.csv")[0] == header
    assert _csv_lines(dataset / "candidates.csv")[0] == "seriesuid,coordX,coordY,coordZ,class"
    uids = read_seriesuids(dataset / "seriesuids.csv")  # rejects a header line
    assert len(uids) == N_SCANS
    folds = folds_from_layout(dataset)
    assert folds == {uid: i % 10 for i, uid in enumerate(uids)}
    read_annotations(dataset / "annotations.csv", known_series=uids)
    read_annotations(
        dataset / "annotations_excluded.csv", known_series=uids, allow_negative_diameter=True
    )
    read_candidates(dataset / "candidates.csv", known_series=uids)
    for uid in uids:
        scan = read_scan(dataset / f"subset{folds[uid]}" / f"{uid}.mhd")
        assert scan.seriesuid == uid and scan.array.dtype == np.int16
        assert scan.array.shape[1:] == (128, 128) and 60 <= scan.array.shape[0] <= 130
        assert 2.0 <= scan.spacing[0] <= 2.8 and 2.0 <= scan.spacing[2] <= 2.5


def test_spacing_origin_and_direction_vary(dataset: Path):
    recs = _records(dataset)
    spacings = {tuple(r["geometry"]["spacing"]) for r in recs}
    origins = {tuple(r["geometry"]["origin"]) for r in recs}
    assert len(spacings) == N_SCANS and len(origins) == N_SCANS
    directions = [tuple(r["geometry"]["direction"]) for r in recs]
    assert any(d[8] < 0 for d in directions)  # z flipped
    assert any(d[0] < 0 and d[4] < 0 for d in directions)  # x and y flipped
    assert any(d == (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0) for d in directions)


# === Ground truth ================================================================================


def test_annotations_are_in_the_lungs_and_visible(dataset: Path):
    """World centres map (with each scan's own direction) into the scan, the lung, and HU."""
    table = read_annotations(dataset / "annotations.csv")
    folds = folds_from_layout(dataset)
    recs = {r["seriesuid"]: r for r in _records(dataset)}
    n_checked = n_solid = 0
    flipped_checked = False
    for uid in table.uids:
        scan = read_scan(dataset / f"subset{folds[uid]}" / f"{uid}.mhd")
        mask = read_scan(dataset / "seg-lungs" / f"{uid}.mhd").array
        lung_hu = float(np.median(scan.array[mask > 0]))
        assert -900 < lung_hu < -750
        cats = [row[4] for row in recs[uid]["annotations"]]
        for row, cat in zip(table.rows_in_series(uid), cats, strict=True):
            world = table.coords[row]
            v = scan.world_to_voxel(world)
            assert scan.geometry.contains(v), (uid, world)
            z, y, x = np.rint(v).astype(int)
            assert mask[z, y, x] == 1, (uid, world)
            n_checked += 1
            flipped_checked |= any(d < 0 for d in scan.direction)
            if cat == "solid":
                n_solid += 1
                patch = scan.array[
                    max(z - 1, 0) : z + 2, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2
                ]
                assert patch.max() > lung_hu + 250, (uid, world, patch.max(), lung_hu)
    assert n_checked >= 8 and n_solid >= 3 and flipped_checked


def test_diameters(dataset: Path):
    ann = read_annotations(dataset / "annotations.csv")
    assert np.all(ann.diameter_mm >= 3.0) and np.all(ann.diameter_mm <= 40.0)
    exc = read_annotations(dataset / "annotations_excluded.csv", allow_negative_diameter=True)
    d = exc.diameter_mm
    assert np.all((d == -1) | (d > 0))
    assert np.any(d == -1)
    kinds = {row[4] for r in _records(dataset) for row in r["annotations"]}
    assert len(kinds) >= 2  # mixed textures over ten scans
    places = {row[5] for r in _records(dataset) for row in r["annotations"]}
    assert len(places) >= 2


def test_candidates(dataset: Path):
    ann = read_annotations(dataset / "annotations.csv")
    cand = read_candidates(dataset / "candidates.csv")
    for uid in cand.uids:
        rows = cand.rows_in_series(uid)
        label = cand.label[rows]
        pts = cand.coords[rows]
        assert 50 <= int(np.sum(label == 0)) <= 150
        nod = ann.rows_in_series(uid) if uid in ann.uids else np.zeros(0, dtype=int)
        assert int(np.sum(label == 1)) >= len(nod)
        for r in nod:
            d = np.linalg.norm(pts - ann.coords[r], axis=1)
            radius = ann.diameter_mm[r] / 2
            assert np.all(d[label == 0] > radius)  # negatives never inside a nodule
            assert np.any(d[label == 1] < radius)  # and every nodule has a positive
    sources = {row[4] for r in _records(dataset) for row in r["candidates"]}
    assert {"vessel-branch", "vessel-end-on", "airway-wall", "pleura"} <= sources


# === Determinism and resume ======================================================================


def test_same_seed_same_bytes(dataset: Path, tmp_path: Path):
    """A fresh run of the first 3 scans in one process gives the same bytes and CSV rows."""
    out = tmp_path / "again"
    summary = generate_dataset(out, 3, SEED, size="small", progress=False, workers=1)
    assert summary["n_skipped"] == 0
    uids = read_seriesuids(out / "seriesuids.csv")
    assert uids == read_seriesuids(dataset / "seriesuids.csv")[:3]
    for k, uid in enumerate(uids):
        for suffix in (".mhd", ".zraw"):
            a = (out / f"subset{k}" / f"{uid}{suffix}").read_bytes()
            assert a == (dataset / f"subset{k}" / f"{uid}{suffix}").read_bytes()
    for name in ("annotations.csv", "annotations_excluded.csv", "candidates.csv"):
        mine = _csv_lines(out / name)
        theirs = [ln for ln in _csv_lines(dataset / name) if ln.split(",")[0] in set(uids)]
        assert mine[1:] == theirs

    # Resume: nothing regenerated, tables rewritten identically.
    before = {n: (out / n).read_bytes() for n in ("annotations.csv", "candidates.csv")}
    again = generate_dataset(out, 3, SEED, size="small", progress=False, workers=1)
    assert again["n_skipped"] == 3
    assert before == {n: (out / n).read_bytes() for n in before}

    # Fewer scans: the extra scan written before is removed, not left without table rows.
    shutil.copytree(out, tmp_path / "shrink")
    generate_dataset(tmp_path / "shrink", 2, SEED, size="small", progress=False, workers=1)
    assert len(list((tmp_path / "shrink").glob("subset*/*.mhd"))) == 2


def test_different_seed_differs():
    a = synthesize_scan(1, 0, "small")
    b = synthesize_scan(2, 0, "small")
    assert a.seriesuid != b.seriesuid
    assert a.scan.array.shape != b.scan.array.shape or not np.array_equal(
        a.scan.array, b.scan.array
    )
    # The in-memory case carries the ground-truth lung on the stored grid.
    assert a.lung_mask.shape == a.scan.array.shape and a.lung_mask.dtype == np.uint8
    for n in a.nodules:
        z, y, x = np.rint(n.voxel_zyx).astype(int)
        assert a.lung_mask[z, y, x] == 1
        assert np.allclose(a.scan.voxel_to_world(n.voxel_zyx), n.world)


def _half_space_lung(spacing=(2.3, 2.3, 2.1), wall: int = 6) -> LungMap:
    """Lungs = every voxel with x index >= ``wall``: a flat pleura at x = (wall - 0.5) voxels."""
    lungs = np.zeros((20, 24, 30), np.uint8)
    lungs[:, :, wall:] = 1
    grid = BodyGrid.regular(np.zeros(3), spacing, lungs.shape)
    return LungMap.build(lungs, grid)


def test_pleural_distance_is_measured_to_the_surface_not_the_wall_voxel():
    """Halfway between the last wall voxel and the first lung voxel is distance 0.

    Measured to the wall voxel's centre instead, every distance is half a voxel (1.15 mm)
    too long, and a small juxtapleural nodule ends up half inside the chest wall. The half
    voxel is the mean of the three spacings, within 0.1 mm of the x spacing's half here.
    """
    lung = _half_space_lung()
    surface_x = (6 - 0.5) * 2.3
    pts = np.stack(
        [np.linspace(surface_x - 3, surface_x + 8, 23), np.full(23, 25.0), np.full(23, 20.0)], 1
    )
    assert np.allclose(lung.surface_distance(pts), pts[:, 0] - surface_x, atol=0.1)
    inside = lung.dist_at(pts)
    assert np.all(inside[pts[:, 0] < surface_x] == 0)

    rng = np.random.default_rng(0)
    band = lung.random_points(rng, 200, 1.2, 1.6)
    assert band.shape == (200, 3)
    d = band[:, 0] - surface_x
    assert d.min() >= 1.2 - 0.1 and d.max() <= 1.6 + 0.1
    deep = lung.random_points(rng, 50, 10.0, 1e9)
    assert deep.shape[0] == 50 and np.all(deep[:, 0] - surface_x >= 10.0 - 0.1)
    assert lung.random_points(rng, 5, 100.0, 200.0).shape == (0, 3)  # no lung that deep


def test_juxtapleural_nodules_abut_the_wall_from_inside_the_lung():
    """Their centre is 0.6-0.85 radii inside the lung, so >= about 90 % of the ball is lung."""
    rng = np.random.default_rng(0)
    unit = rng.normal(size=(4000, 3))
    unit *= (rng.random((4000, 1)) ** (1 / 3)) / np.linalg.norm(unit, axis=1, keepdims=True)
    fractions = []
    for index in range(12):
        case = synthesize_scan(3, index, "small", n_nodules=4)
        spacing_zyx = np.asarray(case.scan.geometry.spacing)[::-1]
        for f in case.nodules:
            if f.location != "juxtapleural":
                continue
            ball = np.rint(np.asarray(f.voxel_zyx) + unit * (0.5 * f.diameter_mm) / spacing_zyx)
            ball = np.clip(ball.astype(int), 0, np.asarray(case.lung_mask.shape) - 1)
            fractions.append(float(case.lung_mask[tuple(ball.T)].mean()))
    assert len(fractions) >= 6
    # Voxelised walls are not flat, so allow some slack below the flat-wall 0.90.
    assert min(fractions) > 0.8, sorted(fractions)


# === Background mode and CLI =====================================================================


def test_background_mode_and_cli(dataset: Path, tmp_path: Path):
    """Nodules put into a (mirrored, cropped) copy of an existing scan keep its spacing and
    direction; each index gets its own UID; the scan's own nodules come along."""
    pytest.importorskip("lungct.lungmask")
    from lungct.__main__ import main

    folds = folds_from_layout(dataset)
    uid = read_seriesuids(dataset / "seriesuids.csv")[3]  # index 3: a z-flipped scan
    background = dataset / f"subset{folds[uid]}" / f"{uid}.mhd"
    out = tmp_path / "bg"
    rc = main(
        ["synth", "--out", str(out), "--scans", "2", "--seed", "3", "--background",
         str(background), "--background-annotations", str(dataset / "annotations.csv"),
         "--background-excluded", str(dataset / "annotations_excluded.csv"),
         "--workers", "1", "--quiet"]
    )  # fmt: skip
    assert rc == 0
    bg = read_scan(background)
    n_real = len(read_annotations(dataset / "annotations.csv").rows_in_series(uid))
    uids = read_seriesuids(out / "seriesuids.csv")
    assert len(set(uids)) == 2 and uid not in uids
    ann = read_annotations(out / "annotations.csv")
    for k, u in enumerate(uids):
        scan = read_scan(out / f"subset{k}" / f"{u}.mhd")
        assert scan.geometry.spacing == bg.geometry.spacing
        assert scan.geometry.direction == bg.geometry.direction
        assert scan.geometry.size[:2] == bg.geometry.size[:2]
        assert 0.7 * bg.geometry.size[2] <= scan.geometry.size[2] <= bg.geometry.size[2]
        record = json.loads((out / ".synth" / f"scan_{k:05d}.json").read_text())
        assert (
            sum(row[4] == "real" for row in record["annotations"]) == record["info"]["real_nodules"]
        )
        lost = sum(a["table"] == "annotations" for a in record["info"]["real_cropped_away"])
        assert record["info"]["real_nodules"] == n_real - lost
        if u in ann.uids:
            for r in ann.rows_in_series(u):
                assert scan.geometry.contains(scan.world_to_voxel(ann.coords[r]))
