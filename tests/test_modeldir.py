"""The model-folder seal: checksums, format versions, provenance and the demo-grade rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungct.errors import LungCTError
from lungct.fileio import write_json_atomic
from lungct.modeldir import (
    DEMO_GRADE_SECONDS,
    MANIFEST_FORMAT,
    describe_data,
    is_demo_grade,
    seal_model_dir,
    verify_model_dir,
)
from lungct.plans import PLAN_FORMAT, PLAN_FORMAT_KEY
from unet_candidates.config import UNetPlan


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    root.mkdir()
    (root / "model.keras").write_bytes(b"weights")
    (root / "plan.json").write_text('{"name": "x"}\n')
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "epoch_001.keras").write_bytes(b"training state")
    write_json_atomic(root / "manifest.json", {"train_folds": [0, 1]})
    return root


def test_seal_then_verify_round_trip(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    write_json_atomic(
        data / "synth.json",
        {"seed": 4, "size": "full", "n_scans": 30, "n_annotations": 55, "generator_version": "5"},
    )
    sealed = seal_model_dir(root, "unet", 7200.0, data_dir=data, seeds={"plan": 3}, steps=900)
    assert sealed["train_folds"] == [0, 1]  # the stage's own keys stay
    assert sealed["format"] == MANIFEST_FORMAT
    assert sorted(sealed["files"]) == ["model.keras", "plan.json"]  # not checkpoints/
    prov = sealed["provenance"]
    assert prov["data"] == {
        "kind": "synthetic",
        "seed": 4,
        "size": "full",
        "scans": 30,
        "nodules": 55,
        "generator_version": "5",
        "background": None,
    }
    assert prov["seeds"] == {"plan": 3} and prov["steps"] == 900
    assert prov["hardware"]["cpu_count"] >= 1 and "numpy" in prov["versions"]
    assert verify_model_dir(root) == json.loads((root / "manifest.json").read_text())
    # Training state may change without breaking the seal.
    (root / "checkpoints" / "epoch_001.keras").write_bytes(b"newer state")
    verify_model_dir(root)
    assert not is_demo_grade(sealed)


def test_a_changed_or_missing_file_is_refused(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    seal_model_dir(root, "unet", 10.0)
    (root / "model.keras").write_bytes(b"weightz")
    with pytest.raises(LungCTError, match=r"model\.keras: file changed .*sha256 mismatch"):
        verify_model_dir(root)
    verify_model_dir(root, check_files=False)  # format checks only
    (root / "model.keras").unlink()
    with pytest.raises(LungCTError, match="sealed model file is missing"):
        verify_model_dir(root)


def test_missing_unsealed_newer_and_broken_manifests(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    with pytest.raises(LungCTError, match="not sealed: training did not finish"):
        verify_model_dir(root)
    (root / "manifest.json").unlink()
    with pytest.raises(LungCTError, match="no manifest.json"):
        verify_model_dir(root)
    with pytest.raises(LungCTError, match="does not exist"):
        verify_model_dir(tmp_path / "nowhere")
    write_json_atomic(root / "manifest.json", {})
    sealed = seal_model_dir(root, "fpr", 10.0)
    write_json_atomic(root / "manifest.json", {**sealed, "format": MANIFEST_FORMAT + 1})
    with pytest.raises(LungCTError, match="written by a newer version of the suite"):
        verify_model_dir(root)
    write_json_atomic(root / "manifest.json", {**sealed, "files": {"../x": "0"}})
    with pytest.raises(LungCTError, match="not a plain file name"):
        verify_model_dir(root)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(LungCTError, match="not valid JSON"):
        verify_model_dir(root)


def test_demo_grade_rule() -> None:
    def manifest(seconds: float, size: str | None) -> dict:
        data = {"kind": "synthetic", "size": size} if size else {"kind": "LUNA16 layout"}
        return {"provenance": {"train_seconds": seconds, "data": data}}

    assert is_demo_grade(manifest(180.0, "full"))  # minutes of training
    assert is_demo_grade(manifest(2 * DEMO_GRADE_SECONDS, "small"))  # small synthetic data
    assert not is_demo_grade(manifest(2 * DEMO_GRADE_SECONDS, "full"))
    assert not is_demo_grade(manifest(2 * DEMO_GRADE_SECONDS, None))


def test_describe_data_of_a_real_layout(tmp_path: Path) -> None:
    (tmp_path / "seriesuids.csv").write_text("1.2\n1.3\n\n")
    assert describe_data(tmp_path) == {"kind": "LUNA16 layout", "name": tmp_path.name, "scans": 2}
    assert describe_data(None) == {"kind": "unknown"}


def test_plans_carry_their_format_and_refuse_a_newer_one(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    UNetPlan().save(path)
    saved = json.loads(path.read_text())
    assert saved[PLAN_FORMAT_KEY] == PLAN_FORMAT
    assert UNetPlan.load(path) == UNetPlan()
    saved[PLAN_FORMAT_KEY] = PLAN_FORMAT + 1
    path.write_text(json.dumps(saved))
    with pytest.raises(
        LungCTError, match=r"plan\.json: written by a newer version of the suite \(plan format 2"
    ):
        UNetPlan.load(path)
    saved[PLAN_FORMAT_KEY] = "1"
    path.write_text(json.dumps(saved))
    with pytest.raises(LungCTError, match="plan format must be an integer"):
        UNetPlan.load(path)


def test_json_plans_refuse_a_newer_format(tmp_path: Path) -> None:
    from fp_reduction_3dcnn.config import FPRPlan, get_plan

    path = tmp_path / "plan.json"
    plan = get_plan("default")
    plan.save(path)
    assert FPRPlan.load(path) == plan
    saved = json.loads(path.read_text())
    path.write_text(json.dumps({**saved, PLAN_FORMAT_KEY: PLAN_FORMAT + 1}))
    with pytest.raises(LungCTError, match="newer version"):
        FPRPlan.load(path)
    del saved[PLAN_FORMAT_KEY]  # hand-written plans without the key still load
    path.write_text(json.dumps(saved))
    assert FPRPlan.load(path) == plan
