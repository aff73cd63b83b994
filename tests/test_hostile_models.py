"""Hostile and broken model folders, plans and options: one error line each, never a traceback.

A corpus of model folders built in a temporary folder (a tiny U-Net trained for real, a
hand-made MGI-CNN, a model set of both) is broken one way per case: a foreign class or a Lambda
layer inside ``model.keras``, another stage's network or folder, weights that do not fit the
plan, manifests and set descriptions that are valid JSON of the wrong shape, a plan edited
after training, a training that did not finish. Each case runs a command's real parser and
error handling (``main``) and checks: exit status 2, exactly one ``error:`` line naming the file
and the problem, no traceback, nothing written and no input file changed. A few run as real
``python -m`` subprocesses without ``TF_CPP_MIN_LOG_LEVEL``, after TensorFlow has loaded, so
TensorFlow's start-up lines would show there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from ct_gan_augment.__main__ import main as gan_main
from fp_reduction_3dcnn.__main__ import main as fpr_main
from fp_reduction_3dcnn.config import get_plan
from fp_reduction_3dcnn.manifest import FoldManifest
from integration.__main__ import main as integration_main
from integration.modelset import SHIPPED_MODELS, write_model_set
from integration.pipeline import Detector, PipelineConfig
from lungct.__main__ import main as lungct_main
from lungct.cache import prepare_dataset
from lungct.errors import LungCTError
from lungct.io import write_scan
from lungct.modeldir import (
    keras_file_problem,
    keras_load_safe,
    plan_digest,
    seal_model_dir,
    verify_model_dir,
)
from lungct.preprocess import PreprocessPlan
from lungct.testing import seal_hand_made_model
from unet_candidates.__main__ import main as unet_main
from unet_candidates.extract import unet_architecture
from unet_candidates.testing import phantom_chest, tiny_plan, write_tiny_luna
from unet_candidates.train import train as train_unet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
SEAL = ("format", "files", "plan_sha256", "trained_plan", "provenance")


# ----------------------------------------------------------------------------------------------
# The corpus's healthy folders
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A trained tiny U-Net, a hand-made MGI-CNN, a model set of both and a phantom scan."""
    root = tmp_path_factory.mktemp("hostile")
    data = write_tiny_luna(root / "data", scans_per_fold=1, folds=2)
    cache = root / "cache"
    prepare_dataset(
        data, cache, PreprocessPlan(name="test4mm", spacing=(4.0, 4.0, 4.0)), workers=1,
        progress=False,
    )  # fmt: skip
    unet = root / "unet"
    train_unet(tiny_plan("2d", epochs=1), data, cache, [0], [1], unet, progress=False)

    from fp_reduction_3dcnn.model import MGICNN

    fpr = root / "fpr"
    fpr.mkdir()
    plan = get_plan("default").replace(
        stream_filters=(4, 4, 4), stream_top_filters=4, head_filters=4, dense_units=(8,)
    )
    MGICNN.from_plan(plan).save(fpr / "model.keras")
    plan.save(fpr / "plan.json")
    FoldManifest([0, 1], [2], [], ["1.2.3.0.0"], ["1.2.3.1.0"]).save(fpr)
    seal_hand_made_model(fpr, "fpr")

    models = root / "set"
    shutil.copytree(unet, models / "unet", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(fpr, models / "fpr")
    PipelineConfig().save(models)
    write_model_set(models, name="hostile", version="0")

    scan, _ = phantom_chest(seriesuid="9.9.9", seed=3)
    write_scan(scan, root / "scan.mhd")
    return {"root": root, "unet": unet, "fpr": fpr, "set": models, "scan": root / "scan.mhd"}


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: object) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _seal_afresh(folder: Path, stage: str) -> None:
    """Seal as if the manifest had never recorded a plan (a folder sealed by hand)."""
    manifest = {k: v for k, v in _manifest(folder).items() if k not in SEAL}
    _write_manifest(folder, manifest)
    seal_model_dir(folder, stage, 0.0)


def _rewrite_config(weights: Path, change: Callable[[dict], dict]) -> None:
    """Change ``config.json`` inside a ``.keras`` archive, the weights left as they are."""
    with zipfile.ZipFile(weights) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["config.json"] = json.dumps(change(json.loads(members["config.json"]))).encode()
    with zipfile.ZipFile(weights, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def _edit_plan(folder: Path, **changes: object) -> None:
    plan = json.loads((folder / "plan.json").read_text())
    plan.update(changes)
    (folder / "plan.json").write_text(json.dumps(plan, indent=2))


# ----------------------------------------------------------------------------------------------
# Ways to break a folder (each gets a fresh copy of the healthy one)
# ----------------------------------------------------------------------------------------------


def foreign_class(folder: Path, world: dict) -> None:
    def change(config: dict) -> dict:
        return {**config, "module": "os", "class_name": "system", "registered_name": "os>system"}

    _rewrite_config(folder / "model.keras", change)
    seal_model_dir(folder, "unet", 0.0)


def lambda_layer(folder: Path, world: dict) -> None:
    import keras

    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Lambda(lambda x: x[..., :1])(inputs)
    keras.Model(inputs, outputs).save(folder / "model.keras")
    seal_model_dir(folder, "unet", 0.0)


def mgicnn_in_unet_folder(folder: Path, world: dict) -> None:
    shutil.copy(world["fpr"] / "model.keras", folder / "model.keras")
    seal_model_dir(folder, "unet", 0.0)


def unet_in_fpr_folder(folder: Path, world: dict) -> None:
    shutil.copy(world["unet"] / "model.keras", folder / "model.keras")
    seal_model_dir(folder, "fpr", 0.0)


def channels_mismatch(folder: Path, world: dict) -> None:
    _edit_plan(folder, patch_size=[5, 16, 16], window_size=[5, 32, 32])
    _seal_afresh(folder, "unet")


def filters_mismatch(folder: Path, world: dict) -> None:
    _edit_plan(folder, filters=[8, 16])
    _seal_afresh(folder, "unet")


def hu_window_edited(folder: Path, world: dict) -> None:
    _edit_plan(folder, hu_window=[-1200.0, 600.0])


def fpr_input_edited(folder: Path, world: dict) -> None:
    _edit_plan(folder, input_size=[24, 24, 6])


def manifest_is_a_list(folder: Path, world: dict) -> None:
    _write_manifest(folder, [1, 2, 3])


def manifest_files_as_list(folder: Path, world: dict) -> None:
    manifest = _manifest(folder)
    _write_manifest(folder, {**manifest, "files": list(manifest["files"].items())})


def manifest_provenance_string(folder: Path, world: dict) -> None:
    _write_manifest(folder, {**_manifest(folder), "provenance": "trained"})


def manifest_folds_string(folder: Path, world: dict) -> None:
    _write_manifest(folder, {**_manifest(folder), "train_folds": "zero"})


def manifest_without_keys(folder: Path, world: dict) -> None:
    _write_manifest(folder, {})


def unfinished(folder: Path, world: dict) -> None:
    """What a training killed before its end leaves: a manifest without the seal."""
    _write_manifest(folder, {k: v for k, v in _manifest(folder).items() if k not in SEAL})


def not_a_keras_file(folder: Path, world: dict) -> None:
    (folder / "model.keras").write_bytes(b"PK\x03\x04 but not a zip archive")
    seal_model_dir(folder, "unet", 0.0)


def set_stages_of_objects(folder: Path, world: dict) -> None:
    info = json.loads((folder / "modelset.json").read_text())
    (folder / "modelset.json").write_text(json.dumps({**info, "stages": ["unet", {"fpr": 1}]}))


def set_pipeline_list(folder: Path, world: dict) -> None:
    (folder / "pipeline.json").write_text("[0.5, true]")


def set_unet_plan_edited(folder: Path, world: dict) -> None:
    hu_window_edited(folder / "unet", world)


def set_unet_unfinished(folder: Path, world: dict) -> None:
    unfinished(folder / "unet", world)


def _command(kind: str, folder: Path, world: dict, out: Path) -> tuple[Callable, list[str]]:
    scan = str(world["scan"])
    if kind == "extract":
        return unet_main, ["extract", "--model", str(folder), "--scan", scan, "--out",
                           str(out / "c.csv"), "--quiet"]  # fmt: skip
    if kind == "predict":
        return fpr_main, ["predict", "--model", str(folder), "--cache", str(out / "cache"),
                          "--candidates", str(out / "c.csv"), "--out", str(out / "s.csv"),
                          "--quiet"]  # fmt: skip
    if kind == "inject":
        return gan_main, ["inject", "--model", str(folder), "--scan", scan, "--world", "0", "0",
                          "0", "--out", str(out / "t.mhd")]  # fmt: skip
    return integration_main, ["detect", "--models", str(folder), "--scan", scan, "--out",
                              str(out / "detect"), "--no-report"]  # fmt: skip


# (case, healthy folder, break it, command, what the one line must hold)
CORPUS = [
    ("foreign class", "unet", foreign_class, "extract",
     ["model.keras: ", "class 'system' of the module 'os'", "refused"]),
    ("Lambda layer", "unet", lambda_layer, "extract",
     ["model.keras: ", "Lambda layer", "safe mode"]),
    ("MGI-CNN weights in a U-Net folder", "unet", mgicnn_in_unet_folder, "extract",
     ["model.keras: ", "'MGICNN' network, not a U-Net"]),
    ("U-Net weights in an MGI-CNN folder", "fpr", unet_in_fpr_folder, "predict",
     ["model.keras: ", "'UNet2D' network, not an MGI-CNN"]),
    ("plan channels do not fit the weights", "unet", channels_mismatch, "extract",
     ["model.keras: ", "does not fit the plan", "input_channels 3 (plan 5)"]),
    ("plan filters do not fit the weights", "unet", filters_mismatch, "extract",
     ["model.keras: ", "does not fit the plan", "filters [4,8] (plan [8,16])"]),
    ("U-Net HU window edited after training", "unet", hu_window_edited, "extract",
     ["plan.json: edited after training", "hu_window [-1000.0,400.0] -> [-1200.0,600.0]"]),
    ("MGI-CNN input size edited after training", "fpr", fpr_input_edited, "predict",
     ["plan.json: edited after training"]),
    ("manifest is a list", "unet", manifest_is_a_list, "extract",
     ["manifest.json: ", "must be a JSON object, not a list"]),
    ("manifest files as a list", "unet", manifest_files_as_list, "extract",
     ["manifest.json: ", "files must be a JSON object of strings"]),
    ("manifest provenance a string", "unet", manifest_provenance_string, "extract",
     ["manifest.json: ", "provenance must be a JSON object, got 'trained'"]),
    ("manifest folds a string", "fpr", manifest_folds_string, "predict",
     ["manifest.json: ", "train_folds must be a list of integers, got 'zero'"]),
    ("manifest without its keys", "fpr", manifest_without_keys, "predict",
     ["manifest.json: ", "are missing"]),
    ("training did not finish", "unet", unfinished, "extract",
     ["manifest.json: ", "not sealed: training did not finish", "--allow-unfinished"]),
    ("MGI-CNN training did not finish", "fpr", unfinished, "predict",
     ["manifest.json: ", "not sealed", "--allow-unfinished"]),
    ("model.keras is not an archive", "unet", not_a_keras_file, "extract",
     ["model.keras: cannot be loaded as a Keras model"]),
    ("an MGI-CNN folder given to extract", "fpr", None, "extract",
     ["is an MGI-CNN model folder, not a U-Net one"]),
    ("a U-Net folder given to inject", "unet", None, "inject",
     ["is a U-Net model folder, not a CT-GAN one"]),
    ("model set stages of objects", "set", set_stages_of_objects, "detect",
     ["modelset.json: ", "stages must be a list of strings"]),
    ("pipeline.json a list", "set", set_pipeline_list, "detect",
     ["pipeline.json: ", "must be a JSON object"]),
    ("a set whose U-Net plan was edited", "set", set_unet_plan_edited, "detect",
     ["unet/plan.json: edited after training", "hu_window"]),
    ("a set whose U-Net training did not finish", "set", set_unet_unfinished, "detect",
     ["unet/manifest.json: ", "not sealed"]),
]  # fmt: skip


def _one_error_line(code: int, err: str, expected: list[str]) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, err)
    line = lines[0]
    assert line.startswith("error: "), line
    for text in expected:
        assert text in line, (text, line)
    return line


@pytest.mark.parametrize(
    ("source", "breaker", "kind", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CORPUS],
)
def test_a_broken_folder_is_one_error_line(
    world: dict, tmp_path: Path, capsys, source: str, breaker, kind: str, expected: list[str]
) -> None:
    folder = tmp_path / source
    shutil.copytree(world[source], folder, ignore=shutil.ignore_patterns("checkpoints"))
    if breaker is not None:
        breaker(folder, world)
    before = _hashes(folder)
    out = tmp_path / "out"
    main, argv = _command(kind, folder, world, out)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # pragma: no cover - a broken folder is not an option error
        code = exc.code
    line = _one_error_line(code, capsys.readouterr().err, expected)
    assert str(folder) in line  # the folder or file is named
    assert _hashes(folder) == before, "a refused folder must not be changed"
    assert not out.exists(), "nothing may be written for a refused folder"


BAD_OPTIONS = [
    (fpr_main, ["predict", "--model", "m", "--cache", "c", "--candidates", "c.csv", "--out",
                "o.csv", "--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
    (fpr_main, ["train", "--cache", "c", "--candidates", "c.csv", "--folds", "0", "--out", "o",
                "--epochs", "0"], "--epochs: must be a positive integer, got 0"),
    (unet_main, ["train", "--data", "d", "--cache", "c", "--out", "o", "--max-minutes", "-5"],
     "--max-minutes: must be a number above 0, got -5"),
    (unet_main, ["extract", "--model", "m", "--scan", "s.mhd", "--out", "o.csv",
                 "--max-candidates", "-1"], "--max-candidates: must be 0 or more, got -1"),
    (gan_main, ["augment", "--data", "d", "--folds", "0", "--model", "m", "--per-scan", "1",
                "--out", "o", "--copies", "0"], "--copies: must be a positive integer, got 0"),
    (gan_main, ["inject", "--scan", "s.mhd", "--model", "m", "--auto", "two", "--out", "o.mhd"],
     "--auto: 'two' is not an integer"),
    (integration_main, ["detect", "--scan", "s.mhd", "--out", "o", "--threshold", "nan"],
     "--threshold: 'nan' is not a number"),
    (integration_main, ["evaluate-models", "--models", "m", "--data", "d", "--cache", "c",
                        "--out", "o", "--workers", "0"], "--workers: must be a positive integer"),
    (integration_main, ["crossval", "--data", "d", "--cache", "c", "--out", "o",
                        "--unet-minutes", "0"], "--unet-minutes: must be a number above 0"),
    (lungct_main, ["synth", "--out", "o", "--scans", "0"],
     "--scans: must be a positive integer, got 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("main", "argv", "expected"),
    [pytest.param(*case, id=f"{case[1][0]} {case[2].split(':')[0]}") for case in BAD_OPTIONS],
)
def test_a_bad_number_option_is_one_line_from_the_parser(
    tmp_path: Path, monkeypatch, capsys, main, argv: list[str], expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    line = _one_error_line(info.value.code, capsys.readouterr().err, [expected])
    assert "usage:" not in line and "--help" in line
    assert not any(tmp_path.iterdir()), "nothing may be written for a refused option"


# ----------------------------------------------------------------------------------------------
# The done marker, the trained plan, safe mode
# ----------------------------------------------------------------------------------------------


def test_an_unfinished_folder_is_used_when_allowed(world: dict, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "unet"
    shutil.copytree(world["unet"], folder)
    unfinished(folder, world)
    out = tmp_path / "c.csv"
    argv = ["extract", "--model", str(folder), "--scan", str(world["scan"]), "--out", str(out)]
    assert unet_main([*argv, "--quiet"]) == 2
    capsys.readouterr()
    assert unet_main([*argv, "--quiet", "--allow-unfinished"]) == 0, capsys.readouterr().err
    assert out.is_file()

    models = tmp_path / "set"
    shutil.copytree(world["set"], models)
    set_unet_unfinished(models, world)
    with pytest.raises(LungCTError, match="not sealed"):
        Detector.load(models, runtime="keras")
    detector = Detector.load(models, runtime="keras", allow_unfinished=True)
    assert detector.model_set.unfinished == ["unet"]
    assert "did not finish" in detector.model_set.warning()


def test_training_records_the_plan_and_refuses_an_edit(world: dict, tmp_path: Path) -> None:
    folder = tmp_path / "unet"
    shutil.copytree(world["unet"], folder)
    manifest = verify_model_dir(folder, stage="unet")
    plan = json.loads((folder / "plan.json").read_text())
    assert manifest["plan_sha256"] == plan_digest(plan)
    assert manifest["trained_plan"] == {k: v for k, v in plan.items() if k != "plan_format"}
    # The digest is of the plan, not of its spelling: reordered, reindented and 400 for 400.0.
    respelled = {k: plan[k] for k in reversed(list(plan))}
    respelled["hu_window"] = [-1000, 400]
    (folder / "plan.json").write_text(json.dumps(respelled))
    verify_model_dir(folder, check_files=False)
    # An edit is refused, and sealing the folder again does not cover it.
    _edit_plan(folder, hu_window=[-1100.0, 400.0], threshold=0.2)
    with pytest.raises(LungCTError, match=r"edited after training \(hu_window .*threshold"):
        verify_model_dir(folder, check_files=False)
    with pytest.raises(LungCTError, match="not sealing"):
        seal_model_dir(folder, "unet", 1.0)
    # Resuming with an edited plan is refused before anything is trained.
    assert manifest["training_plan"]["hu_window"] == [-1000.0, 400.0]
    with pytest.raises(LungCTError, match=r"plan\.json: edited since training started"):
        train_unet(None, tmp_path / "data", tmp_path / "cache", [0], [1], folder, resume=True)


def test_a_plan_edit_is_refused_in_a_folder_sealed_before_the_seal_held_the_plan(
    tmp_path: Path,
) -> None:
    """Folders sealed before the seal carried the trained plan (the shipped sets up to 3):
    the plan file's checksum holds it."""
    folder = tmp_path / "unet"
    shutil.copytree(SHIPPED_MODELS / "unet", folder)
    manifest = _manifest(folder)
    for key in ("plan_sha256", "trained_plan"):
        manifest.pop(key, None)
    _write_manifest(folder, manifest)
    verify_model_dir(folder, stage="unet")
    _edit_plan(folder, hu_window=[-1200.0, 400.0])
    with pytest.raises(LungCTError, match=r"plan\.json: edited after training \(sha256"):
        verify_model_dir(folder)


def test_keras_safe_mode_itself_refuses_a_lambda(world: dict, tmp_path: Path) -> None:
    """Below the config check, Keras safe mode still refuses code, in one line."""
    folder = tmp_path / "unet"
    shutil.copytree(world["unet"], folder)
    lambda_layer(folder, world)
    with pytest.raises(LungCTError) as info:
        keras_load_safe(folder / "model.keras")
    message = str(info.value)
    assert "safe mode" in message and "\n" not in message and len(message) < 400


def test_an_atomic_model_save_checks_the_archive(world: dict, tmp_path: Path) -> None:
    good = world["unet"] / "model.keras"
    assert keras_file_problem(good) is None
    cut = tmp_path / "cut.keras"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "not written whole" in keras_file_problem(cut)


def test_the_architecture_check_matches_what_the_plan_builds() -> None:
    for dims in ("2d", "3d"):
        plan = tiny_plan(dims)
        assert unet_architecture(plan).items() <= plan.build_model().get_config().items()
    from fp_reduction_3dcnn.model import MGICNN
    from fp_reduction_3dcnn.train import mgicnn_architecture

    plan = get_plan("default").replace(stream_filters=(4, 4, 4), stream_top_filters=4,
                                       head_filters=4, dense_units=(8,))  # fmt: skip
    config = json.loads(json.dumps(MGICNN.from_plan(plan).get_config()))
    assert mgicnn_architecture(plan).items() <= config.items()


# ----------------------------------------------------------------------------------------------
# Real commands: one line on stderr after TensorFlow has started
# ----------------------------------------------------------------------------------------------

PROBE = """
import json, runpy, sys
package, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(package, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.mark.parametrize(
    ("source", "breaker", "kind", "expected"),
    [
        ("unet", foreign_class, "extract", "class 'system' of the module 'os'"),
        ("fpr", unet_in_fpr_folder, "predict", "'UNet2D' network, not an MGI-CNN"),
        ("unet", unfinished, "inject", "not sealed"),
    ],
    ids=["unet_candidates", "fp_reduction_3dcnn", "ct_gan_augment"],
)
def test_a_real_command_prints_one_line_after_tensorflow_started(
    world: dict, tmp_path: Path, source: str, breaker, kind: str, expected: str
) -> None:
    folder = tmp_path / source
    shutil.copytree(world[source], folder, ignore=shutil.ignore_patterns("checkpoints"))
    breaker(folder, world)
    before = _hashes(folder)
    main, argv = _command(kind, folder, world, tmp_path / "out")
    package = main.__module__.split(".")[0]
    env = {
        k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel")
    }
    result = subprocess.run(
        [sys.executable, "-c", PROBE, package, *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["tensorflow"], "the command failed before TensorFlow started: pick another"
    _one_error_line(report["code"], result.stderr, [str(folder), expected])
    assert _hashes(folder) == before and not (tmp_path / "out").exists()
