"""Figures read on their own: the FROC's legend names what is drawn; Grad-CAM has a colour bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from integration.evaluation import FrocCurve, plot_froc

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _curve(label: str, shift: float = 0.0, confidence: float = 0.95) -> FrocCurve:
    fps = np.asarray([0.05, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0])
    sens = np.asarray([0.3, 0.5, 0.6, 0.7, 0.78, 0.85, 0.9, 0.92]) - shift
    grid = np.linspace(0.125, 8, 200)
    mean = np.interp(grid, fps, sens)
    return FrocCurve(
        fps, sens, label, 0.7 - shift, grid, mean - 0.08, mean + 0.06, mean - 0.01,
        (0.6 - shift, 0.8 - shift), confidence,
    )  # fmt: skip


def test_froc_legend_names_the_line_the_band_and_the_mean(tmp_path: Path) -> None:
    entries = plot_froc(_curve("CAD"), tmp_path / "one.png")
    assert entries == [
        "CAD: CPM 0.700 (95% CI 0.600-0.800)",
        "95% bootstrap band",
        "bootstrap mean",
        "sensitivity at 1/8 ... 8 FPs/scan",
    ]
    # The band's level is the bootstrap's, not a fixed 95%.
    assert "90% bootstrap band" in plot_froc(_curve("CAD", confidence=0.9), tmp_path / "90.png")
    several = plot_froc(
        [_curve("a"), _curve("b", 0.1), (np.asarray([0.5, 2.0]), np.asarray([0.4, 0.6]))],
        tmp_path / "three.png",
    )
    assert several[:2] == [
        "a: CPM 0.700 (95% CI 0.600-0.800)",
        "b: CPM 0.600 (95% CI 0.500-0.700)",
    ]
    assert "95% bootstrap band (in the curve's colour)" in several
    assert "bootstrap mean (in the curve's colour)" in several
    # Without a bootstrap nothing speaks of a band.
    plain = plot_froc((np.asarray([0.5, 2.0]), np.asarray([0.4, 0.6])), tmp_path / "plain.png")
    assert not any("bootstrap" in e for e in plain)


def test_gradcam_figure_has_a_colour_bar_and_every_view(tmp_path: Path) -> None:
    """The shipped MGI-CNN on a phantom: the PNG carries the jet scale at its right edge."""
    import matplotlib.image as mpimg

    from fp_reduction_3dcnn.gradcam import gradcam_figure
    from fp_reduction_3dcnn.predict import open_model
    from integration.modelset import SHIPPED_MODELS
    from lungct.cache import CachedScan
    from lungct.geometry import Geometry
    from lungct.testing import chest_phantom_hu

    trained = open_model(SHIPPED_MODELS / "fpr")
    shape = (60, 120, 120)
    volume = np.rint(chest_phantom_hu(shape)).astype(np.int16)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    volume[(z - 30) ** 2 + (y - 60) ** 2 + (x - 35) ** 2 <= 25] = 30  # a nodule in a lung
    geometry = Geometry(shape[::-1], trained.plan.cut_spacing, (0.0, 0.0, 0.0))
    scan = CachedScan("phantom", volume, None, geometry, {})
    world = geometry.voxel_to_world((30, 60, 35))
    out = tmp_path / "cam.png"
    result = gradcam_figure(trained, scan, world, out)
    assert 0.0 <= result["probability"] <= 1.0
    image = mpimg.imread(out)[..., :3]
    h, w = image.shape[:2]
    column = image[int(0.26 * h) : int(0.74 * h), int(0.942 * w)]
    top, bottom = column[: len(column) // 10].mean(0), column[-len(column) // 10 :].mean(0)
    assert top[0] > 0.4 and top[2] < 0.2, top  # dark red at 1
    assert bottom[2] > 0.4 and bottom[0] < 0.2, bottom  # dark blue at 0


def test_figure_writers_leave_the_callers_backend_and_figures_alone(tmp_path: Path) -> None:
    """A notebook's inline backend survives the suite's figure writers (run on a fresh
    interpreter that chose the SVG backend): none switches it, none leaves a pyplot figure."""
    import subprocess
    import sys

    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import numpy as np
from ct_gan_augment.grid import save_grid
from integration.evaluation import plot_froc
from lungct.geometry import Geometry
from lungct.scan import Scan
from lungct.show import show_scan
from lungct.testing import chest_phantom_hu
out = {str(tmp_path)!r}
scan = Scan(chest_phantom_hu((24, 48, 48)), Geometry((48, 48, 24), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0)), "s")
show_scan(scan, out + "/show.png")
plot_froc((np.asarray([0.5, 2.0]), np.asarray([0.4, 0.6])), out + "/froc.png")
save_grid(out + "/grid.png", [[np.zeros((4, 8, 8))]], ["a"])
print(matplotlib.get_backend(), len(plt.get_fignums()))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["svg", "0"]
    for name in ("show.png", "froc.png", "grid.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
