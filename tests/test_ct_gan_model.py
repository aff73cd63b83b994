"""CT-GAN: plans, the two networks (build, safe-mode round trip), the normaliser, one train step."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from ct_gan_augment.config import PLANS, GANPlan, get_plan, parse_plan_overrides
from ct_gan_augment.data import CubeSource, TrainingCubes, base_shape, size_ball
from ct_gan_augment.discriminator import PatchDiscriminator
from ct_gan_augment.generator import InpaintingGenerator
from ct_gan_augment.manifest import ModelManifest, format_folds
from ct_gan_augment.model import build_discriminator, build_generator
from ct_gan_augment.normaliser import CubeNormaliser
from lungct.errors import LungCTError

TINY = GANPlan(
    name="tiny", cube_size=16, hole_size=8, gf=4, df=4, discriminator_levels=3, batch_size=2,
    hist_bins=256, max_shift_vox=2,
)  # fmt: skip

# Keras converts tensors with np.array(x, copy=False) semantics that NumPy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")


def test_plan_json_round_trip_and_named_plans(tmp_path: Path) -> None:
    TINY.save(tmp_path / "plan.json")
    assert GANPlan.load(tmp_path / "plan.json") == TINY
    assert get_plan(tmp_path / "plan.json") == TINY
    assert PLANS["code"].hole_slice == slice(6, 26)  # the code's indices 6..26
    assert PLANS["default"].hole_size == 16  # the paper's figure
    assert (PLANS["code"].real_label, PLANS["code"].fake_label) == (0.0, 1.0)
    assert PLANS["paper"].gf == PLANS["paper"].df == 100
    assert PLANS["code"].d_learning_rate == 1e-6
    # The CT-GAN copy in the original repository: the code's plan with 40 filters ("seed" in
    # earlier versions; "seed" now means a random seed only, but the old name still selects it).
    gf40 = get_plan("code-gf40")
    assert gf40 == PLANS["code"].replace(gf=40, df=40, name="code-gf40") == get_plan("seed")
    assert "seed" not in PLANS
    changes = parse_plan_overrides(["gf=16", "rotate=false", "flip_axes=[0,1,2]", "name=x"])
    plan = get_plan("default", **changes)
    assert (plan.gf, plan.rotate, plan.flip_axes, plan.name) == (16, False, (0, 1, 2), "x")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cube_size": 30}, "power of two"),
        ({"hole_size": 32}, "hole_size"),
        ({"real_label": 0.0}, "must differ"),
        ({"bogus": 1}, "unknown plan keys"),
    ],
)
def test_bad_plans_are_refused(change: dict, message: str) -> None:
    with pytest.raises(LungCTError, match=message):
        PLANS["default"].replace(**change)


def test_unknown_plan_name() -> None:
    with pytest.raises(LungCTError, match="unknown plan"):
        get_plan("nope")


def test_networks_build_with_the_papers_shapes() -> None:
    g = build_generator(TINY, "remover")
    d = build_discriminator(TINY, "remover")
    assert tuple(g.output_shape) == (None, 16, 16, 16, 1)
    assert tuple(d.output_shape) == (None, 2, 2, 2, 1)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 16, 16, 16, 1)).astype("float32")
    y = keras.ops.convert_to_numpy(g(x, training=False))
    assert y.shape == x.shape and np.all(np.abs(y) <= 1.0)  # tanh
    assert keras.ops.convert_to_numpy(d([y, x])).shape == (2, 2, 2, 2, 1)
    # 32^3 with 4 levels gives the code's 2x2x2 validity map.
    assert tuple(PatchDiscriminator(cube_size=32, filters=2).output_shape) == (None, 2, 2, 2, 1)
    # The injector's condition has the size channel (the paper's plans do not).
    assert tuple(build_generator(TINY, "injector").input_shape) == (None, 16, 16, 16, 2)
    assert tuple(build_discriminator(TINY).input_shape[1]) == (None, 16, 16, 16, 2)
    paper_like = TINY.replace(size_channel=False)
    assert tuple(build_generator(paper_like, "injector").input_shape) == (None, 16, 16, 16, 1)


def test_safe_mode_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.5, 0.5, (1, 16, 16, 16, 1)).astype("float32")
    c = rng.uniform(-0.5, 0.5, (1, 16, 16, 16, 2)).astype("float32")
    for model, inputs in ((build_generator(TINY), c), (build_discriminator(TINY), [x, c])):
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        back = keras.saving.load_model(path, safe_mode=True)
        assert type(back) is type(model)
        assert back.get_config() == model.get_config()
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(back(inputs, training=False)),
            keras.ops.convert_to_numpy(model(inputs, training=False)),
            atol=1e-6,
        )


def test_generator_refuses_a_cube_its_depth_cannot_halve() -> None:
    with pytest.raises(ValueError, match="divisible"):
        InpaintingGenerator(cube_size=24, filters=2, levels=4)


def test_normaliser_inverts_and_saves_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hu = np.concatenate([rng.normal(-850, 40, 20000), rng.normal(30, 30, 3000)])
    norm = CubeNormaliser.fit(hu, bins=2000)
    x = norm.transform(hu)
    assert x.max() - x.min() <= 1.0 + 1e-6 and np.abs(x).max() < 0.6
    back = norm.inverse(x)
    assert np.percentile(np.abs(back - hu), 98) < 5.0
    norm.save(tmp_path / "normaliser.npz")
    again = CubeNormaliser.load(tmp_path / "normaliser.npz")  # allow_pickle=False inside
    np.testing.assert_array_equal(again.transform(hu), x)
    summary = json.loads((tmp_path / "normaliser.json").read_text())
    assert summary["bins"] == 2000 and summary["hu_at_cdf_0.5"] < -700
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(LungCTError, match="broken normaliser"):
        CubeNormaliser.load(tmp_path / "broken.npz")


def test_augmented_cubes_have_the_cube_size_and_keep_the_centre() -> None:
    shape = base_shape(TINY)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    centre = [(s - 1) / 2 for s in shape]
    r2 = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2
    base = np.where(r2 <= 9, 40, -850).astype(np.int16)[None]
    cubes = TrainingCubes(base, [None], TINY.replace(shift_probability=1.0))
    batch = cubes.sample(np.random.default_rng(0), 6)
    assert batch.shape == (6, 16, 16, 16) and batch.dtype == np.float32
    # Shifts are at most max_shift_vox: the 3-voxel ball stays inside the central 8^3.
    assert np.all(batch[:, 4:12, 4:12, 4:12].max(axis=(1, 2, 3)) > 0)
    assert cubes.central().shape == (1, 16, 16, 16)
    # The size ball follows the nodule through shifts, rotations and flips.
    source = CubeSource("a", 0, 0.0, 0.0, 0.0, 7.0)
    cubes = TrainingCubes(base, [source], TINY.replace(shift_probability=1.0))
    batch, diameters, centres = cubes.sample_sized(np.random.default_rng(1), 12)
    assert np.all(diameters == 7.0) and np.abs(centres).max() > 1.0
    balls = size_ball(diameters, centres, TINY)
    nodule = batch > -400.0
    assert np.all(balls[nodule] == 1.0)  # every nodule voxel lies in its ball
    assert np.all(balls.sum(axis=(1, 2, 3)) > nodule.sum(axis=(1, 2, 3)))


def test_one_train_step_and_the_backend_guard(monkeypatch) -> None:
    from ct_gan_augment.gan import METRICS, InpaintingGAN
    from ct_gan_augment.train import GANBatches, require_tensorflow

    rng = np.random.default_rng(0)
    base = rng.normal(-800, 100, (3, *base_shape(TINY))).astype(np.int16)
    cubes = TrainingCubes(base, [None] * 3, TINY)
    norm = CubeNormaliser.fit(cubes.central(), TINY.hist_bins)
    gan = InpaintingGAN.from_plan(TINY, "injector")
    gan.compile(**InpaintingGAN.plan_optimizers(TINY))
    before = [w.copy() for w in gan.generator.get_weights()]
    out = gan.train_on_batch(*GANBatches(cubes, norm, TINY, sized=True)[0], return_dict=True)
    assert set(out) == set(METRICS)
    assert all(np.isfinite(v) for v in out.values())
    assert out["g_loss"] == pytest.approx(out["g_adv"] + 100.0 * out["g_l1"], rel=1e-4)
    assert any(
        not np.allclose(a, b) for a, b in zip(before, gan.generator.get_weights(), strict=True)
    )
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    with pytest.raises(LungCTError, match="TensorFlow backend"):
        require_tensorflow()


def test_plans_saved_before_the_size_channel_load_without_it(tmp_path: Path) -> None:
    data = TINY.to_dict()
    del data["size_channel"]
    (tmp_path / "plan.json").write_text(json.dumps(data))
    assert GANPlan.load(tmp_path / "plan.json").size_channel is False
    assert get_plan("default").size_channel and not get_plan("paper").size_channel


def test_manifest_fold_guard(tmp_path: Path) -> None:
    m = ModelManifest("injector", [0, 1, 2, 3, 5], ["1.2"])
    m.save(tmp_path)
    back = ModelManifest.load(tmp_path)
    assert back.training_folds == [0, 1, 2, 3, 5]
    assert json.loads((tmp_path / "manifest.json").read_text())["training_folds_text"] == "0-3,5"
    back.check_folds([0, 5])
    back.check_scan("1.2", 3)
    with pytest.raises(LungCTError, match="fold.*4.*held out"):
        back.check_folds([0, 4])
    with pytest.raises(LungCTError, match="held-out fold 9"):
        back.check_scan("9.9", 9)
    with pytest.raises(LungCTError, match="fold is unknown"):
        back.check_scan("9.9", None)
    assert format_folds([7, 0, 1, 2, 9]) == "0-2,7,9"
