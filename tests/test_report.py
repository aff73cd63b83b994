"""The detection report: marks in the scan as read, orientation, provenance, and the page as a
browser renders it (headless Chromium)."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from integration.report import (
    MIN_CROPS,
    OVERVIEW_TOP,
    Detection,
    numbered_count,
    orientation_letters,
    rank_marks,
    view_letters,
    write_report,
)
from lungct.geometry import Geometry
from lungct.scan import Scan
from lungct.testing import chest_phantom_hu

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium: installed with apt-get once when missing; skip only if that fails."""
    found = shutil.which("chromium") or (str(CHROMIUM) if CHROMIUM.exists() else None)
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip(f"{CHROMIUM} is absent and cannot be installed (no apt-get, or not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    problem = ""
    for steps in ([["apt-get", "install", "-y", "-q", "chromium"]],
                  [["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]]):  # fmt: skip
        for argv in steps:
            try:
                proc = subprocess.run(
                    argv, capture_output=True, text=True, env=env, timeout=900, check=False
                )
            except subprocess.TimeoutExpired:
                problem = f"`{' '.join(argv)}` timed out"
                break
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                problem = f"`{' '.join(argv)}` failed: {tail[0]}"
                break
        if CHROMIUM.exists():
            return str(CHROMIUM)
    pytest.skip(f"{CHROMIUM} is absent and could not be installed ({problem})")


# ----------------------------------------------------------------------------------------------
# Without a browser
# ----------------------------------------------------------------------------------------------


def test_orientation_letters_come_from_the_direction() -> None:
    assert [orientation_letters(v) for v in np.eye(3)] == ["L", "P", "S"]
    assert [orientation_letters(-v) for v in np.eye(3)] == ["R", "A", "I"]
    assert orientation_letters((0.8, -0.6, 0.0)) == "LA"  # oblique: main letter first
    assert orientation_letters((0.95, 0.1, 0.0)) == "L"  # a slight tilt keeps one letter
    # The radiological axial view of a world-aligned grid: right on the left, anterior up.
    axial = view_letters(right=(1, 0, 0), down=(0, 1, 0))
    assert axial == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    # A grid stored with x flipped: its +i axis points to the patient's right.
    assert view_letters(right=(-1, 0, 0), down=(0, 0, -1))["right"] == "R"
    with pytest.raises(ValueError, match="non-zero 3-vector"):
        orientation_letters((0, 0, 0))


def _flipped_phantom() -> Scan:
    """A small chest phantom stored with x flipped and z reversed, not on a 1 mm grid."""
    direction = (-1, 0, 0, 0, 1, 0, 0, 0, -1)
    geometry = Geometry((96, 96, 30), (1.6, 1.6, 2.5), (80.0, -80.0, 40.0), direction)
    hu = np.rint(chest_phantom_hu((30, 96, 96))).astype(np.int16)
    return Scan(hu, geometry, "1.2.3.4", source="/somewhere/phantom.mhd")


def _detections(scan: Scan, probabilities: list[float]) -> list[Detection]:
    rng = np.random.default_rng(0)
    out = []
    for p in probabilities:
        index = (rng.uniform(5, 25), rng.uniform(25, 70), rng.uniform(15, 80))
        x, y, z = scan.geometry.voxel_to_world(index)
        out.append(Detection(float(x), float(y), float(z), p, float(rng.uniform(3, 12))))
    return out


def _table_rows(page: str) -> list[tuple[str, list[str]]]:
    body = page.split('<table class="marks"', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r'<tr class="(above|below)">(.*?)</tr>', body)
    return [(cls, [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td>(.*?)</td>", r)])
            for cls, r in rows]  # fmt: skip


def test_marks_are_numbered_listed_and_cropped(tmp_path: Path) -> None:
    scan = _flipped_phantom()
    probabilities = [0.95, 0.9, 0.8, 0.7] + [0.45 - 0.02 * k for k in range(14)]
    detections = _detections(scan, probabilities)
    facts = {
        "name": "phantom set",
        "version": "7",
        "path": str(tmp_path / "models"),
        "stages": ["unet", "fpr"],
        "trained_on": "12 synthetic small scans",
        "train_hours": 0.5,
        "demo_grade": False,
        "description": "A set for the test.",
        "stage_training": [
            {"stage": "unet", "name": "U-Net candidates", "train_minutes": 20.0, "steps": 100,
             "cpu_count": 2, "gpus": [], "sealed": "2026-01-02T03:04:05+00:00"},
        ],
    }  # fmt: skip
    page_path = write_report(
        scan, detections[::-1], tmp_path / "r", threshold=0.6, model_set=facts, tta=False
    )
    page = page_path.read_text()
    rows = _table_rows(page)
    assert len(rows) == len(detections)  # every mark is listed, most probable first
    assert [cls for cls, _ in rows] == ["above"] * 4 + ["below"] * 14
    probs = [float(cells[1]) for _, cells in rows]
    assert probs == sorted(probs, reverse=True)
    # Voxel index and slice number are the scan's own (x flipped, z reversed).
    for (_, cells), d in zip(rows, sorted(detections, key=lambda d: -d.probability), strict=True):
        k, j, i = np.rint(scan.geometry.world_to_voxel([d.x, d.y, d.z])).astype(int)
        assert [int(c) for c in cells[5:8]] == [i, j, k]
        assert cells[8] == f"{k + 1} / 30"
        assert float(cells[9]) == pytest.approx(d.diameter_mm, abs=0.05)
    # The overview numbers the 4 above the threshold and the next 6: ten in all.
    assert numbered_count(rank_marks(scan, detections, 0.6)) == OVERVIEW_TOP
    assert "Marks 1&ndash;10" in page and "the other 8 are listed in the table only" in page
    assert "the next 6 most probable below it" in page
    # Crops for the 4 above the threshold, each linked from its rank.
    crops = sorted(p.name for p in (tmp_path / "r").glob("detection_*.png"))
    assert crops == [f"detection_{k:02d}.png" for k in (1, 2, 3, 4)]
    assert '<a href="#mark-1">1</a>' in page and 'id="mark-4"' in page
    assert "slice<br>(k + 1)" in page
    assert "U-Net blob<br>diameter (mm)" in page
    # Orientation of the scan as read, provenance and what the score is.
    assert "+i &rarr; R, +j &rarr; P, +k &rarr; I" in page
    assert "phantom set 7" in page and "12 synthetic small scans" in page
    assert "U-Net candidates: 20 min, 100 steps (2 CPU cores, no GPU, sealed 2026-01-02)" in page
    assert "test-time augmentation off" in page
    text = re.sub(r"\s+", " ", page)
    for phrase in (
        "MGI-CNN false-positive-reduction network",
        "not a probability of malignancy",
        "not calibrated to clinical risk",
        "not a medical device",
    ):
        assert phrase in text
    assert "lung window, W 1500 / L -600 HU" in page  # also written under each crop


def test_below_the_threshold_the_most_probable_are_cropped(tmp_path: Path) -> None:
    scan = _flipped_phantom()
    detections = _detections(scan, [0.3, 0.2, 0.1, 0.05])
    page = write_report(scan, detections, tmp_path, threshold=0.5).read_text()
    assert len(list(tmp_path.glob("detection_*.png"))) == MIN_CROPS
    assert "No mark reaches the threshold 0.5" in page
    assert "none of which reaches the report threshold 0.5" in page
    assert [cls for cls, _ in _table_rows(page)] == ["below"] * 4
    assert "The model set is not known" in page


# ----------------------------------------------------------------------------------------------
# In a browser
# ----------------------------------------------------------------------------------------------

_CHECK = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const result = {
    images: images.length,
    broken: images.filter((i) => !(i.complete && i.naturalWidth > 0)).map((i) => i.src),
    rows: document.querySelectorAll("table.marks tbody tr").length,
    above: document.querySelectorAll("table.marks tbody tr.above").length,
    title: document.title,
  };
  const out = document.createElement("pre");
  out.id = "report-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>
"""


def _browser_check(chromium: str, page: Path, profile: Path) -> dict:
    """Load ``page`` in headless Chromium; what the check script saw once it had loaded."""
    probe = page.with_name("report-check.html")
    probe.write_text(page.read_text().replace("</body>", _CHECK + "</body>"))
    proc = subprocess.run(
        [chromium, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
         "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom",
         probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    found = re.search(r'<pre id="report-check">(.*?)</pre>', proc.stdout, re.S)
    assert proc.returncode == 0 and found, (proc.returncode, proc.stderr[-2000:])
    return json.loads(html.unescape(found.group(1)))


def test_the_report_renders_in_chromium(chromium: str, tmp_path: Path, capsys) -> None:
    """detect on a small synthetic scan with the shipped set; the page loads with every image."""
    from integration.__main__ import main
    from lungct.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, 1, 4242, "small", progress=False, workers=1)
    scan = next(data.glob("subset0/*.mhd"))
    out = tmp_path / "out"
    assert main(["detect", "--scan", str(scan), "--out", str(out)]) == 0, capsys.readouterr().err
    with open(out / "detections.csv", newline="") as f:
        marks = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    seen = _browser_check(chromium, out / "report.html", tmp_path / "profile")
    assert seen["title"].startswith("Nodule detection report")
    assert seen["broken"] == [] and seen["images"] >= 1 + min(MIN_CROPS, len(marks))
    crops = len(list(out.glob("detection_*.png")))
    assert seen["images"] == 1 + crops  # the overview and every crop, each loaded
    assert seen["rows"] == len(marks) == summary["candidates"]
    assert seen["above"] == summary["detections_above_threshold"]


def test_inner_lung_is_the_ellipsoid_erosion_inside_the_scan() -> None:
    """The erosion of the overview's mask, cut to the lungs' box, is the whole volume's."""
    from scipy import ndimage

    from integration.report import inner_lung
    from lungct.geometry import Geometry
    from lungct.lungmask import dilate_ellipsoid

    rng = np.random.default_rng(0)
    lung = np.zeros((40, 60, 60), bool)
    lung[5:30, 10:50, 12:40] = ndimage.binary_opening(rng.random((25, 40, 28)) > 0.3)
    lung[:12, 20:30, 20:30] = True  # touching the first slice: not eroded from there
    geometry = Geometry((60, 60, 40), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    expected = ~dilate_ellipsoid(~lung, (4.0, 4.0, 4.0))  # 8 mm along z, 4 mm in-plane
    np.testing.assert_array_equal(inner_lung(lung, geometry), expected)
    assert inner_lung(lung, geometry)[0].any()
    assert not inner_lung(np.zeros_like(lung), geometry).any()


def test_view3d_puts_each_side_where_the_patient_has_it(tmp_path) -> None:
    """Front view: the patient's left on the image's right, the front surface nearest; left
    view: the left side nearest. The figure is written off screen; detect adds it on request."""
    from integration.report import Detection
    from integration.view3d import projected, render_view3d, surface_depth
    from lungct.fileio import png_problem
    from lungct.geometry import Geometry

    grid = Geometry((60, 50, 40), (2.0, 2.0, 2.0), (-60.0, -50.0, -40.0))  # x, y, z sizes
    mask = np.zeros(grid.shape_zyx, bool)
    mask[10:30, 10:40, 5:20] = True  # the patient's right (small x)
    mask[10:30, 20:40, 40:55] = True  # the patient's left, starting further back
    left_centre = grid.voxel_to_world((20, 30, 47))
    right_centre = grid.voxel_to_world((20, 25, 12))
    front, hit = surface_depth(mask, 0.0)
    (z_l, u_l, _), (z_r, u_r, _) = projected(np.array([left_centre, right_centre]), grid, 0.0)
    assert u_l > u_r  # radiological: the patient's left on the right of the image
    assert hit[round(z_l), round(u_l)] and hit[round(z_r), round(u_r)]
    assert front[round(z_r), round(u_r)] < front[round(z_l), round(u_l)]  # the right starts at y 10
    side, hit = surface_depth(mask, 90.0)
    (z_l, u_l, d_l), (z_r, u_r, d_r) = projected(np.array([left_centre, right_centre]), grid, 90.0)
    assert d_l < d_r  # seen from the patient's left, the left part is nearer
    assert side[round(z_l), round(u_l)] <= d_l
    marks = [Detection(*left_centre, 0.9, 8.0), Detection(*right_centre, 0.2, 5.0)]
    out = render_view3d(mask.astype(np.uint8), grid, marks, tmp_path / "view3d.png")
    assert png_problem(out) is None
    with pytest.raises(ValueError, match="world-aligned"):
        flipped = Geometry(grid.size, grid.spacing, grid.origin, (-1, 0, 0, 0, 1, 0, 0, 0, 1))
        render_view3d(mask, flipped, marks, tmp_path / "x.png")
