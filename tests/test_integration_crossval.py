"""`integration crossval` on four small synthetic scans with tiny stages: folds, leakage, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from integration.__main__ import main
from integration.crossval import check_no_leakage, fold_split, source_series, validation_fold
from integration.stages import Split
from integration.testing import tiny_dataset, tiny_settings
from lungct.errors import LungCTError
from lungct.tables import read_annotations, read_results

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    """Four small synthetic scans (subsets 0-3) and their cache on a 2 mm grid (fast)."""
    paths = tiny_dataset(tmp_path_factory.mktemp("crossval"))
    paths["settings"] = paths["root"] / "tiny.json"
    paths["settings"].write_text(json.dumps(tiny_settings()))
    return paths


def _crossval(dataset: dict[str, Path], out: Path, folds: str, *extra: str) -> list[str]:
    return [
        "crossval", "--data", str(dataset["data"]), "--cache", str(dataset["cache"]),
        "--out", str(out), "--folds", folds, "--settings", str(dataset["settings"]),
        "--bootstrap", "20", "--workers", "1", "--quiet", *extra,
    ]  # fmt: skip


def _uids_of_folds(data: Path, folds: list[int]) -> set[str]:
    return {p.stem for f in folds for p in (data / f"subset{f}").glob("*.mhd")}


def test_validation_fold_rule() -> None:
    assert validation_fold(3, range(10)) == 2
    assert validation_fold(0, range(10)) == 9  # k - 1 modulo 10
    assert validation_fold(0, [0, 1, 2, 3]) == 3  # nearest subset with scans before it
    split = fold_split(5, range(10))
    assert split == Split((0, 1, 2, 3, 6, 7, 8, 9), (4,), (5,))
    assert fold_split(1, [0, 1, 2]) == Split((2,), (0,), (1,))
    with pytest.raises(LungCTError, match="fold 7 has no scans"):
        fold_split(7, [0, 1, 2])
    with pytest.raises(LungCTError, match="at least three subsets"):
        fold_split(0, [0, 1])


def test_leakage_check_names_the_leaked_series() -> None:
    manifest = {
        "test_series": ["t1", "t2"],
        "train_series": ["a", "b"],
        "val_series": ["c"],
        "trained_on": {"MGI-CNN": {"train": ["a", "a.ctgan0"], "val": ["c"]}},
    }
    check_no_leakage(manifest)  # clean
    assert source_series("t1.ctgan3") == "t1" and source_series("1.2.ctgan") == "1.2.ctgan"
    leaked = json.loads(json.dumps(manifest))
    leaked["trained_on"]["MGI-CNN"]["train"].append("t2.ctgan0")  # an augmented test scan
    with pytest.raises(LungCTError, match="t2.*MGI-CNN train series"):
        check_no_leakage(leaked)
    leaked = json.loads(json.dumps(manifest))
    leaked["val_series"].append("t1")
    with pytest.raises(LungCTError, match="t1.*validation series"):
        check_no_leakage(leaked)


def test_crossval_pools_folds_and_resumes(dataset: dict[str, Path], capsys) -> None:
    data, out = dataset["data"], dataset["root"] / "out"
    nodules = read_annotations(data / "annotations.csv")
    for fold in (0, 1, 3):  # test folds and fold 0's training fold (the CT-GAN needs nodules)
        assert _uids_of_folds(data, [fold]) & set(nodules.uids), f"subset{fold} has no nodule"

    # Fold 3 first; then folds 0 and 3: fold 3 is skipped, fold 0 runs, both are pooled.
    assert main(_crossval(dataset, out, "3")) == 0, capsys.readouterr().err
    submission3 = out / "fold3" / "submission.csv"
    stamp3 = submission3.stat().st_mtime_ns
    capsys.readouterr()
    assert main(_crossval(dataset, out, "0,3")) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "fold 3 (2/2): submission exists, skipped" in printed
    assert "[fold 0] train U-Net" in printed and "[fold 3] train" not in printed
    assert submission3.stat().st_mtime_ns == stamp3

    # Per-fold manifests: the validation rule, and no test series anywhere in training.
    for fold, val, train in ((3, 2, [0, 1]), (0, 3, [1, 2])):
        manifest = json.loads((out / f"fold{fold}" / "manifest.json").read_text())
        assert manifest["complete"] is True
        assert manifest["split"] == {"train": train, "val": [val], "test": [fold]}
        test = set(manifest["test_series"])
        assert test == _uids_of_folds(data, [fold])
        assert set(manifest["train_series"]) == _uids_of_folds(data, train)
        assert set(manifest["val_series"]) == _uids_of_folds(data, [val])
        trained = manifest["trained_on"]
        assert set(trained) == {"U-Net", "CT-GAN", "MGI-CNN"}
        assert set(trained["CT-GAN"]["train"]) <= set(manifest["train_series"])  # GAN: train only
        fpr_train = {source_series(u) for u in trained["MGI-CNN"]["train"]}
        assert fpr_train <= set(manifest["train_series"])
        assert any(".ctgan" in u for u in trained["MGI-CNN"]["train"]), "augmented copies used"
        everything = set(manifest["train_series"]) | set(manifest["val_series"])
        for roles in trained.values():
            everything |= {source_series(u) for uids in roles.values() for u in uids}
        assert not test & everything
        check_no_leakage(manifest)
        scored = read_results(out / f"fold{fold}" / "submission.csv")
        assert set(scored.uids) <= test and len(scored) > 0

    # The pooled evaluation: one submission, one series list, one FROC.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["folds"] == [0, 3] and summary["scans"] == 2
    assert summary["nodules"] == sum(1 for u in nodules.seriesuids if u in
                                     _uids_of_folds(data, [0, 3]))  # fmt: skip
    assert set(summary["sensitivity"]) == {"0.125", "0.25", "0.5", "1", "2", "4", "8"}
    assert len(summary["cpm_ci95"]) == 2 and 0.0 <= summary["cpm"] <= 1.0
    pooled = read_results(out / "pooled" / "submission.csv")
    assert len(pooled) == sum(
        len(read_results(out / f"fold{k}" / "submission.csv")) for k in (0, 3)
    )
    assert (out / "evaluation" / "froc.png").read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert metrics["cpm"] == summary["cpm"] and metrics["bootstrap"] == 20
    with open(out / "per_fold.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["fold"] for r in rows] == ["0", "3"] and all(r["scans"] == "1" for r in rows)
    assert (out / "fold0" / "models" / "pipeline.json").is_file()  # usable with `detect`

    # A half-done fold: the MGI-CNN's final model and the submission are gone. The rerun keeps
    # the U-Net and the CT-GAN, continues the MGI-CNN from its checkpoint and scores again.
    fold0 = out / "fold0"
    unet_stamp = (fold0 / "models" / "unet" / "model.keras").stat().st_mtime_ns
    gan_stamp = (fold0 / "models" / "gan" / "generator.keras").stat().st_mtime_ns
    for name in ("model.keras", "integration_done.json"):
        (fold0 / "models" / "fpr" / name).unlink()
    (fold0 / "submission.csv").unlink()
    assert main(_crossval(dataset, out, "0")) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "train U-Net" not in printed and "train CT-GAN" not in printed
    assert "[fold 0] train MGI-CNN" in printed and "[fold 0] score candidates" in printed
    assert (fold0 / "models" / "unet" / "model.keras").stat().st_mtime_ns == unet_stamp
    assert (fold0 / "models" / "gan" / "generator.keras").stat().st_mtime_ns == gan_stamp
    assert (fold0 / "models" / "fpr" / "model.keras").is_file()
    assert (fold0 / "submission.csv").is_file()

    # Other settings in the same folder are refused (one line, exit 2).
    assert main(_crossval(dataset, out, "0", "--tta")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]


def test_crossval_errors_are_one_line(dataset: dict[str, Path], tmp_path: Path, capsys) -> None:
    bad_data = {**dataset, "data": tmp_path / "absent"}
    assert main(_crossval(bad_data, tmp_path / "o", "0")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "absent: dataset folder does not exist" in err[0]
    assert main(_crossval(dataset, tmp_path / "o", "7")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fold 7 has no scans" in err[0]
    (tmp_path / "bad.json").write_text('{"unet_minuts": 1}')
    argv = _crossval(dataset, tmp_path / "o", "0")
    argv[argv.index("--settings") + 1] = str(tmp_path / "bad.json")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown settings ['unet_minuts']" in err[0]
    assert not (tmp_path / "o" / "fold0").exists()
