"""Training, the fold guard, resume, prediction, Grad-CAM and the command line (tiny shapes)."""

from __future__ import annotations

import csv
import json
import shutil

import keras
import numpy as np
import pytest

from fp_reduction_3dcnn.__main__ import build_parser, main
from fp_reduction_3dcnn.manifest import FoldManifest, check_split
from fp_reduction_3dcnn.predict import predict
from fp_reduction_3dcnn.testing import make_tiny_dataset, tiny_plan
from fp_reduction_3dcnn.train import latest_checkpoint, load_keras, train
from lungct.errors import LungCTError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TINY_PLAN = tiny_plan()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fpr_train")
    return make_tiny_dataset(root, n_scans=4)


@pytest.fixture(scope="module")
def model_dir(tiny, tmp_path_factory):
    """A model trained on folds 0-1, validated on fold 2 (fold 3 held out)."""
    out = tmp_path_factory.mktemp("fpr_model") / "model"
    summary = train(
        TINY_PLAN,
        tiny["cache"],
        tiny["candidates"],
        [0, 1],
        [2],
        out,
        data_dir=tiny["data"],
        test_folds=[3],
        progress=False,
    )
    assert summary["epochs_done"] == 1
    return out


def test_model_folder_layout(model_dir, tiny):
    for name in ("plan.json", "model.keras", "manifest.json", "logs/train_log.csv"):
        assert (model_dir / name).is_file(), name
    assert latest_checkpoint(model_dir)[0] == 1
    manifest = FoldManifest.load(model_dir)
    assert manifest.train_folds == [0, 1] and manifest.val_folds == [2]
    assert manifest.test_folds == [3]
    assert manifest.held_out_folds == [2, 3, 4, 5, 6, 7, 8, 9]
    assert manifest.train_series == sorted(tiny["uids"][:2])
    assert manifest.val_series == [tiny["uids"][2]]
    with open(model_dir / "logs" / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["0"]  # Keras counts epochs from 0
    assert float(rows[0]["loss"]) > 0 and float(rows[0]["steps"]) == 2
    assert 0 <= float(rows[0]["val_auc"]) <= 1


def test_training_refuses_overlapping_folds(tiny, tmp_path):
    with pytest.raises(LungCTError, match="never see its test fold"):
        check_split([0, 1, 2], [2])
    with pytest.raises(LungCTError, match="training and test"):
        check_split([0, 1], [2], [1, 9])
    with pytest.raises(LungCTError, match="never see its test fold"):
        train(TINY_PLAN, tiny["cache"], tiny["candidates"], [0, 1, 2], [2], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_training_refuses_an_empty_validation_fold(tiny, tmp_path):
    """Naming a validation fold without scans must not train silently without validation."""
    with pytest.raises(LungCTError, match=r"no candidates of the validation folds \[7\]"):
        train(TINY_PLAN, tiny["cache"], tiny["candidates"], [0, 1], [7], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_prediction_refuses_the_training_folds(model_dir, tiny, tmp_path):
    """The original code scored all test folds with one checkpoint; here that cannot happen."""
    out = tmp_path / "sub.csv"
    for fold in (0, 1):
        with pytest.raises(LungCTError, match="training data"):
            predict(model_dir, tiny["cache"], tiny["candidates"], out, folds=[fold], progress=False)
    # All candidates at once includes training series: refused as a whole.
    with pytest.raises(LungCTError, match="training data"):
        predict(model_dir, tiny["cache"], tiny["candidates"], out, progress=False)
    assert not out.exists()
    # Even a fold the cache does not know cannot slip through by name.
    manifest = FoldManifest.load(model_dir)
    with pytest.raises(LungCTError, match="training data"):
        manifest.check_prediction({tiny["uids"][0]: None})
    # Held-out folds are fine; the guard can be lifted on purpose.
    summary = predict(model_dir, tiny["cache"], tiny["candidates"], out, folds=[3], progress=False)
    assert summary["series"] == 1
    summary = predict(
        model_dir, tiny["cache"], tiny["candidates"], out, allow_train_folds=True, progress=False
    )
    assert summary["series"] == 4


def test_a_model_without_manifest_cannot_predict(model_dir, tiny, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(LungCTError, match="training folds are unknown"):
        predict(copy, tiny["cache"], tiny["candidates"], tmp_path / "s.csv", folds=[3])


def test_submission_and_tta(model_dir, tiny, tmp_path):
    plain, tta = tmp_path / "plain.csv", tmp_path / "tta.csv"
    predict(model_dir, tiny["cache"], tiny["candidates"], plain, folds=[2, 3], progress=False)
    predict(
        model_dir, tiny["cache"], tiny["candidates"], tta, folds=[2, 3], tta=True, progress=False
    )
    with open(plain) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["seriesuid", "coordX", "coordY", "coordZ", "probability"]
    assert {r["seriesuid"] for r in rows} == set(tiny["uids"][2:])
    with open(tiny["candidates"]) as handle:
        source = [r for r in csv.DictReader(handle) if r["seriesuid"] in set(tiny["uids"][2:])]
    assert len(rows) == len(source)
    assert [float(r["coordX"]) for r in rows] == [float(r["coordX"]) for r in source]
    p = np.array([float(r["probability"]) for r in rows])
    assert np.all((p >= 0) & (p <= 1))
    with open(tta) as handle:
        q = np.array([float(r["probability"]) for r in csv.DictReader(handle)])
    assert q.shape == p.shape and not np.allclose(p, q)


def test_resume_continues_and_checks_the_split(model_dir, tiny, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(model_dir, out)
    with pytest.raises(LungCTError, match="--resume"):
        train(TINY_PLAN, tiny["cache"], tiny["candidates"], [0, 1], [2], out, progress=False)
    with pytest.raises(LungCTError, match="cannot resume: train_folds"):
        train(
            TINY_PLAN,
            tiny["cache"],
            tiny["candidates"],
            [0, 1, 3],
            [2],
            out,
            test_folds=[],
            resume=True,
            progress=False,
        )
    summary = train(
        TINY_PLAN.replace(epochs=2),
        tiny["cache"],
        tiny["candidates"],
        [0, 1],
        [2],
        out,
        data_dir=tiny["data"],
        test_folds=[3],
        resume=True,
        progress=False,
    )
    assert summary["epochs_done"] == 2
    assert latest_checkpoint(out)[0] == 2
    with open(out / "logs" / "train_log.csv") as handle:
        assert [r["epoch"] for r in csv.DictReader(handle)] == ["0", "1"]
    with open(out / "logs" / "train_log.csv") as handle:
        lrs = [float(r["learning_rate"]) for r in csv.DictReader(handle)]
    assert lrs[1] == pytest.approx(lrs[0] * 0.975)
    # The optimiser state came back with the checkpoint: 2 epochs x 2 steps.
    resumed = load_keras(out / "checkpoints" / "epoch_002.keras")
    assert int(keras.ops.convert_to_numpy(resumed.optimizer.iterations)) == 4


def test_gradcam_png(model_dir, tiny, tmp_path):
    out = tmp_path / "cam.png"
    with open(tiny["annotations"]) as handle:
        nodule = next(r for r in csv.DictReader(handle) if r["seriesuid"] == tiny["uids"][3])
    world = [nodule[k] for k in ("coordX", "coordY", "coordZ")]
    scan = f"{tiny['data']}/subset3/{tiny['uids'][3]}.mhd"
    code = main(
        ["gradcam", "--scan", scan, "--world", *world, "--model", str(model_dir), "--out", str(out)]
    )
    assert code == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from fp_reduction_3dcnn.gradcam import grad_cam
    from fp_reduction_3dcnn.predict import open_model

    trained = open_model(model_dir)
    x = [np.random.default_rng(0).random((1, 20, 20, 6), dtype=np.float32) for _ in range(3)]
    cam, p = grad_cam(trained.model, x)
    assert cam.shape == (5, 5) and 0 <= cam.min() and cam.max() <= 1 and 0 < p < 1


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    code = main(
        [
            "train",
            "--cache",
            tiny["cache"],
            "--candidates",
            tiny["candidates"],
            "--folds",
            "0-2",
            "--val-folds",
            "2",
            "--out",
            str(tmp_path / "m"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    code = main(
        [
            "predict",
            "--cache",
            tiny["cache"],
            "--candidates",
            tiny["candidates"],
            "--model",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "s.csv"),
        ]
    )
    assert code == 2
    assert "model folder not found" in capsys.readouterr().err


def test_cli_params_and_plan(capsys):
    assert main(["params", "--plan", "paper", "--variant", "mgi"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["params"] == 21_451_777
    assert main(["plan", "--plan", "code", "--variant", "ri"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["optimizer"] == "adam" and plan["variant"] == "ri"
    assert main(["plan", "--merge", "concat"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["merge"] == "concat" and "integration" not in plan


@pytest.mark.parametrize("verb", ["train", "predict", "gradcam", "params", "plan"])
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([verb, "--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out
