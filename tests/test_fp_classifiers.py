"""The other false-positive reducers: a 3-D ResNet and the small 3-D CNN beside the MGI-CNN.

Their plans, networks and model files, one short training each through the stage the
ablations run (sealed folder, scored candidates, a planted nodule ranked above background),
and the grid names that select them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fp_reduction_3dcnn.config import PLANS, FPRPlan, get_plan
from fp_reduction_3dcnn.networks import build_network
from fp_reduction_3dcnn.testing import make_tiny_dataset
from fp_reduction_3dcnn.train import load_keras
from lungct.errors import LungCTError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

NETWORK_FIELDS = {"name", "network", "conv", "block_filters", "blocks_per_stage"}
INPUT_FIELDS = {"patch_sizes", "input_size"}

# Narrow versions of the two plans on smaller patches: they build and train in seconds.
TINY = {
    "resnet3d": {
        "block_filters": [4, 8],
        "blocks_per_stage": 1,
        "patch_sizes": [[24, 24, 24]],
        "input_size": [24, 24, 24],
    },
    "cnn3d": {"block_filters": [4, 8], "patch_sizes": [[24, 24, 16]], "input_size": [24, 24, 16]},
}


def test_plans_differ_from_default_only_in_the_network() -> None:
    default = PLANS["default"].to_dict()
    for name, patch in (("resnet3d", [48, 48, 48]), ("cnn3d", [48, 48, 32])):
        plan = get_plan(name)
        assert plan.network == name and plan.scales == 1 and plan.patch_sizes == (tuple(patch),)
        changed = {k for k, v in plan.to_dict().items() if default[k] != v}
        assert changed <= NETWORK_FIELDS | INPUT_FIELDS, changed
        # The ablation key keeps what shapes the network, not the MGI-CNN's unused widths.
        assert "stream_filters" not in plan.key_fields() and "network" in plan.key_fields()
    # An MGI-CNN plan's key is the one of the plans before `network` existed.
    assert set(PLANS["default"].key_fields()) == set(default) - {
        "network",
        "block_filters",
        "blocks_per_stage",
    }


def test_plans_round_trip_and_refuse_what_their_network_cannot_take(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    plan = get_plan("resnet3d")
    plan.save(path)
    assert FPRPlan.load(path) == plan
    # A plan of an earlier version has no `network`: it is an MGI-CNN.
    old = {k: v for k, v in PLANS["default"].to_dict().items() if k != "network"}
    path.write_text(json.dumps(old))
    assert FPRPlan.load(path).network == "mgicnn"
    data = plan.to_dict()
    for field, value, message in (
        ("block_filters", "wide", "block_filters must be a list of integers, got 'wide'"),
        ("blocks_per_stage", 1.5, "blocks_per_stage must be an integer"),
        ("network", 3, "network must be a string"),
        ("network", "vgg", "network must be one of mgicnn, resnet3d, cnn3d"),
        ("variant", "ri", "variant 'ri' is an MGI-CNN ablation"),
        ("conv", "2.5d", "conv must be '3d'"),
        ("patch_sizes", [[48, 48, 48], [20, 20, 6]], "patch_sizes needs one"),
    ):
        path.write_text(json.dumps({**data, field: value}))
        with pytest.raises(LungCTError, match=message):
            FPRPlan.load(path)
    with pytest.raises(LungCTError, match="too small for 4 blocks"):
        get_plan("cnn3d", input_size=(48, 48, 8), patch_sizes=((48, 48, 8),))
    with pytest.raises(LungCTError, match="three"):
        get_plan("default", patch_sizes=((48, 48, 48),))


@pytest.mark.parametrize(
    ("name", "params", "gradcam"),
    [("resnet3d", 2_077_457, "stage4_block2_out"), ("cnn3d", 221_069, "block4_relu2")],
)
def test_networks_build_with_their_parameter_counts(name: str, params: int, gradcam: str) -> None:
    model = build_network(get_plan(name))
    assert model.count_params() == params
    assert [tuple(t.shape) for t in model.inputs] == [(None, *get_plan(name).input_shape)]
    assert model.get_layer(model.gradcam_layer).name == gradcam
    # The book's LunaModel: 1,152 features before its linear head (3x3x2 x 64).
    if name == "cnn3d":
        assert tuple(model.get_layer("flatten").output.shape) == (None, 1152)


@pytest.mark.parametrize("name", ["resnet3d", "cnn3d"])
def test_model_files_reload_in_safe_mode_and_name_their_network(name: str, tmp_path: Path) -> None:
    from fp_reduction_3dcnn.gradcam import grad_cam

    plan = get_plan(name, **TINY[name])
    model = build_network(plan)
    path = tmp_path / "model.keras"
    model.save(path)
    x = [np.random.default_rng(0).random((3, *plan.input_shape), dtype=np.float32)]
    loaded = load_keras(path, compile=False, plan=plan)
    assert type(loaded) is type(model)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)
    assert load_keras(path, compile=False) is not None  # no plan: any network of the suite
    cam, p = grad_cam(loaded, [x[0][:1]])
    assert cam.ndim == 3 and 0 <= cam.min() and cam.max() <= 1 and 0 < p < 1
    other = "cnn3d" if name == "resnet3d" else "resnet3d"
    with pytest.raises(LungCTError, match=f"network, not a {get_plan(other).network_label}"):
        load_keras(path, compile=False, plan=get_plan(other, **TINY[other]))
    with pytest.raises(LungCTError, match="network, not an MGI-CNN"):
        load_keras(path, compile=False, plan=get_plan("default"))
    with pytest.raises(LungCTError, match="does not fit the plan.*block_filters"):
        load_keras(path, compile=False, plan=plan.replace(block_filters=(4, 16)))


# ----------------------------------------------------------------------------------------------
# Training and scoring through the ablations' stage
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Six tiny scans, one per fold: bright spheres are the nodules, the rest background."""
    return make_tiny_dataset(tmp_path_factory.mktemp("fp_classifiers"), n_scans=6)


def _auc(labels: np.ndarray, probs: np.ndarray) -> float:
    pos, neg = probs[labels == 1], probs[labels == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


@pytest.mark.parametrize("name", ["resnet3d", "cnn3d"])
def test_trains_seals_and_ranks_the_nodules_first(
    name: str, tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stage of `integration ablate` trains the network (the MGI-CNN's sampler, loop and
    sealed folder), then scores the held-out candidates through `predict` and `open_model`."""
    # Validation patches cut batch by batch at every epoch, as 48 mm cubes of a real fold are.
    monkeypatch.setattr("fp_reduction_3dcnn.train.VALIDATION_MEMORY_MB", 0)
    from fp_reduction_3dcnn.gradcam import gradcam_figure, open_scan_for_cam
    from fp_reduction_3dcnn.predict import open_model
    from integration.stages import (
        Split,
        StageClock,
        StagePaths,
        StageRun,
        StageSettings,
        run_stages,
    )
    from lungct.modeldir import is_sealed

    with open(tiny["candidates"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    test_uid = tiny["uids"][5]
    test_candidates = tmp_path / "candidates_test.csv"
    with open(test_candidates, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(r for r in rows if r["seriesuid"] == test_uid)
    overrides = {
        **TINY[name],
        "batch_size": 16,
        "steps_per_epoch": 24,
        "epochs": 2,
        "optimizer": "adam",
        "learning_rate": 0.003,
        "val_max_negatives": 8,
    }
    settings = StageSettings.from_dict(
        {"gan": False, "fpr_plan": name, "fpr_minutes": 2.0, "fpr_overrides": overrides}
    )
    logged: list[str] = []
    run = StageRun(
        data=Path(tiny["data"]),
        cache=Path(tiny["cache"]),
        split=Split(train=(0, 1, 2, 3), val=(4,), test=(5,)),
        settings=settings,
        paths=StagePaths.single_run(tmp_path, tmp_path / "models"),
        clock=StageClock(log=logged.append),
        candidates=Path(tiny["candidates"]),
        progress=False,
    )
    submission = run_stages(run, only=("FP reducer", "scores")).submission
    label = get_plan(name).network_label
    assert f"[demo] train {label} ..." in logged

    model_dir = tmp_path / "models" / "fpr"
    assert is_sealed(json.loads((model_dir / "manifest.json").read_text()))
    with open(model_dir / "logs" / "train_log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    assert len(log) == 2 and all(np.isfinite(float(r["val_loss"])) for r in log)
    assert json.loads((model_dir / "plan.json").read_text())["network"] == name
    trained = open_model(model_dir)  # the folder says which network it holds
    assert trained.plan.network == name and trained.model.name == name
    nodule = next(r for r in rows if r["seriesuid"] == test_uid and r["class"] == "1")
    world = [float(nodule[k]) for k in ("coordX", "coordY", "coordZ")]
    scan = open_scan_for_cam(Path(tiny["cache"]) / test_uid, trained.plan.cut_spacing)
    cam = gradcam_figure(trained, scan, world, tmp_path / "cam.png")  # one row: one patch
    assert 0 < cam["probability"] < 1 and (tmp_path / "cam.png").read_bytes()[:4] == b"\x89PNG"

    with open(submission, newline="") as handle:
        scored = list(csv.DictReader(handle))
    assert [r["seriesuid"] for r in scored] == [test_uid] * len(scored)
    assert len(scored) == sum(r["seriesuid"] == test_uid for r in rows)
    probs = np.array([float(r["probability"]) for r in scored])
    labels = np.array([int(r["class"]) for r in rows if r["seriesuid"] == test_uid])
    assert np.all(np.isfinite(probs)) and np.all((probs >= 0) & (probs <= 1))
    assert 0 < labels.sum() < len(labels)
    # Untrained (or constant) scores rank at random: an AUC about 0.5. Trained, the nodules come
    # first; the ResNet's global average pooling also lifts a negative 6 mm from a nodule.
    assert _auc(labels, probs) >= 0.8, (labels, probs)
    assert probs[labels == 1].min() > np.median(probs[labels == 0]), (labels, probs)


# ----------------------------------------------------------------------------------------------
# The ablation grid
# ----------------------------------------------------------------------------------------------


def test_the_default_grid_names_both_networks() -> None:
    from integration.ablate import DEFAULT_SPLIT, _describe, load_grid, stage_keys

    by_name = {c.name: c for c in load_grid().configs}
    full = by_name["full"].settings.to_dict()
    keys_full = stage_keys(by_name["full"].settings, DEFAULT_SPLIT)
    for name in ("resnet3d", "cnn3d"):
        config = by_name[name]
        settings = config.settings
        differ = {k for k, v in settings.to_dict().items() if full[k] != v}
        assert differ == {"fpr_plan"}, differ  # only the network (its plan) changes
        plan = settings.fpr_plan_resolved()
        assert plan.network == name and plan.variant == "mgi"
        keys = stage_keys(settings, DEFAULT_SPLIT)
        assert keys["unet"] == keys_full["unet"] and keys["gan"] == keys_full["gan"]
        assert keys["fpr"][0].startswith(f"fpr-{name}-gan-") and keys["fpr"] != keys_full["fpr"]
        assert keys["fpr"][1]["plan"]["network"] == name
        result = {
            "settings": settings.to_dict(),
            "fpr_network": {"network": name, "variant": "mgi", "merge": "sum", "conv": "3d"},
        }
        assert _describe(result)["fpr"] == name
    # The MGI-CNN's stage keys are those of the plans before `network` existed.
    assert keys_full["fpr"][0].startswith("fpr-mgi-sum-gan-")
    assert "network" not in keys_full["fpr"][1]["plan"]
