"""The U-Nets and the Dice loss: build, serialise (safe mode), one training step; the plan."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from lungct.errors import LungCTError
from unet_candidates.config import PRESETS, UNetPlan, preset_plan
from unet_candidates.model import DiceLoss, UNet2D, UNet3D
from unet_candidates.testing import tiny_plan
from unet_candidates.train import compile_model

TINY = {
    "2d": (
        UNet2D,
        {"filters": (4, 8), "bottleneck_filters": 8, "input_channels": 3},
        (2, 16, 16, 3),
    ),
    "3d": (UNet3D, {"filters": (4, 8), "bottleneck_filters": 8}, (1, 8, 16, 16, 1)),
}


@pytest.mark.parametrize("dims", sorted(TINY))
def test_builds_symbolic_and_eager(dims: str) -> None:
    cls, kwargs, shape = TINY[dims]
    model = cls(**kwargs)
    out = model(keras.ops.ones(shape))
    assert tuple(out.shape) == (*shape[:-1], 1)
    assert float(keras.ops.min(out)) >= 0.0 and float(keras.ops.max(out)) <= 1.0
    assert model.size_multiple == 4
    # Fully convolutional: another size divisible by 4 works too.
    bigger = (1, *(s * 2 for s in shape[1:-1]), shape[-1])
    assert tuple(model.predict_on_batch(np.zeros(bigger, np.float32)).shape) == (*bigger[:-1], 1)


@pytest.mark.parametrize("dims", sorted(TINY))
def test_serialisation_round_trip_safe_mode(dims: str, tmp_path: Path) -> None:
    cls, kwargs, shape = TINY[dims]
    model = compile_model(cls(**kwargs, dropout=0.1), tiny_plan(dims))
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert type(loaded) is cls
    assert loaded.get_config() == model.get_config()
    assert isinstance(loaded.loss, DiceLoss)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)


@pytest.mark.parametrize("dims", sorted(TINY))
def test_one_training_step(dims: str) -> None:
    plan = tiny_plan(dims, bce_weight=0.0)  # the Tversky part alone lies in [0, 1]
    model = compile_model(plan.build_model(), plan)
    shape = TINY[dims][2]
    rng = np.random.default_rng(0)
    x = rng.random(shape, dtype=np.float32)
    y = (rng.random((*shape[:-1], 1)) > 0.8).astype(np.float32)
    before = [w.copy() for w in model.get_weights()]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and 0.0 <= logs["loss"] <= 1.0
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights(), strict=True))


def test_dice_loss_values_and_config() -> None:
    loss = DiceLoss(smooth=1.0)
    ones = np.ones((1, 4, 4, 1), np.float32)
    zeros = np.zeros_like(ones)
    assert float(loss(ones, ones)) == pytest.approx(0.0)
    # 16 missed voxels: 1 - (0 + 1) / (0.5 * 16 + 1)
    assert float(loss(ones, zeros)) == pytest.approx(1.0 - 1.0 / 9.0)
    assert float(loss(zeros, zeros)) == pytest.approx(0.0)  # empty batch: no division by zero
    # Tversky: with fn_weight 0.8 a miss costs more than a false alarm.
    recall_first = DiceLoss(smooth=1.0, fn_weight=0.8)
    assert float(recall_first(ones, zeros)) > float(recall_first(zeros, ones))
    # Targets above 1 (unsure findings) count neither way.
    ignore = np.full_like(ones, 2.0)
    assert float(loss(ignore, ones)) == pytest.approx(0.0)
    half = np.concatenate([ones[:, :2], ignore[:, 2:]], axis=1)
    assert float(loss(half, ones)) == pytest.approx(0.0)
    again = DiceLoss.from_config(DiceLoss(smooth=5.0, fn_weight=0.7, bce_weight=0.5).get_config())
    assert (again.smooth, again.fn_weight, again.bce_weight) == (5.0, 0.7, 0.5)
    assert float(again(ones, ones * 0.5)) > float(
        DiceLoss(smooth=5.0, fn_weight=0.7)(ones, ones * 0.5)
    )


def test_hard_negative_mining_weighs_the_hardest_background_only() -> None:
    # One patch of 100 voxels: 4 nodule voxels predicted well, one background voxel that
    # looks like a nodule (0.9) among 95 easy ones (0.01).
    y = np.zeros((1, 10, 10, 1), np.float32)
    y[0, :2, :2] = 1.0
    p = np.full_like(y, 0.01)
    p[0, :2, :2] = 0.9
    p[0, 7, 7] = 0.9
    bce = {0.9: -np.log(0.9), "hard": -np.log(0.1), 0.01: -np.log(0.99)}
    tversky = float(DiceLoss(smooth=1.0, fn_weight=0.85)(y, p))
    plain = float(DiceLoss(smooth=1.0, fn_weight=0.85, bce_weight=1.0)(y, p)) - tversky
    assert plain == pytest.approx((4 * bce[0.9] + bce["hard"] + 95 * bce[0.01]) / 100, rel=1e-3)
    # The 2 hardest background voxels (2 % of 100): the false alarm and one easy voxel.
    mined = DiceLoss(smooth=1.0, fn_weight=0.85, bce_weight=1.0, hard_negative_fraction=0.02)
    hard = float(mined(y, p)) - tversky
    assert hard == pytest.approx((4 * bce[0.9] + bce["hard"] + bce[0.01]) / 6, rel=1e-3)
    assert hard > 5 * plain  # the false alarm is no longer drowned in easy air
    again = DiceLoss.from_config(mined.get_config())
    assert again.hard_negative_fraction == 0.02


# ----------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_plans_json_round_trip(preset: str, tmp_path: Path) -> None:
    plan = preset_plan(preset)
    plan.save(tmp_path / "plan.json")
    assert UNetPlan.load(tmp_path / "plan.json") == plan
    # The field names the kind of network; "2d-original" is a 2-D plan of the original widths.
    assert json.loads((tmp_path / "plan.json").read_text())["dims"] == preset[:2]


def test_named_preset_in_a_plan_file_starts_from_its_widths(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"preset": "2d-original", "epochs": 3}')
    plan = UNetPlan.load(tmp_path / "p.json")
    assert plan.dims == "2d" and plan.epochs == 3
    assert plan.filters == (32, 64, 96, 128, 128) and plan.bottleneck_filters == 128


def test_partial_plan_starts_from_its_dims(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"dims": "3d", "spacing": [1.5, 1.5, 1.5]}')
    plan = UNetPlan.load(tmp_path / "p.json")
    assert plan.dims == "3d" and plan.spacing == (1.5, 1.5, 1.5)
    assert plan.filters == preset_plan("3d").filters


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"variant": "3d", "epochs": 3}', "3d"),
        ('{"variant": "2d-seed"}', "2d-original"),
        ('{"variant": "2d", "name": "unet2d"}', "2d"),
    ],
)
def test_plans_of_earlier_versions_say_variant(text: str, expected: str, tmp_path: Path) -> None:
    """Model folders trained before ``variant`` became ``preset`` / ``dims`` load unchanged."""
    (tmp_path / "p.json").write_text(text)
    plan = UNetPlan.load(tmp_path / "p.json")
    assert plan.dims == expected[:2]
    assert plan.filters == preset_plan(expected).filters


def test_a_unet_plan_written_before_dims_was_named_still_reads(tmp_path: Path) -> None:
    """Plans of the shipped sets up to 3 say ``variant`` for ``dims``."""
    from integration.modelset import SHIPPED_MODELS

    plan = json.loads((SHIPPED_MODELS / "unet" / "plan.json").read_text())
    plan["variant"] = plan.pop("dims")
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(plan))
    assert UNetPlan.load(plan_path).dims == "2d"
    assert UNetPlan.load(plan_path) == UNetPlan.load(SHIPPED_MODELS / "unet" / "plan.json")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"dims": "2d", "spacnig": [1, 1, 1]}', "unknown plan keys"),
        ('{"dims": "4d"}', "dims must be '2d' or '3d'"),
        ('{"preset": "4d"}', "unknown preset"),
        ('{"preset": "3d", "dims": "2d"}', "but preset '3d' is 3d"),
        ('{"preset": "3d", "variant": "2d"}', "names preset '3d' and variant '2d'"),
        ('{"dims": "3d", "patch_size": [50, 48, 48]}', "sizes divisible by"),
        ('{"dims": "2d", "patch_size": [2, 64, 64], "window_size": [2, 64, 64]}', "odd"),
        ('{"threshold": 1.5}', "threshold"),
        ('{"fn_weight": 1.0}', "fn_weight"),
        ('{"hard_negative_fraction": 1.5}', "hard_negative_fraction"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_plans_are_clear_errors(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(LungCTError, match=match) as info:
        UNetPlan.load(path)
    assert str(path) in str(info.value)


def test_missing_plan_file(tmp_path: Path) -> None:
    with pytest.raises(LungCTError, match="plan file is missing"):
        UNetPlan.load(tmp_path / "nope.json")
