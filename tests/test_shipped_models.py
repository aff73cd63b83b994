"""The model set shipped in integration/shipped_models: it loads, detects, and guards itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from integration.__main__ import main
from integration.modelset import MODEL_CARD_FILE, SHIPPED_MODELS, read_model_set
from lungct.modeldir import verify_model_dir

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MAX_SET_BYTES = 40 * 1024 * 1024
LIDC_IDRI_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def test_the_shipped_set_is_sealed_small_and_not_demo_grade() -> None:
    model_set = read_model_set(SHIPPED_MODELS)
    assert model_set.stages == ["unet", "fpr", "fpr2", "malignancy"]  # two MGI-CNNs, averaged
    assert not model_set.demo_grade, model_set.warning()
    for stage in model_set.stages:
        data = verify_model_dir(SHIPPED_MODELS / stage)["provenance"]["data"]
        parts = data["parts"] if data.get("kind") == "merged" else [data]
        # Full-resolution training data: full-size synthetic chests or a real background.
        wanted = ("full",) if stage != "malignancy" else ("full", "real background")
        assert any(part["size"] in wanted for part in parts)
        # LIDC-IDRI-0001 is a test scan: never a training background.
        backgrounds = [str(part.get("background")) for part in parts]
        assert not any(LIDC_IDRI_0001 in b or "0001" in Path(b).name for b in backgrounds)
    size = sum(p.stat().st_size for p in SHIPPED_MODELS.rglob("*") if p.is_file())
    assert size <= MAX_SET_BYTES
    card = (SHIPPED_MODELS / MODEL_CARD_FILE).read_text()
    assert "Not a medical device" in card and "Measured performance" in card
    assert not any(SHIPPED_MODELS.rglob("checkpoints"))


def test_detect_uses_the_shipped_set_by_default(tmp_path: Path, capsys) -> None:
    from lungct.synth import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, 1, 4242, "small", progress=False, workers=1)
    scan = next(data.glob("subset0/*.mhd"))
    out = tmp_path / "out"
    assert main(["detect", "--scan", str(scan), "--out", str(out), "--no-report"]) == 0
    captured = capsys.readouterr()
    assert "warning:" not in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model_set"]["name"] == read_model_set(SHIPPED_MODELS).name
    assert not summary["model_set"]["demo_grade"]
    assert summary["candidates"] >= 1 and (out / "detections.csv").is_file()
    patient = summary["patient"]  # the shipped set scores malignancy
    assert patient["nodules"] == summary["detections_above_threshold"] == len(summary["nodules"])
    assert "patient malignancy score" in captured.out
    from unet_candidates.runtime import _gpu_visible

    if not _gpu_visible():  # on a CPU the U-Net runs as the set's 8-bit copy
        assert summary["unet_runtime"] == "int8"


def test_the_shipped_8_bit_copy_fits_its_u_net() -> None:
    from unet_candidates.runtime import INT8_RECORD, int8_problem

    assert int8_problem(SHIPPED_MODELS / "unet") is None
    record = json.loads((SHIPPED_MODELS / "unet" / INT8_RECORD).read_text())
    assert len(record["calibration"]["series"]) == 6
    assert LIDC_IDRI_0001 not in record["calibration"]["series"]  # a test scan
    assert "8-bit copy" in (SHIPPED_MODELS / MODEL_CARD_FILE).read_text()


def test_a_changed_shipped_weight_is_refused(tmp_path: Path, capsys) -> None:
    copy = tmp_path / "set"
    shutil.copytree(SHIPPED_MODELS, copy)
    weights = copy / "fpr" / "model.keras"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = tmp_path / "out"
    code = main(["detect", "--scan", "x.mhd", "--models", str(copy), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sha256 mismatch" in err[0]
    assert not out.exists()


def _as_written_before_merge(folder: Path, out: Path) -> Path:
    """A copy of a sealed MGI-CNN folder as the suite wrote it when the plan's ``merge`` was
    called ``integration``: that key in plan.json and in the model file's config, sealed."""
    import zipfile

    from lungct.modeldir import file_sha256, plan_digest

    shutil.copytree(folder, out)
    plan = json.loads((folder / "plan.json").read_text())
    plan = {("integration" if k == "merge" else k): v for k, v in plan.items()}
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    with (
        zipfile.ZipFile(folder / "model.keras") as old,
        zipfile.ZipFile(out / "model.keras", "w") as new,
    ):
        for item in old.infolist():
            data = old.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                inner = config["config"]
                config["config"] = {
                    ("integration" if k == "merge" else k): v for k, v in inner.items()
                }
                data = json.dumps(config).encode()
            new.writestr(item, data)
    manifest = json.loads((out / "manifest.json").read_text())
    trained = manifest["trained_plan"]
    manifest["trained_plan"] = {
        ("integration" if k == "merge" else k): v for k, v in trained.items()
    }
    manifest["plan_sha256"] = plan_digest(manifest["trained_plan"])
    for name in manifest["files"]:
        manifest["files"][name] = file_sha256(out / name)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def test_an_mgi_cnn_sealed_before_merge_was_named_loads_unchanged(tmp_path: Path) -> None:
    """A model folder written when the plan's ``merge`` was called ``integration`` (the
    shipped sets up to 3) still opens, with every weight of its file."""
    import zipfile

    import h5py
    import numpy as np

    from fp_reduction_3dcnn.predict import open_model

    folder = _as_written_before_merge(SHIPPED_MODELS / "fpr", tmp_path / "fpr")
    assert json.loads((folder / "plan.json").read_text())["integration"] == "sum"
    with zipfile.ZipFile(folder / "model.keras") as archive:
        config = json.loads(archive.read("config.json"))["config"]
        assert config["integration"] == "sum" and "merge" not in config
        with archive.open("model.weights.h5") as raw, h5py.File(raw) as weights:
            assert "layers/stream_integration/vars" in weights
            stored: list[np.ndarray] = []
            weights["layers"].visititems(
                lambda _, item: stored.append(item[()]) if isinstance(item, h5py.Dataset) else None
            )
    trained = open_model(folder)
    assert trained.plan.merge == "sum" and trained.model.merge == "sum"
    assert trained.model.get_layer("merge").mode == "sum"
    # Every weight of the file is in the model (none left at its initial value).
    key = lambda a: (a.shape, round(float(np.sum(a, dtype=np.float64)), 4))  # noqa: E731
    loaded = sorted(key(np.asarray(w)) for w in trained.model.weights)
    assert loaded == sorted(key(a) for a in stored)
