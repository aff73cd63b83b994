"""The teaching labs (``labs/[0-9]*.ipynb``) run, look like labs, and their solutions are right.

For every notebook: it is stored without outputs; its first cell has the learning goals, a "how
long this takes" line and the Colab badge; it has the Colab install cell and the ``BIG_RUN``
switch; and it runs top to bottom in quick mode (``LUNGCT_LABS_QUICK=1``) on a fresh kernel in a
temporary folder, in well under a minute and a half, drawing at least one figure. Later labs
are picked up by the glob. The solution files are imported and their functions checked against
the suite.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import nbformat
import numpy as np
import pytest

from conftest import REPO
from integration import evaluate
from lungct import Geometry, Scan
from lungct.tables import AnnotationTable, ResultTable

LABS = REPO / "labs"
REPOSITORY = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
NOTEBOOKS = sorted(LABS.glob("[0-9]*.ipynb"))
QUICK_LIMIT_S = 180.0
"""A quick-mode lab that takes longer than this has lost its quick mode (a bound, not a
benchmark: the full suite on 2 shared cores runs a 60 s lab in up to 95 s)."""


def _load_run_labs() -> ModuleType:
    """Import ``scripts/run_labs.py``, registered so that its dataclass can be built."""
    spec = importlib.util.spec_from_file_location("run_labs", REPO / "scripts" / "run_labs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_labs"] = module
    spec.loader.exec_module(module)
    return module


run_labs = _load_run_labs()


def lab_id(path: Path) -> str:
    return path.stem


def solutions(number: str) -> ModuleType:
    """Import ``labs/solutions/<number>_solutions.py`` (the folder is not a package)."""
    path = LABS / "solutions" / f"{number}_solutions.py"
    spec = importlib.util.spec_from_file_location(f"lab{number}_solutions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_labs_are_found() -> None:
    names = [p.name for p in NOTEBOOKS]
    assert "01-ct-data-and-geometry.ipynb" in names
    assert "02-unet-candidates.ipynb" in names
    assert "03-mgi-cnn.ipynb" in names
    assert "04-ct-gan.ipynb" in names
    assert "05-luna16-evaluation.ipynb" in names
    assert "06-detector-and-comparison.ipynb" in names
    assert run_labs.lab_notebooks() == NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lab_id)
def test_stored_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i + 1
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; clear them"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lab_id)
def test_first_cell_goals_time_and_badge(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    text = first.source
    assert re.search(r"learning goals", text, re.I), "no learning goals in the first cell"
    assert re.search(r"how long this takes", text, re.I), "no 'how long this takes' line"
    badge = "https://colab.research.google.com/assets/colab-badge.svg"
    assert badge in text, "no Open in Colab badge"
    owner_name = REPOSITORY.removeprefix("https://github.com/")
    target = f"https://colab.research.google.com/github/{owner_name}/blob/main/labs/{path.name})"
    assert target in text, "the Colab badge does not open this notebook of the declared repository"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lab_id)
def test_colab_cell_switch_and_solutions(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert "google.colab" in code[0] and "pip install" in code[0], "first code cell: Colab install"
    assert f"git+{REPOSITORY}" in code[0], "the Colab cell installs from another repository"
    assert any(re.search(r"^BIG_RUN = False\b", c, re.M) for c in code[:3]), "no BIG_RUN switch"
    number = path.name[:2]
    if any("Exercise" in c.source for c in nb.cells if c.cell_type == "markdown"):
        assert (LABS / "solutions" / f"{number}_solutions.py").is_file()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lab_id)
def test_runs_in_quick_mode(path: Path, tmp_path: Path) -> None:
    run = run_labs.run_notebook(path, tmp_path, quick=True)
    assert run.ok, f"{path.name}: {run.describe_failure()}"
    assert run.seconds < QUICK_LIMIT_S, f"{path.name}: {run.seconds:.0f} s in quick mode"
    images = [
        o
        for cell in run.notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
        if "image/png" in o.get("data", {})
    ]
    assert images, f"{path.name} drew no figure"
    text = "".join(
        o.get("text", "") for c in run.notebook.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "mode: quick" in text, "the lab did not see LUNGCT_LABS_QUICK"


def test_run_labs_names_the_failing_cell(tmp_path: Path, capsys) -> None:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# broken"),
            nbformat.v4.new_code_cell("x = 1"),
            nbformat.v4.new_code_cell("1 / 0"),
            nbformat.v4.new_code_cell("print('never')"),
        ]
    )
    path = tmp_path / "99-broken.ipynb"
    nbformat.write(nb, path)
    status = run_labs.main([str(path), "--quick", "--html-dir", str(tmp_path / "html")])
    captured = capsys.readouterr()
    assert status == 1
    assert "99-broken.ipynb" in captured.out and "FAILED" in captured.out
    assert "cell 3 of 4 ('1 / 0'): ZeroDivisionError" in captured.err
    html = (tmp_path / "html" / "99-broken.html").read_text(encoding="utf-8")
    assert "ZeroDivisionError" in html
    assert nbformat.read(path, as_version=4).cells[2].outputs == []  # the source is untouched


# --- lab 1 solutions ----------------------------------------------------------------------------


def _geometries() -> list[Geometry]:
    turn = np.deg2rad(25.0)
    rotation = np.array(
        [[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]]
    )
    flip = np.diag([-1.0, -1.0, 1.0])
    return [
        Geometry((40, 30, 20), (0.7, 0.8, 2.5), (-10.0, 20.0, -300.0)),
        Geometry((40, 30, 20), (2.5, 2.5, 2.0), (170.0, 160.0, -200.0), tuple(flip.ravel())),
        Geometry((40, 30, 20), (1.0, 1.5, 2.0), (5.0, -5.0, 0.0), tuple((rotation @ flip).ravel())),
    ]


def test_lab01_world_to_voxel_by_hand() -> None:
    lab = solutions("01")
    rng = np.random.default_rng(0)
    for g in _geometries():
        for world in rng.uniform(-200, 200, size=(5, 3)):
            got = lab.world_to_voxel_by_hand(g.origin, g.spacing, g.direction, world)
            np.testing.assert_allclose(got, g.world_to_voxel(world), atol=1e-9)


def test_lab01_mean_hu_in_sphere() -> None:
    lab = solutions("01")
    rng = np.random.default_rng(1)
    for g in _geometries():
        scan = Scan(rng.integers(-1000, 400, size=g.shape_zyx).astype(np.int16), g, "test")
        centre = g.voxel_to_world([10, 15, 20])
        # Brute force over every voxel of the scan.
        index = np.indices(g.shape_zyx).reshape(3, -1).T
        inside = np.sum((g.voxel_to_world(index) - centre) ** 2, axis=1) <= 4.0**2
        expected = scan.array.reshape(-1)[inside].mean()
        assert lab.mean_hu_in_sphere(scan, centre, 8.0) == pytest.approx(expected)


def test_lab01_dice() -> None:
    lab = solutions("01")
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    b = np.zeros_like(a)
    b[1:3] = True
    assert lab.dice(a, a) == 1.0
    assert lab.dice(a, ~a) == 0.0
    assert lab.dice(a, b) == pytest.approx(0.5)
    assert lab.dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


# --- lab 2 solutions ----------------------------------------------------------------------------


def test_lab02_foreground_fraction() -> None:
    from unet_candidates.data import IGNORE

    lab = solutions("02")
    y = np.array([[0, 1, 1], [IGNORE, 0, 0], [IGNORE, 1, 0]], dtype=np.float32)
    assert lab.foreground_fraction(y) == pytest.approx(3 / 7)
    assert lab.foreground_fraction(np.zeros((2, 4))) == 0.0
    assert lab.foreground_fraction(np.full(3, IGNORE)) == 0.0


def test_lab02_group_candidates_matches_the_suite() -> None:
    from scipy import ndimage

    from unet_candidates import candidates_from_probability

    lab = solutions("02")
    rng = np.random.default_rng(2)
    for g in _geometries():  # straight, flipped and oblique grids
        smooth = ndimage.gaussian_filter(rng.random(g.shape_zyx), 1.5)
        prob = ((smooth - smooth.min()) / np.ptp(smooth)).astype(np.float32)
        for threshold, radius in [(0.6, 0.0), (0.6, 8.0), (0.7, 20.0)]:
            got = np.array(lab.group_candidates(prob, g, threshold, radius)).reshape(-1, 4)
            suite = candidates_from_probability(
                prob, g, "s", threshold, nms_radius_mm=radius, score_sigma_voxels=0
            )
            expected = np.array([c[1:5] for c in suite]).reshape(-1, 4)
            assert len(expected) >= 2
            np.testing.assert_allclose(got, expected, atol=1e-6)


def test_lab02_sensitivity_with_cap() -> None:
    from integration import candidate_sensitivity

    lab = solutions("02")
    rng = np.random.default_rng(12)
    for _ in range(40):
        nodules, _, uids, marks = _random_submission(rng)
        for cap in (0, 1, 3, 10, 1000):
            kept = [
                rows[np.argsort(-marks.probability[rows], kind="stable")][:cap]
                for rows in (marks.rows_in_series(uid) for uid in uids)
            ]
            capped = marks.select(np.sort(np.concatenate([np.zeros(0, int), *kept])))
            expected = candidate_sensitivity(nodules, capped, uids).sensitivity
            assert lab.sensitivity_with_cap(nodules, marks, uids, cap) == pytest.approx(expected)


# --- lab 3 solutions ----------------------------------------------------------------------------


def test_lab03_cut_scales_by_hand(tmp_path: Path) -> None:
    from fp_reduction_3dcnn import PatchCutter, get_plan
    from lungct.cache import CachedScan, ScanCache

    lab = solutions("03")
    rng = np.random.default_rng(3)
    g = Geometry((70, 60, 50), (1.0, 1.0, 1.0), (-30.0, 12.0, -200.0))  # a cache grid
    volume = rng.integers(-1100, 500, size=g.shape_zyx).astype(np.int16)
    scan = CachedScan("test", volume, np.zeros(volume.shape, bool), g, {})
    plans = [
        get_plan("default"),
        get_plan("default").replace(
            patch_sizes=((30, 30, 12), (16, 16, 8), (10, 10, 4)), input_size=(12, 12, 5)
        ),
    ]
    inside = g.voxel_to_world([25, 30, 35])
    corner = g.voxel_to_world([1.3, 2.6, 68.2])  # the patches leave the volume: air
    between = g.voxel_to_world([25.4, 30.6, 35.5])  # rounded to the nearest voxel
    outside = np.array(g.origin) - 60.0  # nothing of the volume: all air
    for plan in plans:
        cutter = PatchCutter(plan, ScanCache(tmp_path))
        for centre in (inside, corner, between, outside):
            expected = cutter.cut_scan(scan, centre[None])
            got = lab.cut_scales_by_hand(volume, g, centre, plan)
            assert len(got) == 3
            for mine, suite in zip(got, expected, strict=True):
                assert mine.shape == suite.shape[1:]
                np.testing.assert_allclose(mine, suite[0], atol=1e-6)


def test_lab03_tta_by_hand() -> None:
    from fp_reduction_3dcnn import tta_predict
    from fp_reduction_3dcnn.symmetries import VOLUME_SYMMETRIES

    lab = solutions("03")
    rng = np.random.default_rng(4)
    weights = [rng.normal(size=(8, 8, 5)) for _ in range(3)]

    def network(scales: list[np.ndarray]) -> np.ndarray:  # changed by every turn and flip
        return sum((x * w).sum(axis=(1, 2, 3)) for x, w in zip(scales, weights, strict=True))

    inputs = [rng.random((6, 8, 8, 5)) for _ in range(3)]
    got = lab.tta_by_hand(network, inputs)
    assert got.shape == (6,)
    np.testing.assert_allclose(got, tta_predict(network, inputs), rtol=1e-12)
    np.testing.assert_allclose(
        lab.tta_by_hand(network, inputs, flip_z=True),
        tta_predict(network, inputs, VOLUME_SYMMETRIES),
        rtol=1e-12,
    )
    assert not np.allclose(got, network(inputs))  # the toy network really is not symmetric


def test_lab03_mgi_params_by_hand() -> None:
    from fp_reduction_3dcnn import MGICNN, get_plan
    from fp_reduction_3dcnn.config import MERGES, VARIANTS

    lab = solutions("03")
    plans = [get_plan("default", variant=v, merge=m) for v in VARIANTS for m in MERGES]
    plans.append(get_plan("paper"))
    plans.append(
        get_plan("default_adam").replace(
            input_size=(18, 18, 5), stream_filters=(5, 7, 9), dense_units=(11,), merge="conv1x1"
        )
    )
    for plan in plans:
        expected = MGICNN.from_plan(plan).count_params()
        assert lab.mgi_params_by_hand(plan) == expected, (plan.name, plan.variant, plan.merge)


# --- lab 4 solutions ----------------------------------------------------------------------------


def test_lab04_condition_by_hand() -> None:
    from ct_gan_augment import get_plan
    from ct_gan_augment.inject import make_condition

    lab = solutions("04")
    rng = np.random.default_rng(4)
    for cube_size, hole in [(32, 16), (32, 20), (16, 6)]:
        plan = get_plan("default", cube_size=cube_size, hole_size=hole)
        cubes = rng.uniform(-0.5, 0.5, (3, *(cube_size,) * 3)).astype(np.float32)
        for diameters in (None, [1.0, float(hole), *rng.uniform(1, hole, 1)]):
            expected = make_condition(cubes, plan, diameters)
            got = lab.condition_by_hand(cubes, hole, diameters)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)


def test_lab04_leaked_series() -> None:
    from integration.crossval import check_no_leakage, source_series
    from lungct.errors import LungCTError

    lab = solutions("04")
    assert lab.leaked_series(["1.2.30", "1.2.3.ctgan12"], ["1.2.3", "1.2.300"]) == ["1.2.3"]
    rng = np.random.default_rng(5)
    pool = ["1.2.3", "1.2.30", "1.2.300", "9.8", "9.8.7"]
    for _ in range(200):
        test = sorted({str(u) for u in rng.choice(pool, size=2)})
        train = [
            str(u) if rng.random() < 0.5 else f"{u}.ctgan{rng.integers(0, 12)}"
            for u in rng.choice(pool, size=int(rng.integers(0, 4)))
        ]
        leaked = lab.leaked_series(train, test)
        assert leaked == sorted(set(test) & {source_series(u) for u in train})
        manifest = {"test_series": test, "train_series": train}
        if leaked:
            with pytest.raises(LungCTError):
                check_no_leakage(manifest)
        else:
            check_no_leakage(manifest)


def test_lab04_scan_fingerprint() -> None:
    import dataclasses

    lab = solutions("04")
    rng = np.random.default_rng(6)
    g = _geometries()[1]
    scan = Scan(rng.integers(-1000, 400, size=g.shape_zyx).astype(np.int16), g, "test")
    same = lab.scan_fingerprint(scan)
    assert isinstance(same, str) and len(same) == 64
    copy = dataclasses.replace(scan, array=np.asfortranarray(scan.array.copy()))
    assert lab.scan_fingerprint(copy) == same
    one_voxel = scan.array.copy()
    one_voxel[3, 4, 5] += 1
    changed = [
        dataclasses.replace(scan, array=one_voxel),
        dataclasses.replace(scan, array=scan.array.astype(np.int32)),
        dataclasses.replace(scan, geometry=dataclasses.replace(g, origin=(0.0, 0.0, 0.0))),
        dataclasses.replace(scan, geometry=dataclasses.replace(g, spacing=(1.0, 1.0, 1.0))),
        dataclasses.replace(
            scan, geometry=dataclasses.replace(g, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
        ),
    ]
    assert len({lab.scan_fingerprint(s) for s in changed} | {same}) == len(changed) + 1


# --- lab 5 solutions ----------------------------------------------------------------------------

TOY_SCANS = ["scan-A", "scan-B", "scan-C"]
TOY_NODULES = [("scan-A", 0, 0, 0, 10), ("scan-A", 40, 10, 0, 5), ("scan-B", 10, -20, 0, 20)]
TOY_EXCLUDED = [("scan-B", -30, 20, 0, 4), ("scan-C", 0, 0, 0, -1)]
TOY_MARKS = [
    ("scan-A", 1, 2, 0, 0.95),
    ("scan-A", -3, 3, 0, 0.60),
    ("scan-A", 42.6, 10, 0, 0.80),
    ("scan-A", -40, -30, 0, 0.30),
    ("scan-B", 18, -20, 0, 0.45),
    ("scan-B", -30, 21, 0, 0.85),
    ("scan-B", 40, 40, 0, 0.70),
    ("scan-B", -10, 35, 0, 0.20),
    ("scan-C", 3, 3, 0, 0.90),
    ("scan-C", 30, -30, 0, 0.40),
    ("scan-C", -25, 10, 0, 0.35),
]


def _random_submission(rng: np.random.Generator) -> tuple:
    """Nodules, excluded findings (some of unknown size), up to 300 marks with tied scores."""
    n_scans = int(rng.integers(1, 10))
    uids = [f"s{i}" for i in range(n_scans)]
    n_nod, n_exc, n_marks = (
        int(rng.integers(1, 20)),
        int(rng.integers(0, 8)),
        int(rng.integers(0, 300)),
    )
    nodules = AnnotationTable(
        uids,
        rng.integers(n_scans, size=n_nod),
        rng.uniform(-60, 60, (n_nod, 3)),
        diameter_mm=rng.uniform(3, 30, n_nod),
    )
    diam = np.where(rng.random(n_exc) < 0.3, -1.0, rng.uniform(1, 10, n_exc))
    excluded = AnnotationTable(
        uids, rng.integers(n_scans, size=n_exc), rng.uniform(-60, 60, (n_exc, 3)), diameter_mm=diam
    )
    marks = ResultTable(
        uids,
        rng.integers(n_scans, size=n_marks),
        rng.uniform(-60, 60, (n_marks, 3)),
        probability=np.round(rng.random(n_marks), int(rng.integers(1, 4))),
    )
    return nodules, excluded, uids, marks


def test_lab05_best_single_change() -> None:
    lab = solutions("05")
    nodules = AnnotationTable.from_rows(TOY_NODULES)
    excluded = AnnotationTable.from_rows(TOY_EXCLUDED)
    marks = ResultTable.from_rows(TOY_MARKS)
    changed = lab.best_single_change(nodules, excluded, TOY_SCANS, marks)
    assert np.array_equal(changed.coords, marks.coords)
    assert np.sum(changed.probability != marks.probability) == 1
    assert evaluate(nodules, excluded, TOY_SCANS, marks).cpm == pytest.approx(11 / 21)
    assert evaluate(nodules, excluded, TOY_SCANS, changed).cpm == pytest.approx(2 / 3)


def test_lab05_kept_by_cap() -> None:
    lab = solutions("05")
    rng = np.random.default_rng(3)
    for n in (5, 100, 101, 150, 400):
        p = np.round(rng.random(n), 2)
        kept = lab.kept_by_cap(p)
        marks = ResultTable.from_arrays(["s"] * n, np.tile([0.0, 0.0, 500.0], (n, 1)), p)
        nodules = AnnotationTable.from_rows([("s", 0, 0, 0, 10)])
        result = evaluate(nodules, None, ["s"], marks)
        assert n - kept.sum() == result.marks_dropped_by_cap
        assert kept.sum() <= 100
        if n > 100:
            assert p[kept].min() > p[~kept].max()


def test_lab05_cpm_by_hand_is_exact() -> None:
    lab = solutions("05")
    toy = (
        AnnotationTable.from_rows(TOY_NODULES),
        AnnotationTable.from_rows(TOY_EXCLUDED),
        TOY_SCANS,
        ResultTable.from_rows(TOY_MARKS),
    )
    assert lab.cpm_by_hand(*toy) == pytest.approx(11 / 21, abs=1e-12)
    for seed in range(100):
        case = _random_submission(np.random.default_rng(seed))
        assert lab.cpm_by_hand(*case) == pytest.approx(evaluate(*case).cpm, abs=1e-12), seed


# --- lab 6 solutions ----------------------------------------------------------------------------


def _two_systems(seed: int) -> tuple:
    """A random test set, a submission and a second one: the same marks, rescored with noise."""
    rng = np.random.default_rng(seed)
    nodules, excluded, uids, marks = _random_submission(rng)
    noisy = np.clip(marks.probability + rng.normal(0, 0.15, len(marks)), 0, 1)
    other = ResultTable(marks.uids, marks.series_index, marks.coords, probability=noisy)
    return nodules, excluded, uids, marks, other


def test_lab06_paired_p_value() -> None:
    from integration import compare

    lab = solutions("06")
    assert lab.paired_p_value([0.0] * 9) == 1.0
    assert lab.paired_p_value([0.1] * 99) == pytest.approx(2 / 100)
    for seed in range(30):
        nodules, excluded, uids, a, b = _two_systems(seed)
        cmp = compare(nodules, excluded, uids, [a, b], bootstrap=60, seed=seed)
        rounds = cmp.results[1].bootstrap.cpm_samples - cmp.results[0].bootstrap.cpm_samples
        assert lab.paired_p_value(rounds) == cmp.differences[0].p_value, seed


def test_lab06_resampled_cpms_are_evaluates_bootstrap() -> None:
    lab = solutions("06")
    for seed in range(30):
        nodules, excluded, uids, marks, _ = _two_systems(seed)
        mine = lab.resampled_cpms(nodules, excluded, uids, marks, 40, seed=seed)
        suite = evaluate(nodules, excluded, uids, marks, bootstrap=40, seed=seed).bootstrap
        np.testing.assert_allclose(mine, suite.cpm_samples, atol=1e-12, err_msg=str(seed))


def test_lab06_paired_and_unpaired_ci() -> None:
    from integration import compare

    lab = solutions("06")
    for seed in range(20):
        nodules, excluded, uids, a, b = _two_systems(seed)
        for confidence in (0.95, 0.8):
            paired, unpaired = lab.paired_and_unpaired_ci(
                nodules, excluded, uids, a, b, 50, seed=seed, confidence=confidence
            )
            d = compare(
                nodules, excluded, uids, [a, b], bootstrap=50, seed=seed, confidence=confidence
            ).differences[0]
            np.testing.assert_allclose(paired, d.ci, atol=1e-12, err_msg=str(seed))
            np.testing.assert_allclose(unpaired, d.unpaired_ci, atol=1e-12, err_msg=str(seed))
