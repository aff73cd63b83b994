"""Training a CT-GAN injector or remover: least squares GAN + L1, checkpoints, ``--resume``.

One step updates both networks from one generator pass (as TensorFlow's pix2pix tutorial):

* D: ``0.5 * (mean((D(real, cond) - real_label)^2) + mean((D(fake, cond) - fake_label)^2))``;
* G: ``mean((D(fake, cond) - real_label)^2) + l1_weight * mean(w * |fake - real|)``, where ``w``
  weighs the hole ``l1_hole_weight`` times the context (mean 1; the code's ``w = 1``);

each with its own Adam (``g_learning_rate``, ``d_learning_rate``; the code's D used 1e-6).
The step is a TensorFlow ``GradientTape`` function: other Keras backends stop with a clear
message (the models themselves are backend-agnostic and run inference anywhere).

Every ``checkpoint_every`` steps ``checkpoints/step_NNNNNN/`` gets both networks' weights
(``.weights.h5``), both optimisers' variables (``.npz``, no pickle) and the sampler state
(``state.json``, written last: a checkpoint with it is complete); ``generator.keras`` and
``discriminator.keras`` in the model folder are refreshed at the same time (atomically), so a
model is usable while it trains, with ``--allow-unfinished``: the folder is sealed
(:mod:`lungct.modeldir`, its done marker) only when training ends, and a resumed run takes the
seal away until it ends again. ``train_log.csv`` gets a row every ``log_every`` steps and
``grids/`` a PNG every ``grid_every`` steps.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ct_gan_augment.config import GANPlan
from ct_gan_augment.data import TrainingCubes
from ct_gan_augment.grid import save_grid
from ct_gan_augment.inject import generated_to_hu, make_condition, run_generator
from ct_gan_augment.manifest import ModelManifest, format_folds, library_versions
from ct_gan_augment.model import (
    DISCRIMINATOR_FILE,
    GENERATOR_FILE,
    NORMALISER_FILE,
    PLAN_FILE,
    build_discriminator,
    build_generator,
)
from ct_gan_augment.normaliser import CubeNormaliser
from lungct.errors import LungCTError
from lungct.fileio import atomic_path, write_json_atomic
from lungct.modeldir import (
    MANIFEST_NAME,
    describe_plan_changes,
    keras_file_problem,
    seal_model_dir,
)
from lungct.tables import write_csv_atomic

LOG_COLUMNS = (
    "step",
    "d_loss",
    "g_loss",
    "g_adv",
    "g_l1",
    "d_acc",
    "d_acc_real",
    "d_acc_fake",
    "train_seconds",
    "steps_per_s",
)
LOG_FILE = "train_log.csv"
CHECKPOINTS = "checkpoints"
GRIDS = "grids"
GRID_ROWS = 4


def require_tensorflow() -> None:
    """Training uses a TensorFlow GradientTape step; say so clearly on another backend."""
    import keras

    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise LungCTError(
            None,
            f"CT-GAN training needs the TensorFlow backend (KERAS_BACKEND is {backend!r}); "
            "run with KERAS_BACKEND=tensorflow (inference works on any backend)",
        )


def _save_optimizer(optimizer, path: Path) -> None:
    arrays = {f"v{i:04d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, **arrays)


def _load_optimizer(optimizer, variables, path: Path) -> None:
    optimizer.build(variables)
    with np.load(path, allow_pickle=False) as data:
        arrays = [data[f"v{i:04d}"] for i in range(len(data.files))]
    if len(arrays) != len(optimizer.variables):
        raise LungCTError(path, "optimiser checkpoint does not match the model (plan changed?)")
    for var, value in zip(optimizer.variables, arrays, strict=True):
        if tuple(var.shape) != value.shape:
            raise LungCTError(path, f"optimiser variable {var.path} has another shape")
        var.assign(value)


def latest_checkpoint(model_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder (one with ``state.json``), or None."""
    root = Path(model_dir) / CHECKPOINTS
    done = sorted(p.parent for p in root.glob("step_*/state.json"))
    return done[-1] if done else None


class GANTrainer:
    """Trains a generator / discriminator pair on augmented cubes (see the module docstring).

    Args:
        plan: sizes, rates, labels, schedule.
        model_dir: the model folder (``plan.json``, ``normaliser.npz`` and
            ``manifest.json`` are written by :func:`train_gan`).
        cubes: the training cubes.
        normaliser: fitted on the training cubes.
        manifest: provenance; updated with the steps done and the last losses.
        progress: show a progress bar.

    Example:
        >>> trainer = GANTrainer(plan, "runs/injector", cubes, normaliser, manifest)  # doctest: +SKIP
        >>> trainer.fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        plan: GANPlan,
        model_dir: str | os.PathLike,
        cubes: TrainingCubes,
        normaliser: CubeNormaliser,
        manifest: ModelManifest,
        progress: bool = True,
    ) -> None:
        require_tensorflow()
        import keras

        self.plan = plan
        self.model_dir = Path(model_dir)
        self.cubes = cubes
        self.normaliser = normaliser
        self.manifest = manifest
        self.progress = progress
        keras.utils.set_random_seed(plan.seed)
        self.generator = build_generator(plan, manifest.kind)
        self.discriminator = build_discriminator(plan, manifest.kind)
        self.sized = plan.condition_channels(manifest.kind) > 1
        self.g_optimizer = keras.optimizers.Adam(plan.g_learning_rate, beta_1=plan.beta_1)
        self.d_optimizer = keras.optimizers.Adam(plan.d_learning_rate, beta_1=plan.beta_1)
        self.g_optimizer.build(self.generator.trainable_variables)
        self.d_optimizer.build(self.discriminator.trainable_variables)
        self.rng = np.random.default_rng(plan.seed)
        self.step = 0
        self.train_seconds = 0.0
        self.log_rows: list[dict[str, Any]] = []
        n = len(cubes)
        self.grid_indices = sorted({int(i) for i in np.linspace(0, n - 1, min(GRID_ROWS, n))})
        self._step_fn = self._make_step()

    # --- the step ---------------------------------------------------------------------------

    def _make_step(self):
        import tensorflow as tf

        plan = self.plan
        g, d = self.generator, self.discriminator
        g_opt, d_opt = self.g_optimizer, self.d_optimizer
        real_label = float(plan.real_label)
        fake_label = float(plan.fake_label)
        middle = 0.5 * (real_label + fake_label)
        real_high = real_label > fake_label

        def is_real(score):
            return tf.cast(score > middle if real_high else score < middle, tf.float32)

        c = plan.cube_size
        weight = np.ones((1, c, c, c, 1), np.float32)
        hole = plan.hole_slice
        weight[:, hole, hole, hole] = plan.l1_hole_weight
        l1_weights = tf.constant(weight / weight.mean())

        @tf.function(reduce_retracing=True)
        def step(real, condition):
            with tf.GradientTape() as g_tape, tf.GradientTape() as d_tape:
                fake = g(condition, training=True)
                score_real = d([real, condition], training=True)
                score_fake = d([fake, condition], training=True)
                d_loss = 0.5 * (
                    tf.reduce_mean(tf.square(score_real - real_label))
                    + tf.reduce_mean(tf.square(score_fake - fake_label))
                )
                g_adv = tf.reduce_mean(tf.square(score_fake - real_label))
                g_l1 = tf.reduce_mean(l1_weights * tf.abs(fake - real))
                g_loss = g_adv + plan.l1_weight * g_l1
            g_vars = g.trainable_variables
            d_vars = d.trainable_variables
            g_opt.apply_gradients(zip(g_tape.gradient(g_loss, g_vars), g_vars, strict=True))
            d_opt.apply_gradients(zip(d_tape.gradient(d_loss, d_vars), d_vars, strict=True))
            acc_real = tf.reduce_mean(is_real(score_real))
            acc_fake = tf.reduce_mean(1.0 - is_real(score_fake))
            return {
                "d_loss": d_loss,
                "g_loss": g_loss,
                "g_adv": g_adv,
                "g_l1": g_l1,
                "d_acc_real": acc_real,
                "d_acc_fake": acc_fake,
            }

        return step

    def make_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """One batch: normalised ``real`` ``(B, c, c, c, 1)`` and ``condition``
        ``(B, c, c, c, C)`` float32 (C = 2 with the size channel)."""
        cubes, diameters, centres = self.cubes.sample_sized(self.rng, self.plan.batch_size)
        real = self.normaliser.transform(cubes)
        sizes = (diameters, centres) if self.sized else (None, None)
        return real[..., None], make_condition(real, self.plan, *sizes)

    def train_step(self) -> dict[str, float]:
        """Run one step; return its losses and accuracies as floats."""
        real, condition = self.make_batch()
        out = self._step_fn(real, condition)
        return {k: float(v) for k, v in out.items()}

    # --- outputs ----------------------------------------------------------------------------

    def write_grid(self) -> Path:
        """``grids/step_NNNNNN.png``: condition | generated | real for fixed training cubes."""
        real_hu = self.cubes.central(self.grid_indices)
        diameters = np.asarray(self.cubes.diameters())[self.grid_indices] if self.sized else None
        x = make_condition(self.normaliser.transform(real_hu), self.plan, diameters)
        generated = run_generator(self.generator, x)
        # As pasted: clipped, de-normalised, overflow and underflow fixed, despeckled.
        generated_hu = np.stack(
            [
                generated_to_hu(g, r, self.normaliser, self.plan)
                for g, r in zip(generated, real_hu, strict=True)
            ]
        )
        path = self.model_dir / GRIDS / f"step_{self.step:06d}.png"
        save_grid(
            path,
            [self.normaliser.inverse(x[..., 0]), generated_hu, real_hu],
            ["condition", "generated", "real"],
            suptitle=f"{self.manifest.kind}, step {self.step}",
        )
        return path

    def write_log(self) -> None:
        """Rewrite ``train_log.csv`` (atomically) with every row so far."""
        rows = ([r[c] for c in LOG_COLUMNS] for r in self.log_rows)
        write_csv_atomic(self.model_dir / LOG_FILE, LOG_COLUMNS, rows)

    def save_models(self) -> None:
        """Refresh ``generator.keras`` and ``discriminator.keras`` (atomically)."""
        for model, name in (
            (self.generator, GENERATOR_FILE),
            (self.discriminator, DISCRIMINATOR_FILE),
        ):
            with atomic_path(
                self.model_dir / name, suffix=".keras", check=keras_file_problem
            ) as tmp:
                model.save(tmp)

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_NNNNNN`` and the usable models; prune old checkpoints."""
        root = self.model_dir / CHECKPOINTS
        final = root / f"step_{self.step:06d}"
        tmp = root / f".step_{self.step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.generator.save_weights(tmp / "generator.weights.h5")
        self.discriminator.save_weights(tmp / "discriminator.weights.h5")
        _save_optimizer(self.g_optimizer, tmp / "optimizer_g.npz")
        _save_optimizer(self.d_optimizer, tmp / "optimizer_d.npz")
        state = {
            "step": self.step,
            "train_seconds": self.train_seconds,
            "rng": self.rng.bit_generator.state,
            "log_rows": len(self.log_rows),
            "plan": self.plan.to_dict(),
        }
        write_json_atomic(tmp / "state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self.save_models()
        self.manifest.steps_done = self.step
        self.manifest.train_seconds = round(self.train_seconds, 1)
        if self.log_rows:
            self.manifest.final = {k: v for k, v in self.log_rows[-1].items() if k != "step"}
        self.manifest.save(self.model_dir)
        done = sorted(p.parent for p in root.glob("step_*/state.json"))
        for old in done[: -self.plan.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def restore(self, checkpoint: str | os.PathLike) -> None:
        """Load weights, optimiser and sampler state from a checkpoint folder."""
        checkpoint = Path(checkpoint)
        try:
            state = json.loads((checkpoint / "state.json").read_text())
            self.generator.load_weights(checkpoint / "generator.weights.h5")
            self.discriminator.load_weights(checkpoint / "discriminator.weights.h5")
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise LungCTError(checkpoint, f"broken checkpoint ({exc})") from None
        _load_optimizer(
            self.g_optimizer, self.generator.trainable_variables, checkpoint / "optimizer_g.npz"
        )
        _load_optimizer(
            self.d_optimizer, self.discriminator.trainable_variables, checkpoint / "optimizer_d.npz"
        )
        try:
            self.step = int(state["step"])
            self.train_seconds = float(state["train_seconds"])
            self.rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as exc:
            raise LungCTError(
                checkpoint / "state.json", f"broken checkpoint state ({type(exc).__name__}: {exc})"
            ) from None
        trained = state.get("plan")
        if isinstance(trained, dict):  # the plan of the first sittings (only steps may change)
            changes = describe_plan_changes(
                {**trained, "steps": 0}, {**self.plan.to_dict(), "steps": 0}
            )
            if changes:
                raise LungCTError(
                    self.model_dir / PLAN_FILE,
                    f"edited since training started ({changes}): restore it to resume, or "
                    "train a new folder",
                )
        log_path = self.model_dir / LOG_FILE
        if log_path.is_file():
            with log_path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            self.log_rows = [
                {k: (int(v) if k == "step" else float(v)) for k, v in r.items()}
                for r in rows
                if int(r["step"]) <= self.step
            ]

    # --- the loop ---------------------------------------------------------------------------

    def fit(self, steps: int | None = None, max_seconds: float | None = None) -> dict[str, Any]:
        """Train until ``steps`` (default: the plan's) or ``max_seconds`` of training.

        Returns:
            ``{"steps_done", "train_seconds", "stopped", **last logged row}``.
        """
        plan = self.plan
        target = plan.steps if steps is None else steps
        window: list[dict[str, float]] = []
        session_start = time.perf_counter()
        stopped = "steps"
        bar = tqdm(
            total=target, initial=self.step, desc=f"train {self.manifest.kind}", unit="step",
            disable=not self.progress,
        )  # fmt: skip
        session_steps = 0
        while self.step < target:
            t0 = time.perf_counter()
            out = self.train_step()
            elapsed = time.perf_counter() - t0
            # The first step of a run traces the graph (seconds to tens of seconds): it is kept
            # out of the time and speed figures.
            if session_steps:
                self.train_seconds += elapsed
                window.append({**out, "seconds": elapsed})
            else:
                window.append({**out, "seconds": 0.0})
            session_steps += 1
            self.step += 1
            bar.update()
            if self.step % plan.log_every == 0 or self.step == target:
                self._log(window)
                window = []
                last = self.log_rows[-1]
                bar.set_postfix(
                    d=f"{last['d_loss']:.3f}", g=f"{last['g_loss']:.2f}", acc=f"{last['d_acc']:.2f}"
                )
            if self.step % plan.grid_every == 0:
                self.write_grid()
            if max_seconds is not None and time.perf_counter() - session_start >= max_seconds:
                stopped = "time limit"
                break
            if self.step % plan.checkpoint_every == 0 and self.step < target:
                self.save_checkpoint()
        bar.close()
        if window:
            self._log(window)
        if self.step % plan.grid_every:
            self.write_grid()
        self.write_log()
        self.save_checkpoint()
        last = self.log_rows[-1] if self.log_rows else {}
        return {
            "steps_done": self.step,
            "train_seconds": round(self.train_seconds, 1),
            "stopped": stopped,
            **{k: v for k, v in last.items() if k != "step"},
        }

    def _log(self, window: list[dict[str, float]]) -> None:
        mean = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
        seconds = sum(w["seconds"] for w in window)
        row = {
            "step": self.step,
            "d_loss": round(mean["d_loss"], 5),
            "g_loss": round(mean["g_loss"], 4),
            "g_adv": round(mean["g_adv"], 5),
            "g_l1": round(mean["g_l1"], 5),
            "d_acc": round(0.5 * (mean["d_acc_real"] + mean["d_acc_fake"]), 4),
            "d_acc_real": round(mean["d_acc_real"], 4),
            "d_acc_fake": round(mean["d_acc_fake"], 4),
            "train_seconds": round(self.train_seconds, 1),
            "steps_per_s": round(sum(w["seconds"] > 0 for w in window) / seconds, 3)
            if seconds > 0
            else 0.0,
        }
        self.log_rows.append(row)
        self.write_log()


def train_gan(
    data_dir: str | os.PathLike | None,
    cache_dir: str | os.PathLike,
    folds: Iterable[int],
    kind: str,
    model_dir: str | os.PathLike,
    plan: GANPlan | None = None,
    annotations: str | os.PathLike | None = None,
    excluded: str | os.PathLike | None = None,
    resume: bool = False,
    steps: int | None = None,
    max_seconds: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Cut the training cubes, fit the normaliser, and train (or resume) a model folder.

    A new run refuses a folder that already holds a model; ``resume`` continues the newest
    checkpoint with the folder's own plan (``steps`` may raise the target) and folds.

    Returns:
        the summary of :meth:`GANTrainer.fit` plus ``model_dir``, ``kind``, ``n_cubes``.
    """
    require_tensorflow()
    model_dir = Path(model_dir)
    folds = sorted(set(int(f) for f in folds))
    plan_path = model_dir / PLAN_FILE
    if resume:
        if not plan_path.is_file():
            raise LungCTError(model_dir, "nothing to resume (no plan.json); train without --resume")
        saved = GANPlan.load(plan_path)
        if plan is not None and plan.replace(steps=saved.steps) != saved:
            raise LungCTError(
                model_dir, "a resumed run keeps its plan.json; drop the plan options or use --steps"
            )
        plan = saved.replace(steps=steps)
        manifest = ModelManifest.load(model_dir)
        if manifest.kind != kind or manifest.training_folds != folds:
            raise LungCTError(
                model_dir,
                f"holds a {manifest.kind} of folds {format_folds(manifest.training_folds)}, not "
                f"a {kind} of folds {format_folds(folds)}",
            )
        # Unseal: the networks change from the next checkpoint on, and the folder is not a
        # finished model again until this run ends.
        manifest.save(model_dir)
    else:
        if plan_path.exists() or (model_dir / MANIFEST_NAME).exists():
            raise LungCTError(model_dir, "already holds a model; use --resume or another --out")
        plan = (plan or GANPlan()).replace(steps=steps)

    cubes = TrainingCubes.from_cache(
        cache_dir, data_dir, folds, kind, plan, annotations, excluded, progress=progress
    )
    if resume:
        normaliser = CubeNormaliser.load(model_dir / NORMALISER_FILE)
        if manifest.series != cubes.series:
            raise LungCTError(model_dir, "the cache now gives other training series; start anew")
    else:
        model_dir.mkdir(parents=True, exist_ok=True)
        normaliser = CubeNormaliser.fit(cubes.central(), plan.hist_bins)
        normaliser.save(model_dir / NORMALISER_FILE)
        plan.save(plan_path)
        manifest = ModelManifest(
            kind=kind,
            training_folds=folds,
            series=cubes.series,
            plan=plan.name,
            data_dir=None if data_dir is None else str(data_dir),
            cache_dir=str(cache_dir),
            annotations=str(annotations)
            if annotations is not None
            else (None if data_dir is None else str(Path(data_dir) / "annotations.csv")),
            n_cubes=len(cubes),
            nodule_diameters_mm=cubes.diameters() if kind == "injector" else [],
            versions=library_versions(),
        )
        manifest.save(model_dir)
    trainer = GANTrainer(plan, model_dir, cubes, normaliser, manifest, progress=progress)
    if resume:
        checkpoint = latest_checkpoint(model_dir)
        if checkpoint is not None:
            trainer.restore(checkpoint)
    summary = trainer.fit(max_seconds=max_seconds)
    plan.save(plan_path)  # the plan trained (a resumed run may have raised its steps)
    seal_model_dir(  # last: the seal is the folder's done marker
        model_dir,
        "gan",
        train_seconds=trainer.train_seconds,
        data_dir=data_dir,
        seeds={"plan": plan.seed},
        steps=trainer.step,
        extra={"kind": kind},
        plan=plan.to_dict(),
    )
    return {"model_dir": str(model_dir), "kind": kind, "n_cubes": len(cubes), **summary}
