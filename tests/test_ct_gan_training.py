"""CT-GAN training on ``model.fit`` and the suite's training contract: the step's math, its
batches, the model file, the loss scaling and the metrics on two replicas, TensorBoard, the
time budget, ``kill -9`` then ``--resume``, and folders of the former loop."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from test_ct_gan_cli import make_dataset

from ct_gan_augment.config import GANPlan
from ct_gan_augment.data import TrainingCubes, base_shape
from ct_gan_augment.gan import METRICS, InpaintingGAN, l1_weights
from ct_gan_augment.normaliser import CubeNormaliser
from ct_gan_augment.train import GANBatches, train_gan
from lungct.errors import LungCTError
from lungct.modeldir import is_sealed, load_keras_model
from lungct.training import LOG_FILE, restored_epoch

# Keras converts tensors with np.array(x, copy=False) semantics that NumPy 2 warns about.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")

REPO = Path(__file__).resolve().parents[1]
TINY = GANPlan(
    name="tiny", cube_size=16, hole_size=8, gf=4, df=4, discriminator_levels=3, batch_size=4,
    steps=8, checkpoint_every=2, grid_every=4, hist_bins=256, max_shift_vox=2,
    healthy_per_scan=3, max_nodule_diameter_mm=20, site_min_separation_mm=16,
    site_pleura_mm=(4, 1000),
)  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    return make_dataset(tmp_path_factory.mktemp("ctgan_fit"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", PYTHONPATH=str(REPO))
    return env


def _argv(dataset: dict, plan: Path, out: Path, *more: str) -> list[str]:
    return [
        sys.executable, "-m", "ct_gan_augment", "train", "--data", str(dataset["data"]),
        "--cache", str(dataset["cache"]), "--folds", "0-1", "--kind", "injector",
        "--plan", str(plan), "--out", str(out), *more,
    ]  # fmt: skip


def _log(model_dir: Path) -> list[dict[str, str]]:
    with open(model_dir / LOG_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


def _weights(model_dir: Path) -> list[np.ndarray]:
    out = []
    for name in ("generator.keras", "discriminator.keras"):
        model = keras.saving.load_model(model_dir / name, safe_mode=True)
        out += [np.asarray(w) for w in model.get_weights()]
    return out


def _cubes(plan: GANPlan, n: int = 3) -> tuple[TrainingCubes, CubeNormaliser]:
    rng = np.random.default_rng(0)
    base = rng.normal(-800, 100, (n, *base_shape(plan))).astype(np.int16)
    cubes = TrainingCubes(base, [None] * n, plan)
    return cubes, CubeNormaliser.fit(cubes.central(), plan.hist_bins)


# --- the step, the batches, the file ----------------------------------------------------------


def _former_step(g, d, g_opt, d_opt, plan, condition, real):
    """The former loop's step, as ``GANTrainer`` ran it: the reference for ``train_step``."""
    import tensorflow as tf

    weights = tf.constant(l1_weights(plan.cube_size, plan.hole_size, plan.l1_hole_weight))
    condition, real = tf.convert_to_tensor(condition), tf.convert_to_tensor(real)
    with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
        fake = g(condition, training=True)
        score_real = d([real, condition], training=True)
        score_fake = d([fake, condition], training=True)
        d_loss = 0.5 * (
            tf.reduce_mean(tf.square(score_real - plan.real_label))
            + tf.reduce_mean(tf.square(score_fake - plan.fake_label))
        )
        g_adv = tf.reduce_mean(tf.square(score_fake - plan.real_label))
        g_l1 = tf.reduce_mean(weights * tf.abs(fake - real))
        g_loss = g_adv + plan.l1_weight * g_l1
    g_vars, d_vars = g.trainable_variables, d.trainable_variables
    g_opt.apply_gradients(zip(g_tape.gradient(g_loss, g_vars), g_vars, strict=True))
    d_opt.apply_gradients(zip(d_tape.gradient(d_loss, d_vars), d_vars, strict=True))
    acc_real = tf.reduce_mean(tf.cast(score_real > 0.5, tf.float32))
    acc_fake = tf.reduce_mean(1.0 - tf.cast(score_fake > 0.5, tf.float32))
    return {"d_loss": d_loss, "g_loss": g_loss, "g_adv": g_adv, "g_l1": g_l1,
            "d_acc_real": acc_real, "d_acc_fake": acc_fake}  # fmt: skip


def test_train_step_is_the_former_step() -> None:
    """Three steps of ``fit``'s ``train_step`` and of the former loop's step (a
    ``tf.function``, as it ran) from the same weights with the plan's Adams on the same
    batches: the same losses and the same weights, to the last bit on this machine (checked
    at rtol 1e-6). Without dropout, whose masks the two would draw differently."""
    import tensorflow as tf

    plan = TINY.replace(dropout=0.0)
    cubes, norm = _cubes(plan)
    batches = GANBatches(cubes, norm, plan, sized=True)
    keras.utils.set_random_seed(0)
    gan = InpaintingGAN.from_plan(plan, "injector")
    gan.compile(**InpaintingGAN.plan_optimizers(plan), jit_compile=False)
    keras.utils.set_random_seed(0)
    ref = InpaintingGAN.from_plan(plan, "injector")
    g_opt, d_opt = InpaintingGAN.plan_optimizers(plan).values()
    step = tf.function(
        lambda c, r: _former_step(ref.generator, ref.discriminator, g_opt, d_opt, plan, c, r)
    )
    for i in range(3):
        condition, real = batches[i]
        got = gan.train_on_batch(condition, real, return_dict=True)  # metrics reset per call
        want = step(condition, real)
        assert set(got) == set(METRICS)
        for k, v in want.items():
            assert got[k] == pytest.approx(float(v), rel=1e-6), k
    assert got["g_loss"] == pytest.approx(got["g_adv"] + 100.0 * got["g_l1"], rel=1e-4)
    assert got["d_acc"] == pytest.approx(0.5 * (got["d_acc_real"] + got["d_acc_fake"]))
    for a, b in zip(gan.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


def test_a_batch_is_a_function_of_seed_epoch_and_index() -> None:
    cubes, norm = _cubes(TINY)
    first = GANBatches(cubes, norm, TINY, sized=True, epoch=3)
    again = GANBatches(cubes, norm, TINY, sized=True)
    condition, real = first[1]
    assert condition.shape == (4, 16, 16, 16, 2) and real.shape == (4, 16, 16, 16, 1)
    assert condition.dtype == real.dtype == np.float32
    np.testing.assert_array_equal(again.batch(3, 1)[0], condition)
    np.testing.assert_array_equal(first[1][1], real)  # whenever it is cut
    assert not np.array_equal(first[0][1], real)
    first.on_epoch_end()  # Keras calls it once before the first epoch too: it changes nothing
    np.testing.assert_array_equal(first[1][1], real)
    first.set_epoch(4)
    assert first.epoch == 4 and not np.array_equal(first[1][1], real)
    assert len(first) == TINY.checkpoint_every
    assert np.all(condition[:, 4:12, 4:12, 4:12, 0] == 0)  # the hole


def test_the_pair_saves_with_its_optimisers_and_loads_in_safe_mode(tmp_path: Path) -> None:
    cubes, norm = _cubes(TINY)
    gan = InpaintingGAN.from_plan(TINY, "injector")
    gan.compile(**InpaintingGAN.plan_optimizers(TINY), jit_compile=False)
    gan.train_on_batch(*GANBatches(cubes, norm, TINY, sized=True)[0])
    gan.save(tmp_path / "pair.keras")
    back = load_keras_model(
        tmp_path / "pair.keras", classes=("ct_gan_augment>InpaintingGAN",), compile=True
    )
    assert type(back) is InpaintingGAN and back.get_config()["hole_size"] == 8
    assert int(back.g_optimizer.iterations.numpy()) == int(back.d_optimizer.iterations.numpy()) == 1
    for a, b in zip(back.get_weights(), gan.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(back.g_optimizer.variables, gan.g_optimizer.variables, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


_SCALING = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from ct_gan_augment.config import GANPlan
from ct_gan_augment.gan import InpaintingGAN
from lungct.training import strategy_scope
plan = GANPlan.from_dict(json.loads(sys.argv[1]))
rng = np.random.default_rng(1)
condition = np.repeat(rng.uniform(-0.5, 0.5, (1, 16, 16, 16, 2)).astype("float32"), 2, axis=0)
real = np.repeat(rng.uniform(-0.5, 0.5, (1, 16, 16, 16, 1)).astype("float32"), 2, axis=0)
out = {}
for strategy in ("none", "mirrored"):
    with strategy_scope(strategy) as scope:
        keras.utils.set_random_seed(0)
        gan = InpaintingGAN.from_plan(plan, "injector")
        gan.compile(g_optimizer=keras.optimizers.SGD(0.05), d_optimizer=keras.optimizers.SGD(0.05),
                    jit_compile=False)
    start = [w.copy() for w in gan.get_weights()]
    logs = gan.fit(condition, real, batch_size=2, epochs=1, shuffle=False, verbose=0).history
    moved = [w - s for w, s in zip(gan.get_weights(), start)]
    out[strategy] = {"replicas": 1 if scope is None else scope.num_replicas_in_sync,
                     "logs": {k: v[-1] for k, v in logs.items()},
                     "moved": [m.tolist() for m in moved]}
print("RESULT" + json.dumps(out))
"""


def test_two_replicas_take_the_step_of_the_global_batch() -> None:
    """The loss scaling, checked with SGD (Adam's step hides a gradient's scale): one step on
    a global batch of two copies of one cube. On one device that is the cube's gradient; on
    two replicas, one copy each, each replica's gradient is the cube's too, and the update is
    their sum: it equals the one-device update (within 0.1 % of each weight tensor's largest
    step) only if each replica's loss is divided by the number of replicas. The logged losses
    are the unscaled ones (rtol 1e-4)."""
    plan = json.dumps(TINY.replace(dropout=0.0).to_dict())
    done = subprocess.run(
        [sys.executable, "-c", _SCALING, plan], env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    runs = json.loads(line[6:])
    one, two = runs["none"], runs["mirrored"]
    assert (one["replicas"], two["replicas"]) == (1, 2)
    for k in METRICS:
        assert two["logs"][k] == pytest.approx(one["logs"][k], rel=1e-4, abs=1e-6), k
    worst, largest = 0.0, 0.0
    for a, b in zip(one["moved"], two["moved"], strict=True):
        a, b = np.asarray(a), np.asarray(b)
        scale = np.abs(a).max()
        largest = max(largest, scale)
        if scale > 0:
            worst = max(worst, float(np.abs(b - a).max() / scale))
    assert largest > 1e-3  # the step moved the weights
    # Float noise only (summation order): a missing 1 / replicas would make it 1.0.
    assert worst < 1e-3, worst


# --- the contract: TensorBoard, budget, kill -9, replicas, the former loop's folders ---------


def test_tensorboard_event_files_hold_the_epoch_losses(dataset, tmp_path: Path) -> None:
    import tensorflow as tf

    out = tmp_path / "injector"
    summary = train_gan(
        dataset["data"], dataset["cache"], [0, 1], "injector", out, plan=TINY.replace(steps=4),
        progress=False,
    )  # fmt: skip
    assert summary["epochs_done"] == 2 and summary["steps_done"] == 4
    events = sorted((out / "logs" / "train").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under logs/train"
    found: dict[str, dict[int, float]] = {}
    for event in tf.compat.v1.train.summary_iterator(str(events[0])):
        for value in event.summary.value:
            found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    rows = _log(out)
    for metric in ("d_loss", "g_l1", "d_acc"):
        assert sorted(found[f"epoch_{metric}"]) == [0, 1]
        for row in rows:
            epoch = int(row["epoch"])
            assert found[f"epoch_{metric}"][epoch] == pytest.approx(float(row[metric]), rel=1e-5)
    assert is_sealed(json.loads((out / "manifest.json").read_text()))


def test_a_time_budget_stops_the_run_and_resume_continues_it(dataset, tmp_path: Path) -> None:
    out = tmp_path / "injector"
    args = (dataset["data"], dataset["cache"], [0, 1], "injector", out)
    first = train_gan(*args, plan=TINY.replace(steps=6), max_minutes=1e-6, progress=False)
    assert first["stopped_early"] and first["stopped"] == "time limit"
    assert first["epochs_done"] == 1 and first["steps_done"] == 1  # after its first batch
    manifest = json.loads((out / "manifest.json").read_text())
    assert is_sealed(manifest) and manifest["provenance"]["stopped_by_time"]
    assert (out / "generator.keras").is_file() and (out / "grids" / "step_000001.png").is_file()
    second = train_gan(*args, resume=True, progress=False)
    assert not second["stopped_early"] and second["epochs_done"] == 3
    assert second["steps_done"] == 1 + 2 * 2  # the cut epoch counts with the step it ran
    assert [int(r["epoch"]) for r in _log(out)] == [0, 1, 2]
    assert json.loads((out / "manifest.json").read_text())["steps_done"] == 5


def test_max_seconds_is_a_deprecated_alias(tmp_path: Path) -> None:
    with pytest.warns(DeprecationWarning, match="max_minutes"):
        with pytest.raises(LungCTError, match="nothing to resume"):
            train_gan(None, tmp_path, [0], "injector", tmp_path / "gan", resume=True,
                      max_seconds=60.0)  # fmt: skip


@pytest.mark.slow
def test_kill_9_then_resume_ends_where_an_uninterrupted_run_ends(dataset, tmp_path: Path) -> None:
    """A real ``kill -9`` of the training process once two epochs are backed up, then
    ``--resume``: the same generator and discriminator (rtol 1e-4) as a run that was never
    interrupted, dropout included (its masks are seeded per epoch)."""
    plan = tmp_path / "plan.json"
    TINY.replace(steps=12).save(plan)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(
        _argv(dataset, plan, whole, "--quiet"), env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(
        _argv(dataset, plan, killed, "--quiet"), env=_env(), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while restored_epoch(killed) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert 2 <= restored_epoch(killed) < 6
    assert not is_sealed(json.loads((killed / "manifest.json").read_text()))

    done = subprocess.run(
        _argv(dataset, plan, killed, "--resume"), env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # Nothing but the result on stdout; one line per epoch on stderr.
    (line,) = done.stdout.strip().splitlines()
    summary = json.loads(line)
    assert summary["epochs_done"] == 6 and summary["steps_done"] == 12
    assert "[CT-GAN injector] epoch 6/6: d_loss" in done.stderr
    assert is_sealed(json.loads((killed / "manifest.json").read_text()))
    epochs = [int(r["epoch"]) for r in _log(killed)]
    assert sorted(set(epochs)) == list(range(6)) and len(epochs) <= 7
    for a, b in zip(_weights(whole), _weights(killed), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert float(_log(killed)[-1]["g_loss"]) == pytest.approx(
        float(_log(whole)[-1]["g_loss"]), rel=1e-4
    )


_REPLICAS = r"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from ct_gan_augment.config import GANPlan
from ct_gan_augment.train import train_gan
from lungct.training import read_log
data, cache, root, plan = sys.argv[1:5]
out = {}
for strategy in ("none", "mirrored"):
    summary = train_gan(data, cache, [0, 1], "injector", f"{root}/{strategy}",
                        plan=GANPlan.load(plan), strategy=strategy, progress=False)
    out[strategy] = {"replicas": summary["replicas"], "log": read_log(f"{root}/{strategy}")}
print("RESULT" + json.dumps(out))
"""


def test_two_replicas_match_one_replica(dataset, tmp_path: Path) -> None:
    """``train_gan`` on two logical-CPU replicas and on the default device, the same global
    batch of 8 and the same batches: over 3 epochs of 2 steps the epoch means of d_loss,
    g_loss and g_l1 agree within 5 % and g_adv within 10 % (measured: 1.9, 1.1, 1.2 and
    4.4 %). Not to the last digit: batch normalisation's statistics are each replica's own (4
    cubes, not 8), and the adversarial term, the discriminator's score of the generated
    cubes, moves most with them. Without dropout, whose masks are drawn per replica."""
    plan = tmp_path / "plan.json"
    TINY.replace(batch_size=8, steps=6, dropout=0.0).save(plan)
    done = subprocess.run(
        [sys.executable, "-c", _REPLICAS, str(dataset["data"]), str(dataset["cache"]),
         str(tmp_path), str(plan)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    runs = json.loads(line[6:])
    assert runs["none"]["replicas"] == 1 and runs["mirrored"]["replicas"] == 2
    for k in ("d_loss", "g_loss", "g_adv", "g_l1"):
        one = [float(r[k]) for r in runs["none"]["log"]]
        two = [float(r[k]) for r in runs["mirrored"]["log"]]
        assert len(one) == len(two) == 3
        np.testing.assert_allclose(two, one, rtol=0.10 if k == "g_adv" else 0.05, err_msg=k)


def _as_former_loop(folder: Path, step: int) -> None:
    """Rewrite a model folder as the former loop left it after ``step`` steps: what its
    ``save_checkpoint`` wrote (both networks' ``.weights.h5``, both Adams' variables as
    ``v0000``... in a ``.npz``, ``state.json`` last) in ``checkpoints/step_NNNNNN/``, its log in
    ``train_log.csv``, and nothing of ``model.fit``'s."""
    epoch = step // TINY.checkpoint_every
    gan = keras.saving.load_model(folder / "checkpoints" / f"epoch_{epoch:03d}.keras")
    shutil.rmtree(folder / "checkpoints")
    shutil.rmtree(folder / "logs")
    target = folder / "checkpoints" / f"step_{step:06d}"
    target.mkdir(parents=True)
    gan.generator.save_weights(target / "generator.weights.h5")
    gan.discriminator.save_weights(target / "discriminator.weights.h5")
    for name, optimizer in (("g", gan.g_optimizer), ("d", gan.d_optimizer)):
        arrays = {f"v{i:04d}": np.asarray(v) for i, v in enumerate(optimizer.variables)}
        np.savez(target / f"optimizer_{name}.npz", **arrays)
    plan = json.loads((folder / "plan.json").read_text())
    state = {"step": step, "train_seconds": 1.0, "rng": {}, "log_rows": step, "plan": plan}
    (target / "state.json").write_text(json.dumps(state))
    (folder / "train_log.csv").write_text("step,d_loss\n1,0.5\n")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest = {
        k: v
        for k, v in manifest.items()
        if k not in ("format", "files", "provenance", "plan_sha256", "trained_plan")
    }
    (folder / "manifest.json").write_text(json.dumps({**manifest, "steps_done": step}))


def test_resumed_runs_end_where_an_uninterrupted_run_ends(dataset, tmp_path: Path, capsys) -> None:
    """A run of 4 steps resumed to 8 (from Keras' backup), and the same folder rewritten as
    the former loop left it after 4 steps, resumed from its step checkpoint at epoch 2 of
    2-step epochs: both end with the weights of an 8-step run that was never stopped (rtol
    1e-5), dropout included. The ``kill -9`` test below is the slow, real-process twin."""
    whole, ours, former = tmp_path / "whole", tmp_path / "ours", tmp_path / "former"
    args = (dataset["data"], dataset["cache"], [0, 1], "injector")
    train_gan(*args, whole, plan=TINY, progress=False)
    train_gan(*args, ours, plan=TINY.replace(steps=4), progress=False)
    shutil.copytree(ours, former)
    _as_former_loop(former, 4)
    train_gan(*args, ours, resume=True, steps=8, progress=False)
    capsys.readouterr()
    summary = train_gan(*args, former, resume=True, steps=8, progress=True)
    printed = capsys.readouterr()
    assert printed.out == ""  # progress goes to stderr, one line per epoch
    assert "epochs 3-4 of 2 steps of 4 cubes (from the former loop's step_000004)" in printed.err
    assert "[CT-GAN injector] epoch 4/4: d_loss " in printed.err
    assert summary["epochs_done"] == 4 and summary["steps_done"] == 8
    assert [int(r["epoch"]) for r in _log(former)] == [2, 3]
    for folder in (ours, former):
        for a, b in zip(_weights(whole), _weights(folder), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert (former / "checkpoints" / "step_000004" / "state.json").is_file()  # left as it was
    assert is_sealed(json.loads((former / "manifest.json").read_text()))
