"""``integration demo``: the shipped set's number and the short run's, kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from integration.demo import DemoConfig, run_demo
from lungct.errors import LungCTError
from lungct.synth import generate_dataset


def test_dense_test_set_asks_for_nodules_per_scan(tmp_path: Path) -> None:
    summary = generate_dataset(
        tmp_path / "d", 2, seed=5, size="small", progress=False, workers=1, nodules_per_scan=6
    )
    rows = (tmp_path / "d" / "annotations.csv").read_text().splitlines()[1:]
    per_scan: dict[str, int] = {}
    for row in rows:
        per_scan[row.split(",")[0]] = per_scan.get(row.split(",")[0], 0) + 1
    assert summary["nodules_per_scan"] == 6
    assert len(per_scan) == 2 and all(4 <= n <= 6 for n in per_scan.values())
    # A rerun with another density regenerates; the same density keeps the scans.
    again = generate_dataset(
        tmp_path / "d", 2, seed=5, size="small", progress=False, workers=1, nodules_per_scan=6
    )
    assert again["n_skipped"] == 2
    other = generate_dataset(
        tmp_path / "d", 2, seed=5, size="small", progress=False, workers=1, nodules_per_scan=1
    )
    assert other["n_skipped"] == 0 and other["n_annotations"] == 2


def test_demo_refuses_nothing_to_do(tmp_path: Path) -> None:
    with pytest.raises(LungCTError, match="nothing to run"):
        run_demo(tmp_path, DemoConfig(eval_scans=0, short_run=False))


def test_demo_shipped_part_measures_the_shipped_set(tmp_path: Path) -> None:
    config = DemoConfig(
        eval_scans=1,
        eval_nodules_per_scan=4,
        eval_size="small",
        short_run=False,
        bootstrap=50,
        workers=1,
    )
    summary = run_demo(tmp_path, config)
    shipped = summary["shipped"]
    assert "short_run" not in summary
    assert shipped["model_set"]["name"] == "suite-default"
    assert (
        shipped["test_set"]["scans"] == 1 and shipped["nodules"] == shipped["test_set"]["nodules"]
    )
    assert 0.0 <= shipped["cpm"] <= 1.0
    lo, hi = shipped["cpm_ci95"]
    assert shipped["cpm_half_width"] == pytest.approx((hi - lo) / 2, abs=1e-4)
    assert Path(shipped["froc"]).is_file()
    assert Path(summary["report"]["html"]).is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["shipped"]["cpm"] == shipped["cpm"]


@pytest.mark.slow
def test_demo_short_run_is_reported_apart(tmp_path: Path) -> None:
    config = DemoConfig(
        eval_scans=1,
        eval_nodules_per_scan=3,
        eval_size="small",
        scans=10,
        unet_minutes=0.05,
        gan_minutes=0.05,
        fpr_minutes=0.05,
        bootstrap=20,
    )
    summary = run_demo(tmp_path, config)
    assert {"shipped", "report", "short_run"} <= set(summary)
    short = summary["short_run"]
    assert "not the shipped set's number" in short["what"]
    assert (tmp_path / "short_run" / "models" / "modelset.json").is_file()
    assert Path(short["froc"]).is_file()
