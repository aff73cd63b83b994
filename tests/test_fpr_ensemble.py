"""A model set whose false-positive reduction is an ensemble (``fpr/`` + ``fpr2/``): the scores
are the mean of the members', in ``detect`` and in ``evaluate-models``; the set's checks cover
every member."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fp_reduction_3dcnn.config import get_plan
from fp_reduction_3dcnn.manifest import FoldManifest
from integration.__main__ import main as integration_main
from integration.modelset import read_model_set, write_model_set
from integration.pipeline import Detector, PipelineConfig, detect, score_candidates, to_cache_grid
from integration.recipe import evaluate_model_set, mean_submissions, threshold_on_submission
from integration.stages import fold_uids
from lungct.cache import prepare_dataset
from lungct.errors import LungCTError
from lungct.io import read_scan, write_scan
from lungct.preprocess import PreprocessPlan
from lungct.testing import seal_hand_made_model
from unet_candidates.testing import phantom_chest, tiny_plan, write_tiny_luna
from unet_candidates.train import train as train_unet

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _mgi(folder: Path, seed: int, trained_on: str = "1.2.3.0.0") -> Path:
    """A hand-made, sealed MGI-CNN folder whose weights depend on ``seed``, its manifest naming
    ``trained_on`` as its training series."""
    import keras

    from fp_reduction_3dcnn.model import MGICNN

    folder.mkdir(parents=True)
    plan = get_plan("default").replace(
        stream_filters=(4, 4, 4), stream_top_filters=4, head_filters=4, dense_units=(8,)
    )
    keras.utils.set_random_seed(seed)
    MGICNN.from_plan(plan).save(folder / "model.keras")
    plan.save(folder / "plan.json")
    FoldManifest([0], [1], [], [trained_on], ["1.2.3.1.0"]).save(folder)
    seal_hand_made_model(folder, "fpr")
    return folder


def _set(root: Path, unet: Path, members: list[Path]) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(unet, root / "unet", ignore=shutil.ignore_patterns("checkpoints"))
    for i, member in enumerate(members):
        shutil.copytree(member, root / ("fpr" if i == 0 else f"fpr{i + 1}"))
    PipelineConfig(threshold=0.5).save(root)
    write_model_set(root, name=root.name, version="0")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny trained U-Net, two MGI-CNNs with other weights, the sets A, B and A+B, a scan."""
    root = tmp_path_factory.mktemp("ensemble")
    data = write_tiny_luna(root / "data", scans_per_fold=1, folds=3)
    cache = root / "cache"
    grid = PreprocessPlan(name="test4mm", spacing=(4.0, 4.0, 4.0))
    prepare_dataset(data, cache, grid, workers=1, progress=False)
    unet = root / "unet"
    plan = tiny_plan("2d", epochs=1, threshold=1e-3, max_candidates=20)  # candidates to score
    train_unet(plan, data, cache, [0], [1], unet, progress=False)
    a, b = _mgi(root / "mgi_a", 1), _mgi(root / "mgi_b", 2, trained_on="1.2.3.7.7")
    scan, _ = phantom_chest(seriesuid="9.9.9", seed=3)
    write_scan(scan, root / "scan.mhd")
    held_out = root / "held_out"  # fold 2 alone: no model of the sets saw it
    shutil.copytree(data / "subset2", held_out / "subset2")
    rows = (data / "annotations.csv").read_text().splitlines()
    (held_out / "annotations.csv").write_text(
        "\n".join([rows[0], *(r for r in rows[1:] if r.startswith("1.2.3.2."))]) + "\n"
    )
    return {
        "root": root,
        "a": _set(root / "set_a", unet, [a]),
        "b": _set(root / "set_b", unet, [b]),
        "ab": _set(root / "set_ab", unet, [a, b]),
        "scan": root / "scan.mhd",
        "held_out": held_out,
    }


def test_the_ensemble_scores_the_mean_of_its_members(world, tmp_path):
    model_set = read_model_set(world["ab"])
    assert model_set.stages == ["unet", "fpr", "fpr2"]
    card = (world["ab"] / "MODEL_CARD.md").read_text()
    assert "ensemble of 2 networks (`fpr/`, `fpr2/`)" in card
    assert "member 2 (fpr2/)" in card

    cached = to_cache_grid(read_scan(world["scan"]))
    rng = np.random.default_rng(0)
    corners = cached.geometry.voxel_to_world(
        np.asarray([[0, 0, 0], np.asarray(cached.geometry.shape_zyx) - 1], dtype=float)
    )
    centres = rng.uniform(corners.min(axis=0), corners.max(axis=0), size=(7, 3))
    scores = {
        k: score_candidates(Detector.load(world[k]), cached, centres) for k in "a b ab".split()
    }
    assert not np.allclose(scores["a"], scores["b"])  # the members differ
    np.testing.assert_allclose(scores["ab"], (scores["a"] + scores["b"]) / 2, rtol=0, atol=1e-6)

    out = {}
    for key in ("a", "b", "ab"):
        detect(world["scan"], Detector.load(world[key]), tmp_path / key, log=lambda _: None)
        with (tmp_path / key / "detections.csv").open() as handle:
            out[key] = {
                (r["coordX"], r["coordY"], r["coordZ"]): float(r["probability"])
                for r in csv.DictReader(handle)
            }
    assert out["ab"] and out["ab"].keys() == out["a"].keys() == out["b"].keys()
    for mark, p in out["ab"].items():
        assert p == pytest.approx((out["a"][mark] + out["b"][mark]) / 2, abs=1e-6)
    summary = json.loads((tmp_path / "ab" / "summary.json").read_text())
    assert summary["model_set"]["stages"] == ["unet", "fpr", "fpr2"]
    assert "mean output of 2 MGI-CNN" in (tmp_path / "ab" / "report.html").read_text()


def test_evaluate_models_averages_the_members_and_chooses_a_threshold(world, tmp_path, capsys):
    results = {}
    for key in ("a", "b"):
        evaluate_model_set(
            world[key], world["held_out"], tmp_path / "cache", tmp_path / key, bootstrap=0,
            progress=False,
        )  # fmt: skip
        with (tmp_path / key / "submission.csv").open() as handle:
            results[key] = [float(r["probability"]) for r in csv.DictReader(handle)]
    args = ["evaluate-models", "--models", str(world["ab"]), "--data", str(world["held_out"])]
    args += ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "ab"), "--quiet"]
    assert integration_main([*args, "--bootstrap", "0", "--report-threshold", "1"]) == 0
    with (tmp_path / "ab" / "submission.csv").open() as handle:
        mean = [float(r["probability"]) for r in csv.DictReader(handle)]
    assert mean, "no candidates to score"
    np.testing.assert_allclose(mean, (np.asarray(results["a"]) + results["b"]) / 2, atol=1e-6)
    assert (tmp_path / "ab" / "submission.fpr2.csv").is_file()
    operating = json.loads((tmp_path / "ab" / "report_threshold.json").read_text())
    uids = fold_uids(world["held_out"], list(range(10)))
    assert operating["scans"] == 1 and operating["threshold"] >= 0.5
    assert operating == threshold_on_submission(
        world["held_out"], tmp_path / "ab" / "submission.csv", uids, 1.0
    )  # chosen on the mean, not on a member's scores
    assert "report threshold" in capsys.readouterr().out


def test_a_changed_member_or_a_member_without_fpr_is_refused(world, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(world["ab"], changed)
    weights = changed / "fpr2" / "model.keras"
    content = bytearray(weights.read_bytes())
    content[len(content) // 2] ^= 0xFF
    weights.write_bytes(bytes(content))
    with pytest.raises(LungCTError, match="sha256|checksum|changed") as info:
        read_model_set(changed)
    assert "fpr2" in str(info.value)

    lonely = tmp_path / "lonely"
    shutil.copytree(world["ab"], lonely)
    shutil.rmtree(lonely / "fpr")
    info = json.loads((lonely / "modelset.json").read_text())
    (lonely / "modelset.json").write_text(json.dumps({**info, "stages": ["unet", "fpr2"]}))
    with pytest.raises(LungCTError, match="fpr2 is listed without fpr"):
        read_model_set(lonely)
    with pytest.raises(LungCTError, match="without fpr/"):
        write_model_set(lonely, name="lonely")

    (lonely / "modelset.json").write_text(json.dumps({**info, "stages": ["unet", "fpr10"]}))
    with pytest.raises(LungCTError, match="unknown stages"):
        read_model_set(lonely)


def test_a_scan_a_member_trained_on_is_refused_and_a_stray_folder_too(world, tmp_path):
    trained = tmp_path / "trained"
    shutil.copytree(world["ab"], trained)
    manifest = json.loads((trained / "fpr2" / "manifest.json").read_text())
    assert manifest["train_series"] == ["1.2.3.7.7"]  # fpr/'s is another
    scan, _ = phantom_chest(seriesuid="1.2.3.7.7", seed=3)  # fpr2's training series
    write_scan(scan, tmp_path / "1.2.3.7.7.mhd")  # a MetaImage is named by its series
    with pytest.raises(LungCTError, match="MGI-CNN's training set"):
        detect(tmp_path / "1.2.3.7.7.mhd", Detector.load(trained), tmp_path / "out", log=print)
    assert not (tmp_path / "out").exists()

    shutil.copytree(trained / "fpr2", trained / "fpr10")
    with pytest.raises(LungCTError, match="not a stage name"):
        write_model_set(trained, name="stray")

    bare = Detector.load(world["ab"])
    bare.fpr, bare.fpr_members = None, []
    with pytest.raises(LungCTError, match="no MGI-CNN stage"):
        score_candidates(bare, to_cache_grid(read_scan(world["scan"])), np.zeros((1, 3)))


def test_export_names_the_members(world, tmp_path):
    from integration.export import export_models

    manifest = export_models(world["ab"], tmp_path / "exported")
    assert manifest["fpr_ensemble"] == {"members": ["fpr", "fpr2"], "combine": "mean"}
    assert (tmp_path / "exported" / "fpr2" / "saved_model").is_dir()
    assert "fpr_ensemble" not in export_models(world["a"], tmp_path / "single")


def test_mean_submissions_is_exact_and_refuses_other_marks(tmp_path):
    head = "seriesuid,coordX,coordY,coordZ,probability\n"
    (tmp_path / "a.csv").write_text(head + "1.2,1.5,2,3,0.25\n1.2,4,5,6,1\n")
    (tmp_path / "b.csv").write_text(head + "1.2,1.5,2,3,0.75\n1.2,4,5,6,0\n")
    mean_submissions([tmp_path / "a.csv", tmp_path / "b.csv"], tmp_path / "m.csv")
    with (tmp_path / "m.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["probability"]) for r in rows] == [0.5, 0.5]
    assert [r["coordX"] for r in rows] == ["1.5", "4"]
    (tmp_path / "c.csv").write_text(head + "1.2,4,5,6,0\n1.2,1.5,2,3,0.75\n")
    with pytest.raises(LungCTError, match="does not score the marks"):
        mean_submissions([tmp_path / "a.csv", tmp_path / "c.csv"], tmp_path / "n.csv")


def test_the_threshold_counts_only_the_named_scans_and_skips_excluded_findings(tmp_path):
    (tmp_path / "annotations.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.1,0,0,0,10\n"
    )
    (tmp_path / "annotations_excluded.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.1,50,0,0,-1\n"
    )
    (tmp_path / "s.csv").write_text(
        "seriesuid,coordX,coordY,coordZ,probability\n"
        "1.1,0,0,0,0.7\n"  # the nodule
        "1.1,50,0,0,0.99\n"  # on an excluded finding: not a false positive
        "1.1,90,0,0,0.8\n"  # false positive
        "1.1,90,40,0,0.6\n"  # false positive
        "2.2,0,0,0,0.95\n"  # another scan, not named
    )
    one = threshold_on_submission(tmp_path, tmp_path / "s.csv", ["1.1"], 1.0)
    assert one["threshold"] == pytest.approx(np.nextafter(0.6, 1.0))
    assert one["false_positives_per_scan"] == 1.0 and one["sensitivity"] == 1.0
    none = threshold_on_submission(tmp_path, tmp_path / "s.csv", ["1.1"], 0.5)
    assert none["threshold"] == pytest.approx(np.nextafter(0.8, 1.0))
    assert none["sensitivity"] == 0.0


# ----------------------------------------------------------------------------------------------
# The U-Net's probability mixed into the score (pipeline.json candidate_weight)
# ----------------------------------------------------------------------------------------------


def _weighted(source: Path, root: Path, weight: float) -> Path:
    shutil.copytree(source, root)
    PipelineConfig(threshold=0.5, candidate_weight=weight).save(root)
    write_model_set(root, name=root.name, version="0")
    return root


def _probabilities(path: Path) -> dict[tuple[str, str, str], float]:
    with path.open() as handle:
        return {
            (r["coordX"], r["coordY"], r["coordZ"]): float(r["probability"])
            for r in csv.DictReader(handle)
        }


def test_candidate_weight_mixes_the_unet_probability_into_detect(world, tmp_path):
    fused = _weighted(world["ab"], tmp_path / "fused", 0.25)
    alone = tmp_path / "unet_alone"  # the same U-Net without false-positive reducers
    shutil.copytree(world["ab"], alone, ignore=shutil.ignore_patterns("fpr*"))
    write_model_set(alone, name="unet_alone", version="0")
    out = {}
    for key, models in (("fused", fused), ("ab", world["ab"]), ("unet", alone)):
        detect(world["scan"], Detector.load(models), tmp_path / key, log=lambda _: None)
        out[key] = _probabilities(tmp_path / key / "detections.csv")
    assert out["fused"] and out["fused"].keys() == out["ab"].keys() == out["unet"].keys()
    assert any(abs(out["unet"][m] - out["ab"][m]) > 1e-3 for m in out["ab"])  # they differ
    for mark, p in out["fused"].items():
        assert p == pytest.approx(0.25 * out["unet"][mark] + 0.75 * out["ab"][mark], abs=1e-6)
    page = (tmp_path / "fused" / "report.html").read_text()
    assert "0.25 times the U-Net's own" in page and "0.75 times the mean output of 2" in page
    assert "0.25 x U-Net + 0.75 x MGI-CNN" in page  # the Models table
    assert json.loads((tmp_path / "fused" / "summary.json").read_text())["candidate_weight"] == 0.25
    assert json.loads((tmp_path / "ab" / "summary.json").read_text())["candidate_weight"] == 0.0

    cached = to_cache_grid(read_scan(world["scan"]))
    with pytest.raises(LungCTError, match="pass candidate_probability"):
        score_candidates(Detector.load(fused), cached, np.zeros((1, 3)))


def test_candidate_weight_in_evaluate_models_and_export(world, tmp_path):
    from integration.export import export_models

    for key, weight in (("ab", 0.5), ("a", 0.3)):
        models = _weighted(world[key], tmp_path / f"set_{key}", weight)
        out = tmp_path / f"eval_{key}"
        evaluate_model_set(
            models, world["held_out"], tmp_path / "cache", out, bootstrap=0, progress=False
        )
        members = ["fpr", "fpr2"] if key == "ab" else ["fpr"]
        own = np.asarray(list(_probabilities(out / "candidates.csv").values()))
        scores = [
            np.asarray(list(_probabilities(out / f"submission.{m}.csv").values())) for m in members
        ]
        fused = np.asarray(list(_probabilities(out / "submission.csv").values()))
        assert len(fused) == len(own) > 0
        np.testing.assert_allclose(
            fused, weight * own + (1 - weight) * np.mean(scores, axis=0), rtol=0, atol=1e-12
        )
        manifest = export_models(models, tmp_path / f"export_{key}")
        assert manifest["score"]["candidate_weight"] == weight
    assert "score" not in export_models(world["ab"], tmp_path / "export_plain")
    zero = _weighted(world["ab"], tmp_path / "set_zero", 0.0)  # written out, and 0
    assert "candidate_weight" not in json.loads((zero / "pipeline.json").read_text())
    assert "score" not in export_models(zero, tmp_path / "export_zero")


def test_candidate_weight_is_checked_and_fuse_scores_is_exact():
    from integration.pipeline import fuse_scores

    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="candidate_weight"):
            PipelineConfig(candidate_weight=bad)
    fpr = np.asarray([0.2, 0.9])
    np.testing.assert_array_equal(fuse_scores(PipelineConfig(), None, fpr), fpr)
    np.testing.assert_allclose(
        fuse_scores(PipelineConfig(candidate_weight=0.5), np.asarray([0.6, 0.1]), fpr), [0.4, 0.5]
    )
    with pytest.raises(ValueError, match="one probability per"):
        fuse_scores(PipelineConfig(candidate_weight=0.5), np.asarray([0.6]), fpr)


def test_the_card_states_the_candidate_weight(world, tmp_path):
    fused = _weighted(world["ab"], tmp_path / "fused", 0.5)
    card = (fused / "MODEL_CARD.md").read_text()
    assert "`candidate_weight` 0.5 in `pipeline.json`" in card
    assert "candidate_weight" not in (world["ab"] / "MODEL_CARD.md").read_text()
    # Without an MGI-CNN the U-Net's probability is the whole score: the card says no mix.
    alone = tmp_path / "alone"
    shutil.copytree(fused, alone, ignore=shutil.ignore_patterns("fpr*"))
    write_model_set(alone, name="alone", version="0")
    assert "candidate_weight" not in (alone / "MODEL_CARD.md").read_text()


def test_a_bad_candidate_weight_in_pipeline_json_is_one_clear_error(tmp_path):
    (tmp_path / "pipeline.json").write_text('{"threshold": 0.5, "candidate_weight": 2}')
    with pytest.raises(LungCTError, match="candidate_weight must be a number in"):
        PipelineConfig.load(tmp_path)
